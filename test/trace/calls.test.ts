// Modules that run several times in one forward pass (SCENARIOS T46 and the "per-call iteration"):
// `envoy.call(x, { hook: true })` runs a module with its hooks, as one more call of it; `envoy.nth(i)`
// addresses the i-th call (in the order calls happen, the model's own call included).
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, Tensor } from "../../ts/src/index.js";
import { codeOf } from "../helpers/errors.js";

let model: LanguageModel;
beforeAll(async () => {
  model = await LanguageModel.load("stories260K");
});
afterAll(async () => {
  await model.dispose();
});

const P = "Once upon a time";
const same = (a: Tensor, b: Tensor) => {
  expect(a.shape).toEqual(b.shape);
  expect(Array.from(a.toFloat32Array())).toEqual(Array.from(b.toFloat32Array()));
};

describe("counted calls", () => {
  it("a module called 3 times per pass: nth(0..2) capture the 3 calls, in the order they ran (T46)", async () => {
    const L = model.model.layers.length;
    const r = await model.trace(P, () => {
      const lens: Record<string, unknown> = {};
      // two hooked calls of lm_head on layers 0 and 1, then the model's own call at the end
      const a = model.lm_head.call(model.model.norm.call(model.model.layers[0].output), { hook: true });
      const b = model.lm_head.call(model.model.norm.call(model.model.layers[1].output), { hook: true });
      for (let i = 0; i < 3; i++) lens[`c${i}`] = model.lm_head.nth(i).output;
      lens.inp1 = model.lm_head.nth(1).input;
      return { ...lens, a, b, plain: model.lm_head.call(model.model.norm.call(model.model.layers[1].output)), out: model.output, last: model.model.layers[L - 1].output };
    });
    same(r.c0 as Tensor, r.a as Tensor);
    same(r.c1 as Tensor, r.b as Tensor);
    same(r.c1 as Tensor, r.plain as Tensor); // a hooked call computes what a plain one does
    same(r.c2 as Tensor, (r.out as { logits: Tensor }).logits); // the model's own call is the third
    expect((r.inp1 as Tensor).shape).toEqual([1, 5, 64]);
    // the plain forward is unchanged by hooked calls
    const plain = await model.trace(P, () => ({ out: model.output }));
    same((r.out as { logits: Tensor }).logits, (plain.out as { logits: Tensor }).logits);
  });

  it("an edit addressed to one call changes only that call", async () => {
    const r = await model.trace(P, () => {
      const h = model.model.norm.call(model.model.layers[0].output);
      model.lm_head.nth(0).output.set([":", -1], 0);
      const a = model.lm_head.call(h, { hook: true });
      const b = model.lm_head.call(h, { hook: true });
      return { a, b, out: model.output };
    });
    const a = r.a as Tensor, b = r.b as Tensor;
    expect(a.at([0, -1]).abs().sum().item()).toBe(0);
    expect(b.at([0, -1]).abs().sum().item()).toBeGreaterThan(0);
    same(a.at([0, 0]), b.at([0, 0]));
    const plain = await model.trace(P, () => ({ out: model.output }));
    same((r.out as { logits: Tensor }).logits, (plain.out as { logits: Tensor }).logits);
  });

  it("a swap of a hooked call's input and a skip of a hooked call", async () => {
    const r = await model.trace(P, () => {
      const h = model.model.layers[1].output;
      // the hooked calls run at layers.1's output, before the model's own layers.2 and .3: they are call 0
      model.model.layers[2].nth(0).input = model.model.layers[1].input;
      const viaSwap = model.model.layers[2].call(h, { hook: true });
      const direct = model.model.layers[2].call(model.model.layers[1].input);
      model.model.layers[3].nth(0).skip(model.model.layers[0].output);
      const skipped = model.model.layers[3].call(h, { hook: true });
      return { viaSwap, direct, skipped, h0: model.model.layers[0].output, l3: model.model.layers[3].nth(1).output, out: model.output };
    });
    same(r.viaSwap as Tensor, r.direct as Tensor);
    same(r.skipped as Tensor, r.h0 as Tensor);
    // the model's own calls (call 1) were not touched
    const plain = await model.trace(P, () => ({ l3: model.model.layers[3].output, out: model.output }));
    same(r.l3 as Tensor, plain.l3 as Tensor);
    same((r.out as { logits: Tensor }).logits, (plain.out as { logits: Tensor }).logits);
  });

  it("a swap that needs a value computed after the call is OUT_OF_ORDER", async () => {
    const p = model.trace(P, () => {
      model.model.layers[2].nth(0).input = model.model.layers[1].input;
      return { x: model.model.layers[2].call(model.model.layers[0].output, { hook: true }) };
    });
    expect(await codeOf(p)).toBe("OUT_OF_ORDER");
  });

  it("submodules of a hooked call are counted too", async () => {
    const r = await model.trace(P, () => {
      const x = model.model.layers[0].output;
      const out = model.model.layers[1].call(x, { hook: true }); // call 1 of layers.1 and of layers.1.mlp
      return { mlp0: model.model.layers[1].mlp.nth(0).output, mlp1: model.model.layers[1].mlp.nth(1).output, out, natural: model.model.layers[1].output };
    });
    // the hooked call needs only layers.0.output, so it runs before the model's own layers.1: it is call 0
    same(r.out as Tensor, r.natural as Tensor); // same input, same positions: same output
    expect((r.mlp0 as Tensor).shape).toEqual([1, 5, 64]);
    same(r.mlp0 as Tensor, r.mlp1 as Tensor);
  });

  it("T47: a call that never happens is MISSED_PROVIDER naming the call, and the model stays clean", async () => {
    const p = model.trace(P, () => ({ x: model.lm_head.nth(1).output }));
    const e = await p.catch((x: unknown) => x);
    expect(await codeOf(p)).toBe("MISSED_PROVIDER");
    expect(String((e as Error).message)).toMatch(/lm_head ran 1 time\(s\).*call 1 never happened/);
    const ok = await model.trace(P, () => ({ out: model.output }));
    expect((ok.out as { logits: Tensor }).logits.shape).toEqual([1, 5, 512]);
  });

  it("an in-place edit that would need a later value is OUT_OF_ORDER", async () => {
    const p = model.trace(P, () => {
      const h = model.model.norm.call(model.model.layers[0].output);
      const a = model.lm_head.call(h, { hook: true });
      model.lm_head.nth(0).output.set([":", -1], model.model.layers[2].output.sum());
      return { a };
    });
    expect(await codeOf(p)).toBe("OUT_OF_ORDER");
  });

  it("counted calls at every generation step, and serialize round trips give the same values", async () => {
    const run = (roundTrip: boolean) =>
      model.generate(P, { maxNewTokens: 3, roundTrip }, (tr) =>
        tr.all(() => {
          const l = model.lm_head.call(model.model.norm.call(model.model.layers[2].output), { hook: true });
          return { lens: model.lm_head.nth(0).output, l, own: model.lm_head.nth(1).output };
        }),
      );
    const a = await run(false);
    const b = await run(true);
    const lens = a.lens as unknown as Tensor[], l = a.l as unknown as Tensor[], own = a.own as unknown as Tensor[];
    expect(lens.length).toBe(3);
    for (let i = 0; i < 3; i++) {
      same(lens[i]!, l[i]!);
      same(lens[i]!, (b.lens as unknown as Tensor[])[i]!);
      same(own[i]!, (b.own as unknown as Tensor[])[i]!);
    }
    expect(own[1]!.shape).toEqual([1, 1, 512]);
  });
});
