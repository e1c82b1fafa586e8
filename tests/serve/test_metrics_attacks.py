"""The metrics listener under attack (issue 18, finding 10), against real daemons: HTTP
requests that never end, or end one byte at a time.

The listener serves at most MAX_CONNECTIONS connections at once (the rest are closed as
soon as they are accepted) and closes each one CONNECTION_SECONDS after it was accepted,
whatever it is doing: it can never take the threads or descriptors the gRPC service
needs. The two numbers are the ones docs/operations.md promises.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable

import grpc
import pytest
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.daemons import Daemon
from support.metrics import ARGS, fetch
from support.ports import free_port
from support.procs import descriptors, threads
from support.streams import start
from support.waits import LIVE, eventually

MAX_CONNECTIONS = 16
CONNECTION_SECONDS = 5.0
# Slack over the bounds: the daemon may start a thread or open a file of its own meanwhile.
SLACK = 4
# Time for the server to notice a deadline (it looks twice a second) and for the test to
# read the close: generous, this is no speed assertion.
GRACE = 5.0
FLOOD = 300
# A request line and one header, without the blank line that would end the request.
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class Peak:
    """The most threads and descriptors seen in the daemon so far."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads = 0
        self.descriptors = 0

    def sample(self) -> None:
        self.threads = max(self.threads, threads(self.pid))
        self.descriptors = max(self.descriptors, descriptors(self.pid))


def flood(port: int, n: int, peak: Peak) -> list[socket.socket]:
    """Open `n` connections that each send half a request and then wait; sampling the
    daemon as they go. A connection the server refuses at once is closed here too."""
    held = []
    # A server out of descriptors accepts nothing: the rest of the flood would time out.
    stop = time.monotonic() + 60
    for i in range(n):
        if time.monotonic() > stop:
            break
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(HALF_REQUEST)
        except OSError:
            s.close()
            continue
        held.append(s)
        if i % 10 == 0:
            peak.sample()
    # The server accepts them behind our back: sample for a while (a deliberate
    # second, not a wait for a condition: the peak is whatever shows meanwhile).
    for _ in range(20):
        peak.sample()
        time.sleep(0.05)
    return held


def closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Whether the server closes `s` (end of file or reset) before `deadline`; whatever
    it sent before (a 503, say) is read and dropped."""
    try:
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0))  # 0: look without waiting
            if not s.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def generate(daemon: Daemon) -> fse_pb2.Verdict:
    with daemon.channel() as channel:
        call = fse_pb2_grpc.GuardStub(channel).Generate(iter([start("Hello", 4)]), timeout=LIVE)
        messages = list(call)
    verdict: fse_pb2.Verdict = messages[-1].verdict
    return verdict


@pytest.fixture()
def metrics_daemon(start_daemon: Callable[..., Daemon]) -> tuple[Daemon, int]:
    port = free_port()
    daemon = start_daemon(*ARGS, "--metrics-listen", f"127.0.0.1:{port}")
    assert "fse_tokens_total" in fetch(port)  # the listener has served once
    return daemon, port


def test_half_sent_requests_hold_bounded_threads_and_descriptors(
    metrics_daemon: tuple[Daemon, int],
) -> None:
    daemon, port = metrics_daemon
    pid = daemon.process.pid
    threads_before, descriptors_before = threads(pid), descriptors(pid)
    peak = Peak(pid)
    held = flood(port, FLOOD, peak)
    flooded = time.monotonic()  # the last connection was made by now
    try:
        assert peak.threads <= threads_before + MAX_CONNECTIONS + SLACK, peak.threads
        assert peak.descriptors <= descriptors_before + MAX_CONNECTIONS + SLACK, peak.descriptors
        # Every connection is closed by the server, at the latest at its deadline.
        deadline = flooded + CONNECTION_SECONDS + GRACE
        still_open = [s for s in held if not closed_by_server(s, deadline)]
        assert not still_open, f"{len(still_open)} of {len(held)} connections still open"
    finally:
        for s in held:
            s.close()
    assert eventually(lambda: threads(pid) <= threads_before + 1, GRACE), threads(pid)
    assert eventually(lambda: descriptors(pid) <= descriptors_before + 1, GRACE)
    assert "fse_tokens_total" in fetch(port)  # and it serves a normal scrape again


def test_trickled_request_is_cut_at_the_deadline(metrics_daemon: tuple[Daemon, int]) -> None:
    """One byte every 0.2 s never leaves the socket idle for long: only a deadline on
    the whole connection ends it."""
    _, port = metrics_daemon
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        opened = time.monotonic()
        cut = False
        while time.monotonic() < opened + CONNECTION_SECONDS + GRACE:
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if closed_by_server(s, time.monotonic() + 0.2):
                cut = True
                break
    assert cut, "the server still reads a request trickled for longer than its deadline"
    assert "fse_tokens_total" in fetch(port)


def test_held_metrics_connections_leave_grpc_its_descriptors(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With the daemon's descriptor limit at 150, 300 held metrics connections used to
    take every descriptor: a normal Generate then got DEADLINE_EXCEEDED."""
    port = free_port()
    daemon = start_daemon(*ARGS, "--metrics-listen", f"127.0.0.1:{port}")
    pid = daemon.process.pid
    assert generate(daemon).status == fse_pb2.STATUS_COMPLETED
    assert "fse_tokens_total" in fetch(port)
    limit = 150
    assert descriptors(pid) + MAX_CONNECTIONS + 3 * 8 < limit  # room left for gRPC
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    held = flood(port, FLOOD, Peak(pid))
    try:
        verdict = generate(daemon)
    except grpc.RpcError as exc:
        pytest.fail(f"Generate failed while metrics connections were held: {exc.code()}")
    finally:
        for s in held:
            s.close()
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.tokens == 4
