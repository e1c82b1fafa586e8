"""Running the real `fse` command line: `fse generate --json` checked against the
JSON-lines contract of docs/protocol.md (`generate_json`), runs in a pseudo-terminal,
and the one-line usage errors."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from support.daemons import FSE, run_fse

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
    "entropy",
    "health",
}
VERDICT_KEYS = {
    "type",
    "status",
    "completion",
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
COMPLETIONS = ("end_of_generation", "stop_sequence", "max_tokens")
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
        for key in ("nll", "ppl", "variance", "max_prob", "l2_norm", "entropy"):
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
        assert verdict["completion"] in COMPLETIONS, verdict
    else:
        assert verdict["completion"] is None, verdict
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
