/**
 * The client side of remote execution: `LanguageModel.connect(url, modelId, { apiKey })` builds a model
 * from the served config (same Envoy tree, no weights) whose trace/generate/session/scan calls send the
 * recorded graph to the server and wait for the result (or return a RemoteJob with `{ blocking: false }`).
 *
 * The connection survives drops: it reconnects (bounded retries), re-sends unanswered requests (submits
 * are idempotent by a client key) and re-subscribes to unfinished jobs, whose results then still arrive.
 */
import { withSources } from "../trace/recorder.js";
import { randomUUID } from "node:crypto";

import WebSocket from "ws";

import { NNsightError } from "../errors.js";
import { parseModelConfig } from "../models/config.js";
import type { EnvoyClasses } from "../trace/envoy.js";
import { Tokenizer } from "../models/tokenizer.js";
import type { Tensor } from "../tensor/tensor.js";
import { type AnyGraph, STREAM_TAG } from "../trace/graph.js";
import { LanguageModel, type TraceBackend, type TraceOptions } from "../trace/model.js";
import { mergeResult } from "../trace/runner.js";
import { tensorsToBuffer } from "../trace/serialize.js";
import { type JobLink, RemoteJob } from "./job.js";
import {
  type ErrorJSON,
  type EventStatus,
  PROTOCOL_VERSION,
  type RunResult,
  type ServedTokenizer,
  type ServerLimits,
  decodeFrame,
  decodeValues,
  encodeFrame,
  errorFromJSON,
  httpUrl,
  splitPayload,
  wsUrl,
} from "./protocol.js";

export interface ConnectOptions {
  /** API key (default: $NNSIGHT_API_KEY) */
  apiKey?: string;
  /** module aliases, as in LanguageModel.load */
  rename?: Record<string, string>;
  /** envoy classes, as in LanguageModel.load */
  envoys?: EnvoyClasses;
  /** give up reconnecting after this many attempts in a row (default 20) */
  maxReconnects?: number;
  /** connect / request timeout in ms (default 30 s) */
  timeoutMs?: number;
}

export interface ServedModel {
  id: string;
  status: string;
  queue: number;
  config: Record<string, unknown> | null;
  generationConfig?: Record<string, unknown> | null;
  /** ranks of the model's tensor-parallel worker group (1: one worker process) */
  world?: number;
  /** how the ranks talk ("shm" or "nccl"; null for a single worker) */
  backend?: "shm" | "nccl" | null;
}

interface Pending {
  msg: Record<string, unknown>;
  payload: Uint8Array[];
  resolve: (r: { msg: Record<string, unknown>; payload: Uint8Array }) => void;
  reject: (e: NNsightError) => void;
  /** runs synchronously when the answer arrives, before any later frame is handled */
  onAnswer?: (msg: Record<string, unknown>) => void;
}

/** One WebSocket to the service, shared by a remote model and its edit() copies. */
export class Connection implements JobLink {
  readonly url: string;
  limits: ServerLimits | null = null;
  private readonly apiKey: string | undefined;
  private ws: WebSocket | null = null;
  private opening: Promise<void> | null = null;
  private nextRid = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly jobs = new Map<string, RemoteJob<unknown>>();
  private closed = false;
  private readonly maxReconnects: number;
  readonly timeoutMs: number;

  constructor(url: string, opts: ConnectOptions = {}) {
    this.url = wsUrl(url);
    this.apiKey = opts.apiKey ?? process.env.NNSIGHT_API_KEY;
    this.maxReconnects = opts.maxReconnects ?? 20;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
  }

  /** Open (or reopen) the socket and say hello; rejects with UNAUTHORIZED / VERSION from the server. */
  open(): Promise<void> {
    if (this.closed) return Promise.reject(new NNsightError("DISPOSED", "this remote model was disposed"));
    if (this.ws && this.ws.readyState === WebSocket.OPEN && !this.opening) return Promise.resolve();
    this.opening ??= this.connectOnce().finally(() => (this.opening = null));
    return this.opening;
  }

