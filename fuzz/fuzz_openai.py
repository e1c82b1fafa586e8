"""Fuzz target: the OpenAI-compatible HTTP request parser (fse.serve.http.openai_wire:
parse_body, parse_request for /v1/chat/completions and /v1/completions), then the
domain's check_request as the HTTP door runs it.

Two modes: arbitrary bytes as the body, and a JSON object built from the input out of
the fields libfse knows and a few it does not, each given a value of any JSON type.

Invariants: the parser raises only WireError (status 400 or 404, a message, `param`
None or a string) and validation only InputError; an Ask holds a Request whose prompt
is a string, messages (str, str) pairs, stop a tuple of strings, no prompt from the chat
endpoint and no messages from the completions one; a request that passes check_request
has its sampling in range.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fse.core.errors import InputError
from fse.serve.http.openai_wire import (
    CHAT,
    COMPLETIONS,
    FIELDS,
    WireError,
    parse_body,
    parse_request,
)
from fse.serve.scheduler import Limits
from fse.serve.service import check_request
from fuzzlib import Reader, main, refused

MODEL = "gemma-3-270m-it"
LIMITS = Limits(max_tokens=2047, ctx_per_stream=2048)
NAMES = tuple(sorted(FIELDS[CHAT] | FIELDS[COMPLETIONS] | {"functions", "tools", "logit_bias"}))


def value(reader: Reader, depth: int = 0) -> Any:
    kind = reader.below(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return reader.chance()
    if kind == 2:
        return reader.integer()
    if kind == 3:
        number = reader.number()
        return number if math.isfinite(number) else 1e308
    if kind in (4, 5):
        return MODEL if reader.below(4) == 0 else reader.text(32)
    if kind == 6:
        return [value(reader, depth + 1) for _ in range(reader.below(4))]
    if kind == 7:  # a message or a content part
        part = {"role": reader.text(8), "content": value(reader, depth + 1)}
        if reader.chance():
            part = {"type": reader.pick(("text", "image_url")), "text": value(reader, depth + 1)}
        return part
    return {reader.text(8): value(reader, depth + 1) for _ in range(reader.below(3))}


def body(reader: Reader) -> bytes:
    doc = {reader.pick(NAMES): value(reader) for _ in range(reader.below(8))}
    return json.dumps(doc).encode()


def one_input(data: bytes) -> None:
    reader = Reader(data)
    endpoint = CHAT if reader.chance() else COMPLETIONS
    raw = body(reader) if reader.chance() else reader.rest()

    def parse() -> Any:
        return parse_request(endpoint, parse_body(raw), MODEL, "req-1")

    ask, error = refused(parse, WireError)
    if ask is None:
        assert isinstance(error, WireError) and error.status in (400, 404), error
        assert error.param is None or isinstance(error.param, str)
        json.dumps(error.body())
        return
    request = ask.request
    assert isinstance(request.prompt, str)
    assert all(isinstance(r, str) and isinstance(c, str) for r, c in request.messages)
    assert isinstance(request.stop, tuple) and all(isinstance(s, str) for s in request.stop)
    if endpoint == CHAT:
        assert request.prompt == "", "a prompt from the chat endpoint"
    else:
        assert request.messages == (), "messages from the completions endpoint"
    _, refusal = refused(lambda: check_request(request, LIMITS), InputError)
    if refusal is None:
        s = request.sampling
        assert math.isfinite(s.temperature) and s.temperature >= 0
        assert 0 < s.top_p <= 1 and 0 <= s.min_p <= 1 and s.top_k >= 0


if __name__ == "__main__":
    main(one_input)
