// A plain, deliberately slow reference forward pass for Llama and GPT-2, used only by tests as
// the oracle the native runtime must agree with (every module output within 1e-4).
//
// Rules of this file:
// - Clarity over speed: plain loops over typed arrays, no tricks, no shared buffers.
// - Every module output is a fresh row-major Float32Array (f32, like Hugging Face's f32
//   forward); sums and reductions inside one module are accumulated in float64.
// - Semantics follow Hugging Face transformers' LlamaForCausalLM and GPT2LMHeadModel.
// - Nothing is mutated after it is recorded, so recorded inputs/outputs may share arrays.
//
// Padding: left padding, mask 1 = real token, 0 = pad. A query row attends to key j iff
// j <= i (causal, by index) and mask[j] = 1. A padded query row under left padding has no
// visible key; we then define its attention output (before o_proj / c_proj) as all zeros.
// HF computes something else there (uniform attention or zeros depending on the attention
// implementation); values at padded rows are not meaningful, ours are just finite.

export interface RefTensor {
  shape: number[];
  data: Float32Array;
}

export type RefWeights = Map<string, RefTensor>;

export interface RefConfig {
  modelType: "llama" | "gpt2";
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
  vocabSize: number;
  normEps: number;
  ropeTheta: number;
  /** Overrides the default RoPE inverse frequencies 1/theta^(2i/headDim) (rope scaling). */
  invFreq?: Float32Array;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
  mlpBias: boolean;
}

export interface RefForwardOptions {
  /** [batch][seq], 1 = real token, 0 = pad (left padding). Default: all ones. */
  attentionMask?: number[][];
  /** [batch][seq]. Default: defaultPositionIds(mask). */
  positionIds?: number[][];
}

export interface RefForwardResult {
  /** [batch, seq, vocab] (same array as outputs["lm_head"]). */
  logits: RefTensor;
  /** Every module's output, keyed by HF module path ("model.layers.3.mlp", "transformer.h.0.attn"). */
  outputs: Record<string, RefTensor>;
  /** The first positional tensor input of each module, where it is a float tensor. */
  inputs: Record<string, RefTensor>;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function tensor(shape: number[], data: Float32Array): RefTensor {
  const n = shape.reduce((a, b) => a * b, 1);
  if (n !== data.length) throw new Error(`reference: shape [${shape}] does not match ${data.length} elements`);
  return { shape, data };
}

function getWeight(weights: RefWeights, name: string, shape: number[]): Float32Array {
  // GPT-2 checkpoints often store names without the "transformer." prefix.
  let w = weights.get(name);
  if (!w && name.startsWith("transformer.")) w = weights.get(name.slice("transformer.".length));
  if (!w) throw new Error(`reference: missing weight ${name}`);
  if (w.shape.length !== shape.length || w.shape.some((d, i) => d !== shape[i])) {
    throw new Error(`reference: weight ${name} has shape [${w.shape}], expected [${shape}]`);
  }
  return w.data;
}

function hasWeight(weights: RefWeights, name: string): boolean {
  return weights.has(name) || (name.startsWith("transformer.") && weights.has(name.slice("transformer.".length)));
}

/**
 * nn.Linear: x [rows, inDim], weight [outDim, inDim] (torch layout), bias [outDim].
 * y[r, o] = sum_i x[r, i] * W[o, i] + b[o]
 */
function linear(x: Float32Array, rows: number, inDim: number, w: Float32Array, outDim: number, b?: Float32Array): Float32Array {
  const y = new Float32Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outDim; o++) {
      let acc = 0;
      for (let i = 0; i < inDim; i++) acc += x[r * inDim + i] * w[o * inDim + i];
      if (b) acc += b[o];
      y[r * outDim + o] = acc;
    }
  }
  return y;
}

/**
 * GPT-2 Conv1D: x [rows, inDim], weight [inDim, outDim] (transposed w.r.t. nn.Linear), bias [outDim].
 * y[r, o] = sum_i x[r, i] * W[i, o] + b[o]
 */
function conv1d(x: Float32Array, rows: number, inDim: number, w: Float32Array, outDim: number, b: Float32Array): Float32Array {
  const y = new Float32Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outDim; o++) {
      let acc = 0;
      for (let i = 0; i < inDim; i++) acc += x[r * inDim + i] * w[i * outDim + o];
      acc += b[o];
      y[r * outDim + o] = acc;
    }
  }
  return y;
}

