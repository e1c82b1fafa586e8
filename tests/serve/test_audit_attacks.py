"""What an attacker tried against the audit log (issue 18), replayed on real daemons and
real files: a line longer than `rotate_bytes`, history pushed out by rotation, symlinks
planted for a daemon running as root, a second writer on a hard link to the log.

Each daemon is a real `python -m fse.cli serve` process (conftest's Daemon helpers); the
attacker runs as uid 65534 where the attack needs another user.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from fse.serve import audit
from fse.serve.audit import AuditLog, verify
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2
from support.daemons import PROMPT, THREADS, Daemon, audit_records, health, run_fse
from support.users import NOBODY, needs_root
from support.waits import LIVE

EXIT_INCOMPLETE = 3
GuardStub: Any = fse_pb2_grpc.GuardStub  # generated, untyped


def call(daemon: Daemon, prompt: str = PROMPT, **fields: Any) -> grpc.StatusCode:
    """One Generate over the daemon's unix socket; how it ended."""
    request = fse_pb2.GenerateRequest(prompt=prompt, max_tokens=1, **fields)
    with daemon.channel() as channel:
        try:
            replies = list(
                GuardStub(channel).Generate(
                    iter([fse_pb2.GenerateClientMessage(start=request)]), timeout=LIVE
                )
            )
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    assert replies[-1].WhichOneof("kind") == "verdict"
    return grpc.StatusCode.OK


def chain(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every record of the rotated set in `directory`, oldest file first."""
    return [(f, r) for f in audit.chain_files(directory) for r in audit_records(f)]


# The attacker: uid 65534, with a handle on the directory it may write (opened before
# dropping root, as if it could reach it: pytest's temporary directories are root's).
PLANT = textwrap.dedent(
    """
    import os, sys
    directory, name, kind, value = sys.argv[1:]
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    if kind == "symlink":
        os.symlink(value, name, dir_fd=fd)
    else:
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, value.encode())
    """
)


def plant(directory: Path, name: str, kind: str, value: str) -> None:
    """As uid 65534: a symlink (`kind` "symlink", to `value`) or a file holding `value`."""
    run = subprocess.run(
        [sys.executable, "-c", PLANT, str(directory), name, kind, value],
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
    assert run.returncode == 0, run.stderr
    assert (directory / name).lstat().st_uid == NOBODY


def refused(start_daemon: Callable[..., Daemon], log: Path) -> str:
    """Start a daemon on `log` that must refuse to start; its error line."""
    daemon = start_daemon(*THREADS, "--audit-log", str(log), wait=False)
    assert daemon.process.wait(LIVE) == 1, daemon.log()
    (line,) = [x for x in daemon.log().splitlines() if x.startswith("fse serve: error:")]
    return line


# -- 1. a line longer than rotate_bytes -----------------------------------------------


def check_rotation_made_progress(directory: Path, long_field: str, marker: str) -> None:
    """The long line sits alone in its file, after the file's opening audit.rotated (and
    audit.pruned) lines; rotation happened a bounded number of times; the chain verifies."""
    records = chain(directory)
    rotations = [r for _, r in records if r["event"] == "audit.rotated"]
    assert 1 <= len(rotations) <= 4, len(rotations)
    ((home, long_line),) = [(f, r) for f, r in records if r.get(long_field) == marker]
    events = [r["event"] for r in audit_records(home)]
    assert events[0] == "audit.rotated" and long_line["event"] in events
    assert set(events) <= {"audit.rotated", "audit.pruned", long_line["event"]}, events
    check = run_fse("audit", "verify", str(directory))
    assert check.returncode == 0, check.stdout


def test_a_prompt_longer_than_rotate_bytes_is_written_and_the_daemon_goes_on(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """--audit-text with a 40 KB prompt and 32 KiB files: the stream.started line does
    not fit any file. It is written alone in a fresh file; the daemon keeps serving,
    answers health checks and stops on SIGTERM."""
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = start_daemon(
        *THREADS,
        "--audit-log", str(logs / "audit.jsonl"),
        "--audit-text",
        "--audit-rotate-bytes", "32768",
    )  # fmt: skip
    long_prompt = " " * 40_000 + PROMPT  # 40 KB, about 1,300 tokens
    assert call(daemon, long_prompt, request_id="long") == grpc.StatusCode.OK
    assert call(daemon, request_id="after") == grpc.StatusCode.OK
    assert health(daemon) == health_pb2.HealthCheckResponse.SERVING
    assert daemon.stop(timeout=LIVE) == 0
    check_rotation_made_progress(logs, "prompt", long_prompt)


def test_a_request_id_longer_than_rotate_bytes_is_refused_and_the_daemon_goes_on(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A 5,000-byte request_id with 4 KiB files: refused (INVALID_ARGUMENT) and audited
    without rotating forever; health checks and SIGTERM still work."""
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = start_daemon(
        *THREADS, "--audit-log", str(logs / "audit.jsonl"), "--audit-rotate-bytes", "4096"
    )
    assert call(daemon, request_id="r" * 5000) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(daemon, request_id="after") == grpc.StatusCode.OK
    assert health(daemon) == health_pb2.HealthCheckResponse.SERVING
    assert daemon.stop(timeout=LIVE) == 0
    records = chain(logs)
    # (Rotated at most twice, or not at all where the refusal no longer echoes it whole.)
    assert sum(r["event"] == "audit.rotated" for _, r in records) <= 4
    assert [r["request_id"][:1] for _, r in records if r["event"] == "input.rejected"] == ["r"]
    check = run_fse("audit", "verify", str(logs))
    assert check.returncode == 0, check.stdout


