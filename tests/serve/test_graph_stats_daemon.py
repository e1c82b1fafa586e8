"""`fse serve --graph-stats on` and `fse generate --local --graph-stats on`: the per-step
statistics computed in llama.cpp's graph (the path `auto` takes on a local GPU)
serve the same greedy tokens, with the same statistics within the kernel's tolerance, as
the host kernel in this process; and a NaN injected in the graph still halts."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fse.core.engine import Context
from fse.core.model import Model
from fse.core.policy import builtin_policy
from fse.core.runner import run_local
from fse.core.types import Request, Sampling, TokenEvent
from support.daemons import Daemon, run_fse
from support.streams import assert_well_formed, generate, start

PROMPT = "The three states of matter are"


def host_tokens(model: Model, ctx: Context, n: int) -> list[TokenEvent]:
    request = Request(PROMPT, max_tokens=n, sampling=Sampling(temperature=0))
    return [
        e
        for e in run_local(model, ctx, request, builtin_policy("pro"))
        if isinstance(e, TokenEvent)
    ]


def test_the_daemon_on_the_graph_path_serves_what_the_host_kernel_does(
    start_daemon: Callable[..., Daemon], model: Model, ctx: Context
) -> None:
    daemon = start_daemon("--graph-stats", "on")
    with daemon.channel() as channel:
        served = generate(channel, [start(PROMPT, 24, policy="pro")])
    assert_well_formed(served, 24)
    host = host_tokens(model, ctx, 24)
    assert [t.id for t in served.tokens] == [e.token for e in host]
    for wire, local in zip(served.tokens, host, strict=True):
        assert wire.ppl == pytest.approx(local.metrics.ppl, rel=1e-4)
        assert wire.l2_norm == pytest.approx(local.metrics.l2_norm, rel=1e-5)
        assert wire.entropy == pytest.approx(local.metrics.entropy, rel=1e-5, abs=1e-6)


def test_local_graph_path_matches_and_a_nan_in_the_graph_halts() -> None:
    runs = {}
    for mode in ("on", "off"):
        result = run_fse(
            "generate", "--local", PROMPT, "--json", "--temperature", "0", "--max-tokens", "12",
            "--graph-stats", mode, "--threads", "2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[mode] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t.get("token") for t in runs["on"]] == [t.get("token") for t in runs["off"]]
    nan = run_fse(
        "generate", "--local", PROMPT, "--json", "--temperature", "0", "--max-tokens", "12",
        "--graph-stats", "on", "--debug-fault", "nan@3", "--threads", "2",
    )  # fmt: skip
    verdict = json.loads(nan.stdout.splitlines()[-1])
    assert nan.returncode == 3 and (verdict["guard"], verdict["token_index"]) == ("non_finite", 3)
    bad = run_fse("generate", "--local", PROMPT, "--graph-stats", "maybe")
    assert bad.returncode == 2 and "--graph-stats" in bad.stderr and "Traceback" not in bad.stderr
