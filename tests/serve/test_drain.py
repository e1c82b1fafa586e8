"""Stopping a real daemon: SIGKILL mid-stream, SIGTERM with and without a drain, and a
second daemon that must never take a live socket.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health_pb2
from support.daemons import (
    LONG_PROMPT,
    THREADS,
    Daemon,
    audit_events,
)
from support.streams import (
    Code,
    LiveStream,
    assert_well_formed,
    generate,
    health_status,
    start,
)
from support.waits import LIVE, wait_for


def test_sigkill_mid_stream_is_unavailable(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(*THREADS, "--max-streams", "1")
    with daemon.channel() as channel, LiveStream(channel, start(LONG_PROMPT, 1000)) as live:
        live.read_tokens(3)
        daemon.process.kill()
        outcome = live.finish()
    assert outcome.code == Code.UNAVAILABLE, (outcome.code, outcome.details)
    assert outcome.verdicts == []  # never a completed (or any) verdict
    assert daemon.process.wait(LIVE) == -signal.SIGKILL


def test_sigterm_drains_in_flight_stream(start_daemon: Callable[..., Daemon]) -> None:
    """Also: health is NOT_SERVING from the start until the model is loaded, SERVING only
    when a stream is really served, and NOT_SERVING again (truthfully) while draining."""
    daemon = start_daemon(*THREADS, "--max-streams", "2", "--drain-seconds", "30", wait=False)
    seen: set[int] = set()
    with grpc.insecure_channel(daemon.addr) as channel:
        deadline = time.monotonic() + LIVE
        while time.monotonic() < deadline:
            assert daemon.process.poll() is None, daemon.log()
            try:
                status = health_status(channel, "fse.v1.Guard")
            except grpc.RpcError as exc:
                assert exc.code() == Code.UNAVAILABLE  # not bound yet
                time.sleep(0.02)
                continue
            seen.add(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # NOT_SERVING is true: a stream is refused while the model loads.
            early = generate(channel, [start(max_tokens=4)])
            assert early.code in (Code.UNAVAILABLE, Code.OK), early.details
            if early.code == Code.OK:  # the model came up between the two calls
                assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.02)
        assert health_pb2.HealthCheckResponse.SERVING in seen
        # SERVING is true: a stream is served at once.
        with LiveStream(channel, start(LONG_PROMPT, 200, request_id="drained")) as live:
            live.read_tokens(3)
            daemon.process.send_signal(signal.SIGTERM)
            wait_for(
                lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
                what="health NOT_SERVING after SIGTERM",
            )
            assert (
                health_status(channel, "fse.v1.Guard") == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            refused = generate(channel, [start(max_tokens=4)])
            assert refused.code == Code.UNAVAILABLE, (refused.code, refused.details)
            outcome = live.finish()
    verdict = assert_well_formed(outcome, 200)
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.tokens == 200
    assert daemon.process.wait(LIVE) == 0
    assert audit_events(daemon, "server.stopping")
    (logged,) = [e for e in audit_events(daemon, "stream.verdict") if e["request_id"] == "drained"]
    assert logged["status"] == "completed"


def test_sigterm_without_drain_halts_with_shutdown(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(*THREADS, "--max-streams", "1", "--drain-seconds", "0")
    with daemon.channel() as channel, LiveStream(channel, start(LONG_PROMPT, 1000)) as live:
        live.read_tokens(3)
        daemon.process.send_signal(signal.SIGTERM)
        outcome = live.finish()
    verdict = assert_well_formed(outcome, 1000)
    assert verdict.status == fse_pb2.STATUS_HALTED
    assert verdict.guard == "shutdown"
    assert verdict.token_index == verdict.tokens < 1000
    assert daemon.process.wait(LIVE) == 0
    (logged,) = audit_events(daemon, "stream.verdict")
    assert (logged["status"], logged["guard"]) == ("halted", "shutdown")


def test_second_daemon_never_takes_a_live_socket(
    start_daemon: Callable[..., Daemon], single: Daemon, tmp_path: Path
) -> None:
    intruder = start_daemon(*THREADS, "--listen", single.addr, wait=False)
    assert intruder.process.wait(LIVE) == 1
    assert f"--listen {single.addr}: address in use" in intruder.log()
    with single.channel() as fresh:  # a new connection still reaches the first daemon
        assert health_status(fresh) == health_pb2.HealthCheckResponse.SERVING
        outcome = generate(fresh, [start(max_tokens=4)])
        assert assert_well_formed(outcome, 4).status == fse_pb2.STATUS_COMPLETED
    # A path that is not a socket is never deleted to make room.
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    other = start_daemon(*THREADS, "--listen", f"unix:{notes}", wait=False)
    assert other.process.wait(LIVE) == 1
    assert "exists and is not a socket" in other.log()
    assert notes.read_text() == "keep me"
