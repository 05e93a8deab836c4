/**
 * node-llama-cpp peer (llama.cpp, CPU prebuilt binaries): Llama prefill of 128 tokens and decode per
 * token on a GGUF written by bench/peers/export_gguf.py, timed like bench/models.mjs.
 *
 *   node bench/peers/nlc_peer.mjs --gguf .bench-cache/llama-110m-float32.gguf \
 *        --modules SCRATCH/nlc/node_modules [--threads 2] [--steps 32] [--reps 5] [--name llama-110m] [--prefill false]
 *
 * node-llama-cpp is not a project dependency: `npm install node-llama-cpp@3.22.1` in a scratch
 * directory (the CPU binaries come from its optional dependency @node-llama-cpp/linux-x64).
 * Prefill: one evaluation of 128 tokens into a fresh sequence (llama.cpp computes logits for the last
 * token only; ours computes all 128). Decode: greedy `sequence.evaluate` after a 128-token prompt,
 * the time between consecutive tokens. Prints JSON lines (peer "node-llama-cpp") or a models.skip line.
 */
import { performance } from "node:perf_hooks";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

import { emit, flags, summarize } from "../lib.mjs";

const opt = flags({ gguf: "", modules: "", threads: 2, steps: 32, reps: 5, name: "llama-110m", prefill: true });
const base = { peer: "node-llama-cpp", model: opt.name, threads: opt.threads };

const modDir = [opt.modules, process.env.NLC_NODE_MODULES].filter(Boolean).map((d) => join(d, "node-llama-cpp")).find((d) => existsSync(join(d, "package.json")));
if (!modDir) {
  emit({ bench: "models.skip", ...base, reason: "node-llama-cpp not found (pass --modules SCRATCH/nlc/node_modules after `npm install node-llama-cpp@3.22.1` there)" });
  process.exit(0);
}
if (!opt.gguf || !existsSync(opt.gguf)) {
  emit({ bench: "models.skip", ...base, reason: `no GGUF at ${opt.gguf || "(none given)"}; run bench/peers/export_gguf.py` });
  process.exit(0);
}
const pkg = JSON.parse(readFileSync(join(modDir, "package.json"), "utf8"));
const nlc = await import(pathToFileURL(join(modDir, "dist", "index.js")).href);
base.nlc = pkg.version;

let t0 = performance.now();
const llama = await nlc.getLlama({ gpu: false, build: "never", logLevel: "error", progressLogs: false });
const model = await llama.loadModel({ modelPath: opt.gguf, gpuLayers: 0 });
emit({ bench: "models.load", ...base, shape: null, ms: +(performance.now() - t0).toFixed(1) });

const vocab = model.tokens?.vocabSize ?? 32000;
const P = 128;
const prompt = Array.from({ length: P }, (_, t) => 3 + ((2 * 7919 + t * 7927) % Math.min(vocab - 3, 5000)));
const ctxSize = P + opt.steps + 64;

// prefill 1×128
if (opt.prefill) {
  const context = await model.createContext({ contextSize: ctxSize, batchSize: 512, threads: { ideal: opt.threads, min: opt.threads }, sequences: 1 });
  const seq = context.getSequence();
  const once = async () => {
    await seq.clearHistory();
    const a = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(prompt);
    return performance.now() - a;
  };
  await once();
  const ts = [];
  for (let r = 0; r < opt.reps; r++) ts.push(await once());
  const s = summarize(ts);
  emit({ bench: "models.prefill", ...base, shape: [1, P], ms: +s.median.toFixed(2), best_ms: +s.best.toFixed(2), reps: s.reps, tokens_per_s: +((P / s.median) * 1e3).toFixed(1), logits: "last token only" });
  await context.dispose();
}

// decode per token after a 128-token prompt
{
  const context = await model.createContext({ contextSize: ctxSize, batchSize: 512, threads: { ideal: opt.threads, min: opt.threads }, sequences: 1 });
  const seq = context.getSequence();
  const run = async () => {
    await seq.clearHistory();
    const ts = [];
    let last = null;
    let n = 0;
    for await (const _tok of seq.evaluate(prompt, { temperature: 0 })) {
      const now = performance.now();
      if (last !== null) ts.push(now - last); // the first token includes the prompt
      last = now;
      if (++n > opt.steps) break;
    }
    return ts;
  };
  await run();
  const all = [];
  for (let r = 0; r < Math.max(1, Math.min(opt.reps, 3)); r++) all.push(...(await run()));
  const d = summarize(all);
  emit({ bench: "models.decode", ...base, shape: [1, 1], context: [P, P + opt.steps], ms: +d.median.toFixed(3), best_ms: +d.best.toFixed(3), mean_ms: +d.mean.toFixed(3), reps: d.reps, tokens_per_s: +(1e3 / d.median).toFixed(2) });
  await context.dispose();
}
await model.dispose();
await llama.dispose();
