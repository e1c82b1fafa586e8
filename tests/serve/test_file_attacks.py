"""The files the daemon trusts, attacked (issue 18, findings 5, 6 and 9, and the context
that cannot be allocated).

A FIFO where a policy or the tokens file should be, TOML nested too deeply for the
parser, a tokens file or policies directory that others may write: each is refused with
one line naming the file, at start (exit 1, before anything serves) and on SIGHUP (a
`policy.reload_rejected` record, READY=1 after RELOADING=1, the old policies serving and
health answering all along). Real daemon processes, real FIFOs, the attacker as uid 65534.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fse.serve.reload
import pytest
from fse.core.policy import Policy, load_policies
from fse.serve.notify import Notifier
from fse.serve.reload import PolicyReloader
from fse_client import Status
from grpc_health.v1 import health_pb2
from support import users
from support.daemons import Daemon, audit_records, health
from support.notify import NotifySocket, notify_env
from support.streams import client_verdict
from support.users import as_nobody, needs_root
from support.waits import LIVE, wait_for

SMALL = ("--max-streams", "2", "--ctx-per-stream", "512")
STRICT = 'name = "strict"\n[guards.perplexity]\nthreshold = 50.0\n'
# 1,000 levels: deeper than tomllib can recurse (today: a RecursionError traceback).
DEEP = 'name = "deep"\nx = ' + "[" * 1000 + "]" * 1000 + "\n"

Launch = Callable[..., Daemon]


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's own are private to root)."""
    path = users.shared_dir("fse-files-")
    yield path
    shutil.rmtree(path)


def refused_at_start(daemon: Daemon) -> str:
    """The daemon exits 1 before serving; returns its one error line."""
    try:
        code = daemon.process.wait(LIVE)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the daemon did not exit (hangs or serves):\n{daemon.log()}"
        ) from None
    output = daemon.log()
    assert code == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("fse serve: error:")]
    assert len(errors) == 1, output
    assert not Path(daemon.addr.removeprefix("unix:")).exists()  # nothing was served
    return errors[0]


def generate(daemon: Daemon, policy: str) -> Status:
    return client_verdict(daemon.addr, max_tokens=2, policy=policy).status


# -- policies: a FIFO, deep nesting ------------------------------------------------------


@pytest.mark.parametrize("attack", ["fifo", "deep"])
def test_a_bad_policy_file_at_start_is_one_line_naming_it(
    launch: Launch, tmp_path: Path, attack: str
) -> None:
    """Finding 5 (a FIFO hung the start, silently) and 6 (a RecursionError traceback)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    evil = policies / "evil.toml"
    if attack == "fifo":
        os.mkfifo(evil)
    else:
        evil.write_text(DEEP)
    line = refused_at_start(launch(*SMALL, "--policies-dir", str(policies)))
    assert str(evil) in line
    why = "a FIFO, not a regular file" if attack == "fifo" else "nested too deeply"
    assert why in line, line


@pytest.mark.parametrize("attack", ["fifo", "deep"])
def test_a_bad_policy_file_on_sighup_is_rejected_and_the_daemon_keeps_serving(
    launch: Launch, tmp_path: Path, attack: str
) -> None:
    """Finding 5 (a FIFO blocked the event loop: no health, no tokens, no watchdog) and
    6 (the exception escaped: no record, RELOADING=1 never followed by READY=1)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "strict.toml").write_text(STRICT)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = launch(*SMALL, "--policies-dir", str(policies), env=notify_env(notify))
        notify.wait_for("READY=1", process=daemon.process)
        evil = policies / "evil.toml"
        if attack == "fifo":
            os.mkfifo(evil)
        else:
            evil.write_text(DEEP)
        mark = len(notify.received)
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", after=mark, process=daemon.process)
        notify.wait_for("READY=1", after=reloading + 1, process=daemon.process)
        wait_for(
            lambda: any(r["event"] == "policy.reload_rejected" for r in daemon.audit()),
            "policy.reload_rejected",
        )
        (rejected,) = [r for r in daemon.audit() if r["event"] == "policy.reload_rejected"]
        assert str(evil) in rejected["error"]
        assert health(daemon) == health_pb2.HealthCheckResponse.SERVING
        assert generate(daemon, "strict") == Status.COMPLETED  # the old set still serves
        # The watchdog's pings go on (the loop was never blocked).
        pings = len(notify.pings())
        wait_for(lambda: len(notify.pings()) > pings, "a watchdog ping after the reload")
        # With the file gone, the next reload is accepted.
        evil.unlink()
        mark = len(notify.received)
        daemon.process.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", after=mark, process=daemon.process)
        wait_for(
            lambda: sum(r["event"] == "policy.loaded" for r in daemon.audit()) == 2,
            "policy.loaded after the fix",
        )
        assert daemon.stop() == 0, daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        notify.close()


