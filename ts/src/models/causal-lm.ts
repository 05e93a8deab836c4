/**
 * A loaded causal language model: config, tokenizer, weights (memory-mapped), the module tree, and the
 * plain forward pass and generation. The tracing layer (`ts/src/trace`) builds on `forwardBatch` and
 * `generateRows` through their hooks.
 *
 * ```ts
 * const model = await LanguageModel.load("stories260K");
 * const { sequences } = await model.generateText("Once upon a time", { maxNewTokens: 20 });
 * ```
 */
import { join } from "node:path";

import type { Communicator } from "../cluster/communicator.js";
import { NNsightError } from "../errors.js";
import { PACKAGE_ROOT, native } from "../native/binding.js";
import { deviceName, parseDevice, requireDevice, withDefaultDevice } from "../tensor/device.js";
import { type DType, parseDType } from "../tensor/dtype.js";
import { loadSafetensors } from "../tensor/safetensors.js";
import { keep } from "../tensor/scope.js";
import type { Tensor } from "../tensor/tensor.js";
import { progress } from "../util/progress.js";
import { type PromptInput, type Row, makeBatch, toRows } from "./batch.js";
import { type AttnImplementation, type ModelConfig, computeRopeInvFreq, loadHFDirectory } from "./config.js";
import { type GenerateHooks, type GenerateOptions, type GenerateResult, generateTokens } from "./generate.js";
import { resolveModelDir } from "./hub.js";
import { type ModuleSpec, buildModuleTree } from "./module-tree.js";
import type { KVCache } from "./kv-cache.js";
import { Tokenizer } from "./tokenizer.js";
import { TensorParallel, shardPlan, shardWeights } from "./tensor-parallel.js";
import { type ModuleHooks, TransformerLM } from "./transformer.js";

export interface LoadModelOptions {
  /** weight storage dtype; default: as stored in the checkpoint (CPU computes in f32) */
  dtype?: DType | "float32" | "bfloat16" | "float16";
  /**
   * "cpu" (default) or "cuda[:n]": the weights are copied to that GPU and every forward pass runs there
   * (NNsightError DEVICE, with the reason, where CUDA is unavailable)
   */
  device?: string;
  /** CPU threads for kernels (default: all cores) */
  threads?: number;
  /** Hub revision (branch, tag or commit) for Hub ids */
  revision?: string;
  /** Hub token for gated models (default: $HF_TOKEN) */
  token?: string;
  /**
   * Tensor parallelism: this process is rank `comm.rank` of `comm.world` (see `launchRanks`/`joinGroup`).
   * It keeps only its shard of the attention and MLP weights, and every rank must then run the same
   * forward passes, traces and generations in the same order. Hooks and traces see full activations.
   * A world of 1 loads the plain model. BAD_INPUT when heads, kv heads or the MLP width do not divide.
   */
  tensorParallel?: Communicator;
  /**
   * How attention runs, as HF's `attn_implementation` (default: the config's, else `"sdpa"`). `"eager"`
   * computes the attention probabilities as a tensor of their own, readable and editable at
   * `<attention>.source.attention_interface_0.source.nn_functional_softmax_0`, at the cost of the fused
   * kernel's speed; `"sdpa"` runs the fused kernel. BAD_INPUT for any other value.
   */
  attnImplementation?: AttnImplementation;
}

/** What a model is built from (weights are shared between models built from the same parts). */
export interface CausalLMParts {
  dir: string;
  spec: ModelConfig;
  tokenizer: Tokenizer;
  lm: TransformerLM;
  generationConfig: Record<string, unknown> | null;
}

export const BUNDLED_MODELS_DIR = join(PACKAGE_ROOT, "models");

export class CausalLM {
  /** the parsed config.json, as in Hugging Face */
  readonly config: Record<string, unknown>;
  /** the normalized config the runtime uses */
  readonly spec: ModelConfig;
  readonly tokenizer: Tokenizer;
  /** the module tree (HF names), available before any forward pass */
  readonly moduleTree: ModuleSpec;
  /** @internal */
  readonly _lm: TransformerLM;
  /** the directory the model was loaded from */
  readonly dir: string;
  /** @internal */ readonly _generationConfig: Record<string, unknown>;
  private disposed = false;

  /** @internal Use LanguageModel.load(). */
  constructor(init: CausalLMParts) {
    this.dir = init.dir;
    this.spec = init.spec;
    this.config = init.spec.raw;
    this.tokenizer = init.tokenizer;
    this._lm = init.lm;
    this.moduleTree = buildModuleTree(init.spec);
    this._generationConfig = init.generationConfig ?? {};
  }

