"""Limits before work, and memory: an overloaded daemon refuses a large prompt before
tokenizing it, an oversized prompt is refused from its length, and large prompts reuse
the heap and hand it back (the heap trimmer).

Real daemons, real gRPC clients; memory read from /proc (support.procs)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import fse_client
import grpc
import pytest
from fse.core.model import Model, TooManyTokens
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.daemons import THREADS, Daemon
from support.procs import PAGE, proc_stat, rss_mib
from support.streams import GREEDY

# --- limits before work ---------------------------------------------------------------


def test_overload_is_refused_before_a_large_prompt_is_tokenized(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With every slot taken, a 1 MiB prompt gets RESOURCE_EXHAUSTED at once: the
    overload check comes before any tokenizing (it used to be INVALID_ARGUMENT, found
    only after tokenizing the whole prompt)."""
    daemon = start_daemon(*THREADS, "--max-streams", "1", "--max-queue", "0")
    with fse_client.Client(daemon.addr) as client:
        running = client.generate("Write a long story.", max_tokens=300, sampling=GREEDY)
        events = iter(running)
        next(events)
        with pytest.raises(fse_client.FseError) as refused:
            list(client.generate("a " * (500 << 10), max_tokens=8, request_id="big"))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Several at once from grpc's asyncio client, which reports a stream reset while
        # it still sends as INTERNAL: the refusal must come after the message is read.
        assert asyncio.run(_big_prompts_at_once(daemon.addr, 6)) == ["RESOURCE_EXHAUSTED"] * 6
        running.cancel()
        list(events)
    rejected = [r for r in daemon.audit() if r["event"] == "input.rejected"]
    assert rejected[0]["reason"] == "resource_exhausted" and rejected[0]["request_id"] == "big"
    assert len(rejected) == 7


async def _big_prompts_at_once(addr: str, n: int) -> list[str]:
    start = fse_pb2.GenerateRequest(prompt="a " * (500 << 10), max_tokens=8)
    message = fse_pb2.GenerateClientMessage(start=start)

    async def one(stub: fse_pb2_grpc.GuardStub) -> str:
        try:
            async for _ in stub.Generate(iter([message])):
                pass
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        return list(await asyncio.gather(*(one(stub) for _ in range(n))))


