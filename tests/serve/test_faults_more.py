"""More faults against real daemons, each with its fail-closed outcome (issue 25):

- the disk fills up (ENOSPC, a real one: a small tmpfs in a mount namespace of the
  daemon's own) just as the audit log rotates: new streams UNAVAILABLE, NOT_SERVING,
  the lines kept in memory and written once there is room, the chain whole across the
  rotated files;
- the wall clock jumps back (and forward): deadlines run on the monotonic clock and do
  not move, the audit chain stays valid with timestamps out of order;
- the policies directory vanishes before a SIGHUP: the reload is refused and recorded,
  the last good set keeps serving;
- the unix socket's directory is removed while serving: the stream in flight finishes,
  new connections fail, the daemon reports NOT_SERVING, drains and exits 1 so that its
  supervisor starts it afresh.

The audit log failing to be written at all (a file size limit) is
tests/serve/test_audit_daemon.py's.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from fse.serve.audit import chain_files, verify
from fse_client.v1 import fse_pb2, fse_pb2_grpc
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
    wait_serving,
)
from support.ports import free_port
from support.streams import (
    Code,
    LiveStream,
    Outcome,
    assert_well_formed,
    generate,
    health_status,
    start,
)
from support.waits import LIVE, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def completes(channel: grpc.Channel, **fields: object) -> fse_pb2.Verdict:
    verdict = assert_well_formed(generate(channel, [start(max_tokens=4, **fields)]), 4)  # type: ignore[arg-type]
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    return verdict


# -- ENOSPC while the audit log rotates ------------------------------------------------


def _can_unshare() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its file system has no room left (ENOSPC)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler


@pytest.mark.skipif(not _can_unshare(), reason="needs unprivileged user and mount namespaces")
def test_disk_full_during_audit_rotation_fails_closed_and_loses_nothing(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A 128 KiB tmpfs holds the audit log (rotated every 4096 bytes); once it is full,
    the active file still takes lines within the page it already holds, and the first
    write that needs a new page is the new file a rotation opens: ENOSPC there."""
    folder = tmp_path / "audit"
    folder.mkdir(mode=0o700)
    mount = 'mount -t tmpfs -o size=128k,mode=0700 tmpfs "$0" && exec "$@"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(folder)]
    daemon = launch(
        "--audit-log", str(folder / "audit.jsonl"),
        "--audit-rotate-bytes", "4096",
        "--audit-fsync", "always",
        command=[*command, *FSE],
    )  # fmt: skip
    wait_serving(daemon.addr, daemon.process)
    # The daemon's view of the folder: its tmpfs, reached through its own root.
    inside = Path(f"/proc/{daemon.process.pid}/root") / str(folder).lstrip("/")
    assert (inside / "audit.jsonl").exists() and not (folder / "audit.jsonl").exists()
    with daemon.channel() as channel:
        completes(channel, request_id="before")
        filler = fill(inside)
        outcomes: list[Outcome] = []
        for i in range(40):  # a stream writes two lines: 4096 bytes hold a few streams
            outcome = generate(channel, [start(max_tokens=2, request_id=f"full-{i}")])
            outcomes.append(outcome)
            if outcome.code != Code.OK:
                break
        refused = outcomes[-1]
        assert refused.code == Code.UNAVAILABLE, (refused.code, refused.details)
        assert refused.details.startswith("audit log: cannot write ")
        assert "No space left on device" in refused.details
        assert refused.tokens == [] and refused.verdicts == []
        for outcome in outcomes[:-1]:  # the streams before it were audited and completed
            assert assert_well_formed(outcome, 2).status == fse_pb2.STATUS_COMPLETED
        wait_for(lambda: health_status(channel) == NOT_SERVING, what="NOT_SERVING on ENOSPC")
        again = generate(channel, [start(max_tokens=2)])
        assert again.code == Code.UNAVAILABLE and again.messages == []
        (failed, *_) = log_events(daemon, "audit.write_failed")
        assert "No space left on device" in failed["error"]
        # It met ENOSPC in the rotation: the full file is NAME.1 already, the new NAME
        # could not take the rotation's first line.
        assert (inside / "audit.jsonl.1").exists()

        filler.unlink()  # room again: the kept lines are written, in order
        wait_for(lambda: health_status(channel) == SERVING, what="SERVING once there is room")
        completes(channel, request_id="after")
        # The chain, read while the daemon (and its tmpfs) lives: whole across the rotation.
        files = chain_files([inside])
        assert len(files) >= 2, files  # it did rotate
        result = verify(files)
        assert result.ok, result.problem
        records = [r for f in files for r in audit_records(f)]
    started = {r["stream"]: r.get("request_id") for r in records if r["event"] == "stream.started"}
    verdicts = {r["stream"]: r["status"] for r in records if r["event"] == "stream.verdict"}
    assert set(verdicts) == set(started)  # every stream has exactly its verdict: none lost
    assert len(verdicts) == len([r for r in records if r["event"] == "stream.verdict"])
    ids = list(started.values())
    audited = [f"full-{i}" for i in range(len(outcomes) - 1)]
    refused_id = f"full-{len(outcomes) - 1}"
    # The refused stream was refused before anything was streamed: either no line was
    # written for it (refused while the log was failing), or its start was the line that
    # met ENOSPC, kept and written after, with the verdict `cancelled`.
    assert ids in (["before", *audited, "after"], ["before", *audited, refused_id, "after"])
    for stream, request_id in started.items():
        expected = "cancelled" if request_id == refused_id else "completed"
        assert verdicts[stream] == expected, (request_id, verdicts[stream])
    # The line that met ENOSPC was kept, then written after the rotation's opening line.
    events = [r["event"] for r in records]
    assert events.count("audit.rotated") >= 1
    assert daemon.stop() == 0


