/**
 * The forward pass of decoder-only transformers (Llama and GPT-2) on the native runtime.
 *
 * It is ordinary code that calls `hooks.call(path, inputs, body)` at every module boundary with the HF
 * module path; the tracing layer implements those hooks (read, replace, skip). With no hooks the
 * module bodies run directly: one null check per module.
 *
 * Ops are queued on the native executor, so `forward()` returns the logits tensor at once and the
 * values arrive later (`await logits.data()`).
 */
import { NNsightError } from "../errors.js";
import { keep, scope } from "../tensor/index.js";
import { Tensor, fromArray } from "../tensor/tensor.js";
import type { ModelConfig } from "./config.js";
import { KVCache } from "./kv-cache.js";

/** What the tracing layer plugs into a forward pass. */
export interface ModuleHooks {
  /** Run module `path` on `inputs` through `body`; may observe or replace inputs and output, or skip body. */
  call(path: string, inputs: Tensor[], body: (inputs: Tensor[]) => Tensor): Tensor;
}

/** A prepared batch: ids [B, T] (left padded), positions [B, T], and the key mask over cache + new tokens. */
export interface ForwardBatch {
  batch: number;
  seq: number;
  ids: Int32Array;
  positions: Int32Array;
  /** [B, past + T], 1 = real token; null when nothing is padded */
  keyMask: Int32Array | null;
}

export interface ForwardOptions {
  cache?: KVCache | null;
  hooks?: ModuleHooks | null;
  /** compute the LM head on the last position only (generation without interventions) */
  lastOnly?: boolean;
}

type W = Map<string, Tensor>;

export class TransformerLM {
  readonly config: ModelConfig;
  /** @internal weights by HF name (views over mapped files where the dtype allows) */
  readonly weights: W;
  private readonly invFreq: Tensor | null;

  constructor(config: ModelConfig, weights: W, invFreq: Float32Array | null) {
    this.config = config;
    this.weights = weights;
    this.invFreq = invFreq ? keep(fromArray(invFreq, "float32", [invFreq.length])) : null;
  }

  /** @internal */
  w(name: string): Tensor {
    const t = this.weights.get(name);
    if (!t) throw new NNsightError("IO", `weight "${name}" is missing`);
    return t;
  }
  private wOpt(name: string): Tensor | null {
    return this.weights.get(name) ?? null;
  }

  /** @internal free the tables this class made (weights are owned by the model) */
  disposeTables(): void {
    this.invFreq?.dispose();
  }

  newCache(batch: number, maxLen: number): KVCache {
    const c = this.config;
    return new KVCache(c.numLayers, batch, c.numKvHeads, maxLen, c.headDim);
  }

  /** Logits [B, T, V] (or [B, 1, V] with lastOnly). Everything intermediate is freed as soon as possible. */
  forward(b: ForwardBatch, opts: ForwardOptions = {}): Tensor {
    const hooks = opts.hooks ?? null;
    const cache = opts.cache ?? null;
    return scope(() => {
      const ids = fromArray(b.ids, "int32", [b.batch, b.seq]);
      const pos = fromArray(b.positions, "int32", [b.batch, b.seq]);
      const mask = b.keyMask ? fromArray(b.keyMask, "int32", [b.batch, b.keyMask.length / b.batch]) : null;
      const run = (path: string, inputs: Tensor[], body: (x: Tensor[]) => Tensor): Tensor =>
        hooks === null ? body(inputs) : hooks.call(path, inputs, body);
      const ctx: Ctx = { b, pos, mask, cache, run, lastOnly: !!opts.lastOnly };
      const logits = run("", [ids], ([x]) => (this.config.modelType === "gpt2" ? this.gpt2(x!, ctx) : this.llama(x!, ctx)));
      if (cache) cache.advance(b.seq);
      return logits;
    });
  }

