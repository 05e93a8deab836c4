// Queued plain traces share forward passes on the server (each on its own rows), and every result is
// still bit-identical to running that trace alone locally; a trace that fails mid-pass fails alone.
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, type RemoteJob, type RemoteLanguageModel, tensor } from "../../ts/src/index.js";
import { batchableGraph, type TraceGraph } from "../../ts/src/trace/graph.js";
import { codeOf } from "../helpers/errors.js";
import { type TestServer, expectMatching, f32, sameBits, startServer } from "./helpers.js";

let server: TestServer;
let local: LanguageModel;
let remote: RemoteLanguageModel;

beforeAll(async () => {
  [server, local] = await Promise.all([startServer(), LanguageModel.load("stories260K")]);
  remote = await LanguageModel.connect(server.url, "stories260K");
});
afterAll(async () => {
  await remote?.dispose();
  await local?.dispose();
  await server?.stop();
});

const expectSame = (expected: unknown, actual: unknown, where: string) =>
  expectMatching(actual, expected, async (y, x, w) => {
    if (x.dtype === "float32") expect(sameBits(await f32(x), await f32(y)), `${w}: bits differ`).toBe(true);
    else expect(y.toArray(), w).toEqual(x.toArray());
  }, where);

const running = (job: RemoteJob<unknown>) => new Promise<void>((res) => (job.state === "RUNNING" ? res() : job.once("RUNNING", () => res())));

async function counters(): Promise<{ batched: number; shared: number }> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const n = (name: string) => Number(new RegExp(`${name}\\{model="stories260K"\\} (\\d+)`).exec(text)?.[1] ?? 0);
  return { batched: n("nnsight_batched_jobs_total"), shared: n("nnsight_shared_pass_jobs_total") };
}

/** Token rows (stories260K has 512 tokens): `n` rows of `len` ids from a seed. */
const rows = (seed: number, n: number, len: number) => Array.from({ length: n }, (_, r) => Array.from({ length: len }, (_, i) => (seed * 131 + r * 71 + i * 37 + 1) % 512));

type Opts = Record<string, unknown>;
type Case = { name: string; run: (m: LanguageModel, opts: Opts) => Promise<unknown> };

/** Traces of several shapes: one or two invokes, rows of length 5, 6 or 7, reads, in-place edits, saves and math. */
function cases(): Case[] {
  const out: Case[] = [];
  for (let k = 0; k < 6; k++) {
    out.push({
      name: `read ${k}`,
      run: (m, o) => m.trace(rows(k, 1, 5), () => ({ h: m.model.layers[k % 5]!.output.at([":", -1]), logits: m.lm_head.output }), o as never),
    });
  }
  for (let k = 0; k < 4; k++) {
    out.push({
      name: `edit ${k}`,
      run: (m, o) =>
        m.trace(
          rows(10 + k, 2, 5),
          () => {
            m.model.layers[1]!.mlp.output.set([":", -1], k);
            const s = m.model.layers[3]!.output.mul(2).softmax().save();
            return { s, top: m.lm_head.output.at([":", -1]).argmax(), mean: m.model.layers[2]!.output.mean() };
          },
          o as never,
        ),
    });
  }
  for (let k = 0; k < 3; k++) {
    out.push({
      name: `two invokes ${k}`,
      run: (m, o) =>
        m.trace((tr) => {
          let src: unknown;
          tr.invoke(rows(20 + k, 1, 7), () => {
            src = m.model.layers[1]!.output.at([":", -1]);
          });
          tr.invoke(rows(30 + k, 2, 7), () => {
            m.model.layers[1]!.output.set([":", -1], src as never);
            return { patched: m.lm_head.output.at([":", -1]), h: m.model.layers[4]!.output };
          });
        }, o as never),
    });
  }
  out.push({ name: "alone by length", run: (m, o) => m.trace(rows(40, 1, 6), () => ({ h: m.model.layers[0]!.output }), o as never) });
  return out;
}

