"""`fse generate --addr` against a real daemon: the same tokens and JSON as `--local`,
Ctrl-C cancels, bad input is a usage error, and a missing daemon is one line.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from fse_client.v1 import fse_pb2
from support.daemons import (
    FSE,
    LONG_PROMPT,
    PROMPT,
    THREADS,
    Daemon,
    run_fse,
)
from support.streams import (
    LONG,
    assert_well_formed,
    generate,
    json_lines,
    start,
)
from support.waits import LIVE

# -- 2. daemon == --local ---------------------------------------------------------


def test_daemon_matches_local_cli(
    main: Daemon, main_channel: grpc.Channel, policies_dir: Path
) -> None:
    """Greedy, with the warn-only policy from the daemon's --policies-dir: same ids, same
    JSON shapes (warnings included), same verdict, exit code 0 both ways."""
    common = [PROMPT, "--json", "--seed", "7", "--temperature", "0", "--max-tokens", "16"]
    common += ["--policy", "warny", "--policies-dir", str(policies_dir)]
    local = run_fse("generate", "--local", *THREADS, *common)
    remote = run_fse("generate", "--addr", main.addr, *common)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    local_docs, remote_docs = json_lines(local.stdout), json_lines(remote.stdout)
    assert [d["type"] for d in local_docs] == ["token"] * 16 + ["verdict"]
    assert [list(d) for d in remote_docs] == [list(d) for d in local_docs]  # same keys, order
    assert [d.get("id") for d in remote_docs] == [d.get("id") for d in local_docs]
    assert remote_docs[-1] == local_docs[-1]  # the verdict, field for field
    assert local_docs[-1]["status"] == "completed"
    assert local_docs[-1]["policy"] == "warny"
    assert sum("warnings" in d for d in local_docs) > 8  # the warn path is exercised
    for lt, rt in zip(local_docs[:-1], remote_docs[:-1], strict=True):
        assert rt["text"] == lt["text"]
        assert rt["health"] == lt["health"]
        for key in ("nll", "ppl", "variance", "max_prob", "l2_norm", "entropy"):
            assert rt[key] == pytest.approx(lt[key], rel=1e-3, abs=1e-4), key
        assert [w["guard"] for w in rt.get("warnings", [])] == [
            w["guard"] for w in lt.get("warnings", [])
        ]
    # The same ids come out of a raw gRPC client, with the warnings on the wire.
    wire = generate(main_channel, [start(PROMPT, 16, policy="warny")])
    assert assert_well_formed(wire, 16).status == fse_pb2.STATUS_COMPLETED
    assert wire.ids == [d["id"] for d in local_docs[:-1]]
    for token in wire.tokens:
        if token.ppl > 1.5:
            (trip,) = token.warnings
            assert (trip.guard, trip.value, trip.threshold) == ("perplexity", token.ppl, 1.5)
        else:
            assert not token.warnings


def test_daemon_matches_local_cli_halted(main: Daemon) -> None:
    """Seeded sampling and a halt: same ids, same verdict, exit code 3 both ways."""
    common = [
        "Once upon a time", "--json", "--seed", "42", "--temperature", "0.9",
        "--max-tokens", "24", "--debug-fault", "nan@5",
    ]  # fmt: skip
    local = run_fse("generate", "--local", *THREADS, *common)
    remote = run_fse("generate", "--addr", main.addrs[1], *common)  # HOST:PORT this time
    assert local.returncode == 3, local.stderr
    assert remote.returncode == 3, remote.stderr
    local_docs, remote_docs = json_lines(local.stdout), json_lines(remote.stdout)
    assert [list(d) for d in remote_docs] == [list(d) for d in local_docs]
    assert [d.get("id") for d in remote_docs] == [d.get("id") for d in local_docs]
    verdict = remote_docs[-1]
    assert verdict == local_docs[-1]
    assert verdict["status"] == "halted"
    assert verdict["guard"] == "non_finite"
    assert verdict["token_index"] == 5 and verdict["tokens"] == 5
    assert len(remote_docs) == 6


# -- 9. CLI against a missing daemon ----------------------------------------------


def test_cli_unreachable_daemon() -> None:
    result = run_fse("generate", "--addr", "unix:/nonexistent.sock", "hi")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fse generate: error:")
    assert "unix:/nonexistent.sock" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_addr_interrupt_cancels(main: Daemon) -> None:
    """Ctrl-C on `fse generate --addr` sends Cancel: verdict `cancelled`, exit code 4."""
    args = [LONG_PROMPT, "--json", "--temperature", "0", "--max-tokens", str(LONG)]
    with subprocess.Popen(
        [*FSE, "generate", "--addr", main.addr, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        head = [proc.stdout.readline() for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=LIVE)
    assert proc.returncode == 4, err
    docs = json_lines("".join(head) + rest)
    verdict = docs[-1]
    assert verdict["type"] == "verdict" and verdict["status"] == "cancelled"
    assert verdict["tokens"] == len(docs) - 1 < LONG
    assert verdict["text"] == "".join(d["text"] for d in docs[:-1])


def test_cli_addr_bad_input_is_usage_error(main: Daemon) -> None:
    result = run_fse("generate", "--addr", main.addr, "hi", "--max-tokens", "300")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fse generate: error: INVALID_ARGUMENT: max_tokens: 300 is out of range; accepted: 1..255"
    )
