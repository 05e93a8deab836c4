/**
 * A model worker: a child process (forked by worker-pool.ts) that loads one model once and runs jobs on
 * it, one at a time. It receives graphs as wire data (JSON + attachment bytes), validates them
 * (`deserializeGraph`: schema, references, allow-listed ops only) and runs them with the same runner as
 * local traces; results go back as JSON with tensors in safetensors bytes. Nothing else is accepted.
 *
 * Started by `launchRanks` (NNSIGHT_TP set: `nnsight serve --tp N`), the worker is one rank of a
 * tensor-parallel group and loads its shard of the model: rank 0 speaks the protocol below with the front
 * end and hands each job to the other ranks over the group's communicator (rank.ts); every rank runs it.
 */
import { type ErrorJSON, type RunResult, encodeRunResult, encodeValues, errorToJSON } from "../remote/protocol.js";
import { NNsightError } from "../errors.js";
import { collectTensors } from "../tensor/scope.js";
import { Tensor } from "../tensor/tensor.js";
import { LanguageModel } from "../trace/model.js";
import { type BatchItem, executeSession, executeTrace, executeTraceBatch, prepareBatchItem } from "../trace/runner.js";
import { deserializeGraph } from "../trace/serialize.js";
import type { ServedTokenizer } from "../remote/protocol.js";
import { native } from "../native/binding.js";
import { totalmem } from "node:os";
import type { Communicator } from "../cluster/communicator.js";
import { joinGroup, rankInfo } from "../cluster/launch.js";
import { type GroupJob, JobChannel, digestOf } from "./rank.js";

/** NNSIGHT_TP_CHECK=1: every rank of a group encodes its result and rank 0 checks they agree (tests, debugging) */
const CHECK_RANKS = process.env.NNSIGHT_TP_CHECK === "1";
const enc = new TextEncoder();

export interface WorkerSpec {
  model: string;
  threads?: number;
  dtype?: "float32" | "bfloat16" | "float16";
  /** tensor parallelism over `world` ranks (1: a single worker) */
  tp?: { world: number; backend: "shm" | "nccl" };
  /** HF's attn_implementation (`--model ID:attn=eager`); the served config carries it to clients */
  attnImplementation?: "sdpa" | "eager";
}

export interface RunRequest {
  type: "run";
  job: string;
  scan: boolean;
  graph: string;
  attachments: Uint8Array;
  maxResultBytes: number;
}

/**
 * Several queued jobs at once (a single worker only): plain traces whose rows have the same length run
 * in one forward pass, each on its own rows (runner.ts executeTraceBatch), the rest one after another.
 * Each job is answered on its own (done / failed); a batch that fails is rerun job by job, so a job that
 * fails does not fail the others.
 */
export interface BatchRequest {
  type: "batch";
  jobs: Array<Omit<RunRequest, "type">>;
}

/** Stop a job at its next step boundary (cancel or time-out) without restarting the worker. */
export interface AbortRequest {
  type: "abort";
  job: string;
}

/** jobs asked to stop */
const aborted = new Set<string>();

export type WorkerMessage =
  | { type: "ready"; config: Record<string, unknown>; generationConfig: Record<string, unknown>; numLayers: number; tokenizer: ServedTokenizer }
  | { type: "fatal"; error: ErrorJSON }
  | { type: "log"; job: string; json: string; bytes: Uint8Array }
  /** shared: the number of jobs whose rows were in the forward pass (absent: the job ran alone) */
  | { type: "done"; job: string; json: string; bytes: Uint8Array; shared?: number }
  /** restart: the worker (group) cannot run another job and must be restarted */
  | { type: "failed"; job: string; error: ErrorJSON; restart?: boolean }
  /** the answers of a shared pass's jobs, in one message */
  | { type: "many"; messages: Array<Extract<WorkerMessage, { type: "done" | "failed" }>> };

const send = (m: WorkerMessage): void => {
  process.send?.(m);
};
const isTensor = (x: unknown): x is Tensor => x instanceof Tensor;

/** How one job runs on this worker: alone, or as one rank of a tensor-parallel group. */
interface RunContext {
  /** rank 0 (or a single worker): answers the front end */
  root: boolean;
  /** the group's job channel (null for a single worker) */
  channel: JobChannel | null;
}

