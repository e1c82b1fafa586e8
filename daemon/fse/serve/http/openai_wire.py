"""Translation between OpenAI's JSON and the domain: requests in, events and verdicts
out. The HTTP analogue of fse.serve.wire: nothing here decides anything.

A request body becomes an `Ask` (a domain `Request` and how to answer it), or a
`WireError` naming the field: every field libfse does not honour is refused, never
ignored. Ranges are checked by the domain itself (GuardService.prepare), so an
out-of-range value reads as it does over gRPC. Events become OpenAI's response
objects and stream chunks, with libfse's own `fse` (a token's metrics) and
`fse_verdict` (how the stream ended) beside OpenAI's fields.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fse.core.types import (
    COMPLETED,
    HALTED,
    MAX_TOKENS,
    SHUTDOWN,
    Request,
    Sampling,
    TokenEvent,
    Verdict,
)
from fse.core.values import ValueRefused, check, describe

CHAT = "chat.completions"
COMPLETIONS = "completions"

# Fields each endpoint accepts (docs/http.md says what each does).
COMMON_FIELDS = frozenset(
    {
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
        "stream", "stream_options", "user", "top_k", "min_p", "policy", "n",
        "frequency_penalty", "presence_penalty",
    }
)  # fmt: skip
FIELDS = {
    CHAT: COMMON_FIELDS | {"messages", "logprobs", "top_logprobs"},
    COMPLETIONS: COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of"},
}
# Fields accepted only with the value that asks for nothing libfse cannot do.
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "echo": False,
    "top_logprobs": 0,
}
NEUTRAL_WORDS = {
    "n": "1 (one choice per request)",
    "best_of": "1",
    "frequency_penalty": "0 (libfse applies no penalties)",
    "presence_penalty": "0 (libfse applies no penalties)",
    "echo": "false",
    "top_logprobs": "0 (the logprob of each released token only)",
}

JSON_SEPARATORS = (",", ":")


class WireError(Exception):
    """A request libfse refuses, as OpenAI's error object and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None, code: str | None = None) -> WireError:
    """A 400 naming `param`."""
    return WireError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class Ask:
    """One OpenAI request, translated: the domain's Request and how to answer it."""

    endpoint: str  # CHAT or COMPLETIONS
    id: str  # chatcmpl-... / cmpl-...: the response's id and the stream's request_id
    request: Request
    max_tokens_given: bool  # absent: as many as fit after the prompt (prepare widens it)
    max_tokens_field: str  # the field that gave it: max_tokens or max_completion_tokens
    stream: bool
    include_usage: bool
    logprobs: bool
    user: str | None


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT else "cmpl-") + secrets.token_hex(12)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"request body: not valid JSON ({exc})", None, "invalid_json") from None


def _get(body: Mapping[str, Any], name: str, kind: type, accepted: str) -> Any:
    """The field's value if present and not null, type-checked; ranges are the domain's."""
    value = body.get(name)
    if value is None:
        return None
    try:
        return check(name, value, kind, lambda _: True, accepted)
    except ValueRefused as exc:
        raise bad(str(exc), name) from None


