"""Safe on a network: TLS and mTLS, plain TCP only on loopback, bearer tokens, the caller
named in the audit log, a per-caller stream limit, the socket's mode whatever the umask.

Real daemons, real certificates made by openssl in the test, real gRPC clients."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fse_client
import grpc
import pytest
from fse.serve.relay import private_location
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.certs import Pair, issue, make_ca, server_pair
from support.daemons import FSE, THREADS, Daemon, audit_records, run_fse
from support.ports import free_port
from support.streams import GREEDY
from support.users import needs_root

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca, clients_ca, rogue = (make_ca(folder, n) for n in ("server-ca", "client-ca", "rogue-ca"))
    return {
        "ca": ca,
        "server": server_pair(ca, folder),
        "clients_ca": clients_ca,
        "client": issue(clients_ca, folder, "app-one"),
        "rogue": rogue,
        "rogue_client": issue(rogue, folder, "intruder"),
    }


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    lines = [f"{n} {hashlib.sha256(t.encode()).hexdigest()}" for n, t in TOKENS.items()]
    path.write_text("# name sha256\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tls_daemon(
    start_module_daemon: Callable[..., Daemon], pki: dict[str, Pair], tokens_file: Path
) -> Daemon:
    """TLS on TCP with tokens; the unix socket needs none (require_on_unix is false)."""
    return start_module_daemon(
        *THREADS,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--auth-tokens", str(tokens_file), "--per-client-streams", "1", "--max-streams", "4",
        tcp=True,
    )  # fmt: skip


def tls_client(daemon: Daemon, pki: dict[str, Pair], token: str | None) -> fse_client.Client:
    return fse_client.Client(daemon.addrs[1], tls_ca=pki["ca"].cert, token=token)


def one_generation(client: fse_client.Client) -> fse_client.Verdict:
    events = list(client.generate("The capital of France is", max_tokens=2, sampling=GREEDY))
    verdict = events[-1]
    assert isinstance(verdict, fse_client.Verdict)
    return verdict


def test_tls_with_a_token_serves_and_names_the_caller(
    tls_daemon: Daemon, pki: dict[str, Pair]
) -> None:
    with tls_client(tls_daemon, pki, TOKENS["alice"]) as client:
        assert one_generation(client).status == fse_client.Status.COMPLETED
        assert client.info().model.vocab_size > 0
    started = [r for r in tls_daemon.audit() if r["event"] == "stream.started"]
    verdicts = [r for r in tls_daemon.audit() if r["event"] == "stream.verdict"]
    assert started[-1]["client"] == verdicts[-1]["client"] == "token:alice"


@pytest.mark.parametrize("token", [None, "not-a-token", TOKENS["alice"] + "x"])
def test_missing_or_wrong_token_is_unauthenticated_and_audited(
    tls_daemon: Daemon, pki: dict[str, Pair], token: str | None
) -> None:
    before = len(tls_daemon.audit())
    with tls_client(tls_daemon, pki, token) as client, pytest.raises(fse_client.FseError) as e:
        one_generation(client)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    # The same words whether the token is missing or wrong: nothing to learn from them.
    assert e.value.message == (
        "a valid bearer token is required (metadata authorization: Bearer TOKEN)"
    )
    denied = [r for r in tls_daemon.audit()[before:] if r["event"] == "auth.denied"]
    assert len(denied) == 1 and denied[0]["client"].startswith("tcp:")
    assert not [r for r in tls_daemon.audit()[before:] if r["event"] == "stream.started"]


def test_fse_generate_speaks_tls_and_tokens(
    tls_daemon: Daemon, pki: dict[str, Pair], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKENS["bob"] + "\n")
    tls = ["--addr", tls_daemon.addrs[1], "--tls-ca", str(pki["ca"].cert), "--token-file"]
    ok = run_fse("generate", *tls, str(token), "--temperature", "0", "--max-tokens", "2", "Hi")
    assert ok.returncode == 0, ok.stderr
    token.write_text("wrong\n")
    denied = run_fse("generate", *tls, str(token), "--max-tokens", "2", "Hi")
    assert denied.returncode == 1
    assert denied.stderr.startswith("fse generate: error: UNAUTHENTICATED: ")
    token.write_text("\n")
    empty = run_fse("generate", *tls, str(token), "Hi")
    assert empty.returncode == 2 and "--token-file" in empty.stderr and "empty" in empty.stderr


def test_unix_socket_needs_no_token_by_default(tls_daemon: Daemon) -> None:
    with fse_client.Client(tls_daemon.addr) as client:
        assert one_generation(client).status == fse_client.Status.COMPLETED
    started = [r for r in tls_daemon.audit() if r["event"] == "stream.started"]
    assert started[-1]["client"] == f"uid:{os.getuid()}"  # SO_PEERCRED, through the relay


def private_dirs(public: Path) -> list[Path]:
    """The relay's private directories for the socket `public`."""
    base, prefix = private_location(public)
    return list(base.glob(f"{prefix}*"))


