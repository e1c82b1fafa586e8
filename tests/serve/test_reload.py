"""Policies at start and on SIGHUP: an invalid file at start serves nothing, an invalid
reload keeps the last good set.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.daemons import (
    THREADS,
    Daemon,
    audit_events,
    log_events,
)
from support.streams import (
    assert_well_formed,
    generate,
    start,
)
from support.waits import LIVE, wait_for


def test_invalid_policy_file_at_start_serves_nothing(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "strict.toml").write_text(
        'name = "strict"\n[guards.perplexity]\nthreshold = 400.0\nbogus_key = 1\n'
    )
    daemon = start_daemon(*THREADS, "--policies-dir", str(policies), wait=False)
    assert daemon.process.wait(LIVE) != 0
    output = daemon.log()
    assert "fse serve: error:" in output
    assert "bogus_key" in output
    assert "Traceback" not in output
    assert not log_events(daemon, "server.listening")
    assert not log_events(daemon, "server.started")
    assert not Path(daemon.addr.removeprefix("unix:")).exists()


def test_invalid_policy_on_reload_keeps_the_last_good_set(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "strict.toml").write_text(
        'name = "strict"\n[guards.perplexity]\nthreshold = 50.0\n'
    )
    daemon = start_daemon(*THREADS, "--policies-dir", str(policies))
    (policies / "strict.toml").write_text('name = "strict"\n[guards.perplexity]\nthreshold = -1\n')
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(audit_events(daemon, "policy.reload_rejected")), what="reload rejected")
    (rejected,) = audit_events(daemon, "policy.reload_rejected")
    assert "guards.perplexity.threshold" in rejected["error"]
    with daemon.channel() as channel:
        info = fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
        assert "strict" in {p.name for p in info.policies}
        verdict = assert_well_formed(generate(channel, [start(max_tokens=4, policy="strict")]))
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.policy == "strict"
    assert daemon.process.poll() is None