# In a subprocess: on a writer that rotates forever, the test fails instead of hanging.
LONG_FIELD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fse.serve.audit import AuditLog

    log = AuditLog(Path(sys.argv[1]), rotate_bytes=4096, keep=3, fsync="never")
    log.write("server.started")
    assert log.write("input.rejected", request_id="x" * 10_000, reason="invalid_argument")
    for i in range(30):
        assert log.write("stream.verdict", stream=i, status="completed")
    log.close()
    """
)


def test_a_field_longer_than_rotate_bytes_is_written_alone_in_a_file(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", LONG_FIELD, str(tmp_path / "audit.jsonl")],
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
    assert run.returncode == 0, run.stderr
    check_rotation_made_progress(tmp_path, "request_id", "x" * 10_000)


def test_a_writer_stuck_in_a_write_does_not_block_other_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread's write hangs (a stalled disk): another thread's write (the event
    loop's, in the daemon) returns False after a bounded wait instead of waiting on the
    lock, the log reports itself unhealthy, and both lines are written, in order, once
    the stuck write returns."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync="never")
    stalled, release = threading.Event(), threading.Event()
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if threading.current_thread().name == "stuck" and not release.is_set():
            stalled.set()
            release.wait(LIVE)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    stuck = threading.Thread(target=log.write, args=("stream.verdict",), name="stuck")
    stuck.start()
    assert stalled.wait(LIVE)
    results: list[bool] = []
    other = threading.Thread(target=lambda: results.append(log.write("auth.denied")))
    other.start()
    other.join(LIVE)
    finished = not other.is_alive()
    healthy_meanwhile = log.healthy
    release.set()
    stuck.join(LIVE)
    other.join(LIVE)
    assert finished, "a write waited on the lock for as long as another write hung"
    assert results == [False] and not healthy_meanwhile
    assert log.retry() and log.healthy
    log.close()
    assert [r["event"] for r in audit_records(path)] == ["stream.verdict", "auth.denied"]
    assert verify(path).ok


# -- 2. rotation that deletes records ---------------------------------------------------


def test_pruned_files_are_recorded_and_a_chain_missing_its_start_is_incomplete(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=4096, keep=2, fsync="never")
    for i in range(150):
        log.write("stream.verdict", stream=i, status="completed")
    log.close()
    oldest = path.with_name("audit.jsonl.2")
    first = audit_records(oldest)[0]
    pruned = [r for _, r in chain(tmp_path) if r["event"] == "audit.pruned"]
    assert pruned, "a rotation deleted a file without a record of it"
    last = pruned[-1]
    assert last["file"] == "audit.jsonl.2"
    assert last["last_seq"] == first["seq"] - 1 and last["last_sha256"] == first["prev"]
    assert last["first_seq"] < last["last_seq"]

    result = verify(tmp_path)
    assert result.ok and result.start_seq == first["seq"]
    whole = run_fse("audit", "verify", str(tmp_path))
    assert whole.returncode == 0, whole.stdout
    assert f"pruned: audit.jsonl.2 (seq {last['first_seq']}..{last['last_seq']}" in whole.stdout

    # The oldest file deleted by hand: no audit.pruned accounts for it.
    oldest.unlink()
    result = verify(tmp_path)
    assert not result.ok and result.intact and result.incomplete
    cut = run_fse("audit", "verify", str(tmp_path))
    assert cut.returncode == EXIT_INCOMPLETE, cut.stdout
    last_line = cut.stdout.strip().splitlines()[-1]
    assert ": INCOMPLETE: the chain starts at seq " in last_line, last_line
    assert "ok" not in last_line.split("INCOMPLETE")[0]

    # ... unless the operator anchors the start with what was recorded elsewhere.
    start = audit_records(path.with_name("audit.jsonl.1"))[0]
    anchor = ("--from-seq", str(start["seq"] - 1), "--from-hash", start["prev"])
    anchored = run_fse("audit", "verify", *anchor, str(tmp_path))
    assert anchored.returncode == 0, anchored.stdout
    wrong = ("--from-seq", str(start["seq"] - 1), "--from-hash", "f" * 64)
    assert run_fse("audit", "verify", *wrong, str(tmp_path)).returncode == EXIT_INCOMPLETE
    # An anchor inside the chain must match its line; one past its end means a cut tail.
    head = audit_records(path)[-1]
    edited = ("--from-seq", str(head["seq"]), "--from-hash", "f" * 64)
    assert run_fse("audit", "verify", *edited, str(tmp_path)).returncode == 1
    beyond = ("--from-seq", str(head["seq"] + 1), "--from-hash", "f" * 64)
    cut_tail = run_fse("audit", "verify", *beyond, str(tmp_path))
    assert cut_tail.returncode == EXIT_INCOMPLETE and "before the anchored seq" in cut_tail.stdout


def test_a_log_without_its_first_files_is_incomplete_whoever_wrote_it(tmp_path: Path) -> None:
    """All rotated files gone: the active file starts with audit.rotated, which alone
    used to pass as `ok`."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=4096, keep=5, fsync="never")
    for i in range(60):
        log.write("stream.verdict", stream=i, status="completed")
    log.close()
    for rotated in tmp_path.glob("audit.jsonl.*"):
        rotated.unlink()
    cli = run_fse("audit", "verify", str(path))
    assert cli.returncode == EXIT_INCOMPLETE, cli.stdout
    assert "INCOMPLETE" in cli.stdout and ": ok:" not in cli.stdout


