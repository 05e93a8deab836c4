// Tensor parallelism over two processes (shm communicator): the bundled stories260K, a random tiny Llama
// with GQA and a random tiny GPT-2 give the same logits, greedy tokens, hooked reads and edited results as
// the plain single-process model. The rank script (tp-rank.mjs) runs the jobs on every rank and, on rank 0,
// on the unsharded model too; this file compares. Plus the sharding plan's checks, in this process.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { NNsightError, arange } from "../../ts/src/index.js";
import { parseModelConfig } from "../../ts/src/models/config.js";
import { writeRandomCheckpoint } from "../../ts/src/models/random-checkpoint.js";
import { BUNDLED_MODELS_DIR } from "../../ts/src/models/causal-lm.js";
import { shardPlan, shardWeights } from "../../ts/src/models/tensor-parallel.js";
import { type GroupRun, runGroup } from "./helpers.js";

interface Values {
  shape: number[];
  values: number[];
}
interface Results {
  collectives?: Record<string, number>;
  forward: Values;
  generate: number[][];
  generateEdited: number[][];
  reads: Record<string, Values>;
  edits: Record<string, Values>;
}
interface RankMessage {
  dir: string;
  attn?: string;
  rank: number;
  tp: Results;
  reference: Results | null;
  error?: { code: string; message: string; stack: string };
}

/**
 * fp32 tolerance: 1e-5 of the value's scale (max |reference|, at least 1). A row-parallel layer sums two
 * partial products where the single process runs one GEMM over the whole inner dim: the same math in
 * another order, a few ulps apart (stories260K's logits reach ~15, where 1e-5 absolute is ~6 ulps).
 */
function expectClose(actual: Values, expected: Values, what: string): void {
  expect(actual.shape, what).toEqual(expected.shape);
  let scale = 1, diff = 0;
  for (let i = 0; i < expected.values.length; i++) {
    scale = Math.max(scale, Math.abs(expected.values[i]!));
    diff = Math.max(diff, Math.abs(actual.values[i]! - expected.values[i]!));
  }
  expect(diff / scale, `${what}: max |diff| ${diff} at scale ${scale}`).toBeLessThan(1e-5);
}

const dir = mkdtempSync(join(tmpdir(), "nx-tp-"));
const models = [
  { dir: join(BUNDLED_MODELS_DIR, "stories260K"), type: "llama" }, // 8 heads / 4 kv heads, MLP 172
  { dir: join(dir, "llama"), type: "llama" }, // 6 heads / 2 kv heads (GQA 3:1), MLP 100
  { dir: join(dir, "gpt2"), type: "gpt2" }, // 4 heads of 12, MLP 192
  { dir: join(dir, "llama"), type: "llama", attn: "eager" }, // attention probabilities per head
];
let run: GroupRun<RankMessage>;

