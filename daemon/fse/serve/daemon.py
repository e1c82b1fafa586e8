"""The daemon's life: load, bind, serve, reload on SIGHUP, drain on SIGTERM, stop.

`serve()` composes the parts in the order the fail-closed promises depend on: every
check that needs no model runs before anything is bound; nothing serves before the
model is loaded and the audit log is open; nothing is accepted after SIGTERM; every
stream ends with a verdict. Each part is built whole by one function below.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fse.core.errors import EngineError, InputError
from fse.core.gguf import ModelError, check_gguf, default_model_path, file_sha256
from fse.core.model import Model, tensor_split
from fse.core.placement import is_rpc
from fse.core.policy import Policy, PolicyError, load_policies
from fse.serve.audit import AuditError, AuditLog
from fse.serve.auth import AuthInterceptor, TokenTable
from fse.serve.config import Settings
from fse.serve.listeners import (
    Listener,
    StartupError,
    bind,
    check_plain_tcp,
    open_unix_socket,
    parse_listen,
    private_umask,
    ssl_context,
    tls_credentials,
)
from fse.serve.logs import configure_logging
from fse.serve.memory import keep_request_buffers_in_the_heap
from fse.serve.metrics import MetricsSink, start_metrics
from fse.serve.notify import Notifier
from fse.serve.refusals import RefusalLog
from fse.serve.relay import UnixRelay, watch_sockets
from fse.serve.reload import PolicyReloader
from fse.serve.rpcwatch import RpcWatch, add_workers
from fse.serve.scheduler import Limits
from fse.serve.service import GuardService
from fse.serve.servicer import MAX_MESSAGE_BYTES, GuardServicer, add_to_server

if TYPE_CHECKING:
    from fse.serve.http import HttpDoor

log = structlog.get_logger("fse.serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = fse_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
# After the drain, how long the decode thread may take to halt what is left.
SHUTDOWN_SECONDS = 5.0


async def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    began = time.monotonic()
    plan = await Plan.check(settings)
    metrics = start_metrics(settings.metrics.listen)  # off when empty; bind errors stop here
    health = Health(asyncio.get_running_loop(), metrics, plan.audit_path)
    audit = open_audit(settings, plan.audit_path, health.audit_changed)
    refusals = RefusalLog(audit.write)  # denials and rejections, within bounds
    servicer = GuardServicer(settings.server.per_client_streams, metrics)
    notify = Notifier.from_environment()
    relays: list[UnixRelay] = []
    server: grpc.aio.Server | None = None
    probes: grpc.aio.Server | None = None
    http: HttpDoor | None = None
    try:
        open_relays(plan.listeners, settings, relays)
        server = await start_server(plan, settings, servicer, health, refusals, metrics, relays)
        probes = await start_health_server(plan, health)
        if plan.http_listeners:  # bound now, so a port in use stops the start before the model
            from fse.serve.http import HttpDoor  # aiohttp: imported only when asked for

            http = HttpDoor(
                plan.http_listeners,
                plan.http_ssl,
                plan.tokens,
                servicer.places,
                refusals,
                health.is_serving,
                metrics,
            )
            await http.start()
        service = await load_service(settings, plan, audit, refusals, metrics, notify)
        servicer.model_loaded(service)
        if http is not None:
            http.model_loaded(service)
        asyncio.get_running_loop().run_in_executor(None, _hash_model, servicer, plan, metrics)
        announce(settings, plan, service, audit, time.monotonic() - began)
        watch = RpcWatch.of(settings, service, audit)
        parts = Running(plan, service, audit, refusals, server, health, notify, http, watch)
        lost: list[str] = []  # a unix socket gone while serving: drain, then exit 1
        sockets = asyncio.get_running_loop().create_task(
            _stop_if_a_socket_is_lost(relays, audit, lost)
        )
        try:
            code = await parts.until_stopped(settings)
        finally:
            sockets.cancel()
        return 1 if lost else code
    except BaseException:
        # A start that fails after the server started (no model, no memory for the
        # context) stops it here; left to its destructor, it fails once the loop is gone.
        if server is not None:
            await server.stop(None)
        if http is not None:
            await http.stop()
        raise
    finally:
        if probes is not None:  # NOT_SERVING since the drain began; the last to close
            await probes.stop(None)
        for relay in relays:
            await relay.close()
        await asyncio.to_thread(metrics.close)


@dataclass(frozen=True)
class Plan:
    """What the settings ask for, checked before anything is bound or loaded."""

    listeners: list[Listener]
    creds: grpc.ServerCredentials | None
    tokens: TokenTable | None
    policies: dict[str, Policy]
    model_path: Path
    audit_path: str  # absolute, as logged and printed
    http_listeners: list[Listener]  # the OpenAI-compatible API's (none: off)
    http_ssl: ssl.SSLContext | None  # HTTPS, from the same files as gRPC's TLS
    health_listeners: tuple[Listener, ...] = ()  # plain-text grpc.health.v1 only (probes)

    @property
    def targets(self) -> list[str]:
        return [listener.target for listener in self.listeners]

    @property
    def http_targets(self) -> list[str]:
        scheme = "https" if self.http_ssl is not None else "http"
        return [f"{scheme}://{listener.target}" for listener in self.http_listeners]

    @classmethod
    async def check(cls, settings: Settings) -> Plan:
        listeners = [parse_listen(a) for a in settings.server.listen]
        creds = tls_credentials(settings.tls)
        exposed = check_plain_tcp(listeners, creds is not None, settings.server.allow_insecure_tcp)
        for target in exposed:
            log.warning("listen.insecure_tcp", listen=target, reason="allow_insecure_tcp")
        http_listeners = [
            parse_listen(a, "--http-listen", unix=False) for a in settings.http.listen
        ]
        http_ssl = ssl_context(settings.tls) if http_listeners else None
        exposed = check_plain_tcp(
            http_listeners,
            http_ssl is not None,
            settings.server.allow_insecure_tcp,
            key="--http-listen",
        )
        for target in exposed:
            log.warning("http.insecure_tcp", listen=target, reason="allow_insecure_tcp")
        tokens_file = settings.auth.tokens_file
        tokens = TokenTable.load(tokens_file) if tokens_file else None
        policies = await load_policy_set(settings.policies.dir)  # invalid: serve nothing
        model_path = settings.model.path or default_model_path()
        check_gguf(model_path)
        audit_path = str(settings.audit.path.absolute())
        health_listeners = tuple(
            parse_listen(a, "--health-listen", unix=False) for a in settings.server.health_listen
        )
        return cls(
            listeners,
            creds,
            tokens,
            policies,
            model_path,
            audit_path,
            http_listeners,
            http_ssl,
            health_listeners,
        )


async def load_policy_set(policies_dir: Path | None) -> dict[str, Policy]:
    """The policies to serve, read in a worker thread (never on the event loop)."""
    try:
        return await asyncio.to_thread(load_policies, policies_dir)
    except PolicyError as exc:
        raise StartupError(f"policies: {exc}") from None


class Health:
    """grpc.health.v1 for the whole daemon: SERVING only once started, until stopping,
    and while the audit log can be written (its health changes on any thread; what is
    reported is decided on the loop, in order with starting and stopping)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, metrics: MetricsSink, audit_path: str
    ) -> None:
        self.servicer = grpc_health.aio.HealthServicer()
        self._loop = loop
        self._metrics = metrics
        self._audit_path = audit_path
        self._serving = False
        self._audit_writable = True

    async def serving(self, on: bool) -> None:
        self._serving = on
        await self._report()

    def is_serving(self) -> bool:
        """What grpc.health.v1 reports: SERVING (True) or NOT_SERVING (the HTTP door's
        GET /health says the same)."""
        return self._serving and self._audit_writable

    def audit_changed(self, writable: bool, error: str) -> None:  # any thread
        if writable:
            log.info("audit.recovered", path=self._audit_path)
        else:
            log.error("audit.write_failed", path=self._audit_path, error=error)
            self._metrics.audit_error()
        self._audit_writable = writable
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._report()))

    async def _report(self) -> None:
        status = SERVING if self._serving and self._audit_writable else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


