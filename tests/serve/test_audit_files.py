"""The audit log on its own, continued: rotation, fsync, orphans, the lock, keyed mode
and the checks made when a log is opened.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fse.serve import audit
from fse.serve.audit import GENESIS, AuditError, AuditLog, verify, writer
from support.audit import edit_first, write_log
from support.daemons import audit_records, run_fse

# -- rotation -------------------------------------------------------------------------


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def test_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "fse-audit.jsonl"
    write_log(path, 120, rotate_bytes=4096, keep=3)
    files = [rotated(path, 3), rotated(path, 2), rotated(path, 1), path]  # oldest first
    assert all(f.exists() for f in files) and not rotated(path, 4).exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    # Each newer file opens with audit.rotated, chained to the last line of the one before.
    for older, newer in itertools.pairwise(files):
        last = older.read_bytes().splitlines()[-1]
        first = audit_records(newer)[0]
        assert first["event"] == "audit.rotated"
        assert first["prev"] == hashlib.sha256(last).hexdigest()
        assert first["seq"] == json.loads(last)["seq"] + 1
    # Reopening resumes the newest file's chain.
    write_log(path, 1, rotate_bytes=4096, keep=3)
    result = verify(files)
    assert result.ok, result.problem
    assert result.head.seq == audit_records(path)[-1]["seq"]
    assert result.start_seq > 1  # the oldest files were pruned (keep=3)
    assert verify(tmp_path).head == result.head  # a directory: its files, in order
    # The shell's order (.1, .10, .2) does not matter: files are ordered by rotation.
    cli = run_fse("audit", "verify", str(path), *map(str, reversed(files[:-1])))
    assert cli.returncode == 0, cli.stdout
    assert cli.stdout.strip().endswith(f"last seq {result.head.seq} sha256 {result.head.hash}")
    assert "starts at seq" in cli.stdout


def test_timestamps_never_go_backwards_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "fse-audit.jsonl"
    write_log(path, 120, rotate_bytes=4096, keep=3)
    files = [rotated(path, 3), rotated(path, 2), rotated(path, 1), path]
    stamps = [r["ts"] for f in files for r in audit_records(f)]
    assert stamps == sorted(stamps)  # RFC 3339 UTC with fixed digits sorts as text


def test_verify_names_the_file_and_line_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "fse-audit.jsonl"
    write_log(path, 120, rotate_bytes=4096, keep=3)
    middle = rotated(path, 2)
    lines = middle.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"completed", b"halted")
    middle.write_bytes(b"".join(lines))
    broken = run_fse("audit", "verify", str(tmp_path))
    assert broken.returncode == 1
    assert f"BROKEN: {middle} line 6: prev" in broken.stdout, broken.stdout
    # Deleting a whole file from the middle breaks the chain at the next one.
    middle.unlink()
    broken = run_fse("audit", "verify", str(tmp_path))
    assert broken.returncode == 1
    assert f"BROKEN: {rotated(path, 1)} line 1: seq is " in broken.stdout, broken.stdout


def test_a_rotation_cut_short_is_finished_when_the_log_is_reopened(tmp_path: Path) -> None:
    """A crash after the active file got its second name (NAME.1), or after the new
    NAME was created: reopening neither reads the file twice nor starts a file without
    its audit.rotated line, and the chain verifies."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3, rotate_bytes=4096)
    os.link(path, rotated(path, 1))  # stopped after the link: one file, two names
    write_log(path, 1, rotate_bytes=4096)
    assert not rotated(path, 1).exists()
    assert [d["seq"] for d in audit_records(path)] == [1, 2, 3, 4]
    path.rename(rotated(path, 1))  # stopped after the new, empty NAME took the name
    path.touch(0o640)
    write_log(path, 1, rotate_bytes=4096)
    assert [d["event"] for d in audit_records(path)] == ["audit.rotated", "stream.verdict"]
    result = verify(tmp_path)
    assert result.ok and result.head.seq == 6, result.problem


