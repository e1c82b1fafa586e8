"""The tamper-evident audit log: one JSON line per decision, each chained to the last.

Every line is a JSON object that starts with `ts` (RFC 3339 UTC), `seq` (1, 2, ...)
and `event`, carries the event's fields, and ends with `prev`: the sha256 (hex) of
the previous line's bytes without its newline, or 64 zeros for the first line. In
keyed mode (`key_file`) a last field `mac` follows: HMAC-SHA256 with the key over
the line's bytes without the `,"mac":"..."` part. docs/audit.md describes every
event and what each mode does and does not prove.

The log is one active file and, with `rotate_bytes`, rotated files `NAME.1` (the
newest) .. `NAME.<keep>`; the chain runs on across them: each new file opens with an
`audit.rotated` line chained to the last line of the file before it, and an
`audit.pruned` line for the file that rotation deleted (its seq range and last hash).
A line longer than `rotate_bytes` is written alone after those, so rotation always
makes progress. `verify()` walks a chain over one or several files (or a directory),
names the first line that breaks it, says whether its start is known (seq 1, or right
after lines an `audit.pruned` record or the caller's anchor accounts for) and lists
the streams that never got a verdict.

Opening a log checks it first: its directory writable only by its owner (the daemon's
user or root) unless sticky; the log a regular file of the daemon's user with one name
(no hard link), opened without following a symlink (the pid file `NAME.lock` and the
rotated files too); not in use by another writer (an exclusive flock on the log file
itself, so a second name for it, a hard link or a linked directory, meets the lock
too); a tail that verifies (keyed or not, as this log is). It then reads back what
the last run left: the streams that started and never got a verdict (`orphans`, a
daemon killed mid-stream) and the next free stream number, so that stream numbers stay
unique along the chain.

Writing fails closed: a line that cannot be written (disk full, file size limit,
I/O error, a failed fsync or rotation) is kept in memory, the log reports itself
unhealthy (the daemon then refuses new streams and reports NOT_SERVING) and every
later write or `retry()` tries again, in order, so nothing is lost and the chain
stays whole. A partly written line is cut off again before the retry. A write never
waits long for another thread's write (a stalled disk): after LOCK_WAIT its line
stays queued, the log reports itself unhealthy, and the writer that holds the lock,
or a later retry, writes it.

Prompts and outputs are recorded as sha256 unless the log was opened with
`text=True`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from fse.core.files import FileRefused, read_trusted

GENESIS = "0" * 64
# Fields holding user content: hashed unless the log records text.
CONTENT_FIELDS = ("prompt", "output")
# Names the log itself writes; an event's fields may not use them.
RESERVED = frozenset({"ts", "seq", "event", "prev", "mac"})
# How much of the file's end is verified when resuming (`fse audit verify` checks all).
TAIL_BYTES = 1 << 20
FSYNC_MODES = ("always", "interval", "never")
MIN_KEY_BYTES = 16
ROTATED = "audit.rotated"
PRUNED = "audit.pruned"
# The lines a rotation opens a new file with: a file holding only these takes the next
# line whatever its length (rotating again could never make it fit).
OPENERS = frozenset({ROTATED, PRUNED})
# How long a write waits for another thread's write before leaving its line queued
# (the event loop writes too: it must never wait on a stalled disk for long).
LOCK_WAIT = 0.5
# How long close() waits for a write or an fsync in progress.
CLOSE_WAIT = 5.0
# A run of the daemon starts here; streams still open at the next one are orphans.
RUN_START = "server.started"
ORPHANS = "audit.orphans"
_MAC_TAIL = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')


class AuditError(Exception):
    """The audit log cannot be opened or resumed; the message names the file and why."""


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def line_mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def load_key(path: Path) -> bytes:
    """The HMAC key in `path` (its bytes, surrounding whitespace stripped). Read as every
    trusted file is (a regular file, never a FIFO or device, writable by its owner only),
    and refused if others may read it or it is shorter than 16 bytes."""
    try:
        key = read_trusted(path).strip()
        mode = os.stat(path).st_mode
    except FileRefused as exc:
        raise AuditError(f"--audit-key-file {exc}") from None
    except OSError as exc:
        raise AuditError(f"--audit-key-file {path}: cannot read: {exc.strerror}") from None
    if mode & 0o007:
        raise AuditError(
            f"--audit-key-file {path}: readable by others (mode {stat.S_IMODE(mode):04o}); "
            "make it readable only by the service (chmod 600, or systemd LoadCredential=)"
        )
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(
            f"--audit-key-file {path}: {len(key)} bytes is too short; accepted: at least "
            f"{MIN_KEY_BYTES} bytes (for example `head -c 32 /dev/urandom > {path}`)"
        )
    return key


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


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


def check_names(record: Record) -> Record:
    """The log's own names (seq, prev, mac...) cannot be an event's fields."""
    clash = RESERVED.intersection(record)
    if clash:
        raise ValueError(f"audit fields {sorted(clash)} are reserved")
    return record


def encode_fields(record: Record) -> bytes:
    """An event's fields as JSON members (`"k":v,...`, no braces). Raises ValueError
    for a NaN or infinity, which JSON cannot hold."""
    text = json.dumps(
        record, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str
    )
    return text[1:-1].encode()


@dataclass(frozen=True, slots=True)
class Entry:
    """An event ready to be chained: everything but its seq, prev and mac."""

    ts: str
    event: str
    fields: bytes


def render(entry: Entry, seq: int, prev: str, key: bytes | None = None) -> bytes:
    """The line's bytes (no newline): ts, seq and event first, then the fields, prev,
    and in keyed mode the mac over everything before it."""
    head = json.dumps(
        {"ts": entry.ts, "seq": seq, "event": entry.event},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    middle = b"," + entry.fields if entry.fields else b""
    line = head[:-1].encode() + middle + b',"prev":"' + prev.encode() + b'"}'
    if key is None:
        return line
    return line[:-1] + b',"mac":"' + line_mac(key, line).encode() + b'"}'


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- checking a chain, line by line ---------------------------------------------------


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the last line's seq and hash."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Orphan:
    """A stream.started line that no stream.verdict followed."""

    stream: Any
    request_id: str
    file: Path
    line: int
    seq: int


@dataclass(frozen=True)
class Pruned:
    """An audit.pruned line: a file rotation deleted, and the lines it held."""

    name: str  # the file's name when it was deleted
    first_seq: int | None
    last_seq: int | None
    last_sha256: str | None
    seq: int  # of the audit.pruned line


@dataclass
class _Walk:
    """Follows a chain line by line: what breaks it, which macs were seen, which
    streams are still open, which files rotation pruned. `head` is None until the start
    of the chain is known. `anchor`: a line the caller knows (seq and sha256)."""

    key: bytes | None
    anchor: Head | None = None
    head: Head | None = None
    start_seq: int = 0
    start_prev: str = ""  # the prev of the chain's first line
    anchor_seen: bool = False  # the anchor's line is in the chain, with its hash
    only_openers: bool = True  # every line so far is an audit.rotated or audit.pruned
    lines: int = 0
    macs: set[bool] = field(default_factory=set)  # True: a line with a mac was seen
    open: dict[Any, Orphan] = field(default_factory=dict)
    orphans: list[Orphan] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)

    def feed(self, raw: bytes, file: Path, number: int, *, first: bool, anchor: bool) -> str:
        """Check one line (with its newline): "" if it continues the chain, else what
        is wrong. `first`: the first line of its file; `anchor`: accept the line as
        the chain's known start without checking its prev (the start of a tail)."""
        if not raw.endswith(b"\n"):
            return "incomplete (no newline at the end of the file)"
        line = raw[:-1]
        try:
            doc = json.loads(line)
        except ValueError:
            return "not JSON"
        if not isinstance(doc, dict):
            return "not a JSON object"
        for name in ("ts", "event"):
            if not isinstance(doc.get(name), str):
                return f"`{name}` is missing"
        problem = self._check_mac(line)
        if problem:
            return problem
        seq, prev = doc.get("seq"), doc.get("prev")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return f"seq is {seq!r}, not a number"
        if self.head is None:
            if seq == 1 and prev != GENESIS:
                return "prev of the first line is not the genesis (64 zeros)"
            rotated = first and doc["event"] == ROTATED
            known = self.anchor == Head(seq - 1, str(prev))
            if seq != 1 and not (anchor or rotated or known):
                return (
                    f"seq is {seq}, expected 1 (the lines before it are missing; only a "
                    f"file that starts with {ROTATED} may start later)"
                )
            self.start_seq, self.start_prev = seq, str(prev)
        elif seq != self.head.seq + 1:
            expected = self.head.seq + 1
            return f"seq is {seq!r}, expected {expected} (a line was removed, added or moved)"
        elif prev != self.head.hash:
            n = self.head.seq
            return f"prev is not the sha256 of line {n} (line {n} or this prev was edited)"
        self.head = Head(seq, line_hash(line))
        if self.anchor is not None and seq == self.anchor.seq:
            if self.head.hash != self.anchor.hash:
                return f"seq {seq} is not the line anchored (its sha256 is {self.head.hash})"
            self.anchor_seen = True
        self.lines += 1
        self.only_openers = self.only_openers and doc["event"] in OPENERS
        self._track(doc, file, number)
        return ""

    def _check_mac(self, line: bytes) -> str:
        match = _MAC_TAIL.search(line)
        self.macs.add(match is not None)
        if self.key is None:
            return ""
        if match is None:
            return "no mac (written without a key, or its mac was removed)"
        body = line[: match.start()] + b"}"
        if not hmac.compare_digest(line_mac(self.key, body).encode(), match.group(1)):
            return "mac does not match (the line was edited, or written without this key)"
        return ""

    def _track(self, doc: Record, file: Path, number: int) -> None:
        event = doc["event"]
        if event == "stream.started":
            stream = doc.get("stream")
            self.open[stream] = Orphan(
                stream, str(doc.get("request_id", "")), file, number, doc["seq"]
            )
        elif event == "stream.verdict":
            self.open.pop(doc.get("stream"), None)
        elif event == RUN_START:
            self.orphans += self.open.values()
            self.open = {}
        elif event == PRUNED:
            self.pruned.append(
                Pruned(
                    str(doc.get("file")),
                    _int_or_none(doc.get("first_seq")),
                    _int_or_none(doc.get("last_seq")),
                    doc.get("last_sha256") if isinstance(doc.get("last_sha256"), str) else None,
                    doc["seq"],
                )
            )

    def incomplete(self, files: Sequence[Path]) -> tuple[str, str]:
        """(why the start of the chain is not known, "") or ("", what verified it)."""
        if self.head is None:
            return "", ""
        anchor = self.anchor
        if anchor is not None and anchor.seq > self.head.seq:
            return (
                f"the chain ends at seq {self.head.seq}, before the anchored seq "
                f"{anchor.seq} (lines were cut off its end, or files not given)",
                "",
            )
        if self.start_seq == 1:
            return "", ""
        before = self.start_seq - 1
        for pruned in self.pruned:
            if (pruned.last_seq, pruned.last_sha256) == (before, self.start_prev):
                return "", f"{PRUNED} at seq {pruned.seq} ({pruned.name})"
        if self.anchor_seen or anchor == Head(before, self.start_prev):
            return "", "the anchor given (--from-seq/--from-hash)"
        return (
            f"the chain starts at seq {self.start_seq} ({files[0]} line 1) and nothing "
            f"accounts for the lines before it: no {PRUNED} record in the chain ends at seq "
            f"{before} with the sha256 that line's prev holds, and no anchor "
            "(--from-seq/--from-hash) does; files were deleted, or not given",
            "",
        )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- verification ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    intact: bool  # no line breaks the chain
    lines: int  # lines known to be intact, from the first
    head: Head  # seq and hash of the last line the chain was followed to
    problem: str = ""  # "line N: what is wrong" when not intact
    file: Path | None = None  # the file of that line
    files: tuple[Path, ...] = ()  # what was walked, oldest first
    start_seq: int = 1  # the seq the chain starts at (> 1: earlier files pruned or not given)
    macs: str = "absent"  # checked | unchecked (lines carry macs, no key) | absent
    orphans: tuple[Orphan, ...] = ()  # streams whose run ended without their verdict
    unfinished: tuple[Orphan, ...] = ()  # no verdict yet at the end (in flight, or killed)
    incomplete: str = ""  # why the chain's start (or end) is not known; "" when it is
    anchored_by: str = ""  # what accounts for the lines before a start past seq 1
    pruned: tuple[Pruned, ...] = ()  # the audit.pruned records along the chain

    @property
    def ok(self) -> bool:
        """Intact, and complete: from seq 1, or from a verified anchor."""
        return self.intact and not self.incomplete


