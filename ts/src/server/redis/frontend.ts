/**
 * A front end in Redis mode (`nnsight serve --redis redis://HOST:PORT`): the same HTTP + WebSocket
 * service as the embedded one, with jobs, quotas, results and models kept in Redis so that any number
 * of front ends share them. It admits a job (the admission script checks the key's quotas in Redis and
 * gives the job its fair priority), queues it on the model's BullMQ queue, and relays the job's events
 * (published by whichever worker runs it) to the clients connected here that watch it. A job can be
 * watched, fetched and cancelled from any front end. Loaded only in Redis mode (http.ts imports it
 * lazily), like ioredis and bullmq.
 */
import { randomUUID } from "node:crypto";

import type { Queue } from "bullmq";
import type { Redis } from "ioredis";

import { NNsightError } from "../../errors.js";
import { type ErrorJSON, type JobState, type ServedTokenizer, type ServerLimits, TERMINAL_STATES, decodeFrame } from "../../remote/protocol.js";
import type { Principal } from "../auth.js";
import type { ServeOptions } from "../http.js";
import { checkSubmission } from "../jobs.js";
import { Metrics } from "../metrics.js";
import { isJobId } from "../result-store.js";
import type { JobService, JobView, ModelDirectory, ModelView, Subscriber, SubmitRequest } from "../service.js";
import { type ModelInfo, type QueuedJobData, type RedisWorkers, startRedisWorkers, sweepOrphans } from "./consumer.js";
import { RedisResultStore } from "./result-store.js";
import { DEFAULT_PREFIX, type NnRedis, PENDING_TTL_MS, bounded, bullPrefix, connectRedis, finishJob, queueName, subscriber, timing } from "./shared.js";

const enc = new TextEncoder();

/** Errors a client sees as they are; anything else here is Redis not answering (IO, worth a retry). */
function asIO(e: unknown): never {
  if (e instanceof NNsightError) throw e;
  throw new NNsightError("IO", `the service's job store (Redis) did not answer: ${(e as Error)?.message ?? e}; try again`);
}

interface RedisJobView extends JobView {
  position?: number;
  model?: string;
}

/** The models registered in Redis by workers (their own processes or remote ones). */
class RedisModels implements ModelDirectory {
  private readonly cache = new Map<string, { at: number; info: ModelInfo | null }>();

  constructor(
    private readonly r: NnRedis,
    private readonly prefix: string,
  ) {}

  async list(): Promise<ModelView[]> {
    const raw = await this.r.nnModels(this.prefix);
    const out: ModelView[] = [];
    for (let i = 1; i + 4 < raw.length; i += 5) {
      const info = JSON.parse(String(raw[i + 1])) as ModelInfo;
      const live = Number(raw[i + 2]);
      out.push({
        id: String(raw[i]),
        status: live > 0 ? "ready" : "offline",
        queue: Number(raw[i + 3]),
        running: Number(raw[i + 4]),
        world: info.world,
        backend: info.backend,
        config: info.config,
        generationConfig: info.generationConfig,
        workers: live,
      });
    }
    return out.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  /** A model's registration (cached for a second). */
  async info(id: string): Promise<ModelInfo | null> {
    const c = this.cache.get(id);
    if (c && Date.now() - c.at < 1000) return c.info;
    const s = await this.r.get(`${this.prefix}:model:${id}`);
    const info = s ? (JSON.parse(s) as ModelInfo) : null;
    this.cache.set(id, { at: Date.now(), info });
    return info;
  }

  async tokenizer(id: string): Promise<ServedTokenizer | null> {
    return ((await this.info(id))?.tokenizer as ServedTokenizer | undefined) ?? null;
  }
}

/** Jobs this front end relays events of: their watchers here. */
interface Watch {
  subs: Set<Subscriber>;
  model?: string;
  state: JobState;
  /** when it was submitted here (for the wait-time metric) */
  submittedAt?: number;
  /** events that came before the client had its ack (sent by announce) */
  held?: Buffer[];
  /** when its RUNNING event came (for the run-time metric) */
  runningAt?: number;
  /** the last queue position sent */
  position?: number;
}

class RedisJobs implements JobService {
  private readonly watches = new Map<string, Watch>();
  private readonly queues = new Map<string, Queue>();
  private readonly moved = new Map<string, NodeJS.Timeout>();
  private readonly sweeper: NodeJS.Timeout;
  private closed = false;
  /** sweeps done (every 16th also looks for stranded admissions) */
  private sweeps = 0;

