/**
 * Hugging Face `config.json` → one normalized, typed {@link ModelConfig} for every supported
 * architecture, RoPE frequencies as HF computes them, and {@link loadHFDirectory}, which reads
 * everything in a model folder except the weights and the tokenizer.
 */
import { readFile, stat } from "node:fs/promises";
import * as path from "node:path";
import { z } from "zod";
import { NNsightError } from "../errors.js";
import { parseShardIndex, type ShardIndex } from "../tensor/safetensors-format.js";

/** The `model_type`s this library runs. */
export const SUPPORTED_MODEL_TYPES = ["llama", "gpt2"] as const;
export type ModelType = (typeof SUPPORTED_MODEL_TYPES)[number];

/** The `rope_type`s understood (`default` means no scaling). */
export const SUPPORTED_ROPE_TYPES = ["default", "linear", "llama3"] as const;

/** RoPE scaling, normalized; `null` in {@link ModelConfig.ropeScaling} means none. */
export type RopeScaling =
  | { type: "linear"; factor: number }
  | { type: "llama3"; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number };

/** A model's architecture, the same shape for every `model_type`. */
export type AttnImplementation = "sdpa" | "eager";

/** HF's `attn_implementation` as a config carries it (`_attn_implementation` once HF has set it). */
export function attnImplementationOf(raw: Record<string, unknown>): AttnImplementation {
  const v = raw._attn_implementation ?? raw.attn_implementation;
  return v === "eager" ? "eager" : "sdpa";
}

export interface ModelConfig {
  modelType: ModelType;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** Key/value heads (GQA); equals `numHeads` without GQA. */
  numKvHeads: number;
  headDim: number;
  /** MLP hidden width. */
  intermediateSize: number;
  vocabSize: number;
  maxPositions: number;
  normEps: number;
  /** `rmsnorm` (Llama) or `layernorm` with bias (GPT-2). */
  normType: "rmsnorm" | "layernorm";
  /** `rope` (Llama) or a `learned` position embedding table (GPT-2 `wpe`). */
  positionEmbedding: "rope" | "learned";
  /** RoPE base; `null` without RoPE. */
  ropeTheta: number | null;
  ropeScaling: RopeScaling | null;
  /** The LM head shares the token embedding matrix. */
  tieWordEmbeddings: boolean;
  /** q/k/v/o projections have biases. */
  attentionBias: boolean;
  /** MLP projections have biases. */
  mlpBias: boolean;
  /** Activation name as in HF (`silu`, `gelu_new`, ...). */
  hiddenAct: string;
  bosTokenId: number | null;
  /** End-of-sequence ids from config.json (a single id becomes a one-element list). */
  eosTokenIds: number[];
  padTokenId: number | null;
  /** `torch_dtype` (or `dtype`) as stored, e.g. `bfloat16`; `null` when absent. */
  torchDtype: string | null;
  /**
   * How attention runs, as HF's `attn_implementation`: `"sdpa"` (default) is the fused kernel, whose hook
   * point inside `attention_interface_0` is `torch_nn_functional_scaled_dot_product_attention_0`;
   * `"eager"` computes scores, softmax and the weighted sum as separate ops (`torch_matmul_0`,
   * `nn_functional_softmax_0`, `torch_matmul_1`), so the attention probabilities can be read and edited.
   * Read from `_attn_implementation` / `attn_implementation` in config.json (any value but `"eager"`
   * means sdpa); the `attnImplementation` load option overrides it.
   */
  attnImplementation: AttnImplementation;
  /** The parsed config.json, untouched. */
  raw: Record<string, unknown>;
}

const posInt = z.number().int().positive();
/** Token ids; negative ones (old configs use -1 for "none") are dropped when normalizing. */
const tokenId = z.number().int();
const tokenIds = z.union([tokenId, z.array(tokenId)]).nullish();

const llamaSchema = z
  .object({
    hidden_size: posInt,
    intermediate_size: posInt,
    num_hidden_layers: posInt,
    num_attention_heads: posInt,
    num_key_value_heads: posInt.nullish(),
    head_dim: posInt.nullish(),
    vocab_size: posInt,
    max_position_embeddings: posInt.default(2048),
    rms_norm_eps: z.number().positive().default(1e-6),
    rope_theta: z.number().positive().nullish(),
    rope_scaling: z.record(z.unknown()).nullish(),
    rope_parameters: z.record(z.unknown()).nullish(),
    tie_word_embeddings: z.boolean().default(false),
    attention_bias: z.boolean().default(false),
    mlp_bias: z.boolean().default(false),
    hidden_act: z.string().default("silu"),
    bos_token_id: tokenId.nullish(),
    eos_token_id: tokenIds,
    pad_token_id: tokenId.nullish(),
  })
  .passthrough();

