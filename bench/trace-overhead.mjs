/**
 * What tracing costs, side by side in one run (variants interleaved A B A B ..., so drift and other
 * load hit them alike; the extra cost is the median of the per-pair differences):
 *
 * 1. the bundled model (stories260K), a short prompt: plain `model.forward` vs an empty
 *    `model.trace(input, () => {})` (target: ≤ 0.1 ms extra);
 * 2. GPT-2 124M (random weights), 1×128 prefill: plain forward vs a trace that saves every decoder
 *    layer's output (target: ≤ 3 % extra);
 * 3. 100 interventions in one trace on the bundled model (each sets one position of a leaf module's
 *    output to 0, `env.output.set([":", -1], 0)`, modules in execution order): the trace vs the plain
 *    forward plus the same 100 edits run as plain tensor ops on tensors of the same shapes
 *    (target: ≤ 2 ms beyond their compute).
 *
 *   node bench/trace-overhead.mjs [--threads 2] [--pairs 200] [--gpt2-pairs 10] [--source-lines lazy|eager|off]
 *
 * Each line also reports the CPU-time difference (process.cpuUsage, all threads): other load on the
 * machine inflates wall time but hardly CPU time, so it is the steadier estimate on a busy machine.
 *
 * Every variant waits for completion exactly once: `model.forward` and `model.trace` both resolve after
 * one executor sync (a trace has computed everything when it resolves), and the plain-ops baseline of
 * part 3 queues its edits before the forward so the forward's sync covers them. Returned tensors are
 * disposed. (An extra `await sync()` costs an event-loop round trip of 25-50 µs even on an idle queue,
 * so a second one in only one variant would bias the comparison.)
 */
import { performance } from "node:perf_hooks";
import { LanguageModel, setNumThreads, zeros } from "../dist/index.js";
import { emit, flags, loadAvg, progress, progressDone, round, summarize } from "./lib.mjs";
import { ensureCheckpoint } from "./models.mjs";

const opt = flags({ threads: 2, pairs: 200, gpt2Pairs: 10, interventions: 100, sourceLines: "lazy" });
// TraceOptions.sourceLines of the traces: "lazy" (the default, true), "eager" or "off" (false)
const sourceLines = { lazy: true, eager: "eager", off: false }[opt.sourceLines];
if (sourceLines === undefined) throw new Error(`--source-lines must be lazy, eager or off, not ${opt.sourceLines}`);
setNumThreads(opt.threads);

const disposeAll = (v) => {
  if (!v || typeof v !== "object") return;
  if (typeof v.dispose === "function" && Array.isArray(v.shape)) return void v.dispose();
  for (const x of Array.isArray(v) ? v : Object.values(v)) disposeAll(x);
};

/** Run the variants interleaved; returns per-variant summaries and per-pair differences vs variant 0. */
async function interleaved(variants, pairs, warmup = 3, label = "") {
  for (let w = 0; w < warmup; w++) for (const v of variants) await v.fn();
  const times = variants.map(() => []);
  const cpu = variants.map(() => []);
  for (let i = 0; i < pairs; i++) {
    if (i % 10 === 0) progress(`${label} ${i}/${pairs}`);
    // alternate the order so neither variant always runs first
    const order = i % 2 ? [...variants.keys()].reverse() : [...variants.keys()];
    for (const k of order) {
      const c = process.cpuUsage();
      const a = performance.now();
      await variants[k].fn();
      times[k].push(performance.now() - a);
      const d = process.cpuUsage(c);
      cpu[k].push((d.user + d.system) / 1e3);
    }
  }
  progressDone();
  // CPU time (all threads of this process) is far less sensitive to other load on the machine than wall time
  return variants.map((v, k) => ({ name: v.name, ...summarize(times[k]), cpu: summarize(cpu[k]), diff: k === 0 ? null : summarize(times[k].map((t, i) => t - times[0][i])), cpuDiff: k === 0 ? null : summarize(cpu[k].map((t, i) => t - cpu[0][i])) }));
}

