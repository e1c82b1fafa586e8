"""Checking a chain: line by line (`Walk`, shared with the writer's resume), and over
whole files (`verify`, what `fse audit verify` runs): breaks, an unaccounted start,
orphaned streams."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fse.serve.audit.format import (
    GENESIS,
    MAC_TAIL,
    OPENERS,
    PRUNED,
    ROTATED,
    RUN_START,
    Record,
    line_hash,
    line_mac,
)

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
class Walk:
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
        match = MAC_TAIL.search(line)
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
                    int_or_none(doc.get("first_seq")),
                    int_or_none(doc.get("last_seq")),
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


def int_or_none(value: Any) -> int | None:
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
    walk = Walk(key, anchor)
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


def _macs(walk: Walk) -> str:
    if walk.key is not None:
        return "checked"
    return "unchecked" if True in walk.macs else "absent"
