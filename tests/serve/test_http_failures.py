"""The HTTP API when things go wrong, and on a network: a daemon killed or stopped
mid-stream (the SDK raises, never returns a finished answer), the drain, HTTPS and
mutual TLS, plain HTTP off loopback, the [http] config key.

Each test starts daemons of its own (they are killed, stopped or configured apart).
"""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import openai
import pytest
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.certs import Pair, issue, make_ca, server_pair
from support.daemons import FSE, LONG_PROMPT, PROMPT, THREADS, Daemon, audit_events, run_fse
from support.http import HttpDaemon, get, post, sse_data, start_http
from support.ports import free_port
from support.waits import wait_for

STREAM = {"prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}


def stream_then(
    api: HttpDaemon, after: int, act: Callable[[], None]
) -> list[openai.types.Completion]:
    """Stream LONG_PROMPT through the SDK, `act` after `after` chunks, read on: the chunks
    read before the SDK raised (the test expects it to)."""
    seen: list[openai.types.Completion] = []
    with api.client() as client:
        model = client.models.list().data[0].id
        stream = client.completions.create(
            model=model, prompt=LONG_PROMPT, max_tokens=400, temperature=0, stream=True
        )
        for chunk in stream:
            seen.append(chunk)
            if len(seen) == after:
                act()
    return seen


def test_kill_9_mid_stream_makes_the_sdk_raise(start_daemon: Callable[..., Daemon]) -> None:
    api = start_http(start_daemon, *THREADS)
    seen: list[openai.types.Completion] = []
    with pytest.raises(openai.APIError):  # the connection broke: APIConnectionError
        seen = stream_then(api, 3, api.daemon.process.kill)
    api.daemon.process.wait(10)
    # Never an answer that looks finished.
    assert all(c.choices[0].finish_reason is None for c in seen)


def test_a_shutdown_mid_stream_is_an_error_event_without_done(
    start_daemon: Callable[..., Daemon],
) -> None:
    api = start_http(start_daemon, *THREADS, "--drain-seconds", "0")
    with pytest.raises(openai.APIError) as e:
        stream_then(api, 3, lambda: api.daemon.process.send_signal(signal.SIGTERM))
    assert "the daemon shut down before the stream ended" in e.value.message
    assert api.daemon.process.wait(30) == 0
    (verdict,) = audit_events(api.daemon, "stream.verdict")
    assert verdict["status"] == "halted" and verdict["guard"] == "shutdown"
    assert verdict["listener"] == "http"


def test_the_raw_stream_of_a_shutdown_has_no_done(start_daemon: Callable[..., Daemon]) -> None:
    """The same, as curl sees it: an `error` object as the last event, no [DONE]."""
    api = start_http(start_daemon, *THREADS, "--drain-seconds", "0")
    curl = subprocess.Popen(
        ["curl", "-sN", "--noproxy", "*", f"{api.base_url}/completions", "-d", json.dumps(STREAM)],
        stdout=subprocess.PIPE,
    )
    assert curl.stdout is not None
    wait_for(lambda: len(audit_events(api.daemon, "stream.started")) == 1, "the stream started")
    first = curl.stdout.readline()  # a token has gone out
    assert first.startswith(b"data: ")
    api.daemon.process.send_signal(signal.SIGTERM)
    rest, _ = curl.communicate(timeout=60)
    data = sse_data(first + b"\n" + rest)
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert last["error"]["code"] == "shutdown" and last["error"]["type"] == "server_error"
    assert all("fse_verdict" not in json.loads(d) for d in data[:-1])


def test_the_drain_refuses_new_requests_and_lets_streams_finish(
    start_daemon: Callable[..., Daemon],
) -> None:
    api = start_http(start_daemon, *THREADS, "--drain-seconds", "60")
    results: list[list[str]] = []

    def drained() -> None:
        api.daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: get(f"{api.url}/health").status == 503, "health NOT_SERVING")
        refused = post(f"{api.base_url}/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert refused.status == 503
        assert refused.json()["error"]["message"] == "the daemon is shutting down"
        results.append(["refused"])

    with api.client() as client:
        model = client.models.list().data[0].id
        stream = client.completions.create(
            model=model, prompt=LONG_PROMPT, max_tokens=48, temperature=0, stream=True
        )
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                drained()
    assert results == [["refused"]]
    assert chunks[-1].choices[0].finish_reason == "length"  # finished whole, within the drain
    assert sum(1 for c in chunks if c.choices[0].text) <= 48
    assert api.daemon.process.wait(60) == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca, clients_ca = make_ca(folder, "server-ca"), make_ca(folder, "clients-ca")
    return {
        "ca": ca,
        "server": server_pair(ca, folder),
        "client": issue(clients_ca, folder, "app-one", org="org-a"),
        "clients_ca": clients_ca,
    }


def client_context(pki: dict[str, Pair], with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if with_cert:
        context.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))
    return context


