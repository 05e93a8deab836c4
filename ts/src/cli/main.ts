#!/usr/bin/env node
/**
 * `nnsight` command line:
 *   nnsight info [model]                      config and memory of a model
 *   nnsight serve [--model ID]... [--port N]   the NDIF service
 *   nnsight worker --redis URL --model ID     a stand-alone worker for `serve --redis` front ends
 *   nnsight status URL                        what a server serves
 *   nnsight run script.mjs [--remote URL]     run a script; with --remote, LanguageModel.load() connects
 *   nnsight make-checkpoint PRESET DIR        a random-weight HF checkpoint (gpt2-124m, llama-1b, ...)
 *   nnsight bench [machine|kernels|models|trace|memory|rss|compare|remote] [args...]   the benchmarks in bench/
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { LanguageModel, memory } from "../index.js";
import { PACKAGE_ROOT } from "../native/binding.js";
import { runMakeCheckpointCli } from "../models/random-checkpoint.js";
import { SERVE_USAGE, serveCommand, statusCommand } from "../server/cli.js";

/** Exit code, or null to let the process end by itself (scripts run with `nnsight run`). */
async function main(argv: string[]): Promise<number | null> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "info": {
      const model = await LanguageModel.load(rest[0] ?? "stories260K");
      console.log(JSON.stringify({ dir: model.dir, config: model.spec.raw, memory: memory() }, null, 2));
      await model.dispose();
      return 0;
    }
    case "serve":
      return serveCommand(rest);
    case "worker":
      // Redis mode only: loaded (with ioredis and bullmq) when asked for
      return (await import("../server/redis/cli.js")).workerCommand(rest);
    case "status":
      return statusCommand(rest[0]);
    case "run":
      return runCommand(rest);
    case "make-checkpoint":
      return runMakeCheckpointCli(rest);
    case "bench":
      return benchCommand(rest);
    default:
      console.error(
        `usage: nnsight info [model]\n       nnsight status URL\n       nnsight run script.mjs [--remote URL] [--api-key KEY] [args...]\n       nnsight make-checkpoint PRESET DIR [--dtype float32|bfloat16|float16] [--shards N] [--seed S]\n       nnsight bench [machine|kernels|models|trace|memory|rss|compare|remote] [args...]\n${SERVE_USAGE.replace("usage: ", "       ")}\n       nnsight worker --redis redis://HOST:PORT [--model ID_OR_DIR[:tp=N,backend=B,attn=eager]]... [--tp N] [--tp-backend auto|shm|nccl] [--threads N]`,
      );
      return cmd ? 2 : 0;
  }
}

const BENCHES: Record<string, string> = {
  machine: "machine.mjs",
  kernels: "kernels.mjs",
  models: "models.mjs",
  trace: "trace-overhead.mjs",
  memory: "trace-memory.mjs",
  rss: "memory-model.mjs",
  compare: "compare.mjs",
  remote: "remote-load.mjs",
};

/** Run one of the repository's benchmarks (they print one JSON line per result). */
function benchCommand(args: string[]): number {
  const name = args[0] ?? "kernels";
  const file = BENCHES[name];
  const path = file ? join(PACKAGE_ROOT, "bench", file) : "";
  if (!file || !existsSync(path)) {
    console.error(`usage: nnsight bench [${Object.keys(BENCHES).join("|")}] [args...]${file ? ` (${path} is not in this installation: benchmarks live in the repository)` : ""}`);
    return 2;
  }
  const r = spawnSync(process.execPath, [path, ...args.slice(1)], { stdio: "inherit" });
  return r.status ?? 1;
}

/** Run a user script; `--remote URL` makes every LanguageModel.load() in it connect to that server. */
async function runCommand(args: string[]): Promise<number | null> {
  const script = args[0];
  if (!script) {
    console.error("usage: nnsight run script.mjs [--remote URL] [--api-key KEY] [args...]");
    return 2;
  }
  if (/\.(ts|mts|cts)$/.test(script)) {
    console.error(`nnsight run takes JavaScript (.mjs/.js); compile ${script} first (e.g. with tsc or tsup)`);
    return 2;
  }
  const rest: string[] = [];
  for (let i = 1; i < args.length; i++) {
    if (args[i] === "--remote") process.env.NNSIGHT_REMOTE = args[++i];
    else if (args[i] === "--api-key") process.env.NNSIGHT_API_KEY = args[++i];
    else rest.push(args[i]!);
  }
  process.argv = [process.argv[0]!, resolve(script), ...rest];
  await import(pathToFileURL(resolve(script)).href);
  return null; // the script's own pending work decides when the process ends
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== null) process.exit(code);
  },
  (e) => {
    console.error(e instanceof Error ? `${(e as { code?: string }).code ?? "ERROR"}: ${e.message}` : e);
    process.exit(1);
  },
);
