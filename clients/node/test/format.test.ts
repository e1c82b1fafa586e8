import assert from "node:assert/strict";
import { describe, it } from "node:test";

import type { TokenEvent, Verdict } from "../src/guard";
import { formatG, infoJson, tokenJson, toJson, verdictJson, verdictLine } from "../src/format";

const token: TokenEvent = {
  type: "token",
  index: 0,
  id: 15687,
  piece: new Uint8Array([0x20, 0xc3]),
  text: " Ber",
  nll: 0.1700000000000001,
  ppl: 1.19,
  pplCumulative: 1.19,
  variance: 19.7,
  maxProb: 0.84,
  l2Norm: 2574.2,
  entropy: 1.2345678901234567,
  health: "green",
  warnings: [],
};

const halted: Verdict = {
  type: "verdict",
  status: "halted",
  completion: undefined,
  guard: "l2_norm",
  value: 2574.2,
  threshold: 10,
  tokenIndex: 0,
  tokens: 0,
  text: "",
  policy: "test",
  policySha256: "0123456789abcdef",
  message: "",
};

describe("JSON lines", () => {
  it("prints a token in the contract's key order", () => {
    assert.equal(
      toJson(tokenJson(token)),
      '{"type":"token","index":0,"id":15687,"text":" Ber","nll":0.1700000000000001,"ppl":1.19,' +
        '"variance":19.7,"max_prob":0.84,"l2_norm":2574.2,"entropy":1.2345678901234567,"health":"green"}',
    );
  });

  it("prints a non-finite entropy as null", () => {
    const doc = JSON.parse(toJson(tokenJson({ ...token, entropy: Number.NaN }))) as Record<string, unknown>;
    assert.equal(doc.entropy, null);
  });

  it("adds warnings only when there are some, and null health when unspecified", () => {
    const doc = JSON.parse(
      toJson(tokenJson({ ...token, health: undefined, warnings: [{ guard: "perplexity", value: 3.5, threshold: undefined }] })),
    ) as Record<string, unknown>;
    assert.equal(doc.health, null);
    assert.deepEqual(doc.warnings, [{ guard: "perplexity", value: 3.5, threshold: null }]);
    assert.equal("warnings" in (JSON.parse(toJson(tokenJson(token))) as object), false);
  });

  it("prints a verdict, nulls for unset fields, message only when set", () => {
    assert.equal(
      toJson(verdictJson(halted)),
      '{"type":"verdict","status":"halted","completion":null,"guard":"l2_norm","value":2574.2,"threshold":10,' +
        '"token_index":0,"tokens":0,"text":"","policy":"test","policy_sha256":"0123456789abcdef"}',
    );
    const error = JSON.parse(
      toJson(verdictJson({ ...halted, status: "error", guard: undefined, value: undefined, threshold: undefined, tokenIndex: undefined, message: "boom" })),
    ) as Record<string, unknown>;
    assert.equal(error.guard, null);
    assert.equal(error.value, null);
    assert.equal(error.threshold, null);
    assert.equal(error.token_index, null);
    assert.equal(error.message, "boom");
    assert.equal(error.completion, null);
  });

  it("prints why a completed stream ended, right after its status", () => {
    for (const completion of ["end_of_generation", "stop_sequence", "max_tokens"] as const) {
      const done: Verdict = { ...halted, status: "completed", completion, guard: undefined, value: undefined, threshold: undefined, tokenIndex: undefined, tokens: 2, text: "ab" };
      assert.equal(
        toJson(verdictJson(done)),
        `{"type":"verdict","status":"completed","completion":"${completion}","guard":null,"value":null,"threshold":null,` +
          '"token_index":null,"tokens":2,"text":"ab","policy":"test","policy_sha256":"0123456789abcdef"}',
      );
      assert.equal(verdictLine(done), `[completed at ${completion}] 2 tokens released · policy test (0123456789ab)`);
    }
  });

  it("prints doubles that parse back to the same double, non-finite ones as null", () => {
    for (const x of [0.1, 1 / 3, 2574.2, 5e-324, 1.7976931348623157e308, 1e21, 1e-7, 123456789012345680, 3, 0]) {
      assert.equal(JSON.parse(toJson(x)), x);
    }
    assert.equal(toJson([NaN, Infinity, -Infinity]), "[null,null,null]");
  });

  it("keeps strings as UTF-8 JSON", () => {
    const s = 'caf\u00e9 \u6771\u4eac \u{1f600} "q" \\ \n\u0001';
    assert.equal(JSON.parse(toJson(s)), s);
    assert.equal(toJson("\u00e9"), '"\u00e9"');
  });

  it("prints integers as integers, uint64 as a number", () => {
    const info = infoJson({
      version: "1",
      model: {
        name: "m", path: "/secret", sha256: "s", description: "d", vocabSize: 3, contextSize: 4,
        trainContextSize: 5, sizeBytes: 9007199254740993n, chatTemplate: true, backend: "CUDA", layers: 18,
        gpuLayers: 18, devices: [
          { name: "CUDA0", description: "H100", kind: "gpu", memoryBytes: 85899345920n, layers: 18 },
          { name: "CPU", description: "Xeon", kind: "cpu", memoryBytes: 34359738368n, layers: 0 },
        ],
      },
      policies: [{ name: "default", sha256: "x", builtin: true }],
      limits: { maxStreams: 8, maxQueue: 16, maxTokens: 2047, maxPromptTokens: 2047, maxMessageBytes: 4194304 },
    });
    const text = toJson(info);
    assert.match(text, /"size_bytes":9007199254740992,/);
    assert.doesNotMatch(text, /path|secret/);
    assert.deepEqual(JSON.parse(text), {
      version: "1",
      model: {
        name: "m", sha256: "s", description: "d", vocab_size: 3, context_size: 4, train_context_size: 5,
        size_bytes: 9007199254740992, chat_template: true, backend: "CUDA", layers: 18, gpu_layers: 18,
        devices: [
          { name: "CUDA0", description: "H100", kind: "gpu", memory_bytes: 85899345920, layers: 18 },
          { name: "CPU", description: "Xeon", kind: "cpu", memory_bytes: 34359738368, layers: 0 },
        ],
      },
      policies: [{ name: "default", sha256: "x", builtin: true }],
      limits: { max_streams: 8, max_queue: 16, max_tokens: 2047, max_prompt_tokens: 2047, max_message_bytes: 4194304 },
    });
  });
});

