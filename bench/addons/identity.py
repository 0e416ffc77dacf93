"""The `tproxy-addon-identity` mode's addon: it claims every session and passes each chunk on
unchanged, so every byte goes through Python and the addon relay. What a claimed session costs
(issue 12: throughput and CPU per GiB against the copy relay)."""

from __future__ import annotations

from tproxy.addons.api import Session


def session_start(session: Session) -> None:
    session.claim()


def client_data(session: Session, data: bytes) -> bytes:
    return data


def server_data(session: Session, data: bytes) -> bytes:
    return data