def open_audit(settings: Settings, path: str, on_health: Callable[[bool, str], None]) -> AuditLog:
    """The audit log, checked and resumed; the last run's orphans recorded."""
    cfg = settings.audit
    try:
        audit = AuditLog(
            Path(path),
            text=cfg.include_text,
            fsync=cfg.fsync,
            fsync_interval_ms=cfg.fsync_interval_ms,
            rotate_bytes=cfg.rotate_bytes,
            keep=cfg.keep,
            key_file=cfg.key_file,
            on_health=on_health,
        )
    except AuditError as exc:
        raise StartupError(str(exc)) from None
    if audit.orphans:  # the last run's streams without a verdict (killed mid-stream)
        log.warning("audit.orphans", path=path, streams=audit.orphans)
        audit.write("audit.orphans", streams=audit.orphans)
    return audit


def open_relays(listeners: list[Listener], settings: Settings, relays: list[UnixRelay]) -> None:
    """gRPC serves each unix socket through a relay that knows the caller's uid; each
    relay is added to `relays` as it opens, so the caller closes them whatever fails."""
    for listener in listeners:
        if listener.socket_path is None:
            continue
        public = open_unix_socket(listener, settings.server)
        try:
            relays.append(UnixRelay(listener.socket_path, public))
        except (ValueError, OSError) as exc:
            public.close()
            listener.socket_path.unlink(missing_ok=True)
            raise StartupError(f"--listen {listener.target}: {exc}") from None


