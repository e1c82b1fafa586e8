"""The OpenAI-compatible HTTP API of a daemon: tokens, a daemon with --http-listen, the
official `openai` SDK pointed at it, and raw requests and server-sent events."""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from support.daemons import Daemon, audit_events
from support.ports import free_port
from support.waits import LIVE, wait_for

TOKEN = "s3cret-http-token"
TOKEN_NAME = "webapp"


def write_tokens(folder: Path) -> Path:
    """A tokens file with one caller, TOKEN_NAME, whose token is TOKEN."""
    path = folder / "tokens"
    path.write_text(f"{TOKEN_NAME} {hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    return path


@dataclass
class HttpDaemon:
    """A daemon serving the HTTP API at `url` (http://127.0.0.1:PORT)."""

    daemon: Daemon
    url: str
    metrics_port: int = 0  # --metrics-listen's, when given

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str = TOKEN, verify: ssl.SSLContext | bool = True) -> openai.OpenAI:
        """The official SDK, without retries (a refusal must show as it is) and without
        the environment's proxies."""
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=LIVE,
            http_client=openai.DefaultHttpxClient(trust_env=False, verify=verify),
        )

    def verdicts(self) -> list[dict[str, Any]]:
        return audit_events(self.daemon, "stream.verdict")

    def wait_verdicts(self, n: int) -> list[dict[str, Any]]:
        """Wait until the audit log holds `n` stream verdicts; all of them."""
        wait_for(lambda: len(self.verdicts()) >= n, f"{n} stream.verdict records")
        return self.verdicts()


def start_http(
    start: Callable[..., Daemon],
    *args: str,
    scheme: str = "http",
    metrics: bool = False,
    tcp: bool = False,
) -> HttpDaemon:
    """start_daemon(...) with --http-listen on a free loopback port (and metrics; and
    gRPC on loopback TCP too with `tcp`, as daemon.addrs[1])."""
    port, metrics_port = free_port(), free_port() if metrics else 0
    more = ("--metrics-listen", f"127.0.0.1:{metrics_port}") if metrics else ()
    daemon = start(*args, *more, "--http-listen", f"127.0.0.1:{port}", tcp=tcp)
    return HttpDaemon(daemon, f"{scheme}://127.0.0.1:{port}", metrics_port)


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def post(
    url: str,
    body: bytes | dict[str, Any],
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One raw POST (urllib: no SDK in between), whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    return _send(request, context)


def get(url: str, token: str | None = TOKEN) -> Reply:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    return _send(request, None)


def _send(request: urllib.request.Request, context: ssl.SSLContext | None) -> Reply:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=LIVE) as reply:
            return Reply(reply.status, reply.read(), dict(reply.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), dict(exc.headers))


class RawStream:
    """A streamed POST read line by line over a plain connection, to hang up mid-stream."""

    def __init__(self, url: str, body: dict[str, Any], token: str = TOKEN) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=LIVE)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.conn.request("POST", parsed.path, json.dumps(body), headers)
        self.response = self.conn.getresponse()

    def data(self, n: int) -> list[str]:
        """The next `n` `data:` payloads."""
        out: list[str] = []
        while len(out) < n:
            line = self.response.readline()
            assert line, "the stream ended early"
            if line.startswith(b"data: "):
                out.append(line.decode().removeprefix("data: ").rstrip("\n"))
        return out

    def hang_up(self) -> None:
        self.conn.sock.close() if self.conn.sock else None
        self.conn.close()


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [
        line.removeprefix("data: ")
        for line in raw.decode().split("\n")
        if line.startswith("data: ")
    ]


def extra(model: Any, name: str) -> Any:
    """A field the SDK's models do not declare (libfse's `fse`, `fse_verdict`)."""
    return (model.model_extra or {}).get(name)
