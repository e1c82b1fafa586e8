"""Prefill with the prompt guard on and off, against llama-bench pp512, and the memory
a scored prompt takes.

One run interleaves rounds of: a 512-token prompt decoded by the engine with no prompt
guard, the same with `prompt_perplexity` on (every prompt position's logits reduced by
the fused kernel, at most SCORED_PER_DECODE positions per decode), and llama.cpp's
llama-bench pp512 (the ceiling: one batched prompt, no output but the last). Medians.
Then the peak RSS of a child process that scores a 2,000-token prompt, against one that
only decodes it: scoring must never hold n_prompt x n_vocab logits.

    .venv/bin/python bench/bench_prefill.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_bench_pp, median
from fse.core.engine import SCORED_PER_DECODE, Context, generate
from fse.core.gguf import default_model_path
from fse.core.model import Model
from fse.core.types import Sampling

TEXT = "Write a detailed history of the city of Lyon, from the Romans to today. " * 200
GREEDY = Sampling(temperature=0)


def prompt(model: Model, n: int) -> list[int]:
    tokens = model.tokenize(TEXT)
    if len(tokens) < n:
        raise RuntimeError(f"the text makes {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def prefill_tps(ctx: Context, tokens: Sequence[int], scored: bool) -> float:
    """Prompt tokens/s of one prefill (the first sampled token included, as pp is)."""
    judge = (lambda nll: False) if scored else None
    began = time.perf_counter()
    list(generate(ctx, tokens, GREEDY, 1, prompt_judge=judge))
    return len(tokens) / (time.perf_counter() - began)


def peak_rss_mib(n_tokens: int, scored: bool) -> float:
    """Peak RSS of a fresh process that prefills n_tokens (scoring them or not)."""
    code = (
        "import sys, resource; sys.path.insert(0, sys.argv[1]);"
        "import bench_prefill as b;"
        "b.child(int(sys.argv[2]), sys.argv[3] == '1');"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", code, here, str(n_tokens), "1" if scored else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1]) / 1024


def child(n_tokens: int, scored: bool) -> None:
    with Model(default_model_path()) as model, Context(model, n_ctx=n_tokens + 64) as ctx:
        prefill_tps(ctx, prompt(model, n_tokens), scored)


def measure(rounds: int = 3, threads: int = 2) -> dict[str, float]:
    path = default_model_path()
    off, on, ceiling = [], [], []
    with Model(path) as model, Context(model, n_ctx=1024, n_threads=threads) as ctx:
        tokens = prompt(model, 512)
        prefill_tps(ctx, tokens[:64], False)  # warm-up: page in the weights
        for _ in range(rounds):
            off.append(prefill_tps(ctx, tokens, False))
            on.append(prefill_tps(ctx, tokens, True))
            ceiling.extend(llama_bench_pp(path, threads, 512))
    rss_off, rss_on = peak_rss_mib(2000, False), peak_rss_mib(2000, True)
    return {
        "threads": threads,
        "scored_per_decode": SCORED_PER_DECODE,
        "prefill_off_tps": median(off),
        "prefill_on_tps": median(on),
        "llama_bench_pp512_tps": median(ceiling),
        "on_over_off": median(on) / median(off),
        "on_over_pp512": median(on) / median(ceiling),
        "off_over_pp512": median(off) / median(ceiling),
        "rss_2000_off_mib": rss_off,
        "rss_2000_on_mib": rss_on,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = measure(args.rounds, args.threads)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"prefill of 512 tokens, {args.threads} threads, median of {args.rounds} rounds")
    print(f"  guard off           {r['prefill_off_tps']:8.1f} tok/s")
    print(f"  guard on            {r['prefill_on_tps']:8.1f} tok/s")
    print(f"  llama-bench pp512   {r['llama_bench_pp512_tps']:8.1f} tok/s")
    print(f"  on / off {r['on_over_off']:.3f}; on / pp512 {r['on_over_pp512']:.3f}")
    off, on = r["rss_2000_off_mib"], r["rss_2000_on_mib"]
    print(f"peak RSS, 2,000-token prompt: off {off:.0f} MiB, on {on:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
