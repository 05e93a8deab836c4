/**
 * The wire protocol between `LanguageModel.connect` clients and `nnsight serve`, shared by both sides.
 *
 * Every WebSocket message is one frame: `[u32 LE header length][header JSON][payload bytes]` (binary), or a
 * text frame holding just the header JSON. The payload of a `submit` is the graph JSON followed by its
 * attachments (one safetensors buffer); the payload of a result is the result JSON followed by the result
 * tensors (safetensors), the header saying where the first part ends (`split`). Values in results use the
 * graph's argument conventions: a tensor is `{ $tensor: k }` (entry k of the safetensors buffer); an
 * uncomputed value is `{ $undef: 1 }`; a non-finite number is `{ $num: "NaN" }`; in scans, a tensor is
 * `{ $meta: { shape, dtype } }`.
 *
 * Client → server: `hello`, `submit`, `cancel`, `status`, `result`, `subscribe` (all but `hello` carry a
 * client-chosen request id `rid`, echoed in the reply). Server → client: `welcome`, `ack`, `event`
 * (QUEUED, RUNNING, LOG, COMPLETED, ERROR, CANCELLED; COMPLETED carries the result as payload), `error`.
 */
import { z } from "zod";

import { type ErrorCode, NNsightError, isErrorCode } from "../errors.js";
import type { Value } from "../trace/ops.js";
import { bufferToTensors, concatChunks, tensorsToBuffer } from "../trace/serialize.js";
import { Tensor } from "../tensor/tensor.js";

/** Bumped on any incompatible change of the messages below. */
export const PROTOCOL_VERSION = 1;

export type JobState = "QUEUED" | "RUNNING" | "COMPLETED" | "ERROR" | "CANCELLED";
export type EventStatus = JobState | "LOG";
export const TERMINAL_STATES: ReadonlySet<JobState> = new Set(["COMPLETED", "ERROR", "CANCELLED"]);

export interface ErrorJSON {
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
}

export interface ServerLimits {
  maxFrameBytes: number;
  maxGraphBytes: number;
  maxAttachmentBytes: number;
  maxResultBytes: number;
  maxCost: number;
  jobTimeoutMs: number;
}

// ------------------------------------------------------------------ messages
const rid = z.number().int().nonnegative();
const jobId = z.string().min(1).max(64);

export const clientMessageSchema = z.discriminatedUnion("type", [
  z.object({ type: z.literal("hello"), protocol: z.number().int(), apiKey: z.string().max(4096).optional() }).strict(),
  z
    .object({
      type: z.literal("submit"),
      rid,
      model: z.string().min(1).max(512),
      /** client idempotency key: a resubmit after a reconnect returns the same job */
      cid: z.string().min(1).max(64),
      scan: z.boolean().optional(),
      /** bytes of the payload that are graph JSON; the rest are attachments */
      split: z.number().int().nonnegative(),
    })
    .strict(),
  z.object({ type: z.literal("cancel"), rid, job: jobId }).strict(),
  z.object({ type: z.literal("status"), rid, job: jobId }).strict(),
  z.object({ type: z.literal("result"), rid, job: jobId }).strict(),
  z.object({ type: z.literal("subscribe"), rid, job: jobId }).strict(),
]);
export type ClientMessage = z.infer<typeof clientMessageSchema>;

export type ServerMessage =
  | { type: "welcome"; protocol: number; server: string; limits: ServerLimits }
  | { type: "ack"; rid: number; job: string; state?: JobState; position?: number }
  | {
      type: "event";
      job: string;
      status: EventStatus;
      rid?: number;
      position?: number;
      error?: ErrorJSON;
      /** COMPLETED and LOG: where the payload's JSON part ends */
      split?: number;
      kind?: "trace" | "generate" | "session";
    }
  | { type: "error"; rid?: number; job?: string; error: ErrorJSON };

// ------------------------------------------------------------------ frames
export interface Frame<M> {
  msg: M;
  payload: Uint8Array;
}

const enc = new TextEncoder();
const dec = new TextDecoder();

