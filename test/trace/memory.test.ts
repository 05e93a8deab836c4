// Traces in a loop keep memory flat: saved values are released when the caller disposes them, and
// nothing unsaved outlives its trace (NNsight's most reported problem, #102 #169 #389).
import { describe, expect, it } from "vitest";

import { LanguageModel, memory, sync } from "../../ts/src/index.js";

describe("memory across many traces", () => {
  it("1,500 traces with saves: native memory exact, RSS flat", async () => {
    const model = await LanguageModel.load("stories260K");
    const tick = () => new Promise((r) => setImmediate(r));
    const once = async () => {
      let saved: any;
      const r = await model.trace("Once upon a time", (tr) => {
        saved = model.model.layers[2].output.save();
        model.model.layers[1].output.set([":", -1], 0);
        return { l: model.lm_head.output.at([":", -1]).softmax(-1), c: tr.cache({ modules: ["model.layers.0"] }) };
      });
      saved.value.dispose();
      r.l.dispose();
      r.c["model.layers.0"].output.dispose();
    };
    for (let i = 0; i < 300; i++) await once();
    await sync();
    await tick();
    const base = memory();
    const rss0 = process.memoryUsage().rss;
    const N = 1500;
    for (let i = 0; i < N; i++) {
      await once();
      if (i % 200 === 0) await tick();
    }
    await sync();
    await tick();
    const after = memory();
    const growthMB = (process.memoryUsage().rss - rss0) / 1e6;
    console.log(`trace memory: ${N} traces, native bytes ${base.hostBytes} -> ${after.hostBytes}, RSS growth ${growthMB.toFixed(1)} MB`);
    expect(after.hostBytes).toBeLessThanOrEqual(base.hostBytes);
    expect(after.storages).toBeLessThanOrEqual(base.storages);
    expect(growthMB).toBeLessThan(24);
    await model.dispose();
  });
});
