"""The graph path (native/fse_graph_stats.c, `Context(graph_stats=True)`) on ggml's CPU
backend: the statistics computed as ops in llama.cpp's decode graph, only they and the
token read back.

Tolerances, the fused kernel's (tests/core/test_kernel.py): logsumexp, variance and L2
norm to 1e-5 relative; the mean to 1e-5 of the logits' RMS (relative to itself unless it
is near 0: float32 sums of a vector whose mean is 0 give 1e-15, not 0); the entropy to
1e-5 relative plus 1e-6 nats; the nll to 1e-5 of the logsumexp (its error is the
logsumexp's); max, argmax, the token's logit and the non-finite count exactly. The graph
computes in float32 in ggml's order (its sums add in double on the CPU backend): the
worst errors measured here are about 2e-7 relative on the model's logits and 4e-8 on the
synthetic vectors, so 1e-5 is a bound with room, not a fit. Beyond float32's range the
graph does worse than the host kernel, and says so: see
test_out_of_float_range_is_non_finite_and_halts.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import fse
import numpy as np
import pytest
from fse._native import ffi, lib
from fse.core import engine
from fse.core.engine import Context, Slot, generate
from fse.core.faults import NO_FAULTS, Faults
from fse.core.guards import GuardChain
from fse.core.model import Model
from fse.core.policy import builtin_policy
from fse.core.runner import run_local
from fse.core.types import HALTED, INTERNAL, Request, Sampling, StepMetrics, Verdict

from core.test_kernel import VECTORS, Floats, Stats, reference

N = 262_144
RTOL = 1e-5
ENTROPY_ATOL = 1e-6  # nats
GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=7)
PROMPT = "The capital of France is"

pytestmark = pytest.mark.skipif(
    not lib.fse_graph_stats_available(), reason="llama.cpp without backend sampling"
)


def stats_of(step: Any) -> Stats:
    return Stats(*(getattr(step.stats, f.name) for f in fields(Stats)))


def assert_close(got: Stats, want: Stats) -> None:
    assert got.n_nonfinite == want.n_nonfinite == 0
    assert got.max_logit == want.max_logit
    assert got.argmax == want.argmax
    for field in ("logsumexp", "mean", "variance", "l2_norm"):
        g, w = getattr(got, field), getattr(want, field)
        # The mean relative to the logits' RMS: a mean of 0 is 1e-15 in float32 sums.
        scale = max(abs(w), want.l2_norm / math.sqrt(N)) if field == "mean" else abs(w)
        assert abs(g - w) <= RTOL * scale, f"{field}: graph {g!r}, reference {w!r}"
    g, w = got.entropy, want.entropy
    assert abs(g - w) <= RTOL * w + ENTROPY_ATOL, f"entropy: graph {g!r}, reference {w!r}"


def evaluate(x: Floats) -> Any:
    """The graph's ops and arithmetic over x on ggml's CPU backend (greedy)."""
    out = ffi.new("fse_graph_step *")
    assert lib.fse_graph_stats_eval(ffi.cast("float *", ffi.from_buffer(x)), x.size, out) == 0
    return out


# --- the ops, on the kernel's vectors ------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["normal", "llm_like", "peaked", "offset", "negative", "wide", "rising"]
)
def test_ops_match_the_float64_reference(kind: str) -> None:
    x = VECTORS[kind](N, np.random.default_rng(1))
    out = evaluate(x)
    want = reference(x)
    assert_close(stats_of(out), want)
    assert out.token == want.argmax
    assert out.token_logit == x[want.argmax]


def test_ties_take_the_devices_argmax() -> None:
    """ggml-cpu's argmax keeps the last of equal maxima (fse_stats.c and llama.cpp's host
    greedy the first): documented, and never seen on real logits (the greedy test)."""
    got = stats_of(evaluate(VECTORS["flat"](N, np.random.default_rng(0))))
    assert got.argmax == N - 1
    assert (got.max_logit, got.mean, got.variance, got.n_nonfinite) == (1.5, 1.5, 0.0, 0)
    assert got.entropy == pytest.approx(math.log(N), rel=RTOL)


@pytest.mark.parametrize(
    "where",
    [[0], [N - 1], [N // 2], [0, 1, N - 1], list(range(0, N, 4096))],
)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_counted(where: list[int], value: float) -> None:
    x = VECTORS["llm_like"](N, np.random.default_rng(3))
    x[where] = value
    assert evaluate(x).stats.n_nonfinite == len(where)


def test_every_nan_encoding_and_all_non_finite() -> None:
    x = VECTORS["normal"](N, np.random.default_rng(4))
    bits = x.view(np.uint32)
    for i, pattern in enumerate([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF]):
        bits[1000 * i] = pattern
    assert evaluate(x).stats.n_nonfinite == 5
    assert evaluate(np.full(N, np.nan, dtype=np.float32)).stats.n_nonfinite == N


def test_out_of_float_range_is_non_finite_and_halts() -> None:
    """Logits beyond ~1e19 overflow the float32 squares (and near 3.4e38 the differences)
    on the device: the graph gives an infinite or NaN variance or L2 norm while counting
    no non-finite logit, which the guard chain halts as `internal` (the host kernel,
    in double, measures them and l2_norm trips instead). Fail closed either way."""
    for kind in ("huge", "near_float_max"):
        x = VECTORS[kind](N, np.random.default_rng(5))
        got = stats_of(evaluate(x))
        assert got.n_nonfinite == 0
        assert not (math.isfinite(got.variance) and math.isfinite(got.l2_norm))
        m = StepMetrics(0, 0, 1.0, 1.0, 1.0, got.variance, 0.5, got.l2_norm, 0, got.entropy)
        (trip,) = GuardChain(builtin_policy("default")).check(m)
        assert trip.guard == INTERNAL and trip.action == "halt"


# --- the engine, on the real model ---------------------------------------------------------


@dataclass
class Replayed:
    reference: Stats  # float64, over the host's logits
    metrics: StepMetrics  # the host kernel's
    token_logit: float  # the host's logit of the replayed token


def host_replay(model: Model, prompt: Sequence[int], tokens: Sequence[int]) -> list[Replayed]:
    """Each step of `tokens` decoded on the host path: the float64 reference of its logits,
    the fused kernel's metrics, and the logit of the token."""
    got: list[Replayed] = []
    with Context(model, n_ctx=1024, n_threads=2) as ctx, Slot(ctx, 0, GREEDY) as slot:
        slot.start(prompt)
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
        for token in tokens:
            x = np.frombuffer(ffi.buffer(ctx.logits(slot._out), model.n_vocab * 4), np.float32)
            x = x.copy()
            metrics = slot.sample().metrics
            got.append(Replayed(reference(x), metrics, float(x[token])))
            slot.queue_token(token)
            ctx.decode()
    return got


