"""The relay's own epoll: readers and writers on one descriptor, and events for gone owners."""

from __future__ import annotations

import asyncio
import socket

from tproxy.engine.poller import Poller


class Owner:
    def __init__(self) -> None:
        self.readable = 0
        self.writable = 0

    def on_readable(self) -> None:
        self.readable += 1

    def on_writable(self) -> None:
        self.writable += 1


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_reader_and_writer_share_a_descriptor() -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        left, right = socket.socketpair()
        reader, writer = Owner(), Owner()
        try:
            poller.add_writer(left.fileno(), writer)  # a fresh socket is writable at once
            poller.add_reader(left.fileno(), reader)
            await _settle()
            assert writer.writable > 0 and reader.readable == 0
            poller.remove_writer(left.fileno())
            seen = writer.writable
            right.send(b"x")
            await _settle()
            assert reader.readable > 0 and writer.writable == seen
            assert poller.watched == 1
            poller.remove_reader(left.fileno())
            assert poller.watched == 0
        finally:
            poller.close()
            left.close()
            right.close()

    asyncio.run(scenario())


def test_an_event_for_a_removed_owner_is_skipped() -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        first, second = socket.socketpair(), socket.socketpair()
        calls: list[str] = []

        class Closer:
            """Reading one descriptor removes the other's owner, as a session end would."""

            def __init__(self, name: str, other: int) -> None:
                self.name, self.other = name, other

            def on_readable(self) -> None:
                calls.append(self.name)
                poller.remove_reader(self.other)

        try:
            a, b = first[0].fileno(), second[0].fileno()
            poller.add_reader(a, Closer("a", b))
            poller.add_reader(b, Closer("b", a))
            first[1].send(b"x")
            second[1].send(b"x")  # both ready in the same batch
            await _settle()
            # Whichever ran first removed the other before its turn, and it never came (the
            # first is called again and again: level-triggered, its byte is never read).
            assert len(set(calls)) == 1
        finally:
            poller.close()
            for sock in (*first, *second):
                sock.close()

    asyncio.run(scenario())


def test_a_stale_event_never_reaches_the_new_owner_of_a_reused_number() -> None:
    """In one batch: the first event's owner closes descriptor X and opens a socket that gets
    X's number (as a session that decides after sniffing starts its connect); X's own event,
    later in the same batch, must not reach the new socket's owner."""

    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        x_mine, x_peer = socket.socketpair()
        z_mine, z_peer = socket.socketpair()
        opened: list[socket.socket] = []
        newcomer = Owner()
        stale = Owner()

        class Closer:
            def on_readable(self) -> None:
                number = x_mine.fileno()
                poller.forget(number)
                x_mine.close()
                poller.remove_reader(z_mine.fileno())
                fresh, other = socket.socketpair()  # the lowest free numbers: X's among them
                opened.extend((fresh, other))
                reused = fresh if fresh.fileno() == number else other
                assert reused.fileno() == number
                poller.add_reader(number, newcomer)  # nothing to read on it: never readable

        try:
            poller.add_reader(z_mine.fileno(), Closer())
            poller.add_reader(x_mine.fileno(), stale)
            z_peer.send(b"z")  # ready first
            x_peer.close()  # then X: readable (EOF) and hung up
            await _settle()
            assert opened, "the closer ran"
            assert newcomer.readable == 0 and stale.readable == 0
        finally:
            poller.close()
            for sock in (x_peer, z_mine, z_peer, *opened):
                sock.close()

    asyncio.run(scenario())
