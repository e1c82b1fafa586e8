"""A model split across RPC workers (docs/rpc.md) against the same model local.

Two `fse rpc-worker`s on loopback serve this host's CPU; each round runs, interleaved,
one greedy `fse generate --local` with the model local, across one worker (every layer
on it; the statistics on the host, the default, which brings every step's logits
across the link, and in llama.cpp's graph on the worker) and across both (the layers split between
them). The decode rate is read from
the token lines' arrival, prompt and load excluded: (n - 1) tokens between the first and
the last. Medians over rounds; the ratios to local are what to read (on one host the
workers add the RPC round trips, not another machine's compute).

    .venv/bin/python bench/bench_rpc.py [--rounds 5] [--tokens 128] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PROMPT
from common import median

FSE = [sys.executable, "-m", "fse.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """`fse rpc-worker` on a free loopback port, once it accepts connections."""
    port = _free_port()
    process = subprocess.Popen(
        [*FSE, "rpc-worker", "--listen", f"127.0.0.1:{port}", "--threads", str(threads)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fse rpc-worker did not start") from None
            time.sleep(0.05)


def tokens_per_second(
    workers: list[str], n_tokens: int, threads: int, graph_stats: str = "auto"
) -> float:
    """Decode rate of one greedy `fse generate --local`, across `workers` (none: local);
    `graph_stats` as --graph-stats (auto: in the graph with workers, on the host without)."""
    rpc = [x for w in workers for x in ("--rpc", w)]
    argv = [*FSE, "generate", "--local", "--json", "--temperature", "0", "--threads"]
    argv += [str(threads), "--max-tokens", str(n_tokens), "--graph-stats", graph_stats]
    argv += [*rpc, PROMPT]
    stamps = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if json.loads(line).get("type") == "token":
                stamps.append(time.perf_counter())
    if p.returncode != 0 or len(stamps) < n_tokens // 2:
        raise RuntimeError(f"fse generate ended with {p.returncode} after {len(stamps)} tokens")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(rounds: int = 5, n_tokens: int = 128, threads: int = 2) -> dict[str, object]:
    with ExitStack() as stack:
        workers = []
        for _ in range(2):
            process, address = start_worker(threads)
            stack.callback(process.wait)
            stack.callback(process.send_signal, signal.SIGTERM)
            workers.append(address)
        # one_worker_graph: the statistics in llama.cpp's graph, on the worker, so only
        # they come back; the others take the default (on the host: every step's logits,
        # 1 MiB, cross the link).
        setups = {
            "local": ([], "auto"),
            "one_worker": (workers[:1], "auto"),
            "one_worker_graph": (workers[:1], "on"),
            "two_workers": (workers, "auto"),
        }
        rates: dict[str, list[float]] = {name: [] for name in setups}
        for used, mode in setups.values():  # warm-up: page in the weights, connect once
            tokens_per_second(used, 16, threads, mode)
        for _ in range(rounds):
            for name, (used, mode) in setups.items():
                rates[name].append(tokens_per_second(used, n_tokens, threads, mode))
    local = median(rates["local"])
    one, two = median(rates["one_worker"]), median(rates["two_workers"])
    graph = median(rates["one_worker_graph"])
    return {
        "threads": threads,
        "tokens": n_tokens,
        "rounds": rounds,
        "local_tps": local,
        "one_worker_tps": one,
        "two_workers_tps": two,
        "one_worker_graph_tps": graph,
        "one_worker_over_local": one / local,
        "one_worker_graph_over_local": graph / local,
        "graph_over_host_one_worker": graph / one,
        "two_workers_over_local": two / local,
        "samples": rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.rounds, args.tokens, args.threads)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"RPC workers on loopback, greedy, {r['tokens']} tokens, {r['threads']} threads,")
    print(f"median of {r['rounds']} interleaved rounds:\n")
    print("| where the layers are | tokens/s | / local |\n|---|---|---|")
    print(f"| local | {r['local_tps']:.1f} | 1.000 |")
    print(f"| one worker | {r['one_worker_tps']:.1f} | {r['one_worker_over_local']:.3f} |")
    print(
        f"| one worker, statistics in the graph | {r['one_worker_graph_tps']:.1f} | "
        f"{r['one_worker_graph_over_local']:.3f} |"
    )
    print(f"| two workers | {r['two_workers_tps']:.1f} | {r['two_workers_over_local']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
