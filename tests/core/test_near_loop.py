"""The near_loop guard: the C detector (native/fse_near_loop.c) against a plain Python
reference, on synthetic near-verbatim loops and on ordinary streams; its policy keys;
and the embedded model's own counter loops, in process and through `fse generate --local`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from fse.core.engine import Context
from fse.core.guards import GuardChain
from fse.core.model import Model
from fse.core.policy import (
    LoopGuard,
    NearLoopGuard,
    Policy,
    PolicyError,
    builtin_policy,
    parse_policy,
)
from fse.core.registry import NearLoopDetector, spec
from fse.core.registry.loops import LoopDetector
from fse.core.runner import run_local
from fse.core.types import HALTED, Request, Sampling, StepMetrics, Trip, Verdict
from support.cli import GREEDY, assert_halted, generate_json
from support.policies import PRO_TEXT, policy_error, policy_with

DEFAULTS = (256, 3, 24, 0.85)  # max_period, min_copies, min_span, min_match

# Greedy prompts on which the embedded model (Gemma 3 270M) loops with a counter: each
# copy differs from the one before by a token or two, so the exact loop guard misses.
COUNTER_PROMPTS = (
    "Day 1: I woke up and went to work. Day 2: I woke up and went to work. Day 3:",
    "[INFO] 10:00:01 retrying connection\n[INFO] 10:00:02 retrying connection\n[INFO] 10:00:03",
)


# ---------------------------------------------------------------------------
# helpers


def reference(
    tokens: Sequence[int], max_period: int, min_copies: int, min_span: int, min_match: float
) -> list[tuple[int, float]]:
    """The definition, step by step, in O(n * max_period * span): after each token, the
    smallest p whose last max(min_copies * p, min_span) tokens are all there and whose
    positions with a p-back token inside them match it at least min_match of the time."""
    out: list[tuple[int, float]] = []
    for n in range(1, len(tokens) + 1):
        found = (0, 0.0)
        for p in range(1, max_period + 1):
            span = max(min_copies * p, min_span)
            if span > n:
                break
            positions = range(n - span + p, n)
            matches = sum(tokens[i] == tokens[i - p] for i in positions)
            if matches / len(positions) >= min_match:
                found = (p, matches / len(positions))
                break
        out.append(found)
    return out


def pushes(detector: NearLoopDetector, tokens: Sequence[int]) -> list[tuple[int, float]]:
    return [detector.push(t) for t in tokens]


def first_trip(tokens: Sequence[int], *args: float) -> tuple[int, int, float] | None:
    """(index, period, match) of the first trip of a fresh detector, or None."""
    detector = NearLoopDetector(*args) if args else NearLoopDetector(*DEFAULTS)  # type: ignore[arg-type]
    for i, t in enumerate(tokens):
        period, match = detector.push(t)
        if period:
            return i, period, match
    return None


def exact_loop_trips(tokens: Sequence[int]) -> bool:
    """Whether the exact detector with `pro`'s settings (1024/3/12) ever trips."""
    detector = LoopDetector(1024, 3, 12)
    return any(detector.push(t)[0] for t in tokens)


PHRASE = list(range(500, 510))  # ten tokens: "I woke up and went to work ."


def counter_copies(first: int, last: int, at: int = 1, digits: bool = False) -> list[int]:
    """Copies of PHRASE with a counter at position `at`; with `digits`, the counter is one
    token per decimal digit (as Gemma spells numbers), so copy 10 is one token longer."""
    out: list[int] = []
    for k in range(first, last + 1):
        counter = [900 + int(d) for d in str(k)] if digits else [900 + k]
        out += PHRASE[:at] + counter + PHRASE[at + 1 :]
    return out


def ordinary(n: int, seed: int) -> list[int]:
    """Random ids from a vocabulary of 4,000: text without any loop."""
    rng = random.Random(seed)
    return [rng.randrange(4000) for _ in range(n)]


# ---------------------------------------------------------------------------
# the detector on synthetic streams


