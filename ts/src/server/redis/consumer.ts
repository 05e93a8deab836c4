/**
 * Workers in Redis mode: a model's worker process (or tensor-parallel group, worker-pool.ts) that takes
 * jobs from the model's BullMQ queue instead of from one front end. Run by `nnsight worker --redis URL
 * --model ID` on a GPU node, or inside `nnsight serve --redis URL --model ID` for the front end's own
 * models. Any number of them may serve one model; each runs one job at a time.
 *
 * A job: BullMQ hands it over (highest fair priority first) → the START script marks it RUNNING unless it
 * was cancelled meanwhile (then it is skipped) → the graph runs in the model process, LOG events are
 * published as they come → the FINISH script stores the result and publishes COMPLETED (or ERROR) unless
 * the job already ended (cancelled, timed out, or failed by a liveness check), so it is answered once.
 * A cancel from any front end reaches the worker on its control channel and stops the job as in the
 * embedded server (at the next step, or by restarting the model process after a grace period).
 *
 * Liveness: the worker refreshes a heartbeat in Redis; BullMQ's stalled-job check (in every worker of
 * the model) and a sweep of running jobs whose worker's heartbeat expired (in every front end and worker)
 * fail the job of a worker that died mid-job. maxStalledCount is 0: a lost job is failed, never re-run.
 */
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";

import type { Job as BullJob, Worker as BullWorker } from "bullmq";
import type { Redis } from "ioredis";

import { NNsightError } from "../../errors.js";
import { errorToJSON } from "../../remote/protocol.js";
import { modelWorkers, type TpBackendOption } from "../http.js";
import type { ModelWorker } from "../worker-pool.js";
import { encodeStored } from "./result-store.js";
import { DEFAULT_PREFIX, type NnRedis, bounded, bullPrefix, connectRedis, eventFrame, finishJob, lostWorkerError, queueName, subscriber, timing } from "./shared.js";

/** What a front end puts in a BullMQ job (the graph itself waits in P:payload:ID). */
export interface QueuedJobData {
  owner: string;
  kind: string;
  scan: boolean;
  timeoutMs: number;
  maxResultBytes: number;
}

/** A model's registration in Redis (P:model:ID): what front ends serve to clients about it. */
export interface ModelInfo {
  config: Record<string, unknown> | null;
  generationConfig: Record<string, unknown> | null;
  tokenizer: unknown;
  numLayers: number;
  world: number;
  backend: "shm" | "nccl" | null;
}

const enc = new TextEncoder();

/** Fail running jobs of `models` whose worker stopped heartbeating (each job once, whoever sweeps). */
export async function sweepOrphans(r: NnRedis, prefix: string, models: Iterable<string>): Promise<void> {
  for (const model of models) {
    const out = await r.nnOrphans(prefix, model);
    for (let i = 0; i + 1 < out.length; i += 2) {
      const [id, worker] = [out[i]!, out[i + 1]!];
      await finishJob(r, prefix, id, "ERROR", { error: lostWorkerError(id, model, worker, "its heartbeat stopped") });
    }
  }
}

/** The job a worker is running: `stopped` once it ended elsewhere (cancel, time-out), `launched` once the model process has it. */
interface Current {
  id: string;
  stopped: boolean;
  launched: boolean;
}

/** One model served from its Redis queue by one worker process (group). */
export class RedisConsumer {
  readonly id: string;
  private bull: BullWorker | null = null;
  private bullConn: Redis | null = null;
  private timer: NodeJS.Timeout | null = null;
  private current: Current | null = null;
  private stopped = false;
  /** the model's registration (P:model:ID) */
  private info = "";

  constructor(
    private readonly r: NnRedis,
    private readonly sub: Redis,
    private readonly url: string,
    private readonly prefix: string,
    readonly worker: ModelWorker,
    private readonly log: (m: string) => void,
  ) {
    this.id = `${hostname()}/${process.pid}/${worker.id}/${randomUUID().slice(0, 8)}`;
  }

  get model(): string {
    return this.worker.id;
  }