const bad = () => tensor([1, 2, 3], { dtype: "float32", shape: [3, 1] });
/** fails inside the forward pass (a matmul of mismatched shapes at layer 2) */
const failing: Case = { name: "failing", run: (m, o) => m.trace(rows(50, 1, 5), () => ({ x: m.model.layers[2]!.output.matmul(bad()) }), o as never) };

/** Hold the worker with a generation, queue every case behind it (acknowledged), then let it go. */
async function queueBehind(list: Case[]): Promise<Array<RemoteJob<unknown>>> {
  const hold = await remote.generate(["Once upon a time"], { maxNewTokens: 400, blocking: false });
  await running(hold);
  const jobs = (await Promise.all(list.map((c) => c.run(remote, { blocking: false })))) as Array<RemoteJob<unknown>>;
  expect(jobs.every((j) => j.state === "QUEUED")).toBe(true);
  await hold.cancel();
  return jobs;
}

describe("traces that share a forward pass on the server", () => {
  it("picks plain traces with module reads, edits and math", () => {
    const base = { version: 1, kind: "trace", invokes: [{ input: [[1, 2]] }], blocks: [], result: null, saves: [] } as unknown as TraceGraph;
    const node = (op: string, args: unknown[], invoke: number | null = 0) => ({ id: 0, op, args, invoke, step: 0, block: null });
    const g = (nodes: unknown[], extra: object = {}) => ({ ...base, nodes, ...extra }) as unknown as TraceGraph;
    expect(batchableGraph(g([node("module", ["model.layers.0", "output"]), node("set", [{ $ref: 0 }, [":", -1], 0])]))).toBe(true);
    expect(batchableGraph(g([node("module", ["model.layers.0", "output"], null)]))).toBe(false);
    expect(batchableGraph(g([node("module", ["model.layers.0", "output", 1])]))).toBe(false);
    for (const op of ["swap", "skip", "stop", "log", "cache", "call", "hookedCall", "step", "blockResult"]) expect(batchableGraph(g([node(op, [])])), op).toBe(false);
    expect(batchableGraph(g([], { invokes: [{ input: null }] }))).toBe(false);
    expect(batchableGraph(g([], { kind: "generate" }))).toBe(false);
    expect(batchableGraph(g([], { blocks: [{ id: 0 }] }))).toBe(false);
  });

  it("queued traces run in shared passes, each result bit-identical to running it alone locally", async () => {
    const all = cases();
    const expected: unknown[] = [];
    for (const c of all) expected.push(await c.run(local, {}));
    const before = await counters();
    const jobs = await queueBehind(all);
    for (let i = 0; i < all.length; i++) await expectSame(expected[i], await jobs[i]!.result(), all[i]!.name);
    const after = await counters();
    expect(after.batched - before.batched).toBe(all.length); // handed to the worker together
    expect(after.shared - before.shared).toBe(all.length - 1); // all but the one of its own length shared a pass
  });

  it("a trace that fails mid-pass fails alone (with its local error); the others still complete, bit-identical", async () => {
    const all = [...cases().slice(0, 6), failing, ...cases().slice(6, 10)];
    const expected: unknown[] = [];
    for (const c of all) expected.push(c === failing ? await codeOf(c.run(local, {})) : await c.run(local, {}));
    expect(expected[6]).toBe("SHAPE");
    const jobs = await queueBehind(all);
    for (let i = 0; i < all.length; i++) {
      if (all[i] === failing) expect(await codeOf(jobs[i]!.result())).toBe(expected[i]);
      else await expectSame(expected[i], await jobs[i]!.result(), all[i]!.name);
    }
    // and the worker goes on sharing passes
    const before = await counters();
    const again = await queueBehind(cases().slice(0, 4));
    for (const j of again) await j.result();
    expect((await counters()).shared - before.shared).toBe(4);
  });
});
