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
batch closed -- and whose number a socket opened later in the same batch may already reuse (a
session that decides after sniffing starts its upstream connect from inside a batch). Owners
always `forget` a descriptor before closing it; the rest of the batch skips every event of a
forgotten number, so a stale event can never reach a new owner of a reused number (whose own
events come with the next poll: the poller is level-triggered).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """Level-triggered epoll for session sockets, driven by one reader on the event loop.

    Interest changes made while a batch is dispatched are applied to the kernel once, at the end
    of the batch, from the last wanted mask: a socket that stops being written and starts being
    read in the same batch costs one EPOLL_CTL_MOD, not a DEL and an ADD. `forget(fd)` right
    before closing a descriptor costs nothing: close() takes it out of the epoll set.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        # Who waits on each descriptor. The interest mask owners want now is whether it is in
        # one, the other or both (`_mask`; no third dict per descriptor: memory per idle
        # session is a benchmark target); outside a batch it is what the epoll set holds.
        self._readers: dict[int, Readable] = {}
        self._writers: dict[int, Writable] = {}
        # Inside a batch: the mask the epoll set held before the batch changed it, per descriptor.
        self._before: dict[int, int] = {}
        self._batching = False
        # Inside a batch: descriptors forgotten so far (their remaining events are stale).
        self._forgotten: set[int] = set()
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def close(self) -> None:
        if not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()

    def add_reader(self, fd: int, owner: Readable) -> None:
        registered = self._mask(fd)
        self._readers[fd] = owner
        self._changed(fd, registered)

    def remove_reader(self, fd: int) -> None:
        registered = self._mask(fd)
        if self._readers.pop(fd, None) is not None:
            self._changed(fd, registered)

    def add_writer(self, fd: int, owner: Writable) -> None:
        registered = self._mask(fd)
        self._writers[fd] = owner
        self._changed(fd, registered)

    def remove_writer(self, fd: int) -> None:
        registered = self._mask(fd)
        if self._writers.pop(fd, None) is not None:
            self._changed(fd, registered)

    def forget(self, fd: int) -> None:
        """Drop every trace of `fd`; the caller closes it right away, which removes it from the
        epoll set (no other process shares our sockets: workers fork before any exists)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._before.pop(fd, None)
        if self._batching:
            self._forgotten.add(fd)

    def _mask(self, fd: int) -> int:
        """The interest owners want for `fd` now."""
        return (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)

    def _changed(self, fd: int, registered: int) -> None:
        """`fd`'s owners changed; `registered` is the mask they wanted before (outside a batch,
        what the epoll set holds)."""
        if self._batching:
            self._before.setdefault(fd, registered)
        else:
            self._apply(fd, registered)

    def _apply(self, fd: int, registered: int) -> None:
        wanted = self._mask(fd)
        if wanted == registered:
            return
        if not wanted:
            with contextlib.suppress(OSError):  # already closed: nothing left to remove
                self._epoll.unregister(fd)
        elif not registered:
            self._epoll.register(fd, wanted)
        else:
            self._epoll.modify(fd, wanted)

    @property
    def watched(self) -> int:
        """How many descriptors someone waits on."""
        return len(self._readers.keys() | self._writers.keys())

    def _dispatch(self) -> None:
        readers, writers, forgotten = self._readers, self._writers, self._forgotten
        self._batching = True
        try:
            for fd, events in self._epoll.poll(0, BATCH):
                if forgotten and fd in forgotten:
                    continue  # closed earlier in this batch: the event is stale
                if events & _READ_EVENTS:
                    reader = readers.get(fd)
                    if reader is not None:
                        reader.on_readable()
                if events & _WRITE_EVENTS:
                    writer = writers.get(fd)
                    if writer is not None:
                        writer.on_writable()
        finally:
            self._batching = False
            forgotten.clear()
            before, self._before = self._before, {}
            for fd, registered in before.items():
                # A descriptor closed within the batch without being forgotten has no owner
                # left to wait on it: failing to change its interest is then harmless.
                with contextlib.suppress(OSError):
                    self._apply(fd, registered)
