"""What a refused caller can make the daemon write: a bounded amount, however many calls.

Every refusal (`auth.denied`, `input.rejected`) is counted, and none is ever dropped:
the first few of each peer in a window are written in full (with any caller-chosen text
cut to a fixed size, see `bounded`), the rest of the window are counted into one
`auth.denied_summary` / `input.rejected_summary` record per peer, written when the
window ends and when the daemon stops. So sum(full records) + sum(summary `count`s) is
the number of refusals, while a flood of them costs a bounded number of bytes a window.

A peer is the caller's identity, except that a tokenless TCP caller (`tcp:ADDRESS:PORT`)
is its address alone: a new connection (a new port) must not make a new peer. Peers
beyond MAX_PEERS in one window share the summary of `client` "*".
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("fse.serve.refusals")

# Caller-chosen text echoed into a record (a request id, a policy name) keeps this
# many bytes; the sha256 and length of the whole say what it was.
ECHO_BYTES = 128
# A whole error message in a record (ours, but it may quote the caller) keeps this many.
ERROR_BYTES = 1024
WINDOW_SECONDS = 60.0
FULL_PER_PEER = 10  # refusals of one peer written in full per window and event
FULL_PER_WINDOW = 100  # ... and of all peers together
MAX_PEERS = 256  # peers counted apart per window and event; the others share "*"
OTHER_PEERS = "*"

Write = Callable[..., object]  # AuditLog.write(event, **fields)


def clip(text: str, limit: int) -> str:
    """`text` if its UTF-8 form fits in `limit` bytes, else its first `limit` bytes
    (whole characters) and a note of the full length."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head}... ({len(data)} bytes in all)"


def bounded(name: str, text: str, limit: int = ECHO_BYTES) -> dict[str, Any]:
    """Audit fields for caller-chosen text: `name` itself when it fits in `limit` bytes;
    else its first `limit` bytes plus `name_bytes` (the full length) and `name_sha256`
    (of the full UTF-8 bytes), so a long value can still be matched, never replayed."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return {name: text}
    return {
        name: data[:limit].decode("utf-8", "ignore"),
        f"{name}_bytes": len(data),
        f"{name}_sha256": hashlib.sha256(data).hexdigest(),
    }


def peer_of(client: str) -> str:
    """The peer a refusal is counted against: a tcp:ADDRESS:PORT caller is its address
    (every connection has a new port); any other caller is its own identity."""
    if client.startswith("tcp:"):
        return client.rsplit(":", 1)[0]
    return client


@dataclass(slots=True)
class _Count:
    written: int = 0  # written in full this window
    counted: int = 0  # counted into the summary instead
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)


class RefusalLog:
    """Writes refusals to the audit log within bounds (module docstring). Thread-safe;
    the window's summaries are written by a timer on the event loop that saw the first
    refusal summarized, by the next refusal after the window ended, and by `flush`."""

    def __init__(self, write: Write, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._clock = clock
        self._lock = threading.Lock()
        self._window_end = clock() + WINDOW_SECONDS
        self._counts: dict[tuple[str, str], _Count] = {}
        self._written = 0  # in full this window, all peers
        self._timer: asyncio.TimerHandle | None = None

    def record(self, event: str, client: str, reason: str, **fields: Any) -> bool:
        """Count one refusal; write it in full (True) or into the window's summary."""
        with self._lock:
            ended = self._roll()
            peer = peer_of(client)
            key = (event, peer)
            if key not in self._counts and self._peers(event) >= MAX_PEERS:
                key = (event, OTHER_PEERS)
            count = self._counts.setdefault(key, _Count())
            full = count.written < FULL_PER_PEER and self._written < FULL_PER_WINDOW
            if full:
                count.written += 1
                self._written += 1
            else:
                count.counted += 1
                count.reasons[reason] += 1
                self._arm()
        self._write_summaries(ended)
        if full:
            self._write(event, client=client or None, reason=reason, **fields)
        return full

    def flush(self) -> None:
        """Write the summaries of the window so far and start a new one (at stop)."""
        with self._lock:
            ended = self._take()
        self._write_summaries(ended)

    def _tick(self) -> None:
        with self._lock:
            self._timer = None
            ended = self._roll()
            if self._counts:  # the window rolled early (a refusal came in late): go on
                self._arm()
        self._write_summaries(ended)

    def _peers(self, event: str) -> int:
        return sum(1 for e, _ in self._counts if e == event)

    def _roll(self) -> list[tuple[str, str, _Count]]:
        """If the window is over: its counts, and a new window (under the lock)."""
        return self._take() if self._clock() >= self._window_end else []

    def _take(self) -> list[tuple[str, str, _Count]]:
        ended = [(e, p, c) for (e, p), c in self._counts.items() if c.counted]
        self._counts = {}
        self._written = 0
        self._window_end = self._clock() + WINDOW_SECONDS
        return ended

    def _arm(self) -> None:
        """A timer for the window's end, on the running loop (none outside one: then the
        next refusal or `flush` writes the summary)."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(self._window_end - self._clock(), 0.0)
        self._timer = loop.call_later(delay, self._tick)

    def _write_summaries(self, ended: list[tuple[str, str, _Count]]) -> None:
        for event, peer, count in ended:
            reasons = dict(sorted(count.reasons.items()))
            log.warning(f"{event}_summary", client=peer, count=count.counted, reasons=reasons)
            self._write(
                f"{event}_summary",
                client=peer,
                count=count.counted,
                reasons=reasons,
                window_seconds=WINDOW_SECONDS,
            )
