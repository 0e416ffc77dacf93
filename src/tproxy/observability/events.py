"""The session event schema: one dataclass per event, rendered as a text line or a JSON object.

Every event has `ts` (UTC, ISO 8601 with milliseconds) and `event` (its name below). Endpoints
are strings, `ip:port` or `[ip]:port`; a session is named by its id (`tproxy.core.session_id`),
a string. The schema is `docs/events.md` (a unit test keeps it and these classes the same):
add fields freely, never rename or remove one (scripts parse these lines).

Events are plain slotted dataclasses, not frozen: a frozen dataclass's __init__ costs a
setattr call per field, and three events are made per connection.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tproxy.engine.tls_relay import TLSOutcome
    from tproxy.tls.legs import TLSInfo


@dataclass(slots=True)
class Event:
    name: ClassVar[str] = "event"

    def text(self) -> str:
        raise NotImplementedError

    def json_fields(self) -> str | None:
        """The event's fields as JSON object members, for the events written once or more per
        connection (hand-rendered: json.dumps of a dict costs more than the rest of the event);
        None renders them generically."""
        return None


@dataclass(slots=True)
class Listening(Event):
    """The proxy is ready: every listener is bound."""

    name: ClassVar[str] = "listening"
    listen: list[str]
    spoof_source: bool
    mark: int
    nofile_limit: int
    max_connections: int

    def text(self) -> str:
        spoof = "on" if self.spoof_source else "off"
        return (
            f"listening on {', '.join(self.listen)} (spoof-source {spoof}, mark {self.mark:#x}, "
            f"open-file limit {self.nofile_limit}, max connections {self.max_connections})"
        )


@dataclass(slots=True)
class SessionOpened(Event):
    name: ClassVar[str] = "session_open"
    session: str
    client: str
    dst: str
    active: int

    def text(self) -> str:
        return (
            f"session {self.session} opened: {self.client} -> {self.dst}, "
            f"{self.active} active sessions"
        )

    def json_fields(self) -> str:
        return (
            f'"session":{_q(self.session)},"client":{_q(self.client)},"dst":{_q(self.dst)},'
            f'"active":{self.active}'
        )


@dataclass(slots=True)
class UpstreamConnected(Event):
    name: ClassVar[str] = "upstream_connected"
    session: str
    dst: str
    source: str
    connect_ms: float
    upstream: str | None = None  # the endpoint connected, when a redirect or via made it not dst

    def text(self) -> str:
        where = self.dst if self.upstream is None else f"{self.upstream} (for {self.dst})"
        return (
            f"session {self.session} connected to {where} from {self.source} "
            f"in {self.connect_ms:.1f} ms"
        )

    def json_fields(self) -> str:
        return (
            f'"session":{_q(self.session)},"dst":{_q(self.dst)},"source":{_q(self.source)},'
            f'"connect_ms":{float(self.connect_ms)!r},"upstream":{_q_or_null(self.upstream)}'
        )


@dataclass(slots=True)
class UpstreamFailed(Event):
    name: ClassVar[str] = "upstream_failed"
    session: str
    dst: str
    error: str
    detail: str

    def text(self) -> str:
        return (
            f"session {self.session} connection to {self.dst} failed: {self.error} ({self.detail})"
        )


@dataclass(slots=True)
class SessionClosed(Event):
    name: ClassVar[str] = "session_close"
    session: str
    client: str
    dst: str
    bytes_up: int
    bytes_down: int
    duration_s: float
    reason: str
    active: int
    relay: str | None  # "splice", "copy", "capture", "addon"; None: never relayed
    spliced_bytes: int  # of bytes_up + bytes_down, how many moved by splice
    # What the client's first bytes said (`sniffers`); None when it never relayed. The names are
    # the client's, escaped to printable ASCII by the sniffers and quoted in the text line.
    proto: str | None = None
    sni: str | None = None
    alpn: list[str] | None = None
    tls_offered: str | None = None
    ech: bool | None = None
    http_host: str | None = None
    http_method: str | None = None
    # What the policy decided: `action`; `rule` None for the default (or without a policy);
    # `upstream` the endpoint connected when not `dst` (a redirect target, a via proxy).
    rule: str | None = None
    action: str | None = None
    upstream: str | None = None
    # A captured session's capture file (`--capture-dir`) and where `capture_max_bytes` cut it.
    capture: str | None = None
    capture_truncated_at: int | None = None
    # The addons that claimed the session (its relay is "addon"); None when none did.
    addons: list[str] | None = None
    # TLS interception (`tls = "intercept"`): whether it was decrypted, what each leg
    # negotiated or why it failed (`tls_fields`), and why a session was passed through instead.
    tls_intercepted: bool | None = None
    client_tls: dict[str, Any] | None = None
    upstream_tls: dict[str, Any] | None = None
    passthrough: str | None = None

    def text(self) -> str:
        how = "" if self.relay is None else f", {self.relay}"
        decided = ""
        if self.rule is not None:
            decided = f", rule {_q(self.rule)}: {self.action}"
        elif self.action not in {None, "allow"}:
            decided = f", default: {self.action}"
        if self.upstream is not None:
            decided += f" {self.upstream}" if self.action == "via" else f" to {self.upstream}"
        if self.capture is not None:
            decided += f", captured to {_q(self.capture)}"
            if self.capture_truncated_at is not None:
                decided += f" (cut at {self.capture_truncated_at} B)"
        if self.addons:
            decided += f", claimed by {_q(','.join(self.addons))}"
        if self.tls_intercepted:
            decided += ", TLS intercepted"
        elif self.passthrough is not None:
            decided += f", TLS passed through ({self.passthrough})"
        what = "" if self.proto is None else f", {self.proto}"
        if self.sni is not None:
            what += f" sni={_q(self.sni)}"
        if self.alpn:
            what += f" alpn={_q(','.join(self.alpn))}"
        if self.tls_offered is not None:
            what += f" offered {self.tls_offered}"
        if self.ech:
            what += " ech"
        if self.http_method is not None:
            what += f" {_q(self.http_method)}"
        if self.http_host is not None:
            what += f" host={_q(self.http_host)}"
        return (
            f"session {self.session} closed ({self.reason}): {self.client} -> {self.dst}, "
            f"up {self.bytes_up} B, down {self.bytes_down} B, {self.duration_s:.3f} s{how}"
            f"{what}{decided}, {self.active} active sessions"
        )

    def json_fields(self) -> str:
        return (
            f'"session":{_q(self.session)},"client":{_q(self.client)},"dst":{_q(self.dst)},'
            f'"bytes_up":{self.bytes_up},"bytes_down":{self.bytes_down},'
            f'"duration_s":{float(self.duration_s)!r},"reason":{_q(self.reason)},'
            f'"active":{self.active},"relay":{_q_or_null(self.relay)},'
            f'"spliced_bytes":{self.spliced_bytes},"proto":{_q_or_null(self.proto)},'
            f'"sni":{_q_or_null(self.sni)},"alpn":{_list_or_null(self.alpn)},'
            f'"tls_offered":{_q_or_null(self.tls_offered)},'
            f'"ech":{_bool_or_null(self.ech)},'
            f'"http_host":{_q_or_null(self.http_host)},'
            f'"http_method":{_q_or_null(self.http_method)},"rule":{_q_or_null(self.rule)},'
            f'"action":{_q_or_null(self.action)},"upstream":{_q_or_null(self.upstream)},'
            f'"capture":{_q_or_null(self.capture)},"capture_truncated_at":'
            f"{'null' if self.capture_truncated_at is None else self.capture_truncated_at},"
            f'"addons":{_list_or_null(self.addons)},'
            f'"tls_intercepted":{_bool_or_null(self.tls_intercepted)},'
            f'"client_tls":{_object_or_null(self.client_tls)},'
            f'"upstream_tls":{_object_or_null(self.upstream_tls)},'
            f'"passthrough":{_q_or_null(self.passthrough)}'
        )


@dataclass(slots=True)
class SessionFailed(Event):
    """A session ended by an unexpected error: a bug to report, logged with the session id; or an
    addon's hook raised (`addon` and `hook` say which)."""

    name: ClassVar[str] = "session_error"
    session: str
    error: str
    # An addon's hook raised (or an async one timed out): which addon, which hook; the error is
    # then escaped to printable ASCII and bounded (`engine.addon_session.hook_error`).
    addon: str | None = None
    hook: str | None = None

    def text(self) -> str:
        if self.addon is not None:
            return f"session {self.session} addon {self.addon} {self.hook} failed: {self.error}"
        return f"session {self.session} error: {self.error}"


