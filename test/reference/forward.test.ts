import { seededRandom } from "../../ts/src/models/generate.js";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  defaultPositionIds,
  geluNew,
  referenceForward,
  referenceGreedy,
  refConfigFromHf,
  type RefConfig,
  type RefTensor,
  type RefWeights,
} from "./forward.js";
import { bf16ToF32, f16ToF32, readSafetensors } from "./read-safetensors.js";

const root = fileURLToPath(new URL("../../", import.meta.url));
const storiesDir = `${root}models/stories260K/`;
const golden = JSON.parse(readFileSync(`${root}test/fixtures/stories260K-golden.json`, "utf8")) as {
  prompt: string;
  promptIds: number[];
  ids: number[];
  text: string;
};

function loadStories(): { weights: RefWeights; config: RefConfig } {
  const weights = readSafetensors(`${storiesDir}model.safetensors`);
  const config = refConfigFromHf(JSON.parse(readFileSync(`${storiesDir}config.json`, "utf8")));
  return { weights, config };
}

// ---- seeded random weights ------------------------------------------------------------------

const mulberry32 = seededRandom;

class RandomWeights {
  readonly weights: RefWeights = new Map();
  private readonly rand: () => number;
  constructor(seed: number) {
    this.rand = mulberry32(seed);
  }
  /** uniform in [center - scale, center + scale] */
  add(name: string, shape: number[], scale: number, center = 0): void {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = center + scale * (2 * this.rand() - 1);
    this.weights.set(name, { shape, data });
  }
}

function tinyGpt2(): { weights: RefWeights; config: RefConfig } {
  const H = 48, L = 2, V = 97, P = 16, I = 4 * H;
  const config: RefConfig = {
    modelType: "gpt2", hiddenSize: H, numLayers: L, numHeads: 3, numKvHeads: 3, headDim: H / 3,
    intermediateSize: I, vocabSize: V, normEps: 1e-5, ropeTheta: 0,
    tieWordEmbeddings: true, attentionBias: true, mlpBias: true,
  };
  const r = new RandomWeights(1234);
  // checkpoint-style names without the "transformer." prefix, as in openai-community/gpt2
  r.add("wte.weight", [V, H], 0.3);
  r.add("wpe.weight", [P, H], 0.3);
  for (let l = 0; l < L; l++) {
    const p = `h.${l}`;
    r.add(`${p}.ln_1.weight`, [H], 0.2, 1);
    r.add(`${p}.ln_1.bias`, [H], 0.1);
    r.add(`${p}.attn.c_attn.weight`, [H, 3 * H], 0.3);
    r.add(`${p}.attn.c_attn.bias`, [3 * H], 0.1);
    r.add(`${p}.attn.c_proj.weight`, [H, H], 0.2);
    r.add(`${p}.attn.c_proj.bias`, [H], 0.1);
    r.add(`${p}.ln_2.weight`, [H], 0.2, 1);
    r.add(`${p}.ln_2.bias`, [H], 0.1);
    r.add(`${p}.mlp.c_fc.weight`, [H, I], 0.2);
    r.add(`${p}.mlp.c_fc.bias`, [I], 0.1);
    r.add(`${p}.mlp.c_proj.weight`, [I, H], 0.1);
    r.add(`${p}.mlp.c_proj.bias`, [H], 0.1);
  }
  r.add("ln_f.weight", [H], 0.2, 1);
  r.add("ln_f.bias", [H], 0.1);
  return { weights: r.weights, config };
}

