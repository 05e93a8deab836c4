/**
 * Peak RSS of generation against the target: peak RSS ≤ (weights + KV cache) × 1.15.
 *
 * Per model, in a process of its own (so the peak is that workload's only):
 *
 * - `memory.generate`: load, then generateText on a 128-token prompt for --new-tokens greedy tokens
 *   (no early stop), --reps times. Reports the peak RSS (VmHWM) over the whole process (load included),
 *   the weight bytes (as held in memory: mapped, or converted copies), the KV-cache bytes generation
 *   allocates (f32, prompt + new tokens), `ratio` = peak / (weights + KV) and `within_target`; the load
 *   peak; where the memory is at the end (RssAnon / RssFile from /proc/self/status, the weights file's
 *   resident pages from /proc/self/smaps, the native allocator's live and cached bytes, the V8 heap,
 *   and the RSS of a bare Node before anything is imported, with `ratio_above_bare_node` = (peak - that
 *   baseline) / (weights + KV)); and the time to the first token (prefill)
 *   and per decoded token (medians; the first rep faults the weights in and is excluded when reps > 1).
 * - `memory.prefill`: a plain forward over B×128 tokens returning the full logits [B, 128, V] (what
 *   `model.forward` returns), in another process: its logits alone are B×128×V×4 bytes, so this peak is
 *   reported apart from the generation footprint.
 *
 *   node bench/memory-model.mjs [--models gpt2-124m,llama-110m,llama-850m-bf16,llama-850m-f32]
 *                               [--threads 2] [--prompt 128] [--new-tokens 32] [--reps 3] [--prefill-batch 8]
 *
 * `llama-850m-f32` is the bf16 checkpoint loaded with `dtype: "float32"` (the comparison: PyTorch
 * needed 3.9 GB for the 850M model in fp32); its weights are converted copies, not mapped pages.
 * Checkpoints come from bench/models.mjs's cache (.bench-cache/, written once by scripts/make-checkpoint.ts).
 */
import { performance } from "node:perf_hooks";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { basename, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { ROOT, emit, flags, loadAvg, progress, progressDone, round, summarize } from "./lib.mjs";
import { checkpointDir, ensureCheckpoint } from "./models.mjs";

const TARGET = 1.15;
/** model name -> checkpoint (a bench/models.mjs entry) and the dtype to load it in (default: as stored) */
const MEM_MODELS = {
  "gpt2-124m": { checkpoint: "gpt2-124m" },
  "llama-110m": { checkpoint: "llama-110m" },
  "llama-850m-bf16": { checkpoint: "llama-850m-bf16" },
  "llama-850m-f32": { checkpoint: "llama-850m-bf16", dtype: "float32" },
};

const opt = flags({ models: "gpt2-124m,llama-110m,llama-850m-bf16,llama-850m-f32", threads: 2, prompt: 128, newTokens: 32, reps: 3, prefillBatch: 8, child: "", mode: "" });
const MIB = 1 << 20;

/** /proc/self/status fields in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem). */
function status() {
  const s = readFileSync("/proc/self/status", "utf8");
  const kb = (k) => Number(/\s(\d+) kB/.exec(s.slice(s.indexOf(`${k}:`)))?.[1] ?? NaN) * 1024;
  return { rss: kb("VmRSS"), hwm: kb("VmHWM"), anon: kb("RssAnon"), file: kb("RssFile"), shmem: kb("RssShmem") };
}
/** Resident bytes of the mappings of files named `name` (/proc/self/smaps). */
function residentOf(name) {
  let total = 0, inside = false;
  for (const line of readFileSync("/proc/self/smaps", "utf8").split("\n")) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$/.exec(line);
    if (head) inside = basename(head[1] ?? "") === name;
    else if (inside && line.startsWith("Rss:")) total += Number(/(\d+)/.exec(line)[1]) * 1024;
  }
  return total;
}
const mib = (b) => round(b / MIB, 1);

