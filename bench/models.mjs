/**
 * Whole-model benchmarks on random-weight checkpoints at real shapes, through the public API:
 *
 * - GPT-2 124M (fp32): prefill 1×128 and 8×128 (full logits, as a plain forward returns them) and
 *   decode per token (batch 1, KV cache, after a 128-token prompt);
 * - Llama 110M-class (stories110M's shape, fp32): prefill 1×128 and decode per token;
 * - Llama 850M-class (TinyLlama width, 16 layers, bf16 weights): decode per token.
 *
 * Prefill reports GFLOP/s and the fraction of the FMA peak; decode reports the fraction of the
 * bandwidth bound (bytes a token must read: every weight matrix used, the LM head, and the KV cache,
 * divided by triad bandwidth; both measured in the same run). Each model runs in its own child process,
 * so peak_rss_mib is that model's own.
 *
 *   node bench/models.mjs [--threads 2] [--models gpt2-124m,llama-110m,llama-850m-bf16]
 *                         [--steps 32] [--reps 5]
 *
 * Checkpoints are written once to .bench-cache/ (or $NNSIGHT_BENCH_CACHE) with scripts/make-checkpoint.ts.
 * Decode timing mirrors generation (ts/src/models/generate.ts): one lastOnly forward with the cache, then
 * the logits are read (the greedy pick needs them), per step; ms = median step, best_ms = fastest step.
 */
import { performance } from "node:perf_hooks";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { CACHE_DIR, ROOT, addon, dumpProfile, emit, flags, loadAvg, measureLimits, progress, progressDone, round, summarize, timeit } from "./lib.mjs";

export const MODELS = {
  "gpt2-124m": { preset: "gpt2-124m", dtype: "float32", prefill: [[1, 128], [8, 128]], decode: true },
  "llama-110m": { preset: "llama-110m", dtype: "float32", prefill: [[1, 128]], decode: true },
  "llama-850m-bf16": { preset: "llama-850m", dtype: "bfloat16", prefill: [], decode: true },
};

export function checkpointDir(name) {
  const m = MODELS[name];
  return join(CACHE_DIR, `${m.preset}-${m.dtype}`);
}

/** Write the checkpoint once (the writer renames the weights file into place only when it is complete). */
export function ensureCheckpoint(name) {
  const m = MODELS[name];
  const dir = checkpointDir(name);
  if (existsSync(join(dir, "model.safetensors")) && existsSync(join(dir, "config.json"))) return dir;
  progress(`writing random checkpoint ${m.preset} (${m.dtype}) to ${dir}`);
  const r = spawnSync(process.execPath, [join(ROOT, "node_modules/vite-node/vite-node.mjs"), join(ROOT, "scripts/make-checkpoint.ts"), m.preset, dir, "--dtype", m.dtype, "--force"], { cwd: ROOT, encoding: "utf8" });
  progressDone();
  if (r.status !== 0) throw new Error(`make-checkpoint ${m.preset} failed: ${r.stderr || r.stdout}`);
  return dir;
}

const opt = flags({ threads: 2, models: Object.keys(MODELS).join(","), steps: 32, reps: 5, one: "", fma: 0, triad: 0, profile: false });
// --profile (or NX_PROFILE=1): after each timing, one more run with the executor's per-op profile on,
// printed as JSON lines on stderr (lib.mjs dumpProfile); the timed runs are not profiled.
const profiling = opt.profile || (!!process.env.NX_PROFILE && process.env.NX_PROFILE !== "0");

