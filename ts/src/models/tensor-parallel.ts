/**
 * Tensor parallelism for the Llama and GPT-2 forward (Megatron-style), as data plus two helpers:
 *
 * - the sharding plan (`shardPlan`): which weights each rank holds a slice of. Column-parallel layers
 *   split their output features (whole heads / kv heads per rank for q/k/v, a block of the MLP width for
 *   gate/up/c_fc; GPT-2's fused c_attn is split per head inside each of q, k and v); row-parallel layers
 *   (o_proj, down_proj, both c_proj) split their input features, so each rank's output is a partial sum
 *   that one all-reduce completes. The token embedding and the LM head are split by vocabulary rows
 *   (`vocab`): each rank holds ceil(V / world) rows (the last rank's block is padded with zero rows), looks
 *   up only the ids in its block (one all-reduce completes the embeddings) and computes only its block of
 *   the logits (one all-gather completes them). Norms and GPT-2's position table are replicated. Heads, kv
 *   heads and the MLP width must divide by the world size (BAD_INPUT otherwise); the vocabulary need not.
 * - the module boundaries whose values are sharded (`boundaryOf`): q/k/v/gate/up/c_attn/c_fc outputs and
 *   the per-head attention internals live as slices on each rank; `TensorParallel.run` gathers them for a
 *   hook only when the hooks want that boundary's inputs or output, and slices what the hook hands back
 *   (in-place edits and replacements included), so interventions always see full activations.
 *
 * Shards are views of the memory-mapped weights where the layout allows: a row block of an [out, in]
 * Linear weight is contiguous, a column block is a strided view with unit inner stride (the GEMM takes
 * both). Only GPT-2's c_attn (q|k|v interleaved per rank) is copied, one shard per rank.
 *
 * ```ts
 * const plan = shardPlan(config, 2);                   // throws BAD_INPUT when it does not divide
 * const mine = shardWeights(weights, plan, rank);      // views (and the c_attn copy)
 * const lm = new TransformerLM(config, mine, invFreq, new TensorParallel(comm, plan));
 * ```
 */
import type { Communicator } from "../cluster/communicator.js";
import { NNsightError } from "../errors.js";
import { untracked } from "../tensor/scope.js";
import { type Tensor, cat, fromArray, zeros } from "../tensor/tensor.js";
import type { ModelConfig } from "./config.js";

/** How one weight is split across the ranks. */
export interface WeightSplit {
  /**
   * "column": output features split; "row": input features split (partial sums are all-reduced);
   * "vocab": rows of an embedding table / LM head in blocks of `ShardPlan.vocab.shard` (the last padded)
   */
  kind: "column" | "row" | "vocab";
  /** the dim of the stored tensor that is split */
  dim: number;
  /** >1: the split dim holds this many equal parts (GPT-2 c_attn: q|k|v), each split across ranks */
  groups: number;
}

export interface ShardPlan {
  world: number;
  /** split weights by HF name; every other weight is replicated */
  splits: Map<string, WeightSplit>;
  /** per rank: attention heads, kv heads, MLP width */
  heads: number;
  kvHeads: number;
  intermediate: number;
  /** the vocabulary split: `size` tokens in blocks of `shard` rows per rank (null for a world of 1) */
  vocab: { size: number; shard: number } | null;
}

/** The plan for `world` ranks (BAD_INPUT when heads, kv heads or the MLP width do not divide). */
export function shardPlan(c: ModelConfig, world: number): ShardPlan {
  if (!Number.isInteger(world) || world < 1) throw new NNsightError("BAD_INPUT", `world size must be a positive integer, got ${world}`);
  const bad: string[] = [];
  if (c.numHeads % world) bad.push(`${c.numHeads} attention heads`);
  if (c.modelType === "llama" && c.numKvHeads % world) bad.push(`${c.numKvHeads} key/value heads`);
  if (c.intermediateSize % world) bad.push(`an MLP width of ${c.intermediateSize}`);
  if (bad.length) {
    throw new NNsightError(
      "BAD_INPUT",
      `cannot split this ${c.modelType} model over ${world} ranks: ${bad.join(", ")} ${bad.length === 1 ? "does" : "do"} not divide by ${world} (tensor parallelism gives each rank whole heads and an equal block of the MLP)`,
    );
  }
  const splits = new Map<string, WeightSplit>();
  const col = (dim: number, groups = 1): WeightSplit => ({ kind: "column", dim, groups });
  const row = (dim: number): WeightSplit => ({ kind: "row", dim, groups: 1 });
  for (let l = 0; l < c.numLayers; l++) {
    if (c.modelType === "llama") {
      const p = `model.layers.${l}`;
      // nn.Linear weights are [out, in]: column = dim 0, row = dim 1; column biases split with them
      for (const n of ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]) {
        splits.set(`${p}.${n}.weight`, col(0));
        splits.set(`${p}.${n}.bias`, col(0));
      }
      splits.set(`${p}.self_attn.o_proj.weight`, row(1));
      splits.set(`${p}.mlp.down_proj.weight`, row(1));
    } else {
      const p = `transformer.h.${l}`;
      // Conv1D weights are [in, out]: column = dim 1, row = dim 0
      splits.set(`${p}.attn.c_attn.weight`, col(1, 3));
      splits.set(`${p}.attn.c_attn.bias`, col(0, 3));
      splits.set(`${p}.mlp.c_fc.weight`, col(1));
      splits.set(`${p}.mlp.c_fc.bias`, col(0));
      splits.set(`${p}.attn.c_proj.weight`, row(0));
      splits.set(`${p}.mlp.c_proj.weight`, row(0));
    }
  }
  const vocab: WeightSplit = { kind: "vocab", dim: 0, groups: 1 };
  if (world > 1) {
    // the token table (and the LM head: tied, it is the same tensor) by vocabulary rows
    for (const n of c.modelType === "llama" ? ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"] : ["transformer.wte.weight", "lm_head.weight"]) splits.set(n, vocab);
  }
  return {
    world,
    splits,
    heads: c.numHeads / world,
    kvHeads: (c.modelType === "llama" ? c.numKvHeads : c.numHeads) / world,
    intermediate: c.intermediateSize / world,
    vocab: world > 1 ? { size: c.vocabSize, shard: Math.ceil(c.vocabSize / world) } : null,
  };
}

