"""End-to-end tests of the `fse` command line: real subprocesses, the real model.

Every `fse generate --json` run goes through `generate_json`, which checks the
JSON-lines contract of docs/protocol.md on its output before the test looks further.
Generations are greedy or seeded, so each run is reproducible on this machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fse.core.policy import builtin_policy
from support.cli import (
    FRANCE,
    GREEDY,
    LA_LOOP,
    TOKEN_KEYS,
    UNTRUNCATED,
    assert_halted,
    generate_json,
)
from support.daemons import run_fse

# Every test here runs real generations in `fse` subprocesses.
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------
# the JSON-lines contract


@pytest.mark.parametrize("policy", ["default", "pro"])
def test_generate_json_greedy_completes(policy: str) -> None:
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "24", "--policy", policy)
    assert run.code == 0
    assert run.verdict["status"] == "completed"
    assert run.verdict["policy"] == policy
    assert run.verdict["policy_sha256"] == builtin_policy(policy).sha256
    assert len(run.tokens) == 24 == run.verdict["tokens"]
    assert run.verdict["text"].startswith(" the capital")
    for token in run.tokens:
        assert set(token) == TOKEN_KEYS  # no warnings: every guard of these policies halts
        assert 1_000 < token["l2_norm"] < 10_000
        assert 0 < token["max_prob"] <= 1
        assert 0 <= token["entropy"] <= math.log(262144)  # nats, at most ln(vocabulary)
        assert token["nll"] >= 0
        assert token["ppl"] >= 1
        assert token["health"] == "green"


def test_greedy_output_is_identical_under_both_policies() -> None:
    """Guards judge; they never change what is sampled."""
    default = generate_json(FRANCE, *GREEDY, "--max-tokens", "12")
    pro = generate_json(FRANCE, *GREEDY, "--max-tokens", "12", "--policy", "pro")
    assert [t["id"] for t in default.tokens] == [t["id"] for t in pro.tokens]
    assert default.verdict["policy_sha256"] != pro.verdict["policy_sha256"]


# ---------------------------------------------------------------------------
# guards on real generations


@pytest.mark.parametrize(
    ("prompt", "seed"),
    [
        ("The history of the Roman Empire", "2"),
        ("My favourite recipe for soup is", "2"),
        ("The weather today", "5"),
    ],
)
def test_untruncated_high_temperature_halts_by_perplexity(prompt: str, seed: str) -> None:
    run = generate_json(
        prompt, "--temperature", "1.6", *UNTRUNCATED, "--seed", seed, "--max-tokens", "48"
    )
    assert_halted(run, "perplexity")
    verdict = run.verdict
    assert verdict["threshold"] == 400.0
    assert verdict["value"] > 400.0
    assert 3 <= verdict["token_index"] < 48  # armed once min_tokens (4) are generated


def test_greedy_loop_passes_default_policy() -> None:
    """The report's known gap, reproduced on purpose: a healthy loop passes every guard."""
    run = generate_json(LA_LOOP, *GREEDY, "--max-tokens", "32")
    assert run.code == 0
    assert run.verdict["status"] == "completed"
    assert len(run.tokens) == 32
    assert run.text.count(" la") >= 30
    assert all(t["ppl"] < 2 for t in run.tokens)


def test_pro_refuses_a_random_token_suffix_before_any_token() -> None:
    """The input guard through --local: the prompt is judged once, before generating."""
    prompt = "Tell me about the weather today. quartz vivid ZEBRA ]]; oblong $$ flux Kettle 99"
    run = generate_json(prompt, *GREEDY, "--max-tokens", "8", "--policy", "pro")
    assert_halted(run, "prompt_perplexity", token_index=0)
    assert run.verdict["value"] > run.verdict["threshold"] in (1000.0, 5000.0)
    ordinary = generate_json(FRANCE, *GREEDY, "--max-tokens", "4", "--policy", "pro")
    assert ordinary.verdict["status"] == "completed" and len(ordinary.tokens) == 4


def test_greedy_loop_halts_by_loop_under_pro() -> None:
    run = generate_json(LA_LOOP, *GREEDY, "--max-tokens", "32", "--policy", "pro")
    assert_halted(run, "loop")
    assert run.verdict["policy"] == "pro"
    assert run.verdict["threshold"] == 3.0  # min_repeats
    assert run.verdict["value"] >= 3.0  # repeats of the cycle in the tail
    assert run.verdict["token_index"] >= 11  # min_span 12 tokens, prompt not counted
    assert run.verdict["token_index"] < 32


