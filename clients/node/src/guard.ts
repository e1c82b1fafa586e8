/**
 * A small client of the libfse guard daemon (gRPC service `fse.v1.Guard`).
 *
 * ```ts
 * const guard = connect("unix:/run/fse.sock");
 * const generation = guard.generate({ prompt: "The capital of France is", maxTokens: 16 });
 * for await (const event of generation) if (event.type === "token") process.stdout.write(event.text);
 * const verdict = await generation.verdict; // "completed" | "halted" | "cancelled" | "error"
 * guard.close();
 * ```
 *
 * The wire types live in the generated `gen/fse/v1/fse.ts`; this module turns them into
 * plain, readonly values with `undefined` for unset fields, and every gRPC failure into a
 * `GuardError`. It never turns a gRPC error into a verdict, and never reports `completed`
 * unless the daemon's verdict says so.
 */

import * as grpc from "@grpc/grpc-js";

import * as wire from "../gen/fse/v1/fse";

/** How healthy the stream looks at a token; `undefined` when the daemon did not say. */
export type Health = "green" | "yellow" | "red";

/** How a generation ended. An unknown or unspecified status on the wire is `error`. */
export type VerdictStatus = "completed" | "halted" | "cancelled" | "error";
/** Why a `completed` stream ended. */
export type Completion = "end_of_generation" | "stop_sequence" | "max_tokens";

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

/** Unset fields take llama.cpp's CLI defaults (0.8, 40, 0.95, 0.05, a random seed). */
export interface Sampling {
  /** Finite, >= 0; 0 = greedy. */
  readonly temperature?: number;
  /** >= 0; 0 = off. */
  readonly topK?: number;
  /** 0 < topP <= 1; 1 = off. */
  readonly topP?: number;
  /** 0 <= minP <= 1; 0 = off. */
  readonly minP?: number;
  /** 0 .. 2^32-1; unset = random (reported in the started event). */
  readonly seed?: number;
}

export interface GenerateRequest {
  /** Raw prompt text. Exactly one of `prompt` and `messages` must be given. */
  readonly prompt?: string;
  /** Chat messages, rendered with the model's own chat template. */
  readonly messages?: readonly ChatMessage[];
  /** Tokens to generate at most, 1 .. Info.limits.maxTokens. Default 256. */
  readonly maxTokens?: number;
  readonly sampling?: Sampling;
  /** A policy name from Info.policies; unset means the daemon's "default". */
  readonly policy?: string;
  /** Stop sequences: the first one generated ends the stream `completed`, unsent. */
  readonly stop?: readonly string[];
  /** Echoed in the started event and the daemon's audit log. */
  readonly requestId?: string;
  /** Generation budget in milliseconds; when it passes, the stream halts with guard "deadline". */
  readonly timeoutMs?: number;
}

export interface GenerateOptions {
  /** Aborting it sends a Cancel message: the stream then ends with a `cancelled` verdict. */
  readonly signal?: AbortSignal;
}

/** The daemon admitted the request. */
export interface StartedEvent {
  readonly type: "started";
  readonly requestId: string;
  /** The resolved policy name and the sha256 of its canonical form. */
  readonly policy: string;
  readonly policySha256: string;
  readonly promptTokens: number;
  /** The sampling seed in use (0 when greedy). */
  readonly seed: number;
  readonly model: string;
}

/** A guard with action "warn" that tripped at a token. */
export interface GuardTrip {
  readonly guard: string;
  readonly value: number | undefined;
  readonly threshold: number | undefined;
}

/** One released token: every halting guard of the policy has passed it. */
export interface TokenEvent {
  readonly type: "token";
  /** 0-based position among the generated tokens. */
  readonly index: number;
  /** Token id in the model's vocabulary. */
  readonly id: number;
  /** The token's raw bytes; they can end inside a UTF-8 character. */
  readonly piece: Uint8Array;
  /** Complete characters only: the concatenated `text` of all tokens is the output. */
  readonly text: string;
  /** -ln p(token), nats. */
  readonly nll: number;
  /** Perplexity over the policy's window, and over all generated tokens. */
  readonly ppl: number;
  readonly pplCumulative: number;
  /** Variance of the logits. */
  readonly variance: number;
  /** Probability of the most likely token, 0..1. */
  readonly maxProb: number;
  /** L2 norm of the logit vector. */
  readonly l2Norm: number;
  /** Entropy of the raw next-token distribution, nats. */
  readonly entropy: number;
  readonly health: Health | undefined;
  readonly warnings: readonly GuardTrip[];
}

/** How the generation ended; always the last event of a stream. */
export interface Verdict {
  readonly type: "verdict";
  readonly status: VerdictStatus;
  /** Why a `completed` stream ended; unset for any other status (and from an older daemon). */
  readonly completion: Completion | undefined;
  /** The guard that halted the stream (perplexity, l2_norm, deadline, ...); unset unless halted. */
  readonly guard: string | undefined;
  /** The guard's measured value and the policy threshold it crossed. */
  readonly value: number | undefined;
  readonly threshold: number | undefined;
  /** Index of the withheld token that tripped the guard. */
  readonly tokenIndex: number | undefined;
  /** Tokens sent, and their concatenated text. */
  readonly tokens: number;
  readonly text: string;
  readonly policy: string;
  readonly policySha256: string;
  /** Detail for `error`; empty otherwise. */
  readonly message: string;
}

export type GenerateEvent = StartedEvent | TokenEvent | Verdict;

/** What the daemon serves: `GetInfo`'s answer (the generated wire type). */
export type Info = wire.Info;
export type ModelInfo = wire.ModelInfo;
/** A device of the daemon's llama.cpp (CPU, CUDA0 ...) and the model layers on it. */
export type Device = wire.Device;
export type PolicyInfo = wire.PolicyInfo;
export type Limits = wire.Limits;

/** A failed gRPC call: the status code and the server's message. */
export class GuardError extends Error {
  /** The gRPC status code (`grpc.status.UNAVAILABLE`, ...). */
  readonly code: grpc.status;
  /** The server's message, or grpc's own when the call never reached a server. */
  readonly details: string;

  constructor(code: grpc.status, details: string) {
    super(`${statusName(code)}: ${details}`);
    this.name = "GuardError";
    this.code = code;
    this.details = details;
  }

  /** The code's canonical name: `UNAVAILABLE`, `INVALID_ARGUMENT`, ... */
  get codeName(): string {
    return statusName(this.code);
  }

  /** Any error a grpc-js call reports, as a GuardError. */
  static from(err: unknown): GuardError {
    if (err instanceof GuardError) return err;
    if (isServiceError(err)) return new GuardError(err.code, err.details);
    return new GuardError(grpc.status.UNKNOWN, err instanceof Error ? err.message : String(err));
  }
}

/** The canonical name of a gRPC status code. */
export function statusName(code: grpc.status): string {
  return STATUS_NAMES[code] ?? `CODE_${String(code)}`;
}

// The enum's reverse mapping, typed for codes a newer server may send.
const STATUS_NAMES: Readonly<Record<number, string | undefined>> = grpc.status;

function isServiceError(err: unknown): err is grpc.ServiceError {
  return err instanceof Error && typeof (err as Partial<grpc.ServiceError>).code === "number";
}

export interface ConnectOptions {
  /** PEM root CA: the connection uses TLS and checks the server against it. Plain TCP without. */
  readonly tlsCa?: Uint8Array;
  /**
   * A PEM client certificate and its PEM private key (both or neither), presented for
   * mutual TLS; they turn TLS on too (without `tlsCa`, against Node's default roots).
   */
  readonly tlsCert?: Uint8Array;
  readonly tlsKey?: Uint8Array;
  /** A bearer token, sent as `authorization: Bearer TOKEN` metadata on every call. */
  readonly token?: string;
}

/**
 * A client of one daemon, at `unix:/abs/path` (a unix socket) or `HOST:PORT` (TCP).
 * Connecting is lazy; calls fail fast with UNAVAILABLE when the daemon cannot be reached.
 * With TLS, the certificate is checked against the host of `addr`.
 */
export function connect(addr: string, options: ConnectOptions = {}): Guard {
  return new Guard(addr, options);
}

export class Guard {
  readonly addr: string;
  readonly #client: wire.GuardClient;
  readonly #token: string | undefined;

  constructor(addr: string, options: ConnectOptions = {}) {
    this.addr = addr;
    this.#token = options.token;
    const { tlsCa, tlsCert, tlsKey } = options;
    if ((tlsCert === undefined) !== (tlsKey === undefined)) {
      throw new TypeError(tlsKey === undefined ? "tlsKey: required with tlsCert" : "tlsCert: required with tlsKey");
    }
    const pem = (bytes: Uint8Array | undefined): Buffer | null => (bytes === undefined ? null : Buffer.from(bytes));
    const credentials =
      tlsCa === undefined && tlsCert === undefined
        ? grpc.credentials.createInsecure()
        : grpc.credentials.createSsl(pem(tlsCa), pem(tlsKey), pem(tlsCert));
    this.#client = new wire.GuardClient(addr, credentials);
  }

  /** Start a generation; iterate it for its events, or await its `verdict`. */
  generate(request: GenerateRequest, options: GenerateOptions = {}): Generation {
    const call = this.#client.generate(this.#metadata());
    return new Generation(call, requestToWire(request), this.addr, options.signal);
  }

  /** The served model, the policies a request may name, and the limits. */
  info(): Promise<Info> {
    return new Promise((resolve, reject) => {
      this.#client.getInfo({}, this.#metadata(), (err, info) => {
        if (err) reject(GuardError.from(err));
        else resolve(info);
      });
    });
  }

  /** Close the channel; calls still running are cancelled. */
  close(): void {
    this.#client.close();
  }

  #metadata(): grpc.Metadata {
    const metadata = new grpc.Metadata();
    if (this.#token !== undefined) metadata.set("authorization", `Bearer ${this.#token}`);
    return metadata;
  }
}

type Call = grpc.ClientDuplexStream<wire.GenerateClientMessage, wire.GenerateServerMessage>;

/**
 * One running generation: an async iterable of its events (started, tokens, then exactly
 * one verdict), which may be iterated once. Breaking out of the loop before the verdict
 * cancels the call (and `verdict` rejects with CANCELLED). A gRPC failure is thrown from
 * the loop and rejects `verdict`.
 */
export class Generation implements AsyncIterable<GenerateEvent> {
  /** The verdict, once it arrives; rejects with a GuardError if the call fails first. */
  readonly verdict: Promise<Verdict>;