def test_a_counter_in_each_copy_trips_at_the_third_copy_and_exact_loop_misses_it() -> None:
    prefix = ordinary(40, 1)
    tokens = prefix + counter_copies(1, 8)
    found = first_trip(tokens)
    # 30 tokens back from the third copy's next-to-last token: 20 positions compared,
    # 2 counters and the first copy's last token (against the prefix) differ: 17 / 20.
    assert found == (len(prefix) + 28, 10, 0.85)
    assert not exact_loop_trips(tokens)


def test_a_timestamp_changing_several_tokens_per_copy() -> None:
    # "[INFO] 10:00:0K retry connection" in 16 tokens, the last two digits changing.
    line = list(range(600, 616))
    tokens = ordinary(30, 2)
    for k in range(12):
        copy = list(line)
        copy[7], copy[8] = 700 + k // 10, 710 + k % 10  # tens and units
        tokens += copy
    found = first_trip(tokens)
    assert found is not None and found[1] == 16 and found[2] >= 0.85
    assert found[0] < 30 + 16 * 4  # within four copies
    assert not exact_loop_trips(tokens)


def test_the_period_changes_when_the_counter_gains_a_digit() -> None:
    # Day 1..9 are 11 tokens a copy with a one-digit counter... here 10 + 0 extra; from
    # Day 10 on each copy is one token longer: the detector follows to period 11.
    tokens = counter_copies(1, 16, digits=True)
    detector = NearLoopDetector(*DEFAULTS)
    periods = [detector.push(t)[0] for t in tokens]
    start_of_10 = 9 * 10
    assert set(periods[29:start_of_10]) == {10}  # from the third copy on
    tail = [p for p in periods[start_of_10 + 3 * 11 :] if p]
    assert tail and set(tail) == {11}
    # Starting at Day 8: two copies of 10, then copies of 11: caught at period 11.
    found = first_trip(counter_copies(8, 14, digits=True))
    assert found is not None and found[1] == 11
    assert not exact_loop_trips(tokens)


def test_one_token_in_ten_changed_per_copy_at_random() -> None:
    # Under a repetition penalty: each copy is the one before with one token replaced.
    rng = random.Random(5)
    copy = list(range(300, 320))
    tokens = ordinary(25, 3)
    for _ in range(10):
        copy = list(copy)
        for _ in range(2):  # 2 of 20 tokens
            copy[rng.randrange(20)] = rng.randrange(4000, 5000)
        tokens += copy
    found = first_trip(tokens)
    assert found is not None and found[1] == 20
    assert not exact_loop_trips(tokens)
    # Noise on every copy of a fixed phrase (not a drift): a pair of copies then differs
    # at about 2 in 10 positions, below 0.85 but not below 0.75.
    noisy, phrase = ordinary(25, 4), list(range(300, 320))
    for _ in range(10):
        noisy += [t if rng.random() >= 0.1 else rng.randrange(4000, 5000) for t in phrase]
    assert first_trip(noisy, 256, 3, 24, 0.95) is None
    found = first_trip(noisy, 256, 3, 24, 0.75)
    assert found is not None and found[1] == 20


