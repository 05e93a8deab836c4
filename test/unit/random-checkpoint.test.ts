import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { loadHFDirectory } from "../../ts/src/models/config.js";
import {
  assignShards,
  checkpointTensorList,
  f32ToBf16Bits,
  f32ToF16Bits,
  Rng,
  runMakeCheckpointCli,
  writeRandomCheckpoint,
} from "../../ts/src/models/random-checkpoint.js";
import { Tokenizer } from "../../ts/src/models/tokenizer.js";
import { readSafetensorsHeader, type SafetensorsTensorInfo } from "../../ts/src/tensor/safetensors-format.js";

const tmp = () => mkdtempSync(path.join(tmpdir(), "ckpt-"));

/** All tensors of a checkpoint folder, by name, with the file holding each. */
async function readAllHeaders(files: string[]): Promise<Map<string, SafetensorsTensorInfo & { file: string }>> {
  const out = new Map<string, SafetensorsTensorInfo & { file: string }>();
  for (const f of files) for (const [n, t] of (await readSafetensorsHeader(f)).tensors) out.set(n, { ...t, file: f });
  return out;
}

function floatsOf(file: string, t: SafetensorsTensorInfo): Float32Array {
  const b = readFileSync(file).subarray(t.begin, t.end);
  if (t.dtype === "F32") return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
  const u16 = new Uint16Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
  return Float32Array.from(u16, (h) => new Float32Array(new Uint32Array([h << 16]).buffer)[0]!);
}

