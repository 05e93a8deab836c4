/**
 * One worker process per served model (`child_process.fork` of dist/server/worker.js): it loads the
 * model once and runs one job at a time. A worker that crashes, or is killed to cancel or time out a job,
 * fails only that job and is started again; the front end never runs model code.
 *
 * A model served with tensor parallelism (`tp.world` > 1) runs as a worker group instead: `world`
 * processes of the same entry, forked with `launchRanks` (each holds its shard; see rank.ts). Rank 0 is
 * the worker this class talks to, with the same messages as a single worker; it hands jobs to the other
 * ranks itself. The group lives and dies as one: when any rank exits (a crash, a kill, or rank 0 saying
 * the group broke), every other rank is killed, the running job fails, and once all ranks are gone the
 * whole group is started again.
 */
import type { ServedTokenizer } from "../remote/protocol.js";
import { type ChildProcess, fork } from "node:child_process";
import { EventEmitter } from "node:events";
import { existsSync } from "node:fs";
import path from "node:path";

import { launchRanks } from "../cluster/launch.js";
import { NNsightError } from "../errors.js";
import { PACKAGE_ROOT } from "../native/binding.js";
import { type ErrorJSON, errorFromJSON } from "../remote/protocol.js";
import type { BatchRequest, RunRequest, WorkerMessage, WorkerSpec } from "./worker.js";

export function defaultWorkerEntry(): string {
  return path.join(PACKAGE_ROOT, "dist", "server", "worker.js");
}

export type WorkerState = "starting" | "ready" | "busy" | "failed" | "stopped";

interface RunningJob {
  onLog: (json: string, bytes: Uint8Array) => void;
  resolve: (r: JobOutput) => void;
  reject: (e: NNsightError) => void;
  /** asked to stop (cancel or time-out; whoever asked answers the job) */
  stopping?: boolean;
}

/** A job's result; `shared`: the jobs whose rows were in its forward pass (absent: it ran alone) */
export interface JobOutput {
  json: string;
  bytes: Uint8Array;
  shared?: number;
}

/** What the worker is running: one job, or a batch of them (each answered on its own). */
interface Current {
  /** the jobs not answered yet */
  jobs: Map<string, RunningJob>;
  /** why we killed the worker (the job is answered by whoever killed it) */
  killed?: boolean;
  /** the SIGKILL fallback of a cooperative abort */
  abortTimer?: NodeJS.Timeout;
}

/** A job to run: the request and where its log events go. */
export interface JobToRun {
  req: Omit<RunRequest, "type">;
  onLog: RunningJob["onLog"];
}

/** Emits "ready" whenever the worker can take a job, "restart" after a crash or kill. */
export class ModelWorker extends EventEmitter {
  readonly id: string;
  state: WorkerState = "starting";
  config: Record<string, unknown> | null = null;
  generationConfig: Record<string, unknown> | null = null;
  /** what a client needs to build the same tokenizer (GET /models/ID/tokenizer) */
  tokenizer: ServedTokenizer | null = null;
  numLayers = 1;
  lastError: ErrorJSON | null = null;
  /** the processes of the current start: one, or the ranks of a tensor-parallel group (rank 0 first) */
  private procs: ChildProcess[] | null = null;
  private current: Current | null = null;
  private failures = 0;
  private readonly entry: string;
  private readonly spec: WorkerSpec;

  constructor(id: string, spec: WorkerSpec, entry = defaultWorkerEntry()) {
    super();
    this.id = id;
    this.spec = spec;
    this.entry = entry;
  }

  /** ranks of the tensor-parallel group (1: a single worker) */
  get world(): number {
    return this.spec.tp?.world ?? 1;
  }
  /** how the ranks talk ("shm" or "nccl"; null for a single worker) */
  get backend(): "shm" | "nccl" | null {
    return this.world > 1 ? (this.spec.tp?.backend ?? "shm") : null;
  }
  /** rank 0's pid (the single worker's) */
  get pid(): number | undefined {
    return this.procs?.[0]?.pid;
  }
  /** every rank's pid, in rank order */
  get pids(): Array<number | undefined> {
    return this.procs?.map((p) => p.pid) ?? [];
  }
  get idle(): boolean {
    return this.state === "ready" && this.current === null;
  }

