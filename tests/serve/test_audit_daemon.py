"""The audit log through real daemons: a kill -9 mid-stream, a second daemon on the same
log, start checks, rotation and keyed mode as `fse serve` configures them.

Each daemon is a real `python -m fse.cli serve` process (conftest's Daemon helpers);
streams come from the real `fse generate --addr` CLI, or from raw gRPC calls
(support.streams): every decision recorded, prompts and outputs on request, a log that
cannot be written refusing new streams, an unusable log at start.
"""

from __future__ import annotations

import hashlib
import json
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fse.serve.audit import AuditLog, verify
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health_pb2
from support.daemons import (
    FSE,
    LONG_PROMPT,
    PROMPT,
    THREADS,
    Daemon,
    audit_events,
    audit_records,
    log_events,
    run_fse,
)
from support.streams import (
    CANCEL,
    LONG,
    Code,
    assert_well_formed,
    generate,
    health_status,
    start,
)
from support.waits import LIVE, wait_for


def cli_generate(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Four tokens of PROMPT from the real `fse generate --addr`."""
    return run_fse("generate", "--addr", daemon.addr, "--max-tokens", "4", *args, PROMPT)


def events(path: Path, event: str) -> list[dict[str, Any]]:
    return [d for d in audit_records(path) if d["event"] == event]


def test_a_killed_daemons_orphans_are_named_after_restart(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """kill -9 while a stream is in flight: the restarted daemon writes audit.orphans
    naming it, numbers its own streams after it, and verify lists it (exit 0). Debug
    faults are recorded with each stream. A second daemon on the same log is refused."""
    log = tmp_path / "audit.jsonl"
    first = start_daemon(*THREADS, "--allow-debug-faults", "--audit-log", str(log))
    assert cli_generate(first, "--temperature", "0").returncode == 0
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
    assert cli_generate(second, "--temperature", "0").returncode == 0
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
        assert cli_generate(daemon, "--temperature", "0").returncode == 0
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
    # Nothing outside the daemon shows the decode thread blocked in its hang: give it
    # time to get there, so that SIGTERM finds the step stuck rather than between steps.
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


# -- decisions recorded by a daemon ---------------------------------------------------


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_audit_log_records_every_decision(start_daemon: Callable[..., Daemon]) -> None:
    """One stream.started and exactly one stream.verdict per stream, in a chain that
    `fse audit verify` accepts and whose head the daemon logs as it stops."""
    daemon = start_daemon(*THREADS, "--max-streams", "2", "--allow-debug-faults")
    with daemon.channel() as channel:
        done = generate(channel, [start(max_tokens=6, request_id="done")])
        halted = generate(
            channel,
            [start(max_tokens=6, request_id="nan")],
            metadata=[("fse-debug-fault", "nan@2")],
        )
        cancelled = generate(channel, [start(LONG_PROMPT, LONG, request_id="stop"), CANCEL])
        bad = generate(channel, [start(max_tokens=0, request_id="bad")])
    assert bad.code == Code.INVALID_ARGUMENT
    assert daemon.stop() == 0
    docs = daemon.audit()
    events = [d["event"] for d in docs]
    assert events[:2] == ["policy.loaded", "server.started"]
    assert events[-1] == "server.stopping"
    started = {d["request_id"]: d for d in docs if d["event"] == "stream.started"}
    verdicts = [d for d in docs if d["event"] == "stream.verdict"]
    assert sorted(started) == sorted(d["request_id"] for d in verdicts) == ["done", "nan", "stop"]
    for outcome in (done, halted, cancelled):
        verdict = assert_well_formed(outcome)
        (logged,) = [d for d in verdicts if d["request_id"] == outcome.started.request_id]
        assert logged["stream"] == started[logged["request_id"]]["stream"]
        assert (
            logged["status"] == fse_pb2.Status.Name(verdict.status).removeprefix("STATUS_").lower()
        )
        assert logged["tokens"] == verdict.tokens
        assert logged["output_sha256"] == sha256_text(verdict.text)
        assert "output" not in logged
    assert started["done"]["prompt_sha256"] == sha256_text(PROMPT)
    assert started["done"]["prompt_tokens"] == done.started.prompt_tokens
    (nan,) = [d for d in verdicts if d["request_id"] == "nan"]
    assert (nan["guard"], nan["token_index"]) == ("non_finite", 2)
    assert nan["value"] == halted.verdict.value and nan["threshold"] == halted.verdict.threshold
    (rejected,) = [d for d in docs if d["event"] == "input.rejected"]
    assert rejected["request_id"] == "bad" and rejected["reason"] == "invalid_argument"
    assert rejected["error"].startswith("max_tokens: 0 is out of range")
    check = run_fse("audit", "verify", str(daemon.audit_path))
    assert check.returncode == 0, check.stdout
    (head,) = log_events(daemon, "audit.head")
    assert check.stdout.strip().endswith(f"last seq {head['seq']} sha256 {head['sha256']}")
    assert head["seq"] == len(docs)


def test_audit_text_records_prompts_and_outputs(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(*THREADS, "--max-streams", "1", "--audit-text")
    with daemon.channel() as channel:
        verdict = assert_well_formed(generate(channel, [start(max_tokens=4)]))
    (started,) = audit_events(daemon, "stream.started")
    (logged,) = audit_events(daemon, "stream.verdict")
    assert started["prompt"] == PROMPT and logged["output"] == verdict.text


def test_audit_log_that_cannot_be_written_refuses_new_streams(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The fail-closed row: new streams UNAVAILABLE and health NOT_SERVING while the
    audit log cannot be written, nothing lost, and serving again once it can. The
    failure is real: a file size limit (EFBIG) set on the running daemon."""
    audit = tmp_path / "audit.jsonl"
    history = AuditLog(audit)  # some history, so that only the audit log hits the limit
    for i in range(2000):
        history.write("stream.verdict", stream=i, status="completed")
    history.close()
    daemon = start_daemon(*THREADS, "--max-streams", "2", "--audit-log", str(audit))
    pid = daemon.process.pid
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    with daemon.channel() as channel:
        before = generate(channel, [start(max_tokens=4, request_id="before")])
        assert assert_well_formed(before, 4).status == fse_pb2.STATUS_COMPLETED
        size = audit.stat().st_size
        assert size > daemon.log_path.stat().st_size + (64 << 10)  # stderr stays writable
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

        refused = generate(channel, [start(max_tokens=4, request_id="unaudited")])
        assert refused.code == Code.UNAVAILABLE, (refused.code, refused.details)
        assert refused.details.startswith("audit log: cannot write ")
        assert "File too large" in refused.details
        assert refused.tokens == [] and refused.verdicts == []
        wait_for(
            lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            what="NOT_SERVING while the audit log fails",
        )
        again = generate(channel, [start(max_tokens=4)])
        assert again.code == Code.UNAVAILABLE and again.messages == []
        assert audit.stat().st_size == size  # no partial line

        resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)
        wait_for(
            lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING,
            what="SERVING once the audit log can be written",
        )
        after = generate(channel, [start(max_tokens=4, request_id="after")])
        assert assert_well_formed(after, 4).status == fse_pb2.STATUS_COMPLETED
    assert log_events(daemon, "audit.write_failed") and log_events(daemon, "audit.recovered")
    new = [d for d in audit_records(audit) if d["seq"] > 2000]
    ids = [(d["event"], d.get("request_id")) for d in new if d["event"].startswith("stream.")]
    assert ids == [
        ("stream.started", "before"),
        ("stream.verdict", "before"),
        ("stream.started", "unaudited"),  # kept while the log failed, written after
        ("stream.verdict", "unaudited"),
        ("stream.started", "after"),
        ("stream.verdict", "after"),
    ]
    (unaudited,) = [
        d for d in new if d["event"] == "stream.verdict" and d["request_id"] == "unaudited"
    ]
    assert unaudited["status"] == "cancelled"
    assert verify(audit).ok


def test_unusable_audit_log_at_start_serves_nothing(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(*THREADS, "--audit-log", str(tmp_path), wait=False)
    assert daemon.process.wait(LIVE) == 1
    output = daemon.log()
    assert f"fse serve: error: --audit-log {tmp_path}: cannot open: Is a directory" in output
    assert "Traceback" not in output
    assert not log_events(daemon, "server.listening")
