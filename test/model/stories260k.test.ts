// The bundled model end to end: golden greedy generation, batching, the reference forward.
import { readFileSync } from "node:fs";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, cudaInfo } from "../../ts/src/index.js";

const golden = JSON.parse(readFileSync(new URL("../fixtures/stories260K-golden.json", import.meta.url), "utf8")) as {
  prompt: string;
  promptIds: number[];
  ids: number[];
  text: string;
};

let model: LanguageModel;
beforeAll(async () => {
  model = await LanguageModel.load("stories260K");
});
afterAll(async () => {
  await model.dispose();
});

describe("stories260K", () => {
  it("encodes the prompt like llama2.c", () => {
    expect(model.tokenizer.encode(golden.prompt)).toEqual(golden.promptIds);
  });

  it("reproduces the golden greedy generation token for token", async () => {
    const n = golden.ids.length - golden.promptIds.length;
    const { sequences, texts } = await model.generateText(golden.prompt, { maxNewTokens: n });
    expect(sequences[0]).toEqual(golden.ids);
    expect(texts[0]).toBe(golden.text);
  });

  it("a left-padded batch gives each row the logits it gets alone (1e-5)", async () => {
    const prompts = ["Once upon a time", "Lily and Ben", "The cat sat on the big red mat"];
    const batch = await model.forward(prompts);
    const B = batch.shape[0]!, T = batch.shape[1]!, V = batch.shape[2]!;
    expect(B).toBe(3);
    const all = batch.toFloat32Array();
    for (let b = 0; b < prompts.length; b++) {
      const alone = await model.forward(prompts[b]!);
      const t = alone.shape[1]!;
      const a = alone.toFloat32Array();
      let worst = 0;
      for (let i = 0; i < t; i++) {
        for (let v = 0; v < V; v++) {
          const got = all[(b * T + (T - t) + i) * V + v]!;
          worst = Math.max(worst, Math.abs(got - a[i * V + v]!));
        }
      }
      // relative to the logits' scale: a batch runs the GEMMs at another M, which may take another kernel
      // path (the streamed matvec for small M) that sums dot products in another order (f32 rounding,
      // about 1 ulp per layer; measured 9e-6 on logits of magnitude 19)
      let scale = 1;
      for (const x of a) scale = Math.max(scale, Math.abs(x));
      expect(worst / scale).toBeLessThan(1e-5);
    }
  });

  it("with packed weights a row's logits are bit-identical whatever rows share the pass (rowsIndependent)", async () => {
    await model.forward("Once"); // the first pass packs the weights
    expect(model._lm.rowsIndependent()).toBe(true);
    for (const len of [1, 3, 5, 9, 17]) {
      const rows = Array.from({ length: 12 }, (_, r) => Array.from({ length: len }, (_, i) => ((r * 71 + i * 37) % 500) + 5));
      const alone = (await model.forward([rows[0]!])).toFloat32Array();
      for (const B of [2, 5, 12]) {
        const y = (await model.forward(rows.slice(0, B))).narrow(0, 0, 1).contiguous().toFloat32Array();
        expect(y.every((v, i) => v === alone[i]), `length ${len}, batch ${B}`).toBe(true);
      }
    }
  });

  it("batched generation equals per-prompt generation", async () => {
    const prompts = ["Once upon a time", "Lily"];
    const both = await model.generateText(prompts, { maxNewTokens: 12 });
    for (let b = 0; b < prompts.length; b++) {
      const one = await model.generateText(prompts[b]!, { maxNewTokens: 12 });
      expect(both.sequences[b]).toEqual(one.sequences[0]);
    }
  });

  it("sampling is reproducible with a seed and differs across seeds", async () => {
    const a = await model.generateText("Once upon a time", { maxNewTokens: 20, temperature: 1, topK: 40, seed: 7 });
    const b = await model.generateText("Once upon a time", { maxNewTokens: 20, temperature: 1, topK: 40, seed: 7 });
    const c = await model.generateText("Once upon a time", { maxNewTokens: 20, temperature: 1, topK: 40, seed: 8 });
    expect(a.sequences).toEqual(b.sequences);
    expect(a.sequences).not.toEqual(c.sequences);
  });

  it("rejects an empty prompt with BAD_INPUT", async () => {
    await expect(model.forward("")).rejects.toMatchObject({ code: "BAD_INPUT" });
  });
});

describe("load options", () => {
  it("dtype: bfloat16 converts weights on load (half the bytes) and still runs close to f32", async () => {
    // bf16 weights are not packed: a few rows take another summation order than many (not row-independent)
    const unpacked = await LanguageModel.load("stories260K", { dtype: "bfloat16" });
    await unpacked.forward("Once");
    expect(unpacked._lm.rowsIndependent()).toBe(false);
    await unpacked.dispose();
    const { memory } = await import("../../ts/src/index.js");
    const before = memory().hostBytes;
    const bf = await LanguageModel.load("stories260K", { dtype: "bfloat16" });
    const grown = memory().hostBytes - before;
    expect(bf._lm.weights.get("model.layers.0.mlp.up_proj.weight")!.dtype).toBe("bfloat16");
    // about half of the f32 checkpoint's 1.18 MB (64-byte rounding per tensor)
    expect(grown).toBeGreaterThan(0.4e6);
    expect(grown).toBeLessThan(0.7e6);
    const a = await model.forward(golden.prompt);
    const b = await bf.forward(golden.prompt);
    const x = a.toFloat32Array(), y = b.toFloat32Array();
    let worst = 0, scale = 1;
    for (let i = 0; i < x.length; i++) {
      worst = Math.max(worst, Math.abs(x[i]! - y[i]!));
      scale = Math.max(scale, Math.abs(x[i]!));
    }
    expect(worst / scale).toBeLessThan(0.05); // bf16 keeps 8 bits of mantissa
    await bf.dispose();
  });

  it("a malformed device is DEVICE, cuda without a usable GPU is DEVICE with the reason; bad threads is BAD_INPUT", async () => {
    await expect(LanguageModel.load("stories260K", { device: "gpu" })).rejects.toMatchObject({ code: "DEVICE" });
    const cuda = cudaInfo();
    // where a GPU exists, test/native/cuda.test.ts runs this model on it instead
    if (!cuda.available) {
      await expect(LanguageModel.load("stories260K", { device: "cuda" })).rejects.toMatchObject({ code: "DEVICE", message: expect.stringContaining(cuda.reason!) });
    }
    await expect(LanguageModel.load("stories260K", { threads: 0 })).rejects.toMatchObject({ code: "BAD_INPUT" });
  });

  it("an unknown model id offline is MODEL_NOT_FOUND", async () => {
    await expect(LanguageModel.load("no-such-org/no-such-model-xyz")).rejects.toMatchObject({ code: "MODEL_NOT_FOUND" });
  }, 30_000);
});
