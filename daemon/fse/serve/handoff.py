"""The decode thread's handoff to an event loop: one wake-up per step, written while the
next batch decodes.

`loop.call_soon_threadsafe` wakes the loop with a send on its self-pipe, a call that
releases the GIL: the loop thread takes it and sends every stream's token to gRPC while
the decode thread waits to get it back before it can start the next decode. A Mailbox
instead keeps the step's events in a deque (appending needs no wake-up) and is woken
through its own eventfd, written from inside the next llama_decode call, after the GIL
is released (native/fse_decode.c): the loop's work then overlaps the decode. When no
decode follows (the last stream ended, a new stream is being admitted), the scheduler
wakes it at once instead. Measured in docs/benchmarks.md ("The daemon at a GPU's rate").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Items for one event loop: `put` from any thread, then `wake` (or write 1 to `fd`);
    `deliver` gets each item, in order, on the loop. Made and closed on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[T], None]) -> None:
        self.loop = loop
        self._deliver = deliver
        self._items: collections.deque[T] = collections.deque()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        loop.add_reader(self.fd, self._drain)

    def put(self, item: T) -> None:
        """Queue an item; it reaches the loop at the next wake-up (or an earlier one)."""
        self._items.append(item)

    def wake(self) -> None:
        if self._closed:  # its descriptor's number may belong to another file by now
            return
        os.eventfd_write(self.fd, 1)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):  # woken for items drained already
            os.eventfd_read(self.fd)
        items = self._items
        while items:
            self._deliver(items.popleft())

    def close(self) -> None:
        """Deliver what is left and stop listening (on the loop, once no thread puts); on
        a closed loop, only close the descriptor: nobody listens there any more."""
        if self._closed:
            return
        self._closed = True
        if not self.loop.is_closed():
            self._drain()
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
