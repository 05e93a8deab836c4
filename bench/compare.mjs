/**
 * Ours and the available peers on the same random-weight models, in one run, with ratios.
 *
 *   node bench/compare.mjs [--threads 2] [--models gpt2-124m,llama-110m,llama-850m-bf16]
 *                          [--peers torch,ort,nlc,llama2c] [--steps 32] [--reps 5]
 *                          [--peers-dir /tmp/nnsight-peers]
 *
 * Peers (optional tools, never dependencies; a missing one prints a models.skip line with the reason):
 * - torch: Debian python3-torch, our own forward (bench/peers/torch_peer.py), run with
 *   GOMP_SPINCOUNT=0 OPENBLAS_CORETYPE=Cooperlake OPENBLAS_NUM_THREADS=<threads>;
 * - ort: onnxruntime-node from <peers-dir>/ort/node_modules (or $ORT_NODE_MODULES) on graphs exported
 *   by bench/peers/export_onnx.py (GPT-2);
 * - nlc: node-llama-cpp from <peers-dir>/nlc/node_modules (or $NLC_NODE_MODULES) on GGUF files written
 *   by bench/peers/export_gguf.py (Llama);
 * - llama2c: llama2.c's run.c is not in any package registry reachable here; skipped with the reason.
 *
 * For each model, ours runs first (bench/models.mjs in a child process), then each peer, one at a time.
 * Every line is re-printed as it comes; then one `compare.ratio` line per (model, bench, shape, peer):
 * speedup = peer_ms / ours_ms (> 1: ours is faster), rss_ratio = ours peak RSS / peer peak RSS.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";

import { CACHE_DIR, ROOT, emit, findPython, flags, loadAvg, measureLimits, progress, progressDone, round, runJsonLines } from "./lib.mjs";
import { MODELS, checkpointDir, ensureCheckpoint } from "./models.mjs";

const opt = flags({ threads: 2, models: Object.keys(MODELS).join(","), peers: "torch,ort,nlc,llama2c", steps: 32, reps: 5, peersDir: process.env.NNSIGHT_PEERS_DIR ?? "/tmp/nnsight-peers" });
const T = opt.threads;
const peers = new Set(String(opt.peers).split(",").filter(Boolean));

const lim = measureLimits(T);
emit({ bench: "compare.limits", shape: null, threads: T, ms: null, fma512_gflops: lim.fma512_gflops, fma256_gflops: lim.fma256_gflops, triad_gbps: lim.triad_gbps, loadavg: loadAvg() });

const pyTorch = peers.has("torch") ? findPython("torch") : null;
const ortModules = [process.env.ORT_NODE_MODULES, join(opt.peersDir, "ort/node_modules")].filter(Boolean).find((d) => existsSync(join(d, "onnxruntime-node/package.json")));
const nlcModules = [process.env.NLC_NODE_MODULES, join(opt.peersDir, "nlc/node_modules")].filter(Boolean).find((d) => existsSync(join(d, "node-llama-cpp/package.json")));
const torchEnv = { GOMP_SPINCOUNT: "0", OPENBLAS_CORETYPE: process.env.OPENBLAS_CORETYPE ?? "Cooperlake", OPENBLAS_NUM_THREADS: String(T), OMP_NUM_THREADS: String(T) };

const skip = (model, peer, reason) => emit({ bench: "models.skip", model, peer, reason });

/** Run a command that prints JSON lines; re-emit them (tagged with the model) and return them. */
function collect(model, label, cmd, args, env = {}) {
  progress(`${model}: ${label}`);
  const r = runJsonLines(cmd, args, { env });
  progressDone();
  const out = [];
  for (const l of r.lines) out.push(emit({ ...l, model: l.model ?? model, peer: l.peer ?? "nnsight" }));
  if (r.status !== 0 || r.error) skip(model, label, `exited ${r.status ?? r.signal}${r.error ? ` (${r.error.message})` : ""}: ${r.stderr.trim().split("\n").slice(-3).join(" | ")}`);
  return out;
}

