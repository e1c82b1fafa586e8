"""The official OpenAI JavaScript SDK (the npm package `openai`, pinned as a devDependency
of clients/node) against a real daemon's HTTP API (docs/http.md).

clients/node/test/openai.test.ts skips itself in the Node.js unit tests (`make -C
clients/node test` runs without a daemon); here a daemon serves `--http-listen` with the
`gemma` chat template (the embedded model has none), a bearer token and the policy
calibrated for that template (the built-in `default` halts its chat answers by `l2_norm`),
and the compiled test runs against it with FSE_TEST_HTTP_URL set: it must pass, not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.daemons import ROOT, THREADS, Daemon
from support.http import TOKEN, TOKEN_NAME, start_http, write_tokens

# Needs the built Node.js client (make -C clients/node build), like the conformance harness.
pytestmark = pytest.mark.clients

NODE_DIR = ROOT / "clients" / "node"
COMPILED = NODE_DIR / "dist" / "test" / "openai.test.js"


def test_the_openai_js_sdk_streams_a_chat_completion(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed (clients/node)"
    assert COMPILED.is_file(), f"{COMPILED} is missing (run `make -C clients/node build`)"
    policies = tmp_path / "policies"
    policies.mkdir()
    calibrated = ROOT / "docs" / "experiment" / "calibrated.toml"
    (policies / "calibrated.toml").write_text(calibrated.read_text())
    api = start_http(
        start_daemon,
        *THREADS,
        "--auth-tokens", str(write_tokens(tmp_path)),
        "--policies-dir", str(policies),
        "--chat-template", "gemma",
    )  # fmt: skip
    env = {
        **os.environ,
        "FSE_TEST_HTTP_URL": api.base_url,
        "FSE_TEST_HTTP_TOKEN": TOKEN,
        "FSE_TEST_HTTP_POLICY": "calibrated",
    }
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", str(COMPILED)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    summary = r"^# (tests|pass|fail|skipped|todo|cancelled) (\d+)$"  # TAP's closing counts
    counts = dict(re.findall(summary, run.stdout, re.MULTILINE))
    assert counts == {
        "tests": "1", "pass": "1", "fail": "0", "skipped": "0", "todo": "0", "cancelled": "0",
    }, output  # fmt: skip
    assert "# SKIP" not in run.stdout, output

    # The daemon saw one HTTP stream from the token's caller, completed at max_tokens.
    (verdict,) = api.wait_verdicts(1)
    assert verdict["listener"] == "http" and verdict["client"] == f"token:{TOKEN_NAME}"
    assert verdict["status"] == "completed" and verdict["policy"] == "calibrated"
    assert verdict["tokens"] == 8
