// The library's stream handling against a scripted in-process gRPC server (the real
// daemon is exercised by the conformance harness; these cases need none).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import * as grpc from "@grpc/grpc-js";

import * as wire from "../gen/fse/v1/fse";
import { connect, GuardError, requestToWire, verdictFromWire, type GenerateEvent, type Guard } from "../src/guard";

type Script = (call: grpc.ServerDuplexStream<wire.GenerateClientMessage, wire.GenerateServerMessage>) => void;

const VERDICT: wire.Verdict = {
  status: wire.Status.STATUS_COMPLETED, guard: "", tokens: 1, text: "hi", policy: "default",
  policySha256: "ab".repeat(32), message: "", completion: wire.Completion.COMPLETION_MAX_TOKENS,
};

function token(index: number): wire.GenerateServerMessage {
  return {
    kind: {
      $case: "token",
      value: {
        index, id: 7, piece: Buffer.from("hi"), text: "hi", nll: 0.5, ppl: 1.5, pplCumulative: 1.5, variance: 2,
        maxProb: 0.9, l2Norm: 100, entropy: 2.5, health: wire.Health.HEALTH_GREEN, warnings: [],
      },
    },
  };
}

const verdict = (v: Partial<wire.Verdict> = {}): wire.GenerateServerMessage => ({ kind: { $case: "verdict", value: { ...VERDICT, ...v } } });

