"""Unit tests for fse.core.guards: each guard at its boundaries, fail closed, the loop detector."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable

import pytest
from fse.core import types as g
from fse.core.guards import PASS, GuardChain, LoopDetector
from fse.core.policy import (
    EntropyGuard,
    L2NormGuard,
    LogitVarianceGuard,
    LoopGuard,
    MaxProbGuard,
    PerplexityGuard,
    Policy,
    PromptPerplexityGuard,
    builtin_policy,
)
from fse.core.types import StepMetrics, Trip

BARE = Policy("bare")  # no configurable guard: only non_finite (always on)


def step(index: int = 10, **kw: float) -> StepMetrics:
    """Metrics of a healthy step (Gemma-like values); keyword args override fields.

    The token defaults to a distinct id per index, so healthy steps never form a loop.
    """
    fields: dict[str, float] = dict(
        token=1000 + index,
        nll=2.0,
        ppl=7.4,
        ppl_cumulative=7.4,
        variance=19.7,
        max_prob=0.84,
        l2_norm=2574.2,
        non_finite=0,
        entropy=2.5,
    )
    fields.update(kw)
    return StepMetrics(index, **fields)  # type: ignore[arg-type]


def only(policy_guard: object) -> Policy:
    """A policy with just one configurable guard."""
    name = {
        PerplexityGuard: "perplexity",
        L2NormGuard: "l2_norm",
        LogitVarianceGuard: "logit_variance",
        MaxProbGuard: "max_prob",
        EntropyGuard: "entropy",
        LoopGuard: "loop",
        PromptPerplexityGuard: "prompt_perplexity",
    }[type(policy_guard)]
    return Policy("t", **{name: policy_guard})  # type: ignore[arg-type]


def run_tokens(chain: GuardChain, tokens: Iterable[int], start: int = 0) -> list[tuple[int, Trip]]:
    """Feed tokens (healthy metrics otherwise); return (index, trip) of every trip."""
    out = []
    for i, tok in enumerate(tokens, start):
        for trip in chain.check(step(i, token=tok)):
            out.append((i, trip))
    return out


# --- basics ------------------------------------------------------------------------


def test_names_are_the_contract() -> None:
    assert (g.PERPLEXITY, g.LOGIT_VARIANCE, g.MAX_PROB, g.L2_NORM) == (
        "perplexity",
        "logit_variance",
        "max_prob",
        "l2_norm",
    )
    assert (g.NON_FINITE, g.LOOP, g.INTERNAL, g.DEADLINE, g.SHUTDOWN) == (
        "non_finite",
        "loop",
        "internal",
        "deadline",
        "shutdown",
    )
    assert (g.ENTROPY, g.PROMPT_PERPLEXITY) == ("entropy", "prompt_perplexity")
    assert g.NEAR_LOOP == "near_loop"
    assert len(set(g.GuardName)) == 12


def test_trip_is_frozen() -> None:
    t = Trip("perplexity", 500.0, 400.0, 3, "halt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.value = 1.0  # type: ignore[misc]
    assert t.halts and not Trip("loop", 3.0, 3.0, 1, "warn").halts


def test_healthy_step_passes_with_shared_empty_tuple() -> None:
    chain = GuardChain(builtin_policy("pro"))
    result = chain.check(step(0))
    assert result == () and result is PASS
    assert chain.check(step(1)) is PASS


def test_active_guards() -> None:
    assert GuardChain(BARE).active == ("non_finite",)
    assert GuardChain(builtin_policy("default")).active == ("non_finite", "perplexity", "l2_norm")
    assert set(GuardChain(builtin_policy("pro")).active) == {
        "non_finite",
        "perplexity",
        "l2_norm",
        "logit_variance",
        "max_prob",
        "loop",
        "near_loop",
        "prompt_perplexity",
    }


# --- threshold guards at their boundaries -------------------------------------------


def test_perplexity_strictly_greater() -> None:
    chain = GuardChain(only(PerplexityGuard(400.0, 16, 4)))
    assert chain.check(step(10, ppl=400.0)) == ()
    assert chain.check(step(11, ppl=400.0001)) == (Trip("perplexity", 400.0001, 400.0, 11, "halt"),)


def test_perplexity_infinite_trips_not_internal() -> None:
    # exp overflow of a huge mean nll is a legitimate +inf perplexity.
    (trip,) = GuardChain(only(PerplexityGuard(400.0))).check(step(5, ppl=math.inf))
    assert (trip.guard, trip.value) == ("perplexity", math.inf)


def test_perplexity_armed_after_min_tokens() -> None:
    chain = GuardChain(only(PerplexityGuard(400.0, 16, min_tokens=4)))
    assert [chain.check(step(i, ppl=1e6)) for i in range(3)] == [(), (), ()]
    (trip,) = chain.check(step(3, ppl=1e6))  # the 4th token: armed
    assert trip == Trip("perplexity", 1e6, 400.0, 3, "halt")
    armed_at_once = GuardChain(only(PerplexityGuard(400.0, 16, min_tokens=1)))
    assert armed_at_once.check(step(0, ppl=1e6))[0].token_index == 0


def test_l2_norm_strictly_greater() -> None:
    chain = GuardChain(only(L2NormGuard(1e4)))
    assert chain.check(step(l2_norm=1e4)) == ()
    assert chain.check(step(7, l2_norm=10000.5)) == (Trip("l2_norm", 10000.5, 1e4, 7, "halt"),)


def test_logit_variance_strictly_less() -> None:
    chain = GuardChain(only(LogitVarianceGuard(0.1)))
    assert chain.check(step(variance=0.1)) == ()
    assert chain.check(step(2, variance=0.0999)) == (
        Trip("logit_variance", 0.0999, 0.1, 2, "halt"),
    )
    assert chain.check(step(3, variance=0.0))[0].guard == "logit_variance"


def test_logit_variance_zero_threshold_never_trips() -> None:
    assert GuardChain(only(LogitVarianceGuard(0.0))).check(step(variance=0.0)) == ()


def test_max_prob_needs_consecutive_steps() -> None:
    chain = GuardChain(only(MaxProbGuard(0.99, consecutive=8)))
    results = [chain.check(step(i, max_prob=0.995)) for i in range(8)]
    assert results[:7] == [()] * 7
    assert results[7] == (Trip("max_prob", 0.995, 0.99, 7, "halt"),)


def test_max_prob_resets_at_or_below_threshold() -> None:
    chain = GuardChain(only(MaxProbGuard(0.99, consecutive=3)))
    probs = [0.999, 0.999, 0.99, 0.999, 0.999, 0.5, 0.999, 0.999, 0.999, 1.0]
    tripped = [i for i, p in enumerate(probs) if chain.check(step(i, max_prob=p))]
    # Reset by 0.99 (at threshold) at index 2 and by 0.5 at index 5; then three in
    # a row at 6..8 trips, and it keeps tripping while the run continues.
    assert tripped == [8, 9]


def test_max_prob_consecutive_one() -> None:
    chain = GuardChain(only(MaxProbGuard(0.99, consecutive=1)))
    assert chain.check(step(max_prob=0.99)) == ()
    assert chain.check(step(max_prob=0.991))[0].guard == "max_prob"


def test_entropy_trips_on_the_windowed_mean_once_armed() -> None:
    chain = GuardChain(only(EntropyGuard(4.0, window=4, min_tokens=3)))
    values = [9.0, 9.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0]
    trips = {i: chain.check(step(i, entropy=v)) for i, v in enumerate(values)}
    # Means over the last 4: 9, 9, 6.33 (armed from index 2: trips), 5, 3, 3, 5, 7, 9.
    assert [i for i, t in trips.items() if t] == [2, 3, 6, 7, 8]
    assert trips[2] == (Trip("entropy", pytest.approx(19 / 3), 4.0, 2, "halt"),)  # type: ignore[arg-type]


def test_entropy_nan_is_internal_and_warn_releases() -> None:
    chain = GuardChain(only(EntropyGuard(4.0, window=2, min_tokens=1)))
    assert chain.check(step(0, entropy=math.nan))[0].guard == "internal"
    warn = GuardChain(only(EntropyGuard(1.0, window=1, min_tokens=1, action="warn")))
    assert warn.check(step(0, entropy=3.0)) == (Trip("entropy", 3.0, 1.0, 0, "warn"),)


def test_entropy_window_sum_does_not_drift() -> None:
    chain = GuardChain(only(EntropyGuard(5.0, window=3, min_tokens=1)))
    rng = random.Random(3)
    for i in range(3000):
        chain.check(step(i, entropy=rng.uniform(0.0, 4.99)))
    assert chain.check(step(3000, entropy=5.0)) == ()  # mean < 5 exactly, no drift above
    assert chain.check(step(3001, entropy=5.0)) == ()
    assert chain.check(step(3002, entropy=5.0)) == ()
    assert chain.check(step(3003, entropy=5.01))[0].guard == "entropy"


def test_prompt_perplexity_whole_and_windowed() -> None:
    from fse.core.registry.prompt import prompt_perplexities

    # 4 skipped (huge: right after BOS), then 10 tokens at nll 1 and 4 at nll 8.
    nll = [20.0] * 4 + [1.0] * 10 + [8.0] * 4
    whole, windowed = prompt_perplexities(nll, skip=4, window=4)
    assert whole == pytest.approx(math.exp((10 + 32) / 14))
    assert windowed == pytest.approx(math.exp(8.0))
    assert prompt_perplexities(nll[:4], skip=4, window=4) == (1.0, 1.0)  # nothing left
    assert prompt_perplexities([2.0, 4.0], skip=0, window=16)[1] == pytest.approx(math.exp(3))
    chain = GuardChain(only(PromptPerplexityGuard(100.0, window=4, window_threshold=1000.0)))
    assert chain.scores_prompt and chain.check(step()) == ()  # nothing per step
    assert chain.check_prompt([20.0] * 4 + [1.0] * 14) == ()
    # whole e^3 = 20 passes 100; the window e^8 = 2981 trips 1000.
    assert chain.check_prompt(nll) == (
        Trip("prompt_perplexity", pytest.approx(math.exp(8.0)), 1000.0, 0, "halt"),  # type: ignore[arg-type]
    )
    # the whole prompt above its threshold is reported first.
    assert chain.check_prompt([9.0] * 20)[0].threshold == 100.0
    assert chain.check_prompt([math.nan] * 20)[0].guard == "internal"
    assert not GuardChain(builtin_policy("default")).scores_prompt


def test_max_prob_threshold_one_never_trips() -> None:
    chain = GuardChain(only(MaxProbGuard(1.0, consecutive=1)))
    assert all(chain.check(step(i, max_prob=1.0)) == () for i in range(5))


def test_chains_do_not_share_state() -> None:
    policy = only(MaxProbGuard(0.99, consecutive=2))
    a, b = GuardChain(policy), GuardChain(policy)
    assert a.check(step(0, max_prob=1.0)) == ()
    assert b.check(step(0, max_prob=1.0)) == ()  # b's counter is its own
    assert a.check(step(1, max_prob=1.0)) != ()


# --- actions and ordering ------------------------------------------------------------


def test_warn_is_reported_not_halting() -> None:
    chain = GuardChain(only(PerplexityGuard(400.0, action="warn")))
    (trip,) = chain.check(step(9, ppl=900.0))
    assert trip == Trip("perplexity", 900.0, 400.0, 9, "warn")
    assert not trip.halts


def test_halts_come_before_warns() -> None:
    policy = Policy(
        "mixed",
        perplexity=PerplexityGuard(400.0, action="warn"),  # runs first in the chain
        l2_norm=L2NormGuard(1e4, action="halt"),
        logit_variance=LogitVarianceGuard(0.1, action="warn"),
        max_prob=MaxProbGuard(0.99, consecutive=1, action="halt"),
    )
    trips = GuardChain(policy).check(step(6, ppl=1e3, l2_norm=2e4, variance=0.01, max_prob=0.999))
    assert [(t.guard, t.action) for t in trips] == [
        ("l2_norm", "halt"),
        ("max_prob", "halt"),
        ("perplexity", "warn"),
        ("logit_variance", "warn"),
    ]
    assert all(t.token_index == 6 for t in trips)


def test_every_trip_of_a_step_is_reported() -> None:
    trips = GuardChain(builtin_policy("pro")).check(step(20, ppl=1e4, l2_norm=1e5))
    assert {t.guard for t in trips} == {"perplexity", "l2_norm"}


# --- non_finite ---------------------------------------------------------------------------


def test_non_finite_always_on_without_guards() -> None:
    chain = GuardChain(BARE)
    assert chain.check(step(0)) == ()
    assert chain.check(step(1, non_finite=3)) == (Trip("non_finite", 3.0, 0.0, 1, "halt"),)


def test_non_finite_alone_and_first() -> None:
    # Other guards would trip (or see NaN): non_finite is the single, halting answer.
    trips = GuardChain(builtin_policy("pro")).check(
        step(4, non_finite=1, ppl=math.nan, nll=math.inf, l2_norm=1e9, variance=math.nan)
    )
    assert trips == (Trip("non_finite", 1.0, 0.0, 4, "halt"),)


def test_non_finite_even_when_every_guard_warns() -> None:
    policy = Policy(
        "warny", perplexity=PerplexityGuard(action="warn"), loop=LoopGuard(action="warn")
    )
    (trip,) = GuardChain(policy).check(step(0, non_finite=262144))
    assert (trip.guard, trip.action, trip.value) == ("non_finite", "halt", 262144.0)


# --- internal (fail closed) --------------------------------------------------------------


def test_fault_hook_becomes_internal() -> None:
    chain = GuardChain(builtin_policy("pro"), fault_at=5)
    assert [chain.check(step(i)) for i in range(5)] == [()] * 5
    assert chain.check(step(5)) == (Trip("internal", None, None, 5, "halt"),)
    assert chain.check(step(6)) == ()


def test_fault_replaces_other_trips() -> None:
    chain = GuardChain(builtin_policy("pro"), fault_at=8)
    assert chain.check(step(8, ppl=1e6, l2_norm=1e6)) == (Trip("internal", None, None, 8, "halt"),)


@pytest.mark.parametrize(
    "bad",
    [
        {"nll": math.nan},
        {"nll": math.inf},
        {"l2_norm": math.nan},
        {"l2_norm": math.inf},
        {"variance": math.nan},
        {"variance": -math.inf},
        {"max_prob": math.nan},
        {"ppl": math.nan},
        {"ppl_cumulative": math.nan},
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
@pytest.mark.parametrize("policy", [BARE, builtin_policy("pro")], ids=["bare", "pro"])
def test_impossible_metrics_are_internal(bad: dict[str, float], policy: Policy) -> None:
    # non_finite == 0 but a metric is not finite: the engine is wrong, so fail closed.
    assert GuardChain(policy).check(step(12, **bad)) == (Trip("internal", None, None, 12, "halt"),)


def test_guard_type_error_is_internal() -> None:
    chain = GuardChain(only(LoopGuard()))
    bad = step(3)
    bad.token = "not a token"  # type: ignore[assignment]
    assert chain.check(bad) == (Trip("internal", None, None, 3, "halt"),)
    huge = step(4, token=2**40)  # does not fit int32_t
    assert chain.check(huge) == (Trip("internal", None, None, 4, "halt"),)


def test_check_never_raises_on_garbage() -> None:
    chain = GuardChain(builtin_policy("pro"))
    assert chain.check(None) == (Trip("internal", None, None, -1, "halt"),)  # type: ignore[arg-type]


def test_nan_threshold_comparison_inside_guard_is_internal() -> None:
    # Bypass the chain's up-front sanity check to prove each guard's own NaN branch.
    for policy in (
        only(PerplexityGuard()),
        only(L2NormGuard()),
        only(LogitVarianceGuard()),
        only(MaxProbGuard(consecutive=1)),
    ):
        chain = GuardChain(policy)
        (guard,) = chain._guards
        field = {
            "perplexity": "ppl",
            "l2_norm": "l2_norm",
            "logit_variance": "variance",
            "max_prob": "max_prob",
        }[policy.guards().popitem()[0]]
        with pytest.raises(Exception):  # noqa: B017 - the chain turns any exception into internal
            guard(step(10, **{field: math.nan}))


# --- loop ---------------------------------------------------------------------------------


def test_loop_period_one_trips_at_exactly_the_twelfth() -> None:
    chain = GuardChain(builtin_policy("pro"))
    prefix = [11, 22, 33, 44, 55]
    trips = run_tokens(chain, [*prefix, *[7] * 14])
    first = len(prefix) + 11  # the 12th identical token
    assert trips[0] == (first, Trip("loop", 12.0, 3.0, first, "halt"))
    assert [i for i, _ in trips] == [first, first + 1, first + 2]  # keeps tripping


def test_loop_period_three_needs_min_span() -> None:
    # Period 3 with min_repeats 3 / min_span 12: 9 tokens (3 repeats) are not enough,
    # the 12th token of the cycle (4 repeats, span 12) trips.
    chain = GuardChain(only(LoopGuard(1024, 3, 12)))
    trips = run_tokens(chain, [1, 2, 3] * 5)
    assert trips[0] == (11, Trip("loop", 4.0, 3.0, 11, "halt"))


def test_loop_period_three_needs_min_repeats() -> None:
    # With a small min_span the repeats rule decides: the 9th token (3 full cycles).
    chain = GuardChain(only(LoopGuard(1024, 3, 2)))
    trips = run_tokens(chain, [100, *([1, 2, 3] * 4)])
    assert trips[0] == (9, Trip("loop", 3.0, 3.0, 9, "halt"))


def test_loop_span_long_enough_but_too_few_repeats() -> None:
    # Period 8 repeated twice spans 16 >= min_span 12 but is only 2 repeats: no trip
    # until the third repeat completes (24 tokens).
    block = list(range(500, 508))
    chain = GuardChain(only(LoopGuard(1024, 3, 12)))
    trips = run_tokens(chain, block * 3)
    assert trips[0][0] == 23
    assert trips[0][1].value == 3.0


def test_loop_min_span_respected() -> None:
    chain = GuardChain(only(LoopGuard(1024, 3, 20)))
    trips = run_tokens(chain, [5] * 25)
    assert trips[0] == (19, Trip("loop", 20.0, 3.0, 19, "halt"))


def test_loop_long_period_block() -> None:
    rng = random.Random(7)
    block = [rng.randrange(262144) for _ in range(500)]
    chain = GuardChain(builtin_policy("pro"))
    trips = run_tokens(chain, [1, 2, 3, *(block * 3)])
    loops = [(i, t) for i, t in trips if t.guard == "loop"]
    end_of_third = 3 + 1500 - 1
    assert loops[0] == (end_of_third, Trip("loop", 3.0, 3.0, end_of_third, "halt"))


def test_loop_period_beyond_max_period_is_not_seen() -> None:
    rng = random.Random(3)
    block = [rng.randrange(1000) for _ in range(40)]
    assert run_tokens(GuardChain(only(LoopGuard(max_period=39))), block * 4) == []
    assert run_tokens(GuardChain(only(LoopGuard(max_period=40))), block * 4) != []


def test_loop_natural_text_with_reused_phrases_does_not_trip() -> None:
    # Zipf-like word choice from a small vocabulary, with stock phrases reused often
    # and a few doubled words ("very very"): ordinary output that must pass.
    rng = random.Random(20240501)
    vocab = list(range(2, 400))
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    phrases = [[901, 902, 903], [911, 912, 913, 914], [921, 922], [2, 931, 932, 933, 2]]
    tokens: list[int] = []
    last: list[int] = []
    while len(tokens) < 20000:
        roll = rng.random()
        if roll < 0.08:
            phrase = rng.choice(phrases)
            if phrase is not last:  # the same phrase thrice in a row IS a loop
                tokens += phrase
            last = phrase
        elif roll < 0.10:
            word = rng.choice(vocab)
            tokens += [word, word]
        else:
            tokens += rng.choices(vocab, weights, k=rng.randint(1, 6))
            last = []
    assert sum(tokens[i : i + 3] == phrases[0] for i in range(len(tokens))) > 100
    assert run_tokens(GuardChain(builtin_policy("pro")), tokens) == []


def test_loop_warn_keeps_going() -> None:
    chain = GuardChain(only(LoopGuard(16, 3, 12, action="warn")))
    trips = run_tokens(chain, [4] * 12 + [9, 8, 7])
    assert [(i, t.action) for i, t in trips] == [(11, "warn")]


def test_loop_detector_direct() -> None:
    det = LoopDetector(1024, 3, 12)
    assert [det.push(t) for t in [1, 2, 1, 2]] == [(0, 0)] * 4
    results = [det.push(t) for t in [1, 2] * 4]
    assert results[-1] == (2, 12)
    assert results[-2] == (0, 0)


@pytest.mark.parametrize("args", [(0, 3, 12), (16, 1, 12), (16, 3, 1)])
def test_loop_detector_rejects_bad_args(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        LoopDetector(*args)


def test_chain_order_is_the_registry_order() -> None:
    from fse.core.registry import GUARDS

    every = Policy("all", **{g.name: g.config() for g in GUARDS})
    assert GuardChain(every).active == ("non_finite", *(g.name for g in GUARDS))
    # pro has every guard but entropy.
    assert GuardChain(builtin_policy("pro")).active == (
        "non_finite",
        *(g.name for g in GUARDS if g.name != "entropy"),
    )
