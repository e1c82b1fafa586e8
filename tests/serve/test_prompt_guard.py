"""prompt_perplexity through a real daemon: a refused prompt ends with exactly one
verdict and no token, audited like any verdict, while a stream running beside it is
unaffected."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fse_client.v1 import fse_pb2
from support.daemons import Daemon, audit_events
from support.streams import assert_well_formed, generate, start

RANDOM_SUFFIX = (
    "Tell me about the weather today. quartz vivid ZEBRA ]]; oblong $$ flux Kettle 99 "
    "amber ~ sprocket nimbus !! gravel"
)
ORDINARY = "Write a detailed history of the city of Lyon, from the Romans to today."
INPUTS = """\
name = "inputs"
[guards.perplexity]
threshold = 400.0
[guards.loop]
max_period = 1024
[guards.prompt_perplexity]
threshold = 1000.0
window = 16
window_threshold = 5000.0
skip = 4
"""


def test_a_refused_prompt_gets_one_verdict_and_no_token(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir(mode=0o755)
    (policies / "inputs.toml").write_text(INPUTS)
    daemon = start_daemon("--policies-dir", str(policies), "--max-streams", "2")
    with daemon.channel() as channel, ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(generate, channel, [start(prompt, 24, policy="inputs")])
            for prompt in (ORDINARY, RANDOM_SUFFIX)
        ]
        ordinary, refused = (r.result() for r in runs)
    assert assert_well_formed(ordinary, 24).status == fse_pb2.STATUS_COMPLETED
    assert len(ordinary.tokens) == 24
    verdict = assert_well_formed(refused, 24)
    assert refused.tokens == [] and len(refused.verdicts) == 1
    assert (verdict.status, verdict.guard, verdict.token_index, verdict.tokens) == (
        fse_pb2.STATUS_HALTED,
        "prompt_perplexity",
        0,
        0,
    )
    assert verdict.value > verdict.threshold
    records = [r for r in audit_events(daemon, "stream.verdict") if r["status"] == "halted"]
    assert [(r["guard"], r["tokens"], r["token_index"]) for r in records] == [
        ("prompt_perplexity", 0, 0)
    ]


def test_pro_refuses_adversarial_prompts_and_passes_odd_ordinary_ones(
    start_daemon: Callable[..., Daemon],
) -> None:
    """The built-in `pro` through the daemon: a random-token suffix is refused with no
    token, an ordinary prompt carrying base64 and a hash is served."""
    odd = "Decode SGVsbG8sIHdvcmxkIQ== and check commit 3f9a2c7e1b8d4f60a5e9c2b7d1f3a8e6c4b2d0f9."
    daemon = start_daemon("--max-streams", "2")
    with daemon.channel() as channel:
        refused = generate(channel, [start(RANDOM_SUFFIX, 8, policy="pro")])
        served = generate(channel, [start(odd, 4, policy="pro")])
    verdict = assert_well_formed(refused, 8)
    assert refused.tokens == [] and (verdict.guard, verdict.tokens) == ("prompt_perplexity", 0)
    assert assert_well_formed(served, 4).status == fse_pb2.STATUS_COMPLETED
    assert len(served.tokens) == 4