async function run(model: LanguageModel, m: GroupJob & { maxResultBytes?: number }, ctx: RunContext): Promise<void> {
  const owned = new Set<Tensor>();
  const { root, channel } = ctx;
  // a group stops a job only where every rank stops it: at a step boundary, on rank 0's word
  const shouldAbort = channel ? () => channel.agree(root && aborted.has(m.job)) : () => aborted.has(m.job);
  let res: RunResult | null = null;
  let error: unknown = null;
  try {
    const { graph, attachments } = deserializeGraph({ json: m.graph, attachments: m.attachments });
    for (const t of attachments) owned.add(t);
    const log = root
      ? (values: unknown[]) => {
          const e = encodeValues({ values }, { meta: m.scan });
          send({ type: "log", job: m.job, json: e.json, bytes: e.bytes });
        }
      : () => {};
    if (graph.kind === "session") {
      const r = await executeSession(model, graph, attachments, { log, shouldAbort });
      res = { result: r.result, saved: r.saved, traces: r.traces.map((t) => ({ result: t.result, saved: t.saved })) };
    } else {
      const r = await executeTrace(model, graph, attachments, { scan: m.scan, log, shouldAbort });
      res = { result: r.result, saved: r.saved };
    }
    collectTensors(res, owned, isTensor);
    for (const v of res.saved.values()) collectTensors(v, owned, isTensor);
    for (const t of res.traces ?? []) for (const v of [t.result, ...t.saved.values()]) collectTensors(v, owned, isTensor);
  } catch (e) {
    error = e;
    res = null;
  }
  try {
    let out: { json: string; bytes: Uint8Array } | null = null;
    if (channel) {
      // every rank says whether it finished: a job succeeds only where all did, and a rank that failed
      // alone (or a broken group) is noticed here, with this job, not with the next one. With
      // NNSIGHT_TP_CHECK=1 every rank also encodes its result and rank 0 checks they agree bit for bit.
      let digest = 0;
      if (CHECK_RANKS && error === null) {
        try {
          out = encodeRunResult(res!, { meta: m.scan });
          digest = digestOf(enc.encode(out.json), out.bytes);
        } catch (e) {
          error = e;
        }
      }
      let done: Array<{ ok: boolean; digest: number }>;
      try {
        done = await channel.outcomes(error === null, digest);
      } catch (e) {
        if (!root) return;
        const cause = error ?? e;
        send({ type: "failed", job: m.job, error: errorToJSON(cause), restart: true });
        return;
      }
      if (!root) {
        // a rank that failed alone says why here (rank 0 answers the job with an error pointing at this log)
        if (error !== null && done[0]!.ok) process.stderr.write(`rank ${channel.rank}: job ${m.job} failed here only: ${(error as Error)?.message ?? error}\n`);
        return;
      }
      const failed = done.flatMap((d, r) => (d.ok ? [] : [r])).filter((r) => r !== 0);
      if (error === null && failed.length > 0) {
        throw new NNsightError("INTERNAL", `rank(s) ${failed.join(", ")} of the tensor-parallel group failed this job while rank 0 did not (see the server's log)`, { ranks: failed });
      }
      if (CHECK_RANKS && error === null) {
        const differ = done.flatMap((d, r) => (d.digest === digest ? [] : [r]));
        if (differ.length) throw new NNsightError("INTERNAL", `rank(s) ${differ.join(", ")} computed a result that differs from rank 0's (NNSIGHT_TP_CHECK)`, { ranks: differ });
        process.stderr.write(`tp-check: job ${m.job}: ${done.length} ranks agree bit for bit (digest ${digest.toString(16)})\n`);
      }
    }
    if (error !== null) throw error;
    if (!root) return;
    if (out) {
      const size = out.json.length + out.bytes.length;
      if (size > (m.maxResultBytes ?? Infinity)) {
        throw new NNsightError("TOO_LARGE", `the result is ${size} bytes; this server returns at most ${m.maxResultBytes} bytes per job (return or save less)`);
      }
      send({ type: "done", job: m.job, json: out.json, bytes: out.bytes });
    } else sendResult({ ...m, maxResultBytes: m.maxResultBytes ?? Infinity }, res!);
  } catch (e) {
    if (root) send({ type: "failed", job: m.job, error: errorToJSON(e) });
    else process.stderr.write(`rank ${channel?.rank}: job ${m.job} failed: ${(e as Error)?.message ?? e}\n`);
  } finally {
    for (const t of owned) t.dispose();
  }
}

