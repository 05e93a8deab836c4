// Safetensors through the native runtime: zero-copy views of mapped files, writing, dtype conversion.
import { mkdtempSync, rmSync, statSync, truncateSync, copyFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { afterAll, describe, expect, it } from "vitest";

import { loadSafetensors, memory, randn, saveSafetensors, tensor } from "../../ts/src/index.js";

const dir = mkdtempSync(join(tmpdir(), "nx-st-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("safetensors", () => {
  it("writes and maps back every dtype, views zero-copy", async () => {
    const tensors = {
      f32: randn([3, 5], { seed: 1 }),
      bf16: randn([4, 2], { seed: 2 }).to("bfloat16"),
      f16: randn([7], { seed: 3 }).to("float16"),
      i32: tensor([1, -2, 3], { dtype: "int32" }),
      i64: tensor([[5, 6]], { dtype: "int64" }),
      b: tensor([true, false]),
      nonContig: randn([4, 6], { seed: 4 }).transpose(0, 1),
    };
    const file = join(dir, "a.safetensors");
    await saveSafetensors(file, tensors);
    const before = memory().hostBytes;
    const back = await loadSafetensors([file]);
    expect(memory().hostBytes - before).toBe(0); // nothing copied: views into the mapping
    for (const [k, t] of Object.entries(tensors)) {
      const u = back.get(k)!;
      expect(u.dtype, k).toBe(t.dtype);
      expect(u.shape, k).toEqual(t.shape);
      expect(u.toArray(), k).toEqual(t.toArray());
    }
    const conv = await loadSafetensors([file], { dtype: "float32" });
    expect(conv.get("bf16")!.dtype).toBe("float32");
    expect(conv.get("bf16")!.toArray()).toEqual(tensors.bf16.toArray());
    expect(conv.get("i32")!.dtype).toBe("int32");
  });

  it("a truncated file is an IO error naming the file and tensor", async () => {
    const src = join(dir, "a.safetensors");
    const bad = join(dir, "bad.safetensors");
    copyFileSync(src, bad);
    truncateSync(bad, statSync(bad).size - 9);
    await expect(loadSafetensors([bad])).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/bad\.safetensors.*"/) });
  });

  it("writes into a mapped weight are refused, the weight stays intact", async () => {
    const back = await loadSafetensors([join(dir, "a.safetensors")]);
    const w = back.get("f32")!;
    expect(() => w.fill_(0)).toThrow(/read-only/);
    expect(w.toArray()).toEqual(randn([3, 5], { seed: 1 }).toArray());
  });
});
