"""The spread of one aggregate point: daemon vs llama-batched-bench, repeated.

bench_daemon.py reports medians over rounds; this repeats a single parallelism
against one daemon, each repeat being two daemon runs and one llama-batched-bench
run back to back, to show how much one point moves on a shared host.

    .venv/bin/python bench/bench_aggregate.py [--parallel 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import daemon_aggregate, start_daemon, thread_cpu_seconds
from common import llama_batched_bench
from fse.core.gguf import default_model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    parser.add_argument(
        "--daemon-python",
        default=sys.executable,
        help="the python whose `-m fse.cli serve` to measure (another checkout's, to compare)",
    )
    args = parser.parse_args()
    path = default_model_path()
    ratios: list[float] = []
    loop_ms: list[float] = []  # CPU per step (one token of every stream)
    client_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        process, addr, _ = start_daemon(Path(tmp), args.threads, args.daemon_python)
        try:
            asyncio.run(daemon_aggregate(addr, args.parallel, 16))  # warm-up
            for _ in range(args.repeats):
                loop_before, client_before = thread_cpu_seconds(process.pid), os.times()
                runs = [
                    asyncio.run(daemon_aggregate(addr, args.parallel, args.tokens))
                    for _ in range(2)
                ]
                loop_after, client_after = thread_cpu_seconds(process.pid), os.times()
                # The event loop is the daemon's main thread (tid == pid).
                loop_ms.append(
                    1e3 * (loop_after[process.pid] - loop_before[process.pid]) / (2 * args.tokens)
                )
                client_cpu = (client_after.user + client_after.system) - (
                    client_before.user + client_before.system
                )
                client_ms.append(1e3 * client_cpu / (2 * args.tokens))
                ceiling = llama_batched_bench(path, args.threads, [args.parallel])[args.parallel]
                ratios.append(statistics.mean(runs) / ceiling)
                print(
                    f"daemon {runs[0]:.1f} {runs[1]:.1f} tok/s, llama-batched-bench -kvu "
                    f"{ceiling:.1f}, ratio {ratios[-1]:.3f}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait()
    print(
        f"{args.parallel} streams: median ratio {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats); "
        f"CPU per step: daemon event loop {statistics.median(loop_ms):.2f} ms, "
        f"Python client {statistics.median(client_ms):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