function tinyLlama(opts: { bias: boolean; numKvHeads?: number; seed?: number }): { weights: RefWeights; config: RefConfig } {
  const nH = 6, hd = 8, H = 40, I = 56, V = 61, L = 2;
  const nKv = opts.numKvHeads ?? 2;
  const config: RefConfig = {
    modelType: "llama", hiddenSize: H, numLayers: L, numHeads: nH, numKvHeads: nKv, headDim: hd,
    intermediateSize: I, vocabSize: V, normEps: 1e-6, ropeTheta: 500000,
    tieWordEmbeddings: false, attentionBias: opts.bias, mlpBias: opts.bias,
  };
  const r = new RandomWeights(opts.seed ?? 99);
  r.add("model.embed_tokens.weight", [V, H], 0.5);
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    r.add(`${p}.input_layernorm.weight`, [H], 0.2, 1);
    r.add(`${p}.self_attn.q_proj.weight`, [nH * hd, H], 0.3);
    r.add(`${p}.self_attn.k_proj.weight`, [nKv * hd, H], 0.3);
    r.add(`${p}.self_attn.v_proj.weight`, [nKv * hd, H], 0.3);
    r.add(`${p}.self_attn.o_proj.weight`, [H, nH * hd], 0.2);
    r.add(`${p}.post_attention_layernorm.weight`, [H], 0.2, 1);
    r.add(`${p}.mlp.gate_proj.weight`, [I, H], 0.3);
    r.add(`${p}.mlp.up_proj.weight`, [I, H], 0.3);
    r.add(`${p}.mlp.down_proj.weight`, [H, I], 0.2);
    if (opts.bias) {
      r.add(`${p}.self_attn.q_proj.bias`, [nH * hd], 0.1);
      r.add(`${p}.self_attn.k_proj.bias`, [nKv * hd], 0.1);
      r.add(`${p}.self_attn.v_proj.bias`, [nKv * hd], 0.1);
      r.add(`${p}.self_attn.o_proj.bias`, [H], 0.1);
      r.add(`${p}.mlp.gate_proj.bias`, [I], 0.1);
      r.add(`${p}.mlp.up_proj.bias`, [I], 0.1);
      r.add(`${p}.mlp.down_proj.bias`, [H], 0.1);
    }
  }
  r.add("model.norm.weight", [H], 0.2, 1);
  r.add("lm_head.weight", [V, H], 0.5);
  return { weights: r.weights, config };
}

// ---- helpers ------------------------------------------------------------------------------

function allFinite(t: RefTensor): boolean {
  for (const x of t.data) if (!Number.isFinite(x)) return false;
  return true;
}

/** Max abs difference between row (b, t) of a [B, T, ...] tensor and row (b2, t2) of another. */
function rowDiff(a: RefTensor, b: number, t: number, c: RefTensor, b2: number, t2: number): number {
  const w = a.shape[2];
  expect(c.shape[2]).toBe(w);
  const oa = (b * a.shape[1] + t) * w;
  const oc = (b2 * c.shape[1] + t2) * w;
  let m = 0;
  for (let i = 0; i < w; i++) m = Math.max(m, Math.abs(a.data[oa + i] - c.data[oc + i]));
  return m;
}

function leftPad(rows: number[][], pad = 0): { ids: number[][]; mask: number[][] } {
  const T = Math.max(...rows.map((r) => r.length));
  return {
    ids: rows.map((r) => [...Array<number>(T - r.length).fill(pad), ...r]),
    mask: rows.map((r) => [...Array<number>(T - r.length).fill(0), ...r.map(() => 1)]),
  };
}

/**
 * Every recorded module output of a padded batch must match (on real positions) the same
 * module output of each prompt run alone.
 */
function checkBatchConsistency(weights: RefWeights, config: RefConfig, prompts: number[][], tol: number): void {
  const { ids, mask } = leftPad(prompts);
  const batched = referenceForward(weights, config, ids, { attentionMask: mask });
  const T = ids[0].length;
  for (let b = 0; b < prompts.length; b++) {
    const alone = referenceForward(weights, config, [prompts[b]]);
    const off = T - prompts[b].length;
    expect(Object.keys(alone.outputs).sort()).toEqual(Object.keys(batched.outputs).sort());
    for (const [name, t] of Object.entries(alone.outputs)) {
      let worst = 0;
      for (let s = 0; s < prompts[b].length; s++) worst = Math.max(worst, rowDiff(batched.outputs[name], b, off + s, t, 0, s));
      expect(worst, `${name} row ${b}`).toBeLessThan(tol);
    }
    for (let s = 0; s < prompts[b].length; s++) expect(rowDiff(batched.logits, b, off + s, alone.logits, 0, s)).toBeLessThan(tol);
  }
  for (const t of Object.values(batched.outputs)) expect(allFinite(t)).toBe(true); // padded rows too
}

