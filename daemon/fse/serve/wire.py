"""Translation between the wire (fse.v1) and the domain: requests in, events and info out.

Nothing here decides anything: unset sampling fields take the domain's defaults, and
the RPC's own deadline becomes the request's time budget (minus a margin to deliver
the `deadline` verdict before gRPC cuts the stream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fse_client.v1 import fse_pb2
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from fse.core.faults import Faults
from fse.core.policy import Policy, builtin_names
from fse.core.types import (
    CANCELLED,
    COMPLETED,
    END_OF_GENERATION,
    ERROR,
    HALTED,
    MAX_TOKENS,
    STOP_SEQUENCE,
    Request,
    Sampling,
    TokenEvent,
    Verdict,
)

if TYPE_CHECKING:
    from fse.serve.scheduler import Limits
    from fse.serve.service import ModelInfo

# Debug faults travel in metadata, never in the public message, and only a daemon
# started with --allow-debug-faults accepts them.
FAULT_METADATA = "fse-debug-fault"
# Leave this much of a gRPC deadline (at most a third of it) to deliver the `deadline`
# verdict in time: the deadline is checked between decode steps, and a step of 8 streams
# on a loaded host can take a few hundred ms (0.25 s, a quarter, once proved too little).
DEADLINE_MARGIN = 0.5

STATUS_TO_WIRE = {
    COMPLETED: fse_pb2.STATUS_COMPLETED,
    HALTED: fse_pb2.STATUS_HALTED,
    CANCELLED: fse_pb2.STATUS_CANCELLED,
    ERROR: fse_pb2.STATUS_ERROR,
}
COMPLETION_TO_WIRE = {
    END_OF_GENERATION: fse_pb2.COMPLETION_END_OF_GENERATION,
    STOP_SEQUENCE: fse_pb2.COMPLETION_STOP_SEQUENCE,
    MAX_TOKENS: fse_pb2.COMPLETION_MAX_TOKENS,
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
        budget = max(time_remaining - min(DEADLINE_MARGIN, time_remaining / 3), 0.001)
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
        entropy=m.entropy,
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
        # Unspecified for every status but completed (the domain leaves it None there).
        completion=COMPLETION_TO_WIRE.get(verdict.completion or "", fse_pb2.COMPLETION_UNSPECIFIED),
    )
    if verdict.value is not None:
        wire.value = verdict.value
    if verdict.threshold is not None:
        wire.threshold = verdict.threshold
    if verdict.token_index is not None:
        wire.token_index = verdict.token_index
    return fse_pb2.GenerateServerMessage(verdict=wire)


def faults_from_metadata(metadata: Any) -> Faults:
    specs = [value for key, value in (metadata or ()) if key == FAULT_METADATA]
    return Faults.parse(specs) if specs else Faults()


def info_to_wire(
    version: str,
    model: ModelInfo,
    model_sha256: str,
    policies: Iterable[Policy],
    limits: Limits,
    max_message_bytes: int,
) -> fse_pb2.Info:
    """GetInfo's answer. The model's file path stays on the server."""
    return fse_pb2.Info(
        version=version,
        model=fse_pb2.ModelInfo(
            name=model.name,
            sha256=model_sha256,
            description=model.description,
            vocab_size=model.vocab_size,
            context_size=model.context_size,
            train_context_size=model.train_context_size,
            size_bytes=model.size_bytes,
            chat_template=model.chat_template,
            backend=model.backend,
            layers=model.layers,
            gpu_layers=model.gpu_layers,
            devices=[
                fse_pb2.Device(
                    name=d.name,
                    description=d.description,
                    kind=d.kind,
                    memory_bytes=d.memory_bytes,
                    layers=d.layers,
                )
                for d in model.devices
            ],
        ),
        policies=[
            fse_pb2.PolicyInfo(name=p.name, sha256=p.sha256, builtin=p.name in builtin_names())
            for p in sorted(policies, key=lambda p: p.name)
        ],
        limits=fse_pb2.Limits(
            max_streams=limits.max_streams,
            max_queue=limits.max_queue,
            max_tokens=limits.max_tokens,
            max_prompt_tokens=limits.ctx_per_stream - 1,
            max_message_bytes=max_message_bytes,
        ),
    )


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request message protobuf could not parse; `error` names the field if it can."""

    error: str


def lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A gRPC request deserializer that cannot raise: a message protobuf refuses becomes
    an Undecodable for the method to refuse (gRPC would answer UNKNOWN, "Unexpected
    <class 'DecodeError'>", before the method could name the field or audit it)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(explain_undecodable(data, message_type.DESCRIPTOR, str(exc)))

    return parse


# The descriptor of fse.v1 nests three levels deep; anything deeper is not ours.
_MAX_DEPTH = 8


class _Corrupt(Exception):
    """Not protobuf's wire format."""


def explain_undecodable(data: bytes, descriptor: Any, reason: str = "") -> str:
    """Why protobuf refused `data`: the string field that is not UTF-8, named as the
    other request errors name fields (`request_id`, `messages[1].content`), or the
    message whose wire format is broken."""
    try:
        path = _bad_utf8(data, descriptor, "", 0)
    except (_Corrupt, RecursionError):
        path = None
    if path is not None:
        return f"{path.removeprefix('start.')}: not valid UTF-8; string fields must be UTF-8"
    if "UTF-8" in reason:
        return f"{descriptor.name}: a string field is not valid UTF-8; string fields must be UTF-8"
    return f"{descriptor.name}: not a valid protobuf message (its wire format is corrupt)"


def _bad_utf8(data: bytes, descriptor: Any, prefix: str, depth: int) -> str | None:
    """The path of the first string field in `data` that is not UTF-8, or None. Walks the
    wire format by the descriptor (error path only: the message was already refused)."""
    seen: dict[int, int] = {}  # occurrences of each repeated field so far
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            continue
        if wire_type != 2:
            raise _Corrupt
        size, pos = _varint(data, pos)
        chunk, pos = data[pos : pos + size], pos + size
        if pos > len(data):
            raise _Corrupt
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        name = f"{prefix}{field.name}"
        if field.is_repeated:
            seen[number] = seen.get(number, -1) + 1
            name += f"[{seen[number]}]"
        if field.type == field.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == field.TYPE_MESSAGE and depth < _MAX_DEPTH:
            found = _bad_utf8(chunk, field.message_type, f"{name}.", depth + 1)
            if found is not None:
                return found
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _Corrupt
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise _Corrupt
