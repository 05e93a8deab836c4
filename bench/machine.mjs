/**
 * Machine limits through the addon's probes, at 1 and 2 threads (or --threads list):
 * FP32 FMA peak with AVX-512 and with AVX2 (GFLOP/s), and triad bandwidth (GB/s, STREAM counting).
 *
 *   node bench/machine.mjs [--threads 1,2] [--triad-mib 256]
 *
 * One JSON line per (probe, threads).
 */
import { addon, emit, flags, loadAvg, progress, round } from "./lib.mjs";
import { cpus } from "node:os";

const opt = flags({ threads: "1,2", triadMib: 256 });
const native = addon();
const threads = String(opt.threads).split(",").map(Number);
const cpu = cpus()[0]?.model ?? "unknown";

for (const t of threads) {
  for (const isa of [512, 256]) {
    progress(`FMA peak, ${isa === 512 ? "AVX-512" : "AVX2"}, ${t} thread(s)`);
    const g = native.probeFmaPeak(t, isa);
    emit({ bench: "machine.fma_peak", isa: isa === 512 ? "avx512" : "avx2", shape: null, threads: t, ms: null, gflops: round(g, 1), gflops_per_thread: round(g / t, 1), cpu, loadavg: loadAvg() });
  }
  progress(`triad, ${t} thread(s)`);
  const bytes = opt.triadMib * 1024 * 1024;
  const gbps = native.probeTriad(t, bytes);
  emit({ bench: "machine.triad", shape: [3, bytes / 4], threads: t, ms: round((3 * bytes) / (gbps * 1e9) * 1e3, 2), gbps: round(gbps, 2), bytes_per_array: bytes, note: "2 reads + 1 write counted; write-allocate not counted", cpu, loadavg: loadAvg() });
}
