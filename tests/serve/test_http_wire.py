"""OpenAI's JSON <-> the domain, on its own (fse.serve.http.openai_wire): what is
accepted, what is refused and how it is named, and the shapes that go out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fse.core.types import (
    COMPLETED,
    ERROR,
    HALTED,
    MAX_TOKENS,
    STOP_SEQUENCE,
    StepMetrics,
    TokenEvent,
    Trip,
    Verdict,
)
from fse.serve.http import openai_wire as wire
from fse.serve.http.auth import subject_rfc4514

MODEL = "Gemma 3 270m"


def chat(**fields: Any) -> wire.Ask:
    body = {"messages": [{"role": "user", "content": "Hi"}], **fields}
    return wire.parse_request(wire.CHAT, body, MODEL, "chatcmpl-1")


def completion(**fields: Any) -> wire.Ask:
    return wire.parse_request(wire.COMPLETIONS, {"prompt": "Hi", **fields}, MODEL, "cmpl-1")


def refused(make: Any, **fields: Any) -> wire.WireError:
    with pytest.raises(wire.WireError) as e:
        make(**fields)
    return e.value


def test_defaults_are_the_domains() -> None:
    ask = completion()
    r = ask.request
    assert (r.prompt, r.policy, r.stop, r.request_id) == ("Hi", "default", (), "cmpl-1")
    assert r.sampling.temperature == 0.8 and r.sampling.top_k == 40 and r.sampling.seed is None
    assert not ask.max_tokens_given and not ask.stream and not ask.logprobs


def test_every_accepted_field_reaches_the_request() -> None:
    ask = chat(
        model=MODEL, max_completion_tokens=7, temperature=0, top_p=0.5, top_k=3, min_p=0.1,
        seed=9, stop="\n", stream=True, stream_options={"include_usage": True}, user="u",
        policy="pro", n=1, frequency_penalty=0, presence_penalty=0.0, logprobs=True,
        top_logprobs=0,
    )  # fmt: skip
    r = ask.request
    assert r.messages == (("user", "Hi"),) and r.max_tokens == 7
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (0, 0.5, 3)
    assert (r.sampling.min_p, r.sampling.seed, r.stop, r.policy) == (0.1, 9, ("\n",), "pro")
    assert ask.stream and ask.include_usage and ask.logprobs and ask.user == "u"
    assert ask.max_tokens_field == "max_completion_tokens"
    assert completion(stop=["a", "b"], max_tokens=3, logprobs=0).request.stop == ("a", "b")


def test_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    ask = wire.parse_request(
        wire.CHAT, {"messages": [{"role": "user", "content": content}]}, MODEL, "x"
    )
    assert ask.request.messages == (("user", "ab"),)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 2}, "n", "n: 2 is not supported; accepted: 1"),
        ({"tools": []}, "tools", "tools: not supported by libfse; accepted fields: "),
        ({"response_format": {}}, "response_format", "response_format: not supported"),
        ({"logit_bias": {}}, "logit_bias", "logit_bias: not supported"),
        ({"frequency_penalty": 0.1}, "frequency_penalty", "frequency_penalty: 0.1 is not"),
        ({"presence_penalty": True}, "presence_penalty", "presence_penalty: true is not"),
        ({"top_logprobs": 1}, "top_logprobs", "top_logprobs: 1 is not supported"),
        ({"whatever": 1}, "whatever", "whatever: not supported by libfse"),
        ({"temperature": "hot"}, "temperature", 'temperature: expected a number, got a string'),
        ({"top_k": 1.5}, "top_k", "top_k: expected an integer"),
        ({"seed": True}, "seed", "seed: expected an integer, got a boolean"),
        ({"stop": 3}, "stop", "stop: expected a string or an array of strings"),
        ({"stream": "yes"}, "stream", "stream: expected a boolean"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only with stream"),
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "not supported"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differs"),
        ({"messages": []}, "messages", "messages: expected a non-empty array"),
        ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages",
         "messages[0].name: not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
         'messages[0].content[0].type: a string ("image_url") is not supported'),
        ({"logprobs": 1}, "logprobs", "logprobs: expected a boolean"),
    ],
)  # fmt: skip
def test_chat_refusals_name_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    error = refused(chat, **fields)
    assert error.status == 400 and error.param == param
    assert words in error.message and error.message.startswith(param.split(".")[0])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "prompt: expected one string, got an array"),
        ({"prompt": [1, 2]}, "prompt", "no arrays of prompts or of tokens"),
        ({"prompt": None}, "prompt", "prompt: required"),
        ({"logprobs": 5}, "logprobs", "logprobs: 5 is not supported; accepted: 0"),
        ({"logprobs": True}, "logprobs", "logprobs: expected an integer"),
        ({"echo": True}, "echo", "echo: true is not supported; accepted: false"),
        ({"best_of": 2}, "best_of", "best_of: 2 is not supported"),
        ({"suffix": "x"}, "suffix", "suffix: not supported by libfse"),
        ({"messages": []}, "messages", "messages: not supported by libfse"),
    ],
)
def test_completion_refusals_name_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    error = refused(completion, **fields)
    assert error.status == 400 and error.param == param and words in error.message


def test_another_model_is_404_and_null_is_absent() -> None:
    error = refused(completion, model="gpt-4o")
    assert error.status == 404 and error.code == "model_not_found" and error.param == "model"
    ask = completion(model=None, tools=None, temperature=None, stop=None, n=None)
    assert ask.request.sampling.temperature == 0.8


@pytest.mark.parametrize(
    "body", [b"[1", b'{"a": NaN}', b'{"a": Infinity}', b"\xff", b"1" * 0 + b'"x"']
)
def test_bodies_that_are_not_a_json_object(body: bytes) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.parse_request(wire.COMPLETIONS, wire.parse_body(body), MODEL, "x")
    assert e.value.status == 400 and e.value.message.startswith("request body:")


def test_domain_messages_name_the_openai_field() -> None:
    ask = chat(max_completion_tokens=5)
    assert wire.param_of("sampling.top_p: 1.5 is invalid; accepted: 0 < top_p <= 1", ask) == "top_p"
    assert wire.param_of("max_tokens: 9 does not fit", ask) == "max_completion_tokens"
    assert wire.param_of("stop[3]: accepted: 1..256 bytes", ask) == "stop"
    assert wire.param_of("prompt: 3000 tokens do not fit", ask) == "messages"
    assert wire.param_of("messages[0].role: must not be empty", ask) == "messages"
    assert wire.param_of("policy: unknown policy 'x'; accepted: default", ask) == "policy"
    assert wire.param_of("debug faults: this daemon was not started", ask) is None


def verdict(status: str, **fields: Any) -> Verdict:
    return Verdict(status, 2, "ab", "pro", "f" * 64, **fields)  # type: ignore[arg-type]


def test_finish_reasons() -> None:
    assert wire.finish_reason(verdict(COMPLETED, completion=MAX_TOKENS)) == "length"
    assert wire.finish_reason(verdict(COMPLETED, completion=STOP_SEQUENCE)) == "stop"
    assert wire.finish_reason(verdict(COMPLETED, completion="end_of_generation")) == "stop"
    halted = verdict(HALTED, guard="loop", value=3.0, threshold=3.0, token_index=2)
    assert wire.finish_reason(halted) == "content_filter"
    assert wire.finish_reason(verdict(HALTED, guard="internal", token_index=2)) == "content_filter"
    # No answer: the client must get an error, never a finish.
    assert wire.finish_reason(verdict(HALTED, guard="shutdown", token_index=2)) is None
    assert wire.finish_reason(verdict(ERROR, guard="internal", message="boom")) is None
    assert wire.finish_reason(verdict("cancelled")) is None


def token(index: int, text: str, nll: float = 0.5) -> TokenEvent:
    m = StepMetrics(
        index=index, token=7, nll=nll, ppl=2.0, ppl_cumulative=2.5, variance=20.0,
        max_prob=0.6, l2_norm=3000.0, non_finite=0,
    )  # fmt: skip
    trip = Trip("perplexity", 2.0, 1.5, index, "warn")
    return TokenEvent(index, 7, text.encode(), text, m, "yellow", (trip,))


def test_stream_chunks() -> None:
    ask = chat(stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = wire.Chunks(ask, MODEL, 123)
    opening = json.loads(chunks.opening().decode().removeprefix("data: "))
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    raw = chunks.token(token(0, "é"))
    assert raw.endswith(b"\n\n") and raw.startswith(b"data: {")
    doc = json.loads(raw.decode().removeprefix("data: "))
    assert doc["object"] == "chat.completion.chunk" and doc["usage"] is None
    assert doc["choices"][0]["delta"] == {"content": "é"}
    (lp,) = doc["choices"][0]["logprobs"]["content"]
    assert lp == {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9], "top_logprobs": []}
    assert doc["fse"]["health"] == "yellow"
    assert doc["fse"]["warnings"] == [{"guard": "perplexity", "value": 2.0, "threshold": 1.5}]
    end = chunks.finish(verdict(COMPLETED, completion=MAX_TOKENS), "length", 5).decode()
    last, usage, done = (e.removeprefix("data: ") for e in end.strip().split("\n\n"))
    assert json.loads(last)["choices"][0]["finish_reason"] == "length"
    assert json.loads(last)["fse_verdict"]["completion"] == "max_tokens"
    assert json.loads(usage)["choices"] == []
    assert json.loads(usage)["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                          "total_tokens": 7}  # fmt: skip
    assert done == "[DONE]"


def test_a_response_and_its_legacy_logprobs() -> None:
    ask = completion(logprobs=0)
    events = [token(0, "ab"), token(1, "c", nll=float("inf"))]
    doc = wire.response(
        ask, MODEL, 1, verdict(COMPLETED, completion=MAX_TOKENS), "length", events, 3
    )
    assert doc["choices"][0]["text"] == "ab"
    assert doc["choices"][0]["logprobs"] == {
        "tokens": ["ab", "c"],
        "token_logprobs": [-0.5, None],  # no NaN or Infinity in JSON
        "top_logprobs": None,
        "text_offset": [0, 2],
    }
    assert doc["fse_verdict"]["status"] == "completed"
    json.loads(wire.dumps(doc))


def test_certificate_subjects_as_rfc4514() -> None:
    subject = ((("organizationName", "org-a"),), (("commonName", "app-one"),))
    assert subject_rfc4514(subject) == "CN=app-one,O=org-a"
    tricky = ((("commonName", " a,b+é "),), (("countryName", "FR"), ("localityName", "#x")))
    assert subject_rfc4514(tricky) == "C=FR+L=\\#x,CN=\\ a\\,b\\+\\C3\\A9\\ "
