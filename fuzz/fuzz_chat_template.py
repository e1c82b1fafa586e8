"""Fuzz target: the chat-template path (fse.core.model.Model.apply_chat_template, and
fse.core.runner.prompt_tokens, which renders then tokenizes a chat request) with the
embedded model, loaded once, under llama.cpp's built-in templates an operator may pick
(model.chat_template).

Invariants: rendering returns text or raises ValueError with a message, tokenizing
InputError (TooManyTokens is one); with the gemma and chatml templates, the rendered
text holds every message's content (gemma: trimmed, and system messages merged into the
next user turn, so only the others are checked) and ends with the assistant's turn; the
tokens are ids of the vocabulary, at most the limit.
"""

from __future__ import annotations

from functools import cache

from fse.core.errors import InputError
from fse.core.gguf import default_model_path
from fse.core.model import Model
from fse.core.runner import prompt_tokens
from fse.core.types import Request
from fuzzlib import Reader, main, refused

TEMPLATES = ("gemma", "chatml", "llama3", "mistral-v7", "phi3", "zephyr", "llama2")
ROLES = ("user", "assistant", "system", "model", "tool", "")
ENDS = {"gemma": "<start_of_turn>model\n", "chatml": "<|im_start|>assistant\n"}
C_SPACE = " \t\n\v\f\r"  # what llama.cpp's trim() removes
MAX_TOKENS = 2047


@cache
def embedded() -> Model:
    return Model(default_model_path())


def check(model: Model, data: bytes) -> None:
    reader = Reader(data)
    template = reader.pick(TEMPLATES)
    model.use_chat_template(template)
    messages = tuple(
        (reader.pick(ROLES) if reader.chance() else reader.text(12), reader.text(80))
        for _ in range(reader.below(5))
    )
    rendered, _error = refused(lambda: model.apply_chat_template(messages), ValueError)
    if rendered is None:
        return
    assert isinstance(rendered, str)
    if template in ENDS:
        assert rendered.endswith(ENDS[template]), f"{template}: {rendered!r}"
        for role, content in messages:
            if template == "gemma" and role == "system":
                continue
            text = content.strip(C_SPACE) if template == "gemma" else content
            assert text in rendered, f"{template}: {content!r} is not in {rendered!r}"
    request = Request(messages=messages)
    tokens, _ = refused(lambda: prompt_tokens(model, request, MAX_TOKENS), InputError)
    if tokens is not None:
        assert 0 < len(tokens) <= MAX_TOKENS
        assert all(0 <= t < model.n_vocab for t in tokens)


def one_input(data: bytes) -> None:
    check(embedded(), data)


if __name__ == "__main__":
    embedded()  # loaded before the first input: its load is not that input's time
    main(one_input)