const gpt2Schema = z
  .object({
    n_embd: posInt.default(768),
    n_layer: posInt.default(12),
    n_head: posInt.default(12),
    n_positions: posInt.nullish(),
    n_ctx: posInt.nullish(),
    n_inner: posInt.nullish(),
    vocab_size: posInt.default(50257),
    layer_norm_epsilon: z.number().positive().default(1e-5),
    activation_function: z.string().default("gelu_new"),
    tie_word_embeddings: z.boolean().default(true),
    scale_attn_weights: z.boolean().default(true),
    scale_attn_by_inverse_layer_idx: z.boolean().default(false),
    reorder_and_upcast_attn: z.boolean().default(false),
    bos_token_id: tokenId.nullish(),
    eos_token_id: tokenIds,
    pad_token_id: tokenId.nullish(),
  })
  .passthrough();

function configError(file: string, issues: z.ZodIssue[]): NNsightError {
  const list = issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`).join("; ");
  return new NNsightError("IO", `${file}: invalid config: ${list}`, { file });
}

function asIdList(v: number | number[] | null | undefined): number[] {
  if (v === null || v === undefined) return [];
  return (Array.isArray(v) ? v : [v]).filter((id) => id >= 0);
}

function asId(v: number | null | undefined): number | null {
  return v === null || v === undefined || v < 0 ? null : v;
}

function rawDtype(raw: Record<string, unknown>): string | null {
  const d = raw.torch_dtype ?? raw.dtype;
  return typeof d === "string" ? d : null;
}

/** Normalize a `rope_scaling` (or v5 `rope_parameters`) object; `null` for none or `default`. */
export function parseRopeScaling(obj: Record<string, unknown> | null | undefined, file = "config.json"): RopeScaling | null {
  if (!obj) return null;
  const type = obj.rope_type ?? obj.type ?? "default";
  const num = (key: string, fallback?: number): number => {
    const v = obj[key] ?? fallback;
    if (typeof v !== "number" || !(v > 0)) {
      throw new NNsightError("IO", `${file}: rope_scaling.${key} must be a positive number, got ${JSON.stringify(v)}`, { file });
    }
    return v;
  };
  switch (type) {
    case "default":
      return null;
    case "linear":
      return { type: "linear", factor: num("factor") };
    case "llama3":
      return {
        type: "llama3",
        factor: num("factor"),
        lowFreqFactor: num("low_freq_factor"),
        highFreqFactor: num("high_freq_factor"),
        originalMaxPositions: num("original_max_position_embeddings"),
      };
    default:
      throw new NNsightError(
        "UNSUPPORTED",
        `${file}: rope scaling type ${JSON.stringify(type)} is not supported; supported: ${SUPPORTED_ROPE_TYPES.join(", ")}`,
        { file },
      );
  }
}

function parseLlama(raw: Record<string, unknown>, file: string): ModelConfig {
  const r = llamaSchema.safeParse(raw);
  if (!r.success) throw configError(file, r.error.issues);
  const c = r.data;
  const numKvHeads = c.num_key_value_heads ?? c.num_attention_heads;
  if (c.num_attention_heads % numKvHeads !== 0) {
    throw new NNsightError("IO", `${file}: num_attention_heads ${c.num_attention_heads} is not a multiple of num_key_value_heads ${numKvHeads}`, { file });
  }
  if (!c.head_dim && c.hidden_size % c.num_attention_heads !== 0) {
    throw new NNsightError("IO", `${file}: hidden_size ${c.hidden_size} is not a multiple of num_attention_heads ${c.num_attention_heads}`, { file });
  }
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (headDim % 2 !== 0) throw new NNsightError("IO", `${file}: head_dim ${headDim} must be even for RoPE`, { file });
  const params = c.rope_parameters ?? null;
  const ropeTheta = (typeof params?.rope_theta === "number" ? params.rope_theta : null) ?? c.rope_theta ?? 10000;
  return {
    modelType: "llama",
    hiddenSize: c.hidden_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    intermediateSize: c.intermediate_size,
    vocabSize: c.vocab_size,
    maxPositions: c.max_position_embeddings,
    normEps: c.rms_norm_eps,
    normType: "rmsnorm",
    positionEmbedding: "rope",
    ropeTheta,
    ropeScaling: parseRopeScaling(c.rope_scaling ?? params, file),
    tieWordEmbeddings: c.tie_word_embeddings,
    attentionBias: c.attention_bias,
    mlpBias: c.mlp_bias,
    hiddenAct: c.hidden_act,
    bosTokenId: asId(c.bos_token_id),
    eosTokenIds: asIdList(c.eos_token_id),
    padTokenId: asId(c.pad_token_id),
    torchDtype: rawDtype(raw),
    attnImplementation: attnImplementationOf(raw),
    raw,
  };
}

function parseGpt2(raw: Record<string, unknown>, file: string): ModelConfig {
  const r = gpt2Schema.safeParse(raw);
  if (!r.success) throw configError(file, r.error.issues);
  const c = r.data;
  if (c.n_embd % c.n_head !== 0) throw new NNsightError("IO", `${file}: n_embd ${c.n_embd} is not a multiple of n_head ${c.n_head}`, { file });
  for (const flag of ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] as const) {
    if (c[flag]) throw new NNsightError("UNSUPPORTED", `${file}: GPT-2 option ${flag}=true is not supported`, { file });
  }
  if (!c.scale_attn_weights) throw new NNsightError("UNSUPPORTED", `${file}: GPT-2 option scale_attn_weights=false is not supported`, { file });
  return {
    modelType: "gpt2",
    hiddenSize: c.n_embd,
    numLayers: c.n_layer,
    numHeads: c.n_head,
    numKvHeads: c.n_head,
    headDim: c.n_embd / c.n_head,
    intermediateSize: c.n_inner ?? 4 * c.n_embd,
    vocabSize: c.vocab_size,
    maxPositions: c.n_positions ?? c.n_ctx ?? 1024,
    normEps: c.layer_norm_epsilon,
    normType: "layernorm",
    positionEmbedding: "learned",
    ropeTheta: null,
    ropeScaling: null,
    tieWordEmbeddings: c.tie_word_embeddings,
    attentionBias: true,
    mlpBias: true,
    hiddenAct: c.activation_function,
    bosTokenId: c.bos_token_id === undefined ? 50256 : asId(c.bos_token_id),
    eosTokenIds: c.eos_token_id === undefined ? [50256] : asIdList(c.eos_token_id),
    padTokenId: asId(c.pad_token_id),
    torchDtype: rawDtype(raw),
    attnImplementation: attnImplementationOf(raw),
    raw,
  };
}

/**
 * Normalize a parsed `config.json`.
 *
 * @throws NNsightError `UNSUPPORTED` for an unknown `model_type` or rope scaling (listing the
 *   supported ones), `IO` for missing or ill-typed fields (naming them and `file`)
 */
export function parseModelConfig(raw: unknown, file = "config.json"): ModelConfig {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new NNsightError("IO", `${file}: config is not a JSON object`, { file });
  }
  const obj = raw as Record<string, unknown>;
  const type = obj.model_type;
  if (type === "llama") return parseLlama(obj, file);
  if (type === "gpt2") return parseGpt2(obj, file);
  throw new NNsightError(
    "UNSUPPORTED",
    `${file}: model_type ${JSON.stringify(type)} is not supported; supported: ${SUPPORTED_MODEL_TYPES.join(", ")}`,
    { file, modelType: type },
  );
}

/** HF's default RoPE frequencies: `1 / theta^(2i / dim)` for `i < dim / 2` (computed in f64). */
export function defaultRopeInvFreq(theta: number, dim: number): Float64Array {
  const out = new Float64Array(dim / 2);
  for (let i = 0; i < out.length; i++) out[i] = 1 / Math.pow(theta, (2 * i) / dim);
  return out;
}

/**
 * HF `_compute_llama3_parameters`: frequencies whose wavelength is longer than
 * `originalMaxPositions / lowFreqFactor` are divided by `factor`, those shorter than
 * `originalMaxPositions / highFreqFactor` are kept, and the band in between is interpolated.
 */
export function llama3ScaleInvFreq(invFreq: Float64Array, s: Extract<RopeScaling, { type: "llama3" }>): Float64Array {
  const lowFreqWavelen = s.originalMaxPositions / s.lowFreqFactor;
  const highFreqWavelen = s.originalMaxPositions / s.highFreqFactor;
  return invFreq.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highFreqWavelen) return f;
    if (wavelen > lowFreqWavelen) return f / s.factor;
    const smooth = (s.originalMaxPositions / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return (1 - smooth) * (f / s.factor) + smooth * f;
  });
}

/**
 * The RoPE inverse frequencies (`headDim / 2` of them) with the config's scaling applied, as HF
 * computes them (in f64 here, rounded once to f32; HF computes in f32, so values may differ by
 * an ulp). Supports no scaling, `linear` (divide by factor) and `llama3`.
 *
 * @throws NNsightError `UNSUPPORTED` for a model without RoPE
 */
export function computeRopeInvFreq(config: Pick<ModelConfig, "ropeTheta" | "ropeScaling" | "headDim" | "modelType">): Float32Array {
  if (config.ropeTheta === null) {
    throw new NNsightError("UNSUPPORTED", `model_type ${config.modelType} has no rotary position embedding`);
  }
  let inv = defaultRopeInvFreq(config.ropeTheta, config.headDim);
  const s = config.ropeScaling;
  if (s?.type === "linear") inv = inv.map((f) => f / s.factor);
  else if (s?.type === "llama3") inv = llama3ScaleInvFreq(inv, s);
  return Float32Array.from(inv);
}

// ---------------------------------------------------------------------------------------------
// A model folder

/** Everything in an HF model folder but the weights and the tokenizer. */
export interface HFDirectory {
  /** Absolute path of the folder. */
  dir: string;
  config: ModelConfig;
  /** generation_config.json, or `null` when the folder has none. */
  generationConfig: Record<string, unknown> | null;
  /** tokenizer_config.json, or `null` when the folder has none. */
  tokenizerConfig: Record<string, unknown> | null;
  /** Absolute paths: `model.safetensors`, or the shards named by the index, in order. */
  weightFiles: string[];
  /** The shard index when the weights are sharded. */
  shardIndex: ShardIndex | null;
}

async function isFile(p: string): Promise<boolean> {
  return stat(p).then((s) => s.isFile(), () => false);
}

/** Read and parse a JSON file; `null` when it does not exist and `optional`. */
export async function readJsonFile(file: string, optional: true): Promise<Record<string, unknown> | null>;
export async function readJsonFile(file: string, optional?: false): Promise<Record<string, unknown>>;
export async function readJsonFile(file: string, optional = false): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    if (optional && (e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw new NNsightError("IO", `${file}: cannot read (${(e as Error).message})`, { file }, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new NNsightError("IO", `${file}: invalid JSON (${(e as Error).message})`, { file });
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new NNsightError("IO", `${file}: expected a JSON object`, { file });
  }
  return json as Record<string, unknown>;
}

async function findWeightFiles(dir: string): Promise<{ files: string[]; index: ShardIndex | null }> {
  const single = path.join(dir, "model.safetensors");
  if (await isFile(single)) return { files: [single], index: null };
  const indexFile = path.join(dir, "model.safetensors.index.json");
  const indexJson = await readJsonFile(indexFile, true);
  if (indexJson) {
    const index = parseShardIndex(indexJson, dir, indexFile);
    for (const f of index.files) {
      if (!(await isFile(f))) {
        throw new NNsightError("IO", `${indexFile} names shard ${path.basename(f)}, which is missing from ${dir}`, { file: f });
      }
    }
    return { files: index.files, index };
  }
  for (const legacy of ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt"]) {
    if (await isFile(path.join(dir, legacy))) {
      throw new NNsightError(
        "UNSUPPORTED",
        `${dir} holds PyTorch pickle weights (${legacy}) but no safetensors; convert them (e.g. save_pretrained(..., safe_serialization=True))`,
        { file: path.join(dir, legacy) },
      );
    }
  }
  throw new NNsightError("IO", `${dir} has no weights: neither model.safetensors nor model.safetensors.index.json`, { file: single });
}

/**
 * Read an HF model folder: config.json (required), generation_config.json and
 * tokenizer_config.json (optional), and the list of safetensors weight files.
 *
 * @throws NNsightError `MODEL_NOT_FOUND` when `dir` is not a folder, `IO` for a missing
 *   config.json, missing weights or a shard missing from the index, `UNSUPPORTED` for an unknown
 *   `model_type` or pickle-only weights
 */
export async function loadHFDirectory(dir: string): Promise<HFDirectory> {
  const abs = path.resolve(dir);
  const s = await stat(abs).catch(() => null);
  if (!s?.isDirectory()) throw new NNsightError("MODEL_NOT_FOUND", `model directory ${abs} does not exist`, { dir: abs });
  const configFile = path.join(abs, "config.json");
  if (!(await isFile(configFile))) {
    throw new NNsightError("IO", `${abs} has no config.json: not a Hugging Face model directory`, { file: configFile });
  }
  const config = parseModelConfig(await readJsonFile(configFile), configFile);
  const generationConfig = await readJsonFile(path.join(abs, "generation_config.json"), true);
  const tokenizerConfig = await readJsonFile(path.join(abs, "tokenizer_config.json"), true);
  const { files, index } = await findWeightFiles(abs);
  return { dir: abs, config, generationConfig, tokenizerConfig, weightFiles: files, shardIndex: index };
}
