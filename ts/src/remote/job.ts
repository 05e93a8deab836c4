/**
 * A remote job handle (`model.trace(..., { blocking: false })`): `status()`, `result()`, `cancel()`, and
 * the status events as an EventEmitter (`job.on("event", e => ...)`) or an async iterator
 * (`for await (const e of job) ...`, ending after the terminal event).
 */
import { EventEmitter } from "node:events";

import { NNsightError } from "../errors.js";
import { type ErrorJSON, type EventStatus, type JobState, type RunResult, TERMINAL_STATES, decodeRunResult, errorFromJSON } from "./protocol.js";

export interface JobEvent {
  job: string;
  status: EventStatus;
  /** QUEUED: jobs ahead of this one */
  position?: number;
  /** ERROR / CANCELLED */
  error?: NNsightError;
  /** LOG: the logged values (tensors as Tensors) */
  values?: unknown[];
}

export interface JobStatusInfo {
  job: string;
  state: JobState;
  position?: number;
  error?: NNsightError;
}

/** @internal what a job needs from its connection */
export interface JobLink {
  request(msg: Record<string, unknown>): Promise<{ msg: Record<string, unknown>; payload: Uint8Array }>;
  forget(job: string): void;
}

export class RemoteJob<T = unknown> extends EventEmitter implements AsyncIterable<JobEvent> {
  readonly id: string;
  /** the last state this client saw */
  state: JobState = "QUEUED";
  private readonly link: JobLink;
  private readonly finish: (r: RunResult, kind: string | undefined) => T;
  private readonly mapError: ((e: NNsightError) => unknown) | undefined;
  private settled = false;
  private raw: { json: string; bytes: Uint8Array; kind?: string } | null = null;
  private failure: NNsightError | null = null;
  private decoded: { value: T } | null = null;
  private waiters: Array<() => void> = [];
  private readonly history: JobEvent[] = [];

  /** @internal */
  /** mapError: what an error becomes (the recording model adds the failing node's source line) */
  constructor(id: string, link: JobLink, finish: (r: RunResult, kind: string | undefined) => T, mapError?: (e: NNsightError) => unknown) {
    super();
    this.id = id;
    this.link = link;
    this.finish = finish;
    this.mapError = mapError;
  }

  /** true once COMPLETED, ERROR or CANCELLED arrived */
  get done(): boolean {
    return this.settled;
  }

  /** Ask the server for the job's state. */
  async status(): Promise<JobStatusInfo> {
    if (this.settled) return { job: this.id, state: this.state, ...(this.failure ? { error: this.failure } : {}) };
    const r = await this.link.request({ type: "status", job: this.id });
    const m = r.msg as { state?: JobState; position?: number; error?: ErrorJSON };
    return { job: this.id, state: m.state ?? this.state, ...(m.position !== undefined ? { position: m.position } : {}), ...(m.error ? { error: errorFromJSON(m.error, this.id) } : {}) };
  }

  /** The job's result (made real: tensors), or its error (NNsightError with the remote code). */
  async result(): Promise<T> {
    await this.wait();
    if (this.failure) throw this.failure;
    if (!this.decoded) {
      const raw = this.raw!;
      this.decoded = { value: this.finish(decodeRunResult(raw.json, raw.bytes), raw.kind) };
      this.raw = null;
    }
    return this.decoded.value;
  }

  /** Cancel the job (queued or running). Resolves once the server has acknowledged. */
  async cancel(): Promise<void> {
    if (this.settled) return;
    await this.link.request({ type: "cancel", job: this.id });
  }

  private wait(): Promise<void> {
    if (this.settled) return Promise.resolve();
    return new Promise((res) => this.waiters.push(res));
  }

  /** @internal an event from the server; terminal events are taken once */
  _event(status: EventStatus, extra: { position?: number; error?: ErrorJSON; values?: unknown[]; result?: { json: string; bytes: Uint8Array; kind?: string } }): void {
    if (this.settled) return;
    const ev: JobEvent = { job: this.id, status };
    if (extra.position !== undefined) ev.position = extra.position;
    if (extra.values) ev.values = extra.values;
    if (status !== "LOG") this.state = status;
    if (status === "ERROR" || status === "CANCELLED") {
      ev.error = status === "CANCELLED" && !extra.error ? new NNsightError("CANCELLED", `job ${this.id} was cancelled`, { job: this.id }) : errorFromJSON(extra.error, this.id);
      if (this.mapError) {
        const m = this.mapError(ev.error);
        if (m instanceof NNsightError) ev.error = m;
      }
      this.failure = ev.error;
    }
    if (status === "COMPLETED") this.raw = extra.result ?? { json: '{"result":null,"saved":[]}', bytes: new Uint8Array(0) };
    if (TERMINAL_STATES.has(status as JobState)) {
      this.settled = true;
      this.link.forget(this.id);
    }
    this.history.push(ev);
    this.emit("event", ev);
    this.emit(status, ev);
    if (this.settled) {
      for (const w of this.waiters.splice(0)) w();
      this.emit("end");
    }
  }

  /** @internal the connection is gone for good */
  _fail(e: NNsightError): void {
    if (this.settled) return;
    this._event("ERROR", { error: { code: e.code, message: e.message, details: e.details } });
  }

  /** Status events from the first one seen, ending after the terminal event. */
  async *[Symbol.asyncIterator](): AsyncIterator<JobEvent> {
    let i = 0;
    for (;;) {
      while (i < this.history.length) yield this.history[i++]!;
      if (this.settled) return;
      await new Promise<void>((res) => this.once("event", () => res()));
    }
  }
}