  private spawn(): ChildProcess[] {
    const env: NodeJS.ProcessEnv = { NNSIGHT_WORKER_SPEC: JSON.stringify(this.spec), NNSIGHT_API_KEYS: undefined, NNSIGHT_API_KEY: undefined };
    if (this.world === 1) {
      const full: NodeJS.ProcessEnv = { ...process.env, ...env };
      delete full.NNSIGHT_API_KEYS;
      delete full.NNSIGHT_API_KEY;
      return [fork(this.entry, [], { serialization: "advanced", env: full, stdio: ["ignore", "inherit", "inherit", "ipc"], execArgv: [] })];
    }
    const timeoutMs = Number(process.env.NNSIGHT_TP_TIMEOUT_MS) || undefined;
    // graceMs: this class kills the other ranks itself, at once, when one exits
    return launchRanks({ world: this.world, entry: this.entry, backend: this.backend ?? "shm", env, execArgv: [], timeoutMs, graceMs: 60_000 }).procs;
  }

  /** Start the process(es); resolves when the model is loaded (rejects if loading fails). */
  start(): Promise<void> {
    if (!existsSync(this.entry)) {
      return Promise.reject(new NNsightError("INTERNAL", `the worker entry ${this.entry} is missing: run \`npm run build:ts\``));
    }
    this.state = "starting";
    const procs = this.spawn();
    this.procs = procs;
    const group = procs.length > 1;
    let exited = 0;
    let wasStarting = false;
    let broken = false;
    return new Promise<void>((resolve, reject) => {
      /** The first exit (or rank 0's word that the group broke): fail the job, take the rest down. */
      const breakDown = (cause: NNsightError, how: string) => {
        if (broken) return;
        broken = true;
        for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
        if (this.procs !== procs) return;
        this.procs = null;
        const cur = this.current;
        this.current = null;
        if (cur) {
          if (cur.abortTimer) clearTimeout(cur.abortTimer);
          // a killed worker's jobs were already answered by whoever killed it: these rejections are ignored
          for (const [job, r] of cur.jobs) r.reject(new NNsightError("INTERNAL", cause.message, { ...cause.details, job }));
        }
        if (this.state === "stopped") return;
        wasStarting = this.state === "starting";
        reject(new NNsightError("INTERNAL", `the model worker for ${this.id} exited while loading (${how})`));
        this.state = "starting";
      };
      /** Once every process is gone: start again (a group restarts all its ranks). */
      const restart = () => {
        if (this.state === "stopped") return;
        if (wasStarting && ++this.failures >= 3) {
          this.state = "failed";
          this.emit("failed");
          return;
        }
        this.emit("restart");
        this.state = "starting";
        setTimeout(() => this.state !== "stopped" && this.start().catch(() => {}), wasStarting ? 500 : 0).unref();
      };
      procs.forEach((proc, rank) => {
        proc.on("message", (m: WorkerMessage) => {
          if (this.procs !== procs || !m || typeof m !== "object") return;
          if (m.type === "fatal") {
            this.lastError = m.error;
            reject(errorFromJSON(m.error));
            return;
          }
          if (rank !== 0) return;
          if (m.type === "ready") {
            this.config = m.config;
            this.generationConfig = m.generationConfig;
            this.tokenizer = m.tokenizer;
            this.numLayers = m.numLayers;
            this.state = "ready";
            this.failures = 0;
            resolve();
            this.emit("ready");
          } else if (m.type === "failed" && m.restart) {
            // rank 0 cannot go on (its group broke): answer the job with why, then restart the group
            breakDown(new NNsightError("INTERNAL", `the tensor-parallel group for ${this.id} broke while running this job (${m.error.code}: ${m.error.message}); the job was lost, the group restarts (all ${procs.length} ranks)`, { cause: m.error.code }), `rank 0: ${m.error.message}`);
          } else if (m.type === "many") {
            for (const x of m.messages) this.onMessage(x);
          } else this.onMessage(m);
        });
        proc.on("error", () => {}); // reported through "exit"
        proc.on("exit", (code, signal) => {
          const how = signal ?? `code ${code}`;
          breakDown(
            group
              ? new NNsightError("INTERNAL", `rank ${rank} (pid ${proc.pid}) of the tensor-parallel group for ${this.id} exited (${how}) while running this job; the job was lost, the group restarts (all ${procs.length} ranks)`, { rank })
              : new NNsightError("INTERNAL", `the model worker exited (${how}) while running this job; the job was lost, the worker restarts`),
            group ? `rank ${rank}: ${how}` : how,
          );
          if (++exited === procs.length) restart();
        });
      });
    });
  }