  /** Register the (loaded) model, start heartbeats and take jobs. */
  async start(): Promise<void> {
    const w = this.worker;
    const info: ModelInfo = { config: w.config, generationConfig: w.generationConfig, tokenizer: w.tokenizer, numLayers: w.numLayers, world: w.world, backend: w.backend };
    this.info = JSON.stringify(info);
    await this.r.set(`${this.prefix}:model:${this.model}`, this.info);
    const t = timing();
    await this.beat();
    this.timer = setInterval(() => void this.beat().catch(() => {}), t.heartbeatMs);
    this.timer.unref();
    await this.sub.subscribe(`${this.prefix}:ctl:${this.id}`);
    this.sub.on("message", (ch: string, job: string) => {
      if (ch === `${this.prefix}:ctl:${this.id}`) this.abort(job);
    });
    w.on("failed", () => {
      this.log(`the model ${this.model} cannot be loaded (${w.lastError?.message ?? "its worker keeps exiting"}): this worker stops taking its jobs`);
      void this.close();
    });
    const { Worker } = await import("bullmq");
    const { Redis: IORedis } = await import("ioredis");
    this.bullConn = new IORedis(this.url, { maxRetriesPerRequest: null });
    this.bullConn.on("error", () => {});
    this.bull = new Worker(queueName(this.model), (job: BullJob, token?: string) => this.process(job, token), {
      connection: this.bullConn,
      prefix: bullPrefix(this.prefix),
      concurrency: 1,
      lockDuration: t.lockMs,
      stalledInterval: t.lockMs,
      maxStalledCount: 0,
      drainDelay: 5,
    });
    // BullMQ's stalled-job check: a job whose worker stopped renewing its lock (the process died)
    this.bull.on("stalled", (jobId: string) => void this.lost(jobId, "BullMQ found its lock expired (stalled job)"));
    this.bull.on("failed", (job: BullJob | undefined, err: Error) => {
      if (job?.id && /stalled/.test(err?.message ?? "")) void this.lost(job.id, "BullMQ found its lock expired (stalled job)");
    });
    this.bull.on("error", (e: Error) => this.log(`queue ${this.model}: ${e.message}`));
  }

  private async beat(): Promise<void> {
    if (this.stopped) return;
    const t = timing();
    if (!(await this.r.nnHeartbeat(this.prefix, this.model, this.id, t.aliveMs))) await this.r.set(`${this.prefix}:model:${this.model}`, this.info);
    await sweepOrphans(this.r, this.prefix, [this.model]);
    // a stop on the control channel is lost if it came while that connection was down: the job's state
    // says so too (cancelled, timed out, or failed by a sweep that thought this worker dead)
    const cur = this.current;
    if (cur && !cur.stopped) {
      const st = await this.r.hget(`${this.prefix}:job:${cur.id}`, "state");
      if (st === "ERROR" || st === "CANCELLED") this.abort(cur.id);
    }
  }

  private async lost(jobId: string, how: string): Promise<void> {
    const [state, w] = (await this.r.hmget(`${this.prefix}:job:${jobId}`, "state", "worker").catch(() => null)) ?? [];
    const worker = w ?? "";
    // (QUEUED: a worker took it from BullMQ's queue and died before starting it)
    await finishJob(this.r, this.prefix, jobId, "ERROR", { error: lostWorkerError(jobId, this.model, worker, how, state === "QUEUED") }).catch(() => {});
    // it lost its lock, so it is gone (or stuck): out of the live set until it beats again
    if (worker && worker !== this.id) await this.r.zrem(`${this.prefix}:alive:${this.model}`, worker).catch(() => {});
  }