def test_https_with_client_certificates(
    start_daemon: Callable[..., Daemon], pki: dict[str, Pair]
) -> None:
    api = start_http(
        start_daemon,
        *THREADS,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["clients_ca"].cert),
        scheme="https", tcp=True,
    )  # fmt: skip
    assert '"tls": true' in api.daemon.log()
    with api.client(verify=client_context(pki)) as client:
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert done.choices[0].finish_reason == "length"
    (started,) = audit_events(api.daemon, "stream.started")
    # Named as gRPC names the same certificate (RFC 4514, the last RDN first).
    assert started["client"] == "cert:CN=app-one,O=org-a"
    with grpc_mtls(api, pki) as stub:
        start = fse_pb2.GenerateRequest(prompt="Hi", max_tokens=1)
        list(stub.Generate(iter([fse_pb2.GenerateClientMessage(start=start)]), timeout=60))
    grpc_started = audit_events(api.daemon, "stream.started")[-1]
    assert grpc_started["client"] == started["client"] and "listener" not in grpc_started
    # Without a client certificate, or in plain text, no answer at all.
    bare = api.client(verify=client_context(pki, with_cert=False))
    with bare, pytest.raises(openai.APIConnectionError):
        bare.models.list()
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{api.url.rsplit(':', 1)[1]}/health")


@contextlib.contextmanager
def grpc_mtls(api: HttpDaemon, pki: dict[str, Pair]) -> Iterator[fse_pb2_grpc.GuardStub]:
    """gRPC over mutual TLS, with the certificate the HTTP client presents."""
    creds = grpc.ssl_channel_credentials(
        pki["ca"].cert.read_bytes(), pki["client"].key.read_bytes(), pki["client"].cert.read_bytes()
    )
    with grpc.secure_channel(api.daemon.addrs[1], creds) as channel:
        yield fse_pb2_grpc.GuardStub(channel)


@pytest.mark.daemon  # a real `fse serve`, refused before it loads anything
def test_plain_http_off_loopback_is_refused_at_start(tmp_path: Path) -> None:
    refused = subprocess.run(
        [*FSE, "serve", *THREADS, "--listen", f"unix:{tmp_path}/fse.sock",
         "--http-listen", f"0.0.0.0:{free_port()}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--http-listen 0.0.0.0:" in refused.stderr
    assert "plain TCP on a non-loopback address" in refused.stderr


def test_the_http_key_in_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "fse.toml"
    config.write_text('[http]\nlisten = ["127.0.0.1:8080", "[::1]:8080"]\n')
    shown = run_fse("config", "check", str(config))
    assert shown.returncode == 0
    assert '[http]\nlisten = ["127.0.0.1:8080", "[::1]:8080"]' in shown.stdout
    config.write_text('[http]\nlisten = ["unix:/tmp/x.sock"]\n')
    bad = run_fse("config", "check", str(config))
    assert bad.returncode == 2 and "http.listen" in bad.stderr and "HOST:PORT" in bad.stderr
    flag = run_fse("serve", "--http-listen", "nowhere")
    assert flag.returncode == 2 and "--http-listen" in flag.stderr