/** LlamaRMSNorm: y = w * (x / sqrt(mean(x^2) + eps)), per row. */
function rmsNorm(x: Float32Array, rows: number, dim: number, w: Float32Array, eps: number): Float32Array {
  const y = new Float32Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i] * x[r * dim + i];
    const inv = 1 / Math.sqrt(ss / dim + eps);
    // HF: hidden = f32(x * rsqrt(var + eps)); out = weight * hidden
    for (let i = 0; i < dim; i++) y[r * dim + i] = w[i] * Math.fround(x[r * dim + i] * inv);
  }
  return y;
}

/** nn.LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b, biased variance, per row. */
function layerNorm(x: Float32Array, rows: number, dim: number, w: Float32Array, b: Float32Array, eps: number): Float32Array {
  const y = new Float32Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let sum = 0;
    for (let i = 0; i < dim; i++) sum += x[r * dim + i];
    const mean = sum / dim;
    let sq = 0;
    for (let i = 0; i < dim; i++) {
      const d = x[r * dim + i] - mean;
      sq += d * d;
    }
    const inv = 1 / Math.sqrt(sq / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = (x[r * dim + i] - mean) * inv * w[i] + b[i];
  }
  return y;
}

function add(a: Float32Array, b: Float32Array): Float32Array {
  if (a.length !== b.length) throw new Error("reference: add length mismatch");
  const y = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) y[i] = a[i] + b[i];
  return y;
}

function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/** GPT-2 "gelu_new": the tanh approximation. */
export function geluNew(x: number): number {
  return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
}

/** Default position ids: cumsum(mask) - 1 per row, clamped at 0 (so pads get 0). */
export function defaultPositionIds(mask: number[][]): number[][] {
  return mask.map((row) => {
    let c = 0;
    return row.map((m) => {
      c += m ? 1 : 0;
      return Math.max(c - 1, 0);
    });
  });
}

/** HF's default RoPE inverse frequencies, computed in float32 as torch does. */
export function defaultInvFreq(headDim: number, theta: number): Float32Array {
  const half = headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const exponent = Math.fround((2 * i) / headDim);
    inv[i] = 1 / Math.fround(Math.pow(theta, exponent));
  }
  return inv;
}

interface Batch {
  B: number;
  T: number;
  mask: number[][];
  pos: number[][];
}

function prepareBatch(ids: number[][], opts: RefForwardOptions): Batch {
  const B = ids.length;
  if (B === 0) throw new Error("reference: empty batch");
  const T = ids[0].length;
  if (T === 0) throw new Error("reference: empty sequence");
  for (const row of ids) if (row.length !== T) throw new Error("reference: ragged ids (pad them and pass a mask)");
  const mask = opts.attentionMask ?? ids.map((row) => row.map(() => 1));
  if (mask.length !== B || mask.some((r) => r.length !== T)) throw new Error("reference: mask shape differs from ids");
  const pos = opts.positionIds ?? defaultPositionIds(mask);
  if (pos.length !== B || pos.some((r) => r.length !== T)) throw new Error("reference: position ids shape differs from ids");
  return { B, T, mask, pos };
}

/**
 * Scaled dot-product attention with causal + key-padding mask.
 * q: [B, T, nHeads*hd], k/v: [B, T, nKv*hd] (already split into heads along the last dim,
 * head h at columns h*hd..(h+1)*hd). Query head h uses kv head floor(h / (nHeads/nKv)).
 * Returns [B, T, nHeads*hd] (heads concatenated, as before o_proj / c_proj).
 */
function attention(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  batch: Batch,
  nHeads: number,
  nKv: number,
  hd: number,
  scale: number,
): Float32Array {
  const { B, T, mask } = batch;
  const group = nHeads / nKv;
  const qStride = nHeads * hd;
  const kvStride = nKv * hd;
  const out = new Float32Array(B * T * qStride);
  const scores = new Float64Array(T);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < nHeads; h++) {
      const kvh = Math.floor(h / group);
      for (let i = 0; i < T; i++) {
        // scores over visible keys j <= i with mask[b][j] = 1
        let max = -Infinity;
        for (let j = 0; j <= i; j++) {
          if (!mask[b][j]) continue;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[(b * T + i) * qStride + h * hd + d] * k[(b * T + j) * kvStride + kvh * hd + d];
          scores[j] = dot * scale;
          if (scores[j] > max) max = scores[j];
        }
        if (max === -Infinity) continue; // no visible key (padded query row): output stays 0
        let denom = 0;
        for (let j = 0; j <= i; j++) {
          if (!mask[b][j]) continue;
          scores[j] = Math.exp(scores[j] - max);
          denom += scores[j];
        }
        for (let d = 0; d < hd; d++) {
          let acc = 0;
          for (let j = 0; j <= i; j++) {
            if (!mask[b][j]) continue;
            acc += (scores[j] / denom) * v[(b * T + j) * kvStride + kvh * hd + d];
          }
          out[(b * T + i) * qStride + h * hd + d] = acc;
        }
      }
    }
  }
  return out;
}