beforeAll(async () => {
  await writeRandomCheckpoint(join(dir, "llama"), { preset: "tiny-llama", seed: 3 });
  // tiny-gpt2 has 3 heads (not divisible by 2); seed 1 generates varied tokens, not one repeated token
  await writeRandomCheckpoint(join(dir, "gpt2"), { preset: "tiny-gpt2", seed: 1, configOverrides: { n_head: 4 } });
  run = await runGroup<RankMessage>("tp-rank.mjs", [JSON.stringify(models)], { world: 2, timeoutMs: 60_000 });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.each(models.map((m, i) => [["stories260K", "tiny Llama (GQA)", "tiny GPT-2", "tiny Llama, eager attention"][i]!, m] as const))("tensor parallel, 2 ranks: %s", (_name, m) => {
  const results = () => {
    expect(run.failure, JSON.stringify(run.byRank.flat().filter((x) => x.error))).toBeNull();
    const [r0, r1] = [0, 1].map((r) => run.byRank[r]!.find((x) => x.dir === m.dir && x.attn === m.attn)!);
    expect(r0?.reference).toBeTruthy();
    return { tp: r0!.tp, other: r1!.tp, ref: r0!.reference! };
  };

  it("the forward gives the single-process logits, on every rank alike", () => {
    const { tp, other, ref } = results();
    expectClose(tp.forward, ref.forward, "logits");
    expect(other.forward).toEqual(tp.forward); // the all-reduce gives every rank the same bits
  });

  it("greedy generation gives the same tokens (plain, and with an edit at a sharded boundary every step)", () => {
    const { tp, other, ref } = results();
    expect(tp.generate).toEqual(ref.generate);
    expect(ref.generate.some((row) => new Set(row.slice(-8)).size > 1)).toBe(true); // not one token repeated
    expect(tp.generateEdited).toEqual(ref.generateEdited);
    expect(other.generate).toEqual(tp.generate);
  });

  it("hooks read full (gathered) activations at sharded and replicated boundaries", () => {
    const { tp, other, ref } = results();
    expect(Object.keys(tp.reads).sort()).toEqual(Object.keys(ref.reads).sort());
    for (const k of Object.keys(ref.reads)) {
      expectClose(tp.reads[k]!, ref.reads[k]!, k);
      expect(other.reads[k], k).toEqual(tp.reads[k]);
    }
  });

  it("gathers only what a hook touches: one all-reduce per row-parallel layer, one gather per sharded side read", () => {
    const { tp } = results();
    const c = tp.collectives!;
    // attention and MLP output of every layer, the token embeddings (vocabulary-parallel) and the logits
    const reduces = 2 * c.layers! + 2;
    expect(c).toEqual({ layers: c.layers, plain: reduces, replicatedRead: reduces, columnOutput: reduces + 1, rowOutput: reduces, rowInput: reduces + 1, rowBoth: reduces + 1 });
  });

  it("in-place edits and replacements of sharded values change the pass exactly as unsharded", () => {
    const { tp, ref } = results();
    for (const k of Object.keys(ref.edits)) expectClose(tp.edits[k]!, ref.edits[k]!, k);
    // the edits matter: the edited logits are far from the plain forward's (same prompts)
    const d = Math.max(...ref.edits.logits!.values.map((v, i) => Math.abs(v - ref.forward.values[i]!)));
    expect(d).toBeGreaterThan(1e-3);
  });
});

describe("sharding plans", () => {
  const llama = parseModelConfig(
    { model_type: "llama", hidden_size: 48, intermediate_size: 100, num_hidden_layers: 1, num_attention_heads: 6, num_key_value_heads: 2, vocab_size: 10 },
    "test",
  );
  it("split heads, kv heads and the MLP per rank; row-parallel layers split their inputs", () => {
    const p = shardPlan(llama, 2);
    expect([p.heads, p.kvHeads, p.intermediate]).toEqual([3, 1, 50]);
    expect(p.splits.get("model.layers.0.self_attn.k_proj.weight")).toEqual({ kind: "column", dim: 0, groups: 1 });
    expect(p.splits.get("model.layers.0.self_attn.o_proj.weight")).toEqual({ kind: "row", dim: 1, groups: 1 });
    expect(p.splits.get("model.layers.0.mlp.down_proj.weight")).toEqual({ kind: "row", dim: 1, groups: 1 });
    // the vocabulary (10 tokens) in blocks of 5 rows per rank
    expect(p.splits.get("model.embed_tokens.weight")).toEqual({ kind: "vocab", dim: 0, groups: 1 });
    expect(p.vocab).toEqual({ size: 10, shard: 5 });
    expect(shardPlan(llama, 1).splits.has("model.embed_tokens.weight")).toBe(false);
    const g = shardPlan(parseModelConfig({ model_type: "gpt2", n_embd: 48, n_layer: 1, n_head: 4, vocab_size: 10 }, "test"), 4);
    expect(g.splits.get("transformer.h.0.attn.c_attn.weight")).toEqual({ kind: "column", dim: 1, groups: 3 });
    expect(g.splits.get("transformer.h.0.mlp.c_proj.weight")).toEqual({ kind: "row", dim: 0, groups: 1 });
  });
  it("vocabulary blocks: a view per rank, the last one padded with zero rows", () => {
    const g = parseModelConfig({ model_type: "gpt2", n_embd: 8, n_layer: 1, n_head: 4, vocab_size: 10 }, "test");
    const plan = shardPlan(g, 4); // blocks of 3 rows: 0-2, 3-5, 6-8, 9 + two zero rows
    const table = arange(0, 20).reshape([10, 2]);
    const rows = (r: number) => shardWeights(new Map([["transformer.wte.weight", table]]), plan, r).get("transformer.wte.weight")!;
    expect(rows(1).toArray()).toEqual([[6, 7], [8, 9], [10, 11]]);
    expect(rows(3).toArray()).toEqual([[18, 19], [0, 0], [0, 0]]);
  });

  it("refuse sizes that do not divide, naming them", () => {
    expect(() => shardPlan(llama, 8)).toThrow(NNsightError);
    expect(() => shardPlan(llama, 8)).toThrow(/over 8 ranks: 6 attention heads, 2 key\/value heads, an MLP width of 100 do not divide by 8/);
    expect(() => shardPlan(llama, 4)).toThrow(/over 4 ranks: 6 attention heads, 2 key\/value heads do not divide by 4/);
    expect(() => shardPlan(parseModelConfig({ model_type: "gpt2", n_embd: 48, n_layer: 1, n_head: 3, vocab_size: 10 }, "test"), 2)).toThrow(/3 attention heads does not divide by 2/);
  });
});
