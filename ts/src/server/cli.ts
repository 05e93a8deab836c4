/** The service's commands: `nnsight serve [...]` and `nnsight status URL`. */
import { parseArgs } from "node:util";

import { NNsightError } from "../errors.js";
import { listModels } from "../remote/client.js";
import { httpUrl } from "../remote/protocol.js";
import { parseTp, parseTpBackend, serve } from "./http.js";

export const SERVE_USAGE = `usage: nnsight serve [--model ID_OR_DIR[:tp=N,backend=B,attn=eager]]... [--tp N] [--tp-backend auto|shm|nccl] [--port N] [--host 127.0.0.1] [--api-keys keys.json]
       [--results-dir DIR] [--result-ttl-s N] [--job-timeout-ms N] [--max-frame-bytes N] [--max-graph-bytes N]
       [--max-attachment-bytes N] [--max-result-bytes N] [--max-cost N] [--threads N] [--max-batch N]
       [--quota-concurrent N] [--quota-per-minute N] [--quota-result-bytes N] [--redis redis://HOST:PORT]`;

const num = (v: string | undefined, name: string): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new NNsightError("BAD_INPUT", `--${name} must be a non-negative number, got "${v}"`);
  return n;
};

/** Runs until SIGINT / SIGTERM. The first line on stdout is `listening on http://HOST:PORT`. */
export async function serveCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string", multiple: true },
      tp: { type: "string" },
      "tp-backend": { type: "string" },
      port: { type: "string" },
      host: { type: "string" },
      "api-keys": { type: "string" },
      "results-dir": { type: "string" },
      "result-ttl-s": { type: "string" },
      "job-timeout-ms": { type: "string" },
      "max-frame-bytes": { type: "string" },
      "max-graph-bytes": { type: "string" },
      "max-attachment-bytes": { type: "string" },
      "max-result-bytes": { type: "string" },
      "max-cost": { type: "string" },
      threads: { type: "string" },
      "max-batch": { type: "string" },
      "quota-concurrent": { type: "string" },
      "quota-per-minute": { type: "string" },
      "quota-result-bytes": { type: "string" },
      redis: { type: "string" },
    },
    strict: true,
  });
  const limits = Object.fromEntries(
    (
      [
        ["maxFrameBytes", "max-frame-bytes"],
        ["maxGraphBytes", "max-graph-bytes"],
        ["maxAttachmentBytes", "max-attachment-bytes"],
        ["maxResultBytes", "max-result-bytes"],
        ["maxCost", "max-cost"],
        ["jobTimeoutMs", "job-timeout-ms"],
      ] as const
    )
      .map(([k, f]) => [k, num(values[f], f)] as const)
      .filter(([, v]) => v !== undefined),
  );
  const quota = Object.fromEntries(
    (
      [
        ["maxConcurrent", "quota-concurrent"],
        ["jobsPerMinute", "quota-per-minute"],
        ["resultBytes", "quota-result-bytes"],
      ] as const
    )
      .map(([k, f]) => [k, num(values[f], f)] as const)
      .filter(([, v]) => v !== undefined),
  );
  const ttl = num(values["result-ttl-s"], "result-ttl-s");
  const warnings: string[] = []; // printed after the listening line, which must come first
  const server = await serve({
    warn: (m) => warnings.push(m),
    models: values.model,
    tp: values.tp === undefined ? undefined : parseTp(values.tp, "--tp"),
    tpBackend: values["tp-backend"] === undefined ? undefined : parseTpBackend(values["tp-backend"], "--tp-backend"),
    port: num(values.port, "port") ?? 8080,
    host: values.host,
    apiKeys: values["api-keys"],
    resultsDir: values["results-dir"],
    resultTtlMs: ttl === undefined ? undefined : ttl * 1000,
    threads: num(values.threads, "threads"),
    maxBatch: num(values["max-batch"], "max-batch"),
    limits,
    quota,
    redis: values.redis,
  });
  process.stdout.write(`listening on ${server.url}\n`);
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => void server.close().then(resolve, resolve);
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
  });
  return 0;
}

/** Health and models of a running service, as JSON. */
export async function statusCommand(url: string | undefined): Promise<number> {
  if (!url) throw new NNsightError("BAD_INPUT", "usage: nnsight status URL");
  const res = await fetch(`${httpUrl(url)}/health`, { signal: AbortSignal.timeout(10_000) }).catch((e: Error) => {
    throw new NNsightError("IO", `cannot reach ${url}: ${e.message}`);
  });
  const health = (await res.json()) as Record<string, unknown>;
  const models = (await listModels(url)).map((m) => ({ id: m.id, status: m.status, queue: m.queue, model_type: m.config?.model_type, world: m.world ?? 1 }));
  console.log(JSON.stringify({ url: httpUrl(url), ...health, models }, null, 2));
  return 0;
}