export function encodeFrame(msg: object, ...payload: Uint8Array[]): Uint8Array {
  const head = enc.encode(JSON.stringify(msg));
  const size = 4 + head.length + payload.reduce((a, p) => a + p.length, 0);
  const out = new Uint8Array(size);
  new DataView(out.buffer).setUint32(0, head.length, true);
  out.set(head, 4);
  let o = 4 + head.length;
  for (const p of payload) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Parse a frame's header (untrusted): BAD_INPUT when it is not a frame with a JSON object header. */
export function decodeFrame(data: Uint8Array | string): Frame<unknown> {
  if (typeof data === "string") return { msg: parseJSON(data), payload: new Uint8Array(0) };
  if (data.length < 4) throw new NNsightError("BAD_INPUT", "frame too short");
  const n = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0, true);
  if (n > data.length - 4) throw new NNsightError("BAD_INPUT", "frame header length exceeds the frame");
  return { msg: parseJSON(dec.decode(data.subarray(4, 4 + n))), payload: data.subarray(4 + n) };
}

function parseJSON(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch (e) {
    throw new NNsightError("BAD_INPUT", `message is not valid JSON: ${(e as Error).message}`);
  }
}

export function parseClientMessage(raw: unknown): ClientMessage {
  const r = clientMessageSchema.safeParse(raw);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new NNsightError("BAD_INPUT", `malformed message at ${i.path.join(".") || "(root)"}: ${i.message}`);
  }
  return r.data;
}

export function errorToJSON(e: unknown): ErrorJSON {
  if (e instanceof NNsightError) return { code: e.code, message: e.message, details: jsonSafe(e.details) };
  return { code: "INTERNAL", message: e instanceof Error ? e.message : String(e) };
}
export function errorFromJSON(e: ErrorJSON | undefined, jobId?: string): NNsightError {
  const code = e && isErrorCode(e.code) ? e.code : "INTERNAL";
  return new NNsightError(code, e?.message ?? "unknown remote error", { ...(e?.details ?? {}), ...(jobId ? { job: jobId } : {}) });
}
function jsonSafe(d: Record<string, unknown>): Record<string, unknown> {
  try {
    return JSON.parse(JSON.stringify(d)) as Record<string, unknown>;
  } catch {
    return {};
  }
}

export function splitPayload(payload: Uint8Array, split: number): { json: string; bytes: Uint8Array } {
  if (split > payload.length) throw new NNsightError("BAD_INPUT", "payload split is past the end of the payload");
  return { json: dec.decode(payload.subarray(0, split)), bytes: payload.subarray(split) };
}

// ------------------------------------------------------------------ values
export interface EncodedValues {
  json: string;
  bytes: Uint8Array;
}

/** Result of running a graph: what a backend hands to the model (sessions add per-trace results). */
export interface RunResult {
  result: Value;
  saved: Map<number, Value>;
  traces?: Array<{ result: Value; saved: Map<number, Value> }>;
}

type Enc = unknown;

/**
 * Encode values: tensors become `{ $tensor: k }` (deduplicated), or `{ $meta }` in scan mode. An array or
 * object met twice keeps its identity: `{ $id: n, $v: value }` the first time, `{ $same: n }` after.
 */
export function encodeValues(root: Record<string, unknown>, opts: { meta?: boolean } = {}): EncodedValues {
  const ids = new Map<Tensor, number>();
  const list: Tensor[] = [];
  const seen = new Map<object, number>();
  const count = (v: unknown, depth: number): void => {
    if (depth > 64 || v === null || typeof v !== "object" || v instanceof Tensor) return;
    const n = seen.get(v) ?? 0;
    seen.set(v, n + 1);
    if (n > 0) return;
    for (const x of v instanceof Map ? [...v.entries()].flat() : Array.isArray(v) ? v : Object.values(v)) count(x, depth + 1);
  };
  count(root, 0);
  const shared = new Map<object, number>();
  const expanding = new Set<object>();
  const walk = (v: unknown, depth: number): Enc => {
    if (v !== null && typeof v === "object" && !(v instanceof Tensor) && (seen.get(v) ?? 0) > 1 && !expanding.has(v)) {
      const k = shared.get(v);
      if (k !== undefined) return { $same: k };
      const id = shared.size;
      shared.set(v, id);
      expanding.add(v); // encode its contents once, just below
      const inner = walk(v, depth);
      expanding.delete(v);
      return { $id: id, $v: inner };
    }
    if (depth > 64) throw new NNsightError("BAD_INPUT", "result nests too deeply");
    if (v === undefined) return { $undef: 1 };
    if (typeof v === "number") return Number.isFinite(v) ? v : { $num: String(v) };
    if (v === null || typeof v !== "object") return v;
    if (v instanceof Tensor) {
      if (opts.meta) return { $meta: { shape: [...v.shape], dtype: v.dtype } };
      let k = ids.get(v);
      if (k === undefined) {
        k = list.length;
        ids.set(v, k);
        list.push(v);
      }
      return { $tensor: k };
    }
    if (v instanceof Map) return [...v.entries()].map(([k, x]) => [walk(k, depth + 1), walk(x, depth + 1)]);
    if (Array.isArray(v)) return v.map((x) => walk(x, depth + 1));
    const out: Record<string, Enc> = {};
    for (const [k, x] of Object.entries(v)) out[k] = walk(x, depth + 1);
    return out;
  };
  const json = JSON.stringify(walk(root, 0));
  return { json, bytes: tensorsToBuffer(list) };
}