describe("random checkpoints", () => {
  it("tiny-llama: loads back with the names and shapes the config implies", async () => {
    const dir = tmp();
    const res = await writeRandomCheckpoint(dir, { preset: "tiny-llama", seed: 7 });
    const d = await loadHFDirectory(dir);
    expect(d.config).toMatchObject({ modelType: "llama", hiddenSize: 48, numHeads: 6, numKvHeads: 2, headDim: 8, intermediateSize: 100, vocabSize: 97, numLayers: 3, tieWordEmbeddings: false });
    expect(d.weightFiles).toEqual([path.join(dir, "model.safetensors")]);
    const tensors = await readAllHeaders(d.weightFiles);
    // 2 + 9 per layer + norm (+ lm_head, untied)
    expect(tensors.size).toBe(1 + 3 * 9 + 1 + 1);
    const shape = (n: string) => tensors.get(n)?.shape;
    expect(shape("model.embed_tokens.weight")).toEqual([97, 48]);
    expect(shape("model.layers.2.self_attn.q_proj.weight")).toEqual([48, 48]);
    expect(shape("model.layers.2.self_attn.k_proj.weight")).toEqual([16, 48]);
    expect(shape("model.layers.2.self_attn.v_proj.weight")).toEqual([16, 48]);
    expect(shape("model.layers.2.self_attn.o_proj.weight")).toEqual([48, 48]);
    expect(shape("model.layers.0.mlp.gate_proj.weight")).toEqual([100, 48]);
    expect(shape("model.layers.0.mlp.up_proj.weight")).toEqual([100, 48]);
    expect(shape("model.layers.0.mlp.down_proj.weight")).toEqual([48, 100]);
    expect(shape("model.layers.1.input_layernorm.weight")).toEqual([48]);
    expect(shape("model.layers.1.post_attention_layernorm.weight")).toEqual([48]);
    expect(shape("model.norm.weight")).toEqual([48]);
    expect(shape("lm_head.weight")).toEqual([97, 48]);
    expect([...tensors.values()].every((t) => t.dtype === "F32")).toBe(true);
    expect(res.numParameters).toBe(97 * 48 * 2 + 48 + 3 * (2 * 48 + 48 * 48 * 2 + 16 * 48 * 2 + 3 * 100 * 48));

    // values: weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.02)
    const emb = floatsOf(d.weightFiles[0]!, tensors.get("model.embed_tokens.weight")!);
    const mean = emb.reduce((a, b) => a + b, 0) / emb.length;
    const std = Math.sqrt(emb.reduce((a, b) => a + (b - mean) ** 2, 0) / emb.length);
    expect(Math.abs(mean)).toBeLessThan(0.002);
    expect(std).toBeGreaterThan(0.018);
    expect(std).toBeLessThan(0.022);
    const norm = floatsOf(d.weightFiles[0]!, tensors.get("model.norm.weight")!);
    expect(norm.every((x) => x > 0.85 && x < 1.15)).toBe(true);

    // the tokenizer loads and round-trips ASCII
    const tok = await Tokenizer.fromDir(dir);
    expect(tok.vocabSize).toBe(97);
    expect(tok.bosTokenId).toBe(1);
    expect(tok.eosTokenIds).toEqual([2]);
    const ids = tok.encode("Hello, world!");
    expect(ids[0]).toBe(1);
    expect(ids.every((i) => i < 97)).toBe(true);
    expect(tok.decode(ids, { skipSpecialTokens: true })).toBe("Hello, world!");
  });

  it("is deterministic in the seed, independent of sharding and dtype rounding", async () => {
    const a = await writeRandomCheckpoint(tmp(), { preset: "tiny-llama", seed: 3 });
    const b = await writeRandomCheckpoint(tmp(), { preset: "tiny-llama", seed: 3 });
    const c = await writeRandomCheckpoint(tmp(), { preset: "tiny-llama", seed: 4 });
    expect(readFileSync(a.weightFiles[0]!).equals(readFileSync(b.weightFiles[0]!))).toBe(true);
    expect(readFileSync(a.weightFiles[0]!).equals(readFileSync(c.weightFiles[0]!))).toBe(false);

    const sharded = await writeRandomCheckpoint(tmp(), { preset: "tiny-llama", seed: 3, shards: 3 });
    const bf = await writeRandomCheckpoint(tmp(), { preset: "tiny-llama", seed: 3, dtype: "bfloat16" });
    const ta = await readAllHeaders(a.weightFiles);
    const ts = await readAllHeaders(sharded.weightFiles);
    const tb = await readAllHeaders(bf.weightFiles);
    const name = "model.layers.1.mlp.down_proj.weight";
    const fa = floatsOf(ta.get(name)!.file, ta.get(name)!);
    expect(floatsOf(ts.get(name)!.file, ts.get(name)!)).toEqual(fa);
    const fb = floatsOf(tb.get(name)!.file, tb.get(name)!);
    expect(tb.get(name)!.dtype).toBe("BF16");
    fa.forEach((x, i) => expect(Math.abs(fb[i]! - x)).toBeLessThanOrEqual(Math.abs(x) / 256));
  });

  it("tiny-gpt2: Conv1D layout, learned positions, tied head, biases", async () => {
    const dir = tmp();
    await writeRandomCheckpoint(dir, { preset: "tiny-gpt2" });
    const d = await loadHFDirectory(dir);
    expect(d.config).toMatchObject({ modelType: "gpt2", hiddenSize: 48, numHeads: 3, headDim: 16, intermediateSize: 192, maxPositions: 64, tieWordEmbeddings: true });
    const tensors = await readAllHeaders(d.weightFiles);
    const shape = (n: string) => tensors.get(n)?.shape;
    expect(tensors.size).toBe(2 + 2 * 12 + 2);
    expect(shape("transformer.wte.weight")).toEqual([97, 48]);
    expect(shape("transformer.wpe.weight")).toEqual([64, 48]);
    expect(shape("transformer.h.1.attn.c_attn.weight")).toEqual([48, 144]);
    expect(shape("transformer.h.1.attn.c_attn.bias")).toEqual([144]);
    expect(shape("transformer.h.1.attn.c_proj.weight")).toEqual([48, 48]);
    expect(shape("transformer.h.0.mlp.c_fc.weight")).toEqual([48, 192]);
    expect(shape("transformer.h.0.mlp.c_proj.weight")).toEqual([192, 48]);
    expect(shape("transformer.h.0.ln_1.bias")).toEqual([48]);
    expect(shape("transformer.ln_f.weight")).toEqual([48]);
    expect(tensors.has("lm_head.weight")).toBe(false);
    const tok = await Tokenizer.fromDir(dir);
    expect(tok.encode("hi there")).toEqual(tok.encode("hi there", { addSpecialTokens: false })); // no BOS for GPT-2
    expect(tok.eosTokenIds).toEqual([96]);
    expect(tok.decode(tok.encode("hi there~ é"))).toBe("hi there~ <unk>"); // no room for byte fallback
  });

  it("sharded bf16 variant: index maps every tensor to the shard that holds it", async () => {
    const dir = tmp();
    const res = await writeRandomCheckpoint(dir, { preset: "tiny-llama", shards: 3, dtype: "bfloat16" });
    const index = JSON.parse(readFileSync(path.join(dir, "model.safetensors.index.json"), "utf8"));
    const d = await loadHFDirectory(dir);
    expect(d.weightFiles.map((f) => path.basename(f)).sort()).toEqual([1, 2, 3].map((i) => `model-0000${i}-of-00003.safetensors`));
    expect(d.config.torchDtype).toBe("bfloat16");
    const tensors = await readAllHeaders(d.weightFiles);
    const expected = checkpointTensorList(d.config);
    expect(Object.keys(index.weight_map).sort()).toEqual(expected.map((t) => t.name).sort());
    let bytes = 0;
    for (const t of expected) {
      const got = tensors.get(t.name)!;
      expect(got.shape).toEqual(t.shape);
      expect(got.dtype).toBe("BF16");
      expect(path.join(dir, index.weight_map[t.name])).toBe(got.file);
      bytes += got.end - got.begin;
    }
    expect(index.metadata.total_size).toBe(bytes);
    expect(res.totalBytes).toBe(bytes);
  });

  it("llama-1b's tokenizer has Llama-3 special ids and a chat template", async () => {
    const { makeCharTokenizer, CHECKPOINT_PRESETS } = await import("../../ts/src/models/random-checkpoint.js");
    const p = CHECKPOINT_PRESETS["llama-1b"]!;
    const { tokenizerJson, tokenizerConfig } = makeCharTokenizer(p.tokenizer, 128256, 131072);
    const tok = new Tokenizer(tokenizerJson, tokenizerConfig as Record<string, unknown>, { extraEosTokenIds: [128001, 128008, 128009] });
    expect(tok.vocabSize).toBe(128256);
    expect(tok.bosTokenId).toBe(128000);
    expect(tok.eosTokenIds).toEqual([128001, 128008, 128009]);
    const ids = tok.encodeChat([{ role: "user", content: "Hi ☃" }], { addGenerationPrompt: true });
    expect(ids.slice(0, 2)).toEqual([128000, 128006]);
    expect(ids).toContain(128009);
    expect(tok.decode(ids)).toBe("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi ☃<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    expect(checkpointTensorList(await import("../../ts/src/models/config.js").then((m) => m.parseModelConfig(p.config)))
      .reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0)).toBe(1_235_814_400);
  });

  it("rejects unknown presets and impossible shard counts", async () => {
    await expect(writeRandomCheckpoint(tmp(), { preset: "gpt5" })).rejects.toMatchObject({ code: "BAD_INPUT", message: expect.stringMatching(/tiny-llama/) });
    await expect(writeRandomCheckpoint(tmp(), { preset: "tiny-llama", shards: 1000 })).rejects.toMatchObject({ code: "BAD_INPUT" });
  });

  it("CLI: parses options, refuses a non-empty folder without --force", async () => {
    const out: string[] = [];
    const err: string[] = [];
    const io = { stdout: { write: (s: string) => out.push(s) }, stderr: { write: (s: string) => err.push(s) } } as never;
    const dir = tmp();
    expect(await runMakeCheckpointCli(["tiny-gpt2", dir, "--dtype", "float16", "--seed", "5"], io)).toBe(0);
    expect(out.join("")).toMatch(/wrote tiny-gpt2/);
    expect((await readSafetensorsHeader(path.join(dir, "model.safetensors"))).tensors.get("transformer.wte.weight")!.dtype).toBe("F16");
    expect(await runMakeCheckpointCli(["tiny-gpt2", dir], io)).toBe(1);
    expect(err.join("")).toMatch(/--force/);
    // --force replaces earlier weights: no stale shards or index are left to shadow the new file
    expect(await runMakeCheckpointCli(["tiny-gpt2", dir, "--shards", "2", "--force"], io)).toBe(0);
    expect((await loadHFDirectory(dir)).weightFiles).toHaveLength(2);
    expect(await runMakeCheckpointCli(["tiny-gpt2", dir, "--force"], io)).toBe(0);
    expect((await loadHFDirectory(dir)).weightFiles).toEqual([path.join(dir, "model.safetensors")]);
    expect(readdirSync(dir).filter((f) => f.includes("of-0000") || f.endsWith("index.json"))).toEqual([]);
    expect(await runMakeCheckpointCli(["tiny-gpt2"], io)).toBe(2);
    expect(await runMakeCheckpointCli(["tiny-gpt2", dir, "--shards", "x"], io)).toBe(2);
  });
});

