"""The engine: a llama.cpp context over a Model, stepped one token at a time.

A Context holds the sequences and one reusable batch; a Slot is one sequence. Per
decode step one C call (`Context.sample`) measures every ready sequence's logits in
place with the fused kernel and samples its token, the sequences shared over a small
thread pool; each Slot then turns its result into the token with its metrics, freeing
every libllama object it owns deterministically. Sampling is fse_sample.c (llama.cpp's
chain over the k largest logits), or llama.cpp's own chain where that cannot run
(top_k 0 or above FSE_TOP_K_MAX). The
model itself is fse.core.model, debug faults fse.core.faults. It knows nothing of
guards, policies or gRPC.

`Context(graph_stats=True)` (off by default) computes the statistics inside llama.cpp's
decode graph instead (native/fse_graph_stats.c): only they and the token come back, not
the logits, which pays on a GPU. A slot that cannot use it (no backend sampling in this
llama.cpp, a sampler the device cannot run, prompt scoring) uses the host kernel.
"""

from __future__ import annotations

import codecs
import math
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from fse._native import ffi, lib
from fse.core.errors import EngineError
from fse.core.faults import NO_FAULTS, Faults
from fse.core.metrics import PerplexityWindow
from fse.core.model import Closing, Model, last_llama_error
from fse.core.types import Sampling, StepMetrics

# ggml's GGML_MAX_N_THREADS; far more threads make llama.cpp abort (std::bad_alloc).
MAX_THREADS = 512
# Prompt positions whose logits one decode may ask for, to score prompts: llama.cpp
# keeps an output buffer of that many vocabulary rows (1 MiB each for Gemma 3), so
# scoring never holds n_prompt x n_vocab floats, only this many rows at a time.
SCORED_PER_DECODE = 32

log = structlog.get_logger("fse.core.engine")


class ContextOverflow(EngineError):
    """A sequence would outgrow its share of the context window."""


