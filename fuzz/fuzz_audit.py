"""Fuzz target: the audit verifier (fse.serve.audit.verify, what `fse audit verify` runs,
and Walk.feed, which the writer's resume runs over a log's tail), keyed and unkeyed.

Three modes, chosen by the input:
- files: arbitrary bytes as one to three rotated files of a log directory. verify()
  returns a Verification, never raises; `problem` is "line N: ..." with N a line of
  `file`; `lines` never exceeds the lines walked; ok implies intact.
- lines: arbitrary lines fed to a Walk (with or without a key and an anchor): feed
  returns "" or what is wrong, never raises.
- chain: a valid chain rendered as the writer renders it (fse.serve.audit.format), keyed
  or not, then one mutation (a byte flipped, inserted or removed, a line removed,
  swapped, duplicated, the file cut). The unmutated chain verifies ok with every line
  and `macs` checked/absent; a chain cut at a line boundary verifies intact; with a key,
  any other change is caught (not ok: broken, or its start unaccounted for); without
  one, any change before the last line is; and a broken chain never counts as intact a
  line that is not a line of the original.
"""

from __future__ import annotations

import re
import shutil

from fse.serve.audit import GENESIS, Head, line_hash, verify
from fse.serve.audit.format import Entry, encode_fields, hash_content, render
from fse.serve.audit.verify import Walk
from fuzzlib import Reader, main, scratch, write

KEY = b"fuzzing-key-0123456789abcdef"
EVENTS = (
    "stream.started",
    "stream.verdict",
    "server.started",
    "audit.rotated",
    "audit.pruned",
    "audit.orphans",
    "stream.rejected",
)
FIELDS = ("stream", "request_id", "status", "prompt", "output", "file", "first_seq", "last_seq")
PROBLEM = re.compile(r"line ([0-9]+): .+", re.DOTALL)


def lines_of(data: bytes) -> list[bytes]:
    """The lines as a file iterates them: split after each newline, the last maybe without."""
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    return [*out, parts[-1]] if parts[-1] else out


def files_mode(reader: Reader) -> None:
    key = KEY if reader.chance() else None
    folder = scratch() / "audit"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    count = 1 + reader.below(3)
    chunks = [reader.blob(4096) for _ in range(count - 1)] + [reader.rest()]
    names = ["log.jsonl", *(f"log.jsonl.{n}" for n in range(1, count))]
    for name, chunk in zip(names, chunks, strict=True):
        (folder / name).write_bytes(chunk)
    result = verify(folder, key)
    walked = sum(len(lines_of(c)) for c in chunks)
    assert 0 <= result.lines <= walked
    assert not result.ok or result.intact
    if result.intact:
        assert not result.problem and result.file is None
    else:
        match = PROBLEM.fullmatch(result.problem)
        assert match, f"problem {result.problem!r}"
        assert result.file is not None
        number = int(match.group(1))
        assert 1 <= number <= len(lines_of(result.file.read_bytes()))
    assert result.macs in ("checked", "unchecked", "absent")


def lines_mode(reader: Reader) -> None:
    key = KEY if reader.chance() else None
    anchor = Head(reader.integer(), GENESIS) if reader.chance() else None
    walk = Walk(key, anchor)
    path = scratch() / "log.jsonl"
    for number, raw in enumerate(lines_of(reader.rest()), start=1):
        problem = walk.feed(raw, path, number, first=number == 1, anchor=number == 1)
        assert isinstance(problem, str)
    walk.incomplete([path])


def chain(reader: Reader, key: bytes | None) -> bytes:
    lines, prev = [], GENESIS
    for seq in range(1, 2 + reader.below(8)):
        record: dict[str, object] = {}
        for _ in range(reader.below(4)):
            name = reader.pick(FIELDS)
            record[name] = reader.integer() if reader.chance() else reader.text(24)
        fields = encode_fields(hash_content(record))
        entry = Entry(reader.text(32), reader.pick(EVENTS), fields)
        line = render(entry, seq, prev, key)
        lines.append(line + b"\n")
        prev = line_hash(line)
    return b"".join(lines)


def mutate(reader: Reader, data: bytes) -> bytes:
    lines = lines_of(data)
    kind = reader.below(8)
    at = reader.below(len(data)) if data else 0
    i, j = reader.below(len(lines)), reader.below(len(lines))
    if kind == 1:
        return data[:at] + bytes([data[at] ^ (1 + reader.below(255))]) + data[at + 1 :]
    if kind == 2:
        return data[:at] + bytes([reader.u8()]) + data[at:]
    if kind == 3:
        return data[:at] + data[at + 1 :]
    if kind == 4:
        return b"".join(lines[:i] + lines[i + 1 :])
    if kind == 5:
        lines[i], lines[j] = lines[j], lines[i]
        return b"".join(lines)
    if kind == 6:
        return b"".join(lines[: i + 1] + lines[i:])
    if kind == 7:
        return data[:at]
    return data


def chain_mode(reader: Reader) -> None:
    key = KEY if reader.chance() else None
    original = chain(reader, key)
    mutated = mutate(reader, original)
    path = write("chain.jsonl", mutated)
    result = verify(path, key)
    before, after = lines_of(original), lines_of(mutated)
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    if mutated == original:
        assert result.ok and result.lines == len(before), result
        assert result.macs == ("checked" if key else "absent"), result.macs
    elif after == before[: len(after)]:  # whole lines cut off the end: not detectable
        assert result.intact, result
    else:
        if key is not None or common < len(after) - 1:
            assert not result.ok, f"a changed chain verifies: {mutated!r}"
        if not result.intact:  # what it vouches for is lines of the original (maybe moved)
            vouched = after[: result.lines]
            assert all(line in before for line in vouched), f"{result.lines} lines intact"


def one_input(data: bytes) -> None:
    reader = Reader(data)
    mode = reader.below(3)
    (files_mode, lines_mode, chain_mode)[mode](reader)


if __name__ == "__main__":
    main(one_input)
