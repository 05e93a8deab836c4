import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { computeRopeInvFreq, loadHFDirectory, parseModelConfig } from "../../ts/src/models/config.js";

const llama32_1b = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_size: 2048,
  intermediate_size: 8192,
  num_hidden_layers: 16,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 64,
  vocab_size: 128256,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000.0,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: "llama3" },
  tie_word_embeddings: true,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  torch_dtype: "bfloat16",
};

const gpt2 = {
  model_type: "gpt2",
  n_embd: 768,
  n_layer: 12,
  n_head: 12,
  n_positions: 1024,
  n_ctx: 1024,
  n_inner: null,
  vocab_size: 50257,
  layer_norm_epsilon: 1e-5,
  activation_function: "gelu_new",
  bos_token_id: 50256,
  eos_token_id: 50256,
};

describe("config normalization", () => {
  it("normalizes the bundled stories260K (llama, GQA, tied)", async () => {
    const d = await loadHFDirectory("models/stories260K");
    expect(d.config).toMatchObject({
      modelType: "llama",
      hiddenSize: 64,
      numLayers: 5,
      numHeads: 8,
      numKvHeads: 4,
      headDim: 8,
      intermediateSize: 172,
      vocabSize: 512,
      maxPositions: 512,
      normEps: 1e-5,
      normType: "rmsnorm",
      positionEmbedding: "rope",
      ropeTheta: 10000,
      ropeScaling: null,
      tieWordEmbeddings: true,
      attentionBias: false,
      mlpBias: false,
      hiddenAct: "silu",
      bosTokenId: 1,
      eosTokenIds: [2],
      torchDtype: "float32",
    });
    expect(d.generationConfig).toMatchObject({ eos_token_id: [2, 1] });
    expect(d.tokenizerConfig).toMatchObject({ bos_token: "<s>" });
    expect(d.weightFiles).toEqual([path.resolve("models/stories260K/model.safetensors")]);
    expect(d.shardIndex).toBeNull();
  });

  it("applies Llama defaults (kv heads, head dim, untied head)", () => {
    const c = parseModelConfig({ model_type: "llama", hidden_size: 96, intermediate_size: 200, num_hidden_layers: 2, num_attention_heads: 6, vocab_size: 50 });
    expect(c).toMatchObject({ numKvHeads: 6, headDim: 16, tieWordEmbeddings: false, ropeTheta: 10000, maxPositions: 2048, normEps: 1e-6, eosTokenIds: [] });
    // old configs say -1 for "no token"
    const old = parseModelConfig({ model_type: "llama", hidden_size: 96, intermediate_size: 200, num_hidden_layers: 2, num_attention_heads: 6, vocab_size: 50, pad_token_id: -1, eos_token_id: [2, -1] });
    expect(old).toMatchObject({ padTokenId: null, eosTokenIds: [2] });
  });

  it("normalizes Llama-3.2-1B with llama3 rope scaling and several eos ids", () => {
    const c = parseModelConfig(llama32_1b);
    expect(c.ropeScaling).toEqual({ type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 });
    expect(c).toMatchObject({ numKvHeads: 8, headDim: 64, tieWordEmbeddings: true, eosTokenIds: [128001, 128008, 128009], torchDtype: "bfloat16" });
    expect(c.raw).toBe(llama32_1b);
  });

  it("reads transformers v5 rope_parameters", () => {
    const { rope_scaling: _rs, rope_theta: _rt, ...rest } = llama32_1b;
    const c = parseModelConfig({ ...rest, rope_parameters: { rope_type: "linear", factor: 2, rope_theta: 1234 } });
    expect(c.ropeTheta).toBe(1234);
    expect(c.ropeScaling).toEqual({ type: "linear", factor: 2 });
  });

  it("normalizes GPT-2 field names (n_inner null → 4 * n_embd, tied, learned positions)", () => {
    const c = parseModelConfig(gpt2);
    expect(c).toMatchObject({
      modelType: "gpt2",
      hiddenSize: 768,
      numLayers: 12,
      numHeads: 12,
      numKvHeads: 12,
      headDim: 64,
      intermediateSize: 3072,
      vocabSize: 50257,
      maxPositions: 1024,
      normEps: 1e-5,
      normType: "layernorm",
      positionEmbedding: "learned",
      ropeTheta: null,
      tieWordEmbeddings: true,
      attentionBias: true,
      mlpBias: true,
      hiddenAct: "gelu_new",
      bosTokenId: 50256,
      eosTokenIds: [50256],
    });
    expect(parseModelConfig({ ...gpt2, n_inner: 1000 }).intermediateSize).toBe(1000);
  });

  it("rejects unknown model types, rope types and bad fields with coded errors", () => {
    expect(() => parseModelConfig({ model_type: "mamba" })).toThrow(expect.objectContaining({ code: "UNSUPPORTED", message: expect.stringMatching(/"mamba".*supported: llama, gpt2/) }));
    expect(() => parseModelConfig({ ...llama32_1b, rope_scaling: { rope_type: "yarn", factor: 4 } })).toThrow(
      expect.objectContaining({ code: "UNSUPPORTED", message: expect.stringMatching(/"yarn".*default, linear, llama3/) }),
    );
    expect(() => parseModelConfig({ ...llama32_1b, hidden_size: "big" })).toThrow(expect.objectContaining({ code: "IO", message: expect.stringMatching(/hidden_size/) }));
    expect(() => parseModelConfig({ ...llama32_1b, num_key_value_heads: 5 })).toThrow(expect.objectContaining({ code: "IO" }));
    expect(() => parseModelConfig({ ...llama32_1b, rope_scaling: { rope_type: "llama3", factor: 8 } })).toThrow(
      expect.objectContaining({ code: "IO", message: expect.stringMatching(/low_freq_factor/) }),
    );
    expect(() => parseModelConfig({ ...gpt2, scale_attn_by_inverse_layer_idx: true })).toThrow(expect.objectContaining({ code: "UNSUPPORTED" }));
  });
});

