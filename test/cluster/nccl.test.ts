// The NCCL communicator. It needs a CUDA build, a GPU and libnccl.so.2: where any is missing the GPU tests
// are skipped with the reason printed, and what can be checked without them is: the DEVICE error that
// says why. With one GPU a one-rank group runs in this process; with two or more, a launched 2-rank
// group also runs the collectives and a tensor-parallel forward on cuda:0 and cuda:1.
import { describe, expect, it } from "vitest";

import { Communicator, cudaInfo, tensor } from "../../ts/src/index.js";
import { runGroup } from "./helpers.js";

const nccl = Communicator.ncclInfo();
const gpus = nccl.available ? cudaInfo().deviceCount : 0;
if (!nccl.available) console.log(`NCCL tests skipped: ${nccl.reason}`);
else if (gpus < 2) console.log(`NCCL 2-rank test skipped: ${gpus} GPU (needs 2)`);

describe("NCCL communicator", () => {
  it.skipIf(nccl.available)("without NCCL or a GPU: DEVICE errors that say why", async () => {
    expect(nccl.reason).toBeTruthy();
    expect(() => Communicator.ncclUniqueId()).toThrow(expect.objectContaining({ code: "DEVICE", message: expect.stringContaining(nccl.reason!) }));
    await expect(Communicator.joinNccl("00".repeat(128), 0, 1, { device: 0 })).rejects.toMatchObject({ code: "DEVICE" });
  });

  it.skipIf(!nccl.available)("a one-rank group on cuda:0: identities, the gather's permute path, barrier", async () => {
    const comm = await Communicator.joinNccl(Communicator.ncclUniqueId(), 0, 1, { device: 0 });
    expect([comm.backend, comm.device]).toEqual(["nccl", "cuda:0"]);
    const a = comm.allReduce_(tensor([1, 2, 3]).to("cuda"));
    expect(a.cpu().toArray()).toEqual([1, 2, 3]);
    const g = comm.allGather(tensor([[1, 2], [3, 4]]).to("cuda"), 1); // outer 2: gather + permute copy
    expect(g.cpu().toArray()).toEqual([[1, 2], [3, 4]]);
    expect(comm.broadcast_(tensor([5]).to("cuda"), 0).cpu().toArray()).toEqual([5]);
    await comm.barrier();
    expect(() => comm.allReduce_(tensor([1]))).toThrow(expect.objectContaining({ code: "DEVICE" })); // a host tensor
    comm.close();
  });

  it.skipIf(gpus < 2)("two ranks on two GPUs: collectives and a tensor-parallel forward", async () => {
    const run = await runGroup("nccl-rank.mjs", [], { world: 2, backend: "nccl", timeoutMs: 120_000 });
    expect(run.failure, JSON.stringify(run.byRank)).toBeNull();
    const [m0, m1] = [run.byRank[0]![0]!, run.byRank[1]![0]!];
    for (const m of [m0, m1]) {
      expect(m.reduce).toEqual(Array.from({ length: 1001 }, (_, i) => 2 * (i % 7) + 1));
      expect(m.gather.shape).toEqual([3, 8]);
      expect(m.bcast).toEqual([1, 1, 1]);
      expect(m.logits).toEqual(m0.logits);
    }
    const close = (a: number[], b: number[]) => Math.max(...a.map((v, i) => Math.abs(v - b[i]!))) / Math.max(1, ...b.map(Math.abs));
    expect(close(m0.logits, m0.refLogits)).toBeLessThan(1e-4); // cuBLAS vs the CPU GEMM
    expect(close(m0.q, m0.refQ)).toBeLessThan(1e-4);
  });
});
