"""Prometheus metrics (`--metrics-listen`): real `fse serve` processes with the real
embedded model, scraped over real HTTP (no mocks); and fse.serve.metrics on its own.

The names and labels are a contract that dashboards depend on: the unit tests pin
them exactly.
"""

from __future__ import annotations

import hashlib
import math
import resource
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from fse import __version__
from fse.core.gguf import default_model_path, file_sha256
from fse.core.types import COMPLETED, HALTED, LOOP, Verdict
from fse.serve.audit import AuditLog
from fse.serve.listeners import StartupError, parse_listen
from fse.serve.metrics import NO_METRICS, REJECTION_CODES, Metrics
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support.daemons import LONG_PROMPT, Daemon, run_fse
from support.metrics import ARGS, Samples, fetch, parse, scrape, value
from support.ports import free_port
from support.procs import tcp_listening_ports
from support.streams import start
from support.waits import LIVE

CONTRACT = {
    "fse_verdicts_total": ("counter", ("guard", "policy", "status")),
    "fse_tokens_total": ("counter", ()),
    "fse_streams_active": ("gauge", ()),
    "fse_streams_waiting": ("gauge", ()),
    "fse_rejected_total": ("counter", ("code",)),
    "fse_decode_step_seconds": ("histogram", ()),
    "fse_token_gap_seconds": ("histogram", ()),
    "fse_audit_write_errors_total": ("counter", ()),
    "fse_http_requests_total": ("counter", ("endpoint", "status")),
    "fse_build_info": ("gauge", ("model_sha256", "version")),
    "fse_device_layers": ("gauge", ("description", "device")),
}


# -- a daemon with metrics on -----------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Callable[..., Daemon], metrics_port: int) -> Daemon:
    return start_module_daemon(*ARGS, "--metrics-listen", f"127.0.0.1:{metrics_port}")


@pytest.fixture()
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with daemon.channel() as ch:
        yield ch


def test_scrape_moves_with_one_stream(
    daemon: Daemon, channel: grpc.Channel, metrics_port: int
) -> None:
    before = scrape(metrics_port)
    assert value(before, "fse_streams_active") == 0
    call = fse_pb2_grpc.GuardStub(channel).Generate(iter([start(LONG_PROMPT, 48)]), timeout=LIVE)
    messages = []
    during: Samples = {}
    for msg in call:
        messages.append(msg)
        if msg.WhichOneof("kind") == "token" and not during:
            during = scrape(metrics_port)  # the stream is running: the gauge says so
    after = scrape(metrics_port)

    assert value(during, "fse_streams_active") == 1
    assert value(during, "fse_streams_waiting") == 0
    tokens = [m.token for m in messages if m.WhichOneof("kind") == "token"]
    verdict = messages[-1].verdict
    assert verdict.status == fse_pb2.STATUS_COMPLETED and verdict.tokens == len(tokens) == 48
    labels = {"status": "completed", "guard": "", "policy": "default"}

    def delta(name: str, **extra: str) -> float:
        return value(after, name, **extra) - value(before, name, **extra)

    assert delta("fse_verdicts_total", **labels) == 1
    assert delta("fse_tokens_total") == len(tokens)
    # At least one llama_decode per token; a gap between each two tokens of the stream.
    assert delta("fse_decode_step_seconds_count") >= len(tokens)
    assert delta("fse_decode_step_seconds_sum") > 0
    assert delta("fse_token_gap_seconds_count") == len(tokens) - 1
    assert delta("fse_token_gap_seconds_sum") > 0
    for hist in ("fse_decode_step_seconds", "fse_token_gap_seconds"):
        assert value(after, f"{hist}_bucket", le="+Inf") == value(after, f"{hist}_count")
    assert value(after, "fse_streams_active") == 0
    assert value(after, "fse_streams_waiting") == 0
    assert delta("fse_audit_write_errors_total") == 0
    assert value(after, "process_resident_memory_bytes") > 0  # kept by choice
    assert tcp_listening_ports(daemon.process.pid) == {metrics_port}


def test_rejection_counted_by_code(channel: grpc.Channel, metrics_port: int) -> None:
    before = scrape(metrics_port)
    call = fse_pb2_grpc.GuardStub(channel).Generate(iter([start("Hello", 1_000_000)]), timeout=LIVE)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(metrics_port)
    for code in REJECTION_CODES:
        moved = value(after, "fse_rejected_total", code=code) - value(
            before, "fse_rejected_total", code=code
        )
        assert moved == (1 if code == "INVALID_ARGUMENT" else 0), code
    assert value(after, "fse_tokens_total") == value(before, "fse_tokens_total")