describe("computeRopeInvFreq", () => {
  const base = { modelType: "llama" as const, headDim: 8, ropeTheta: 10000 };

  it("default: 1 / theta^(2i / headDim)", () => {
    const f = computeRopeInvFreq({ ...base, ropeScaling: null });
    expect([...f]).toEqual([1, 0.1, 0.01, 0.001].map(Math.fround));
  });

  it("linear: divided by the factor", () => {
    const f = computeRopeInvFreq({ ...base, ropeScaling: { type: "linear", factor: 4 } });
    expect([...f]).toEqual([0.25, 0.025, 0.0025, 0.00025].map(Math.fround));
  });

  it("llama3: keeps high frequencies, divides low ones, interpolates the band in between", () => {
    // factor 8, low 1, high 4, original context 1000: low_freq_wavelen = 1000, high_freq_wavelen = 250.
    // wavelengths 2π/f: 6.28 (keep), 62.8 (keep), 628.3 (medium), 6283 (divide by 8).
    const f = computeRopeInvFreq({ ...base, ropeScaling: { type: "llama3", factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 1000 } });
    const smooth = (1000 / ((2 * Math.PI) / 0.01) - 1) / (4 - 1); // 0.19718...
    const medium = (1 - smooth) * (0.01 / 8) + smooth * 0.01; // 0.00297535...
    expect(smooth).toBeCloseTo(0.1971831, 6);
    expect(medium).toBeCloseTo(0.00297535, 7);
    expect([...f]).toEqual([1, 0.1, medium, 0.001 / 8].map(Math.fround));
  });

  it("llama3 on Llama-3.2-1B: first frequency kept, last divided by 32", () => {
    const c = parseModelConfig(llama32_1b);
    const f = computeRopeInvFreq(c);
    expect(f.length).toBe(32);
    expect(f[0]).toBe(1);
    expect(f[31]).toBeCloseTo(Math.pow(500000, -62 / 64) / 32, 12);
    // i = 12: wavelen = 2π·500000^(24/64) ≈ 861 < 2048 → unchanged
    expect(f[12]).toBe(Math.fround(Math.pow(500000, -24 / 64)));
  });

  it("refuses models without RoPE", () => {
    expect(() => computeRopeInvFreq(parseModelConfig(gpt2))).toThrow(expect.objectContaining({ code: "UNSUPPORTED" }));
  });
});

describe("loadHFDirectory errors", () => {
  const tmp = () => mkdtempSync(path.join(tmpdir(), "hfdir-"));
  const cfg = JSON.stringify({ model_type: "llama", hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, vocab_size: 10 });

  it("missing directory, config, weights, shard", async () => {
    await expect(loadHFDirectory("/nonexistent/model")).rejects.toMatchObject({ code: "MODEL_NOT_FOUND" });
    const d = tmp();
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/no config\.json/) });
    writeFileSync(path.join(d, "config.json"), cfg);
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/no weights/) });
    writeFileSync(path.join(d, "pytorch_model.bin"), "");
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "UNSUPPORTED", message: expect.stringMatching(/pytorch_model\.bin/) });
    writeFileSync(path.join(d, "model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "s1.safetensors", b: "s2.safetensors" } }));
    writeFileSync(path.join(d, "s1.safetensors"), "");
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/s2\.safetensors.*missing/) });
    writeFileSync(path.join(d, "s2.safetensors"), "");
    const ok = await loadHFDirectory(d);
    expect(ok.weightFiles).toEqual([path.join(d, "s1.safetensors"), path.join(d, "s2.safetensors")]);
    expect(ok.generationConfig).toBeNull();
    writeFileSync(path.join(d, "generation_config.json"), "{oops");
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/generation_config\.json.*invalid JSON/) });
  });

  it("unknown model_type in a folder", async () => {
    const d = tmp();
    mkdirSync(d, { recursive: true });
    writeFileSync(path.join(d, "config.json"), JSON.stringify({ model_type: "bert" }));
    await expect(loadHFDirectory(d)).rejects.toMatchObject({ code: "UNSUPPORTED" });
  });
});
