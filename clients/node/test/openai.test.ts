// The official OpenAI JavaScript SDK (the npm package `openai`) against the daemon's
// OpenAI-compatible HTTP API (docs/http.md). It needs a real daemon serving
// `fse serve --http-listen 127.0.0.1:PORT` with a chat template, so it runs only when
// FSE_TEST_HTTP_URL gives that daemon's base URL (http://127.0.0.1:PORT/v1) and is
// skipped otherwise; tests/clients/test_node_openai.py starts such a daemon and runs it.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import OpenAI from "openai";

const BASE_URL = process.env.FSE_TEST_HTTP_URL ?? "";
// Any key works on a daemon without a tokens file; FSE_TEST_HTTP_TOKEN for one with.
const API_KEY = process.env.FSE_TEST_HTTP_TOKEN ?? "no-token";
// libfse's `policy` field (docs/http.md), sent beside OpenAI's when given; the daemon's
// `default` otherwise.
const POLICY = process.env.FSE_TEST_HTTP_POLICY ?? "";
const SKIP = BASE_URL === "" ? "FSE_TEST_HTTP_URL is not set" : false;

describe("the openai SDK against the daemon's HTTP API", () => {
  it("streams a chat completion that ends at max_tokens with a completed verdict", { skip: SKIP }, async () => {
    const client = new OpenAI({ baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 0, timeout: 120_000 });
    const model = (await client.models.list()).data[0]?.id;
    assert.ok(model, "the daemon lists no model");
    // A field the SDK's types do not know travels in the body as it is.
    const params: OpenAI.Chat.Completions.ChatCompletionCreateParamsStreaming & { policy?: string } = {
      model,
      messages: [{ role: "user", content: "What is the capital of France?" }],
      stream: true,
      // The field most OpenAI clients still send (max_completion_tokens is accepted too).
      // eslint-disable-next-line @typescript-eslint/no-deprecated
      max_tokens: 8,
      temperature: 0,
    };
    if (POLICY !== "") params.policy = POLICY;
    const stream = await client.chat.completions.create(params);
    let text = "";
    let last: OpenAI.Chat.Completions.ChatCompletionChunk | undefined;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks += 1;
      text += chunk.choices[0]?.delta.content ?? "";
      last = chunk;
    }
    assert.ok(chunks > 1, "no chunks arrived");
    assert.ok(text.length > 0, "no text arrived");
    assert.ok(last !== undefined);
    assert.equal(last.choices[0]?.finish_reason, "length");
    // libfse's verdict rides beside OpenAI's fields on the last chunk.
    const verdict = (last as unknown as { fse_verdict?: Record<string, unknown> }).fse_verdict;
    assert.ok(verdict !== undefined, `no fse_verdict on the last chunk: ${JSON.stringify(last)}`);
    assert.equal(verdict.status, "completed");
    assert.equal(verdict.completion, "max_tokens");
    assert.equal(verdict.tokens, 8);
    if (POLICY !== "") assert.equal(verdict.policy, POLICY);
  });
});
