/**
 * Kernel benchmarks through the public Tensor API (so every number includes the addon's dispatch and
 * the executor round trip), with the machine limits measured in the same run:
 *
 * - fp32 GEMM 128×768 · 768×3072 (GPT-2 c_fc on a 128-token prompt) and 1024×768 · 768×3072 (8×128),
 *   as a fraction of the FMA peak at the same thread count; OpenBLAS sgemm (numpy) and torch on the
 *   same shapes in the same run, with the ratio ours / peer;
 * - matvec (M = 1) with f32 and bf16 weights far larger than the caches, in both weight layouts
 *   ("in_out" = [K, N] as GPT-2 Conv1D; "out_in" = nn.Linear [N, K] used through a transposed view),
 *   as a fraction of triad bandwidth (weight bytes / time);
 * - RMSNorm, softmax, RoPE and decode attention (one query token against a KV cache) as a fraction of
 *   the bandwidth bound for the bytes they must move (every input read once, every output written once).
 *
 *   node bench/kernels.mjs [--threads 2] [--filter gemm] [--no-peers] [--min-ms 500]
 *
 * Timing: every timed call queues the op and awaits `native.sync()` (completion), then disposes the
 * result; warm-ups first; ms = median, best_ms = fastest. The cost of that round trip alone (a one-element
 * op + sync) is reported as `kernels.overhead` and carried in each line as overhead_ms (not subtracted);
 * `kernels.idle_cpu` is the CPU the process uses once that loop stopped (waiting threads must sleep).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { randn, setNumThreads, tensor } from "../dist/index.js";
import { runCudaKernels } from "./cuda-kernels.mjs";
import { ROOT, addon, emit, findPython, flags, loadAvg, measureLimits, minorFaults, progress, round, runJsonLines, timeit } from "./lib.mjs";

const opt = flags({ threads: 2, filter: "", peers: true, noPeers: false, minMs: 1000 });
const native = addon();
const T = opt.threads;
setNumThreads(T);
const want = (name) => !opt.filter || name.includes(opt.filter);

function l3Bytes() {
  try {
    const s = readFileSync("/sys/devices/system/cpu/cpu0/cache/index3/size", "utf8").trim();
    const m = /^(\d+)([KMG]?)/.exec(s);
    return Number(m[1]) * { "": 1, K: 1024, M: 1 << 20, G: 1 << 30 }[m[2]];
  } catch {
    return 32 << 20;
  }
}
const L3 = l3Bytes();

const lim = measureLimits(T);
emit({ bench: "kernels.limits", shape: null, threads: T, ms: null, fma512_gflops: round(lim.fma512_gflops, 1), fma256_gflops: round(lim.fma256_gflops, 1), triad_gbps: round(lim.triad_gbps, 2), l3_bytes: L3, loadavg: loadAvg() });

/** Time `make()` (returns the result tensor) to completion. */
async function timeOp(make, { minMs = opt.minMs, reps = 10, warmup = 3 } = {}) {
  const f0 = minorFaults();
  let calls = 0;
  const r = await timeit(
    async () => {
      const y = make();
      await native.sync();
      y.dispose();
      calls++;
    },
    { warmup, reps, minMs },
  );
  return { ...r, faults_per_call: Math.round((minorFaults() - f0) / calls) };
}

// ---------------------------------------------------------------- run overhead
const one = tensor([1], { dtype: "float32" });
const ov = await timeOp(() => one.add(one), { minMs: 300, reps: 50 });
const syncOnly = await timeit(() => native.sync(), { warmup: 5, reps: 200 });
const overheadMs = ov.median;
emit({ bench: "kernels.overhead", what: "one-element add + await sync()", shape: [1], threads: T, ms: round(ov.median, 4), best_ms: round(ov.best, 4), reps: ov.reps, sync_only_ms: round(syncOnly.median, 4) });
// Idle: the executor and the pool's workers spin for a bounded, learned time after the last op, then
// sleep (native/src/core/spin.h). CPU this process used in a 200 ms window starting 20 ms after the loop
// above stopped, as a share of the window (~0 when nothing spins; 1 per spinning thread).
{
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  await sleep(20);
  const c0 = process.cpuUsage();
  const w0 = performance.now();
  await sleep(200);
  const c = process.cpuUsage(c0);
  const wall = performance.now() - w0;
  emit({ bench: "kernels.idle_cpu", what: "process CPU / wall, 20-220 ms after the last op", shape: null, threads: T, ms: null, window_ms: round(wall, 1), cpu_frac: round((c.user + c.system) / 1000 / wall, 4), loadavg: loadAvg() });
}

const results = {};

