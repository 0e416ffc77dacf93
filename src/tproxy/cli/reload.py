"""`tproxy reload`: the running proxy's answer to `reload`, as lines for the operator and whether
the reload was done everywhere (the exit status systemd's `ExecReload` reports).

The answer (`Supervisor._reload_for_control`) says whether the supervisor applied the files and
its notices (the restart-only options kept, or why the running configuration stays); once it
applied them, each worker's own outcome and notices, the workers that did not answer in time
and those that died meanwhile. Done means: the supervisor applied the files and every worker
asked applied them too, or died (the one started in its place runs the new configuration). A
worker's notices are shown when it did not apply them, or when they say what the supervisor's
do not (a worker's TLS interception kept); the routine "reloaded the configuration (max
connections N)" of each worker is not repeated: the last line counts the workers instead.

Pure, and it takes any JSON: an answer of another shape (a newer or older tproxy) becomes a line
that says so, never an exception. Text from the proxy is escaped (`to_printable`): the notices
quote the operator's files.
"""

from __future__ import annotations

from typing import Any, Final

from tproxy.sniffers.printable import to_printable

MAX_LINE_CHARS: Final = 2000
_WORKER_DONE: Final = "reloaded the configuration (max connections"


def describe_reload(answer: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the reload was done everywhere, and the lines that say what happened: the
    supervisor's notices, each worker's problem or extra notice, and last how many workers
    reloaded."""
    reloaded = answer.get("reloaded")
    notices = _texts(answer.get("notices"))
    if not isinstance(reloaded, bool):
        return False, ["the running tproxy answered `reload` in a form this tproxy cannot read"]
    if not reloaded:
        return False, notices or ["the running tproxy kept its running configuration"]
    lines = list(notices)
    applied = refused = 0
    workers = answer.get("workers")
    by_worker = workers if isinstance(workers, dict) else {}
    for worker, outcome in sorted(by_worker.items(), key=lambda item: (len(item[0]), item[0])):
        if not isinstance(outcome, dict):
            continue
        name = _text(str(worker))
        said = _texts(outcome.get("notices"))
        if outcome.get("reloaded") is not True:
            refused += 1
            why = "; ".join(said) if said else "no reason given"
            lines.append(f"worker {name} kept its running configuration: {why}")
            continue
        applied += 1
        for notice in said:
            if notice not in notices and not notice.startswith(_WORKER_DONE):
                lines.append(f"worker {name}: {notice}")
    died = _ids(answer.get("died"))
    if died:
        lines.append(f"{_workers(died)} stopped during the reload: a worker started in "
                     "place of one runs the new configuration")  # fmt: skip
    missing = _ids(answer.get("missing"))
    if missing:
        waited = answer.get("waited_s")
        within = f" within {waited:g} s" if isinstance(waited, int | float) else ""
        lines.append(f"{_workers(missing)} did not confirm the reload{within}")
    total = applied + refused + len(missing) + len(died)
    done = not refused and not missing
    if done and total == 0:
        lines.append("reloaded the configuration (no worker was running: those started next "
                     "run it)")  # fmt: skip
    elif done and not died:
        lines.append(f"reloaded the configuration in {applied} workers")
    else:
        lines.append(f"reloaded the configuration in {applied} of {total} workers")
    return done, lines


def _ids(value: object) -> list[str]:
    return [_text(str(item)) for item in value] if isinstance(value, list) else []


def _workers(ids: list[str]) -> str:
    return f"workers {', '.join(ids)}" if len(ids) > 1 else f"worker {ids[0]}"


def _texts(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [_text(item) for item in value if isinstance(item, str)]


def _text(value: str) -> str:
    return to_printable(value.encode("utf-8", "backslashreplace"), MAX_LINE_CHARS)