  private connectOnce(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const ws = new WebSocket(this.url, { perMessageDeflate: false, handshakeTimeout: this.timeoutMs });
      ws.binaryType = "nodebuffer";
      let welcomed = false;
      const fail = (e: NNsightError) => {
        if (welcomed) return;
        welcomed = true;
        ws.removeAllListeners();
        ws.on("error", () => {});
        ws.terminate();
        reject(e);
      };
      ws.on("open", () => ws.send(encodeFrame({ type: "hello", protocol: PROTOCOL_VERSION, ...(this.apiKey !== undefined ? { apiKey: this.apiKey } : {}) })));
      ws.on("error", (e) => fail(new NNsightError("IO", `cannot reach ${this.url}: ${e.message}`)));
      ws.on("close", (code, reason) => {
        if (!welcomed) fail(new NNsightError("IO", `the server closed the connection (${code} ${reason.toString()})`));
        else this.onClose(ws, code);
      });
      ws.on("message", (data: Buffer, isBinary: boolean) => {
        let frame;
        try {
          frame = decodeFrame(isBinary ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data.toString());
        } catch {
          return;
        }
        const msg = frame.msg as Record<string, unknown>;
        if (!welcomed) {
          if (msg.type === "welcome") {
            welcomed = true;
            this.limits = msg.limits as ServerLimits;
            this.ws = ws;
            this.resend();
            resolve();
          } else if (msg.type === "error") fail(errorFromJSON(msg.error as ErrorJSON));
          return;
        }
        this.onMessage(msg, frame.payload);
      });
    });
  }

  /** Requests not yet answered and unfinished jobs travel again on the new socket. */
  private resend(): void {
    for (const [rid, p] of this.pending) this.sendRaw({ ...p.msg, rid }, p.payload);
    for (const id of this.jobs.keys()) {
      const rid = this.nextRid++;
      this.sendRaw({ type: "subscribe", rid, job: id }, []);
    }
  }

  private async onClose(ws: WebSocket, code: number): Promise<void> {
    if (this.ws !== ws) return;
    this.ws = null;
    if (this.closed) return;
    if (code === 1009) {
      // a frame over the server's hard limit: whatever was unanswered cannot be sent again
      this.failAll(new NNsightError("TOO_LARGE", "a message exceeded the server's frame size limit"));
    }
    if (this.pending.size === 0 && this.jobs.size === 0) return; // reopen lazily on the next request
    for (let attempt = 0; attempt < this.maxReconnects && !this.closed; attempt++) {
      await new Promise((r) => setTimeout(r, Math.min(1000, 25 * 2 ** attempt)));
      try {
        await this.open();
        return;
      } catch (e) {
        const err = e as NNsightError;
        if (err.code === "UNAUTHORIZED" || err.code === "VERSION" || err.code === "DISPOSED") {
          this.failAll(err);
          return;
        }
      }
    }
    this.failAll(new NNsightError("IO", `lost the connection to ${this.url} and could not reconnect`));
  }

  private failAll(e: NNsightError): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const j of [...this.jobs.values()]) j._fail(e);
    this.jobs.clear();
  }

  private onMessage(msg: Record<string, unknown>, payload: Uint8Array): void {
    // answers first: a subscribe's answer registers the job its event is for
    let answered: Pending | undefined;
    if (typeof msg.rid === "number") {
      answered = this.pending.get(msg.rid);
      if (answered) {
        this.pending.delete(msg.rid);
        if (msg.type !== "error") answered.onAnswer?.(msg);
      }
    }
    if (msg.type === "event" && typeof msg.job === "string") {
      const job = this.jobs.get(msg.job);
      const status = msg.status as EventStatus;
      if (job) {
        const extra: Parameters<RemoteJob["_event"]>[1] = {};
        if (typeof msg.position === "number") extra.position = msg.position;
        if (msg.error) extra.error = msg.error as ErrorJSON;
        if (status === "COMPLETED" && typeof msg.split === "number") {
          const { json, bytes } = splitPayload(payload, msg.split);
          extra.result = { json, bytes: bytes.slice(), kind: msg.kind as string | undefined };
        }
        if (status === "LOG" && typeof msg.split === "number") {
          try {
            const { json, bytes } = splitPayload(payload, msg.split);
            extra.values = (decodeValues(json, bytes) as { values: unknown[] }).values;
          } catch {
            extra.values = [];
          }
        }
        job._event(status, extra);
      }
    }
    if (answered) {
      if (msg.type === "error") answered.reject(errorFromJSON(msg.error as ErrorJSON, typeof msg.job === "string" ? msg.job : undefined));
      else answered.resolve({ msg, payload });
    }
  }

  private sendRaw(msg: Record<string, unknown>, payload: Uint8Array[]): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return; // re-sent after the reconnect
    ws.send(encodeFrame(msg, ...payload));
  }

  /** Send a request and wait for its answer (ack / event / error with the same rid). */
  async request(msg: Record<string, unknown>, payload: Uint8Array[] = [], onAnswer?: (msg: Record<string, unknown>) => void): Promise<{ msg: Record<string, unknown>; payload: Uint8Array }> {
    await this.open();
    const size = payload.reduce((a, p) => a + p.length, 0) + 1024;
    if (this.limits && size > this.limits.maxFrameBytes) {
      throw new NNsightError("TOO_LARGE", `the request is ${size} bytes; the server accepts at most ${this.limits.maxFrameBytes} bytes per message`);
    }
    const rid = this.nextRid++;
    return new Promise((resolve, reject) => {
      this.pending.set(rid, { msg, payload, resolve, reject, onAnswer });
      this.sendRaw({ ...msg, rid }, payload);
    });
  }

  /** Submit a graph; returns the job handle once the server has queued it. */
  async submit<T>(
    model: string,
    graph: AnyGraph,
    attachments: Tensor[],
    scan: boolean,
    finish: (r: RunResult, kind: string | undefined) => T,
    setup?: (job: RemoteJob<T>) => void,
    mapError?: (e: NNsightError) => unknown,
  ): Promise<RemoteJob<T>> {
    for (const t of graph.kind === "session" ? graph.traces : [graph]) withSources(t);
    const json = new TextEncoder().encode(JSON.stringify(graph));
    const att = tensorsToBuffer(attachments);
    let job: RemoteJob<T> | undefined;
    // the job is registered as the ack arrives, so events right behind it find it
    await this.request({ type: "submit", model, cid: randomUUID(), scan, split: json.length }, [json, att], (m) => {
      job = this.track(m.job as string, finish, mapError);
      setup?.(job); // listeners attached before any event of the job is handled
    });
    return job!;
  }

  private track<T>(id: string, finish: (r: RunResult, kind: string | undefined) => T, mapError?: (e: NNsightError) => unknown): RemoteJob<T> {
    const existing = this.jobs.get(id);
    if (existing) return existing as RemoteJob<T>;
    const job = new RemoteJob<T>(id, this, finish, mapError);
    this.jobs.set(id, job as RemoteJob<unknown>);
    return job;
  }

  /** A handle on an existing job by id (for instance one submitted before a restart of this client). */
  async attach<T>(id: string, finish: (r: RunResult, kind: string | undefined) => T): Promise<RemoteJob<T>> {
    let job: RemoteJob<T> | undefined;
    await this.request({ type: "subscribe", job: id }, [], () => {
      job = this.track(id, finish);
    });
    return job!;
  }

  /** @internal */
  forget(job: string): void {
    this.jobs.delete(job);
  }

  /** @internal for tests: drop the socket as a network failure would */
  _drop(): void {
    this.ws?.terminate();
  }

  close(): void {
    this.closed = true;
    this.failAll(new NNsightError("DISPOSED", "the remote model was disposed"));
    this.ws?.close();
    this.ws = null;
  }
}

