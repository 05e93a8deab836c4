/**
 * The job manager: admission (validation, size and cost limits, per-key quotas), one fair queue per
 * model, dispatch to the model's worker, cancellation, the run-time limit, status events to subscribers,
 * and results into the result store. Every job reaches exactly one terminal state (COMPLETED, ERROR or
 * CANCELLED), announced once.
 */
import { randomUUID } from "node:crypto";

import { NNsightError } from "../errors.js";
import { type ErrorJSON, type JobState, type ServerLimits, TERMINAL_STATES, errorToJSON } from "../remote/protocol.js";
import { parseSafetensorsHeader } from "../tensor/safetensors-format.js";
import { type AnyGraph, type InputJSON, type TraceGraph, batchableGraph, validateGraph } from "../trace/graph.js";
import { ALLOWED_OPS } from "../trace/ops.js";
import type { Principal } from "./auth.js";
import type { Metrics } from "./metrics.js";
import { FairQueue } from "./queue.js";
import { type ResultStore, isJobId } from "./result-store.js";
import type { JobOutput, ModelWorker } from "./worker-pool.js";
import type { RunRequest } from "./worker.js";

/** Someone listening to a job's events (a WebSocket connection). */
export interface Subscriber {
  send(msg: Record<string, unknown>, ...payload: Uint8Array[]): void;
}

export interface Job {
  id: string;
  owner: string;
  model: string;
  cid: string;
  kind: "trace" | "generate" | "session";
  scan: boolean;
  cost: number;
  graph: string;
  attachments: Uint8Array;
  state: JobState;
  error?: ErrorJSON;
  createdAt: number;
  startedAt?: number;
  finishedAt?: number;
  resultBytes: number;
  subscribers: Set<Subscriber>;
  timer?: NodeJS.Timeout;
  /** the queue position its subscribers last heard */
  position?: number;
  /** a plain trace that may share its worker's forward pass with other such jobs (runner.ts batchableGraph) */
  batchable: boolean;
  /** upper bound on its tokens (bounds the rows of a shared pass) */
  tokens: number;
}

export interface JobManagerOptions {
  /**
   * at most this many queued plain traces go to a model's (single) worker at once, to share forward
   * passes (default DEFAULT_MAX_BATCH; 1: one job at a time)
   */
  maxBatch?: number;
}

export const DEFAULT_MAX_BATCH = 32;
/** the subscribers of every finished job (nobody is added to a finished job) */
const NO_SUBSCRIBERS: Set<Subscriber> = new Set();
/** a batch stops growing at this many (estimated) tokens */
const MAX_BATCH_TOKENS = 4096;

interface OwnerStats {
  active: number;
  recent: number[];
  resultBytes: number;
}

const enc = new TextEncoder();

/**
 * Queue positions go out at most this often per model (the first change after a quiet spell at once).
 * Telling every waiting job its new place on every dispatch cost one frame per waiting job per job run:
 * with 64 jobs queued, 63 frames per job, most of the front end's time under load.
 */
export const POSITION_INTERVAL_MS = 100;

export class JobManager {
  private readonly jobs = new Map<string, Job>();
  private readonly byCid = new Map<string, string>();
  private readonly queues = new Map<string, FairQueue<Job>>();
  private readonly owners = new Map<string, OwnerStats>();
  private readonly running = new Map<string, Set<Job>>();
  /** per model: a job taken from the queue that did not fit the batch it was taken for; it runs next */
  private readonly held = new Map<string, Job>();
  private readonly maxBatch: number;
  /** per subscriber, the unfinished jobs it watches (so a closed connection lets go of them quickly) */
  private readonly watched = new Map<Subscriber, Set<Job>>();
  private readonly sweeper: NodeJS.Timeout;
  /** per model: the pending position update, and when the last one went out */
  private readonly positionTimers = new Map<string, NodeJS.Timeout>();
  private readonly positionsSentAt = new Map<string, number>();

  constructor(
    private readonly workers: Map<string, ModelWorker>,
    private readonly store: ResultStore,
    private readonly metrics: Metrics,
    readonly limits: ServerLimits,
    opts: JobManagerOptions = {},
  ) {
    this.maxBatch = Math.max(1, Math.floor(opts.maxBatch ?? DEFAULT_MAX_BATCH));
    for (const [id, w] of workers) {
      this.queues.set(id, new FairQueue<Job>());
      w.on("ready", () => this.dispatch(id));
      w.on("restart", () => metrics.workerRestarts++);
      w.on("failed", () => this.failQueued(id, { code: "INTERNAL", message: `the worker for ${id} cannot load the model: ${w.lastError?.message ?? "it keeps exiting"}` }));
    }
    store.onExpire = (id) => {
      const j = this.jobs.get(id);
      if (j) this.forget(j);
    };
    this.sweeper = setInterval(() => this.sweep(), Math.max(1000, Math.min(60_000, store.ttlMs / 4)));
    this.sweeper.unref();
  }

