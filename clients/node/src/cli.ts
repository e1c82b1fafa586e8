#!/usr/bin/env node
/**
 * guarded-generate: a thin command line over the library (clients/README.md fixes its
 * flags, output, exit codes and error lines).
 */

import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";

import { status } from "@grpc/grpc-js";

import { parseArgs, UsageError, USAGE, type Args } from "./args";
import { connect, GuardError, type Guard } from "./guard";
import { exitCode, infoJson, tokenJson, tokenText, toJson, verdictJson, verdictLine } from "./render";

const PROG = "guarded-generate";
export const EXIT_ERROR = 1;
export const EXIT_USAGE = 2;

/** What to print on stderr (always one line), and the exit code, for an error that ends the program. */
export function describeError(err: unknown, addr: string): { line: string; code: number } {
  const { line, code } = describe(err, addr);
  return { line: oneLine(line), code };
}

// grpc-js's wording when no connection could be made at all (as opposed to an
// UNAVAILABLE the daemon itself answers, e.g. while shutting down).
const UNREACHABLE_MARKS = ["no connection established", "name resolution failed", "failed to connect", "econnrefused", "enoent"];

function unreachable(details: string): boolean {
  const lower = details.toLowerCase();
  return UNREACHABLE_MARKS.some((mark) => lower.includes(mark));
}

/** OpenSSL's messages, for one, end in a newline. */
function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, " ").trim();
}

function describe(err: unknown, addr: string): { line: string; code: number } {
  if (err instanceof UsageError) return { line: `${PROG}: error: ${err.message}`, code: EXIT_USAGE };
  if (err instanceof GuardError) {
    if (err.code === status.UNAVAILABLE && unreachable(err.details)) {
      // grpc-js ends its detail with an empty "Resolution note: " for unix sockets.
      const detail = oneLine(err.details).replace(/\s*\.?\s*Resolution note:$/, "");
      return {
        line: `${PROG}: error: UNAVAILABLE: cannot reach the daemon at ${addr} (${detail})`,
        code: EXIT_ERROR,
      };
    }
    const code = err.code === status.INVALID_ARGUMENT ? EXIT_USAGE : EXIT_ERROR;
    return { line: `${PROG}: error: ${err.codeName}: ${oneLine(err.details)}`, code };
  }
  // Not expected: still one line, never a stack trace.
  const message = err instanceof Error ? err.message : String(err);
  return { line: `${PROG}: error: INTERNAL: ${message}`, code: EXIT_ERROR };
}

/** A file the user named, or a UsageError naming the flag. */
function readUserFile(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const why = (err as NodeJS.ErrnoException).code ?? (err instanceof Error ? err.message : String(err));
    throw new UsageError(`${flag}: cannot read ${path} (${why}); accepted: a readable file`);
  }
}

/** The bearer token: the file's first line, whitespace trimmed. */
export function tokenFromFile(contents: string): string | undefined {
  const token = (contents.split(/\r?\n/, 1)[0] ?? "").trim();
  return token === "" ? undefined : token;
}

function open(args: Args): Guard {
  let token: string | undefined;
  if (args.tokenFile !== undefined) {
    token = tokenFromFile(readUserFile("--token-file", args.tokenFile).toString("utf8"));
    if (token === undefined) {
      throw new UsageError(`--token-file: ${args.tokenFile} has an empty first line; accepted: a file whose first line is the token`);
    }
  }
  let tlsCa: Buffer | undefined;
  if (args.tlsCa !== undefined) {
    tlsCa = readUserFile("--tls-ca", args.tlsCa);
    // Node's TLS takes a file without any certificate and then trusts nothing: say so now.
    try {
      new X509Certificate(tlsCa);
    } catch {
      throw new UsageError(`--tls-ca: ${args.tlsCa} holds no certificate; accepted: a PEM CA certificate file`);
    }
  }
  return connect(args.addr, { tlsCa, token });
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
  const generation = guard.generate(
    {
      prompt: args.prompt,
      maxTokens: args.maxTokens,
      sampling: {
        temperature: args.temperature,
        topK: args.topK,
        topP: args.topP,
        minP: args.minP,
        seed: args.seed,
      },
      policy: args.policy,
      stop: args.stop,
      timeoutMs: args.timeoutMs,
    },
    { signal: abort.signal },
  );
  const colour = !args.json && process.stdout.isTTY && process.env.NO_COLOR === undefined;
  let tokens = 0;
  for await (const event of generation) {
    switch (event.type) {
      case "started":
        break;
      case "token":
        process.stdout.write(args.json ? `${toJson(tokenJson(event))}\n` : tokenText(event, colour));
        tokens++;
        if (tokens === args.cancelAfter) generation.cancel();
        break;
      case "verdict":
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
  throw new GuardError(status.UNKNOWN, `the daemon at ${guard.addr} ended the stream without a verdict`);
}

export async function main(argv: readonly string[]): Promise<number> {
  let addr = "";
  let guard: Guard | undefined;
  try {
    const parsed = parseArgs(argv);
    if (parsed.kind === "help") {
      process.stdout.write(USAGE);
      return 0;
    }
    const args = parsed.args;
    addr = args.addr;
    guard = open(args);
    if (args.info) {
      process.stdout.write(`${toJson(infoJson(await guard.info()))}\n`);
      return 0;
    }
    return await generate(guard, args);
  } catch (err) {
    const { line, code } = describeError(err, addr);
    process.stderr.write(`${line}\n`);
    return code;
  } finally {
    guard?.close();
  }
}

if (require.main === module) {
  // grpc-js names the TLS server by the host of --addr, an IP address included (checked
  // against the certificate's IP SANs); Node warns about such a server name on stderr,
  // which must carry nothing but the verdict or the error line.
  process.noDeprecation = true;
  // A closed stdout (`| head`) ends the output, not the program with a stack trace.
  process.stdout.on("error", () => undefined);
  process.stderr.on("error", () => undefined);
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
