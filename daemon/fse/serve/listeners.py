"""Where the daemon listens: unix sockets and TCP addresses, checked before binding.

- A unix socket is the default and the local access control: it is created with the
  configured mode and group whatever the process umask (bound under umask 0177, so it
  is never looser than asked even for an instant, then chmod/chown to the setting).
- A TCP listener serves TLS when a certificate is configured (mTLS with a client CA).
  Plain TCP is accepted only on loopback addresses; anywhere else it is refused at start
  unless allow_insecure_tcp says a mesh terminates TLS in front (logged as a warning).
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fse.core.files import FileRefused, read_trusted
from fse.serve.config import ServerSettings, TlsSettings, listen_address

BACKLOG = 256  # connections the kernel queues before the daemon accepts them

# What parse_listen's error says is accepted, with unix sockets and without.
_ACCEPTED = "unix:PATH (PATH not empty) or HOST:PORT"
_ACCEPTED_TCP = "HOST:PORT, such as 127.0.0.1:9464 or [::1]:9464 (empty: off)"


class StartupError(Exception):
    """The daemon cannot start; the message says why (printed, exit code 1)."""


@dataclass(frozen=True, slots=True)
class Listener:
    target: str  # as gRPC spells it: unix:/abs/path or HOST:PORT
    socket_path: Path | None  # for unix listeners
    loopback: bool  # a unix socket, or a TCP address that only this host can reach
    host: str = ""  # for TCP listeners, without an IPv6 address's brackets
    port: int = 0  # for TCP listeners

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None


def parse_listen(addr: str, key: str = "--listen", *, unix: bool = True) -> Listener:
    """`unix:PATH` (relative paths resolved now; only if `unix`) or `HOST:PORT`, as
    fse.serve.config.listen_address reads it when the config is loaded. Errors name
    `key`: the daemon's listeners (--listen) and metrics.listen (`unix=False`)."""
    parsed = listen_address(addr)
    if parsed is None or (isinstance(parsed, str) and not unix):
        raise StartupError(f"{key} {addr}: accepted: {_ACCEPTED if unix else _ACCEPTED_TCP}")
    if isinstance(parsed, str):
        resolved = Path(parsed).expanduser().resolve()
        return Listener(f"unix:{resolved}", resolved, True)
    host, port = parsed
    return Listener(addr, None, _is_loopback(host), host, port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _read_tls(what: str, path: Path) -> bytes:
    # Whoever can write these can swap the daemon's identity or, with client_ca,
    # admit certificates of their own: read as every trusted file (fse.core.files).
    try:
        return read_trusted(path)
    except FileRefused as exc:
        raise StartupError(f"{what}: {exc}") from None


def tls_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    if tls.cert is None or tls.key is None:
        return None
    pair = (_read_tls("tls.key", tls.key), _read_tls("tls.cert", tls.cert))
    client_ca = _read_tls("tls.client_ca", tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The same TLS as `tls_credentials`, for the HTTP door: the certificate and key
    read (and checked) as trusted files once, then loaded from those very bytes (through
    a memory file, since ssl loads a key only from a file); with client_ca, a client
    certificate signed by it is required."""
    if tls.cert is None or tls.key is None:
        return None
    cert, key = _read_tls("tls.cert", tls.cert), _read_tls("tls.key", tls.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    fd = os.memfd_create("fse-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert + b"\n" + key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"tls.cert, tls.key: cannot be loaded: {exc}") from None
    finally:
        os.close(fd)
    if tls.client_ca is not None:
        ca = _read_tls("tls.client_ca", tls.client_ca)
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(f"tls.client_ca: cannot be loaded: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_plain_tcp(
    listeners: list[Listener], secure: bool, allow_insecure: bool, key: str = "--listen"
) -> list[str]:
    """Refuse plain TCP off loopback; returns the addresses allowed only by the override.
    Errors name `key` (--listen, --http-listen)."""
    exposed = [lst.target for lst in listeners if not lst.is_unix and not lst.loopback]
    if secure or not exposed:
        return []
    if not allow_insecure:
        raise StartupError(
            f"{key} {exposed[0]}: plain TCP on a non-loopback address would let anyone on "
            "the network in; configure --tls-cert and --tls-key, listen on 127.0.0.1, or "
            "pass --allow-insecure-tcp if a proxy terminates TLS in front"
        )
    return exposed


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; never a live daemon's socket (that would
    silently take over its address) and never a file that is not a socket."""
    if not path.exists():
        return
    if not path.is_socket():
        raise StartupError(f"--listen unix:{path}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody listens: stale
            return
        except OSError as exc:
            raise StartupError(f"--listen unix:{path}: cannot check the socket: {exc}") from None
    raise StartupError(f"--listen unix:{path}: address in use by a running process")


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Sockets bound in here start as 0600 at most, whatever the caller's umask."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def bind(
    server: grpc.aio.Server, target: str, creds: grpc.ServerCredentials | None, shown: str
) -> None:
    """gRPC listens on `target`; errors name `shown`, the address the operator gave."""
    try:
        if creds is not None:
            server.add_secure_port(target, creds)
        else:
            server.add_insecure_port(target)
    except RuntimeError as exc:
        raise StartupError(f"--listen {shown}: cannot bind: {exc}") from None


def open_unix_socket(listener: Listener, server: ServerSettings) -> socket.socket:
    """The public unix socket, listening, with the configured mode and group (the daemon
    accepts on it itself: see fse.serve.relay)."""
    path = listener.socket_path
    assert path is not None
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with private_umask():
            sock.bind(str(path))
        set_socket_access(path, server)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"--listen {listener.target}: cannot bind: {exc}") from None
    except StartupError:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


def set_socket_access(path: Path, server: ServerSettings) -> None:
    """The configured mode and group on a bound unix socket."""
    try:
        if server.socket_group:
            os.chown(path, -1, grp.getgrnam(server.socket_group).gr_gid)
        os.chmod(path, server.socket_mode)
    except KeyError:
        raise StartupError(
            f"server.socket_group: {server.socket_group!r} is not a group on this host"
        ) from None
    except OSError as exc:
        raise StartupError(f"--listen unix:{path}: cannot set its access: {exc}") from None
