#!/usr/bin/env node
/**
 * guarded-generate: a thin command line over the library (clients/README.md fixes its
 * flags, output and exit codes). Flags are read by node:util's parseArgs; bad usage is
 * its error (or ours for a value, in its style), naming the flag, exit 2.
 */

import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { status } from "@grpc/grpc-js";

import { infoJson, toJson, tokenJson, verdictJson, verdictLine } from "./format";
import {
  connect,
  GuardError,
  type GenerateRequest,
  type Guard,
  type Health,
  type TokenEvent,
  type VerdictStatus,
} from "./guard";

export const EXIT_ERROR = 1;
export const EXIT_USAGE = 2;

const COLOURS: Readonly<Record<Health, string>> = { green: "\x1b[32m", yellow: "\x1b[33m", red: "\x1b[31m" };

/** A token's text for a terminal, coloured by its health when `colour` is on. */
export function tokenText(t: TokenEvent, colour: boolean): string {
  return !colour || t.health === undefined ? t.text : `${COLOURS[t.health]}${t.text}\x1b[0m`;
}

/** The exit code for a verdict (clients/README.md, "Exit codes"). */
export function exitCode(outcome: VerdictStatus): number {
  return { completed: 0, halted: 3, cancelled: 4, error: 1 }[outcome];
}

/** Bad usage: printed as `guarded-generate: MESSAGE`, exit code 2. */
export class UsageError extends Error {}

const OPTIONS = {
  addr: { type: "string" }, // unix:/abs/path or HOST:PORT; required
  "tls-ca": { type: "string" }, // TLS, checking the server against this PEM CA
  "tls-cert": { type: "string" }, // mutual TLS: the PEM client certificate (with --tls-key)
  "tls-key": { type: "string" }, // mutual TLS: its PEM private key (with --tls-cert)
  "token-file": { type: "string" }, // bearer token: the file's first line
  json: { type: "boolean" }, // JSON lines on stdout
  info: { type: "boolean" }, // the daemon's model, policies and limits as one JSON line
  policy: { type: "string" },
  "max-tokens": { type: "string", default: "256" },
  temperature: { type: "string", default: "0.8" },
  "top-k": { type: "string", default: "40" },
  "top-p": { type: "string", default: "0.95" },
  "min-p": { type: "string", default: "0.05" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true },
  timeout: { type: "string" },
  "cancel-after": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

export const USAGE = `usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]
         [--token-file FILE] [--json] [--policy NAME] [--max-tokens N] [--temperature T] [--top-k K]
         [--top-p P] [--min-p M] [--seed S] [--stop TEXT]... [--timeout SECONDS] [--cancel-after N] PROMPT
       guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]
         [--token-file FILE] --info
Exit codes: 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
`;

export interface Args {
  readonly addr: string;
  readonly tlsCa: string | undefined;
  readonly tlsCert: string | undefined;
  readonly tlsKey: string | undefined;
  readonly tokenFile: string | undefined;
  readonly json: boolean;
  readonly info: boolean;
  readonly help: boolean;
  readonly cancelAfter: number | undefined;
  readonly request: GenerateRequest;
}

/** Reads argv (without node and the script); throws parseArgs' TypeError or a UsageError. */
export function readArgs(argv: readonly string[]): Args {
  const { values: v, positionals } = parseArgs({ args: [...argv], options: OPTIONS, allowPositionals: true });
  // A number (an integer in low..high when integer), or a UsageError naming the flag.
  const num = (flag: keyof typeof OPTIONS, integer = false, low = -(2 ** 31), high = 2 ** 32 - 1): number | undefined => {
    const raw = v[flag];
    if (typeof raw !== "string") return undefined;
    const x = raw.trim() === "" ? NaN : Number(raw);
    if (Number.isNaN(x) || (integer && !(Number.isInteger(x) && x >= low && x <= high))) {
      const what = integer ? `an integer in ${String(low)}..${String(high)}` : "a number";
      throw new UsageError(`Option '--${flag}' takes ${what}, got '${raw}'`);
    }
    return x;
  };
  const info = v.info ?? false;
  const prompt = positionals[0] ?? "";
  if (v.help !== true && (v.addr ?? "") === "") throw new UsageError("Option '--addr' is required");
  if (positionals.length > 1) throw new UsageError(`PROMPT: one expected (quote it), got ${String(positionals.length)}`);
  if (v.help !== true && !info && prompt === "") throw new UsageError("PROMPT: must not be empty");
  const [cert, key] = [v["tls-cert"], v["tls-key"]];
  if (cert !== undefined && key === undefined) throw new UsageError("Option '--tls-key' is required with '--tls-cert'");
  if (key !== undefined && cert === undefined) throw new UsageError("Option '--tls-cert' is required with '--tls-key'");
  if (cert !== undefined && v["tls-ca"] === undefined) {
    throw new UsageError("Option '--tls-ca' is required with '--tls-cert' and '--tls-key' (mutual TLS is TLS)");
  }
  const seconds = num("timeout");
  if (seconds !== undefined && !(seconds > 0 && seconds * 1000 <= 0xffffffff)) {
    throw new UsageError(`Option '--timeout' takes seconds > 0, got '${v.timeout ?? ""}'`);
  }
  return {
    addr: v.addr ?? "",
    tlsCa: v["tls-ca"],
    tlsCert: cert,
    tlsKey: key,
    tokenFile: v["token-file"],
    json: v.json ?? false,
    info,
    help: v.help ?? false,
    cancelAfter: num("cancel-after", true, 1),
    request: {
      prompt,
      maxTokens: num("max-tokens", true, 1),
      sampling: { temperature: num("temperature"), topK: num("top-k", true, -(2 ** 31), 2 ** 31 - 1), topP: num("top-p"), minP: num("min-p"), seed: num("seed", true, 0) },
      policy: v.policy,
      stop: v.stop ?? [],
      // timeout_ms = max(1, round(SECONDS * 1000))
      timeoutMs: seconds === undefined ? undefined : Math.max(1, Math.round(seconds * 1000)),
    },
  };
}

/** A file named by a flag; failing to read it is bad usage naming the flag. */
function readFlagFile(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new UsageError(`Option '--${flag}': ${err instanceof Error ? err.message : String(err)}`);
  }
}

