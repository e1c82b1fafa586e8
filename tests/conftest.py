"""Shared fixtures: the real embedded model, and real daemon processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fse.core.engine import Context
from fse.core.gguf import default_model_path
from fse.core.model import Model
from grpc_health.v1 import health_pb2, health_pb2_grpc

FSE = [sys.executable, "-m", "fse.cli"]


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path: Path) -> Iterator[Model]:
    with Model(model_path) as m:
        yield m


@pytest.fixture()
def ctx(model: Model) -> Iterator[Context]:
    with Context(model, n_ctx=1024, n_threads=2) as c:
        yield c


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


def _daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons on demand; kill what is still running at the end."""
    started: list[Daemon] = []

    def start(*args: str, tcp: bool = False, wait: bool = True) -> Daemon:
        workdir = tmp_path_factory.mktemp("daemon")
        addrs = [f"unix:{workdir / 'fse.sock'}"]
        if tcp:
            addrs.append(f"127.0.0.1:{_free_port()}")
        listen = [x for a in addrs for x in ("--listen", a)]
        log_path = workdir / "daemon.log"
        process = subprocess.Popen(
            [*FSE, "serve", *listen, "--threads", "2", *args],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            cwd=workdir,
        )
        daemon = Daemon(process, addrs[0], addrs, log_path, workdir / "fse-audit.jsonl")
        started.append(daemon)
        if wait:
            wait_serving(daemon.addr, process)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL if daemon.process.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture()
def start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Factory: start_daemon('--max-streams', '4', tcp=True) -> a SERVING Daemon."""
    yield from _daemons(tmp_path_factory)


@pytest.fixture(scope="module")
def start_module_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Daemon]]:
    """Like `start_daemon`, but the daemons live for the whole test module (one start
    shared by many tests)."""
    yield from _daemons(tmp_path_factory)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