def test_a_log_whose_first_lines_are_cut_off_is_broken(tmp_path: Path) -> None:
    """Only a file that starts with audit.rotated may start past seq 1."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[1:]))
    result = verify(path)
    assert not result.ok and result.problem.startswith("line 1: seq is 2, expected 1")


# -- fsync ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("always", 5), ("never", 0)])
def test_fsync_always_syncs_each_write_and_never_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, expected: int
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    log = AuditLog(tmp_path / "audit.jsonl", fsync=mode)
    for i in range(5):
        log.write("stream.verdict", stream=i)
    assert len(synced) == expected
    log.close()
    assert len(synced) == expected


def test_fsync_interval_syncs_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = threading.Event()
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.set())
    log = AuditLog(tmp_path / "audit.jsonl", fsync="interval", fsync_interval_ms=20)
    for i in range(5):
        log.write("stream.verdict", stream=i)
    assert not synced.is_set()  # not on the writer's path
    assert synced.wait(5)
    log.close()


# -- orphans --------------------------------------------------------------------------


def crashed_run(path: Path, first: int, verdicts: set[int], streams: int = 3) -> None:
    """A daemon's run that ends without closing (kill -9): some streams lack a verdict."""
    log = AuditLog(path)
    log.write("server.started", pid=1)
    for i in range(first, first + streams):
        log.write("stream.started", stream=i, request_id=f"r{i}")
    for i in sorted(verdicts):
        log.write("stream.verdict", stream=i, request_id=f"r{i}", status="completed")
    log.close()


def test_reopening_finds_the_orphans_and_continues_the_stream_numbers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    crashed_run(path, 1, {1})
    log = AuditLog(path)
    assert [(o["stream"], o["request_id"]) for o in log.orphans] == [(2, "r2"), (3, "r3")]
    assert log.orphans[0]["seq"] == 3  # the line of its stream.started
    assert log.next_stream == 4
    log.write("audit.orphans", streams=log.orphans)
    log.close()
    crashed_run(path, 4, {4, 5, 6})  # a clean run: nothing left over
    log = AuditLog(path)
    assert log.orphans == [] and log.next_stream == 7
    log.close()


