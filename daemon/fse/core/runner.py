"""One guarded stream in this process (`fse generate --local`, the tools' local runner).

The same GuardedStream rules as the daemon's scheduler decide cancel, deadline,
max_tokens and engine errors, so --local and --addr cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial

from fse.core.engine import Context, generate
from fse.core.errors import EngineError, InputError
from fse.core.faults import NO_FAULTS, Faults
from fse.core.model import Model
from fse.core.policy import Policy
from fse.core.stream import Deadline, GuardedStream
from fse.core.types import COMPLETED, MAX_TOKENS, Event, Request


def prompt_tokens(model: Model, request: Request, max_tokens: int | None = None) -> list[int]:
    """Tokenize the request's prompt, or its messages through the chat template.

    With max_tokens, a longer prompt raises TooManyTokens (and is never listed)."""
    if request.messages and request.prompt:
        raise InputError("prompt: set either prompt or messages, not both")
    if request.messages:
        for i, (role, _) in enumerate(request.messages):
            if not role:
                raise InputError(f"messages[{i}].role: must not be empty")
        try:
            text = model.apply_chat_template(request.messages)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        # The rendered template starts with BOS itself where the model wants one.
        tokens = model.tokenize(text, add_special=False, parse_special=True, max_tokens=max_tokens)
    else:
        if not request.prompt:
            raise InputError("prompt: must not be empty (or send messages)")
        tokens = model.tokenize(
            request.prompt, add_special=True, parse_special=False, max_tokens=max_tokens
        )
    if not tokens:
        raise InputError("prompt: no tokens after tokenization")
    return tokens


def content_mask(model: Model, request: Request, tokens: Sequence[int]) -> list[bool] | None:
    """For a chat request, which prompt tokens are the messages' own text (True) rather
    than the chat template's (role markers, turn tokens): the prompt guards judge the
    text the caller sent, not the template. None for a raw prompt (all of it counts),
    and None too if the tokens do not spell the rendered template byte for byte (then
    every token is judged: stricter, never looser)."""
    if not request.messages:
        return None
    rendered = model.apply_chat_template(request.messages).encode()
    spans, at = [], 0
    for _, content in request.messages:
        data = content.encode()
        start = rendered.find(data, at) if data else -1
        if start >= 0:
            spans.append((start, start + len(data)))
            at = start + len(data)
    mask, offset = [], 0
    for token in tokens:
        end = offset + len(model.piece(token, special=True))
        mask.append(any(s <= offset and end <= e for s, e in spans))
        offset = end
    return mask if offset == len(rendered) else None


def run_local(
    model: Model,
    ctx: Context,
    request: Request,
    policy: Policy,
    *,
    faults: Faults = NO_FAULTS,
    cancel: threading.Event | None = None,
) -> Iterator[Event]:
    """Guarded generation in this process: token events, then exactly one Verdict."""
    tokens = prompt_tokens(model, request)
    # The budget runs from here, after tokenizing, as the daemon's runs from admission.
    deadline = Deadline.start(request.timeout, time.monotonic())
    stream = GuardedStream(
        policy, request.stop, faults, max_tokens=request.max_tokens, deadline=deadline
    )
    steps = generate(
        ctx,
        tokens,
        request.sampling,
        request.max_tokens,
        ppl_window=policy.ppl_window,
        faults=faults,
        prompt_judge=(
            partial(stream.judge_prompt, content=content_mask(model, request, tokens))
            if stream.scores_prompt
            else None
        ),
    )
    try:
        for step in steps:
            cancelled = cancel is not None and cancel.is_set()
            yield from stream.before_step(cancelled, time.monotonic(), step.metrics.index)
            if stream.verdict is None:
                yield from stream.step(step)
            if stream.verdict is not None:
                break
        else:
            if stream.verdict is None:  # the engine stopped early (its own max_tokens)
                yield from stream.finish(COMPLETED, completion=MAX_TOKENS)
    except EngineError as exc:
        yield from stream.fail(str(exc))
    finally:
        steps.close()
    assert stream.verdict is not None
    yield stream.verdict