def graph_run(
    model: Model, prompt: Sequence[int], sampling: Sampling, n: int, faults: Faults = NO_FAULTS
) -> list[tuple[StepMetrics, Stats, float]]:
    """n steps on the graph path: each step's metrics, the graph's statistics and the
    sampled token's logit."""
    got: list[tuple[StepMetrics, Stats, float]] = []
    with (
        Context(model, n_ctx=1024, n_threads=2, graph_stats=True) as ctx,
        Slot(ctx, 0, sampling, faults=faults) as slot,
    ):
        assert ctx.graph_stats and slot.graph_stats
        slot.start(prompt)
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
        for _ in range(n):
            metrics = slot.sample().metrics
            got.append((metrics, stats_of(slot._graph_step), slot._graph_step.token_logit))
            slot.queue_token(metrics.token)
            ctx.decode()
    return got


def assert_matches_replay(model: Model, prompt: list[int], run: list[Any]) -> None:
    replayed = host_replay(model, prompt, [m.token for m, _, _ in run])
    for (metrics, stats, token_logit), host in zip(run, replayed, strict=True):
        assert_close(stats, host.reference)
        assert token_logit == host.token_logit  # the same logits, bit for bit, on the CPU
        lse = host.reference.logsumexp
        assert abs(metrics.nll - (lse - host.token_logit)) <= RTOL * abs(lse)
        for field in ("variance", "l2_norm", "max_prob", "entropy"):
            g, w = getattr(metrics, field), getattr(host.metrics, field)
            assert g == pytest.approx(w, rel=RTOL, abs=ENTROPY_ATOL), field
        assert metrics.non_finite == 0