# Imports first, as root (the interpreter lives under /root), then the switch to the uid.
CALL_AS_OTHER_USER = """
import os, sys, fse_client
uid = int(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
with fse_client.Client(sys.argv[1]) as client:
    events = list(client.generate("Hi", max_tokens=1, request_id=sys.argv[2]))
print(events[-1].status.name)
"""


@needs_root
def test_a_unix_caller_is_named_by_its_uid(start_daemon: Callable[..., Daemon]) -> None:
    """The kernel's word (SO_PEERCRED), not the client's: another user is named as such,
    and cannot reach gRPC's own socket to pass itself off as somebody else."""
    shared = Path(tempfile.mkdtemp(prefix="fse-uid-"))
    try:
        shared.chmod(0o755)
        sock = shared / "fse.sock"
        daemon = start_daemon(*THREADS, "--listen", f"unix:{sock}", "--socket-mode", "0666")
        nobody = 65534
        for uid, request_id in ((nobody, "as-nobody"), (os.getuid(), "as-me")):
            done = subprocess.run(
                [sys.executable, "-c", CALL_AS_OTHER_USER, f"unix:{sock}", request_id, str(uid)],
                capture_output=True, text=True, timeout=120, cwd=shared,
            )  # fmt: skip
            assert done.stdout.strip() == "COMPLETED", done.stderr
        clients = {
            r["request_id"]: r["client"] for r in daemon.audit() if r["event"] == "stream.started"
        }
        assert clients == {"as-nobody": f"uid:{nobody}", "as-me": f"uid:{os.getuid()}"}
        # gRPC's socket sits in a directory only the daemon's user can enter.
        (private,) = private_dirs(sock)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        inner = str(private / "grpc.sock")
        probe = f"import os, socket as s; os.setuid({nobody}); s.socket(1).connect({inner!r})"
        intruder = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        assert intruder.returncode == 1 and "PermissionError" in intruder.stderr
        daemon.stop()
        assert not list(shared.iterdir()) and not private_dirs(sock), "left behind"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_killed_daemons_private_directory_is_cleared_by_the_next_start(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    sock = tmp_path / "fse.sock"
    first = start_daemon(*THREADS, "--listen", f"unix:{sock}")
    (left,) = private_dirs(sock)
    first.stop(signal.SIGKILL)
    assert left.is_dir() and sock.exists()  # what kill -9 leaves behind
    second = start_daemon(*THREADS, "--listen", f"unix:{sock}")
    (private,) = private_dirs(sock)
    assert private != left
    with fse_client.Client(f"unix:{sock}") as client:
        assert one_generation(client).status == fse_client.Status.COMPLETED
    assert second.stop() == 0
    assert not sock.exists() and not private_dirs(sock)


@pytest.mark.daemon
def test_a_temporary_directory_too_deep_for_the_private_socket_is_a_clear_error(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    env = {**os.environ, "TMPDIR": str(deep)}
    env.pop("RUNTIME_DIRECTORY", None)
    done = subprocess.run(
        [*FSE, "serve", *THREADS, "--listen", f"unix:{tmp_path / 'fse.sock'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "too long a path for the daemon's private sockets" in done.stderr
    assert "set TMPDIR to a shorter directory" in done.stderr
    assert not (tmp_path / "fse.sock").exists() and not list(deep.iterdir())


def test_a_silent_or_vanishing_unix_client_costs_nothing(tls_daemon: Daemon) -> None:
    """Connections that send nothing, garbage, or half a request and vanish do not stop
    the relay from serving the next caller."""
    path = tls_daemon.addr.removeprefix("unix:")
    idle = [socket.socket(socket.AF_UNIX) for _ in range(20)]
    for conn in idle:
        conn.connect(path)
    for payload in (b"garbage\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(payload)
    with fse_client.Client(tls_daemon.addr) as client:
        assert one_generation(client).status == fse_client.Status.COMPLETED
    for conn in idle:
        conn.close()
    assert tls_daemon.process.poll() is None


def test_plain_text_and_an_untrusted_ca_cannot_connect(
    tls_daemon: Daemon, pki: dict[str, Pair]
) -> None:
    for client in (
        fse_client.Client(tls_daemon.addrs[1], token=TOKENS["alice"]),  # no TLS at all
        fse_client.Client(tls_daemon.addrs[1], tls_ca=pki["rogue"].cert, token=TOKENS["alice"]),
    ):
        with client, pytest.raises(fse_client.FseError) as e:
            client.info(timeout=10)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_per_caller_stream_limit(tls_daemon: Daemon, pki: dict[str, Pair]) -> None:
    with (
        tls_client(tls_daemon, pki, TOKENS["alice"]) as alice,
        tls_client(tls_daemon, pki, TOKENS["bob"]) as bob,
    ):
        running = alice.generate("Write a long story.", max_tokens=300, sampling=GREEDY)
        events = iter(running)
        next(events)  # alice's first stream is running
        with pytest.raises(fse_client.FseError) as second:
            one_generation(alice)
        assert second.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per_client_streams 1" in second.value.message
        assert one_generation(bob).status == fse_client.Status.COMPLETED  # others unaffected
        running.cancel()
        assert list(events)[-1].status == fse_client.Status.CANCELLED  # type: ignore[union-attr]
        assert one_generation(alice).status == fse_client.Status.COMPLETED  # freed again


def test_per_caller_limit_on_the_unix_socket_is_per_uid(
    tls_daemon: Daemon, pki: dict[str, Pair]
) -> None:
    me = f"uid:{os.getuid()}"
    with (
        fse_client.Client(tls_daemon.addr) as local,
        tls_client(tls_daemon, pki, TOKENS["alice"]) as alice,
    ):
        running = local.generate("Write a long story.", max_tokens=300, sampling=GREEDY)
        events = iter(running)
        next(events)
        before = len(tls_daemon.audit())
        with pytest.raises(fse_client.FseError) as second:
            list(local.generate("Hi", max_tokens=2, request_id="second"))
        assert second.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"per-caller limit: {me} already runs 1 streams" in second.value.message
        assert one_generation(alice).status == fse_client.Status.COMPLETED  # another caller
        running.cancel()
        list(events)
    (refused,) = [r for r in tls_daemon.audit()[before:] if r["event"] == "input.rejected"]
    assert refused["client"] == me and refused["request_id"] == "second"


def test_mtls_requires_a_certificate_from_the_client_ca(
    start_daemon: Callable[..., Daemon], pki: dict[str, Pair]
) -> None:
    daemon = start_daemon(
        *THREADS,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["clients_ca"].cert),
        tcp=True,
    )  # fmt: skip
    root = pki["ca"].cert.read_bytes()

    def info(pair: Pair | None) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(
            root,
            private_key=pair.key.read_bytes() if pair else None,
            certificate_chain=pair.cert.read_bytes() if pair else None,
        )
        with grpc.secure_channel(daemon.addrs[1], creds) as channel:
            try:
                fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert info(pki["client"]) == grpc.StatusCode.OK
    assert info(None) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert info(pki["rogue_client"]) == grpc.StatusCode.UNAVAILABLE  # not from the client CA
    creds = grpc.ssl_channel_credentials(
        root, pki["client"].key.read_bytes(), pki["client"].cert.read_bytes()
    )
    with grpc.secure_channel(daemon.addrs[1], creds) as channel:
        start = fse_pb2.GenerateRequest(prompt="Hi", max_tokens=1)
        replies = list(
            fse_pb2_grpc.GuardStub(channel).Generate(
                iter([fse_pb2.GenerateClientMessage(start=start)]), timeout=60
            )
        )
    assert replies[-1].verdict.status == fse_pb2.STATUS_COMPLETED
    (started,) = [r for r in daemon.audit() if r["event"] == "stream.started"]
    assert started["client"].startswith("cert:") and "app-one" in started["client"]

    # fse_client presents one (PEM bytes or paths), and `fse generate --tls-cert --tls-key`.
    client = pki["client"]
    with fse_client.Client(
        daemon.addrs[1], tls_ca=pki["ca"].cert, tls_cert=client.cert, tls_key=client.key
    ) as mutual:
        assert one_generation(mutual).status == fse_client.Status.COMPLETED
    with fse_client.Client(daemon.addrs[1], tls_ca=pki["ca"].cert) as anonymous:
        with pytest.raises(fse_client.FseError) as refused:
            anonymous.info()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="tls_key: required with tls_cert"):
        fse_client.Client(daemon.addrs[1], tls_ca=root, tls_cert=client.cert)
    tls = ["--addr", daemon.addrs[1], "--tls-ca", str(pki["ca"].cert)]
    mine = ["--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    ok = run_fse("generate", *tls, *mine, "--temperature", "0", "--max-tokens", "2", "Hi")
    assert ok.returncode == 0, ok.stderr
    without = run_fse("generate", *tls, "--max-tokens", "2", "Hi")
    assert without.returncode == 1 and without.stderr.startswith("fse generate: error: ")
    half = run_fse("generate", *tls, "--tls-cert", str(client.cert), "Hi")
    assert half.returncode == 2 and "--tls-key: required with --tls-cert" in half.stderr


def _start(tmp_path: Path, *args: str, umask: int = -1) -> subprocess.Popen[str]:
    # umask=, never preexec_fn: a preexec_fn forces fork(), and gRPC (imported by this
    # process) restarts its poller in the forked child, which then aborts on the epoll
    # descriptor that close_fds closed before exec (grpc/grpc#43055).
    return subprocess.Popen(
        [*FSE, "serve", *THREADS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        umask=umask,
    )


@pytest.mark.daemon
def test_plain_tcp_off_loopback_is_refused_at_start(tmp_path: Path) -> None:
    refused = _start(tmp_path, "--listen", f"0.0.0.0:{free_port()}")
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "Traceback" not in out
    assert "plain TCP on a non-loopback address" in out and "--allow-insecure-tcp" in out
    assert not (tmp_path / "fse-audit.jsonl").exists() or not audit_records(
        tmp_path / "fse-audit.jsonl"
    )


def test_allow_insecure_tcp_starts_with_a_warning(start_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = start_daemon(*THREADS, "--listen", f"0.0.0.0:{port}", "--allow-insecure-tcp")
    assert '"event": "listen.insecure_tcp"' in daemon.log()
    assert '"level": "warning"' in daemon.log()


@pytest.mark.daemon
@pytest.mark.parametrize(("umask", "mode"), [(0o000, 0o660), (0o077, 0o660), (0o000, 0o600)])
def test_socket_mode_whatever_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    sock = tmp_path / "fse.sock"
    args = ["--listen", f"unix:{sock}", "--socket-mode", f"{mode:04o}"]
    process = _start(tmp_path, *args, umask=umask)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() or stat.S_IMODE(sock.stat().st_mode) != mode:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, oct(stat.S_IMODE(sock.stat().st_mode))
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == mode
    finally:
        process.terminate()
        process.communicate(timeout=60)
