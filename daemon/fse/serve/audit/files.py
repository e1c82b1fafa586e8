"""The log's files, opened safely (no symlink followed, regular files of the daemon's
user with one name, a directory only its owner writes) and read back from the end."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fse.serve.audit.format import ORPHANS, RUN_START, AuditError, Record


def is_file(path: Path, st: os.stat_result) -> bool:
    """Whether `path` (not followed if a symlink) is the file `st` describes."""
    try:
        other = os.lstat(path)
    except FileNotFoundError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def check_directory(path: Path) -> None:
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


def open_checked(path: Path, flags: int, label: str) -> int:
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


def open_read(path: Path, log: Path) -> BinaryIO:
    """One of the log's files, for reading, with the same checks as for writing."""
    label = f"--audit-log {log}" if path == log else f"--audit-log {log}: {path}"
    return os.fdopen(open_checked(path, os.O_RDONLY, label), "rb")


def open_locked(path: Path) -> int:
    """Open the log for appending, holding an exclusive flock on the file itself: every
    name it has (a hard link, a path through a linked directory) meets the same lock,
    and the kernel releases it when the process dies, however it dies."""
    label = f"--audit-log {path}"
    for _ in range(3):
        fd = open_checked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, label)
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
        if is_file(path, os.fstat(fd)):
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


def check_single_name(fd: int, label: str) -> None:
    """A file with a second name (a hard link) may be someone else's file planted under
    the log's name (as root, any root-owned file): refused rather than written."""
    links = os.fstat(fd).st_nlink
    if links != 1:
        raise AuditError(
            f"{label}: has {links} names (hard links); accepted: a file with one name, "
            "the log's (remove the other links, or move the file away)"
        )


def write_pid_file(path: Path) -> None:
    """NAME.lock: the writer's pid, for the operator (the lock is on the log itself)."""
    lock_path = path.with_name(f"{path.name}.lock")
    fd = open_checked(lock_path, os.O_RDWR | os.O_CREAT, f"--audit-log {path}: {lock_path}")
    try:
        check_single_name(fd, f"--audit-log {path}: {lock_path}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    finally:
        os.close(fd)


def count_lines(f: Any, end: int) -> int:
    f.seek(0)
    count, left = 0, end
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return int(count)


def reversed_lines(files: Sequence[Path], log: Path, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The lines of the files, last first (files newest first)."""
    for path in files:
        with open_read(path, log) as f:
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


def left_over(files: Sequence[Path], log: Path) -> tuple[list[Record], int]:
    """Read back from the end: the streams of the last run (since its server.started,
    or an audit.orphans already naming the run before) that never got a verdict, and
    the stream number after the last stream.started."""
    verdicts: set[Any] = set()
    orphans: list[Record] = []
    in_last_run, last_stream = True, None
    for line in reversed_lines(files, log):
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
