"""`fse calibrate`: statistics, threshold rules, corpus parsing, and a real calibration run."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
from fse.core.errors import InputError
from fse.core.guards import LoopDetector
from fse.core.policy import NearLoopGuard, builtin_policy, load_policy_file
from fse.core.types import StepMetrics
from fse.tools import calibrate as cal
from support.daemons import run_fse

# ---------------------------------------------------------------------------
# Statistics


def _guard_trips(tokens: list[int], max_period: int, repeats: int, span: int) -> bool:
    detector = LoopDetector(max_period, repeats, span)
    return any(detector.push(t)[0] for t in tokens)


@pytest.mark.parametrize("seed", range(40))
def test_loop_span_predicts_the_loop_guard(seed: int) -> None:
    """loop_span(...) >= min_span exactly when the C tail-cycle detector trips."""
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 5, 50])
    tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(5, 60))]
    if seed % 2:  # splice in a real cycle
        cycle = [rng.randrange(100, 110) for _ in range(rng.randrange(1, 6))]
        at = rng.randrange(len(tokens))
        tokens[at:at] = cycle * rng.randrange(2, 6)
    max_period = rng.choice([4, 16, 1024])
    repeats = rng.choice([2, 3, 4])
    span = cal.loop_span(tokens, max_period, repeats)
    for min_span in (2, 3, 6, 12, 20, span, span + 1):
        if min_span >= 2:
            assert (span >= min_span) == _guard_trips(tokens, max_period, repeats, min_span)


def test_loop_span_and_streak_basics() -> None:
    assert cal.loop_span([1, 2, 3, 4, 5], 1024, 3) == 0
    assert cal.loop_span([7] * 10, 1024, 3) == 10
    assert cal.loop_span([9, 1, 2, 1, 2, 1, 2, 8], 1024, 3) == 6
    assert cal.loop_span([9, 1, 2, 1, 2, 8], 1024, 3) == 0
    assert cal.longest_streak([0.5, 0.995, 0.999, 0.2, 0.995], 0.99) == 2
    assert cal.quantile([1.0, 2.0, 3.0, 4.0], 0.999) == 4.0
    assert cal.quantile([1.0, 2.0, 3.0, 4.0], 0.001) == 1.0


def _run(
    values: list[tuple[float, float, float, float]], tokens: list[int] | None = None
) -> cal.Run:
    """A synthetic healthy run from (nll, variance, max_prob, l2) per step."""
    steps = [
        StepMetrics(
            i, tokens[i] if tokens else 1000 + i, nll, math.exp(nll), math.exp(nll), v, mp, l2, 0
        )
        for i, (nll, v, mp, l2) in enumerate(values)
    ]
    return cal.Run(
        cal.Prompt(text="p", source="t:1"),
        0,
        "calibration",
        "completed",
        len(steps),
        "",
        steps,
        0.0,
    )


def _healthy(n_runs: int = 20, n: int = 40, seed: int = 0) -> list[cal.Run]:
    rng = random.Random(seed)
    return [
        _run(
            [
                (
                    rng.uniform(0.1, 3.5),
                    rng.uniform(12, 30),
                    rng.uniform(0.1, 0.98),
                    rng.uniform(2000, 6000),
                )
                for _ in range(n)
            ]
        )
        for _ in range(n_runs)
    ]


def test_thresholds_sit_beyond_the_healthy_tail_and_inside_the_limits() -> None:
    runs = _healthy()
    c = cal.calibrate_policy(runs, builtin_policy("pro"), name="cal", n_vocab=262144)
    p = c.policy
    assert p.perplexity and p.l2_norm and p.logit_variance and p.max_prob and p.loop
    ppl = [v for r in runs for v in cal.windowed_ppl(r.steps, 16)[3:]]
    assert p.perplexity.threshold >= max(cal.PPL_FLOOR, cal.quantile(ppl, 0.999))
    assert p.perplexity.threshold <= cal.PPL_CEILING
    assert p.l2_norm.threshold > max(m.l2_norm for r in runs for m in r.steps)
    assert p.logit_variance.threshold < min(m.variance for r in runs for m in r.steps)
    assert p.logit_variance.threshold >= cal.VARIANCE_FLOOR
    assert (p.max_prob.threshold, p.max_prob.consecutive) == (0.99, 8)
    assert (p.loop.min_repeats, p.loop.min_span) == (3, 12)
    assert p.health.green_below < p.health.red_above == p.perplexity.threshold
    assert c.halts == [] and c.false_halt_rate == 0.0


def test_hard_limits_hold_whatever_the_data() -> None:
    """Garbage 'healthy' data cannot loosen a guard past its limit: the halts show up."""
    garbage = [_run([(9.0, 0.01, 0.999, 1e6)] * 40, tokens=[5] * 40) for _ in range(5)]
    c = cal.calibrate_policy(garbage, builtin_policy("pro"), name="cal", n_vocab=10000)
    p = c.policy
    assert p.perplexity and p.l2_norm and p.logit_variance and p.max_prob and p.loop
    assert p.perplexity.threshold == cal.PPL_CEILING
    assert p.l2_norm.threshold == 100 * math.sqrt(10000)
    assert p.logit_variance.threshold == cal.VARIANCE_FLOOR
    assert p.max_prob.consecutive == cal.MAX_PROB_CONSECUTIVE_CEILING
    assert p.loop.min_span == cal.LOOP_SPAN_CEILING
    assert c.false_halt_rate == 1.0
    assert [w.split(":")[0] for w in c.warnings] == [
        "perplexity",
        "l2_norm",
        "loop",
        "prompt_perplexity",  # not measured: synthetic runs carry no prompt nll
    ]


def test_false_halt_rate_replays_the_written_policy() -> None:
    runs = _healthy(n_runs=9)
    looping = _run([(0.1, 20.0, 0.5, 3000.0)] * 60, tokens=[1, 2, 3] * 20)
    c = cal.calibrate_policy([*runs, looping], builtin_policy("default"), name="d", n_vocab=262144)
    assert c.policy.loop is None and c.halts == []  # default has no loop guard
    c = cal.calibrate_policy([*runs, looping], builtin_policy("pro"), name="p", n_vocab=262144)
    # The looping run is left out of the statistics (its cycle reaches the hard limit),
    # so the loop guard keeps the base's 12 tokens and halts it.
    assert c.policy.loop is not None and c.policy.loop.min_span == 12
    assert any("1 of 10 calibration generations end in a cycle" in w for w in c.warnings)
    assert [(r, t.guard) for r, t in c.halts] == [(looping, "loop")]
    assert c.false_halt_rate == pytest.approx(0.1)


def test_near_loop_match_sits_above_the_healthy_maximum() -> None:
    """min_match: the highest match fraction of a non-looping generation + the margin,
    never below the base's; a generation at the base's min_match is a near loop, left out
    (else the counter loops the guard exists for would set its threshold)."""
    rng = random.Random(3)
    base = dataclasses.replace(builtin_policy("pro"), near_loop=NearLoopGuard())
    tokens = [rng.randrange(5000) for _ in range(60)]
    ordinary = [_run([(1.0, 20.0, 0.5, 3000.0)] * 60, tokens=tokens)]
    c = cal.calibrate_policy(ordinary * 3, base, name="c", n_vocab=262144)
    assert c.policy.near_loop is not None and c.policy.near_loop.min_match == 0.85  # the base's
    # A 13-token phrase with two tokens that count up: 11 of 13 positions match one period
    # back, close to 0.85 but below it: healthy, and min_match moves just above it.
    close = [t for i in range(8) for t in (*range(11, 22), 100 + i, 200 + i)]
    assert cal.best_match(close, 256, 3, 24) == pytest.approx(11 / 13)
    # An 8-token phrase with a counter: 7 of 8 match, a near loop by the base's 0.85.
    counter = [t for i in range(8) for t in (11, 12, 13, 14, 15, 16, 17, 100 + i)]
    assert cal.best_match(counter, 256, 3, 24) == pytest.approx(7 / 8)
    raised = cal.calibrate_policy(
        [*ordinary, _run([(1.0, 20.0, 0.5, 3000.0)] * 60, tokens=close)], base, name="c",
        n_vocab=262144,
    )  # fmt: skip
    assert raised.policy.near_loop is not None
    assert raised.policy.near_loop.min_match == 0.86  # ceil(11/13 + 0.01, 2 digits)
    looping = _run([(1.0, 20.0, 0.5, 3000.0)] * 64, tokens=counter)
    kept = cal.calibrate_policy([*ordinary, looping], base, name="c", n_vocab=262144)
    assert kept.policy.near_loop is not None and kept.policy.near_loop.min_match == 0.85
    assert any("1 of 2 calibration generations repeat a period" in w for w in kept.warnings)
    assert [(r, t.guard) for r, t in kept.halts] == [(looping, "near_loop")]


def _with_prompts(runs: list[cal.Run], nll_per_token: list[float]) -> list[cal.Run]:
    """Each run gets a prompt of its own, of 24 tokens at the given nll each."""
    for i, (run, nll) in enumerate(zip(runs, nll_per_token, strict=True)):
        run.prompt = cal.Prompt(text=f"p{i}", source=f"t:{i}")
        run.prompt_nll = [nll] * 24
    return runs


def test_prompt_thresholds_are_the_floors_on_ordinary_prompts() -> None:
    runs = _with_prompts(_healthy(n_runs=4), [1.0, 2.0, 3.0, 4.0])  # ppl up to e^4 = 55
    c = cal.calibrate_policy(runs, builtin_policy("pro"), name="cal", n_vocab=262144)
    guard = c.policy.prompt_perplexity
    assert guard is not None
    assert (guard.threshold, guard.window_threshold) == (
        cal.PROMPT_PPL_FLOOR,
        cal.PROMPT_WINDOW_FLOOR,
    )
    row = next(r for r in c.rows if r.metric.startswith("prompt_perplexity"))
    assert row.n == 4 and row.p50 == pytest.approx(math.exp(3.0))  # the higher median


def test_prompt_thresholds_follow_an_odd_corpus_up_to_the_limits() -> None:
    """A corpus of ordinary but unusual prompts (mean nll 7: ppl 1,097) raises the
    thresholds to its worst x the margin; garbage cannot raise them past the limits."""
    runs = _with_prompts(_healthy(n_runs=3), [1.0, 7.0, 2.0])
    guard = cal.calibrate_policy(runs, builtin_policy("pro"), name="c", n_vocab=10).policy
    assert guard.prompt_perplexity is not None
    expected = cal.round_sig(math.exp(7.0) * cal.PROMPT_MARGIN, up=True)
    assert guard.prompt_perplexity.threshold == expected == 4390.0
    assert guard.prompt_perplexity.window_threshold == cal.PROMPT_WINDOW_FLOOR
    garbage = cal.calibrate_policy(
        _with_prompts(_healthy(n_runs=2), [12.0, 1.0]),
        builtin_policy("pro"),
        name="g",
        n_vocab=262144,
    )
    assert garbage.policy.prompt_perplexity is not None
    assert garbage.policy.prompt_perplexity.threshold == cal.PROMPT_PPL_CEILING
    assert garbage.policy.prompt_perplexity.window_threshold == cal.PROMPT_WINDOW_CEILING
    assert any(w.startswith("prompt_perplexity: an ordinary prompt") for w in garbage.warnings)
    # ... and the prompt that reached the limit is counted as a halt of the written policy.
    assert [t.guard for _, t in garbage.halts] == ["prompt_perplexity"]


def test_prompts_not_measured_keep_the_base_settings() -> None:
    """Through a daemon the prompt's nll is not reported: nothing to measure."""
    c = cal.calibrate_policy(_healthy(n_runs=3), builtin_policy("pro"), name="c", n_vocab=10)
    assert c.policy.prompt_perplexity == builtin_policy("pro").prompt_perplexity
    assert any("measured in process only" in w for w in c.warnings)
    off = cal.calibrate_policy(_healthy(n_runs=3), builtin_policy("default"), name="d", n_vocab=10)
    assert off.policy.prompt_perplexity is None
    assert not any(w.startswith("prompt_perplexity") for w in off.warnings)