// ---------------------------------------------------------------- 1. empty trace, bundled model
{
  const model = await LanguageModel.load("stories260K", { threads: opt.threads });
  const input = "Once upon a time there was a little girl";
  const ids = model.toRows(input)[0].ids;
  const res = await interleaved(
    [
      { name: "forward", fn: async () => (await model.forward([ids])).dispose() },
      { name: "empty_trace", fn: async () => { await model.trace([ids], () => {}); } },
    ],
    opt.pairs,
    5,
    "empty trace",
  );
  const [f, t] = res;
  emit({ bench: "trace.empty", model: "stories260K", shape: [1, ids.length], threads: opt.threads, ms: round(t.median, 4), best_ms: round(t.best, 4), forward_ms: round(f.median, 4), forward_best_ms: round(f.best, 4), extra_ms: round(t.diff.median, 4), extra_cpu_ms: round(t.cpuDiff.median, 4), forward_cpu_ms: round(f.cpu.median, 4), target_extra_ms: 0.1, within_target: t.diff.median <= 0.1, pairs: opt.pairs, loadavg: loadAvg() });

  // ---------------------------------------------------------------- 3. 100 interventions, bundled model
  const N = opt.interventions;
  const leaves = model.modules().filter((e) => e.children().length === 0);
  // spread N edits over the leaves in execution order (pre-order of leaves); a leaf may get several
  const plan = Array.from({ length: N }, (_, i) => leaves[Math.floor((i * leaves.length) / N)]);
  // shapes of those outputs, to run the same edits as plain tensor ops
  const shapes = await model.trace([ids], () => leaves.map((e) => e.output.save()));
  const shapeOf = new Map(leaves.map((e, i) => [e, [...shapes[i].shape]]));
  disposeAll(shapes);
  const targets = plan.map((e) => zeros(shapeOf.get(e)));
  const withEdits = async () => {
    await model.trace([ids], () => {
      for (const e of plan) e.output.set([":", -1], 0);
    }, { sourceLines });
  };
  // the same edits as plain tensor ops, queued before the forward so that its one sync covers them
  const fwdPlusEdits = async () => {
    for (const t of targets) t.set([":", -1], 0);
    (await model.forward([ids])).dispose();
  };
  const fwd = async () => (await model.forward([ids])).dispose();
  const res3 = await interleaved(
    [
      { name: "forward", fn: fwd },
      { name: "forward_plus_edits_as_tensor_ops", fn: fwdPlusEdits },
      { name: "trace_with_edits", fn: withEdits },
      { name: "empty_trace", fn: async () => { await model.trace([ids], () => {}); } },
    ],
    Math.max(20, Math.floor(opt.pairs / 2)),
    3,
    `${N} interventions`,
  );
  const base = res3[1], tr = res3[2], empty = res3[3];
  const beyond = tr.diff.median - base.diff.median; // (trace - forward) - (forward+edits - forward)
  emit({ bench: "trace.interventions", model: "stories260K", interventions: N, source_lines: opt.sourceLines, modules_touched: new Set(plan).size, shape: [1, ids.length], threads: opt.threads, ms: round(tr.median, 4), best_ms: round(tr.best, 4), forward_ms: round(res3[0].median, 4), forward_plus_edit_ops_ms: round(base.median, 4), edit_ops_ms: round(base.diff.median, 4), empty_trace_ms: round(empty.median, 4), extra_vs_forward_ms: round(tr.diff.median, 4), beyond_compute_ms: round(beyond, 4), beyond_compute_cpu_ms: round(tr.cpuDiff.median - base.cpuDiff.median, 4), per_intervention_us: round((beyond / N) * 1e3, 2), target_beyond_compute_ms: 2, within_target: beyond <= 2, loadavg: loadAvg() });
  for (const t of targets) t.dispose();
  await model.dispose();
}

// ---------------------------------------------------------------- 2. save every layer, GPT-2 124M 1×128
{
  const dir = ensureCheckpoint("gpt2-124m");
  const model = await LanguageModel.load(dir, { threads: opt.threads });
  const L = model.spec.numLayers;
  const ids = Array.from({ length: 128 }, (_, t) => 3 + ((t * 7927) % 5000));
  const res = await interleaved(
    [
      { name: "forward", fn: async () => (await model.forward([ids])).dispose() },
      {
        name: "trace_save_all_layers",
        fn: async () => {
          const out = await model.trace([ids], () => Array.from({ length: L }, (_, l) => model.transformer.h[l].output.save()));
          disposeAll(out);
        },
      },
    ],
    opt.gpt2Pairs,
    1,
    "gpt2 save layers",
  );
  const [f, t] = res;
  const pct = (t.diff.median / f.median) * 100;
  emit({ bench: "trace.save_layers", model: "gpt2-124m", layers_saved: L, shape: [1, 128], threads: opt.threads, ms: round(t.median, 2), best_ms: round(t.best, 2), forward_ms: round(f.median, 2), forward_best_ms: round(f.best, 2), extra_ms: round(t.diff.median, 2), extra_pct: round(pct, 2), extra_cpu_pct: round((t.cpuDiff.median / f.cpu.median) * 100, 2), extra_pct_of_best: round(((t.best - f.best) / f.best) * 100, 2), target_extra_pct: 3, within_target: pct <= 3, pairs: opt.gpt2Pairs, loadavg: loadAvg() });
  await model.dispose();
}
