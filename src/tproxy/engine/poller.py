"""The relay's own epoll: sessions' sockets watched by the kernel, not by the event loop.

Theory of operation
-------------------
An event loop keeps a handle object per watched descriptor: uvloop's costs ~600 bytes per
add_reader, which is most of what an idle session cost. Here every session socket is registered
in one `epoll` set of our own (kernel memory only), with one dict entry per descriptor pointing
at the object to call. The event loop watches just that epoll descriptor; when it is readable,
`_dispatch` takes a batch of ready events and calls `on_readable()` / `on_writable()` on their
owners. The epoll set is level-triggered, so an owner that leaves bytes unread is simply called
again on the next batch.

Stale events: an event in a batch may belong to a descriptor that an earlier event of the same
batch closed. Owners always unregister before closing, and an event whose descriptor has no
owner any more is skipped. New descriptors are only ever registered outside a batch (accept and
connect run in the event loop's own callbacks), so an event can never reach a new owner of a
reused number.
"""

from __future__ import annotations

import asyncio
import select
from typing import Protocol

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
BATCH = 256


class Readable(Protocol):
    def on_readable(self) -> None: ...


class Writable(Protocol):
    def on_writable(self) -> None: ...


class Poller:
    """Level-triggered epoll for session sockets, driven by one reader on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Readable] = {}
        self._writers: dict[int, Writable] = {}
        self._masks: dict[int, int] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def close(self) -> None:
        if not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()

    def add_reader(self, fd: int, owner: Readable) -> None:
        self._readers[fd] = owner
        self._set(fd, self._masks.get(fd, 0) | _IN)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~_IN)

    def add_writer(self, fd: int, owner: Writable) -> None:
        self._writers[fd] = owner
        self._set(fd, self._masks.get(fd, 0) | _OUT)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._set(fd, self._masks.get(fd, 0) & ~_OUT)

    def _set(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            del self._masks[fd]
            self._epoll.unregister(fd)
        elif not old:
            self._masks[fd] = mask
            self._epoll.register(fd, mask)
        else:
            self._masks[fd] = mask
            self._epoll.modify(fd, mask)

    @property
    def watched(self) -> int:
        return len(self._masks)

    def _dispatch(self) -> None:
        readers, writers = self._readers, self._writers
        for fd, events in self._epoll.poll(0, BATCH):
            if events & _READ_EVENTS:
                reader = readers.get(fd)
                if reader is not None:
                    reader.on_readable()
            if events & _WRITE_EVENTS:
                writer = writers.get(fd)
                if writer is not None:
                    writer.on_writable()
