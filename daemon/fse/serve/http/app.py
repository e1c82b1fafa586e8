"""The OpenAI-compatible HTTP door: routes, server-sent events, errors, and its start
and stop on the daemon's own event loop (aiohttp's server).

A second door onto the same GuardService as gRPC's: the same places (per caller and
in all), the same preparation and admission, the same audit log, tokens, TLS and
metrics. Handlers only translate (fse.serve.http.openai_wire); they decide nothing.
Fail closed as gRPC does: a token goes out only once the stream's guards have passed
it (it is on Handle.events), a verdict only once its audit line is written
(Handle.recorded), and a stream that ends without an answer (an error, a shutdown)
ends with an error event and no `[DONE]`, so that a client raises instead of taking
a truncated answer for a finished one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from fse.core.errors import EngineError, InputError
from fse.core.faults import NO_FAULTS, Faults
from fse.core.types import ERROR, SHUTDOWN, TokenEvent, Verdict
from fse.serve.auth import TokenTable
from fse.serve.http import openai_wire as wire
from fse.serve.http.auth import peer_caller, token_caller
from fse.serve.listeners import BACKLOG, Listener, StartupError
from fse.serve.metrics import NO_METRICS, MetricsSink
from fse.serve.places import PerCallerLimit, Places
from fse.serve.refusals import RefusalLog, bounded
from fse.serve.scheduler import Handle, NotAccepting, Overloaded
from fse.serve.service import AuditUnavailable, GuardService, Prepared
from fse.serve.servicer import (
    FIRST_MESSAGE_SECONDS,
    INLINE_PREPARE_CHARS,
    MAX_MESSAGE_BYTES,
    audit_refusal,
)
from fse.serve.wire import FAULT_METADATA

log = structlog.get_logger("fse.serve.http")

LISTENER = "http"  # the audit records' `listener`
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")
# How long handlers that still run at stop (their streams are halted by then) may take
# to write their last event.
STOP_GRACE_SECONDS = 2.0
# A refusal's audit `reason`, by HTTP status: the words gRPC's refusals use.
REASONS = {
    400: "invalid_argument",
    404: "invalid_argument",
    408: "invalid_argument",
    429: "resource_exhausted",
    500: "internal",
    503: "unavailable",
}
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a proxy in front must not buffer the stream
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: wire.WireError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, dumps=wire.dumps)


def _room_error(exc: Exception) -> wire.WireError:
    """A request refused for want of a place: a drain is 503, the rest 429."""
    if isinstance(exc, NotAccepting):
        return wire.WireError(503, str(exc), code="shutting_down", kind="server_error")
    if isinstance(exc, Overloaded):
        return wire.WireError(429, f"overloaded: {exc}", code="overloaded", kind="rate_limit_error")
    return wire.WireError(429, str(exc), code="per_caller_limit", kind="rate_limit_error")


def _http_exception(exc: web.HTTPException, request: web.Request) -> wire.WireError:
    """aiohttp's own refusals (no route, wrong method, body too large) as OpenAI errors."""
    status = exc.status
    if status == 404:
        return wire.WireError(
            404,
            f"route: {request.method} {request.path[:128]} is not served; accepted: "
            "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health",
            code="unknown_route",
        )
    if status == 405:
        return wire.WireError(
            405, f"method: {request.method} is not accepted on {request.path}", code="bad_method"
        )
    if status == 413:
        return wire.WireError(
            413,
            f"request body: too large; accepted: at most {MAX_MESSAGE_BYTES} bytes",
            code="request_too_large",
        )
    return wire.WireError(status, exc.reason or "refused", kind="invalid_request_error")


