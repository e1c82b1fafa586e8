"""The OpenAI-compatible HTTP API through the official `openai` SDK, against a real daemon
(docs/http.md): completions and chat, streamed and not, the same tokens as gRPC, guard
halts as `content_filter`, refusals as OpenAI's errors, tokens, the slot of a client that
went away, curl's view of the stream.

One daemon for the module: tokens, one stream at most (max_queue 0, so that a held
slot shows), the `gemma` chat template and the policy calibrated for it, metrics.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from support.cli import LA_LOOP
from support.daemons import LONG_PROMPT, PROMPT, ROOT, THREADS, Daemon, audit_events, run_fse
from support.http import (
    TOKEN,
    TOKEN_NAME,
    HttpDaemon,
    RawStream,
    extra,
    get,
    post,
    sse_data,
    start_http,
    write_tokens,
)
from support.metrics import scrape

MAX_BODY = 4 << 20  # gRPC's MAX_MESSAGE_BYTES
ROMAN = "The history of the Roman Empire"  # halts by perplexity, sampled hot (below)


@pytest.fixture(scope="module")
def api(
    start_module_daemon: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory
) -> HttpDaemon:
    folder = tmp_path_factory.mktemp("http")
    policies = folder / "policies"
    policies.mkdir()
    calibrated = ROOT / "docs" / "experiment" / "calibrated.toml"
    (policies / "calibrated.toml").write_text(calibrated.read_text())
    return start_http(
        start_module_daemon,
        *THREADS,
        "--max-streams", "1", "--max-queue", "0", "--ctx-per-stream", "512",
        "--auth-tokens", str(write_tokens(folder)),
        "--policies-dir", str(policies),
        "--chat-template", "gemma",
        "--allow-debug-faults",
        metrics=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(api: HttpDaemon) -> Iterator[openai.OpenAI]:
    with api.client() as c:
        yield c


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    (model,) = client.models.list().data
    return model.id


def grpc_run(
    api: HttpDaemon, prompt: str, *args: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`fse generate --addr` (gRPC, the unix socket) on the same daemon: (tokens, verdict)."""
    result = run_fse("generate", "--addr", api.daemon.addr, prompt, "--json", *args)
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert docs and docs[-1]["type"] == "verdict", result.stderr
    return docs[:-1], docs[-1]


def message(error: openai.APIStatusError) -> str:
    """The error object's own message (the SDK's adds "Error code: N - ")."""
    body = error.body
    assert isinstance(body, dict)
    return str(body["message"])


# -- the happy paths ------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI, api: HttpDaemon) -> None:
    (model,) = client.models.list().data
    assert model.object == "model" and model.owned_by == "libfse"
    assert model.id == "Gemma 3 270m"  # the model's name, as GetInfo gives it
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_streamed_chat_completion(client: openai.OpenAI, model_id: str, api: HttpDaemon) -> None:
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"policy": "calibrated"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks if extra(c, "fse") is not None]
    assert token_chunks, chunks
    for i, chunk in enumerate(token_chunks):
        fse = extra(chunk, "fse")
        assert fse["index"] == i
        assert fse["health"] in ("green", "yellow", "red")
        assert fse["nll"] >= 0 and fse["ppl"] >= 1 and fse["l2_norm"] > 0
        assert 0 <= fse["entropy"] <= 12.5  # nats; ln(262,144) = 12.48
        assert set(fse) == {
            "index", "nll", "ppl", "ppl_cumulative", "variance", "max_prob", "l2_norm",
            "entropy", "health", "warnings",
        }  # fmt: skip
        assert chunk.choices[0].finish_reason is None
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    verdict = extra(last, "fse_verdict")
    assert verdict["status"] == "completed" and verdict["policy"] == "calibrated"
    assert last.choices[0].finish_reason == (
        "length" if verdict["completion"] == "max_tokens" else "stop"
    )
    assert verdict["tokens"] == len(token_chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == verdict["tokens"] and usage.prompt_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text  # (the embedded model is no chat model: greedy, it answers with newlines)
    # The audit log names the door and the caller, as for gRPC.
    (started,) = [
        r for r in audit_events(api.daemon, "stream.started") if r["request_id"] == last.id
    ]
    assert started["listener"] == "http" and started["client"] == f"token:{TOKEN_NAME}"


def test_a_completion_without_streaming(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    done = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, user="alice@example"
    )
    (choice,) = done.choices
    assert choice.finish_reason == "length"
    assert choice.text.startswith(" the capital")
    assert done.usage is not None and done.usage.completion_tokens == 8
    verdict = extra(done, "fse_verdict")
    assert verdict == {
        **verdict,
        "status": "completed",
        "guard": None,
        "tokens": 8,
        "policy": "default",
        "completion": "max_tokens",
    }
    assert len(verdict["policy_sha256"]) == 64
    (started,) = [
        r for r in audit_events(api.daemon, "stream.started") if r["request_id"] == done.id
    ]
    assert started["user"] == "alice@example" and started["listener"] == "http"
    (ended,) = [r for r in api.verdicts() if r["request_id"] == done.id]
    assert ended["listener"] == "http" and ended["client"] == f"token:{TOKEN_NAME}"


def test_greedy_output_equals_grpc_token_for_token(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    tokens, verdict = grpc_run(api, PROMPT, "--temperature", "0", "--max-tokens", "24")
    done = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0
    )
    logprobs = done.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == [t["text"] for t in tokens]
    assert logprobs.token_logprobs == [-t["nll"] for t in tokens]
    assert done.choices[0].text == verdict["text"]
    # Streamed, the same tokens again.
    stream = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=24, temperature=0, stream=True
    )
    texts = [c.choices[0].text for c in stream if c.choices and extra(c, "fse") is not None]
    assert texts == [t["text"] for t in tokens]


