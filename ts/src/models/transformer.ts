/**
 * The forward pass of decoder-only transformers (Llama and GPT-2) on the native runtime.
 *
 * It is ordinary code that calls `hooks.call(path, inputs, body)` at every module boundary with the HF
 * module path; the tracing layer implements those hooks (read, replace, skip). With no hooks the
 * module bodies run directly: one null check per module.
 *
 * Ops are queued on the native executor, so `forward()` returns the logits tensor at once and the
 * values arrive later (`await logits.data()`).
 *
 * Tensor parallelism (`tp`, see tensor-parallel.ts): the weights are this rank's shards, attention runs
 * on this rank's heads, row-parallel outputs (o_proj, down_proj, c_proj) are all-reduced, and hooks at
 * sharded boundaries see gathered values (only where they want them). Without `tp` none of this runs.
 */
import { NNsightError } from "../errors.js";
import { keep, scope } from "../tensor/index.js";
import { untracked } from "../tensor/scope.js";
import { dtypeSize } from "../tensor/dtype.js";
import { Tensor, fromArray } from "../tensor/tensor.js";
import type { ModelConfig } from "./config.js";
import { KVCache } from "./kv-cache.js";
import { type Boundary, type ShardDim, type TensorParallel, boundaryOf } from "./tensor-parallel.js";

/** What the tracing layer plugs into a forward pass. */
export interface ModuleHooks {
  /**
   * Run module `path` on `inputs` through `body`; may observe or replace inputs and output, or skip body.
   * Operations inside a module (`<module>.source.<op>`) go through it too; their output may be a tuple.
   */
  call<T extends Tensor | Tensor[]>(path: string, inputs: Tensor[], body: (inputs: Tensor[]) => T): T;
  /**
   * Whether `call(path, ...)` would do more than run the body (lets the forward skip preparing values for
   * it). With `kind`: whether the hooks read or replace that side (inputs; output, skips included), which
   * lets a tensor-parallel forward gather only the side that is touched.
   */
  wants?(path: string, kind?: "input" | "output"): boolean;
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

/** 1-D weights smaller than this are copied out of the mapped file at construction (see the constructor). */
const SMALL_WEIGHT_BYTES = 256 * 1024;

export class TransformerLM {
  readonly config: ModelConfig;
  /** @internal weights by HF name (views over mapped files where the dtype allows) */
  readonly weights: W;
  private readonly invFreq: Tensor | null;
  /** @internal this rank's group under tensor parallelism (null: the whole model is here) */
  readonly tp: TensorParallel | null;
  /** attention heads and kv heads computed here (all of them without tensor parallelism) */
  private readonly heads: number;
  private readonly kvHeads: number;

