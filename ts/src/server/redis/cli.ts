/**
 * `nnsight worker --redis redis://HOST:PORT --model ID [...]`: a stand-alone worker (on a GPU node, say)
 * that loads its models and serves their queues in Redis for every front end started with `nnsight serve
 * --redis` on the same Redis. Runs until SIGINT / SIGTERM; prints one line `worker WORKER_ID serving
 * MODEL` per model once it takes jobs.
 */
import { parseArgs } from "node:util";

import { NNsightError } from "../../errors.js";
import { parseTp, parseTpBackend } from "../http.js";
import { startRedisWorkers } from "./consumer.js";
import { DEFAULT_PREFIX } from "./shared.js";

export const WORKER_USAGE = `usage: nnsight worker --redis redis://HOST:PORT [--model ID_OR_DIR[:tp=N,backend=B,attn=eager]]... [--tp N] [--tp-backend auto|shm|nccl] [--threads N]`;

export async function workerCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      redis: { type: "string" },
      model: { type: "string", multiple: true },
      tp: { type: "string" },
      "tp-backend": { type: "string" },
      threads: { type: "string" },
    },
    strict: true,
  });
  if (!values.redis) throw new NNsightError("BAD_INPUT", `nnsight worker needs --redis\n${WORKER_USAGE}`);
  const threads = values.threads === undefined ? undefined : Number(values.threads);
  if (threads !== undefined && !(Number.isInteger(threads) && threads > 0)) throw new NNsightError("BAD_INPUT", `--threads must be a positive integer, got "${values.threads}"`);
  const w = await startRedisWorkers({
    redis: values.redis,
    prefix: process.env.NNSIGHT_REDIS_PREFIX || DEFAULT_PREFIX,
    models: values.model?.length ? values.model : ["stories260K"],
    tp: values.tp === undefined ? undefined : parseTp(values.tp, "--tp"),
    tpBackend: values["tp-backend"] === undefined ? undefined : parseTpBackend(values["tp-backend"], "--tp-backend"),
    threads,
  });
  for (const c of w.consumers) process.stdout.write(`worker ${c.id} serving ${c.model}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => void w.close().then(resolve, resolve);
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
  });
  return 0;
}
