// Every way a remote job can go wrong gets its own clear error, and the server, other users' jobs and
// later jobs are unaffected: keys, quotas, size limits, malformed and hostile messages, versions, failing
// graphs, cancellation, dropped clients and killed workers. No job is lost or answered twice.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, NNsightError, type RemoteJob, type RemoteLanguageModel, Tensor, tensor } from "../../ts/src/index.js";
import { PROTOCOL_VERSION } from "../../ts/src/remote/protocol.js";
import type { AnyGraph, TraceGraph } from "../../ts/src/trace/graph.js";
import { RawClient, type TestServer, startServer } from "./helpers.js";
import { codeOf } from "../helpers/errors.js";

const KEYS = { alice: "alice-key-0123456789", bob: "bob-key-0123456789", carol: "carol-key-0123456789", dave: "dave-key-0123456789" };
let dir: string;
let server: TestServer;
let alice: RemoteLanguageModel;
let bob: RemoteLanguageModel;
const P = "Once upon a time";

beforeAll(async () => {
  delete process.env.NNSIGHT_API_KEY;
  dir = mkdtempSync(path.join(tmpdir(), "nnsight-keys-"));
  writeFileSync(
    path.join(dir, "keys.json"),
    JSON.stringify([
      { key: KEYS.alice, name: "alice" },
      { key: KEYS.bob, name: "bob" },
      { key: KEYS.carol, name: "carol", quota: { jobsPerMinute: 3 } },
      { key: KEYS.dave, name: "dave", quota: { maxConcurrent: 1 } },
    ]),
  );
  server = await startServer(["--api-keys", path.join(dir, "keys.json"), "--max-frame-bytes", "1000000", "--max-attachment-bytes", "100000", "--max-result-bytes", "200000"]);
  alice = await LanguageModel.connect(server.url, "stories260K", { apiKey: KEYS.alice });
  bob = await LanguageModel.connect(server.url, "stories260K", { apiKey: KEYS.bob });
});
afterAll(async () => {
  await alice?.dispose();
  await bob?.dispose();
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});


/** A small trace that must work after whatever went wrong before. */
async function works(m: RemoteLanguageModel): Promise<void> {
  const r = await m.trace(P, () => ({ h: m.model.layers[1]!.output }));
  expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
}

/** A job that runs for a while (8 rows × 480 tokens: about two seconds here). */
const PROMPTS = Array.from({ length: 8 }, (_, i) => `${P} ${i}`);
const longJob = (m: RemoteLanguageModel) => m.generate(PROMPTS, { maxNewTokens: 480, blocking: false });

const running = (job: RemoteJob<unknown>) => new Promise<void>((res) => (job.state === "RUNNING" ? res() : job.once("RUNNING", () => res())));

/** The graph a model would send (recorded, not run). */
async function record(m: RemoteLanguageModel, fn: () => unknown): Promise<AnyGraph> {
  const backend = m._backend;
  let graph: AnyGraph | undefined;
  m._backend = { run: async (req) => void (graph = req.graph) };
  try {
    await m.trace(P, fn);
  } finally {
    m._backend = backend;
  }
  return graph!;
}

const hello = async (url: string, apiKey = KEYS.alice) => {
  const c = await RawClient.open(url);
  c.send({ type: "hello", protocol: PROTOCOL_VERSION, apiKey });
  await c.waitFor((m) => m.type === "welcome");
  return c;
};

describe("keys and quotas", () => {
  it("a missing or wrong key is UNAUTHORIZED", async () => {
    expect(await codeOf(LanguageModel.connect(server.url, "stories260K"))).toBe("UNAUTHORIZED");
    expect(await codeOf(LanguageModel.connect(server.url, "stories260K", { apiKey: "nope" }))).toBe("UNAUTHORIZED");
    const raw = await RawClient.open(server.url);
    raw.send({ type: "status", rid: 1, job: "x" });
    expect((await raw.waitFor((m) => m.type === "error")).msg.error).toMatchObject({ code: "UNAUTHORIZED" });
    raw.close();
    await works(alice);
  });

  it("jobs per minute and concurrent jobs are QUOTA", async () => {
    const carol = await LanguageModel.connect(server.url, "stories260K", { apiKey: KEYS.carol });
    for (let i = 0; i < 3; i++) await works(carol);
    expect(await codeOf(carol.trace(P, () => ({ h: carol.model.layers[0]!.output })))).toBe("QUOTA");
    await carol.dispose();

    const dave = await LanguageModel.connect(server.url, "stories260K", { apiKey: KEYS.dave });
    const job = await longJob(dave);
    expect(await codeOf(dave.trace(P, () => ({ h: dave.model.layers[0]!.output })))).toBe("QUOTA");
    await job.cancel();
    expect(await codeOf(job.result())).toBe("CANCELLED");
    await works(dave);
    await dave.dispose();
    await works(bob);
  });
});