class Context(Closing):
    """A llama.cpp context holding up to n_seq_max sequences, and one reusable batch.

    Each sequence gets n_ctx // n_seq_max positions. Not thread-safe: one thread
    (the caller of decode) owns it.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 4096,
        n_seq_max: int = 1,
        n_threads: int = 2,
        n_batch: int = 512,
        graph_stats: bool = False,
    ) -> None:
        """`graph_stats`: each slot's statistics and token computed in llama.cpp's graph
        (fse_graph_stats.c) where it can be, else by the host kernel, which is faster on
        the CPU backend (docs/benchmarks.md)."""
        if not 1 <= n_threads <= MAX_THREADS:  # llama.cpp aborts on absurd counts
            raise ValueError(f"n_threads: {n_threads} is invalid; accepted: 1..{MAX_THREADS}")
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        # One KV buffer for all sequences (llama-server's choice for parallel slots):
        # with separate buffers llama.cpp only co-batches runs of consecutive
        # sequence ids, so a finished stream in the middle splits every later
        # step in two and halves throughput. The cost is attention over every
        # stream's cells, small next to a 262k-token output projection.
        params.kv_unified = n_seq_max > 1
        self.graph_stats = graph_stats and bool(lib.fse_graph_stats_available())
        if graph_stats and not self.graph_stats:
            log.warning(
                "graph statistics unavailable: this llama.cpp has no backend sampling API; "
                "using the host kernel"
            )
        if self.graph_stats:
            adjusted = ffi.new("struct llama_context_params *", params)
            lib.fse_graph_stats_context_params(adjusted)
            params = adjusted[0]
        handle = lib.llama_init_from_model(model.handle, params)
        if handle == ffi.NULL:
            raise EngineError(last_llama_error("llama.cpp could not create a context"))
        self._handle = handle
        self.n_ctx: int = lib.llama_n_ctx(handle)
        self.n_batch: int = lib.llama_n_batch(handle)
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = self.n_ctx // n_seq_max
        self._memory = lib.llama_get_memory(handle)
        self._batch = lib.llama_batch_init(self.n_batch, 0, n_seq_max)
        self.n_in_batch = 0
        # The per-step work of every sequence, in one C call over this many threads (the
        # decode's own: they are idle while it runs); jobs are reused every step.
        self._pool = lib.fse_pool_new(n_threads)
        self._jobs = ffi.new("fse_step_job[]", max(n_seq_max, SCORED_PER_DECODE))
        self.scored_left = SCORED_PER_DECODE  # prompt positions scored in the next decode
        if self._pool == ffi.NULL:
            self.close()
            raise EngineError("cannot start the statistics threads")

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise EngineError("context is closed")
        return self._handle

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Queue one token for the next decode; returns its index in the batch."""
        if self._handle is None:  # the batch is freed with the context
            raise EngineError("context is closed")
        i = self.n_in_batch
        if i >= self.n_batch:
            raise EngineError(f"batch is full ({self.n_batch} tokens)")
        if pos >= self.n_ctx_seq:
            raise ContextOverflow(
                f"sequence {seq} reached its context limit of {self.n_ctx_seq} tokens"
            )
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        self.n_in_batch = i + 1
        return i

    def decode(self, wake_fd: int = -1) -> None:
        """Run the model over the queued tokens (the GIL is released meanwhile). With a
        `wake_fd` (an eventfd), 1 is first written to it from inside that call: see
        native/fse_decode.c."""
        self._batch.n_tokens = self.n_in_batch
        self.n_in_batch = 0
        self.scored_left = SCORED_PER_DECODE
        status = lib.fse_decode(self.handle, self._batch, wake_fd)
        if status != 0:
            raise EngineError(last_llama_error(f"llama_decode failed with status {status}"))

    def logits(self, batch_index: int) -> Any:
        """float* to the logits of a batch entry, valid until the next decode."""
        ptr = lib.llama_get_logits_ith(self.handle, batch_index)
        if ptr == ffi.NULL:
            raise EngineError(f"no logits for batch entry {batch_index}")
        return ptr

    def sample(self, slots: Sequence[Slot]) -> list[Step]:
        """Measure and sample the last decode's logits of each slot: one C call for all
        of them (the GIL is released meanwhile), then each slot's Step."""
        if self.graph_stats:
            return self._sample_mixed(slots)
        jobs = self._jobs
        for i, slot in enumerate(slots):
            slot._prepare(jobs[i])
        lib.fse_step(self._pool, jobs, len(slots), self.model.n_vocab)
        return [slot._finish(jobs[i]) for i, slot in enumerate(slots)]

    def _sample_mixed(self, slots: Sequence[Slot]) -> list[Step]:
        """sample() where some slots read their results from the graph."""
        host = [slot for slot in slots if slot._graph == ffi.NULL]
        jobs = self._jobs
        for i, slot in enumerate(host):
            slot._prepare(jobs[i])
        if host:
            lib.fse_step(self._pool, jobs, len(host), self.model.n_vocab)
        done = iter([slot._finish(jobs[i]) for i, slot in enumerate(host)])
        return [next(done) if slot._graph == ffi.NULL else slot._finish_graph() for slot in slots]

    def score(self, slots: Sequence[Slot]) -> None:
        """After a decode: the nll of each prompt token whose predicting position the
        slots asked logits for (Slot.prompt_nll), in one C call for all of them."""
        jobs = self._jobs
        owners: list[tuple[Slot, int]] = []
        for slot in slots:
            for batch_index, token in slot._scoring:
                jobs[len(owners)].logits = self.logits(batch_index)
                jobs[len(owners)].sampler = ffi.NULL
                owners.append((slot, token))
            slot._scoring.clear()
        lib.fse_step(self._pool, jobs, len(owners), self.model.n_vocab)
        for job, (slot, token) in zip(jobs, owners, strict=False):
            # Non-finite logits: the prompt cannot be scored, and is judged unlikely.
            nll = math.inf if job.stats.n_nonfinite else job.stats.logsumexp - job.logits[token]
            slot.prompt_nll.append(nll)

    def clear_sequence(self, seq: int) -> None:
        if self._handle is None:  # the memory is freed with the context
            raise EngineError("context is closed")
        lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def close(self) -> None:
        if self._pool != ffi.NULL:
            lib.fse_pool_free(self._pool)
            self._pool = ffi.NULL
        if self._handle is not None:
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._handle)
            self._handle = None


@dataclass(slots=True)
class Step:
    """A sampled token: its metrics, its bytes, and the complete UTF-8 text it adds."""

    metrics: StepMetrics
    piece: bytes
    text: str
    end_of_generation: bool