  queueLength(model: string): number {
    return (this.queues.get(model)?.length ?? 0) + (this.held.has(model) ? 1 : 0);
  }
  runningCount(model: string): number {
    return this.running.get(model)?.size ?? 0;
  }

  private stats(owner: string): OwnerStats {
    let s = this.owners.get(owner);
    if (!s) this.owners.set(owner, (s = { active: 0, recent: [], resultBytes: 0 }));
    return s;
  }

  // ---------------------------------------------------------------- admission
  /** Check and queue a job; throws the NNsightError a client should see. */
  submit(p: Principal, req: { model: string; cid: string; scan?: boolean; graph: string; attachments: Uint8Array }, sub: Subscriber): { job: Job; fresh: boolean } {
    const dup = this.byCid.get(`${p.id}:${req.cid}`);
    const known = dup ? this.jobs.get(dup) : undefined;
    if (known) return { job: known, fresh: false }; // a resubmit after a reconnect: the same job
    const worker = this.workers.get(req.model);
    if (!worker) throw new NNsightError("UNKNOWN_MODEL", `this server does not serve "${req.model}"; it serves: ${[...this.workers.keys()].join(", ")}`);
    if (worker.state === "failed") throw new NNsightError("INTERNAL", `the model ${req.model} failed to load on this server`);
    const L = this.limits;
    const { graph, cost } = checkSubmission(req, L, worker.numLayers);
    // quotas
    const s = this.stats(p.id);
    const now = Date.now();
    while (s.recent.length && now - s.recent[0]! > 60_000) s.recent.shift();
    if (s.active >= p.quota.maxConcurrent) throw new NNsightError("QUOTA", `you have ${s.active} jobs queued or running; your quota is ${p.quota.maxConcurrent} at once`, { quota: "maxConcurrent" });
    if (s.recent.length >= p.quota.jobsPerMinute) throw new NNsightError("QUOTA", `you submitted ${s.recent.length} jobs in the last minute; your quota is ${p.quota.jobsPerMinute}`, { quota: "jobsPerMinute" });
    if (s.resultBytes >= p.quota.resultBytes) {
      throw new NNsightError("QUOTA", `your stored results hold ${s.resultBytes} bytes; your quota is ${p.quota.resultBytes} (they expire after ${Math.round(this.store.ttlMs / 1000)} s)`, { quota: "resultBytes" });
    }
    s.active++;
    s.recent.push(now);
    const job: Job = {
      id: randomUUID(),
      owner: p.id,
      model: req.model,
      cid: req.cid,
      kind: graph.kind,
      scan: !!req.scan,
      cost,
      batchable: !req.scan && graph.kind === "trace" && batchableGraph(graph),
      tokens: graph.kind === "session" ? Infinity : graph.invokes.reduce((a, i) => a + inputTokens(i.input), 0),
      graph: req.graph,
      attachments: req.attachments,
      state: "QUEUED",
      createdAt: now,
      resultBytes: 0,
      subscribers: new Set(),
    };
    this.watch(job, sub);
    this.jobs.set(job.id, job);
    this.byCid.set(`${p.id}:${req.cid}`, job.id);
    this.queues.get(req.model)!.push(job);
    return { job, fresh: true };
  }

  /** After the ack went out: announce QUEUED and start what can start. */
  announce(job: Job): void {
    if (job.state === "QUEUED") this.emit(job, { status: "QUEUED", position: (job.position = this.position(job)) });
    this.dispatch(job.model);
  }

  // ---------------------------------------------------------------- lookup (only your own jobs)
  get(p: Principal, id: string): Job {
    const j = isJobId(id) ? this.jobs.get(id) : undefined;
    if (!j || j.owner !== p.id) throw new NNsightError("BAD_INPUT", `no job ${id} of yours on this server (results expire after ${Math.round(this.store.ttlMs / 1000)} s)`, { job: id });
    return j;
  }

  position(j: Job): number | undefined {
    if (j.state !== "QUEUED") return undefined;
    const h = this.held.get(j.model);
    return h === j ? 0 : (h ? 1 : 0) + this.queues.get(j.model)!.position(j);
  }

