"""The tamper-evident audit log: one JSON line per decision, each chained to the last.

Every line is a JSON object that starts with `ts` (RFC 3339 UTC), `seq` (1, 2, ...)
and `event`, carries the event's fields, and ends with `prev`: the sha256 (hex) of
the previous line's bytes without its newline, or 64 zeros for the first line.
Editing, deleting or reordering a line breaks the chain at that line, and
`fse audit verify` names it. Removing lines from the end leaves a valid shorter
chain: compare the last `seq` and hash that verify prints with a copy kept
elsewhere (for example the journal, where `audit.head` is logged at shutdown).

Writing fails closed: a line that cannot be written (disk full, file size limit,
I/O error) is kept in memory, the log reports itself unhealthy (the daemon then
refuses new streams and reports NOT_SERVING) and every later write or `retry()`
tries again, in order, so nothing is lost and the chain stays whole. A partly
written line is cut off again before the retry.

Prompts and outputs are recorded as sha256 unless the log was opened with
`text=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
# Fields holding user content: hashed unless the log records text.
CONTENT_FIELDS = ("prompt", "output")
# Enough of the file's end to hold its last line when resuming.
TAIL_BYTES = 1 << 20


class AuditError(Exception):
    """The audit log cannot be opened or resumed; the message names the file and why."""


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


# -- processors: small steps from an event to its line --------------------------------


Record = dict[str, Any]


def hash_content(record: Record) -> Record:
    """Replace prompt/output text by `<field>_sha256`."""
    for name in CONTENT_FIELDS:
        if name in record:
            value = record.pop(name)
            record[f"{name}_sha256"] = hashlib.sha256(str(value).encode()).hexdigest()
    return record


def drop_none(record: Record) -> Record:
    return {k: v for k, v in record.items() if v is not None}


def name_non_finite(record: Record) -> Record:
    """JSON has no NaN or infinity: a non_finite guard's value is written as "nan"."""
    return {
        k: repr(v) if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in record.items()
    }


def render(record: Record, seq: int, prev: str) -> bytes:
    """The line's bytes (no newline): ts, seq and event first, prev last."""
    head = {"ts": record.pop("ts"), "seq": seq, "event": record.pop("event")}
    doc = {**head, **record, "prev": prev}
    return json.dumps(
        doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str
    ).encode()


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- the log --------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the last line's seq and hash."""

    seq: int
    hash: str


class AuditLog:
    """Appends chained JSON lines to one file; thread-safe (the decode thread and the
    event loop both write). Call `write` for each event; check `healthy`."""

    def __init__(
        self,
        path: Path,
        *,
        text: bool = False,
        on_health: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.path = path
        self.on_health = on_health  # (healthy, error) whenever health changes
        self._steps: list[Callable[[Record], Record]] = [drop_none, name_non_finite]
        if not text:
            self._steps.insert(0, hash_content)
        self._lock = threading.Lock()
        self._pending: deque[Record] = deque()  # records not yet written, oldest first
        self.error = ""  # why writing fails; "" once everything kept is written
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"--audit-log {path}: cannot open: {exc.strerror}") from None
        self.head = _resume(path)

    @property
    def healthy(self) -> bool:
        # From `error`, not from `_pending`: a record sits in `_pending` during every
        # write (and os.write releases the GIL), which must not read as a failure.
        return self.error == ""

    def write(self, event: str, **fields: Any) -> bool:
        """Record an event. False if it (or an earlier one) could not be written yet:
        it is kept and retried, and the log is unhealthy until then."""
        record: Record = {"ts": now_rfc3339(), "event": event, **fields}
        for step in self._steps:
            record = step(record)
        with self._lock:
            self._pending.append(record)
            return self._flush()

    def retry(self) -> bool:
        """Try the kept lines again; True once everything is written."""
        with self._lock:
            return self._flush()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _flush(self) -> bool:
        was_healthy = self.healthy
        while self._pending:
            record = self._pending[0]
            line = render(dict(record), self.head.seq + 1, self.head.hash)
            try:
                self._append(line + b"\n")
            except OSError as exc:
                self.error = f"cannot write {self.path}: {exc.strerror or exc}"
                if was_healthy and self.on_health is not None:
                    self.on_health(False, self.error)
                return False
            self._pending.popleft()
            self.head = Head(self.head.seq + 1, line_hash(line))
        if not was_healthy:
            self.error = ""
            if self.on_health is not None:
                self.on_health(True, "")
        return True

    def _append(self, data: bytes) -> None:
        if self._fd < 0:
            raise OSError("the audit log is closed")
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError:
            # Cut a partial line off so that the retried line starts the chain cleanly.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise


def _resume(path: Path) -> Head:
    """The head of an existing log (its last line), or the genesis for an empty one."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if not last:
        return Head(0, GENESIS)
    if not tail.endswith(b"\n"):
        raise AuditError(
            f"--audit-log {path}: the last line is incomplete; check it with "
            f"`fse audit verify {path}` and move the file away to start a new log"
        )
    try:
        seq = json.loads(last)["seq"]
        if not isinstance(seq, int) or seq < 1:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            f"--audit-log {path}: the last line is not an audit record; check it with "
            f"`fse audit verify {path}` and move the file away to start a new log"
        ) from None
    return Head(seq, line_hash(last))


# -- verification ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    ok: bool
    lines: int  # lines known to be intact, from the first
    head: Head  # seq and hash of the last line the chain was followed to
    problem: str = ""  # "line N: what is wrong" when not ok


def verify(path: Path) -> Verification:
    """Walk the chain from the first line; stop at the first line that breaks it."""
    head = Head(0, GENESIS)
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            problem, suspect_before = _check_line(raw, head)
            if problem:
                intact = count - 1 if suspect_before else count
                return Verification(False, intact, head, f"line {number}: {problem}")
            head = Head(head.seq + 1, line_hash(raw.rstrip(b"\n")))
            count += 1
    return Verification(True, count, head)


def _check_line(raw: bytes, head: Head) -> tuple[str, bool]:
    """What is wrong with a line ("" if nothing), and whether the line before it is
    suspect too (a prev mismatch means that line was edited, or this prev was)."""
    if not raw.endswith(b"\n"):
        return "incomplete (no newline at the end of the file)", False
    try:
        doc = json.loads(raw)
    except ValueError:
        return "not JSON", False
    if not isinstance(doc, dict):
        return "not a JSON object", False
    if doc.get("seq") != head.seq + 1:
        seq = doc.get("seq")
        return (
            f"seq is {seq!r}, expected {head.seq + 1} (a line was removed, added or moved)",
            False,
        )
    if doc.get("prev") != head.hash:
        n = head.seq
        return f"prev is not the sha256 of line {n} (line {n} or this prev was edited)", True
    for name in ("ts", "event"):
        if not isinstance(doc.get(name), str):
            return f"`{name}` is missing", False
    return "", False
