"""A running daemon as a source of the domain's events, through the Python client.

`fse generate --addr`, `fse calibrate --addr` and `fse experiment --addr` render and
judge a remote stream exactly as they do a local one: fse_client's typed values are
turned back into fse.core's TokenEvent and Verdict here, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import fse_client

from fse.core.types import Event, Request, Status, StepMetrics, TokenEvent, Trip, Verdict

ClientError = fse_client.FseError


def _token(e: fse_client.TokenEvent) -> TokenEvent:
    metrics = StepMetrics(
        index=e.index,
        token=e.id,
        nll=e.nll,
        ppl=e.ppl,
        ppl_cumulative=e.ppl_cumulative,
        variance=e.variance,
        max_prob=e.max_prob,
        l2_norm=e.l2_norm,
        non_finite=0,
        entropy=e.entropy,
    )
    warnings = tuple(Trip(w.guard, w.value, w.threshold, e.index, "warn") for w in e.warnings)
    # A token without a health band is shown red: never greener than the daemon said.
    health = e.health.value if e.health is not None else "red"
    return TokenEvent(e.index, e.id, e.piece, e.text, metrics, health, warnings)


def _verdict(v: fse_client.Verdict) -> Verdict:
    return Verdict(
        status=Status(v.status.value),
        tokens=v.tokens,
        text=v.text,
        policy=v.policy,
        policy_sha256=v.policy_sha256,
        guard=v.guard,
        value=v.value,
        threshold=v.threshold,
        token_index=v.token_index,
        message=v.message,
        completion=None if v.completion is None else v.completion.value,
    )


class RemoteStream:
    """One generation on the daemon, as core events. `cancel()` may come from any thread
    (a signal handler): it sends a Cancel message and the stream ends `cancelled`.

    Raises ValueError for a malformed address, fse_client.FseError for a failed call."""

    def __init__(
        self,
        addr: str,
        request: Request,
        debug_faults: Sequence[str] = (),
        *,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        token: str | None = None,
    ) -> None:
        s = request.sampling
        self._client = fse_client.Client(
            addr, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token
        )
        self._generation = self._client.generate(
            request.prompt,
            messages=request.messages,
            max_tokens=request.max_tokens,
            sampling=fse_client.Sampling(s.temperature, s.top_k, s.top_p, s.min_p, s.seed),
            policy=request.policy,
            stop=request.stop,
            request_id=request.request_id,
            timeout=request.timeout,
            metadata=[("fse-debug-fault", spec) for spec in debug_faults],
        )

    def cancel(self) -> None:
        self._generation.cancel()

    def __iter__(self) -> Iterator[Event]:
        try:
            for event in self._generation:
                if isinstance(event, fse_client.TokenEvent):
                    yield _token(event)
                else:
                    yield _verdict(event)
        finally:
            self._generation.close()
            self._client.close()
