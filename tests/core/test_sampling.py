"""fse_sample.c against llama.cpp's own sampler chain, and the one-call step.

fse_sample.c claims more than the same distribution: with the same seed it draws the
same token as llama.cpp's chain top_k -> top_p -> min_p -> temp -> dist, from the same
generator, as long as no two of the k largest logits are equal. So these tests compare
whole generations of the real model token for token, and synthetic logits where the
answer is known.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
from fse._native import ffi, lib
from fse.core.engine import Context, Slot, generate
from fse.core.types import Sampling

PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):")
SETTINGS = [
    Sampling(),  # llama.cpp's CLI defaults: top-k 40, top-p 0.95, min-p 0.05, T 0.8
    Sampling(temperature=1.5, top_k=256, top_p=1.0, min_p=0.0),
    Sampling(temperature=1.0, top_k=1),
    Sampling(temperature=0.3, top_k=5, top_p=0.5, min_p=0.2),
    Sampling(temperature=2.0, top_k=100, top_p=0.99, min_p=0.01),
]


@pytest.mark.parametrize("sampling", SETTINGS, ids=lambda s: f"k{s.top_k}-T{s.temperature}")
def test_the_same_tokens_as_llama_cpps_chain_for_the_same_seed(
    ctx: Context, sampling: Sampling
) -> None:
    for seed, prompt in enumerate(PROMPTS, start=7):
        chosen = dataclasses.replace(sampling, seed=seed)
        tokens = ctx.model.tokenize(prompt)
        ours = [s.metrics.token for s in generate(ctx, tokens, chosen, 24)]
        theirs = [s.metrics.token for s in generate(ctx, tokens, chosen, 24, llama_sampler=True)]
        assert ours == theirs, (prompt, seed)


def test_other_seeds_draw_other_tokens(ctx: Context) -> None:
    """A check that the comparison above can fail: the seed matters."""
    tokens = ctx.model.tokenize(PROMPTS[1])
    hot = Sampling(temperature=1.5, top_k=200, top_p=1.0, min_p=0.0)
    runs = {
        tuple(
            s.metrics.token for s in generate(ctx, tokens, dataclasses.replace(hot, seed=seed), 12)
        )
        for seed in range(4)
    }
    assert len(runs) > 1


def test_top_k_out_of_the_fused_range_uses_llama_cpps_chain(ctx: Context) -> None:
    """top_k 0 (off) or above FSE_TOP_K_MAX needs the whole vocabulary: llama.cpp's chain."""
    for top_k, fused in ((lib.FSE_TOP_K_MAX, True), (lib.FSE_TOP_K_MAX + 1, False), (0, False)):
        with Slot(ctx, 0, Sampling(top_k=top_k, seed=1)) as slot:
            assert (slot._fused != ffi.NULL) is fused
            assert (slot._sampler is None) is fused
    with Slot(ctx, 0, Sampling(temperature=0)) as greedy:
        assert greedy._fused == ffi.NULL and greedy._sampler is None


def _draws(logits: np.ndarray, n: int, **chain: float) -> Counter[int]:
    x = np.ascontiguousarray(logits, dtype=np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(x))
    sampler = lib.fse_sampler_new(
        int(chain.get("top_k", 40)),
        chain.get("top_p", 1.0),
        chain.get("min_p", 0.0),
        chain.get("temp", 1.0),
        123,
    )
    assert sampler != ffi.NULL
    try:
        return Counter(lib.fse_sampler_sample(sampler, ptr, len(x)) for _ in range(n))
    finally:
        lib.fse_sampler_free(sampler)


