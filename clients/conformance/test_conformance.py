"""The conformance harness: every client's `guarded-generate` on every case of cases.toml.

One real daemon serves a unix socket and a TLS TCP listener that wants a bearer token;
a second one, started for the mutual-TLS cases only, a TLS listener that wants a client
certificate. Each case runs the Python client first (the reference), then every other
client, over both transports, and compares parsed outputs (JSON lines, verdicts); errors
are checked only for what the protocol makes visible (exit code, status code name, one
line, the flag named).
Every language folder of clients/ must provide its example in clients/bin; a missing one
fails, there is no skip list.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CLIENTS = HERE.parent
BIN = CLIENTS / "bin"
CASES: list[dict[str, Any]] = tomllib.loads((HERE / "cases.toml").read_text())["case"]
REFERENCE = "python"
# Every folder of clients/ that is a language (not the harness, not the build output).
LANGUAGES = sorted(
    p.name for p in CLIENTS.iterdir() if p.is_dir() and p.name not in ("conformance", "bin")
)
OTHERS = [lang for lang in LANGUAGES if lang != REFERENCE]
TOKEN = "conformance-token-1"  # the daemon's tokens file holds only its sha256
RUN_TIMEOUT = 120

# The test suite's certificate helper (tests/support/certs.py), shared rather than copied.
sys.path.insert(0, str(HERE.parent.parent / "tests"))
from support.certs import Pair, issue, make_ca, server_pair  # noqa: E402


@dataclass(frozen=True)
class Daemon:
    unix: str
    tcp: str
    ca: Path
    token_file: Path
    wrong_token_file: Path
    down: str
    audit: Path
    client: Pair  # a client certificate from the client CA of the mutual-TLS daemon


@dataclass(frozen=True)
class MutualTls:
    """A second daemon whose TLS listener wants a client certificate (--tls-client-ca)."""

    tcp: str


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(process: subprocess.Popen[bytes], sock: Path, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{log.read_text()}")
        if "fse: serving" in log.read_text() and sock.exists():
            return
        time.sleep(0.1)
    raise TimeoutError(f"daemon not serving:\n{log.read_text()}")


def _wait_model_hash(addr: str) -> None:
    """GetInfo's model sha256 is filled in once the daemon has hashed the file."""
    import fse_client

    with fse_client.Client(addr) as client:
        for _ in range(600):
            if client.info().model.sha256:
                return
            time.sleep(0.1)
    raise TimeoutError("the daemon never reported its model's sha256")


def _serve(work: Path, *args: str) -> subprocess.Popen[bytes]:
    """`fse serve` in `work` on unix:work/fse.sock and the given flags, once it serves."""
    sock, log = work / "fse.sock", work / "daemon.log"
    cmd = [
        sys.executable, "-m", "fse.cli", "serve", "--listen", f"unix:{sock}", *args,
        "--threads", "2", "--audit-log", str(work / "audit.jsonl"),
        "--gpu-layers", "0",  # the model on the CPU on every machine: the info case's figures
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=work)
    try:
        _wait_serving(process, sock, log)
    except BaseException:
        _stop(process)
        raise
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """The server's CA and certificate (both daemons), and a client CA with one client."""
    work = tmp_path_factory.mktemp("pki")
    ca, client_ca = make_ca(work, "fse test CA"), make_ca(work, "fse client CA")
    return {
        "ca": ca,
        "server": server_pair(ca, work),
        "client_ca": client_ca,
        "client": issue(client_ca, work, "conformance-client"),
    }


