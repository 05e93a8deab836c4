// Operations inside a module's forward (`envoy.source`, SCENARIOS T36/T37): read, patch, tuple outputs,
// and the model stays bit-identical afterwards.
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, NNsightError, Tensor, zeros } from "../../ts/src/index.js";
import { codeOf } from "../helpers/errors.js";

let model: LanguageModel;
beforeAll(async () => {
  model = await LanguageModel.load("stories260K");
});
afterAll(async () => {
  await model.dispose();
});

const P = "Once upon a time"; // 5 tokens with BOS
const bits = (t: Tensor) => Array.from(t.toFloat32Array());
const logitsOf = (r: Record<string, unknown>) => (r.out as { logits: Tensor }).logits;

describe("module source operations", () => {
  it("lists the operations and refuses modules that have none", () => {
    const src = model.model.layers[0].self_attn.source;
    expect(String(src)).toBe("Source(model.layers.0.self_attn.source: apply_rotary_pos_emb_0, attention_interface_0)");
    expect(src.get("attention_interface_0").path).toBe("model.layers.0.self_attn.source.attention_interface_0");
    expect(model.get("model.layers.1.mlp.source.act_fn_0").path).toBe("model.layers.1.mlp.source.act_fn_0");
    expect(() => model.model.layers[0].self_attn.q_proj.source).toThrow(NNsightError);
    // source operations are not modules: modules() and the default cache leave them out
    expect(model.envoy.modules().some((m) => m.path.includes(".source"))).toBe(false);
  });

  it("an operation's output can be a tuple; operation values match the modules around them (T36)", async () => {
    const a = model.model.layers[1].self_attn;
    const r = await model.trace(P, () => ({
      rot: a.source.apply_rotary_pos_emb_0.output,
      rotIn: a.source.apply_rotary_pos_emb_0.inputs,
      attn: a.source.attention_interface_0.output,
      attnIn: a.source.attention_interface_0.inputs,
      oIn: a.o_proj.input,
      q: a.q_proj.output,
      act: model.model.layers[1].mlp.source.act_fn_0.output,
      gate: model.model.layers[1].mlp.gate_proj.output,
    }));
    const rot = r.rot as unknown as Tensor[];
    expect(Array.isArray(rot)).toBe(true);
    expect(rot.map((t) => t.shape)).toEqual([[1, 8, 5, 8], [1, 4, 5, 8]]);
    // rope input q is q_proj's output in [batch, heads, seq, head_dim]
    const q = r.q as Tensor;
    expect(bits((r.rotIn as unknown as Tensor[])[0]!.contiguous())).toEqual(bits(q.reshape([1, 5, 8, 8]).permute(0, 2, 1, 3).contiguous()));
    // attention takes the rotated q and k
    const attnIn = r.attnIn as unknown as Tensor[];
    expect(bits(attnIn[0]!.contiguous())).toEqual(bits(rot[0]!.contiguous()));
    expect((r.attn as Tensor).shape).toEqual([1, 5, 8, 8]);
    expect(bits((r.attn as Tensor).reshape([1, 5, 64]))).toEqual(bits(r.oIn as Tensor));
    expect(bits(r.act as Tensor)).toEqual(bits((r.gate as Tensor).silu()));
  });

  it("patching layer 1's attention output with zeros zeroes the attention module's output (T36)", async () => {
    const plain = await model.trace(P, () => ({ out: model.output, l0: model.model.layers[0].output }));
    const r = await model.trace(P, () => {
      const z = model.model.layers[0].self_attn.source.attention_interface_0.output.mul(0);
      model.model.layers[1].self_attn.source.attention_interface_0.output = z;
      return { attn: model.model.layers[1].self_attn.output, l0: model.model.layers[0].output, out: model.output };
    });
    expect((r.attn as Tensor).abs().max().item()).toBe(0);
    expect(bits(r.l0 as Tensor)).toEqual(bits(plain.l0 as Tensor));
    expect(bits(logitsOf(r))).not.toEqual(bits(logitsOf(plain)));
  });

  it("a tuple is replaced by an array of the same length; anything else is BAD_INPUT", async () => {
    const r = await model.trace(P, () => {
      const rope = model.model.layers[2].self_attn.source.apply_rotary_pos_emb_0;
      const [q, k] = [rope.output.at(0), rope.output.at(1)];
      rope.output = [q.mul(0), k];
      const ai = model.model.layers[2].self_attn.source.attention_interface_0;
      return { attn: ai.output, v: ai.inputs.at(2) };
    });
    // q = 0: every score is 0, so each position averages the values it sees (position 0 sees only itself)
    const attn = r.attn as Tensor, v = r.v as Tensor; // [1, 5, 8, 8] and [1, 4, 5, 8] (GQA: q head h reads kv head h/2)
    expect(attn.shape).toEqual([1, 5, 8, 8]);
    for (let h = 0; h < 8; h++) {
      expect(bits(attn.at([0, 0, h]).contiguous())).toEqual(bits(v.at([0, h >> 1, 0]).contiguous()));
      const mean = v.at([0, h >> 1]).mean({ dim: 0 });
      const got = attn.at([0, 4, h]).toFloat32Array(), want = mean.toFloat32Array();
      for (let d = 0; d < 8; d++) expect(got[d]!).toBeCloseTo(want[d]!, 5);
    }
    const bad = model.trace(P, () => {
      model.model.layers[2].self_attn.source.apply_rotary_pos_emb_0.output = zeros([1, 8, 5, 8]);
      return { out: model.output };
    });
    expect(await codeOf(bad)).toBe("BAD_INPUT");
  });

  it("after source tracing and intervening, a plain forward is bit-identical (T37)", async () => {
    const before = await model.trace(P, () => ({ out: model.output }));
    const genBefore = await model.generateText(P, { maxNewTokens: 6 });
    await model.trace(P, () => {
      model.model.layers[3].mlp.source.act_fn_0.output.set([":", -1], 0);
      model.model.layers[3].self_attn.source.attention_interface_0.output.set([":", 0], 1);
      return { out: model.output };
    });
    const after = await model.trace(P, () => ({ out: model.output }));
    expect(bits(logitsOf(after))).toEqual(bits(logitsOf(before)));
    const genAfter = await model.generateText(P, { maxNewTokens: 6 });
    expect(genAfter.sequences).toEqual(genBefore.sequences);
  });

  it("during generation the attention operation sees the KV cache", async () => {
    const r = await model.generate(P, { maxNewTokens: 3 }, (tr) =>
      tr.all(() => ({ k: model.model.layers[0].self_attn.source.attention_interface_0.inputs.at(1) })),
    );
    const k = r.k as unknown as Tensor[];
    expect(k.map((t) => t.shape)).toEqual([[1, 4, 5, 8], [1, 4, 6, 8], [1, 4, 7, 8]]);
  });

  it("scan gives source operation shapes (tuples too) and hooked-call shapes without computing", async () => {
    const r = await model.scan(P, () => ({
      rot: model.model.layers[0].self_attn.source.apply_rotary_pos_emb_0.output,
      attn: model.model.layers[0].self_attn.source.attention_interface_0.output,
      lens: model.lm_head.call(model.model.norm.call(model.model.layers[0].output), { hook: true }),
      second: model.lm_head.nth(1).output,
    }));
    expect(r.rot).toEqual([{ shape: [1, 8, 5, 8], dtype: "float32" }, { shape: [1, 4, 5, 8], dtype: "float32" }]);
    expect(r.attn).toEqual({ shape: [1, 5, 8, 8], dtype: "float32" });
    expect(r.lens).toEqual({ shape: [1, 5, 512], dtype: "float32" });
    expect(r.second).toEqual({ shape: [1, 5, 512], dtype: "float32" });
  });
});