@pytest.mark.parametrize(
    ("prompt", "seed"),
    [
        ("The history of the Roman Empire", "1"),
        ("My favourite recipe for soup is", "2"),
        ("Once upon a time", "3"),
    ],
)
def test_ordinary_sampling_is_not_halted_by_loop_under_pro(prompt: str, seed: str) -> None:
    run = generate_json(
        prompt, "--temperature", "0.7", "--seed", seed, "--max-tokens", "64", "--policy", "pro"
    )
    assert run.verdict["guard"] != "loop", run.verdict
    assert run.verdict["status"] == "completed", run.verdict
    assert run.code == 0


# ---------------------------------------------------------------------------
# simulated faults


def test_l2_threshold_10_halts_at_token_0(tmp_path: Path) -> None:
    """The report's simulated fault: an L2 threshold of 10 trips on the first token."""
    policy = tmp_path / "l2low.toml"
    policy.write_text('name = "l2low"\n[guards.l2_norm]\nthreshold = 10\n')
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "8", "--policy", str(policy))
    assert_halted(run, "l2_norm", token_index=0)
    assert run.verdict["threshold"] == 10.0
    assert 1_000 < run.verdict["value"] < 10_000
    assert run.verdict["policy"] == "l2low"
    assert run.verdict["text"] == ""


def test_warn_action_releases_tokens_with_warnings(tmp_path: Path) -> None:
    policy = tmp_path / "l2warn.toml"
    policy.write_text('name = "l2warn"\n[guards.l2_norm]\nthreshold = 10\naction = "warn"\n')
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "4", "--policy", str(policy))
    assert run.code == 0
    assert run.verdict["status"] == "completed"
    assert len(run.tokens) == 4
    for token in run.tokens:
        assert set(token) == TOKEN_KEYS | {"warnings"}
        [warning] = token["warnings"]
        assert warning["guard"] == "l2_norm"
        assert warning["threshold"] == 10.0
        assert warning["value"] == token["l2_norm"]


def test_nan_fault_halts_by_non_finite_after_3_tokens() -> None:
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "8", "--debug-fault", "nan@3")
    assert_halted(run, "non_finite", token_index=3)
    assert [t["index"] for t in run.tokens] == [0, 1, 2]
    assert run.verdict["value"] == 1.0  # one NaN logit counted
    assert run.verdict["text"].startswith(" the capital")


def test_inf_fault_halts_by_non_finite_at_token_0() -> None:
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "8", "--debug-fault", "inf@0")
    assert_halted(run, "non_finite", token_index=0)
    assert run.verdict["value"] == 1.0


def test_guard_error_fault_halts_by_internal() -> None:
    run = generate_json(
        FRANCE, *GREEDY, "--max-tokens", "8", "--policy", "pro", "--debug-fault", "guard-error@2"
    )
    assert_halted(run, "internal", token_index=2)
    assert run.verdict["value"] is None
    assert run.verdict["threshold"] is None


def test_scale_fault_trips_l2_norm_at_index_1() -> None:
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "8", "--debug-fault", "scale@1:1000")
    assert_halted(run, "l2_norm", token_index=1)
    assert run.verdict["threshold"] == 10_000.0
    assert run.verdict["value"] > 1e6  # ~1000 x a healthy 2,000-6,000
    assert run.tokens[0]["l2_norm"] < 10_000


# ---------------------------------------------------------------------------
# stop sequences and exit codes


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (".", " the capital of the country of France"),
        (" country of", " the capital of the"),  # spans two tokens
    ],
)
def test_stop_sequence_completes_without_the_stop_text(stop: str, expected: str) -> None:
    run = generate_json(FRANCE, *GREEDY, "--max-tokens", "24", "--stop", stop)
    assert run.code == 0
    assert run.verdict["status"] == "completed"
    assert run.verdict["text"] == expected
    assert stop not in run.text
    assert len(run.tokens) < 24


def test_hang_fault_is_refused_in_process() -> None:
    """hang@K blocks the daemon's decode thread (the watchdog test); in this process it
    would block the command itself, so --local refuses it by name."""
    run = run_fse("generate", "--local", "hi", "--debug-fault", "hang@1")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "fse generate: error: --debug-fault: hang@K blocks the daemon's decode thread; use --addr"
    )
