// 10,000 traces in a loop, each saving a layer output and editing another: RSS every 2,000 traces
// and native memory before/after (one JSON line). `node bench/trace-memory.mjs` after `npm run build:ts`.
import { LanguageModel, memory, sync } from "../dist/index.js";
const model = await LanguageModel.load("stories260K");
const tick = () => new Promise((r) => setImmediate(r));
const once = async () => {
  let saved;
  const r = await model.trace("Once upon a time", () => { saved = model.model.layers[2].output.save(); model.model.layers[1].output.set([":", -1], 0); return { l: model.lm_head.output.at([":", -1]) }; });
  saved.value.dispose(); r.l.dispose();
};
for (let i = 0; i < 500; i++) await once();
await sync(); await tick();
const m0 = memory(), r0 = process.memoryUsage().rss; const t0 = performance.now();
const marks = [];
for (let i = 0; i < 10000; i++) { await once(); if (i % 2000 === 1999) { await tick(); marks.push(Math.round(process.memoryUsage().rss / 1e6)); } }
await sync(); await tick();
const m1 = memory();
console.log(JSON.stringify({ bench: "trace.memory", traces: 10000, ms_per_trace: +((performance.now() - t0) / 10000).toFixed(3), rss_mb_start: Math.round(r0 / 1e6), rss_mb_every_2000: marks, native_bytes_before: m0.hostBytes, native_bytes_after: m1.hostBytes, handles_before: m0.handles, handles_after: m1.handles }));
