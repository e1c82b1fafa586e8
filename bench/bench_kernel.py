"""Time the fused C logit-statistics kernel against numpy computing the same statistics,
and the near_loop guard's detector per token.

Both compute, over one step's float32 logits: max, argmax, logsumexp, mean,
variance, L2 norm and the count of non-finite values. The kernel is called the
way the engine calls it: on a pointer to logits that already exist, with a
preallocated result struct. Each figure is the median over repeats of the mean
time per call over many calls.

The near-loop detector (native/fse_near_loop.c) is called as the guard calls it, one
cffi call per token with a preallocated out-parameter, on a stream without loops (every
lag is updated on every push, whatever the stream: there is no early exit).

    python bench/bench_kernel.py              # table
    python bench/bench_kernel.py --json       # {"kernel_us": ..., "numpy_us": ..., "ratio": ...,
                                              #  "near_loop_256_us": ..., "near_loop_1024_us": ...}
    python bench/bench_kernel.py --near-loop  # the near-loop part only

ratio is numpy_us / kernel_us: how many times faster the kernel is.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from fse._native import ffi, lib

Floats = npt.NDArray[np.float32]
Stats = tuple[float, int, float, float, float, float, int]


def realistic_logits(n: int, seed: int = 0) -> Floats:
    """N(0, 5) with a few strong candidates on top, like a language model's logits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 5.0, n).astype(np.float32)
    peaks = rng.choice(n, size=min(n, 5), replace=False)
    x[peaks] = rng.uniform(20.0, 30.0, peaks.size).astype(np.float32)
    return x


def kernel_caller(x: Floats) -> Callable[[], Stats]:
    """One kernel call on x, plus reading the result fields, as the engine does."""
    ptr = ffi.cast("float *", ffi.from_buffer(x))
    out = ffi.new("fse_logit_stats *")
    n = int(x.size)
    compute = lib.fse_logit_stats_compute

    def call() -> Stats:
        compute(ptr, n, out)
        return (
            out.max_logit,
            out.argmax,
            out.logsumexp,
            out.mean,
            out.variance,
            out.l2_norm,
            out.n_nonfinite,
        )

    return call


class NumpyStats:
    """The same statistics in numpy at its best: float32 exp, float64 moments.

    Scratch arrays are allocated once: fresh 1-2 MiB temporaries on every call
    would add page faults (here they triple numpy's time) and flatter the kernel.
    """

    def __init__(self, n: int) -> None:
        self.finite = np.empty(n, dtype=np.bool_)
        self.f32 = np.empty(n, dtype=np.float32)
        self.f64 = np.empty(n, dtype=np.float64)
        self.dev = np.empty(n, dtype=np.float64)

    def __call__(self, x: Floats) -> Stats:
        finite = np.isfinite(x, out=self.finite[: x.size])
        n_nonfinite = int(x.size - np.count_nonzero(finite))
        v = x if n_nonfinite == 0 else x[finite]
        m = v.size
        argmax = int(np.argmax(v))
        top = v[argmax]
        if n_nonfinite:
            argmax = int(np.flatnonzero(finite)[argmax])
        e = np.subtract(v, top, out=self.f32[:m])
        logsumexp = float(top) + math.log(float(np.exp(e, out=e).sum()))
        v64 = self.f64[:m]
        v64[:] = v
        mean = float(v64.mean())
        dev = np.subtract(v64, mean, out=self.dev[:m])
        variance = float(np.einsum("i,i->", dev, dev)) / m  # einsum: no BLAS threads
        l2_norm = math.sqrt(float(np.einsum("i,i->", v64, v64)))
        return (float(top), argmax, logsumexp, mean, variance, l2_norm, n_nonfinite)


