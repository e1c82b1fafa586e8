"""What a caller can make the daemon do with its calls (issue 18), continued: messages
protobuf refuses, a crash while preparing a stream, a drain with a full queue, a second
`start`, calls that never send one.

Real daemons, real gRPC clients, real files."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fse_client
import grpc
import pytest
from fse.serve.servicer import FIRST_MESSAGE_SECONDS, MAX_CALLS_WITHOUT_PLACE
from fse_client.v1 import fse_pb2
from support.calls import GENERATE, GET_INFO, generate_call, refusals_of, start_message
from support.daemons import THREADS, Daemon, audit_records
from support.streams import GREEDY
from support.waits import wait_for

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
    good = start_message(prompt="Hi", max_tokens=1, request_id="MARK", stop=["x", "y"])
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
        wait_for(lambda: '"server.stopping"' in daemon.log(), "server.stopping in the log")
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
        yield start_message(prompt="Write a long story.", max_tokens=500, request_id="twice")
        second.wait(60)
        yield start_message(prompt="Hi", max_tokens=1)
        second.wait(60)  # the send side stays open

    received = 0
    with grpc.insecure_channel(module_daemon.addr) as channel:
        replies = generate_call(channel)(messages(), timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            for reply in replies:
                if reply.WhichOneof("kind") == "token":
                    received += 1
                    if received == 3:
                        second.set()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("start: only one `start` per stream")
    wait_for(lambda: bool(_records(module_daemon, "stream.verdict", "twice")), "its verdict")
    (verdict,) = _records(module_daemon, "stream.verdict", "twice")
    assert verdict["status"] == "cancelled" and verdict["tokens"] == received
    assert verdict.get("withheld", 0) >= 0


def _records(daemon: Daemon, event: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in daemon.audit() if r["event"] == event and r["request_id"] == request_id]


async def _idle_calls(addrs: list[str], n: int) -> list[str]:
    """n calls per address that never send anything: each one's status code."""
    channels = [grpc.aio.insecure_channel(addr) for addr in addrs]
    try:
        calls = [
            generate_call(ch)(timeout=4 * FIRST_MESSAGE_SECONDS)
            for ch in channels
            for _ in range(n)
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
            held_unix = generate_call(mine)(timeout=4 * FIRST_MESSAGE_SECONDS)  # uid:0's place
            held_tcp = generate_call(other)(timeout=4 * FIRST_MESSAGE_SECONDS)  # the last place
            # Time for both calls to reach the daemon: a call without its `start` shows
            # nowhere outside it (no record, no metric) to poll for.
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
    full, _, counted = refusals_of(records, "input.rejected", "uid:0")
    assert full + counted == 1 + len(flood) + 1  # the refused try, the flood, the held call
