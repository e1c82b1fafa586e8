"""What a caller can make the daemon do with its calls (issue 18): fill the audit log with
refusals, run more streams than its limit, pass for another certificate holder, hold calls
open without a `start`, get UNKNOWN for a message protobuf refuses.

Real daemons, real gRPC clients, real files; the attacker as uid 65534 where it matters."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from fse.serve import refusals
from fse.serve.refusals import ECHO_BYTES, ERROR_BYTES, RefusalLog
from fse_client.v1 import fse_pb2
from support.calls import GET_INFO, generate_call, refusals_of, start_message
from support.certs import Pair, issue, make_ca, server_pair
from support.daemons import THREADS, Daemon
from support.users import NOBODY, needs_root, shared_dir

# --- finding 2: refusals cost a bounded number of audit bytes -------------------------


def test_denied_calls_from_many_ports_cost_a_bounded_number_of_audit_bytes(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """7,000 calls without a token over plain loopback TCP, from 20 connections (20
    source ports): every denial counted, but the first few written in full and the rest
    into one summary for the address, so the audit log grows by a few KiB (it grew by
    ~1.3 MB, one `auth.denied` line each, enough to rotate history out of the log)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"app {hashlib.sha256(b'secret').hexdigest()}\n")
    daemon = start_daemon(*THREADS, "--auth-tokens", str(tokens), tcp=True)
    before = daemon.audit_path.stat().st_size
    seen = len(daemon.audit())
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(20):
        with grpc.insecure_channel(daemon.addrs[1]) as channel:
            info = channel.unary_unary(
                GET_INFO,
                request_serializer=fse_pb2.GetInfoRequest.SerializeToString,
                response_deserializer=fse_pb2.Info.FromString,
            )
            calls = [info.future(fse_pb2.GetInfoRequest(), timeout=120) for _ in range(350)]
            for call in calls:
                codes[call.code().name] += 1
    assert codes == {"UNAUTHENTICATED": 7000}
    assert daemon.stop() == 0  # the last window's summary is written at stop
    grown = daemon.audit_path.stat().st_size - before
    records = daemon.audit()[seen:]
    full, summaries, counted = refusals_of(records, "auth.denied", "tcp:127.0.0.1")
    assert full + counted == 7000, (full, counted)
    assert summaries >= 1 and full <= refusals.FULL_PER_PEER * summaries
    (summary, *_) = [r for r in records if r["event"] == "auth.denied_summary"]
    assert summary["client"] == "tcp:127.0.0.1" and summary["reasons"] == {
        "missing token": summary["count"]
    }
    assert grown < 16 << 10, f"{grown} audit bytes for 7,000 denied calls"


FLOOD_AS_NOBODY = """
import asyncio, collections, json, os, sys
import grpc
from fse_client.v1 import fse_pb2

addr, calls, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([]); os.setgid(65534); os.setuid(65534)  # imports first, as root


def start(i):
    if i % 2:  # a request id far over its 128 bytes
        fields = dict(request_id=f"{i}-" + "r" * size)
    else:  # a valid request id, a policy name nobody has
        fields = dict(request_id=f"p-{i}", policy=f"{i}-" + "p" * size)
    request = fse_pb2.GenerateRequest(prompt="Hi", max_tokens=1, **fields)
    return fse_pb2.GenerateClientMessage(start=request)


async def main():
    codes = collections.Counter()
    async with grpc.aio.insecure_channel(addr) as channel:
        generate = channel.stream_stream(
            "/fse.v1.Guard/Generate",
            request_serializer=fse_pb2.GenerateClientMessage.SerializeToString,
            response_deserializer=fse_pb2.GenerateServerMessage.FromString,
        )
        slots = asyncio.Semaphore(16)

        async def one(i):
            async with slots:
                try:
                    async for _ in generate(iter([start(i)])):
                        pass
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                else:
                    codes["OK"] += 1

        for i in range(2):  # one of each kind first: these are written in full
            await one(i)
        await asyncio.gather(*(one(i) for i in range(2, calls)))
    print(json.dumps(codes))


asyncio.run(main())
"""