  constructor(config: ModelConfig, weights: W, invFreq: Float32Array | null, tp: TensorParallel | null = null) {
    this.config = config;
    this.weights = weights;
    this.invFreq = invFreq ? keep(fromArray(invFreq, "float32", [invFreq.length])) : null;
    this.tp = tp;
    this.heads = tp ? tp.plan.heads : config.numHeads;
    this.kvHeads = tp ? tp.plan.kvHeads : config.numKvHeads;
    // Small 1-D host weights (norm weights, biases) are copied out of the mapped file: once the matrices
    // around them are packed and their pages dropped (linear()), a read of a small weight would map the
    // file pages around it again (the kernel maps whole page-cache folios: measured ~1.8 MB per small
    // tensor on ext4), so the RSS would grow back by megabytes per layer. Matrices stay mapped (packed
    // on first use, or read in place).
    for (const [name, t] of weights) {
      if (t.device === "cpu" && t.ndim === 1 && t.numel * dtypeSize(t.dtype) < SMALL_WEIGHT_BYTES && t.isMapped()) {
        weights.set(name, keep(untracked(() => t.clone())));
        t.dispose();
      }
    }
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

  /**
   * Whether a row of a forward pass computes the same bits whatever other rows share the pass (a batch of
   * 1 or of 20 rows). The CPU GEMM on weights packed into its panel layout (packedOf) runs one summation
   * order for every number of rows; the unpacked paths do not (a few rows stream the weights with another
   * order than the blocked GEMM: kernels/cpu/gemm.cpp kMatvecMaxM / kStreamMaxM), and neither do GPU
   * libraries. So: true once every weight that goes through linear() is packed (f32 weights mapped from
   * safetensors, on the CPU, after a first forward packed them). The service shares a forward pass between
   * jobs only then, so that each job's result stays the one it gets alone.
   */
  rowsIndependent(): boolean {
    if (this.tp) return false; // each rank would have to agree (a padded vocabulary block is not packed)
    const tiedHead = !this.weights.has("lm_head.weight");
    for (const [name, w] of this.weights) {
      if (w.ndim !== 2) continue;
      if (name.endsWith("wpe.weight")) continue; // position table: only looked up
      if (!tiedHead && (name === "model.embed_tokens.weight" || name === "transformer.wte.weight")) continue; // looked up; the head is lm_head
      const p = packedWeights.get(w);
      if (!p || p.isDisposed) return false;
    }
    return true;
  }

  /** @internal free the tables this class made (weights are owned by the model) */
  disposeTables(): void {
    this.invFreq?.dispose();
    disposeTransposes(this.weights.values());
  }

  newCache(batch: number, maxLen: number): KVCache {
    const c = this.config;
    return new KVCache(c.numLayers, batch, this.kvHeads, maxLen, c.headDim);
  }

  /** Logits [B, T, V] (or [B, 1, V] with lastOnly). Everything intermediate is freed as soon as possible. */
  forward(b: ForwardBatch, opts: ForwardOptions = {}): Tensor {
    const hooks = opts.hooks ?? null;
    const cache = opts.cache ?? null;
    if (this.config.positionEmbedding === "learned") {
      let maxPos = 0;
      for (const p of b.positions) if (p > maxPos) maxPos = p;
      if (maxPos >= this.config.maxPositions) {
        throw new NNsightError(
          "BAD_INPUT",
          `the sequence needs ${maxPos + 1} positions, but this ${this.config.modelType} model has ${this.config.maxPositions} (learned position embeddings); shorten the prompt or generate fewer tokens`,
        );
      }
    }
    return scope(() => {
      const ids = fromArray(b.ids, "int32", [b.batch, b.seq]);
      const pos = fromArray(b.positions, "int32", [b.batch, b.seq]);
      const mask = b.keyMask ? fromArray(b.keyMask, "int32", [b.batch, b.keyMask.length / b.batch]) : null;
      const run = this.makeRun(hooks);
      const ctx: Ctx = { b, ids, pos, mask, cache, run, hooked: hooks !== null, wants: wantsOf(hooks), lastOnly: !!opts.lastOnly };
      try {
        const logits = run("", [ids], ([x]) => (this.config.modelType === "gpt2" ? this.gpt2(x!, ctx) : this.llama(x!, ctx)));
        if (cache) cache.advance(b.seq);
        return logits;
      } finally {
        freeEagerMask(ctx);
      }
    });
  }

  /**
   * Run one module on given inputs (`envoy.call(x)`, e.g. the logit lens). Without `hooks` no hooks fire;
   * with them (`envoy.call(x, { hook: true })`) the module and its submodules fire their hooks as in a
   * forward pass, so interventions addressed to that call apply. Attention-bearing modules see a fresh
   * causal sequence: positions 0..T-1, no padding, no cache.
   */
  callModule(path: string, inputs: Tensor[], hooks: ModuleHooks | null = null): Tensor {
    if (!hooks) return this.callModuleBody(path, inputs, null);
    return hooks.call(path, inputs, (ins) => this.callModuleBody(path, ins, hooks));
  }

  /** How module boundaries run: straight into the body, through the hooks, or (TP) through the hooks with gathers. */
  private makeRun(hooks: ModuleHooks | null): Run {
    if (hooks === null) return noHooks;
    if (this.tp === null) return (path, inputs, body) => hooks.call(path, inputs, body);
    return tpRun(this.tp, this.config.modelType, hooks);
  }

  private callModuleBody(path: string, inputs: Tensor[], hooks: ModuleHooks | null): Tensor {
    const c = this.config;
    const x = inputs[0];
    if (!x) throw new NNsightError("BAD_INPUT", `${path}.call() needs an input`);
    const gpt2 = c.modelType === "gpt2";
    const tp = this.tp;
    const wOut = (p: string): Tensor => {
      const layout = gpt2 ? "in_out" : "out_in";
      const bnd = tp ? boundaryOf(c.modelType, p) : null;
      if (!tp || !bnd) return linear(x, this.w(`${p}.weight`), this.wOpt(`${p}.bias`), layout);
      // a sharded layer called on a full value: shard the input (row) or gather the output (column)
      if (bnd.output === null) return scope(() => this.rowLinear(tp.shard(x, bnd.inputs[0]!), p, layout));
      return scope(() => tp.gather(linear(x, this.w(`${p}.weight`), this.wOpt(`${p}.bias`), layout), bnd.output as { dim: number }));
    };
    if (path === "lm_head") {
      const head = this.wOpt("lm_head.weight") ?? this.w(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
      return this.lmHead(x, head, this.wOpt("lm_head.bias"));
    }
    const name = path.split(".").pop()!;
    if (path === "model.norm" || /layernorm$/.test(name)) return x.rmsnormW(this.w(`${path}.weight`), c.normEps);
    if (path === "transformer.ln_f" || name === "ln_1" || name === "ln_2") return x.layernormW(this.w(`${path}.weight`), this.w(`${path}.bias`), c.normEps);
    if (name === "embed_tokens" || name === "wte") return this.embedTokens(`${path}.weight`, x, null);
    if (name === "wpe") return embed(this.w(`${path}.weight`), x);
    if (this.weights.has(`${path}.weight`)) return wOut(path);
    // composite modules need a batch context
    const B = x.shape[0] ?? 1, T = x.shape[1] ?? 1;
    const positions = new Int32Array(B * T);
    for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) positions[b * T + t] = t;
    const batch: ForwardBatch = { batch: B, seq: T, ids: new Int32Array(B * T), positions, keyMask: null };
    return scope(() => {
      const run = this.makeRun(hooks);
      const ctx: Ctx = { b: batch, ids: null, pos: fromArray(positions, "int32", [B, T]), mask: null, cache: null, run, hooked: hooks !== null, wants: wantsOf(hooks), lastOnly: false };
      const m = /^(model\.layers|transformer\.h)\.(\d+)(?:\.(\w+))?$/.exec(path);
      if (m) {
        const l = Number(m[2]);
        const p = `${m[1]}.${l}`;
        const sub = m[3];
        try {
          if (!sub) return gpt2 ? this.gpt2Block(l, p, x, ctx) : this.llamaLayer(l, p, x, ctx);
          if (sub === "mlp") return gpt2 ? this.gpt2Mlp(p, x) : this.llamaMlp(p, x, ctx);
          if (sub === "self_attn" || sub === "attn") return this.attnModule(l, p, x, ctx);
        } finally {
          freeEagerMask(ctx);
        }
      }
      throw new NNsightError("UNSUPPORTED", `${path}.call() is not supported for this module`, { path });
    });
  }

  // ------------------------------------------------------------------ Llama
  private llama(ids: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    let h = run("model", [ids], ([x]) => {
      let hs = run("model.embed_tokens", [x!], ([i]) => this.embedTokens("model.embed_tokens.weight", i!, ctx));
      for (let l = 0; l < c.numLayers; l++) {
        const p = `model.layers.${l}`;
        hs = run(p, [hs], ([x0]) => scope(() => this.llamaLayer(l, p, x0!, ctx)));
      }
      return run("model.norm", [hs], ([x1]) => x1!.rmsnormW(this.w("model.norm.weight"), c.normEps));
    });
    if (ctx.lastOnly) h = h.slice(1, -1);
    const head = this.wOpt("lm_head.weight") ?? this.w("model.embed_tokens.weight");
    return run("lm_head", [h], ([x]) => this.lmHead(x!, head, this.wOpt("lm_head.bias")));
  }

  private llamaLayer(l: number, p: string, x: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    const lw = (n: string) => this.w(`${p}.${n}`);
    const hn = run(`${p}.input_layernorm`, [x], ([v]) => v!.rmsnormW(lw("input_layernorm.weight"), c.normEps));
    // the residual adds ride on the output projections when no hook reads those outputs (same bits)
    const h1 = quiet(ctx, `${p}.self_attn`, `${p}.self_attn.o_proj`)
      ? this.attnModule(l, p, hn, ctx, x)
      : x.add(run(`${p}.self_attn`, [hn], ([v]) => this.attnModule(l, p, v!, ctx)));
    const hn2 = run(`${p}.post_attention_layernorm`, [h1], ([v]) => v!.rmsnormW(lw("post_attention_layernorm.weight"), c.normEps));
    if (quiet(ctx, `${p}.mlp`, `${p}.mlp.down_proj`)) return this.llamaMlp(p, hn2, ctx, h1);
    const mlp = run(`${p}.mlp`, [hn2], ([v]) => this.llamaMlp(p, v!, ctx));
    return h1.add(mlp);
  }

  /** With `residual`, returns residual + mlp(v) (the caller checked that no hook reads down_proj or the mlp). */
  private llamaMlp(p: string, v: Tensor, ctx: Ctx, residual: Tensor | null = null): Tensor {
    const run = ctx.run;
    const lin = (n: string) => (u: Tensor[]) => linear(u[0]!, this.w(`${p}.mlp.${n}.weight`), this.wOpt(`${p}.mlp.${n}.bias`), "out_in");
    // HF order: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    const g = run(`${p}.mlp.gate_proj`, [v], lin("gate_proj"));
    const a = run(`${p}.mlp.source.act_fn_0`, [g], ([u]) => u!.silu());
    const up = run(`${p}.mlp.up_proj`, [v], lin("up_proj"));
    if (residual) {
      if (this.tp) return this.rowLinear(a.mul(up), `${p}.mlp.down_proj`, "out_in").add(residual);
      return linear(a.mul(up), this.w(`${p}.mlp.down_proj.weight`), this.wOpt(`${p}.mlp.down_proj.bias`), "out_in", "none", residual);
    }
    return run(`${p}.mlp.down_proj`, [a.mul(up)], this.tp ? (u) => this.rowLinear(u[0]!, `${p}.mlp.down_proj`, "out_in") : lin("down_proj"));
  }

  /**
   * The attention module (projections, RoPE, attention, output projection) of layer l. With `residual`,
   * returns residual + attention(v) (the caller checked that no hook reads the output projection or the module).
   */
  private attnModule(l: number, p: string, v: Tensor, ctx: Ctx, residual: Tensor | null = null): Tensor {
    const run = ctx.run;
    if (this.config.modelType === "gpt2") {
      const D = this.heads * this.config.headDim; // the hidden size, or this rank's heads of it
      const conv = (n: string) => (u: Tensor[]) => linear(u[0]!, this.w(`${p}.attn.${n}.weight`), this.w(`${p}.attn.${n}.bias`), "in_out");
      const qkv = run(`${p}.attn.c_attn`, [v], conv("c_attn"));
      const o = this.attention(l, `${p}.attn`, qkv.slice(-1, 0, D), qkv.slice(-1, D, 2 * D), qkv.slice(-1, 2 * D, 3 * D), ctx);
      if (residual) {
        if (this.tp) return this.rowLinear(o, `${p}.attn.c_proj`, "in_out").add(residual);
        return linear(o, this.w(`${p}.attn.c_proj.weight`), this.w(`${p}.attn.c_proj.bias`), "in_out", "none", residual);
      }
      return run(`${p}.attn.c_proj`, [o], this.tp ? (u) => this.rowLinear(u[0]!, `${p}.attn.c_proj`, "in_out") : conv("c_proj"));
    }
    const lin = (n: string) => (u: Tensor[]) => linear(u[0]!, this.w(`${p}.self_attn.${n}.weight`), this.wOpt(`${p}.self_attn.${n}.bias`), "out_in");
    const q = run(`${p}.self_attn.q_proj`, [v], lin("q_proj"));
    const k = run(`${p}.self_attn.k_proj`, [v], lin("k_proj"));
    const vv = run(`${p}.self_attn.v_proj`, [v], lin("v_proj"));
    const o = this.attention(l, `${p}.self_attn`, q, k, vv, ctx);
    if (residual) {
      if (this.tp) return this.rowLinear(o, `${p}.self_attn.o_proj`, "out_in").add(residual);
      return linear(o, this.w(`${p}.self_attn.o_proj.weight`), this.wOpt(`${p}.self_attn.o_proj.bias`), "out_in", "none", residual);
    }
    return run(`${p}.self_attn.o_proj`, [o], this.tp ? (u) => this.rowLinear(u[0]!, `${p}.self_attn.o_proj`, "out_in") : lin("o_proj"));
  }

  // ------------------------------------------------------------------ GPT-2
  private gpt2(ids: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    let h = run("transformer", [ids], ([x]) => {
      const te = run("transformer.wte", [x!], ([i]) => this.embedTokens("transformer.wte.weight", i!, ctx));
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
    return run("lm_head", [h], ([x]) => this.lmHead(x!, head, null));
  }

  private gpt2Block(l: number, p: string, x: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const run = ctx.run;
    const lw = (n: string) => this.w(`${p}.${n}`);
    const h1 = run(`${p}.ln_1`, [x], ([v]) => v!.layernormW(lw("ln_1.weight"), lw("ln_1.bias"), c.normEps));
    // the residual adds ride on the output projections when no hook reads those outputs (same bits)
    const r1 = quiet(ctx, `${p}.attn`, `${p}.attn.c_proj`)
      ? this.attnModule(l, p, h1, ctx, x)
      : x.add(run(`${p}.attn`, [h1], ([v]) => this.attnModule(l, p, v!, ctx)));
    const h2 = run(`${p}.ln_2`, [r1], ([v]) => v!.layernormW(lw("ln_2.weight"), lw("ln_2.bias"), c.normEps));
    if (quiet(ctx, `${p}.mlp`, `${p}.mlp.c_proj`)) return this.gpt2Mlp(p, h2, ctx, r1);
    const mlp = run(`${p}.mlp`, [h2], ([v]) => this.gpt2Mlp(p, v!, ctx));
    return r1.add(mlp);
  }

  /** With `residual`, returns residual + mlp(v) (the caller checked that no hook reads c_proj or the mlp). */
  private gpt2Mlp(p: string, v: Tensor, ctx?: Ctx, residual: Tensor | null = null): Tensor {
    const run = ctx ? ctx.run : noHooks;
    const conv = (n: string) => (u: Tensor[]) => linear(u[0]!, this.w(`${p}.mlp.${n}.weight`), this.w(`${p}.mlp.${n}.bias`), "in_out");
    const exact = this.config.hiddenAct === "gelu";
    const fcPath = `${p}.mlp.c_fc`, actPath = `${p}.mlp.source.act_0`;
    let a: Tensor;
    if (!ctx || quiet(ctx, fcPath, actPath)) {
      // nothing observes c_fc's output apart from the activation: fused into the GEMM (same bits)
      a = linear(v, this.w(`${fcPath}.weight`), this.w(`${fcPath}.bias`), "in_out", exact ? "gelu" : "gelu_tanh");
    } else {
      const f = run(fcPath, [v], conv("c_fc"));
      a = run(actPath, [f], ([u]) => u!.gelu({ approximate: exact ? "none" : "tanh" }));
    }
    if (residual) {
      if (this.tp) return this.rowLinear(a, `${p}.mlp.c_proj`, "in_out").add(residual);
      return linear(a, this.w(`${p}.mlp.c_proj.weight`), this.w(`${p}.mlp.c_proj.bias`), "in_out", "none", residual);
    }
    return run(`${p}.mlp.c_proj`, [a], this.tp ? (u) => this.rowLinear(u[0]!, `${p}.mlp.c_proj`, "in_out") : conv("c_proj"));
  }

  /**
   * Token embeddings. Under tensor parallelism the table is this rank's block of vocabulary rows
   * (TensorParallel.embedVocab); the ids are read from the batch (a forward pass) or from the tensor
   * (`envoy.call`), which then waits for it.
   */
  private embedTokens(name: string, ids: Tensor, ctx: Ctx | null): Tensor {
    const tp = this.tp;
    if (!tp?.plan.vocab) return embed(this.w(name), ids);
    if (!(ids.dtype === "int32" || ids.dtype === "int64")) throw new NNsightError("DTYPE", `embedding lookup needs integer ids, got ${ids.dtype}`);
    // the batch's ids as numbers, unless a hook replaced the tensor (then read it: a sync point)
    const values = ctx !== null && ids === ctx.ids ? ctx.b.ids : ids.toFloat32Array();
    return tp.embedVocab(this.w(name), values, [...ids.shape], embed);
  }

  /** The LM head: under tensor parallelism this rank's block of the vocabulary, then every rank's logits joined. */
  private lmHead(x: Tensor, head: Tensor, bias: Tensor | null): Tensor {
    const y = linear(x, head, bias, "out_in");
    if (!this.tp?.plan.vocab) return y;
    const full = this.tp.gatherVocab(y);
    y.dispose();
    return full;
  }

  /** A row-parallel layer (TP): this rank's partial product, summed over the ranks, then the (replicated) bias. */
  private rowLinear(x: Tensor, p: string, layout: "out_in" | "in_out"): Tensor {
    const y = linear(x, this.w(`${p}.weight`), null, layout);
    this.tp!.reduce(y);
    const b = this.wOpt(`${p}.bias`);
    return b ? y.add(b) : y;
  }

  // ------------------------------------------------------------------ shared attention
  /** q/k/v: [B, T, H*hd] (views allowed). Returns the merged heads [B, T, Hq*hd] before the output projection. */
  private attention(layer: number, m: string, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx): Tensor {
    const c = this.config;
    const B = ctx.b.batch, T = ctx.b.seq, hd = c.headDim;
    const scale = 1 / Math.sqrt(hd);
    const invFreq = this.invFreq;
    const H = this.heads, Hkv = this.kvHeads;
    let q4 = q.reshape([B, T, H, hd]);
    let k4 = k.reshape([B, T, Hkv, hd]);
    const v4 = v.reshape([B, T, Hkv, hd]);
    const ropeOp = `${m}.source.apply_rotary_pos_emb_0`, attnOp = `${m}.source.attention_interface_0`;
    const eager = c.attnImplementation === "eager";
    if (!ctx.hooked || (ctx.wants !== null && !ctx.wants(ropeOp) && !ctx.wants(attnOp) && !wantsInside(ctx.wants, attnOp, eager))) {
      // the same computation as below without the hook points (every view is a native call)
      if (invFreq) {
        q4 = q4.rope(ctx.pos, invFreq, false);
        k4 = k4.rope(ctx.pos, invFreq, false);
      }
      const [kk, vv] = ctx.cache ? ctx.cache.append(layer, k4.permute(0, 2, 1, 3), v4.permute(0, 2, 1, 3)) : [k4.permute(0, 2, 1, 3), v4.permute(0, 2, 1, 3)];
      const qh = q4.permute(0, 2, 1, 3);
      const o = eager ? this.eagerAttention(qh, kk, vv, ctx, scale, noHooks, attnOp) : qh.attention(kk, vv, ctx.mask, scale); // [B, Hq, T, hd]
      return o.permute(0, 2, 1, 3).reshape([B, T, H * hd]);
    }
    // HF layout for the source operations: q/k/v [B, H, T, hd] (views), attention output [B, T, H, hd]
    const run = ctx.run;
    let qh = q4.permute(0, 2, 1, 3);
    let kh = k4.permute(0, 2, 1, 3);
    const vh = v4.permute(0, 2, 1, 3);
    if (invFreq) {
      // rope runs on [B, T, H, hd]: the permuted views go back to that layout for free
      [qh, kh] = run(ropeOp, [qh, kh], ([a, b]) => [
        a!.permute(0, 2, 1, 3).rope(ctx.pos, invFreq, false).permute(0, 2, 1, 3),
        b!.permute(0, 2, 1, 3).rope(ctx.pos, invFreq, false).permute(0, 2, 1, 3),
      ]);
    }
    const [kk, vv] = ctx.cache ? ctx.cache.append(layer, kh, vh) : [kh, vh];
    const o = run(attnOp, [qh!, kk, vv], ([a, b, d]) => {
      if (eager) return this.eagerAttention(a!, b!, d!, ctx, scale, run, attnOp).permute(0, 2, 1, 3);
      const sdpa = `${attnOp}.source.torch_nn_functional_scaled_dot_product_attention_0`;
      if (quiet(ctx, sdpa)) return a!.attention(b!, d!, ctx.mask, scale).permute(0, 2, 1, 3);
      return run(sdpa, [a!, b!, d!], ([x, y, z]) => x!.attention(y!, z!, ctx.mask, scale)).permute(0, 2, 1, 3);
    });
    return o.reshape([B, T, H * hd]);
  }

  /**
   * Attention as HF's `eager_attention_forward` computes it, each step a hook point inside `op`
   * (`<attention>.source.attention_interface_0`): raw scores q·kᵀ (`torch_matmul_0`), scaled and masked,
   * the softmax (`nn_functional_softmax_0`: the attention probabilities), and their product with the
   * values (`torch_matmul_1`). q [B, Hq, T, hd], k/v [B, Hkv, Tk, hd] (the cache included); keys and
   * values are repeated over each group's query heads (HF `repeat_kv`). Returns [B, Hq, T, hd]. A query
   * that sees no key (a padding position) gets zero probabilities and a zero output, as the fused kernel.
   */
  private eagerAttention(q: Tensor, k: Tensor, v: Tensor, ctx: Ctx, scale: number, run: Run, op: string): Tensor {
    const [B, Hq, T] = q.shape as [number, number, number, number];
    const Tk = k.shape[2]!;
    const kr = repeatKv(k, Hq), vr = repeatKv(v, Hq);
    const scores = run(`${op}.source.torch_matmul_0`, [q, kr.transpose(2, 3)], ([a, b]) => a!.matmul(b!));
    const { add, keep: rowKeep } = this.eagerMask(ctx, B, T, Tk);
    const probs = run(`${op}.source.nn_functional_softmax_0`, [scores.mul(scale).add(add)], ([x]) => x!.softmax(-1).mul(rowKeep));
    return run(`${op}.source.torch_matmul_1`, [probs, vr], ([p, w]) => p!.matmul(w!));
  }

  /**
   * The eager path's masks for one forward pass (made once, shared by every layer): `add` [B, 1, T, Tk]
   * is 0 where query i (at key position Tk - T + i) may see key j (causal, and not padding) and -inf
   * elsewhere, except on rows that see no key at all, which stay 0 so the softmax gives no NaN; `keep`
   * [B, 1, T, 1] is 1, or 0 on those rows, which then give zero probabilities.
   */
  private eagerMask(ctx: Ctx, B: number, T: number, Tk: number): { add: Tensor; keep: Tensor } {
    if (ctx.eagerMask && ctx.eagerMask.tk === Tk) return ctx.eagerMask;
    const km = ctx.b.keyMask;
    const add = new Float32Array(B * T * Tk), rows = new Float32Array(B * T);
    for (let b = 0; b < B; b++) {
      for (let i = 0; i < T; i++) {
        const last = Tk - T + i, row = (b * T + i) * Tk;
        let seen = 0;
        for (let j = 0; j < Tk; j++) {
          const ok = j <= last && (km === null || km[b * Tk + j] !== 0);
          if (ok) seen++;
          else add[row + j] = -Infinity;
        }
        if (seen === 0) add.fill(0, row, row + Tk);
        rows[b * T + i] = seen === 0 ? 0 : 1;
      }
    }
    // made outside the layer's scope (it outlives the layer); freeEagerMask releases it after the pass
    ctx.eagerMask = untracked(() => ({ tk: Tk, add: fromArray(add, "float32", [B, 1, T, Tk]), keep: fromArray(rows, "float32", [B, 1, T, 1]) }));
    return ctx.eagerMask;
  }
}

function freeEagerMask(ctx: Ctx): void {
  if (!ctx.eagerMask) return;
  ctx.eagerMask.add.dispose();
  ctx.eagerMask.keep.dispose();
  ctx.eagerMask = undefined;
}

/** HF `repeat_kv`: [B, Hkv, Tk, hd] -> [B, Hq, Tk, hd], each kv head repeated for its group's query heads. */
function repeatKv(x: Tensor, heads: number): Tensor {
  const [B, Hkv, Tk, hd] = x.shape as [number, number, number, number];
  if (Hkv === heads) return x;
  return x.unsqueeze(2).expand([B, Hkv, heads / Hkv, Tk, hd]).reshape([B, heads, Tk, hd]);
}

/** Whether the hooks act on an operation inside `attention_interface_0` (`op`). */
function wantsInside(wants: (path: string) => boolean, op: string, eager: boolean): boolean {
  return eager
    ? wants(`${op}.source.torch_matmul_0`) || wants(`${op}.source.nn_functional_softmax_0`) || wants(`${op}.source.torch_matmul_1`)
    : wants(`${op}.source.torch_nn_functional_scaled_dot_product_attention_0`);
}

interface Ctx {
  b: ForwardBatch;
  /** the ids tensor made from `b.ids` (null when the pass has none: envoy.call) */
  ids: Tensor | null;
  pos: Tensor;
  mask: Tensor | null;
  cache: KVCache | null;
  run: Run;
  /** hooks are attached: the source operations are hook points (else they run as plain code) */
  hooked: boolean;
  /** which hook points the hooks act on (null: assume all) */
  wants: ((path: string) => boolean) | null;
  lastOnly: boolean;
  /** the eager attention path's masks, made on first use in this pass (see eagerMask) */
  eagerMask?: { tk: number; add: Tensor; keep: Tensor };
}

const wantsOf = (hooks: ModuleHooks | null): ((path: string) => boolean) | null => (hooks?.wants ? (p) => hooks.wants!(p) : null);

/** No hook acts on any of these paths (running them through ctx.run would only call their bodies). */
function quiet(ctx: Ctx, ...paths: string[]): boolean {
  if (!ctx.hooked) return true;
  const wants = ctx.wants;
  return wants !== null && paths.every((p) => !wants(p));
}

type Run = <T extends Tensor | Tensor[]>(path: string, inputs: Tensor[], body: (x: Tensor[]) => T) => T;
const noHooks: Run = (_p, ins, body) => body(ins);

/**
 * Module boundaries under tensor parallelism. Replicated boundaries go to the hooks as they are. At a
 * sharded one (tensor-parallel.ts `boundaryOf`) that the hooks want, the side they touch is gathered
 * first (inputs before the call, the output inside it), and what comes back (edited in place, replaced,
 * or a skip's value) is sliced to this rank's shard again. Every rank runs the same graph, so every rank
 * makes the same gathers in the same order.
 */
function tpRun(tp: TensorParallel, modelType: ModelConfig["modelType"], hooks: ModuleHooks): Run {
  const wants = hooks.wants ? (p: string, k?: "input" | "output") => hooks.wants!(p, k) : () => true;
  return (path, inputs, body) => {
    const bnd = boundaryOf(modelType, path);
    if (bnd === null || !wants(path)) return hooks.call(path, inputs, body);
    const gi = bnd.inputs.some((s) => s !== null) && wants(path, "input");
    const go = bnd.output !== null && wants(path, "output");
    const full = gi ? inputs.map((x, i) => (bnd.inputs[i] ? tp.gather(x, bnd.inputs[i]!) : x)) : inputs;
    const out = hooks.call(path, full, (ins) => {
      const local = gi ? ins.map((x, i) => (bnd.inputs[i] ? tp.shard(x, bnd.inputs[i]!) : x)) : ins;
      const y = body(local);
      return (go ? mapOut(y, bnd.output, (t, s) => tp.gather(t, s)) : y) as typeof y;
    });
    return (go ? mapOut(out, bnd.output, (t, s) => tp.shard(t, s)) : out) as typeof out;
  };
}

function mapOut<T extends Tensor | Tensor[]>(v: T, spec: Boundary["output"], f: (t: Tensor, s: ShardDim) => Tensor): T {
  if (Array.isArray(v)) return v.map((t, i) => (Array.isArray(spec) && spec[i] ? f(t, spec[i]!) : t)) as T;
  return (spec && !Array.isArray(spec) ? f(v, spec) : v) as T;
}

function embed(weight: Tensor, ids: Tensor): Tensor {
  if (!(ids.dtype === "int32" || ids.dtype === "int64")) {
    throw new NNsightError("DTYPE", `embedding lookup needs integer ids, got ${ids.dtype}`);
  }
  // a table tied to the LM head was packed for it, and its mapped pages dropped: read the rows there
  const p = packedWeights.get(weight);
  if (p && !p.isDisposed) return p.embeddingPacked(ids, weight.shape[0]!);
  return weight.embedding(ids);
}

/**
 * y = x @ W (+ b) over the last dim of x. `layout` says how W is stored: "out_in" (nn.Linear [out, in],
 * used through a transposed view) or "in_out" (GPT-2 Conv1D [in, out]).
 */
/** Transposed views of nn.Linear weights, made once per weight (a view per call would cost a native call). */
const transposed = new WeakMap<Tensor, Tensor>();
function transposeOf(w: Tensor): Tensor {
  let t = transposed.get(w);
  if (!t || t.isDisposed) {
    t = untracked(() => w.t());
    transposed.set(w, t);
  }
  return t;
}

/**
 * Weights packed once into the GEMM's panel layout (kernels/cpu/gemm.h: pack_weight / linear_packed), by
 * weight, made on first use. Only f32 weights viewing a memory-mapped file are packed: the packing drops
 * their mapped pages, so the packed copy replaces them in memory instead of adding to it (reading the
 * original again maps it back in). `false`: this weight is never packed (another dtype, another device,
 * or a tensor the model owns in memory).
 */
const packedWeights = new WeakMap<Tensor, Tensor | false>();
function packedOf(w: Tensor, wt: Tensor): Tensor | null {
  const p = packedWeights.get(w);
  if (p === false) return null;
  if (p && !p.isDisposed) return p;
  if (w.dtype !== "float32" || w.device !== "cpu") {
    packedWeights.set(w, false);
    return null;
  }
  if (!wt.canPackWeight()) return null; // not mapped, or in scan (meta) mode: asked again next time
  const q = untracked(() => wt.packWeight(true));
  packedWeights.set(w, q);
  return q;
}

/** Free the cached transposed views and packed forms of these weights (when a model is disposed). */
export function disposeTransposes(weights: Iterable<Tensor>): void {
  for (const w of weights) {
    transposed.get(w)?.dispose();
    transposed.delete(w);
    const p = packedWeights.get(w);
    if (p) p.dispose();
    packedWeights.delete(w);
  }
}

/**
 * y = residual + act(x @ W + b): `act` "gelu_tanh" / "gelu" and the residual (a tensor of y's shape) are
 * fused into the GEMM with a packed weight (bit-identical to applying them after), else separate ops.
 */
export function linear(
  x: Tensor,
  w: Tensor,
  b: Tensor | null,
  layout: "out_in" | "in_out",
  act: "none" | "gelu_tanh" | "gelu" = "none",
  residual: Tensor | null = null,
): Tensor {
  const wt = layout === "out_in" ? transposeOf(w) : w;
  const K = wt.shape[0]!, N = wt.shape[1]!;
  if (x.shape[x.ndim - 1] !== K) {
    throw new NNsightError("SHAPE", `linear: input ${JSON.stringify(x.shape)} does not match weight [${K}, ${N}] (in, out)`);
  }
  const lead = x.shape.slice(0, -1);
  const x2 = x.reshape([-1, K]);
  const packed = packedOf(w, wt);
  let y: Tensor;
  const r2 = residual ? residual.reshape([-1, N]) : null;
  if (packed) {
    y = x2.linearPacked(packed, b, N, act === "gelu_tanh" ? 1 : act === "gelu" ? 2 : 0, r2);
  } else {
    y = x2.linear(wt, b);
    if (act !== "none") y = y.gelu({ approximate: act === "gelu" ? "none" : "tanh" });
    if (r2) y = r2.add(y);
  }
  return y.reshape([...lead, N]);
}