  constructor(
    private readonly r: NnRedis,
    private readonly sub: Redis,
    private readonly bullConn: Redis,
    private readonly prefix: string,
    private readonly limits: ServerLimits,
    private readonly store: RedisResultStore,
    private readonly metrics: Metrics,
    private readonly models: RedisModels,
  ) {
    sub.on("messageBuffer", (ch: Buffer, msg: Buffer) => this.onEvent(ch.toString(), msg));
    sub.on("pmessageBuffer", (_p: Buffer, ch: Buffer) => this.onMoved(ch.toString().slice(`${prefix}:moved:`.length)));
    // running jobs of a worker that died: failed by whoever sweeps first (each job answered once)
    this.sweeper = setInterval(() => void this.sweep(), timing().heartbeatMs);
    this.sweeper.unref();
  }

  async init(): Promise<void> {
    await this.sub.psubscribe(`${this.prefix}:moved:*`);
    // events published while the subscriber connection was down are lost: after it reconnects (and
    // ioredis subscribed again), catch up with the state of every watched job
    this.sub.on("ready", () => void this.resync());
  }

  private async resync(): Promise<void> {
    // the PING answers after the SUBSCRIBEs ioredis sent on reconnecting: from then on no event is missed
    if ((await this.sub.ping().catch(() => null)) === null) return;
    for (const [id, w] of [...this.watches]) {
      if (w.held) continue; // not acknowledged yet: announce sends its events
      const h = await this.r.hmget(`${this.prefix}:job:${id}`, "state", "error", "kind").catch(() => null);
      const state = h?.[0] as JobState | null | undefined;
      if (!state || this.watches.get(id) !== w) continue;
      if (state === "COMPLETED") {
        w.state = "COMPLETED";
        void this.deliver(id, w, h![2] ?? undefined);
      } else if (TERMINAL_STATES.has(state)) {
        for (const s of w.subs) s.send({ type: "event", job: id, status: state, ...(h![1] ? { error: JSON.parse(h![1]) as ErrorJSON } : {}) });
        this.finished(w, state);
        this.drop(id);
      } else if (state !== w.state) {
        w.state = state;
        for (const s of w.subs) s.send({ type: "event", job: id, status: state });
      }
    }
  }

  private async sweep(): Promise<void> {
    try {
      const models = await this.r.smembers(`${this.prefix}:models`);
      await sweepOrphans(this.r, this.prefix, models);
      // now and then: jobs admitted but never queued (a front end stopped in between) give their quota back
      if (this.sweeps++ % 16 === 0) {
        for (const m of models) {
          for (const id of await this.r.nnStranded(this.prefix, m, `${bullPrefix(this.prefix)}:${queueName(m)}:`, 60_000)) {
            await finishJob(this.r, this.prefix, id, "ERROR", { error: { code: "INTERNAL", message: `job ${id} was admitted but never queued (its front end stopped meanwhile); submit it again` } });
          }
        }
      }
    } catch {
      // Redis unreachable for a moment: the next sweep tries again
    }
  }

  private queue(model: string): Promise<Queue> {
    const q = this.queues.get(model);
    if (q) return Promise.resolve(q);
    return import("bullmq").then(({ Queue }) => {
      let q2 = this.queues.get(model);
      if (!q2) {
        q2 = new Queue(queueName(model), { connection: this.bullConn, prefix: bullPrefix(this.prefix) });
        q2.on("error", () => {});
        this.queues.set(model, q2);
      }
      return q2;
    });
  }

  // ---------------------------------------------------------------- admission
  submit(p: Principal, req: SubmitRequest, sub: Subscriber): Promise<{ job: JobView; fresh: boolean }> {
    return this.admit(p, req, sub).catch(asIO);
  }

