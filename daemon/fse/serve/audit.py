"""The tamper-evident audit log: one JSON line per decision, each chained to the last.

Every line is a JSON object that starts with `ts` (RFC 3339 UTC), `seq` (1, 2, ...)
and `event`, carries the event's fields, and ends with `prev`: the sha256 (hex) of
the previous line's bytes without its newline, or 64 zeros for the first line. In
keyed mode (`key_file`) a last field `mac` follows: HMAC-SHA256 with the key over
the line's bytes without the `,"mac":"..."` part. docs/audit.md describes every
event and what each mode does and does not prove.

The log is one active file and, with `rotate_bytes`, rotated files `NAME.1` (the
newest) .. `NAME.<keep>`; the chain runs on across them: each new file opens with an
`audit.rotated` line chained to the last line of the file before it. `verify()`
walks a chain over one or several files (or a directory) and names the first line
that breaks it, and lists the streams that never got a verdict.

Opening a log checks it first: a regular file, not in use by another writer (an
exclusive lock on `NAME.lock` holding the writer's pid), whose tail verifies (keyed
or not, as this log is). It then reads back what the last run left: the streams that
started and never got a verdict (`orphans`, a daemon killed mid-stream) and the
next free stream number, so that stream numbers stay unique along the chain.

Writing fails closed: a line that cannot be written (disk full, file size limit,
I/O error, a failed fsync or rotation) is kept in memory, the log reports itself
unhealthy (the daemon then refuses new streams and reports NOT_SERVING) and every
later write or `retry()` tries again, in order, so nothing is lost and the chain
stays whole. A partly written line is cut off again before the retry.

Prompts and outputs are recorded as sha256 unless the log was opened with
`text=True`.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

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
    """The HMAC key in `path` (its bytes, surrounding whitespace stripped). Refused if
    others may read it or it is shorter than 16 bytes."""
    try:
        mode = os.stat(path).st_mode
        key = path.read_bytes().strip()
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


@dataclass
class _Walk:
    """Follows a chain line by line: what breaks it, which macs were seen, which
    streams are still open. `head` is None until the start of the chain is known."""

    key: bytes | None
    head: Head | None = None
    start_seq: int = 0
    lines: int = 0
    macs: set[bool] = field(default_factory=set)  # True: a line with a mac was seen
    open: dict[Any, Orphan] = field(default_factory=dict)
    orphans: list[Orphan] = field(default_factory=list)

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
            if seq != 1 and not (anchor or rotated):
                return (
                    f"seq is {seq}, expected 1 (the lines before it are missing; only a "
                    f"file that starts with {ROTATED} may start later)"
                )
            self.start_seq = seq
        elif seq != self.head.seq + 1:
            expected = self.head.seq + 1
            return f"seq is {seq!r}, expected {expected} (a line was removed, added or moved)"
        elif prev != self.head.hash:
            n = self.head.seq
            return f"prev is not the sha256 of line {n} (line {n} or this prev was edited)"
        self.head = Head(seq, line_hash(line))
        self.lines += 1
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


# -- verification ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    ok: bool
    lines: int  # lines known to be intact, from the first
    head: Head  # seq and hash of the last line the chain was followed to
    problem: str = ""  # "line N: what is wrong" when not ok
    file: Path | None = None  # the file of that line
    files: tuple[Path, ...] = ()  # what was walked, oldest first
    start_seq: int = 1  # the seq the chain starts at (> 1: earlier files not given)
    macs: str = "absent"  # checked | unchecked (lines carry macs, no key) | absent
    orphans: tuple[Orphan, ...] = ()  # streams whose run ended without their verdict
    unfinished: tuple[Orphan, ...] = ()  # no verdict yet at the end (in flight, or killed)


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


def verify(paths: Path | Sequence[Path], key: bytes | None = None) -> Verification:
    """Walk the chain from the first line of the oldest file; stop at the first line
    that breaks it. With `key`, every line's mac is checked too."""
    files = chain_files(paths)
    walk = _Walk(key)
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
    return Verification(
        True,
        walk.lines,
        walk.head or Head(0, GENESIS),
        files=tuple(files),
        start_seq=walk.start_seq or 1,
        macs=_macs(walk),
        orphans=tuple(walk.orphans),
        unfinished=tuple(walk.open.values()),
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
        self._lock = threading.Lock()
        self._pending: deque[Entry] = deque()  # entries not yet written, oldest first
        self._dirty = False  # written since the last fsync
        self._sync_failed = False
        self.error = ""  # why writing fails; "" once everything kept is written
        self._fd = _open_regular(path)
        try:
            self._lock_fd = _lock(path)
            self.head = self._resume()
            self.orphans, self.next_stream = _left_over(self._files())
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
        with self._lock:  # stamped under the lock: ts never goes backwards along the chain
            self._pending.append(Entry(now_rfc3339(), event, fields_json))
            return self._flush()

    def retry(self) -> bool:
        """Try the kept lines (and a failed fsync) again; True once all is written."""
        with self._lock:
            return self._flush()

    def close(self) -> None:
        """Stop the fsync timer, sync what is written (unless fsync=never), release the
        lock. Lines still kept in memory are lost: call `retry()` first."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd >= 0 and self._dirty and self.fsync != "never":
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
            self._release()

    def _release(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- writing (under self._lock) --

    def _flush(self) -> bool:
        was_healthy = self.healthy
        while self._pending:
            line = render(self._pending[0], self.head.seq + 1, self.head.hash, self.key)
            try:
                if self._should_rotate(len(line) + 1):
                    self._rotate()
                    # Stamped as the line that caused it, so ts stays in order across files.
                    stamp = self._pending[0].ts
                    self._pending.appendleft(Entry(stamp, ROTATED, _rotated_fields(self)))
                    continue
                self._append(line + b"\n")
            except OSError as exc:
                return self._failed(f"cannot write {self.path}: {exc.strerror or exc}", was_healthy)
            self._pending.popleft()
            self.head = Head(self.head.seq + 1, line_hash(line))
            self._dirty = True
        if self._dirty and (self.fsync == "always" or self._sync_failed):
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._sync_failed = True
                return self._failed(f"cannot fsync {self.path}: {exc.strerror}", was_healthy)
            self._dirty = self._sync_failed = False
        if not was_healthy:
            self.error = ""
            if self.on_health is not None:
                self.on_health(True, "")
        return True

    def _failed(self, error: str, was_healthy: bool) -> bool:
        self.error = error
        if was_healthy and self.on_health is not None:
            self.on_health(False, self.error)
        return False

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
        if not self.rotate_bytes or self._fd < 0:
            return False
        size = os.fstat(self._fd).st_size
        return size > 0 and size + length > self.rotate_bytes

    def _rotate(self) -> None:
        """NAME -> NAME.1 (after NAME.1 -> NAME.2 ..., dropping NAME.<keep>), then a new
        empty NAME. Safe to repeat after a failure part way."""
        if self.fsync != "never":
            os.fdatasync(self._fd)
        own = os.fstat(self._fd)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None  # renamed already by an attempt that failed later
        if current is not None and (current.st_dev, current.st_ino) == (own.st_dev, own.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rotated_path(self.path, self.keep))
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(rotated_path(self.path, n), rotated_path(self.path, n + 1))
            os.rename(self.path, rotated_path(self.path, 1))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o640)
        os.close(self._fd)
        self._fd = fd
        self._dirty = True
        with contextlib.suppress(OSError):  # the renames, durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
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
                    self._failed(f"cannot fsync {self.path}: {exc.strerror}", self.healthy)
            finally:
                os.close(fd)

    # -- opening --

    def _files(self) -> list[Path]:
        """The chain's files, newest first."""
        rotated = [rotated_path(self.path, n) for n in range(1, self.keep + 1)]
        return [self.path, *(p for p in rotated if p.exists())]

    def _resume(self) -> Head:
        """Verify the tail (TAIL_BYTES) the chain resumes from; its head, or the
        genesis for an empty file."""
        path = self.path
        with path.open("rb") as f:
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
        if walk.head is None:
            return self._continue_rotated()
        return walk.head

    def _continue_rotated(self) -> Head:
        """An empty active file: the chain goes on from NAME.1 if there is one (a
        rotation that stopped between creating the file and its first line)."""
        previous = rotated_path(self.path, 1)
        if not previous.exists():
            return Head(0, GENESIS)
        with previous.open("rb") as f:
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
        return walk.head


def _rotated_fields(log: AuditLog) -> bytes:
    return encode_fields({"rotate_bytes": log.rotate_bytes, "keep": log.keep})


def _open_regular(path: Path) -> int:
    """Open the log for appending: a regular file only (not a device or a FIFO)."""
    try:
        kind = os.stat(path).st_mode
    except FileNotFoundError:
        kind = stat.S_IFREG
    except OSError as exc:
        raise AuditError(f"--audit-log {path}: cannot open: {exc.strerror}") from None
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):  # a directory: EISDIR below
        raise AuditError(f"--audit-log {path}: not a regular file; an audit log must be one")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        raise AuditError(f"--audit-log {path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise AuditError(f"--audit-log {path}: not a regular file; an audit log must be one")
    os.set_blocking(fd, True)
    return fd


def _lock(path: Path) -> int:
    """Hold an exclusive lock on NAME.lock (holding our pid) while the log is open; the
    kernel releases it when the process dies, however it dies."""
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise AuditError(f"--audit-log {path}: cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AuditError(
            f"--audit-log {path}: in use by another process (pid {holder}, holding "
            f"{lock_path}); one writer per audit log"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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


def _reversed_lines(files: Sequence[Path], chunk: int = 1 << 16) -> Iterator[bytes]:
    """The lines of the files, last first (files newest first)."""
    for path in files:
        with path.open("rb") as f:
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


def _left_over(files: Sequence[Path]) -> tuple[list[Record], int]:
    """Read back from the end: the streams of the last run (since its server.started,
    or an audit.orphans already naming the run before) that never got a verdict, and
    the stream number after the last stream.started."""
    verdicts: set[Any] = set()
    orphans: list[Record] = []
    in_last_run, last_stream = True, None
    for line in _reversed_lines(files):
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
