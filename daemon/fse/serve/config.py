"""The daemon's settings: one TOML file (`fse serve --config`, /etc/fse/fse.toml for the
service), every key also settable by a flag, and flags win.

Every key is declared once in KEYS: its section and name, type, default, the check of
its value and the words for what it accepts. Loading is strict, as for policies: an
unknown section or key, a wrong type (a bool is not a number, an integer is accepted
where a float is expected) or a value out of range is an InputError naming the dotted
key (or the flag that gave it) and what is accepted. The result is a frozen Settings
whose sections the daemon reads; nothing else parses configuration.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fse.core import toml_writer
from fse.core.engine import MAX_THREADS
from fse.core.errors import InputError
from fse.core.files import FileRefused, read_trusted
from fse.core.model import GPU_LAYERS_ACCEPTED, GPU_LAYERS_AUTO, parse_gpu_layers, tensor_split
from fse.core.placement import GRAPH_STATS_MODES
from fse.core.rpc import ADDRESS_ACCEPTED, check_endpoints, parse_endpoint
from fse.core.values import check, wrong_type
from fse.serve.audit import FSYNC_MODES


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: `section.name` in the file, `flag` on the command line."""

    section: str
    name: str
    kind: Any  # bool, int, float, str, list (of str), or int | str (a count or a word)
    default: Any
    accepted: str
    check: Callable[[Any], bool] = lambda _: True
    flag: str = ""
    metavar: str = ""  # how --help names a list key's item (default: unix:PATH|HOST:PORT)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def _between(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: low <= v <= high


def _gpu_layers(v: int | str) -> bool:
    try:
        return parse_gpu_layers(v) == v  # "20" from a file stays text: a count is an integer
    except InputError:
        return False


def _mode(v: str) -> bool:
    return len(v) in (3, 4) and all(c in "01234567" for c in v)


def listen_address(addr: str) -> str | tuple[str, int] | None:
    """What a listen address names: the socket path of unix:PATH (PATH not empty), the
    (host, port) of HOST:PORT (PORT 0..65535; an IPv6 host in brackets, [::1]:7000, given
    back without them), or None when `addr` is neither. The one grammar of listen
    addresses: the config file's and the flags' check, and fse.serve.listeners.parse_listen
    (the daemon's listeners, metrics.listen). A bare IPv6 address (::1:7000) is not one:
    gRPC would read it as another address and port."""
    if addr.startswith("unix:"):
        return addr.removeprefix("unix:").removeprefix("//") or None
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif ":" in host:
        return None
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host, int(port)


def _split_shares(v: str) -> bool:
    """The model's own reading of tensor_split, so the config check and the load agree."""
    try:
        tensor_split(v)
    except InputError:
        return False
    return True


def _address_list(v: list[str]) -> bool:
    return len(v) >= 1 and all(isinstance(a, str) and listen_address(a) is not None for a in v)


def _rpc_list(v: list[str]) -> bool:
    """RPC workers' HOST:PORT addresses, as ggml-rpc reads them (none: no workers)."""
    try:
        return all(isinstance(a, str) and parse_endpoint(a, "") for a in v)
    except InputError:
        return False


def _tcp_address_list(v: list[str]) -> bool:
    """HOST:PORT addresses only (none: off): the HTTP door has no unix sockets."""
    return all(isinstance(a, str) and isinstance(listen_address(a), tuple) for a in v)


