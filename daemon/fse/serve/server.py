"""The daemon's gRPC front: translates between the wire (fse.v1) and GuardService.

The servicer holds no generation logic: it turns the first client message into
a Request, opens a stream on the service, forwards its events as wire messages
and maps domain errors to status codes. Standard health checking and server
reflection come from grpcio's own packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fse.core.engine import Faults, Model
from fse.core.models import ModelError, check_gguf, default_model_path
from fse.core.policy import Policy, PolicyError, load_policies
from fse.core.types import (
    CANCELLED,
    COMPLETED,
    ERROR,
    HALTED,
    Request,
    Sampling,
    TokenEvent,
    Verdict,
)
from fse.serve.audit import AuditError, AuditLog
from fse.serve.scheduler import Handle, Limits, NotAccepting, Overloaded
from fse.serve.service import AuditUnavailable, GuardService, InvalidRequest

log = structlog.get_logger("fse.serve.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SERVICE_NAME = fse_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
# Debug faults travel in metadata, never in the public message, and only a daemon
# started with --allow-debug-faults accepts them.
FAULT_METADATA = "fse-debug-fault"
# gRPC rejects anything larger with RESOURCE_EXHAUSTED before we see it; below
# it, our own field limits answer INVALID_ARGUMENT naming the field.
MAX_MESSAGE_BYTES = 4 << 20
# Tokenizing takes about 0.2 s per MiB of prompt: larger requests are prepared in a
# worker thread so that other streams keep flowing; smaller ones inline, where a
# thread hop would cost more than it saves.
INLINE_PREPARE_BYTES = 16 << 10
# Leave this much of a gRPC deadline to deliver the `deadline` verdict in time.
DEADLINE_MARGIN = 0.25

STATUS_TO_WIRE = {
    COMPLETED: fse_pb2.STATUS_COMPLETED,
    HALTED: fse_pb2.STATUS_HALTED,
    CANCELLED: fse_pb2.STATUS_CANCELLED,
    ERROR: fse_pb2.STATUS_ERROR,
}
HEALTH_TO_WIRE = {
    "green": fse_pb2.HEALTH_GREEN,
    "yellow": fse_pb2.HEALTH_YELLOW,
    "red": fse_pb2.HEALTH_RED,
}


def request_from_wire(msg: fse_pb2.GenerateRequest, time_remaining: float | None) -> Request:
    """Proto -> domain, filling unset sampling fields with llama.cpp's CLI defaults."""
    s = msg.sampling
    defaults = Sampling()
    sampling = Sampling(
        temperature=s.temperature if s.HasField("temperature") else defaults.temperature,
        top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
        top_p=s.top_p if s.HasField("top_p") else defaults.top_p,
        min_p=s.min_p if s.HasField("min_p") else defaults.min_p,
        seed=s.seed if s.HasField("seed") else None,
    )
    timeout = msg.timeout_ms / 1000 if msg.timeout_ms else None
    if time_remaining is not None:
        # Halt with a `deadline` verdict just before the RPC's own deadline would
        # cut the stream off without one.
        budget = max(time_remaining - min(DEADLINE_MARGIN, time_remaining / 4), 0.001)
        timeout = budget if timeout is None else min(timeout, budget)
    return Request(
        prompt=msg.prompt,
        messages=tuple((m.role, m.content) for m in msg.messages),
        max_tokens=msg.max_tokens,
        sampling=sampling,
        policy=msg.policy or "default",
        stop=tuple(msg.stop),
        request_id=msg.request_id,
        timeout=timeout,
    )


def token_to_wire(event: TokenEvent) -> fse_pb2.GenerateServerMessage:
    m = event.metrics
    token = fse_pb2.Token(
        index=event.index,
        id=event.token,
        piece=event.piece,
        text=event.text,
        nll=m.nll,
        ppl=m.ppl,
        ppl_cumulative=m.ppl_cumulative,
        variance=m.variance,
        max_prob=m.max_prob,
        l2_norm=m.l2_norm,
        health=HEALTH_TO_WIRE[event.health],
    )
    for trip in event.warnings:
        token.warnings.add(guard=trip.guard, value=trip.value, threshold=trip.threshold)
    return fse_pb2.GenerateServerMessage(token=token)


