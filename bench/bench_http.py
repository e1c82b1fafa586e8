"""The OpenAI-compatible HTTP API against gRPC, on one daemon: streamed tokens/s.

One run measures, interleaved over rounds and reported as medians:
  - one stream: tokens/s of a greedy stream (server-sent events through aiohttp's
    client, each `data:` line parsed as JSON) against the same stream over gRPC
    (grpc.aio, each message parsed by protobuf), both over loopback TCP, in pairs run
    back to back in random order (the shared host drifts);
  - 8 streams: aggregate tokens/s while all 8 generate (the window of bench_daemon's
    aggregate: from the last stream's first token to the first stream's last), HTTP
    against gRPC, in pairs likewise.
Greedy decoding, 2 threads, the daemon's default policy; the same prompts on both doors.

    .venv/bin/python bench/bench_http.py [--rounds 3] [--pairs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import SINGLE_PROMPT, batch_prompt, free_port, stream_stamps
from common import median, wait_serving
from fse_client.v1 import fse_pb2_grpc

PARALLEL = [1, 8]


def start_daemon(workdir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str, str]:
    """`python -m fse.cli serve` with gRPC on loopback TCP (and the unix socket its
    health is checked on) and the HTTP API on loopback: (process, gRPC address, HTTP
    base URL), once SERVING."""
    unix = f"unix:{workdir / 'bench.sock'}"
    grpc_addr = f"127.0.0.1:{free_port()}"
    http_port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "fse.cli", "serve",
            "--listen", unix, "--listen", grpc_addr,
            "--http-listen", f"127.0.0.1:{http_port}",
            "--threads", str(threads),
            "--max-streams", str(max(PARALLEL)),
            "--ctx-per-stream", "512",
            "--audit-log", str(workdir / "audit.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "daemon.log").open("w"),
    )  # fmt: skip
    wait_serving(unix, process, workdir / "daemon.log")
    return process, grpc_addr, f"http://127.0.0.1:{http_port}/v1"


async def http_stamps(session: aiohttp.ClientSession, url: str, prompt: str, n: int) -> list[float]:
    """A streamed greedy completion: the arrival time of each token's event."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    stamps: list[float] = []
    async with session.post(f"{url}/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            doc = json.loads(line[6:])
            if "fse" in doc:
                stamps.append(time.perf_counter())
            elif "error" in doc:
                raise RuntimeError(f"stream error: {doc['error']}")
    if len(stamps) != n:
        raise RuntimeError(f"{len(stamps)} tokens of {n}: the stream ended early")
    return stamps


async def grpc_stamps(addr: str, prompts: list[str], n: int) -> list[list[float]]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        return list(await asyncio.gather(*(stream_stamps(stub, p, n) for p in prompts)))


async def http_runs(url: str, prompts: list[str], n: int) -> list[list[float]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        return list(await asyncio.gather(*(http_stamps(session, url, p, n) for p in prompts)))


def tokens_per_second(runs: list[list[float]]) -> float:
    """One stream: tokens after the first over their time. Several: bench_daemon's
    window, while every stream generates."""
    if len(runs) == 1:
        (stamps,) = runs
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])
    first = max(r[0] for r in runs)
    last = min(r[-1] for r in runs)
    tokens = sum(sum(1 for t in r if first < t <= last) for r in runs)
    return tokens / (last - first)


def prompts_for(parallel: int) -> list[str]:
    return [SINGLE_PROMPT] if parallel == 1 else [batch_prompt(i) for i in range(parallel)]


def measure(
    rounds: int = 3, pairs: int = 3, threads: int = 2, n_tokens: int = 128
) -> dict[str, object]:
    tps: dict[str, dict[int, list[float]]] = {"http": {}, "grpc": {}}
    ratios: dict[int, list[float]] = {p: [] for p in PARALLEL}
    for door in tps:
        tps[door] = {p: [] for p in PARALLEL}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            process, grpc_addr, url = start_daemon(Path(tmp), threads)
            try:
                asyncio.run(grpc_stamps(grpc_addr, [SINGLE_PROMPT], 16))  # warm-up
                asyncio.run(http_runs(url, [SINGLE_PROMPT], 16))
                for _ in range(pairs):
                    for parallel in PARALLEL:
                        prompts = prompts_for(parallel)
                        n = n_tokens if parallel == 1 else 64
                        order = ["http", "grpc"]
                        random.shuffle(order)
                        got: dict[str, float] = {}
                        for door in order:
                            if door == "http":
                                runs = asyncio.run(http_runs(url, prompts, n))
                            else:
                                runs = asyncio.run(grpc_stamps(grpc_addr, prompts, n))
                            got[door] = tokens_per_second(runs)
                            tps[door][parallel].append(got[door])
                        ratios[parallel].append(got["http"] / got["grpc"])
            finally:
                process.terminate()
                process.wait()
    return {
        "threads": threads,
        "rounds": rounds,
        "pairs": pairs * rounds,
        "http_tps": {p: median(v) for p, v in tps["http"].items()},
        "grpc_tps": {p: median(v) for p, v in tps["grpc"].items()},
        "ratio": {p: median(v) for p, v in ratios.items()},
        "ratio_quartiles": {
            p: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for p, v in ratios.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3, help="pairs per round and parallelism")
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the single stream")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.rounds, args.pairs, args.threads, args.tokens)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"HTTP API vs gRPC, {r['threads']} threads, greedy, loopback TCP, medians of "
        f"{r['pairs']} interleaved pairs over {r['rounds']} rounds"
    )
    http, grpc_tps, ratio, q = r["http_tps"], r["grpc_tps"], r["ratio"], r["ratio_quartiles"]
    assert isinstance(http, dict) and isinstance(grpc_tps, dict)
    assert isinstance(ratio, dict) and isinstance(q, dict)
    for p in PARALLEL:
        print(
            f"  {p} stream{'s' if p > 1 else ''}: HTTP {http[p]:6.1f} tok/s, gRPC "
            f"{grpc_tps[p]:6.1f} tok/s, HTTP/gRPC {ratio[p]:.3f} (quartiles "
            f"{q[p][0]:.3f}..{q[p][2]:.3f}; target >= 0.97)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
