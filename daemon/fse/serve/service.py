"""The guard service: validated requests in, guarded event streams out.

`GuardService` is what the daemon serves: it checks a request against the
limits (naming the offending field), resolves its policy, tokenizes its prompt
and hands it to the scheduler. `run_local` is the same judgement for a single
stream in this process (`fse generate --local`). Neither knows about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fse import __version__
from fse.core.errors import InputError
from fse.core.faults import NO_FAULTS, Faults
from fse.core.model import Model, TooManyTokens, devices
from fse.core.placement import PlacedDevice, decode_is_async, graph_stats_for, place_model
from fse.core.policy import Policy
from fse.core.runner import prompt_tokens
from fse.core.types import (
    Request,
    Verdict,
    utf8_length,
)
from fse.serve.audit import AuditLog
from fse.serve.metrics import NO_METRICS, MetricsSink
from fse.serve.refusals import ECHO_BYTES, ERROR_BYTES, RefusalLog, bounded, clip
from fse.serve.scheduler import Handle, Limits, Scheduler

MAX_STOP_SEQUENCES = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_PROMPT_BYTES = 1 << 20


class InvalidRequest(InputError):
    """A request field is out of its accepted range; the message names the field."""


class AuditUnavailable(Exception):
    """The audit log cannot be written: no new stream may start (fail closed)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request with its policy and prompt tokens, ready to queue."""

    request: Request
    policy: Policy
    prompt: list[int]
    faults: Faults


def check_request(request: Request, limits: Limits) -> None:
    """Everything that can be checked without the model."""
    try:
        request.sampling.validate()
    except ValueError as exc:
        raise InvalidRequest(f"sampling.{exc}") from None
    if not 1 <= request.max_tokens <= limits.max_tokens:
        raise InvalidRequest(
            f"max_tokens: {request.max_tokens} is out of range; accepted: 1..{limits.max_tokens}"
        )
    if (size := utf8_length(request.prompt)) > MAX_PROMPT_BYTES:
        raise InvalidRequest(
            f"prompt: {size} bytes is too long; accepted: at most {MAX_PROMPT_BYTES} bytes"
        )
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop: {len(request.stop)} sequences; accepted: at most 16")
    for i, stop in enumerate(request.stop):
        if not 1 <= len(stop.encode()) <= MAX_STOP_BYTES:
            raise InvalidRequest(f"stop[{i}]: accepted: 1..{MAX_STOP_BYTES} bytes")
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"request_id: accepted: at most {MAX_REQUEST_ID_BYTES} bytes")
    if request.timeout is not None and not (math.isfinite(request.timeout) and request.timeout > 0):
        raise InvalidRequest(f"timeout: {request.timeout} is invalid; accepted: seconds > 0")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    path: Path
    description: str
    vocab_size: int
    context_size: int
    train_context_size: int
    size_bytes: int
    chat_template: bool
    backend: str  # CPU, CUDA, Vulkan, Metal ...: where the offloaded layers run
    layers: int  # the model's n_layer
    gpu_layers: int  # of them, on GPUs
    devices: tuple[PlacedDevice, ...]  # every ggml device, with the layers it holds


class GuardService:
    """Guarded generation for many concurrent clients over one model."""

    def __init__(
        self,
        model: Model,
        policies: Mapping[str, Policy],
        limits: Limits,
        *,
        n_threads: int,
        allow_faults: bool = False,
        audit: AuditLog | None = None,
        refusals: RefusalLog | None = None,
        metrics: MetricsSink = NO_METRICS,
        graph_stats: str = "auto",
        pipelined: bool | None = None,
    ) -> None:
        """`pipelined`: the scheduler judges a step's tokens while the next decode runs
        (fse.serve.scheduler); None: where the layers sit on a local GPU, whose decode
        runs on while the host works (fse.core.placement.decode_is_async)."""
        if "default" not in policies:
            raise ValueError("policies: the built-in 'default' policy is missing")
        self.model = model
        self.policies = dict(policies)
        self.limits = limits
        self.allow_faults = allow_faults
        self.audit = audit
        # Refusals go to the audit log within bounds; the daemon shares its own with the
        # token check, so that one peer's denials and rejections are counted together.
        if refusals is None and audit is not None:
            refusals = RefusalLog(audit.write)
        self.refusals = refusals
        # For GetInfo, read before the scheduler's context takes GPU memory: the weights
        # took from each GPU in proportion to its free memory, so the default split (by
        # free memory) comes out as llama.cpp made it when loading.
        self.placement = place_model(model, devices())
        self.scheduler = Scheduler(
            model,
            limits,
            n_threads,
            on_stream_end=self._record_verdict,
            metrics=metrics,
            graph_stats=graph_stats_for(graph_stats, self.placement),
            pipelined=decode_is_async(self.placement) if pipelined is None else pipelined,
        )
        metrics.watch(lambda: self.scheduler.load)
        self.version = __version__
        # Numbered on from the audit chain, so a stream's number is unique across restarts.
        self._stream_ids = itertools.count(audit.next_stream if audit is not None else 1)
        # Audit fields of a stream beyond the request's own, by stream number, from its
        # admission to its verdict: the HTTP door's `listener` and `user`.
        self._origins: dict[int, dict[str, Any]] = {}
        self._status_mark = (time.monotonic(), 0)

    def start(self) -> None:
        self.scheduler.start()

    @property
    def model_info(self) -> ModelInfo:
        m, placed = self.model, self.placement
        return ModelInfo(
            m.name,
            m.path,
            m.description,
            m.n_vocab,
            self.limits.ctx_per_stream,
            m.n_ctx_train,
            m.path.stat().st_size,
            m.chat_template is not None,
            placed.backend,
            placed.layers,
            placed.gpu_layers,
            placed.devices,
        )

    def replace_policies(self, policies: Mapping[str, Policy]) -> None:
        """Swap the policy set (reload). Running streams keep the policy they started with."""
        if "default" not in policies:
            raise ValueError("policies: the built-in 'default' policy is missing")
        self.policies = dict(policies)

    def prepare(self, request: Request, faults: Faults = NO_FAULTS) -> Prepared:
        """Validate a request and tokenize its prompt, or raise InvalidRequest.

        Touches nothing shared, so the daemon runs it off the event loop: a 1 MiB
        prompt takes a while to tokenize, and other streams must keep flowing.
        """
        check_request(request, self.limits)
        if faults != NO_FAULTS and not self.allow_faults:
            raise InvalidRequest(
                "debug faults: this daemon was not started with --allow-debug-faults"
            )
        policy = self.policies.get(request.policy or "default")
        if policy is None:
            known = ", ".join(sorted(self.policies))
            name = clip(request.policy, ECHO_BYTES)  # the caller's text: echoed within bounds
            raise InvalidRequest(f"policy: unknown policy {name!r}; accepted: {known}")
        context = self.limits.ctx_per_stream
        try:
            tokens = prompt_tokens(self.model, request, max_tokens=context - 1)
        except TooManyTokens as exc:
            raise InvalidRequest(
                f"prompt: {'at least ' if exc.at_least else ''}{exc.n_tokens} tokens do not fit "
                f"the context of {context} tokens "
                f"per stream; accepted: at most {context - 1} tokens"
            ) from None
        room = context - len(tokens)
        if request.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens: {request.max_tokens} does not fit after the {len(tokens)}-token "
                f"prompt; accepted: 1..{room}"
            )
        if request.sampling.seed is None and not request.sampling.greedy:
            # Draw the random seed now, not at admission on the scheduler thread, so that
            # Started can report the seed in use (and the client can replay the stream).
            sampling = dataclasses.replace(request.sampling, seed=random.randrange(2**32))
            request = dataclasses.replace(request, sampling=sampling)
        return Prepared(request, policy, tokens, faults)

    def check_audit(self) -> None:
        """Raise AuditUnavailable while the audit log cannot be written."""
        if self.audit is not None and not self.audit.healthy:
            raise AuditUnavailable(self.audit.error)

    def admit(
        self,
        prepared: Prepared,
        loop: asyncio.AbstractEventLoop | None = None,
        client: str = "",
        origin: Mapping[str, Any] | None = None,
    ) -> Handle:
        """Queue a prepared stream, or raise Overloaded / NotAccepting / AuditUnavailable
        at once. No stream runs unless its start is in the audit log. `origin`: more
        fields for its stream.started and stream.verdict records (the HTTP door's
        `listener` and `user`)."""
        self.check_audit()
        handle = Handle(
            prepared.request,
            prepared.policy,
            prepared.prompt,
            prepared.faults,
            loop or asyncio.get_running_loop(),
            stream_id=next(self._stream_ids),
            client=client,
        )
        recorded = True

        def record_start() -> None:
            nonlocal recorded
            recorded = self._record_start(handle)
            if not recorded:
                # Not recorded: queue it cancelled, so it ends before any decode with
                # a `cancelled` verdict. The audit log keeps both lines and writes
                # them, in order, once it can write again.
                handle.cancel()

        if origin:
            self._origins[handle.stream_id] = dict(origin)
        try:
            self.scheduler.submit(handle, on_queue=record_start)
        except BaseException:
            self._origins.pop(handle.stream_id, None)
            raise
        if not recorded:
            raise AuditUnavailable(self.audit.error if self.audit else "")
        return handle

    def record_rejection(
        self, request_id: str, reason: str, message: str, client: str = "", **origin: Any
    ) -> None:
        """Audit a request refused before it started (bad input, overload...), within
        bounds: the request id and the message are cut to a fixed size, and a flood
        from one peer is counted into summaries (fse.serve.refusals). `origin`: more
        fields (the HTTP door's `listener`)."""
        if self.refusals is not None:
            self.refusals.record(
                "input.rejected",
                client,
                reason,
                **origin,
                **bounded("request_id", request_id),
                error=clip(message, ERROR_BYTES),
            )

    def _record_start(self, handle: Handle) -> bool:
        if self.audit is None:
            return True
        r = handle.request
        return self.audit.write(
            "stream.started",
            stream=handle.stream_id,
            request_id=r.request_id,
            client=handle.client or None,
            **self._origins.get(handle.stream_id, {}),
            policy=handle.policy.name,
            policy_sha256=handle.policy.sha256,
            prompt=r.prompt or json.dumps(r.messages, ensure_ascii=False),
            prompt_tokens=len(handle.prompt),
            max_tokens=r.max_tokens,
            temperature=r.sampling.temperature,
            seed=r.sampling.seed,
            faults=_fault_fields(handle.faults),
        )

    def _record_verdict(self, handle: Handle, verdict: Verdict) -> None:
        """Called on the decode thread once per stream, as it ends: posted, so that a slow
        audit device never stalls decoding (the line keeps its place in the chain). After
        a protocol error the servicer sends nothing more: then the record counts what was
        sent, and `withheld` the tokens released but never sent."""
        sent = handle.end()
        origin = self._origins.pop(handle.stream_id, {})
        if self.audit is None:
            _set_from_thread(handle)
            return
        tokens, output, withheld = verdict.tokens, verdict.text, None
        if sent is not None:
            tokens, output = sent[0], verdict.text[: sent[1]]
            withheld = verdict.tokens - tokens
        fields = dict(
            stream=handle.stream_id,
            request_id=handle.request.request_id,
            client=handle.client or None,
            **origin,
            status=verdict.status,
            completion=verdict.completion,
            guard=verdict.guard,
            value=verdict.value,
            threshold=verdict.threshold,
            token_index=verdict.token_index,
            tokens=tokens,
            withheld=withheld,
            policy=verdict.policy,
            policy_sha256=verdict.policy_sha256,
            output=output,
            message=verdict.message or None,
        )
        self.audit.post(
            "stream.verdict",
            fields,
            then=partial(_set_from_thread, handle),
        )

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the scheduler; False if its decode thread is stuck (see Scheduler)."""
        return self.scheduler.shutdown(timeout)

    def heartbeat_age(self) -> float:
        """Seconds the decode thread has been inside one step (0 while idle)."""
        return self.scheduler.heartbeat_age()

    def status(self) -> str:
        """systemd's STATUS= line: the load and the token rate since the last call."""
        now, released = time.monotonic(), self.scheduler.tokens_released
        last_at, last_released = self._status_mark
        self._status_mark = (now, released)
        rate = (released - last_released) / max(now - last_at, 1e-3)
        active, waiting = self.scheduler.load
        return f"STATUS={active} streams active, {waiting} waiting, {rate:.1f} tokens/s"


def _fault_fields(faults: Faults) -> dict[str, object]:
    """The debug faults injected into a stream, as the audit log records them ({} for none)."""
    return {
        f.name: getattr(faults, f.name)
        for f in dataclasses.fields(faults)
        if getattr(faults, f.name) != f.default
    }


def _set_from_thread(handle: Handle) -> None:
    """Tell the servicer (on the handle's loop) that the verdict is recorded."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        handle.loop.call_soon_threadsafe(handle.recorded.set)