def test_an_exact_cycle_trips_with_match_one() -> None:
    for period in (1, 2, 7, 24, 100):
        block = list(range(2000, 2000 + period))
        tokens = ordinary(50, period) + block * (max(3 * period, 24) // period + 1)
        found = first_trip(tokens)
        span = max(3 * period, 24)
        # Complete at the span's last token; earlier when min_match allows a few of the
        # prefix's tokens in.
        assert found is not None and found[1] == period, period
        assert 50 + span - 1 - 0.15 * (span - period) <= found[0] <= 50 + span - 1
        assert first_trip(tokens, 256, 3, 24, 1.0) == (50 + span - 1, period, 1.0)


def test_a_phrase_repeated_twice_in_ordinary_text_passes() -> None:
    phrase = ordinary(12, 9)
    for seed in range(20):
        text = ordinary(200, 100 + seed)
        at = 50 + seed * 5
        tokens = text[:at] + phrase + phrase + text[at:]
        assert first_trip(tokens) is None, seed
    # A third copy is a loop.
    tokens = ordinary(50, 7) + phrase * 3 + ordinary(20, 8)
    found = first_trip(tokens)
    assert found is not None and found[1] == 12 and 50 + 24 < found[0] <= 50 + 35


def test_a_long_enumeration_of_distinct_items_passes() -> None:
    # "1. <item>\n2. <item>\n..." for 60 items of 2-6 distinct words: the number and the
    # punctuation repeat, the items do not.
    rng = random.Random(11)
    tokens: list[int] = []
    for k in range(1, 61):
        tokens += [900 + int(d) for d in str(k)] + [46]  # "12" "."
        tokens += [rng.randrange(1000, 9000) for _ in range(rng.randrange(2, 7))]
        tokens += [10]  # "\n"
    assert first_trip(tokens) is None


def test_a_window_must_be_full() -> None:
    # 23 tokens of one id: period 1, but min_span 24 is not reached yet.
    assert first_trip([5] * 23) is None
    assert first_trip([5] * 24) == (23, 1, 1.0)
    # Two copies of a long phrase match 100% but are only 2 of 3 copies.
    block = list(range(40))
    assert first_trip(block * 2 + [7]) is None
    assert first_trip(block * 3) == (119, 40, 1.0)


def test_max_period_bounds_what_is_seen() -> None:
    block = list(range(3000, 3300))  # period 300
    tokens = block * 4
    assert first_trip(tokens) is None  # default max_period 256
    assert first_trip(tokens, 300, 3, 24, 0.85) == (899, 300, 1.0)


def test_min_match_one_means_exact() -> None:
    tokens = ordinary(10, 1) + counter_copies(1, 10)
    assert first_trip(tokens, 256, 3, 24, 1.0) is None
    assert first_trip(ordinary(10, 1) + PHRASE * 3, 256, 3, 24, 1.0) == (39, 10, 1.0)


@pytest.mark.parametrize(
    "args",
    [
        (16, 3, 24, 0.85),
        (16, 2, 2, 0.6),
        (8, 4, 10, 0.7),
        (20, 2, 30, 0.5),
        (5, 3, 2, 1.0),
        (12, 3, 24, 0.01),
    ],
)
def test_the_c_detector_agrees_with_the_reference(args: tuple[int, int, int, float]) -> None:
    # A small alphabet makes chance matches frequent, and mixing in noisy loops of
    # random periods makes trips frequent: every branch is exercised.
    rng = random.Random(hash(args) & 0xFFFF)
    for _ in range(6):
        tokens: list[int] = []
        while len(tokens) < 300:
            if rng.random() < 0.5:
                tokens += [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
            else:
                block = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
                for _ in range(rng.randrange(2, 8)):
                    tokens += [t if rng.random() > 0.1 else rng.randrange(6) for t in block]
        got = pushes(NearLoopDetector(*args), tokens)
        want = reference(tokens, *args)
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-12)
        assert any(g[0] for g in got)


def test_best_reports_the_highest_fraction_of_full_windows() -> None:
    detector = NearLoopDetector(256, 3, 24, 0.85)
    assert detector.best() == (0, 0.0)
    for t in counter_copies(1, 5):
        detector.push(t)
    assert detector.best() == (10, 0.9)
    # Shorter periods have full windows too, but match less.
    detector = NearLoopDetector(16, 3, 24, 0.85)
    for t in ordinary(100, 3):
        detector.push(t)
    period, match = detector.best()
    assert 0 <= period <= 16 and 0.0 <= match < 0.3
    detector = NearLoopDetector(8, 3, 24, 0.85)  # period 9 is exact: out of reach
    for t in [1, 2, 3, 1, 2, 4, 1, 2, 5] * 4:
        detector.push(t)
    period, match = detector.best()
    assert period == 3 and match == pytest.approx(2 / 3)


def test_detectors_are_independent_and_checked() -> None:
    a, b = NearLoopDetector(*DEFAULTS), NearLoopDetector(*DEFAULTS)
    for t in PHRASE * 3:
        a.push(t)
    assert a.push(PHRASE[0])[0] == 10
    assert b.push(PHRASE[0]) == (0, 0.0)
    for bad in ((0, 3, 24, 0.85), (4097, 3, 24, 0.85), (8, 1, 24, 0.85), (8, 3, 1, 0.85)):
        with pytest.raises(ValueError):
            NearLoopDetector(*bad)
    for match in (0.0, 1.01, float("nan")):
        with pytest.raises(ValueError):
            NearLoopDetector(8, 3, 24, match)


# ---------------------------------------------------------------------------
# the guard in the chain


def step(index: int, token: int) -> StepMetrics:
    return StepMetrics(index, token, 2.0, 7.4, 7.4, 19.7, 0.84, 2574.2, 0, 2.5)


def chain_trips(policy: Policy, tokens: Sequence[int]) -> list[tuple[Trip, ...]]:
    chain = GuardChain(policy)
    return [chain.check(step(i, t)) for i, t in enumerate(tokens)]


def test_the_guard_trips_with_the_match_and_names_the_period() -> None:
    tokens = ordinary(40, 1) + counter_copies(1, 8)
    trips = chain_trips(Policy("t", near_loop=NearLoopGuard()), tokens)
    first = next(i for i, t in enumerate(trips) if t)
    assert first == 68
    (trip,) = trips[first]
    assert trip == Trip("near_loop", 0.85, 0.85, 68, "halt")
    assert trip.detail == "period 10 tokens"


def test_warn_lets_tokens_through_and_each_stream_has_its_own_detector() -> None:
    policy = Policy("t", near_loop=NearLoopGuard(action="warn"))
    tokens = PHRASE * 2
    first = chain_trips(policy, tokens)
    # A second chain starts empty: the first's 20 tokens do not carry over.
    assert chain_trips(policy, tokens) == first and not any(first)
    trips = chain_trips(policy, PHRASE * 3)
    assert trips[29] == (Trip("near_loop", 1.0, 0.85, 29, "warn"),)


def test_both_loop_guards_report_in_registry_order() -> None:
    policy = Policy("t", loop=LoopGuard(), near_loop=NearLoopGuard())
    trips = chain_trips(policy, ordinary(5, 1) + PHRASE * 3)
    assert [t.guard for t in trips[34]] == ["loop", "near_loop"]


# ---------------------------------------------------------------------------
# policy keys


def near_with(key: str, value: str) -> str:
    """`pro` with its [guards.near_loop] table holding key = value."""
    return policy_with("guards.near_loop", key, value)


WITHOUT_NEAR = PRO_TEXT.replace("[guards.near_loop]\nmin_match = 0.85\n", "")


def test_defaults_and_built_ins() -> None:
    assert NearLoopGuard() == NearLoopGuard(256, 3, 24, 0.85, "halt")
    assert parse_policy(PRO_TEXT).near_loop == NearLoopGuard()
    assert builtin_policy("pro").near_loop == NearLoopGuard()  # on in pro, at the defaults
    assert builtin_policy("default").near_loop is None
    assert spec("near_loop").config is NearLoopGuard
    measure = spec("near_loop").measure
    assert measure is not None and (measure.key, measure.rule) == ("min_match", "near_loop_match")


def test_keys_round_trip_through_toml() -> None:
    policy = Policy("x", near_loop=NearLoopGuard(4096, 1000, 65536, 1, "warn"))
    assert policy.near_loop is not None and policy.near_loop.min_match == 1.0
    assert isinstance(policy.near_loop.min_match, float)
    again = parse_policy(policy.to_toml())
    assert again == policy and again.sha256 == policy.sha256
    assert WITHOUT_NEAR != PRO_TEXT
    assert parse_policy(PRO_TEXT).sha256 != parse_policy(WITHOUT_NEAR).sha256


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        (
            "max_period",
            "0",
            "guards.near_loop.max_period: 0 is out of range; accepted: integer 1 <= value <= 4096",
        ),
        ("max_period", "4097", "integer 1 <= value <= 4096"),
        ("max_period", "8.0", "guards.near_loop.max_period: expected an integer"),
        (
            "min_copies",
            "1",
            "guards.near_loop.min_copies: 1 is out of range; accepted: integer 2 <= value <= 1000",
        ),
        ("min_copies", "1001", "integer 2 <= value <= 1000"),
        ("min_copies", "true", "expected an integer, got a boolean"),
        (
            "min_span",
            "1",
            "guards.near_loop.min_span: 1 is out of range; accepted: integer 2 <= value <= 65536",
        ),
        ("min_span", "65537", "integer 2 <= value <= 65536"),
        (
            "min_match",
            "0",
            "guards.near_loop.min_match: 0 is out of range; accepted: 0 < value <= 1",
        ),
        ("min_match", "1.0001", "guards.near_loop.min_match: 1.0001 is out of range"),
        ("min_match", "-0.5", "out of range; accepted: 0 < value <= 1"),
        ("min_match", "nan", "guards.near_loop.min_match: "),
        ("min_match", "inf", "guards.near_loop.min_match: "),
        ("min_match", "false", "guards.near_loop.min_match: expected a number, got a boolean"),
        ("min_match", '"0.9"', "guards.near_loop.min_match: expected a number"),
        ("action", '"stop"', "guards.near_loop.action: "),
        (
            "period",
            "3",
            "guards.near_loop.period: unknown key; accepted: action, max_period, "
            "min_copies, min_match, min_span",
        ),
    ],
)
def test_bad_values_name_the_key_and_what_it_accepts(key: str, value: str, words: str) -> None:
    msg = policy_error(near_with(key, value))
    assert words in msg, msg


