import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { status } from "@grpc/grpc-js";

import { UsageError } from "../src/args";
import { describeError, EXIT_ERROR, EXIT_USAGE, tokenFromFile } from "../src/cli";
import { GuardError } from "../src/guard";

describe("describeError", () => {
  it("maps usage errors to exit 2", () => {
    assert.deepEqual(describeError(new UsageError("--max-tokens: 0 is invalid; accepted: >= 1"), ""), {
      line: "guarded-generate: error: --max-tokens: 0 is invalid; accepted: >= 1",
      code: EXIT_USAGE,
    });
  });

  it("maps INVALID_ARGUMENT to exit 2, keeping the code's name", () => {
    assert.deepEqual(describeError(new GuardError(status.INVALID_ARGUMENT, "policy: unknown"), "unix:/s"), {
      line: "guarded-generate: error: INVALID_ARGUMENT: policy: unknown",
      code: EXIT_USAGE,
    });
  });

  it("maps other gRPC errors to exit 1", () => {
    assert.deepEqual(describeError(new GuardError(status.UNAUTHENTICATED, "bad token"), "unix:/s"), {
      line: "guarded-generate: error: UNAUTHENTICATED: bad token",
      code: EXIT_ERROR,
    });
    assert.deepEqual(describeError(new GuardError(status.RESOURCE_EXHAUSTED, "queue full"), "unix:/s"), {
      line: "guarded-generate: error: RESOURCE_EXHAUSTED: queue full",
      code: EXIT_ERROR,
    });
  });

  it("says which daemon cannot be reached", () => {
    const err = new GuardError(status.UNAVAILABLE, "No connection established. Last error: connect ENOENT /s. Resolution note: ");
    assert.deepEqual(describeError(err, "unix:/s"), {
      line: "guarded-generate: error: UNAVAILABLE: cannot reach the daemon at unix:/s (No connection established. Last error: connect ENOENT /s)",
      code: EXIT_ERROR,
    });
  });

  it("keeps the daemon's own UNAVAILABLE message", () => {
    assert.equal(
      describeError(new GuardError(status.UNAVAILABLE, "the daemon is shutting down"), "unix:/s").line,
      "guarded-generate: error: UNAVAILABLE: the daemon is shutting down",
    );
  });

  it("keeps a multi-line detail to one line", () => {
    const err = new GuardError(status.UNAVAILABLE, "No connection established. Last error: Error: 80:error:0A00010B:SSL routines:wrong version number:ssl3_record.c:350:\n");
    assert.equal(
      describeError(err, "127.0.0.1:1").line,
      "guarded-generate: error: UNAVAILABLE: cannot reach the daemon at 127.0.0.1:1 (No connection established. Last error: Error: 80:error:0A00010B:SSL routines:wrong version number:ssl3_record.c:350:)",
    );
  });

  it("keeps anything else to one line", () => {
    const { line, code } = describeError(new Error("odd"), "");
    assert.equal(line, "guarded-generate: error: INTERNAL: odd");
    assert.equal(code, EXIT_ERROR);
  });
});

describe("tokenFromFile", () => {
  it("takes the first line, trimmed", () => {
    assert.equal(tokenFromFile("  s3cret \nsecond\n"), "s3cret");
    assert.equal(tokenFromFile("tok\r\n"), "tok");
    assert.equal(tokenFromFile("\nsecond"), undefined);
    assert.equal(tokenFromFile(""), undefined);
  });
});