def test_verify_lists_orphans_apart_from_breaks(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    crashed_run(path, 1, {1})
    crashed_run(path, 4, {4})
    result = verify(path)
    assert result.ok
    assert [o.stream for o in result.orphans] == [2, 3]  # their run ended: orphans
    assert [o.stream for o in result.unfinished] == [5, 6]  # the last run: maybe in flight
    assert (result.orphans[0].file, result.orphans[0].line) == (path, 3)
    cli = run_fse("audit", "verify", str(path))
    assert cli.returncode == 0
    assert f"orphan: stream 2 (request_id 'r2', {path} line 3) never got a verdict" in cli.stdout
    assert "unfinished: stream 5" in cli.stdout


# -- the lock -------------------------------------------------------------------------


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    with pytest.raises(AuditError, match=rf"in use by another process \(pid {os.getpid()},"):
        AuditLog(path)
    first.close()
    AuditLog(path).close()  # released on close (and by the kernel when the holder dies)


# -- keyed mode -----------------------------------------------------------------------


def key_file(tmp_path: Path, key: bytes = b"k" * 32, name: str = "audit.key") -> Path:
    path = tmp_path / name
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def rechain(lines: list[bytes]) -> list[bytes]:
    """What an attacker without the key can do: recompute every prev after an edit."""
    out: list[bytes] = []
    prev = GENESIS
    for line in lines:
        doc = json.loads(line)
        doc["prev"] = prev
        out.append(json.dumps(doc, separators=(",", ":")).encode())
        prev = hashlib.sha256(out[-1]).hexdigest()
    return out


def _edit_last(lines: list[bytes]) -> list[bytes]:
    return [*lines[:-1], lines[-1].replace(b"completed", b"halted")]


def _forge_append(lines: list[bytes]) -> list[bytes]:
    doc = json.loads(lines[-1])
    doc.update(seq=doc["seq"] + 1, prev=hashlib.sha256(lines[-1]).hexdigest())
    return [*lines, json.dumps(doc, separators=(",", ":")).encode()]


KEYED_TAMPERING = {
    "last line edited": (_edit_last, "line 3: mac does not match"),
    "forged append": (_forge_append, "line 4: mac does not match"),
    "recomputed chain": (lambda ls: rechain(edit_first(ls)), "line 1: mac does not match"),
}


@pytest.mark.parametrize("case", sorted(KEYED_TAMPERING))
def test_keyed_log_catches_what_the_hash_chain_cannot(tmp_path: Path, case: str) -> None:
    path, key = tmp_path / "audit.jsonl", key_file(tmp_path)
    write_log(path, 3, key_file=key)
    assert all(len(d["mac"]) == 64 and list(d)[-2:] == ["prev", "mac"] for d in audit_records(path))
    assert verify(path, key=audit.load_key(key)).macs == "checked"
    change, problem = KEYED_TAMPERING[case]
    path.write_bytes(b"\n".join(change(path.read_bytes().splitlines())) + b"\n")
    result = verify(path, key=audit.load_key(key))
    assert not result.ok and result.problem.startswith(problem), result.problem
    if case != "recomputed chain":  # keeps its macs
        unkeyed = verify(path)
        assert unkeyed.ok and unkeyed.macs == "unchecked"  # the chain alone cannot tell
    cli = run_fse("audit", "verify", "--key-file", str(key), str(path))
    assert cli.returncode == 1 and problem in cli.stdout


def test_keyed_verify_cli_and_key_checks(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.jsonl", key_file(tmp_path)
    write_log(path, 2, key_file=key)
    write_log(path, 1, key_file=key)  # resumes, checking the tail's macs
    ok = run_fse("audit", "verify", "--key-file", str(key), str(path))
    assert ok.returncode == 0 and "macs checked" in ok.stdout, ok.stdout
    unchecked = run_fse("audit", "verify", str(path))
    assert unchecked.returncode == 0
    assert "MACs NOT checked" in unchecked.stdout
    wrong = key_file(tmp_path, b"w" * 32, "wrong.key")
    assert run_fse("audit", "verify", "--key-file", str(wrong), str(path)).returncode == 1
    with pytest.raises(AuditError, match="line 1: mac does not match"):
        AuditLog(path, key_file=wrong)  # the wrong key: refused at start
    with pytest.raises(AuditError, match="keyed"):
        AuditLog(path)  # a keyed log without its key
    write_log(tmp_path / "plain.jsonl", 1)
    with pytest.raises(AuditError, match="line 1: no mac"):
        AuditLog(tmp_path / "plain.jsonl", key_file=key)  # an unkeyed log with a key
    key.chmod(0o644)
    with pytest.raises(AuditError, match="readable by others"):
        AuditLog(tmp_path / "other.jsonl", key_file=key)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(AuditError, match="at least 16 bytes"):
        AuditLog(tmp_path / "other.jsonl", key_file=short)


# -- start checks ---------------------------------------------------------------------


def test_a_broken_or_foreign_tail_is_not_resumed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    with pytest.raises(AuditError, match="line 2: seq is 3, expected 2"):
        AuditLog(path)
    path.write_bytes(b"\n".join(edit_first([x.rstrip(b"\n") for x in lines])) + b"\n")
    with pytest.raises(AuditError, match="line 2: prev"):
        AuditLog(path)
    path.write_bytes(b'{"seq":1,"event":"x"}\n')
    with pytest.raises(AuditError, match="line 1:"):
        AuditLog(path)


def test_a_long_log_is_checked_over_its_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start check reads the tail (TAIL_BYTES), naming lines by their number in the
    whole file; `fse audit verify` is the full check."""
    monkeypatch.setattr(writer, "TAIL_BYTES", 4096)
    path = tmp_path / "audit.jsonl"
    write_log(path, 300)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"completed", b"halted")  # before the tail: not seen
    path.write_bytes(b"".join(lines))
    AuditLog(path).close()
    lines[-2] = lines[-2].replace(b"completed", b"halted")
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match="line 300: prev"):
        AuditLog(path)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_only_a_regular_file_is_an_audit_log(device: str) -> None:
    # In a subprocess: reading /dev/full never ends, which must not hang the suite.
    code = f"import pathlib, fse.serve.audit as a\na.AuditLog(pathlib.Path({device!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert f"--audit-log {device}: not a regular file" in run.stderr
