"""Where the example addons (`examples/` in the source tree) are, for the demo to load one.

Run from a clone (`scripts/bootstrap` installs tproxy editable), they are the clone's own
`examples/`, as edited. Installed from a wheel (`pip install .`), they are the copies the
package ships as data files in `share/tproxy/examples/` under the installation's prefix
(pyproject.toml's `data-files`), found through the installed distribution's file list so that
any install scheme (a virtual environment, `--user`, a system prefix) works.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tproxy
from tproxy.lab.topology import LabError

INSTALLED_DIR = "share/tproxy/examples"


class ExampleNotFoundError(LabError):
    """The example is neither in a source tree nor installed; the message says where it looked."""


def example_addon(name: str) -> Path:
    """The path of the example addon `name` (e.g. "http_log.py").

    Raises:
        ExampleNotFoundError: neither the source tree nor the installed package has it.
    """
    root = Path(tproxy.__file__).resolve().parents[2]  # src/tproxy/__init__.py -> the clone
    in_tree = root / "examples" / name
    if (root / "pyproject.toml").is_file() and in_tree.is_file():
        return in_tree
    try:
        files = importlib.metadata.distribution("tproxy").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.as_posix().endswith(f"{INSTALLED_DIR}/{name}"):
            installed = Path(str(file.locate())).resolve()
            if installed.is_file():
                return installed
    raise ExampleNotFoundError(
        f"the example addon {name} is neither in a source tree's examples/ nor installed with "
        f"the package ({INSTALLED_DIR}): run the demo from a clone (sudo scripts/demo)"
    )
