"""The engine: a llama.cpp model and context, stepped one token at a time.

Owns every libllama object through fse._native and frees them deterministically.
Per decode step and per sequence it reads the logits in place, runs the fused C
kernel over them, samples with llama.cpp's own sampler chain and yields the
token with its metrics. It knows nothing of guards, policies or gRPC.
"""

from __future__ import annotations

import codecs
import math
import random
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fse._native import ffi, lib
from fse.core.errors import EngineError, InputError
from fse.core.metrics import PerplexityWindow
from fse.core.models import ModelError, check_gguf
from fse.core.types import Sampling, StepMetrics, utf8_length

# ggml's GGML_MAX_N_THREADS; far more threads make llama.cpp abort (std::bad_alloc).
MAX_THREADS = 512

_backend_lock = threading.Lock()
_backend_ready = False


class ContextOverflow(EngineError):
    """A sequence would outgrow its share of the context window."""


class TooManyTokens(ValueError):
    """A text needs more tokens than the caller allows (n_tokens says how many; with
    at_least, the text was refused from its length or a prefix and needs n_tokens or
    more)."""

    def __init__(self, n_tokens: int, limit: int, at_least: bool = False) -> None:
        super().__init__(f"{'at least ' if at_least else ''}{n_tokens} tokens; at most {limit}")
        self.n_tokens = n_tokens
        self.limit = limit
        self.at_least = at_least


# A prefix of max_tokens * this many bytes holds more than max_tokens tokens of any
# ordinary text (about 4 bytes a token here), so an oversized prompt is refused after
# tokenizing 16 KiB instead of all of it: 1 MiB took ~0.2 s of a core.
PREFIX_BYTES_PER_TOKEN = 8


def init_backend(verbose: bool = False) -> None:
    """Route llama.cpp's log (quiet unless verbose) and initialise its backend once."""
    global _backend_ready
    with _backend_lock:
        lib.fse_log_install(1 if verbose else 0)
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True


def _last_llama_error(default: str) -> str:
    message: str = ffi.string(lib.fse_log_last_error()).decode("utf-8", "replace")
    return message or default


_FAULT_FIELDS = {
    "nan": "nan_at",
    "inf": "inf_at",
    "scale": "scale_at",
    "guard-error": "guard_error_at",
    "hang": "hang_at",
}


@dataclass(frozen=True, slots=True)
class Faults:
    """Debug-only fault injection, to prove the fail-closed paths. Off by default."""

    nan_at: int | None = None  # write a NaN into the logits at this step
    inf_at: int | None = None  # write +Inf into the logits at this step
    scale_at: int | None = None  # multiply the logits by `scale` at this step
    scale: float = 1.0
    guard_error_at: int | None = None  # a guard raises at this step (used by the guard chain)
    hang_at: int | None = None  # the decode thread blocks before this step (the watchdog test)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Faults:
        """Parse `nan@K`, `inf@K`, `scale@K:FACTOR`, `guard-error@K`, `hang@K` (K = token index)."""
        fields: dict[str, Any] = {}
        for spec in specs:
            kind, _, where = spec.partition("@")
            step_text, _, factor = where.partition(":")
            try:
                step = int(step_text)
                if step < 0:
                    raise ValueError
                if kind == "scale":
                    fields["scale"] = float(factor)
                elif factor:
                    raise ValueError
            except ValueError:
                raise InputError(
                    f"debug fault {spec!r} is invalid; accepted: nan@K, inf@K, "
                    "scale@K:FACTOR, guard-error@K, hang@K with K a token index >= 0"
                ) from None
            key = _FAULT_FIELDS.get(kind)
            if key is None:
                raise InputError(
                    f"debug fault {spec!r}: unknown kind {kind!r}; accepted: nan@K, inf@K, "
                    "scale@K:FACTOR, guard-error@K, hang@K with K a token index >= 0"
                )
            fields[key] = step
        return cls(**fields)

    @property
    def touches_logits(self) -> bool:
        return self.nan_at is not None or self.inf_at is not None or self.scale_at is not None


NO_FAULTS = Faults()