  private async admit(p: Principal, req: SubmitRequest, sub: Subscriber): Promise<{ job: JobView; fresh: boolean }> {
    const info = await this.models.info(req.model);
    if (!info) {
      const served = (await this.models.list()).map((m) => m.id);
      throw new NNsightError("UNKNOWN_MODEL", `this service does not serve "${req.model}"; it serves: ${served.join(", ") || "nothing (no worker has registered a model)"}`);
    }
    const L = this.limits;
    const { graph } = checkSubmission(req, L, info.numLayers);

    const id = randomUUID();
    const P = this.prefix;
    const g = Buffer.from(req.graph, "utf8");
    const head = Buffer.alloc(4);
    head.writeUInt32LE(g.length, 0);
    const q = p.quota;
    const payload = Buffer.concat([head, g, req.attachments]);
    const a = await this.r.nnAdmit(P, id, p.id, req.model, req.cid, graph.kind, req.scan ? 1 : 0, String(q.maxConcurrent), String(q.jobsPerMinute), String(q.resultBytes), PENDING_TTL_MS, Math.max(1, Math.round(this.store.ttlMs)), payload);
    if (a[0] === "DUP") return { job: { id: String(a[1]), state: String(a[2]) as JobState }, fresh: false };
    if (a[0] === "QUOTA") {
      const n = Number(a[2]);
      if (a[1] === "maxConcurrent") throw new NNsightError("QUOTA", `you have ${n} jobs queued or running; your quota is ${q.maxConcurrent} at once`, { quota: "maxConcurrent" });
      if (a[1] === "jobsPerMinute") throw new NNsightError("QUOTA", `you submitted ${n} jobs in the last minute; your quota is ${q.jobsPerMinute}`, { quota: "jobsPerMinute" });
      throw new NNsightError("QUOTA", `your stored results hold ${n} bytes; your quota is ${q.resultBytes} (they expire after ${Math.round(this.store.ttlMs / 1000)} s)`, { quota: "resultBytes" });
    }
    const priority = Number(a[1]);
    const data: QueuedJobData = { owner: p.id, kind: graph.kind, scan: !!req.scan, timeoutMs: L.jobTimeoutMs, maxResultBytes: L.maxResultBytes };
    try {
      // watch the job's events before it can start; they wait here until the client has its ack (announce)
      await this.watch(id, sub, { model: req.model, state: "QUEUED", submittedAt: Date.now(), held: [] });
      // in BullMQ's queue before the ack: an acknowledged job is queued
      await (await this.queue(req.model)).add("job", data, { jobId: id, priority, removeOnComplete: true, removeOnFail: 1000 });
    } catch (e) {
      // admitted but not queued: end it (releasing the quota) and tell the client
      const error: ErrorJSON = { code: "INTERNAL", message: `could not queue job ${id}: ${(e as Error)?.message ?? e}` };
      this.drop(id);
      await finishJob(this.r, P, id, "ERROR", { error }).catch(() => {});
      throw new NNsightError("INTERNAL", error.message);
    }
    const job: RedisJobView = { id, state: "QUEUED", position: Number(a[2]), model: req.model };
    return { job, fresh: true };
  }

  announce(job: JobView): void {
    const w = this.watches.get(job.id);
    if (!w) return;
    const pos = (job as RedisJobView).position;
    const held = w.held ?? [];
    delete w.held;
    w.position = pos;
    if (w.state === "QUEUED") for (const s of w.subs) s.send({ type: "event", job: job.id, status: "QUEUED", ...(pos !== undefined ? { position: pos } : {}) });
    for (const raw of held) this.onEvent(`${this.prefix}:ev:${job.id}`, raw);
  }

  // ---------------------------------------------------------------- lookup (only your own jobs)
  private noJob(id: string): NNsightError {
    return new NNsightError("BAD_INPUT", `no job ${id} of yours on this service (results expire after ${Math.round(this.store.ttlMs / 1000)} s)`, { job: id });
  }

  private async read(p: Principal, id: string): Promise<RedisJobView & { kind?: string }> {
    const h = isJobId(id) ? await this.r.hgetall(`${this.prefix}:job:${id}`) : {};
    if (!h.state || h.owner !== p.id) throw this.noJob(id);
    const v: RedisJobView & { kind?: string } = { id, state: h.state as JobState, model: h.model, kind: h.kind };
    if (h.error) v.error = JSON.parse(h.error) as ErrorJSON;
    if (v.state === "QUEUED") {
      const r = await this.r.zrank(`${this.prefix}:q:${h.model}`, id);
      if (r !== null) v.position = r;
    }
    return v;
  }

  get(p: Principal, id: string): Promise<JobView> {
    return this.read(p, id).catch(asIO);
  }

  position(j: JobView): number | undefined {
    return j.state === "QUEUED" ? (j as RedisJobView).position : undefined;
  }

  // ---------------------------------------------------------------- cancellation (from any front end)
  cancel(p: Principal, id: string): Promise<JobView> {
    return this.stop(p, id).catch(asIO);
  }

