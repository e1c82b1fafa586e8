"""End-to-end tests of the `fse` command line: real subprocesses, the real model.

Every `fse generate --json` run goes through `generate_json`, which checks the
JSON-lines contract of docs/protocol.md on its output before the test looks further.
Generations are greedy or seeded, so each run is reproducible on this machine.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from conftest import FSE, run_fse
from fse.cli.render import COLOURS, RESET, HumanRenderer
from fse.core.policy import builtin_policy
from fse.core.types import COMPLETED, StepMetrics, TokenEvent, Verdict

TOKEN_KEYS = {
    "type",
    "index",
    "id",
    "text",
    "nll",
    "ppl",
    "variance",
    "max_prob",
    "l2_norm",
    "health",
}
VERDICT_KEYS = {
    "type",
    "status",
    "guard",
    "value",
    "threshold",
    "token_index",
    "tokens",
    "text",
    "policy",
    "policy_sha256",
}
SHA256 = re.compile(r"[0-9a-f]{64}")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXIT_CODES = {"completed": 0, "halted": 3, "cancelled": 4, "error": 1}
UNTRUNCATED = ("--top-k", "0", "--top-p", "1", "--min-p", "0")
GREEDY = ("--temperature", "0")
FRANCE = "The capital of France is"
LA_LOOP = "la la la la la la la la la la"


@dataclass
class JsonRun:
    code: int
    tokens: list[dict[str, Any]]
    verdict: dict[str, Any]
    stderr: str

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.tokens)


def generate_json(prompt: str, *args: str) -> JsonRun:
    """`fse generate --local PROMPT --json ARGS`, with the output contract checked."""
    result = run_fse("generate", "--local", prompt, "--json", "--threads", "2", *args)
    assert "Traceback" not in result.stderr, result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert docs, f"no output; stderr: {result.stderr}"
    assert all(isinstance(d, dict) for d in docs)
    *tokens, verdict = docs

    for i, token in enumerate(tokens):
        assert token["type"] == "token", token
        keys = set(token)
        assert keys in (TOKEN_KEYS, TOKEN_KEYS | {"warnings"}), keys
        assert token["index"] == i
        assert isinstance(token["id"], int) and not isinstance(token["id"], bool)
        assert isinstance(token["text"], str)
        assert token["health"] in ("green", "yellow", "red")
        for key in ("nll", "ppl", "variance", "max_prob", "l2_norm"):
            assert isinstance(token[key], float | int), (key, token)

    assert verdict["type"] == "verdict"
    assert set(verdict) - {"message"} == VERDICT_KEYS, verdict
    assert verdict["tokens"] == len(tokens)
    assert verdict["text"] == "".join(t["text"] for t in tokens)
    assert SHA256.fullmatch(verdict["policy_sha256"]), verdict
    assert result.returncode == EXIT_CODES[verdict["status"]], (result.returncode, verdict)
    if verdict["status"] == "completed":
        for key in ("guard", "value", "threshold", "token_index"):
            assert verdict[key] is None, verdict
    if verdict["status"] == "halted":
        # The token that tripped the guard is withheld: everything before it is released.
        assert verdict["token_index"] == verdict["tokens"], verdict
        assert all(t["index"] != verdict["token_index"] for t in tokens)
    return JsonRun(result.returncode, tokens, verdict, result.stderr)


def assert_halted(run: JsonRun, guard: str, token_index: int | None = None) -> None:
    assert run.code == 3, run.verdict
    assert run.verdict["status"] == "halted"
    assert run.verdict["guard"] == guard, run.verdict
    if token_index is not None:
        assert run.verdict["token_index"] == token_index, run.verdict
        assert len(run.tokens) == token_index


def run_cli(
    *args: str, drop_env: tuple[str, ...] = ("NO_COLOR",), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Like run_fse, but with some environment variables removed (run_fse only adds)."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    return subprocess.run([*FSE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def run_in_pty(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run fse with stdout on a pseudo-terminal (NO_COLOR unset): (code, stdout, stderr)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    process = subprocess.Popen(
        [*FSE, *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, b"".join(chunks).decode("utf-8", "replace"), stderr


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


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
# human output


def test_human_output_to_a_pipe_is_plain_text() -> None:
    result = run_cli("generate", "--local", FRANCE, *GREEDY, "--max-tokens", "12", "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.startswith(" the capital")
    assert result.stdout.endswith("\n")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("[completed] 12 tokens released")
    assert "policy default" in lines[0]


def test_human_output_to_a_tty_is_coloured() -> None:
    code, out, err = run_in_pty("generate", "--local", FRANCE, *GREEDY, "--max-tokens", "8")
    assert code == 0, err
    assert COLOURS["green"] in out
    assert RESET in out
    assert ANSI.sub("", out).strip().startswith("the capital")
    assert "[completed] 8 tokens released" in err


def _event(text: str, health: str) -> TokenEvent:
    metrics = StepMetrics(0, 1, 0.1, 1.1, 1.1, 20.0, 0.9, 3000.0, 0)
    return TokenEvent(0, 1, text.encode(), text, metrics, health)


class FakeTty(StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("health", ["green", "yellow", "red"])
def test_human_renderer_colours_by_health(monkeypatch: pytest.MonkeyPatch, health: str) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out, err = FakeTty(), StringIO()
    renderer = HumanRenderer(out, err)
    renderer.token(_event(" Paris", health))
    renderer.verdict(Verdict(COMPLETED, 1, " Paris", "default", "0" * 64))
    assert out.getvalue() == f"{COLOURS[health]} Paris{RESET}\n"
    assert err.getvalue().startswith("[completed] 1 tokens released")


def test_human_renderer_honours_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out, err = FakeTty(), StringIO()
    renderer = HumanRenderer(out, err)
    renderer.token(_event(" Paris", "green"))
    assert out.getvalue() == " Paris"


def test_json_on_a_non_utf8_stdout_escapes_instead_of_crashing() -> None:
    """Model text is arbitrary Unicode; an ASCII stdout must still get every line and
    the verdict (JSON \\u escapes), not a UnicodeEncodeError halfway through."""
    # Greedy Gemma answers with romaji (" <i><b>yōkai</b></i>" or " <i>kōyō</i>," by CPU:
    # llama.cpp's kernels differ in their last bits), non-ASCII either way.
    prompt = "In Japanese, thank you is written as"
    args = ("--json", *GREEDY, "--max-tokens", "8", "--threads", "2")
    result = run_fse("generate", "--local", prompt, *args, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.isascii()
    verdict = json.loads(result.stdout.splitlines()[-1])
    assert verdict["status"] == "completed"
    assert not verdict["text"].isascii()  # escaped on the way out, whole on the way in
    assert "\\u" in result.stdout


def test_human_verdict_line_names_the_halting_guard() -> None:
    code_out = run_cli(
        "generate", "--local", FRANCE, *GREEDY, "--max-tokens", "8", "--debug-fault", "nan@2"
    )
    assert code_out.returncode == 3
    line = code_out.stderr.strip()
    assert "halted by non_finite" in line
    assert "at token 2" in line
    assert "2 tokens released" in line


# ---------------------------------------------------------------------------
# bad input: exit 2, one line naming the flag and what it accepts


@pytest.fixture(scope="module")
def bad_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policies") / "bad.toml"
    path.write_text('name = "bad"\n[guards.perplexity]\nthreshold = 0.5\n')
    return path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--temperature", "-1"), ("--temperature", "accepted", ">= 0")),
        (("--temperature", "nan"), ("--temperature", "accepted", "finite")),
        (("--top-p", "0"), ("--top-p", "accepted", "0 < top_p <= 1")),
        (("--top-p", "1.5"), ("--top-p", "accepted", "0 < top_p <= 1")),
        (("--max-tokens", "0"), ("--max-tokens", "accepted", ">= 1")),
        (("--min-p", "2"), ("--min-p", "accepted", "0 <= min_p <= 1")),
        (("--top-k", "-1"), ("--top-k", "accepted", ">= 0")),
        (("--seed", "-1"), ("--seed", "accepted", "2^32")),
        (("--policy", "nonexistent"), ("--policy", "nonexistent", "default, pro")),
        (("--debug-fault", "bogus"), ("--debug-fault", "bogus", "nan@K", "scale@K:FACTOR")),
        (("--threads", "0"), ("--threads", "accepted", "1..512")),
        (("--threads", "100000"), ("--threads", "accepted", "1..512")),  # llama.cpp aborts
        (("--model", "/nonexistent"), ("--model", "/nonexistent", "no such file")),
    ],
)
def test_bad_values_are_one_line_usage_errors(
    args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    result = run_fse("generate", "--local", "hi", *args)
    assert_one_line_usage_error(result, *needles)


def test_non_utf8_arguments_are_usage_errors() -> None:
    """argv bytes that are not UTF-8 reach Python as lone surrogates; not a traceback."""
    bad = os.fsdecode(b"caf\xe9 \xff")
    result = run_cli("generate", "--local", bad)
    assert_one_line_usage_error(result, "prompt", "UTF-8")
    result = run_cli("generate", "--local", "hi", "--stop", bad)
    assert_one_line_usage_error(result, "--stop", "UTF-8")


def test_invalid_policy_file_is_a_usage_error(bad_policy_file: Path) -> None:
    result = run_fse("generate", "--local", "hi", "--policy", str(bad_policy_file))
    assert_one_line_usage_error(
        result, "--policy", str(bad_policy_file), "guards.perplexity.threshold", "accepted"
    )


# ---------------------------------------------------------------------------
# policy and model commands

GOOD_POLICY = """\
name = "strict"
description = "a stricter perplexity band"
[health]
green_below = 100.0
red_above = 300.0
[guards.perplexity]
threshold = 300.0
window = 8
[guards.loop]
max_period = 64
"""


def test_policy_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "strict.toml"
    path.write_text(GOOD_POLICY)
    result = run_fse("policy", "check", str(path))
    assert result.returncode == 0, result.stderr
    match = re.search(r"ok: policy strict sha256 ([0-9a-f]{64})", result.stdout)
    assert match, result.stdout


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[guards.l2_norm]\nthreshold = 1e4\nlimit = 3\n", "guards.l2_norm.limit"),
        ('[guards.perplexity]\nwindow = "16"\n', "guards.perplexity.window"),
        ("[guards.max_prob]\nthreshold = 1.5\n", "guards.max_prob.threshold"),
        ("[guards.loop]\nmin_repeats = 1\n", "guards.loop.min_repeats"),
        ("[health]\ngreen = 1.0\n", "health.green"),
    ],
)
def test_policy_check_rejects_naming_the_dotted_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\n{body}')
    result = run_fse("policy", "check", str(path))
    assert_one_line_usage_error(result, key, "accepted")


def test_policy_show_round_trips_through_check(tmp_path: Path) -> None:
    shown = run_fse("policy", "show", "pro")
    assert shown.returncode == 0, shown.stderr
    first, _, toml = shown.stdout.partition("\n")
    sha = first.removeprefix("# sha256 ")
    assert sha == builtin_policy("pro").sha256
    path = tmp_path / "pro-copy.toml"
    path.write_text(toml)
    checked = run_fse("policy", "check", str(path))
    assert checked.returncode == 0, checked.stderr
    assert f"policy pro sha256 {sha}" in checked.stdout


def test_model_path_prints_an_existing_gguf() -> None:
    result = run_fse("model", "path")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.suffix == ".gguf"
    assert path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


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
