"""fse.v1.Guard: turns the first client message into a Request, opens a stream on the
GuardService, forwards its events as wire messages and maps domain errors to status
codes. It holds no generation logic."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import structlog
from fse_client.v1 import fse_pb2, fse_pb2_grpc

from fse.core.errors import EngineError, InputError
from fse.core.types import ERROR, TokenEvent
from fse.serve.auth import caller_of
from fse.serve.memory import HeapTrimmer
from fse.serve.metrics import NO_METRICS, MetricsSink
from fse.serve.places import PerCallerLimit, Places
from fse.serve.scheduler import Handle, NotAccepting, Overloaded
from fse.serve.service import AuditUnavailable, GuardService
from fse.serve.wire import (
    Undecodable,
    faults_from_metadata,
    info_to_wire,
    lenient,
    request_from_wire,
    token_to_wire,
    verdict_to_wire,
)

# gRPC rejects anything larger with RESOURCE_EXHAUSTED before we see it; below
# it, our own field limits answer INVALID_ARGUMENT naming the field.
MAX_MESSAGE_BYTES = 4 << 20
# Tokenizing takes about 0.2 s per MiB of prompt: larger requests are prepared in a
# worker thread so that other streams keep flowing; smaller ones inline, where a
# thread hop would cost more than it saves.
INLINE_PREPARE_CHARS = 16 << 10
# A Generate call must send its `start` this soon after it opens: a call waiting for it
# holds a place (of its caller and of the daemon), so it cannot wait for ever.
FIRST_MESSAGE_SECONDS = 10.0
# Calls that found no place when they opened still have their `start` read before they
# are refused (a stream refused while its client still sends is reset, and grpc's asyncio
# client then reports INTERNAL instead of the status); at most this many at a time, the
# next ones are refused at once, so callers that never send cannot pile up.
MAX_CALLS_WITHOUT_PLACE = 64

log = structlog.get_logger("fse.servicer")


def audit_refusal(exc: AuditUnavailable) -> str:
    return f"audit log: {exc}; new streams are refused until it can be written again"


def add_to_server(servicer: GuardServicer, server: grpc.aio.Server) -> None:
    """Serve fse.v1.Guard as fse_pb2_grpc.add_GuardServicer_to_server does, but with
    request deserializers that cannot raise: a message protobuf refuses (a string field
    that is not UTF-8, a broken wire format) reaches the method as `Undecodable`, to be
    refused INVALID_ARGUMENT naming the field and audited."""
    handlers = {
        "Generate": grpc.stream_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=lenient(fse_pb2.GenerateClientMessage),
            response_serializer=fse_pb2.GenerateServerMessage.SerializeToString,
        ),
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo,
            request_deserializer=lenient(fse_pb2.GetInfoRequest),
            response_serializer=fse_pb2.Info.SerializeToString,
        ),
    }
    name = fse_pb2.DESCRIPTOR.services_by_name["Guard"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class GuardServicer(fse_pb2_grpc.GuardServicer):
    """fse.v1.Guard: wire in, GuardService, wire out.

    A Generate call holds a place from the moment it opens until it ends, whether it
    waits for its `start`, is being prepared or runs: one of its caller's
    per_client_streams, and (until the scheduler has it) one of the daemon's
    max_streams + max_queue. A call that finds no place is refused once its `start`
    is read, unless a place came free meanwhile."""

    def __init__(self, per_client_streams: int = 0, metrics: MetricsSink = NO_METRICS) -> None:
        self.metrics = metrics  # every refusal is counted by its code
        self.service: GuardService | None = None  # None until the model is loaded
        self.model_sha256 = ""  # "" until the model file is hashed
        # The places held (fse.serve.places), shared with the HTTP door.
        self.places = Places(per_client_streams)
        self._without_place = 0  # calls without a place waiting for their `start`
        self._tokenizing = asyncio.Semaphore(1)
        self.heap = HeapTrimmer()  # hands a refused burst's buffers back

    def model_loaded(self, service: GuardService) -> None:
        """Serve from now on: until then every call is UNAVAILABLE (still loading)."""
        self.service = service

    def model_hashed(self, sha256: str) -> None:
        """The model file's sha256 for GetInfo (any thread; hashing takes a while)."""
        self.model_sha256 = sha256

    async def Generate(
        self,
        request_iterator: AsyncIterator[Any],  # unused: see _read
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[fse_pb2.GenerateServerMessage]:
        service = self.service
        if service is None:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            return
        try:
            service.check_audit()  # refused before reading: nothing to record while it fails
        except AuditUnavailable as exc:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, audit_refusal(exc))
            return
        caller = caller_of(context)
        no_room = self._no_room(service, caller)
        if no_room is not None and self._without_place >= MAX_CALLS_WITHOUT_PLACE:
            code, message = _room_status(no_room)
            service.record_rejection("", code.name.lower(), message, client=caller)
            self._refuse(context, code, message)
            return
        held = pending = no_room is None
        if held:
            self._hold(caller)
        try:
            first = await self._first_message(context, held)
            if isinstance(first, str):
                service.record_rejection("", "invalid_argument", first, client=caller)
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, first)
                return
            code, message = grpc.StatusCode.OK, ""
            try:
                if not held:  # a place may have come free since the call opened
                    no_room = self._no_room(service, caller)
                    if no_room is not None:
                        raise no_room
                    self._hold(caller)
                    held = pending = True
                request = request_from_wire(first.start, context.time_remaining())
                faults = faults_from_metadata(context.invocation_metadata())
                if request.text_length() > INLINE_PREPARE_CHARS:
                    async with self._tokenizing:  # one large prompt at a time, off the loop
                        prepared = await asyncio.to_thread(service.prepare, request, faults)
                else:
                    prepared = service.prepare(request, faults)
                handle = service.admit(prepared, client=caller)
            except InputError as exc:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except (PerCallerLimit, Overloaded, NotAccepting) as exc:
                code, message = _room_status(exc)
            except AuditUnavailable as exc:
                self._refuse(context, grpc.StatusCode.UNAVAILABLE, audit_refusal(exc))
                return
            except EngineError as exc:  # llama.cpp failed on this prompt: our failure, not theirs
                log.error("prepare.failed", error=str(exc), client=caller)
                code, message = grpc.StatusCode.INTERNAL, f"prompt: the engine failed: {exc}"
            except Exception:  # a bug of ours: fail closed, and keep the internals in our log
                log.exception("prepare.crashed", client=caller)
                code, message = grpc.StatusCode.INTERNAL, "internal error (see the daemon's log)"
            finally:
                if pending:  # the scheduler has it now (or it was refused)
                    self.places.queued()
                    pending = False
            if code != grpc.StatusCode.OK:
                service.record_rejection(
                    first.start.request_id, code.name.lower(), message, client=caller
                )
                self._refuse(context, code, message)
                return
            # aclosing: however this call ends, the stream's own cleanup (cancelling the
            # generation) runs now, not whenever the collector finds the generator.
            async with contextlib.aclosing(self._stream(service, context, handle, caller)) as out:
                async for reply in out:
                    yield reply
        finally:
            if pending:  # the call ended while it waited for its start
                self.places.queued()
            if held:
                self.places.release(caller)

    async def _stream(
        self,
        service: GuardService,
        context: grpc.aio.ServicerContext[Any, Any],
        handle: Handle,
        caller: str,
    ) -> AsyncGenerator[fse_pb2.GenerateServerMessage, None]:
        """An admitted stream: Started, its tokens, its verdict."""
        request = handle.request
        yield fse_pb2.GenerateServerMessage(
            started=fse_pb2.Started(
                request_id=request.request_id,
                policy=handle.policy.name,
                policy_sha256=handle.policy.sha256,
                prompt_tokens=len(handle.prompt),
                # The seed in use (prepare drew one if needed); greedy uses none.
                seed=0 if request.sampling.greedy else request.sampling.seed or 0,
                model=service.model.name,
            )
        )
        violation: list[str] = []
        watcher = asyncio.create_task(_watch_client(context, handle, violation))
        try:
            while True:
                event = await handle.events.get()
                if violation:  # nothing more goes out after a protocol error
                    service.record_rejection(
                        request.request_id, "invalid_argument", violation[0], client=caller
                    )
                    self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, violation[0])
                    return
                if isinstance(event, TokenEvent):
                    # Counted for the verdict's record, should a protocol error withhold
                    # the rest (see Handle.withhold).
                    handle.sent += 1
                    handle.sent_chars += len(event.text)
                    yield token_to_wire(event)
                    continue
                await handle.recorded.wait()  # the verdict is in the audit log first
                yield verdict_to_wire(event)
                if event.status == ERROR:
                    self._refuse(
                        context, grpc.StatusCode.INTERNAL, event.message or "internal error"
                    )
                return
        finally:
            # A client that went away (or any exit above) stops generation at the next step.
            handle.cancel()
            watcher.cancel()
            self.heap.call_ended()

    async def _first_message(
        self, context: grpc.aio.ServicerContext[Any, Any], held: bool
    ) -> fse_pb2.GenerateClientMessage | str:
        """The call's `start` message, or why there is none (INVALID_ARGUMENT)."""
        if not held:
            self._without_place += 1
        try:
            # context.read(), not request_iterator: grpcio's iterator is an async
            # generator that keeps the last message it yielded in a reference cycle with
            # the call, so every refused 1 MiB prompt stayed in memory until the next
            # full collection.
            async with asyncio.timeout(FIRST_MESSAGE_SECONDS):
                first = await _read(context)
        except TimeoutError:
            return (
                f"start: none within {FIRST_MESSAGE_SECONDS:g} s of the call opening; "
                "the first message of a Generate stream must be `start`"
            )
        finally:
            if not held:
                self._without_place -= 1
        if isinstance(first, Undecodable):
            return first.error
        if first is None or first.WhichOneof("kind") != "start":
            return "start: the first message of a Generate stream must be `start`"
        return first

    def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
    ) -> None:
        """End the call with `code` once the handler returns, and count it.

        Not context.abort(): it raises, grpcio's call state keeps the exception, and its
        traceback keeps the handler's frame, with the request in it, in a cycle through
        Cython objects that the garbage collector cannot see: every aborted call leaked
        its request (64 refused 1 MiB prompts kept 130 MiB)."""
        self.metrics.rejected(code.name)
        context.set_code(code)
        context.set_details(message)
        self.heap.call_ended()

    def _no_room(
        self, service: GuardService, caller: str
    ) -> PerCallerLimit | Overloaded | NotAccepting | None:
        return self.places.no_room(service.scheduler, caller)

    def _hold(self, caller: str) -> None:
        self.places.hold(caller)

    async def GetInfo(
        self,
        request: fse_pb2.GetInfoRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> fse_pb2.Info | None:
        service = self.service
        if isinstance(request, Undecodable):
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.error)
            return None
        if service is None:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            return None
        return info_to_wire(
            service.version,
            service.model_info,
            self.model_sha256,
            service.policies.values(),
            service.limits,
            MAX_MESSAGE_BYTES,
        )


def _room_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status of a call refused for want of a place: a drain is UNAVAILABLE."""
    if isinstance(exc, NotAccepting):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {exc}"
    return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)


async def _read(
    context: grpc.aio.ServicerContext[Any, Any],
) -> fse_pb2.GenerateClientMessage | Undecodable | None:
    """The client's next message (Undecodable if protobuf refused it); None once it is
    done sending."""
    message = await context.read()
    return None if message is grpc.aio.EOF else message


async def _watch_client(
    context: grpc.aio.ServicerContext[Any, Any], handle: Handle, violation: list[str]
) -> None:
    """Later client messages: `cancel` stops the stream; anything else is a protocol error."""
    # The call ending (the client gone, or the stream over) ends the watch.
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        while (msg := await _read(context)) is not None:
            if isinstance(msg, Undecodable):
                error = msg.error
            elif (kind := msg.WhichOneof("kind")) == "cancel":
                handle.cancel()
                continue
            else:
                error = (
                    f"{kind or 'message'}: only one `start` per stream; "
                    "later messages may only cancel"
                )
            # A protocol error: nothing more is sent, unless the verdict is already
            # recorded (then all it counts still goes out, and the late message is moot).
            if handle.withhold():
                violation.append(error)
                handle.cancel()
            return
