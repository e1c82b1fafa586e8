"""The audit log through real daemons: a kill -9 mid-stream, a second daemon on the same
log, start checks, rotation and keyed mode as `fse serve` configures them.

Each daemon is a real `python -m fse.cli serve` process (conftest's Daemon helpers);
streams come from the real `fse generate --addr` CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import FSE, Daemon, audit_records, run_fse

THREADS = ("--threads", "1")
PROMPT = "The capital of France is"
LIVE = 60


def generate(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_fse("generate", "--addr", daemon.addr, "--max-tokens", "4", *args, PROMPT)


def events(path: Path, event: str) -> list[dict[str, Any]]:
    return [d for d in audit_records(path) if d["event"] == event]


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIVE
    while not predicate():
        assert time.monotonic() < deadline, f"not within {LIVE}s: {what}"
        time.sleep(0.05)


def test_a_killed_daemons_orphans_are_named_after_restart(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """kill -9 while a stream is in flight: the restarted daemon writes audit.orphans
    naming it, numbers its own streams after it, and verify lists it (exit 0). Debug
    faults are recorded with each stream. A second daemon on the same log is refused."""
    log = tmp_path / "audit.jsonl"
    first = start_daemon(*THREADS, "--allow-debug-faults", "--audit-log", str(log))
    assert generate(first, "--temperature", "0").returncode == 0
    hung = subprocess.Popen(
        [*FSE, "generate", "--addr", first.addr, "--debug-fault", "hang@2", PROMPT],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(events(log, "stream.started")) == 2, "the hung stream's start")
        first.stop(signal.SIGKILL)
    finally:
        hung.kill()
        hung.wait()
    (started,) = events(log, "server.started")
    assert started["allow_debug_faults"] is True
    done, orphan = events(log, "stream.started")
    assert done["faults"] == {} and orphan["faults"] == {"hang_at": 2}
    assert [d["stream"] for d in events(log, "stream.verdict")] == [done["stream"]]

    second = start_daemon(*THREADS, "--audit-log", str(log))
    (record,) = events(log, "audit.orphans")
    assert record["streams"] == [
        {"stream": orphan["stream"], "request_id": orphan["request_id"], "seq": orphan["seq"]}
    ]
    assert generate(second, "--temperature", "0").returncode == 0
    (_, _, after) = events(log, "stream.started")
    assert after["stream"] == orphan["stream"] + 1  # unique along the chain
    assert events(log, "server.started")[-1]["allow_debug_faults"] is False

    third = start_daemon(*THREADS, "--audit-log", str(log), wait=False)
    assert third.process.wait(LIVE) == 1
    assert f"in use by another process (pid {second.process.pid}," in third.log()
    assert second.stop() == 0

    check = run_fse("audit", "verify", str(log))
    assert check.returncode == 0, check.stdout
    assert f"orphan: stream {orphan['stream']} " in check.stdout
    assert "unfinished" not in check.stdout


def test_a_broken_or_foreign_log_is_refused_at_start(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    log = tmp_path / "audit.jsonl"
    run_fse("audit", "verify", str(log))  # (no file yet: nothing to check)
    records = [
        {"ts": "2025-01-01T00:00:00Z", "seq": 1, "event": "server.started", "prev": "0" * 64},
        {"ts": "2025-01-01T00:00:01Z", "seq": 2, "event": "server.stopping", "prev": "f" * 64},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    cases = {
        str(log): f"--audit-log {log}: line 2: prev is not the sha256 of line 1",
        "/dev/null": "--audit-log /dev/null: not a regular file",
    }
    for path, error in cases.items():
        daemon = start_daemon(*THREADS, "--audit-log", path, wait=False)
        assert daemon.process.wait(LIVE) == 1
        assert error in daemon.log(), daemon.log()
    assert log.read_text().count("\n") == 2  # nothing appended


def test_rotated_keyed_log_verifies_with_its_key(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    key = tmp_path / "audit.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    key.chmod(0o600)
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "fse-audit.jsonl"
    daemon = start_daemon(
        *THREADS,
        "--audit-log", str(log),
        "--audit-key-file", str(key),
        "--audit-rotate-bytes", "4096",
        "--audit-fsync", "always",
    )  # fmt: skip
    for _ in range(6):
        assert generate(daemon, "--temperature", "0").returncode == 0
    assert daemon.stop() == 0
    assert (logs / "fse-audit.jsonl.1").exists()
    assert all(p.stat().st_size <= 4096 for p in logs.glob("fse-audit.jsonl*"))
    assert audit_records(log)[0]["event"] == "audit.rotated"
    keyed = run_fse("audit", "verify", "--key-file", str(key), str(logs))
    assert keyed.returncode == 0, keyed.stdout
    assert "macs checked" in keyed.stdout
    head = [json.loads(x) for x in daemon.log().splitlines() if '"audit.head"' in x]
    assert keyed.stdout.strip().endswith(f"last seq {head[0]['seq']} sha256 {head[0]['sha256']}")
    unkeyed = run_fse("audit", "verify", str(logs))
    assert unkeyed.returncode == 0 and "MACs NOT checked" in unkeyed.stdout


def test_sigterm_with_a_hung_decode_exits_and_leaves_an_orphan(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A llama_decode that never returns cannot be drained: on SIGTERM the daemon stops
    anyway (exit 1, after the drain and a short grace), its client is cut off without a
    verdict, and the next start names the stream as an orphan."""
    log = tmp_path / "audit.jsonl"
    first = start_daemon(
        *THREADS, "--allow-debug-faults", "--audit-log", str(log), "--drain-seconds", "0"
    )
    hung = subprocess.Popen(
        [*FSE, "generate", "--addr", first.addr, "--json", "--debug-fault", "hang@2", PROMPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert hung.stdout is not None
    first_tokens = [hung.stdout.readline() for _ in range(2)]  # tokens 0 and 1, then it hangs
    assert all('"type": "token"' in line for line in first_tokens)
    time.sleep(0.5)
    began = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=LIVE) == 1
    assert time.monotonic() - began < 30
    assert '"event": "decode.stuck_at_shutdown"' in first.log()
    out, err = hung.communicate(timeout=LIVE)
    assert hung.returncode == 1 and '"verdict"' not in out  # never a made-up verdict
    assert "UNAVAILABLE" in err or "CANCELLED" in err
    second = start_daemon(*THREADS, "--audit-log", str(log))
    (record,) = events(log, "audit.orphans")
    assert [s["stream"] for s in record["streams"]] == [events(log, "stream.started")[0]["stream"]]
    assert second.stop() == 0
