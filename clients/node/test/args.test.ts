import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { parseArgs, parseFloatStrict, parseInteger, roundHalfEven, UsageError, type Args } from "../src/args";

function run(...argv: string[]): Args {
  const parsed = parseArgs(argv);
  assert.equal(parsed.kind, "run");
  return parsed.args;
}

function usage(argv: string[], pattern: RegExp): void {
  assert.throws(() => parseArgs(argv), (err: unknown) => err instanceof UsageError && pattern.test(err.message));
}

describe("parseArgs", () => {
  it("takes the contract's defaults", () => {
    const a = run("--addr", "unix:/tmp/s", "hello");
    assert.equal(a.addr, "unix:/tmp/s");
    assert.equal(a.prompt, "hello");
    assert.equal(a.maxTokens, 256);
    assert.equal(a.temperature, 0.8);
    assert.equal(a.topK, 40);
    assert.equal(a.topP, 0.95);
    assert.equal(a.minP, 0.05);
    assert.equal(a.seed, undefined);
    assert.equal(a.policy, undefined);
    assert.deepEqual(a.stop, []);
    assert.equal(a.timeoutMs, undefined);
    assert.equal(a.cancelAfter, undefined);
    assert.equal(a.json, false);
    assert.equal(a.info, false);
  });

  it("reads every flag, with = or a separate value", () => {
    const a = run(
      "--addr=127.0.0.1:1", "--tls-ca", "ca.pem", "--token-file", "tok", "--json", "--policy", "test",
      "--max-tokens", "8", "--temperature", "0", "--top-k=5", "--top-p", "0.5", "--min-p", "0",
      "--seed", "4294967295", "--stop", "\n", "--stop=.", "--timeout", "1.5", "--cancel-after", "2", "The prompt",
    );
    assert.equal(a.addr, "127.0.0.1:1");
    assert.equal(a.tlsCa, "ca.pem");
    assert.equal(a.tokenFile, "tok");
    assert.equal(a.json, true);
    assert.equal(a.policy, "test");
    assert.equal(a.maxTokens, 8);
    assert.equal(a.temperature, 0);
    assert.equal(a.topK, 5);
    assert.equal(a.topP, 0.5);
    assert.equal(a.minP, 0);
    assert.equal(a.seed, 4294967295);
    assert.deepEqual(a.stop, ["\n", "."]);
    assert.equal(a.timeoutMs, 1500);
    assert.equal(a.cancelAfter, 2);
    assert.equal(a.prompt, "The prompt");
  });

  it("leaves values the daemon judges to the daemon", () => {
    const a = run("--addr", "x:1", "--temperature", "-1", "--top-k", "-3", "--top-p", "7", "--min-p", "nan", "p");
    assert.equal(a.temperature, -1);
    assert.equal(a.topK, -3);
    assert.equal(a.topP, 7);
    assert.ok(Number.isNaN(a.minP));
    assert.equal(run("--addr", "x:1", "--max-tokens", "100000", "p").maxTokens, 100000);
  });

  it("sends the timeout as max(1, round(SECONDS * 1000))", () => {
    assert.equal(run("--addr", "x:1", "--timeout", "0.0001", "p").timeoutMs, 1);
    assert.equal(run("--addr", "x:1", "--timeout", "2", "p").timeoutMs, 2000);
    assert.equal(run("--addr", "x:1", "--timeout", "0.0125", "p").timeoutMs, 12); // 12.5: ties to even
  });

  it("takes --info without a prompt", () => {
    assert.equal(run("--addr", "unix:/s", "--info").info, true);
    usage(["--addr", "unix:/s", "--info", "p"], /^PROMPT: /);
  });

  it("takes a prompt after --, even one that looks like a flag", () => {
    assert.equal(run("--addr", "x:1", "--", "--json").prompt, "--json");
  });

  it("asks for help", () => {
    assert.deepEqual(parseArgs(["--help"]), { kind: "help" });
    assert.deepEqual(parseArgs(["--addr", "x:1", "-h"]), { kind: "help" });
  });

  it("names the flag and what it accepts", () => {
    usage(["p"], /^--addr: required; accepted: /);
    usage(["--addr", "x:1"], /^PROMPT: must not be empty/);
    usage(["--addr", "x:1", ""], /^PROMPT: must not be empty/);
    usage(["--addr", "x:1", "a", "b"], /^PROMPT: 2 given/);
    usage(["--addr", "x:1", "--bogus", "p"], /^--bogus: unknown flag/);
    usage(["--addr", "x:1", "p", "--max-tokens"], /^--max-tokens: expected a value$/);
    usage(["--addr", "x:1", "--policy", "--json", "p"], /^--policy: expected a value$/);
    usage(["--addr", "x:1", "--json=yes", "p"], /^--json: takes no value$/);
    usage(["--addr", "x:1", "--max-tokens", "0", "p"], /^--max-tokens: 0 is invalid; accepted: >= 1$/);
    usage(["--addr", "x:1", "--max-tokens", "1.5", "p"], /^--max-tokens: '1.5' is not an integer; accepted: >= 1$/);
    usage(["--addr", "x:1", "--max-tokens", "4294967296", "p"], /^--max-tokens: .* is invalid/);
    usage(["--addr", "x:1", "--seed", "-1", "p"], /^--seed: -1 is invalid; accepted: 0 \.\. 2\^32-1$/);
    usage(["--addr", "x:1", "--top-k", "2147483648", "p"], /^--top-k: .* is invalid/);
    usage(["--addr", "x:1", "--temperature", "warm", "p"], /^--temperature: 'warm' is not a number$/);
    usage(["--addr", "x:1", "--timeout", "0", "p"], /^--timeout: 0 is invalid; accepted: seconds > 0$/);
    usage(["--addr", "x:1", "--timeout", "nan", "p"], /^--timeout: nan is invalid/);
    usage(["--addr", "x:1", "--timeout", "inf", "p"], /^--timeout: inf is invalid/);
    usage(["--addr", "x:1", "--cancel-after", "0", "p"], /^--cancel-after: 0 is invalid; accepted: >= 1$/);
  });
});

describe("number parsing", () => {
  it("reads integers as Python's int() does", () => {
    assert.equal(parseInteger(" 12 "), 12);
    assert.equal(parseInteger("+7"), 7);
    assert.equal(parseInteger("-7"), -7);
    assert.equal(parseInteger("1_000"), 1000);
    assert.equal(parseInteger(""), undefined);
    assert.equal(parseInteger("1e3"), undefined);
    assert.equal(parseInteger("0x10"), undefined);
  });

  it("reads doubles as Python's float() does", () => {
    assert.equal(parseFloatStrict("0.5"), 0.5);
    assert.equal(parseFloatStrict(".5"), 0.5);
    assert.equal(parseFloatStrict("5."), 5);
    assert.equal(parseFloatStrict("1e-3"), 0.001);
    assert.equal(parseFloatStrict("-Infinity"), -Infinity);
    assert.equal(parseFloatStrict("inf"), Infinity);
    assert.ok(Number.isNaN(parseFloatStrict("NaN")));
    assert.equal(parseFloatStrict(""), undefined);
    assert.equal(parseFloatStrict("0x1"), undefined);
    assert.equal(parseFloatStrict("1,5"), undefined);
  });

  it("rounds ties to even", () => {
    assert.equal(roundHalfEven(0.5), 0);
    assert.equal(roundHalfEven(1.5), 2);
    assert.equal(roundHalfEven(2.5), 2);
    assert.equal(roundHalfEven(2.4999), 2);
    assert.equal(roundHalfEven(2.5001), 3);
  });
});
