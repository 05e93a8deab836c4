// The shared-memory communicator: collectives between 2 and 3 real processes (values, odd sizes, several
// rounds per call, dtypes), and failures that must be errors, not hangs: a rank that dies, ranks that
// disagree on a call, a world-size mismatch, a peer that does not arrive in time. Plus the argument checks
// of a one-rank group in this process.
import { describe, expect, it } from "vitest";

import { Communicator, NNsightError, tensor, zeros } from "../../ts/src/index.js";
import { newGroupName } from "../../ts/src/cluster/launch.js";
import { runGroup } from "./helpers.js";

const arr = (n: number, f: (i: number) => number) => Array.from({ length: n }, (_, i) => f(i));
const ranks = (w: number) => arr(w, (i) => i);

/** The expected all_gather of per-rank tensors base(rank) + i of `shape` along `dim` (row-major). */
function gathered(shape: number[], dim: number, world: number, value: (rank: number, i: number) => number): number[] {
  const outer = shape.slice(0, dim).reduce((a, b) => a * b, 1);
  const inner = shape.slice(dim).reduce((a, b) => a * b, 1);
  const out: number[] = [];
  for (let o = 0; o < outer; o++) for (let r = 0; r < world; r++) for (let i = 0; i < inner; i++) out.push(value(r, o * inner + i));
  return out;
}

describe.each([2, 3])("shm communicator, %i processes", (world) => {
  it("all_reduce, all_gather, broadcast and barrier give every rank the same, exact results", async () => {
    const run = await runGroup("comm-rank.mjs", ["ops"], { world, slotBytes: 256, timeoutMs: 20_000 });
    expect(run.failure).toBeNull();
    const sumRanks = (world * (world - 1)) / 2;
    for (const r of ranks(world)) {
      const m = run.byRank[r]![0]!;
      expect(m.reduce).toEqual(arr(1001, (i) => world * (i % 17) * 0.5 + sumRanks));
      expect(m.bf16).toEqual(arr(301, (i) => world * (i % 5) + sumRanks));
      expect(m.i32).toEqual(arr(77, (i) => world * i * 10 + sumRanks));
      expect(m.empty).toEqual([0]);
      expect(m.g0).toEqual({ shape: [2 * world, 3], v: gathered([2, 3], 0, world, (q, i) => q * 100 + i) });
      expect(m.g1).toEqual({ shape: [3, 5 * world, 7], v: gathered([3, 5, 7], 1, world, (q, i) => q * 1000 + i) });
      expect(m.g2).toEqual({ shape: [4, 33 * world], v: gathered([4, 33], 1, world, (q, i) => q * 1000 + i) });
      // the transposed [3, 5] view: element (a, b) is rank*100 + b*3 + a
      expect(m.gt).toEqual({ shape: [3 * world, 5], v: gathered([3, 5], 0, world, (q, i) => q * 100 + (i % 5) * 3 + Math.floor(i / 5)) });
      expect(m.bcast).toEqual(arr(513, (i) => (world - 1) * 1000 + i));
    }
  });
});