/**
 * RoPE, HF rotate_half convention: within each head, element i pairs with i + hd/2.
 *   out[i]        = x[i] * cos(p*f_i) - x[i+hd/2] * sin(p*f_i)
 *   out[i + hd/2] = x[i+hd/2] * cos(p*f_i) + x[i] * sin(p*f_i)
 * x: [B, T, nHeads*hd]; p is the position id of (b, t).
 */
function applyRope(x: Float32Array, batch: Batch, nHeads: number, hd: number, invFreq: Float32Array): Float32Array {
  const { B, T, pos } = batch;
  const half = hd / 2;
  const stride = nHeads * hd;
  const y = new Float32Array(x.length);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const p = pos[b][t];
      for (let h = 0; h < nHeads; h++) {
        const base = (b * T + t) * stride + h * hd;
        for (let i = 0; i < half; i++) {
          // HF: freqs = inv_freq @ position_ids in float32, then cos/sin in float32
          const angle = Math.fround(invFreq[i] * p);
          const c = Math.fround(Math.cos(angle));
          const s = Math.fround(Math.sin(angle));
          const x1 = x[base + i];
          const x2 = x[base + i + half];
          y[base + i] = x1 * c - x2 * s;
          y[base + i + half] = x2 * c + x1 * s;
        }
      }
    }
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Llama