def verdict_to_wire(verdict: Verdict) -> fse_pb2.GenerateServerMessage:
    wire = fse_pb2.Verdict(
        status=STATUS_TO_WIRE[verdict.status],
        guard=verdict.guard or "",
        tokens=verdict.tokens,
        text=verdict.text,
        policy=verdict.policy,
        policy_sha256=verdict.policy_sha256,
        message=verdict.message,
    )
    if verdict.value is not None:
        wire.value = verdict.value
    if verdict.threshold is not None:
        wire.threshold = verdict.threshold
    if verdict.token_index is not None:
        wire.token_index = verdict.token_index
    return fse_pb2.GenerateServerMessage(verdict=wire)


def audit_refusal(exc: AuditUnavailable) -> str:
    return f"audit log: {exc}; new streams are refused until it can be written again"


def faults_from_metadata(metadata: Any) -> Faults:
    specs = [value for key, value in (metadata or ()) if key == FAULT_METADATA]
    return Faults.parse(specs) if specs else Faults()


class GuardServicer(fse_pb2_grpc.GuardServicer):
    """fse.v1.Guard: wire in, GuardService, wire out."""

    def __init__(self) -> None:
        self.service: GuardService | None = None  # set once the model is loaded
        self.model_sha256 = ""

    async def Generate(
        self,
        request_iterator: AsyncIterator[fse_pb2.GenerateClientMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[fse_pb2.GenerateServerMessage]:
        service = self.service
        if service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            return
        try:
            service.check_audit()  # refused before reading: nothing to record while it fails
        except AuditUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, audit_refusal(exc))
            return
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "start":
            message = "start: the first message of a Generate stream must be `start`"
            service.record_rejection("", "invalid_argument", message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            return
        code, message = grpc.StatusCode.OK, ""
        try:
            request = request_from_wire(first.start, context.time_remaining())
            faults = faults_from_metadata(context.invocation_metadata())
            if first.start.ByteSize() > INLINE_PREPARE_BYTES:
                prepared = await asyncio.to_thread(service.prepare, request, faults)
            else:
                prepared = service.prepare(request, faults)
            handle = service.admit(prepared)
        except (InvalidRequest, ValueError) as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Overloaded as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {exc}"
        except NotAccepting as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except AuditUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, audit_refusal(exc))
            return
        if code != grpc.StatusCode.OK:
            service.record_rejection(first.start.request_id, code.name.lower(), message)
            await context.abort(code, message)
            return

        yield fse_pb2.GenerateServerMessage(
            started=fse_pb2.Started(
                request_id=request.request_id,
                policy=handle.policy.name,
                policy_sha256=handle.policy.sha256,
                prompt_tokens=len(handle.prompt),
                seed=handle.request.sampling.seed or 0,  # prepare drew one if needed
                model=service.model.name,
            )
        )
        violation: list[str] = []
        watcher = asyncio.create_task(_watch_client(request_iterator, handle, violation))
        try:
            while True:
                event = await handle.events.get()
                if violation:  # nothing more goes out after a protocol error
                    service.record_rejection(request.request_id, "invalid_argument", violation[0])
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, violation[0])
                if isinstance(event, TokenEvent):
                    yield token_to_wire(event)
                    continue
                yield verdict_to_wire(event)
                if event.status == ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, event.message or "internal error")
                return
        finally:
            # A client that went away (or any exit above) stops generation at the next step.
            handle.cancel()
            watcher.cancel()

    async def GetInfo(
        self, request: fse_pb2.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fse_pb2.Info:
        service = self.service
        if service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            raise AssertionError  # abort raises
        m = service.model_info
        limits = service.limits
        return fse_pb2.Info(
            version=service.version,
            model=fse_pb2.ModelInfo(
                name=m.name,
                path=str(m.path),
                sha256=self.model_sha256,
                description=m.description,
                vocab_size=m.vocab_size,
                context_size=m.context_size,
                train_context_size=m.train_context_size,
                size_bytes=m.size_bytes,
                chat_template=m.chat_template,
            ),
            policies=[
                fse_pb2.PolicyInfo(
                    name=p.name, sha256=p.sha256, builtin=p.name in ("default", "pro")
                )
                for p in sorted(service.policies.values(), key=lambda p: p.name)
            ],
            limits=fse_pb2.Limits(
                max_streams=limits.max_streams,
                max_queue=limits.max_queue,
                max_tokens=limits.max_tokens,
                max_prompt_tokens=limits.ctx_per_stream - 1,
                max_message_bytes=MAX_MESSAGE_BYTES,
            ),
        )


async def _watch_client(
    requests: AsyncIterator[fse_pb2.GenerateClientMessage], handle: Handle, violation: list[str]
) -> None:
    """Later client messages: `cancel` stops the stream; another `start` is a protocol error."""
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "cancel":
                handle.cancel()
            else:
                violation.append(
                    f"{kind or 'message'}: only one `start` per stream; "
                    "later messages may only cancel"
                )
                handle.cancel()
                return


@dataclass(frozen=True, slots=True)
class ServeConfig:
    listen: tuple[str, ...]
    model: Path | None
    threads: int
    limits: Limits
    policies_dir: Path | None = None
    allow_debug_faults: bool = False
    drain_seconds: float = 30.0
    verbose: bool = False
    audit_log: Path = Path("fse-audit.jsonl")
    audit_text: bool = False  # record prompts and outputs as text, not sha256


class StartupError(Exception):
    """The daemon cannot start; the message says why (printed, exit code 1)."""


def configure_logging() -> None:
    """JSON lines on stderr, one event per line (structlog processors, no stdlib logging)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.EventRenamer("event"),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def listen_target(addr: str) -> str:
    """`unix:PATH` (relative paths resolved now) or `HOST:PORT`, as gRPC spells them."""
    if addr.startswith("unix:"):
        path = addr.removeprefix("unix:").removeprefix("//")
        if not path:
            raise StartupError(f"--listen {addr}: empty socket path; accepted: unix:PATH")
        return f"unix:{Path(path).expanduser().resolve()}"
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StartupError(f"--listen {addr}: accepted forms are unix:PATH and HOST:PORT")
    return addr


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


def load_policy_set(policies_dir: Path | None) -> dict[str, Policy]:
    try:
        return load_policies(policies_dir)
    except PolicyError as exc:
        raise StartupError(f"policies: {exc}") from None


def _executable() -> str:
    """How the operator can run `fse` again: the command on PATH, or what started us."""
    if shutil.which("fse") == sys.argv[0]:
        return "fse"
    if sys.argv[0].endswith(".py"):  # python -m fse.cli
        return f"{sys.executable} -m fse.cli"
    return os.path.abspath(sys.argv[0])


async def serve(config: ServeConfig, on_ready: Callable[[list[str]], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    began = time.monotonic()
    targets = [listen_target(a) for a in config.listen]
    policies = load_policy_set(config.policies_dir)  # invalid at start: serve nothing
    model_path = config.model if config.model is not None else default_model_path()
    check_gguf(model_path)
    audit_path = str(config.audit_log.expanduser().absolute())  # as logged and printed
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()
    serving = False  # what health reports while the audit log can be written

    async def report(status: int) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    def audit_health(writable: bool, error: str) -> None:  # any thread
        if writable:
            log.info("audit.recovered", path=audit_path)
        else:
            log.error("audit.write_failed", path=audit_path, error=error)
        loop.call_soon_threadsafe(lambda: loop.create_task(report_audit_health()))

    async def report_audit_health() -> None:  # decided on the loop, in order with stopping
        await report(SERVING if serving and audit.healthy else NOT_SERVING)

    try:
        audit = AuditLog(Path(audit_path), text=config.audit_text, on_health=audit_health)
    except AuditError as exc:
        raise StartupError(str(exc)) from None

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = GuardServicer()
    fse_pb2_grpc.add_GuardServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await report(NOT_SERVING)
    for target in targets:
        if target.startswith("unix:"):
            remove_stale_socket(Path(target.removeprefix("unix:")))
        try:
            server.add_insecure_port(target)
        except RuntimeError as exc:
            raise StartupError(f"--listen {target}: cannot bind: {exc}") from None
    await server.start()
    log.info("server.listening", listen=targets)

    model = await asyncio.to_thread(Model, model_path, verbose=config.verbose)
    service = GuardService(
        model,
        policies,
        config.limits,
        n_threads=config.threads,
        allow_faults=config.allow_debug_faults,
        audit=audit,
    )
    service.start()
    servicer.service = service
    audit.write("policy.loaded", policies={p.name: p.sha256 for p in policies.values()})
    audit.write(
        "server.started",
        version=service.version,
        listen=targets,
        model=str(model_path),
        pid=os.getpid(),
        max_streams=config.limits.max_streams,
    )
    serving = True
    if audit.healthy:
        await report(SERVING)
    retrying = loop.create_task(_retry_audit(audit))
    log.info(
        "server.started",
        listen=targets,
        model=str(model_path),
        policies=sorted(policies),
        max_streams=config.limits.max_streams,
        audit_log=audit_path,
        seconds_to_serving=round(time.monotonic() - began, 3),
    )
    print(
        f"fse: serving {model.name} on {', '.join(targets)}; audit log {audit_path}\n"
        f'try: {_executable()} generate --addr {targets[0]} "The capital of France is"',
        file=sys.stderr,
        flush=True,
    )
    if on_ready is not None:
        on_ready(targets)
    asyncio.get_running_loop().run_in_executor(None, _hash_model, servicer, model_path)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: _reload_policies(service, audit, config.policies_dir)
    )
    await stop.wait()

    log.info("server.stopping", drain_seconds=config.drain_seconds)
    audit.write("server.stopping", drain_seconds=config.drain_seconds)
    serving = False
    await report(NOT_SERVING)
    service.scheduler.stop_accepting()
    drain_until = time.monotonic() + config.drain_seconds
    while service.scheduler.load != (0, 0) and time.monotonic() < drain_until:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(service.shutdown)  # what is left halts with guard `shutdown`
    await server.stop(grace=2.0)
    model.close()
    retrying.cancel()
    written = audit.retry()  # a last try for lines kept while the log failed
    audit.close()
    # The chain's head, for checking later that no line was cut off the end.
    log.info("audit.head", path=audit_path, seq=audit.head.seq, sha256=audit.head.hash)
    if not written:
        log.error("audit.lost", path=audit_path, error=audit.error)
        return 1
    log.info("server.stopped")
    return 0


async def _retry_audit(audit: AuditLog, every: float = 0.5) -> None:
    """While the audit log fails, keep trying; it reports SERVING again itself."""
    while True:
        await asyncio.sleep(every)
        if not audit.healthy:
            audit.retry()


def _hash_model(servicer: GuardServicer, path: Path) -> None:
    from fse.core.models import file_sha256

    servicer.model_sha256 = file_sha256(path)


def _reload_policies(service: GuardService, audit: AuditLog, policies_dir: Path | None) -> None:
    try:
        policies = load_policies(policies_dir)
    except PolicyError as exc:
        log.warning("policy.reload_rejected", error=str(exc))
        audit.write("policy.reload_rejected", error=str(exc))
        return
    service.replace_policies(policies)
    hashes = {p.name: p.sha256 for p in policies.values()}
    log.info("policy.loaded", policies=hashes)
    audit.write("policy.loaded", policies=hashes)


def run(config: ServeConfig) -> int:
    configure_logging()
    try:
        return asyncio.run(serve(config))
    except (StartupError, ModelError) as exc:
        print(f"fse serve: error: {exc}", file=sys.stderr)
        return 1
