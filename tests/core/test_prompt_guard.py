"""prompt_perplexity against the real model: the prompt scored during prefill, judged
once before the first token, in this process (the daemon's tests are in tests/serve)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from fse.core.engine import SCORED_PER_DECODE, Context, generate
from fse.core.model import Model
from fse.core.policy import Policy, PromptPerplexityGuard, builtin_policy
from fse.core.runner import content_mask, prompt_tokens, run_local
from fse.core.types import HALTED, Request, Sampling, TokenEvent, Verdict

GREEDY = Sampling(temperature=0)
ORDINARY = "Write a detailed history of the city of Lyon, from the Romans to today."
RANDOM_SUFFIX = (
    "Tell me about the weather today. quartz vivid ZEBRA ]]; oblong $$ flux Kettle 99 "
    "amber ~ sprocket nimbus !! gravel"
)
GUARDED = dataclasses.replace(builtin_policy("pro"), prompt_perplexity=PromptPerplexityGuard())


def nll_of(ctx: Context, tokens: Sequence[int]) -> list[float]:
    got: list[float] = []

    def judge(nll: Sequence[float]) -> bool:
        got.extend(nll)
        return False

    assert list(generate(ctx, tokens, GREEDY, 4, prompt_judge=judge)) == []
    return got


def test_a_random_suffix_is_refused_before_any_token(model: Model, ctx: Context) -> None:
    events = list(run_local(model, ctx, Request(RANDOM_SUFFIX, max_tokens=8), GUARDED))
    assert not any(isinstance(e, TokenEvent) for e in events)
    (verdict,) = events
    assert isinstance(verdict, Verdict)
    assert (verdict.status, verdict.guard, verdict.token_index) == (
        HALTED,
        "prompt_perplexity",
        0,
    )
    assert verdict.tokens == 0 and verdict.text == ""
    assert verdict.value is not None and verdict.value > verdict.threshold  # type: ignore[operator]


def test_an_ordinary_prompt_passes_and_generates_as_without_the_guard(
    model: Model, ctx: Context
) -> None:
    request = Request(ORDINARY, max_tokens=12, sampling=GREEDY)
    guarded = list(run_local(model, ctx, request, GUARDED))
    plain = list(run_local(model, ctx, request, builtin_policy("pro")))
    tokens = [e.token for e in guarded if isinstance(e, TokenEvent)]
    assert len(tokens) == 12
    assert tokens == [e.token for e in plain if isinstance(e, TokenEvent)]
    assert guarded[-1].status == plain[-1].status  # type: ignore[union-attr]


def test_every_prompt_token_is_scored_whatever_the_chunks(model: Model) -> None:
    """A prompt several times SCORED_PER_DECODE long gets one nll per token after the
    first, the same however the prompt is cut into decodes."""
    tokens = model.tokenize(" ".join([ORDINARY] * 6))
    assert len(tokens) > 3 * SCORED_PER_DECODE
    with (
        Context(model, n_ctx=1024, n_batch=512) as wide,
        Context(model, n_ctx=1024, n_batch=8) as narrow,
    ):
        a, b = nll_of(wide, tokens), nll_of(narrow, tokens)
    assert len(a) == len(b) == len(tokens) - 1
    assert all(math.isfinite(x) and x >= 0 for x in a)
    assert a == pytest.approx(b, rel=1e-3, abs=1e-3)


def test_a_policy_without_prompt_guards_scores_nothing(ctx: Context) -> None:
    assert list(generate(ctx, ctx.model.tokenize("Hello"), GREEDY, 2))
    assert Policy("plain").prompt_perplexity is None


def test_chat_messages_are_judged_on_their_own_text(model_path: Path) -> None:
    """The template's own tokens (turn markers, role names) are not the caller's text:
    only the messages' tokens are judged; gibberish in a message is refused, the same
    request as ordinary text passes."""
    with Model(model_path) as chat:
        chat.use_chat_template("gemma")
        ordinary = Request(messages=(("user", ORDINARY),), max_tokens=4, sampling=GREEDY)
        tokens = prompt_tokens(chat, ordinary)
        mask = content_mask(chat, ordinary, tokens)
        assert mask is not None and len(mask) == len(tokens)
        marked = b"".join(
            chat.piece(t, special=True) for t, m in zip(tokens, mask, strict=True) if m
        )
        assert marked.decode() == ORDINARY
        assert content_mask(chat, Request(ORDINARY), tokens) is None  # a raw prompt: all
        inputs = Policy("inputs", prompt_perplexity=PromptPerplexityGuard())
        with Context(chat, n_ctx=512) as ctx:
            passed = list(run_local(chat, ctx, ordinary, inputs))
            refused = list(
                run_local(chat, ctx, Request(messages=(("user", RANDOM_SUFFIX),)), inputs)
            )
    assert passed[-1].guard is None and len(passed) == 5  # type: ignore[union-attr]
    assert refused[-1].guard == "prompt_perplexity" and len(refused) == 1  # type: ignore[union-attr]
