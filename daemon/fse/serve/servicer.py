"""fse.v1.Guard: turns the first client message into a Request, opens a stream on the
GuardService, forwards its events as wire messages and maps domain errors to status
codes. It holds no generation logic."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from fse_client.v1 import fse_pb2, fse_pb2_grpc

from fse.core.errors import EngineError, InputError
from fse.core.types import ERROR, TokenEvent
from fse.serve.auth import caller_of
from fse.serve.memory import HeapTrimmer
from fse.serve.metrics import NO_METRICS, MetricsSink
from fse.serve.scheduler import Handle, NotAccepting, Overloaded
from fse.serve.service import AuditUnavailable, GuardService
from fse.serve.wire import (
    faults_from_metadata,
    info_to_wire,
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

log = structlog.get_logger("fse.servicer")


class PerCallerLimit(Exception):
    """This caller already runs per_client_streams streams."""


def audit_refusal(exc: AuditUnavailable) -> str:
    return f"audit log: {exc}; new streams are refused until it can be written again"


class GuardServicer(fse_pb2_grpc.GuardServicer):
    """fse.v1.Guard: wire in, GuardService, wire out."""

    def __init__(self, per_client_streams: int = 0) -> None:
        self.service: GuardService | None = None  # set once the model is loaded
        self.model_sha256 = ""
        self.metrics: MetricsSink = NO_METRICS  # every refusal is counted by its code
        self.per_client_streams = per_client_streams  # 0 = no per-caller limit
        self._streams_of: collections.Counter[str] = collections.Counter()
        self._preparing = 0  # requests being validated and tokenized right now
        self._tokenizing = asyncio.Semaphore(1)
        self.heap = HeapTrimmer()  # hands a refused burst's buffers back

    async def Generate(
        self,
        request_iterator: AsyncIterator[fse_pb2.GenerateClientMessage],  # unused: see _read
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
        # context.read(), not request_iterator: grpcio's iterator is an async generator
        # that keeps the last message it yielded in a reference cycle with the call, so
        # every refused 1 MiB prompt stayed in memory until the next full collection.
        first = await _read(context)
        if first is None or first.WhichOneof("kind") != "start":
            message = "start: the first message of a Generate stream must be `start`"
            service.record_rejection("", "invalid_argument", message, client=caller)
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, message)
            return
        code, message = grpc.StatusCode.OK, ""
        try:
            # Overload is refused before any work: requests still being tokenized count
            # as load too, so a burst of large prompts cannot all be tokenized at once.
            # (Not before reading the message: a stream refused while its client still
            # sends is reset, and grpc's asyncio client then reports INTERNAL.)
            self._check_room(service, caller)
            request = request_from_wire(first.start, context.time_remaining())
            faults = faults_from_metadata(context.invocation_metadata())
            self._preparing += 1
            try:
                if request.text_length() > INLINE_PREPARE_CHARS:
                    async with self._tokenizing:  # one large prompt at a time, off the loop
                        prepared = await asyncio.to_thread(service.prepare, request, faults)
                else:
                    prepared = service.prepare(request, faults)
            finally:
                self._preparing -= 1
            handle = service.admit(prepared, client=caller)
        except InputError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except PerCallerLimit as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except Overloaded as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {exc}"
        except NotAccepting as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except AuditUnavailable as exc:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, audit_refusal(exc))
            return
        except EngineError as exc:  # llama.cpp failed on this prompt: our failure, not theirs
            log.error("prepare.failed", error=str(exc), client=caller)
            code, message = grpc.StatusCode.INTERNAL, f"prompt: the engine failed: {exc}"
        except Exception:  # a bug of ours: fail closed, and keep the internals in our log
            log.exception("prepare.crashed", client=caller)
            code, message = grpc.StatusCode.INTERNAL, "internal error (see the daemon's log)"
        if code != grpc.StatusCode.OK:
            service.record_rejection(
                first.start.request_id, code.name.lower(), message, client=caller
            )
            self._refuse(context, code, message)
            return
        self._streams_of[caller] += 1

        yield fse_pb2.GenerateServerMessage(
            started=fse_pb2.Started(
                request_id=request.request_id,
                policy=handle.policy.name,
                policy_sha256=handle.policy.sha256,
                prompt_tokens=len(handle.prompt),
                # The seed in use (prepare drew one if needed); greedy uses none.
                seed=0 if handle.request.sampling.greedy else handle.request.sampling.seed or 0,
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
                    yield token_to_wire(event)
                    continue
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
            self._streams_of[caller] -= 1
            if not self._streams_of[caller]:
                del self._streams_of[caller]

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

    def _check_room(self, service: GuardService, caller: str) -> None:
        """Raise PerCallerLimit or Overloaded (requests being tokenized count as load)."""
        limit = self.per_client_streams
        if limit and self._streams_of[caller] >= limit:
            raise PerCallerLimit(
                f"per-caller limit: {caller} already runs {limit} streams "
                f"(per_client_streams {limit})"
            )
        service.scheduler.check_capacity(extra=self._preparing)

    async def GetInfo(
        self, request: fse_pb2.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fse_pb2.Info | None:
        service = self.service
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


async def _read(
    context: grpc.aio.ServicerContext[Any, Any],
) -> fse_pb2.GenerateClientMessage | None:
    """The client's next message; None once it is done sending."""
    message = await context.read()
    return None if message is grpc.aio.EOF else message


async def _watch_client(
    context: grpc.aio.ServicerContext[Any, Any], handle: Handle, violation: list[str]
) -> None:
    """Later client messages: `cancel` stops the stream; another `start` is a protocol error."""
    # The call ending (the client gone, or the stream over) ends the watch.
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        while (msg := await _read(context)) is not None:
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
