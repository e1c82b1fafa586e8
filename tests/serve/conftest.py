"""The daemons most tests of the `serve` package share (package scope: one start for all
the files that use them):

- `main`: unix socket + loopback TCP, 8 streams, queue 16, 256 context tokens per
  stream (max_tokens limit 255), debug faults allowed.
- `single`: one stream, no queue (the second concurrent stream is RESOURCE_EXHAUSTED),
  debug faults not allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from fse_client.v1 import fse_pb2
from support.daemons import PROMPT, THREADS, Daemon, daemons
from support.streams import CTX_PER_STREAM, Outcome, assert_well_formed, generate, start


@pytest.fixture(scope="package")
def start_package_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Daemon]]:
    """Like `start_module_daemon`, for daemons shared by the whole package."""
    yield from daemons(tmp_path_factory)


WARNY = """\
name = "warny"
[guards.perplexity]
threshold = 1.5
min_tokens = 1
action = "warn"
[guards.l2_norm]
threshold = 1e4
"""


@pytest.fixture(scope="package")
def policies_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policies")
    (path / "warny.toml").write_text(WARNY)
    return path


@pytest.fixture(scope="package")
def main(start_package_daemon: Callable[..., Daemon], policies_dir: Path) -> Daemon:
    return start_package_daemon(
        *THREADS,
        "--max-streams", "8",
        "--max-queue", "16",
        "--ctx-per-stream", str(CTX_PER_STREAM),
        "--policies-dir", str(policies_dir),
        "--allow-debug-faults",
        tcp=True,
    )  # fmt: skip


@pytest.fixture(scope="package")
def single(start_package_daemon: Callable[..., Daemon]) -> Daemon:
    return start_package_daemon(*THREADS, "--max-streams", "1", "--max-queue", "0")


@pytest.fixture(scope="package")
def main_channel(main: Daemon) -> Iterator[grpc.Channel]:
    with main.channel() as channel:
        yield channel


@pytest.fixture(scope="package")
def single_channel(single: Daemon) -> Iterator[grpc.Channel]:
    with single.channel() as channel:
        yield channel


@pytest.fixture(scope="package")
def greedy_reference(main_channel: grpc.Channel) -> Outcome:
    """The greedy continuation of PROMPT (48 tokens), for stop-sequence tests."""
    outcome = generate(main_channel, [start(PROMPT, 48)])
    verdict = assert_well_formed(outcome, 48)
    assert verdict.status == fse_pb2.STATUS_COMPLETED and verdict.tokens == 48
    return outcome