  private async stop(p: Principal, id: string): Promise<JobView> {
    const j = await this.read(p, id);
    if (TERMINAL_STATES.has(j.state)) return j;
    const done = await finishJob(this.r, this.prefix, id, "CANCELLED", { error: { code: "CANCELLED", message: `job ${id} was cancelled` } });
    if (!done) return this.read(p, id); // it ended meanwhile
    // a queued job leaves BullMQ's queue (if a worker holds it already, its START sees CANCELLED and skips
    // it); a running one is stopped by its worker, told by the finishing script on its control channel
    if (done.previous === "QUEUED" && j.model) void this.queue(j.model).then((q) => q.remove(id)).catch(() => {});
    return { id, state: "CANCELLED", error: { code: "CANCELLED", message: `job ${id} was cancelled` } };
  }

  // ---------------------------------------------------------------- events
  private async watch(id: string, sub: Subscriber, init: Omit<Watch, "subs">): Promise<void> {
    let w = this.watches.get(id);
    if (w) {
      w.subs.add(sub);
      return;
    }
    w = { subs: new Set([sub]), ...init };
    this.watches.set(id, w);
    await this.sub.subscribe(`${this.prefix}:ev:${id}`);
  }

  private drop(id: string, sub?: Subscriber): void {
    const w = this.watches.get(id);
    if (!w) return;
    if (sub) w.subs.delete(sub);
    else w.subs.clear();
    if (w.subs.size > 0) return;
    this.watches.delete(id);
    if (!this.closed) void this.sub.unsubscribe(`${this.prefix}:ev:${id}`).catch(() => {});
  }

  private onEvent(ch: string, raw: Buffer): void {
    const evPrefix = `${this.prefix}:ev:`;
    if (!ch.startsWith(evPrefix)) return;
    const id = ch.slice(evPrefix.length);
    const w = this.watches.get(id);
    if (!w) return;
    if (w.held) {
      w.held.push(raw);
      return;
    }
    let f;
    try {
      f = decodeFrame(new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength));
    } catch {
      return;
    }
    const msg = f.msg as Record<string, unknown> & { status: string };
    if (msg.status === "RUNNING") {
      w.state = "RUNNING";
      w.runningAt = Date.now();
      if (w.submittedAt !== undefined && w.model) this.metrics.observeWait(w.model, (w.runningAt - w.submittedAt) / 1000);
    }
    if (msg.status === "COMPLETED") {
      w.state = "COMPLETED";
      if (typeof msg.split !== "number") {
        // a large result: read it from the store
        void this.deliver(id, w, typeof msg.kind === "string" ? msg.kind : undefined);
        return;
      }
    }
    for (const s of w.subs) s.send(msg, f.payload);
    if (TERMINAL_STATES.has(msg.status as JobState)) {
      this.finished(w, (msg.error as ErrorJSON | undefined)?.code === "TIMEOUT" ? "TIMEOUT" : msg.status);
      this.drop(id);
    }
  }

  /** The metrics of a job whose end this front end relayed. */
  private finished(w: Watch, state: string): void {
    if (!w.model) return;
    if (w.runningAt !== undefined) this.metrics.observeRun(w.model, (Date.now() - w.runningAt) / 1000);
    this.metrics.jobFinished(w.model, state);
  }

  /** COMPLETED: the result is read from Redis (it travels once, not in the event) and sent to the watchers. */
  private async deliver(id: string, w: Watch, kind: string | undefined, rid?: { rid: number }, only?: Subscriber): Promise<void> {
    const res = await this.store.get(id).catch(() => null);
    const subs = only ? [only] : [...w.subs];
    if (!only) {
      this.finished(w, "COMPLETED");
      this.drop(id);
    }
    if (!res) {
      for (const s of subs) s.send({ type: "event", job: id, status: "ERROR", error: { code: "IO", message: `the result of job ${id} has expired` }, ...rid });
      return;
    }
    const json = enc.encode(res.json);
    for (const s of subs) s.send({ type: "event", job: id, status: "COMPLETED", split: json.length, kind: kind ?? res.meta.kind, ...rid }, json, res.bytes);
  }

  /** A queue moved: tell the queued jobs watched here their new place (at most once per 50 ms per model). */
  private onMoved(model: string): void {
    if (this.moved.has(model) || this.closed) return;
    const t = setTimeout(() => {
      this.moved.delete(model);
      const ids = [...this.watches].filter(([, w]) => w.model === model && w.state === "QUEUED").slice(0, 256).map(([id]) => id);
      if (!ids.length) return;
      const pipe = this.r.pipeline();
      for (const id of ids) pipe.zrank(`${this.prefix}:q:${model}`, id);
      void pipe
        .exec()
        .then((res) => {
          ids.forEach((id, i) => {
            const rank = res?.[i]?.[1];
            const w = this.watches.get(id);
            if (typeof rank !== "number" || !w || w.state !== "QUEUED" || w.position === rank) return;
            w.position = rank; // only to jobs whose place changed
            for (const s of w.subs) s.send({ type: "event", job: id, status: "QUEUED", position: rank });
          });
        })
        .catch(() => {});
    }, 50);
    t.unref();
    this.moved.set(model, t);
  }