  // ------------------------------------------------------------------ Llama
  private llama(ids: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    let h = run("model", [ids], ([x]) => {
      let hs = run("model.embed_tokens", [x!], ([i]) => embed(this.w("model.embed_tokens.weight"), i!));
      for (let l = 0; l < c.numLayers; l++) {
        const p = `model.layers.${l}`;
        hs = run(p, [hs], ([x0]) => scope(() => this.llamaLayer(l, p, x0!, ctx)));
      }
      return run("model.norm", [hs], ([x1]) => x1!.rmsnormW(this.w("model.norm.weight"), c.normEps));
    });
    if (ctx.lastOnly) h = h.slice(1, -1);
    const head = this.wOpt("lm_head.weight") ?? this.w("model.embed_tokens.weight");
    return run("lm_head", [h], ([x]) => linear(x!, head, this.wOpt("lm_head.bias"), "out_in"));
  }

  private llamaLayer(l: number, p: string, x: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    const lw = (n: string) => this.w(`${p}.${n}`);
    const lwo = (n: string) => this.wOpt(`${p}.${n}`);
    const hn = run(`${p}.input_layernorm`, [x], ([v]) => v!.rmsnormW(lw("input_layernorm.weight"), c.normEps));
    const attn = run(`${p}.self_attn`, [hn], ([v]) => {
      const proj = (n: string) =>
        run(`${p}.self_attn.${n}`, [v!], ([u]) => linear(u!, lw(`self_attn.${n}.weight`), lwo(`self_attn.${n}.bias`), "out_in"));
      const q = proj("q_proj"), k = proj("k_proj"), vv = proj("v_proj");
      const o = this.attention(l, q, k, vv, ctx);
      return run(`${p}.self_attn.o_proj`, [o], ([u]) => linear(u!, lw("self_attn.o_proj.weight"), lwo("self_attn.o_proj.bias"), "out_in"));
    });
    const h1 = x.add(attn);
    const hn2 = run(`${p}.post_attention_layernorm`, [h1], ([v]) => v!.rmsnormW(lw("post_attention_layernorm.weight"), c.normEps));
    const mlp = run(`${p}.mlp`, [hn2], ([v]) => {
      const g = run(`${p}.mlp.gate_proj`, [v!], ([u]) => linear(u!, lw("mlp.gate_proj.weight"), lwo("mlp.gate_proj.bias"), "out_in"));
      const up = run(`${p}.mlp.up_proj`, [v!], ([u]) => linear(u!, lw("mlp.up_proj.weight"), lwo("mlp.up_proj.bias"), "out_in"));
      const act = g.silu().mul(up);
      return run(`${p}.mlp.down_proj`, [act], ([u]) => linear(u!, lw("mlp.down_proj.weight"), lwo("mlp.down_proj.bias"), "out_in"));
    });
    return h1.add(mlp);
  }

  // ------------------------------------------------------------------ GPT-2
  private gpt2(ids: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    let h = run("transformer", [ids], ([x]) => {
      const te = run("transformer.wte", [x!], ([i]) => embed(this.w("transformer.wte.weight"), i!));
      const pe = run("transformer.wpe", [ctx.pos], ([i]) => embed(this.w("transformer.wpe.weight"), i!));
      let hs = te.add(pe);
      for (let l = 0; l < c.numLayers; l++) {
        const p = `transformer.h.${l}`;
        hs = run(p, [hs], ([x0]) => scope(() => this.gpt2Block(l, p, x0!, ctx)));
      }
      return run("transformer.ln_f", [hs], ([v]) => v!.layernormW(this.w("transformer.ln_f.weight"), this.w("transformer.ln_f.bias"), c.normEps));
    });
    if (ctx.lastOnly) h = h.slice(1, -1);
    const head = this.wOpt("lm_head.weight") ?? this.w("transformer.wte.weight");
    return run("lm_head", [h], ([x]) => linear(x!, head, null, "out_in"));
  }