class _Closing:
    """`with` frees the llama.cpp object deterministically: close() on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Model(_Closing):
    """A GGUF model loaded by llama.cpp, with its vocabulary. Use as a context manager."""

    def __init__(self, path: Path | str, *, verbose: bool = False) -> None:
        self.path = check_gguf(Path(path))
        init_backend(verbose)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        handle = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if handle == ffi.NULL:
            reason = _last_llama_error("llama.cpp could not load it")
            raise ModelError(f"model: {self.path}: {reason}")
        self._handle = handle
        self._vocab = lib.llama_model_get_vocab(handle)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(handle)
        # No token stands for more bytes of text than this (0: no such bound here).
        self.max_token_bytes: int = lib.fse_vocab_max_token_bytes(self._vocab)
        self.name = self._meta("general.name") or self.path.stem
        buf = ffi.new("char[]", 256)
        lib.llama_model_desc(handle, buf, 256)
        self.description: str = ffi.string(buf).decode("utf-8", "replace")
        template = lib.llama_model_chat_template(handle, ffi.NULL)
        self.chat_template: bytes | None = None if template == ffi.NULL else ffi.string(template)
        # Token id -> bytes, filled lazily: token_to_piece once per distinct token.
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ffi.new("char[]", 256)

    def _meta(self, key: str) -> str | None:
        buf = ffi.new("char[]", 512)
        n = lib.llama_model_meta_val_str(self.handle, key.encode(), buf, 512)
        return ffi.string(buf).decode("utf-8", "replace") if n >= 0 else None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise EngineError("model is closed")
        return self._handle

    @property
    def vocab(self) -> Any:
        """The model's vocabulary; freed with the model, so closed raises EngineError."""
        if self._handle is None:
            raise EngineError("model is closed")
        return self._vocab

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        parse_special: bool = True,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Tokens for text, with the model's own BOS rule; special tokens like
        <start_of_turn> in a rendered chat template are parsed as such.

        With max_tokens, a longer text raises TooManyTokens without building the
        token list: a 1 MiB prompt would otherwise cost ~20 MiB of Python ints."""
        longest = self.max_token_bytes
        if (
            max_tokens is not None
            and longest
            and (size := utf8_length(text)) > max_tokens * longest
        ):
            # Refused on its length alone, nothing tokenized: see fse_vocab.c.
            raise TooManyTokens(-(-size // longest), max_tokens, at_least=True)
        data = text.encode("utf-8")
        if max_tokens is not None and len(data) > max_tokens * PREFIX_BYTES_PER_TOKEN:
            self._refuse_from_prefix(data, max_tokens, add_special, parse_special)
        capacity = len(data) + 8  # a token covers at least one byte, bar BOS/EOS
        if max_tokens is not None:
            capacity = min(capacity, max_tokens)
        tokens = ffi.new("llama_token[]", capacity)
        n = lib.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:  # buffer too small: -n is the size needed
            if max_tokens is not None and -n > max_tokens:
                raise TooManyTokens(-n, max_tokens)
            capacity = -n
            tokens = ffi.new("llama_token[]", capacity)
            n = lib.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        if n < 0:
            raise EngineError(f"prompt: llama.cpp could not tokenize it ({n})")
        return list(ffi.unpack(tokens, n))

    def _refuse_from_prefix(
        self, data: bytes, max_tokens: int, add_special: bool, parse_special: bool
    ) -> None:
        """TooManyTokens if a prefix of the text alone needs more than max_tokens + 1
        tokens (the cut may split one token in two: the whole then needs > max_tokens)."""
        cut = max_tokens * PREFIX_BYTES_PER_TOKEN
        while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
            cut -= 1
        n = lib.llama_tokenize(self.vocab, data, cut, ffi.NULL, 0, add_special, parse_special)
        if -n > max_tokens + 1:
            raise TooManyTokens(-n - 1, max_tokens, at_least=True)

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as empty)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        result: bytes
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            result = ffi.unpack(buf, n)
        else:
            result = ffi.unpack(self._piece_buf, n)
        self._pieces[token] = result
        return result

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def use_chat_template(self, name: str) -> None:
        """Use one of llama.cpp's built-in templates (chatml, llama3, gemma...) instead of
        the GGUF's own; InputError when llama.cpp does not know the name."""
        previous, self.chat_template = self.chat_template, name.encode()
        try:
            self.apply_chat_template([("user", "hi")])
        except ValueError:
            self.chat_template = previous
            raise InputError(
                f"model.chat_template: {name!r} is not a template llama.cpp knows; "
                "accepted: a built-in name such as chatml, llama3, gemma, mistral-v7, phi3"
            ) from None

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render (role, content) messages with the model's own template, ready for the
        assistant's turn. Raises ValueError when the model has no (supported) template."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a raw prompt")
        # NUL-terminated C strings owned by this list, alive until the call returns. (A
        # from_buffer over a temporary `role + b"\0"` dangled: the template sometimes read
        # freed memory and rendered an empty role.)
        keep = [(ffi.new("char[]", r.encode()), ffi.new("char[]", c.encode())) for r, c in messages]
        chat = ffi.new("llama_chat_message[]", len(keep))
        for i, (role, content) in enumerate(keep):
            chat[i].role = role
            chat[i].content = content
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        for _ in range(2):
            buf = ffi.new("char[]", size)
            n = lib.llama_chat_apply_template(self.chat_template, chat, len(keep), True, buf, size)
            if n < 0:
                raise ValueError(
                    "messages: the model's chat template is not supported by llama.cpp"
                )
            if n <= size:
                rendered: bytes = ffi.unpack(buf, n)
                return rendered.decode("utf-8", "replace")
            size = n
        raise EngineError("chat template output kept growing")

    def close(self) -> None:
        if self._handle is not None:
            lib.llama_model_free(self._handle)
            self._handle = None