/** Inverse of encodeValues (tensors are created in native memory). */
export function decodeValues(json: string, bytes: Uint8Array): Record<string, unknown> {
  const tensors = bufferToTensors(bytes, "result");
  const shared = new Map<number, unknown>();
  const walk = (v: unknown): unknown => {
    if (v === null || typeof v !== "object") return v;
    if (Array.isArray(v)) return v.map(walk);
    const o = v as Record<string, unknown>;
    const keys = Object.keys(o);
    if (keys.length === 2 && typeof o.$id === "number" && "$v" in o) {
      const x = walk(o.$v);
      shared.set(o.$id, x);
      return x;
    }
    if (keys.length === 1) {
      if (typeof o.$same === "number") return shared.get(o.$same);
      if (typeof o.$tensor === "number") {
        const t = tensors.get(String(o.$tensor));
        if (!t) throw new NNsightError("IO", `result refers to tensor ${o.$tensor}, which is missing`);
        return t;
      }
      if (o.$undef === 1) return undefined;
      if (typeof o.$num === "string") return Number(o.$num);
      if (o.$meta && typeof o.$meta === "object") return { ...(o.$meta as object) };
    }
    const out: Record<string, unknown> = {};
    for (const k of keys) out[k] = walk(o[k]);
    return out;
  };
  let raw: unknown;
  try {
    raw = JSON.parse(json);
  } catch (e) {
    throw new NNsightError("IO", `the result is not valid JSON: ${(e as Error).message}`);
  }
  return walk(raw) as Record<string, unknown>;
}

/** Encode a run's result for the wire. */
export function encodeRunResult(r: RunResult, opts: { meta?: boolean } = {}): EncodedValues {
  const saved = (m: Map<number, Value>) => [...m.entries()];
  return encodeValues(
    { result: r.result, saved: saved(r.saved), ...(r.traces ? { traces: r.traces.map((t) => ({ result: t.result, saved: saved(t.saved) })) } : {}) },
    opts,
  );
}

export function decodeRunResult(json: string, bytes: Uint8Array): RunResult {
  const o = decodeValues(json, bytes) as { result: Value; saved: Array<[number, Value]>; traces?: Array<{ result: Value; saved: Array<[number, Value]> }> };
  return {
    result: o.result,
    saved: new Map(o.saved ?? []),
    ...(o.traces ? { traces: o.traces.map((t) => ({ result: t.result, saved: new Map(t.saved ?? []) })) } : {}),
  };
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  return concatChunks(parts);
}

/** `http://h:p` (or ws://) → the service's WebSocket URL. */
export function wsUrl(url: string): string {
  const u = new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (!u.pathname.endsWith("/ws")) u.pathname = u.pathname.replace(/\/$/, "") + "/ws";
  return u.toString();
}
export function httpUrl(url: string): string {
  const u = new URL(url);
  if (u.protocol === "ws:") u.protocol = "http:";
  else if (u.protocol === "wss:") u.protocol = "https:";
  u.pathname = u.pathname.replace(/\/ws$/, "").replace(/\/$/, "");
  return u.toString().replace(/\/$/, "");
}

/** A served model's tokenizer (`GET /models/ID/tokenizer`): enough to build the same Tokenizer client-side. */
export interface ServedTokenizer {
  json: unknown;
  config: Record<string, unknown>;
  eosTokenIds: number[];
}