/** Sends recorded graphs to the server instead of running them here. */
export class RemoteBackend implements TraceBackend {
  constructor(
    readonly conn: Connection,
    readonly modelId: string,
  ) {}

  async run(req: { graph: AnyGraph; attachments: Tensor[]; scan: boolean; opts: TraceOptions; mapError?: (e: unknown) => unknown }, finish: (r: RunResult) => unknown): Promise<unknown> {
    const log = req.opts.log ?? ((...v: unknown[]) => console.log(...v));
    const onLog = (values: unknown[]) => {
      if (values[0] === STREAM_TAG) {
        if (values[1] === "tokens") req.opts.stream?.(values[2] as Array<number | null>, values[3] as number);
        else if (values[1] === "step") req.opts.onStep?.(values[2] as number, values[3] as Record<string, unknown>);
        return;
      }
      log(...values);
    };
    const job = await this.conn.submit(
      this.modelId,
      req.graph,
      req.attachments,
      req.scan,
      (r) => finish(r),
      (j) => j.on("LOG", (e: { values?: unknown[] }) => onLog(e.values ?? [])),
      req.mapError,
    );
    if (req.opts.blocking === false) return job;
    const stop = showProgress(job);
    try {
      return await job.result();
    } finally {
      stop();
    }
  }
}

