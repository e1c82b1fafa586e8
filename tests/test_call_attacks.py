"""What a caller can make the daemon do with its calls (issue 18): fill the audit log with
refusals, run more streams than its limit, pass for another certificate holder, hold calls
open without a `start`, get UNKNOWN for a message protobuf refuses.

Real daemons, real gRPC clients, real files; the attacker as uid 65534 where it matters."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fse_client
import grpc
import pytest
from certs import Pair, issue, make_ca, server_pair
from conftest import Daemon, audit_records
from fse.serve import refusals
from fse.serve.refusals import ECHO_BYTES, ERROR_BYTES, RefusalLog
from fse.serve.servicer import FIRST_MESSAGE_SECONDS, MAX_CALLS_WITHOUT_PLACE
from fse_client.v1 import fse_pb2

THREADS = ("--threads", "1")
GREEDY = fse_client.Sampling(temperature=0.0)
NOBODY = 65534
GENERATE = "/fse.v1.Guard/Generate"
GET_INFO = "/fse.v1.Guard/GetInfo"


def _generate(channel: Any) -> Any:
    """fse.v1.Guard/Generate on a grpc channel (sync or aio)."""
    return channel.stream_stream(
        GENERATE,
        request_serializer=fse_pb2.GenerateClientMessage.SerializeToString,
        response_deserializer=fse_pb2.GenerateServerMessage.FromString,
    )


def _start(**fields: Any) -> fse_pb2.GenerateClientMessage:
    return fse_pb2.GenerateClientMessage(start=fse_pb2.GenerateRequest(**fields))


def _refusals(records: list[dict[str, Any]], event: str, client: str) -> tuple[int, int, int]:
    """(records written in full, summaries, refusals counted in summaries) of a peer."""
    full = [r for r in records if r["event"] == event and r.get("client", "").startswith(client)]
    summaries = [r for r in records if r["event"] == f"{event}_summary" and r["client"] == client]
    return len(full), len(summaries), sum(r["count"] for r in summaries)


def _shared_dir() -> Path:
    """A directory other users can enter (pytest's tmp_path is private to root)."""
    shared = Path(tempfile.mkdtemp(prefix="fse-calls-"))
    shared.chmod(0o755)
    return shared


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
    full, summaries, counted = _refusals(records, "auth.denied", "tcp:127.0.0.1")
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


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_refused_large_requests_cost_a_bounded_number_of_audit_bytes(
    start_daemon: Callable[..., Daemon],
) -> None:
    """2,000 refused requests from uid 65534, each with 8 KiB of its own text in the
    request id or the policy name: the echoed text is cut to 128 bytes (with the whole's
    length and sha256), and past the first few the refusals are counted into a summary.
    Each wrote its whole request id or policy name (16 MB in all)."""
    shared = _shared_dir()
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
        full, summaries, counted = _refusals(records, "input.rejected", f"uid:{NOBODY}")
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
        await asyncio.sleep(0.6)

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
        generate = _generate(channel)
        calls = [
            generate(iter([_start(prompt=prompt, max_tokens=1000, request_id=f"big-{i}")]))
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
        running = _generate(a)(
            iter([_start(prompt="Write a long story.", max_tokens=300, request_id="a")]),
            timeout=120,
        )
        assert next(running).WhichOneof("kind") == "started"  # alice of org-a runs one
        replies = list(_generate(b)(iter([_start(prompt="Hi", max_tokens=2, request_id="b")])))
        assert replies[-1].verdict.status == fse_pb2.STATUS_COMPLETED  # not her limit
        running.cancel()
    started = {
        r["request_id"]: r["client"] for r in daemon.audit() if r["event"] == "stream.started"
    }
    assert started == {"a": "cert:CN=alice,O=org-a", "b": "cert:CN=alice,O=org-b"}


# --- finding 11: undecodable messages, and tracebacks in the daemon's log -------------


@pytest.fixture(scope="module")
def module_daemon(start_module_daemon: Callable[..., Daemon]) -> Daemon:
    return start_module_daemon(*THREADS)


def test_a_message_protobuf_refuses_is_invalid_argument_naming_the_field(
    module_daemon: Daemon,
) -> None:
    """Invalid UTF-8 in a string field, or a broken wire format: INVALID_ARGUMENT naming
    the field (or the message) and an `input.rejected` record. It was UNKNOWN,
    "Unexpected <class 'google.protobuf.message.DecodeError'>", and nothing audited."""
    good = _start(prompt="Hi", max_tokens=1, request_id="MARK", stop=["x", "y"])
    raw = good.SerializeToString()
    cases = {
        raw.replace(b"MARK", b"M\xffRK"): "request_id: not valid UTF-8",
        raw.replace(b"y", b"\xc3"): "stop[1]: not valid UTF-8",
        b"\x0a\xff\xff": "GenerateClientMessage: not a valid protobuf message",
    }
    seen = len(module_daemon.audit())
    with grpc.insecure_channel(module_daemon.addr) as channel:
        generate = channel.stream_stream(GENERATE)  # raw bytes both ways
        for data, expected in cases.items():
            with pytest.raises(grpc.RpcError) as refused:
                list(generate(iter([data]), timeout=60))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(expected), refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(GET_INFO)(b"\x0a\xff\xff", timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("GetInfoRequest: not a valid protobuf")
    rejected = [r for r in module_daemon.audit()[seen:] if r["event"] == "input.rejected"]
    assert [r["error"][: len(e)] for r, e in zip(rejected, cases.values(), strict=True)] == list(
        cases.values()
    )
    assert all(r["reason"] == "invalid_argument" for r in rejected)


CRASHING_PREPARE = """
import asyncio, sys
import fse_client, grpc
from fse.core.model import Model
from fse.core.gguf import default_model_path
from fse.core.policy import load_policies
from fse.serve.logs import configure_logging
from fse.serve.scheduler import Limits
from fse.serve.service import GuardService
from fse.serve.servicer import GuardServicer, add_to_server

configure_logging()


def prepare(*args, **kwargs):
    raise ValueError("secret internals")


async def main(addr):
    with Model(default_model_path()) as model:
        service = GuardService(model, load_policies(), Limits(max_streams=1, ctx_per_stream=64),
                               n_threads=1)
        service.prepare = prepare
        servicer = GuardServicer()
        servicer.model_loaded(service)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        server.add_insecure_port(addr)
        await server.start()
        async with fse_client.AsyncClient(addr) as client:
            try:
                async for _ in await client.generate("hi", max_tokens=1):
                    pass
            except fse_client.FseError as exc:
                print(exc.code.name, exc.message, file=sys.stdout)
        await server.stop(None)
        service.shutdown()


asyncio.run(main(sys.argv[1]))
"""


def test_a_crash_while_preparing_leaves_its_traceback_in_the_log(tmp_path: Path) -> None:
    """`internal error (see the daemon's log)` must point at something: the log line
    carries the traceback (it said `"exc_info": true` and nothing more)."""
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_PREPARE, f"unix:{tmp_path / 'fse.sock'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "INTERNAL internal error (see the daemon's log)", done.stderr
    (crashed,) = [
        json.loads(line) for line in done.stderr.splitlines() if '"prepare.crashed"' in line
    ]
    assert "exc_info" not in crashed
    assert crashed["exception"].startswith("Traceback (most recent call last):")
    assert crashed["exception"].endswith("ValueError: secret internals")


# --- minor: a drain wins, a second start, calls that never start ----------------------


def test_a_draining_daemon_with_a_full_queue_answers_unavailable(
    start_daemon: Callable[..., Daemon],
) -> None:
    """During the drain every place is still taken; a new call must hear that the
    daemon is going away (UNAVAILABLE), not that it is busy (RESOURCE_EXHAUSTED)."""
    daemon = start_daemon(
        *THREADS, "--max-streams", "1", "--max-queue", "0", "--drain-seconds", "120"
    )
    with fse_client.Client(daemon.addr) as client:
        running = client.generate("Write a long story.", max_tokens=1000, sampling=GREEDY)
        events = iter(running)
        next(events)
        daemon.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while '"server.stopping"' not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        with pytest.raises(fse_client.FseError) as refused:
            list(client.generate("Hi", max_tokens=1))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.message == "the daemon is shutting down"
        running.cancel()
        list(events)
    assert daemon.stop() == 0


def test_a_second_start_is_audited_with_the_tokens_actually_sent(
    module_daemon: Daemon,
) -> None:
    """A second `start` mid-stream: nothing more is sent, and the verdict's record
    counts the tokens the client got (the rest as `withheld`). It counted every token
    the guards had released, sent or not."""
    second = threading.Event()

    def messages() -> Iterator[fse_pb2.GenerateClientMessage]:
        yield _start(prompt="Write a long story.", max_tokens=500, request_id="twice")
        second.wait(60)
        yield _start(prompt="Hi", max_tokens=1)
        second.wait(60)  # the send side stays open

    received = 0
    with grpc.insecure_channel(module_daemon.addr) as channel:
        replies = _generate(channel)(messages(), timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            for reply in replies:
                if reply.WhichOneof("kind") == "token":
                    received += 1
                    if received == 3:
                        second.set()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("start: only one `start` per stream")
    deadline = time.monotonic() + 60
    while not (verdicts := _records(module_daemon, "stream.verdict", "twice")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (verdict,) = verdicts
    assert verdict["status"] == "cancelled" and verdict["tokens"] == received
    assert verdict.get("withheld", 0) >= 0


def _records(daemon: Daemon, event: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in daemon.audit() if r["event"] == event and r["request_id"] == request_id]


async def _idle_calls(addrs: list[str], n: int) -> list[str]:
    """n calls per address that never send anything: each one's status code."""
    channels = [grpc.aio.insecure_channel(addr) for addr in addrs]
    try:
        calls = [
            _generate(ch)(timeout=4 * FIRST_MESSAGE_SECONDS) for ch in channels for _ in range(n)
        ]
        return [str((await call.code()).name) for call in calls]
    finally:
        for ch in channels:
            await ch.close()


def test_calls_that_never_start_hold_a_place_for_a_bounded_time(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A call waiting for its `start` counts against its caller's limit and the daemon's
    capacity; it ends after FIRST_MESSAGE_SECONDS (INVALID_ARGUMENT, audited); and past
    MAX_CALLS_WITHOUT_PLACE such calls without a place the next are refused at once.
    Such calls had no deadline and counted against nothing (2,000 held 48 MB)."""
    daemon = start_daemon(
        *THREADS, "--max-streams", "2", "--max-queue", "0", "--per-client-streams", "1",
        tcp=True,
    )  # fmt: skip
    unix, tcp = daemon.addrs

    async def attack() -> tuple[list[str], list[str], list[str], list[str]]:
        async with grpc.aio.insecure_channel(unix) as mine, grpc.aio.insecure_channel(tcp) as other:
            held_unix = _generate(mine)(timeout=4 * FIRST_MESSAGE_SECONDS)  # uid:0's place
            held_tcp = _generate(other)(timeout=4 * FIRST_MESSAGE_SECONDS)  # the last place
            await asyncio.sleep(0.5)
            tried = []
            for addr in (unix, tcp):  # uid:0 over its limit; a new TCP caller, no room
                try:
                    with fse_client.Client(addr) as client:
                        list(client.generate("Hi", max_tokens=1))
                    tried.append("OK")
                except fse_client.FseError as exc:
                    tried.append(f"{exc.code.name}: {exc.message}")
            flood = await _idle_calls([unix] * 4, 40)
            held = [str((await c.code()).name) for c in (held_unix, held_tcp)]
            return tried, flood, held, [await held_unix.details()]

    tried, flood, held, details = asyncio.run(attack())
    assert tried[0].startswith("RESOURCE_EXHAUSTED: per-caller limit: uid:0 already runs 1")
    assert tried[1].startswith("RESOURCE_EXHAUSTED: overloaded: ")
    assert held == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert details[0] == (
        f"start: none within {FIRST_MESSAGE_SECONDS:g} s of the call opening; "
        "the first message of a Generate stream must be `start`"
    )
    codes = collections.Counter(flood)
    assert set(codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert codes["INVALID_ARGUMENT"] <= MAX_CALLS_WITHOUT_PLACE, codes
    # Once they are gone, the places are free again.
    with fse_client.Client(unix) as client:
        verdict = list(client.generate("Hi", max_tokens=1))[-1]
    assert isinstance(verdict, fse_client.Verdict)
    assert verdict.status == fse_client.Status.COMPLETED
    assert daemon.stop() == 0
    records = audit_records(daemon.audit_path)
    # The held TCP call's refusal in full; uid:0's many are mostly in its summary.
    (waited,) = [r for r in records if r["event"] == "input.rejected" and "none" in r["error"]]
    assert waited["client"].startswith("tcp:127.0.0.1:") and waited["request_id"] == ""
    full, _, counted = _refusals(records, "input.rejected", "uid:0")
    assert full + counted == 1 + len(flood) + 1  # the refused try, the flood, the held call