def chain_files(paths: Path | Sequence[Path]) -> list[Path]:
    """The files of a chain, oldest first: the given files, or a directory's audit logs
    (`*.jsonl` and its rotated `*.jsonl.N`), ordered by rotation (`.N` .. `.1`, then the
    active file) whatever the order they were given in."""
    given = [paths] if isinstance(paths, Path) else list(paths)
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            files += [p for p in path.iterdir() if re.fullmatch(r".+\.jsonl(\.[0-9]+)?", p.name)]
        else:
            files.append(path)

    def order(p: Path) -> tuple[str, int]:
        base, _, n = p.name.rpartition(".")
        if n.isdigit() and base:
            return (str(p.with_name(base)), -int(n))
        return (str(p), 0)

    return sorted(files, key=order)


def verify(
    paths: Path | Sequence[Path], key: bytes | None = None, anchor: Head | None = None
) -> Verification:
    """Walk the chain from the first line of the oldest file; stop at the first line
    that breaks it. With `key`, every line's mac is checked too. `anchor` (seq and
    sha256 of a line recorded elsewhere): a chain may start right after it, and must
    match it where it holds that seq."""
    files = chain_files(paths)
    walk = _Walk(key, anchor)
    for path in files:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                before = walk.lines
                problem = walk.feed(raw, path, number, first=number == 1, anchor=False)
                if problem:
                    suspect = problem.startswith("prev is not")  # that line is in doubt too
                    return Verification(
                        False,
                        before - 1 if suspect else before,
                        walk.head or Head(0, GENESIS),
                        f"line {number}: {problem}",
                        path,
                        tuple(files),
                        walk.start_seq or 1,
                        _macs(walk),
                    )
    incomplete, anchored_by = walk.incomplete(files)
    return Verification(
        True,
        walk.lines,
        walk.head or Head(0, GENESIS),
        files=tuple(files),
        start_seq=walk.start_seq or 1,
        macs=_macs(walk),
        orphans=tuple(walk.orphans),
        unfinished=tuple(walk.open.values()),
        incomplete=incomplete,
        anchored_by=anchored_by,
        pruned=tuple(walk.pruned),
    )


