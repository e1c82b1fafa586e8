"""The writer: `AuditLog` appends chained lines to the active file, rotates it, syncs
it, fails closed and resumes a chain left by an earlier run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fse.serve.audit.files import (
    check_directory,
    check_single_name,
    count_lines,
    is_file,
    left_over,
    open_checked,
    open_locked,
    open_read,
    reversed_lines,
    write_pid_file,
)
from fse.serve.audit.format import (
    FSYNC_MODES,
    GENESIS,
    OPENERS,
    PRUNED,
    ROTATED,
    AuditError,
    Entry,
    Record,
    check_names,
    drop_none,
    encode_fields,
    hash_content,
    line_hash,
    load_key,
    now_rfc3339,
    render,
    rotated_path,
)
from fse.serve.audit.verify import Head, Walk, int_or_none

# How much of the file's end is verified when resuming (`fse audit verify` checks all).
TAIL_BYTES = 1 << 20

# How long a write waits for another thread's write before leaving its line queued
# (the event loop writes too: it must never wait on a stalled disk for long).
LOCK_WAIT = 0.5

# How long close() waits for a write or an fsync in progress.
CLOSE_WAIT = 5.0


# -- the log --------------------------------------------------------------------------


class AuditLog:
    """Appends chained JSON lines to one file (rotating it by size); thread-safe. Call
    `write` for an event that must be on disk before the caller goes on (a stream's start)
    and `post` for one that must only be in order (a verdict, from the decode thread,
    which must never wait on the disk); check `healthy`. `orphans` and `next_stream` tell
    what the last run left behind."""

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
        check_directory(path)
        self._fd = open_locked(path)
        try:
            write_pid_file(path)
            self._drop_half_rotated()
            check_single_name(self._fd, f"--audit-log {path}")
            self.head = self._resume()
            self.orphans, self.next_stream = left_over(self._files(), path)
        except OSError as exc:
            self._release()
            raise AuditError(f"--audit-log {path}: cannot read: {exc.strerror or exc}") from None
        except BaseException:
            self._release()
            raise
        self._stop = threading.Event()
        self._posted = threading.Event()  # set by post(): the writer thread has lines
        self._then: list[Callable[[], None]] = []  # post()'s callbacks, once attempted
        self._writer = threading.Thread(target=self._write_posted, name="audit-writer", daemon=True)
        self._writer.start()
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
        self._enqueue(event, fields)
        return self._flush_waiting()

    def post(self, event: str, fields: Record, then: Callable[[], None] | None = None) -> None:
        """Record an event without waiting for the disk: it is queued in order with every
        other line and written by the log's writer thread, which then calls `then` (also
        when the line could not be written and is kept for a retry). A line that cannot
        be written makes the log unhealthy, as with `write`; one still queued when the
        process dies is lost (a stream's verdict: the next start names it an orphan).
        ValueError as for `write` (nothing is queued, `then` is not called)."""
        self._enqueue(event, dict(fields))
        with self._queue:
            if then is not None:
                self._then.append(then)
        self._posted.set()

    def _enqueue(self, event: str, fields: Record) -> None:
        record = fields
        for step in self._steps:
            record = step(record)
        fields_json = encode_fields(record)
        with self._queue:  # stamped in queue order: ts never goes backwards along the chain
            self._pending.append(Entry(now_rfc3339(), event, fields_json))

    def retry(self) -> bool:
        """Try the kept lines (and a failed fsync) again; True once all is written."""
        return self._flush_waiting()

    def close(self) -> None:
        """Stop the fsync timer, sync what is written (unless fsync=never), release the
        lock. Lines still kept in memory are lost: call `retry()` first. A write stuck
        on a stalled disk is not waited for past CLOSE_WAIT (the process's exit then
        closes the file and releases the lock)."""
        self._stop.set()
        self._posted.set()
        self._writer.join(CLOSE_WAIT)
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

    def _write_posted(self) -> None:
        """The writer thread: writes what `post` queued (and anything queued before it),
        waiting for the writer's lock as long as it takes, so no caller of `post` does;
        then tells each poster its line was attempted."""
        while True:
            self._posted.wait()
            self._posted.clear()
            if self._stop.is_set():
                return
            with self._queue:  # their lines are queued already: this flush attempts them
                callbacks, self._then = self._then, []
            try:
                with self._lock:
                    if self._fd >= 0:
                        self._flush()
            except Exception as exc:  # a bug must not end the thread every verdict needs
                self._failed(f"cannot write {self.path}: {exc!r}")
            finally:
                for callback in callbacks:
                    callback()

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
        if not is_file(newest, own) and is_file(self.path, own):
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
            self._next_fd = open_checked(
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
        if is_file(newest, os.fstat(self._fd)):
            os.unlink(newest)

    def _resume(self) -> Head:
        """Verify the tail (TAIL_BYTES) the chain resumes from; its head, or the
        genesis for an empty file."""
        path = self.path
        with open_read(path, path) as f:
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
            number = count_lines(f, start) + 1
        walk = Walk(self.key)
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
        with open_read(previous, self.path) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            raws = f.read().splitlines(keepends=True)
        last = raws[-1] if raws else b""
        walk = Walk(self.key)
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
        with open_read(victim, log) as f:
            fields["bytes"] = f.seek(0, os.SEEK_END)
            f.seek(0)
            first = f.readline(1 << 16)
        last = next((line for line in reversed_lines([victim], log) if line), b"")
        fields["first_seq"] = int_or_none(_json_field(first, "seq"))
        fields["last_seq"] = int_or_none(_json_field(last, "seq"))
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