def test_build_info_has_version_and_model_sha256(daemon: Daemon, metrics_port: int) -> None:
    expected = file_sha256(default_model_path())
    text = fetch(metrics_port)
    for _ in range(int(LIVE / 0.1)):  # the daemon hashes the model in the background
        if "fse_build_info{" in text:
            break
        text = fetch(metrics_port)
    samples = parse(text)
    info = [(labels, v) for (name, labels), v in samples.items() if name == "fse_build_info"]
    assert info == [((("model_sha256", expected), ("version", __version__)), 1.0)]


def test_denied_callers_and_audit_failures_counted(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """UNAUTHENTICATED from the auth interceptor; an audit log that cannot be written
    (a real file size limit on the running daemon, as in test_daemon) counts a write
    error, and the streams it refuses count as UNAVAILABLE."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops {hashlib.sha256(b'secret').hexdigest()}\n")
    audit = tmp_path / "audit.jsonl"
    history = AuditLog(audit)  # so that only the audit log, not stderr, hits the limit
    for i in range(2000):
        history.write("stream.verdict", stream=i, status="completed")
    history.close()
    port = free_port()
    daemon = start_daemon(
        *ARGS, "--auth-tokens", str(tokens), "--audit-log", str(audit),
        "--metrics-listen", f"127.0.0.1:{port}", tcp=True,
    )  # fmt: skip
    before = scrape(port)
    with grpc.insecure_channel(daemon.addrs[1]) as tcp:  # TCP needs a token, unix does not
        call = fse_pb2_grpc.GuardStub(tcp).Generate(iter([start("Hi", 1)]), timeout=LIVE)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    denied = scrape(port)
    assert value(denied, "fse_rejected_total", code="UNAUTHENTICATED") == 1
    assert value(denied, "fse_audit_write_errors_total") == 0

    size = audit.stat().st_size
    assert size > daemon.log_path.stat().st_size + (64 << 10)
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    with daemon.channel() as channel:
        for _ in range(2):
            call = fse_pb2_grpc.GuardStub(channel).Generate(iter([start("Hi", 1)]), timeout=LIVE)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    failing = scrape(port)
    # One failure: the log went from writable to failing once, however many refusals.
    assert value(failing, "fse_audit_write_errors_total") == 1
    unavailable = value(failing, "fse_rejected_total", code="UNAVAILABLE")
    assert unavailable - value(before, "fse_rejected_total", code="UNAVAILABLE") == 2
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, unlimited)


# -- off by default, and start-up errors ------------------------------------------


def test_metrics_off_by_default(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(*ARGS)
    assert tcp_listening_ports(daemon.process.pid) == set()  # nothing listens on TCP
    assert "metrics.listening" not in daemon.log()


def serve_args(tmp_path: Path, listen: str) -> list[str]:
    return [
        "serve",
        "--listen",
        f"unix:{tmp_path / 'fse.sock'}",
        "--audit-log",
        str(tmp_path / "audit.jsonl"),
        *ARGS,
        "--metrics-listen",
        listen,
    ]


@pytest.mark.daemon
@pytest.mark.parametrize("listen", ["nowhere", "127.0.0.1", "127.0.0.1:99999", ":9464"])
def test_bad_metrics_address_is_a_start_up_error(tmp_path: Path, listen: str) -> None:
    result = run_fse(*serve_args(tmp_path, listen))
    assert result.returncode == 1, result.stderr
    assert f"fse serve: error: metrics.listen {listen}: accepted: HOST:PORT" in result.stderr
    assert not (tmp_path / "fse.sock").exists()  # refused before serving anything


@pytest.mark.daemon
def test_metrics_port_in_use_is_a_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_fse(*serve_args(tmp_path, f"127.0.0.1:{port}"))
    assert result.returncode == 1, result.stderr
    assert (
        f"fse serve: error: metrics.listen 127.0.0.1:{port}: cannot listen: Address already in use"
    ) in result.stderr
    assert not (tmp_path / "fse.sock").exists()


# -- fse.serve.metrics on its own (fake values) -----------------------------------


def test_names_types_and_labels_are_the_contract() -> None:
    m = Metrics()
    m.verdict(Verdict(COMPLETED, 3, "abc", "default", "00"))
    m.build_info("ab" * 32)
    m.http_request("/v1/completions", 200)
    families = {
        f.name: f
        for f in text_string_to_metric_families(fetch_text(m))
        if f.name.startswith("fse_")
    }
    # The parser names counters without `_total`; the samples carry it.
    names = {(n + "_total" if f.type == "counter" else n): f for n, f in families.items()}
    assert set(names) == set(CONTRACT)
    for name, (kind, labels) in CONTRACT.items():
        family = names[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert tuple(sorted(set(sample.labels) - {"le"})) == labels, name
    assert not any(n.startswith(("python_", "fse_")) and "_created" in n for n in families)


def fetch_text(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_recorded_values() -> None:
    m = Metrics(process=False)
    m.verdict(Verdict(COMPLETED, 3, "abc", "default", "00"))
    m.verdict(Verdict(HALTED, 1, "a", "pro", "11", guard=LOOP, token_index=1))
    m.verdict(Verdict(HALTED, 1, "a", "pro", "11", guard=LOOP, token_index=1))
    m.released(3)
    m.released(1)
    for seconds in (0.004, 0.012, 0.04):
        m.step(seconds)
    m.gap(0.012)
    m.gap(0.0)
    m.rejected("RESOURCE_EXHAUSTED")
    m.rejected("INTERNAL")
    m.audit_error()
    m.watch(lambda: (2, 5))
    m.build_info("cd" * 32)
    s = parse(fetch_text(m))
    labels = {"status": "completed", "guard": "", "policy": "default"}
    assert value(s, "fse_verdicts_total", **labels) == 1
    assert value(s, "fse_verdicts_total", status="halted", guard="loop", policy="pro") == 2
    assert value(s, "fse_tokens_total") == 4
    assert value(s, "fse_decode_step_seconds_count") == 3
    assert math.isclose(value(s, "fse_decode_step_seconds_sum"), 0.056)
    assert value(s, "fse_decode_step_seconds_bucket", le="0.005") == 1
    assert value(s, "fse_decode_step_seconds_bucket", le="0.015") == 2
    assert value(s, "fse_decode_step_seconds_bucket", le="0.05") == 3
    assert value(s, "fse_token_gap_seconds_count") == 2
    assert value(s, "fse_token_gap_seconds_bucket", le="0.001") == 1
    assert value(s, "fse_rejected_total", code="RESOURCE_EXHAUSTED") == 1
    assert value(s, "fse_rejected_total", code="INTERNAL") == 1
    assert ("fse_rejected_total", (("code", "UNAUTHENTICATED"),)) in s  # there at 0
    assert value(s, "fse_audit_write_errors_total") == 1
    assert value(s, "fse_streams_active") == 2
    assert value(s, "fse_streams_waiting") == 5
    assert value(s, "fse_build_info", version=__version__, model_sha256="cd" * 32) == 1
    assert not any(name.startswith("process_") for name, _ in s)  # process=False


def test_no_metrics_is_silent() -> None:
    sink = NO_METRICS
    sink.verdict(Verdict(COMPLETED, 0, "", "default", "00"))
    sink.released(1)
    sink.gap(0.1)
    sink.step(0.1)
    sink.rejected("UNAVAILABLE")
    sink.audit_error()
    sink.build_info("00")
    sink.watch(lambda: (0, 0))
    sink.close()


def test_serve_and_close() -> None:
    m = Metrics(process=False)
    bound = m.serve("127.0.0.1:0")
    port = int(bound.rsplit(":", 1)[1])
    assert bound == f"127.0.0.1:{port}" and port > 0
    assert "fse_tokens_total 0.0" in fetch(port)
    m.close()
    with pytest.raises(urllib.error.URLError):
        fetch(port)


def test_listener_refuses_over_its_bound_and_cuts_at_its_deadline() -> None:
    """The bounds of the listener on their own (tests/test_metrics_attacks.py floods a
    daemon): over `max_connections` a connection gets a 503 and is closed at once; one
    that never finishes its request is closed `seconds` after it was accepted."""
    m = Metrics(process=False)
    port = int(m.serve("127.0.0.1:0", max_connections=2, seconds=1.0).rsplit(":", 1)[1])
    try:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for s in held:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            refusal = third.recv(4096)  # accepted after the two: no slot left
            assert third.recv(4096) == b""
        assert refusal.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert refusal.endswith(b"fse metrics: too many connections\n")
        for s in held:
            with s:
                assert s.recv(4096) == b""  # closed by the server, at its deadline
        for _ in range(50):  # the workers free their slots just after closing
            try:
                assert "fse_tokens_total 0.0" in fetch(port)
                break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                time.sleep(0.1)
        else:
            pytest.fail("no slot came back")
    finally:
        m.close()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    listener = parse_listen(listen, "metrics.listen", unix=False)
    assert (listener.host, listener.port) == expected


@pytest.mark.parametrize("listen", ["", "9464", "::1:9464", "[nope]:1", "h:x", "h:65536", "h:-1"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(StartupError, match=r"^metrics.listen .*: accepted: HOST:PORT"):
        parse_listen(listen, "metrics.listen", unix=False)
