"""near_loop through a real daemon: the embedded model counting in a loop ("Day 4: I woke
up and went to work. Day 5: ...") is halted by near_loop, with the period in the verdict's
message and the audit record, while the exact loop guard alone lets it run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fse_client.v1 import fse_pb2
from support.daemons import Daemon, audit_events
from support.http import get, post, start_http, write_tokens
from support.streams import assert_well_formed, generate, start

DAYS = "Day 1: I woke up and went to work. Day 2: I woke up and went to work. Day 3:"
POLICIES = {
    "near": 'name = "near"\n[guards.near_loop]\n',
    "exact": 'name = "exact"\n[guards.loop]\n',
}


def test_a_counter_loop_is_halted_by_near_loop_and_not_by_loop(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir(mode=0o755)
    for name, text in POLICIES.items():
        (policies / f"{name}.toml").write_text(text)
    api = start_http(
        start_daemon, "--policies-dir", str(policies), "--auth-tokens", str(write_tokens(tmp_path))
    )
    daemon = api.daemon
    with daemon.channel() as channel:
        near = generate(channel, [start(DAYS, 64, policy="near")])
        exact = generate(channel, [start(DAYS, 64, policy="exact")])

    verdict = assert_well_formed(near, 64)
    assert (verdict.status, verdict.guard) == (fse_pb2.STATUS_HALTED, "near_loop")
    assert verdict.threshold == 0.85 and 0.85 <= verdict.value <= 1.0
    assert verdict.message == "period 12 tokens"  # " I woke up and went to work. Day 4:"
    assert verdict.token_index == len(near.tokens) < 64
    assert "Day 4" in "".join(t.text for t in near.tokens)

    assert assert_well_formed(exact, 64).status == fse_pb2.STATUS_COMPLETED
    assert len(exact.tokens) == 64

    (record,) = [r for r in audit_events(daemon, "stream.verdict") if r["status"] == "halted"]
    assert (record["guard"], record["policy"], record["message"]) == (
        "near_loop",
        "near",
        "period 12 tokens",
    )
    assert record["value"] == verdict.value and record["threshold"] == 0.85

    # The OpenAI-compatible door says the same, in its fse_verdict.
    model = get(f"{api.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": DAYS, "max_tokens": 64, "temperature": 0, "policy": "near"}
    reply = post(f"{api.url}/v1/completions", body)
    assert reply.status == 200, reply.body
    fse_verdict = reply.json()["fse_verdict"]
    assert (fse_verdict["guard"], fse_verdict["message"]) == ("near_loop", "period 12 tokens")
    assert fse_verdict["token_index"] == verdict.token_index
