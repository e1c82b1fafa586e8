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
- `fse_audit_write_errors_total`: the audit log's health callback, each time the log
  goes from writable to failing (new streams are refused until it recovers).
- `fse_build_info{version,model_sha256}`: set once the model's sha256 is known.

The registry is a dedicated CollectorRegistry, not prometheus_client's global one: it
holds these metrics plus, by choice, the `process_*` collector (CPU seconds, resident
memory, open file descriptors, start time); no python_* platform or gc collectors.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fse import __version__
from fse.core.types import Verdict
from fse.serve.listeners import StartupError

log = structlog.get_logger("fse.serve.metrics")

# A CPU decode step of the embedded model takes about 5-50 ms; finer buckets below for
# fast machines, coarser ones above for overload and stalls.
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Codes the daemon answers with, shown at 0 from the start so that rate() works at once.
REJECTION_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNAUTHENTICATED")

Load = Callable[[], tuple[int, int]]  # (active, waiting) streams


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

    def audit_error(self) -> None:
        """The audit log could not be written (it was writable until now)."""

    def build_info(self, model_sha256: str) -> None:
        """The model's sha256 is known."""

    def watch(self, load: Load) -> None:
        """Read the scheduler's (active, waiting) at each scrape."""

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
        self._load = _LoadCollector()
        r.register(self._load)
        if process:
            ProcessCollector(registry=r)
        self._server: WSGIServer | None = None

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

    def audit_error(self) -> None:
        self._audit_errors.inc()

    def build_info(self, model_sha256: str) -> None:
        self._build.clear()
        self._build.labels(__version__, model_sha256).set(1)

    def watch(self, load: Load) -> None:
        self._load.load = load

    def serve(self, listen: str) -> str:
        """Listen on HOST:PORT (prometheus_client's own HTTP server, on a daemon
        thread); returns the address bound. Any failure is a StartupError."""
        host, port = parse_listen(listen)
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:  # in use, not ours to bind, unknown host
            reason = exc.strerror or str(exc)
            raise StartupError(f"metrics.listen {listen}: cannot listen: {reason}") from None
        bound = self._server.server_port  # the port chosen, for port 0
        return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT ([V6]:PORT for IPv6) as (host, port), or a StartupError naming the key."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host:
        host = ""  # a bare IPv6 address: ambiguous without brackets
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StartupError(
            f"metrics.listen {listen}: accepted: HOST:PORT, such as 127.0.0.1:9464 or "
            "[::1]:9464 (empty: off)"
        )
    return host, int(port)


def start_metrics(listen: str) -> MetricsSink:
    """The sink for `metrics.listen`: NO_METRICS when empty, else Metrics served there."""
    if not listen:
        return NO_METRICS
    metrics = Metrics()
    bound = metrics.serve(listen)
    log.info("metrics.listening", listen=bound, path="/metrics")
    return metrics
