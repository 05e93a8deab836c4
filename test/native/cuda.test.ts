// CUDA: the C++ conformance suite (build/nx_cuda_tests: every CUDA kernel against its CPU reference) and
// the JS surface (tensor.device, to("cuda") / cpu(), device errors, a model on the GPU against the CPU).
// Where no GPU is usable (or the addon was built without CUDA) the GPU cases are SKIPPED, with the
// reason printed, never faked; what can be checked without a GPU (the error paths, the skip itself)
// runs everywhere.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";

import { describe, expect, it } from "vitest";

import { LanguageModel, NNsightError, cudaInfo, tensor } from "../../ts/src/index.js";
import { native } from "../../ts/src/native/binding.js";
import { zeros } from "../../ts/src/tensor/index.js"; // the tensor-level zeros (takes a device)

const bin = join(import.meta.dirname, "../../build/nx_cuda_tests");
const info = cudaInfo();
const built = existsSync(bin);
const noGpu: string | null = !info.compiled
  ? "the addon was built without CUDA (no CUDA toolkit at build time)"
  : !info.available
    ? `no usable CUDA device: ${info.reason}`
    : null;
if (noGpu) console.log(`CUDA GPU tests skipped: ${noGpu}`);

function deviceError(fn: () => unknown): NNsightError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(NNsightError);
    expect((e as NNsightError).code).toBe("DEVICE");
    return e as NNsightError;
  }
  throw new Error("expected a DEVICE error");
}

describe("devices (everywhere)", () => {
  it("reports what the build and machine offer", () => {
    expect(info.compiled).toBe(native.cudaCompiled);
    if (!info.available) {
      expect(info.deviceCount).toBe(0);
      expect(typeof info.reason).toBe("string");
      expect(info.reason!.length).toBeGreaterThan(10);
    } else {
      expect(info.deviceCount).toBeGreaterThan(0);
      expect(info.reason).toBeNull();
    }
  });

  it("tensors are on the cpu; to(dtype) still converts; to('cpu') / cpu() are views", () => {
    const x = tensor([[1, 2], [3, 4]]);
    expect(x.device).toBe("cpu");
    const h = x.to("float16");
    expect(h.dtype).toBe("float16");
    expect(h.device).toBe("cpu");
    const v = x.to("cpu");
    expect(v.sharesStorageWith(x)).toBe(true);
    expect(x.cpu().sharesStorageWith(x)).toBe(true);
    expect(x.to("cpu", { copy: true }).sharesStorageWith(x)).toBe(false);
    expect(x.add(1).device).toBe("cpu");
  });

  it("malformed devices are DEVICE errors, unknown dtypes still DTYPE", () => {
    const x = tensor([1]);
    expect(deviceError(() => x.to("cuda:x")).message).toMatch(/unknown device/);
    expect(deviceError(() => zeros([2], { device: "tpu" })).message).toMatch(/unknown device/);
    expect(() => x.to("float33")).toThrow(expect.objectContaining({ code: "DTYPE" }));
  });

  it.runIf(!info.available)("asking for CUDA without a usable GPU is a DEVICE error with the reason", async () => {
    const x = tensor([1, 2, 3]);
    for (const f of [() => x.to("cuda"), () => x.to("cuda:1"), () => x.cuda(), () => zeros([2], { device: "cuda" }), () => tensor([1], { device: "cuda:0" })]) {
      const e = deviceError(f);
      expect(e.message).toContain(info.compiled ? info.reason! : "without a CUDA toolkit");
    }
    await expect(LanguageModel.load("stories260K", { device: "cuda" })).rejects.toMatchObject({ code: "DEVICE" });
  });

  it.runIf(built && !info.available)("the conformance binary reports the missing GPU (exit 77) instead of passing", () => {
    const r = spawnSync(bin, [], { encoding: "utf8", timeout: 60_000 });
    expect(r.status).toBe(77);
    expect(r.stdout).toMatch(/^SKIP: CUDA not available: .+/);
  });
});

