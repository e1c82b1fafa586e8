import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { status } from "@grpc/grpc-js";

import { describeError, EXIT_ERROR, EXIT_USAGE, exitCode, readArgs, tokenText, UsageError } from "../src/cli";
import { GuardError, type TokenEvent } from "../src/guard";

/** The usage error readArgs throws for argv, as main would print it (exit 2). */
function usage(...argv: string[]): string {
  try {
    readArgs(argv);
  } catch (err) {
    const { line, code } = describeError(err);
    assert.equal(code, EXIT_USAGE, line);
    return line;
  }
  assert.fail(`no usage error for ${argv.join(" ")}`);
}

describe("readArgs", () => {
  it("takes the contract's defaults", () => {
    const a = readArgs(["--addr", "unix:/tmp/s", "hello"]);
    assert.equal(a.addr, "unix:/tmp/s");
    assert.deepEqual(a.request, {
      prompt: "hello",
      maxTokens: 256,
      sampling: { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05, seed: undefined },
      policy: undefined,
      stop: [],
      timeoutMs: undefined,
    });
    assert.equal(a.cancelAfter, undefined);
    assert.equal(a.json || a.info || a.help, false);
    assert.deepEqual([a.tlsCert, a.tlsKey], [undefined, undefined]);
  });

  it("reads a client certificate and its key for mutual TLS", () => {
    const a = readArgs(["--addr", "a:1", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key=k.pem", "p"]);
    assert.deepEqual([a.tlsCa, a.tlsCert, a.tlsKey], ["ca.pem", "c.pem", "k.pem"]);
  });

  it("reads every flag, with = or a separate value", () => {
    const a = readArgs([
      "--addr=127.0.0.1:1", "--tls-ca", "ca.pem", "--token-file", "tok", "--json", "--policy", "test",
      "--max-tokens", "8", "--temperature", "0", "--top-k=5", "--top-p", "0.5", "--min-p", "0",
      "--seed", "4294967295", "--stop", "\n", "--stop=.", "--timeout", "1.5", "--cancel-after", "2", "The prompt",
    ]);
    assert.deepEqual([a.addr, a.tlsCa, a.tokenFile, a.json, a.cancelAfter], ["127.0.0.1:1", "ca.pem", "tok", true, 2]);
    assert.deepEqual(a.request, {
      prompt: "The prompt",
      maxTokens: 8,
      sampling: { temperature: 0, topK: 5, topP: 0.5, minP: 0, seed: 4294967295 },
      policy: "test",
      stop: ["\n", "."],
      timeoutMs: 1500,
    });
  });

  it("leaves values the daemon judges to the daemon", () => {
    const a = readArgs(["--addr", "unix:/s", "--top-p=2", "--temperature=-1", "--max-tokens", "100000", "p"]);
    assert.deepEqual([a.request.sampling?.topP, a.request.sampling?.temperature, a.request.maxTokens], [2, -1, 100000]);
  });

  it("sends the timeout as max(1, round(SECONDS * 1000))", () => {
    assert.equal(readArgs(["--addr", "unix:/s", "--timeout", "0.0001", "p"]).request.timeoutMs, 1);
    assert.equal(readArgs(["--addr", "unix:/s", "--timeout", "0.2", "p"]).request.timeoutMs, 200);
  });

  it("takes --info without a prompt, and a prompt after --", () => {
    assert.equal(readArgs(["--addr", "unix:/s", "--info"]).info, true);
    assert.equal(readArgs(["--addr", "unix:/s", "--", "--json"]).request.prompt, "--json");
    assert.equal(readArgs(["-h"]).help, true);
  });

  it("names the flag of every usage error", () => {
    const cases: [string[], string][] = [
      [["hello"], "--addr"],
      [["--addr", "unix:/s"], "PROMPT"],
      [["--addr", "unix:/s", ""], "PROMPT"],
      [["--addr", "unix:/s", "a", "b"], "PROMPT"],
      [["--addr", "unix:/s", "--no-such-flag", "p"], "--no-such-flag"],
      [["--addr", "unix:/s", "--json=yes", "p"], "--json"],
      [["--addr", "unix:/s", "p", "--seed"], "--seed"],
      [["--addr", "unix:/s", "--max-tokens", "0", "p"], "--max-tokens"],
      [["--addr", "unix:/s", "--max-tokens", "1.5", "p"], "--max-tokens"],
      [["--addr", "unix:/s", "--seed", "4294967296", "p"], "--seed"],
      [["--addr", "unix:/s", "--top-k", "x", "p"], "--top-k"],
      [["--addr", "unix:/s", "--temperature", "warm", "p"], "--temperature"],
      [["--addr", "unix:/s", "--temperature", "", "p"], "--temperature"],
      [["--addr", "unix:/s", "--timeout", "0", "p"], "--timeout"],
      [["--addr", "unix:/s", "--timeout", "-1", "p"], "--timeout"],
      [["--addr", "unix:/s", "--timeout", "1e10", "p"], "--timeout"],
      [["--addr", "unix:/s", "--cancel-after", "0", "p"], "--cancel-after"],
      [["--addr", "a:1", "--tls-ca", "ca", "--tls-cert", "c", "p"], "'--tls-key' is required"],
      [["--addr", "a:1", "--tls-ca", "ca", "--tls-key", "k", "p"], "'--tls-cert' is required"],
      [["--addr", "a:1", "--tls-cert", "c", "--tls-key", "k", "p"], "'--tls-ca' is required"],
    ];
    for (const [argv, name] of cases) assert.ok(usage(...argv).includes(name), `${argv.join(" ")}: ${usage(...argv)}`);
  });
});

describe("describeError", () => {
  it("maps usage errors to exit 2", () => {
    assert.deepEqual(describeError(new UsageError("Option '--max-tokens' takes ...")), {
      line: "guarded-generate: Option '--max-tokens' takes ...",
      code: EXIT_USAGE,
    });
  });

  it("maps INVALID_ARGUMENT to exit 2, keeping the code's name", () => {
    assert.deepEqual(describeError(new GuardError(status.INVALID_ARGUMENT, "policy: unknown")), {
      line: "guarded-generate: error: INVALID_ARGUMENT: policy: unknown",
      code: EXIT_USAGE,
    });
  });

  it("maps other gRPC errors to exit 1, on one line", () => {
    assert.deepEqual(describeError(new GuardError(status.UNAUTHENTICATED, "bad token")), {
      line: "guarded-generate: error: UNAUTHENTICATED: bad token",
      code: EXIT_ERROR,
    });
    assert.equal(
      describeError(new GuardError(status.UNAVAILABLE, "No connection established. Last error: ssl3_record.c:350:\n")).line,
      "guarded-generate: error: UNAVAILABLE: No connection established. Last error: ssl3_record.c:350:",
    );
  });

  it("keeps anything else to one line", () => {
    assert.deepEqual(describeError(new Error("odd")), { line: "guarded-generate: error: INTERNAL: odd", code: EXIT_ERROR });
  });
});

describe("text and exit codes", () => {
  const token: TokenEvent = {
    type: "token", index: 0, id: 15687, piece: new Uint8Array([0x20]), text: " Ber", nll: 0.17, ppl: 1.19,
    pplCumulative: 1.19, variance: 19.7, maxProb: 0.84, l2Norm: 2574.2, entropy: 1.25, health: "green",
    warnings: [],
  };

  it("colours text by health only when asked", () => {
    assert.equal(tokenText(token, false), " Ber");
    assert.equal(tokenText(token, true), "\x1b[32m Ber\x1b[0m");
    assert.equal(tokenText({ ...token, health: "red" }, true), "\x1b[31m Ber\x1b[0m");
  });

  it("maps verdicts to exit codes", () => {
    assert.equal(exitCode("completed"), 0);
    assert.equal(exitCode("halted"), 3);
    assert.equal(exitCode("cancelled"), 4);
    assert.equal(exitCode("error"), 1);
  });
});
