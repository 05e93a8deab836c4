/**
 * Random-weight Hugging Face checkpoints at real shapes, for tests and benchmarks: config.json,
 * generation_config.json, a small tokenizer, and safetensors weights (one file or N shards plus
 * an index) that load exactly like a downloaded model.
 *
 * Weights are deterministic: every tensor draws from its own stream, seeded from `(seed, tensor
 * name)`, so the values do not depend on the dtype's rounding aside, on sharding or on the order
 * of writing. Linear and embedding weights ~ N(0, initializer_range = 0.02), biases ~ N(0, 0.02),
 * norm weights ~ 1 + N(0, 0.02), norm biases ~ N(0, 0.02). Tensors are generated and written in
 * chunks, so even a 1B model never holds more than a few MB of weights in memory.
 *
 * The tokenizer is a character tokenizer (BPE without merges; spaces become `▁`, and Llama 1/2
 * presets prepend one as SentencePiece does): the preset's special tokens at their ids, then, when the vocabulary has room, the 256 byte-fallback
 * pieces `<0x00>`..`<0xFF>`, then `▁` (space) and the printable ASCII characters, then unreachable
 * filler pieces `<unused_ID>` up to the configured vocabulary size. Tiny vocabularies (no room for
 * byte fallback) map other characters to `<unk>`.
 */
import { mkdir, readdir, rm, writeFile } from "node:fs/promises";
import * as path from "node:path";
import { parseArgs } from "node:util";
import { NNsightError } from "../errors.js";
import { tensorByteSize, writeSafetensorsFile, type SafetensorsDtype, type SafetensorsTensorSource } from "../tensor/safetensors-format.js";
import { parseModelConfig, type ModelConfig } from "./config.js";

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers

/** 32-bit finalizer (MurmurHash3 fmix32): a bijective scrambler used to derive seeds. */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** FNV-1a hash of a string's UTF-16 code units. */
function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** xoshiro128** generator with Box–Muller normals. Deterministic for a given seed. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  private spare: number | null = null;

  /** Seed from a number (its low 53 bits) and an optional stream name (e.g. a tensor name). */
  constructor(seed: number, stream = "") {
    const lo = seed >>> 0;
    const hi = Math.floor(seed / 2 ** 32) >>> 0;
    let s = mix32(lo ^ mix32(hi ^ fnv1a(stream)));
    const next = () => (s = mix32((s + 0x9e3779b9) >>> 0));
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next() | 1; // never the all-zero state
  }

  /** Next uniform 32-bit unsigned integer. */
  nextU32(): number {
    const r = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return r;
  }

  /** Uniform in (0, 1]. */
  uniform(): number {
    return (this.nextU32() + 1) / 4294967296;
  }

  /** Standard normal (Box–Muller, both values of each pair used). */
  normal(): number {
    if (this.spare !== null) {
      const z = this.spare;
      this.spare = null;
      return z;
    }
    const r = Math.sqrt(-2 * Math.log(this.uniform()));
    const theta = 2 * Math.PI * this.uniform();
    this.spare = r * Math.sin(theta);
    return r * Math.cos(theta);
  }

  /**
   * Fill `out` with `mean + std * N(0, 1)`: the same values as calling {@link normal} for each
   * element, generated in bulk (faster).
   */
  fillNormal(out: Float32Array, mean: number, std: number): void {
    let i = 0;
    if (this.spare !== null && out.length > 0) {
      out[i++] = mean + std * this.spare;
      this.spare = null;
    }
    for (; i + 1 < out.length; i += 2) {
      const r = Math.sqrt(-2 * Math.log(this.uniform()));
      const theta = 2 * Math.PI * this.uniform();
      out[i] = mean + std * (r * Math.cos(theta));
      out[i + 1] = mean + std * (r * Math.sin(theta));
    }
    if (i < out.length) out[i] = mean + std * this.normal();
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

// ---------------------------------------------------------------------------------------------
// Float conversions

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** bfloat16 bits of a float (round to nearest even; NaN stays NaN). */
export function f32ToBf16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** IEEE half-precision bits of a float (round to nearest even, subnormals, ±inf on overflow). */
export function f32ToF16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

/** Storage dtypes a checkpoint can be written in, by their torch names. */
export const CHECKPOINT_DTYPES = { float32: "F32", bfloat16: "BF16", float16: "F16" } as const satisfies Record<string, SafetensorsDtype>;
export type CheckpointDtype = keyof typeof CHECKPOINT_DTYPES;

/** Encode floats as little-endian bytes of a storage dtype. */
export function encodeFloats(values: Float32Array, dtype: CheckpointDtype): Uint8Array {
  if (dtype === "float32") return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const out = new Uint16Array(values.length);
  if (dtype === "bfloat16") {
    const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
    for (let i = 0; i < bits.length; i++) {
      const b = bits[i]!;
      out[i] = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x40 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
    }
    return new Uint8Array(out.buffer);
  }
  for (let i = 0; i < values.length; i++) out[i] = f32ToF16Bits(values[i]!);
  return new Uint8Array(out.buffer);
}

// ---------------------------------------------------------------------------------------------
// Tensor layout of each architecture

/** How a tensor is initialized. */
export type InitKind = "normal" | "norm_weight" | "bias";

/** One tensor of a checkpoint. */
export interface CheckpointTensor {
  name: string;
  shape: number[];
  init: InitKind;
}

function llamaTensors(c: ModelConfig): CheckpointTensor[] {
  const H = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const out: CheckpointTensor[] = [{ name: "model.embed_tokens.weight", shape: [c.vocabSize, H], init: "normal" }];
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}`;
    const linear = (name: string, o: number, i: number, bias: boolean) => {
      out.push({ name: `${p}.${name}.weight`, shape: [o, i], init: "normal" });
      if (bias) out.push({ name: `${p}.${name}.bias`, shape: [o], init: "bias" });
    };
    out.push({ name: `${p}.input_layernorm.weight`, shape: [H], init: "norm_weight" });
    linear("self_attn.q_proj", q, H, c.attentionBias);
    linear("self_attn.k_proj", kv, H, c.attentionBias);
    linear("self_attn.v_proj", kv, H, c.attentionBias);
    linear("self_attn.o_proj", H, q, c.attentionBias);
    out.push({ name: `${p}.post_attention_layernorm.weight`, shape: [H], init: "norm_weight" });
    linear("mlp.gate_proj", I, H, c.mlpBias);
    linear("mlp.up_proj", I, H, c.mlpBias);
    linear("mlp.down_proj", H, I, c.mlpBias);
  }
  out.push({ name: "model.norm.weight", shape: [H], init: "norm_weight" });
  if (!c.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [c.vocabSize, H], init: "normal" });
  return out;
}

/** GPT-2 uses Conv1D: weights are stored `[in, out]`. */
function gpt2Tensors(c: ModelConfig): CheckpointTensor[] {
  const H = c.hiddenSize;
  const I = c.intermediateSize;
  const out: CheckpointTensor[] = [
    { name: "transformer.wte.weight", shape: [c.vocabSize, H], init: "normal" },
    { name: "transformer.wpe.weight", shape: [c.maxPositions, H], init: "normal" },
  ];
  for (let l = 0; l < c.numLayers; l++) {
    const p = `transformer.h.${l}`;
    const conv = (name: string, i: number, o: number) => {
      out.push({ name: `${p}.${name}.weight`, shape: [i, o], init: "normal" });
      out.push({ name: `${p}.${name}.bias`, shape: [o], init: "bias" });
    };
    out.push({ name: `${p}.ln_1.weight`, shape: [H], init: "norm_weight" }, { name: `${p}.ln_1.bias`, shape: [H], init: "bias" });
    conv("attn.c_attn", H, 3 * H);
    conv("attn.c_proj", H, H);
    out.push({ name: `${p}.ln_2.weight`, shape: [H], init: "norm_weight" }, { name: `${p}.ln_2.bias`, shape: [H], init: "bias" });
    conv("mlp.c_fc", H, I);
    conv("mlp.c_proj", I, H);
  }
  out.push({ name: "transformer.ln_f.weight", shape: [H], init: "norm_weight" }, { name: "transformer.ln_f.bias", shape: [H], init: "bias" });
  if (!c.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [c.vocabSize, H], init: "normal" });
  return out;
}

/** Every tensor an HF checkpoint of this config holds, with HF names, in model order. */
export function checkpointTensorList(config: ModelConfig): CheckpointTensor[] {
  return config.modelType === "llama" ? llamaTensors(config) : gpt2Tensors(config);
}

const CHUNK_ELEMENTS = 1 << 20;

/** The values of one tensor, generated lazily in chunks of at most 1 Mi elements. */
export function* randomTensorChunks(t: CheckpointTensor, seed: number, std: number): Generator<Float32Array> {
  const rng = new Rng(seed, t.name);
  const mean = t.init === "norm_weight" ? 1 : 0;
  let left = t.shape.reduce((a, b) => a * b, 1);
  while (left > 0) {
    const n = Math.min(left, CHUNK_ELEMENTS);
    const buf = new Float32Array(n);
    rng.fillNormal(buf, mean, std);
    left -= n;
    yield buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer for random models

/** Special tokens and conventions of a preset's tokenizer. */
export interface TokenizerSpec {
  /** Special tokens at fixed ids. */
  specials: Array<{ id: number; content: string }>;
  bos: string | null;
  eos: string;
  unk: string | null;
  /** Prepend BOS when encoding (Llama) or not (GPT-2). */
  addBos: boolean;
  /**
   * Prepend a space to the text, as SentencePiece (Llama 1/2) does; byte-level tokenizers
   * (GPT-2, Llama 3) do not, so text after a special token keeps its exact spacing.
   */
  prependSpace: boolean;
  chatTemplate?: string;
}

/** Printable ASCII without space, most useful first (letters, digits, punctuation). */
const PRINTABLE = (() => {
  const chars = Array.from({ length: 94 }, (_, i) => String.fromCharCode(0x21 + i));
  const rank = (ch: string) => (/[a-z]/.test(ch) ? 0 : /[A-Z]/.test(ch) ? 1 : /[0-9]/.test(ch) ? 2 : /[.,!?'"\-:;()]/.test(ch) ? 3 : 4);
  return chars.sort((x, y) => rank(x) - rank(y) || x.charCodeAt(0) - y.charCodeAt(0));
})();

/**
 * Build tokenizer.json and tokenizer_config.json for a vocabulary of `vocabSize` ids (see the
 * file comment for the vocabulary).
 */
export function makeCharTokenizer(spec: TokenizerSpec, vocabSize: number, maxLength: number): { tokenizerJson: object; tokenizerConfig: object } {
  const pieces = new Array<string | undefined>(vocabSize);
  for (const s of spec.specials) {
    if (s.id >= vocabSize) throw new NNsightError("BAD_INPUT", `special token ${s.content} id ${s.id} is outside the vocabulary of ${vocabSize}`);
    pieces[s.id] = s.content;
  }
  const free = vocabSize - spec.specials.length;
  const byteFallback = free >= 256 + 1 + PRINTABLE.length;
  if (!byteFallback && spec.unk === null) {
    throw new NNsightError("BAD_INPUT", `a vocabulary of ${vocabSize} has no room for byte fallback; the tokenizer needs an unk token`);
  }
  const ordinary = [...(byteFallback ? Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`) : []), "\u2581", ...PRINTABLE];
  let next = 0;
  for (let id = 0; id < vocabSize; id++) {
    if (pieces[id] !== undefined) continue;
    pieces[id] = next < ordinary.length ? ordinary[next++]! : `<unused_${id}>`;
  }
  const vocab: Record<string, number> = {};
  pieces.forEach((p, id) => (vocab[p!] = id));
  const added = spec.specials.map((s) => ({ id: s.id, content: s.content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  const bosId = spec.bos === null ? null : vocab[spec.bos]!;
  const tokenizerJson = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: {
      type: "Sequence",
      normalizers: [...(spec.prependSpace ? [{ type: "Prepend", prepend: "\u2581" }] : []), { type: "Replace", pattern: { String: " " }, content: "\u2581" }],
    },
    pre_tokenizer: null,
    post_processor:
      spec.addBos && spec.bos !== null
        ? {
            type: "TemplateProcessing",
            single: [{ SpecialToken: { id: spec.bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
            pair: [{ SpecialToken: { id: spec.bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { SpecialToken: { id: spec.bos, type_id: 1 } }, { Sequence: { id: "B", type_id: 1 } }],
            special_tokens: { [spec.bos]: { id: spec.bos, ids: [bosId], tokens: [spec.bos] } },
          }
        : null,
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "\u2581" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        ...(spec.prependSpace ? [{ type: "Strip", content: " ", start: 1, stop: 0 }] : []),
      ],
    },
    model: { type: "BPE", dropout: null, unk_token: spec.unk, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: true, byte_fallback: byteFallback, ignore_merges: false, vocab, merges: [] },
  };
  const tokenizerConfig = {
    add_bos_token: spec.addBos,
    add_eos_token: false,
    added_tokens_decoder: Object.fromEntries(added.map(({ id, ...rest }) => [String(id), rest])),
    bos_token: spec.bos,
    eos_token: spec.eos,
    unk_token: spec.unk,
    pad_token: null,
    clean_up_tokenization_spaces: false,
    model_max_length: maxLength,
    tokenizer_class: "PreTrainedTokenizerFast",
    ...(spec.chatTemplate ? { chat_template: spec.chatTemplate } : {}),
  };
  return { tokenizerJson, tokenizerConfig };
}

// ---------------------------------------------------------------------------------------------
// Presets

/** A named checkpoint shape. */
export interface CheckpointPreset {
  description: string;
  /** config.json (without torch_dtype, which the writer adds). */
  config: Record<string, unknown>;
  generationConfig: Record<string, unknown>;
  tokenizer: TokenizerSpec;
}

const LLAMA_SPECIALS: TokenizerSpec = {
  specials: [
    { id: 0, content: "<unk>" },
    { id: 1, content: "<s>" },
    { id: 2, content: "</s>" },
  ],
  bos: "<s>",
  eos: "</s>",
  unk: "<unk>",
  addBos: true,
  prependSpace: true,
};

const LLAMA3_CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

function llamaConfig(fields: Record<string, unknown>): Record<string, unknown> {
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_act: "silu",
    attention_bias: false,
    attention_dropout: 0.0,
    mlp_bias: false,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    rope_scaling: null,
    initializer_range: 0.02,
    pretraining_tp: 1,
    use_cache: true,
    bos_token_id: 1,
    eos_token_id: 2,
    ...fields,
  };
}

function gpt2Config(fields: Record<string, unknown>): Record<string, unknown> {
  return {
    architectures: ["GPT2LMHeadModel"],
    model_type: "gpt2",
    activation_function: "gelu_new",
    n_inner: null,
    layer_norm_epsilon: 1e-5,
    initializer_range: 0.02,
    attn_pdrop: 0.1,
    embd_pdrop: 0.1,
    resid_pdrop: 0.1,
    scale_attn_weights: true,
    tie_word_embeddings: true,
    use_cache: true,
    ...fields,
  };
}

/**
 * The presets:
 * - `gpt2-124m`: GPT-2 small (768 wide, 12 layers, 12 heads, 1024 positions, vocab 50257, tied).
 * - `llama-1b`: Llama-3.2-1B's shape (2048 wide, 16 layers, 32/8 heads, MLP 8192, vocab 128256,
 *   rope_theta 500000 with llama3 scaling factor 32, tied), Llama-3 special-token ids and a
 *   Llama-3-style chat template.
 * - `llama-850m`: TinyLlama-1.1B's width (2048, MLP 5632, 32/4 heads, vocab 32000, untied) with
 *   16 layers instead of 22: 836M parameters.
 * - `llama-110m`: stories110M's shape (768 wide, 12 layers, 12 heads, MLP 2048, vocab 32000,
 *   1024 positions), untied.
 * - `tiny-llama`: 48 wide, 3 layers, 6/2 heads (GQA, head dim 8), MLP 100, vocab 97, untied.
 * - `tiny-gpt2`: 48 wide, 2 layers, 3 heads (head dim 16), 64 positions, vocab 97, tied.
 */
export const CHECKPOINT_PRESETS: Record<string, CheckpointPreset> = {
  "gpt2-124m": {
    description: "GPT-2 small (124M)",
    config: gpt2Config({ n_embd: 768, n_layer: 12, n_head: 12, n_positions: 1024, n_ctx: 1024, vocab_size: 50257, bos_token_id: 50256, eos_token_id: 50256 }),
    generationConfig: { bos_token_id: 50256, eos_token_id: 50256 },
    tokenizer: { specials: [{ id: 50256, content: "<|endoftext|>" }], bos: "<|endoftext|>", eos: "<|endoftext|>", unk: null, addBos: false, prependSpace: false },
  },
  "llama-1b": {
    description: "Llama-3.2-1B shape (1.24B)",
    config: llamaConfig({
      hidden_size: 2048,
      intermediate_size: 8192,
      num_hidden_layers: 16,
      num_attention_heads: 32,
      num_key_value_heads: 8,
      head_dim: 64,
      vocab_size: 128256,
      max_position_embeddings: 131072,
      rope_theta: 500000.0,
      rope_scaling: { rope_type: "llama3", factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 },
      tie_word_embeddings: true,
      bos_token_id: 128000,
      eos_token_id: 128001,
    }),
    generationConfig: { bos_token_id: 128000, eos_token_id: [128001, 128008, 128009] },
    tokenizer: {
      specials: [
        { id: 128000, content: "<|begin_of_text|>" },
        { id: 128001, content: "<|end_of_text|>" },
        { id: 128006, content: "<|start_header_id|>" },
        { id: 128007, content: "<|end_header_id|>" },
        { id: 128008, content: "<|eom_id|>" },
        { id: 128009, content: "<|eot_id|>" },
      ],
      bos: "<|begin_of_text|>",
      eos: "<|end_of_text|>",
      unk: null,
      addBos: true,
      prependSpace: false,
      chatTemplate: LLAMA3_CHAT_TEMPLATE,
    },
  },
  "llama-850m": {
    description: "TinyLlama width, 16 layers (836M)",
    config: llamaConfig({
      hidden_size: 2048,
      intermediate_size: 5632,
      num_hidden_layers: 16,
      num_attention_heads: 32,
      num_key_value_heads: 4,
      vocab_size: 32000,
      max_position_embeddings: 2048,
      tie_word_embeddings: false,
    }),
    generationConfig: { bos_token_id: 1, eos_token_id: 2 },
    tokenizer: LLAMA_SPECIALS,
  },
  "llama-110m": {
    description: "stories110M shape (134M with the untied head)",
    config: llamaConfig({
      hidden_size: 768,
      intermediate_size: 2048,
      num_hidden_layers: 12,
      num_attention_heads: 12,
      num_key_value_heads: 12,
      vocab_size: 32000,
      max_position_embeddings: 1024,
      tie_word_embeddings: false,
    }),
    generationConfig: { bos_token_id: 1, eos_token_id: 2 },
    tokenizer: LLAMA_SPECIALS,
  },
  "tiny-llama": {
    description: "tiny Llama for tests (GQA 6/2, odd sizes)",
    config: llamaConfig({
      hidden_size: 48,
      intermediate_size: 100,
      num_hidden_layers: 3,
      num_attention_heads: 6,
      num_key_value_heads: 2,
      head_dim: 8,
      vocab_size: 97,
      max_position_embeddings: 128,
      tie_word_embeddings: false,
    }),
    generationConfig: { bos_token_id: 1, eos_token_id: 2 },
    tokenizer: LLAMA_SPECIALS,
  },
  "tiny-gpt2": {
    description: "tiny GPT-2 for tests",
    config: gpt2Config({ n_embd: 48, n_layer: 2, n_head: 3, n_positions: 64, n_ctx: 64, vocab_size: 97, bos_token_id: 96, eos_token_id: 96 }),
    generationConfig: { bos_token_id: 96, eos_token_id: 96 },
    tokenizer: {
      specials: [
        { id: 0, content: "<unk>" },
        { id: 96, content: "<|endoftext|>" },
      ],
      bos: "<|endoftext|>",
      eos: "<|endoftext|>",
      unk: "<unk>",
      addBos: false,
      prependSpace: false,
    },
  },
};

// ---------------------------------------------------------------------------------------------
// Writing

/** Options of {@link writeRandomCheckpoint}. */
export interface RandomCheckpointOptions {
  /** A name from {@link CHECKPOINT_PRESETS}. */
  preset: string;
  /** Storage dtype (default float32). */
  dtype?: CheckpointDtype;
  /** Number of safetensors shards (default 1: a single model.safetensors). */
  shards?: number;
  /** Seed of all weights (default 0). */
  seed?: number;
  /** Fields merged over the preset's config.json (e.g. `{ num_hidden_layers: 1 }`). */
  configOverrides?: Record<string, unknown>;
  /** Called after each tensor is written. */
  onProgress?: (p: { tensor: string; file: string; done: number; total: number; bytesDone: number; bytesTotal: number }) => void;
}

/** What {@link writeRandomCheckpoint} wrote. */
export interface RandomCheckpointResult {
  dir: string;
  config: ModelConfig;
  /** Weight files, absolute, in order. */
  weightFiles: string[];
  /** Parameters (elements) written. */
  numParameters: number;
  /** Bytes of tensor data written (the index's total_size). */
  totalBytes: number;
}

/** Shard file name, HF style: `model-00001-of-00003.safetensors`. */
export function shardFileName(i: number, n: number): string {
  return `model-${String(i + 1).padStart(5, "0")}-of-${String(n).padStart(5, "0")}.safetensors`;
}

/**
 * Split tensors, in order, into `n` non-empty contiguous groups of roughly equal bytes.
 * Returns each tensor's shard number.
 */
export function assignShards(sizes: readonly number[], n: number): number[] {
  if (!Number.isInteger(n) || n < 1) throw new NNsightError("BAD_INPUT", `shards must be a positive integer, got ${n}`);
  if (n > sizes.length) throw new NNsightError("BAD_INPUT", `cannot split ${sizes.length} tensors into ${n} shards`);
  const total = sizes.reduce((a, b) => a + b, 0);
  const out: number[] = [];
  let start = 0;
  let prev = 0;
  sizes.forEach((size, i) => {
    const lo = Math.max(prev, n - (sizes.length - i));
    const hi = i === 0 ? 0 : Math.min(prev + 1, n - 1);
    const want = total > 0 ? Math.floor((start * n) / total) : 0;
    prev = Math.min(hi, Math.max(lo, want));
    out.push(prev);
    start += size;
  });
  return out;
}

function presetOf(name: string): CheckpointPreset {
  const p = CHECKPOINT_PRESETS[name];
  if (!p) throw new NNsightError("BAD_INPUT", `unknown checkpoint preset "${name}"; presets: ${Object.keys(CHECKPOINT_PRESETS).join(", ")}`);
  return p;
}

async function writeJson(file: string, value: unknown): Promise<void> {
  await writeFile(file, JSON.stringify(value, null, 2) + "\n");
}

/**
 * Write a random-weight checkpoint into `outDir` (created if needed): config.json,
 * generation_config.json, tokenizer.json, tokenizer_config.json, and model.safetensors or
 * `shards` files plus model.safetensors.index.json.
 */
export async function writeRandomCheckpoint(outDir: string, opts: RandomCheckpointOptions): Promise<RandomCheckpointResult> {
  const preset = presetOf(opts.preset);
  const dtype = opts.dtype ?? "float32";
  if (!(dtype in CHECKPOINT_DTYPES)) throw new NNsightError("BAD_INPUT", `dtype must be one of ${Object.keys(CHECKPOINT_DTYPES).join(", ")}, got ${dtype}`);
  const seed = opts.seed ?? 0;
  const rawConfig: Record<string, unknown> = { ...preset.config, ...opts.configOverrides, torch_dtype: dtype };
  const config = parseModelConfig(rawConfig, `preset ${opts.preset}`);
  const std = typeof rawConfig.initializer_range === "number" ? rawConfig.initializer_range : 0.02;
  const stDtype = CHECKPOINT_DTYPES[dtype];
  const tensors = checkpointTensorList(config);
  const sizes = tensors.map((t) => tensorByteSize(stDtype, t.shape));
  const nShards = opts.shards ?? 1;
  const shardOf = assignShards(sizes, nShards);

  const dir = path.resolve(outDir);
  await mkdir(dir, { recursive: true });
  await removeOldWeights(dir);
  await writeJson(path.join(dir, "config.json"), rawConfig);
  await writeJson(path.join(dir, "generation_config.json"), preset.generationConfig);
  const tok = makeCharTokenizer(preset.tokenizer, config.vocabSize, config.maxPositions);
  await writeFile(path.join(dir, "tokenizer.json"), JSON.stringify(tok.tokenizerJson));
  await writeJson(path.join(dir, "tokenizer_config.json"), tok.tokenizerConfig);

  const totalBytes = sizes.reduce((a, b) => a + b, 0);
  const fileNames = nShards === 1 ? ["model.safetensors"] : Array.from({ length: nShards }, (_, i) => shardFileName(i, nShards));
  let done = 0;
  let bytesDone = 0;
  for (let s = 0; s < nShards; s++) {
    const sources: SafetensorsTensorSource[] = tensors
      .filter((_, i) => shardOf[i] === s)
      .map((t) => ({
        name: t.name,
        dtype: stDtype,
        shape: t.shape,
        bytes: () => mapIter(randomTensorChunks(t, seed, std), (chunk) => encodeFloats(chunk, dtype)),
      }));
    const file = path.join(dir, fileNames[s]!);
    await writeSafetensorsFile(file, sources, { format: "pt" }, (name, bytes) => {
      done++;
      bytesDone += bytes;
      opts.onProgress?.({ tensor: name, file: fileNames[s]!, done, total: tensors.length, bytesDone, bytesTotal: totalBytes });
    });
  }
  if (nShards > 1) {
    const weightMap = Object.fromEntries(tensors.map((t, i) => [t.name, fileNames[shardOf[i]!]!] as const).sort((a, b) => (a[0] < b[0] ? -1 : 1)));
    await writeJson(path.join(dir, "model.safetensors.index.json"), { metadata: { total_size: totalBytes }, weight_map: weightMap });
  }
  const numParameters = tensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
  return { dir, config, weightFiles: fileNames.map((f) => path.join(dir, f)), numParameters, totalBytes };
}

/** Delete weights of an earlier checkpoint in `dir`, so stale files cannot shadow the new ones. */
async function removeOldWeights(dir: string): Promise<void> {
  const old = (await readdir(dir)).filter((f) => /^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$/.test(f));
  await Promise.all(old.map((f) => rm(path.join(dir, f), { force: true })));
}

function* mapIter<A, B>(it: Iterable<A>, f: (a: A) => B): Generator<B> {
  for (const a of it) yield f(a);
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = `usage: make-checkpoint <preset> <out-dir> [--dtype float32|bfloat16|float16] [--shards N] [--seed N] [--force]
presets:
${Object.entries(CHECKPOINT_PRESETS)
  .map(([k, p]) => `  ${k.padEnd(12)} ${p.description}`)
  .join("\n")}`;

/**
 * `nnsight make-checkpoint`: parse arguments, write the checkpoint, print a progress line on a
 * TTY. Returns the exit code (0 ok, 1 failure, 2 usage error).
 */
export async function runMakeCheckpointCli(argv: string[], io: { stdout: NodeJS.WritableStream & { isTTY?: boolean }; stderr: NodeJS.WritableStream & { isTTY?: boolean } } = process): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { dtype: { type: "string", default: "float32" }, shards: { type: "string", default: "1" }, seed: { type: "string", default: "0" }, force: { type: "boolean", default: false }, help: { type: "boolean", short: "h" } },
    });
  } catch (e) {
    io.stderr.write(`${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help || positionals.length !== 2) {
    (values.help ? io.stdout : io.stderr).write(USAGE + "\n");
    return values.help ? 0 : 2;
  }
  const [preset, outDir] = positionals as [string, string];
  const shards = Number(values.shards);
  const seed = Number(values.seed);
  if (!Number.isInteger(shards) || shards < 1 || !Number.isSafeInteger(seed) || seed < 0) {
    io.stderr.write(`--shards must be a positive integer and --seed a non-negative integer\n${USAGE}\n`);
    return 2;
  }
  try {
    if (!values.force && (await readdir(outDir).catch(() => [])).length > 0) {
      throw new NNsightError("BAD_INPUT", `${outDir} is not empty; pass --force to write into it`);
    }
    const tty = Boolean(io.stderr.isTTY);
    const started = Date.now();
    const result = await writeRandomCheckpoint(outDir, {
      preset,
      dtype: values.dtype as CheckpointDtype,
      shards,
      seed,
      onProgress: tty
        ? (p) => io.stderr.write(`\r${p.file}: ${p.done}/${p.total} tensors, ${(p.bytesDone / 1e9).toFixed(2)}/${(p.bytesTotal / 1e9).toFixed(2)} GB   `)
        : undefined,
    });
    if (tty) io.stderr.write("\n");
    const secs = ((Date.now() - started) / 1000).toFixed(1);
    io.stdout.write(`wrote ${preset} (${(result.numParameters / 1e6).toFixed(1)}M parameters, ${values.dtype}) to ${result.dir} in ${secs} s\n`);
    return 0;
  } catch (e) {
    io.stderr.write(`make-checkpoint: ${(e as Error).message}\n`);
    return 1;
  }
}
