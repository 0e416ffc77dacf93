"""The open-file limit: raise the soft RLIMIT_NOFILE to the hard one at start-up.

Each session holds two descriptors (client and upstream); the soft limit is often 1,024 while the
hard one is far higher. Raising the hard limit needs CAP_SYS_RESOURCE, which root may not have
(here the hard limit is 20,000 and root cannot raise it), so we only ever go up to the hard limit.
"""

from __future__ import annotations

import resource


def raise_nofile_limit() -> int:
    """Raise the soft limit to the hard limit and return the limit now in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return soft
    if soft == hard:
        return hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard
