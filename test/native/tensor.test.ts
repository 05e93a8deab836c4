// The JS Tensor over the native runtime: creation, views, math, errors, lifetime.
import { describe, expect, it } from "vitest";

import { NNsightError, Tensor, arange, cat, full, keep, memory, ones, randn, scope, stack, sync, tensor, where, zeros } from "../../ts/src/index.js";

const close = (a: number[] | Float32Array, b: number[], tol = 1e-6) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < b.length; i++) expect(Math.abs(a[i]! - b[i]!)).toBeLessThanOrEqual(tol * Math.max(1, Math.abs(b[i]!)));
};

describe("creation and reading", () => {
  it("round-trips nested arrays in every dtype", () => {
    const x = tensor([[1, 2, 3], [4, 5, 6]]);
    expect(x.shape).toEqual([2, 3]);
    expect(x.dtype).toBe("float32");
    expect(x.toArray()).toEqual([[1, 2, 3], [4, 5, 6]]);
    for (const dtype of ["float16", "bfloat16", "int32", "int64"] as const) {
      const t = tensor([[1, 2], [3, -4]], { dtype });
      expect(t.dtype).toBe(dtype);
      expect(t.toArray()).toEqual([[1, 2], [3, -4]]);
    }
    const b = tensor([true, false, true]);
    expect(b.dtype).toBe("bool");
    expect(b.toArray()).toEqual([true, false, true]);
  });
  it("gives typed arrays from data() without blocking", async () => {
    expect(await tensor([1.5, 2.5]).data()).toEqual(new Float32Array([1.5, 2.5]));
    expect(await tensor([1, 2], { dtype: "int64" }).data()).toEqual(new BigInt64Array([1n, 2n]));
    expect(await tensor([1, 2], { dtype: "bfloat16" }).data()).toEqual(new Float32Array([1, 2]));
  });
  it("makes zeros/ones/full/arange/randn", () => {
    expect(zeros([2]).toArray()).toEqual([0, 0]);
    expect(ones([2], { dtype: "int32" }).toArray()).toEqual([1, 1]);
    expect(full([1, 2], 7).toArray()).toEqual([[7, 7]]);
    expect(arange(5).toArray()).toEqual([0, 1, 2, 3, 4]);
    expect(arange(5).dtype).toBe("int64");
    expect(arange(0, 1, 0.25).toArray()).toEqual([0, 0.25, 0.5, 0.75]);
    const a = randn([1000], { seed: 3 }).toFloat32Array();
    const b = randn([1000], { seed: 3 }).toFloat32Array();
    expect(a).toEqual(b);
    const mean = a.reduce((s, v) => s + v, 0) / a.length;
    const sd = Math.sqrt(a.reduce((s, v) => s + (v - mean) ** 2, 0) / a.length);
    expect(Math.abs(mean)).toBeLessThan(0.1);
    expect(Math.abs(sd - 1)).toBeLessThan(0.1);
  });
  it("prints like PyTorch", () => {
    expect(tensor([[1, 2], [3, 4]]).toString()).toBe("tensor([[1.0000, 2.0000],\n        [3.0000, 4.0000]], dtype=float32)");
    expect(String(tensor([1, 2], { dtype: "int64" }))).toBe("tensor([1, 2], dtype=int64)");
  });
});

