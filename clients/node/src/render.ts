/**
 * How `guarded-generate` prints events: JSON lines for programs, text for people
 * (clients/README.md, "Output"). Pure functions, so the unit tests cover them.
 */

import type { Health, Info, TokenEvent, Verdict, VerdictStatus } from "./guard";

/**
 * A JSON value with the two kinds of numbers kept apart: a `number` is a double, printed
 * in shortest round-trip form; a `bigint` is an integer. Object keys keep their order.
 */
export type Json = null | boolean | string | number | bigint | readonly Json[] | { readonly [key: string]: Json };

/** One JSON document on one line, spaced as Python's json.dumps spaces it. */
export function toJson(value: Json): string {
  if (value === null) return "null";
  switch (typeof value) {
    case "boolean":
      return value ? "true" : "false";
    case "string":
      return JSON.stringify(value);
    case "number":
      return formatDouble(value);
    case "bigint":
      return value.toString();
  }
  if (isArray(value)) return `[${value.map(toJson).join(", ")}]`;
  const fields = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${toJson(v)}`);
  return `{${fields.join(", ")}}`;
}

function isArray(value: Json): value is readonly Json[] {
  return Array.isArray(value);
}

/**
 * A double as JSON that parses back to the very same double: ECMAScript's Number to
 * String is already the shortest round-trip form; integral values get a ".0" (so that
 * readers such as Python's see a float), -0 keeps its sign, NaN and infinities are null.
 */
export function formatDouble(x: number): string {
  if (!Number.isFinite(x)) return "null";
  if (Object.is(x, -0)) return "-0.0";
  const s = String(x);
  return /^-?\d+$/.test(s) ? `${s}.0` : s;
}

/** An optional double: unset is null. */
function optDouble(x: number | undefined): Json {
  return x === undefined ? null : x;
}

function optInt(x: number | undefined): Json {
  return x === undefined ? null : BigInt(x);
}

export function tokenJson(t: TokenEvent): Json {
  const doc: Record<string, Json> = {
    type: "token",
    index: BigInt(t.index),
    id: BigInt(t.id),
    text: t.text,
    nll: t.nll,
    ppl: t.ppl,
    variance: t.variance,
    max_prob: t.maxProb,
    l2_norm: t.l2Norm,
    health: t.health ?? null,
  };
  if (t.warnings.length > 0) {
    doc.warnings = t.warnings.map((w) => ({
      guard: w.guard,
      value: optDouble(w.value),
      threshold: optDouble(w.threshold),
    }));
  }
  return doc;
}

export function verdictJson(v: Verdict): Json {
  const doc: Record<string, Json> = {
    type: "verdict",
    status: v.status,
    guard: v.guard ?? null,
    value: optDouble(v.value),
    threshold: optDouble(v.threshold),
    token_index: optInt(v.tokenIndex),
    tokens: BigInt(v.tokens),
    text: v.text,
    policy: v.policy,
    policy_sha256: v.policySha256,
  };
  if (v.message !== "") doc.message = v.message;
  return doc;
}

/** GetInfo's answer with the proto's field names; the model's path is left out. */
export function infoJson(info: Info): Json {
  const m = info.model;
  const l = info.limits;
  return {
    version: info.version,
    model: {
      name: m?.name ?? "",
      sha256: m?.sha256 ?? "",
      description: m?.description ?? "",
      vocab_size: BigInt(m?.vocabSize ?? 0),
      context_size: BigInt(m?.contextSize ?? 0),
      train_context_size: BigInt(m?.trainContextSize ?? 0),
      size_bytes: m?.sizeBytes ?? 0n,
      chat_template: m?.chatTemplate ?? false,
    },
    policies: info.policies.map((p) => ({ name: p.name, sha256: p.sha256, builtin: p.builtin })),
    limits: {
      max_streams: BigInt(l?.maxStreams ?? 0),
      max_queue: BigInt(l?.maxQueue ?? 0),
      max_tokens: BigInt(l?.maxTokens ?? 0),
      max_prompt_tokens: BigInt(l?.maxPromptTokens ?? 0),
      max_message_bytes: BigInt(l?.maxMessageBytes ?? 0),
    },
  };
}

/**
 * C's `%.6g`: six significant digits, trailing zeros dropped, an exponent (at least two
 * digits) below 1e-4 and from 1e6 on. Rounds the exact binary value, ties to even, as C does.
 */
export function formatG(x: number, precision = 6): string {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  const sign = x < 0 ? "-" : "";
  const [digits, exponent] = roundSignificant(Math.abs(x), precision);
  let body: string;
  if (exponent < -4 || exponent >= precision) {
    const frac = digits.slice(1).replace(/0+$/, "");
    const exp = `${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
    body = `${digits[0] ?? "0"}${frac ? `.${frac}` : ""}e${exp}`;
  } else if (exponent >= 0) {
    const int = digits.slice(0, exponent + 1);
    const frac = digits.slice(exponent + 1).replace(/0+$/, "");
    body = frac ? `${int}.${frac}` : int;
  } else {
    body = `0.${"0".repeat(-exponent - 1)}${digits}`.replace(/0+$/, "");
  }
  return sign + body;
}

/** `precision` significant digits of a positive finite x, and the decimal exponent of the first. */
function roundSignificant(x: number, precision: number): [string, number] {
  // toExponential(99) is exact for every double whose expansion has at most 100
  // significant digits, which covers every case where the digits after the kept ones
  // are exactly half a unit (a tie); elsewhere toExponential(precision - 1) rounds
  // correctly by itself.
  const exact = x.toExponential(99);
  const mantissa = exact.slice(0, exact.indexOf("e")).replace(".", "");
  const rest = mantissa.slice(precision);
  if (/^50*$/.test(rest)) {
    const kept = mantissa.slice(0, precision);
    const last = Number(kept[precision - 1]);
    if (last % 2 === 0) return [kept, Number(exact.slice(exact.indexOf("e") + 1))];
  }
  const rounded = x.toExponential(precision - 1);
  const e = rounded.indexOf("e");
  return [rounded.slice(0, e).replace(".", ""), Number(rounded.slice(e + 1))];
}

/** The verdict as one line for people, e.g. `[completed] 12 tokens released · policy default (0123456789ab)`. */
export function verdictLine(v: Verdict): string {
  const policy = `policy ${v.policy} (${v.policySha256.slice(0, 12)})`;
  let what: string = v.status;
  if (v.status === "halted") {
    const value = v.value === undefined ? "n/a" : formatG(v.value);
    const threshold = v.threshold === undefined ? "n/a" : formatG(v.threshold);
    const at = v.tokenIndex === undefined ? "n/a" : String(v.tokenIndex);
    what = `halted by ${v.guard ?? "n/a"}: value ${value}, threshold ${threshold}, at token ${at}`;
  }
  const detail = v.message !== "" ? `: ${v.message}` : "";
  return `[${what}${detail}] ${String(v.tokens)} tokens released · ${policy}`;
}

const COLOURS: Readonly<Record<Health, string>> = { green: "\x1b[32m", yellow: "\x1b[33m", red: "\x1b[31m" };
const RESET = "\x1b[0m";

/** A token's text for a terminal, coloured by its health when `colour` is on. */
export function tokenText(t: TokenEvent, colour: boolean): string {
  if (!colour || t.health === undefined) return t.text;
  return `${COLOURS[t.health]}${t.text}${RESET}`;
}

/** The exit code for a verdict (clients/README.md, "Exit codes"). */
export function exitCode(status: VerdictStatus): number {
  switch (status) {
    case "completed":
      return 0;
    case "halted":
      return 3;
    case "cancelled":
      return 4;
    case "error":
      return 1;
  }
}
