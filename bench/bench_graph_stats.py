"""Per-step cost of the host kernel against the graph statistics, on this machine's backend.

Both paths run the same greedy generation of one stream through the engine: the host
path (the default) copies each step's n_vocab logits out of llama.cpp and measures them
with the fused C kernel (Context.sample); the graph path (`Context(graph_stats=True)`,
native/fse_graph_stats.c) adds the statistics to the decode graph and reads back 9 floats
and the token. So on the graph path the statistics cost sits inside the decode, and on
the host path inside the sample: each step is timed as both, and as their sum. Rounds
alternate between the two paths (one context each, kept for the whole run, a new slot
per round); figures are medians over every step of every round, tokens/s the median of
the rounds' rates (the prompt excluded).

On ggml's CPU backend the logits are already in host memory, so the graph path only
moves the kernel's work into ggml ops that make more passes over the vector (and
llama.cpp pads the logits into a copy before its samplers): expect it to lose there. It
is for GPU backends, where it removes the 1 MiB per stream per step copy.

    .venv/bin/python bench/bench_graph_stats.py [--rounds 5] [--tokens 64] [--json]

On a GPU machine, unchanged but for `--model M.gguf` (every layer is offloaded there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fse._native import lib
from fse.core.engine import Context, Slot
from fse.core.gguf import default_model_path
from fse.core.model import Model
from fse.core.types import Sampling

PROMPT = "Write a detailed history of the city of Lyon, from the Romans to today."
GREEDY = Sampling(temperature=0)


def one_round(ctx: Context, prompt: list[int], n_tokens: int) -> tuple[list[float], ...]:
    """Per step: the decode's and the sample's seconds; and the round's tokens/s."""
    decode_s, sample_s = [], []
    with Slot(ctx, 0, GREEDY) as slot:
        assert slot.graph_stats == ctx.graph_stats
        slot.start(prompt)
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
        start = time.perf_counter()
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            step = slot.sample()
            t1 = time.perf_counter()
            slot.queue_token(step.metrics.token)
            ctx.decode()
            t2 = time.perf_counter()
            sample_s.append(t1 - t0)
            decode_s.append(t2 - t1)
        rate = n_tokens / (time.perf_counter() - start)
    return decode_s, sample_s, [rate]


def measure(
    rounds: int = 5, n_tokens: int = 64, threads: int = 2, path: Path | None = None
) -> dict[str, object]:
    if not lib.fse_graph_stats_available():
        raise SystemExit("this llama.cpp has no backend sampling API: nothing to compare")
    runs: dict[str, list[list[float]]] = {"host": [[], [], []], "graph": [[], [], []]}
    with (
        Model(path or default_model_path()) as model,
        Context(model, n_ctx=1024, n_threads=threads) as host,
        Context(model, n_ctx=1024, n_threads=threads, graph_stats=True) as graph,
    ):
        device = f"{model.gpu_layers} layers on a GPU" if model.gpu_layers else "CPU"
        prompt = model.tokenize(PROMPT)
        for ctx in (host, graph):  # warm-up: page in the weights, reserve the graphs
            one_round(ctx, prompt, 8)
        for _ in range(rounds):
            for name, ctx in (("host", host), ("graph", graph)):
                for acc, got in zip(runs[name], one_round(ctx, prompt, n_tokens), strict=True):
                    acc.extend(got)
    out: dict[str, object] = {"threads": threads, "tokens": n_tokens, "rounds": rounds}
    out["device"] = device
    for name, (decode_s, sample_s, rates) in runs.items():
        steps = [d + s for d, s in zip(decode_s, sample_s, strict=True)]
        out[f"{name}_decode_ms"] = statistics.median(decode_s) * 1e3
        out[f"{name}_sample_us"] = statistics.median(sample_s) * 1e6
        out[f"{name}_step_ms"] = statistics.median(steps) * 1e3
        out[f"{name}_tps"] = statistics.median(rates)
    out["graph_over_host_tps"] = float(out["graph_tps"]) / float(out["host_tps"])  # type: ignore[arg-type]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.rounds, args.tokens, args.threads, args.model)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"one stream, greedy, {r['threads']} threads, {r['tokens']} tokens x {r['rounds']} "
        f"rounds per path (interleaved), medians; device: {r['device']}"
    )
    print("  path    decode ms   sample us   step ms   tokens/s")
    for name in ("host", "graph"):
        print(
            f"  {name:6s} {r[f'{name}_decode_ms']:9.2f} {r[f'{name}_sample_us']:11.1f} "
            f"{r[f'{name}_step_ms']:9.2f} {r[f'{name}_tps']:10.1f}"
        )
    print(f"  graph / host tokens/s: {r['graph_over_host_tps']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
