"""Guarded engine throughput against the same engine unguarded and against llama-bench.

One run interleaves rounds of: the in-process engine under the `pro` policy
(every guard on), the same engine with only the always-on non_finite guard, and
llama.cpp's own llama-bench tg (no sampling, no guards: the ceiling). Greedy
decoding, so the engine samples with the kernel's argmax exactly as llama-bench
does not sample at all. Medians over rounds; the ratios are what to read.

    .venv/bin/python bench/bench_engine.py [--rounds 5] [--tokens 128] [--json]

On a GPU machine, with a CUDA build and a model path, unchanged but for:

    --model M.gguf --llama-args "-ngl 99"

(the engine offloads every layer by itself where a GPU is present, and takes the
graph statistics path there; the guarded run uses `pro` with every guard on warn, so a
random-weight model's noise does not end it early).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import WARN_POLICY
from common import llama_bench_tg, median
from fse.core.engine import Context
from fse.core.gguf import default_model_path
from fse.core.model import Model, devices
from fse.core.placement import graph_stats_for, place_model
from fse.core.policy import Policy, parse_policy
from fse.core.runner import run_local
from fse.core.types import Request, Sampling, TokenEvent

# Greedy continuations of this prompt neither loop nor end early within 128 tokens.
PROMPT = "Write a detailed history of the city of Lyon, from the Romans to today."


def engine_tokens_per_second(model: Model, ctx: Context, policy: Policy, n_tokens: int) -> float:
    """Decode rate of one guarded generation, prompt excluded: (n - 1) steps between
    the first and the last released token."""
    request = Request(prompt=PROMPT, max_tokens=n_tokens, sampling=Sampling(temperature=0))
    stamps = [
        time.perf_counter()
        for event in run_local(model, ctx, request, policy)
        if isinstance(event, TokenEvent)
    ]
    if len(stamps) < n_tokens // 2:
        raise RuntimeError(f"generation stopped after {len(stamps)} tokens; pick another prompt")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(
    rounds: int = 5,
    n_tokens: int = 128,
    threads: int = 2,
    path: Path | None = None,
    llama_args: list[str] | None = None,
) -> dict[str, float]:
    path = path or default_model_path()
    guarded, unguarded, ceiling = [], [], []
    pro = parse_policy(WARN_POLICY)
    bare = Policy(name="non-finite-only")
    with Model(path) as model:
        # As the daemon chooses: the graph statistics where a local GPU holds the layers.
        graph = graph_stats_for("auto", place_model(model, devices()))
        with Context(model, n_ctx=1024, n_threads=threads, graph_stats=graph) as ctx:
            engine_tokens_per_second(model, ctx, pro, 16)  # warm-up: page in the weights
            for _ in range(rounds):
                guarded.append(engine_tokens_per_second(model, ctx, pro, n_tokens))
                unguarded.append(engine_tokens_per_second(model, ctx, bare, n_tokens))
                ceiling.extend(llama_bench_tg(path, threads, 64, 1, llama_args or []))
    g, u, c = median(guarded), median(unguarded), median(ceiling)
    return {
        "threads": threads,
        "tokens": n_tokens,
        "rounds": rounds,
        "guarded_tps": g,
        "unguarded_tps": u,
        "llama_bench_tps": c,
        "guarded_over_unguarded": g / u,
        "guarded_over_llama_bench": g / c,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded one)")
    parser.add_argument(
        "--llama-args", type=shlex.split, default=[], help='for llama-bench ("-ngl 99")'
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.rounds, args.tokens, args.threads, args.model, args.llama_args)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"engine throughput, {r['threads']} threads, greedy, {r['tokens']} tokens, "
        f"median of {r['rounds']} rounds"
    )
    print(f"  guarded (pro, warn)    {r['guarded_tps']:7.1f} tok/s")
    print(f"  non_finite only        {r['unguarded_tps']:7.1f} tok/s")
    print(f"  llama-bench tg64       {r['llama_bench_tps']:7.1f} tok/s")
    print(f"  guarded / unguarded    {r['guarded_over_unguarded']:7.3f}   (target >= 0.98)")
    print(f"  guarded / llama-bench  {r['guarded_over_llama_bench']:7.3f}   (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
