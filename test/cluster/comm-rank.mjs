// One rank of the communicator tests (started by launchRanks from communicator.test.ts; imports the built
// package, dist/). argv[2] names the scenario; every rank reports to the launcher with process.send.
import { joinGroup, rankInfo, setNumThreads, tensor, zeros } from "../../dist/index.js";
import { Communicator } from "../../dist/index.js";

setNumThreads(1);
const scenario = process.argv[2];
const { rank, world, group } = rankInfo();
const send = (m) => process.send({ rank, ...m });
const arr = (n, f) => Array.from({ length: n }, (_, i) => f(i));
const values = async (t) => Array.from(await t.data());
const errorOf = async (p) => {
  const t0 = Date.now();
  try {
    await p;
    return null;
  } catch (e) {
    return { code: e.code, message: e.message, ms: Date.now() - t0 };
  }
};

async function ops(comm) {
  // all_reduce: odd sizes, several rounds (the launcher sets a small slot), three dtypes, and an empty tensor
  const a = tensor(arr(1001, (i) => (i % 17) * 0.5 + rank));
  const h = tensor(arr(301, (i) => (i % 5) + rank), { dtype: "bfloat16" });
  const n = tensor(arr(77, (i) => i * 10 + rank), { dtype: "int32" });
  const e = zeros([0]);
  for (const t of [a, h, n, e]) comm.allReduce_(t);
  // all_gather along dims 0, 1 and -1 of odd shapes, and of a non-contiguous view
  const g0 = comm.allGather(tensor(arr(6, (i) => rank * 100 + i), { shape: [2, 3] }), 0);
  const g1 = comm.allGather(tensor(arr(105, (i) => rank * 1000 + i), { shape: [3, 5, 7] }), 1);
  const g2 = comm.allGather(tensor(arr(132, (i) => rank * 1000 + i), { shape: [4, 33] }), -1);
  const gt = comm.allGather(tensor(arr(15, (i) => rank * 100 + i), { shape: [5, 3] }).t(), 0);
  // broadcast from the last rank
  const b = comm.broadcast_(tensor(arr(513, (i) => rank * 1000 + i)), world - 1);
  await comm.barrier();
  await comm.barrier();
  send({
    reduce: await values(a),
    bf16: await values(h),
    i32: await values(n),
    empty: e.shape,
    g0: { shape: g0.shape, v: await values(g0) },
    g1: { shape: g1.shape, v: await values(g1) },
    g2: { shape: g2.shape, v: await values(g2) },
    gt: { shape: gt.shape, v: await values(gt) },
    bcast: await values(b),
  });
}

async function die(comm) {
  await comm.barrier();
  if (rank === world - 1) process.exit(7);
  const t = tensor([1, 2, 3]);
  send({ error: await errorOf(comm.allReduce_(t).data()) });
}

async function mismatchShape(comm) {
  const t = tensor(arr(rank === 1 ? 4 : 3, (i) => i));
  const first = await errorOf(comm.allReduce_(t).data());
  const later = await errorOf(comm.barrier());
  send({ first, later });
}

async function mismatchOrder(comm) {
  const t = tensor([1, 2, 3]);
  const first = await errorOf(rank === 0 ? comm.allGather(t, 0).data() : comm.allReduce_(t).data());
  send({ first });
}

async function late(comm) {
  if (rank === 1) await new Promise((r) => setTimeout(r, 900));
  send({ error: await errorOf(comm.allReduce_(tensor([1, 2])).data()) });
}

try {
  if (scenario === "world") {
    // rank 1 first believes the world is one larger than rank 0 made it, then joins properly
    const error = rank === 1 ? await errorOf(Communicator.joinShm(group, 1, world + 1, { timeoutMs: 10_000 })) : null;
    const comm = await joinGroup();
    const t = comm.allReduce_(tensor([rank + 1]));
    send({ error, sum: await values(t) });
    comm.close();
  } else {
    const comm = await joinGroup();
    await { ops, die, mismatchShape, mismatchOrder, late }[scenario](comm);
    comm.close();
  }
} catch (e) {
  send({ fatal: { code: e.code, message: e.message, stack: e.stack } });
  process.exitCode = 1;
}