  private onMessage(m: WorkerMessage): void {
    const cur = this.current;
    const r = cur && "job" in m ? cur.jobs.get(m.job) : undefined;
    if (!cur || !r) return;
    if (m.type === "log") {
      r.onLog(m.json, m.bytes);
      return;
    }
    if (m.type !== "done" && m.type !== "failed") return;
    cur.jobs.delete(m.job);
    if (cur.jobs.size === 0) {
      this.current = null;
      this.state = "ready";
      if (cur.abortTimer) clearTimeout(cur.abortTimer);
    } else this.armKill(cur);
    if (m.type === "done") r.resolve({ json: m.json, bytes: m.bytes, shared: m.shared });
    else r.reject(errorFromJSON(m.error));
    if (this.current === null) this.emit("ready");
  }

  /** Run one job (the worker must be idle). */
  run(req: Omit<RunRequest, "type">, onLog: RunningJob["onLog"]): Promise<JobOutput> {
    return this.runBatch([{ req, onLog }])[0]!;
  }

  /**
   * Run several jobs as one batch (a single worker; see worker.ts BatchRequest): one promise per job,
   * settled as the worker answers that job. The worker is busy until every job is answered.
   */
  runBatch(jobs: JobToRun[]): Array<Promise<JobOutput>> {
    const proc = this.procs?.[0];
    if (!this.idle || !proc || jobs.length === 0 || (jobs.length > 1 && this.world > 1)) {
      return jobs.map(() => Promise.reject(new NNsightError("INTERNAL", "the worker is not idle")));
    }
    this.state = "busy";
    const cur: Current = { jobs: new Map() };
    const out = jobs.map(({ req, onLog }) => new Promise<JobOutput>((resolve, reject) => cur.jobs.set(req.job, { onLog, resolve, reject })));
    this.current = cur;
    if (jobs.length === 1) proc.send({ type: "run", ...jobs[0]!.req } satisfies RunRequest);
    else proc.send({ type: "batch", jobs: jobs.map((j) => j.req) } satisfies BatchRequest);
    return out;
  }

  /**
   * Stop `job` (cancel or time-out; the caller answers it): ask the worker to abort at its next step
   * boundary, which keeps the model loaded, and kill it (it restarts) if it has not stopped within
   * `graceMs` (a long single forward pass cannot be interrupted). A group stops at a step boundary on
   * rank 0's word, all ranks alike; killed, it restarts all its ranks.
   */
  kill(job: string, graceMs = 1500): void {
    const cur = this.current;
    const procs = this.procs;
    const r = cur?.jobs.get(job);
    if (!cur || !r || !procs) return;
    r.stopping = true;
    procs[0]!.send({ type: "abort", job });
    this.graceMs = graceMs;
    this.armKill(cur);
  }

  private graceMs = 1500;

  /** A batch is killed only once all its unanswered jobs were stopped: the others' results still come. */
  private armKill(cur: Current): void {
    const procs = this.procs;
    if (!procs || cur.abortTimer || [...cur.jobs.values()].some((x) => !x.stopping)) return;
    cur.abortTimer = setTimeout(() => {
      if (this.current !== cur || this.procs !== procs) return;
      cur.killed = true;
      for (const p of procs) p.kill("SIGKILL");
    }, this.graceMs);
    cur.abortTimer.unref();
  }

  stop(): void {
    this.state = "stopped";
    for (const p of this.procs ?? []) p.kill("SIGKILL");
    this.procs = null;
  }
}
