"""A model split across RPC workers (docs/rpc.md): `fse rpc-worker` on loopback, started
here, and daemons that load the embedded model across one or two of them.

What is checked: greedy tokens through a worker are those of a local daemon; GetInfo,
the banner and fse_device_layers name each worker's device and its layers; a worker
killed (SIGKILL) or stopped (SIGSTOP) mid-stream ends the stream with an `error` verdict
(guard `internal`), never `completed`, the daemon exits 1 (systemd restarts it) and the
audit chain verifies; a worker that is not there stops the start with one line; SIGTERM
stops a worker with exit 0.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.daemons import (
    FSE,
    LONG_PROMPT,
    PROMPT,
    Daemon,
    audit_events,
    log_events,
    run_fse,
)
from support.metrics import scrape, value
from support.ports import free_port
from support.streams import LONG, N_LAYER, generate, start
from support.waits import LIVE, wait_for

# A stopped worker counts as lost after this long (the daemon's --rpc-stall-seconds).
STALL = 2.0


@dataclass
class Worker:
    process: subprocess.Popen[str]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture()
def start_worker(tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """`fse rpc-worker` on a free loopback port, one CPU thread; killed at the end."""
    started: list[Worker] = []

    def launch() -> Worker:
        port = free_port()
        log_path = tmp_path / f"worker-{port}.log"
        process = subprocess.Popen(
            [*FSE, "rpc-worker", "--listen", f"127.0.0.1:{port}", "--threads", "1"],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker = Worker(process, f"127.0.0.1:{port}", log_path)
        started.append(worker)
        wait_for(lambda: process.poll() is not None or _accepts(port), "the worker listens")
        assert process.poll() is None, worker.log()
        return worker

    yield launch
    for worker in started:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)  # a stopped one must be able to die
            worker.process.kill()
            worker.process.wait()


def _info(daemon: Daemon) -> fse_pb2.ModelInfo:
    with daemon.channel() as channel:
        info = fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
    model: fse_pb2.ModelInfo = info.model
    return model


def _layers(model: fse_pb2.ModelInfo) -> dict[str, tuple[str, int]]:
    return {d.name: (d.description, d.layers) for d in model.devices}


def test_greedy_tokens_through_a_worker_are_the_local_ones(
    start_daemon: Callable[..., Daemon], start_worker: Callable[[], Worker]
) -> None:
    worker = start_worker()
    metrics_port = free_port()
    remote = start_daemon(
        "--threads", "1", "--rpc", worker.address, "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    local = start_daemon("--threads", "1")
    outcomes = []
    for daemon in (remote, local):
        with daemon.channel() as channel:
            outcomes.append(generate(channel, [start(PROMPT, 24)]))
    through, here = outcomes
    assert through.verdict.status == fse_pb2.STATUS_COMPLETED
    assert through.ids == here.ids and len(through.ids) == 24
    # Every layer on the worker's device (--gpu-layers auto: all of them on RPC devices).
    model = _info(remote)
    assert model.backend == "RPC" and model.gpu_layers == N_LAYER
    layers = _layers(model)
    assert layers["RPC0"] == (worker.address, N_LAYER)
    assert layers["CPU"][1] == 0
    assert f"RPC0 ({worker.address}): {N_LAYER} layers" in remote.log()
    (started,) = audit_events(remote, "server.started")  # which hosts computed, audited
    assert started["rpc_workers"] == [worker.address]
    assert "rpc_workers" not in audit_events(local, "server.started")[0]
    samples = scrape(metrics_port)
    assert value(samples, "fse_device_layers", device="RPC0", description=worker.address) == 18
    # The local daemon holds every layer itself.
    assert _layers(_info(local))["CPU"][1] == N_LAYER
    assert remote.stop() == 0  # a clean stop with a live worker


def test_two_workers_split_the_layers(
    start_daemon: Callable[..., Daemon], start_worker: Callable[[], Worker]
) -> None:
    first, second = start_worker(), start_worker()
    daemon = start_daemon("--threads", "1", "--rpc", first.address, "--rpc", second.address)
    layers = _layers(_info(daemon))
    # Both report the same host's memory: about half each, the first one ahead by the
    # output layer's share (llama.cpp's rule, fse.core.placement).
    assert layers["RPC0"][0] == first.address and layers["RPC1"][0] == second.address
    assert layers["RPC0"][1] > 0 and layers["RPC1"][1] > 0
    assert layers["RPC0"][1] + layers["RPC1"][1] == N_LAYER
    assert layers["CPU"][1] == 0
    with daemon.channel() as channel:
        outcome = generate(channel, [start(PROMPT, 8)])
    assert outcome.verdict.status == fse_pb2.STATUS_COMPLETED and len(outcome.ids) == 8


def _stream_then(daemon: Daemon, act: Callable[[], None]) -> tuple[int, fse_pb2.Verdict, float]:
    """A long greedy stream; `act` once 4 tokens are out; (tokens, verdict, seconds from
    `act` to the verdict)."""
    with daemon.channel() as channel:
        call = fse_pb2_grpc.GuardStub(channel).Generate(
            iter([start(LONG_PROMPT, LONG)]), timeout=LIVE
        )
        tokens, acted = 0, 0.0
        verdicts = []
        with pytest.raises(grpc.RpcError) as ended:  # an error verdict, then INTERNAL
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "token":
                    tokens += 1
                    if tokens == 4:
                        act()
                        acted = time.monotonic()
                elif kind == "verdict":
                    verdicts.append(msg.verdict)
    assert ended.value.code() == grpc.StatusCode.INTERNAL
    (verdict,) = verdicts
    assert ended.value.details() == verdict.message
    return tokens, verdict, time.monotonic() - acted


def _assert_failed_closed(daemon: Daemon, verdict: fse_pb2.Verdict, tokens: int) -> None:
    assert verdict.status == fse_pb2.STATUS_ERROR, verdict
    assert verdict.guard == "internal" and "RPC worker lost" in verdict.message
    assert 4 <= tokens < LONG and verdict.tokens == tokens
    # The daemon stops, exit 1 (systemd's Restart=on-failure), within a bounded time.
    assert daemon.process.wait(30) == 1
    check = run_fse("audit", "verify", str(daemon.audit_path))
    assert check.returncode == 0, check.stdout + check.stderr
    (lost,) = audit_events(daemon, "rpc.worker_lost")
    (record,) = audit_events(daemon, "stream.verdict")
    assert record["status"] == "error" and record["seq"] > lost["seq"]


def test_a_worker_killed_mid_stream_fails_closed(
    start_daemon: Callable[..., Daemon], start_worker: Callable[[], Worker]
) -> None:
    worker = start_worker()
    daemon = start_daemon("--threads", "1", "--rpc", worker.address)
    tokens, verdict, seconds = _stream_then(daemon, worker.process.kill)
    _assert_failed_closed(daemon, verdict, tokens)
    assert seconds < 10, seconds  # the lost connection is seen at once
    # The dead worker named: its port refuses connections, or it closed ours.
    (lost,) = log_events(daemon, "rpc.worker_lost")
    assert lost["workers"] in (
        [f"{worker.address} (Connection refused)"],
        [f"{worker.address} (closed)"],
    )


def test_a_stopped_worker_fails_closed_after_the_stall_limit(
    start_daemon: Callable[..., Daemon], start_worker: Callable[[], Worker]
) -> None:
    worker = start_worker()
    daemon = start_daemon(
        "--threads", "1", "--rpc", worker.address, "--rpc-stall-seconds", str(STALL)
    )
    stop = lambda: worker.process.send_signal(signal.SIGSTOP)  # noqa: E731
    tokens, verdict, seconds = _stream_then(daemon, stop)
    _assert_failed_closed(daemon, verdict, tokens)
    assert "no answer for" in verdict.message
    assert STALL <= seconds < STALL + 15, seconds


def test_a_worker_not_there_stops_the_start(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [*FSE, "serve", "--listen", f"unix:{tmp_path / 'fse.sock'}", "--rpc", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=LIVE,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("{")]
    assert line == (
        f"fse serve: error: model.rpc: 127.0.0.1:{port}: no RPC worker reachable there "
        "(Connection refused)"
    )


def test_sigterm_stops_a_worker_with_exit_0(start_worker: Callable[[], Worker]) -> None:
    worker = start_worker()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(10) == 0
    assert "stopped (SIGTERM)" in worker.log()


def test_a_taken_port_is_a_one_line_error(start_worker: Callable[[], Worker]) -> None:
    worker = start_worker()
    result = run_fse("rpc-worker", "--listen", worker.address, "--threads", "1", timeout=LIVE)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"fse rpc-worker: error: --listen: {worker.address}:" in result.stderr


def test_a_worker_killed_while_idle_stops_the_daemon(
    start_daemon: Callable[..., Daemon], start_worker: Callable[[], Worker]
) -> None:
    """No stream needs to find it: the connection the worker closed is seen within a
    second, and the daemon stops (exit 1) rather than serve with a dead worker."""
    worker = start_worker()
    daemon = start_daemon("--threads", "1", "--rpc", worker.address)
    worker.process.kill()
    worker.process.wait()
    assert daemon.process.wait(30) == 1
    (lost,) = log_events(daemon, "rpc.worker_lost")
    assert lost["workers"] == [f"{worker.address} (closed)"]
    assert [r["event"] for r in audit_events(daemon, "rpc.worker_lost")] == ["rpc.worker_lost"]
    check = run_fse("audit", "verify", str(daemon.audit_path))
    assert check.returncode == 0, check.stdout + check.stderr
    with daemon.channel() as channel, pytest.raises(grpc.RpcError):
        fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=2)


@pytest.mark.parametrize("loss", [signal.SIGKILL, signal.SIGSTOP])
def test_generate_local_ends_with_an_error_verdict_when_its_worker_is_lost(
    start_worker: Callable[[], Worker], loss: signal.Signals
) -> None:
    worker = start_worker()
    argv = [*FSE, "generate", "--local", "--rpc", worker.address, "--json", "--threads", "1"]
    argv += ["--rpc-stall-seconds", str(STALL)]
    argv += ["--temperature", "0", "--max-tokens", str(LONG), LONG_PROMPT]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        lines = []
        for line in p.stdout:
            lines.append(json.loads(line))
            if len(lines) == 4:
                worker.process.send_signal(loss)
        assert p.wait(LIVE) == 1
    *tokens, verdict = lines
    if loss == signal.SIGSTOP:
        assert "no answer for" in verdict["message"]
    assert all(t["type"] == "token" for t in tokens) and 4 <= len(tokens) < LONG
    assert verdict["type"] == "verdict" and verdict["status"] == "error"
    assert verdict["guard"] == "internal" and verdict["tokens"] == len(tokens)
    assert verdict["message"].startswith(f"RPC worker lost: {worker.address}: ")
    assert verdict["text"] == "".join(t["text"] for t in tokens)
