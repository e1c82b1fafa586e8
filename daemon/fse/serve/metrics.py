"""Prometheus metrics on their own HTTP listener (`metrics.listen`, off by default).

The names and labels below are a contract that operators' dashboards depend on: rename
nothing. The rest of fse.serve calls one small object, `MetricsSink`; while metrics are
off that is the no-op base itself (`NO_METRICS`), so no call site needs an `if`.

Where each value comes from:

- `fse_verdicts_total{status,guard,policy}`: the scheduler, as each stream ends.
- `fse_tokens_total`, `fse_token_gap_seconds`: the scheduler's decode thread, as tokens
  are released to a stream (the gap is the time since that stream's previous token;
  tokens held back for a stop sequence and released together are 0 s apart).
- `fse_decode_step_seconds`: the decode thread, around each llama_decode call.
- `fse_streams_active`, `fse_streams_waiting`: read from the scheduler's `load` at
  scrape time (nothing on the decode path).
- `fse_rejected_total{code}`: the servicer, at every `context.abort`, and the daemon's
  auth-denied hook (UNAUTHENTICATED).
- `fse_http_requests_total{endpoint,status}`: the HTTP door (fse.serve.http), as each
  request ends: its route (`/v1/chat/completions`, ..., `other` for an unknown one) and
  its HTTP status (`499` when the client went away before an answer).
- `fse_audit_write_errors_total`: the audit log's health callback, each time the log
  goes from writable to failing (new streams are refused until it recovers).
- `fse_build_info{version,model_sha256}`: set once the model's sha256 is known.
- `fse_device_layers{device,description}`: set once the model is loaded, for every ggml
  device: the model's layers it holds (an RPC worker's device is RPC0, RPC1 ... with the
  worker's HOST:PORT as its description; docs/rpc.md).

The registry is a dedicated CollectorRegistry, not prometheus_client's global one: it
holds these metrics plus, by choice, the `process_*` collector (CPU seconds, resident
memory, open file descriptors, start time); no python_* platform or gc collectors.

The listener is prometheus_client's WSGI app behind a server of our own: theirs starts a
thread per connection and never times one out, so connections that never finish their
request held a thread and a descriptor each until the daemon had none left for gRPC. Ours
serves at most MAX_CONNECTIONS at once, closes any others as soon as it accepts them (a
503 if the socket takes it), and cuts every connection CONNECTION_SECONDS after it was
accepted, however slowly it trickles in: at most MAX_CONNECTIONS + 1 threads and
MAX_CONNECTIONS + 2 descriptors, whatever the clients do.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fse import __version__
from fse.core.types import Verdict
from fse.serve.listeners import StartupError, parse_listen

log = structlog.get_logger("fse.serve.metrics")

# A CPU decode step of the embedded model takes about 5-50 ms; finer buckets below for
# fast machines, coarser ones above for overload and stalls.
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Codes the daemon answers with, shown at 0 from the start so that rate() works at once.
REJECTION_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNAUTHENTICATED")

Load = Callable[[], tuple[int, int]]  # (active, waiting) streams

# The listener's bounds (docs/operations.md, Metrics). A scrape takes milliseconds and
# Prometheus scrapes each target once at a time; 16 leaves room for a few scrapers.
MAX_CONNECTIONS = 16
CONNECTION_SECONDS = 5.0  # from accept to close, request and response together
REFUSAL = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"\r\nfse metrics: too many connections\n"
)
REFUSALS_LOGGED_EVERY = 60.0  # seconds: a flood writes one log line a minute, not one a connection


class MetricsSink:
    """What fse.serve reports. This base does nothing: it is the sink while metrics are
    off (`NO_METRICS`); `Metrics` records."""

    def verdict(self, verdict: Verdict) -> None:
        """A stream ended (decode thread)."""

    def released(self, n: int) -> None:
        """`n` tokens were released to one stream (decode thread)."""

    def gap(self, seconds: float) -> None:
        """Time between two tokens released to the same stream (decode thread)."""

    def step(self, seconds: float) -> None:
        """One llama_decode call took `seconds` (decode thread)."""

    def rejected(self, code: str) -> None:
        """A call was aborted with gRPC status `code` (its name, e.g. INVALID_ARGUMENT)."""

    def http_request(self, endpoint: str, status: int) -> None:
        """An HTTP request to `endpoint` ended with `status`."""

    def audit_error(self) -> None:
        """The audit log could not be written (it was writable until now)."""

    def build_info(self, model_sha256: str) -> None:
        """The model's sha256 is known."""

    def watch(self, load: Load) -> None:
        """Read the scheduler's (active, waiting) at each scrape."""

    def placement(self, devices: Iterable[tuple[str, str, int]]) -> None:
        """The model is loaded: (device, description, layers) for every ggml device."""

    def close(self) -> None:
        """Stop the listener."""


