/**
 * A model worker: a child process (forked by worker-pool.ts) that loads one model once and runs jobs on
 * it, one at a time. It receives graphs as wire data (JSON + attachment bytes), validates them
 * (`deserializeGraph`: schema, references, allow-listed ops only) and runs them with the same runner as
 * local traces; results go back as JSON with tensors in safetensors bytes. Nothing else is accepted.
 */
import { type ErrorJSON, type RunResult, encodeRunResult, encodeValues, errorToJSON } from "../remote/protocol.js";
import { NNsightError } from "../errors.js";
import { collectTensors } from "../tensor/scope.js";
import { Tensor } from "../tensor/tensor.js";
import { LanguageModel } from "../trace/model.js";
import { executeSession, executeTrace } from "../trace/runner.js";
import { deserializeGraph } from "../trace/serialize.js";
import type { ServedTokenizer } from "../remote/protocol.js";
import { native } from "../native/binding.js";
import { totalmem } from "node:os";

export interface WorkerSpec {
  model: string;
  threads?: number;
  dtype?: "float32" | "bfloat16" | "float16";
}

export interface RunRequest {
  type: "run";
  job: string;
  scan: boolean;
  graph: string;
  attachments: Uint8Array;
  maxResultBytes: number;
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
  | { type: "done"; job: string; json: string; bytes: Uint8Array }
  | { type: "failed"; job: string; error: ErrorJSON };

const send = (m: WorkerMessage): void => {
  process.send?.(m);
};
const isTensor = (x: unknown): x is Tensor => x instanceof Tensor;

async function run(model: LanguageModel, m: RunRequest): Promise<void> {
  const owned = new Set<Tensor>();
  try {
    const { graph, attachments } = deserializeGraph({ json: m.graph, attachments: m.attachments });
    for (const t of attachments) owned.add(t);
    const log = (values: unknown[]) => {
      const e = encodeValues({ values }, { meta: m.scan });
      send({ type: "log", job: m.job, json: e.json, bytes: e.bytes });
    };
    let res: RunResult;
    if (graph.kind === "session") {
      const r = await executeSession(model, graph, attachments, { log, shouldAbort: () => aborted.has(m.job) });
      res = { result: r.result, saved: r.saved, traces: r.traces.map((t) => ({ result: t.result, saved: t.saved })) };
    } else {
      const r = await executeTrace(model, graph, attachments, { scan: m.scan, log, shouldAbort: () => aborted.has(m.job) });
      res = { result: r.result, saved: r.saved };
    }
    collectTensors(res, owned, isTensor);
    for (const v of res.saved.values()) collectTensors(v, owned, isTensor);
    for (const t of res.traces ?? []) for (const v of [t.result, ...t.saved.values()]) collectTensors(v, owned, isTensor);
    const out = encodeRunResult(res, { meta: m.scan });
    const size = out.json.length + out.bytes.length;
    if (size > m.maxResultBytes) {
      throw new NNsightError("TOO_LARGE", `the result is ${size} bytes; this server returns at most ${m.maxResultBytes} bytes per job (return or save less)`);
    }
    send({ type: "done", job: m.job, json: out.json, bytes: out.bytes });
  } catch (e) {
    send({ type: "failed", job: m.job, error: errorToJSON(e) });
  } finally {
    for (const t of owned) t.dispose();
  }
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.env.NNSIGHT_WORKER_SPEC ?? "{}") as WorkerSpec;
  process.on("disconnect", () => process.exit(0));
  let model: LanguageModel;
  try {
    model = await LanguageModel.load(spec.model, { threads: spec.threads, dtype: spec.dtype });
    // no graph may allocate a single tensor beyond 1/8 of the machine's memory (TOO_LARGE instead of
    // an out-of-memory kill); NNSIGHT_MAX_TENSOR_MB overrides
    const capMb = Number(process.env.NNSIGHT_MAX_TENSOR_MB) || Math.floor(totalmem() / 8 / 2 ** 20);
    native.setMaxAllocation(capMb * 2 ** 20);
  } catch (e) {
    send({ type: "fatal", error: errorToJSON(e) });
    process.exit(3);
  }
  let chain = Promise.resolve();
  process.on("message", (m: RunRequest | AbortRequest) => {
    if (m?.type === "abort") {
      aborted.add(m.job);
      return;
    }
    if (!m || m.type !== "run") return;
    chain = chain.then(() => run(model, m)).finally(() => aborted.delete(m.job));
  });
  send({
    type: "ready",
    config: model.config,
    generationConfig: model._generationConfig,
    numLayers: model.spec.numLayers,
    tokenizer: { json: model.tokenizer.json, config: model.tokenizer.config, eosTokenIds: model.tokenizer.eosTokenIds },
  });
}

void main();