@pytest.fixture(scope="module")
def mutual_tls(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Pair]
) -> Iterator[MutualTls]:
    """Started only for the cases over mutual TLS (see `test_case`)."""
    work, port = tmp_path_factory.mktemp("conformance-mtls"), _free_port()
    server = pki["server"]
    process = _serve(
        work, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert),
        "--tls-key", str(server.key), "--tls-client-ca", str(pki["client_ca"].cert),
        "--max-streams", "1", "--max-queue", "0",
    )  # fmt: skip
    try:
        yield MutualTls(f"127.0.0.1:{port}")
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Pair]) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("conformance")
    ca, server = pki["ca"], pki["server"]
    policies = work / "policies"
    policies.mkdir()
    (policies / "test.toml").write_text('name = "test"\n[guards.l2_norm]\nthreshold = 10.0\n')
    # The prompt guard with its defaults (and perplexity): refuses a gibberish suffix.
    (policies / "inputs.toml").write_text(
        'name = "inputs"\n[guards.prompt_perplexity]\n[guards.perplexity]\n'
    )
    tokens = work / "tokens"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    tokens.write_text(f"# conformance harness\nharness {digest}\n")
    token_file, wrong = work / "token", work / "wrong-token"
    token_file.write_text(TOKEN + "\n")
    wrong.write_text("not-the-token\n")
    sock, port = work / "fse.sock", _free_port()
    process = _serve(
        work, "--listen", f"127.0.0.1:{port}",
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--auth-tokens", str(tokens),
        "--policies-dir", str(policies), "--max-streams", "1", "--max-queue", "0",
    )  # fmt: skip
    try:
        _wait_model_hash(f"unix:{sock}")
        yield Daemon(
            f"unix:{sock}",
            f"127.0.0.1:{port}",
            ca.cert,
            token_file,
            wrong,
            f"unix:{work / 'nobody-listens.sock'}",
            work / "audit.jsonl",
            pki["client"],
        )
    finally:
        _stop(process)


def run(
    language: str,
    case: dict[str, Any],
    transport: str,
    daemon: Daemon,
    mutual: MutualTls | None = None,
) -> Result:
    program = BIN / f"guarded-generate-{language}"
    assert program.exists(), f"{language}: {program} is missing (run `make clients`)"
    client = ["--tls-cert", str(daemon.client.cert), "--tls-key", str(daemon.client.key)]
    if transport == "unix":
        where = ["--addr", daemon.unix]
    elif transport == "down":
        where = ["--addr", daemon.down]
    elif transport.startswith("mtls"):
        assert mutual is not None
        where = ["--addr", mutual.tcp, "--tls-ca", str(daemon.ca)]
        where += client if transport == "mtls" else []
    else:
        token = daemon.wrong_token_file if transport == "tls-wrong-token" else daemon.token_file
        where = ["--addr", daemon.tcp, "--tls-ca", str(daemon.ca), "--token-file", str(token)]
    # Files a case may name: the harness's CA and client certificate and key.
    files = {"{ca}": str(daemon.ca), "{client_cert}": client[1], "{client_key}": client[3]}
    args = [str(program), *where, *(files.get(arg, arg) for arg in case["args"])]
    if "prompt" in case:
        args.append(case["prompt"])
    done = subprocess.run(
        args,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    return Result(
        done.returncode,
        done.stdout.decode("utf-8"),
        done.stderr.decode("utf-8", "replace"),
    )


def transports(case: dict[str, Any]) -> list[str]:
    kind = case.get("transport", "both")
    return ["unix", "tls"] if kind == "both" else [kind]


def check_expectations(case: dict[str, Any], result: Result, who: str) -> None:
    """What the case says of the output, whichever client produced it."""
    assert result.code == case["exit"], f"{who}: exit {result.code}\n{result.stderr}"
    expect = case.get("expect", {})
    if "stderr" in expect:  # an error: the status code's name (and the field) on stderr
        for wanted in expect["stderr"]:
            assert wanted in result.stderr, f"{who}: no {wanted!r} in {result.stderr!r}"
        # One line, `guarded-generate: error: CODE: MESSAGE`; nothing generated.
        assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), (
            f"{who}: {result.stderr!r}"
        )
        assert result.stdout == "", f"{who}: {result.stdout!r}"
        return
    if "flag" in expect:  # a usage error: the flag named, nothing generated
        assert expect["flag"] in result.stderr, f"{who}: {result.stderr!r}"
        assert result.stdout == "", f"{who}: {result.stdout!r}"
        return
    lines = result.lines()
    if expect.get("info"):
        (info,) = lines
        model = info["model"]
        assert model["vocab_size"] > 0 and "path" not in model
        assert {p["name"] for p in info["policies"]} >= {"default", "pro", "test", "inputs"}
        for key in ("backend", "layers", "gpu_layers"):
            assert model[key] == expect[key], f"{who}: model.{key} {model[key]!r}"
        devices = model["devices"]
        assert all(
            set(d) == {"name", "description", "kind", "memory_bytes", "layers"} for d in devices
        ), f"{who}: {devices}"
        held = {d["name"]: d["layers"] for d in devices if d["layers"]}
        assert held == expect["device_layers"], f"{who}: layers per device {held}"
        (cpu,) = [d for d in devices if d["name"] == "CPU"]
        assert cpu["kind"] == "cpu" and cpu["memory_bytes"] > 0 and cpu["description"], who
        return
    *tokens, verdict = lines
    assert verdict["type"] == "verdict" and all(t["type"] == "token" for t in tokens)
    assert verdict["status"] == expect["status"], f"{who}: {verdict}"
    # Why a completed stream ended (end_of_generation, stop_sequence, max_tokens); null
    # for any other status.
    assert verdict["completion"] == expect.get("completion"), f"{who}: {verdict}"
    for key in ("guard", "threshold", "token_index"):
        if key in expect:
            assert verdict[key] == expect[key], f"{who}: {key} {verdict[key]!r}"
    if "tokens" in expect:
        assert verdict["tokens"] == len(tokens) == expect["tokens"], who
    assert expect.get("min_tokens", 0) <= len(tokens) <= expect.get("max_tokens", 1 << 30), who
    text = "".join(t["text"] for t in tokens)
    assert text == verdict["text"], f"{who}: concatenated text differs from the verdict's"
    if "text_excludes" in expect:
        assert expect["text_excludes"] not in text and text, who
    if expect.get("non_ascii"):
        assert any(ord(c) > 127 for c in text), f"{who}: {text!r} has no multi-byte character"
    for t in tokens:  # every metric is a real number or null, never a string
        for key in ("nll", "ppl", "variance", "max_prob", "l2_norm", "entropy"):
            assert t[key] is None or (isinstance(t[key], float | int) and math.isfinite(t[key]))