def test_an_oversized_prompt_is_refused_from_its_length_or_a_prefix(model: Model) -> None:
    longest = model.max_token_bytes
    assert longest == 48  # the embedded Gemma 3 vocabulary (SPM, no whitespace-eating tokens)
    # Far too long: refused on its length, nothing tokenized (the count says which way).
    big = "a " * (500 << 10)
    with pytest.raises(TooManyTokens) as refused:
        model.tokenize(big, max_tokens=255)
    assert refused.value.at_least and refused.value.n_tokens == -(-len(big) // longest)
    multibyte = "é" * (255 * longest // 2 + 1)  # few enough characters, too many bytes
    with pytest.raises(TooManyTokens) as refused:
        model.tokenize(multibyte, max_tokens=255)
    assert refused.value.n_tokens == -(-len(multibyte.encode()) // longest)
    # Under that bound but over 8 bytes a token: refused from a 2 KiB prefix.
    with pytest.raises(TooManyTokens) as prefix:
        model.tokenize("a " * 3000, max_tokens=255)
    assert prefix.value.at_least and 255 < prefix.value.n_tokens < 3000
    # Just over the limit, the exact count still comes from the whole text.
    with pytest.raises(TooManyTokens) as exact:
        model.tokenize("word " * 400, max_tokens=255)
    assert not exact.value.at_least and exact.value.n_tokens == len(model.tokenize("word " * 400))


@pytest.mark.parametrize(
    "text",
    [
        " " * 5000,
        "\n" * 3000 + "\t" * 3000,
        "=" * 4000 + "-" * 4000 + "#" * 4000,
        "abcdefghij" * 800,
        "<start_of_turn>user\n" * 300,
        "".join(chr(c) for c in range(0x20, 0x3000, 7)) * 3,
        "🦙" * 2000,
    ],
    ids=["spaces", "newlines-tabs", "runs", "letters", "special", "unicode", "emoji"],
)
@pytest.mark.parametrize("parse_special", [False, True])
def test_no_token_stands_for_more_bytes_than_the_bound(
    model: Model, text: str, parse_special: bool
) -> None:
    """The length refusal is only sound if every token covers at most max_token_bytes of
    the text: runs of one character are where a vocabulary's longest pieces are."""
    tokens = model.tokenize(text, add_special=False, parse_special=parse_special)
    assert len(tokens) * model.max_token_bytes >= len(text.encode())


def test_large_prompts_reuse_the_heap_and_give_it_back(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Sixteen refused ~1 MiB prompts, one after another: the daemon serves their buffers
    from a heap it reuses (far fewer pages faulted in than the 16 MiB it received), and
    hands the freed memory back once the calls are over. With every such buffer mapped
    and unmapped (M_MMAP_THRESHOLD at 256 KiB) each prompt faulted in ~5 MiB of zeroed
    pages, which cost the daemon more CPU than anything else in a burst; left to glibc's
    adaptive threshold alone, the heap kept what a burst freed."""
    daemon = start_daemon(*THREADS)
    pid = daemon.process.pid
    big = "a " * (500 << 10)
    with fse_client.Client(daemon.addr) as client:

        def refuse(n: int) -> None:
            for _ in range(n):
                with pytest.raises(fse_client.FseError) as refused:
                    list(client.generate(big, max_tokens=8))
                assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT

        refuse(2)  # the first ones grow the heap (and map the client's own buffers)
        time.sleep(1)  # waits out the trimmer, which runs half a second after the calls end
        idle = rss_mib(pid)
        faults = int(proc_stat(pid)[7])  # minflt
        refuse(16)
        faulted = (int(proc_stat(pid)[7]) - faults) * PAGE / 2**20
        peak = rss_mib(pid)
        # The heap trimmer may run between two calls: then one prompt's buffers fault in
        # again. 16 prompts with mapped buffers faulted in ~80 MiB.
        assert faulted < 24, f"{faulted:.0f} MiB of pages faulted in for 16 MiB received"
        deadline = time.monotonic() + 10
        while rss_mib(pid) > idle + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rss_mib(pid) <= idle + 4, f"RSS {idle:.0f} -> {peak:.0f} -> {rss_mib(pid):.0f}"


TRIMMER = """
import asyncio
from fse.serve import memory

memory.keep_request_buffers_in_the_heap(4 << 20)


def grow() -> tuple[list[bytearray], list[bytearray]]:
    # 48 MiB of request-sized buffers, each followed by a small block that stays: once
    # the buffers are freed they are holes in the heap, which free() never gives back.
    buffers, pinned = [], []
    for _ in range(48):
        buffers.append(bytearray(1 << 20))
        buffers[-1][::4096] = b"x" * 256  # resident: every page touched
        pinned.append(bytearray(4096))
    return buffers, pinned


async def calls_ending(trimmer: memory.HeapTrimmer, seconds: float) -> None:
    for _ in range(int(seconds / 0.1)):
        trimmer.call_ended()
        await asyncio.sleep(0.1)


async def main() -> None:
    trimmer = memory.HeapTrimmer()
    trimmer.call_ended()
    await asyncio.sleep(2 * memory.TRIM_DELAY)
    idle = trimmer.trims  # nothing grew: nothing to hand back
    buffers, pinned = grow()
    grown = memory.resident_bytes()
    del buffers
    kept = memory.resident_bytes()
    await calls_ending(trimmer, 3 * memory.TRIM_DELAY)
    during = trimmer.trims  # not while calls keep ending
    await asyncio.sleep(2 * memory.TRIM_DELAY)
    after = trimmer.trims
    handed_back = grown - memory.resident_bytes()
    memory.TRIM_AT_LEAST_EVERY = 1.0
    buffers, more = grow()
    del buffers
    await calls_ending(trimmer, 2.0)
    steady = trimmer.trims - after  # calls that never stop ending still get one
    print(idle, during, after, steady, (grown - kept) >> 20, handed_back >> 20)


asyncio.run(main())
"""


@pytest.mark.slow  # waits out the trimmer several times
def test_the_heap_trimmer_hands_back_what_a_burst_left() -> None:
    """Freed request buffers between live blocks stay resident until malloc_trim; the
    trimmer hands them back once calls stop ending (or every TRIM_AT_LEAST_EVERY
    seconds while they do not), and does nothing while the process has not grown."""
    out = subprocess.run(
        [sys.executable, "-c", TRIMMER], capture_output=True, text=True, check=True
    ).stdout
    idle, during, after, steady, freed_alone, handed_back = map(int, out.splitlines()[-1].split())
    assert (idle, during, after, steady) == (0, 0, 1, 1), out
    assert freed_alone < 8 and handed_back >= 40, out


def test_bursts_of_large_prompts_leave_the_memory_where_it_was(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Six bursts of 32 concurrent ~1 MiB prompts: after each, once the calls are over,
    RSS is back where the first left it. gRPC's threads and the worker threads each had a
    heap of their own, whose tops malloc_trim cannot give back: RSS crept up burst after
    burst."""
    daemon = start_daemon(*THREADS)
    pid = daemon.process.pid

    def settled() -> float:
        time.sleep(1.5)  # the trimmer runs half a second after the calls end
        return rss_mib(pid)

    assert asyncio.run(_big_prompts_at_once(daemon.addr, 32)) == ["INVALID_ARGUMENT"] * 32
    first = settled()
    after = []
    for _ in range(5):
        assert asyncio.run(_big_prompts_at_once(daemon.addr, 32)) == ["INVALID_ARGUMENT"] * 32
        after.append(settled())
    assert max(after) <= first + 2, f"RSS after the first burst {first:.0f} MiB, then {after}"