async def start_server(
    plan: Plan,
    settings: Settings,
    servicer: GuardServicer,
    health: Health,
    refusals: RefusalLog,
    metrics: MetricsSink,
    relays: list[UnixRelay],
) -> grpc.aio.Server:
    """The gRPC server on every listener, NOT_SERVING until the model is loaded (its
    servicer answers UNAVAILABLE meanwhile), with the token check in front."""

    def denied(caller: str, reason: str) -> None:
        metrics.rejected("UNAUTHENTICATED")
        if refusals.record("auth.denied", caller, reason):
            log.warning("auth.denied", client=caller, reason=reason)

    def unix_uid(peer: str) -> int | None:
        return next((uid for r in relays if (uid := r.peer_uid(peer)) is not None), None)

    auth = AuthInterceptor(plan.tokens, settings.auth.require_on_unix, denied, unix_uid)
    server = grpc.aio.server(
        interceptors=[auth],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await health.serving(False)
    try:
        with private_umask():
            for relay in relays:
                bind(server, relay.inner_target, None, f"unix:{relay.public}")
            for listener in plan.listeners:
                if not listener.is_unix:
                    bind(server, listener.target, plan.creds, listener.target)
            await server.start()
        for relay in relays:
            await relay.start()
    except BaseException:
        await server.stop(None)
        raise
    log.info(
        "server.listening",
        listen=plan.targets,
        tls=plan.creds is not None,
        auth=plan.tokens is not None,
    )
    return server


async def start_health_server(plan: Plan, health: Health) -> grpc.aio.Server | None:
    """grpc.health.v1 alone, in plain text, on `server.health_listen` (none: off): for
    probes that cannot speak TLS or send tokens, such as Kubernetes' grpc probes. It
    reports what the main listeners' health service reports, and serves nothing else (no
    fse.v1.Guard, no reflection), so it opens no way around TLS or tokens."""
    if not plan.health_listeners:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    try:
        for listener in plan.health_listeners:
            try:
                server.add_insecure_port(listener.target)
            except RuntimeError as exc:
                raise StartupError(
                    f"--health-listen {listener.target}: cannot bind: {exc}"
                ) from None
        await server.start()
    except BaseException:
        await server.stop(None)
        raise
    log.info("health.listening", listen=[listener.target for listener in plan.health_listeners])
    return server


async def load_service(
    settings: Settings,
    plan: Plan,
    audit: AuditLog,
    refusals: RefusalLog,
    metrics: MetricsSink,
    notify: Notifier,
) -> GuardService:
    """The model (loaded in a worker thread) and the guard service decoding it."""
    notify.send(f"STATUS=loading {plan.model_path.name}")
    cfg_model = settings.model
    if cfg_model.rpc:  # the workers' devices, registered before the load splits the model
        await asyncio.to_thread(add_workers, cfg_model.rpc)
    try:
        model = await asyncio.to_thread(
            Model,
            plan.model_path,
            verbose=settings.verbose,
            gpu_layers=cfg_model.gpu_layers,
            main_gpu=cfg_model.main_gpu,
            split_mode=cfg_model.split_mode,
            split=tensor_split(cfg_model.tensor_split),
        )
    except InputError as exc:  # GPU layers asked for where there is no GPU; a bad split
        raise StartupError(f"model.{exc}") from None
    if settings.model.chat_template:
        model.use_chat_template(settings.model.chat_template)
    cfg = settings.server
    limits = Limits(cfg.max_streams, cfg.max_queue, cfg.ctx_per_stream, cfg.max_tokens_limit)
    if limits.ctx_per_stream > model.n_ctx_train:
        log.warning(
            "config.ctx_beyond_training",
            ctx_per_stream=limits.ctx_per_stream,
            n_ctx_train=model.n_ctx_train,
        )
    try:
        service = GuardService(
            model,
            plan.policies,
            limits,
            n_threads=cfg.threads,
            allow_faults=settings.allow_debug_faults,
            audit=audit,
            refusals=refusals,
            metrics=metrics,
            graph_stats=settings.model.graph_stats,
        )
    except EngineError as exc:  # the context for every stream is allocated here, at once
        raise StartupError(
            f"server.ctx_per_stream x server.max_streams: {limits.ctx_per_stream} x "
            f"{limits.max_streams} = {limits.ctx_per_stream * limits.max_streams} tokens "
            f"of context cannot be allocated ({exc}); accepted: a smaller ctx_per_stream "
            "or max_streams"
        ) from None
    service.start()
    metrics.placement((d.name, d.description, d.layers) for d in service.placement.devices)
    return service


def announce(
    settings: Settings, plan: Plan, service: GuardService, audit: AuditLog, seconds: float
) -> None:
    """The start, in the audit log, the daemon's log and on stderr for the operator."""
    policies = service.policies
    audit.write("policy.loaded", policies={p.name: p.sha256 for p in policies.values()})
    audit.write(
        "server.started",
        version=service.version,
        listen=plan.targets,
        http_listen=plan.http_targets or None,
        model=str(plan.model_path),
        rpc_workers=list(settings.model.rpc) or None,  # the hosts that compute its layers
        pid=os.getpid(),
        max_streams=service.limits.max_streams,
        tls=plan.creds is not None,
        auth=plan.tokens is not None,
        allow_debug_faults=settings.allow_debug_faults,
    )
    log.info(
        "server.started",
        listen=plan.targets,
        http_listen=plan.http_targets,
        model=str(plan.model_path),
        gpu_layers=service.model.gpu_layers,
        n_layer=service.model.n_layer,
        policies=sorted(policies),
        max_streams=service.limits.max_streams,
        audit_log=plan.audit_path,
        seconds_to_serving=round(seconds, 3),
    )
    model = service.model
    where = (
        f"{model.gpu_layers} of {model.n_layer} layers and the output layer on a GPU"
        if model.n_gpu_layers
        else "CPU"
    )
    if any(is_rpc(d.name) for d in service.placement.devices):  # which worker holds what
        held = [d for d in service.placement.devices if d.layers]
        where = f"{model.gpu_layers} of {model.n_layer} layers and the output layer offloaded; "
        where += ", ".join(
            f"{d.name} ({d.description}): {d.layers} layers"
            if is_rpc(d.name)
            else f"{d.name}: {d.layers} layers"
            for d in held
        )
    http = ""
    if plan.http_targets:
        http = f"; OpenAI-compatible API on {', '.join(f'{t}/v1' for t in plan.http_targets)}"
    print(
        f"fse: serving {model.name} ({where}) on {', '.join(plan.targets)}{http}; audit log "
        f"{plan.audit_path}\n"
        f'try: {_executable()} generate --addr {plan.targets[0]} "The capital of France is"',
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class Running:
    """The parts of a started daemon, and how it stops."""

    plan: Plan
    service: GuardService
    audit: AuditLog
    refusals: RefusalLog
    server: grpc.aio.Server
    health: Health
    notify: Notifier
    http: HttpDoor | None = None
    rpc: RpcWatch | None = None  # with RPC workers: a lost one fails the daemon closed

    async def until_stopped(self, settings: Settings) -> int:
        """Serve until SIGTERM/SIGINT (SIGHUP reloads the policies), then drain and
        stop; the exit code: 1 if a kept audit line was lost or decoding did not stop."""
        service, audit, notify = self.service, self.audit, self.notify
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloader = PolicyReloader(
            settings.policies.dir, service.replace_policies, audit.write, notify, service.status
        )
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        # SERVING and READY=1 only once the signals are ours: a reload asked for right
        # after them must not meet SIGHUP's default action (exit) or an inherited SIG_IGN
        # (lost), nor a stop meet SIGTERM's default (no drain).
        await self.health.serving(True)
        notify.send("READY=1", service.status())
        background = [loop.create_task(_retry_audit(audit)), *notify.tasks(service)]
        if self.rpc is not None:
            background.append(self.rpc.start(stop, lambda: self.health.serving(False)))
        await stop.wait()
        # No reload while stopping: a READY=1 after STOPPING=1 would tell systemd it runs again.
        loop.add_signal_handler(
            signal.SIGHUP, lambda: log.warning("reload.ignored", why="stopping")
        )
        await reloader.stop()

        return await self._drain_and_stop(settings.server.drain_seconds, stop, background)

    async def _drain_and_stop(
        self, drain: float, stop: asyncio.Event, background: list[asyncio.Task[None]]
    ) -> int:
        """Refuse new streams, let running ones finish for up to `drain` seconds (a second
        signal cuts that short), halt the rest, and close the audit log last."""
        plan, service, audit, notify = self.plan, self.service, self.audit, self.notify
        notify.send("STOPPING=1", f"STATUS=draining for up to {drain:g} s")
        log.info("server.stopping", drain_seconds=drain)
        audit.write("server.stopping", drain_seconds=drain)
        await self.health.serving(False)
        service.scheduler.stop_accepting()
        # A second SIGTERM or SIGINT cuts the drain short: what runs halts with `shutdown`.
        stop.clear()
        drain_until = time.monotonic() + drain
        while service.scheduler.load != (0, 0) and time.monotonic() < drain_until:
            if stop.is_set():
                log.warning("server.drain_cut_short")
                break
            await asyncio.sleep(0.05)
        # What is left halts with guard `shutdown`. A decode thread stuck in llama_decode
        # (the watchdog's case) cannot be stopped: exit without it; its streams' clients see
        # UNAVAILABLE and the next start records them as orphans.
        # A decode given up for lost (a lost RPC worker) is not waited for.
        wait = 0.0 if service.scheduler.abandoned else SHUTDOWN_SECONDS
        stopped = await asyncio.to_thread(service.shutdown, wait)
        # Both doors close; streams still running (halted by now) write their last words.
        await asyncio.gather(
            self.server.stop(grace=2.0), self.http.stop() if self.http else asyncio.sleep(0)
        )
        if stopped:
            service.model.close()
        for task in background:
            task.cancel()
        self.refusals.flush()  # the last window's summaries: no refusal goes uncounted
        written = audit.retry()  # a last try for lines kept while the log failed
        audit.close()
        # The chain's head, for checking later that no line was cut off the end.
        log.info("audit.head", path=plan.audit_path, seq=audit.head.seq, sha256=audit.head.hash)
        if not written:
            log.error("audit.lost", path=plan.audit_path, error=audit.error)
            return 1
        if not stopped or (self.rpc is not None and self.rpc.lost is not None):
            return 1
        log.info("server.stopped")
        return 0


async def _stop_if_a_socket_is_lost(
    relays: list[UnixRelay], audit: AuditLog, lost: list[str]
) -> None:
    """A unix socket removed or replaced while serving (its directory deleted, say): no
    new client can reach the daemon there. Stop as SIGTERM does (NOT_SERVING at once,
    running streams may finish within drain_seconds) and exit 1, so that the supervisor
    (systemd's Restart=on-failure, a Kubernetes container restart) starts it afresh."""
    relay = await watch_sockets(relays)
    lost.append(str(relay.public))
    log.error("listen.socket_lost", path=str(relay.public), action="stopping, exit code 1")
    audit.write("server.socket_lost", path=str(relay.public))
    os.kill(os.getpid(), signal.SIGTERM)


async def _retry_audit(audit: AuditLog, every: float = 0.5) -> None:
    """While the audit log fails, keep trying; it reports SERVING again itself."""
    while True:
        await asyncio.sleep(every)
        if not audit.healthy:
            audit.retry()


def _hash_model(servicer: GuardServicer, plan: Plan, metrics: MetricsSink) -> None:
    """The GGUF's sha256, for GetInfo and fse_build_info (hashing takes a while)."""
    sha256 = file_sha256(plan.model_path)
    servicer.model_hashed(sha256)
    metrics.build_info(sha256)


def _executable() -> str:
    """How the operator can run `fse` again: the command on PATH, or what started us."""
    if shutil.which("fse") == sys.argv[0]:
        return "fse"
    if sys.argv[0].endswith(".py"):  # python -m fse.cli
        return f"{sys.executable} -m fse.cli"
    return os.path.abspath(sys.argv[0])


def run(settings: Settings) -> int:
    configure_logging()
    keep_request_buffers_in_the_heap(MAX_MESSAGE_BYTES)
    try:
        code = asyncio.run(serve(settings))
    except (StartupError, ModelError, InputError, EngineError) as exc:
        print(f"fse serve: error: {exc}", file=sys.stderr)
        code = 1
    if settings.model.rpc:
        # ggml-rpc's threads may wait on a lost worker for good, and C++'s static
        # destructors at exit would join them: leave without running those.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