NO_METRICS = MetricsSink()


class _LoadCollector:
    """fse_streams_active and fse_streams_waiting, read from the scheduler at scrape
    time: the decode thread does nothing for them."""

    def __init__(self) -> None:
        self.load: Load = lambda: (0, 0)

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.load())

    @staticmethod
    def _families(load: tuple[int, int] | None) -> list[Metric]:
        active = GaugeMetricFamily("fse_streams_active", "Streams being decoded now.")
        waiting = GaugeMetricFamily(
            "fse_streams_waiting", "Admitted streams waiting for a free sequence."
        )
        if load is not None:
            active.add_metric([], load[0])
            waiting.add_metric([], load[1])
        return [active, waiting]


class Metrics(MetricsSink):
    """The metrics in a dedicated registry; `serve` exposes them over HTTP.

    The per-token path (`released`, `gap`) and the per-step one (`step`) use
    prometheus_client's own Counter and Histogram, observed on the decode thread where
    the values are: each call takes one uncontended lock, 1-2 us measured on this
    machine, next to a 5-50 ms decode step. Plain ints read by a custom collector would
    save that microsecond but re-implement the histogram's buckets; not worth it.
    The gauges, which would need the scheduler's lock, are read at scrape time instead.
    """

    def __init__(self, *, process: bool = True) -> None:
        # No `*_created` series beside each counter and histogram: a process-wide switch,
        # and this process is the daemon (process_start_time_seconds says as much).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self._verdicts = Counter(
            "fse_verdicts_total", "Streams ended, by verdict (guard is empty unless halted).",
            ["status", "guard", "policy"], registry=r,
        )  # fmt: skip
        self._tokens = Counter("fse_tokens_total", "Tokens released to clients.", registry=r)
        self._rejected = Counter(
            "fse_rejected_total", "Calls refused or aborted, by gRPC status code.", ["code"],
            registry=r,
        )  # fmt: skip
        for code in REJECTION_CODES:
            self._rejected.labels(code)
        self._http = Counter(
            "fse_http_requests_total",
            "Requests to the OpenAI-compatible HTTP API, by endpoint and HTTP status.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self._step = Histogram(
            "fse_decode_step_seconds", "Time of one llama_decode step (every stream's batch).",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self._gap = Histogram(
            "fse_token_gap_seconds", "Time between two tokens released to the same stream.",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self._audit_errors = Counter(
            "fse_audit_write_errors_total",
            "Times the audit log went from writable to failing (streams refused meanwhile).",
            registry=r,
        )
        self._build = Gauge(
            "fse_build_info", "Always 1: the daemon's version and its model's sha256.",
            ["version", "model_sha256"], registry=r,
        )  # fmt: skip
        self._layers = Gauge(
            "fse_device_layers", "The model's layers on each device (ggml's name).",
            ["device", "description"], registry=r,
        )  # fmt: skip
        self._load = _LoadCollector()
        r.register(self._load)
        if process:
            ProcessCollector(registry=r)
        self._server: BoundedServer | None = None

    def verdict(self, verdict: Verdict) -> None:
        self._verdicts.labels(verdict.status, verdict.guard or "", verdict.policy).inc()

    def released(self, n: int) -> None:
        self._tokens.inc(n)

    def gap(self, seconds: float) -> None:
        self._gap.observe(seconds)

    def step(self, seconds: float) -> None:
        self._step.observe(seconds)

    def rejected(self, code: str) -> None:
        self._rejected.labels(code).inc()

    def http_request(self, endpoint: str, status: int) -> None:
        self._http.labels(endpoint, str(status)).inc()

    def audit_error(self) -> None:
        self._audit_errors.inc()

    def build_info(self, model_sha256: str) -> None:
        self._build.clear()
        self._build.labels(__version__, model_sha256).set(1)

    def watch(self, load: Load) -> None:
        self._load.load = load

    def placement(self, devices: Iterable[tuple[str, str, int]]) -> None:
        self._layers.clear()
        for name, description, layers in devices:
            self._layers.labels(name, description).set(layers)

    def serve(
        self,
        listen: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        seconds: float = CONNECTION_SECONDS,
    ) -> str:
        """Listen on HOST:PORT (a BoundedServer, accepting on a daemon thread); returns
        the address bound. Any failure is a StartupError."""
        listener = parse_listen(listen, "metrics.listen", unix=False)
        host, port = listener.host, listener.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family = infos[0][0]
            server = BoundedServer(
                (host, port), family, make_wsgi_app(self.registry), max_connections, seconds
            )
        except OSError as exc:  # in use, not ours to bind, unknown host
            reason = exc.strerror or str(exc)
            raise StartupError(f"metrics.listen {listen}: cannot listen: {reason}") from None
        threading.Thread(target=server.serve_forever, name="fse-metrics", daemon=True).start()
        self._server = server
        bound = server.server_port  # the port chosen, for port 0
        return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(WSGIRequestHandler):
    """One HTTP/1.0 request per connection, no access log. The socket timeout covers a
    client that stops altogether; the server's deadline covers one that trickles."""

    timeout = CONNECTION_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, but at most `max_connections` of them, each closed
    `seconds` after it was accepted.

    Any connection over the bound is accepted and closed at once, so the kernel's queue
    does not hold it either. The accepting thread enforces the deadline between accepts
    (serve_forever wakes it at least every 0.5 s): shutdown() on the socket wakes the
    worker blocked in recv or send, which then closes it. A socket is only shut down while
    registered, and a worker unregisters before it closes, under one lock: the descriptor
    number can never have been reused by then (by gRPC, say).
    """

    daemon_threads = True  # nothing to join at close: the workers end with their sockets
    # The kernel's queue of connections not yet accepted (socketserver's default is 5): they
    # cost the daemon no descriptor, and a burst of them no longer drops a scraper's SYN.
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        app: Any,
        max_connections: int,
        seconds: float,
    ) -> None:
        self.address_family = family
        self.max_connections = max_connections
        self.seconds = seconds
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}  # the connections being served
        self._refused = 0  # since the last log line
        self._refusal_logged = -math.inf

        class Handler(_Handler):
            timeout = seconds

        super().__init__(address, Handler)
        self.set_app(app)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError:  # out of descriptors, say: the socket stays readable
            time.sleep(0.1)  # so wait a little rather than spin on it
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a slot, or refuse (the caller then closes the socket)."""
        with self._lock:
            if len(self._deadlines) < self.max_connections:
                self._deadlines[request] = time.monotonic() + self.seconds
                return True
            self._refused += 1
        # A new socket's buffer is empty: this never blocks, and may fail harmlessly.
        with contextlib.suppress(OSError):
            request.send(REFUSAL, socket.MSG_DONTWAIT)
        return False

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up, sent garbage or ran out of time: its problem, and
        nothing for the daemon's log (a flood of them would be a flood of tracebacks)."""

    def service_actions(self) -> None:
        """Cut the connections past their deadline; log refusals, once a minute at most."""
        now = time.monotonic()
        with self._lock:
            for sock, deadline in self._deadlines.items():
                if deadline <= now:
                    self._deadlines[sock] = math.inf  # once is enough
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            refused = self._refused
            if refused and now - self._refusal_logged >= REFUSALS_LOGGED_EVERY:
                self._refused, self._refusal_logged = 0, now
            else:
                refused = 0
        if refused:
            log.warning(
                "metrics.connections_refused",
                refused=refused,  # since the last such line
                max_connections=self.max_connections,
            )

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            for sock in self._deadlines:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def start_metrics(listen: str) -> MetricsSink:
    """The sink for `metrics.listen`: NO_METRICS when empty, else Metrics served there."""
    if not listen:
        return NO_METRICS
    metrics = Metrics()
    bound = metrics.serve(listen)
    log.info("metrics.listening", listen=bound, path="/metrics")
    return metrics
