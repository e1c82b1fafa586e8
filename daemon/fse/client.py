"""A small synchronous client of the daemon (used by `fse generate --addr`).

Turns the wire messages back into the domain's TokenEvent and Verdict, so the
CLI renders a remote stream exactly as it renders a local one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import grpc

from fse.guards import Trip
from fse.metrics import StepMetrics
from fse.stream import CANCELLED, COMPLETED, ERROR, HALTED, Event, Request, TokenEvent, Verdict
from fse.v1 import fse_pb2, fse_pb2_grpc

STATUS_FROM_WIRE = {
    fse_pb2.STATUS_COMPLETED: COMPLETED,
    fse_pb2.STATUS_HALTED: HALTED,
    fse_pb2.STATUS_CANCELLED: CANCELLED,
    fse_pb2.STATUS_ERROR: ERROR,
}
HEALTH_FROM_WIRE = {
    fse_pb2.HEALTH_GREEN: "green",
    fse_pb2.HEALTH_YELLOW: "yellow",
    fse_pb2.HEALTH_RED: "red",
}


class ClientError(Exception):
    """The daemon could not be reached or refused the request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def request_to_wire(request: Request) -> fse_pb2.GenerateClientMessage:
    s = request.sampling
    sampling = fse_pb2.Sampling(
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p
    )
    if s.seed is not None:
        sampling.seed = s.seed
    start = fse_pb2.GenerateRequest(
        prompt=request.prompt,
        messages=[fse_pb2.ChatMessage(role=r, content=c) for r, c in request.messages],
        max_tokens=request.max_tokens,
        sampling=sampling,
        policy=request.policy,
        stop=list(request.stop),
        request_id=request.request_id,
        timeout_ms=0 if request.timeout is None else max(1, round(request.timeout * 1000)),
    )
    return fse_pb2.GenerateClientMessage(start=start)


def token_from_wire(t: fse_pb2.Token) -> TokenEvent:
    metrics = StepMetrics(
        index=t.index,
        token=t.id,
        nll=t.nll,
        ppl=t.ppl,
        ppl_cumulative=t.ppl_cumulative,
        variance=t.variance,
        max_prob=t.max_prob,
        l2_norm=t.l2_norm,
        non_finite=0,
    )
    warnings = tuple(
        Trip(
            w.guard,
            w.value if w.HasField("value") else None,
            w.threshold if w.HasField("threshold") else None,
            t.index,
            "warn",
        )
        for w in t.warnings
    )
    return TokenEvent(t.index, t.id, t.piece, t.text, metrics, HEALTH_FROM_WIRE[t.health], warnings)


def verdict_from_wire(v: fse_pb2.Verdict) -> Verdict:
    return Verdict(
        status=STATUS_FROM_WIRE.get(v.status, ERROR),
        tokens=v.tokens,
        text=v.text,
        policy=v.policy,
        policy_sha256=v.policy_sha256,
        guard=v.guard or None,
        value=v.value if v.HasField("value") else None,
        threshold=v.threshold if v.HasField("threshold") else None,
        token_index=v.token_index if v.HasField("token_index") else None,
        message=v.message,
    )


def remote_events(
    addr: str,
    request: Request,
    cancel: threading.Event,
    debug_faults: Sequence[str] = (),
) -> Iterator[Event]:
    """Stream a generation from the daemon; setting `cancel` sends a Cancel message."""
    done = threading.Event()

    def outgoing() -> Iterator[fse_pb2.GenerateClientMessage]:
        yield request_to_wire(request)
        while not cancel.wait(0.05):
            if done.is_set():
                return
        yield fse_pb2.GenerateClientMessage(cancel=fse_pb2.Cancel())

    metadata = [("fse-debug-fault", spec) for spec in debug_faults]
    with grpc.insecure_channel(addr) as channel:
        call = fse_pb2_grpc.GuardStub(channel).Generate(outgoing(), metadata=metadata)
        try:
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "token":
                    yield token_from_wire(msg.token)
                elif kind == "verdict":
                    yield verdict_from_wire(msg.verdict)
                    return
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ClientError(
                    f"cannot reach the daemon at {addr} ({exc.details()}); is `fse serve` running?",
                    code,
                ) from None
            raise ClientError(f"{code.name}: {exc.details()}", code) from None
        finally:
            done.set()
    raise ClientError(f"the daemon at {addr} ended the stream without a verdict")