  subscribe(p: Principal, id: string, sub: Subscriber, rid?: number): Promise<void> {
    return this.follow(p, id, sub, rid).catch(asIO);
  }

  private async follow(p: Principal, id: string, sub: Subscriber, rid?: number): Promise<void> {
    if (!isJobId(id)) throw this.noJob(id);
    // listen first, then read the state: no event can fall between the two
    await this.watch(id, sub, { state: "QUEUED" });
    let j;
    try {
      j = await this.read(p, id);
    } catch (e) {
      this.drop(id, sub);
      throw e;
    }
    const w = this.watches.get(id);
    if (w) {
      w.model ??= j.model;
      if (!TERMINAL_STATES.has(j.state) && w.state === "QUEUED") w.state = j.state;
    }
    const r = rid !== undefined ? { rid } : {};
    if (j.state === "COMPLETED") {
      this.drop(id, sub);
      await this.deliver(id, w ?? { subs: new Set(), state: "COMPLETED" }, j.kind, rid !== undefined ? { rid } : undefined, sub);
      return;
    }
    if (TERMINAL_STATES.has(j.state)) this.drop(id, sub);
    sub.send({ type: "event", job: id, status: j.state, ...(j.position !== undefined ? { position: j.position } : {}), ...(j.error ? { error: j.error } : {}), ...r });
  }

  unsubscribe(sub: Subscriber): void {
    for (const [id, w] of [...this.watches]) if (w.subs.has(sub)) this.drop(id, sub);
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.sweeper);
    for (const t of this.moved.values()) clearTimeout(t);
    await bounded(Promise.all([...this.queues.values()].map((q) => q.close().catch(() => {}))));
  }
}

export interface RedisBackend {
  jobs: JobService;
  models: ModelDirectory;
  metrics: Metrics;
  workerPids(): Record<string, number | undefined>;
  groupPids(): Record<string, Array<number | undefined>>;
  close(): Promise<void>;
}

/** Connect to Redis, start this front end's own workers (its `--model`s, if any) and the job service. */
export async function startRedisBackend(opts: ServeOptions & { redis: string }, limits: ServerLimits): Promise<RedisBackend> {
  const prefix = process.env.NNSIGHT_REDIS_PREFIX || DEFAULT_PREFIX;
  if (opts.resultsDir) opts.warn?.("--results-dir is not used in Redis mode: results live in Redis (for --result-ttl-s)");
  const metrics = new Metrics();
  // a front end answers a client with an error when Redis is unreachable (after a few tries), not never
  const r = await connectRedis(opts.redis, { maxRetriesPerRequest: 3 });
  let sub: Redis | null = null;
  let bullConn: Redis | null = null;
  let local: RedisWorkers | null = null;
  try {
    sub = await subscriber(opts.redis);
    const { Redis: IORedis } = await import("ioredis");
    bullConn = new IORedis(opts.redis, { maxRetriesPerRequest: 3 });
    bullConn.on("error", () => {});
    if (opts.models?.length) {
      local = await startRedisWorkers({
        redis: opts.redis,
        prefix,
        models: opts.models,
        tp: opts.tp,
        tpBackend: opts.tpBackend,
        threads: opts.threads,
        workerEntry: opts.workerEntry,
        log: (m) => process.stderr.write(`${m}\n`), // (after the first line: straight to stderr)
        onRestart: () => metrics.workerRestarts++,
      });
    }
  } catch (e) {
    sub?.disconnect();
    bullConn?.disconnect();
    r.disconnect();
    throw e;
  }
  const store = new RedisResultStore(r, prefix, opts.resultTtlMs ?? 3_600_000);
  const models = new RedisModels(r, prefix);
  const jobs = new RedisJobs(r, sub, bullConn, prefix, limits, store, metrics, models);
  await jobs.init();
  return {
    jobs,
    models,
    metrics,
    workerPids: () => local?.workerPids() ?? {},
    groupPids: () => local?.groupPids() ?? {},
    async close() {
      await jobs.close();
      await local?.close();
      sub.disconnect();
      bullConn.disconnect();
      r.disconnect();
    },
  };
}
