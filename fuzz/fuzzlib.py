"""Shared by the Python fuzz targets (docs/fuzzing.md): a reader that turns the fuzzer's
bytes into structured values, private scratch files, the check that only a documented
error escapes, and the atheris entry point.

A target is a module `fuzz_<name>.py` with `one_input(data: bytes) -> None`, which raises
AssertionError (or any undocumented exception) on a finding and returns otherwise. It
needs only the standard library and the project: atheris is imported by `main` alone, so
tests/fuzz replays the committed corpora with plain pytest.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Strings that reach deep paths sooner than random bytes do: the parsers' own words.
WORDS = (
    "",
    "a",
    "default",
    "pro",
    "user",
    "system",
    "assistant",
    "model",
    "tool",
    "\x00",
    "\n",
    " ",
    "\u2028",
    "\ud7ff",
    "\U0010ffff",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "{{",
    "%",
    "\\",
    '"',
    "nan",
    "inf",
    "-0",
    "1e999",
    "9" * 40,
    "x" * 300,
)


class Reader:
    """Reads values off the input front to back; past its end every read is zero/empty,
    so any input is a valid structured input (as atheris' FuzzedDataProvider does)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.raw(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def below(self, n: int) -> int:
        """0..n-1 (n >= 1)."""
        return self.uint(4 if n > 0xFFFF else 2 if n > 0xFF else 1) % n

    def chance(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, choices: tuple[T, ...] | list[T]) -> T:
        return choices[self.below(len(choices))]

    def f64(self) -> float:
        value: float = struct.unpack("<d", self.raw(8).ljust(8, b"\0"))[0]
        return value

    def f32(self) -> float:
        value: float = struct.unpack("<f", self.raw(4).ljust(4, b"\0"))[0]
        return value

    def number(self) -> float:
        """A float from a small menu of edge cases, or from raw bits."""
        kind = self.below(8)
        if kind == 0:
            return self.f64()
        if kind == 1:
            return self.f32()
        return (0.0, -0.0, 1.0, 0.5, 1e-45, float("inf"))[kind - 2]

    def integer(self) -> int:
        kind = self.below(6)
        if kind == 0:
            return self.uint(8) - (1 << 63)
        return (0, 1, -1, 2**32, 2**64 + 1)[kind - 1]

    def blob(self, max_len: int) -> bytes:
        return self.raw(self.below(max_len + 1))

    def text(self, max_len: int = 64) -> str:
        """A word of WORDS, or UTF-8 text off the input (invalid bytes replaced)."""
        if self.chance():
            return self.pick(WORDS)
        return self.blob(max_len).decode("utf-8", "replace")

    def rest(self) -> bytes:
        return self.raw(self.remaining())


_SCRATCH: Path | None = None


def scratch() -> Path:
    """A private directory (0700) for the files a target reads, made once per process:
    in /dev/shm when it can be, so files cost no disk."""
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _SCRATCH = Path(tempfile.mkdtemp(prefix="fse-fuzz-", dir=base))
    return _SCRATCH


def write(name: str, data: bytes, mode: int = 0o600) -> Path:
    """`data` as the scratch file `name` (replaced), with `mode`."""
    path = scratch() / name
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def refused(
    call: Callable[[], T], allowed: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[T | None, BaseException | None]:
    """(call(), None), or (None, the error) when it raised one of `allowed` with a message.
    Any other exception propagates: that is a finding."""
    try:
        return call(), None
    except allowed as exc:
        message = str(exc)
        assert isinstance(message, str) and message.strip(), f"{type(exc).__name__} says nothing"
        assert "Traceback" not in message, f"a traceback in the message: {message!r}"
        return None, exc


def main(one_input: Callable[[bytes], Any]) -> None:
    """Run under atheris: `python fuzz/fuzz_X.py [libFuzzer flags] [corpus dirs]`."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # the `fuzz` extra

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
