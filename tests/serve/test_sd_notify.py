"""The sd_notify protocol as systemd would see it, with real daemon processes (no
mocks): READY, STATUS, watchdog pings, RELOADING and STOPPING, and the drain on SIGTERM.

No systemd runs as PID 1 here, so these tests play systemd's part (support.notify): a
datagram socket bound on a temporary NOTIFY_SOCKET (a path, or an abstract "@name"), and
WATCHDOG_USEC set in the daemon's environment.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from fse_client import Client, Sampling, Status, Verdict
from support.daemons import (
    LONG_PROMPT,
    Daemon,
    audit_events,
)
from support.notify import WATCHDOG_USEC, NotifySocket, notify_env
from support.streams import client_verdict
from support.waits import LIVE, wait_for

SMALL = ("--max-streams", "2", "--ctx-per-stream", "512")


# -- sd_notify -----------------------------------------------------------------------


def test_ready_status_watchdog_reload_and_stop(
    launch: Callable[..., Daemon], notify_path: NotifySocket, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    strict = policies / "strict.toml"
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = 50.0\n')
    daemon = launch(*SMALL, "--policies-dir", str(policies), env=notify_env(notify_path))
    ready = notify_path.wait_for("READY=1", process=daemon.process)
    # READY=1 means served: the socket is bound and the model loaded, so a stream works
    # at once, with no health polling in between.
    assert client_verdict(daemon.addr).status == Status.COMPLETED, daemon.log()
    assert any(x.startswith("STATUS=") for x in notify_path.received[ready][1])
    # Before it, STATUS= said what the daemon was doing (systemctl status while loading).
    assert any(x.startswith("STATUS=loading") for _, lines in notify_path.received[:ready]
               for x in lines)  # fmt: skip
    # Watchdog pings about every WATCHDOG_USEC/2, and never as late as WATCHDOG_USEC.
    wait_for(lambda: len(notify_path.pings()) >= 6, "six watchdog pings", LIVE)
    gaps = [b - a for a, b in zip(notify_path.pings(), notify_path.pings()[1:], strict=False)]
    assert 0.7 <= statistics.median(gaps) <= 1.4, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    # STATUS= keeps coming while serving (systemctl status shows the load).
    notify_path.wait_for("STATUS=", after=ready + 1, timeout=15)

    # SIGHUP with a good policy dir: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = 60.0\n')
    mark = len(notify_path.received)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify_path.wait_for("RELOADING=1", after=mark)
    lines = notify_path.received[reloading][1]
    (usec,) = [int(x.split("=", 1)[1]) for x in lines if x.startswith("MONOTONIC_USEC=")]
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify_path.wait_for("READY=1", after=reloading + 1) > reloading
    wait_for(lambda: len(audit_events(daemon, "policy.loaded")) == 2, "policy reloaded")

    # SIGHUP with a broken policy: the same pair, the reload rejected, the old set serving.
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = -1\n')
    mark = len(notify_path.received)
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify_path.wait_for("RELOADING=1", after=mark)
    notify_path.wait_for("READY=1", after=reloading + 1)
    wait_for(lambda: bool(audit_events(daemon, "policy.reload_rejected")), "reload rejected")
    (rejected,) = audit_events(daemon, "policy.reload_rejected")
    assert "threshold" in rejected["error"]
    verdict = client_verdict(daemon.addr, policy="strict")
    assert verdict.status == Status.COMPLETED and verdict.policy == "strict"
    loaded = audit_events(daemon, "policy.loaded")[-1]["policies"]["strict"]
    assert verdict.policy_sha256 == loaded

    # SIGTERM: STOPPING=1, then a clean exit.
    mark = len(notify_path.received)
    assert daemon.stop() == 0, daemon.log()
    stopping = notify_path.wait_for("STOPPING=1", after=mark, timeout=5)
    assert "READY=1" not in notify_path.lines(stopping)


def test_watchdog_pings_stop_when_decode_hangs(
    launch: Callable[..., Daemon], notify_abstract: NotifySocket
) -> None:
    """An abstract @name socket; a decode step that never returns silences the watchdog."""
    daemon = launch(*SMALL, "--allow-debug-faults", env=notify_env(notify_abstract))
    notify_abstract.wait_for("READY=1", process=daemon.process)
    wait_for(lambda: len(notify_abstract.pings()) >= 3, "watchdog pings")
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT,
            max_tokens=64,
            sampling=Sampling(temperature=0.0),
            metadata=[("fse-debug-fault", "hang@3")],
        )
        for tokens, event in enumerate(gen, 1):
            assert not isinstance(event, Verdict)
            if tokens == 3:
                break
        hung_at = time.monotonic()
        # The step has been stuck longer than WATCHDOG_USEC: no ping for that long, so
        # systemd would have killed and restarted the daemon.
        time.sleep(3 * WATCHDOG_USEC / 1e6)
        last = notify_abstract.pings()[-1]
        assert last < hung_at + WATCHDOG_USEC / 1e6 + 0.5, last - hung_at
        assert time.monotonic() - last > 1.5 * WATCHDOG_USEC / 1e6
        assert daemon.process.poll() is None  # only the watchdog notices
        gen.close()
    assert "watchdog.decode_stuck" in daemon.log()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def test_sigterm_drains_the_stream_in_flight(
    launch: Callable[..., Daemon], notify_path: NotifySocket
) -> None:
    daemon = launch(*SMALL, "--drain-seconds", "120", env=notify_env(notify_path, None))
    notify_path.wait_for("READY=1", process=daemon.process)
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT, max_tokens=48, sampling=Sampling(temperature=0.0), request_id="drained"
        )
        it = iter(gen)
        first = [next(it) for _ in range(3)]
        mark = len(notify_path.received)
        daemon.process.send_signal(signal.SIGTERM)
        stopping = notify_path.wait_for("STOPPING=1", after=mark)
        assert any("draining" in x for x in notify_path.received[stopping][1])
        # A reload asked for while draining changes nothing and never says READY=1 again.
        daemon.process.send_signal(signal.SIGHUP)
        rest = list(it)
    assert len(first) == 3
    verdict = gen.verdict
    assert verdict is not None and verdict.status == Status.COMPLETED, verdict
    assert verdict.tokens == 48
    assert daemon.process.wait(LIVE) == 0, daemon.log()
    assert rest and isinstance(rest[-1], Verdict)
    assert "READY=1" not in notify_path.lines(stopping)
    (logged,) = [e for e in audit_events(daemon, "stream.verdict") if e["request_id"] == "drained"]
    assert logged["status"] == "completed"


def test_second_sigterm_cuts_a_long_drain_short(
    launch: Callable[..., Daemon], notify_path: NotifySocket
) -> None:
    daemon = launch(*SMALL, "--drain-seconds", "600", env=notify_env(notify_path, None))
    notify_path.wait_for("READY=1", process=daemon.process)
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT, max_tokens=400, sampling=Sampling(temperature=0.0), request_id="cut"
        )
        it = iter(gen)
        for _ in range(3):
            next(it)
        daemon.process.send_signal(signal.SIGTERM)
        notify_path.wait_for("STOPPING=1")
        for _ in range(3):  # still streaming while it drains
            assert not isinstance(next(it), Verdict)
        cut_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(StopIteration):
            while True:
                next(it)
    verdict = gen.verdict
    assert verdict is not None, daemon.log()
    assert verdict.status == Status.HALTED and verdict.guard == "shutdown", verdict
    assert verdict.tokens < 400
    assert daemon.process.wait(LIVE) == 0, daemon.log()
    assert time.monotonic() - cut_at < LIVE
    assert "server.drain_cut_short" in daemon.log()
    (logged,) = [e for e in audit_events(daemon, "stream.verdict") if e["request_id"] == "cut"]
    assert (logged["status"], logged["guard"]) == ("halted", "shutdown")