def time_per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over repeats of the mean time per call, in microseconds."""
    fn()  # warm caches and lazy initialisation
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(samples)


def check_agreement(got: Stats, want: Stats) -> None:
    """A benchmark of wrong answers is worthless: the two must agree first."""
    if got[1] != want[1] or got[6] != want[6] or got[0] != want[0]:
        raise AssertionError(f"kernel {got} != numpy {want}")
    for g, w in zip(got[2:6], want[2:6], strict=True):
        if not math.isclose(g, w, rel_tol=1e-5):
            raise AssertionError(f"kernel {got} != numpy {want}")


def measure(
    n: int = 262_144, calls: int = 500, repeats: int = 15, seed: int = 0
) -> dict[str, float]:
    """Per-call time of the kernel and of numpy on n realistic logits, in microseconds."""
    x = realistic_logits(n, seed)
    kernel = kernel_caller(x)
    numpy_stats = NumpyStats(n)
    check_agreement(kernel(), numpy_stats(x))
    kernel_us = time_per_call_us(kernel, calls, repeats)
    numpy_us = time_per_call_us(lambda: numpy_stats(x), max(5, calls // 20), repeats)
    return {
        "kernel_us": round(kernel_us, 2),
        "numpy_us": round(numpy_us, 2),
        "ratio": round(numpy_us / kernel_us, 2),
    }


NEAR_LOOP_PERIODS = (256, 1024)


def near_loop_caller(max_period: int, n: int = 1000, seed: int = 0) -> Callable[[], None]:
    """Push n tokens of a loop-free stream (ids from a 262,144 vocabulary) into one detector
    with near_loop's defaults but max_period, as the guard's closure does."""
    rng = np.random.default_rng(seed)
    # Each call pushes the next n tokens of a pool that repeats only after 10,007 tokens,
    # beyond any window the detector looks at (4 x 1024 at most here).
    pool = [int(t) for t in rng.integers(0, 262_144, 10_007)]
    doubled = pool + pool[:n]
    handle = ffi.gc(lib.fse_near_loop_new(max_period, 3, 24, 0.85), lib.fse_near_loop_free)
    match = ffi.new("double *")
    push = lib.fse_near_loop_push
    calls = 0

    def call() -> None:
        nonlocal calls
        start = calls * n % len(pool)
        calls += 1
        tokens = doubled[start : start + n]  # ~2 ns a token: within the noise
        for t in tokens:
            if push(handle, t, match):
                raise AssertionError("a loop-free stream tripped near_loop")

    return call


def measure_near_loop(calls: int = 20, repeats: int = 15, seed: int = 0) -> dict[str, float]:
    """Per-token time of the near-loop detector at each of NEAR_LOOP_PERIODS, in
    microseconds (a call pushes 1000 tokens)."""
    return {
        f"near_loop_{p}_us": round(
            time_per_call_us(near_loop_caller(p, seed=seed), calls, repeats) / 1000, 3
        )
        for p in NEAR_LOOP_PERIODS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=262_144, help="logits per call")
    parser.add_argument("--calls", type=int, default=500, help="kernel calls per repeat")
    parser.add_argument("--repeats", type=int, default=15, help="repeats; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--near-loop", action="store_true", help="time the near-loop part only")
    args = parser.parse_args()

    near = measure_near_loop(repeats=args.repeats, seed=args.seed)
    result = {} if args.near_loop else measure(args.n, args.calls, args.repeats, args.seed)
    if args.json:
        print(json.dumps({**result, **near}))
        return
    print("near_loop detector (3 copies / 24 tokens / 0.85), per token pushed")
    for p in NEAR_LOOP_PERIODS:
        print(f"  {'max_period ' + str(p):<16}{near[f'near_loop_{p}_us']:>10.2f} us")
    if args.near_loop:
        return
    print(
        f"fused logit statistics, n = {args.n:,} float32 logits, median of {args.repeats} repeats"
    )
    print(f"  {'implementation':<16}{'us/call':>10}")
    print(f"  {'C kernel':<16}{result['kernel_us']:>10.1f}")
    print(f"  {'numpy':<16}{result['numpy_us']:>10.1f}")
    print(f"  {'ratio':<16}{result['ratio']:>9.1f}x  (numpy / kernel)")


if __name__ == "__main__":
    main()
