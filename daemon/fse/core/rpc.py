"""llama.cpp's RPC backend: a model split across hosts (docs/rpc.md).

A worker (`fse rpc-worker`) serves its host's devices with ggml's own RPC server, run in
this process through the backend registry: `ggml_backend_reg_by_name("RPC")`, then the
proc address of `ggml_backend_rpc_start_server`. The daemon (`fse serve --rpc`, `fse
generate --local --rpc`) adds each worker with `ggml_backend_rpc_add_server` and
registers its devices (RPC0, RPC1 ...), which llama.cpp then uses before any local GPU.

ggml-rpc has no authentication and no encryption: only loopback addresses are accepted
unless the caller allows remote ones (a tunnel: WireGuard, SSH).

What the pinned ggml-rpc does when a worker goes away: every call to a worker runs on a
dispatcher thread, and a failed send or receive (the worker killed: the socket reset)
ends in GGML_ABORT, which calls ggml's abort callback and then abort(). A worker that
stops answering (SIGSTOP, a cut link) leaves the receive blocked for good: no timeout.
`on_abort` installs `fse_ggml_abort` as that callback: the handler the caller set (the
daemon: verdicts for every stream, then exit) runs instead of a bare abort; with none,
one line on stderr and exit 1.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fse._native import ffi, lib
from fse.core.errors import EngineError, InputError
from fse.core.model import Device, devices, init_backend

REGISTRY_NAME = b"RPC"
# How long a worker may take to accept a connection at start-up.
CONNECT_SECONDS = 5.0
ADDRESS_ACCEPTED = "HOST:PORT (PORT 1..65535), such as 127.0.0.1:50052"
REMOTE_REFUSED = (
    "is not a loopback address, and ggml's RPC has neither authentication nor encryption: "
    "bind the worker to a tunnel's address (WireGuard, an SSH tunnel; docs/rpc.md) and "
    "allow it with {allow}"
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; a name that merely resolves there is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(text: str, key: str) -> Endpoint:
    """HOST:PORT as ggml-rpc reads it (the last colon splits; no brackets); InputError
    naming `key` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InputError(f"{key}: {text!r} is not accepted; accepted: {ADDRESS_ACCEPTED}")
    if host.startswith("[") or (":" in host and not _is_ip(host)):
        raise InputError(f"{key}: {text!r} is not accepted; accepted: {ADDRESS_ACCEPTED}")
    return Endpoint(host, int(port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_endpoints(
    texts: Sequence[str], *, allow_remote: bool, key: str, allow: str
) -> list[Endpoint]:
    """The workers' addresses, parsed; a non-loopback one is refused unless allowed
    (`allow` names the setting that allows it)."""
    endpoints = [parse_endpoint(t, key) for t in texts]
    for ep in endpoints:
        if not ep.loopback and not allow_remote:
            raise InputError(f"{key}: {ep} {REMOTE_REFUSED.format(allow=allow)}")
    if len(set(endpoints)) != len(endpoints):
        raise InputError(f"{key}: a worker is named twice; accepted: distinct addresses")
    return endpoints


def _registry() -> object:
    init_backend()
    reg = lib.ggml_backend_reg_by_name(REGISTRY_NAME)
    if reg == ffi.NULL:
        raise EngineError(
            "this llama.cpp was built without its RPC backend (GGML_RPC=ON: make setup)"
        )
    return reg


def _proc(name: str, signature: str) -> object:
    address = lib.ggml_backend_reg_get_proc_address(_registry(), name.encode())
    if address == ffi.NULL:
        raise EngineError(f"llama.cpp's RPC backend has no {name}")
    return ffi.cast(signature, address)


def reachable(endpoint: Endpoint, timeout: float = CONNECT_SECONDS) -> str | None:
    """None if something accepts TCP connections at `endpoint`, else why not. The
    connection is closed at once: the worker reads no command and serves the next one."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


# -- the daemon's side ----------------------------------------------------------------

_added: dict[Endpoint, list[str]] = {}


def add_workers(endpoints: Sequence[Endpoint], key: str) -> dict[Endpoint, list[str]]:
    """Connect to each worker and register its devices with ggml (once per process):
    the names of the devices each one added. A worker that does not accept a connection
    is an InputError naming it (ggml-rpc itself would abort the process)."""
    for ep in endpoints:
        if (why := reachable(ep)) is not None:
            raise InputError(f"{key}: {ep}: no RPC worker reachable there ({why})")
    _install()  # from now on a lost worker ends in a handler of ours, not a bare abort()
    add_server = _proc("ggml_backend_rpc_add_server", "ggml_backend_reg_t (*)(const char *)")
    for ep in endpoints:
        if ep in _added:
            continue
        reg = add_server(str(ep).encode())  # type: ignore[operator]
        if reg == ffi.NULL:
            raise InputError(f"{key}: {ep}: the worker offers no device")
        lib.ggml_backend_register(reg)
        # ggml-rpc describes each of a worker's devices by the worker's address.
        _added[ep] = [d.name for d in worker_devices() if d.description == str(ep)]
    return {ep: _added[ep] for ep in endpoints}


def worker_devices() -> list[Device]:
    """The RPC workers' devices among ggml's (their description is the worker's address)."""
    return [d for d in devices() if d.name.startswith("RPC")]


# -- a lost worker ----------------------------------------------------------------------

Handler = Callable[[str], None]
_handler: Handler | None = None
_handler_lock = threading.Lock()


def on_abort(handler: Handler | None) -> None:
    """Route GGML_ABORT to `handler` (None: one line on stderr, exit 1). The handler runs
    on the thread that aborted (ggml-rpc's dispatcher thread, usually) and must not
    return unless the process may abort(): it never returns to ggml."""
    global _handler
    with _handler_lock:
        _handler = handler
    _install()


def _install() -> None:
    lib.ggml_set_abort_callback(lib.fse_ggml_abort)


def _default_handler(message: str) -> None:
    print(f"fse: error: llama.cpp aborted: {message}", file=sys.stderr, flush=True)
    os._exit(1)


@ffi.def_extern()  # type: ignore[untyped-decorator]
def fse_ggml_abort(error_message: object) -> None:
    message = ffi.string(error_message).decode("utf-8", "replace")
    handler = _handler or _default_handler
    try:
        handler(message)
    finally:
        # A handler that returns (or raises) leaves ggml to abort(); stop here instead of
        # dumping core with a half-written audit log.
        os._exit(1)


def lost_workers(endpoints: Sequence[Endpoint]) -> list[str]:
    """Which workers refuse connections now (killed), for the error message; a stopped
    worker still accepts (its kernel does), so none may be named."""
    return [f"{ep} ({why})" for ep in endpoints if (why := reachable(ep, 1.0)) is not None]


_CLOSE_WAIT = "08"  # the kernel's TCP state: the peer closed, this side has not yet


def closed_by_worker(endpoints: Sequence[Endpoint]) -> list[str]:
    """The workers that closed their connection to this process (a worker killed while
    the daemon is idle: ggml-rpc notices only at its next call). Read from the kernel's
    TCP tables (Linux), for this process's own sockets only; never connects."""
    try:
        inodes = {
            os.readlink(f"/proc/self/fd/{fd}")[8:-1]
            for fd in os.listdir("/proc/self/fd")
            if _is_socket(fd)
        }
        wanted = {_peer_key(ep): str(ep) for ep in endpoints}
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == _CLOSE_WAIT and fields[9] in inodes:
                        name = wanted.get(_peer_of(fields[2]))
                        if name is not None:
                            found.append(name)
        return sorted(set(found))
    except (OSError, ValueError, IndexError):
        return []


def _is_socket(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")
    except OSError:
        return False


def _peer_key(ep: Endpoint) -> tuple[str, int]:
    host = "127.0.0.1" if ep.host == "localhost" else ep.host
    try:
        return str(ipaddress.ip_address(host)), ep.port
    except ValueError:  # a host name: resolved as ggml-rpc resolves it
        return socket.gethostbyname(host), ep.port


def _peer_of(field: str) -> tuple[str, int]:
    """/proc/net/tcp's "0100007F:C350" (or tcp6's 32 hex digits) as (address, port)."""
    address, port = field.split(":")
    raw = bytes.fromhex(address)
    # Each 32-bit word is in the host's byte order (little-endian here).
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


# -- the worker's side -----------------------------------------------------------------


def served_devices() -> list[object]:
    """What a worker offers, as llama.cpp's rpc-server chooses: its GPUs (of any kind but
    CPU and accelerator), else the CPU."""
    init_backend()
    found = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [
        d
        for d in found
        if lib.ggml_backend_dev_type(d)
        in (lib.GGML_BACKEND_DEVICE_TYPE_GPU, lib.GGML_BACKEND_DEVICE_TYPE_IGPU)
    ]
    cpus = [d for d in found if lib.ggml_backend_dev_type(d) == lib.GGML_BACKEND_DEVICE_TYPE_CPU]
    return gpus or cpus[:1]


def device_name(dev: object) -> str:
    name = ffi.string(lib.ggml_backend_dev_name(dev)).decode("utf-8", "replace")
    desc = ffi.string(lib.ggml_backend_dev_description(dev)).decode("utf-8", "replace")
    return f"{name} ({desc})"


def start_server(endpoint: Endpoint, n_threads: int, served: Sequence[object]) -> None:
    """ggml's RPC server on `endpoint` for `served` devices: blocks while it serves (one
    client at a time), returns only if it could not start (the port is taken)."""
    start = _proc(
        "ggml_backend_rpc_start_server",
        "void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *)",
    )
    array = ffi.new("ggml_backend_dev_t[]", list(served))
    start(str(endpoint).encode(), ffi.NULL, n_threads, len(served), array)  # type: ignore[operator]
