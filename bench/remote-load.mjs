#!/usr/bin/env node
/**
 * Load on the remote service: starts `nnsight serve` (the bundled model) on 127.0.0.1, connects N
 * clients (default 64), each sending M small traces (default 100) one after another, all clients at
 * once. Prints ONE JSON line: throughput (traces/s), p50/p99 latency (ms), errors, and the RSS of the
 * server front end and its model worker before and after, the CPU seconds each process used during the run
 * (`cpu_s`: spinning threads show there) and the load average.
 *
 *   node bench/remote-load.mjs [--clients 64] [--traces 100] [--threads N] [--url http://127.0.0.1:PORT]
 *
 * Imports the built package (dist/): run `npm run build:ts` after changing the sources.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { LanguageModel } from "../dist/index.js";

const ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
const { values } = parseArgs({ options: { clients: { type: "string" }, traces: { type: "string" }, threads: { type: "string" }, url: { type: "string" } } });
const CLIENTS = Number(values.clients ?? 64);
const TRACES = Number(values.traces ?? 100);

const rssMiB = (pid) => {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Math.round(Number(m[1]) / 102.4) / 10 : null;
  } catch {
    return null;
  }
};
const childrenOf = (pid) => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
};

let server = null;
let url = values.url;
if (!url) {
  const args = [join(ROOT, "dist/cli/main.js"), "serve", "--port", "0", "--host", "127.0.0.1", "--quota-per-minute", "1000000", "--quota-concurrent", "100000"];
  if (values.threads) args.push("--threads", values.threads);
  server = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "ignore"], env: { ...process.env, NNSIGHT_API_KEYS: "" } });
  url = await new Promise((resolve, reject) => {
    let out = "";
    server.stdout.on("data", (d) => {
      out += d;
      const m = /^listening on (\S+)\n/.exec(out);
      if (m) resolve(m[1]);
    });
    server.on("exit", (c) => reject(new Error(`server exited with ${c}`)));
  });
}
const pids = server ? [server.pid, ...childrenOf(server.pid)] : [];
const rss = () => Object.fromEntries(pids.map((p, i) => [i === 0 ? "server" : `worker${i}`, rssMiB(p)]));
// CPU seconds each process used during the run (user + system): spinning threads show up here even when
// throughput hides them (the processes share the machine's cores)
const cpuSecOf = (pid) => {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
    return (Number(f[11]) + Number(f[12])) / 100;  // utime, stime in clock ticks (USER_HZ = 100 on Linux)
  } catch {
    return null;
  }
};
const cpuSec = () => ({ ...Object.fromEntries(pids.map((p, i) => [i === 0 ? "server" : `worker${i}`, cpuSecOf(p)])), client: (process.cpuUsage().user + process.cpuUsage().system) / 1e6 });

const P = "Once upon a time";
const clients = await Promise.all(Array.from({ length: CLIENTS }, () => LanguageModel.connect(url, "stories260K", { apiKey: process.env.NNSIGHT_API_KEY })));
// warm-up: one trace per client
await Promise.all(clients.map((m) => m.trace(P, () => ({ h: m.model.layers[1].output })).then((r) => r.h.dispose())));
const rssBefore = rss();
const clientRssBefore = Math.round(process.memoryUsage().rss / 104857.6) / 10;

const lat = [];
let errors = 0;
const firstErrors = [];
const cpuBefore = cpuSec();
const t0 = performance.now();
await Promise.all(
  clients.map(async (m) => {
    for (let i = 0; i < TRACES; i++) {
      const s = performance.now();
      try {
        const r = await m.trace(P, () => ({ h: m.model.layers[1].output.at([":", -1]) }));
        r.h.dispose();
        lat.push(performance.now() - s);
      } catch (e) {
        errors++;
        if (firstErrors.length < 3) firstErrors.push(`${e.code ?? "ERROR"}: ${e.message}`);
      }
    }
  }),
);
const wall = (performance.now() - t0) / 1000;
const rssAfter = rss();
const cpuAfter = cpuSec();
await Promise.all(clients.map((m) => m.dispose()));
if (server) {
  const exited = new Promise((r) => server.once("exit", r));
  server.kill("SIGTERM");
  await exited;
}

lat.sort((a, b) => a - b);
const q = (p) => (lat.length ? Math.round(lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] * 1000) / 1000 : null);
console.log(
  JSON.stringify({
    bench: "remote-load",
    clients: CLIENTS,
    traces_per_client: TRACES,
    ok: lat.length,
    errors,
    ...(firstErrors.length ? { first_errors: firstErrors } : {}),
    wall_s: Math.round(wall * 1000) / 1000,
    throughput_per_s: Math.round((lat.length / wall) * 10) / 10,
    p50_ms: q(0.5),
    p99_ms: q(0.99),
    cpu_s: Object.fromEntries(Object.entries(cpuAfter).map(([k, v]) => [k, v === null || cpuBefore[k] === null ? null : Math.round((v - cpuBefore[k]) * 100) / 100])),
    loadavg: readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number),
    rss_mib_before: { ...rssBefore, client: clientRssBefore },
    rss_mib_after: { ...rssAfter, client: Math.round(process.memoryUsage().rss / 104857.6) / 10 },
  }),
);
