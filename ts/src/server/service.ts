/**
 * The seams between the front end (http.ts) and what keeps jobs, models and results. Two implementations
 * satisfy them: the embedded default (jobs.ts: one in-process fair queue per model, worker processes of
 * this server, results on disk in result-store.ts) and Redis mode (redis/: one BullMQ queue per model
 * shared by many front ends, workers anywhere, results and job records in Redis). Nothing here loads
 * Redis code: http.ts imports redis/ only when `--redis` is given.
 */
import type { ErrorJSON, JobState, ServedTokenizer } from "../remote/protocol.js";
import type { Principal } from "./auth.js";
import type { StoredResult } from "./result-store.js";
import type { ModelWorker } from "./worker-pool.js";

/** Someone listening to a job's events (a WebSocket connection). */
export interface Subscriber {
  send(msg: Record<string, unknown>, ...payload: Uint8Array[]): void;
}

/** What the front end needs to know of a job to answer a request about it. */
export interface JobView {
  id: string;
  state: JobState;
  error?: ErrorJSON;
}

export interface SubmitRequest {
  model: string;
  cid: string;
  scan?: boolean;
  graph: string;
  attachments: Uint8Array;
}

/**
 * Admission, queuing, cancellation and job events. Methods may answer synchronously (embedded) or with a
 * promise (Redis); the front end awaits both alike. Errors a client should see are thrown as NNsightErrors.
 */
export interface JobService {
  /** Check and queue a job (`fresh` false: a resubmit of a known client id, the same job). */
  submit(p: Principal, req: SubmitRequest, sub: Subscriber): { job: JobView; fresh: boolean } | Promise<{ job: JobView; fresh: boolean }>;
  /** After the ack went out: announce QUEUED and let the job start. */
  announce(job: JobView): void;
  /** One of your jobs (BAD_INPUT for an unknown id or someone else's). */
  get(p: Principal, id: string): JobView | Promise<JobView>;
  /** Jobs ahead of a queued job (undefined when it is not queued). */
  position(j: JobView): number | undefined;
  cancel(p: Principal, id: string): JobView | Promise<JobView>;
  /** Subscribe to a job and send its current state (the result when COMPLETED), answering `rid`. */
  subscribe(p: Principal, id: string, sub: Subscriber, rid?: number): Promise<void>;
  unsubscribe(sub: Subscriber): void;
  close(): void | Promise<void>;
}

/** A served model as `GET /models` shows it. */
export interface ModelView {
  id: string;
  status: string;
  queue: number;
  running: number;
  /** ranks of its worker group (1: one worker process) */
  world: number;
  backend: "shm" | "nccl" | null;
  config: Record<string, unknown> | null;
  generationConfig: Record<string, unknown> | null;
  /** Redis mode: live workers (processes or groups) serving the model's queue */
  workers?: number;
}

/** The models a front end serves (its own workers, or those registered in Redis). */
export interface ModelDirectory {
  list(): ModelView[] | Promise<ModelView[]>;
  tokenizer(id: string): ServedTokenizer | null | Promise<ServedTokenizer | null>;
}

/** Where finished jobs' results live: on disk (result-store.ts) or in Redis (redis/result-store.ts). */
export interface ResultStoreLike {
  readonly ttlMs: number;
  put(id: string, r: StoredResult): void | Promise<void>;
  get(id: string): Promise<StoredResult | null>;
  delete(id: string): Promise<void>;
  /** called when a result expires (to release per-key byte accounting), where the store can tell */
  onExpire: (id: string) => void;
  close(): Promise<void>;
}

/** The embedded directory: this server's own worker processes and queues. */
export function embeddedDirectory(workers: Map<string, ModelWorker>, jobs: { queueLength(model: string): number; runningCount(model: string): number }): ModelDirectory {
  return {
    list: () =>
      [...workers.values()].map((w) => ({
        id: w.id,
        status: w.state,
        queue: jobs.queueLength(w.id),
        running: jobs.runningCount(w.id),
        world: w.world,
        backend: w.backend,
        config: w.config,
        generationConfig: w.generationConfig,
      })),
    tokenizer: (id) => workers.get(id)?.tokenizer ?? null,
  };
}