describe("Generation against a scripted server", () => {
  const dir = mkdtempSync(join(tmpdir(), "fse-node-test-"));
  const addr = `unix:${join(dir, "s.sock")}`;
  const server = new grpc.Server();
  let script: Script = () => undefined;
  let lastMetadata: grpc.Metadata | undefined;
  let guard: Guard;

  before(async () => {
    server.addService(wire.GuardService, {
      generate: (call: grpc.ServerDuplexStream<wire.GenerateClientMessage, wire.GenerateServerMessage>) => {
        lastMetadata = call.metadata;
        script(call);
      },
      getInfo: (_call: grpc.ServerUnaryCall<wire.GetInfoRequest, wire.Info>, callback: grpc.sendUnaryData<wire.Info>) => {
        callback({ code: grpc.status.UNAUTHENTICATED, details: "no token" });
      },
    });
    await new Promise<void>((resolve, reject) => {
      server.bindAsync(addr, grpc.ServerCredentials.createInsecure(), (err) => {
        if (err) reject(err);
        else resolve();
      });
    });
    guard = connect(addr, { token: "s3cret" });
  });

  after(() => {
    guard.close();
    server.forceShutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  async function collect(events: AsyncIterable<GenerateEvent>): Promise<GenerateEvent[]> {
    const out: GenerateEvent[] = [];
    for await (const e of events) out.push(e);
    return out;
  }

  it("yields tokens then the verdict, and sends the bearer token", async () => {
    let start: wire.GenerateRequest | undefined;
    script = (call) => {
      call.once("data", (msg: wire.GenerateClientMessage) => {
        if (msg.kind?.$case === "start") start = msg.kind.value;
        call.write(token(0));
        call.write(verdict());
        call.end();
      });
    };
    const generation = guard.generate({ prompt: "p", maxTokens: 3, sampling: { temperature: 0 }, stop: ["."] });
    const events = await collect(generation);
    assert.deepEqual(events.map((e) => e.type), ["token", "verdict"]);
    const first = events[0];
    assert.ok(first?.type === "token");
    assert.equal(first.entropy, 2.5);
    assert.equal(first.l2Norm, 100);
    assert.equal((await generation.verdict).status, "completed");
    assert.deepEqual(lastMetadata?.get("authorization"), ["Bearer s3cret"]);
    assert.ok(start?.sampling);
    assert.equal(start.prompt, "p");
    assert.equal(start.maxTokens, 3);
    assert.equal(start.sampling.temperature, 0);
    assert.equal(start.sampling.seed, undefined);
    assert.deepEqual(start.stop, ["."]);
  });

  it("sends Cancel when the signal aborts, and still reads the verdict", async () => {
    script = (call) => {
      call.on("data", (msg: wire.GenerateClientMessage) => {
        if (msg.kind?.$case === "start") call.write(token(0));
        if (msg.kind?.$case === "cancel") {
          call.write(verdict({ status: wire.Status.STATUS_CANCELLED }));
          call.end();
        }
      });
    };
    const abort = new AbortController();
    const generation = guard.generate({ prompt: "p" }, { signal: abort.signal });
    const types: string[] = [];
    for await (const e of generation) {
      types.push(e.type);
      if (e.type === "token") abort.abort();
    }
    assert.deepEqual(types, ["token", "verdict"]);
    assert.equal((await generation.verdict).status, "cancelled");
  });

  it("cancels the call when the loop is left before the verdict", async () => {
    let serverSawCancel: Promise<void> = Promise.resolve();
    script = (call) => {
      serverSawCancel = new Promise((resolve) => call.on("cancelled", () => { resolve(); }));
      call.once("data", () => call.write(token(0)));
    };
    const generation = guard.generate({ prompt: "p" });
    for await (const e of generation) {
      if (e.type === "token") break;
    }
    await assert.rejects(generation.verdict, (err: unknown) => err instanceof GuardError && err.codeName === "CANCELLED");
    await serverSawCancel;
  });

  it("throws a gRPC failure as a GuardError with code and details", async () => {
    script = (call) => {
      call.once("data", () => {
        call.emit("error", { code: grpc.status.INVALID_ARGUMENT, details: "max_tokens: 0 is invalid" });
      });
    };
    const generation = guard.generate({ prompt: "p", maxTokens: 0 });
    await assert.rejects(collect(generation), (err: unknown) => {
      assert.ok(err instanceof GuardError);
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(err.codeName, "INVALID_ARGUMENT");
      assert.equal(err.details, "max_tokens: 0 is invalid");
      assert.equal(err.message, "INVALID_ARGUMENT: max_tokens: 0 is invalid");
      return true;
    });
    await assert.rejects(generation.verdict, GuardError);
  });

  it("reports the verdict that came before an error status", async () => {
    script = (call) => {
      call.once("data", () => {
        call.write(verdict({ status: wire.Status.STATUS_ERROR, message: "decode failed" }));
        call.emit("error", { code: grpc.status.INTERNAL, details: "decode failed" });
      });
    };
    const events = await collect(guard.generate({ prompt: "p" }));
    const last = events.at(-1);
    assert.ok(last?.type === "verdict");
    assert.equal(last.status, "error");
  });

  it("fails a stream that ends without a verdict", async () => {
    script = (call) => {
      call.once("data", () => {
        call.write(token(0));
        call.end();
      });
    };
    await assert.rejects(collect(guard.generate({ prompt: "p" })), (err: unknown) => {
      assert.ok(err instanceof GuardError);
      assert.match(err.details, /without a verdict/);
      return true;
    });
  });

  it("maps GetInfo failures to GuardError", async () => {
    await assert.rejects(guard.info(), (err: unknown) => err instanceof GuardError && err.codeName === "UNAUTHENTICATED");
  });

  it("fails fast when nothing listens", async () => {
    const nowhere = connect(`unix:${join(dir, "none.sock")}`);
    try {
      await assert.rejects(collect(nowhere.generate({ prompt: "p" })), (err: unknown) => {
        return err instanceof GuardError && err.code === grpc.status.UNAVAILABLE;
      });
    } finally {
      nowhere.close();
    }
  });
});

describe("wire mapping", () => {
  it("never takes an unknown status for completed", () => {
    assert.equal(verdictFromWire({ ...VERDICT, status: wire.Status.STATUS_UNSPECIFIED }).status, "error");
    // A status from a newer daemon: decode() keeps the raw number.
    const unknown = wire.Verdict.decode(Buffer.from([0x08, 42]));
    assert.equal(verdictFromWire(unknown).status, "error");
    assert.equal(verdictFromWire({ ...VERDICT, status: wire.Status.STATUS_HALTED, guard: "loop" }).guard, "loop");
    assert.equal(verdictFromWire(VERDICT).guard, undefined);
  });

  it("says why a completed stream ended; unspecified or unknown is unset", () => {
    const cases: [wire.Completion, string | undefined][] = [
      [wire.Completion.COMPLETION_END_OF_GENERATION, "end_of_generation"],
      [wire.Completion.COMPLETION_STOP_SEQUENCE, "stop_sequence"],
      [wire.Completion.COMPLETION_MAX_TOKENS, "max_tokens"],
      [wire.Completion.COMPLETION_UNSPECIFIED, undefined],
    ];
    for (const [completion, want] of cases) assert.equal(verdictFromWire({ ...VERDICT, completion }).completion, want);
    // A reason from a newer daemon (field 11, varint 42): decode() keeps the raw number.
    const unknown = wire.Verdict.decode(Buffer.from([0x08, 1, 0x58, 42]));
    assert.equal(unknown.completion, 42);
    assert.equal(verdictFromWire(unknown).completion, undefined);
    assert.equal(verdictFromWire(unknown).status, "completed");
  });

  it("sends all four sampling values and the seed only when given", () => {
    const w = requestToWire({ prompt: "p", sampling: { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05 } });
    const bytes = wire.GenerateRequest.encode(w).finish();
    const back = wire.GenerateRequest.decode(bytes);
    assert.ok(back.sampling);
    assert.equal(back.sampling.temperature, 0.8);
    assert.equal(back.sampling.topK, 40);
    assert.equal(back.sampling.seed, undefined);
    assert.equal(back.maxTokens, 256);
    assert.equal(wire.GenerateRequest.decode(wire.GenerateRequest.encode(requestToWire({ sampling: { seed: 0 } })).finish()).sampling?.seed, 0);
  });
});