describe.skipIf(noGpu !== null)("CUDA on a GPU", () => {
  it("passes the conformance suite (every CUDA kernel vs its CPU reference)", () => {
    expect(existsSync(bin), `${bin} is built with the addon in CUDA builds`).toBe(true);
    const r = spawnSync(bin, [], { encoding: "utf8", timeout: 600_000 });
    const last = r.stdout.trim().split("\n").pop() ?? "";
    if (r.status !== 0) console.error(r.stdout.split("\n").filter((l) => l.startsWith("FAIL")).join("\n"), r.stderr);
    console.log(r.stdout.split("\n")[0]); // device, runtime, cuBLAS
    expect(last).toMatch(/^\d+ passed, 0 failed$/);
    expect(r.status).toBe(0);
  }, 600_000);

  it("moves tensors, runs ops on the device, and reads them back", () => {
    const x = tensor([[1, -2, 3], [4, 5, -6]]);
    const g = x.to("cuda");
    expect(g.device).toBe("cuda:0");
    expect(g.shape).toEqual([2, 3]);
    expect(g.toArray()).toEqual(x.toArray());
    const y = g.mul(2).add(1).relu(); // scalars are made on the device
    expect(y.device).toBe("cuda:0");
    expect(y.cpu().toArray()).toEqual([[3, 0, 7], [9, 11, 0]]);
    expect(g.t().matmul(g).cpu().toArray()).toEqual(x.t().matmul(x).toArray());
    expect(g.softmax(-1).sum({ dim: -1 }).toFloat32Array()[0]).toBeCloseTo(1, 6);
    const z = zeros([2, 3], { device: "cuda" });
    z.copy_(x); // across devices
    expect(z.toArray()).toEqual(x.toArray());
    x.copy_(g.neg());
    expect(x.toArray()).toEqual([[-1, 2, -3], [-4, -5, 6]]);
  });

  it("refuses ops over tensors on different devices (DEVICE, naming both)", () => {
    const x = tensor([1, 2, 3]);
    const g = x.to("cuda");
    const e = deviceError(() => x.add(g));
    expect(e.message).toMatch(/cpu/);
    expect(e.message).toMatch(/cuda:0/);
  });

  it("runs stories260K on the GPU with the CPU's logits (within 1e-4) and the same greedy tokens", async () => {
    const cpu = await LanguageModel.load("stories260K");
    const gpu = await LanguageModel.load("stories260K", { device: "cuda" });
    const prompts = ["Once upon a time", "Lily and Ben went to the park"];
    const a = await cpu.forward(prompts);
    const b = await gpu.forward(prompts);
    expect(b.device).toBe("cuda:0");
    expect(b.shape).toEqual(a.shape);
    const av = await a.data(), bv = await b.data();
    let worst = 0;
    for (let i = 0; i < av.length; i++) worst = Math.max(worst, Math.abs(Number(av[i]) - Number(bv[i])));
    expect(worst).toBeLessThan(1e-4);
    const ga = await cpu.generateText("Once upon a time", { maxNewTokens: 12 });
    const gb = await gpu.generateText("Once upon a time", { maxNewTokens: 12 });
    expect(gb.sequences).toEqual(ga.sequences);
    // an intervention graph runs on the device model too
    const ta = await cpu.trace("Once upon a time", () => ({ h: cpu.model.layers[1].output }));
    const tb = await gpu.trace("Once upon a time", () => ({ h: gpu.model.layers[1].output }));
    const ha = await ta.h.data(), hb = await tb.h.data();
    for (let i = 0; i < ha.length; i++) expect(Math.abs(Number(ha[i]) - Number(hb[i]))).toBeLessThan(1e-4);
    await cpu.dispose();
    await gpu.dispose();
  }, 120_000);

  it("eager attention on the GPU: the probabilities match the CPU's (within 1e-5), padded batch included", async () => {
    const cpu = await LanguageModel.load("stories260K", { attnImplementation: "eager" });
    const gpu = await LanguageModel.load("stories260K", { attnImplementation: "eager", device: "cuda" });
    const run = (m: LanguageModel) => m.trace(["Once upon a time", "Lily"], () => ({ p: m.model.layers[2].self_attn.source.attention_interface_0.source.nn_functional_softmax_0.output, l: m.lm_head.output }));
    const [a, b] = [await run(cpu), await run(gpu)];
    for (const k of ["p", "l"] as const) {
      const av = await a[k].data(), bv = await b[k].data();
      let worst = 0;
      for (let i = 0; i < av.length; i++) worst = Math.max(worst, Math.abs(Number(av[i]) - Number(bv[i])));
      expect(worst, k).toBeLessThan(k === "p" ? 1e-5 : 1e-4);
    }
    await cpu.dispose();
    await gpu.dispose();
  }, 120_000);
});