  private gpt2Block(l: number, p: string, x: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    const lw = (n: string) => this.w(`${p}.${n}`);
    const D = c.hiddenSize;
    const h1 = run(`${p}.ln_1`, [x], ([v]) => v!.layernormW(lw("ln_1.weight"), lw("ln_1.bias"), c.normEps));
    const attn = run(`${p}.attn`, [h1], ([v]) => {
      const qkv = run(`${p}.attn.c_attn`, [v!], ([u]) => linear(u!, lw("attn.c_attn.weight"), lw("attn.c_attn.bias"), "in_out"));
      const q = qkv.slice(-1, 0, D), k = qkv.slice(-1, D, 2 * D), vv = qkv.slice(-1, 2 * D, 3 * D);
      const o = this.attention(l, q, k, vv, ctx);
      return run(`${p}.attn.c_proj`, [o], ([u]) => linear(u!, lw("attn.c_proj.weight"), lw("attn.c_proj.bias"), "in_out"));
    });
    const r1 = x.add(attn);
    const h2 = run(`${p}.ln_2`, [r1], ([v]) => v!.layernormW(lw("ln_2.weight"), lw("ln_2.bias"), c.normEps));
    const mlp = run(`${p}.mlp`, [h2], ([v]) => {
      const f = run(`${p}.mlp.c_fc`, [v!], ([u]) => linear(u!, lw("mlp.c_fc.weight"), lw("mlp.c_fc.bias"), "in_out"));
      const a = f.gelu({ approximate: c.hiddenAct === "gelu" ? "none" : "tanh" });
      return run(`${p}.mlp.c_proj`, [a], ([u]) => linear(u!, lw("mlp.c_proj.weight"), lw("mlp.c_proj.bias"), "in_out"));
    });
    return r1.add(mlp);
  }

  // ------------------------------------------------------------------ shared attention
  /** q/k/v: [B, T, H*hd] (views allowed). Returns the merged heads [B, T, Hq*hd] before the output projection. */
  private attention(layer: number, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const B = ctx.b.batch, T = ctx.b.seq, hd = c.headDim;
    let q4 = q.reshape([B, T, c.numHeads, hd]);
    let k4 = k.reshape([B, T, c.numKvHeads, hd]);
    const v4 = v.reshape([B, T, c.numKvHeads, hd]);
    if (this.invFreq) {
      q4 = q4.rope(ctx.pos, this.invFreq, false);
      k4 = k4.rope(ctx.pos, this.invFreq, false);
    }
    let kk: Tensor, vv: Tensor;
    if (ctx.cache) {
      [kk, vv] = ctx.cache.append(layer, k4.permute(0, 2, 1, 3), v4.permute(0, 2, 1, 3));
    } else {
      kk = k4.permute(0, 2, 1, 3);
      vv = v4.permute(0, 2, 1, 3);
    }
    const o = q4.permute(0, 2, 1, 3).attention(kk, vv, ctx.mask, 1 / Math.sqrt(hd)); // [B, Hq, T, hd] view of [B, T, Hq, hd]
    return o.permute(0, 2, 1, 3).reshape([B, T, c.numHeads * hd]);
  }
}

interface Ctx {
  b: ForwardBatch;
  pos: Tensor;
  mask: Tensor | null;
  cache: KVCache | null;
  run: (path: string, inputs: Tensor[], body: (x: Tensor[]) => Tensor) => Tensor;
  lastOnly: boolean;
}

function embed(weight: Tensor, ids: Tensor): Tensor {
  if (!(ids.dtype === "int32" || ids.dtype === "int64")) {
    throw new NNsightError("DTYPE", `embedding lookup needs integer ids, got ${ids.dtype}`);
  }
  return weight.embedding(ids);
}

/**
 * y = x @ W (+ b) over the last dim of x. `layout` says how W is stored: "out_in" (nn.Linear [out, in],
 * used through a transposed view) or "in_out" (GPT-2 Conv1D [in, out]).
 */
export function linear(x: Tensor, w: Tensor, b: Tensor | null, layout: "out_in" | "in_out"): Tensor {
  const wt = layout === "out_in" ? w.t() : w;
  const K = wt.shape[0]!, N = wt.shape[1]!;
  if (x.shape[x.ndim - 1] !== K) {
    throw new NNsightError("SHAPE", `linear: input ${JSON.stringify(x.shape)} does not match weight [${K}, ${N}] (in, out)`);
  }
  const lead = x.shape.slice(0, -1);
  const x2 = x.reshape([-1, K]);
  const y = x2.linear(wt, b);
  return y.reshape([...lead, N]);
}