@dataclass(slots=True)
class ConnectionsRefused(Event):
    """New connections reset at accept, counted and written at most once per sweep (a flood of
    them must not become a flood of log lines): `reason` is `max_connections` or
    `out_of_descriptors`."""

    name: ClassVar[str] = "connections_refused"
    count: int
    reason: str
    detail: str

    def text(self) -> str:
        return f"reset {self.count} new connections since the last notice: {self.detail}"


@dataclass(slots=True)
class Notice(Event):
    """Something the operator should know that is not about one session."""

    name: ClassVar[str] = "notice"
    message: str

    def text(self) -> str:
        return self.message


@dataclass(slots=True)
class Stopped(Event):
    name: ClassVar[str] = "stopped"
    signal: str
    sessions_cut: int

    def text(self) -> str:
        return f"stopped on {self.signal}, {self.sessions_cut} live sessions cut"


@dataclass(slots=True)
class SessionsListed(Event):
    """Every worker's live sessions, as the supervisor collected them (on SIGUSR1).

    `workers`: one object per worker that answered, {worker, pid, active, sessions: [{id,
    client, dst}], truncated}; `missing`: the workers that did not answer in time.
    """

    name: ClassVar[str] = "sessions"
    workers: list[dict[str, Any]]
    missing: list[int]

    def text(self) -> str:
        parts = [f"worker {w['worker']}: {w['active']} live" for w in self.workers]
        parts += [f"worker {m}: no answer" for m in self.missing]
        total = sum(int(w["active"]) for w in self.workers)
        return f"{total} live sessions ({'; '.join(parts)})"


