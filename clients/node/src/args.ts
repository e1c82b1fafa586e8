/**
 * `guarded-generate`'s command line (clients/README.md, "The contract every example
 * keeps"). It checks only what it must to build a request; the daemon judges the rest.
 */

/** Bad usage: printed as `guarded-generate: error: MESSAGE`, exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export interface Args {
  readonly addr: string;
  readonly tlsCa: string | undefined;
  readonly tokenFile: string | undefined;
  /** Print GetInfo's answer instead of generating. */
  readonly info: boolean;
  readonly json: boolean;
  readonly policy: string | undefined;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly minP: number;
  readonly seed: number | undefined;
  readonly stop: readonly string[];
  /** The generation budget as sent: max(1, round(SECONDS * 1000)). */
  readonly timeoutMs: number | undefined;
  readonly cancelAfter: number | undefined;
  readonly prompt: string;
}

export type Parsed = { readonly kind: "help" } | { readonly kind: "run"; readonly args: Args };

export const USAGE = `usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE]
                        [--json] [--policy NAME] [--max-tokens N] [--temperature T] [--top-k K]
                        [--top-p P] [--min-p M] [--seed S] [--stop TEXT]... [--timeout SECONDS]
                        [--cancel-after N] PROMPT
       guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE] --info

Generate guarded text from the libfse daemon. Exit codes: 0 completed, 3 halted,
4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.

  --addr ADDR          unix:/abs/path (a unix socket) or HOST:PORT (TCP); required
  --tls-ca FILE        use TLS, checking the server against this PEM CA
  --token-file FILE    send the file's first line as a bearer token
  --json               JSON lines on stdout: one per token, then the verdict
  --info               print the daemon's model, policies and limits as one JSON line
  --policy NAME        a policy the daemon serves (the daemon's default)
  --max-tokens N       tokens to generate at most, >= 1 (256)
  --temperature T      0 = greedy (0.8)
  --top-k K            0 = off (40)
  --top-p P            1 = off (0.95)
  --min-p M            0 = off (0.05)
  --seed S             sampling seed, 0..4294967295 (random)
  --stop TEXT          a stop sequence; repeatable
  --timeout SECONDS    generation budget, > 0; the stream halts with guard "deadline"
  --cancel-after N     cancel after the N-th token, N >= 1
`;

const UINT32_MAX = 4294967295;
const INT32_MIN = -2147483648;
const INT32_MAX = 2147483647;

type Kind = "switch" | "value";

const FLAGS: Readonly<Record<string, Kind>> = {
  "--addr": "value",
  "--tls-ca": "value",
  "--token-file": "value",
  "--json": "switch",
  "--info": "switch",
  "--policy": "value",
  "--max-tokens": "value",
  "--temperature": "value",
  "--top-k": "value",
  "--top-p": "value",
  "--min-p": "value",
  "--seed": "value",
  "--stop": "value",
  "--timeout": "value",
  "--cancel-after": "value",
  "--help": "switch",
  "-h": "switch",
};

