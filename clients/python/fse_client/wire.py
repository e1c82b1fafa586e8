"""Translation between the fse.v1 messages and the client's typed values."""

from __future__ import annotations

from collections.abc import Sequence

from fse_client.types import (
    Completion,
    Device,
    GuardTrip,
    Health,
    Info,
    Limits,
    ModelInfo,
    PolicyInfo,
    Sampling,
    Started,
    Status,
    TokenEvent,
    Verdict,
)
from fse_client.v1 import fse_pb2

_STATUS = {
    fse_pb2.STATUS_COMPLETED: Status.COMPLETED,
    fse_pb2.STATUS_HALTED: Status.HALTED,
    fse_pb2.STATUS_CANCELLED: Status.CANCELLED,
    fse_pb2.STATUS_ERROR: Status.ERROR,
}
_COMPLETION = {
    fse_pb2.COMPLETION_END_OF_GENERATION: Completion.END_OF_GENERATION,
    fse_pb2.COMPLETION_STOP_SEQUENCE: Completion.STOP_SEQUENCE,
    fse_pb2.COMPLETION_MAX_TOKENS: Completion.MAX_TOKENS,
}
_HEALTH = {
    fse_pb2.HEALTH_GREEN: Health.GREEN,
    fse_pb2.HEALTH_YELLOW: Health.YELLOW,
    fse_pb2.HEALTH_RED: Health.RED,
}


def start_message(
    prompt: str = "",
    *,
    messages: Sequence[tuple[str, str]] = (),
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    policy: str = "",
    stop: Sequence[str] = (),
    request_id: str = "",
    timeout: float | None = None,
) -> fse_pb2.GenerateClientMessage:
    """The first message of a Generate stream. timeout is in seconds (None = none)."""
    s = sampling or Sampling()
    wire_sampling = fse_pb2.Sampling()
    # Only what was given: the daemon fills the rest with its defaults.
    for name in ("temperature", "top_k", "top_p", "min_p", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(wire_sampling, name, value)
    request = fse_pb2.GenerateRequest(
        prompt=prompt,
        messages=[fse_pb2.ChatMessage(role=role, content=content) for role, content in messages],
        max_tokens=max_tokens,
        sampling=wire_sampling,
        policy=policy,
        stop=list(stop),
        request_id=request_id,
        timeout_ms=0 if timeout is None else max(1, round(timeout * 1000)),
    )
    return fse_pb2.GenerateClientMessage(start=request)


CANCEL = fse_pb2.GenerateClientMessage(cancel=fse_pb2.Cancel())


def started_from_wire(s: fse_pb2.Started) -> Started:
    return Started(s.request_id, s.policy, s.policy_sha256, s.prompt_tokens, s.seed, s.model)


def token_from_wire(t: fse_pb2.Token) -> TokenEvent:
    warnings = tuple(
        GuardTrip(
            w.guard,
            w.value if w.HasField("value") else None,
            w.threshold if w.HasField("threshold") else None,
        )
        for w in t.warnings
    )
    return TokenEvent(
        index=t.index,
        id=t.id,
        piece=t.piece,
        text=t.text,
        nll=t.nll,
        ppl=t.ppl,
        ppl_cumulative=t.ppl_cumulative,
        variance=t.variance,
        max_prob=t.max_prob,
        l2_norm=t.l2_norm,
        entropy=t.entropy,
        health=_HEALTH.get(t.health),
        warnings=warnings,
    )


def verdict_from_wire(v: fse_pb2.Verdict) -> Verdict:
    return Verdict(
        # An unknown status is never taken for success.
        status=_STATUS.get(v.status, Status.ERROR),
        tokens=v.tokens,
        text=v.text,
        policy=v.policy,
        policy_sha256=v.policy_sha256,
        guard=v.guard or None,
        value=v.value if v.HasField("value") else None,
        threshold=v.threshold if v.HasField("threshold") else None,
        token_index=v.token_index if v.HasField("token_index") else None,
        message=v.message,
        # Unspecified (any status but completed, an older daemon) or unknown: None.
        completion=_COMPLETION.get(v.completion),
    )


def info_from_wire(i: fse_pb2.Info) -> Info:
    m, lim = i.model, i.limits
    return Info(
        version=i.version,
        model=ModelInfo(
            m.name,
            m.sha256,
            m.description,
            m.vocab_size,
            m.context_size,
            m.train_context_size,
            m.size_bytes,
            m.chat_template,
            m.backend,
            m.layers,
            m.gpu_layers,
            tuple(
                Device(d.name, d.description, d.kind, d.memory_bytes, d.layers) for d in m.devices
            ),
        ),
        policies=tuple(PolicyInfo(p.name, p.sha256, p.builtin) for p in i.policies),
        limits=Limits(
            lim.max_streams,
            lim.max_queue,
            lim.max_tokens,
            lim.max_prompt_tokens,
            lim.max_message_bytes,
        ),
    )
