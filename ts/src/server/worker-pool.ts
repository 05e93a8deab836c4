/**
 * One worker process per served model (`child_process.fork` of dist/server/worker.js): it loads the
 * model once and runs one job at a time. A worker that crashes, or is killed to cancel or time out a job,
 * fails only that job and is started again; the front end never runs model code.
 */
import type { ServedTokenizer } from "../remote/protocol.js";
import { type ChildProcess, fork } from "node:child_process";
import { EventEmitter } from "node:events";
import { existsSync } from "node:fs";
import path from "node:path";

import { NNsightError } from "../errors.js";
import { PACKAGE_ROOT } from "../native/binding.js";
import { type ErrorJSON, errorFromJSON } from "../remote/protocol.js";
import type { RunRequest, WorkerMessage, WorkerSpec } from "./worker.js";

export function defaultWorkerEntry(): string {
  return path.join(PACKAGE_ROOT, "dist", "server", "worker.js");
}

export type WorkerState = "starting" | "ready" | "busy" | "failed" | "stopped";

interface Current {
  job: string;
  onLog: (json: string, bytes: Uint8Array) => void;
  resolve: (r: { json: string; bytes: Uint8Array }) => void;
  reject: (e: NNsightError) => void;
  /** why we killed the worker (the job is answered by whoever killed it) */
  killed?: boolean;
  /** the SIGKILL fallback of a cooperative abort */
  abortTimer?: NodeJS.Timeout;
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
  private proc: ChildProcess | null = null;
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

  get pid(): number | undefined {
    return this.proc?.pid;
  }
  get idle(): boolean {
    return this.state === "ready" && this.current === null;
  }

  /** Start the process; resolves when the model is loaded (rejects if loading fails). */
  start(): Promise<void> {
    if (!existsSync(this.entry)) {
      return Promise.reject(new NNsightError("INTERNAL", `the worker entry ${this.entry} is missing: run \`npm run build:ts\``));
    }
    this.state = "starting";
    const env: NodeJS.ProcessEnv = { ...process.env, NNSIGHT_WORKER_SPEC: JSON.stringify(this.spec) };
    delete env.NNSIGHT_API_KEYS;
    delete env.NNSIGHT_API_KEY;
    const proc = fork(this.entry, [], { serialization: "advanced", env, stdio: ["ignore", "inherit", "inherit", "ipc"], execArgv: [] });
    this.proc = proc;
    return new Promise<void>((resolve, reject) => {
      proc.on("message", (m: WorkerMessage) => {
        if (m.type === "ready") {
          this.config = m.config;
          this.generationConfig = m.generationConfig;
          this.tokenizer = m.tokenizer;
          this.numLayers = m.numLayers;
          this.state = "ready";
          this.failures = 0;
          resolve();
          this.emit("ready");
        } else if (m.type === "fatal") {
          this.lastError = m.error;
          reject(errorFromJSON(m.error));
        } else this.onMessage(m);
      });
      proc.on("error", () => {}); // reported through "exit"
      proc.on("exit", (code, signal) => {
        if (this.proc !== proc) return;
        this.proc = null;
        const cur = this.current;
        this.current = null;
        if (cur) {
          // a killed worker's job was already answered by whoever killed it: this rejection is ignored
          cur.reject(new NNsightError("INTERNAL", `the model worker exited (${signal ?? `code ${code}`}) while running this job; the job was lost, the worker restarts`, { job: cur.job }));
        }
        if (this.state === "stopped") return;
        const wasStarting = this.state === "starting";
        reject(new NNsightError("INTERNAL", `the model worker for ${this.id} exited while loading (${signal ?? `code ${code}`})`));
        if (wasStarting && ++this.failures >= 3) {
          this.state = "failed";
          this.emit("failed");
          return;
        }
        this.emit("restart");
        this.state = "starting";
        setTimeout(() => this.state !== "stopped" && this.start().catch(() => {}), wasStarting ? 500 : 0).unref();
      });
    });
  }

  private onMessage(m: WorkerMessage): void {
    const cur = this.current;
    if (!cur || !("job" in m) || m.job !== cur.job) return;
    if (m.type === "log") {
      cur.onLog(m.json, m.bytes);
      return;
    }
    this.current = null;
    this.state = "ready";
    if (cur.abortTimer) clearTimeout(cur.abortTimer);
    if (m.type === "done") cur.resolve({ json: m.json, bytes: m.bytes });
    else if (m.type === "failed") cur.reject(errorFromJSON(m.error));
    this.emit("ready");
  }

  /** Run one job (the worker must be idle). */
  run(req: Omit<RunRequest, "type">, onLog: Current["onLog"]): Promise<{ json: string; bytes: Uint8Array }> {
    if (!this.idle || !this.proc) return Promise.reject(new NNsightError("INTERNAL", "the worker is not idle"));
    this.state = "busy";
    return new Promise((resolve, reject) => {
      this.current = { job: req.job, onLog, resolve, reject };
      this.proc!.send({ type: "run", ...req } satisfies RunRequest);
    });
  }

  /**
   * Stop `job` (cancel or time-out; the caller answers it): ask the worker to abort at its next step
   * boundary, which keeps the model loaded, and kill it (it restarts) if it has not stopped within
   * `graceMs` (a long single forward pass cannot be interrupted).
   */
  kill(job: string, graceMs = 1500): void {
    const cur = this.current;
    if (cur?.job !== job || !this.proc) return;
    const proc = this.proc;
    proc.send({ type: "abort", job });
    cur.abortTimer = setTimeout(() => {
      if (this.current !== cur || this.proc !== proc) return;
      cur.killed = true;
      proc.kill("SIGKILL");
    }, graceMs);
    cur.abortTimer.unref();
  }

  stop(): void {
    this.state = "stopped";
    this.proc?.kill("SIGKILL");
    this.proc = null;
  }
}