def test_the_draw_follows_the_softmax_of_the_k_largest() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 1.0, 50_000).astype(np.float32)
    top = np.argsort(-logits)[:4]
    logits[top] = [9.0, 8.5, 8.0, 7.0]  # four clear leaders, the rest far below
    n = 20_000
    counts = _draws(logits, n, top_k=4, temp=1.0)
    assert set(counts) == set(top.tolist())
    expected = np.exp(np.array([9.0, 8.5, 8.0, 7.0]) - 9.0)
    expected /= expected.sum()
    for token, p in zip(top.tolist(), expected, strict=True):
        assert abs(counts[token] / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_top_p_min_p_and_one_candidate() -> None:
    logits = np.full(1000, -20.0, dtype=np.float32)
    logits[[10, 20, 30]] = [5.0, 4.0, 0.0]
    # p(10) = 0.72: top_p 0.5 keeps only token 10.
    assert _draws(logits, 200, top_k=3, top_p=0.5) == Counter({10: 200})
    # min_p 0.5 keeps logits >= 5 + ln 0.5 = 4.31: token 10 only; 0.3 keeps 20 too.
    assert _draws(logits, 200, top_k=3, min_p=0.5) == Counter({10: 200})
    assert set(_draws(logits, 2000, top_k=3, min_p=0.3)) == {10, 20}
    assert _draws(logits, 50, top_k=1) == Counter({10: 50})


def test_equal_logits_keep_the_lower_index_first_and_nan_is_never_drawn() -> None:
    logits = np.zeros(64, dtype=np.float32)
    logits[[3, 40]] = 2.0
    assert _draws(logits, 20, top_k=1) == Counter({3: 20})
    logits[3] = np.nan
    assert _draws(logits, 20, top_k=1) == Counter({40: 20})
    nothing = np.full(8, np.nan, dtype=np.float32)
    assert _draws(nothing, 3, top_k=2) == Counter({-1: 3})


def test_a_vocabulary_shorter_than_k_and_not_a_multiple_of_the_group() -> None:
    logits = np.arange(21, dtype=np.float32)  # 16 + 5: a group and a tail
    assert _draws(logits, 10, top_k=1) == Counter({20: 10})
    assert set(_draws(logits, 4000, top_k=200, temp=0.5)) <= set(range(21))


def test_bad_settings_get_no_fused_sampler() -> None:
    for k, temp in ((0, 1.0), (lib.FSE_TOP_K_MAX + 1, 1.0), (40, 0.0), (40, -1.0)):
        assert lib.fse_sampler_new(k, 1.0, 0.0, temp, 1) == ffi.NULL


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_one_call_measures_and_samples_every_vector_as_alone(threads: int) -> None:
    """fse_step over many vectors, whatever the threads sharing it, gives each vector
    the statistics and the token it gets alone (NaN included)."""
    rng = np.random.default_rng(threads)
    n_vocab, n_jobs = 10_007, 13
    vectors = rng.normal(0.0, 3.0, (n_jobs, n_vocab)).astype(np.float32)
    vectors[5, 77] = np.nan
    vectors[9, 0] = np.inf

    def samplers() -> list[object]:
        made = [lib.fse_sampler_new(40, 0.95, 0.05, 0.8, seed) for seed in range(n_jobs)]
        made[2] = ffi.NULL  # greedy: the argmax
        return made

    alone = []
    for vector, sampler in zip(vectors, samplers(), strict=True):
        stats = ffi.new("fse_logit_stats *")
        ptr = ffi.cast("float *", ffi.from_buffer(vector))
        lib.fse_logit_stats_compute(ptr, n_vocab, stats)
        if stats.n_nonfinite:
            token = max(stats.argmax, 0)
        elif sampler == ffi.NULL:
            token = stats.argmax
        else:
            token = lib.fse_sampler_sample(sampler, ptr, n_vocab)
        alone.append((stats.max_logit, stats.argmax, stats.logsumexp, stats.variance,
                      stats.l2_norm, stats.n_nonfinite, token))  # fmt: skip
    pool = lib.fse_pool_new(threads)
    jobs = ffi.new("fse_step_job[]", n_jobs)
    keep = samplers()
    try:
        assert lib.fse_pool_threads(pool) == threads
        for step in range(3):  # the pool is reused step after step
            keep = samplers()
            for i, (vector, sampler) in enumerate(zip(vectors, keep, strict=True)):
                jobs[i].logits = ffi.cast("float *", ffi.from_buffer(vector))
                jobs[i].sampler = sampler
                jobs[i].token = -2
            lib.fse_step(pool, jobs, n_jobs, n_vocab)
            got = [(j.stats.max_logit, j.stats.argmax, j.stats.logsumexp, j.stats.variance,
                    j.stats.l2_norm, j.stats.n_nonfinite, j.token) for j in jobs]  # fmt: skip
            assert got == alone, step
            for sampler in keep:
                lib.fse_sampler_free(sampler)
    finally:
        lib.fse_pool_free(pool)
    assert alone[5][5] == 1 and alone[9][5] == 1  # the non-finite ones were counted
    assert lib.fse_pool_new(0) == ffi.NULL