KEYS: tuple[Key, ...] = (
    Key("server", "listen", list, ["unix:fse.sock"],
        "a non-empty list of unix:PATH (PATH not empty) or HOST:PORT (PORT 0..65535)",
        _address_list, "--listen"),
    Key("server", "socket_mode", str, "0660", 'an octal string such as "0660"', _mode,
        "--socket-mode"),
    Key("server", "socket_group", str, "", "a group name (empty: the daemon's own group)"),
    Key("server", "max_streams", int, 8, "integer 1..256", _between(1, 256), "--max-streams"),
    Key("server", "max_queue", int, 16, "integer 0..4096", _between(0, 4096), "--max-queue"),
    Key("server", "per_client_streams", int, 0, "integer 0..4096 (0 = no per-caller limit)",
        _between(0, 4096), "--per-client-streams"),
    Key("server", "ctx_per_stream", int, 2048, "integer 16..1048576", _between(16, 1 << 20),
        "--ctx-per-stream"),
    Key("server", "max_tokens_limit", int, 0,
        "integer 0..ctx_per_stream-1 (0 = ctx_per_stream - 1)", _between(0, 1 << 20),
        "--max-tokens-limit"),
    Key("server", "drain_seconds", float, 10.0, "seconds 0..3600", _between(0, 3600),
        "--drain-seconds"),
    Key("server", "threads", int, 0, f"integer 0..{MAX_THREADS} (0 = all cores)",
        _between(0, MAX_THREADS), "--threads"),
    Key("server", "allow_insecure_tcp", bool, False, "true or false", flag="--allow-insecure-tcp"),
    Key("server", "health_listen", list, [],
        "a list of HOST:PORT (PORT 0..65535) serving grpc.health.v1 only, in plain text, for "
        "probes such as Kubernetes' grpc probes (empty: off)",
        _tcp_address_list, "--health-listen", "HOST:PORT"),
    Key("model", "path", str, "", "a GGUF file path (empty: the embedded default model)",
        flag="--model"),
    Key("model", "gpu_layers", int | str, GPU_LAYERS_AUTO, GPU_LAYERS_ACCEPTED, _gpu_layers,
        "--gpu-layers"),
    Key("model", "main_gpu", int, 0, "integer 0..255 (the GPU for split_mode none)",
        _between(0, 255), "--main-gpu"),
    Key("model", "split_mode", str, "layer", "none, layer or row (llama.cpp's split modes)",
        lambda v: v in ("none", "layer", "row"), "--split-mode"),
    Key("model", "tensor_split", str, "",
        'comma-separated shares, one per GPU, such as "3,1" (empty: by free memory)',
        _split_shares, "--tensor-split"),
    Key("model", "chat_template", str, "",
        "a llama.cpp built-in template name such as chatml (empty: the GGUF's own)",
        flag="--chat-template"),
    Key("model", "rpc", list, [],
        f"a list of RPC workers (`fse rpc-worker`), each {ADDRESS_ACCEPTED}: the model's "
        "layers are split across their devices (empty: none; docs/rpc.md)",
        _rpc_list, "--rpc", "HOST:PORT"),
    Key("model", "allow_remote_rpc", bool, False,
        "true or false (true: RPC workers on non-loopback addresses, over a tunnel)",
        flag="--allow-remote-rpc"),
    Key("model", "graph_stats", str, "auto",
        "auto, on or off (where the per-step statistics are computed: on, in llama.cpp's "
        "graph, so only they come back from the device; auto: on when the layers are on a "
        "local GPU)", lambda v: v in GRAPH_STATS_MODES, "--graph-stats"),
    Key("model", "rpc_stall_seconds", float, 30.0,
        "seconds 1..3600: a decode step waiting this long on the RPC workers counts as a "
        "lost worker (fail closed)", _between(1, 3600), "--rpc-stall-seconds"),
    Key("policies", "dir", str, "", "a directory of NAME.toml policies (empty: built-ins only)",
        flag="--policies-dir"),
    Key("audit", "path", str, "fse-audit.jsonl", "a file path", lambda v: bool(v), "--audit-log"),
    Key("audit", "include_text", bool, False, "true or false", flag="--audit-text"),
    Key("audit", "fsync", str, "interval", ", ".join(FSYNC_MODES), lambda v: v in FSYNC_MODES,
        "--audit-fsync"),
    Key("audit", "fsync_interval_ms", int, 1000, "integer 1..60000", _between(1, 60000)),
    Key("audit", "rotate_bytes", int, 64 << 20, "integer 0 (never) or 4096..2^40",
        lambda v: v == 0 or 4096 <= v <= 1 << 40, "--audit-rotate-bytes"),
    Key("audit", "keep", int, 10, "integer 1..10000", _between(1, 10000)),
    Key("audit", "key_file", str, "", "a file holding the audit HMAC key (empty: unkeyed)",
        flag="--audit-key-file"),
    Key("tls", "cert", str, "", "a PEM certificate chain file", flag="--tls-cert"),
    Key("tls", "key", str, "", "a PEM private key file", flag="--tls-key"),
    Key("tls", "client_ca", str, "", "a PEM CA file (set: clients need a certificate)",
        flag="--tls-client-ca"),
    Key("auth", "tokens_file", str, "", 'a file of "NAME SHA256HEX" lines', flag="--auth-tokens"),
    Key("auth", "require_on_unix", bool, False, "true or false"),
    Key("metrics", "listen", str, "", "HOST:PORT (empty: off)", flag="--metrics-listen"),
    Key("http", "listen", list, [],
        "a list of HOST:PORT (PORT 0..65535) for the OpenAI-compatible HTTP API (empty: off)",
        _tcp_address_list, "--http-listen", "HOST:PORT"),
)  # fmt: skip
_BY_DOTTED = {k.dotted: k for k in KEYS}
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS))