# -- the wall clock jumps ------------------------------------------------------------

# `fse` whose audit clock SIGUSR1 sets a day back and SIGUSR2 two days forward, as
# settimeofday() or an NTP step would. The daemon reads the wall clock in three places:
# the audit log's timestamps (shifted here), the HTTP door's `created` (not used here),
# and gRPC's time_remaining() at the start of a stream, turned at once into a budget on
# the monotonic clock (fse.serve.wire) that no later step moves. That last one is left
# alone: grpc's Python layer computes it from time.time() against a deadline its C core
# converted with the real clock, so faking time.time() alone would make a gap between
# the two that a real step (which moves both) does not. libfaketime would move both; it
# is not installed here, and this needs nothing beyond Python.
FAKE_CLOCK = """\
import datetime, signal, sys

import fse.serve.audit.format as audit_format

offset = [0.0]


class Shifted(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz) + datetime.timedelta(seconds=offset[0])


audit_format.datetime = Shifted


def shift(seconds):
    def handler(signum, frame):
        offset[0] += seconds
    return handler


signal.signal(signal.SIGUSR1, shift(-86400.0))
signal.signal(signal.SIGUSR2, shift(2 * 86400.0))
from fse.cli.main import main

sys.exit(main())
"""


def test_wall_clock_jumps_move_no_deadline_and_keep_the_chain_valid(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    wrapper = tmp_path / "fake_clock.py"
    wrapper.write_text(textwrap.dedent(FAKE_CLOCK))
    daemon = launch(command=[sys.executable, str(wrapper)])
    wait_serving(daemon.addr, daemon.process)
    with daemon.channel() as channel:
        completes(channel, request_id="before")
        for sig, label in ((signal.SIGUSR1, "back"), (signal.SIGUSR2, "forward")):
            daemon.process.send_signal(sig)
            time.sleep(0.3)  # the handler runs on the daemon's main thread
            # A deadline of 300 ms still halts after about 300 ms: not a day later, and
            # not at once (a deadline on the wall clock would do one or the other).
            began = time.monotonic()
            outcome = generate(
                channel, [start(LONG_PROMPT, 200, timeout_ms=300, request_id=f"deadline-{label}")]
            )
            took = time.monotonic() - began
            verdict = assert_well_formed(outcome, 200)
            assert verdict.status == fse_pb2.STATUS_HALTED and verdict.guard == "deadline"
            assert 0.3 <= verdict.value < 30 and took < 60, (verdict.value, took)
            # A generous deadline is not cut short either.
            completes(channel, request_id=f"after-{label}", timeout_ms=60_000)
            assert health_status(channel) == SERVING
    assert daemon.stop() == 0
    stamps = {
        r.get("request_id"): r["ts"]
        for r in audit_records(daemon.audit_path)
        if r["event"] == "stream.started"
    }
    # The timestamps went back a day, then forward two: the jumps reached the audit log.
    assert stamps["after-back"] < stamps["before"] < stamps["after-forward"]
    assert verify(daemon.audit_path).ok  # the chain is about order of lines, not of clocks
    checked = run_fse("audit", "verify", str(daemon.audit_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the policies directory vanishes before a reload ------------------------------------


def test_policies_dir_removed_before_reload_keeps_the_last_good_set(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "strict.toml").write_text(
        'name = "strict"\n[guards.perplexity]\nthreshold = 50.0\n'
    )
    daemon = start_daemon(*THREADS, "--policies-dir", str(policies))
    (loaded,) = audit_events(daemon, "policy.loaded")
    shutil.rmtree(policies)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(audit_events(daemon, "policy.reload_rejected")), what="reload refused")
    (rejected,) = audit_events(daemon, "policy.reload_rejected")
    assert str(policies) in rejected["error"] and "No such file or directory" in rejected["error"]
    (logged,) = log_events(daemon, "policy.reload_rejected")
    assert logged["error"] == rejected["error"]
    with daemon.channel() as channel:
        info = fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
        served = {p.name: p.sha256 for p in info.policies}
        assert served == loaded["policies"]  # the very set loaded at start
        assert completes(channel, policy="strict").policy == "strict"
        assert health_status(channel) == SERVING
    assert len(audit_events(daemon, "policy.loaded")) == 1
    assert daemon.stop() == 0


# -- the unix socket's directory is removed while serving -------------------------------


def test_socket_dir_removed_drains_and_exits_1(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Fail-closed outcome chosen: the daemon notices (within a second) that its socket
    is gone, logs `listen.socket_lost` and records `server.socket_lost`, reports
    NOT_SERVING on its other listeners, lets the stream in flight finish (the drain of
    SIGTERM) and exits 1, so that systemd's Restart=on-failure (or Kubernetes) starts it
    afresh with a socket where it is configured. It does not re-create the directory."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    sock = folder / "fse.sock"
    tcp = f"127.0.0.1:{free_port()}"
    # A drain long enough for the stream in flight to finish on a busy machine.
    daemon = launch(
        "--listen", f"unix:{sock}", "--listen", tcp, "--drain-seconds", "120", listen=False
    )  # fmt: skip
    wait_serving(tcp, daemon.process)
    with grpc.insecure_channel(tcp) as watcher, grpc.insecure_channel(f"unix:{sock}") as local:
        with LiveStream(local, start(LONG_PROMPT, 16, request_id="in-flight")) as live:
            live.read_tokens(2)
            shutil.rmtree(folder)
            # New connections to the socket fail at once: there is no socket to reach.
            own_pool = [("grpc.use_local_subchannel_pool", 1)]  # not the live one's connection
            with grpc.insecure_channel(f"unix:{sock}", options=own_pool) as fresh:
                refused = generate(fresh, [start(max_tokens=2)], timeout=5)
            assert refused.code == Code.UNAVAILABLE and refused.messages == []
            wait_for(
                lambda: _status(watcher) != SERVING, what="NOT_SERVING once the socket is gone"
            )
            outcome = live.finish()  # the stream in flight ends with its verdict
        verdict = assert_well_formed(outcome, 16)
        assert verdict.status == fse_pb2.STATUS_COMPLETED, verdict
    assert daemon.process.wait(LIVE) == 1
    assert not folder.exists()  # not re-created
    (lost,) = log_events(daemon, "listen.socket_lost")
    assert lost["path"] == str(sock)
    (recorded,) = audit_events(daemon, "server.socket_lost")
    assert recorded["path"] == str(sock)
    verdicts = [r for r in audit_events(daemon, "stream.verdict") if r["status"] == "completed"]
    assert "in-flight" in {r.get("request_id") for r in verdicts}
    assert verify(daemon.audit_path).ok
    assert log_events(daemon, "audit.head")


def _status(channel: grpc.Channel) -> int | None:
    try:
        return health_status(channel)
    except grpc.RpcError:
        return None  # stopped listening: not SERVING either


def test_an_intact_socket_is_not_taken_for_lost(start_daemon: Callable[..., Daemon]) -> None:
    """The watch does not fire on a socket that is there: a daemon serves on after a few
    checks, and stops with exit 0 on SIGTERM."""
    daemon = start_daemon(*THREADS)
    time.sleep(2.5)
    with daemon.channel() as channel:
        completes(channel, prompt=PROMPT)
    assert not log_events(daemon, "listen.socket_lost")
    assert daemon.stop() == 0
    assert not Path(daemon.addr.removeprefix("unix:")).exists()  # its own socket, removed


def test_a_socket_replaced_by_another_file_is_lost_and_left_alone(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Someone else's file at the socket's path: the daemon stops (exit 1) and does not
    delete that file as it goes."""
    sock = tmp_path / "fse.sock"
    daemon = launch("--listen", f"unix:{sock}", listen=False)
    wait_serving(f"unix:{sock}", daemon.process)
    sock.unlink()
    sock.write_text("not the daemon's\n")
    assert daemon.process.wait(LIVE) == 1
    assert sock.read_text() == "not the daemon's\n"
    assert os.path.isfile(sock)
