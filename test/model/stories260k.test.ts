// The bundled model end to end: golden greedy generation, batching, the reference forward.
import { readFileSync } from "node:fs";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel } from "../../ts/src/index.js";

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