def test_greedy_tokens_and_statistics_match_the_host_path(model: Model) -> None:
    prompt = model.tokenize(PROMPT)
    run = graph_run(model, prompt, GREEDY, 32)
    # The host path's greedy tokens (the fused kernel's argmax) over the same 32 steps.
    with Context(model, n_ctx=1024, n_threads=2) as ctx:
        host = [s.metrics.token for s in generate(ctx, prompt, GREEDY, 32)]
    assert [m.token for m, _, _ in run] == host
    assert_matches_replay(model, prompt, run)


def raw_logits(ctx: Context, n_vocab: int) -> Floats:
    """llama.cpp's own logits buffer (llama_get_logits, which the extension does not bind:
    libllama through ctypes), where a decode copies the logits it brings back."""
    libllama = ctypes.CDLL(str(Path(fse.__file__).parent / "_libs" / "libllama.so"))
    get = libllama.llama_get_logits
    get.argtypes, get.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)
    ptr = get(int(ffi.cast("uintptr_t", ctx.handle)))
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


@pytest.mark.parametrize("graph_stats", [False, True])
def test_the_logits_never_reach_the_host(model: Model, graph_stats: bool) -> None:
    """On the graph path llama.cpp copies only the statistics and the token: its logits
    buffer stays as allocated (zeros), where the host path's holds the row."""
    with (
        Context(model, n_ctx=256, n_threads=2, graph_stats=graph_stats) as ctx,
        Slot(ctx, 0, GREEDY) as slot,
    ):
        slot.start(model.tokenize(PROMPT))
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
        for _ in range(2):
            slot.queue_token(slot.sample().metrics.token)
            ctx.decode()
        written = np.count_nonzero(raw_logits(ctx, model.n_vocab))
        assert written == 0 if graph_stats else written > model.n_vocab // 2


def test_sampled_statistics_and_nll_match_a_host_replay(model: Model) -> None:
    """llama.cpp's backend top_k -> top_p -> min_p -> temp -> dist draws the tokens (its
    own generator: not fse_sample.c's sequence); the statistics and the nll of whatever
    it drew match the host's, and the same seed draws the same tokens."""
    prompt = model.tokenize(PROMPT)
    run = graph_run(model, prompt, SAMPLED, 16)
    tokens = [m.token for m, _, _ in run]
    assert all(0 <= t < model.n_vocab for t in tokens)
    assert [m.token for m, _, _ in graph_run(model, prompt, SAMPLED, 16)] == tokens
    assert_matches_replay(model, prompt, run)


@pytest.mark.parametrize(
    ("faults", "counts"),
    [
        (Faults(nan_at=1), {1: 1}),
        (Faults(inf_at=2), {2: 1}),
        (Faults(nan_at=3, inf_at=3), {3: 2}),
    ],
)
def test_faults_are_applied_in_the_graph_and_counted(
    model: Model, faults: Faults, counts: dict[int, int]
) -> None:
    run = graph_run(model, model.tokenize(PROMPT), GREEDY, 5, faults)
    assert [m.non_finite for m, _, _ in run] == [counts.get(i, 0) for i in range(5)]


def verdict_of(model: Model, ctx: Context, faults: Faults) -> Verdict:
    request = Request(PROMPT, max_tokens=12, sampling=GREEDY)
    *_, verdict = run_local(model, ctx, request, builtin_policy("default"), faults=faults)
    assert isinstance(verdict, Verdict)
    return verdict


@pytest.mark.parametrize(
    "spec", [["nan@3"], ["inf@0"], ["nan@2", "inf@2"], ["scale@4:100"]], ids=str
)
def test_guards_trip_as_on_the_host(model: Model, spec: list[str]) -> None:
    """The guard chain halts the graph path's stream exactly where, and as, the host's:
    non_finite for NaN/Inf, l2_norm for logits scaled by 100."""
    faults = Faults.parse(spec)
    with Context(model, n_ctx=1024, n_threads=2) as ctx:
        want = verdict_of(model, ctx, faults)
    with Context(model, n_ctx=1024, n_threads=2, graph_stats=True) as ctx:
        got = verdict_of(model, ctx, faults)
    assert want.status == HALTED
    assert want.guard == ("l2_norm" if "scale" in spec[0] else "non_finite")
    exact = ("status", "tokens", "text", "guard", "threshold", "token_index")
    assert [getattr(got, f) for f in exact] == [getattr(want, f) for f in exact]
    assert got.value == pytest.approx(want.value, rel=RTOL)