@needs_root
def test_refused_large_requests_cost_a_bounded_number_of_audit_bytes(
    start_daemon: Callable[..., Daemon],
) -> None:
    """2,000 refused requests from uid 65534, each with 8 KiB of its own text in the
    request id or the policy name: the echoed text is cut to 128 bytes (with the whole's
    length and sha256), and past the first few the refusals are counted into a summary.
    Each wrote its whole request id or policy name (16 MB in all)."""
    shared = shared_dir("fse-calls-")
    try:
        sock = shared / "fse.sock"
        daemon = start_daemon(*THREADS, "--listen", f"unix:{sock}", "--socket-mode", "0666")
        before = daemon.audit_path.stat().st_size
        seen = len(daemon.audit())
        size = 8 << 10
        done = subprocess.run(
            [sys.executable, "-c", FLOOD_AS_NOBODY, f"unix:{sock}", "2000", str(size)],
            capture_output=True, text=True, timeout=600, cwd=shared,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"INVALID_ARGUMENT": 2000}
        assert daemon.stop() == 0
        grown = daemon.audit_path.stat().st_size - before
        records = daemon.audit()[seen:]
        full, summaries, counted = refusals_of(records, "input.rejected", f"uid:{NOBODY}")
        assert full + counted == 2000, (full, counted)
        assert summaries >= 1 and full <= refusals.FULL_PER_PEER * summaries
        rejected = [r for r in records if r["event"] == "input.rejected"]
        # The first two, one of each kind, in full and within bounds.
        long_id = "1-" + "r" * size
        assert rejected[1]["request_id"] == long_id[:ECHO_BYTES]
        assert rejected[1]["request_id_bytes"] == len(long_id)
        assert rejected[1]["request_id_sha256"] == hashlib.sha256(long_id.encode()).hexdigest()
        assert rejected[0]["request_id"] == "p-0" and "request_id_bytes" not in rejected[0]
        assert rejected[0]["error"].startswith("policy: unknown policy '0-ppp")
        assert f"({size + 2} bytes in all)" in rejected[0]["error"]
        assert all(len(r["error"].encode()) <= ERROR_BYTES + 32 for r in rejected)
        (summary, *_) = [r for r in records if r["event"] == "input.rejected_summary"]
        assert summary["reasons"] == {"invalid_argument": summary["count"]}
        assert grown < 32 << 10, f"{grown} audit bytes for 2,000 refused requests"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_refusal_summaries_are_written_when_the_window_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without waiting for a stop: the window's timer writes the summary; peers past
    MAX_PEERS share the `*` summary; nothing is uncounted."""
    monkeypatch.setattr(refusals, "WINDOW_SECONDS", 0.3)
    monkeypatch.setattr(refusals, "MAX_PEERS", 3)
    written: list[tuple[str, dict[str, Any]]] = []

    def write(event: str, **fields: Any) -> bool:
        written.append((event, fields))
        return True

    async def refuse() -> None:
        log = RefusalLog(write)
        for n in range(30):
            log.record("auth.denied", "uid:7", "missing token")
            log.record("auth.denied", f"tcp:10.0.0.{n}:4000", "wrong token")
        await asyncio.sleep(0.6)  # waits out the 0.3 s window: its timer writes the summary

    asyncio.run(refuse())
    full = collections.Counter(f["client"] for e, f in written if e == "auth.denied")
    summaries = {f["client"]: f for e, f in written if e == "auth.denied_summary"}
    assert sum(full.values()) + sum(f["count"] for f in summaries.values()) == 60
    assert full["uid:7"] == refusals.FULL_PER_PEER
    assert summaries["uid:7"]["count"] == 30 - refusals.FULL_PER_PEER
    # uid:7 and two addresses are counted apart (one refusal each, in full); the 28
    # other addresses share "*", whose first refusals are written in full too.
    assert set(summaries) == {"uid:7", "*"}
    assert summaries["*"]["count"] == 28 - refusals.FULL_PER_PEER
    assert summaries["*"]["reasons"] == {"wrong token": 28 - refusals.FULL_PER_PEER}


# --- finding 7: the per-caller limit holds for large prompts --------------------------


async def _admitted(addr: str, prompt: str, n: int) -> list[str]:
    """n concurrent streams: 'started' for each admitted, else the status code."""
    async with grpc.aio.insecure_channel(addr) as channel:
        generate = generate_call(channel)
        calls = [
            generate(iter([start_message(prompt=prompt, max_tokens=1000, request_id=f"big-{i}")]))
            for i in range(n)
        ]

        async def first(call: Any) -> str:
            try:
                async for reply in call:
                    return str(reply.WhichOneof("kind"))
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return "ended"

        outcomes = list(await asyncio.gather(*(first(c) for c in calls)))
        for call in calls:
            call.cancel()
        return outcomes


def test_large_prompts_cannot_exceed_the_per_caller_limit(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Four concurrent 17,000-byte prompts from one uid with per_client_streams 2: two
    run, two are RESOURCE_EXHAUSTED. Prompts over 16 KiB were tokenized in a worker
    thread before the caller was counted, and three ran."""
    daemon = start_daemon(
        *THREADS, "--per-client-streams", "2", "--max-streams", "4", "--max-queue", "4"
    )
    head = "Write a long story about a lighthouse keeper."
    prompt = head + " " * (17_000 - len(head))
    outcomes = asyncio.run(_admitted(daemon.addr, prompt, 4))
    assert outcomes.count("started") == 2, outcomes
    refused = [o for o in outcomes if o != "started"]
    assert refused == ["RESOURCE_EXHAUSTED: per-caller limit: uid:0 already runs 2 streams "
                       "(per_client_streams 2)"] * 2  # fmt: skip


