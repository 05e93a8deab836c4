// One rank of the NCCL tests (started by launchRanks from nccl.test.ts, one GPU per rank; imports dist/).
// Runs the collectives on CUDA tensors and a tensor-parallel forward of stories260K on cuda:<rank>, and
// sends the results (rank 0 adds the plain CPU forward as the reference).
import { LanguageModel, joinGroup, tensor } from "../../dist/index.js";

const values = async (t) => Array.from(await t.data());
let comm;
try {
  comm = await joinGroup();
  const { rank, world } = comm;
  const dev = `cuda:${rank}`;
  const a = tensor(Array.from({ length: 1001 }, (_, i) => (i % 7) + rank)).to(dev);
  comm.allReduce_(a);
  const g = comm.allGather(tensor(Array.from({ length: 12 }, (_, i) => rank * 100 + i), { shape: [3, 4] }).to(dev), -1);
  const b = comm.broadcast_(tensor([rank, rank, rank]).to(dev), world - 1);
  await comm.barrier();
  const out = { rank, reduce: await values(a), gather: { shape: g.shape, v: await values(g) }, bcast: await values(b) };
  const model = await LanguageModel.load("stories260K", { device: dev, tensorParallel: comm });
  const logits = await model.forward(["Once upon a time", "Lily and Ben went"]);
  out.logits = await values(logits);
  const r = await model.trace("Once upon a time", () => ({ q: model.model.layers[0].self_attn.q_proj.output }));
  out.q = await values(r.q);
  if (rank === 0) {
    const plain = await LanguageModel.load("stories260K");
    out.refLogits = await values(await plain.forward(["Once upon a time", "Lily and Ben went"]));
    const rr = await plain.trace("Once upon a time", () => ({ q: plain.model.layers[0].self_attn.q_proj.output }));
    out.refQ = await values(rr.q);
  }
  process.send(out);
  await comm.barrier();
  comm.close();
} catch (e) {
  process.send({ error: { code: e.code, message: e.message, stack: e.stack } });
  comm?.abort(String(e.message));
  process.exitCode = 1;
}