_second_cache: list[Any] = [-1, ""]


def format_timestamp(epoch_s: float) -> str:
    """ISO 8601 UTC with milliseconds; the part up to the second is formatted once a second."""
    second = int(epoch_s)
    if _second_cache[0] != second:
        _second_cache[0] = second
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_cache[1]}.{int(epoch_s * 1000) % 1000:03d}Z"


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_q = encode_basestring_ascii  # a JSON string literal, in C


def _q_or_null(text: str | None) -> str:
    return "null" if text is None else _q(text)


def _bool_or_null(value: bool | None) -> str:
    return "null" if value is None else ("true" if value else "false")


def _object_or_null(value: dict[str, Any] | None) -> str:
    """An intercepted session's TLS facts (rare: json.dumps' cost is fine; its texts are
    escaped and bounded where they are made)."""
    return "null" if value is None else json.dumps(value, separators=(",", ":"))


def _leg(info: TLSInfo | None, error: str | None) -> dict[str, Any] | None:
    """One leg's negotiated facts and why it failed; None for a leg that never began."""
    if info is None and error is None:
        return None
    return {
        "version": None if info is None else info.version,
        "cipher": None if info is None else info.cipher,
        "alpn": None if info is None else info.alpn,
        "resumed": None if info is None else info.resumed,
        "error": error,
    }


def tls_fields(
    outcome: TLSOutcome | None, passthrough: str | None
) -> tuple[bool | None, dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The close event's `tls_intercepted`, `client_tls`, `upstream_tls` and `passthrough`."""
    if outcome is None:
        return (None, None, None, passthrough)
    failure, side = outcome.failure, outcome.failed_side
    client = _leg(outcome.client, failure.detail if failure and side == "client" else None)
    if client is not None:
        client["rejected"] = outcome.rejected
    upstream = _leg(outcome.upstream, failure.detail if failure and side == "upstream" else None)
    if upstream is not None:
        info = outcome.upstream
        upstream["subject"] = None if info is None else info.peer_subject
        upstream["issuer"] = None if info is None else info.peer_issuer
        upstream["verified"] = outcome.upstream_verify and info is not None and info.verified
    return (outcome.intercepted, client, upstream, passthrough)


def _list_or_null(texts: list[str] | None) -> str:
    return "null" if texts is None else f"[{','.join(map(_q, texts))}]"


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def render_json(event: Event, epoch_s: float, worker: int | None = None) -> str:
    fields = event.json_fields()
    if fields is not None:
        where = "" if worker is None else f'"worker":{worker},'
        return f'{{"ts":"{format_timestamp(epoch_s)}","event":"{event.name}",{where}{fields}}}'
    record: dict[str, Any] = {"ts": format_timestamp(epoch_s), "event": event.name}
    if worker is not None:
        record["worker"] = worker
    for name in _field_names(type(event)):
        record[name] = getattr(event, name)
    return _ENCODE(record)


def render_text(event: Event, epoch_s: float, worker: int | None = None) -> str:
    where = "" if worker is None else f"[worker {worker}] "
    return f"{format_timestamp(epoch_s)} {where}{event.text()}"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        Listening,
        SessionOpened,
        UpstreamConnected,
        UpstreamFailed,
        SessionClosed,
        SessionFailed,
        ConnectionsRefused,
        Notice,
        Stopped,
        SessionsListed,
    )
}


def parse_json_event(record: dict[str, Any]) -> Event | None:
    """The event a JSON log line describes (extra fields ignored); None for unknown events."""
    cls = EVENT_TYPES.get(str(record.get("event")))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in record.items() if k in names})
    except TypeError:
        return None
