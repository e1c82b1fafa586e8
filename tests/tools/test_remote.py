"""fse.tools.remote: a client token becomes the domain's StepMetrics with every metric the
wire carries, so a run through a daemon replays like a local one (the entropy guard
included: a NaN entropy would halt it as `internal`)."""

from __future__ import annotations

import math

import fse_client
from fse.core.policy import EntropyGuard, Policy
from fse.core.types import StepMetrics
from fse.tools.remote import _token
from fse.tools.runner import replay


def client_token(index: int, entropy: float) -> fse_client.TokenEvent:
    return fse_client.TokenEvent(
        index=index,
        id=1000 + index,
        piece=b" x",
        text=" x",
        nll=1.5,
        ppl=4.5,
        ppl_cumulative=4.5,
        variance=19.7,
        max_prob=0.6,
        l2_norm=2574.2,
        health=fse_client.Health.GREEN,
        entropy=entropy,
    )


def steps(entropies: list[float]) -> list[StepMetrics]:
    return [_token(client_token(i, e)).metrics for i, e in enumerate(entropies)]


def test_every_metric_of_a_client_token_reaches_the_step() -> None:
    event = _token(client_token(3, 2.75))
    m = event.metrics
    assert (m.index, m.token, m.nll, m.ppl, m.ppl_cumulative) == (3, 1003, 1.5, 4.5, 4.5)
    assert (m.variance, m.max_prob, m.l2_norm, m.non_finite) == (19.7, 0.6, 2574.2, 0)
    assert m.entropy == 2.75  # not the domain's default NaN
    assert (event.index, event.token, event.text, event.health) == (3, 1003, " x", "green")


def test_replay_of_remote_steps_judges_the_entropy_guard() -> None:
    policy = Policy("entropic", entropy=EntropyGuard(4.0, window=2, min_tokens=1))
    assert replay(steps([1.0, 2.0, 3.0]), policy) is None
    trip = replay(steps([1.0, 5.0, 6.0]), policy)
    assert trip is not None and trip.guard == "entropy"  # never `internal`
    assert (trip.token_index, trip.value, trip.threshold) == (2, 5.5, 4.0)


def test_a_token_built_without_entropy_is_nan_and_fails_closed() -> None:
    """fse_client's default stays NaN (unknown), which the guard never takes for calm."""
    token = fse_client.TokenEvent(0, 1, b"", "", 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, None)
    assert math.isnan(token.entropy)
    policy = Policy("entropic", entropy=EntropyGuard(4.0, window=1, min_tokens=1))
    trip = replay([_token(token).metrics], policy)
    assert trip is not None and trip.guard == "internal"