/**
 * Rank `rank`'s weights: split weights become its slice (views; grouped splits are copied), the others
 * are returned as they are. The caller disposes the full tensors it no longer needs (those not returned).
 */
export function shardWeights(weights: Map<string, Tensor>, plan: ShardPlan, rank: number): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  for (const [name, t] of weights) {
    const s = plan.splits.get(name);
    if (s?.kind === "vocab") out.set(name, untracked(() => vocabRows(t, plan.vocab!.shard, rank)));
    else out.set(name, s ? untracked(() => sliceOf(t, { dim: s.dim, groups: s.groups }, rank, plan.world)) : t);
  }
  return out;
}

/** Rows [rank * shard, (rank + 1) * shard) of a vocabulary table (a view), zero rows past its end (a copy). */
function vocabRows(t: Tensor, shard: number, rank: number): Tensor {
  const V = t.shape[0]!, lo = rank * shard, n = Math.max(0, Math.min(shard, V - lo));
  if (n === shard) return t.narrow(0, lo, shard);
  const pad = zeros([shard - n, ...t.shape.slice(1)], { dtype: t.dtype, device: t.device });
  if (n === 0) return pad;
  const part = t.narrow(0, lo, n);
  const r = cat([part, pad], 0);
  part.dispose();
  pad.dispose();
  return r;
}

/** How a value at a module boundary is split: along `dim` (negative counts from the end), in `groups` parts. */
export interface ShardDim {
  dim: number;
  groups?: number;
}

/** The sharding of a module boundary's inputs (by position) and output (a tuple for tuple outputs). */
export interface Boundary {
  inputs: Array<ShardDim | null>;
  output: ShardDim | null | Array<ShardDim | null>;
}

const LAST: ShardDim = { dim: -1 };
const HEADS: ShardDim = { dim: 1 }; // HF attention layout [B, H, T, hd]
const COLUMN: Boundary = { inputs: [null], output: LAST };
const ROW: Boundary = { inputs: [LAST], output: null };
const ELEMENTWISE: Boundary = { inputs: [LAST], output: LAST };
const ROPE: Boundary = { inputs: [HEADS, HEADS], output: [HEADS, HEADS] };
const ATTENTION: Boundary = { inputs: [HEADS, HEADS, HEADS], output: { dim: 2 } }; // output [B, T, H, hd]
const C_ATTN: Boundary = { inputs: [null], output: { dim: -1, groups: 3 } };
// inside attention_interface_0: every value is [B, H, ...] with this rank's heads
const PER_HEAD1: Boundary = { inputs: [HEADS], output: HEADS };
const PER_HEAD2: Boundary = { inputs: [HEADS, HEADS], output: HEADS };
const PER_HEAD3: Boundary = { inputs: [HEADS, HEADS, HEADS], output: HEADS };

/** The module boundaries whose values are sharded under tensor parallelism (null: replicated). */
export function boundaryOf(modelType: ModelConfig["modelType"], path: string): Boundary | null {
  const dot = path.lastIndexOf(".");
  const name = path.slice(dot + 1);
  const parent = path.slice(path.lastIndexOf(".", dot - 1) + 1, dot);
  if (modelType === "llama") {
    if (name === "q_proj" || name === "k_proj" || name === "v_proj" || name === "gate_proj" || name === "up_proj") return COLUMN;
    if (name === "o_proj" || name === "down_proj") return ROW;
  } else {
    if (name === "c_attn") return C_ATTN;
    if (name === "c_fc") return COLUMN;
    if (name === "c_proj") return ROW;
  }
  if (parent === "source") {
    if (name === "act_fn_0" || name === "act_0") return ELEMENTWISE;
    if (name === "apply_rotary_pos_emb_0") return ROPE;
    if (name === "attention_interface_0") return ATTENTION;
    if (name === "torch_nn_functional_scaled_dot_product_attention_0") return PER_HEAD3;
    if (name === "torch_matmul_0" || name === "torch_matmul_1") return PER_HEAD2;
    if (name === "nn_functional_softmax_0") return PER_HEAD1;
  }
  return null;
}

