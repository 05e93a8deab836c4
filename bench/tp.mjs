/**
 * Tensor parallelism on one machine (shm communicator): the same model as 1 process with all the
 * threads, and as a group of N rank processes sharing those threads (threads / N each), side by side
 * in one run. Per model and world size: prefill 1x128 (full logits), decode per token (batch 1, KV
 * cache, after a 128-token prompt; every rank picks the same greedy token from the gathered logits),
 * the collectives a pass issues, and each rank's weight bytes and peak RSS (the point of TP: each rank
 * holds 1/N of the attention, MLP, embedding and LM head weights).
 *
 * On a 2-core machine a world of 2 gains no compute (the ranks split the same cores) and pays the
 * all-reduces / all-gathers; what it measures here is that overhead and the memory split. On a GPU node
 * the same group runs over NCCL with one GPU per rank.
 *
 *   node bench/tp.mjs [--models gpt2-124m,llama-110m] [--worlds 1,2] [--threads 2] [--steps 16] [--reps 3]
 *
 * One JSON line per result (bench "tp.prefill", "tp.decode", "tp.memory"); `speedup` = world-1 ms / ms.
 */
import { performance } from "node:perf_hooks";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";

import { emit, flags, loadAvg, peakRssMiB, progress, progressDone, round, summarize } from "./lib.mjs";
import { MODELS, checkpointDir, ensureCheckpoint } from "./models.mjs";

const opt = flags({ models: "gpt2-124m,llama-110m", worlds: "1,2", threads: 2, steps: 16, reps: 3, child: "", world: 1 });
const self = fileURLToPath(import.meta.url);

const api = await import("../dist/index.js");

if (api.rankInfo()) {
  await rankMain(opt.child);
} else if (opt.child) {
  await single(opt.child);
} else if (process.argv[1] && resolve(process.argv[1]) === self) {
  await launcher();
}

async function launcher() {
  const worlds = String(opt.worlds).split(",").map(Number);
  for (const name of String(opt.models).split(",").filter(Boolean)) {
    if (!MODELS[name]) {
      emit({ bench: "tp.skip", model: name, reason: `unknown model; known: ${Object.keys(MODELS).join(", ")}` });
      continue;
    }
    ensureCheckpoint(name);
    const base = {};
    for (const world of worlds) {
      progress(`${name}: world ${world}`);
      const results = world === 1 ? await runSingle(name) : await runGroup(name, world);
      progressDone();
      if (!results) continue;
      const r0 = results[0];
      for (const kind of ["prefill", "decode"]) {
        const ms = r0[kind].ms;
        if (world === 1) base[kind] = ms;
        emit({
          bench: `tp.${kind}`, model: name, world, threads: opt.threads, threads_per_rank: Math.max(1, Math.floor(opt.threads / world)),
          shape: kind === "prefill" ? [1, 128] : [1, 1], ms: round(ms, 3), best_ms: round(r0[kind].best, 3),
          speedup: base[kind] ? round(base[kind] / ms, 3) : null, collectives_per_pass: r0[kind].collectives, loadavg: loadAvg(),
        });
      }
      emit({
        bench: "tp.memory", model: name, world, shape: null, ms: null,
        weight_mib_per_rank: results.map((r) => round(r.weightBytes / 2 ** 20, 1)), peak_rss_mib_per_rank: results.map((r) => r.peakRss),
        note: "weights a rank holds (shards are views of the mapped file, packed on first use) and its peak RSS",
      });
    }
  }
}

/** world 1: the plain model in a child process with all the threads (its own peak RSS). */
async function runSingle(name) {
  const r = spawnSync(process.execPath, [self, "--child", name, "--threads", String(opt.threads), "--steps", String(opt.steps), "--reps", String(opt.reps)], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (r.status !== 0) {
    emit({ bench: "tp.error", model: name, world: 1, reason: `child exited ${r.status ?? r.signal}` });
    return null;
  }
  return [JSON.parse(r.stdout.trim().split("\n").pop())];
}

async function runGroup(name, world) {
  const group = api.launchRanks({ world, entry: self, args: ["--child", name, "--threads", String(Math.max(1, Math.floor(opt.threads / world))), "--steps", String(opt.steps), "--reps", String(opt.reps), "--world", String(world)] });
  const results = new Array(world);
  group.procs.forEach((p, i) => p.on("message", (m) => { if (m && m.tpBench) results[i] = m.tpBench; }));
  try {
    await group.done;
  } catch (e) {
    emit({ bench: "tp.error", model: name, world, reason: String(e.message ?? e) });
    return null;
  }
  return results;
}

async function single(name) {
  const model = await api.LanguageModel.load(checkpointDir(name), { threads: opt.threads });
  const out = await measure(model, null);
  await model.dispose();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

async function rankMain(name) {
  const comm = await api.joinGroup();
  api.setNumThreads(opt.threads);
  const model = await api.LanguageModel.load(checkpointDir(name), { tensorParallel: comm });
  const out = await measure(model, comm);
  await model.dispose();
  await comm.barrier();
  comm.close();
  process.send({ tpBench: out });
}

/** Prefill and decode timings of one process (every rank of a group runs exactly the same calls). */
async function measure(model, comm) {
  const vocab = model.spec.vocabSize;
  const P = 128;
  const prompt = Int32Array.from({ length: P }, (_, t) => 3 + ((7919 + t * 7927) % Math.min(vocab - 3, 5000)));
  const positions = Int32Array.from({ length: P }, (_, i) => i);
  const lm = model._lm;
  const calls = () => (comm ? comm.calls : 0);

  const prefill = [];
  let prefillCollectives = 0;
  for (let r = 0; r < opt.reps + 1; r++) {
    const c0 = calls();
    const a = performance.now();
    const logits = lm.forward({ batch: 1, seq: P, ids: prompt, positions, keyMask: null }, {});
    await logits.data();
    logits.dispose();
    if (r > 0) prefill.push(performance.now() - a); // the first pass packs the weights
    prefillCollectives = calls() - c0;
  }

  const decode = [];
  let decodeCollectives = 0;
  for (let rep = 0; rep < opt.reps; rep++) {
    const cache = lm.newCache(1, P + opt.steps + 1);
    try {
      let logits = lm.forward({ batch: 1, seq: P, ids: prompt, positions, keyMask: null }, { cache, lastOnly: true });
      let data = await logits.data();
      logits.dispose();
      for (let s = 0; s < opt.steps; s++) {
        const c0 = calls();
        const a = performance.now();
        let best = 0;
        for (let i = 1; i < data.length; i++) if (data[i] > data[best]) best = i;
        logits = lm.forward({ batch: 1, seq: 1, ids: Int32Array.of(best), positions: Int32Array.of(P + s), keyMask: null }, { cache, lastOnly: true });
        data = await logits.data();
        logits.dispose();
        if (rep > 0 || opt.reps === 1) decode.push(performance.now() - a);
        decodeCollectives = calls() - c0;
      }
    } finally {
      cache.dispose();
    }
  }
  let weightBytes = 0;
  for (const t of lm.weights.values()) weightBytes += t.numel * { float32: 4, bfloat16: 2, float16: 2 }[t.dtype];
  const p = summarize(prefill), d = summarize(decode);
  return {
    prefill: { ms: p.median, best: p.best, collectives: prefillCollectives },
    decode: { ms: d.median, best: d.best, collectives: decodeCollectives },
    weightBytes,
    peakRss: peakRssMiB(),
  };
}