function llamaModuleNames(L: number): string[] {
  const names = ["model.embed_tokens", "model.norm", "lm_head"];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    names.push(p, `${p}.input_layernorm`, `${p}.post_attention_layernorm`, `${p}.self_attn`, `${p}.mlp`);
    for (const n of ["q_proj", "k_proj", "v_proj", "o_proj"]) names.push(`${p}.self_attn.${n}`);
    for (const n of ["gate_proj", "up_proj", "down_proj"]) names.push(`${p}.mlp.${n}`);
  }
  return names.sort();
}

function gpt2ModuleNames(L: number): string[] {
  const names = ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"];
  for (let l = 0; l < L; l++) {
    const p = `transformer.h.${l}`;
    names.push(p, `${p}.ln_1`, `${p}.ln_2`, `${p}.attn`, `${p}.attn.c_attn`, `${p}.attn.c_proj`, `${p}.mlp`, `${p}.mlp.c_fc`, `${p}.mlp.c_proj`);
  }
  return names.sort();
}

// ---- tests --------------------------------------------------------------------------------

describe("test safetensors reader", () => {
  it("converts half and bfloat16 bits", () => {
    expect(f16ToF32(0x3c00)).toBe(1);
    expect(f16ToF32(0xc000)).toBe(-2);
    expect(f16ToF32(0x0001)).toBe(2 ** -24);
    expect(f16ToF32(0x7bff)).toBe(65504);
    expect(f16ToF32(0x7c00)).toBe(Infinity);
    expect(bf16ToF32(0x3f80)).toBe(1);
    expect(bf16ToF32(0xc040)).toBe(-3);
    expect(bf16ToF32(0x3e20)).toBe(0.15625);
  });

  it("loads stories260K with HF names and shapes", () => {
    const { weights, config } = loadStories();
    expect(config).toMatchObject({ hiddenSize: 64, numLayers: 5, numHeads: 8, numKvHeads: 4, headDim: 8, intermediateSize: 172, vocabSize: 512, normEps: 1e-5, ropeTheta: 10000, tieWordEmbeddings: true });
    expect(weights.get("model.embed_tokens.weight")!.shape).toEqual([512, 64]);
    expect(weights.get("model.layers.4.self_attn.k_proj.weight")!.shape).toEqual([32, 64]);
    expect(weights.get("model.layers.0.mlp.down_proj.weight")!.shape).toEqual([64, 172]);
    expect(weights.get("lm_head.weight")!.data).toEqual(weights.get("model.embed_tokens.weight")!.data);
  });
});

