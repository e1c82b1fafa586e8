"""Shared fixtures: the real embedded model, real daemon processes, systemd's notify
socket; and the markers each test gets by what it uses (see pyproject.toml).

The helpers behind them live in tests/support/ (`from support.daemons import Daemon`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fse.core.engine import Context
from fse.core.gguf import default_model_path
from fse.core.model import Model
from support.daemons import Daemon, daemons, launcher
from support.notify import NotifySocket

# Fixtures that start real `fse serve` processes: a test using one (directly or through
# another fixture) is marked `daemon`.
DAEMON_FIXTURES = {"start_daemon", "start_module_daemon", "start_package_daemon", "launch"}
# Test folders whose every test is `slow`, or needs the built client examples.
SLOW_DIRS = {"install", "tools"}
CLIENT_DIRS = {"conformance"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        if DAEMON_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.daemon)
        if CLIENT_DIRS & set(parts):
            item.add_marker(pytest.mark.clients)
        if "tests" in parts and SLOW_DIRS & set(parts[parts.index("tests") :]):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture()
def start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Factory: start_daemon('--max-streams', '4', tcp=True) -> a SERVING Daemon."""
    yield from daemons(tmp_path_factory)


@pytest.fixture(scope="module")
def start_module_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Daemon]]:
    """Like `start_daemon`, but the daemons live for the whole test module (one start
    shared by many tests)."""
    yield from daemons(tmp_path_factory)


@pytest.fixture()
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Factory: launch(*args, env=..., command=..., listen=...) -> a Daemon just started
    (not waited for), with an environment of its own; killed at the end."""
    yield from launcher(tmp_path_factory)


@pytest.fixture()
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


@pytest.fixture()
def notify_abstract() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@fse-test-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    yield listener
    listener.close()