// ---------------------------------------------------------------- GEMM
const gemmShapes = [
  [128, 768, 3072],
  [1024, 768, 3072],
  [128, 768, 50257], // GPT-2's LM head on a 128-token prompt (the tied embedding, used transposed: out_in)
];
if (want("gemm")) {
  for (const [M, K, N] of gemmShapes) {
    for (const layout of ["in_out", "out_in"]) {
      progress(`gemm ${M}x${K}x${N} ${layout}`);
      const x = randn([M, K], { seed: 1 });
      const w = layout === "in_out" ? randn([K, N], { seed: 2 }) : randn([N, K], { seed: 2 });
      const wv = layout === "in_out" ? w : w.t();
      const r = await timeOp(() => x.linear(wv));
      const gflops = (2 * M * K * N) / r.median / 1e6;
      const line = emit({ bench: "kernels.gemm", peer: "nnsight", layout, shape: [M, K, N], dtype: "float32", threads: T, ms: round(r.median, 4), best_ms: round(r.best, 4), reps: r.reps, gflops: round(gflops, 2), best_gflops: round((2 * M * K * N) / r.best / 1e6, 2), frac_fma_peak: round(gflops / lim.fma_gflops, 3), fma_peak_gflops: round(lim.fma_gflops, 1), overhead_ms: round(overheadMs, 4) });
      results[`gemm:${M}x${K}x${N}:${layout}`] = line;
      if (wv !== w) wv.dispose();
      w.dispose();
      x.dispose();
    }
  }
}

// ---------------------------------------------------------------- matvec (decode linear layers)
const MV = [4096, 16384];
if (want("matvec")) {
  const [K, N] = MV;
  for (const dtype of ["float32", "bfloat16"]) {
    for (const layout of ["in_out", "out_in"]) {
      progress(`matvec ${K}x${N} ${dtype} ${layout}`);
      const w0 = layout === "in_out" ? randn([K, N], { seed: 3 }) : randn([N, K], { seed: 3 });
      const w = dtype === "float32" ? w0 : w0.to(dtype);
      if (w !== w0) w0.dispose();
      const wv = layout === "in_out" ? w : w.t();
      const x = randn([1, K], { seed: 4 });
      const r = await timeOp(() => x.linear(wv));
      const bytes = K * N * (dtype === "float32" ? 4 : 2) + K * 4 + N * 4;
      const gbps = bytes / r.median / 1e6;
      const line = emit({ bench: "kernels.matvec", peer: "nnsight", layout, shape: [1, K, N], dtype, threads: T, ms: round(r.median, 4), best_ms: round(r.best, 4), reps: r.reps, bytes, gbps: round(gbps, 2), frac_triad: round(gbps / lim.triad_gbps, 3), triad_gbps: round(lim.triad_gbps, 2), gflops: round((2 * K * N) / r.median / 1e6, 2), overhead_ms: round(overheadMs, 4) });
      results[`matvec:${dtype}:${layout}`] = line;
      if (wv !== w) wv.dispose();
      w.dispose();
      x.dispose();
    }
  }
}

// ---------------------------------------------------------------- bandwidth-bound ops
async function bwCase(name, shape, bytes, make, extra = {}) {
  progress(`${name} ${JSON.stringify(shape)}`);
  const r = await timeOp(make);
  const gbps = bytes / r.median / 1e6;
  return emit({ bench: `kernels.${name}`, peer: "nnsight", shape, dtype: "float32", threads: T, ms: round(r.median, 4), best_ms: round(r.best, 4), reps: r.reps, bytes, gbps: round(gbps, 2), frac_triad: round(gbps / lim.triad_gbps, 3), triad_gbps: round(lim.triad_gbps, 2), exceeds_l3: bytes > L3, minor_faults_per_call: r.faults_per_call, overhead_ms: round(overheadMs, 4), ...extra });
}

if (want("rmsnorm")) {
  for (const [R, D] of [[4096, 4096], [128, 768]]) {
    const x = randn([R, D], { seed: 5 });
    const w = randn([D], { seed: 6 });
    await bwCase("rmsnorm", [R, D], 2 * R * D * 4 + D * 4, () => x.rmsnormW(w, 1e-5));
    x.dispose();
    w.dispose();
  }
}
if (want("softmax")) {
  for (const [R, C] of [[32768, 1024], [8 * 12 * 128, 128]]) {
    const x = randn([R, C], { seed: 7 });
    await bwCase("softmax", [R, C], 2 * R * C * 4, () => x.softmax(-1));
    x.dispose();
  }
}
if (want("rope")) {
  for (const [B, S, H, D] of [[16, 512, 32, 64], [1, 128, 12, 64]]) {
    const x = randn([B, S, H, D], { seed: 8 });
    const pos = tensor(Int32Array.from({ length: B * S }, (_, i) => i % S), { dtype: "int32", shape: [B, S] });
    const inv = tensor(Float32Array.from({ length: D / 2 }, (_, i) => Math.pow(10000, (-2 * i) / D)), { dtype: "float32" });
    const n = B * S * H * D;
    await bwCase("rope", [B, S, H, D], 2 * n * 4 + B * S * 4, () => x.rope(pos, inv, false));
    x.dispose();
    pos.dispose();
    inv.dispose();
  }
}
if (want("attention")) {
  // one new query token against a filled KV cache (views of [B, Hkv, maxLen, D] buffers, as generation uses)
  const cases = [
    { name: "llama-850m-like", B: 1, H: 32, Hkv: 4, D: 64, Tk: 1024 },
    { name: "gpt2-like", B: 1, H: 12, Hkv: 12, D: 64, Tk: 1024 },
    { name: "dram-sized", B: 8, H: 12, Hkv: 12, D: 64, Tk: 2048 },
  ];
  for (const c of cases) {
    const maxLen = c.Tk + 64;
    const kBuf = randn([c.B, c.Hkv, maxLen, c.D], { seed: 9 });
    const vBuf = randn([c.B, c.Hkv, maxLen, c.D], { seed: 10 });
    const k = kBuf.slice(2, 0, c.Tk);
    const v = vBuf.slice(2, 0, c.Tk);
    const q = randn([c.B, c.H, 1, c.D], { seed: 11 });
    const bytes = 2 * c.B * c.Hkv * c.Tk * c.D * 4 + 2 * c.B * c.H * c.D * 4;
    await bwCase("attention_decode", [c.B, c.H, c.Hkv, 1, c.Tk, c.D], bytes, () => q.attention(k, v, null, 1 / Math.sqrt(c.D)), { case: c.name, shape_note: "[B, Hq, Hkv, Tq, Tk, D]" });
    for (const t of [k, v, kBuf, vBuf, q]) t.dispose();
  }
}