def compare(case: dict[str, Any], reference: Result, other: Result, who: str) -> None:
    kind = case.get("compare")
    if kind is None:  # errors: each client words its own; the expectations were checked
        return
    if kind == "verdict":
        ours, theirs = reference.lines()[-1], other.lines()[-1]
        for key in (
            "type",
            "status",
            "completion",
            "guard",
            "threshold",
            "policy",
            "policy_sha256",
        ):
            assert theirs[key] == ours[key], f"{who}: {key}: {theirs[key]!r} != {ours[key]!r}"
    else:
        assert other.lines() == reference.lines(), f"{who}: output differs from python's"


def after(case: dict[str, Any], daemon: Daemon) -> None:
    if case.get("after") == "greedy-ok":
        # max_streams 1, max_queue 0: this stream is served only if the slot was freed.
        probe = {"args": ["--json", "--temperature", "0", "--max-tokens", "1"], "prompt": "Hi"}
        result = run(REFERENCE, probe, "unix", daemon)
        assert result.code == 0, f"the cancelled stream's slot is still taken: {result.stderr}"


def test_every_language_has_its_example() -> None:
    assert REFERENCE in LANGUAGES
    missing = [lang for lang in LANGUAGES if not (BIN / f"guarded-generate-{lang}").exists()]
    assert not missing, f"no clients/bin/guarded-generate-<language> for {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any], daemon: Daemon, request: pytest.FixtureRequest) -> None:
    over_mtls = any(t.startswith("mtls") for t in transports(case))
    mutual = request.getfixturevalue("mutual_tls") if over_mtls else None
    for transport in transports(case):
        reference = run(REFERENCE, case, transport, daemon, mutual)
        check_expectations(case, reference, f"{REFERENCE}/{transport}")
        after(case, daemon)
        for language in OTHERS:
            who = f"{language}/{transport}"
            result = run(language, case, transport, daemon, mutual)
            check_expectations(case, result, who)
            compare(case, reference, result, who)
            after(case, daemon)


def test_openssl_is_available() -> None:
    assert shutil.which("openssl"), "the harness generates its certificates with openssl"