class HttpDoor:
    """The HTTP API on its listeners. 503 for every /v1 request until `model_loaded`."""

    def __init__(
        self,
        listeners: list[Listener],
        ssl_context: ssl.SSLContext | None,
        tokens: TokenTable | None,
        places: Places,
        refusals: RefusalLog | None,
        serving: Callable[[], bool],
        metrics: MetricsSink = NO_METRICS,
    ) -> None:
        self.listeners = listeners
        self.ssl_context = ssl_context
        self.tokens = tokens
        self.places = places
        self.refusals = refusals
        self.serving = serving  # gRPC health's SERVING: GET /health says the same
        self.metrics = metrics
        self.service: GuardService | None = None
        self.model_created = 0  # the model file's mtime, as OpenAI's `created`
        self.runner: web.AppRunner | None = None
        self._tokenizing = asyncio.Semaphore(1)  # large prompts, one at a time, off the loop
        self.app = web.Application(
            client_max_size=MAX_MESSAGE_BYTES, middlewares=[self._outer(), self._auth()]
        )
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.one_model)
        self.app.router.add_get("/health", self.health)

    @property
    def targets(self) -> list[str]:
        return [listener.target for listener in self.listeners]

    def model_loaded(self, service: GuardService) -> None:
        self.model_created = int(service.model.path.stat().st_mtime)
        self.service = service

    async def start(self) -> None:
        """Listen on every address, or raise StartupError naming the one that failed."""
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that goes away cancels its stream
            access_log=None,
            shutdown_timeout=STOP_GRACE_SECONDS,
        )
        await runner.setup()
        self.runner = runner
        try:
            for listener in self.listeners:
                site = web.TCPSite(
                    runner,
                    listener.host,
                    listener.port,
                    ssl_context=self.ssl_context,
                    backlog=BACKLOG,
                )
                try:
                    await site.start()
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise StartupError(
                        f"--http-listen {listener.target}: cannot bind: {reason}"
                    ) from None
        except BaseException:
            await self.stop()
            raise
        log.info("http.listening", listen=self.targets, tls=self.ssl_context is not None)

    async def stop(self) -> None:
        """Close the listeners; handlers still running get STOP_GRACE_SECONDS to end."""
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middlewares --------------------------------------------------------------------

    def _outer(self) -> Any:
        """Every answer an OpenAI-shaped one, never a traceback; every request counted."""

        @web.middleware
        async def outer(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = request.match_info.route.resource
            endpoint = route.canonical if route is not None else "other"
            if endpoint.startswith("/v1/models/"):
                endpoint = "/v1/models"
            status = 499  # the client went away before an answer (the handler cancelled)
            try:
                try:
                    response = await handler(request)
                except wire.WireError as exc:
                    response = error_response(exc)
                except web.HTTPException as exc:
                    response = error_response(_http_exception(exc, request))
                except (asyncio.CancelledError, ConnectionResetError):
                    raise
                except Exception:
                    log.exception("http.crashed", path=request.path)
                    response = error_response(
                        wire.WireError(
                            500,
                            "internal error (see the daemon's log)",
                            code="internal_error",
                            kind="server_error",
                        )
                    )
                status = response.status
                return response
            finally:
                self.metrics.http_request(endpoint, status)

        return outer

    def _auth(self) -> Any:
        """With a tokens file, every /v1 request needs `Authorization: Bearer TOKEN`
        (GET /health stays open, as gRPC's health does); the caller's name for the rest."""

        @web.middleware
        async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
            peer = peer_caller(request)
            caller = peer
            if self.tokens is not None and request.path.startswith("/v1/"):
                name, why = token_caller(self.tokens, request)
                if name is None:
                    self._denied(peer, why)
                    raise wire.WireError(
                        401,
                        "a valid bearer token is required (header Authorization: Bearer TOKEN)",
                        code="invalid_api_key",
                    )
                caller = name
            request["fse_caller"] = caller
            return await handler(request)

        return auth

    def _denied(self, peer: str, reason: str) -> None:
        if self.refusals is not None and self.refusals.record(
            "auth.denied", peer, reason, listener=LISTENER
        ):
            log.warning("auth.denied", client=peer, reason=reason, listener=LISTENER)

    # -- routes -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        serving = self.serving()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    def _service(self) -> GuardService:
        if self.service is None:
            raise wire.WireError(
                503, "the model is still loading", code="model_loading", kind="server_error"
            )
        return self.service

    async def models(self, request: web.Request) -> web.Response:
        service = self._service()
        model = wire.model_json(service.model.name, self.model_created)
        return web.json_response({"object": "list", "data": [model]}, dumps=wire.dumps)

    async def one_model(self, request: web.Request) -> web.Response:
        service = self._service()
        if request.match_info["model"] != service.model.name:
            raise wire.WireError(
                404,
                f"model: {request.match_info['model'][:128]!r} is not served here; "
                f"accepted: {service.model.name!r}",
                param="model",
                code="model_not_found",
            )
        return web.json_response(
            wire.model_json(service.model.name, self.model_created), dumps=wire.dumps
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, wire.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, wire.COMPLETIONS)

    # -- generation ---------------------------------------------------------------------

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """Checks in gRPC's order (loading, the audit log, the request, a place), then
        prepare and admit, then the stream's events as a response or as events."""
        service = self._service()
        try:
            service.check_audit()  # refused before reading: nothing to record while it fails
        except AuditUnavailable as exc:
            raise wire.WireError(
                503, audit_refusal(exc), code="audit_unavailable", kind="server_error"
            ) from None
        caller: str = request["fse_caller"]
        request_id = wire.new_id(endpoint)
        try:
            async with asyncio.timeout(FIRST_MESSAGE_SECONDS):
                data = await request.read()  # client_max_size: 413 before any parsing
        except TimeoutError:
            raise self._refused(
                service,
                request_id,
                caller,
                wire.WireError(
                    408,
                    f"request body: not received within {FIRST_MESSAGE_SECONDS:g} s",
                    code="timeout",
                ),
            ) from None
        try:
            ask = wire.parse_request(
                endpoint, wire.parse_body(data), service.model.name, request_id
            )
            faults = _faults(request)
        except wire.WireError as exc:
            raise self._refused(service, request_id, caller, exc) from None
        no_room = self.places.no_room(service.scheduler, caller)
        if no_room is not None:
            raise self._refused(service, request_id, caller, _room_error(no_room))
        self.places.hold(caller)
        try:
            handle = await self._admit(service, ask, faults, caller)
            try:
                if ask.stream:
                    return await self._stream(request, service, ask, handle)
                return await self._answer(service, ask, handle)
            finally:
                handle.cancel()  # a client gone (or any exit) stops it at the next step
        finally:
            self.places.release(caller)

    async def _admit(
        self, service: GuardService, ask: wire.Ask, faults: Faults, caller: str
    ) -> Handle:
        """Prepare and admit (holding a pending place), or refuse naming the field."""
        try:
            request = ask.request
            if request.text_length() > INLINE_PREPARE_CHARS:
                async with self._tokenizing:
                    prepared = await asyncio.to_thread(service.prepare, request, faults)
            else:
                prepared = service.prepare(request, faults)
            if not ask.max_tokens_given:
                prepared = _widened(service, prepared)
            origin: dict[str, Any] = {"listener": LISTENER}
            if ask.user is not None:
                origin.update(bounded("user", ask.user))
            return service.admit(prepared, client=caller, origin=origin)
        except InputError as exc:
            message = str(exc)
            param = wire.param_of(message, ask)
            status, code = (404, "policy_not_found") if param == "policy" else (400, None)
            error = wire.WireError(status, message, param=param, code=code)
        except (PerCallerLimit, Overloaded, NotAccepting) as exc:
            error = _room_error(exc)
        except AuditUnavailable as exc:
            raise wire.WireError(
                503, audit_refusal(exc), code="audit_unavailable", kind="server_error"
            ) from None
        except EngineError as exc:  # llama.cpp failed on this prompt: ours, not theirs
            log.error("prepare.failed", error=str(exc), client=caller, listener=LISTENER)
            error = wire.WireError(
                500, f"prompt: the engine failed: {exc}", code="internal_error", kind="server_error"
            )
        except Exception:  # a bug of ours: fail closed, and keep the internals in our log
            log.exception("prepare.crashed", client=caller, listener=LISTENER)
            error = wire.WireError(
                500, "internal error (see the daemon's log)", code="internal_error",
                kind="server_error",
            )  # fmt: skip
        finally:
            self.places.queued()
        raise self._refused(service, ask.id, caller, error)

    def _refused(
        self, service: GuardService, request_id: str, caller: str, error: wire.WireError
    ) -> wire.WireError:
        """Audit a refusal (within the refusal log's bounds), as gRPC's are."""
        reason = REASONS.get(error.status, "invalid_argument")
        service.record_rejection(
            request_id, reason, error.message, client=caller, listener=LISTENER
        )
        return error

    async def _answer(self, service: GuardService, ask: wire.Ask, handle: Handle) -> web.Response:
        """A request without `stream`: every released token, then one JSON answer."""
        tokens: list[TokenEvent] = []
        while True:
            event = await handle.events.get()
            if isinstance(event, TokenEvent):
                if ask.logprobs:
                    tokens.append(event)
                continue
            break
        await handle.recorded.wait()  # the verdict is in the audit log first
        reason = wire.finish_reason(event)
        if reason is None:
            raise _no_answer(event)
        doc = wire.response(
            ask, service.model.name, int(time.time()), event, reason, tokens, len(handle.prompt)
        )
        return web.json_response(doc, dumps=wire.dumps)

    async def _stream(
        self, request: web.Request, service: GuardService, ask: wire.Ask, handle: Handle
    ) -> web.StreamResponse:
        """A request with `stream`: server-sent events, one chunk per released token (as
        soon as its guards passed it), the last chunk with the verdict, then [DONE]; or an
        error event and no [DONE] when the stream ended without an answer."""
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        chunks = wire.Chunks(ask, service.model.name, int(time.time()))
        try:
            out = chunks.opening()
            queue = handle.events
            while True:
                event = await queue.get()
                # Everything already released goes out in one write.
                while isinstance(event, TokenEvent):
                    out += chunks.token(event)
                    if queue.empty():
                        break
                    event = queue.get_nowait()
                if isinstance(event, TokenEvent):
                    if out:
                        await response.write(out)
                        out = b""
                    continue
                if out:
                    await response.write(out)
                    out = b""
                await handle.recorded.wait()  # the verdict is in the audit log first
                reason = wire.finish_reason(event)
                if reason is None:
                    await response.write(wire.sse(_no_answer(event).body()))
                else:
                    await response.write(chunks.finish(event, reason, len(handle.prompt)))
                break
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # a bug of ours mid-stream: the client must not take it as done
            log.exception("http.stream_crashed", listener=LISTENER)
            with contextlib.suppress(ConnectionResetError):
                await response.write(
                    wire.sse(
                        wire.error_body(
                            "internal error (see the daemon's log)", "server_error", None,
                            "internal_error",
                        )
                    )
                )  # fmt: skip
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def _widened(service: GuardService, prepared: Prepared) -> Prepared:
    """No max_tokens given: as many as fit after the prompt, up to the daemon's limit."""
    room = service.limits.ctx_per_stream - len(prepared.prompt)
    max_tokens = max(1, min(service.limits.max_tokens, room))
    request = dataclasses.replace(prepared.request, max_tokens=max_tokens)
    return dataclasses.replace(prepared, request=request)


def _faults(request: web.Request) -> Faults:
    """Debug faults from `fse-debug-fault` headers (refused by prepare unless the daemon
    allows them), as gRPC takes them from call metadata."""
    specs = request.headers.getall(FAULT_METADATA, [])
    if not specs:
        return NO_FAULTS
    try:
        return Faults.parse(specs)
    except InputError as exc:
        raise wire.WireError(400, str(exc), param=None) from None


def _no_answer(verdict: Verdict) -> wire.WireError:
    """The error for a stream that ended without an answer: an internal error, the daemon
    shutting down, a cancel."""
    if verdict.status == ERROR:
        return wire.WireError(
            500, verdict.message or "internal error", code="internal_error", kind="server_error"
        )
    if verdict.guard == SHUTDOWN:
        return wire.WireError(
            503,
            f"the daemon shut down before the stream ended ({verdict.tokens} tokens released); "
            "the answer is incomplete",
            code="shutdown",
            kind="server_error",
        )
    return wire.WireError(
        500, f"the stream ended {verdict.status} without an answer", code="cancelled",
        kind="server_error",
    )  # fmt: skip