  /** Subscribe to a job and send its current state (with the result when COMPLETED). */
  async subscribe(p: Principal, id: string, sub: Subscriber, rid?: number): Promise<void> {
    const j = isJobId(id) ? this.jobs.get(id) : undefined;
    if (!j) {
      // a result from before a restart of this server (persistent results dir)
      const r = await this.store.get(id);
      if (!r || r.meta.owner !== p.id) throw new NNsightError("BAD_INPUT", `no job ${id} of yours on this server (results expire after ${Math.round(this.store.ttlMs / 1000)} s)`, { job: id });
      const json = enc.encode(r.json);
      sub.send({ type: "event", job: id, status: "COMPLETED", split: json.length, kind: r.meta.kind, ...(rid !== undefined ? { rid } : {}) }, json, r.bytes);
      return;
    }
    if (j.owner !== p.id) throw new NNsightError("BAD_INPUT", `no job ${id} of yours on this server`, { job: id });
    if (!TERMINAL_STATES.has(j.state)) this.watch(j, sub);
    await this.sendState(j, sub, rid);
  }

  private async sendState(j: Job, sub: Subscriber, rid?: number): Promise<void> {
    const r = rid !== undefined ? { rid } : {};
    if (j.state === "COMPLETED") {
      const res = await this.store.get(j.id);
      if (!res) {
        sub.send({ type: "event", job: j.id, status: "ERROR", error: { code: "IO", message: `the result of job ${j.id} has expired` }, ...r });
        return;
      }
      const json = enc.encode(res.json);
      sub.send({ type: "event", job: j.id, status: "COMPLETED", split: json.length, kind: j.kind, ...r }, json, res.bytes);
    } else {
      const pos = this.position(j);
      if (pos !== j.position) j.position = undefined; // the next update goes to every subscriber
      sub.send({ type: "event", job: j.id, status: j.state, ...(pos !== undefined ? { position: pos } : {}), ...(j.error ? { error: j.error } : {}), ...r });
    }
  }

  private watch(job: Job, sub: Subscriber): void {
    if (job.subscribers === NO_SUBSCRIBERS) return;
    job.subscribers.add(sub);
    let w = this.watched.get(sub);
    if (!w) this.watched.set(sub, (w = new Set()));
    w.add(job);
  }

  unsubscribe(sub: Subscriber): void {
    // the unfinished jobs it watched (not every job kept for the result TTL)
    for (const j of this.watched.get(sub) ?? []) j.subscribers.delete(sub);
    this.watched.delete(sub);
  }

  // ---------------------------------------------------------------- cancellation
  cancel(p: Principal, id: string): Job {
    const j = this.get(p, id);
    if (TERMINAL_STATES.has(j.state)) return j;
    if (j.state === "QUEUED" && !this.queues.get(j.model)!.remove(j) && this.held.get(j.model) === j) this.held.delete(j.model);
    const wasRunning = j.state === "RUNNING";
    this.finish(j, "CANCELLED", { code: "CANCELLED", message: `job ${j.id} was cancelled` });
    if (wasRunning) this.workers.get(j.model)!.kill(j.id);
    return j;
  }

  // ---------------------------------------------------------------- running
  private dispatch(model: string): void {
    const w = this.workers.get(model)!;
    const q = this.queues.get(model)!;
    let moved = false;
    const next = (): Job | undefined => {
      const h = this.held.get(model);
      if (h) this.held.delete(model);
      return h ?? q.pop();
    };
    while (w.idle && this.queueLength(model) > 0) {
      moved = true;
      // a plain trace takes the plain traces queued behind it along (in queue order, up to maxBatch jobs
      // and MAX_BATCH_TOKENS tokens): the worker runs those of equal row lengths in one forward pass
      const batch = [next()!];
      if (batch[0]!.batchable && w.world === 1) {
        let tokens = batch[0]!.tokens;
        while (batch.length < this.maxBatch && q.length > 0) {
          const j = q.pop()!;
          if (!j.batchable || tokens + j.tokens > MAX_BATCH_TOKENS) {
            this.held.set(model, j);
            break;
          }
          tokens += j.tokens;
          batch.push(j);
        }
      }
      if (batch.length > 1) this.metrics.batchDispatched(model, batch.length);
      const runs = w.runBatch(batch.map((job) => ({ req: this.start(job, w), onLog: (json: string, bytes: Uint8Array) => this.log(job, json, bytes) })));
      runs.forEach((p, k) => {
        const job = batch[k]!;
        p.then(
          (res) => this.complete(job, res),
          (e) => this.finish(job, "ERROR", errorToJSON(e)),
        );
      });
    }
    if (moved) this.queueMoved(model);
  }

