/**
 * onnxruntime-node peer: GPT-2 prefill (full logits) and decode per token on the graphs that
 * bench/peers/export_onnx.py writes, timed like bench/models.mjs.
 *
 *   node bench/peers/ort_peer.mjs --onnx .bench-cache/gpt2-124m-onnx --modules SCRATCH/ort/node_modules \
 *        [--threads 2] [--prefill 1x128,8x128] [--steps 32] [--reps 5] [--name gpt2-124m]
 *
 * onnxruntime-node is not a project dependency: install it in a scratch directory with
 * `ONNXRUNTIME_NODE_INSTALL=skip npm install onnxruntime-node@1.30.0` (the CPU binary is in the tarball).
 * Prints one JSON line per result (peer "onnxruntime-node"), or a models.skip line when it is missing.
 */
import { performance } from "node:perf_hooks";
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

import { emit, flags, summarize } from "../lib.mjs";

const opt = flags({ onnx: "", modules: "", threads: 2, prefill: "1x128,8x128", steps: 32, reps: 5, name: "gpt2-124m" });

function loadOrt() {
  const dirs = [opt.modules, process.env.ORT_NODE_MODULES].filter(Boolean);
  for (const d of dirs) {
    const pkg = join(d, "onnxruntime-node", "package.json");
    if (existsSync(pkg)) return createRequire(pkg)("onnxruntime-node");
  }
  return null;
}

const ort = loadOrt();
if (!ort) {
  emit({ bench: "models.skip", peer: "onnxruntime-node", model: opt.name, reason: "onnxruntime-node not found (pass --modules SCRATCH/ort/node_modules after `ONNXRUNTIME_NODE_INSTALL=skip npm install onnxruntime-node@1.30.0` there)" });
  process.exit(0);
}
if (!opt.onnx || !existsSync(join(opt.onnx, "prefill.onnx"))) {
  emit({ bench: "models.skip", peer: "onnxruntime-node", model: opt.name, reason: `no exported graphs in ${opt.onnx || "(none given)"}; run bench/peers/export_onnx.py` });
  process.exit(0);
}
const meta = Object.fromEntries(readFileSync(join(opt.onnx, "meta.txt"), "utf8").trim().split(/\s+/).map((kv) => kv.split("=")).map(([k, v]) => [k, Number(v)]));
const version = JSON.parse(readFileSync(join(opt.modules || process.env.ORT_NODE_MODULES, "onnxruntime-node", "package.json"), "utf8")).version;
const sessOpts = { executionProviders: ["cpu"], intraOpNumThreads: opt.threads, interOpNumThreads: 1, graphOptimizationLevel: "all" };
const base = { peer: "onnxruntime-node", ort: version, model: opt.name, threads: opt.threads };

let t0 = performance.now();
const prefill = await ort.InferenceSession.create(join(opt.onnx, "prefill.onnx"), sessOpts);
const decode = await ort.InferenceSession.create(join(opt.onnx, "decode.onnx"), sessOpts);
emit({ bench: "models.load", ...base, shape: null, ms: +(performance.now() - t0).toFixed(1) });

const V = meta.vocab, S = meta.seq;
const idsFor = (B, seed) => BigInt64Array.from({ length: B * S }, (_, i) => BigInt(3 + ((seed * 7919 + Math.floor(i / S) * 104729 + (i % S) * 7927) % Math.min(V - 3, 5000))));

for (const spec of String(opt.prefill).split(",").filter(Boolean)) {
  const [B, T] = spec.split("x").map(Number);
  if (T !== S) {
    emit({ bench: "models.skip", ...base, shape: [B, T], reason: `prefill graph was exported for T=${S}` });
    continue;
  }
  const feeds = { input_ids: new ort.Tensor("int64", idsFor(B, 1), [B, T]) };
  await prefill.run(feeds);
  const ts = [];
  for (let r = 0; r < opt.reps; r++) {
    t0 = performance.now();
    await prefill.run(feeds);
    ts.push(performance.now() - t0);
  }
  const s = summarize(ts);
  emit({ bench: "models.prefill", ...base, shape: [B, T], ms: +s.median.toFixed(2), best_ms: +s.best.toFixed(2), reps: s.reps, tokens_per_s: +((B * T) / s.median * 1e3).toFixed(1), logits: "full [B, T, V]" });
}

async function runDecode() {
  const out = await prefill.run({ input_ids: new ort.Tensor("int64", idsFor(1, 2), [1, S]) });
  let pk = out.present_k, pv = out.present_v;
  let logits = out.logits.data.subarray((S - 1) * V, S * V);
  const ts = [];
  for (let s = 0; s < opt.steps; s++) {
    t0 = performance.now();
    let best = 0;
    for (let i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    const o = await decode.run({ input_ids: new ort.Tensor("int64", BigInt64Array.of(BigInt(best)), [1, 1]), position: new ort.Tensor("int64", BigInt64Array.of(BigInt(S + s)), [1, 1]), past_k: pk, past_v: pv });
    logits = o.logits.data;
    pk = o.present_k;
    pv = o.present_v;
    ts.push(performance.now() - t0);
  }
  return ts;
}
await runDecode();
const all = [];
for (let r = 0; r < Math.max(1, Math.min(opt.reps, 3)); r++) all.push(...(await runDecode()));
const d = summarize(all);
emit({ bench: "models.decode", ...base, shape: [1, 1], context: [S, S + opt.steps], ms: +d.median.toFixed(3), best_ms: +d.best.toFixed(3), mean_ms: +d.mean.toFixed(3), reps: d.reps, tokens_per_s: +(1e3 / d.median).toFixed(2), note: "past KV fed back as inputs (no IO binding)" });
