"""The `fse` command line, continued: human output (to a pipe, a terminal, NO_COLOR),
bad input (exit 2, one line naming the flag and what it accepts), and the `policy` and
`model` commands. Real subprocesses, the real model.
"""

from __future__ import annotations

import json
import os
import re
from io import StringIO
from pathlib import Path

import pytest
from fse.cli.render import COLOURS, RESET, HumanRenderer
from fse.core.policy import builtin_policy
from fse.core.types import COMPLETED, StepMetrics, TokenEvent, Verdict
from support.cli import (
    ANSI,
    FRANCE,
    GREEDY,
    assert_one_line_usage_error,
    run_cli,
    run_in_pty,
)
from support.daemons import run_fse

# ---------------------------------------------------------------------------
# human output


@pytest.mark.slow  # a real generation in a subprocess
def test_human_output_to_a_pipe_is_plain_text() -> None:
    result = run_cli("generate", "--local", FRANCE, *GREEDY, "--max-tokens", "12", "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.startswith(" the capital")
    assert result.stdout.endswith("\n")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("[completed at max_tokens] 12 tokens released")
    assert "policy default" in lines[0]


@pytest.mark.slow  # a real generation in a subprocess
def test_human_output_to_a_tty_is_coloured() -> None:
    code, out, err = run_in_pty("generate", "--local", FRANCE, *GREEDY, "--max-tokens", "8")
    assert code == 0, err
    assert COLOURS["green"] in out
    assert RESET in out
    assert ANSI.sub("", out).strip().startswith("the capital")
    assert "[completed at max_tokens] 8 tokens released" in err


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


@pytest.mark.slow  # a real generation in a subprocess
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


@pytest.mark.slow  # a real generation in a subprocess
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