describe("reference forward: stories260K (Llama, GQA 8/4)", () => {
  const { weights, config } = loadStories();

  it("greedy generation reproduces the llama2.c golden ids", () => {
    const prompt = golden.promptIds;
    expect(prompt).toEqual([1, 403, 407, 261, 378]);
    const generated = referenceGreedy(weights, config, prompt, 60, [2, 1]);
    expect([...prompt, ...generated]).toEqual(golden.ids);
  });

  it("records every module output with the right shape", () => {
    const { logits, outputs, inputs } = referenceForward(weights, config, [golden.promptIds]);
    expect(Object.keys(outputs).sort()).toEqual(llamaModuleNames(5));
    expect(logits.shape).toEqual([1, 5, 512]);
    expect(outputs["lm_head"]).toBe(logits);
    expect(outputs["model.layers.2.self_attn.q_proj"].shape).toEqual([1, 5, 64]);
    expect(outputs["model.layers.2.self_attn.k_proj"].shape).toEqual([1, 5, 32]);
    expect(outputs["model.layers.2.mlp.up_proj"].shape).toEqual([1, 5, 172]);
    expect(outputs["model.layers.3"].shape).toEqual([1, 5, 64]);
    // a layer's input is the previous layer's output
    expect(inputs["model.layers.3"].data).toEqual(outputs["model.layers.2"].data);
    expect(inputs["model.layers.0"].data).toEqual(outputs["model.embed_tokens"].data);
    for (const t of Object.values(outputs)) expect(allFinite(t)).toBe(true);
  });

  it("is causal: a later token does not change earlier outputs", () => {
    const a = referenceForward(weights, config, [[1, 403, 407, 261, 378]]);
    const b = referenceForward(weights, config, [[1, 403, 407, 261, 300]]);
    for (let t = 0; t < 4; t++) expect(rowDiff(a.outputs["model.layers.4"], 0, t, b.outputs["model.layers.4"], 0, t)).toBe(0);
    expect(rowDiff(a.outputs["model.layers.4"], 0, 4, b.outputs["model.layers.4"], 0, 4)).toBeGreaterThan(0);
  });

  it("left-padded batch matches each prompt alone on real positions", () => {
    checkBatchConsistency(weights, config, [golden.ids.slice(0, 9), [1, 403, 407], golden.ids.slice(0, 6)], 1e-5);
  });

  it("default position ids are cumsum(mask) - 1, pads at 0", () => {
    expect(defaultPositionIds([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).toEqual([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]);
  });

  it("an invFreq override equal to the default changes nothing; a different one does", () => {
    const base = referenceForward(weights, config, [golden.promptIds]);
    const inv = new Float32Array(4);
    for (let i = 0; i < 4; i++) inv[i] = 1 / Math.fround(Math.pow(10000, Math.fround((2 * i) / 8)));
    const same = referenceForward(weights, { ...config, invFreq: inv }, [golden.promptIds]);
    expect(same.logits.data).toEqual(base.logits.data);
    const scaled = referenceForward(weights, { ...config, invFreq: inv.map((f) => f / 8) }, [golden.promptIds]);
    expect(rowDiff(scaled.logits, 0, 4, base.logits, 0, 4)).toBeGreaterThan(1e-3);
  });
});

describe("reference forward: tiny random Llama (GQA 6/2, head dim 8)", () => {
  it("runs, gives finite logits of the right shape, with and without biases", () => {
    for (const bias of [false, true]) {
      const { weights, config } = tinyLlama({ bias });
      const { ids, mask } = leftPad([[3, 14, 15, 9, 26, 5], [35, 8, 9]]);
      const { logits, outputs } = referenceForward(weights, config, ids, { attentionMask: mask });
      expect(logits.shape).toEqual([2, 6, 61]);
      expect(Object.keys(outputs).sort()).toEqual(llamaModuleNames(2));
      expect(outputs["model.layers.1.self_attn.k_proj"].shape).toEqual([2, 6, 16]);
      for (const t of Object.values(outputs)) expect(allFinite(t)).toBe(true);
      checkBatchConsistency(weights, config, [[3, 14, 15, 9, 26, 5], [35, 8, 9]], 1e-5);
    }
  });

  it("GQA equals MHA with each kv head's weights duplicated for its query heads", () => {
    const gqa = tinyLlama({ bias: true });
    const mha: RefWeights = new Map(gqa.weights);
    const hd = 8, nH = 6, nKv = 2, group = nH / nKv, H = 40;
    for (let l = 0; l < 2; l++) {
      for (const n of ["k_proj", "v_proj"]) {
        const w = gqa.weights.get(`model.layers.${l}.self_attn.${n}.weight`)!.data;
        const b = gqa.weights.get(`model.layers.${l}.self_attn.${n}.bias`)!.data;
        const w2 = new Float32Array(nH * hd * H);
        const b2 = new Float32Array(nH * hd);
        for (let h = 0; h < nH; h++) {
          const kvh = Math.floor(h / group);
          w2.set(w.subarray(kvh * hd * H, (kvh + 1) * hd * H), h * hd * H);
          b2.set(b.subarray(kvh * hd, (kvh + 1) * hd), h * hd);
        }
        mha.set(`model.layers.${l}.self_attn.${n}.weight`, { shape: [nH * hd, H], data: w2 });
        mha.set(`model.layers.${l}.self_attn.${n}.bias`, { shape: [nH * hd], data: b2 });
      }
    }
    const ids = [[3, 14, 15, 9, 26, 5, 35]];
    const a = referenceForward(gqa.weights, gqa.config, ids);
    const m = referenceForward(mha, { ...gqa.config, numKvHeads: nH }, ids);
    let worst = 0;
    for (let i = 0; i < a.logits.data.length; i++) worst = Math.max(worst, Math.abs(a.logits.data[i] - m.logits.data[i]));
    expect(worst).toBeLessThan(1e-6);
  });

  it("greedy generation runs and stops at an EOS id", () => {
    const { weights, config } = tinyLlama({ bias: false });
    const free = referenceGreedy(weights, config, [3, 14, 15], 6);
    expect(free).toHaveLength(6);
    const stopped = referenceGreedy(weights, config, [3, 14, 15], 6, [free[2]]);
    expect(stopped).toEqual(free.slice(0, free.indexOf(free[2]) + 1));
  });
});

describe("reference forward: tiny random GPT-2", () => {
  const { weights, config } = tinyGpt2();

  it("runs and gives finite logits of the right shape", () => {
    const { ids, mask } = leftPad([[5, 17, 42, 96, 0, 33, 7, 8, 9, 10], [60, 61, 62, 63]]);
    const { logits, outputs, inputs } = referenceForward(weights, config, ids, { attentionMask: mask });
    expect(logits.shape).toEqual([2, 10, 97]);
    expect(Object.keys(outputs).sort()).toEqual(gpt2ModuleNames(2));
    expect(outputs["transformer.h.1.attn.c_attn"].shape).toEqual([2, 10, 144]);
    expect(outputs["transformer.h.0.mlp.c_fc"].shape).toEqual([2, 10, 192]);
    expect(inputs["transformer.h.1"].data).toEqual(outputs["transformer.h.0"].data);
    for (const t of Object.values(outputs)) expect(allFinite(t)).toBe(true);
    let spread = 0;
    for (const x of logits.data) spread = Math.max(spread, Math.abs(x));
    expect(spread).toBeGreaterThan(0.1); // not degenerate
  });

  it("left-padded batch matches each prompt alone (absolute positions follow the mask)", () => {
    checkBatchConsistency(weights, config, [[5, 17, 42, 96, 0, 33, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [60, 61, 62, 63], [1, 2, 3, 4, 5, 6, 7]], 1e-5);
  });

  it("gelu_new is the tanh approximation", () => {
    expect(geluNew(0)).toBe(0);
    expect(geluNew(1)).toBeCloseTo(0.8411919906, 9);
    expect(geluNew(-1)).toBeCloseTo(-0.1588080094, 9);
    expect(geluNew(3)).toBeCloseTo(2.9963625, 6);
  });

  it("layer norm output has zero mean and unit variance before the affine part", () => {
    const ones: RefWeights = new Map(weights);
    ones.set("h.0.ln_1.weight", { shape: [48], data: new Float32Array(48).fill(1) });
    ones.set("h.0.ln_1.bias", { shape: [48], data: new Float32Array(48) });
    const { outputs } = referenceForward(ones, config, [[4, 5, 6]]);
    const y = outputs["transformer.h.0.ln_1"].data;
    for (let r = 0; r < 3; r++) {
      let s = 0, sq = 0;
      for (let i = 0; i < 48; i++) s += y[r * 48 + i];
      for (let i = 0; i < 48; i++) sq += (y[r * 48 + i] - s / 48) ** 2;
      expect(Math.abs(s / 48)).toBeLessThan(1e-6);
      expect(sq / 48).toBeCloseTo(1, 3);
    }
  });
});
