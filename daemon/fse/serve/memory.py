"""Request buffers and glibc's malloc: reuse them within a burst, hand them back after.

A 1 MiB prompt passes through about five buffers of its size (the relay's reads,
gRPC's message, the parsed string, the Python str, its UTF-8 bytes). How glibc
serves them decides what a burst of such requests costs:

- A block above M_MMAP_THRESHOLD gets a mapping of its own, unmapped at free; the
  heap's top above M_TRIM_THRESHOLD is given back at free too. Either way the next
  buffer faults in fresh zeroed pages, and each unmap interrupts the decode threads
  on the other cores to flush their TLBs. With the mmap threshold at 256 KiB, 16
  refused 1 MiB prompts faulted in 102 MiB of pages, and in bench_oversized.py `perf`
  put 40% of the daemon's CPU for a burst in page faults and munmap.
- Blocks kept in the heap are reused without faults, but a heap fragmented by small
  live objects keeps the freed ones: left alone, RSS crept up ~30 MiB in six bursts.
- malloc_trim(0) gives back the free pages anywhere in the main heap, but in the other
  threads' heaps (glibc's arenas) never their tops: with gRPC's threads and the worker
  threads each on a heap of its own, RSS still crept up ~2 MiB a burst. The daemon's
  threads allocate little (the decode path nothing per token, and the GIL serializes
  the Python ones), so one heap for all costs no contention: 1 and 8 streams ran as
  fast as before, in six interleaved rounds.

So request buffers stay in the one heap (fixed thresholds above the largest message
gRPC accepts, which also turns off glibc's adaptive ones; the same 16 prompts now
fault in 4-7 MiB), and a HeapTrimmer gives the freed memory back with malloc_trim(0)
once a burst of calls is over, and only when the process has grown. On a libc without
these functions (musl) all of this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("fse.serve.memory")

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
TRIM_DELAY = 0.5  # seconds without a call ending: the burst is over
TRIM_AT_LEAST_EVERY = 5.0  # seconds, under steady load (calls always ending)
TRIM_ABOVE = 1 << 20  # growth of the resident set worth handing back
PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return function


def keep_request_buffers_in_the_heap(largest_message: int) -> None:
    """Serve blocks up to twice the largest accepted message from the heap, keep the
    heap's top until malloc_trim (glibc's own adaptive values, fixed), and keep one
    heap for every thread. Call it before any thread starts."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 2 * largest_message)
        mallopt(M_TRIM_THRESHOLD, 4 * largest_message)
        mallopt(M_ARENA_MAX, 1)


class HeapTrimmer:
    """Gives freed request buffers back to the system once a burst of calls is over.

    malloc_trim holds the heap's lock while it walks the free blocks (a few ms after a
    burst), so it waits for TRIM_DELAY without a call ending, not for the first one to
    end: once after a burst, not every half second during it. Calls that never stop
    ending still get a trim every TRIM_AT_LEAST_EVERY seconds."""

    def __init__(self) -> None:
        self._trim = _libc_function("malloc_trim")
        self._pending: asyncio.TimerHandle | None = None
        self._first_ended = 0.0  # loop time of the first call end the pending check serves
        self._resident_after_trim = resident_bytes()
        self.trims = 0  # how many times memory was handed back (for tests and logs)

    def call_ended(self) -> None:
        """A call is over and its buffers freed: check the heap once calls stop ending."""
        if self._trim is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._pending is None:
            self._first_ended = now
        else:
            self._pending.cancel()
        due = min(now + TRIM_DELAY, self._first_ended + TRIM_AT_LEAST_EVERY)
        self._pending = loop.call_at(due, self._check)

    def _check(self) -> None:
        self._pending = None
        # The process grew since the last trim: a burst's buffers, most likely. (glibc
        # cannot say how much of its free memory is still resident.)
        if resident_bytes() > self._resident_after_trim + TRIM_ABOVE:
            # Off the event loop: the madvise calls take a few ms.
            asyncio.get_running_loop().run_in_executor(None, self._hand_back)

    def _hand_back(self) -> None:
        assert self._trim is not None
        before, began = resident_bytes(), time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - began
        self._resident_after_trim = after = resident_bytes()
        self.trims += 1
        log.debug("heap.trimmed", rss_before=before, rss_after=after, seconds=round(took, 4))


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE
