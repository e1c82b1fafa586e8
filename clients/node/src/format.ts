/**
 * How events look outside a program: the JSON lines of docs/protocol.md (what
 * `fse generate --json` and every client's guarded-generate print) and the one-line
 * verdict of `fse generate`. Pure functions.
 */

import type { Info, TokenEvent, Verdict } from "./guard";

/**
 * One JSON line. Numbers print in ECMAScript's shortest round-trip form, NaN and the
 * infinities as null (JSON.stringify's own rules); a bigint (uint64) as a number.
 */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === "bigint" ? Number(v) : v));
}

/** The token's JSON line as an object: `warnings` only when there are any. */
export function tokenJson(t: TokenEvent): Record<string, unknown> {
  const doc: Record<string, unknown> = {
    type: "token",
    index: t.index,
    id: t.id,
    text: t.text,
    nll: t.nll,
    ppl: t.ppl,
    variance: t.variance,
    max_prob: t.maxProb,
    l2_norm: t.l2Norm,
    entropy: t.entropy,
    health: t.health ?? null,
  };
  if (t.warnings.length > 0) {
    doc.warnings = t.warnings.map((w) => ({ guard: w.guard, value: w.value ?? null, threshold: w.threshold ?? null }));
  }
  return doc;
}

/** The verdict's JSON line as an object: `message` only when it is not empty. */
export function verdictJson(v: Verdict): Record<string, unknown> {
  const doc: Record<string, unknown> = {
    type: "verdict",
    status: v.status,
    completion: v.completion ?? null,
    guard: v.guard ?? null,
    value: v.value ?? null,
    threshold: v.threshold ?? null,
    token_index: v.tokenIndex ?? null,
    tokens: v.tokens,
    text: v.text,
    policy: v.policy,
    policy_sha256: v.policySha256,
  };
  if (v.message !== "") doc.message = v.message;
  return doc;
}

/** GetInfo's answer with the proto's field names; the model's path is left out. */
export function infoJson(info: Info): Record<string, unknown> {
  const m = info.model;
  const l = info.limits;
  return {
    version: info.version,
    model: {
      name: m?.name ?? "",
      sha256: m?.sha256 ?? "",
      description: m?.description ?? "",
      vocab_size: m?.vocabSize ?? 0,
      context_size: m?.contextSize ?? 0,
      train_context_size: m?.trainContextSize ?? 0,
      size_bytes: m?.sizeBytes ?? 0,
      chat_template: m?.chatTemplate ?? false,
      backend: m?.backend ?? "",
      layers: m?.layers ?? 0,
      gpu_layers: m?.gpuLayers ?? 0,
      devices: (m?.devices ?? []).map((d) => ({
        name: d.name, description: d.description, kind: d.kind, memory_bytes: d.memoryBytes, layers: d.layers,
      })),
    },
    policies: info.policies.map((p) => ({ name: p.name, sha256: p.sha256, builtin: p.builtin })),
    limits: {
      max_streams: l?.maxStreams ?? 0,
      max_queue: l?.maxQueue ?? 0,
      max_tokens: l?.maxTokens ?? 0,
      max_prompt_tokens: l?.maxPromptTokens ?? 0,
      max_message_bytes: l?.maxMessageBytes ?? 0,
    },
  };
}

/** C's `%.6g`: six significant digits, trailing zeros dropped, an exponent below 1e-4 and from 1e6 on. */
export function formatG(x: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const strip = (s: string): string => (s.includes(".") ? s.replace(/\.?0+$/, "") : s);
  const [mantissa = "", e = "0"] = x.toExponential(5).split("e");
  const exponent = Number(e);
  if (exponent >= -4 && exponent < 6) return strip(x.toFixed(5 - exponent));
  return `${strip(mantissa)}e${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
}

/** The verdict as one line for people, e.g. `[completed at max_tokens] 12 tokens released · policy default (0123456789ab)`. */
export function verdictLine(v: Verdict): string {
  let what: string = v.status;
  if (v.status === "completed" && v.completion !== undefined) what = `completed at ${v.completion}`;
  if (v.status === "halted") {
    const g = (x: number | undefined): string => (x === undefined ? "n/a" : formatG(x));
    const at = v.tokenIndex === undefined ? "n/a" : String(v.tokenIndex);
    what = `halted by ${v.guard ?? "n/a"}: value ${g(v.value)}, threshold ${g(v.threshold)}, at token ${at}`;
  }
  const detail = v.message !== "" ? `: ${v.message}` : "";
  return `[${what}${detail}] ${String(v.tokens)} tokens released · policy ${v.policy} (${v.policySha256.slice(0, 12)})`;
}
