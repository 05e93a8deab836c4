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

// NNsight's recursive `.source` (T36's test_recursive_source) into attention_interface_0: the fused SDPA
// call by default, and HF's eager steps (scores, softmax, weighted sum) with attnImplementation "eager".
describe("operations inside attention_interface_0", () => {
  let eager: LanguageModel;
  beforeAll(async () => {
    eager = await LanguageModel.load("stories260K", { attnImplementation: "eager" });
  });
  afterAll(async () => {
    await eager.dispose();
  });
  const attnOf = (m: LanguageModel, l: number) => m.model.layers[l].self_attn.source.attention_interface_0;
  const inner = (m: LanguageModel, l: number, name: string) => attnOf(m, l).source.get(name);
  const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0);
  const scale = 1 / Math.sqrt(8);

  it("sdpa (the default): the SDPA call is a hook point with q, k, v in and [B, H, T, hd] out (T36)", async () => {
    expect(String(attnOf(model, 0).source)).toBe(
      "Source(model.layers.0.self_attn.source.attention_interface_0.source: torch_nn_functional_scaled_dot_product_attention_0)",
    );
    expect(() => attnOf(model, 0).source.get("nn_functional_softmax_0")).toThrow(NNsightError);
    // an operation the module does not have fails at once (NNsight: AttributeError), naming those it has
    expect(() => attnOf(model, 0).source.nn_functional_softmax_0).toThrow(/has no operation "nn_functional_softmax_0"; it has: torch_nn_functional/);
    expect(() => (model.model.layers[0].self_attn.source as unknown as Record<string, unknown>).my_func_0).toThrow(NNsightError);
    const sdpa = inner(model, 1, "torch_nn_functional_scaled_dot_product_attention_0");
    const r = await model.trace(P, () => ({ o: sdpa.output, ins: sdpa.inputs, attn: attnOf(model, 1).output }));
    const o = r.o as Tensor;
    expect(o).toBeInstanceOf(Tensor);
    expect(o.shape).toEqual([1, 8, 5, 8]);
    expect((r.ins as unknown as Tensor[]).map((t) => t.shape)).toEqual([[1, 8, 5, 8], [1, 4, 5, 8], [1, 4, 5, 8]]);
    expect(bits(o.permute(0, 2, 1, 3).contiguous())).toEqual(bits(r.attn as Tensor));
    // patching it patches what the attention module passes on
    const z = await model.trace(P, () => {
      sdpa.output.set([":"], 0);
      return { oIn: model.model.layers[1].self_attn.o_proj.input };
    });
    expect(bits(z.oIn as Tensor).every((x) => x === 0)).toBe(true);
  });

  it("eager: scores, probabilities and output agree with a plain computation from q and k", async () => {
    expect(String(attnOf(eager, 0).source)).toBe(
      "Source(model.layers.0.self_attn.source.attention_interface_0.source: torch_matmul_0, nn_functional_softmax_0, torch_matmul_1)",
    );
    const a = eager.model.layers[2].self_attn.source;
    const r = await eager.trace(P, () => ({
      rot: a.apply_rotary_pos_emb_0.output,
      v: a.attention_interface_0.inputs.at(2),
      scores: inner(eager, 2, "torch_matmul_0").output,
      probs: inner(eager, 2, "nn_functional_softmax_0").output,
      mm1: inner(eager, 2, "torch_matmul_1").output,
      attn: a.attention_interface_0.output,
      rowSums: inner(eager, 2, "nn_functional_softmax_0").output.sum(-1, true), // torch's positional dim, keepdim
    }));
    expect((r.rowSums as Tensor).shape).toEqual([1, 8, 5, 1]);
    for (const x of (r.rowSums as Tensor).toFloat32Array()) expect(Math.abs(x - 1)).toBeLessThan(1e-6);
    const [q, k] = (r.rot as unknown as Tensor[]).map((t) => t.contiguous().toFloat32Array()) as [Float32Array, Float32Array];
    const v = (r.v as Tensor).contiguous().toFloat32Array();
    const scores = (r.scores as Tensor).toFloat32Array(), probs = (r.probs as Tensor).toFloat32Array();
    expect((r.probs as Tensor).shape).toEqual([1, 8, 5, 5]);
    const T = 5, D = 8;
    let worstScore = 0, worstProb = 0, worstOut = 0;
    const mm1 = (r.mm1 as Tensor).toFloat32Array();
    for (let h = 0; h < 8; h++) {
      const kh = h >> 1; // 8 query heads over 4 kv heads
      for (let i = 0; i < T; i++) {
        const s: number[] = [];
        for (let j = 0; j < T; j++) {
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[(h * T + i) * D + d]! * k[(kh * T + j) * D + d]!;
          s.push(dot);
          worstScore = Math.max(worstScore, Math.abs(dot - scores[(h * T + i) * T + j]!));
        }
        const m = Math.max(...s.slice(0, i + 1));
        const e = s.map((x, j) => (j <= i ? Math.exp((x - m) * scale) : 0));
        const sum = e.reduce((x, y) => x + y, 0);
        for (let j = 0; j < T; j++) worstProb = Math.max(worstProb, Math.abs(e[j]! / sum - probs[(h * T + i) * T + j]!));
        for (let d = 0; d < D; d++) {
          let o = 0;
          for (let j = 0; j <= i; j++) o += (e[j]! / sum) * v[(kh * T + j) * D + d]!;
          worstOut = Math.max(worstOut, Math.abs(o - mm1[(h * T + i) * D + d]!));
        }
      }
    }
    // f32 dot products of 8 terms and a 5-wide softmax against the same sums in f64
    expect(worstScore).toBeLessThan(1e-5);
    expect(worstProb).toBeLessThan(1e-6);
    expect(worstOut).toBeLessThan(1e-5);
    expect(bits((r.mm1 as Tensor).permute(0, 2, 1, 3).contiguous())).toEqual(bits(r.attn as Tensor));
  });

  it("eager gives the fused kernel's logits and tokens, and is bit-identical traced or not", async () => {
    const fused = await model.trace(P, () => ({ out: model.output }));
    const plain = await eager.trace(P, () => ({ out: eager.output }));
    const touched = await eager.trace(P, () => ({ out: eager.output, p: inner(eager, 0, "nn_functional_softmax_0").output }));
    // a different order of the same f32 sums: logits of size ~10 agree to ~1e-5
    expect(maxDiff(logitsOf(plain).toFloat32Array(), logitsOf(fused).toFloat32Array())).toBeLessThan(1e-4);
    expect(bits(logitsOf(touched))).toEqual(bits(logitsOf(plain)));
    const g1 = await model.generateText(P, { maxNewTokens: 8 });
    const g2 = await eager.generateText(P, { maxNewTokens: 8 });
    expect(g2.sequences).toEqual(g1.sequences);
  });

  it("eager: editing the probabilities steers what attention reads (all weight on BOS)", async () => {
    const r = await eager.trace(P, () => {
      const p = inner(eager, 3, "nn_functional_softmax_0").output;
      p.set([":"], 0);
      p.set([":", ":", ":", 0], 1);
      return { out: inner(eager, 3, "torch_matmul_1").output, v: attnOf(eager, 3).inputs.at(2) };
    });
    const out = (r.out as Tensor).toFloat32Array(), v = (r.v as Tensor).contiguous().toFloat32Array();
    for (let h = 0; h < 8; h++) for (let i = 0; i < 5; i++) for (let d = 0; d < 8; d++) expect(out[(h * 5 + i) * 8 + d]).toBe(v[((h >> 1) * 5 + 0) * 8 + d]);
  });

  it("eager under left padding and with a KV cache: padded keys get no weight, rows match the prompt alone", async () => {
    const sm = inner(eager, 1, "nn_functional_softmax_0");
    const alone = await eager.trace("Hi", () => ({ p: sm.output }));
    const batch = await eager.trace(["Hi", P], () => ({ p: sm.output }));
    const pa = alone.p as Tensor, pb = batch.p as Tensor;
    const n = pa.shape[2]!, pad = 5 - n;
    expect(pb.shape).toEqual([2, 8, 5, 5]);
    const rows = pb.select(0, 0).narrow(1, pad, n); // the real query rows of "Hi"
    expect(bits(rows.narrow(2, 0, pad).contiguous()).every((x) => x === 0)).toBe(true);
    expect(maxDiff(rows.narrow(2, pad, n).contiguous().toFloat32Array(), pa.select(0, 0).contiguous().toFloat32Array())).toBeLessThan(1e-6);
    // padding query rows see no key: zero probabilities, not NaN
    expect(bits(pb.select(0, 0).narrow(1, 0, pad).contiguous()).every((x) => x === 0)).toBe(true);
    const g = await eager.generate(P, { maxNewTokens: 3 }, (tr) => tr.all(() => ({ p: sm.output })));
    const ps = g.p as unknown as Tensor[];
    expect(ps.map((t) => t.shape)).toEqual([[1, 8, 5, 5], [1, 8, 1, 6], [1, 8, 1, 7]]);
    for (const t of ps) {
      const last = t.select(2, t.shape[2]! - 1).sum(-1).toFloat32Array();
      for (const s of last) expect(Math.abs(s - 1)).toBeLessThan(1e-5);
    }
  });

  it("scan gives the inner shapes; a bad attnImplementation is BAD_INPUT", async () => {
    const r = await eager.scan(P, () => ({ p: inner(eager, 0, "nn_functional_softmax_0").output, s: inner(eager, 0, "torch_matmul_0").output }));
    expect(r.p).toEqual({ shape: [1, 8, 5, 5], dtype: "float32" });
    expect(r.s).toEqual({ shape: [1, 8, 5, 5], dtype: "float32" });
    expect(await codeOf(LanguageModel.load("stories260K", { attnImplementation: "flash" as "eager" }))).toBe("BAD_INPUT");
  });
});