# ---------------------------------------------------------------------------
# Corpus files


def test_corpus_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "c.txt"
    text.write_text("first prompt\n\n  \nsecond prompt\n")
    assert [p.text for p in cal.read_corpus(text)] == ["first prompt", "second prompt"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    prompts = cal.read_corpus(jsonl)
    assert prompts[0].text == "a" and prompts[1].messages == (("user", "hi"),)
    assert prompts[1].source.endswith("c.jsonl:3")
    assert len(cal.builtin_prompts()) == 40


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', "line 2: invalid JSON"),
        ('["a"]\n', "line 1: expected an object"),
        ('{"prompt": "a", "extra": 1}\n', 'line 1: unknown key "extra"'),
        ('{"prompt": ""}\n', '"prompt" must be a non-empty string'),
        ('{"prompt": "a", "messages": []}\n', "exactly one of"),
        ('{"messages": [{"role": "user"}]}\n', '"messages[0]"'),
        ("\n\n", "no prompts"),
    ],
)
def test_bad_corpus_names_the_line(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=r"^--corpus: ") as info:
        cal.read_corpus(path)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# The command


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--corpus", "/nonexistent/prompts.txt"],
            "--corpus: /nonexistent/prompts.txt: cannot read",
        ),
        (["--corpus", "{bad}"], "--corpus: "),
        (["--out", "/nonexistent-dir/p.toml"], "--out: /nonexistent-dir/p.toml: directory"),
        (["--margin", "0.5"], "--margin: 0.5 is invalid"),
        (["--quantile", "1"], "--quantile: 1.0 is invalid"),
        (["--samples", "0"], "--samples: 0 is invalid"),
        (["--max-tokens", "0"], "--max-tokens: 0 is invalid"),
        (["--top-p", "0"], "--top-p: 0"),
        (["--name", "bad name"], "--name: "),
        (["--policy", "nope"], "unknown policy 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text("{not json\n")
    args = [str(bad_jsonl) if a == "{bad}" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "p.toml")]
    result = run_fse("calibrate", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fse calibrate: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.toml").exists()


def test_calibrate_small_corpus_writes_a_sensible_policy(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "The capital of France is\n"
        "Photosynthesis is the process by which\n"
        "Write a short story about a dragon.\n"
    )
    out = tmp_path / "calibrated.toml"
    raw = tmp_path / "metrics.json"
    result = run_fse(
        "calibrate", "--corpus", str(corpus), "--max-tokens", "24", "--threads", "2",
        "--out", str(out), "--metrics-out", str(raw), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The report: one line per metric with p50, p99, p99.9 and the threshold chosen.
    metrics = ("perplexity", "l2_norm", "logit_variance", "max_prob", "entropy", "loop span")
    for metric in (*metrics, "prompt_perplexity"):
        assert any(line.startswith(metric) for line in result.stdout.splitlines()), result.stdout
    assert "expected false-halt rate on the calibration set: " in result.stdout
    assert "(the base policy pro as shipped would halt " in result.stdout
    assert "calibrate: 3/3 (100%)" in result.stderr  # progress on stderr

    check = run_fse("policy", "check", str(out))
    assert check.returncode == 0, check.stderr
    policy = load_policy_file(out)
    assert policy.name == "calibrated"
    assert policy.perplexity and policy.l2_norm and policy.logit_variance
    assert policy.max_prob and policy.loop  # the base policy is pro: every guard
    assert policy.prompt_perplexity is not None  # measured on the three prompts: the floors
    assert policy.prompt_perplexity.threshold == cal.PROMPT_PPL_FLOOR

    runs = json.loads(raw.read_text())["runs"]
    assert len(runs) == 3 and all(r["status"] == "completed" for r in runs)
    # Each prompt's nll, one per token after the first (a 5-token prompt: BOS + 4).
    assert all(len(r["prompt_nll"]) >= 4 and min(r["prompt_nll"]) >= 0 for r in runs)
    steps = [r["steps"] for r in runs]
    ppl = [
        v
        for s in steps
        for v in cal.windowed_ppl([StepMetrics(0, 0, x, 0, 0, 0, 0, 0, 0) for x in s["nll"]], 16)[
            3:
        ]
    ]
    l2 = [v for s in steps for v in s["l2_norm"]]
    var = [v for s in steps for v in s["variance"]]
    assert len(l2) >= 3 * 20
    entropy = [v for s in steps for v in s["entropy"]]  # nats, every step
    assert len(entropy) == len(l2) and all(0 <= v <= math.log(262144) for v in entropy)
    # Ordered sensibly: beyond the healthy tail, inside the hard limits.
    assert cal.quantile(ppl, 0.999) < policy.perplexity.threshold <= cal.PPL_CEILING
    assert policy.health.green_below < policy.health.red_above == policy.perplexity.threshold
    assert max(l2) < policy.l2_norm.threshold <= 100 * math.sqrt(262144)
    assert cal.VARIANCE_FLOOR <= policy.logit_variance.threshold < min(var)
    assert 0 < policy.max_prob.threshold <= 1
    assert policy.loop.min_repeats >= 2 and policy.loop.min_span >= 12