def _path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[str, ...]
    socket_mode: int
    socket_group: str
    max_streams: int
    max_queue: int
    per_client_streams: int
    ctx_per_stream: int
    max_tokens_limit: int  # resolved: never 0
    drain_seconds: float
    threads: int  # resolved: never 0
    allow_insecure_tcp: bool
    health_listen: tuple[str, ...] = ()  # plain-text grpc.health.v1 only; () = off


@dataclass(frozen=True, slots=True)
class ModelSettings:
    path: Path | None
    chat_template: str
    gpu_layers: int | str = GPU_LAYERS_AUTO  # "auto", "all", or N layers (0: the CPU)
    main_gpu: int = 0
    split_mode: str = "layer"
    tensor_split: str = ""  # "3,1": the share of each GPU
    rpc: tuple[str, ...] = ()  # RPC workers' HOST:PORT (docs/rpc.md)
    allow_remote_rpc: bool = False
    rpc_stall_seconds: float = 30.0
    graph_stats: str = "auto"  # auto, on, off (fse.core.placement.graph_stats_for)


@dataclass(frozen=True, slots=True)
class PoliciesSettings:
    dir: Path | None


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: Path
    include_text: bool
    fsync: str
    fsync_interval_ms: int
    rotate_bytes: int
    keep: int
    key_file: Path | None


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path | None
    key: Path | None
    client_ca: Path | None


@dataclass(frozen=True, slots=True)
class AuthSettings:
    tokens_file: Path | None
    require_on_unix: bool


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: str


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: tuple[str, ...]  # HOST:PORT addresses of the OpenAI-compatible API; () = off


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    model: ModelSettings
    policies: PoliciesSettings
    audit: AuditSettings
    tls: TlsSettings
    auth: AuthSettings
    metrics: MetricsSettings
    http: HttpSettings
    # Not in the file: for a debugging session only, never for a service.
    allow_debug_faults: bool = False
    verbose: bool = False


def _checked(key: Key, value: object, where: str) -> Any:
    """The value, type- and range-checked (fse.core.values); `where` is how the error
    names it."""
    return check(where, value, key.kind, key.check, key.accepted)