for (const name of String(opt.models).split(",").filter(Boolean)) {
  const m = MODELS[name];
  if (!m) {
    skip(name, "all", `unknown model; known: ${Object.keys(MODELS).join(", ")}`);
    continue;
  }
  const dir = ensureCheckpoint(name);
  const results = [];
  results.push(...collect(name, "nnsight", process.execPath, [join(ROOT, "bench/models.mjs"), "--one", name, "--threads", String(T), "--steps", String(opt.steps), "--reps", String(opt.reps), "--fma", String(lim.fma_gflops), "--triad", String(lim.triad_gbps)]));

  if (peers.has("torch")) {
    if (!pyTorch.python) skip(name, "torch", pyTorch.reason);
    else {
      const args = [join(ROOT, "bench/peers/torch_peer.py"), dir, "--name", name, "--threads", String(T), "--prefill", m.prefill.map((s) => s.join("x")).join(","), "--steps", String(opt.steps), "--reps", String(opt.reps)];
      if (m.decode) args.push("--decode");
      results.push(...collect(name, "torch", pyTorch.python, args, torchEnv));
    }
  }

  if (peers.has("ort")) {
    if (checkpointDir(name) && MODELS[name].preset.startsWith("gpt2")) {
      if (!ortModules) skip(name, "onnxruntime-node", `not installed: mkdir -p ${opt.peersDir}/ort && cd ${opt.peersDir}/ort && npm init -y && ONNXRUNTIME_NODE_INSTALL=skip npm install onnxruntime-node@1.30.0`);
      else {
        const onnxDir = join(CACHE_DIR, `${m.preset}-onnx`);
        const py = findPython("torch");
        if (!existsSync(join(onnxDir, "decode.onnx")) && py.python) {
          progress(`${name}: exporting ONNX`);
          runJsonLines(py.python, [join(ROOT, "bench/peers/export_onnx.py"), dir, onnxDir]);
          progressDone();
        }
        results.push(...collect(name, "onnxruntime-node", process.execPath, [join(ROOT, "bench/peers/ort_peer.mjs"), "--onnx", onnxDir, "--modules", ortModules, "--name", name, "--threads", String(T), "--prefill", m.prefill.map((s) => s.join("x")).join(","), "--steps", String(opt.steps), "--reps", String(opt.reps)]));
      }
    } else skip(name, "onnxruntime-node", "the ONNX export covers GPT-2 only");
  }

  if (peers.has("nlc")) {
    if (m.preset.startsWith("llama")) {
      if (!nlcModules) skip(name, "node-llama-cpp", `not installed: mkdir -p ${opt.peersDir}/nlc && cd ${opt.peersDir}/nlc && npm init -y && npm install node-llama-cpp@3.22.1`);
      else {
        const gguf = `${dir}.gguf`;
        const py = findPython("torch");
        if (!existsSync(gguf) && py.python) {
          progress(`${name}: writing GGUF`);
          runJsonLines(py.python, [join(ROOT, "bench/peers/export_gguf.py"), dir, gguf]);
          progressDone();
        }
        results.push(...collect(name, "node-llama-cpp", process.execPath, [join(ROOT, "bench/peers/nlc_peer.mjs"), "--gguf", gguf, "--modules", nlcModules, "--name", name, "--threads", String(T), "--steps", String(opt.steps), "--reps", String(opt.reps), "--prefill", String(m.prefill.length > 0)]));
      }
    } else skip(name, "node-llama-cpp", "the GGUF export covers Llama only");
  }

  if (peers.has("llama2c")) skip(name, "llama2.c", "llama2.c (run.c) is not available from any package registry on this machine and fetching its source is not possible here");

  // ratios: ours vs each peer, same model, bench and shape
  const key = (l) => `${l.bench}|${JSON.stringify(l.shape)}`;
  const ours = new Map(results.filter((l) => l.peer === "nnsight" && (l.bench === "models.prefill" || l.bench === "models.decode")).map((l) => [key(l), l]));
  const oursRss = results.filter((l) => l.peer === "nnsight").reduce((a, l) => Math.max(a, l.peak_rss_mib ?? 0), 0);
  const peerRss = new Map();
  for (const l of results) if (l.peer !== "nnsight") peerRss.set(l.peer, Math.max(peerRss.get(l.peer) ?? 0, l.peak_rss_mib ?? 0));
  for (const l of results) {
    if (l.peer === "nnsight" || !(l.bench === "models.prefill" || l.bench === "models.decode")) continue;
    const o = ours.get(key(l));
    if (!o) continue;
    emit({ bench: "compare.ratio", model: name, what: l.bench.replace("models.", ""), shape: l.shape, threads: T, peer: l.peer, ours_ms: o.ms, peer_ms: l.ms, speedup: round(l.ms / o.ms, 3), speedup_best: o.best_ms && l.best_ms ? round(l.best_ms / o.best_ms, 3) : null, ours_peak_rss_mib: oursRss, peer_peak_rss_mib: peerRss.get(l.peer), rss_ratio: peerRss.get(l.peer) ? round(oursRss / peerRss.get(l.peer), 3) : null, ours_frac: o.frac_bandwidth_bound ?? o.frac_fma_peak ?? null, note: `speedup = peer_ms / ours_ms (>1: ours faster)${l.logits && l.logits !== o.logits ? `; peer computes ${l.logits} logits, ours ${o.logits}` : ""}`, loadavg: loadAvg() });
  }
}
