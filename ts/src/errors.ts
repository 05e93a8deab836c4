/**
 * The one error type of the library. Every failure a user can cause carries a stable `code` that
 * programs (and the remote protocol) match on; messages are for people and may change.
 *
 * ```ts
 * try { await model.trace("", () => {}); }
 * catch (e) { if (e instanceof NNsightError && e.code === "BAD_INPUT") ... }
 * ```
 */
export const ERROR_CODES = [
  // runtime
  "BAD_INPUT", // malformed argument: empty prompt, wrong type, nested invoke
  "SHAPE", // shape mismatch
  "DTYPE", // unsupported or mismatched dtype
  "INDEX", // index out of range
  "DISPOSED", // use of a disposed tensor or model
  "IO", // file missing, truncated or malformed
  "OOM", // allocation failed
  "UNSUPPORTED", // a valid request this build cannot serve (model type, option)
  "DEVICE", // a device that is unavailable (no CUDA build, driver or GPU: the message says which), or tensors on different devices
  "COMM", // a collective failed: a peer rank exited, closed its communicator or aborted the group
  "INTERNAL", // a bug: please report
  // models and tracing
  "BAD_PATH", // unknown module path
  "OUT_OF_ORDER", // a value would have to flow backwards in time
  "MISSED_PROVIDER", // a module that never ran (skipped, stopped, step past the end)
  "INVALID_GRAPH", // invalid graph or unknown op
  "MODEL_NOT_FOUND", // no such model directory or cache entry
  // remote
  "UNAUTHORIZED",
  "QUOTA",
  "TOO_LARGE",
  "TIMEOUT",
  "CANCELLED",
  "UNKNOWN_MODEL",
  "VERSION",
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

export interface NNsightErrorDetails {
  /** Module path the failing node belongs to (`model.layers.3.mlp`). */
  path?: string;
  /** Index of the invoke, when several are batched. */
  invoke?: number;
  /** Generation step (0 = the prompt's forward pass). */
  step?: number;
  /** `file:line:col` of the user code that recorded the failing node. */
  source?: string;
  [key: string]: unknown;
}

export class NNsightError extends Error {
  readonly code: ErrorCode;
  readonly details: NNsightErrorDetails;

  constructor(code: ErrorCode, message: string, details: NNsightErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "NNsightError";
    this.code = code;
    this.details = details;
  }

  toJSON(): { code: ErrorCode; message: string; details: NNsightErrorDetails } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export function isErrorCode(c: unknown): c is ErrorCode {
  return typeof c === "string" && (ERROR_CODES as readonly string[]).includes(c);
}

/** Turn anything thrown (native errors carry `.code`) into an NNsightError. */
export function toNNsightError(e: unknown): NNsightError {
  if (e instanceof NNsightError) return e;
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    return new NNsightError(isErrorCode(code) ? code : "INTERNAL", e.message, {}, { cause: e });
  }
  return new NNsightError("INTERNAL", String(e));
}