# -- guards: a halt is content_filter, with the released text only ----------------------


def test_a_loop_under_pro_ends_content_filter(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    tokens, grpc_verdict = grpc_run(
        api, LA_LOOP, "--temperature", "0", "--max-tokens", "32", "--policy", "pro"
    )
    assert grpc_verdict["guard"] == "loop"
    done = client.completions.create(
        model=model_id, prompt=LA_LOOP, max_tokens=32, temperature=0, extra_body={"policy": "pro"}
    )
    (choice,) = done.choices
    assert choice.finish_reason == "content_filter"
    verdict = extra(done, "fse_verdict")
    assert verdict["status"] == "halted" and verdict["guard"] == "loop"
    assert verdict["threshold"] == 3.0 and verdict["value"] >= 3.0
    # Only what was released: the tripping token (token_index) and nothing after it.
    assert verdict["tokens"] == verdict["token_index"] == grpc_verdict["tokens"] < 32
    assert choice.text == grpc_verdict["text"] == "".join(t["text"] for t in tokens)
    stream = client.completions.create(
        model=model_id, prompt=LA_LOOP, max_tokens=32, temperature=0, stream=True,
        extra_body={"policy": "pro"},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert extra(chunks[-1], "fse_verdict")["guard"] == "loop"


def test_a_perplexity_halt_ends_content_filter(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    args = ["--temperature", "1.6", "--top-p", "1", "--seed", "2", "--top-k", "0", "--min-p", "0"]
    _, grpc_verdict = grpc_run(api, ROMAN, *args, "--max-tokens", "48")
    assert grpc_verdict["guard"] == "perplexity"
    stream = client.completions.create(
        model=model_id,
        prompt=ROMAN,
        max_tokens=48,
        stream=True,
        temperature=1.6,
        top_p=1.0,
        seed=2,
        extra_body={"top_k": 0, "min_p": 0.0},  # llama.cpp's extensions: untruncated
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "content_filter"
    verdict = extra(last, "fse_verdict")
    assert verdict["guard"] == "perplexity" and verdict["value"] > verdict["threshold"] == 400.0
    sent = [c for c in chunks if extra(c, "fse") is not None]
    assert len(sent) == verdict["tokens"] == verdict["token_index"] == grpc_verdict["tokens"]
    assert "".join(c.choices[0].text for c in sent) == grpc_verdict["text"]


def test_a_guard_error_halts_fail_closed(api: HttpDaemon, model_id: str) -> None:
    """A guard that raises (debug fault guard-error@2) halts by `internal`: the answer is
    content_filter with the two released tokens, never "stop"."""
    reply = post(
        f"{api.base_url}/completions",
        {"model": model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        headers={"fse-debug-fault": "guard-error@2"},
    )
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["choices"][0]["finish_reason"] == "content_filter"
    assert doc["fse_verdict"]["guard"] == "internal" and doc["fse_verdict"]["tokens"] == 2


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong", TOKEN + "x"])
def test_a_missing_or_wrong_token_is_401_and_audited(
    api: HttpDaemon, model_id: str, key: str | None
) -> None:
    before = len(api.daemon.audit())
    if key is None:  # the SDK will not send a request without a key
        reply = post(f"{api.base_url}/completions", {"prompt": PROMPT}, token=None)
        assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    else:
        with api.client(api_key=key) as bad, pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model=model_id, prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    denied = [r for r in api.daemon.audit()[before:] if r["event"] == "auth.denied"]
    assert len(denied) == 1
    assert denied[0]["listener"] == "http" and denied[0]["client"].startswith("tcp:127.0.0.1:")
    assert denied[0]["reason"] == ("missing token" if not key else "wrong token")
    assert not [r for r in api.daemon.audit()[before:] if r["event"] == "stream.started"]


def test_bad_values_are_400_naming_the_field(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, top_p=1.5)
    assert e.value.param == "top_p"
    # The domain's words, as gRPC's INVALID_ARGUMENT reads.
    assert message(e.value) == "sampling.top_p: 1.5 is invalid; accepted: 0 < top_p <= 1"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=100_000)
    assert e.value.param == "max_tokens" and "accepted: 1..511" in message(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=0
        )
    assert e.value.param == "max_completion_tokens"
    refused = [r for r in audit_events(api.daemon, "input.rejected") if r.get("listener") == "http"]
    assert any("sampling.top_p" in r["error"] for r in refused)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
        ({"made_up_field": 1}, "made_up_field"),
    ],
)
def test_fields_libfse_does_not_honour_are_refused(
    client: openai.OpenAI, model_id: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_body=fields,
        )
    assert e.value.status_code == 400 and e.value.param == param
    assert message(e.value).startswith(f"{param}:")


def test_unknown_model_policy_and_route_are_404(
    client: openai.OpenAI, model_id: str, api: HttpDaemon
) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(
            model=model_id, prompt=PROMPT, max_tokens=2, extra_body={"policy": "nope"}
        )
    assert e.value.param == "policy"
    assert message(e.value).startswith("policy: unknown policy 'nope'; accepted:")
    reply = get(f"{api.url}/v1/embeddings")
    assert reply.status == 404 and reply.json()["error"]["code"] == "unknown_route"


def test_a_body_over_the_message_limit_is_413(api: HttpDaemon) -> None:
    body = b'{"prompt": "' + b"a" * MAX_BODY + b'"}'
    reply = post(f"{api.base_url}/completions", body)
    assert reply.status == 413
    assert reply.json()["error"]["message"] == (
        f"request body: too large; accepted: at most {MAX_BODY} bytes"
    )
    broken = post(f"{api.base_url}/completions", b"{not json")
    assert broken.status == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in api.daemon.log()


def test_health_mirrors_grpc_health(api: HttpDaemon) -> None:
    reply = get(f"{api.url}/health", token=None)  # open, as gRPC's health is
    assert reply.status == 200 and reply.json() == {"status": "SERVING"}


# -- slots: one stream at most here ---------------------------------------------------


def test_a_second_stream_is_429_and_a_client_that_leaves_frees_its_slot(
    api: HttpDaemon, model_id: str
) -> None:
    before = len(api.verdicts())
    body = {"model": model_id, "prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0}
    first = RawStream(f"{api.base_url}/completions", {**body, "stream": True})
    try:
        assert first.response.status == 200
        first.data(3)  # three tokens
        with api.client() as second, pytest.raises(openai.RateLimitError) as e:
            second.completions.create(model=model_id, prompt=PROMPT, max_tokens=2)
        assert message(e.value) == (
            "overloaded: 1 streams running and 0 waiting (max_streams 1, max_queue 0)"
        )
    finally:
        first.hang_up()  # mid-stream
    (gone,) = api.wait_verdicts(before + 1)[before:]
    assert gone["status"] == "cancelled" and gone["listener"] == "http"
    assert 3 <= gone["tokens"] < 400
    with api.client() as after:  # the slot is free again
        done = after.completions.create(model=model_id, prompt=PROMPT, max_tokens=2)
    assert done.choices[0].finish_reason == "length"


def test_curl_shows_the_event_stream(api: HttpDaemon, model_id: str) -> None:
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    out = subprocess.run(
        ["curl", "-sN", "--noproxy", "*", f"{api.base_url}/completions",
         "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    data = sse_data(out.stdout)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 5
    assert "".join(c["choices"][0]["text"] for c in chunks).startswith(" the capital")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["fse_verdict"]["status"] == "completed"


def test_http_requests_are_counted_by_endpoint_and_status(api: HttpDaemon, model_id: str) -> None:
    post(f"{api.base_url}/completions", {"model": model_id, "prompt": PROMPT, "top_p": 2})
    samples = scrape(api.metrics_port)
    counts = {
        (dict(labels)["endpoint"], dict(labels)["status"]): v
        for (name, labels), v in samples.items()
        if name == "fse_http_requests_total"
    }
    assert counts[("/v1/completions", "400")] >= 1
    assert counts[("/v1/completions", "200")] >= 1
    assert counts[("/v1/models", "200")] >= 1
    assert counts[("/v1/completions", "401")] >= 1


def test_no_tokens_leave_before_their_guards(api: HttpDaemon, model_id: str) -> None:
    """A NaN in the logits at token 3 halts by non_finite: three tokens went out, the
    fourth never did, and the answer is content_filter, over a raw stream too."""
    reply = post(
        f"{api.base_url}/completions",
        {"model": model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True},
        headers={"fse-debug-fault": "nan@3"},
    )
    data = sse_data(reply.body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["fse"]["index"] for c in chunks if "fse" in c] == [0, 1, 2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["fse_verdict"]["guard"] == "non_finite"
    assert chunks[-1]["fse_verdict"]["token_index"] == 3
