"""The guarded scheduler in process against llama-batched-bench -kvu, at 1, 4, 8, 16 streams.

The daemon's own scheduler (fse.serve.service.GuardService, exactly as `fse serve` runs
it, without gRPC: what the engine does stepping N slots) generates N greedy streams of
--tokens tokens from a 32-token prompt, with every guard of `pro` on warn (as
bench_server.py), and the clients' tokens/s are taken over llama-batched-bench's S_TG
window (from the last stream's first token to the first stream's end).
llama-batched-bench -kvu measures the same model with -npp 32 -ntg TOKENS -npl N, no
sampling, no guards: the ceiling. Every N and both sides in a new random order each
round; medians and their ratio.

    .venv/bin/python bench/bench_batched.py [--rounds 3] [--streams 1,4,8,16] [--json]

On a GPU machine, with a CUDA build and a model path, unchanged but for:

    --model M.gguf --llama-args "-ngl 99"

(the engine offloads every layer by itself where a GPU is present; `--gpu-layers` says
otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import WARN_POLICY, window_tps
from common import llama_batched_bench
from fse.core.gguf import default_model_path
from fse.core.model import Model, parse_gpu_layers
from fse.core.policy import builtin_policy, parse_policy
from fse.core.types import Request, Sampling, TokenEvent
from fse.serve.scheduler import Limits
from fse.serve.service import GuardService

N_PROMPT = 32  # llama-batched-bench's -npp; the prompt is cut or padded to it
PROMPT = (
    "Write a detailed history of the city of Lyon, from the Romans to today, with its "
    "silk weavers, its bridges, its printers and its food."
)


def prompt_of(model: Model) -> str:
    """PROMPT cut to N_PROMPT tokens (with BOS), as the text those tokens stand for."""
    tokens = model.tokenize(PROMPT)[:N_PROMPT]
    return model.detokenize([t for t in tokens if not model.is_end_of_generation(t)][1:])


async def stream(service: GuardService, prompt: str, n_tokens: int) -> list[float]:
    request = Request(
        prompt=prompt, max_tokens=n_tokens, sampling=Sampling(temperature=0), policy="benchwarn"
    )
    handle = service.admit(service.prepare(request), client="bench")
    stamps: list[float] = []
    while isinstance(await handle.events.get(), TokenEvent):
        stamps.append(time.perf_counter())
    return stamps


def scheduler_tps(model: Model, n: int, args: argparse.Namespace) -> float:
    policies = {"default": builtin_policy("default"), "benchwarn": parse_policy(WARN_POLICY)}
    service = GuardService(
        model,
        policies,
        Limits(max_streams=n, max_queue=0, ctx_per_stream=N_PROMPT + args.tokens + 8),
        n_threads=args.threads,
    )
    service.start()
    prompt = prompt_of(model)

    async def run() -> float:
        await asyncio.gather(*(stream(service, prompt, 8) for _ in range(n)))  # warm-up
        runs = await asyncio.gather(*(stream(service, prompt, args.tokens) for _ in range(n)))
        return window_tps(list(runs))

    try:
        return asyncio.run(run())
    finally:
        service.shutdown(30)


def measure(args: argparse.Namespace) -> dict[str, object]:
    streams = [int(s) for s in args.streams.split(",")]
    model = Model(args.model, gpu_layers=args.gpu_layers)
    tps: dict[str, dict[int, list[float]]] = {s: {n: [] for n in streams} for s in ("fse", "llama")}
    order = random.Random(args.seed)
    for r in range(args.rounds):
        runs = [(side, n) for n in streams for side in tps]
        order.shuffle(runs)
        for side, n in runs:
            if side == "fse":
                value = scheduler_tps(model, n, args)
            else:
                value = llama_batched_bench(
                    args.model, args.threads, [n], N_PROMPT, args.tokens, extra=args.llama_args
                )[n]
            tps[side][n].append(value)
            print(f"round {r + 1}: {side} x{n}: {value:.1f} tok/s", file=sys.stderr)
    med = {s: {n: statistics.median(v) for n, v in by_n.items()} for s, by_n in tps.items()}
    return {
        "streams": streams,
        "tokens": args.tokens,
        "rounds": tps,
        "median_tps": med,
        "ratio": {n: med["fse"][n] / med["llama"][n] for n in streams},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="1,4,8,16", help="comma-separated stream counts")
    p.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded one)")
    p.add_argument("--gpu-layers", type=parse_gpu_layers, default="auto")
    p.add_argument("--llama-args", type=shlex.split, default=[], help='extra flags ("-ngl 99")')
    p.add_argument("--seed", type=int, default=1, help="of the round order")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.model = args.model or default_model_path()
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    med, ratio = result["median_tps"], result["ratio"]
    assert isinstance(med, dict) and isinstance(ratio, dict)
    print("| streams | scheduler tok/s | llama-batched-bench -kvu S_TG | scheduler / llama |")
    print("|---|---|---|---|")
    for n in result["streams"]:  # type: ignore[attr-defined]
        print(f"| {n} | {med['fse'][n]:.1f} | {med['llama'][n]:.1f} | {ratio[n]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