# --- fallbacks --------------------------------------------------------------------------


class PatchedLib:
    """fse._native.lib with some functions replaced (cffi's lib is read-only)."""

    def __init__(self, **replaced: Any) -> None:
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(lib, name)


def greedy_tokens(ctx: Context, prompt: Sequence[int], n: int = 8) -> list[int]:
    return [s.metrics.token for s in generate(ctx, prompt, GREEDY, n)]


def test_without_the_api_the_context_uses_the_host_kernel(
    model: Model, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older llama.cpp (LLAMA_CPP_DIR): built with the stubs, which say unavailable."""
    prompt = model.tokenize(PROMPT)
    monkeypatch.setattr(engine, "lib", PatchedLib(fse_graph_stats_available=lambda: 0))
    with Context(model, n_ctx=1024, n_threads=2, graph_stats=True) as old:
        assert not old.graph_stats
        assert greedy_tokens(old, prompt) == greedy_tokens(ctx, prompt)


def test_a_chain_the_backend_declines_uses_the_host_kernel(
    model: Model, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = model.tokenize(PROMPT)
    monkeypatch.setattr(engine, "lib", PatchedLib(fse_graph_sampler_attach=lambda *a: 0))
    with Context(model, n_ctx=1024, n_threads=2, graph_stats=True) as graph:
        with Slot(graph, 0, GREEDY) as slot:
            assert not slot.graph_stats
        assert greedy_tokens(graph, prompt) == greedy_tokens(ctx, prompt)


def test_a_chain_is_attached_once(model: Model) -> None:
    """llama.cpp runs a chain's backend_init once (it asserts so): a second attach says no."""
    with Context(model, n_ctx=1024, n_threads=2, graph_stats=True) as graph:
        sampler = lib.fse_graph_sampler_new(0, 1.0, 0.0, 0.0, 0, 0)
        try:
            assert lib.fse_graph_sampler_attach(sampler, graph.handle, 0) == 1
            assert lib.fse_graph_sampler_attach(sampler, graph.handle, 0) == 0
        finally:
            lib.fse_graph_sampler_detach(graph.handle, 0)
            lib.fse_graph_sampler_free(sampler)


def test_prompt_scoring_and_the_graph_share_a_decode(model: Model, ctx: Context) -> None:
    """A slot scoring its prompt needs every prompt position's logits: it stays on the host
    kernel, beside a graph slot in the same decodes, and each gets what it would alone."""
    prompt_a, prompt_b = model.tokenize(PROMPT), model.tokenize("Once upon a time")
    want_a = greedy_tokens(ctx, prompt_a)
    want_nll: list[float] = []

    def judge(nll: Sequence[float]) -> bool:
        want_nll.extend(nll)
        return True

    with Context(model, n_ctx=1024, n_threads=2) as host:
        want_b = [s.metrics.token for s in generate(host, prompt_b, GREEDY, 8, prompt_judge=judge)]
    with (
        Context(model, n_ctx=2048, n_seq_max=2, n_threads=2, graph_stats=True) as graph,
        Slot(graph, 0, GREEDY) as a,
        Slot(graph, 1, GREEDY, score_prompt=True) as b,
    ):
        assert a.graph_stats and not b.graph_stats
        a.start(prompt_a)
        b.start(prompt_b)
        while a.prefilling or b.prefilling:
            a.queue_prompt(graph.n_batch)
            b.queue_prompt(graph.n_batch - graph.n_in_batch)
            graph.decode()
            graph.score([b])
        got_a, got_b = [], []
        for _ in range(8):
            step_a, step_b = graph.sample([a, b])
            got_a.append(step_a.metrics.token)
            got_b.append(step_b.metrics.token)
            a.queue_token(step_a.metrics.token)
            b.queue_token(step_b.metrics.token)
            graph.decode()
    assert (got_a, got_b) == (want_a, want_b)
    assert b.prompt_nll == pytest.approx(want_nll, rel=RTOL)