def parse_request(endpoint: str, body: Any, model_id: str, request_id: str) -> Ask:
    """An OpenAI request body as an Ask, or a WireError (400 naming the field; 404 for a
    model that is not served)."""
    if not isinstance(body, dict):
        raise bad(f"request body: expected a JSON object, got {describe(body)}", None)
    fields = FIELDS[endpoint]
    for name, value in body.items():
        if name not in fields:
            if value is None:
                continue  # null is absent, as OpenAI reads it
            raise bad(
                f"{name}: not supported by libfse; accepted fields: {', '.join(sorted(fields))}",
                name,
                "unsupported_parameter",
            )
        if name in NEUTRAL and value is not None and not _is_neutral(value, NEUTRAL[name]):
            raise bad(
                f"{name}: {json.dumps(value)[:40]} is not supported; "
                f"accepted: {NEUTRAL_WORDS[name]}",
                name,
                "unsupported_value",
            )
    model = _get(body, "model", str, "the served model's id (GET /v1/models)")
    if model is not None and model != model_id:
        raise WireError(
            404,
            f"model: {json.dumps(model[:128])} is not served here; accepted: "
            f"{json.dumps(model_id)} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    max_tokens, field = _max_tokens(body)
    defaults = Sampling()
    temperature = _get(body, "temperature", float, "finite >= 0; 0 = greedy")
    top_k = _get(body, "top_k", int, ">= 0 (0 = off)")
    top_p = _get(body, "top_p", float, "0 < top_p <= 1")
    min_p = _get(body, "min_p", float, "0 <= min_p <= 1")
    seed = _get(body, "seed", int, "0 <= seed < 2^32")
    sampling = Sampling(
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        min_p=defaults.min_p if min_p is None else min_p,
        seed=seed,
    )
    stream = bool(_get(body, "stream", bool, "true or false"))
    include_usage = _stream_options(body, stream)
    policy = _get(body, "policy", str, "the name of a policy the daemon serves")
    user = _get(body, "user", str, "a string")
    if endpoint == CHAT:
        messages = _messages(body)
        prompt = ""
        logprobs = bool(_get(body, "logprobs", bool, "true or false"))
    else:
        messages = ()
        prompt = _prompt(body)
        logprobs = _completion_logprobs(body)
    request = Request(
        prompt=prompt,
        messages=messages,
        max_tokens=1 if max_tokens is None else max_tokens,
        sampling=sampling,
        policy=policy or "default",
        stop=_stop(body),
        request_id=request_id,
    )
    return Ask(
        endpoint,
        request_id,
        request,
        max_tokens is not None,
        field,
        stream,
        include_usage,
        logprobs,
        user,
    )


def _is_neutral(value: Any, neutral: Any) -> bool:
    """Whether `value` is the neutral value (0.0 for 0; never a boolean for a number)."""
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return isinstance(value, int | float) and value == neutral


def _max_tokens(body: Mapping[str, Any]) -> tuple[int | None, str]:
    accepted = "an integer 1..the daemon's max_tokens limit"
    legacy = _get(body, "max_tokens", int, accepted)
    modern = _get(body, "max_completion_tokens", int, accepted)
    if legacy is not None and modern is not None and legacy != modern:
        raise bad(
            f"max_completion_tokens: {modern} differs from max_tokens {legacy}; "
            "accepted: one of them, or both equal",
            "max_completion_tokens",
        )
    if modern is not None:
        return modern, "max_completion_tokens"
    return legacy, "max_tokens"


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options: only with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise bad(f"stream_options: expected an object, got {describe(options)}", "stream_options")
    for name, value in options.items():
        if name != "include_usage" and value is not None:
            raise bad(
                f"stream_options.{name}: not supported by libfse; accepted: include_usage",
                f"stream_options.{name}",
                "unsupported_parameter",
            )
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise bad(
            f"stream_options.include_usage: expected a boolean, got {describe(usage)}",
            "stream_options.include_usage",
        )
    return bool(usage)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad(f"stop: expected a string or an array of strings, got {describe(stop)}", "stop")


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise bad("prompt: required (one string)", "prompt")
    raise bad(
        f"prompt: expected one string, got {describe(prompt)}; accepted: one string "
        "(no arrays of prompts or of tokens)",
        "prompt",
    )


def _completion_logprobs(body: Mapping[str, Any]) -> bool:
    value = body.get("logprobs")
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"logprobs: expected an integer, got {describe(value)}; accepted: 0", "logprobs")
    if value != 0:
        raise bad(
            f"logprobs: {value} is not supported; accepted: 0 (the logprob of each released "
            "token only)",
            "logprobs",
            "unsupported_value",
        )
    return True


def _messages(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(
            f"messages: expected a non-empty array of messages, got {describe(messages)}",
            "messages",
        )
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where}: expected an object, got {describe(message)}", "messages")
        for name, value in message.items():
            if name not in ("role", "content") and value is not None:
                raise bad(
                    f"{where}.{name}: not supported by libfse; accepted: role, content",
                    "messages",
                    "unsupported_parameter",
                )
        role = message.get("role")
        if not isinstance(role, str):
            raise bad(f"{where}.role: expected a string, got {describe(role)}", "messages")
        out.append((role, _content(message.get("content"), where)))
    return tuple(out)


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or text parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(
            f"{where}.content: expected a string or an array of text parts, got "
            f"{describe(content)}",
            "messages",
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise bad(
                f"{at}.type: {describe(kind)} is not supported; accepted: text",
                "messages",
                "unsupported_value",
            )
        extra = [k for k in part if k not in ("type", "text")]
        if extra:
            raise bad(
                f"{at}.{extra[0]}: not supported by libfse; accepted: type, text",
                "messages",
                "unsupported_parameter",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{at}.text: expected a string, got {describe(text)}", "messages")
        texts.append(text)
    return "".join(texts)


def param_of(message: str, ask: Ask | None) -> str | None:
    """The OpenAI field a domain error message names ("sampling.top_p: ..." -> top_p)."""
    head = message.split(":", 1)[0]
    name = head.removeprefix("sampling.").split("[", 1)[0].split(".", 1)[0]
    if name == "max_tokens" and ask is not None:
        return ask.max_tokens_field
    if name == "prompt" and ask is not None and ask.endpoint == CHAT:
        return "messages"
    known = FIELDS[ask.endpoint] if ask is not None else COMMON_FIELDS
    return name if name in known else None


# -- out ------------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    """A number for JSON: None for NaN and infinities (JSON has none)."""
    return x if x is not None and math.isfinite(x) else None


def finish_reason(verdict: Verdict) -> str | None:
    """OpenAI's finish_reason, or None when the stream did not end with an answer (an
    error, a shutdown, a cancel): then the client must get an error, never a finish."""
    if verdict.status == COMPLETED:
        return "length" if verdict.completion == MAX_TOKENS else "stop"
    if verdict.status == HALTED and verdict.guard != SHUTDOWN:
        return "content_filter"
    return None


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    """`fse_verdict`: the domain's Verdict, without the text (the response holds it)."""
    return {
        "status": str(verdict.status),
        "guard": verdict.guard,
        "value": _num(verdict.value),
        "threshold": _num(verdict.threshold),
        "token_index": verdict.token_index,
        "tokens": verdict.tokens,
        "policy": verdict.policy,
        "policy_sha256": verdict.policy_sha256,
        "completion": verdict.completion,
        "message": verdict.message,
    }


def token_json(event: TokenEvent) -> dict[str, Any]:
    """`fse`: one released token's metrics, for a UI to colour text by health."""
    m = event.metrics
    out: dict[str, Any] = {
        "index": event.index,
        "nll": _num(m.nll),
        "ppl": _num(m.ppl),
        "ppl_cumulative": _num(m.ppl_cumulative),
        "variance": _num(m.variance),
        "max_prob": _num(m.max_prob),
        "l2_norm": _num(m.l2_norm),
        "entropy": _num(m.entropy),
        "health": event.health,
        "warnings": [
            {"guard": t.guard, "value": _num(t.value), "threshold": _num(t.threshold)}
            for t in event.warnings
        ],
    }
    return out


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprob(event: TokenEvent) -> float | None:
    return _num(-event.metrics.nll)


def chat_logprobs(events: Sequence[TokenEvent]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.text,
                "logprob": _logprob(e),
                "bytes": list(e.piece),
                "top_logprobs": [],
            }
            for e in events
        ],
        "refusal": None,
    }