/** Parse argv (without node and the script). Throws UsageError on bad usage. */
export function parseArgs(argv: readonly string[]): Parsed {
  const values = new Map<string, string>();
  const stop: string[] = [];
  const switches = new Set<string>();
  const positionals: string[] = [];

  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? "";
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith("-") || arg === "-" || isNegativeNumber(arg)) {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const name = arg.startsWith("--") && eq > 0 ? arg.slice(0, eq) : arg;
    const kind = FLAGS[name];
    if (kind === undefined) throw new UsageError(`${name}: unknown flag; accepted: the flags of --help`);
    if (kind === "switch") {
      if (name !== arg) throw new UsageError(`${name}: takes no value`);
      switches.add(name);
      continue;
    }
    let value: string;
    if (name !== arg) {
      value = arg.slice(eq + 1);
    } else {
      const next = argv[i + 1];
      // Like argparse: a following flag is not a value, a negative number is.
      if (next === undefined || (next.startsWith("-") && next !== "-" && !isNegativeNumber(next))) {
        throw new UsageError(`${name}: expected a value`);
      }
      value = next;
      i++;
    }
    if (name === "--stop") stop.push(value);
    else values.set(name, value);
  }

  if (switches.has("--help") || switches.has("-h")) return { kind: "help" };

  const addr = values.get("--addr");
  if (addr === undefined || addr === "") {
    throw new UsageError("--addr: required; accepted: unix:/abs/path or HOST:PORT");
  }
  const info = switches.has("--info");
  if (positionals.length > 1) {
    throw new UsageError(`PROMPT: ${String(positionals.length)} given; accepted: one PROMPT (quote it), the last argument`);
  }
  const prompt = positionals[0] ?? "";
  if (info && positionals.length > 0) throw new UsageError("PROMPT: not taken with --info");
  if (!info && prompt === "") throw new UsageError("PROMPT: must not be empty");

  const int = (flag: string, fallback: number, low: number, high: number, accepted: string): number => {
    const raw = values.get(flag);
    if (raw === undefined) return fallback;
    const n = parseInteger(raw);
    if (n === undefined) throw new UsageError(`${flag}: '${raw}' is not an integer; accepted: ${accepted}`);
    if (n < low || n > high) throw new UsageError(`${flag}: ${raw} is invalid; accepted: ${accepted}`);
    return n;
  };
  const float = (flag: string, fallback: number): number => {
    const raw = values.get(flag);
    if (raw === undefined) return fallback;
    const x = parseFloatStrict(raw);
    if (x === undefined) throw new UsageError(`${flag}: '${raw}' is not a number`);
    return x;
  };

  let timeoutMs: number | undefined;
  const rawTimeout = values.get("--timeout");
  if (rawTimeout !== undefined) {
    const seconds = parseFloatStrict(rawTimeout);
    if (seconds === undefined) throw new UsageError(`--timeout: '${rawTimeout}' is not a number; accepted: seconds > 0`);
    if (!(seconds > 0)) throw new UsageError(`--timeout: ${rawTimeout} is invalid; accepted: seconds > 0`);
    timeoutMs = Math.max(1, roundHalfEven(seconds * 1000));
    if (timeoutMs > UINT32_MAX) {
      throw new UsageError(`--timeout: ${rawTimeout} is invalid; accepted: seconds > 0, up to ${String(UINT32_MAX / 1000)}`);
    }
  }

  const seedGiven = values.has("--seed");
  const cancelGiven = values.has("--cancel-after");
  return {
    kind: "run",
    args: {
      addr,
      tlsCa: values.get("--tls-ca"),
      tokenFile: values.get("--token-file"),
      info,
      json: switches.has("--json"),
      policy: values.get("--policy"),
      maxTokens: int("--max-tokens", 256, 1, UINT32_MAX, ">= 1"),
      temperature: float("--temperature", 0.8),
      topK: int("--top-k", 40, INT32_MIN, INT32_MAX, `${String(INT32_MIN)}..${String(INT32_MAX)}`),
      topP: float("--top-p", 0.95),
      minP: float("--min-p", 0.05),
      seed: seedGiven ? int("--seed", 0, 0, UINT32_MAX, "0 .. 2^32-1") : undefined,
      stop,
      timeoutMs,
      cancelAfter: cancelGiven ? int("--cancel-after", 0, 1, Number.MAX_SAFE_INTEGER, ">= 1") : undefined,
      prompt,
    },
  };
}

function isNegativeNumber(arg: string): boolean {
  return /^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(arg);
}

/** An integer as Python's int() reads one: optional sign, digits, `_` between digits. */
export function parseInteger(raw: string): number | undefined {
  const s = raw.trim();
  if (!/^[+-]?\d+(_\d+)*$/.test(s)) return undefined;
  const n = Number(s.replaceAll("_", ""));
  return Number.isSafeInteger(n) ? n : n > 0 ? Number.MAX_SAFE_INTEGER + 1 : Number.MIN_SAFE_INTEGER - 1;
}

/** A double as Python's float() reads one, "inf" and "nan" included; "" and "0x1" are not. */
export function parseFloatStrict(raw: string): number | undefined {
  const s = raw.trim();
  const special = /^([+-]?)(inf|infinity|nan)$/i.exec(s);
  if (special) {
    if ((special[2] ?? "").toLowerCase() === "nan") return NaN;
    return special[1] === "-" ? -Infinity : Infinity;
  }
  if (!/^[+-]?(\d+(_\d+)*(\.(\d+(_\d+)*)?)?|\.\d+(_\d+)*)([eE][+-]?\d+(_\d+)*)?$/.test(s)) return undefined;
  return Number(s.replaceAll("_", ""));
}

/** Python's round(): to the nearest integer, ties to even. */
export function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff < 0.5) return floor;
  if (diff > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}