/** Answer a job with its result (TOO_LARGE past the limit). */
function sendResult(m: Omit<RunRequest, "type">, res: RunResult, shared?: number, to: (msg: WorkerMessage) => void = send): void {
  const out = encodeRunResult(res, { meta: m.scan });
  const size = out.json.length + out.bytes.length;
  if (size > m.maxResultBytes) {
    throw new NNsightError("TOO_LARGE", `the result is ${size} bytes; this server returns at most ${m.maxResultBytes} bytes per job (return or save less)`);
  }
  to({ type: "done", job: m.job, json: out.json, bytes: out.bytes, ...(shared ? { shared } : {}) });
}

/** A batch (see BatchRequest): groups of batchable traces of one row length share a pass; the rest run alone. */
async function runBatch(model: LanguageModel, jobs: Array<Omit<RunRequest, "type">>, ctx: RunContext): Promise<void> {
  const alone: Array<Omit<RunRequest, "type">> = [];
  const groups = new Map<number, Array<{ m: Omit<RunRequest, "type">; item: BatchItem }>>();
  for (const m of jobs) {
    let item: BatchItem | null = null;
    let attachments: Tensor[] = [];
    try {
      const d = deserializeGraph({ json: m.graph, attachments: m.attachments });
      attachments = d.attachments;
      if (d.graph.kind === "trace" && !m.scan) item = prepareBatchItem(model, d.graph, attachments);
    } catch {
      item = null; // run alone, which reports the error
    }
    if (!item) {
      for (const t of attachments) t.dispose();
      alone.push(m);
      continue;
    }
    let g = groups.get(item.length);
    if (!g) groups.set(item.length, (g = []));
    g.push({ m, item });
  }
  for (const group of groups.values()) {
    const release = () => {
      for (const { item } of group) for (const t of item.attachments) t.dispose();
    };
    if (group.length === 1) {
      release();
      alone.push(group[0]!.m);
      continue;
    }
    let results;
    try {
      results = await executeTraceBatch(model, group.map((x) => x.item));
    } catch {
      // one graph failed the shared pass: every job runs again alone and answers for itself
      release();
      for (const { m } of group) alone.push(m);
      continue;
    }
    // one message for the whole pass (one write, one wake-up of the front end)
    const answers: Array<Extract<WorkerMessage, { type: "done" | "failed" }>> = [];
    const collect = (msg: WorkerMessage) => {
      if (msg.type === "done" || msg.type === "failed") answers.push(msg);
    };
    results.forEach((r, k) => {
      const { m } = group[k]!;
      const owned = new Set<Tensor>();
      try {
        const res: RunResult = { result: r.result, saved: r.saved };
        collectTensors(res.result, owned, isTensor);
        for (const v of res.saved.values()) collectTensors(v, owned, isTensor);
        sendResult(m, res, group.length, collect);
      } catch (e) {
        answers.push({ type: "failed", job: m.job, error: errorToJSON(e) });
      } finally {
        for (const t of owned) t.dispose();
      }
    });
    send({ type: "many", messages: answers });
    release();
  }
  for (const m of alone) await run(model, m, ctx);
}

/** Load the model (its shard, in a group) and cap single allocations; reports `fatal` and exits on failure. */
async function loadModel(spec: WorkerSpec, comm: Communicator | null): Promise<LanguageModel> {
  try {
    const device = comm && comm.device !== "cpu" ? comm.device : undefined;
    const model = await LanguageModel.load(spec.model, { threads: spec.threads, dtype: spec.dtype, device, tensorParallel: comm ?? undefined, attnImplementation: spec.attnImplementation });
    // no graph may allocate a single tensor beyond 1/8 of the machine's memory (TOO_LARGE instead of
    // an out-of-memory kill); NNSIGHT_MAX_TENSOR_MB overrides
    const capMb = Number(process.env.NNSIGHT_MAX_TENSOR_MB) || Math.floor(totalmem() / 8 / 2 ** 20);
    native.setMaxAllocation(capMb * 2 ** 20);
    return model;
  } catch (e) {
    return fatal(e);
  }
}