  readonly #call: Call;
  readonly #queue: GenerateEvent[] = [];
  #wake: (() => void) | undefined;
  #failure: GuardError | undefined;
  #done = false; // verdict received or call failed: no more events
  #cancelSent = false;
  #iterated = false;
  #settle!: (verdict: Verdict) => void;
  #reject!: (err: GuardError) => void;
  readonly #signal: AbortSignal | undefined;
  readonly #onAbort = (): void => {
    this.cancel();
  };

  constructor(call: Call, start: wire.GenerateRequest, addr: string, signal?: AbortSignal) {
    this.#call = call;
    this.#signal = signal;
    this.verdict = new Promise<Verdict>((resolve, reject) => {
      this.#settle = resolve;
      this.#reject = reject;
    });
    // A caller that only iterates never looks at `verdict`: its rejection is not unhandled.
    this.verdict.catch(() => undefined);

    call.on("data", (msg: wire.GenerateServerMessage) => {
      this.#receive(msg);
    });
    // grpc-js emits the error synchronously when the status arrives, possibly before
    // messages still buffered in the stream (such as an ERROR verdict before INTERNAL):
    // settle on the next turn, after those.
    call.on("error", (err: unknown) => {
      setImmediate(() => {
        this.#fail(GuardError.from(err));
      });
    });
    call.on("end", () => {
      setImmediate(() => {
        this.#fail(new GuardError(grpc.status.UNKNOWN, `the daemon at ${addr} ended the stream without a verdict`));
      });
    });

    call.write({ kind: { $case: "start", value: start } });
    if (signal?.aborted) this.cancel();
    else signal?.addEventListener("abort", this.#onAbort, { once: true });
  }

  /**
   * Ask the daemon to stop: it does so within one decode step, and the stream still ends
   * with a verdict (`cancelled`, or whatever came first). Idempotent.
   */
  cancel(): void {
    if (this.#done || this.#cancelSent) return;
    this.#cancelSent = true;
    this.#call.write({ kind: { $case: "cancel", value: {} } });
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<GenerateEvent, void, undefined> {
    if (this.#iterated) throw new Error("a Generation can be iterated only once");
    this.#iterated = true;
    try {
      for (;;) {
        const event = this.#queue.shift();
        if (event !== undefined) {
          yield event;
          if (event.type === "verdict") return;
          continue;
        }
        if (this.#failure !== undefined) throw this.#failure;
        await new Promise<void>((resolve) => (this.#wake = resolve));
      }
    } finally {
      // Left early (break, throw in the loop body): the daemon sees the client go away,
      // and `verdict` rejects with CANCELLED.
      if (!this.#done) this.#call.cancel();
    }
  }

  #receive(msg: wire.GenerateServerMessage): void {
    if (this.#done) return;
    const kind = msg.kind;
    if (kind === undefined) return; // a message kind newer than this client
    switch (kind.$case) {
      case "started":
        this.#push(startedFromWire(kind.value));
        break;
      case "token":
        this.#push(tokenFromWire(kind.value));
        break;
      case "verdict": {
        const verdict = verdictFromWire(kind.value);
        this.#push(verdict);
        this.#finish();
        this.#settle(verdict);
        this.#call.end(); // half-close: the daemon then ends the RPC
        break;
      }
    }
  }

  #fail(err: GuardError): void {
    if (this.#done) return;
    this.#failure = err;
    this.#finish();
    this.#reject(err);
    this.#wakeUp();
  }

  #push(event: GenerateEvent): void {
    this.#queue.push(event);
    this.#wakeUp();
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #finish(): void {
    this.#done = true;
    this.#signal?.removeEventListener("abort", this.#onAbort);
  }
}

/** The request as the daemon takes it; unset sampling fields stay unset. */
export function requestToWire(request: GenerateRequest): wire.GenerateRequest {
  const s = request.sampling ?? {};
  return {
    prompt: request.prompt ?? "",
    messages: (request.messages ?? []).map((m) => ({ role: m.role, content: m.content })),
    maxTokens: request.maxTokens ?? 256,
    sampling: { temperature: s.temperature, topK: s.topK, topP: s.topP, minP: s.minP, seed: s.seed },
    policy: request.policy ?? "",
    stop: [...(request.stop ?? [])],
    requestId: request.requestId ?? "",
    timeoutMs: request.timeoutMs ?? 0,
  };
}

const HEALTH: ReadonlyMap<wire.Health, Health> = new Map([
  [wire.Health.HEALTH_GREEN, "green"],
  [wire.Health.HEALTH_YELLOW, "yellow"],
  [wire.Health.HEALTH_RED, "red"],
]);

const STATUS: ReadonlyMap<wire.Status, VerdictStatus> = new Map([
  [wire.Status.STATUS_COMPLETED, "completed"],
  [wire.Status.STATUS_HALTED, "halted"],
  [wire.Status.STATUS_CANCELLED, "cancelled"],
  [wire.Status.STATUS_ERROR, "error"],
]);

const COMPLETION: ReadonlyMap<wire.Completion, Completion> = new Map([
  [wire.Completion.COMPLETION_END_OF_GENERATION, "end_of_generation"],
  [wire.Completion.COMPLETION_STOP_SEQUENCE, "stop_sequence"],
  [wire.Completion.COMPLETION_MAX_TOKENS, "max_tokens"],
]);

export function startedFromWire(s: wire.Started): StartedEvent {
  return {
    type: "started",
    requestId: s.requestId,
    policy: s.policy,
    policySha256: s.policySha256,
    promptTokens: s.promptTokens,
    seed: s.seed,
    model: s.model,
  };
}

export function tokenFromWire(t: wire.Token): TokenEvent {
  return {
    type: "token",
    index: t.index,
    id: t.id,
    piece: t.piece,
    text: t.text,
    nll: t.nll,
    ppl: t.ppl,
    pplCumulative: t.pplCumulative,
    variance: t.variance,
    maxProb: t.maxProb,
    l2Norm: t.l2Norm,
    entropy: t.entropy,
    health: HEALTH.get(t.health),
    warnings: t.warnings.map((w) => ({ guard: w.guard, value: w.value, threshold: w.threshold })),
  };
}

export function verdictFromWire(v: wire.Verdict): Verdict {
  return {
    type: "verdict",
    // Fail closed: a status this client does not know is never taken for `completed`.
    status: STATUS.get(v.status) ?? "error",
    completion: COMPLETION.get(v.completion),
    guard: v.guard === "" ? undefined : v.guard,
    value: v.value,
    threshold: v.threshold,
    tokenIndex: v.tokenIndex,
    tokens: v.tokens,
    text: v.text,
    policy: v.policy,
    policySha256: v.policySha256,
    message: v.message,
  };
}