// ---------------------------------------------------------------- peers: OpenBLAS sgemm (numpy), torch
const runPeers = opt.peers && !opt.noPeers && (want("gemm") || want("matvec"));
if (runPeers) {
  const py = findPython("numpy");
  if (!py.python) {
    emit({ bench: "kernels.skip", peer: "numpy-openblas", reason: py.reason });
  } else {
    progress("peers: numpy / torch");
    const args = [join(ROOT, "bench/peers/numpy_kernels.py"), "--threads", String(T), "--gemm", want("gemm") ? gemmShapes.map((s) => s.join("x")).join(",") : "", "--matvec", want("matvec") ? MV.join("x") : ""];
    const env = { OPENBLAS_CORETYPE: process.env.OPENBLAS_CORETYPE ?? "Cooperlake", OPENBLAS_NUM_THREADS: String(T), OMP_NUM_THREADS: String(T), GOMP_SPINCOUNT: "0" };
    const r = runJsonLines(py.python, args, { env });
    if (r.status !== 0) emit({ bench: "kernels.skip", peer: "numpy-openblas", reason: `peer exited ${r.status ?? r.signal}: ${r.stderr.trim().split("\n").slice(-3).join(" | ")}` });
    for (const p of r.lines) {
      const extra = {};
      if (p.bench === "kernels.gemm" && p.gflops) extra.frac_fma_peak = round(p.gflops / lim.fma_gflops, 3);
      if (p.bench === "kernels.matvec" && p.gbps) extra.frac_triad = round(p.gbps / lim.triad_gbps, 3);
      const line = emit({ ...p, ...extra, command: `${Object.entries(env).map(([k, v]) => `${k}=${v}`).join(" ")} ${py.python} bench/peers/numpy_kernels.py ${args.slice(1).join(" ")}`, peak_rss_mib: p.peak_rss_mib });
      if (line.bench === "kernels.gemm" && line.gflops) {
        for (const layout of ["in_out", "out_in"]) {
          const ours = results[`gemm:${line.shape.join("x")}:${layout}`];
          if (ours) emit({ bench: "kernels.ratio", what: `gemm ${line.shape.join("x")} f32 (${layout})`, peer: line.peer, threads: T, shape: line.shape, ours_gflops: ours.gflops, peer_gflops: line.gflops, peer_frac_fma_peak: round(line.gflops / lim.fma_gflops, 3), ratio: round(ours.gflops / line.gflops, 3), ratio_best: round(line.best_ms / ours.best_ms, 3), ms: ours.ms, peer_ms: line.ms, note: "ratio = ours / peer throughput from medians, ratio_best from the fastest runs (>1: ours faster); peers run after ours in the same process tree" });
        }
      }
      if (line.bench === "kernels.matvec" && line.gbps) {
        const ours = results[`matvec:${line.dtype}:${line.layout}`];
        if (ours) emit({ bench: "kernels.ratio", what: `matvec ${line.shape.join("x")} ${line.dtype} (${line.layout})`, peer: line.peer, threads: T, shape: line.shape, ours_gbps: ours.gbps, peer_gbps: line.gbps, peer_frac_triad: round(line.gbps / lim.triad_gbps, 3), ratio: round(ours.gbps / line.gbps, 3), ratio_best: round(line.best_ms / ours.best_ms, 3), ms: ours.ms, peer_ms: line.ms, note: "ratio = ours / peer throughput from medians, ratio_best from the fastest runs (>1: ours faster); peers run after ours in the same process tree" });
      }
    }
  }
}

// ---------------------------------------------------------------- CUDA (build/nx_cuda_bench; one kernels.cuda.skip line without a GPU)
runCudaKernels(opt.filter);
one.dispose();
