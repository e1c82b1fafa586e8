"""The daemon's life: load, bind, serve, reload on SIGHUP, drain on SIGTERM, stop.

`serve()` wires the parts together (policies, audit log, gRPC server and its
servicers, model, guard service) and owns the order of events that the fail-closed
promises depend on: nothing serves before the model is loaded and the audit log is
open; nothing is accepted after SIGTERM; every stream ends with a verdict.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc
import structlog
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fse.core.errors import EngineError, InputError
from fse.core.gguf import ModelError, check_gguf, default_model_path
from fse.core.model import Model
from fse.core.policy import Policy, PolicyError, load_policies
from fse.serve.audit import AuditError, AuditLog
from fse.serve.auth import AuthInterceptor, TokenTable
from fse.serve.config import Settings
from fse.serve.listeners import (
    StartupError,
    bind,
    check_plain_tcp,
    open_unix_socket,
    parse_listen,
    private_umask,
    tls_credentials,
)
from fse.serve.logs import configure_logging
from fse.serve.memory import keep_request_buffers_in_the_heap
from fse.serve.metrics import MetricsSink, start_metrics
from fse.serve.notify import Notifier
from fse.serve.refusals import RefusalLog
from fse.serve.relay import UnixRelay
from fse.serve.reload import PolicyReloader
from fse.serve.scheduler import Limits
from fse.serve.service import GuardService
from fse.serve.servicer import MAX_MESSAGE_BYTES, GuardServicer, add_to_server

log = structlog.get_logger("fse.serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = fse_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
# After the drain, how long the decode thread may take to halt what is left.
SHUTDOWN_SECONDS = 5.0


async def load_policy_set(policies_dir: Path | None) -> dict[str, Policy]:
    """The policies to serve, read in a worker thread (never on the event loop)."""
    try:
        return await asyncio.to_thread(load_policies, policies_dir)
    except PolicyError as exc:
        raise StartupError(f"policies: {exc}") from None


def _executable() -> str:
    """How the operator can run `fse` again: the command on PATH, or what started us."""
    if shutil.which("fse") == sys.argv[0]:
        return "fse"
    if sys.argv[0].endswith(".py"):  # python -m fse.cli
        return f"{sys.executable} -m fse.cli"
    return os.path.abspath(sys.argv[0])


async def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    began = time.monotonic()
    server_cfg = settings.server
    listeners = [parse_listen(a) for a in server_cfg.listen]
    creds = tls_credentials(settings.tls)
    for exposed in check_plain_tcp(listeners, creds is not None, server_cfg.allow_insecure_tcp):
        log.warning("listen.insecure_tcp", listen=exposed, reason="allow_insecure_tcp")
    tokens = TokenTable.load(settings.auth.tokens_file) if settings.auth.tokens_file else None
    targets = [lst.target for lst in listeners]
    policies = await load_policy_set(settings.policies.dir)  # invalid at start: serve nothing
    model_path = settings.model.path or default_model_path()
    check_gguf(model_path)
    metrics = start_metrics(settings.metrics.listen)  # off when empty; bind errors stop here
    audit_path = str(settings.audit.path.absolute())  # as logged and printed
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()
    serving = False  # what health reports while the audit log can be written
    notify = Notifier.from_environment()

    async def report(status: int) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    def audit_health(writable: bool, error: str) -> None:  # any thread
        if writable:
            log.info("audit.recovered", path=audit_path)
        else:
            log.error("audit.write_failed", path=audit_path, error=error)
            metrics.audit_error()
        loop.call_soon_threadsafe(lambda: loop.create_task(report_audit_health()))

    async def report_audit_health() -> None:  # decided on the loop, in order with stopping
        await report(SERVING if serving and audit.healthy else NOT_SERVING)

    try:
        audit = AuditLog(
            Path(audit_path),
            text=settings.audit.include_text,
            fsync=settings.audit.fsync,
            fsync_interval_ms=settings.audit.fsync_interval_ms,
            rotate_bytes=settings.audit.rotate_bytes,
            keep=settings.audit.keep,
            key_file=settings.audit.key_file,
            on_health=audit_health,
        )
    except AuditError as exc:
        raise StartupError(str(exc)) from None
    if audit.orphans:  # the last run's streams without a verdict (killed mid-stream)
        log.warning("audit.orphans", path=audit_path, streams=audit.orphans)
        audit.write("audit.orphans", streams=audit.orphans)

    # Denials and rejections reach the audit log within bounds (fse.serve.refusals).
    refusals = RefusalLog(audit.write)

    def denied(caller: str, reason: str) -> None:
        metrics.rejected("UNAUTHENTICATED")
        if refusals.record("auth.denied", caller, reason):
            log.warning("auth.denied", client=caller, reason=reason)

    # gRPC serves each unix socket through a relay that knows the caller's uid.
    relays: list[UnixRelay] = []
    server: grpc.aio.Server | None = None
    try:
        for listener in listeners:
            if listener.socket_path is not None:
                public = open_unix_socket(listener, server_cfg)
                try:
                    relays.append(UnixRelay(listener.socket_path, public))
                except (ValueError, OSError) as exc:
                    public.close()
                    listener.socket_path.unlink(missing_ok=True)
                    raise StartupError(f"--listen {listener.target}: {exc}") from None

        def unix_uid(peer: str) -> int | None:
            return next((uid for r in relays if (uid := r.peer_uid(peer)) is not None), None)

        interceptors = [AuthInterceptor(tokens, settings.auth.require_on_unix, denied, unix_uid)]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = GuardServicer(per_client_streams=server_cfg.per_client_streams)
        servicer.metrics = metrics
        add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await report(NOT_SERVING)
        with private_umask():
            for relay in relays:
                bind(server, relay.inner_target, None, f"unix:{relay.public}")
            for listener in listeners:
                if not listener.is_unix:
                    bind(server, listener.target, creds, listener.target)
            await server.start()
        for relay in relays:
            await relay.start()
        log.info("server.listening", listen=targets, tls=creds is not None, auth=tokens is not None)

        notify.send(f"STATUS=loading {model_path.name}")
        model = await asyncio.to_thread(Model, model_path, verbose=settings.verbose)
        if settings.model.chat_template:
            model.use_chat_template(settings.model.chat_template)
        limits = Limits(
            server_cfg.max_streams,
            server_cfg.max_queue,
            server_cfg.ctx_per_stream,
            server_cfg.max_tokens_limit,
        )
        if limits.ctx_per_stream > model.n_ctx_train:
            log.warning(
                "config.ctx_beyond_training",
                ctx_per_stream=limits.ctx_per_stream,
                n_ctx_train=model.n_ctx_train,
            )
        try:
            service = GuardService(
                model,
                policies,
                limits,
                n_threads=server_cfg.threads,
                allow_faults=settings.allow_debug_faults,
                audit=audit,
                refusals=refusals,
            )
        except EngineError as exc:  # the context for every stream is allocated here, at once
            raise StartupError(
                f"server.ctx_per_stream x server.max_streams: {limits.ctx_per_stream} x "
                f"{limits.max_streams} = {limits.ctx_per_stream * limits.max_streams} tokens "
                f"of context cannot be allocated ({exc}); accepted: a smaller ctx_per_stream "
                "or max_streams"
            ) from None
        service.scheduler.metrics = metrics
        metrics.watch(lambda: service.scheduler.load)
        service.start()
        servicer.service = service
        audit.write("policy.loaded", policies={p.name: p.sha256 for p in policies.values()})
        audit.write(
            "server.started",
            version=service.version,
            listen=targets,
            model=str(model_path),
            pid=os.getpid(),
            max_streams=limits.max_streams,
            tls=creds is not None,
            auth=tokens is not None,
            allow_debug_faults=settings.allow_debug_faults,
        )
        serving = True
        if audit.healthy:
            await report(SERVING)
        background = [loop.create_task(_retry_audit(audit))]
        log.info(
            "server.started",
            listen=targets,
            model=str(model_path),
            policies=sorted(policies),
            max_streams=limits.max_streams,
            audit_log=audit_path,
            seconds_to_serving=round(time.monotonic() - began, 3),
        )
        print(
            f"fse: serving {model.name} on {', '.join(targets)}; audit log {audit_path}\n"
            f'try: {_executable()} generate --addr {targets[0]} "The capital of France is"',
            file=sys.stderr,
            flush=True,
        )
        asyncio.get_running_loop().run_in_executor(None, _hash_model, servicer, model_path, metrics)
        notify.send("READY=1", service.status())
        background += notify.tasks(service)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        reloader = PolicyReloader(
            settings.policies.dir, service.replace_policies, audit.write, notify, service.status
        )
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        await stop.wait()
        # No reload while stopping: a READY=1 after STOPPING=1 would tell systemd it runs again.
        loop.add_signal_handler(
            signal.SIGHUP, lambda: log.warning("reload.ignored", why="stopping")
        )
        await reloader.stop()

        drain = server_cfg.drain_seconds
        notify.send("STOPPING=1", f"STATUS=draining for up to {drain:g} s")
        log.info("server.stopping", drain_seconds=drain)
        audit.write("server.stopping", drain_seconds=drain)
        serving = False
        await report(NOT_SERVING)
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
        stopped = await asyncio.to_thread(service.shutdown, SHUTDOWN_SECONDS)
        await server.stop(grace=2.0)
        if stopped:
            model.close()
        for task in background:
            task.cancel()
        refusals.flush()  # the last window's summaries: no refusal goes uncounted
        written = audit.retry()  # a last try for lines kept while the log failed
        audit.close()
        await asyncio.to_thread(metrics.close)
        # The chain's head, for checking later that no line was cut off the end.
        log.info("audit.head", path=audit_path, seq=audit.head.seq, sha256=audit.head.hash)
        if not written:
            log.error("audit.lost", path=audit_path, error=audit.error)
            return 1
        if not stopped:
            return 1
        log.info("server.stopped")
        return 0
    except BaseException:
        # A start that fails after the server started (no model, no memory for the
        # context) stops it here; left to its destructor, it fails once the loop is gone.
        if server is not None:
            await server.stop(None)
        raise
    finally:
        for relay in relays:
            await relay.close()


async def _retry_audit(audit: AuditLog, every: float = 0.5) -> None:
    """While the audit log fails, keep trying; it reports SERVING again itself."""
    while True:
        await asyncio.sleep(every)
        if not audit.healthy:
            audit.retry()


def _hash_model(servicer: GuardServicer, path: Path, metrics: MetricsSink) -> None:
    from fse.core.gguf import file_sha256

    servicer.model_sha256 = file_sha256(path)
    metrics.build_info(servicer.model_sha256)


def run(settings: Settings) -> int:
    configure_logging()
    keep_request_buffers_in_the_heap(MAX_MESSAGE_BYTES)
    try:
        return asyncio.run(serve(settings))
    except (StartupError, ModelError, InputError, EngineError) as exc:
        print(f"fse serve: error: {exc}", file=sys.stderr)
        return 1
