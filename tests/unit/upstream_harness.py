"""Driving an upstream proxy's pure handshake in the tests, as the engine feeds it."""

from __future__ import annotations

from tproxy.upstream.handshake import NEED_MORE, Answer, ProxyHandshake


def feed(handshake: ProxyHandshake, data: bytes, cuts: list[int]) -> tuple[Answer, bytes]:
    """Feed `data` in pieces cut at `cuts` until an answer other than NEED_MORE; return it and
    the bytes not fed yet (what the engine would relay after Established)."""
    ends = [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    start = 0
    for end in ends:
        answer = handshake.receive(data[start:end])
        start = end
        if answer is not NEED_MORE:
            return answer, data[start:]
    return NEED_MORE, b""
