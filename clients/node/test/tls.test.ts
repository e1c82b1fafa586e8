// TLS and bearer tokens, through the library and through the built guarded-generate,
// against an in-process TLS server (test/tls/ holds its test-only certificates).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import * as grpc from "@grpc/grpc-js";

import * as wire from "../gen/fse/v1/fse";
import { connect, GuardError } from "../src/guard";

const FIXTURES = join(__dirname, "..", "..", "test", "tls");
const CLI = join(__dirname, "..", "src", "cli.js");
const TOKEN = "s3cret-token";

const INFO: wire.Info = {
  version: "9.9.9",
  model: {
    name: "Tiny", path: "/models/tiny.gguf", sha256: "cd".repeat(32), description: "tiny", vocabSize: 10,
    contextSize: 64, trainContextSize: 128, sizeBytes: 12345n, chatTemplate: false, backend: "CPU", layers: 2,
    gpuLayers: 0, devices: [{ name: "CPU", description: "test CPU", kind: "cpu", memoryBytes: 1024n, layers: 2 }],
  },
  policies: [{ name: "default", sha256: "ef".repeat(32), builtin: true }],
  limits: { maxStreams: 1, maxQueue: 2, maxTokens: 63, maxPromptTokens: 63, maxMessageBytes: 4194304 },
};

function authorized(metadata: grpc.Metadata): boolean {
  return metadata.get("authorization")[0] === `Bearer ${TOKEN}`;
}

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === "number" ? err.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

