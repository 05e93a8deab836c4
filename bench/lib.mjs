/**
 * Shared helpers for the JS benchmarks in bench/: one JSON line per result on stdout, progress on
 * stderr only when stderr is a TTY, timing (warm-ups, then median and best of N), peak RSS, and the
 * machine limits (FP32 FMA peak, triad bandwidth) measured through the addon's probes in the same run.
 *
 * Every result line carries: bench, command, shape, threads, ms (median), best_ms, reps, a rate
 * (gflops or gbps) and, where a limit applies, the fraction of that limit (frac_*), plus peak_rss_mib.
 */
import { performance } from "node:perf_hooks";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
export const CACHE_DIR = process.env.NNSIGHT_BENCH_CACHE ?? join(ROOT, ".bench-cache");

/**
 * The addon. The library loads it in ts/src/native/binding.ts; the benchmarks need the probes and the
 * executor's sync, which the public API does not expose, so they load the same file. Node caches
 * native modules by resolved path, so this is the very instance dist/index.js uses (same executor).
 */
export function addon() {
  const candidates = [process.env.NNSIGHT_ADDON, join(ROOT, "build/Release/nnsight_native.node"), join(ROOT, "build-gyp/Release/nnsight_native.node")].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`the native addon is not built (looked in ${candidates.join(", ")}); run npm run build:native`);
  return createRequire(import.meta.url)(found);
}

/**
 * Print the executor's per-op profile (see native/src/core/executor.h) as JSON lines on stderr and
 * clear it: one `profile` line per label (op name + shape class) with calls, total ms, ms per call and
 * the fraction of the total, heaviest first, then one `profile.total` line. `tag` fields are added to
 * every line. The profile covers the work since the last reset (profiling must be on: NX_PROFILE=1 or
 * addon().setProfiling(true)).
 */
export function dumpProfile(native, tag = {}) {
  const rows = native.profile(true);
  const busy = rows.filter((r) => r.label !== "(idle)").reduce((s, r) => s + r.ms, 0);
  for (const r of rows) {
    const [op, ...rest] = r.label.split(" ");
    process.stderr.write(JSON.stringify({ bench: "profile", ...tag, op, shape_class: rest.join(" ") || null, calls: r.calls, ms: round(r.ms, 3), ms_per_call: round(r.ms / r.calls, 4), max_ms: round(r.maxMs, 3), frac_busy: r.label === "(idle)" ? null : round(r.ms / busy, 4) }) + "\n");
  }
  process.stderr.write(JSON.stringify({ bench: "profile.total", ...tag, busy_ms: round(busy, 3), idle_ms: round(rows.find((r) => r.label === "(idle)")?.ms ?? 0, 3) }) + "\n");
  return rows;
}

/** The command line that produced a result, relative to the repo root. */
export function commandLine() {
  const [, script, ...args] = process.argv;
  return ["node", relative(ROOT, script), ...args].join(" ");
}

export const isTTY = !!process.stderr.isTTY;
/** Progress for humans: stderr, and only on a TTY. */
export function progress(msg) {
  if (isTTY) process.stderr.write(`\r\x1b[K${msg}`);
}
export function progressDone() {
  if (isTTY) process.stderr.write("\r\x1b[K");
}

export function peakRssMiB() {
  return +(process.resourceUsage().maxRSS / 1024).toFixed(1);
}

/** Print one result line (adds command and peak_rss_mib). */
export function emit(obj) {
  progressDone();
  const line = { ...obj, command: obj.command ?? commandLine(), peak_rss_mib: obj.peak_rss_mib ?? peakRssMiB() };
  process.stdout.write(JSON.stringify(line) + "\n");
  return line;
}

export const round = (x, d = 3) => (x === null || x === undefined || !Number.isFinite(x) ? x : +x.toFixed(d));

/**
 * Time an async function: `warmup` untimed calls, then `reps` timed ones (at least `minMs` in total
 * when given). Returns { median, best, mean, reps } in ms.
 */
export async function timeit(fn, { warmup = 2, reps = 10, minMs = 0, maxReps = 1000 } = {}) {
  for (let i = 0; i < warmup; i++) await fn(i);
  const ts = [];
  const t0 = performance.now();
  while (ts.length < reps || (performance.now() - t0 < minMs && ts.length < maxReps)) {
    const a = performance.now();
    await fn(ts.length);
    ts.push(performance.now() - a);
  }
  return summarize(ts);
}