class Slot(Closing):
    """One sequence of a Context: its sampler chain, position and metric state.

    The per-token path lives here and in Context.sample: the logits are read in place
    by one C call that measures and samples them, and nothing the size of the
    vocabulary is allocated.
    """

    def __init__(
        self,
        ctx: Context,
        seq: int,
        sampling: Sampling,
        *,
        ppl_window: int = 16,
        faults: Faults = NO_FAULTS,
        llama_sampler: bool = False,
        score_prompt: bool = False,
    ) -> None:
        """`llama_sampler`: llama.cpp's own chain even where fse_sample.c can run (the
        tests and benchmarks compare the two). `score_prompt`: measure each prompt
        token's nll during prefill (prompt_nll), for the prompt guards."""
        sampling.validate()
        self.ctx = ctx
        self.model = ctx.model
        self.seq = seq
        self.sampling = sampling
        self.seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        self.faults = faults
        # The graph's statistics and sampling where the context asks for them and they
        # can run; else fse_sample.c where it can run, else llama.cpp's chain (run after
        # the C step).
        self._graph = ffi.NULL
        if ctx.graph_stats and not llama_sampler and not score_prompt:
            self._graph = self._attach_graph()
        self._fused = ffi.NULL
        self._sampler = None
        if not sampling.greedy and self._graph == ffi.NULL:
            if not llama_sampler:
                self._fused = lib.fse_sampler_new(
                    sampling.top_k, sampling.top_p, sampling.min_p, sampling.temperature, self.seed
                )
            if self._fused == ffi.NULL:
                self._sampler = _sampler_chain(sampling, self.seed)
        self._ppl = PerplexityWindow(ppl_window)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: list[int] = []  # prompt tokens not yet decoded
        self.score_prompt = score_prompt
        self.prompt_nll: list[float] = []  # -log p of each prompt token after the first
        self._scoring: list[tuple[int, int]] = []  # (batch index, the token it predicts)
        self._out = -1  # batch index of this sequence's logits after the last decode
        self.pos = 0  # next position in the sequence
        self.index = 0  # index of the next generated token

    @property
    def graph_stats(self) -> bool:
        """Whether this slot's statistics and token come from llama.cpp's graph."""
        return bool(self._graph != ffi.NULL)

    def _attach_graph(self) -> Any:
        """The graph sampler of this slot's sequence, or NULL (logged) where it cannot run."""
        sampling = self.sampling
        graph = lib.fse_graph_sampler_new(
            sampling.top_k,
            sampling.top_p,
            sampling.min_p,
            0.0 if sampling.greedy else sampling.temperature,
            self.seed,
            self.faults.touches_logits,
        )
        if graph != ffi.NULL and lib.fse_graph_sampler_attach(graph, self.ctx.handle, self.seq):
            self._graph_step = ffi.new("fse_graph_step *")
            return graph
        lib.fse_graph_sampler_free(graph)
        log.warning(
            "graph statistics cannot run on this backend; using the host kernel", seq=self.seq
        )
        return ffi.NULL

    def start(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise ValueError("prompt: empty after tokenization")
        if len(prompt) >= self.ctx.n_ctx_seq:
            raise ContextOverflow(
                f"prompt: {len(prompt)} tokens do not fit the context of "
                f"{self.ctx.n_ctx_seq} tokens per sequence"
            )
        self.ctx.clear_sequence(self.seq)
        self._pending = list(prompt)
        self.prompt_nll.clear()
        self._scoring.clear()

    @property
    def prefilling(self) -> bool:
        return bool(self._pending)

    def queue_prompt(self, budget: int) -> int:
        """Queue up to `budget` prompt tokens into the next batch; returns how many (a
        slot scoring its prompt takes at most the context's scored_left)."""
        if self.score_prompt:
            budget = min(budget, self.ctx.scored_left)
            self.ctx.scored_left -= min(budget, len(self._pending))
        chunk = self._pending[:budget]
        del self._pending[:budget]
        last = len(chunk) - 1
        for i, token in enumerate(chunk):
            final = i == last and not self._pending
            # Scoring: every position but the last predicts the prompt token after it.
            scored = self.score_prompt and not final
            batch_index = self.ctx.add(token, self.pos, self.seq, final or scored)
            if scored:
                following = chunk[i + 1] if i < last else self._pending[0]
                self._scoring.append((batch_index, following))
            self.pos += 1
        if chunk:
            self._out = batch_index if not self._pending else -1
            if not self._pending:
                self._graph_faults()
        return len(chunk)

    def queue_token(self, token: int) -> None:
        """Queue the token just released, so the next decode yields the next logits."""
        self._out = self.ctx.add(token, self.pos, self.seq, True)
        self.pos += 1
        self._graph_faults()

    def _graph_faults(self) -> None:
        """Before the decode that yields token `index`: the debug faults the graph applies
        to its logits, as _inject does to the host's."""
        faults, index = self.faults, self.index
        if self._graph != ffi.NULL and faults.touches_logits:
            lib.fse_graph_sampler_set_fault(
                self._graph,
                faults.scale if index == faults.scale_at else 1.0,
                math.nan if index == faults.nan_at else 0.0,
                math.inf if index == faults.inf_at else 0.0,
            )

    def sample(self) -> Step:
        """Measure the logits of the last decode and pick the next token (this slot
        alone; the scheduler samples every ready slot at once with Context.sample)."""
        return self.ctx.sample([self])[0]

    def _prepare(self, job: Any) -> None:
        """Point a step job at this slot's logits (after any debug fault touched them)."""
        ptr = self.ctx.logits(self._out)
        if self.faults.touches_logits:
            self._inject(ptr)
        job.logits = ptr
        job.sampler = self._fused

    def _finish(self, job: Any) -> Step:
        """The Step from what the C call measured and sampled."""
        ptr, stats, token = job.logits, job.stats, job.token
        if self._sampler is not None and not stats.n_nonfinite:
            # Never hand NaN/Inf to llama.cpp's samplers (their sorts assume an order);
            # the non_finite guard halts this step before anything is released.
            token = lib.llama_sampler_sample(self._sampler, self.ctx.handle, self._out)
        # Greedy: the kernel's argmax is the first maximum, exactly what llama.cpp's
        # greedy sampler picks, without its 0.2 ms vocabulary copy.
        return self._step(token, stats.logsumexp - ptr[token], stats)

    def _finish_graph(self) -> Step:
        """The Step from what the graph measured and sampled (fse_graph_stats_read)."""
        out, n_vocab = self._graph_step, self.model.n_vocab
        if lib.fse_graph_stats_read(self.ctx.handle, self._out, n_vocab, out) != 0:
            raise EngineError(f"no statistics came back from the graph for sequence {self.seq}")
        stats, token = out.stats, out.token
        if not 0 <= token < n_vocab:
            if not stats.n_nonfinite:
                raise EngineError(f"the graph sampled no token for sequence {self.seq}")
            token = 0  # the non_finite guard halts this step: nothing is released
        return self._step(token, stats.logsumexp - out.token_logit, stats)

    def _step(self, token: int, nll: float, stats: Any) -> Step:
        lse = stats.logsumexp
        ppl, ppl_cumulative = self._ppl.push(nll)
        piece = self.model.piece(token)
        metrics = StepMetrics(
            index=self.index,
            token=token,
            nll=nll,
            ppl=ppl,
            ppl_cumulative=ppl_cumulative,
            variance=stats.variance,
            max_prob=math.exp(stats.max_logit - lse) if math.isfinite(lse) else math.nan,
            l2_norm=stats.l2_norm,
            non_finite=stats.n_nonfinite,
            entropy=stats.entropy,
        )
        self.index += 1
        return Step(
            metrics, piece, self._utf8.decode(piece), self.model.is_end_of_generation(token)
        )

    def _inject(self, ptr: Any) -> None:
        index, faults = self.index, self.faults
        if index == faults.nan_at:
            ptr[self.model.n_vocab // 2] = math.nan
        if index == faults.inf_at:
            ptr[self.model.n_vocab - 1] = math.inf
        if index == faults.scale_at:
            import numpy as np

            view = np.frombuffer(ffi.buffer(ptr, self.model.n_vocab * 4), dtype=np.float32)
            view *= np.float32(faults.scale)

    def close(self) -> None:
        if self._graph != ffi.NULL:
            if self.ctx._handle is not None:  # never leave llama.cpp a freed sampler
                lib.fse_graph_sampler_detach(self.ctx._handle, self.seq)
            lib.fse_graph_sampler_free(self._graph)
            self._graph = ffi.NULL
        if self._fused != ffi.NULL:
            lib.fse_sampler_free(self._fused)
            self._fused = ffi.NULL
        if self._sampler is not None:
            lib.llama_sampler_free(self._sampler)
            self._sampler = None
        if self.ctx._handle is not None:
            self.ctx.clear_sequence(self.seq)


def _sampler_chain(sampling: Sampling, seed: int) -> Any:
    """llama.cpp's CLI order: truncate first (cheap on a 262k vocabulary), then temperature."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if sampling.top_k > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(sampling.min_p, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sampling.temperature))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
    return chain


def generate(
    ctx: Context,
    prompt: Sequence[int],
    sampling: Sampling,
    max_tokens: int,
    *,
    ppl_window: int = 16,
    faults: Faults = NO_FAULTS,
    llama_sampler: bool = False,
    prompt_judge: Callable[[Sequence[float]], bool] | None = None,
) -> Generator[Step, None, None]:
    """Single-sequence generation: decode the prompt in batches, then yield each sampled
    token before it is decoded. Stop iterating to stop generating; the sequence is freed.
    With `prompt_judge`, the prompt is scored during prefill and handed to it once
    decoded: False ends the generation before the first token."""
    slot = Slot(
        ctx,
        0,
        sampling,
        ppl_window=ppl_window,
        faults=faults,
        llama_sampler=llama_sampler,
        score_prompt=prompt_judge is not None,
    )
    with slot:
        slot.start(prompt)
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
            ctx.score([slot])
        if prompt_judge is not None and not prompt_judge(slot.prompt_nll):
            return
        for produced in range(max_tokens):
            step = slot.sample()
            yield step
            if step.end_of_generation or produced + 1 == max_tokens:
                return
            slot.queue_token(step.metrics.token)
            ctx.decode()