function llamaForward(weights: RefWeights, cfg: RefConfig, ids: number[][], batch: Batch): RefForwardResult {
  const { B, T } = batch;
  const H = cfg.hiddenSize;
  const nH = cfg.numHeads;
  const nKv = cfg.numKvHeads;
  const hd = cfg.headDim;
  const I = cfg.intermediateSize;
  const V = cfg.vocabSize;
  const rows = B * T;
  if (nH % nKv !== 0) throw new Error("reference: numHeads must be a multiple of numKvHeads");
  if (hd % 2 !== 0) throw new Error("reference: headDim must be even");
  const invFreq = cfg.invFreq ?? defaultInvFreq(hd, cfg.ropeTheta);
  if (invFreq.length !== hd / 2) throw new Error("reference: invFreq must have headDim/2 entries");

  const outputs: Record<string, RefTensor> = {};
  const inputs: Record<string, RefTensor> = {};
  const shapeH = [B, T, H];

  // embed_tokens
  const embW = getWeight(weights, "model.embed_tokens.weight", [V, H]);
  let hidden: Float32Array = new Float32Array(rows * H);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const id = ids[b][t];
      if (!Number.isInteger(id) || id < 0 || id >= V) throw new Error(`reference: token id ${id} out of range`);
      for (let i = 0; i < H; i++) hidden[(b * T + t) * H + i] = embW[id * H + i];
    }
  }
  outputs["model.embed_tokens"] = tensor(shapeH, hidden);

  const scale = 1 / Math.sqrt(hd);
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}`;
    const w = (name: string, shape: number[]) => getWeight(weights, `${p}.${name}`, shape);
    const bias = (name: string, n: number, on: boolean) => (on ? getWeight(weights, `${p}.${name}`, [n]) : undefined);
    inputs[p] = tensor(shapeH, hidden);

    // --- self attention block
    inputs[`${p}.input_layernorm`] = tensor(shapeH, hidden);
    const x1 = rmsNorm(hidden, rows, H, w("input_layernorm.weight", [H]), cfg.normEps);
    outputs[`${p}.input_layernorm`] = tensor(shapeH, x1);

    inputs[`${p}.self_attn`] = tensor(shapeH, x1);
    for (const n of ["q_proj", "k_proj", "v_proj"]) inputs[`${p}.self_attn.${n}`] = tensor(shapeH, x1);
    const ab = cfg.attentionBias;
    const q = linear(x1, rows, H, w("self_attn.q_proj.weight", [nH * hd, H]), nH * hd, bias("self_attn.q_proj.bias", nH * hd, ab));
    const k = linear(x1, rows, H, w("self_attn.k_proj.weight", [nKv * hd, H]), nKv * hd, bias("self_attn.k_proj.bias", nKv * hd, ab));
    const v = linear(x1, rows, H, w("self_attn.v_proj.weight", [nKv * hd, H]), nKv * hd, bias("self_attn.v_proj.bias", nKv * hd, ab));
    outputs[`${p}.self_attn.q_proj`] = tensor([B, T, nH * hd], q);
    outputs[`${p}.self_attn.k_proj`] = tensor([B, T, nKv * hd], k);
    outputs[`${p}.self_attn.v_proj`] = tensor([B, T, nKv * hd], v);

    const qr = applyRope(q, batch, nH, hd, invFreq);
    const kr = applyRope(k, batch, nKv, hd, invFreq);
    const ctx = attention(qr, kr, v, batch, nH, nKv, hd, scale);
    inputs[`${p}.self_attn.o_proj`] = tensor([B, T, nH * hd], ctx);
    const attnOut = linear(ctx, rows, nH * hd, w("self_attn.o_proj.weight", [H, nH * hd]), H, bias("self_attn.o_proj.bias", H, ab));
    outputs[`${p}.self_attn.o_proj`] = tensor(shapeH, attnOut);
    outputs[`${p}.self_attn`] = tensor(shapeH, attnOut);
    const h1 = add(hidden, attnOut);

    // --- MLP block
    inputs[`${p}.post_attention_layernorm`] = tensor(shapeH, h1);
    const x2 = rmsNorm(h1, rows, H, w("post_attention_layernorm.weight", [H]), cfg.normEps);
    outputs[`${p}.post_attention_layernorm`] = tensor(shapeH, x2);

    inputs[`${p}.mlp`] = tensor(shapeH, x2);
    inputs[`${p}.mlp.gate_proj`] = tensor(shapeH, x2);
    inputs[`${p}.mlp.up_proj`] = tensor(shapeH, x2);
    const mb = cfg.mlpBias;
    const gate = linear(x2, rows, H, w("mlp.gate_proj.weight", [I, H]), I, bias("mlp.gate_proj.bias", I, mb));
    const up = linear(x2, rows, H, w("mlp.up_proj.weight", [I, H]), I, bias("mlp.up_proj.bias", I, mb));
    outputs[`${p}.mlp.gate_proj`] = tensor([B, T, I], gate);
    outputs[`${p}.mlp.up_proj`] = tensor([B, T, I], up);
    const act = new Float32Array(rows * I);
    for (let i = 0; i < act.length; i++) act[i] = Math.fround(silu(gate[i])) * up[i];
    inputs[`${p}.mlp.down_proj`] = tensor([B, T, I], act);
    const down = linear(act, rows, I, w("mlp.down_proj.weight", [H, I]), H, bias("mlp.down_proj.bias", H, mb));
    outputs[`${p}.mlp.down_proj`] = tensor(shapeH, down);
    outputs[`${p}.mlp`] = tensor(shapeH, down);

    hidden = add(h1, down);
    outputs[p] = tensor(shapeH, hidden);
  }

  inputs["model.norm"] = tensor(shapeH, hidden);
  const normed = rmsNorm(hidden, rows, H, getWeight(weights, "model.norm.weight", [H]), cfg.normEps);
  outputs["model.norm"] = tensor(shapeH, normed);

  const headW = cfg.tieWordEmbeddings ? embW : getWeight(weights, "lm_head.weight", [V, H]);
  inputs["lm_head"] = tensor(shapeH, normed);
  const logits = tensor([B, T, V], linear(normed, rows, H, headW, V));
  outputs["lm_head"] = logits;
  return { logits, outputs, inputs };
}

// ---------------------------------------------------------------------------------------------
// GPT-2

function gpt2Forward(weights: RefWeights, cfg: RefConfig, ids: number[][], batch: Batch): RefForwardResult {
  const { B, T, pos } = batch;
  const H = cfg.hiddenSize;
  const nH = cfg.numHeads;
  const hd = H / nH;
  const I = cfg.intermediateSize;
  const V = cfg.vocabSize;
  const rows = B * T;
  if (!Number.isInteger(hd)) throw new Error("reference: hiddenSize must be a multiple of numHeads");

  const outputs: Record<string, RefTensor> = {};
  const inputs: Record<string, RefTensor> = {};
  const shapeH = [B, T, H];

  const wte = getWeight(weights, "transformer.wte.weight", [V, H]);
  const wpeT = weights.get("transformer.wpe.weight") ?? weights.get("wpe.weight");
  if (!wpeT || wpeT.shape.length !== 2 || wpeT.shape[1] !== H) throw new Error("reference: missing or bad transformer.wpe.weight");
  const nPos = wpeT.shape[0];
  const wpe = wpeT.data;

  const tok = new Float32Array(rows * H);
  const posEmb = new Float32Array(rows * H);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const id = ids[b][t];
      const pid = pos[b][t];
      if (!Number.isInteger(id) || id < 0 || id >= V) throw new Error(`reference: token id ${id} out of range`);
      if (!Number.isInteger(pid) || pid < 0 || pid >= nPos) throw new Error(`reference: position id ${pid} out of range`);
      for (let i = 0; i < H; i++) {
        tok[(b * T + t) * H + i] = wte[id * H + i];
        posEmb[(b * T + t) * H + i] = wpe[pid * H + i];
      }
    }
  }
  outputs["transformer.wte"] = tensor(shapeH, tok);
  // HF calls wpe on position ids of shape [1, T] when none are given; we always use per-row
  // position ids, so this is [B, T, H].
  outputs["transformer.wpe"] = tensor(shapeH, posEmb);
  let hidden = add(tok, posEmb); // dropout is identity at inference

  const scale = 1 / Math.sqrt(hd);
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `transformer.h.${l}`;
    const w = (name: string, shape: number[]) => getWeight(weights, `${p}.${name}`, shape);
    inputs[p] = tensor(shapeH, hidden);

    // --- attention block
    inputs[`${p}.ln_1`] = tensor(shapeH, hidden);
    const x1 = layerNorm(hidden, rows, H, w("ln_1.weight", [H]), w("ln_1.bias", [H]), cfg.normEps);
    outputs[`${p}.ln_1`] = tensor(shapeH, x1);

    inputs[`${p}.attn`] = tensor(shapeH, x1);
    inputs[`${p}.attn.c_attn`] = tensor(shapeH, x1);
    const qkv = conv1d(x1, rows, H, w("attn.c_attn.weight", [H, 3 * H]), 3 * H, w("attn.c_attn.bias", [3 * H]));
    outputs[`${p}.attn.c_attn`] = tensor([B, T, 3 * H], qkv);
    // split(hidden, dim=-1) → q, k, v; each then viewed as [nH, hd] heads
    const q = new Float32Array(rows * H);
    const k = new Float32Array(rows * H);
    const v = new Float32Array(rows * H);
    for (let r = 0; r < rows; r++) {
      for (let i = 0; i < H; i++) {
        q[r * H + i] = qkv[r * 3 * H + i];
        k[r * H + i] = qkv[r * 3 * H + H + i];
        v[r * H + i] = qkv[r * 3 * H + 2 * H + i];
      }
    }
    const ctx = attention(q, k, v, batch, nH, nH, hd, scale);
    inputs[`${p}.attn.c_proj`] = tensor(shapeH, ctx);
    const attnOut = conv1d(ctx, rows, H, w("attn.c_proj.weight", [H, H]), H, w("attn.c_proj.bias", [H]));
    outputs[`${p}.attn.c_proj`] = tensor(shapeH, attnOut);
    outputs[`${p}.attn`] = tensor(shapeH, attnOut);
    const h1 = add(hidden, attnOut);

    // --- MLP block
    inputs[`${p}.ln_2`] = tensor(shapeH, h1);
    const x2 = layerNorm(h1, rows, H, w("ln_2.weight", [H]), w("ln_2.bias", [H]), cfg.normEps);
    outputs[`${p}.ln_2`] = tensor(shapeH, x2);

    inputs[`${p}.mlp`] = tensor(shapeH, x2);
    inputs[`${p}.mlp.c_fc`] = tensor(shapeH, x2);
    const fc = conv1d(x2, rows, H, w("mlp.c_fc.weight", [H, I]), I, w("mlp.c_fc.bias", [I]));
    outputs[`${p}.mlp.c_fc`] = tensor([B, T, I], fc);
    const act = new Float32Array(rows * I);
    for (let i = 0; i < act.length; i++) act[i] = geluNew(fc[i]);
    inputs[`${p}.mlp.c_proj`] = tensor([B, T, I], act);
    const mlpOut = conv1d(act, rows, I, w("mlp.c_proj.weight", [I, H]), H, w("mlp.c_proj.bias", [H]));
    outputs[`${p}.mlp.c_proj`] = tensor(shapeH, mlpOut);
    outputs[`${p}.mlp`] = tensor(shapeH, mlpOut);

    hidden = add(h1, mlpOut);
    outputs[p] = tensor(shapeH, hidden);
  }

  inputs["transformer.ln_f"] = tensor(shapeH, hidden);
  const normed = layerNorm(hidden, rows, H, getWeight(weights, "transformer.ln_f.weight", [H]), getWeight(weights, "transformer.ln_f.bias", [H]), cfg.normEps);
  outputs["transformer.ln_f"] = tensor(shapeH, normed);

  // GPT2LMHeadModel ties lm_head to wte; an explicit untied lm_head.weight is honoured.
  const headW = !cfg.tieWordEmbeddings && hasWeight(weights, "lm_head.weight") ? getWeight(weights, "lm_head.weight", [V, H]) : wte;
  inputs["lm_head"] = tensor(shapeH, normed);
  const logits = tensor([B, T, V], linear(normed, rows, H, headW, V));
  outputs["lm_head"] = logits;
  return { logits, outputs, inputs };
}

// ---------------------------------------------------------------------------------------------
// Public API

/**
 * Full forward pass. ids: [batch][seq] (rows equally long; left-pad and pass a mask).
 * Returns logits [B, T, V] and every module's output (and first input) by HF module path.
 */
export function referenceForward(weights: RefWeights, config: RefConfig, ids: number[][], opts: RefForwardOptions = {}): RefForwardResult {
  const batch = prepareBatch(ids, opts);
  if (config.modelType === "llama") return llamaForward(weights, config, ids, batch);
  if (config.modelType === "gpt2") return gpt2Forward(weights, config, ids, batch);
  throw new Error(`reference: unknown model type ${String(config.modelType)}`);
}

/** Index of the largest value; the first one on ties (like torch.argmax). */
export function argmax(data: Float32Array, start: number, length: number): number {
  let best = 0;
  for (let i = 1; i < length; i++) if (data[start + i] > data[start + best]) best = i;
  return best;
}

/**
 * Greedy decoding without a KV cache: every step runs the full forward on the whole sequence
 * and appends argmax of the last position's logits. Returns only the generated ids; an EOS id,
 * if produced, is included and ends generation (as HF generate does).
 */
export function referenceGreedy(weights: RefWeights, config: RefConfig, ids: number[], steps: number, eosIds: number[] = []): number[] {
  const seq = ids.slice();
  const generated: number[] = [];
  const V = config.vocabSize;
  for (let s = 0; s < steps; s++) {
    const { logits } = referenceForward(weights, config, [seq]);
    const next = argmax(logits.data, (seq.length - 1) * V, V);
    generated.push(next);
    seq.push(next);
    if (eosIds.includes(next)) break;
  }
  return generated;
}

/** Normalize a Hugging Face config.json (llama or gpt2) into a RefConfig (test convenience). */
export function refConfigFromHf(json: Record<string, any>): RefConfig {
  if (json.model_type === "llama") {
    const hidden = json.hidden_size as number;
    const heads = json.num_attention_heads as number;
    return {
      modelType: "llama",
      hiddenSize: hidden,
      numLayers: json.num_hidden_layers,
      numHeads: heads,
      numKvHeads: json.num_key_value_heads ?? heads,
      headDim: json.head_dim ?? hidden / heads,
      intermediateSize: json.intermediate_size,
      vocabSize: json.vocab_size,
      normEps: json.rms_norm_eps ?? 1e-6,
      ropeTheta: json.rope_theta ?? 10000,
      tieWordEmbeddings: json.tie_word_embeddings ?? false,
      attentionBias: json.attention_bias ?? false,
      mlpBias: json.mlp_bias ?? false,
    };
  }
  if (json.model_type === "gpt2") {
    const hidden = json.n_embd as number;
    const heads = json.n_head as number;
    return {
      modelType: "gpt2",
      hiddenSize: hidden,
      numLayers: json.n_layer,
      numHeads: heads,
      numKvHeads: heads,
      headDim: hidden / heads,
      intermediateSize: json.n_inner ?? 4 * hidden,
      vocabSize: json.vocab_size,
      normEps: json.layer_norm_epsilon ?? 1e-5,
      ropeTheta: 0,
      tieWordEmbeddings: json.tie_word_embeddings ?? true,
      attentionBias: true,
      mlpBias: true,
    };
  }
  throw new Error(`reference: unsupported model_type ${json.model_type}`);
}
