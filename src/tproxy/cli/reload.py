"""`tproxy reload`: the running proxy's answer to `reload`, as lines for the operator and whether
the reload was done everywhere (the exit status systemd's `ExecReload` reports).

The answer (`Supervisor._reload_for_control`) says whether the supervisor applied the files and
its notices (the restart-only options kept, "reloaded the configuration in N workers", or why
the running configuration stays); once it applied them, each worker's own outcome and notices,
and the workers that did not answer in time. Done means: the supervisor applied the files and
every worker asked applied them too. A worker's notices are shown when it did not apply them, or
when they say what the supervisor's do not (a worker's TLS interception kept); the routine
"reloaded the configuration (max connections N)" of each worker is not repeated.

Pure, and it takes any JSON: an answer of another shape (a newer or older tproxy) becomes a line
that says so, never an exception. Text from the proxy is escaped (`to_printable`): the notices
quote the operator's files.
"""

from __future__ import annotations

from typing import Any, Final

from tproxy.sniffers.printable import to_printable

MAX_LINE_CHARS: Final = 2000
_WORKER_DONE: Final = "reloaded the configuration (max connections"


def describe_reload(answer: dict[str, Any], timeout_s: float) -> tuple[bool, list[str]]:
    """Whether the reload was done everywhere, and the lines that say what happened
    (`timeout_s`: how long the supervisor waited for its workers)."""
    reloaded = answer.get("reloaded")
    notices = _texts(answer.get("notices"))
    if not isinstance(reloaded, bool):
        return False, ["the running tproxy answered `reload` in a form this tproxy cannot read"]
    if not reloaded:
        return False, notices or ["the running tproxy kept its running configuration"]
    lines = list(notices)
    done = True
    workers = answer.get("workers")
    by_worker = workers if isinstance(workers, dict) else {}
    for worker, outcome in sorted(by_worker.items(), key=lambda item: (len(item[0]), item[0])):
        if not isinstance(outcome, dict):
            continue
        name = _text(str(worker))
        said = _texts(outcome.get("notices"))
        if outcome.get("reloaded") is not True:
            done = False
            why = "; ".join(said) if said else "no reason given"
            lines.append(f"worker {name} kept its running configuration: {why}")
            continue
        for notice in said:
            if notice not in notices and not notice.startswith(_WORKER_DONE):
                lines.append(f"worker {name}: {notice}")
    missing = answer.get("missing")
    if isinstance(missing, list) and missing:
        done = False
        names = ", ".join(_text(str(worker)) for worker in missing)
        who = (
            f"workers {names} did not confirm their"
            if len(missing) > 1
            else (f"worker {names} did not confirm its")
        )
        lines.append(f"{who} reload within {timeout_s:g} s")
    return done, lines


def _texts(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [_text(item) for item in value if isinstance(item, str)]


def _text(value: str) -> str:
    return to_printable(value.encode("utf-8", "backslashreplace"), MAX_LINE_CHARS)