export function summarize(ts) {
  const s = [...ts].sort((x, y) => x - y);
  const median = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  return { median, best: s[0], mean: ts.reduce((a, b) => a + b, 0) / ts.length, reps: ts.length };
}

/** Command-line flags: --name value / --name=value / --flag. */
export function flags(defaults) {
  const out = { ...defaults };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) continue;
    const eq = a.indexOf("=");
    const key = (eq > 0 ? a.slice(2, eq) : a.slice(2)).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    let val = eq > 0 ? a.slice(eq + 1) : undefined;
    if (val === undefined) {
      const next = argv[i + 1];
      if (typeof defaults[key] === "boolean") val = next === "true" || next === "false" ? argv[++i] : "true";
      else if (next === undefined || next.startsWith("--")) val = "true";
      else val = argv[++i];
    }
    const d = defaults[key];
    out[key] = typeof d === "number" ? Number(val) : typeof d === "boolean" ? val !== "false" : val;
  }
  return out;
}

/**
 * Machine limits through the addon's probes: FP32 FMA peak (GFLOP/s) with AVX-512 and AVX2, and triad
 * bandwidth (GB/s, STREAM counting: 2 reads + 1 write, write-allocate not counted) with arrays far
 * larger than the caches. Runs bench/machine.mjs in a child process, so the probe's arrays do not count
 * in this process's peak RSS.
 */
export function measureLimits(threads, { triadMib = 256 } = {}) {
  progress(`probing FMA peak and triad at ${threads} thread(s)`);
  const r = runJsonLines(process.execPath, [join(ROOT, "bench/machine.mjs"), "--threads", String(threads), "--triad-mib", String(triadMib)]);
  progressDone();
  const fma512 = r.lines.find((l) => l.bench === "machine.fma_peak" && l.isa === "avx512")?.gflops ?? NaN;
  const fma256 = r.lines.find((l) => l.bench === "machine.fma_peak" && l.isa === "avx2")?.gflops ?? NaN;
  const triad = r.lines.find((l) => l.bench === "machine.triad")?.gbps ?? NaN;
  if (!Number.isFinite(triad)) throw new Error(`bench/machine.mjs failed: ${r.stderr}`);
  return { threads, fma512_gflops: fma512, fma256_gflops: fma256, fma_gflops: Math.max(fma512, fma256), triad_gbps: triad };
}

/** Minor page faults so far (first touches of fresh memory). */
export function minorFaults() {
  return process.resourceUsage().minorPageFault;
}

/** One line summarizing the load on the machine (other jobs skew every number). */
export function loadAvg() {
  try {
    return readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number);
  } catch {
    return null;
  }
}

/** /usr/bin/python3 when it has the module, else null (with the reason). */
export function findPython(mod = "numpy") {
  for (const py of [process.env.BENCH_PYTHON, "/usr/bin/python3"].filter(Boolean)) {
    if (!existsSync(py)) continue;
    const r = spawnSync(py, ["-c", `import ${mod}`], { encoding: "utf8" });
    if (r.status === 0) return { python: py };
  }
  return { python: null, reason: `no python with ${mod} (install: apt-get install -y python3-numpy libopenblas0-pthread python3-threadpoolctl python3-torch)` };
}

/** Run a peer script that prints JSON lines; returns the parsed lines (non-JSON lines are ignored). */
export function runJsonLines(cmd, args, { env = {}, timeoutMs = 30 * 60 * 1000, cwd = ROOT } = {}) {
  const r = spawnSync(cmd, args, { cwd, env: { ...process.env, ...env }, encoding: "utf8", timeout: timeoutMs, maxBuffer: 64 << 20 });
  const lines = [];
  for (const l of (r.stdout ?? "").split("\n")) {
    const t = l.trim();
    if (!t.startsWith("{")) continue;
    try {
      lines.push(JSON.parse(t));
    } catch {
      /* not a result line */
    }
  }
  return { status: r.status, signal: r.signal, stderr: r.stderr ?? "", lines, error: r.error };
}
