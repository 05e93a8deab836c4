/**
 * CUDA kernel benchmarks: runs build/nx_cuda_bench (bench/cuda/cuda_bench.cpp, built only in CUDA builds)
 * and re-emits its JSON lines (one per kernel family: elementwise, reductions, softmax, norms, RoPE,
 * attention, indexing, top-k, GEMM / matvec through cuBLAS and the fallback kernel). Without a CUDA
 * build or a usable GPU it prints one `kernels.cuda.skip` line with the reason.
 *
 *   node bench/cuda-kernels.mjs [--filter rmsnorm]       (also run at the end of bench/kernels.mjs)
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

import { ROOT, addon, emit, flags, runJsonLines } from "./lib.mjs";

export function runCudaKernels(filter = "") {
  const bin = join(ROOT, "build/nx_cuda_bench");
  const command = `build/nx_cuda_bench${filter ? ` ${filter}` : ""}`;
  if (!existsSync(bin)) {
    const compiled = addon().cudaCompiled;
    emit({ bench: "kernels.cuda.skip", shape: null, threads: null, ms: null, command, reason: compiled ? `${bin} is missing: rebuild (npm run build:native)` : "the addon was built without CUDA (no CUDA toolkit at build time)" });
    return;
  }
  const r = runJsonLines(bin, filter ? [filter] : []);
  for (const line of r.lines) emit({ ...line, command, peak_rss_mib: null });
  if (r.status !== 0) emit({ bench: "kernels.cuda.skip", shape: null, threads: null, ms: null, command, reason: `nx_cuda_bench exited ${r.status ?? r.signal}: ${r.stderr.trim().split("\n").slice(-3).join(" | ")}` });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const opt = flags({ filter: "" });
  runCudaKernels(opt.filter);
}