  /** A job leaves the queue for its worker: RUNNING, its run-time limit, its request (the job drops its graph). */
  private start(job: Job, w: ModelWorker): Omit<RunRequest, "type"> {
    const model = job.model;
    job.state = "RUNNING";
    job.startedAt = Date.now();
    let set = this.running.get(model);
    if (!set) this.running.set(model, (set = new Set()));
    set.add(job);
    this.metrics.observeWait(model, (job.startedAt - job.createdAt) / 1000);
    this.emit(job, { status: "RUNNING" });
    job.timer = setTimeout(() => {
      this.finish(job, "ERROR", { code: "TIMEOUT", message: `job ${job.id} ran longer than this server's limit of ${this.limits.jobTimeoutMs} ms`, details: { limitMs: this.limits.jobTimeoutMs } });
      w.kill(job.id);
    }, this.limits.jobTimeoutMs);
    job.timer.unref();
    const req = { job: job.id, scan: job.scan, graph: job.graph, attachments: job.attachments, maxResultBytes: this.limits.maxResultBytes };
    job.graph = "";
    job.attachments = new Uint8Array(0);
    return req;
  }

  private log(job: Job, json: string, bytes: Uint8Array): void {
    if (job.state !== "RUNNING") return;
    const j = enc.encode(json);
    this.emit(job, { status: "LOG", split: j.length }, j, bytes);
  }

  /** The queue moved: tell waiting jobs their new place now, or, within POSITION_INTERVAL_MS of the last time, then. */
  private queueMoved(model: string): void {
    if (this.positionTimers.has(model)) return;
    const wait = POSITION_INTERVAL_MS - (Date.now() - (this.positionsSentAt.get(model) ?? 0));
    if (wait <= 0) return this.sendPositions(model);
    const t = setTimeout(() => {
      this.positionTimers.delete(model);
      this.sendPositions(model);
    }, wait);
    t.unref();
    this.positionTimers.set(model, t);
  }

  /** Waiting jobs (the first few hundred that someone watches) whose place changed hear it. */
  private sendPositions(model: string): void {
    this.positionsSentAt.set(model, Date.now());
    const q = this.queues.get(model)!;
    for (const j of q.some(256)) {
      if (j.subscribers.size === 0) continue;
      const position = q.position(j);
      if (position === j.position) continue;
      j.position = position;
      this.emit(j, { status: "QUEUED", position });
    }
  }

  private complete(job: Job, res: JobOutput): void {
    if (job.state !== "RUNNING") return;
    if (res.shared) this.metrics.sharedPass(job.model);
    const json = enc.encode(res.json);
    job.resultBytes = json.length + res.bytes.length;
    this.stats(job.owner).resultBytes += job.resultBytes;
    // COMPLETED goes out once the result is in the store (a reported result is never lost); the job is
    // done at once (the worker takes the next job meanwhile), and whoever asks for it in between gets it
    // when the write is done (ResultStore.get waits for it)
    const written = this.store.put(job.id, { meta: { owner: job.owner, kind: job.kind, model: job.model, createdAt: Date.now() }, json: res.json, bytes: res.bytes });
    const subscribers = [...job.subscribers];
    this.finish(job, "COMPLETED");
    const m = { type: "event", job: job.id, status: "COMPLETED", split: json.length, kind: job.kind };
    void written.then(() => {
      for (const s of subscribers) s.send(m, json, res.bytes);
    });
  }

  /** The one place a job ends: idempotent, so a job is answered once. */
  private finish(job: Job, state: "COMPLETED" | "ERROR" | "CANCELLED", error?: ErrorJSON): void {
    if (TERMINAL_STATES.has(job.state)) return;
    const wasRunning = job.state === "RUNNING";
    job.state = state;
    job.finishedAt = Date.now();
    if (error) job.error = error;
    if (job.timer) clearTimeout(job.timer);
    job.timer = undefined; // finished jobs are kept until their results expire: keep them small
    job.graph = "";
    job.attachments = new Uint8Array(0);
    this.stats(job.owner).active--;
    if (wasRunning) {
      this.running.get(job.model)?.delete(job);
      this.metrics.observeRun(job.model, (job.finishedAt - (job.startedAt ?? job.finishedAt)) / 1000);
    }
    this.metrics.jobFinished(job.model, error?.code === "TIMEOUT" ? "TIMEOUT" : state);
    if (state !== "COMPLETED") this.emit(job, { status: state, error });
    for (const s of job.subscribers) {
      const w = this.watched.get(s);
      w?.delete(job);
      if (w?.size === 0) this.watched.delete(s);
    }
    job.subscribers = NO_SUBSCRIBERS;
  }

