"""`fse serve` against llama.cpp's `llama-server`, N concurrent sampled streams.

Both servers are started fresh for each N (llama-server -np N -c 512*N -kvu -t T, fse
serve --max-streams N --ctx-per-stream 512 --threads T), warmed up with N short
streams, then N clients started together each ask for --tokens tokens of the same
prompt with llama.cpp's CLI sampling (T 0.8, top-k 40, top-p 0.95, min-p 0.05; seed =
client index + 1; llama-server with ignore_eos and no prompt cache; fse with a policy
that runs every guard of the built-in `pro` with action "warn", so that the guards
cost what they cost and no stream stops early). The clients share this process's
event loop: llama-server's over HTTP (its /completion SSE stream), fse's over gRPC on a
unix socket. The figure is the aggregate tokens/s while every stream generates: from
the moment the last stream has its first token to the moment the first one ends, as
llama-batched-bench's S_TG counts. Rounds are interleaved (every N and both servers in
a new random order each round) and the medians reported, with their ratio.

    .venv/bin/python bench/bench_server.py [--rounds 5] [--tokens 128] [--streams 1,4,8,16] [--json]

On a GPU machine, with a CUDA build and a model path, unchanged but for:

    --model M.gguf --server-args "-ngl 99" --fse-args "--gpu-layers all"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import free_port
from common import llama_tools_dir, wait_serving
from fse.core.gguf import default_model_path
from fse_client.v1 import fse_pb2, fse_pb2_grpc

PROMPT = "Tell me a long story about a lighthouse keeper and the ships she saved."
SAMPLING: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
CTX_PER_STREAM = 512
# `pro`, every guard set to warn: each guard runs, none stops a stream.
WARN_POLICY = """name = "benchwarn"
description = "pro with every guard on warn: for benchmarks only"
[guards.perplexity]
threshold = 400.0
window = 16
min_tokens = 4
action = "warn"
[guards.l2_norm]
threshold = 1e4
action = "warn"
[guards.logit_variance]
threshold = 0.1
action = "warn"
[guards.max_prob]
threshold = 0.99
consecutive = 8
action = "warn"
[guards.loop]
max_period = 1024
min_repeats = 3
min_span = 12
action = "warn"
[guards.near_loop]
max_period = 256
min_copies = 3
min_span = 24
min_match = 0.85
action = "warn"
[guards.prompt_perplexity]
threshold = 1000.0
window = 16
window_threshold = 5000.0
skip = 4
action = "warn"
"""


def window_tps(runs: list[list[float]]) -> float:
    """Tokens/s between the last stream's first token and the first stream's end."""
    first = max(r[0] for r in runs)
    last = min(r[-1] for r in runs)
    tokens = sum(sum(1 for t in r if first < t <= last) for r in runs)
    return tokens / (last - first) if last > first else 0.0


# -- llama-server ---------------------------------------------------------------


def start_llama_server(
    model: Path, n: int, threads: int, extra: list[str], workdir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(llama_tools_dir() / "llama-server"),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(n),
            "-c",
            str(CTX_PER_STREAM * n),
            "-kvu",
            "-t",
            str(threads),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "llama-server.log").open("w"),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama-server did not start; see {workdir / 'llama-server.log'}")
        time.sleep(0.05)


async def llama_server_stream(port: int, seed: int, n_tokens: int) -> list[float]:
    body = json.dumps(
        {
            "prompt": PROMPT,
            "n_predict": n_tokens,
            "seed": seed,
            "stream": True,
            "cache_prompt": False,
            "ignore_eos": True,
            **SAMPLING,
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    stamps: list[float] = []
    async for line in reader:
        if line.startswith(b"data: ") and b'"content"' in line:
            chunk = json.loads(line[6:])
            if not chunk.get("stop"):
                stamps.append(time.perf_counter())
    writer.close()
    return stamps


async def llama_server_round(port: int, n: int, n_tokens: int) -> float:
    await asyncio.gather(*(llama_server_stream(port, i + 1, 8) for i in range(n)))  # warm-up
    runs = await asyncio.gather(*(llama_server_stream(port, i + 1, n_tokens) for i in range(n)))
    return window_tps(list(runs))


# -- fse serve ------------------------------------------------------------------


def start_fse(
    model: Path, n: int, threads: int, extra: list[str], workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    policies = workdir / "policies"
    policies.mkdir(mode=0o755, exist_ok=True)
    (policies / "benchwarn.toml").write_text(WARN_POLICY)
    sock = workdir / "fse.sock"
    addr = f"unix:{sock}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fse.cli",
            "serve",
            "--listen",
            addr,
            "--model",
            str(model),
            "--threads",
            str(threads),
            "--max-streams",
            str(n),
            "--ctx-per-stream",
            str(CTX_PER_STREAM),
            "--policies-dir",
            str(policies),
            "--audit-log",
            str(workdir / "audit.jsonl"),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "fse.log").open("w"),
    )
    wait_serving(addr, process, workdir / "fse.log")
    return process, addr


async def fse_stream(stub: fse_pb2_grpc.GuardStub, seed: int, n_tokens: int) -> list[float]:
    start = fse_pb2.GenerateRequest(
        prompt=PROMPT,
        max_tokens=n_tokens,
        policy="benchwarn",
        sampling=fse_pb2.Sampling(seed=seed, **SAMPLING),
    )
    stamps: list[float] = []
    async for msg in stub.Generate(iter([fse_pb2.GenerateClientMessage(start=start)])):
        if msg.WhichOneof("kind") == "token":
            stamps.append(time.perf_counter())
    return stamps


async def fse_round(addr: str, n: int, n_tokens: int) -> float:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        await asyncio.gather(*(fse_stream(stub, i + 1, 8) for i in range(n)))  # warm-up
        runs = await asyncio.gather(*(fse_stream(stub, i + 1, n_tokens) for i in range(n)))
    return window_tps(list(runs))


# -- the run --------------------------------------------------------------------


def run_one(server: str, n: int, args: argparse.Namespace, workdir: Path) -> float:
    if server == "llama-server":
        process, port = start_llama_server(
            args.model, n, args.threads, shlex.split(args.server_args), workdir
        )
        measure = llama_server_round(port, n, args.tokens)
    else:
        process, addr = start_fse(args.model, n, args.threads, shlex.split(args.fse_args), workdir)
        measure = fse_round(addr, n, args.tokens)
    try:
        return asyncio.run(measure)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(args: argparse.Namespace) -> dict[str, object]:
    streams = [int(s) for s in args.streams.split(",")]
    tps: dict[str, dict[int, list[float]]] = {
        s: {n: [] for n in streams} for s in ("llama-server", "fse")
    }
    order = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fse-bench-server-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        for r in range(args.rounds):
            runs = [(server, n) for n in streams for server in tps]
            order.shuffle(runs)
            for server, n in runs:
                tps[server][n].append(run_one(server, n, args, workdir))
                print(
                    f"round {r + 1}: {server} x{n}: {tps[server][n][-1]:.1f} tok/s", file=sys.stderr
                )
    med = {s: {n: statistics.median(v) for n, v in by_n.items()} for s, by_n in tps.items()}
    return {
        "streams": streams,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "threads": args.threads,
        "fse_tps": med["fse"],
        "llama_server_tps": med["llama-server"],
        "ratio": {n: med["fse"][n] / med["llama-server"][n] for n in streams},
        "samples": tps,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="1,4,8,16", help="comma-separated stream counts")
    p.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded one)")
    p.add_argument("--server-args", default="", help="extra llama-server flags (-ngl 99)")
    p.add_argument("--fse-args", default="", help="extra fse serve flags (--gpu-layers all)")
    p.add_argument("--seed", type=int, default=1, help="of the round order")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.model = args.model or default_model_path()
    return args


def main() -> int:
    args = parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print("| streams | fse serve tok/s | llama-server tok/s | ratio |\n|---|---|---|---|")
    fse, server, ratio = result["fse_tps"], result["llama_server_tps"], result["ratio"]
    assert isinstance(fse, dict) and isinstance(server, dict) and isinstance(ratio, dict)
    for n in result["streams"]:  # type: ignore[attr-defined]
        print(f"| {n} | {fse[n]:.1f} | {server[n]:.1f} | {ratio[n]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