if (opt.child) {
  await runChild(opt.child, opt.mode);
} else if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  for (const name of String(opt.models).split(",").filter(Boolean)) {
    const m = MEM_MODELS[name];
    if (!m) {
      emit({ bench: "memory.skip", model: name, reason: `unknown model; known: ${Object.keys(MEM_MODELS).join(", ")}` });
      continue;
    }
    ensureCheckpoint(m.checkpoint);
    for (const mode of ["generate", "prefill"]) {
      if (mode === "prefill" && !(opt.prefillBatch > 0)) continue;
      const args = [process.argv[1], "--child", name, "--mode", mode, "--threads", String(opt.threads), "--prompt", String(opt.prompt), "--new-tokens", String(opt.newTokens), "--reps", String(opt.reps), "--prefill-batch", String(opt.prefillBatch)];
      const r = spawnSync(process.execPath, args, { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"] });
      if (r.status !== 0) emit({ bench: "memory.error", model: name, mode, reason: `child exited ${r.status ?? r.signal}` });
    }
  }
}

async function runChild(name, mode) {
  const m = MEM_MODELS[name];
  const bare = status(); // Node alone: nothing of ours imported yet
  const { LanguageModel, memory, sync } = await import("../dist/index.js");
  const T = opt.threads, P = opt.prompt, N = opt.newTokens;
  progress(`loading ${name}`);
  const t0 = performance.now();
  const model = await LanguageModel.load(checkpointDir(m.checkpoint), { threads: T, ...(m.dtype ? { dtype: m.dtype } : {}) });
  await sync(); // conversions (if any) are queued: the load ends when they ran
  const loadMs = performance.now() - t0;
  const loaded = status();
  progressDone();
  const c = model.spec;
  let weightBytes = 0, dtype = null;
  for (const t of model._lm.weights.values()) {
    weightBytes += t.numel * { float32: 4, bfloat16: 2, float16: 2 }[t.dtype];
    if (t.ndim === 2) dtype = t.dtype;
  }
  const vocab = c.vocabSize;
  const ids = (B, seed) => Array.from({ length: B }, (_, b) => Array.from({ length: P }, (_, t) => 3 + ((seed * 7919 + b * 104729 + t * 7927) % Math.min(vocab - 3, 5000))));
  const base = { model: name, preset: model.spec.modelType, weights_dtype: dtype, threads: T, weight_bytes: weightBytes, loadavg: loadAvg() };
  const where = () => {
    const s = status(), nm = memory(), mu = process.memoryUsage();
    return {
      rss_anon_mib: mib(s.anon), rss_file_mib: mib(s.file), weights_file_resident_mib: mib(residentOf("model.safetensors")),
      native_live_mib: mib(nm.hostBytes), native_cached_mib: mib(nm.cachedBytes), v8_heap_mib: mib(mu.heapTotal), node_bare_rss_mib: mib(bare.rss),
    };
  };

  if (mode === "generate") {
    const kvBytes = c.numLayers * 2 * 1 * c.numKvHeads * (P + Math.max(N, 1)) * c.headDim * 4; // generateTokens: newCache(B, prompt + maxNew), f32
    const prompt = ids(1, 2);
    const prefill = [], decode = [], total = [];
    for (let rep = 0; rep < opt.reps; rep++) {
      progress(`${name} generate ${rep + 1}/${opt.reps}`);
      const stamps = [];
      const a = performance.now();
      await model.generateText(prompt, { maxNewTokens: N, eosTokenId: [], stream: () => stamps.push(performance.now()) });
      const b = performance.now();
      if (opt.reps > 1 && rep === 0) continue; // cold: the first pass faults the weights in
      prefill.push(stamps[0] - a);
      for (let i = 1; i < stamps.length; i++) decode.push(stamps[i] - stamps[i - 1]);
      total.push(b - a);
    }
    progressDone();
    const end = status();
    const peak = end.hwm;
    const pf = summarize(prefill), dc = decode.length ? summarize(decode) : null, tt = summarize(total);
    emit({
      bench: "memory.generate", ...base, shape: [1, P], new_tokens: N, reps: opt.reps,
      ms: round(tt.median, 1), best_ms: round(tt.best, 1),
      prefill_ms: round(pf.median, 1), decode_ms_per_token: dc ? round(dc.median, 3) : null,
      kv_cache_bytes: kvBytes, peak_rss_mib: mib(peak), weights_plus_kv_mib: mib(weightBytes + kvBytes),
      ratio: round(peak / (weightBytes + kvBytes), 3), target_ratio: TARGET, within_target: peak <= TARGET * (weightBytes + kvBytes),
      over_target_mib: mib(Math.max(0, peak - TARGET * (weightBytes + kvBytes))),
      // the same ratio without what a bare Node process holds before anything is imported (its binary,
      // V8's initial heap): for a small model that baseline alone is most of the 15 % allowance
      ratio_above_bare_node: round((peak - bare.rss) / (weightBytes + kvBytes), 3),
      load_ms: round(loadMs, 1), load_peak_rss_mib: mib(loaded.hwm), rss_after_load_mib: mib(loaded.rss),
      ...where(),
    });
  } else {
    const B = opt.prefillBatch;
    const input = ids(B, 1);
    const times = [];
    for (let rep = 0; rep <= opt.reps; rep++) {
      progress(`${name} prefill ${B}x${P} ${rep}/${opt.reps}`);
      const a = performance.now();
      const logits = await model.forward(input);
      if (rep > 0) times.push(performance.now() - a); // rep 0 warms up (faults the weights in)
      logits.dispose();
    }
    progressDone();
    const r = summarize(times);
    const logitsBytes = B * P * vocab * 4;
    const peak = status().hwm;
    emit({
      bench: "memory.prefill", ...base, shape: [B, P], reps: r.reps, ms: round(r.median, 1), best_ms: round(r.best, 1),
      logits: "full [B, T, V]", logits_bytes: logitsBytes, peak_rss_mib: mib(peak),
      ratio: round(peak / weightBytes, 3), ratio_without_logits: round((peak - logitsBytes) / weightBytes, 3),
      ...where(),
    });
  }
  await model.dispose();
}