def test_a_daemon_records_what_rotation_prunes(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    config = tmp_path / "fse.toml"
    config.write_text(f'[audit]\npath = "{logs / "audit.jsonl"}"\nrotate_bytes = 4096\nkeep = 1\n')
    daemon = start_daemon(*THREADS, "--config", str(config))
    for i in range(8):
        assert call(daemon, request_id=f"r{i}") == grpc.StatusCode.OK
    assert daemon.stop(timeout=LIVE) == 0
    pruned = [r for _, r in chain(logs) if r["event"] == "audit.pruned"]
    assert pruned and all(r["file"] == "audit.jsonl.1" for r in pruned)
    check = run_fse("audit", "verify", str(logs))
    assert check.returncode == 0 and "pruned: audit.jsonl.1" in check.stdout, check.stdout
    (logs / "audit.jsonl.1").unlink()
    cut = run_fse("audit", "verify", str(logs))
    assert cut.returncode == EXIT_INCOMPLETE and "INCOMPLETE" in cut.stdout, cut.stdout


# -- 3. symlinks and the directory, with the daemon as root ---------------------------


def attacker_dir(tmp_path: Path, mode: int) -> Path:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    return directory


@needs_root
def test_a_symlink_planted_at_the_lock_file_is_not_followed(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    secrets = tmp_path / "etc"
    secrets.mkdir()
    target = secrets / "passwd"
    target.write_text("root:x:0:0:root:/root:/bin/bash\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    lock = logs / "audit.jsonl.lock"
    lock.symlink_to(target)
    line = refused(start_daemon, logs / "audit.jsonl")
    assert f"{lock}: a symbolic link (to {target})" in line, line
    assert target.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    lock.unlink()
    os.link(target, lock)  # a hard link: the daemon's own user's file, under the name
    line = refused(start_daemon, logs / "audit.jsonl")
    assert f"{lock}: has 2 names (hard links)" in line, line
    assert target.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


@needs_root
def test_a_dangling_symlink_planted_at_the_log_is_not_followed(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """NAME -> a path of the planter's choosing: a root daemon must not create (and
    fill) the target. In the daemon's own directory (the kernel's fs.protected_symlinks
    does not cover it), and planted by uid 65534 in a sticky directory."""
    logs = tmp_path / "logs"
    logs.mkdir()
    target = tmp_path / "created-by-root"
    (logs / "audit.jsonl").symlink_to(target)
    shared = attacker_dir(tmp_path, 0o1777)
    plant(shared, "audit.jsonl", "symlink", str(target))
    for log in (logs / "audit.jsonl", shared / "audit.jsonl"):
        line = refused(start_daemon, log)
        assert f"--audit-log {log}: a symbolic link (to {target})" in line, line
        assert not target.exists() and not target.is_symlink()


@needs_root
def test_a_log_planted_by_another_user_is_refused(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A forged chain the attacker wrote into a sticky directory before the daemon's
    first start: a regular file, but not the daemon's."""
    shared = attacker_dir(tmp_path, 0o1777)
    forged = json.dumps({"ts": "2025-01-01T00:00:00Z", "seq": 1, "event": "x", "prev": "0" * 64})
    plant(shared, "audit.jsonl", "file", forged + "\n")
    line = refused(start_daemon, shared / "audit.jsonl")
    assert f"--audit-log {shared / 'audit.jsonl'}: owned by uid {NOBODY}" in line, line


@needs_root
def test_a_directory_others_can_write_is_refused_unless_sticky(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    line = refused(start_daemon, open_dir / "audit.jsonl")
    assert f"--audit-log {open_dir / 'audit.jsonl'}: its directory {open_dir}" in line, line
    assert "0777" in line and "sticky" in line
    assert not (open_dir / "audit.jsonl").exists()

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    daemon = start_daemon(*THREADS, "--audit-log", str(sticky / "audit.jsonl"))
    assert call(daemon) == grpc.StatusCode.OK
    assert daemon.stop(timeout=LIVE) == 0
    assert verify(sticky / "audit.jsonl").ok


# -- 4. one writer per log, however it is named ---------------------------------------


def test_a_second_daemon_on_a_hard_link_or_a_linked_directory_is_refused(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    log = d1 / "audit.jsonl"
    first = start_daemon(*THREADS, "--audit-log", str(log))
    os.link(log, d2 / "current.jsonl")
    (tmp_path / "d3").symlink_to(d1)  # the same file through a linked directory
    for other in (d2 / "current.jsonl", tmp_path / "d3" / "audit.jsonl"):
        line = refused(start_daemon, other)
        assert f"--audit-log {other}: in use by another process (pid {first.process.pid}" in line
    assert call(first) == grpc.StatusCode.OK
    assert first.stop(signal.SIGTERM, timeout=LIVE) == 0
    check = run_fse("audit", "verify", str(log))
    assert check.returncode == 0, check.stdout
    assert sum(r["event"] == "server.started" for r in audit_records(log)) == 1


def test_the_lock_follows_the_active_file_through_rotation(tmp_path: Path) -> None:
    """Rotation replaces the active file: the new one is locked before it takes the
    name, so a second writer is refused after a rotation too."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=4096, keep=2, fsync="never")
    for i in range(80):
        log.write("stream.verdict", stream=i)
    assert path.with_name("audit.jsonl.1").exists()
    with pytest.raises(audit.AuditError, match="in use by another process"):
        AuditLog(path)
    os.link(path, tmp_path / "other.jsonl")
    with pytest.raises(audit.AuditError, match="in use by another process"):
        AuditLog(tmp_path / "other.jsonl")
    log.close()
    with pytest.raises(audit.AuditError, match="has 2 names"):  # someone else's file?
        AuditLog(path)
    (tmp_path / "other.jsonl").unlink()
    AuditLog(path).close()


def test_a_key_file_that_is_a_fifo_or_writable_by_others_is_refused(tmp_path: Path) -> None:
    """A FIFO as the key file hung the start (read_bytes blocks for a writer); a key
    that others may replace is no key."""
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(audit.AuditError, match=r"key\.fifo: a FIFO, not a regular file"):
        audit.load_key(fifo)
    writable = tmp_path / "key.writable"
    writable.write_bytes(b"k" * 32)
    writable.chmod(0o620)
    with pytest.raises(audit.AuditError, match=r"writable by its group \(mode 0620\)"):
        audit.load_key(writable)
    good = tmp_path / "key"
    good.write_bytes(b"k" * 32 + b"\n")
    good.chmod(0o600)
    assert audit.load_key(good) == b"k" * 32