class Context(_Closing):
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
    ) -> None:
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
        handle = lib.llama_init_from_model(model.handle, params)
        if handle == ffi.NULL:
            raise EngineError(_last_llama_error("llama.cpp could not create a context"))
        self._handle = handle
        self.n_ctx: int = lib.llama_n_ctx(handle)
        self.n_batch: int = lib.llama_n_batch(handle)
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = self.n_ctx // n_seq_max
        self._memory = lib.llama_get_memory(handle)
        self._batch = lib.llama_batch_init(self.n_batch, 0, n_seq_max)
        self.n_in_batch = 0

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

    def decode(self) -> None:
        """Run the model over the queued tokens (the GIL is released meanwhile)."""
        self._batch.n_tokens = self.n_in_batch
        self.n_in_batch = 0
        status = lib.llama_decode(self.handle, self._batch)
        if status != 0:
            raise EngineError(_last_llama_error(f"llama_decode failed with status {status}"))

    def logits(self, batch_index: int) -> Any:
        """float* to the logits of a batch entry, valid until the next decode."""
        ptr = lib.llama_get_logits_ith(self.handle, batch_index)
        if ptr == ffi.NULL:
            raise EngineError(f"no logits for batch entry {batch_index}")
        return ptr

    def clear_sequence(self, seq: int) -> None:
        if self._handle is None:  # the memory is freed with the context
            raise EngineError("context is closed")
        lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def close(self) -> None:
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


class Slot(_Closing):
    """One sequence of a Context: its sampler chain, position and metric state.

    The per-token path lives here (sample): it reads the logits in place, makes
    one C call for the statistics and one for the sampler, and allocates nothing
    the size of the vocabulary.
    """

    def __init__(
        self,
        ctx: Context,
        seq: int,
        sampling: Sampling,
        *,
        ppl_window: int = 16,
        faults: Faults = NO_FAULTS,
    ) -> None:
        sampling.validate()
        self.ctx = ctx
        self.model = ctx.model
        self.seq = seq
        self.sampling = sampling
        self.seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        self.faults = faults
        self._sampler = None if sampling.greedy else _sampler_chain(sampling, self.seed)
        self._stats = ffi.new("fse_logit_stats *")
        self._ppl = PerplexityWindow(ppl_window)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: list[int] = []  # prompt tokens not yet decoded
        self._out = -1  # batch index of this sequence's logits after the last decode
        self.pos = 0  # next position in the sequence
        self.index = 0  # index of the next generated token

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

    @property
    def prefilling(self) -> bool:
        return bool(self._pending)

    def queue_prompt(self, budget: int) -> int:
        """Queue up to `budget` prompt tokens into the next batch; returns how many."""
        chunk = self._pending[:budget]
        del self._pending[:budget]
        last = len(chunk) - 1
        for i, token in enumerate(chunk):
            batch_index = self.ctx.add(token, self.pos, self.seq, i == last and not self._pending)
            self.pos += 1
        self._out = batch_index if not self._pending else -1
        return len(chunk)

    def queue_token(self, token: int) -> None:
        """Queue the token just released, so the next decode yields the next logits."""
        self._out = self.ctx.add(token, self.pos, self.seq, True)
        self.pos += 1

    def sample(self) -> Step:
        """Measure the logits of the last decode and pick the next token."""
        ptr = self.ctx.logits(self._out)
        if self.faults.touches_logits:
            self._inject(ptr)
        stats = self._stats
        lib.fse_logit_stats_compute(ptr, self.model.n_vocab, stats)
        if stats.n_nonfinite:
            # Never hand NaN/Inf to llama.cpp's samplers (their sorts assume an order);
            # the non_finite guard halts this step before anything is released.
            token = max(stats.argmax, 0)
        elif self._sampler is None:
            # Greedy: the kernel's argmax is the first maximum, exactly what
            # llama.cpp's greedy sampler picks, without its 0.2 ms vocabulary copy.
            token = stats.argmax
        else:
            token = lib.llama_sampler_sample(self._sampler, self.ctx.handle, self._out)
        lse = stats.logsumexp
        nll = lse - ptr[token]
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
) -> Generator[Step, None, None]:
    """Single-sequence generation: decode the prompt in batches, then yield each sampled
    token before it is decoded. Stop iterating to stop generating; the sequence is freed."""
    with Slot(ctx, 0, sampling, ppl_window=ppl_window, faults=faults) as slot:
        slot.start(prompt)
        while slot.prefilling:
            slot.queue_prompt(ctx.n_batch)
            ctx.decode()
        for produced in range(max_tokens):
            step = slot.sample()
            yield step
            if step.end_of_generation or produced + 1 == max_tokens:
                return
            slot.queue_token(step.metrics.token)
            ctx.decode()