/** Report a failure to load (or to join the group) and exit once the message went out. */
async function fatal(e: unknown): Promise<never> {
  const m: WorkerMessage = { type: "fatal", error: errorToJSON(e) };
  await new Promise<void>((resolve) => (process.send ? process.send(m, undefined, {}, () => resolve()) : resolve()));
  process.exit(3);
}

function sendReady(model: LanguageModel): void {
  send({
    type: "ready",
    config: model.config,
    generationConfig: model._generationConfig,
    numLayers: model.spec.numLayers,
    tokenizer: { json: model.tokenizer.json, config: model.tokenizer.config, eosTokenIds: model.tokenizer.eosTokenIds },
  });
}

/** Rank 0 (or a single worker): take jobs from the front end, one at a time, in arrival order. */
function serveJobs(model: LanguageModel, channel: JobChannel | null): void {
  let chain = Promise.resolve();
  let pending = 0;
  // a group's other ranks wait for the next job inside a collective: keep them from timing out
  const heartbeatMs = channel ? Math.max(50, Math.floor(groupTimeoutMs() / 4)) : 0;
  let heartbeat: NodeJS.Timeout | null = null;
  const idle = () => {
    if (!channel || pending > 0) return;
    if (heartbeat) clearTimeout(heartbeat);
    heartbeat = setTimeout(() => {
      heartbeat = null;
      if (pending > 0) return;
      pending++;
      chain = chain
        .then(() => channel.send(null))
        .catch((e) => {
          // the group broke while idle (a rank died): the front end restarts it
          process.stderr.write(`rank 0: the tensor-parallel group broke: ${(e as Error).message}\n`);
          process.exit(1);
        })
        .finally(() => {
          pending--;
          idle();
        });
    }, heartbeatMs);
  };
  process.on("message", (m: RunRequest | BatchRequest | AbortRequest) => {
    if (m?.type === "abort") {
      aborted.add(m.job);
      return;
    }
    if (m?.type === "batch" && !channel) {
      pending++;
      chain = chain
        .then(() => runBatch(model, m.jobs, { root: true, channel }))
        .catch((e) => {
          // not expected (runBatch answers each job itself); the front end ignores answers to answered jobs
          for (const j of m.jobs) send({ type: "failed", job: j.job, error: errorToJSON(e) });
        })
        .finally(() => {
          for (const j of m.jobs) aborted.delete(j.job);
          pending--;
        });
      return;
    }
    if (!m || m.type !== "run") return;
    if (heartbeat) clearTimeout(heartbeat);
    heartbeat = null;
    pending++;
    chain = chain
      .then(async () => {
        if (channel) {
          try {
            await channel.send(m);
          } catch (e) {
            send({ type: "failed", job: m.job, error: errorToJSON(e), restart: true });
            return;
          }
        }
        await run(model, m, { root: true, channel });
      })
      .finally(() => {
        aborted.delete(m.job);
        pending--;
        idle();
      });
  });
  idle();
}

function groupTimeoutMs(): number {
  return rankInfo()?.timeoutMs ?? 60_000;
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.env.NNSIGHT_WORKER_SPEC ?? "{}") as WorkerSpec;
  process.on("disconnect", () => process.exit(0));
  const info = rankInfo();
  if (!info || info.world === 1) {
    const model = await loadModel(spec, null);
    serveJobs(model, null);
    sendReady(model);
    return;
  }
  let comm: Communicator;
  try {
    comm = await joinGroup();
  } catch (e) {
    return fatal(e);
  }
  const model = await loadModel(spec, comm);
  const channel = new JobChannel(comm);
  try {
    await comm.barrier(); // every rank holds its shard
  } catch (e) {
    return fatal(e);
  }
  if (comm.rank === 0) {
    serveJobs(model, channel);
    sendReady(model);
    return;
  }
  // ranks 1..N-1: run what rank 0 hands over, until the group ends or breaks
  for (;;) {
    let job: GroupJob | null;
    try {
      job = await channel.receive();
    } catch (e) {
      process.stderr.write(`rank ${comm.rank}: the tensor-parallel group broke: ${(e as Error).message}\n`);
      process.exit(1);
    }
    if (job === null) process.exit(0);
    await run(model, job, { root: false, channel });
    if (channel.broken) {
      process.stderr.write(`rank ${comm.rank}: the tensor-parallel group broke: ${channel.broken.message}\n`);
      process.exit(1);
    }
  }
}

void main().catch(() => process.exit(3));