describe("shm communicator failures", () => {
  it("a rank that dies fails the others' collectives with COMM within a bounded time", async () => {
    const world = 3;
    const run = await runGroup("comm-rank.mjs", ["die"], { world, timeoutMs: 30_000 });
    expect(run.failure).toBeInstanceOf(NNsightError);
    expect(run.failure!.code).toBe("COMM");
    expect(run.failure!.message).toMatch(/rank 2 .*exited with code 7/);
    for (const r of [0, 1]) {
      const e = run.byRank[r]![0]!.error;
      expect(e.code).toBe("COMM");
      expect(e.message).toMatch(/rank 2 \(pid \d+\) exited while rank \d waited in all_reduce/);
      expect(e.ms).toBeLessThan(2000); // found by the peer check, far before the 30 s timeout
    }
    expect(run.ms).toBeLessThan(15_000);
  });

  it("ranks that pass different shapes all get SHAPE, and the communicator stays broken", async () => {
    const run = await runGroup("comm-rank.mjs", ["mismatchShape"], { world: 3, timeoutMs: 20_000 });
    expect(run.failure).toBeNull();
    for (const r of [0, 1, 2]) {
      const { first, later } = run.byRank[r]![0]!;
      expect(first.code).toBe("SHAPE");
      expect(first.message).toContain("rank 0 called all_reduce float32 [3] (call #1), rank 1 called all_reduce float32 [4]");
      expect(later.code).toBe("SHAPE");
      expect(later.message).toMatch(/failed earlier/);
    }
  });

  it("ranks that issue different collectives get BAD_INPUT", async () => {
    const run = await runGroup("comm-rank.mjs", ["mismatchOrder"], { world: 2, timeoutMs: 20_000 });
    expect(run.failure).toBeNull();
    for (const r of [0, 1]) {
      const { first } = run.byRank[r]![0]!;
      expect(first.code).toBe("BAD_INPUT");
      expect(first.message).toMatch(/rank 0 called all_gather float32 \[3\] dim 0 .* rank 1 called all_reduce float32 \[3\].*same order/);
    }
  });

  it("a rank that joins with the wrong world size gets BAD_INPUT and leaves the group intact", async () => {
    const run = await runGroup("comm-rank.mjs", ["world"], { world: 2, timeoutMs: 10_000 });
    expect(run.failure).toBeNull();
    const e1 = run.byRank[1]![0]!.error;
    expect(e1.code).toBe("BAD_INPUT");
    expect(e1.message).toMatch(/world size mismatch: rank 0 created group "nnsight-tp-[^"]+" for 2 ranks, rank 1 was started with a world of 3/);
    for (const r of [0, 1]) expect(run.byRank[r]![0]!.sum).toEqual([3]);
  });

  it("a live peer that does not arrive: TIMEOUT for the waiter, then COMM (aborted) for the late rank", async () => {
    const run = await runGroup("comm-rank.mjs", ["late"], { world: 2, timeoutMs: 400 });
    expect(run.failure).toBeNull();
    const [e0, e1] = [run.byRank[0]![0]!.error, run.byRank[1]![0]!.error];
    expect(e0.code).toBe("TIMEOUT");
    expect(e0.message).toMatch(/rank\(s\) 1 did not reach all_reduce #1 within 400 ms/);
    expect(e0.ms).toBeGreaterThanOrEqual(380);
    expect(e0.ms).toBeLessThan(3000);
    expect(e1.code).toBe("COMM");
    expect(e1.message).toMatch(/rank 0 aborted the group: rank\(s\) 1 did not reach all_reduce/);
  });
});

describe("a one-rank group in this process", () => {
  it("collectives are identities, and bad arguments throw at once with their codes", async () => {
    const comm = await Communicator.joinShm(newGroupName(), 0, 1);
    expect([comm.rank, comm.world, comm.backend, comm.device]).toEqual([0, 1, "shm", "cpu"]);
    const t = tensor([1, 2, 3]);
    expect(comm.allReduce_(t).toArray()).toEqual([1, 2, 3]);
    expect(comm.allGather(tensor([[1, 2]]), 1).toArray()).toEqual([[1, 2]]);
    expect(comm.broadcast_(tensor([4]), 0).toArray()).toEqual([4]);
    await comm.barrier();
    const code = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        expect(e).toBeInstanceOf(NNsightError);
        return (e as NNsightError).code;
      }
      return "none";
    };
    expect(code(() => comm.allReduce_(tensor([true, false])))).toBe("DTYPE");
    expect(code(() => comm.allReduce_(zeros([3, 2]).t()))).toBe("BAD_INPUT"); // not contiguous
    expect(code(() => comm.broadcast_(tensor([1]), 1))).toBe("BAD_INPUT");
    expect(code(() => comm.allGather(tensor([1]), 2))).toBe("INDEX");
    comm.close();
    expect(code(() => comm.allReduce_(t))).toBe("DISPOSED");
    await expect(Communicator.joinShm("bad/name", 0, 1)).rejects.toMatchObject({ code: "BAD_INPUT" });
    await expect(Communicator.joinShm(newGroupName(), 2, 2)).rejects.toMatchObject({ code: "BAD_INPUT" });
    // rank 0 of two whose peer never comes; a rank > 0 whose rank 0 never comes
    await expect(Communicator.joinShm(newGroupName(), 0, 2, { timeoutMs: 300 })).rejects.toMatchObject({ code: "TIMEOUT", message: expect.stringMatching(/rank\(s\) 1 did not join group/) });
    const t0 = Date.now();
    await expect(Communicator.joinShm(newGroupName(), 1, 2, { timeoutMs: 300 })).rejects.toMatchObject({ code: "TIMEOUT", message: expect.stringMatching(/rank 0 did not create the group/) });
    expect(Date.now() - t0).toBeLessThan(2000);
  });
});
