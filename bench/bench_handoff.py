"""The daemon at a GPU's rate: its own per-token work when the decode costs next to nothing.

On a GPU a decode step of 16 streams takes ~3 ms, and everything the daemon does around
it (scheduling, guards, waking the event loop, gRPC, the unix socket's relay, the
client) decides how much of the GPU's rate reaches the clients. On these CPUs the real
model's 20-80 ms steps hide that work, so this runs `fse serve` on a tiny random-weight
model (bench/tiny_model.py: one layer, 512-token vocabulary; a step of 16 streams
decodes in ~1.5 ms on one thread) with the decode on one thread, leaving the other
core to the event loop and the client as a GPU host leaves its cores, and N sampled
streams of --tokens tokens on the unix socket, every guard of `pro` on warn (as
bench_server.py). For each N, medians over --rounds fresh daemons:

- tokens/s the clients receive (llama-batched-bench's S_TG window, as bench_server.py);
- the decode thread's host time per step: wall time of the run minus the time inside
  llama_decode, per step (fse_decode_step_seconds from the daemon's metrics), i.e. what
  a GPU would wait on;
- CPU per token of the daemon's event loop thread (its main thread), of its other
  threads (the decode thread and llama.cpp's), and of the Python gRPC client.

    .venv/bin/python bench/bench_handoff.py [--rounds 3] [--streams 1,8,16] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model
from bench_daemon import free_port, thread_cpu_seconds
from bench_server import WARN_POLICY, fse_stream, window_tps
from common import wait_serving
from fse_client.v1 import fse_pb2_grpc


def decode_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of fse_decode_step_seconds from the daemon's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()

    def value(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{name} missing from the daemon's metrics")
        return float(match.group(1))

    return value("fse_decode_step_seconds_sum"), value("fse_decode_step_seconds_count")


def start(
    model: Path, n: int, tokens: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str, int]:
    policies = workdir / "policies"
    policies.mkdir(mode=0o755, exist_ok=True)
    (policies / "benchwarn.toml").write_text(WARN_POLICY)
    addr, metrics = f"unix:{workdir / 'fse.sock'}", free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "fse.cli", "serve", "--listen", addr, "--model", str(model)),
            *("--threads", "1", "--max-streams", str(n), "--ctx-per-stream", str(tokens + 64)),
            *("--policies-dir", str(policies), "--audit-log", str(workdir / "audit.jsonl")),
            *("--metrics-listen", f"127.0.0.1:{metrics}"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "fse.log").open("w"),
    )
    wait_serving(addr, process, workdir / "fse.log")
    return process, addr, metrics


async def measure(addr: str, pid: int, metrics: int, n: int, tokens: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        await asyncio.gather(*(fse_stream(stub, i + 1, 8) for i in range(n)))  # warm-up
        cpu0, client0 = thread_cpu_seconds(pid), time.process_time()
        dsum0, dcount0 = decode_seconds(metrics)
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(fse_stream(stub, i + 1, tokens) for i in range(n)))
        wall = time.perf_counter() - t0
        cpu1, client1 = thread_cpu_seconds(pid), time.process_time()
        dsum1, dcount1 = decode_seconds(metrics)
    received = sum(len(r) for r in runs)
    steps = dcount1 - dcount0
    loop = cpu1.get(pid, 0.0) - cpu0.get(pid, 0.0)
    other = sum(v - cpu0.get(t, 0.0) for t, v in cpu1.items() if t != pid)
    return {
        "tok_s": window_tps(list(runs)),
        "host_ms_per_step": 1e3 * (wall - (dsum1 - dsum0)) / steps,
        "decode_ms_per_step": 1e3 * (dsum1 - dsum0) / steps,
        "loop_us_per_token": 1e6 * loop / received,
        "decode_threads_us_per_token": 1e6 * other / received,
        "client_us_per_token": 1e6 * (client1 - client0) / received,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="1,8,16")
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    results: dict[int, list[dict[str, float]]] = {n: [] for n in streams}
    with tempfile.TemporaryDirectory(prefix="fse-bench-handoff-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        model = tiny_model.write(workdir / "tiny.gguf")
        for r in range(args.rounds):
            for n in streams:
                process, addr, metrics = start(model, n, args.tokens, workdir)
                try:
                    results[n].append(
                        asyncio.run(measure(addr, process.pid, metrics, n, args.tokens))
                    )
                finally:
                    process.terminate()
                    process.wait(30)
                print(f"round {r + 1}: x{n}: {results[n][-1]}", file=sys.stderr)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items()}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "tokens": args.tokens, "medians": med}, indent=2))
        return
    print(
        "| streams | tok/s | host ms / step | decode ms / step | event loop µs / token "
        "| decode thread µs / token | client µs / token |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, m in med.items():
        print(
            f"| {n} | {m['tok_s']:.0f} | {m['host_ms_per_step']:.3f} | "
            f"{m['decode_ms_per_step']:.3f} | {m['loop_us_per_token']:.0f} | "
            f"{m['decode_threads_us_per_token']:.0f} | {m['client_us_per_token']:.0f} |"
        )


if __name__ == "__main__":
    main()