def read_file(path: Path) -> dict[str, Any]:
    """The file's keys as {dotted: value}, each checked; unknown ones are errors.

    The file is read as fse.core.files reads every trusted file: a regular file only,
    and refused if its group or others may write it (it names the tokens file, the TLS
    files and the policies)."""
    try:
        doc = tomllib.loads(read_trusted(path).decode("utf-8"))
    except FileRefused as exc:
        raise InputError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level: [[[[...]]]] exhausts the stack
        raise InputError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise InputError(f"{path}: {section}: unknown section; accepted: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise wrong_type(f"{path}: {section}", table, dict)
        for name, value in table.items():
            key = _BY_DOTTED.get(f"{section}.{name}")
            if key is None:
                known = ", ".join(k.name for k in KEYS if k.section == section)
                raise InputError(f"{path}: {section}.{name}: unknown key; accepted: {known}")
            values[key.dotted] = _checked(key, value, f"{path}: {key.dotted}")
    return values


def load(path: Path | None, overrides: Mapping[str, Any], **extra: bool) -> Settings:
    """Defaults, then the file (if any), then the flags given (`overrides`, by dotted key)."""
    values = {k.dotted: k.default for k in KEYS}
    if path is not None:
        values.update(read_file(path))
    for dotted, value in overrides.items():
        key = _BY_DOTTED[dotted]
        values[dotted] = _checked(key, value, key.flag or dotted)
    return _build(values, overrides, **extra)


def _build(values: dict[str, Any], overrides: Mapping[str, Any], **extra: bool) -> Settings:
    def name(dotted: str) -> str:
        key = _BY_DOTTED[dotted]
        return key.flag if dotted in overrides and key.flag else dotted

    ctx = values["server.ctx_per_stream"]
    max_tokens = values["server.max_tokens_limit"] or ctx - 1
    if max_tokens > ctx - 1:
        raise InputError(
            f"{name('server.max_tokens_limit')}: {max_tokens} does not fit the context of "
            f"{ctx} tokens per stream; accepted: 1..{ctx - 1} (0 = {ctx - 1})"
        )
    threads = values["server.threads"] or min(os.cpu_count() or 2, MAX_THREADS)
    for dotted in ("tls.cert", "tls.key"):
        other = "tls.key" if dotted == "tls.cert" else "tls.cert"
        if values[dotted] and not values[other]:
            raise InputError(f"{name(other)}: required with {name(dotted)}")
    if values["tls.client_ca"] and not values["tls.cert"]:
        raise InputError(f"{name('tls.cert')}: required with {name('tls.client_ca')}")
    check_endpoints(
        values["model.rpc"],
        allow_remote=values["model.allow_remote_rpc"],
        key=name("model.rpc"),
        allow="model.allow_remote_rpc = true (--allow-remote-rpc)",
    )
    return Settings(
        server=ServerSettings(
            listen=tuple(values["server.listen"]),
            socket_mode=int(values["server.socket_mode"], 8),
            socket_group=values["server.socket_group"],
            max_streams=values["server.max_streams"],
            max_queue=values["server.max_queue"],
            per_client_streams=values["server.per_client_streams"],
            ctx_per_stream=ctx,
            max_tokens_limit=max_tokens,
            drain_seconds=values["server.drain_seconds"],
            threads=threads,
            allow_insecure_tcp=values["server.allow_insecure_tcp"],
            health_listen=tuple(values["server.health_listen"]),
        ),
        model=ModelSettings(
            _path(values["model.path"]),
            values["model.chat_template"],
            parse_gpu_layers(values["model.gpu_layers"]),
            values["model.main_gpu"],
            values["model.split_mode"],
            values["model.tensor_split"],
            tuple(values["model.rpc"]),
            values["model.allow_remote_rpc"],
            values["model.rpc_stall_seconds"],
            values["model.graph_stats"],
        ),
        policies=PoliciesSettings(_path(values["policies.dir"])),
        audit=AuditSettings(
            path=Path(values["audit.path"]).expanduser(),
            include_text=values["audit.include_text"],
            fsync=values["audit.fsync"],
            fsync_interval_ms=values["audit.fsync_interval_ms"],
            rotate_bytes=values["audit.rotate_bytes"],
            keep=values["audit.keep"],
            key_file=_path(values["audit.key_file"]),
        ),
        tls=TlsSettings(
            _path(values["tls.cert"]), _path(values["tls.key"]), _path(values["tls.client_ca"])
        ),
        auth=AuthSettings(_path(values["auth.tokens_file"]), values["auth.require_on_unix"]),
        metrics=MetricsSettings(values["metrics.listen"]),
        http=HttpSettings(tuple(values["http.listen"])),
        **extra,
    )


def to_toml(settings: Settings) -> str:
    """The effective settings as a config file. Only paths are printed, never a file's
    content, so no key, token hash or certificate ever reaches the output."""
    tables: dict[str, dict[str, object]] = {}
    for section in SECTIONS:
        obj = getattr(settings, section)
        tables[section] = {f.name: getattr(obj, f.name) for f in fields(obj)}
    tables["server"]["socket_mode"] = f"{settings.server.socket_mode:04o}"
    return toml_writer.document({}, tables)