describe("TLS and bearer tokens", () => {
  const server = new grpc.Server();
  const dir = mkdtempSync(join(tmpdir(), "fse-node-tls-"));
  const ca = readFileSync(join(FIXTURES, "ca.pem"));
  let port = 0;

  before(async () => {
    server.addService(wire.GuardService, {
      getInfo: (call: grpc.ServerUnaryCall<wire.GetInfoRequest, wire.Info>, callback: grpc.sendUnaryData<wire.Info>) => {
        if (authorized(call.metadata)) callback(null, INFO);
        else callback({ code: grpc.status.UNAUTHENTICATED, details: "unknown bearer token" });
      },
      generate: (call: grpc.ServerDuplexStream<wire.GenerateClientMessage, wire.GenerateServerMessage>) => {
        if (!authorized(call.metadata)) {
          call.emit("error", { code: grpc.status.UNAUTHENTICATED, details: "unknown bearer token" });
          return;
        }
        call.once("data", () => {
          const verdict: wire.Verdict = {
            status: wire.Status.STATUS_COMPLETED, guard: "", tokens: 0, text: "", policy: "default",
            policySha256: "ef".repeat(32), message: "", completion: wire.Completion.COMPLETION_MAX_TOKENS,
          };
          call.write({ kind: { $case: "verdict", value: verdict } });
          call.end();
        });
      },
    });
    const credentials = grpc.ServerCredentials.createSsl(null, [
      { private_key: readFileSync(join(FIXTURES, "server.key")), cert_chain: readFileSync(join(FIXTURES, "server.pem")) },
    ]);
    port = await new Promise<number>((resolve, reject) => {
      server.bindAsync("127.0.0.1:0", credentials, (err, bound) => {
        if (err) reject(err);
        else resolve(bound);
      });
    });
    writeFileSync(join(dir, "token"), `  ${TOKEN}  \nignored\n`);
    writeFileSync(join(dir, "wrong"), "nope\n");
  });

  after(() => {
    server.forceShutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  for (const host of ["127.0.0.1", "localhost"]) {
    it(`checks the certificate against the host of the address (${host})`, async () => {
      const guard = connect(`${host}:${String(port)}`, { tlsCa: ca, token: TOKEN });
      try {
        const info = await guard.info();
        assert.equal(info.version, "9.9.9");
        assert.equal(info.model?.sizeBytes, 12345n);
        assert.equal((await guard.generate({ prompt: "p" }).verdict).status, "completed");
      } finally {
        guard.close();
      }
    });
  }

  it("refuses a server its CA did not sign", async () => {
    const guard = connect(`127.0.0.1:${String(port)}`, { tlsCa: readFileSync(join(FIXTURES, "other-ca.pem")), token: TOKEN });
    try {
      await assert.rejects(guard.info(), (err: unknown) => err instanceof GuardError && err.code === grpc.status.UNAVAILABLE);
    } finally {
      guard.close();
    }
  });

  it("guarded-generate --info over TLS prints one JSON line and nothing on stderr", async () => {
    const r = await run(["--addr", `127.0.0.1:${String(port)}`, "--tls-ca", join(FIXTURES, "ca.pem"), "--token-file", join(dir, "token"), "--info"]);
    assert.equal(r.stderr, "");
    assert.equal(r.code, 0);
    const lines = r.stdout.split("\n").filter((l) => l !== "");
    assert.equal(lines.length, 1);
    const doc = JSON.parse(lines[0] ?? "") as { model: Record<string, unknown>; limits: Record<string, unknown> };
    assert.equal(doc.model.size_bytes, 12345);
    assert.equal(doc.model.backend, "CPU");
    assert.deepEqual(doc.model.devices, [{ name: "CPU", description: "test CPU", kind: "cpu", memory_bytes: 1024, layers: 2 }]);
    assert.equal("path" in doc.model, false);
    assert.equal(doc.limits.max_tokens, 63);
  });

  it("guarded-generate with a wrong token fails UNAUTHENTICATED, exit 1", async () => {
    for (const args of [["--info"], ["--json", "hello"]]) {
      const r = await run(["--addr", `localhost:${String(port)}`, "--tls-ca", join(FIXTURES, "ca.pem"), "--token-file", join(dir, "wrong"), ...args]);
      assert.equal(r.code, 1);
      assert.equal(r.stdout, "");
      assert.equal(r.stderr, "guarded-generate: error: UNAUTHENTICATED: unknown bearer token\n");
    }
  });

  it("guarded-generate names an unreadable CA or token file, exit 2", async () => {
    const r = await run(["--addr", `localhost:${String(port)}`, "--tls-ca", join(dir, "missing.pem"), "--info"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^guarded-generate: Option '--tls-ca': .*missing\.pem.*\n$/);
    const garbage = await run(["--addr", `localhost:${String(port)}`, "--tls-ca", join(dir, "token"), "--info"]);
    assert.equal(garbage.code, 2);
    assert.match(garbage.stderr, /^guarded-generate: Option '--tls-ca': .* holds no PEM certificate\n$/);
    const t = await run(["--addr", `localhost:${String(port)}`, "--token-file", join(dir, "missing"), "hello"]);
    assert.equal(t.code, 2);
    assert.match(t.stderr, /^guarded-generate: Option '--token-file': /);
  });
});

describe("mutual TLS", () => {
  const server = new grpc.Server();
  const dir = mkdtempSync(join(tmpdir(), "fse-node-mtls-"));
  const ca = readFileSync(join(FIXTURES, "ca.pem"));
  const cert = readFileSync(join(FIXTURES, "client.pem"));
  const key = readFileSync(join(FIXTURES, "client.key"));
  let port = 0;

  before(async () => {
    server.addService(wire.GuardService, {
      getInfo: (_call: grpc.ServerUnaryCall<wire.GetInfoRequest, wire.Info>, callback: grpc.sendUnaryData<wire.Info>) => {
        callback(null, INFO);
      },
      generate: () => undefined,
    });
    // The server wants a client certificate signed by the client CA.
    const credentials = grpc.ServerCredentials.createSsl(
      readFileSync(join(FIXTURES, "client-ca.pem")),
      [{ private_key: readFileSync(join(FIXTURES, "server.key")), cert_chain: readFileSync(join(FIXTURES, "server.pem")) }],
      true,
    );
    port = await new Promise<number>((resolve, reject) => {
      server.bindAsync("127.0.0.1:0", credentials, (err, bound) => {
        if (err) reject(err);
        else resolve(bound);
      });
    });
  });

  after(() => {
    server.forceShutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  it("presents the client certificate and its key", async () => {
    const guard = connect(`localhost:${String(port)}`, { tlsCa: ca, tlsCert: cert, tlsKey: key });
    try {
      assert.equal((await guard.info()).version, "9.9.9");
    } finally {
      guard.close();
    }
  });

  it("without one, the handshake fails UNAVAILABLE", async () => {
    const guard = connect(`localhost:${String(port)}`, { tlsCa: ca });
    try {
      await assert.rejects(guard.info(), (err: unknown) => err instanceof GuardError && err.code === grpc.status.UNAVAILABLE);
    } finally {
      guard.close();
    }
  });

  it("wants both the certificate and the key", () => {
    assert.throws(() => connect("localhost:1", { tlsCa: ca, tlsCert: cert }), /tlsKey: required with tlsCert/);
    assert.throws(() => connect("localhost:1", { tlsCa: ca, tlsKey: key }), /tlsCert: required with tlsKey/);
  });

  it("guarded-generate --tls-cert --tls-key succeeds; without them, one error line and exit 1", async () => {
    const addr = ["--addr", `localhost:${String(port)}`, "--tls-ca", join(FIXTURES, "ca.pem")];
    const mine = ["--tls-cert", join(FIXTURES, "client.pem"), "--tls-key", join(FIXTURES, "client.key")];
    const ok = await run([...addr, ...mine, "--info"]);
    assert.equal(ok.stderr, "");
    assert.equal(ok.code, 0);
    const refused = await run([...addr, "--info"]);
    assert.equal(refused.code, 1);
    assert.equal(refused.stdout, "");
    assert.match(refused.stderr, /^guarded-generate: error: UNAVAILABLE: [^\n]*\n$/);
  });

  it("guarded-generate names an unreadable or wrong certificate or key file, exit 2", async () => {
    const addr = ["--addr", `localhost:${String(port)}`, "--tls-ca", join(FIXTURES, "ca.pem")];
    const cases: [string[], RegExp][] = [
      [["--tls-cert", join(dir, "missing.pem"), "--tls-key", join(FIXTURES, "client.key")], /^guarded-generate: Option '--tls-cert': .*missing\.pem/],
      [["--tls-cert", join(FIXTURES, "client.pem"), "--tls-key", join(dir, "missing.key")], /^guarded-generate: Option '--tls-key': .*missing\.key/],
      [["--tls-cert", join(FIXTURES, "client.key"), "--tls-key", join(FIXTURES, "client.key")], /^guarded-generate: Option '--tls-cert': .* holds no PEM certificate\n$/],
      [["--tls-cert", join(FIXTURES, "client.pem"), "--tls-key", join(FIXTURES, "client.pem")], /^guarded-generate: Option '--tls-key': .* holds no PEM private key\n$/],
      [["--tls-cert", join(FIXTURES, "client.pem")], /^guarded-generate: Option '--tls-key' is required with '--tls-cert'\n$/],
    ];
    for (const [args, want] of cases) {
      const r = await run([...addr, ...args, "--info"]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, want);
    }
  });
});