/** Rank `rank`'s slice of a full tensor (a view unless grouped). */
export function sliceOf(t: Tensor, s: ShardDim, rank: number, world: number): Tensor {
  const d = s.dim < 0 ? s.dim + t.ndim : s.dim;
  const n = t.shape[d]!;
  const g = s.groups ?? 1;
  if (n % (g * world) !== 0) {
    throw new NNsightError("SHAPE", `cannot split a dim of ${n} (tensor [${t.shape.join(", ")}]) into ${g > 1 ? `${g} groups of ` : ""}${world} shards`);
  }
  if (g === 1) return t.narrow(d, rank * (n / world), n / world);
  // [.., g * n/g, ..] -> [.., g, n/g, ..] -> each group's slice -> [.., n/world, ..] (a copy: not a view)
  const grouped = t.reshape([...t.shape.slice(0, d), g, n / g, ...t.shape.slice(d + 1)]);
  const part = n / g / world;
  const slice = grouped.narrow(d + 1, rank * part, part);
  const r = slice.reshape([...t.shape.slice(0, d), n / world, ...t.shape.slice(d + 1)]);
  if (slice !== grouped) slice.dispose();
  grouped.dispose();
  return r;
}

/** A rank's handle on its group inside the forward pass. */
export class TensorParallel {
  readonly comm: Communicator;
  readonly plan: ShardPlan;
  readonly rank: number;
  readonly world: number;

  constructor(comm: Communicator, plan: ShardPlan) {
    if (comm.world !== plan.world) throw new NNsightError("BAD_INPUT", `the plan is for ${plan.world} ranks, the communicator has ${comm.world}`);
    this.comm = comm;
    this.plan = plan;
    this.rank = comm.rank;
    this.world = comm.world;
  }

  /** The full value of a sharded one (every rank's slice, in rank order). */
  gather(x: Tensor, s: ShardDim): Tensor {
    const g = s.groups ?? 1;
    if (g === 1) return this.comm.allGather(x, s.dim);
    const d = s.dim < 0 ? s.dim + x.ndim : s.dim;
    const n = x.shape[d]!;
    const grouped = x.reshape([...x.shape.slice(0, d), g, n / g, ...x.shape.slice(d + 1)]);
    const full = this.comm.allGather(grouped, d + 1);
    grouped.dispose();
    const r = full.reshape([...x.shape.slice(0, d), n * this.world, ...x.shape.slice(d + 1)]);
    if (r !== full) full.dispose();
    return r;
  }

  /** This rank's slice of a full value. */
  shard(x: Tensor, s: ShardDim): Tensor {
    return sliceOf(x, s, this.rank, this.world);
  }

  /**
   * Vocabulary-parallel embedding lookup: `table` is this rank's block of rows; ids outside it read a zero
   * row, and the all-reduce adds the one rank's row that holds each id (exact: the others add zeros).
   * `ids` as numbers (`shape` [B, T]); ids outside the vocabulary are BAD_INPUT, as unsharded.
   */
  embedVocab(table: Tensor, ids: ArrayLike<number>, shape: number[], lookup: (t: Tensor, ids: Tensor) => Tensor): Tensor {
    const { size, shard } = this.plan.vocab!;
    const lo = this.rank * shard;
    const local = new Int32Array(ids.length), keep = new Float32Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= size) throw new NNsightError("BAD_INPUT", `token id ${id} is outside the vocabulary [0, ${size})`);
      const j = id - lo;
      if (j >= 0 && j < shard) {
        local[i] = j;
        keep[i] = 1;
      }
    }
    const idsT = fromArray(local, "int32", shape);
    const rows = lookup(table, idsT);
    const mask = fromArray(keep, "float32", [...shape, 1]);
    const out = rows.mul(mask);
    for (const t of [idsT, rows, mask]) t.dispose();
    return this.comm.allReduce_(out);
  }

  /** Complete a vocabulary-parallel LM head: every rank's block of logits, joined and cut to the vocabulary. */
  gatherVocab(part: Tensor): Tensor {
    const full = this.comm.allGather(part, -1);
    const V = this.plan.vocab!.size;
    if (full.shape[full.ndim - 1] === V) return full;
    const r = full.narrow(-1, 0, V).contiguous();
    full.dispose();
    return r;
  }

  /** Complete a row-parallel layer: sum the ranks' partial outputs (in place). */
  reduce(y: Tensor): Tensor {
    return this.comm.allReduce_(y);
  }
}
