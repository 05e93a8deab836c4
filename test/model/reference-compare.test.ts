// The native forward agrees with the plain TypeScript reference (test/reference/forward.ts) on EVERY
// module output, within 1e-4, for the bundled model and random GPT-2 / Llama configs (GQA, bf16
// weights, odd sizes, sharded files). Module outputs are captured with tr.cache().
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { afterAll, describe, expect, it } from "vitest";

import { LanguageModel, Tensor } from "../../ts/src/index.js";
import { writeRandomCheckpoint } from "../../ts/src/models/random-checkpoint.js";
import { type RefTensor, refConfigFromHf, referenceForward } from "../reference/forward.js";
import { readSafetensors } from "../reference/read-safetensors.js";

const tmp = mkdtempSync(join(tmpdir(), "nx-ref-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function readAllWeights(dir: string, files: string[]): Map<string, RefTensor> {
  const w = new Map<string, RefTensor>();
  for (const f of files) for (const [k, v] of readSafetensors(join(dir, f))) w.set(k, v);
  return w;
}

async function compare(model: LanguageModel, prompts: number[][], tol: number) {
  const dir = model.dir;
  const files = (model._lm.weights.size && require_files(dir)) as string[];
  const weights = readAllWeights(dir, files);
  const cfg = refConfigFromHf(JSON.parse(readFileSync(join(dir, "config.json"), "utf8")));
  // both sides get the same left-padded batch
  const { ids, mask } = padLeft(prompts, 0);
  const ref = referenceForward(weights, cfg, ids, { attentionMask: mask });
  const res = await model.trace({ input_ids: ids, attention_mask: mask }, (tr) => ({ cache: tr.cache(), logits: model.lm_head.output }));
  const cache = res.cache as Record<string, { output: Tensor }>;
  const T = Math.max(...prompts.map((p) => p.length));
  let checked = 0;
  for (const [path, want] of Object.entries(ref.outputs)) {
    const entry = cache[path];
    expect(entry, `module ${path} is in the cache`).toBeDefined();
    const got = entry!.output as Tensor;
    expect([...got.shape], path).toEqual(want.shape);
    const g = got.toFloat32Array();
    const inner = want.data.length / (want.shape[0]! * want.shape[1]!);
    let worst = 0;
    prompts.forEach((p, b) => {
      const off = T - p.length;
      for (let t = 0; t < p.length; t++) {
        for (let i = 0; i < inner; i++) {
          const wv = want.data[(b * T + off + t) * inner + i]!;
          const gv = g[(b * T + off + t) * inner + i]!;
          worst = Math.max(worst, Math.abs(gv - wv) / Math.max(1, Math.abs(wv)));
        }
      }
    });
    expect(worst, `${path}: max relative error`).toBeLessThan(tol);
    checked++;
  }
  expect(checked).toBeGreaterThan(10);
}

function require_files(dir: string): string[] {
  try {
    const idx = JSON.parse(readFileSync(join(dir, "model.safetensors.index.json"), "utf8")) as { weight_map: Record<string, string> };
    return [...new Set(Object.values(idx.weight_map))];
  } catch {
    return ["model.safetensors"];
  }
}

function padLeft(rows: number[][], pad: number) {
  const T = Math.max(...rows.map((r) => r.length));
  return {
    ids: rows.map((r) => [...Array(T - r.length).fill(pad), ...r]),
    mask: rows.map((r) => [...Array(T - r.length).fill(0), ...r.map(() => 1)]),
  };
}

describe("native forward = TypeScript reference on every module output", () => {
  it("stories260K (GQA 8/4), one prompt and a padded batch", async () => {
    const model = await LanguageModel.load("stories260K");
    await compare(model, [[1, 403, 407, 261, 378]], 1e-4);
    await compare(model, [[1, 403, 407, 261, 378, 300, 301], [1, 290, 291]], 1e-4);
    await model.dispose();
  });

  const cases: Array<{ name: string; preset: string; dtype?: "float32" | "bfloat16"; shards?: number }> = [
    { name: "tiny GPT-2 (hidden 48, 3 heads)", preset: "tiny-gpt2" },
    { name: "tiny Llama (GQA 6/2, odd sizes)", preset: "tiny-llama" },
    { name: "tiny Llama, bf16 weights, 3 shards", preset: "tiny-llama", dtype: "bfloat16", shards: 3 },
    { name: "tiny GPT-2, bf16 weights", preset: "tiny-gpt2", dtype: "bfloat16" },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const dir = join(tmp, `${c.preset}-${c.dtype ?? "f32"}-${c.shards ?? 1}`);
      await writeRandomCheckpoint(dir, { preset: c.preset, dtype: c.dtype, shards: c.shards, seed: 3 });
      const model = await LanguageModel.load(dir);
      await compare(model, [[5, 9, 17, 33, 2, 60, 7], [11, 12, 13]], 1e-4);
      await model.dispose();
    });
  }
});

describe("limits", () => {
  it("a sequence longer than learned positions is a clear BAD_INPUT", async () => {
    const dir = join(tmp, "tiny-gpt2-limits");
    await writeRandomCheckpoint(dir, { preset: "tiny-gpt2", seed: 1 });
    const model = await LanguageModel.load(dir);
    const n = model.spec.maxPositions;
    const ids = Array.from({ length: n + 2 }, (_, i) => i % 50);
    await expect(model.trace(ids, () => ({ l: model.lm_head.output }))).rejects.toMatchObject({ code: "BAD_INPUT", message: expect.stringContaining(`${n}`) });
    await expect(model.generateText(ids.slice(0, n - 2), { maxNewTokens: 10 })).rejects.toMatchObject({ code: "BAD_INPUT" });
    await model.dispose();
  });
});

describe("checkpoints with extra buffers", () => {
  it("a tensor in a dtype the runtime lacks (an old GPT-2 U8 mask) is skipped, not fatal", async () => {
    const { readFileSync: rf, writeFileSync } = await import("node:fs");
    const { parseSafetensorsHeader, encodeSafetensors } = await import("../../ts/src/tensor/safetensors-format.js");
    const dir = join(tmp, "tiny-gpt2-u8");
    await writeRandomCheckpoint(dir, { preset: "tiny-gpt2", seed: 2 });
    const file = join(dir, "model.safetensors");
    const buf = new Uint8Array(rf(file));
    const h = parseSafetensorsHeader(buf, buf.length, file);
    const tensors = [...h.tensors].map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape, bytes: buf.slice(t.begin, t.end) }));
    tensors.push({ name: "transformer.h.0.attn.bias", dtype: "U8", shape: [2, 2], bytes: new Uint8Array([1, 0, 1, 1]) });
    const chunks = encodeSafetensors(tensors);
    writeFileSync(file, Buffer.concat(chunks.map((c) => Buffer.from(c))));
    const model = await LanguageModel.load(dir);
    expect(model._lm.weights.has("transformer.h.0.attn.bias")).toBe(false);
    expect((await model.forward([1, 2, 3])).shape).toEqual([1, 3, model.spec.vocabSize]);
    await model.dispose();
  });
});