describe("text", () => {
  it("formats like C's %.6g", () => {
    const cases: [number, string][] = [
      [0, "0"], [10, "10"], [2574.2, "2574.2"], [3325.4973162054544, "3325.5"], [0.0039625, "0.0039625"],
      [0.001, "0.001"], [0.0001, "0.0001"], [0.00001, "1e-05"], [123456, "123456"], [1234567, "1.23457e+06"],
      [999999.5, "1e+06"], [1e100, "1e+100"], [-1.5, "-1.5"], [0.1 + 0.2, "0.3"], [1 / 3, "0.333333"],
      [1234575, "1.23458e+06"], [0.5, "0.5"], [NaN, "nan"], [Infinity, "inf"], [-Infinity, "-inf"],
    ];
    for (const [x, want] of cases) assert.equal(formatG(x), want, `formatG(${String(x)})`);
  });

  it("prints the verdict line", () => {
    assert.equal(
      verdictLine(halted),
      "[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)",
    );
    const completed: Verdict = { ...halted, status: "completed", guard: undefined, value: undefined, threshold: undefined, tokenIndex: undefined, tokens: 12 };
    assert.equal(verdictLine(completed), "[completed] 12 tokens released · policy test (0123456789ab)");
    assert.equal(
      verdictLine({ ...completed, status: "error", tokens: 3, message: "MESSAGE" }),
      "[error: MESSAGE] 3 tokens released · policy test (0123456789ab)",
    );
    assert.equal(
      verdictLine({ ...halted, value: undefined, threshold: undefined }),
      "[halted by l2_norm: value n/a, threshold n/a, at token 0] 0 tokens released · policy test (0123456789ab)",
    );
  });
});