# --- finding 8: a certificate's identity is its whole subject -------------------------


@pytest.fixture(scope="module")
def two_alices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca, clients = make_ca(folder, "server-ca"), make_ca(folder, "client-ca")
    return {
        "ca": ca,
        "server": server_pair(ca, folder),
        "clients_ca": clients,
        "alice_a": issue(clients, folder, "alice", org="org-a"),
        "alice_b": issue(clients, folder, "alice", org="org-b"),
    }


def test_two_certificates_with_one_cn_are_two_callers(
    start_daemon: Callable[..., Daemon], two_alices: dict[str, Pair]
) -> None:
    """CN=alice from O=org-a and CN=alice from O=org-b: two names in the audit log and
    two per-caller limits. Both were `cert:alice`, sharing one limit."""
    pki = two_alices
    daemon = start_daemon(
        *THREADS,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["clients_ca"].cert), "--per-client-streams", "1",
        tcp=True,
    )  # fmt: skip
    root = pki["ca"].cert.read_bytes()

    def channel(pair: Pair) -> Any:
        creds = grpc.ssl_channel_credentials(root, pair.key.read_bytes(), pair.cert.read_bytes())
        return grpc.secure_channel(daemon.addrs[1], creds)

    with channel(pki["alice_a"]) as a, channel(pki["alice_b"]) as b:
        running = generate_call(a)(
            iter([start_message(prompt="Write a long story.", max_tokens=300, request_id="a")]),
            timeout=120,
        )
        assert next(running).WhichOneof("kind") == "started"  # alice of org-a runs one
        replies = list(
            generate_call(b)(iter([start_message(prompt="Hi", max_tokens=2, request_id="b")]))
        )
        assert replies[-1].verdict.status == fse_pb2.STATUS_COMPLETED  # not her limit
        running.cancel()
    started = {
        r["request_id"]: r["client"] for r in daemon.audit() if r["event"] == "stream.started"
    }
    assert started == {"a": "cert:CN=alice,O=org-a", "b": "cert:CN=alice,O=org-b"}
