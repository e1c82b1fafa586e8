"""Real `fse` processes: the CLI (`run_fse`) and daemons (`Daemon`), started by the
fixtures in tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.ports import free_port
from support.waits import LIVE

ROOT = Path(__file__).resolve().parents[2]  # the repository
FSE = [sys.executable, "-m", "fse.cli"]
# One llama.cpp thread per daemon. With as many threads as cores (2 here), ggml's
# spinning thread barrier collapses when other processes share the cores: a
# 64-token stream measured 1.1 s alone and 50 s next to two busy processes; with
# one thread, 1.2 s and 2.2 s. Later arguments override start_daemon's `--threads 2`.
THREADS = ("--threads", "1")
PROMPT = "The capital of France is"
# Greedy continuation that neither ends nor trips a default-policy guard for
# hundreds of tokens (checked on the embedded model): for streams that must outlast
# a cancel, a deadline, a signal or a second client.
LONG_PROMPT = "Count: 1, 2, 3, 4, 5, 6,"


def run_fse(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `fse` CLI in a subprocess."""
    return subprocess.run(
        [*FSE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Daemon:
    """A real `fse serve` process."""

    process: subprocess.Popen[str]
    addr: str  # first listen address (unix:/...)
    addrs: list[str]
    log_path: Path
    audit_path: Path  # the default ./fse-audit.jsonl in the daemon's working directory

    def log(self) -> str:
        return self.log_path.read_text()

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's records so far."""
        return audit_records(self.audit_path)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.addr)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def audit_records(path: Path) -> list[dict[str, Any]]:
    """An audit log's records (complete lines only; none if there is no file yet)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]


def audit_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's audit records of one event."""
    return [doc for doc in daemon.audit() if doc.get("event") == event]


def log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's structured log lines (stderr) of one event."""
    lines = [line for line in daemon.log().splitlines() if line.startswith("{")]
    return [doc for doc in map(json.loads, lines) if doc.get("event") == event]


def wait_serving(addr: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited early with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"daemon at {addr} not SERVING after {timeout}s")


def spawn(
    workdir: Path, argv: Sequence[str], addrs: list[str], env: dict[str, str] | None = None
) -> Daemon:
    """Start `argv` (an `fse serve` command line) in `workdir`, its output to daemon.log."""
    log_path = workdir / "daemon.log"
    process = subprocess.Popen(
        list(argv),
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
        env=env,
    )
    return Daemon(process, addrs[0], addrs, log_path, workdir / "fse-audit.jsonl")


def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons on demand; kill what is still running at the end."""
    started: list[Daemon] = []

    def start(*args: str, tcp: bool = False, wait: bool = True) -> Daemon:
        workdir = tmp_path_factory.mktemp("daemon")
        addrs = [f"unix:{workdir / 'fse.sock'}"]
        if tcp:
            addrs.append(f"127.0.0.1:{free_port()}")
        listen = [x for a in addrs for x in ("--listen", a)]
        daemon = spawn(workdir, [*FSE, "serve", *listen, "--threads", "2", *args], addrs)
        started.append(daemon)
        if wait:
            wait_serving(daemon.addr, daemon.process)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL if daemon.process.poll() is None else signal.SIGTERM, timeout=10)


def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start `fse serve` (or `command`) with an environment of its own (no NOTIFY_ or
    WATCHDOG_ variables unless given), without waiting for it; killed at the end."""
    started: list[Daemon] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] = FSE,
        listen: bool = True,
    ) -> Daemon:
        workdir = tmp_path_factory.mktemp("svc")
        addr = f"unix:{workdir / 'fse.sock'}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        argv = [*command, "serve", *(("--listen", addr) if listen else ()), *THREADS, *args]
        daemon = spawn(workdir, argv, [addr], env={**base, **(env or {})})
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL, timeout=10)


def health(daemon: Daemon, timeout: float = LIVE) -> int:
    """The daemon's overall health status, over a connection of its own."""
    with daemon.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    return int(reply.status)