def _macs(walk: _Walk) -> str:
    if walk.key is not None:
        return "checked"
    return "unchecked" if True in walk.macs else "absent"


# -- the log --------------------------------------------------------------------------


class AuditLog:
    """Appends chained JSON lines to one file (rotating it by size); thread-safe (the
    decode thread and the event loop both write). Call `write` for each event; check
    `healthy`. `orphans` and `next_stream` tell what the last run left behind."""

    def __init__(
        self,
        path: Path,
        *,
        text: bool = False,
        fsync: str = "interval",
        fsync_interval_ms: int = 1000,
        rotate_bytes: int = 0,
        keep: int = 10,
        key_file: Path | None = None,
        on_health: Callable[[bool, str], None] | None = None,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync: {fsync!r}; accepted: {', '.join(FSYNC_MODES)}")
        self.path = path
        self.on_health = on_health  # (healthy, error) whenever health changes
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes  # 0: never rotate
        self.keep = max(1, keep)
        self.key = load_key(key_file) if key_file else None
        self._steps: list[Callable[[Record], Record]] = [check_names, drop_none]
        if not text:
            self._steps.insert(0, hash_content)
        self._lock = threading.Lock()  # the writer's: held while writing, syncing, rotating
        self._queue = threading.Lock()  # stamping, queueing, health: never held during I/O
        self._pending: deque[Entry] = deque()  # entries not yet written, oldest first
        self._dirty = False  # written since the last fsync
        self._sync_failed = False
        self._fresh = False  # the active file holds nothing but OPENERS lines (or nothing)
        self._pruned: list[Record] = []  # files a rotation deleted, for audit.pruned lines
        self._next_fd = -1  # the next active file, created and locked, during a rotation
        self.error = ""  # why writing fails; "" once everything kept is written
        _check_directory(path)
        self._fd = _open_locked(path)
        try:
            _write_pid_file(path)
            self._drop_half_rotated()
            _check_single_name(self._fd, f"--audit-log {path}")
            self.head = self._resume()
            self.orphans, self.next_stream = _left_over(self._files(), path)
        except OSError as exc:
            self._release()
            raise AuditError(f"--audit-log {path}: cannot read: {exc.strerror or exc}") from None
        except BaseException:
            self._release()
            raise
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync == "interval":
            self._syncer = threading.Thread(
                target=self._sync_every,
                args=(fsync_interval_ms / 1000,),
                name="audit-fsync",
                daemon=True,
            )
            self._syncer.start()

    @property
    def healthy(self) -> bool:
        # From `error`, not from `_pending`: a record sits in `_pending` during every
        # write (and os.write releases the GIL), which must not read as a failure.
        return self.error == ""

    def write(self, event: str, **fields: Any) -> bool:
        """Record an event. False if it (or an earlier one) could not be written yet:
        it is kept and retried, and the log is unhealthy until then. ValueError for a
        reserved field name or a non-finite number (nothing is kept then)."""
        record: Record = fields
        for step in self._steps:
            record = step(record)
        fields_json = encode_fields(record)
        with self._queue:  # stamped in queue order: ts never goes backwards along the chain
            self._pending.append(Entry(now_rfc3339(), event, fields_json))
        return self._flush_waiting()

    def retry(self) -> bool:
        """Try the kept lines (and a failed fsync) again; True once all is written."""
        return self._flush_waiting()

    def close(self) -> None:
        """Stop the fsync timer, sync what is written (unless fsync=never), release the
        lock. Lines still kept in memory are lost: call `retry()` first. A write stuck
        on a stalled disk is not waited for past CLOSE_WAIT (the process's exit then
        closes the file and releases the lock)."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(CLOSE_WAIT)
        if not self._lock.acquire(timeout=CLOSE_WAIT):
            return
        try:
            if self._fd >= 0 and self._dirty and self.fsync != "never":
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
            self._release()
        finally:
            self._lock.release()

    def _release(self) -> None:
        for name in ("_fd", "_next_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- writing --

    def _flush_waiting(self) -> bool:
        """Flush under the writer's lock, waiting for another writer at most LOCK_WAIT
        (not at all while unhealthy): a write hung on a stalled disk must not hang the
        event loop too. A line left queued is written by that writer or a retry."""
        if not self._lock.acquire(timeout=LOCK_WAIT if self.healthy else 0):
            return self._busy()
        try:
            return self._flush()
        finally:
            self._lock.release()

    def _busy(self) -> bool:
        """The lock could not be had: True if the holder wrote everything meanwhile,
        else the log is unhealthy (new streams refused) until a flush catches up."""
        with self._queue:
            if not self._pending:
                return True
            if self.error:
                return False
            self.error = error = (
                f"cannot write {self.path}: another write has been blocked for over "
                f"{LOCK_WAIT:g} s (a stalled disk?)"
            )
        if self.on_health is not None:
            self.on_health(False, error)
        return False

    def _flush(self) -> bool:
        """Write every queued line, then fsync as configured (under self._lock)."""
        while True:
            while self._pending:
                line = render(self._pending[0], self.head.seq + 1, self.head.hash, self.key)
                try:
                    if self._should_rotate(len(line) + 1):
                        self._rotate()
                        self._queue_openers()
                        continue
                    self._append(line + b"\n")
                except (OSError, AuditError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    return self._failed(f"cannot write {self.path}: {reason}")
                entry = self._pending.popleft()
                self.head = Head(self.head.seq + 1, line_hash(line))
                self._dirty = True
                self._fresh = self._fresh and entry.event in OPENERS
            if self._dirty and (self.fsync == "always" or self._sync_failed):
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    self._sync_failed = True
                    return self._failed(f"cannot fsync {self.path}: {exc.strerror}")
                self._dirty = self._sync_failed = False
            with self._queue:
                if self._pending:
                    continue  # queued by another thread meanwhile: written here too
                recovered, self.error = self.error != "", ""
            if recovered and self.on_health is not None:
                self.on_health(True, "")
            return True

    def _failed(self, error: str) -> bool:
        with self._queue:
            was_healthy, self.error = self.error == "", error
        if was_healthy and self.on_health is not None:
            self.on_health(False, error)
        return False

    def _queue_openers(self) -> None:
        """A new file opens with audit.rotated, then an audit.pruned per file deleted;
        stamped as the line that caused the rotation, so ts stays in order."""
        stamp = self._pending[0].ts
        openers = [Entry(stamp, ROTATED, _rotated_fields(self))]
        openers += [Entry(stamp, PRUNED, encode_fields(p)) for p in self._pruned]
        self._pruned = []
        self._pending.extendleft(reversed(openers))

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

    def _should_rotate(self, length: int) -> bool:
        # A file that holds only what a rotation opened it with takes the line however
        # long: rotating again could never make it fit (and would never end).
        if not self.rotate_bytes or self._fd < 0 or self._fresh:
            return False
        size = os.fstat(self._fd).st_size
        return size > 0 and size + length > self.rotate_bytes

    def _rotate(self) -> None:
        """NAME -> NAME.1 (after NAME.1 -> NAME.2 ..., deleting NAME.<keep>, which is
        noted for an audit.pruned line), then a new NAME, locked before it takes the
        name. Safe to repeat after a failure part way."""
        if self.fsync != "never":
            os.fdatasync(self._fd)
        own = os.fstat(self._fd)
        newest = rotated_path(self.path, 1)
        # NAME.1 is already this file when an earlier attempt failed after linking it.
        if not _is_file(newest, own) and _is_file(self.path, own):
            victim = rotated_path(self.path, self.keep)
            if os.path.lexists(victim):
                pruned = _pruned_fields(victim, self.path)
                os.unlink(victim)
                self._pruned.append(pruned)
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(rotated_path(self.path, n), rotated_path(self.path, n + 1))
            # A second name, not a rename: NAME never goes missing, so a writer opening
            # it meanwhile finds this locked file, never an empty name to create.
            try:
                os.link(self.path, newest, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                os.rename(self.path, newest)  # a file system without hard links
        following = self.path.with_name(f"{self.path.name}.next")
        if self._next_fd < 0:
            with contextlib.suppress(FileNotFoundError):  # left by a crash mid-rotation
                os.unlink(following)
            self._next_fd = _open_checked(
                following,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL,
                f"--audit-log {self.path}: {following}",
            )
            fcntl.flock(self._next_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: never held
        os.rename(following, self.path)
        os.close(self._fd)  # its lock goes with it: NAME is the next file, locked already
        self._fd, self._next_fd = self._next_fd, -1
        self._dirty = self._fresh = True
        with contextlib.suppress(OSError):  # the renames, durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _sync_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            with self._lock:
                if not self._dirty or self._fd < 0 or self._sync_failed:
                    continue  # a failed sync is retried by retry()
                fd = os.dup(self._fd)  # sync outside the lock: writers go on
                self._dirty = False
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._dirty = self._sync_failed = True
                    self._failed(f"cannot fsync {self.path}: {exc.strerror}")
            finally:
                os.close(fd)

    # -- opening --

    def _files(self) -> list[Path]:
        """The chain's files, newest first."""
        rotated = [rotated_path(self.path, n) for n in range(1, self.keep + 1)]
        return [self.path, *(p for p in rotated if os.path.lexists(p))]

    def _drop_half_rotated(self) -> None:
        """A rotation that stopped after linking NAME.1 left the active file under both
        names: drop the second one, so that the file is not read (or verified) twice."""
        newest = rotated_path(self.path, 1)
        if _is_file(newest, os.fstat(self._fd)):
            os.unlink(newest)

    def _resume(self) -> Head:
        """Verify the tail (TAIL_BYTES) the chain resumes from; its head, or the
        genesis for an empty file."""
        path = self.path
        with _open_read(path, path) as f:
            size = f.seek(0, os.SEEK_END)
            window = TAIL_BYTES
            while True:  # widened until it holds a whole line (a long --audit-text one)
                start = max(0, size - window)
                f.seek(max(0, start - 1))
                tail = f.read()
                if start > 0:  # from the first whole line in the window
                    cut = tail.find(b"\n") + 1
                    start += cut - 1
                    tail = tail[cut:]
                if start == 0 or tail:
                    break
                window *= 4
            number = _count_lines(f, start) + 1
        walk = _Walk(self.key)
        raws = tail.splitlines(keepends=True)
        for i, raw in enumerate(raws):
            problem = walk.feed(
                raw, path, number + i, first=start == 0 and i == 0, anchor=start > 0 and i == 0
            )
            if not problem and self.key is None and True in walk.macs:
                problem = "a keyed line (it has a mac): open this log with its key file"
            if problem:
                raise AuditError(
                    f"--audit-log {path}: line {number + i}: {problem}; check it with "
                    f"`fse audit verify {path}` and move the file away to start a new log"
                )
        self._fresh = start == 0 and walk.only_openers
        if walk.head is None:
            return self._continue_rotated()
        return walk.head

    def _continue_rotated(self) -> Head:
        """An empty active file: the chain goes on from NAME.1 if there is one (a
        rotation that stopped between creating the file and its first line, which
        is then written first)."""
        previous = rotated_path(self.path, 1)
        if not os.path.lexists(previous):
            return Head(0, GENESIS)
        with _open_read(previous, self.path) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            raws = f.read().splitlines(keepends=True)
        last = raws[-1] if raws else b""
        walk = _Walk(self.key)
        if not last or walk.feed(last, previous, 0, first=False, anchor=True):
            raise AuditError(
                f"--audit-log {self.path}: is empty and {previous} does not end in an "
                "audit record; check them with `fse audit verify`"
            )
        assert walk.head is not None
        self._pending.append(Entry(now_rfc3339(), ROTATED, _rotated_fields(self)))
        return walk.head


def _rotated_fields(log: AuditLog) -> bytes:
    return encode_fields({"rotate_bytes": log.rotate_bytes, "keep": log.keep})


def _pruned_fields(victim: Path, log: Path) -> Record:
    """What a file about to be deleted held: its first and last seq, the sha256 of its
    last line (the prev of the next file's first line), its size."""
    fields: Record = {"file": victim.name}
    try:
        with _open_read(victim, log) as f:
            fields["bytes"] = f.seek(0, os.SEEK_END)
            f.seek(0)
            first = f.readline(1 << 16)
        last = next((line for line in _reversed_lines([victim], log) if line), b"")
        fields["first_seq"] = _int_or_none(_json_field(first, "seq"))
        fields["last_seq"] = _int_or_none(_json_field(last, "seq"))
        fields["last_sha256"] = line_hash(last) if last else None
    except (OSError, AuditError) as exc:  # still deleted, and still recorded
        fields["error"] = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return fields


def _json_field(line: bytes, name: str) -> Any:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc.get(name) if isinstance(doc, dict) else None


def _is_file(path: Path, st: os.stat_result) -> bool:
    """Whether `path` (not followed if a symlink) is the file `st` describes."""
    try:
        other = os.lstat(path)
    except FileNotFoundError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _check_directory(path: Path) -> None:
    """The log's directory: whoever can write it can plant a symlink or a file of their
    own under the log's names, or swap them. Owned by the daemon's user (or root), and
    writable by no one else unless sticky (then others cannot touch our files)."""
    directory = path.parent
    label = f"--audit-log {path}: its directory {directory}"
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise AuditError(f"{label}: cannot read: {exc.strerror}") from None
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise AuditError(
            f"{label} is owned by uid {st.st_uid}; accepted: a directory owned by the "
            f"daemon's user (uid {uid}) or root"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise AuditError(
            f"{label} is writable by others (mode {mode:04o}) and not sticky; accepted: "
            f"writable by its owner only (chmod go-w {directory}), or sticky (chmod +t)"
        )


_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _open_checked(path: Path, flags: int, label: str) -> int:
    """Open `path` without following a symlink (O_NOFOLLOW: one planted at the name is
    refused, not followed), non-blocking so that a FIFO cannot hang the open; then
    check it is a regular file owned by the daemon's user. AuditError names `label`."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o640)
    except OSError as exc:
        if os.path.islink(path):  # ELOOP, or EACCES in a sticky directory (protected_*)
            raise AuditError(
                f"{label}: a symbolic link (to {os.readlink(path)}); not followed: an "
                "audit log's files must be regular files"
            ) from None
        if exc.errno == errno.ENXIO:  # a FIFO (or socket) with no reader
            raise AuditError(f"{label}: not a regular file; an audit log must be one") from None
        raise AuditError(f"{label}: cannot open: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file; an audit log must be one"
    elif st.st_uid != os.geteuid():
        problem = (
            f"owned by uid {st.st_uid}; accepted: a file of the daemon's user "
            f"(uid {os.geteuid()}); move it away to start a new log"
        )
    if problem:
        os.close(fd)
        raise AuditError(f"{label}: {problem}")
    os.set_blocking(fd, True)
    return fd


def _open_read(path: Path, log: Path) -> BinaryIO:
    """One of the log's files, for reading, with the same checks as for writing."""
    label = f"--audit-log {log}" if path == log else f"--audit-log {log}: {path}"
    return os.fdopen(_open_checked(path, os.O_RDONLY, label), "rb")


def _open_locked(path: Path) -> int:
    """Open the log for appending, holding an exclusive flock on the file itself: every
    name it has (a hard link, a path through a linked directory) meets the same lock,
    and the kernel releases it when the process dies, however it dies."""
    label = f"--audit-log {path}"
    for _ in range(3):
        fd = _open_checked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, label)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(os.fstat(fd))
            os.close(fd)
            raise AuditError(
                f"{label}: in use by another process (pid {holder}, holding a lock on the "
                "file); one writer per audit log, whatever name or link it is opened by"
            ) from None
        # Another writer's rotation may have replaced NAME between our open and our lock.
        if _is_file(path, os.fstat(fd)):
            return fd
        os.close(fd)
    raise AuditError(f"{label}: replaced while it was being opened; another writer rotates it")


def _flock_holder(st: os.stat_result) -> str:
    """The pid holding an flock on this file, from /proc/locks ("unknown" elsewhere)."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for entry in Path("/proc/locks").read_text().splitlines():
            fields = entry.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                return fields[4]
    return "unknown"


def _check_single_name(fd: int, label: str) -> None:
    """A file with a second name (a hard link) may be someone else's file planted under
    the log's name (as root, any root-owned file): refused rather than written."""
    links = os.fstat(fd).st_nlink
    if links != 1:
        raise AuditError(
            f"{label}: has {links} names (hard links); accepted: a file with one name, "
            "the log's (remove the other links, or move the file away)"
        )


def _write_pid_file(path: Path) -> None:
    """NAME.lock: the writer's pid, for the operator (the lock is on the log itself)."""
    lock_path = path.with_name(f"{path.name}.lock")
    fd = _open_checked(lock_path, os.O_RDWR | os.O_CREAT, f"--audit-log {path}: {lock_path}")
    try:
        _check_single_name(fd, f"--audit-log {path}: {lock_path}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    finally:
        os.close(fd)


def _count_lines(f: Any, end: int) -> int:
    f.seek(0)
    count, left = 0, end
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return int(count)


def _reversed_lines(files: Sequence[Path], log: Path, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The lines of the files, last first (files newest first)."""
    for path in files:
        with _open_read(path, log) as f:
            end = f.seek(0, os.SEEK_END)
            rest = b""
            while end > 0:
                start = max(0, end - chunk)
                f.seek(start)
                block = f.read(end - start) + rest
                end = start
                lines = block.split(b"\n")
                rest = lines[0]
                yield from reversed(lines[1:])
            yield rest


def _left_over(files: Sequence[Path], log: Path) -> tuple[list[Record], int]:
    """Read back from the end: the streams of the last run (since its server.started,
    or an audit.orphans already naming the run before) that never got a verdict, and
    the stream number after the last stream.started."""
    verdicts: set[Any] = set()
    orphans: list[Record] = []
    in_last_run, last_stream = True, None
    for line in _reversed_lines(files, log):
        if not line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        event = doc.get("event") if isinstance(doc, dict) else None
        if event == "stream.started":
            stream = doc.get("stream")
            if last_stream is None and isinstance(stream, int):
                last_stream = stream
            if in_last_run and stream not in verdicts:
                orphans.append(
                    {"stream": stream, "request_id": doc.get("request_id"), "seq": doc.get("seq")}
                )
        elif event == "stream.verdict" and in_last_run:
            verdicts.add(doc.get("stream"))
        elif event in (RUN_START, ORPHANS):
            in_last_run = False
        if not in_last_run and last_stream is not None:
            break
    return orphans[::-1], (last_stream or 0) + 1