/** A one-line job status on a TTY (never in pipes, CI or tests). */
function showProgress(job: RemoteJob<unknown>): () => void {
  if (!process.stderr.isTTY || process.env.CI || process.env.VITEST) return () => {};
  let shown = false;
  const on = (e: { status: string; position?: number }) => {
    if (e.status === "LOG") return;
    shown = true;
    process.stderr.write(`\r\x1b[2Kremote job ${job.id.slice(0, 8)}: ${e.status}${e.position ? ` (${e.position} ahead)` : ""}`);
  };
  job.on("event", on);
  return () => {
    job.off("event", on);
    if (shown) process.stderr.write("\r\x1b[2K");
  };
}

/** A model served by `nnsight serve`: same module tree and calls as a local one, no weights here. */
export class RemoteLanguageModel extends LanguageModel {
  /** the service URL (http) */
  readonly url: string;
  readonly modelId: string;
  /** @internal */ readonly _conn: Connection;

  /** @internal use LanguageModel.connect */
  constructor(url: string, served: ServedModel, conn: Connection, rename?: Record<string, string>, tokenizer?: Tokenizer, envoys?: EnvoyClasses) {
    const spec = parseModelConfig(served.config, `${url}/models (${served.id})`);
    super({ dir: `${url}#${served.id}`, spec, tokenizer: tokenizer as never, lm: undefined as never, generationConfig: served.generationConfig ?? null }, { rename, envoys });
    this.url = url;
    this.modelId = served.id;
    this._conn = conn;
    this._backend = new RemoteBackend(conn, served.id);
  }

  /** A handle on a job of yours by id (also from another client after a reconnect or restart). */
  job(id: string): Promise<RemoteJob<unknown>> {
    return this._conn.attach(id, (r, kind) => (kind === "session" ? r.result : mergeResult(r.result)));
  }

  override forward(): Promise<Tensor> {
    throw new NNsightError("UNSUPPORTED", "a remote model has no weights here: use trace() to read the logits");
  }
  override generateText(): Promise<never> {
    throw new NNsightError("UNSUPPORTED", "a remote model has no weights here: use generate()");
  }

  /** Close the connection (jobs still running on the server keep running; fetch them later with job(id)). */
  override async dispose(): Promise<void> {
    this._conn.close();
  }
}

/** Models served at `url` (GET /models). */
export async function listModels(url: string, timeoutMs = 30_000): Promise<ServedModel[]> {
  let res: Response;
  try {
    res = await fetch(`${httpUrl(url)}/models`, { signal: AbortSignal.timeout(timeoutMs) });
  } catch (e) {
    throw new NNsightError("IO", `cannot reach ${url}: ${(e as Error).message}`);
  }
  if (!res.ok) throw new NNsightError("IO", `${url}/models answered ${res.status}`);
  return ((await res.json()) as { models: ServedModel[] }).models;
}

/** The served model's tokenizer, so `remote.tokenizer` works as it does locally (undefined if not served). */
async function fetchTokenizer(url: string, modelId: string, timeoutMs = 30_000): Promise<Tokenizer | undefined> {
  try {
    const res = await fetch(`${httpUrl(url)}/models/${encodeURIComponent(modelId)}/tokenizer`, { signal: AbortSignal.timeout(timeoutMs) });
    if (!res.ok) return undefined;
    const t = (await res.json()) as ServedTokenizer;
    return new Tokenizer(t.json, t.config, { extraEosTokenIds: t.eosTokenIds });
  } catch {
    return undefined;
  }
}

/** `LanguageModel.connect`: fetch the served config, open the socket (checking the key), build the model. */
export async function connect(url: string, modelId: string, opts: ConnectOptions = {}): Promise<RemoteLanguageModel> {
  const models = await listModels(url, opts.timeoutMs);
  const served = models.find((m) => m.id === modelId);
  if (!served || !served.config) {
    throw new NNsightError("UNKNOWN_MODEL", `${url} does not serve "${modelId}"; it serves: ${models.map((m) => m.id).join(", ") || "nothing"}`);
  }
  const conn = new Connection(url, opts);
  await conn.open();
  return new RemoteLanguageModel(httpUrl(url), served, conn, opts.rename, await fetchTokenizer(url, modelId, opts.timeoutMs), opts.envoys);
}