describe("helpers", () => {
  it("assignShards: contiguous, non-empty, balanced", () => {
    expect(assignShards([10, 10, 10, 10], 2)).toEqual([0, 0, 1, 1]);
    expect(assignShards([1000, 1, 1, 1], 3)).toEqual([0, 1, 2, 2]);
    expect(assignShards([1, 1, 1, 1000], 3)).toEqual([0, 0, 1, 2]);
    expect(assignShards([5], 1)).toEqual([0]);
  });

  it("float conversions round to nearest even", () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // rounds up to inf
    expect(f32ToF16Bits(0.1)).toBe(0x2e66);
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000); // tie → even (0)
    expect(f32ToF16Bits(3 * 2 ** -25)).toBe(0x0002); // tie → even (2)
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie → even
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(f32ToF16Bits(NaN) & 0x7e00).toBe(0x7e00);
    expect(f32ToBf16Bits(1)).toBe(0x3f80);
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie → even
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(f32ToBf16Bits(-0.02)).toBe(0xbca4);
  });

  it("Rng: deterministic streams per (seed, name), standard normals", () => {
    const a = new Rng(1, "x");
    const b = new Rng(1, "x");
    const c = new Rng(1, "y");
    const xs = Array.from({ length: 20000 }, () => a.normal());
    expect(Array.from({ length: 20000 }, () => b.normal())).toEqual(xs);
    expect(c.normal()).not.toBe(xs[0]);
    const bulk = new Float32Array(20001);
    const d = new Rng(1, "x");
    d.fillNormal(bulk.subarray(0, 3), 0, 1); // odd lengths carry the spare value over
    d.fillNormal(bulk.subarray(3), 0, 1);
    expect([...bulk.subarray(0, 20000)]).toEqual(xs.map(Math.fround));
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    const variance = xs.reduce((s, x) => s + (x - mean) ** 2, 0) / xs.length;
    expect(Math.abs(mean)).toBeLessThan(0.03);
    expect(Math.abs(variance - 1)).toBeLessThan(0.05);
  });
});