if (opt.one) {
  await runOne(opt.one);
} else if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const lim = measureLimits(opt.threads);
  emit({ bench: "models.limits", shape: null, threads: opt.threads, ms: null, fma512_gflops: lim.fma512_gflops, fma256_gflops: lim.fma256_gflops, triad_gbps: lim.triad_gbps, loadavg: loadAvg() });
  for (const name of String(opt.models).split(",").filter(Boolean)) {
    if (!MODELS[name]) {
      emit({ bench: "models.skip", model: name, reason: `unknown model; known: ${Object.keys(MODELS).join(", ")}` });
      continue;
    }
    ensureCheckpoint(name);
    const r = spawnSync(process.execPath, [process.argv[1], "--one", name, "--threads", String(opt.threads), "--steps", String(opt.steps), "--reps", String(opt.reps), "--fma", String(lim.fma_gflops), "--triad", String(lim.triad_gbps), ...(opt.profile ? ["--profile"] : [])], { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"] });
    if (r.status !== 0) emit({ bench: "models.error", model: name, reason: `child exited ${r.status ?? r.signal}` });
  }
}

/** Bytes and FLOPs of a model, from its weights. */
function modelCosts(model) {
  const c = model.spec;
  const w = model._lm.weights;
  const gpt2 = c.modelType === "gpt2";
  let total = 0;
  const bytesOf = (t) => t.numel * { float32: 4, bfloat16: 2, float16: 2 }[t.dtype];
  for (const t of w.values()) total += bytesOf(t);
  // tables read one row per token in decode (not whole): position table, and the token table unless it is the LM head
  const tied = !w.has("lm_head.weight");
  const lookupOnly = gpt2 ? ["transformer.wpe.weight", ...(tied ? [] : ["transformer.wte.weight"])] : tied ? [] : ["model.embed_tokens.weight"];
  let lookupBytes = 0;
  for (const n of lookupOnly) lookupBytes += bytesOf(w.get(n));
  // matmul parameters per token (every linear layer plus the LM head)
  const D = c.hiddenSize, F = c.intermediateSize, L = c.numLayers, V = c.vocabSize, hd = c.headDim;
  const perLayer = gpt2 ? 4 * D * D + 2 * D * F : D * c.numHeads * hd * 2 + 2 * D * c.numKvHeads * hd + 3 * D * F;
  const matParams = L * perLayer + V * D;
  return { totalBytes: total, decodeWeightBytes: total - lookupBytes, matParams, L, D, V, hd, kvHeads: c.numKvHeads, heads: c.numHeads };
}

async function runOne(name) {
  const m = MODELS[name];
  const dir = checkpointDir(name);
  const { LanguageModel } = await import("../dist/index.js");
  const native = profiling ? addon() : null;
  native?.setProfiling(false); // on only around the profiled runs
  const T = opt.threads;
  progress(`loading ${name}`);
  const t0 = performance.now();
  const model = await LanguageModel.load(dir, { threads: T });
  const loadMs = performance.now() - t0;
  progressDone();
  const cost = modelCosts(model);
  const base = { model: name, preset: m.preset, weights_dtype: m.dtype, threads: T, weight_bytes: cost.totalBytes, loadavg: loadAvg() };
  emit({ bench: "models.load", ...base, shape: null, ms: round(loadMs, 1) });

  const vocab = model.spec.vocabSize;
  const ids = (B, S, seed) => Array.from({ length: B }, (_, b) => Array.from({ length: S }, (_, t) => 3 + ((seed * 7919 + b * 104729 + t * 7927) % Math.min(vocab - 3, 5000))));

  for (const [B, S] of m.prefill) {
    progress(`${name} prefill ${B}x${S}`);
    const input = ids(B, S, 1);
    const r = await timeit(
      async () => {
        const logits = await model.forward(input);
        logits.dispose();
      },
      { warmup: 1, reps: opt.reps },
    );
    const tokens = B * S;
    const flops = 2 * cost.matParams * tokens + 2 * cost.L * B * S * S * cost.heads * cost.hd; // causal attention: QK^T and AV over half the square
    const gflops = flops / r.median / 1e6;
    emit({ bench: "models.prefill", ...base, shape: [B, S], ms: round(r.median, 2), best_ms: round(r.best, 2), reps: r.reps, tokens_per_s: round((tokens / r.median) * 1e3, 1), gflops: round(gflops, 2), frac_fma_peak: opt.fma ? round(gflops / opt.fma, 3) : null, fma_peak_gflops: opt.fma || null, logits: "full [B, T, V]" });
    if (native) {
      native.setProfiling(true);
      native.profile(true);
      const a = performance.now();
      (await model.forward(input)).dispose();
      const wall = performance.now() - a;
      native.setProfiling(false);
      dumpProfile(native, { model: name, run: "prefill", shape: [B, S], wall_ms: round(wall, 2) });
    }
  }

  if (m.decode) {
    const P = 128;
    const steps = opt.steps;
    const lm = model._lm;
    const prompt = Int32Array.from(ids(1, P, 2)[0]);
    const positions = Int32Array.from({ length: P }, (_, i) => i);
    const runDecode = async () => {
      const cache = lm.newCache(1, P + steps + 1);
      const times = [];
      try {
        let logits = lm.forward({ batch: 1, seq: P, ids: prompt, positions, keyMask: null }, { cache, lastOnly: true });
        let data = await logits.data();
        logits.dispose();
        for (let s = 0; s < steps; s++) {
          const a = performance.now(); // the greedy pick is part of the step, as in generation
          let best = 0;
          for (let i = 1; i < data.length; i++) if (data[i] > data[best]) best = i;
          logits = lm.forward({ batch: 1, seq: 1, ids: Int32Array.of(best), positions: Int32Array.of(P + s), keyMask: null }, { cache, lastOnly: true });
          data = await logits.data();
          logits.dispose();
          times.push(performance.now() - a);
        }
      } finally {
        cache.dispose();
      }
      return times;
    };
    progress(`${name} decode (warm-up)`);
    await runDecode();
    progress(`${name} decode`);
    const all = [];
    for (let rep = 0; rep < Math.max(1, Math.min(opt.reps, 3)); rep++) all.push(...(await runDecode()));
    const r = summarize(all);
    if (native) {
      // one more prompt + steps decode pass, profiled (the prompt's prefill is in it: lastOnly, with cache)
      native.setProfiling(true);
      native.profile(true);
      const a = performance.now();
      await runDecode();
      const wall = performance.now() - a;
      native.setProfiling(false);
      dumpProfile(native, { model: name, run: "prompt+decode", shape: [1, P], steps, wall_ms: round(wall, 2) });
    }
    // bytes per token: weights read (lookup tables excluded) + the KV cache at the mean context length
    const ctx = P + steps / 2;
    const kvBytes = 2 * cost.L * cost.kvHeads * ctx * cost.hd * 4;
    const bytes = cost.decodeWeightBytes + kvBytes;
    const boundMs = opt.triad ? (bytes / (opt.triad * 1e9)) * 1e3 : null;
    emit({ bench: "models.decode", ...base, shape: [1, 1], context: [P, P + steps], ms: round(r.median, 3), best_ms: round(r.best, 3), mean_ms: round(r.mean, 3), reps: r.reps, tokens_per_s: round(1e3 / r.median, 2), bytes_per_token: bytes, gbps: round(bytes / r.median / 1e6, 2), bound_ms: round(boundMs, 3), frac_bandwidth_bound: boundMs ? round(boundMs / r.median, 3) : null, triad_gbps: opt.triad || null });

    // the same through the public API: generateText (prefill + steps, greedy, no early stop)
    progress(`${name} generateText`);
    const g = await timeit(() => model.generateText([Array.from(prompt)], { maxNewTokens: steps, eosTokenId: [] }), { warmup: 0, reps: 1 });
    emit({ bench: "models.generate", ...base, shape: [1, P], new_tokens: steps, ms: round(g.median, 1), ms_per_new_token: round(g.median / steps, 3), note: "includes the 128-token prefill" });
  }
  progressDone();
  await model.dispose();
  emit({ bench: "models.rss", ...base, shape: null, ms: null, note: "peak RSS of this model's process (mapped weights count once touched), prefill runs and their full logits included; the generation footprint against the target is bench/memory-model.mjs" });
}