def completion_logprobs(events: Sequence[TokenEvent], offset: int = 0) -> dict[str, Any]:
    """The legacy shape; text_offset counts characters of the completion (from `offset`)."""
    offsets = []
    for e in events:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in events],
        "token_logprobs": [_logprob(e) for e in events],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=JSON_SEPARATORS, allow_nan=False)


def sse(doc: Any) -> bytes:
    """One server-sent event holding `doc`."""
    return f"data: {dumps(doc)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Chunks:
    """The stream chunks of one Ask (OpenAI's chat.completion.chunk / text_completion)."""

    ask: Ask
    model: str
    created: int
    offset: int = 0  # characters sent so far (completions' text_offset)

    def _chunk(self, choice: dict[str, Any], **more: Any) -> dict[str, Any]:
        chat = self.ask.endpoint == CHAT
        doc: dict[str, Any] = {
            "id": self.ask.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
        }
        if self.ask.include_usage:
            doc["usage"] = None
        doc.update(more)
        return doc

    def _choice(self, text: str | None, finish: str | None, logprobs: Any) -> dict[str, Any]:
        if self.ask.endpoint == CHAT:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def opening(self) -> bytes:
        """Chat streams open with the assistant's role and no text."""
        if self.ask.endpoint != CHAT:
            return b""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse(self._chunk(choice))

    def token(self, event: TokenEvent) -> bytes:
        logprobs = None
        if self.ask.logprobs:
            if self.ask.endpoint == CHAT:
                logprobs = chat_logprobs((event,))
            else:
                logprobs = completion_logprobs((event,), self.offset)
        self.offset += len(event.text)
        return sse(self._chunk(self._choice(event.text, None, logprobs), fse=token_json(event)))

    def finish(self, verdict: Verdict, reason: str, prompt_tokens: int) -> bytes:
        """The last chunk (its finish_reason and fse_verdict), the usage chunk if asked
        for, and [DONE]."""
        out = sse(self._chunk(self._choice(None, reason, None), fse_verdict=verdict_json(verdict)))
        if self.ask.include_usage:
            doc = self._chunk(self._choice(None, None, None))
            doc["choices"] = []
            doc["usage"] = usage_json(prompt_tokens, verdict.tokens)
            out += sse(doc)
        return out + DONE


def response(
    ask: Ask,
    model: str,
    created: int,
    verdict: Verdict,
    reason: str,
    events: Sequence[TokenEvent],
    prompt_tokens: int,
) -> dict[str, Any]:
    """The whole answer of a request without `stream`."""
    chat = ask.endpoint == CHAT
    logprobs = None
    if ask.logprobs:
        logprobs = chat_logprobs(events) if chat else completion_logprobs(events)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": verdict.text, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": reason,
        }
    else:
        choice = {"index": 0, "text": verdict.text, "logprobs": logprobs, "finish_reason": reason}
    return {
        "id": ask.id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage_json(prompt_tokens, verdict.tokens),
        "fse_verdict": verdict_json(verdict),
    }


def model_json(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "libfse"}
