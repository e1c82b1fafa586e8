"""End-to-end tests of the in-process engine against the real embedded model.

No mocks of llama.cpp: every test loads the real Gemma 3 270M (session-scoped
`model` fixture) and decodes with it. Generations are kept short (<= 32 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fse._native import ffi, lib
from fse.cli.common import exit_code
from fse.core.engine import Context, ContextOverflow, Slot, Step, generate
from fse.core.errors import EngineError, InputError
from fse.core.faults import NO_FAULTS, Faults
from fse.core.gguf import GGUF_MAGIC, ModelError
from fse.core.model import Model, TooManyTokens
from fse.core.policy import builtin_policy
from fse.core.runner import run_local
from fse.core.types import COMPLETED, ERROR, Request, Sampling, TokenEvent, Verdict
from support.daemons import run_fse

GREEDY = Sampling(temperature=0)
PROMPT = "The capital of France is"
# MATHEMATICAL FRAKTUR CAPITAL U: no token of its own, so four byte-fallback tokens.
FRAKTUR_U = "\U0001d518"


# ---------------------------------------------------------------------------
# helpers


def logits_array(ctx: Context, batch_index: int) -> np.ndarray:
    """A float32 view (no copy) of the logits of one batch entry."""
    ptr = ctx.logits(batch_index)
    return np.frombuffer(ffi.buffer(ptr, ctx.model.n_vocab * 4), dtype=np.float32)


def prefill(slot: Slot, ctx: Context, prompt: Sequence[int]) -> None:
    slot.start(prompt)
    while slot.prefilling:
        slot.queue_prompt(ctx.n_batch)
        ctx.decode()


def token_ids(steps: Iterator[Step]) -> list[int]:
    return [s.metrics.token for s in steps]


def force_tokens(ctx: Context, script: Sequence[int]) -> None:
    """Make greedy decoding pick `script` in order: before each sample, the scripted
    token's logit is raised above the maximum (a logit bias on the real logits).
    Everything after ctx.logits (kernel, argmax, piece, UTF-8 decoding) is real."""
    original: Callable[[int], Any] = ctx.logits
    pending = list(script)

    def biased(batch_index: int) -> Any:
        ptr = original(batch_index)
        if pending:
            view = np.frombuffer(ffi.buffer(ptr, ctx.model.n_vocab * 4), dtype=np.float32)
            view[pending.pop(0)] = view.max() + 30.0
        return ptr

    ctx.logits = biased  # type: ignore[method-assign]


def byte_token(model: Model, byte: int) -> int:
    """The byte-fallback token (<0xNN>) of a byte >= 0x80: its piece is that lone byte."""
    assert byte >= 0x80
    found = [i for i in range(model.n_vocab) if model.piece(i) == bytes([byte])]
    assert len(found) == 1, f"byte 0x{byte:02x}: tokens {found}"
    return found[0]


def local(
    model: Model, ctx: Context, prompt: str, max_tokens: int, sampling: Sampling = GREEDY
) -> tuple[list[TokenEvent], Verdict]:
    events = list(
        run_local(
            model,
            ctx,
            Request(prompt=prompt, max_tokens=max_tokens, sampling=sampling),
            builtin_policy("default"),
        )
    )
    *tokens, verdict = events
    assert isinstance(verdict, Verdict)
    assert all(isinstance(e, TokenEvent) for e in tokens)
    return tokens, verdict  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# tokens and text


def test_tokenize_adds_bos_per_model_rule(model: Model) -> None:
    add_bos = model._meta("tokenizer.ggml.add_bos_token")
    bos_id = model._meta("tokenizer.ggml.bos_token_id")
    assert add_bos == "true"  # Gemma's rule; the assertions below depend on it
    assert bos_id is not None
    bos = int(bos_id)

    with_special = model.tokenize(PROMPT)
    without = model.tokenize(PROMPT, add_special=False)
    assert with_special[0] == bos
    assert with_special[1:] == without
    assert bos not in without
    assert model.piece(bos) == b""  # a control token renders as nothing


def test_tokenize_with_a_limit(model: Model) -> None:
    text = "word " * 300
    full = model.tokenize(text)
    assert model.tokenize(text, max_tokens=len(full)) == full  # exactly at the limit
    with pytest.raises(TooManyTokens) as caught:
        model.tokenize(text, max_tokens=len(full) - 1)
    assert (caught.value.n_tokens, caught.value.limit) == (len(full), len(full) - 1)
    # Far below the limit, the buffer is sized by the text, not by the limit.
    assert model.tokenize("Hi", max_tokens=100_000) == model.tokenize("Hi")


def test_pieces_concatenate_to_the_text(model: Model) -> None:
    text = f"Hello, world! Ünïcödé 中文 😀 {FRAKTUR_U} (rare: byte fallback)"
    tokens = model.tokenize(text, add_special=False)
    pieces = [model.piece(t) for t in tokens]
    assert b"".join(pieces) == text.encode("utf-8")
    assert model.detokenize(tokens) == text
    # Some of those pieces are lone bytes of a multi-byte character (byte fallback).
    assert any(_incomplete_utf8(p) for p in pieces)


def _incomplete_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _utf8_script(model: Model) -> tuple[list[int], str]:
    """Token ids that spell a text through byte-fallback tokens, and that text."""
    text = f"Hi {FRAKTUR_U}"  # four byte tokens
    script = model.tokenize(text, add_special=False)
    # "中" does have a token; spell it with its three byte tokens instead.
    script += [byte_token(model, b) for b in "中".encode()]
    script += model.tokenize(" ok é", add_special=False)
    return script, text + "中" + " ok é"


@pytest.mark.slow  # long generations on the real model
def test_token_ending_inside_a_utf8_character_is_held(model: Model, ctx: Context) -> None:
    script, expected = _utf8_script(model)
    assert any(_incomplete_utf8(model.piece(t)) for t in script)
    force_tokens(ctx, script)
    steps = list(generate(ctx, model.tokenize("Say:"), GREEDY, len(script)))

    assert [s.metrics.token for s in steps] == script
    pieces = [s.piece for s in steps]
    assert pieces == [model.piece(t) for t in script]
    assert "".join(s.text for s in steps) == b"".join(pieces).decode("utf-8") == expected
    assert all("\ufffd" not in s.text for s in steps)
    for step in steps:
        if step.piece[:1] in (b"\xf0", b"\xe4"):  # a lead byte: nothing complete yet
            assert step.text == ""
    # The byte that completes a character releases all of it at once.
    completing = {s.text for s in steps if s.piece in (b"\x98", b"\xad")}
    assert completing == {FRAKTUR_U, "中"}


@pytest.mark.slow  # long generations on the real model
def test_token_event_text_holds_incomplete_utf8(model: Model, ctx: Context) -> None:
    script, expected = _utf8_script(model)
    force_tokens(ctx, script)
    tokens, verdict = local(model, ctx, "Say:", len(script))

    assert verdict.status == COMPLETED
    assert [e.token for e in tokens] == script
    assert "".join(e.text for e in tokens) == expected == verdict.text
    assert b"".join(e.piece for e in tokens).decode("utf-8") == expected
    assert all("\ufffd" not in e.text for e in tokens)
    assert any(e.text == "" and e.piece for e in tokens)  # a held partial character


# ---------------------------------------------------------------------------
# sampling


def test_greedy_kernel_argmax_and_metrics_match_llama_cpp(model: Model, ctx: Context) -> None:
    """Slot.sample's greedy pick (the C kernel's argmax) is llama.cpp's greedy sampler's
    pick, and its metrics equal a float64 numpy computation over the same logits."""
    greedy = lib.llama_sampler_init_greedy()
    try:
        with Slot(ctx, 0, GREEDY) as slot:
            prefill(slot, ctx, model.tokenize(PROMPT))
            for _ in range(8):
                x = logits_array(ctx, slot._out).astype(np.float64)
                expected = lib.llama_sampler_sample(greedy, ctx.handle, slot._out)
                step = slot.sample()
                m = step.metrics
                assert m.token == expected == int(np.argmax(x))

                top = x.max()
                lse = top + math.log(np.exp(x - top).sum())
                assert m.l2_norm == pytest.approx(float(np.sqrt((x * x).sum())), rel=1e-5)
                assert m.variance == pytest.approx(float(x.var()), rel=1e-4)
                assert m.max_prob == pytest.approx(math.exp(top - lse), rel=1e-4)
                assert m.nll == pytest.approx(lse - x[m.token], rel=1e-4, abs=1e-4)
                slot.queue_token(m.token)
                ctx.decode()
    finally:
        lib.llama_sampler_free(greedy)


def test_greedy_is_deterministic(model: Model, ctx: Context) -> None:
    prompt = model.tokenize(PROMPT)
    first = token_ids(generate(ctx, prompt, GREEDY, 16))
    second = token_ids(generate(ctx, prompt, GREEDY, 16))
    assert len(first) == 16
    assert first == second
    assert model.detokenize(first).startswith(" the capital")


@pytest.mark.slow  # long generations on the real model
def test_seed_reproduces_and_different_seeds_differ(model: Model, ctx: Context) -> None:
    prompt = model.tokenize("Once upon a time")

    def run(seed: int) -> list[int]:
        return token_ids(generate(ctx, prompt, Sampling(temperature=0.8, seed=seed), 16))

    a1, a2, b, c = run(1), run(1), run(2), run(3)
    assert a1 == a2
    assert len({tuple(a1), tuple(b), tuple(c)}) >= 2
    assert a1 != b or a1 != c


def test_metrics_are_sane_on_real_steps(model: Model, ctx: Context) -> None:
    steps = list(generate(ctx, model.tokenize(PROMPT), GREEDY, 12))
    assert [s.metrics.index for s in steps] == list(range(12))
    for s in steps:
        m = s.metrics
        assert 1_000 < m.l2_norm < 10_000  # Gemma: 2,000-6,000
        assert 0 < m.max_prob <= 1
        assert m.variance > 0
        assert m.nll >= 0
        assert m.non_finite == 0
        assert m.ppl >= 1
        assert m.ppl_cumulative >= 1
        assert math.isfinite(m.ppl)
    # Greedy text on a factual prompt is healthy: far under the 400 threshold.
    assert max(s.metrics.ppl for s in steps) < 200


# ---------------------------------------------------------------------------
# lifetimes and limits


def test_context_frees_deterministically(model: Model) -> None:
    with Context(model, n_ctx=256, n_threads=2) as c:
        assert c.handle is not None
        slot = Slot(c, 0, GREEDY)
        prefill(slot, c, model.tokenize("Hi"))
        slot.close()
    with pytest.raises(EngineError, match="closed"):
        _ = c.handle
    with pytest.raises(EngineError, match="closed"):
        c.decode()
    with pytest.raises(EngineError, match="closed"):
        c.add(2, 0, 0, True)  # would write into the freed batch
    with pytest.raises(EngineError, match="closed"):
        c.clear_sequence(0)
    with pytest.raises(EngineError, match="closed"):
        c.logits(0)
    c.close()  # idempotent


@pytest.mark.parametrize("threads", [0, -1, 100_000])
def test_context_rejects_thread_counts_llama_cpp_would_abort_on(model: Model, threads: int) -> None:
    with pytest.raises(ValueError, match=r"n_threads: .*accepted: 1\.\.512"):
        Context(model, n_ctx=256, n_threads=threads)


def test_model_frees_deterministically(model_path: Path) -> None:
    with Model(model_path) as m:
        assert m.tokenize("Hi")[0] == 2
        assert m.n_vocab == 262_144
    with pytest.raises(EngineError, match="closed"):
        _ = m.handle
    with pytest.raises(EngineError, match="closed"):
        m.tokenize("Hi")  # would read the freed vocabulary
    with pytest.raises(EngineError, match="closed"):
        m.piece(12345)  # not cached: would read the freed vocabulary
    with pytest.raises(EngineError, match="closed"):
        m.is_end_of_generation(1)
    with pytest.raises(EngineError, match="closed"):
        Context(m, n_ctx=256)
    m.close()  # idempotent


def test_prompt_longer_than_context_is_context_overflow(model: Model) -> None:
    with Context(model, n_ctx=256, n_threads=2) as c:
        assert c.n_ctx_seq == 256
        prompt = model.tokenize("la " * 400)
        assert len(prompt) > 256
        with pytest.raises(ContextOverflow, match="256"):
            list(generate(c, prompt, GREEDY, 4))


@pytest.mark.slow  # long generations on the real model
def test_generating_past_the_context_is_context_overflow(model: Model) -> None:
    with Context(model, n_ctx=256, n_threads=2) as c:
        prompt = model.tokenize("la " * 260)[:250]
        released: list[Step] = []
        with pytest.raises(ContextOverflow, match="context limit of 256"):
            released.extend(generate(c, prompt, GREEDY, 32))
        # Positions 250..255 are left: 6 tokens are decoded there, and the 7th (sampled
        # from position 255's logits) is yielded but cannot be queued.
        assert len(released) == 7

        # Through the guarded runner it is an `error` verdict, not a crash.
        tokens, verdict = local(model, c, "la" + " la" * 248, 32)  # 250 tokens
        assert verdict.status == ERROR
        assert verdict.guard == "internal"
        assert "context limit" in verdict.message
        assert verdict.tokens == len(tokens) == 7
        assert exit_code(verdict) == 1


def test_model_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    directory = tmp_path / "dir.gguf"
    directory.mkdir()
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, not a model\n")
    short = tmp_path / "short.gguf"
    short.write_bytes(GGUF_MAGIC + b"\x03\x00")
    for path, why in [
        (missing, "no such file"),
        (directory, "not a regular file"),
        (not_gguf, "not a GGUF file"),
        (short, "truncated GGUF header"),
    ]:
        with pytest.raises(ModelError) as info:
            Model(path)
        message = str(info.value)
        assert str(path) in message
        assert why in message
        assert "\n" not in message


def test_truncated_gguf_is_a_model_error_not_a_crash(model_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(1 << 20))
    assert truncated.read_bytes()[:4] == GGUF_MAGIC

    result = run_fse("generate", "--local", "hi", "--model", str(truncated), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(truncated) in lines[0]
    assert "--model" in lines[0]
    assert "Traceback" not in result.stderr


def test_truncated_gguf_in_process_is_a_model_error(model_path: Path, tmp_path: Path) -> None:
    """Past the metadata, with the tensor data cut off: llama.cpp must refuse, not crash."""
    truncated = tmp_path / "no-tensors.gguf"
    with model_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(48 << 20))
    with pytest.raises(ModelError) as info:
        Model(truncated)
    assert str(truncated) in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# fault injection specs


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["nan@3"], Faults(nan_at=3)),
        (["inf@0"], Faults(inf_at=0)),
        (["scale@1:1000"], Faults(scale_at=1, scale=1000.0)),
        (["scale@2:0.5"], Faults(scale_at=2, scale=0.5)),
        (["guard-error@2"], Faults(guard_error_at=2)),
        (["nan@1", "guard-error@4"], Faults(nan_at=1, guard_error_at=4)),
        ([], NO_FAULTS),
    ],
)
def test_faults_parse_accepts(specs: list[str], expected: Faults) -> None:
    faults = Faults.parse(specs)
    assert faults == expected
    assert faults.touches_logits == any(s.split("@")[0] in ("nan", "inf", "scale") for s in specs)


@pytest.mark.parametrize(
    "spec",
    [
        "bogus",
        "nan",
        "nan@",
        "nan@x",
        "nan@-1",
        "nan@1:2",
        "inf@1.5",
        "scale@1",
        "scale@1:",
        "scale@1:lots",
        "guard-error@2:1",
        "boom@1",
        "@1",
    ],
)
def test_faults_parse_rejects_with_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        Faults.parse([spec])
    message = str(info.value)
    assert repr(spec) in message
    for form in ("nan@K", "inf@K", "scale@K:FACTOR", "guard-error@K"):
        assert form in message


def test_gpu_layers_follow_what_the_build_can_do(model_path: Path) -> None:
    """ "auto" (the default) puts every layer on a GPU when llama.cpp has one, else runs on the
    CPU; a count of GPU layers where there is no GPU is refused, never silently ignored."""
    from fse.core.model import GPU_LAYERS_AUTO, gpu_offload, offloaded_layers

    assert offloaded_layers(0) == 0
    if gpu_offload():
        assert offloaded_layers(GPU_LAYERS_AUTO) == -1 and offloaded_layers(3) == 3
        assert offloaded_layers("all") == -1
        return
    assert offloaded_layers(GPU_LAYERS_AUTO) == 0
    with pytest.raises(InputError, match=r"^gpu_layers: 3 layers asked for a GPU, but this"):
        offloaded_layers(3)
    with pytest.raises(InputError, match=r"^gpu_layers: every layer asked for a GPU, but"):
        offloaded_layers("all")
    with pytest.raises(InputError, match=r"^gpu_layers: -1 is not accepted; accepted: \"auto\""):
        offloaded_layers(-1)
    with Model(model_path) as m:  # the default on this CPU-only build: nothing offloaded
        assert (m.n_layer, m.gpu_layers) == (18, 0)  # Gemma 3 270M has 18 layers


def test_layers_offloaded_count_the_output_layer_as_llama_cpp_does() -> None:
    from fse.core.model import repeating_layers_offloaded

    cases = {-1: 18, 0: 0, 1: 0, 2: 1, 18: 17, 19: 18, 99: 18}
    for n_gpu_layers, repeating in cases.items():
        assert repeating_layers_offloaded(n_gpu_layers, 18) == repeating, n_gpu_layers


def test_a_model_loads_with_llama_cpps_split_settings(model_path: Path) -> None:
    """main_gpu, split_mode and the GPUs' shares pass through to llama.cpp; on a CPU they
    change nothing, and bad shares are refused naming the key."""
    from fse.core.model import devices, tensor_split

    assert tensor_split("") == [] and tensor_split("3, 1") == [3.0, 1.0]
    for bad in ("3,x", "0,0", "-1", ",".join(["1"] * 17)):
        with pytest.raises(InputError, match=r"^tensor_split: .* is not accepted; accepted: "):
            tensor_split(bad)
    with Model(model_path, gpu_layers=0, main_gpu=0, split_mode="row", split=[3.0, 1.0]) as m:
        assert m.gpu_layers == 0 and m.tokenize("Hello")
    assert any(d.kind == "cpu" for d in devices())
