/** libfse for Node.js: guarded token streams from the libfse daemon. See guard.ts. */
export {
  connect,
  Guard,
  Generation,
  GuardError,
  statusName,
  type ChatMessage,
  type Completion,
  type ConnectOptions,
  type Device,
  type GenerateEvent,
  type GenerateOptions,
  type GenerateRequest,
  type GuardTrip,
  type Health,
  type Info,
  type Limits,
  type ModelInfo,
  type PolicyInfo,
  type Sampling,
  type StartedEvent,
  type TokenEvent,
  type Verdict,
  type VerdictStatus,
} from "./guard";
export { formatG, infoJson, tokenJson, toJson, verdictJson, verdictLine } from "./format";
export { status } from "@grpc/grpc-js";