describe("limits and malformed input", () => {
  it("oversized frames, attachments and results are TOO_LARGE; the connection stays usable", async () => {
    const raw = await hello(server.url);
    raw.send({ type: "status", rid: 7, job: "00000000-0000-0000-0000-000000000000" }, new Uint8Array(1_200_000));
    expect((await raw.waitFor((m) => m.rid === 7)).msg.error).toMatchObject({ code: "TOO_LARGE" });
    raw.send({ type: "status", rid: 8, job: "00000000-0000-0000-0000-000000000000" });
    expect((await raw.waitFor((m) => m.rid === 8)).msg.error).toMatchObject({ code: "BAD_INPUT" });
    raw.close();

    const big = (n: number) => tensor(new Float32Array(n), { dtype: "float32", shape: [n] });
    // over the attachment limit (checked by the server) and over the frame limit (refused before sending)
    for (const n of [40_000, 400_000]) {
      const t = big(n);
      expect(await codeOf(alice.trace(P, () => ({ x: alice.model.layers[0]!.output.sum().add(t) })))).toBe("TOO_LARGE");
    }
    // a result over the limit: logits of 150 positions are 300 KB
    const ids = Array.from({ length: 150 }, (_, i) => 3 + (i % 400));
    expect(await codeOf(alice.trace(ids, () => ({ logits: alice.lm_head.output })))).toBe("TOO_LARGE");
    await works(alice);
  });

  it("malformed JSON is BAD_INPUT or INVALID_GRAPH, unknown ops are INVALID_GRAPH", async () => {
    const raw = await hello(server.url);
    raw.sendText("{ this is not json");
    expect((await raw.waitFor((m) => m.type === "error")).msg.error).toMatchObject({ code: "BAD_INPUT" });
    const bad = new TextEncoder().encode("{ nor is this");
    raw.send({ type: "submit", rid: 2, model: "stories260K", cid: "c1", split: bad.length }, bad);
    expect((await raw.waitFor((m) => m.rid === 2)).msg.error).toMatchObject({ code: "INVALID_GRAPH" });
    raw.send({ type: "launch", rid: 3 });
    expect((await raw.waitFor((m) => m.rid === 3)).msg.error).toMatchObject({ code: "BAD_INPUT" });
    raw.close();

    const g = (await record(alice, () => ({ h: alice.model.layers[1]!.output.add(1) }))) as TraceGraph;
    const evil = { ...g, nodes: g.nodes.map((n) => (n.op === "add" ? { ...n, op: "readFile", args: ["/etc/passwd"] } : n)) };
    expect(await codeOf(alice._conn.submit("stories260K", evil, [], false, (r) => r))).toBe("INVALID_GRAPH");
    const dangling = { ...g, result: { h: { $ref: 999 } } };
    expect(await codeOf(alice._conn.submit("stories260K", dangling, [], false, (r) => r))).toBe("INVALID_GRAPH");
    await works(alice);
  });

  it("a protocol or graph version mismatch is VERSION; an unknown model is UNKNOWN_MODEL", async () => {
    const raw = await RawClient.open(server.url);
    raw.send({ type: "hello", protocol: PROTOCOL_VERSION + 1, apiKey: KEYS.alice });
    expect((await raw.waitFor((m) => m.type === "error")).msg.error).toMatchObject({ code: "VERSION" });
    raw.close();
    const g = await record(alice, () => ({ h: alice.model.layers[1]!.output }));
    expect(await codeOf(alice._conn.submit("stories260K", { ...g, version: 99 }, [], false, (r) => r))).toBe("VERSION");
    expect(await codeOf(alice._conn.submit("gpt-5", g, [], false, (r) => r))).toBe("UNKNOWN_MODEL");
    expect(await codeOf(LanguageModel.connect(server.url, "gpt-5", { apiKey: KEYS.alice }))).toBe("UNKNOWN_MODEL");
    await works(alice);
  });

  it("a graph that fails mid-run reports its own error code", async () => {
    const wrong = tensor([1, 2, 3], { dtype: "float32", shape: [3] });
    let err: NNsightError | undefined;
    try {
      await alice.trace(P, () => ({ h: alice.model.layers[1]!.output.add(wrong) }));
    } catch (e) {
      err = e as NNsightError;
    }
    expect(err).toBeInstanceOf(NNsightError);
    expect(err!.code).toBe("SHAPE");
    expect(err!.details.job).toMatch(/^[0-9a-f-]{36}$/);
    await works(alice);
  });

  it("T62: a value needed before it exists is OUT_OF_ORDER remotely too, naming the module", async () => {
    const p = alice.trace(P, () => {
      alice.model.layers[0]!.output.set([":"], alice.model.layers[2]!.output);
      return {};
    });
    const e = await p.catch((x: unknown) => x);
    expect(await codeOf(p)).toBe("OUT_OF_ORDER");
    expect(String((e as Error).message)).toMatch(/model\.layers\.(0|2)/);
    await works(alice);
  });
});