  /** @internal Shared by subclasses: read the directory, tokenizer and weights. */
  protected static async loadParts(idOrDir: string, opts: LoadModelOptions): Promise<CausalLMParts> {
    const device = parseDevice(opts.device ?? "cpu");
    requireDevice(device, "loading a model"); // before reading anything: DEVICE with the reason
    if (opts.threads !== undefined) {
      if (!Number.isInteger(opts.threads) || opts.threads < 1) throw new NNsightError("BAD_INPUT", `threads must be a positive integer, got ${opts.threads}`);
      native.setThreads(opts.threads);
    }
    const dir = await resolveModelDir(idOrDir, { revision: opts.revision, token: opts.token, bundledDir: BUNDLED_MODELS_DIR });
    const hf = await loadHFDirectory(dir);
    if (opts.attnImplementation !== undefined) {
      if (opts.attnImplementation !== "sdpa" && opts.attnImplementation !== "eager") {
        throw new NNsightError("BAD_INPUT", `attnImplementation must be "sdpa" or "eager", got ${JSON.stringify(opts.attnImplementation)}`);
      }
      // the raw config carries it too, so a served model's clients build the same module tree
      hf.config = { ...hf.config, attnImplementation: opts.attnImplementation, raw: { ...hf.config.raw, _attn_implementation: opts.attnImplementation } };
    }
    const tokenizer = await Tokenizer.fromDir(dir);
    const bar = progress("loading weights");
    const weights = await loadSafetensors(hf.weightFiles, {
      dtype: opts.dtype ? parseDType(opts.dtype) : undefined,
      skipUnsupported: true, // e.g. GPT-2's U8 causal-mask buffers; needed weights are checked below
      onProgress: (d, t, name) => bar.update(d, t, name),
    });
    bar.done();
    checkWeights(hf.config, weights, dir);
    const invFreq = hf.config.positionEmbedding === "rope" ? computeRopeInvFreq(hf.config) : null;
    let tp: TensorParallel | null = null;
    const comm = opts.tensorParallel;
    if (comm && comm.world > 1) {
      if (comm.device !== deviceName(device)) {
        throw new NNsightError(
          "DEVICE",
          `the model is loaded on ${deviceName(device)} but its communicator moves tensors on ${comm.device}: ${device < 0 ? "use a shm communicator for CPU models" : `use an NCCL communicator on ${deviceName(device)}`}`,
        );
      }
      const plan = shardPlan(hf.config, comm.world);
      tp = new TensorParallel(comm, plan);
      const mine = shardWeights(weights, plan, comm.rank);
      for (const [name, t] of weights) if (mine.get(name) !== t) t.dispose(); // the shard is a view or a copy
      weights.clear();
      for (const [name, t] of mine) weights.set(name, t);
    }
    let lm: TransformerLM;
    if (device < 0) {
      lm = new TransformerLM(hf.config, weights, invFreq, tp);
    } else {
      for (const [name, t] of weights) {
        weights.set(name, keep(t.to(deviceName(device)))); // kept like loadSafetensors keeps the originals
        t.dispose(); // the host copy (a view of the mapped file) is released once the copy ran
      }
      lm = withDefaultDevice(device, () => new DeviceTransformerLM(hf.config, weights, invFreq, device, tp));
    }
    return { dir: hf.dir, spec: hf.config, tokenizer, lm, generationConfig: hf.generationConfig };
  }

  /** Load a model from a directory, a Hub id in the local cache, or the bundled `"stories260K"`. */
  static async load(idOrDir = "stories260K", opts: LoadModelOptions = {}): Promise<CausalLM> {
    return new CausalLM(await CausalLM.loadParts(idOrDir, opts));
  }

  /** @internal */
  _checkAlive(): void {
    if (this.disposed) throw new NNsightError("DISPOSED", "this model was disposed");
  }

  /** Token rows for any accepted prompt form. */
  toRows(input: PromptInput): Row[] {
    this._checkAlive();
    return toRows(input, this.tokenizer, this.spec.vocabSize);
  }

  /** @internal One forward pass over rows (left padded), with optional hooks. Returns logits [B, T, V]. */
  _forwardRows(rows: Row[], hooks: ModuleHooks | null = null): Tensor {
    this._checkAlive();
    return this._lm.forward(makeBatch(rows, this.tokenizer.padTokenId), { hooks });
  }

  /** Logits [batch, seq, vocab] of a plain forward pass (left padding for batches). */
  async forward(input: PromptInput): Promise<Tensor> {
    const t = this._forwardRows(this.toRows(input));
    await native.sync();
    return t;
  }

  /** Default stop ids: generation_config.json, else config.json, else the tokenizer's. */
  get eosTokenIds(): number[] {
    const g = this._generationConfig.eos_token_id;
    if (typeof g === "number") return [g];
    if (Array.isArray(g)) return g.filter((x): x is number => typeof x === "number");
    if (this.spec.eosTokenIds.length) return this.spec.eosTokenIds;
    return this.tokenizer.eosTokenIds;
  }

  /** @internal Generation over rows with optional per-step hooks. */
  _generateRows(rows: Row[], opts: GenerateOptions, hooks?: GenerateHooks): Promise<GenerateResult> {
    this._checkAlive();
    const sampleDefault = this._generationConfig.do_sample === true;
    return generateTokens(
      this._lm,
      rows,
      { doSample: sampleDefault ? undefined : opts.doSample, ...opts, padId: this.tokenizer.padTokenId, defaultEos: this.eosTokenIds },
      hooks,
    );
  }