  private emit(job: Job, msg: Record<string, unknown>, ...payload: Uint8Array[]): void {
    const m = { type: "event", job: job.id, ...msg };
    for (const s of job.subscribers) s.send(m, ...payload);
  }

  private failQueued(model: string, error: ErrorJSON): void {
    const q = this.queues.get(model)!;
    const h = this.held.get(model);
    this.held.delete(model);
    if (h) this.finish(h, "ERROR", error);
    for (let j = q.pop(); j; j = q.pop()) this.finish(j, "ERROR", error);
  }

  /** Forget finished jobs whose results have expired. */
  private sweep(now = Date.now()): void {
    for (const j of this.jobs.values()) {
      if (j.finishedAt !== undefined && now - j.finishedAt > this.store.ttlMs) {
        this.forget(j);
        void this.store.delete(j.id);
      }
    }
  }
  private forget(j: Job): void {
    if (!this.jobs.delete(j.id)) return;
    this.byCid.delete(`${j.owner}:${j.cid}`);
    this.stats(j.owner).resultBytes -= j.resultBytes;
  }

  close(): void {
    clearInterval(this.sweeper);
    for (const t of this.positionTimers.values()) clearTimeout(t);
    for (const j of this.jobs.values()) if (j.timer) clearTimeout(j.timer);
  }
}

// ------------------------------------------------------------------ cost
/** Upper bound on tokens of a prompt (text: one per UTF-8 byte plus specials; ids: exact). */
function inputTokens(inp: InputJSON | null): number {
  if (inp === null) return 0;
  if (typeof inp === "string") return Buffer.byteLength(inp, "utf8") + 2;
  if (Array.isArray(inp)) return (inp as Array<string | number[]>).reduce<number>((a, r) => a + (typeof r === "string" ? Buffer.byteLength(r, "utf8") + 2 : r.length), 0);
  return inp.input_ids.reduce((a, r) => a + r.length, 0);
}

/** tokens × layers × nodes, summed over the traces of the graph. */
/**
 * What every front end checks before a job is queued (embedded and Redis mode): sizes of the graph and its
 * attachments, valid JSON, a valid safetensors buffer, a valid graph of allow-listed ops, and the cost
 * estimate. Returns the validated graph and its cost; throws the NNsightError the client should see.
 */
export function checkSubmission(req: { graph: string; attachments: Uint8Array }, L: ServerLimits, numLayers: number): { graph: AnyGraph; cost: number } {
  if (req.graph.length > L.maxGraphBytes) throw new NNsightError("TOO_LARGE", `the graph is ${req.graph.length} bytes; this server accepts at most ${L.maxGraphBytes}`);
  if (req.attachments.length > L.maxAttachmentBytes) throw new NNsightError("TOO_LARGE", `the attachments are ${req.attachments.length} bytes; this server accepts at most ${L.maxAttachmentBytes}`);
  let raw: unknown;
  try {
    raw = JSON.parse(req.graph);
  } catch (e) {
    throw new NNsightError("INVALID_GRAPH", `the graph is not valid JSON: ${(e as Error).message}`);
  }
  let count = 0;
  if (req.attachments.length) {
    try {
      count = parseSafetensorsHeader(req.attachments, req.attachments.length, "attachments").tensors.size;
    } catch (e) {
      throw new NNsightError("INVALID_GRAPH", `the attachments are not a valid safetensors buffer: ${(e as Error).message}`);
    }
  }
  const graph = validateGraph(raw, { attachments: count, ops: ALLOWED_OPS });
  const cost = estimateCost(graph, numLayers);
  if (cost > L.maxCost) throw new NNsightError("TOO_LARGE", `the estimated cost ${cost} (tokens × layers × nodes) exceeds this server's limit of ${L.maxCost}`, { cost, limit: L.maxCost });
  return { graph, cost };
}

export function estimateCost(g: AnyGraph, layers: number): number {
  const traces: TraceGraph[] = g.kind === "session" ? g.traces : [g];
  let cost = 0;
  for (const t of traces) {
    let tokens = t.invokes.reduce((a, i) => a + inputTokens(i.input), 0);
    if (t.kind === "generate") {
      const rows = t.invokes.reduce((a, i) => a + (i.input === null ? 0 : typeof i.input === "string" ? 1 : Array.isArray(i.input) ? i.input.length : i.input.input_ids.length), 0);
      tokens += rows * (t.generate?.maxNewTokens ?? 20);
    }
    cost += tokens * Math.max(1, layers) * Math.max(1, t.nodes.length);
  }
  return cost;
}
