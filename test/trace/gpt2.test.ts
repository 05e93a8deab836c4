// The same intervention API on a GPT-2 module tree (random tiny checkpoint): HF names, reads, edits,
// skip, cache, logit lens, generation, rename to architecture-agnostic names.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, NNsightError, Tensor } from "../../ts/src/index.js";
import { writeRandomCheckpoint } from "../../ts/src/models/random-checkpoint.js";

const dir = mkdtempSync(join(tmpdir(), "nx-gpt2-"));
let model: LanguageModel;
beforeAll(async () => {
  await writeRandomCheckpoint(dir, { preset: "tiny-gpt2", seed: 11 });
  model = await LanguageModel.load(dir, { rename: { "transformer.h": "layers" } });
});
afterAll(async () => {
  await model.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const ids = [3, 14, 15, 9, 26, 5];
const maxAbs = (a: Tensor, b: Tensor) => {
  const x = a.toFloat32Array(), y = b.toFloat32Array();
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]! - y[i]!));
  return m;
};

describe("GPT-2 module tree", () => {
  it("has the HF names and the renamed alias", () => {
    expect(model.transformer.h.length).toBe(model.spec.numLayers);
    expect(model.transformer.h[0]!.attn.c_attn.path).toBe("transformer.h.0.attn.c_attn");
    expect((model as any).layers[-1].path).toBe(`transformer.h.${model.spec.numLayers - 1}`);
    expect(() => model.get("transformer.h.0.self_attn")).toThrow(NNsightError);
  });

  it("reads and edits module values; the edit changes only later modules", async () => {
    const base = await model.trace(ids, () => ({ h0: model.transformer.h[0].output, l: model.lm_head.output, wpe: model.transformer.wpe.output }));
    expect(base.h0.shape).toEqual([1, ids.length, model.spec.hiddenSize]);
    expect(base.wpe.shape).toEqual([1, ids.length, model.spec.hiddenSize]);
    const edited = await model.trace(ids, () => {
      model.transformer.h[1].mlp.output.set([":", -1], 0);
      return { h0: model.transformer.h[0].output, l: model.lm_head.output };
    });
    expect(maxAbs(edited.h0, base.h0)).toBe(0);
    expect(maxAbs(edited.l, base.l)).toBeGreaterThan(0);
  });

  it("skip, cache and the logit lens through ln_f and lm_head", async () => {
    const r = await model.trace(ids, (tr) => {
      const last = model.transformer.h.at(-1).output;
      return {
        lens: model.lm_head.call(model.transformer.ln_f.call(last)),
        logits: model.lm_head.output,
        c: tr.cache({ modules: ["transformer.h.0.attn.c_attn"] }),
      };
    });
    expect(maxAbs(r.lens, r.logits)).toBeLessThan(1e-5);
    expect(r.c["transformer.h.0.attn.c_attn"].output.shape).toEqual([1, ids.length, 3 * model.spec.hiddenSize]);
    const s = await model.trace(ids, () => {
      model.transformer.h[1].skip(model.transformer.h[0].output);
      return { h0: model.transformer.h[0].output, h1: model.transformer.h[1].output };
    });
    expect(maxAbs(s.h1, s.h0)).toBe(0);
  });

  it("generation with an intervention at every step, via the renamed alias", async () => {
    const plain = await model.generateText(ids, { maxNewTokens: 6 });
    const r = await model.generate(ids, { maxNewTokens: 6 }, (tr) => {
      tr.all(() => (model as any).layers[0].output.set([":", -1], 0));
      return { tokens: model.generator.output };
    });
    expect(r.tokens.toArray()[0].slice(0, ids.length)).toEqual(ids);
    expect(r.tokens.toArray()[0]).not.toEqual(plain.sequences[0]);
  });

  it("source operations: attention_interface_0 feeds c_proj, act_0 is the GELU of c_fc", async () => {
    const a = model.transformer.h[1].attn;
    const r = await model.trace(ids, () => ({
      attn: a.source.attention_interface_0.output,
      pin: a.c_proj.input,
      act: model.transformer.h[1].mlp.source.act_0.output,
      fc: model.transformer.h[1].mlp.c_fc.output,
    }));
    const attn = r.attn as Tensor, pin = r.pin as Tensor;
    expect(attn.shape.slice(0, 2)).toEqual([1, ids.length]);
    expect(Array.from(attn.reshape([...pin.shape]).toFloat32Array())).toEqual(Array.from(pin.toFloat32Array()));
    const act = r.act as Tensor, fc = r.fc as Tensor;
    const gelu = fc.gelu({ approximate: model.spec.hiddenAct === "gelu" ? "none" : "tanh" });
    expect(Array.from(act.toFloat32Array())).toEqual(Array.from(gelu.toFloat32Array()));
  });

  it("eager attention: the probabilities are readable, causal, and give the fused kernel's logits", async () => {
    const eager = await LanguageModel.load(dir, { attnImplementation: "eager" });
    try {
      const sm = eager.transformer.h[0].attn.source.attention_interface_0.source.get("nn_functional_softmax_0");
      const r = await eager.trace(ids, () => ({ p: sm.output, l: eager.lm_head.output }));
      const plain = await model.trace(ids, () => ({ l: model.lm_head.output }));
      const p = r.p as Tensor, T = ids.length;
      expect(p.shape).toEqual([1, model.spec.numHeads, T, T]);
      const pv = p.toFloat32Array();
      for (let h = 0; h < model.spec.numHeads; h++) {
        for (let i = 0; i < T; i++) {
          let sum = 0;
          for (let j = 0; j < T; j++) {
            const x = pv[(h * T + i) * T + j]!;
            if (j > i) expect(x).toBe(0);
            sum += x;
          }
          expect(Math.abs(sum - 1)).toBeLessThan(1e-6);
        }
      }
      expect(maxAbs(r.l as Tensor, plain.l as Tensor)).toBeLessThan(1e-4);
    } finally {
      await eager.dispose();
    }
  });

  it("the MLP with its GELU fused into c_fc (nothing reads c_fc) equals the unfused one bit for bit", async () => {
    // reading mlp.output alone leaves c_fc + GELU fused (linear_packed with the activation epilogue);
    // reading c_fc.output as well runs them as two ops. Both must give the same bits downstream.
    const mlp = model.transformer.h[1].mlp;
    const fused = await model.trace(ids, () => ({ m: mlp.output, l: model.lm_head.output }));
    const split = await model.trace(ids, () => ({ m: mlp.output, fc: mlp.c_fc.output, l: model.lm_head.output }));
    expect(Array.from((fused.m as Tensor).toFloat32Array())).toEqual(Array.from((split.m as Tensor).toFloat32Array()));
    expect(Array.from((fused.l as Tensor).toFloat32Array())).toEqual(Array.from((split.l as Tensor).toFloat32Array()));
    const plain = await model.forward([ids]);
    expect(Array.from(plain.toFloat32Array())).toEqual(Array.from((split.l as Tensor).toFloat32Array()));
    plain.dispose();
  });

  it("residual adds fused into attn.c_proj / mlp.c_proj equal the separate adds bit for bit", async () => {
    // reading the block output alone fuses both residual adds into the output projections; reading the
    // projections' outputs as well runs them as separate add ops
    const h = model.transformer.h[1];
    const fused = await model.trace(ids, () => ({ o: h.output, l: model.lm_head.output }));
    const split = await model.trace(ids, () => ({ o: h.output, a: h.attn.c_proj.output, m: h.mlp.c_proj.output, l: model.lm_head.output }));
    expect(Array.from((fused.o as Tensor).toFloat32Array())).toEqual(Array.from((split.o as Tensor).toFloat32Array()));
    expect(Array.from((fused.l as Tensor).toFloat32Array())).toEqual(Array.from((split.l as Tensor).toFloat32Array()));
  });
});