describe("views share storage", () => {
  it("slice, select, transpose, reshape, expand, squeeze/unsqueeze never copy", () => {
    const x = arange(24, undefined, 1, { dtype: "float32" }).reshape(2, 3, 4);
    const views = [x.at([":", 1]), x.select(0, 1), x.transpose(0, 2), x.reshape(6, 4), x.unsqueeze(0), x.at([0, "1:3", "::2"]), x.at([1]).unsqueeze(0).expand(5, 3, 4), x.permute(2, 0, 1)];
    for (const v of views) expect(v.sharesStorageWith(x)).toBe(true);
    expect(x.at([":", -1, -1]).toArray()).toEqual([11, 23]);
    expect(x.at([0, "1:3", "::2"]).toArray()).toEqual([[4, 6], [8, 10]]);
    expect(x.transpose(0, 2).shape).toEqual([4, 3, 2]);
    expect(x.transpose(0, 2).at([3, 2, 1]).item()).toBe(23);
    expect(x.at([0]).t().reshape(-1).toArray()).toEqual([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
  });
  it("writes through a view are seen by the base (in place)", () => {
    const x = zeros([2, 3]);
    x.set([":", -1], 5);
    x.at([0]).set([0], 1);
    expect(x.toArray()).toEqual([[1, 0, 5], [0, 0, 5]]);
    x.set([[0, 1], 1], tensor([7, 8]));
    expect(x.toArray()).toEqual([[1, 7, 5], [0, 8, 5]]);
  });
  it("index arrays gather rows", () => {
    const x = arange(6, undefined, 1, { dtype: "float32" }).reshape(3, 2);
    expect(x.at([[2, 0]]).toArray()).toEqual([[4, 5], [0, 1]]);
    expect(x.at([[-1]]).toArray()).toEqual([[4, 5]]);
  });
});

describe("math", () => {
  it("broadcasts binary ops with PyTorch dtype promotion", () => {
    const a = tensor([[1, 2, 3]]), b = tensor([[10], [20]]);
    expect(a.add(b).toArray()).toEqual([[11, 12, 13], [21, 22, 23]]);
    expect(a.mul(2).toArray()).toEqual([[2, 4, 6]]);
    expect(tensor([1, 2], { dtype: "int64" }).add(1).dtype).toBe("int64");
    expect(tensor([1, 2], { dtype: "int64" }).add(0.5).dtype).toBe("float32");
    expect(tensor([1, 2], { dtype: "int32" }).div(2).toArray()).toEqual([0.5, 1]);
    expect(a.gt(1.5).toArray()).toEqual([[false, true, true]]);
    expect(where(a.gt(1.5), a, 0).toArray()).toEqual([[0, 2, 3]]);
  });
  it("reduces along dims and overall", () => {
    const x = tensor([[1, 5, 3], [4, 2, 6]]);
    expect(x.sum().item()).toBe(21);
    expect(x.sum({ dim: 1 }).toArray()).toEqual([9, 12]);
    expect(x.mean({ dim: 0, keepdim: true }).toArray()).toEqual([[2.5, 3.5, 4.5]]);
    expect(x.max({ dim: -1 }).toArray()).toEqual([5, 6]);
    expect(x.argmax({ dim: -1 }).toArray()).toEqual([1, 2]);
    expect(x.argmax().item()).toBe(5);
    // torch's positional form: a dim (or dims) and keepdim
    expect(x.sum(-1).toArray()).toEqual([9, 12]);
    expect(x.sum([0, 1]).item()).toBe(21);
    expect(x.mean(0, true).toArray()).toEqual([[2.5, 3.5, 4.5]]);
    expect(x.argmax(-1).toArray()).toEqual([1, 2]);
    close(x.norm().toFloat32Array(), [Math.sqrt(91)], 1e-6);
    expect(x.cumsum(1).toArray()).toEqual([[1, 6, 9], [4, 6, 12]]);
    const sm = x.softmax(-1).sum({ dim: -1 }).toFloat32Array();
    close(sm, [1, 1], 1e-6);
    const { values, indices } = x.topk(2);
    expect(values.toArray()).toEqual([[5, 3], [6, 4]]);
    expect(indices.toArray()).toEqual([[1, 2], [2, 0]]);
  });
  it("matmul follows torch.matmul shapes", () => {
    const a = tensor([[1, 2], [3, 4]]);
    expect(a.matmul(a).toArray()).toEqual([[7, 10], [15, 22]]);
    expect(a.matmul(tensor([1, 1])).toArray()).toEqual([3, 7]);
    expect(tensor([1, 1]).matmul(a).toArray()).toEqual([4, 6]);
    const b = randn([3, 2, 4, 5], { seed: 1 }), c = randn([5, 6], { seed: 2 });
    expect(b.matmul(c).shape).toEqual([3, 2, 4, 6]);
    const bf = a.to("bfloat16");
    expect(tensor([[1, 0], [0, 1]]).matmul(bf).toArray()).toEqual([[1, 2], [3, 4]]);
  });
  it("cat and stack", () => {
    const a = tensor([[1, 2]]), b = tensor([[3, 4], [5, 6]]);
    expect(cat([a, b]).toArray()).toEqual([[1, 2], [3, 4], [5, 6]]);
    expect(stack([a, a], 1).shape).toEqual([1, 2, 2]);
  });
});

describe("errors are typed and lose nothing", () => {
  const code = (fn: () => unknown) => {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(NNsightError);
      return (e as NNsightError).code;
    }
    return "no error";
  };
  it("shape, dtype, index and disposed errors", () => {
    expect(code(() => tensor([1, 2]).add(tensor([1, 2, 3])))).toBe("SHAPE");
    expect(code(() => tensor([[1, 2]]).matmul(tensor([[1, 2]])))).toBe("SHAPE");
    expect(code(() => tensor([1, 2]).at([5]))).toBe("INDEX");
    expect(code(() => tensor([1, 2]).reshape(3))).toBe("SHAPE");
    expect(code(() => tensor([1, 2], { dtype: "int32" }).softmax())).toBe("DTYPE");
    const t = tensor([1]);
    t.dispose();
    expect(code(() => t.add(1))).toBe("DISPOSED");
    expect(code(() => tensor([1, 2]).at([0, 0]))).toBe("INDEX");
  });
  it("a data-dependent kernel error surfaces at read time, and later work is unaffected", async () => {
    const table = randn([4, 3], { seed: 0 });
    const bad = table.embedding(tensor([1, 9], { dtype: "int32" }));
    const downstream = bad.mul(2);
    await expect(downstream.data()).rejects.toMatchObject({ code: "INDEX" });
    expect(() => bad.toArray()).toThrow(/out of range/);
    expect(table.embedding(tensor([3], { dtype: "int32" })).shape).toEqual([1, 3]);
    expect(tensor([1, 2]).add(1).toArray()).toEqual([2, 3]);
  });
});

describe("lifetime", () => {
  it("scope() frees what it does not return; keep() saves", () => {
    const before = memory().handles;
    let kept: Tensor | undefined;
    const out = scope(() => {
      const a = ones([4, 4]);
      kept = keep(a.mul(3));
      return a.add(1);
    });
    expect(memory().handles).toBe(before + 2);
    expect(out.toArray()[0]).toEqual([2, 2, 2, 2]);
    expect(kept!.toArray()[0]).toEqual([3, 3, 3, 3]);
    out.dispose();
    kept!.dispose();
    expect(memory().handles).toBe(before);
  });
  it("10,000 create/compute/free cycles return tensor count and memory to baseline", async () => {
    // Node runs N-API finalizers of collected handles on the event loop, so the loop yields now and
    // then, as any program does; a tight synchronous loop would defer them.
    const tick = () => new Promise((r) => setImmediate(r));
    const x = randn([64, 64], { seed: 1 });
    const cycle = () => scope(() => x.matmul(x).add(1).softmax(-1).sum().item());
    for (let i = 0; i < 2000; i++) {
      if (i % 500 === 0) await tick();
      cycle();
    }
    await tick();
    const base = memory();
    const rssBase = process.memoryUsage().rss;
    for (let i = 0; i < 10_000; i++) {
      if (i % 500 === 0) await tick();
      cycle();
    }
    await tick();
    const after = memory();
    expect(after.handles).toBe(base.handles);
    expect(after.storages).toBe(base.storages);
    expect(after.hostBytes).toBe(base.hostBytes);
    const growthMB = (process.memoryUsage().rss - rssBase) / 1e6;
    expect(growthMB).toBeLessThan(16); // measured: flat (±3 MB of allocator/JS-heap noise)
  });
  it("recording a long chain of large ops holds a bounded amount of memory (NX_INFLIGHT_MB)", async () => {
    // Outputs are allocated when an op is recorded, and recording outruns the kernels; once queued work
    // holds more than NX_INFLIGHT_MB (default 16) recording waits, so a long pass never holds all its
    // intermediates at once (unbounded, this chain would hold up to 64 x 4 MB).
    const x = randn([1024, 1024], { seed: 2 }); // 4 MB
    const x0 = x.toFloat32Array()[0]!;
    const base = memory().hostBytes;
    let peak = 0;
    let h = x;
    for (let i = 0; i < 64; i++) {
      const next = h.tanh();
      if (h !== x) h.dispose();
      h = next;
      peak = Math.max(peak, memory().hostBytes - base);
    }
    let want = x0;
    for (let i = 0; i < 64; i++) want = Math.tanh(want);
    expect(Math.abs(Number((await h.data())[0]) - want)).toBeLessThan(1e-5);
    expect(peak).toBeLessThan(40 << 20);
    h.dispose();
    x.dispose();
  });
  it("freed large blocks are reused while their size recurs and given back once it stops", async () => {
    // one "step" = some work and a sync (an epoch of the block cache)
    const step = async (n: number) => {
      const t = zeros([n, 1024]).add(1); // two blocks of n x 4 KiB (zeros and the sum), freed here
      expect(await t.sum().item()).toBe(n * 1024);
      t.dispose();
      await sync();
    };
    await step(300); // a "prefill" size (1.2 MB blocks)
    const prefillBytes = 300 * 4096;
    expect(memory().cachedBytes).toBeGreaterThanOrEqual(prefillBytes);
    // "decode" steps of another size: that size stays cached every step, the prefill size goes after
    // two idle epochs
    const seen: number[] = [];
    for (let i = 0; i < 5; i++) {
      await step(70);
      seen.push(memory().cachedBytes);
    }
    const decodeBytes = 70 * 4096;
    expect(seen[0]).toBeGreaterThanOrEqual(prefillBytes + decodeBytes); // nothing dropped yet
    expect(seen[4]).toBeGreaterThanOrEqual(decodeBytes); // the recurring size is still kept
    expect(seen[4]).toBeLessThan(prefillBytes); // the prefill blocks were returned
  });
});

describe("allocation limit (servers)", () => {
  it("a tensor above the per-tensor limit is TOO_LARGE and nothing else changes", async () => {
    const { native } = await import("../../ts/src/native/binding.js");
    native.setMaxAllocation(1 << 20);
    try {
      expect(() => zeros([1024, 1024])).toThrow(expect.objectContaining({ code: "TOO_LARGE" }));
      expect(zeros([16, 16]).sum().item()).toBe(0);
    } finally {
      native.setMaxAllocation(0);
    }
    expect(zeros([1024, 1024]).shape).toEqual([1024, 1024]);
  });
});