  /** Wait until the model process can take a job; false if it cannot load or this worker stops. */
  private whenIdle(): Promise<boolean> {
    const w = this.worker;
    if (w.idle) return Promise.resolve(true);
    if (w.state === "failed" || w.state === "stopped" || this.stopped) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (ok: boolean) => {
        w.off("ready", onReady);
        w.off("failed", onFailed);
        resolve(ok);
      };
      const onReady = () => done(true);
      const onFailed = () => done(false);
      w.on("ready", onReady);
      w.on("failed", onFailed);
    });
  }

  private async process(job: BullJob, token?: string): Promise<void> {
    const id = job.id!;
    const d = job.data as QueuedJobData;
    const P = this.prefix;
    const idle = await this.whenIdle();
    if (this.stopped && token) {
      // this worker is shutting down: the job goes back to the queue (same priority) for another worker
      const { DelayedError } = await import("bullmq");
      await job.moveToDelayed(Date.now(), token);
      throw new DelayedError();
    }
    if (!idle) {
      await finishJob(this.r, P, id, "ERROR", { error: { code: "INTERNAL", message: `the worker ${this.id} cannot load the model ${this.model}: ${this.worker.lastError?.message ?? "it keeps exiting"}` } });
      return;
    }
    // current from here: a cancel that arrives between START and the run still stops the job
    const cur: Current = { id, stopped: false, launched: false };
    this.current = cur;
    let timer: NodeJS.Timeout | undefined;
    try {
      const started = await this.r.nnStart(P, id, this.id, eventFrame(id, { status: "RUNNING" }));
      if (!started) return; // cancelled (or failed) while it waited
      timer = setTimeout(() => {
        void finishJob(this.r, P, id, "ERROR", {
          error: { code: "TIMEOUT", message: `job ${id} ran longer than this server's limit of ${d.timeoutMs} ms`, details: { limitMs: d.timeoutMs } },
        }).catch(() => {});
        this.abort(id);
      }, d.timeoutMs);
      timer.unref();
      const payload = await this.r.getdelBuffer(`${P}:payload:${id}`);
      if (!payload) throw new NNsightError("INTERNAL", `the graph of job ${id} is missing from Redis`);
      if (cur.stopped) return; // cancelled or timed out already
      const gl = payload.readUInt32LE(0);
      const graph = payload.toString("utf8", 4, 4 + gl);
      const attachments = new Uint8Array(payload.buffer, payload.byteOffset + 4 + gl, payload.length - 4 - gl);
      const run = this.worker.run({ job: id, scan: d.scan, graph, attachments, maxResultBytes: d.maxResultBytes }, (json, bytes) => {
        if (cur.stopped) return;
        const j = enc.encode(json);
        void this.r.publish(`${P}:ev:${id}`, eventFrame(id, { status: "LOG", split: j.length }, j, bytes)).catch(() => {});
      });
      cur.launched = true;
      const res = await run;
      if (!cur.stopped) {
        const blob = encodeStored({ meta: { owner: d.owner, kind: d.kind, model: this.model, createdAt: Date.now() }, json: res.json, bytes: res.bytes });
        await finishJob(this.r, P, id, "COMPLETED", { result: blob, kind: d.kind, inline: { json: enc.encode(res.json), bytes: res.bytes } });
      }
    } catch (e) {
      // (no effect when the job already ended: cancelled or timed out)
      await finishJob(this.r, P, id, "ERROR", { error: errorToJSON(e) }).catch(() => {});
    } finally {
      clearTimeout(timer);
      if (this.current === cur) this.current = null;
    }
  }

  /** Stop the running job `id` (a cancel from any front end, or its time-out); the job was answered already. */
  private abort(id: string): void {
    const cur = this.current;
    if (!cur || cur.id !== id || cur.stopped) return;
    cur.stopped = true;
    if (cur.launched) this.worker.kill(id);
  }

  /**
   * Stop taking jobs, fail the running one (it is not retried) and leave the model's worker set; the
   * model process is stopped by the owner. Bounded in time when Redis cannot be reached.
   */
  async close(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    const cur = this.current;
    if (cur) {
      cur.stopped = true;
      const error = { code: "INTERNAL" as const, message: `the worker ${this.id} serving ${this.model} shut down while running job ${cur.id}; the job is not retried`, details: { job: cur.id, worker: this.id } };
      await bounded(finishJob(this.r, this.prefix, cur.id, "ERROR", { error }));
    }
    await bounded(this.bull?.close(true) ?? Promise.resolve());
    this.bullConn?.disconnect();
    await bounded(this.r.zrem(`${this.prefix}:alive:${this.model}`, this.id));
  }
}

export interface RedisWorkersOptions {
  redis: string;
  prefix?: string;
  models: string[];
  tp?: number;
  tpBackend?: TpBackendOption;
  threads?: number;
  workerEntry?: string;
  log?: (m: string) => void;
  /** a model process restarted (after a crash, or a kill to stop a job) */
  onRestart?: () => void;
}

export interface RedisWorkers {
  consumers: RedisConsumer[];
  workerPids(): Record<string, number | undefined>;
  groupPids(): Record<string, Array<number | undefined>>;
  close(): Promise<void>;
}

/** Load `models` in worker processes (groups) and serve their Redis queues until closed. */
export async function startRedisWorkers(o: RedisWorkersOptions): Promise<RedisWorkers> {
  const log = o.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  const prefix = o.prefix ?? DEFAULT_PREFIX;
  const workers = modelWorkers(o.models, o);
  if (o.onRestart) for (const w of workers.values()) w.on("restart", o.onRestart);
  const r = await connectRedis(o.redis);
  const sub = await subscriber(o.redis);
  const consumers: RedisConsumer[] = [];
  const close = async () => {
    await Promise.all(consumers.map((c) => c.close()));
    for (const w of workers.values()) w.stop();
    sub.disconnect();
    r.disconnect();
  };
  try {
    await Promise.all([...workers.values()].map((w) => w.start()));
    for (const w of workers.values()) {
      const c = new RedisConsumer(r, sub, o.redis, prefix, w, log);
      consumers.push(c);
      await c.start();
    }
  } catch (e) {
    await close();
    throw e;
  }
  return {
    consumers,
    workerPids: () => Object.fromEntries([...workers].map(([id, w]) => [id, w.pid])),
    groupPids: () => Object.fromEntries([...workers].map(([id, w]) => [id, w.pids])),
    close,
  };
}