describe("cancellation, dropped clients and crashed workers", () => {
  it("cancels queued and running jobs (CANCELLED); later jobs run", async () => {
    const a = await longJob(alice);
    const b = await longJob(alice);
    const bStates: string[] = [];
    b.on("event", (e: { status: string }) => bStates.push(e.status));
    await running(a);
    expect(b.state).toBe("QUEUED");
    await b.cancel();
    expect(await codeOf(b.result())).toBe("CANCELLED");
    expect(bStates).not.toContain("RUNNING");
    const pid = server.workerPid();
    await a.cancel();
    expect(await codeOf(a.result())).toBe("CANCELLED");
    expect((await a.status()).state).toBe("CANCELLED");
    await works(alice);
    // a generation stops at its next step: the worker (and its loaded model) stays up
    expect(server.workerPid()).toBe(pid);
  });

  it("queued jobs hear their new position when the queue moves", async () => {
    const a = await longJob(alice);
    await running(a);
    const b = await longJob(alice);
    const c = await longJob(alice);
    const positions: number[] = [];
    c.on("event", (e: { status: string; position?: number }) => {
      if (e.status === "QUEUED" && e.position !== undefined) positions.push(e.position);
    });
    await a.cancel();
    await running(b);
    await new Promise((r) => setTimeout(r, 100));
    expect(positions.at(-1)).toBe(0);
    await b.cancel();
    await c.cancel();
    await works(alice);
  });

  it("a client that drops mid-job still gets its result; the same key can fetch it by id, another key cannot", async () => {
    const job = await longJob(alice);
    await running(job);
    alice._conn._drop();
    const r = (await job.result()) as { tokens: Tensor };
    expect(r.tokens.shape[0]).toBe(8);

    const again = await LanguageModel.connect(server.url, "stories260K", { apiKey: KEYS.alice });
    const fetched = (await (await again.job(job.id)).result()) as { tokens: Tensor };
    expect(fetched.tokens.toArray()).toEqual(r.tokens.toArray());
    await again.dispose();
    expect(await codeOf(bob.job(job.id))).toBe("BAD_INPUT");
  });

  it("a worker killed mid-job fails that job only; queued jobs of other users complete exactly once", async () => {
    const job = await longJob(alice);
    await running(job);
    // bob queues work behind it on a raw socket, counting every terminal event per job
    const raw = await hello(server.url, KEYS.bob);
    const g = await record(bob, () => ({ h: bob.model.layers[1]!.output }));
    const json = new TextEncoder().encode(JSON.stringify(g));
    for (let i = 0; i < 8; i++) raw.send({ type: "submit", rid: 100 + i, model: "stories260K", cid: `k${i}`, split: json.length }, json);
    const acks = await Promise.all(Array.from({ length: 8 }, (_, i) => raw.waitFor((m) => m.rid === 100 + i)));
    const ids = acks.map((a) => a.msg.job as string);
    expect(new Set(ids).size).toBe(8);

    process.kill(server.workerPid(), "SIGKILL");
    const err = await codeOf(job.result());
    expect(err).toBe("INTERNAL");

    const terminal = (id: string) => raw.messages.filter((m) => m.msg.type === "event" && m.msg.job === id && ["COMPLETED", "ERROR", "CANCELLED"].includes(m.msg.status as string));
    for (const id of ids) await raw.waitFor((m) => m.type === "event" && m.job === id && m.status === "COMPLETED");
    await new Promise((r) => setTimeout(r, 200));
    for (const id of ids) expect(terminal(id).map((m) => m.msg.status)).toEqual(["COMPLETED"]);
    raw.close();
    await works(alice);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/nnsight_worker_restarts_total [1-9]/);
  });
});
