"""The daemon against the in-process engine and against llama.cpp's batched ceiling.

One run measures, interleaved over rounds and reported as medians:
  - single-stream tokens/s through gRPC (unix socket) vs the in-process engine,
    in pairs run back to back in random order (the shared host drifts by 10% over
    minutes), with the CPU that the daemon's event loop and this client spend per
    token (on 2 cores it comes out of the decode's share);
  - the unix socket, which passes through the daemon's SO_PEERCRED relay, against
    loopback TCP, which does not (a third run in each pair, same order shuffle);
  - added latency per token: p50/p99 of the gap between consecutive tokens as the
    client sees them, daemon vs in-process;
  - aggregate tokens/s with 1, 2, 4, 8 concurrent streams vs llama-batched-bench
    at the same parallelism (prompt 32, 64 generated tokens per stream);
  - the largest token gap of a running stream while a 1 MiB prompt is refused;
  - time from process start to health SERVING, and the daemon's peak RSS.
Greedy decoding everywhere, as the llama.cpp tools do not sample.

    .venv/bin/python bench/bench_daemon.py [--rounds 3] [--pairs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_batched_bench, median, wait_serving
from fse.core.engine import Context
from fse.core.gguf import default_model_path
from fse.core.model import Model
from fse.core.policy import builtin_policy
from fse.core.runner import run_local
from fse.core.types import Request, Sampling, TokenEvent
from fse_client.v1 import fse_pb2, fse_pb2_grpc

PARALLEL = [1, 2, 4, 8]
SINGLE_PROMPT = "Write a detailed history of the city of Lyon, from the Romans to today."
# Distinct ~32-token prompts so every stream has its own prefix (no shared prompt).
TOPICS = ["Lyon", "Kyoto", "Lagos", "Quito", "Oslo", "Perth", "Cusco", "Hanoi"]


def batch_prompt(i: int) -> str:
    return (
        f"Stream {i}. Write a long, detailed and careful history of the city of "
        f"{TOPICS[i % len(TOPICS)]}, covering its founding, its trade, its people and "
        "its buildings, from the earliest records to today."
    )


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def in_process_gaps(model: Model, ctx: Context, n_tokens: int) -> list[float]:
    request = Request(prompt=SINGLE_PROMPT, max_tokens=n_tokens, sampling=Sampling(temperature=0))
    stamps = [
        time.perf_counter()
        for e in run_local(model, ctx, request, builtin_policy("default"))
        if isinstance(e, TokenEvent)
    ]
    return [b - a for a, b in itertools.pairwise(stamps)]


async def stream_stamps(
    stub: fse_pb2_grpc.GuardStub,
    prompt: str,
    n_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> list[float]:
    start = fse_pb2.GenerateRequest(
        prompt=prompt, max_tokens=n_tokens, sampling=fse_pb2.Sampling(temperature=0)
    )
    stamps: list[float] = []
    call = stub.Generate(iter([fse_pb2.GenerateClientMessage(start=start)]))
    async for msg in call:
        if msg.WhichOneof("kind") == "token":
            stamps.append(time.perf_counter())
            if on_token is not None:
                on_token(len(stamps))
    return stamps


async def bystander_gaps(addr: str, n_tokens: int = 150, at_token: int = 20) -> list[float]:
    """Token gaps of a running stream while the daemon refuses a 1 MiB prompt
    (too many tokens for the context, found only by tokenizing all of it)."""
    big = fse_pb2.GenerateClientMessage(
        start=fse_pb2.GenerateRequest(prompt="a " * (512 << 10), max_tokens=8)
    )
    refused: list[grpc.StatusCode] = []

    async def send_big(stub: fse_pb2_grpc.GuardStub) -> None:
        try:
            async for _ in stub.Generate(iter([big])):
                pass
        except grpc.aio.AioRpcError as exc:
            refused.append(exc.code())

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        tasks: list[asyncio.Task[None]] = []

        def fire(count: int) -> None:
            if count == at_token:
                tasks.append(asyncio.create_task(send_big(stub)))

        stamps = await stream_stamps(stub, SINGLE_PROMPT, n_tokens, fire)
        await asyncio.gather(*tasks)
    if refused != [grpc.StatusCode.INVALID_ARGUMENT]:
        raise RuntimeError(f"the 1 MiB prompt was not refused as expected: {refused}")
    return [b - a for a, b in itertools.pairwise(stamps)]


async def daemon_single_gaps(addr: str, n_tokens: int) -> list[float]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stamps = await stream_stamps(fse_pb2_grpc.GuardStub(channel), SINGLE_PROMPT, n_tokens)
    return [b - a for a, b in itertools.pairwise(stamps)]


async def daemon_aggregate(addr: str, parallel: int, n_tokens: int) -> float:
    """Generated tokens/s across streams while all of them generate (like S_TG).

    The window opens when the last stream has its first token (every prompt is in)
    and closes when the first stream ends: streams admitted a step apart would
    otherwise add a tail with fewer than `parallel` streams."""
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        runs = await asyncio.gather(
            *(stream_stamps(stub, batch_prompt(i), n_tokens) for i in range(parallel))
        )
    first = max(r[0] for r in runs)
    last = min(r[-1] for r in runs)
    tokens = sum(sum(1 for t in r if first < t <= last) for r in runs)
    return tokens / (last - first)


def start_daemon(
    workdir: Path, threads: int, python: str = sys.executable, also: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str, float]:
    """`python -m fse.cli serve` on a unix socket in workdir (and on the addresses in
    `also`), once it reports SERVING."""
    addr = f"unix:{workdir / 'bench.sock'}"
    began = time.perf_counter()
    process = subprocess.Popen(
        [
            python,
            "-m",
            "fse.cli",
            "serve",
            "--listen",
            addr,
            *(x for a in also for x in ("--listen", a)),
            "--threads",
            str(threads),
            "--max-streams",
            str(max(PARALLEL)),
            "--ctx-per-stream",
            "512",
            "--audit-log",
            str(workdir / "audit.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "daemon.log").open("w"),
    )
    wait_serving(addr, process, workdir / "daemon.log")
    return process, addr, time.perf_counter() - began


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system) of each live thread of a process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class SingleStream:
    """Interleaved single-stream runs: in-process engine vs the daemon through gRPC."""

    local_gaps: list[float] = field(default_factory=list)
    daemon_gaps: list[float] = field(default_factory=list)
    local_tps: list[float] = field(default_factory=list)
    daemon_tps: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # one per pair, from the same minute
    # The unix socket goes through the daemon's SO_PEERCRED relay, loopback TCP does not:
    # unix tokens/s over TCP tokens/s, one per pair, is what the relay costs.
    relay_ratios: list[float] = field(default_factory=list)
    loop_ms: list[float] = field(default_factory=list)  # daemon event-loop thread CPU per token
    client_ms: list[float] = field(default_factory=list)  # this process's CPU per token

    def pair(
        self,
        model: Model,
        ctx: Context,
        process: subprocess.Popen[bytes],
        addrs: tuple[str, str],
        n_tokens: int,
    ) -> None:
        """An in-process run, a daemon run on the unix socket and one on loopback TCP, in
        random order (the host drifts)."""
        addr, tcp_addr = addrs
        order = ["local", "daemon", "tcp"]
        random.shuffle(order)
        tps: dict[str, float] = {}
        for which in order:
            if which == "local":
                gaps = in_process_gaps(model, ctx, n_tokens)
                self.local_gaps += gaps
            elif which == "tcp":
                gaps = asyncio.run(daemon_single_gaps(tcp_addr, n_tokens))
            else:
                before, own = thread_cpu_seconds(process.pid), own_cpu_seconds()
                gaps = asyncio.run(daemon_single_gaps(addr, n_tokens))
                after, own = thread_cpu_seconds(process.pid), own_cpu_seconds() - own
                self.daemon_gaps += gaps
                # The main thread runs the asyncio loop: gRPC, protobuf, the handoff.
                loop = after[process.pid] - before.get(process.pid, 0.0)
                self.loop_ms.append(1e3 * loop / n_tokens)
                self.client_ms.append(1e3 * own / n_tokens)
            tps[which] = len(gaps) / sum(gaps)
        self.local_tps.append(tps["local"])
        self.daemon_tps.append(tps["daemon"])
        self.ratios.append(tps["daemon"] / tps["local"])
        self.relay_ratios.append(tps["daemon"] / tps["tcp"])


def measure(
    rounds: int = 3, n_tokens: int = 128, threads: int = 2, pairs: int = 5
) -> dict[str, object]:
    path = default_model_path()
    single = SingleStream()
    aggregate: dict[int, list[float]] = {p: [] for p in PARALLEL}
    ceiling: dict[int, list[float]] = {p: [] for p in PARALLEL}
    ceiling_split: dict[int, list[float]] = {p: [] for p in PARALLEL}
    serving: list[float] = []
    rss: list[float] = []
    bystander: list[float] = []
    rss_refusal: list[float] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            tcp_addr = f"127.0.0.1:{free_port()}"
            process, addr, seconds = start_daemon(Path(tmp), threads, also=(tcp_addr,))
            try:
                serving.append(seconds)
                with Model(path) as model, Context(model, n_ctx=1024, n_threads=threads) as ctx:
                    in_process_gaps(model, ctx, 16)  # warm-up
                    asyncio.run(daemon_single_gaps(addr, 16))
                    for _ in range(pairs):
                        single.pair(model, ctx, process, (addr, tcp_addr), n_tokens)
                for p in PARALLEL:
                    aggregate[p].append(asyncio.run(daemon_aggregate(addr, p, 64)))
                # Peak RSS of serving, taken before the 1 MiB refusal below,
                # whose transient buffers are reported on their own.
                rss.append(peak_rss_mib(process.pid))
                bystander.append(max(asyncio.run(bystander_gaps(addr))))
                rss_refusal.append(peak_rss_mib(process.pid) - rss[-1])
            finally:
                process.terminate()
                process.wait()
        for p, tps in llama_batched_bench(path, threads, PARALLEL).items():
            ceiling[p].append(tps)
        for p, tps in llama_batched_bench(path, threads, PARALLEL, unified_kv=False).items():
            ceiling_split[p].append(tps)
    model_mib = path.stat().st_size / 2**20
    return {
        "threads": threads,
        "rounds": rounds,
        "pairs": len(single.ratios),
        "single_in_process_tps": median(single.local_tps),
        "single_daemon_tps": median(single.daemon_tps),
        "single_ratio": median(single.ratios),
        "single_ratio_quartiles": statistics.quantiles(single.ratios, n=4),
        "relay_ratio": median(single.relay_ratios),
        "daemon_loop_cpu_ms_per_token": median(single.loop_ms),
        "client_cpu_ms_per_token": median(single.client_ms),
        "gap_ms_in_process": {
            "p50": 1e3 * percentile(single.local_gaps, 50),
            "p99": 1e3 * percentile(single.local_gaps, 99),
        },
        "gap_ms_daemon": {
            "p50": 1e3 * percentile(single.daemon_gaps, 50),
            "p99": 1e3 * percentile(single.daemon_gaps, 99),
        },
        "aggregate_tps": {p: median(v) for p, v in aggregate.items()},
        "batched_bench_tps": {p: median(v) for p, v in ceiling.items()},
        "batched_bench_split_kv_tps": {p: median(v) for p, v in ceiling_split.items()},
        "aggregate_ratio": {p: median(aggregate[p]) / median(ceiling[p]) for p in PARALLEL},
        "seconds_to_serving": median(serving),
        "bystander_max_gap_ms": 1e3 * median(bystander),
        "peak_rss_mib": median(rss),
        "model_file_mib": model_mib,
        "rss_over_model_mib": median(rss) - model_mib,
        "peak_rss_added_by_1mib_refusal_mib": median(rss_refusal),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=5, help="single-stream pairs per round")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.rounds, args.tokens, args.threads, args.pairs)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"daemon, {r['threads']} threads, greedy, median of {r['rounds']} rounds")
    q = r["single_ratio_quartiles"]
    assert isinstance(q, list)
    print(
        f"  single stream: daemon {r['single_daemon_tps']:.1f} tok/s, in-process "
        f"{r['single_in_process_tps']:.1f} tok/s, ratio {r['single_ratio']:.3f} "
        f"(median of {r['pairs']} interleaved pairs, quartiles {q[0]:.3f}..{q[2]:.3f}; "
        "target >= 0.97)"
    )
    print(f"  unix socket (through the SO_PEERCRED relay) / loopback TCP: {r['relay_ratio']:.3f}")
    print(
        f"  CPU per token beside the decode: daemon event loop "
        f"{r['daemon_loop_cpu_ms_per_token']:.2f} ms, Python gRPC client "
        f"{r['client_cpu_ms_per_token']:.2f} ms"
    )
    gi, gd = r["gap_ms_in_process"], r["gap_ms_daemon"]
    assert isinstance(gi, dict) and isinstance(gd, dict)
    print(
        f"  token gap p50/p99: in-process {gi['p50']:.2f}/{gi['p99']:.2f} ms, daemon "
        f"{gd['p50']:.2f}/{gd['p99']:.2f} ms, added {gd['p50'] - gi['p50']:+.2f}/"
        f"{gd['p99'] - gi['p99']:+.2f} ms"
    )
    agg, ceil, ratio = r["aggregate_tps"], r["batched_bench_tps"], r["aggregate_ratio"]
    split = r["batched_bench_split_kv_tps"]
    assert isinstance(agg, dict) and isinstance(ceil, dict) and isinstance(ratio, dict)
    assert isinstance(split, dict)
    for p in PARALLEL:
        print(
            f"  {p} streams: daemon {agg[p]:6.1f} tok/s, llama-batched-bench -kvu {ceil[p]:6.1f} "
            f"(per-sequence KV {split[p]:6.1f}), ratio {ratio[p]:.3f} (target >= 0.9)"
        )
    print(
        "  largest token gap of a running stream while a 1 MiB prompt is refused: "
        f"{r['bystander_max_gap_ms']:.0f} ms "
        f"(peak RSS +{r['peak_rss_added_by_1mib_refusal_mib']:.0f} MiB)"
    )
    print(
        f"  start to SERVING {r['seconds_to_serving']:.2f} s; peak RSS {r['peak_rss_mib']:.0f} MiB "
        f"= model file {r['model_file_mib']:.0f} MiB + {r['rss_over_model_mib']:.0f} MiB "
        "(target <= +250)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