  /** Generate and decode: per prompt, the full text (prompt + continuation) and the token ids. */
  async generateText(input: PromptInput, opts: GenerateOptions = {}): Promise<{ texts: string[]; sequences: number[][]; generated: number[][] }> {
    const r = await this._generateRows(this.toRows(input), opts);
    return {
      texts: r.sequences.map((s) => this.tokenizer.decode(s, { skipSpecialTokens: true })),
      sequences: r.sequences,
      generated: r.generated,
    };
  }

  /** Free the weights (mapped files are unmapped once no tensor views them). */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await native.sync();
    this._lm.disposeTables();
    for (const t of this._lm.weights.values()) t.dispose();
  }
  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

/**
 * A TransformerLM on a CUDA device: its weights live there, and every forward pass, module call and
 * cache it makes creates its tensors (ids, positions, masks, KV buffers) there too.
 */
class DeviceTransformerLM extends TransformerLM {
  readonly deviceIndex: number;
  constructor(config: ModelConfig, weights: Map<string, Tensor>, invFreq: Float32Array | null, deviceIndex: number, tp: TensorParallel | null) {
    super(config, weights, invFreq, tp);
    this.deviceIndex = deviceIndex;
  }
  override forward(...args: Parameters<TransformerLM["forward"]>): Tensor {
    return withDefaultDevice(this.deviceIndex, () => super.forward(...args));
  }
  override callModule(...args: Parameters<TransformerLM["callModule"]>): Tensor {
    return withDefaultDevice(this.deviceIndex, () => super.callModule(...args));
  }
  override newCache(...args: Parameters<TransformerLM["newCache"]>): KVCache {
    return withDefaultDevice(this.deviceIndex, () => super.newCache(...args));
  }
}

/** Every weight the architecture needs must be present with the right shape. */
function checkWeights(c: ModelConfig, w: Map<string, Tensor>, dir: string): void {
  const need: Array<[string, number[]]> = [];
  const D = c.hiddenSize, hd = c.headDim, F = c.intermediateSize, V = c.vocabSize;
  if (c.modelType === "llama") {
    need.push(["model.embed_tokens.weight", [V, D]], ["model.norm.weight", [D]]);
    if (!c.tieWordEmbeddings || w.has("lm_head.weight")) need.push(["lm_head.weight", [V, D]]);
    for (let l = 0; l < c.numLayers; l++) {
      const p = `model.layers.${l}`;
      need.push(
        [`${p}.input_layernorm.weight`, [D]],
        [`${p}.post_attention_layernorm.weight`, [D]],
        [`${p}.self_attn.q_proj.weight`, [c.numHeads * hd, D]],
        [`${p}.self_attn.k_proj.weight`, [c.numKvHeads * hd, D]],
        [`${p}.self_attn.v_proj.weight`, [c.numKvHeads * hd, D]],
        [`${p}.self_attn.o_proj.weight`, [D, c.numHeads * hd]],
        [`${p}.mlp.gate_proj.weight`, [F, D]],
        [`${p}.mlp.up_proj.weight`, [F, D]],
        [`${p}.mlp.down_proj.weight`, [D, F]],
      );
    }
  } else {
    // GPT-2 checkpoints sometimes omit the "transformer." prefix: add it.
    for (const [k, v] of [...w]) {
      if (!k.startsWith("transformer.") && !k.startsWith("lm_head.")) {
        w.delete(k);
        w.set(`transformer.${k}`, v);
      }
    }
    need.push(["transformer.wte.weight", [V, D]], ["transformer.wpe.weight", [c.maxPositions, D]], ["transformer.ln_f.weight", [D]], ["transformer.ln_f.bias", [D]]);
    for (let l = 0; l < c.numLayers; l++) {
      const p = `transformer.h.${l}`;
      need.push(
        [`${p}.ln_1.weight`, [D]], [`${p}.ln_1.bias`, [D]], [`${p}.ln_2.weight`, [D]], [`${p}.ln_2.bias`, [D]],
        [`${p}.attn.c_attn.weight`, [D, 3 * D]], [`${p}.attn.c_attn.bias`, [3 * D]],
        [`${p}.attn.c_proj.weight`, [D, D]], [`${p}.attn.c_proj.bias`, [D]],
        [`${p}.mlp.c_fc.weight`, [D, F]], [`${p}.mlp.c_fc.bias`, [F]],
        [`${p}.mlp.c_proj.weight`, [F, D]], [`${p}.mlp.c_proj.bias`, [D]],
      );
    }
  }
  for (const [name, shape] of need) {
    const t = w.get(name);
    if (!t) throw new NNsightError("IO", `${dir}: weight "${name}" is missing from the checkpoint`, { tensor: name, dir });
    if (t.shape.length !== shape.length || t.shape.some((s, i) => s !== shape[i])) {
      throw new NNsightError("SHAPE", `${dir}: weight "${name}" has shape [${t.shape.join(", ")}], the config implies [${shape.join(", ")}]`, { tensor: name, dir });
    }
  }
}