def test_reloads_never_overlap_and_a_stop_abandons_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUPs during a reload ask for one more pass, not one each; every pass is
    RELOADING=1 then READY=1 with a record; a stop during a pass sends no READY=1 (it
    would follow STOPPING=1). The reads are held in their worker thread by a gate."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "strict.toml").write_text(STRICT)
    gate, entered = threading.Event(), threading.Event()

    def held_load(policies_dir: Path | None) -> dict[str, Policy]:
        entered.set()
        assert gate.wait(LIVE)
        return load_policies(policies_dir)

    monkeypatch.setattr(fse.serve.reload, "load_policies", held_load)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    replaced: list[Mapping[str, Policy]] = []
    records: list[str] = []

    def record(event: str, **fields: Any) -> None:
        records.append(event)

    async def scenario() -> None:
        reloader = PolicyReloader(
            policies, replaced.append, record, Notifier(notify.address, None), lambda: "STATUS=x"
        )
        reloader.request()
        assert await asyncio.to_thread(entered.wait, LIVE)
        entered.clear()
        reloader.request()  # two more SIGHUPs while the first pass reads: one more pass
        reloader.request()
        gate.set()
        while len(records) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time for a third pass, were there one (nothing to poll)
        gate.clear()
        reloader.request()
        assert await asyncio.to_thread(entered.wait, LIVE)
        await reloader.stop()  # the third pass is still reading
        gate.set()

    try:
        asyncio.run(scenario())
        wait_for(lambda: notify.lines().count("RELOADING=1") == 3, "three RELOADING=1")
        states = [x for x in notify.lines() if x in ("RELOADING=1", "READY=1")]
        assert states == ["RELOADING=1", "READY=1"] * 2 + ["RELOADING=1"]
        assert records == ["policy.loaded"] * 2 and len(replaced) == 2
    finally:
        notify.close()


def test_any_error_in_a_reload_is_recorded_and_ends_in_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a PolicyError: whatever fails, the old policies serve and it is recorded."""

    def broken(policies_dir: Path | None) -> dict[str, Policy]:
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(fse.serve.reload, "load_policies", broken)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    records: list[tuple[str, dict[str, Any]]] = []
    replaced: list[Mapping[str, Policy]] = []

    async def scenario() -> None:
        reloader = PolicyReloader(
            tmp_path,
            replaced.append,
            lambda event, **fields: records.append((event, fields)),
            Notifier(notify.address, None),
            lambda: "STATUS=x",
        )
        reloader.request()
        while not records:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert records == [
            ("policy.reload_rejected", {"error": "RuntimeError: something unforeseen"})
        ]
        assert not replaced
        notify.wait_for("READY=1")
    finally:
        notify.close()


# -- files others may write ---------------------------------------------------------------


@needs_root
def test_a_tokens_file_others_can_write_is_refused(launch: Launch, shared_dir: Path) -> None:
    """Finding 9: another user appended a line to a 0666 tokens file and was let in."""
    tokens = shared_dir / "tokens"
    tokens.write_text(f"alice {hashlib.sha256(b'alice-token').hexdigest()}\n")
    tokens.chmod(0o666)
    mallory = f"mallory {hashlib.sha256(b'mallory-token').hexdigest()}"
    appended = as_nobody("sh", "-c", f"echo '{mallory}' >> {tokens}")
    assert appended.returncode == 0, appended.stderr  # the attack itself works on the file
    line = refused_at_start(launch(*SMALL, "--auth-tokens", str(tokens)))
    assert line == (
        f"fse serve: error: auth.tokens_file: {tokens}: writable by its group and others "
        f"(mode 0666), who could change what the daemon trusts; accepted: writable by its "
        f"owner only (chmod go-w {tokens})"
    )


def test_a_fifo_as_the_tokens_file_is_refused(launch: Launch, tmp_path: Path) -> None:
    """Finding 9: a FIFO as the tokens file hung the start."""
    tokens = tmp_path / "tokens"
    os.mkfifo(tokens, 0o600)
    line = refused_at_start(launch(*SMALL, "--auth-tokens", str(tokens)))
    assert f"auth.tokens_file: {tokens}: a FIFO, not a regular file" in line


@needs_root
def test_a_policies_dir_others_can_write_is_refused(launch: Launch, shared_dir: Path) -> None:
    """Finding 9: anyone could add a policy (or replace one) in a 0777 directory."""
    policies = shared_dir / "policies"
    policies.mkdir()
    policies.chmod(0o777)
    planted = as_nobody("sh", "-c", f"echo 'name = \"planted\"' > {policies}/planted.toml")
    assert planted.returncode == 0, planted.stderr
    line = refused_at_start(launch(*SMALL, "--policies-dir", str(policies)))
    assert f"{policies}: writable by its group and others (mode 0777)" in line
    assert f"chmod go-w {policies}" in line


def test_a_policy_file_others_can_write_is_refused(launch: Launch, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    strict = policies / "strict.toml"
    strict.write_text(STRICT)
    strict.chmod(0o646)
    line = refused_at_start(launch(*SMALL, "--policies-dir", str(policies)))
    assert f"{strict}: writable by others (mode 0646)" in line


# -- the context -----------------------------------------------------------------------


def test_a_context_that_cannot_be_allocated_is_one_line(launch: Launch) -> None:
    """2^20 tokens for each of 32 streams asks llama.cpp for about 96 GB of KV cache: one
    line naming both keys, exit 1, and no traceback (today: a gRPC server's destructor's,
    after an error that names neither key). 32 streams, not 256: llama.cpp's bookkeeping
    for the cells is allocated before the KV buffer fails, 2 GB here but 16 GB for 256."""
    daemon = launch(*SMALL, "--ctx-per-stream", str(1 << 20), "--max-streams", "32")
    line = refused_at_start(daemon)
    assert line.startswith(
        "fse serve: error: server.ctx_per_stream x server.max_streams: 1048576 x 32 = "
        "33554432 tokens of context cannot be allocated ("
    ), line
    assert line.endswith("accepted: a smaller ctx_per_stream or max_streams")
    assert all(r["event"] != "server.started" for r in audit_records(daemon.audit_path))