function open(args: Args): Guard {
  let token: string | undefined;
  if (args.tokenFile !== undefined) {
    token = (readFlagFile("token-file", args.tokenFile).toString("utf8").split(/\r?\n/, 1)[0] ?? "").trim();
    if (token === "") throw new UsageError(`Option '--token-file': ${args.tokenFile} has no token on its first line`);
  }
  let tlsCa: Buffer | undefined;
  if (args.tlsCa !== undefined) {
    tlsCa = readFlagFile("tls-ca", args.tlsCa);
    try {
      new X509Certificate(tlsCa); // Node's TLS would take a file without one and trust nothing
    } catch {
      throw new UsageError(`Option '--tls-ca': ${args.tlsCa} holds no PEM certificate`);
    }
  }
  let tlsCert: Buffer | undefined;
  let tlsKey: Buffer | undefined;
  if (args.tlsCert !== undefined && args.tlsKey !== undefined) {
    tlsCert = readFlagFile("tls-cert", args.tlsCert);
    tlsKey = readFlagFile("tls-key", args.tlsKey);
    try {
      new X509Certificate(tlsCert);
    } catch {
      throw new UsageError(`Option '--tls-cert': ${args.tlsCert} holds no PEM certificate`);
    }
    try {
      createPrivateKey(tlsKey);
    } catch {
      throw new UsageError(`Option '--tls-key': ${args.tlsKey} holds no PEM private key`);
    }
  }
  return connect(args.addr, { tlsCa, tlsCert, tlsKey, token });
}

async function generate(guard: Guard, args: Args): Promise<number> {
  const abort = new AbortController();
  // The first Ctrl-C cancels cleanly (verdict `cancelled`, exit 4); a second one kills.
  process.once("SIGINT", () => {
    abort.abort();
  });
  // A closed stdout (`| head`): stop generating, and fail (as Python's BrokenPipeError does).
  const output = { closed: false };
  process.stdout.once("error", () => {
    output.closed = true;
    abort.abort();
  });
  const generation = guard.generate(args.request, { signal: abort.signal });
  const colour = !args.json && process.stdout.isTTY && process.env.NO_COLOR === undefined;
  let tokens = 0;
  for await (const event of generation) {
    if (event.type === "token") {
      process.stdout.write(args.json ? `${toJson(tokenJson(event))}\n` : tokenText(event, colour));
      if (++tokens === args.cancelAfter) generation.cancel();
    } else if (event.type === "verdict") {
      if (args.json) {
        process.stdout.write(`${toJson(verdictJson(event))}\n`);
      } else {
        process.stdout.write("\n");
        process.stderr.write(`${verdictLine(event)}\n`);
      }
      return output.closed ? EXIT_ERROR : exitCode(event.status);
    }
  }
  // The library throws when the stream ends without a verdict; this is not reached.
  return EXIT_ERROR;
}

/** The error line (one line, no stack trace) and exit code for what ended the program. */
export function describeError(err: unknown): { line: string; code: number } {
  if (err instanceof UsageError || (err instanceof TypeError && "code" in err && String(err.code).startsWith("ERR_PARSE_ARGS"))) {
    return { line: `guarded-generate: ${err.message}`, code: EXIT_USAGE };
  }
  const code = err instanceof GuardError && err.code === status.INVALID_ARGUMENT ? EXIT_USAGE : EXIT_ERROR;
  const what = err instanceof GuardError ? `${err.codeName}: ${err.details}` : `INTERNAL: ${err instanceof Error ? err.message : String(err)}`;
  return { line: `guarded-generate: error: ${what.replace(/\s*[\r\n]+\s*/g, " ").trim()}`, code };
}

export async function main(argv: readonly string[]): Promise<number> {
  let guard: Guard | undefined;
  try {
    const args = readArgs(argv);
    if (args.help) {
      process.stdout.write(USAGE);
      return 0;
    }
    guard = open(args);
    if (!args.info) return await generate(guard, args);
    process.stdout.write(`${toJson(infoJson(await guard.info()))}\n`);
    return 0;
  } catch (err) {
    const { line, code } = describeError(err);
    process.stderr.write(`${line}\n`);
    return code;
  } finally {
    guard?.close();
  }
}

if (require.main === module) {
  // grpc-js names the TLS server by the host of --addr, an IP address included (checked
  // against the certificate's IP SANs); Node warns about such a server name on stderr.
  process.noDeprecation = true;
  // A closed stdout (`| head`) ends the output, not the program with a stack trace.
  process.stdout.on("error", () => undefined);
  process.stderr.on("error", () => undefined);
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
