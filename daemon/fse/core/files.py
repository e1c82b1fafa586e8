"""Reading the files the daemon trusts: its config, tokens, TLS files and policies.

Each of them decides who gets in or what halts a stream, so each is read the same way:

- Opened with O_NONBLOCK: opening a FIFO (or a device) never waits for a writer, and
  anything but a regular file is then refused, naming the file. Opening happens after a
  stat(), so a device is refused before it is even opened in the usual case; the fstat()
  of the opened descriptor is what decides.
- Symlinks are followed: a config under /etc that links elsewhere is normal. Every check
  applies to the file the link leads to.
- When `private` (the default), a file that its group or others may write is refused,
  with its mode and the fix (`chmod go-w`): anyone who can change it can let themselves
  in or switch a guard off. Its owner is trusted: root, or the service's own user.
  The directories above the file are not checked.
- At most MAX_BYTES are read: a trusted file is small, and a huge one would only cost
  memory before being refused anyway.

Nothing here runs on the daemon's event loop: callers read from a worker thread or
before serving starts.
"""

from __future__ import annotations

import os
import stat

MAX_BYTES = 16 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileRefused(Exception):
    """A trusted file cannot be used; str() is "PATH: why" (with the fix, where one exists)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((words for test, words in kinds if test(mode)), "a special file")


def check_not_writable_by_others(path: str | os.PathLike[str], st: os.stat_result) -> None:
    """Refuse a file or directory that its group or others may write."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[mode & 0o022]
        raise FileRefused(
            path,
            f"writable by {who} (mode {mode:04o}), who could change what the daemon trusts; "
            f"accepted: writable by its owner only (chmod go-w {path})",
        )


def read_trusted(path: str | os.PathLike[str], *, private: bool = True) -> bytes:
    """The bytes of a regular file, refused (FileRefused) as the module docstring says."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # checked before open(): a device is never opened
            raise FileRefused(path, _not_regular(mode))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FileRefused(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat() and the open()
            raise FileRefused(path, _not_regular(st.st_mode))
        if private:
            check_not_writable_by_others(path, st)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:
                raise FileRefused(
                    path,
                    f"larger than {MAX_BYTES >> 20} MiB; accepted: at most {MAX_BYTES >> 20} MiB",
                )
        return b"".join(chunks)
    except OSError as exc:
        raise FileRefused(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def check_trusted_dir(path: str | os.PathLike[str]) -> None:
    """Refuse a directory of trusted files (policies) that its group or others may write:
    they could add a file (even with the sticky bit, which only protects files others own)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FileRefused(path, f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FileRefused(path, f"{_kind(st.st_mode)}, not a directory")
    check_not_writable_by_others(path, st)


def _not_regular(mode: int) -> str:
    return f"{_kind(mode)}, not a regular file; accepted: a regular file (or a symlink to one)"