def test_edge_values_are_accepted() -> None:
    for key, value in (
        ("max_period", "1"),
        ("max_period", "4096"),
        ("min_copies", "2"),
        ("min_span", "65536"),
        ("min_match", "1"),
        ("min_match", "0.001"),
    ):
        parse_policy(near_with(key, value))
    with pytest.raises(PolicyError, match=r"guards\.near_loop\.min_match"):
        NearLoopGuard(min_match=0)


# ---------------------------------------------------------------------------
# the embedded model


NEAR_ONLY = Policy("near", near_loop=NearLoopGuard())
EXACT_ONLY = Policy("exact", loop=LoopGuard())


def verdict_of(model: Model, ctx: Context, prompt: str, policy: Policy) -> Verdict:
    request = Request(prompt, max_tokens=64, sampling=Sampling(temperature=0))
    events = list(run_local(model, ctx, request, policy))
    verdict = events[-1]
    assert isinstance(verdict, Verdict)
    return verdict


def test_the_model_counting_in_a_loop_is_halted_and_exact_loop_misses_it(
    model: Model, ctx: Context
) -> None:
    missed = 0
    for prompt in COUNTER_PROMPTS:
        verdict = verdict_of(model, ctx, prompt, NEAR_ONLY)
        assert (verdict.status, verdict.guard) == (HALTED, "near_loop"), (prompt, verdict)
        assert verdict.value is not None and verdict.value >= 0.85
        assert verdict.message.startswith("period ")
        missed += verdict_of(model, ctx, prompt, EXACT_ONLY).status != HALTED
    assert missed >= 1


@pytest.mark.slow  # a `fse` subprocess, like tests/cli
def test_fse_generate_local_halts_a_counter_loop(tmp_path: Path) -> None:
    policy = tmp_path / "near.toml"
    policy.write_text('name = "near"\n[guards.near_loop]\n')
    run = generate_json(COUNTER_PROMPTS[0], *GREEDY, "--max-tokens", "64", "--policy", str(policy))
    assert_halted(run, "near_loop")
    assert run.verdict["threshold"] == 0.85 and run.verdict["value"] >= 0.85
    assert run.verdict["message"].startswith("period ")
