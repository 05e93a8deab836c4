// The service's parts without a server: fair queue, key store, result store, value encoding, cost.
import { appendFileSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { describe, expect, it } from "vitest";

import { NNsightError, Tensor, tensor } from "../../ts/src/index.js";
import { decodeFrame, decodeValues, encodeFrame, encodeValues } from "../../ts/src/remote/protocol.js";
import { KeyStore } from "../../ts/src/server/auth.js";
import { estimateCost } from "../../ts/src/server/jobs.js";
import { FairQueue } from "../../ts/src/server/queue.js";
import { ResultStore } from "../../ts/src/server/result-store.js";
import { ModelWorker } from "../../ts/src/server/worker-pool.js";
import type { TraceGraph } from "../../ts/src/trace/graph.js";

describe("FairQueue", () => {
  it("serves owners round-robin, FIFO within an owner", () => {
    const q = new FairQueue<{ owner: string; n: number }>();
    for (let n = 0; n < 4; n++) q.push({ owner: "a", n });
    q.push({ owner: "b", n: 0 });
    q.push({ owner: "c", n: 0 });
    q.push({ owner: "b", n: 1 });
    const order: string[] = [];
    for (let x = q.pop(); x; x = q.pop()) order.push(`${x.owner}${x.n}`);
    expect(order).toEqual(["a0", "b0", "c0", "a1", "b1", "a2", "a3"]);
    expect(q.length).toBe(0);
  });

  it("removes items and estimates positions", () => {
    const q = new FairQueue<{ owner: string; n: number }>();
    const items = [{ owner: "a", n: 0 }, { owner: "a", n: 1 }, { owner: "b", n: 0 }];
    for (const i of items) q.push(i);
    expect(q.position(items[1]!)).toBe(2);
    expect(q.remove(items[0]!)).toBe(true);
    expect(q.remove(items[0]!)).toBe(false);
    expect(q.length).toBe(2);
    expect([q.pop()!.n, q.pop()!.owner]).toEqual([1, "b"]);
  });
});

describe("KeyStore", () => {
  it("authenticates by hash and refuses unknown or missing keys", () => {
    const ks = new KeyStore([{ key: "secret-1", name: "alice", quota: { maxConcurrent: 2 } }]);
    const p = ks.authenticate("secret-1");
    expect(p.name).toBe("alice");
    expect(p.quota.maxConcurrent).toBe(2);
    expect(p.id).not.toContain("secret");
    for (const k of ["secret-2", undefined]) {
      try {
        ks.authenticate(k);
        throw new Error("accepted");
      } catch (e) {
        expect((e as NNsightError).code).toBe("UNAUTHORIZED");
      }
    }
    expect(new KeyStore([]).authenticate(undefined).id).toBe("anonymous");
  });
});

describe("ResultStore", () => {
  const meta = (createdAt = Date.now()) => ({ owner: "o", kind: "trace", model: "m", createdAt });
  const idOf = (n: number) => `0123abcd-0000-4000-8000-${n.toString(16).padStart(12, "0")}`;
  const tmp = () => mkdtempSync(path.join(tmpdir(), "nnsight-store-"));

  it("keeps results on disk by job id, refuses other names, expires them", async () => {
    const dir = tmp();
    const id = idOf(1);
    const store = new ResultStore({ dir, ttlMs: 60_000, maxCacheBytes: 0 });
    await store.put(id, { meta: meta(), json: '{"x":1}', bytes: new Uint8Array([1, 2, 3]) });
    const r = await store.get(id);
    expect(r?.json).toBe('{"x":1}');
    expect(Array.from(r!.bytes)).toEqual([1, 2, 3]);
    expect(await store.get("../../etc/passwd")).toBeNull();
    await expect(store.put("../x", { meta: meta(), json: "{}", bytes: new Uint8Array(0) })).rejects.toThrow();
    const expired: string[] = [];
    store.onExpire = (x) => expired.push(x);
    await store.sweep(Date.now() + 30_000);
    expect(expired).toEqual([]);
    await store.sweep(Date.now() + 120_000);
    expect(expired).toEqual([id]);
    expect(readdirSync(dir)).toEqual([]);
    expect(await store.get(id)).toBeNull();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("writes the results of one turn in one segment; a new store on the same dir finds them (a torn tail is ignored)", async () => {
    const dir = tmp();
    const store = new ResultStore({ dir, ttlMs: 60_000, maxCacheBytes: 0 });
    const big = new Uint8Array(100_000).map((_, i) => i % 251);
    await Promise.all(Array.from({ length: 50 }, (_, i) => store.put(idOf(i), { meta: meta(), json: `{"i":${i}}`, bytes: i === 7 ? big : new Uint8Array([i]) })));
    expect(readdirSync(dir).length).toBe(1);
    expect((await store.get(idOf(7)))!.bytes).toEqual(big);
    await store.close();
    expect(readdirSync(dir).length).toBe(1); // a results dir of its own is kept
    // a crash mid-write leaves a partial record at the end
    const seg = path.join(dir, readdirSync(dir)[0]!);
    appendFileSync(seg, Buffer.from("NXR1" + idOf(99) + "\x05\x00"));
    const again = new ResultStore({ dir, ttlMs: 60_000, maxCacheBytes: 0 });
    for (const i of [0, 7, 49]) {
      const r = await again.get(idOf(i));
      expect(r?.json).toBe(`{"i":${i}}`);
      expect(r!.bytes.length).toBe(i === 7 ? big.length : 1);
    }
    expect(await again.get(idOf(99))).toBeNull();
    await again.put(idOf(100), { meta: meta(), json: "{}", bytes: new Uint8Array(0) });
    expect(readdirSync(dir).length).toBe(2); // new results go to a new segment
    await again.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("reads and expires one-file-per-result files of earlier versions", async () => {
    const dir = tmp();
    const id = idOf(5);
    const m = Buffer.from(JSON.stringify(meta()));
    const head = Buffer.alloc(8);
    head.writeUInt32LE(m.length, 0);
    head.writeUInt32LE(2, 4);
    writeFileSync(path.join(dir, `${id}.result`), Buffer.concat([head, m, Buffer.from("{}"), Buffer.from([4, 2])]));
    const store = new ResultStore({ dir, ttlMs: 60_000 });
    expect(Array.from((await store.get(id))!.bytes)).toEqual([4, 2]);
    const old = new Date(Date.now() - 120_000);
    utimesSync(path.join(dir, `${id}.result`), old, old);
    const expired: string[] = [];
    store.onExpire = (x) => expired.push(x);
    await store.sweep();
    expect(expired).toEqual([id]);
    expect(readdirSync(dir)).toEqual([]);
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("a write that fails keeps the result in memory (served, then expired)", async () => {
    const dir = tmp();
    const store = new ResultStore({ dir, ttlMs: 60_000, maxCacheBytes: 0 });
    const warnings: string[] = [];
    store.warn = (w) => warnings.push(w);
    rmSync(dir, { recursive: true, force: true }); // nowhere to write
    await store.put(idOf(1), { meta: meta(), json: '{"k":1}', bytes: new Uint8Array([7]) });
    expect(warnings.length).toBe(1);
    expect((await store.get(idOf(1)))?.json).toBe('{"k":1}');
    const expired: string[] = [];
    store.onExpire = (x) => expired.push(x);
    await store.sweep(Date.now() + 120_000);
    expect(expired).toEqual([idOf(1)]);
    expect(await store.get(idOf(1))).toBeNull();
    await store.close();
  });
});

describe("wire values", () => {
  it("round-trips tensors, shared objects, undefined and non-finite numbers", async () => {
    const t = tensor([1.5, -0, 3], { dtype: "float32", shape: [3] });
    const shared = [t, 2];
    const e = encodeValues({ a: shared, b: shared, c: undefined, d: Number.NaN, e: -Infinity, f: "s" });
    const d = decodeValues(e.json, e.bytes) as Record<string, unknown>;
    expect(d.a).toBe(d.b);
    expect((d.a as unknown[])[0]).toBeInstanceOf(Tensor);
    expect(Array.from((d.a as Tensor[])[0]!.toFloat32Array())).toEqual([1.5, -0, 3]);
    expect("c" in d && d.c === undefined).toBe(true);
    expect(Number.isNaN(d.d)).toBe(true);
    expect(d.e).toBe(-Infinity);
    const f = decodeFrame(encodeFrame({ type: "x", n: 1 }, new Uint8Array([9, 8])));
    expect(f.msg).toEqual({ type: "x", n: 1 });
    expect(Array.from(f.payload)).toEqual([9, 8]);
    expect(() => decodeFrame(new Uint8Array([255, 255, 0, 0, 1]))).toThrow(NNsightError);
  });

  it("estimates cost as tokens × layers × nodes", () => {
    const g = { version: 1, kind: "generate", invokes: [{ input: [[1, 2, 3]] }], nodes: [{}, {}], blocks: [], result: null, saves: [], generate: { maxNewTokens: 7 } } as unknown as TraceGraph;
    expect(estimateCost(g, 5)).toBe((3 + 7) * 5 * 2);
  });
});

describe("ModelWorker batches", () => {
  // a stand-in worker: answers a batch's jobs only when told to (by a job named in an abort it ignores)
  const FAKE = `
    const held = new Map();
    process.on("message", (m) => {
      if (m.type === "batch") for (const j of m.jobs) held.set(j.job, j);
      if (m.type === "abort" && m.job === "release") {
        for (const id of held.keys()) if (id !== "stuck") process.send({ type: "done", job: id, json: JSON.stringify(id), bytes: new Uint8Array(0) });
      }
    });
    process.on("disconnect", () => process.exit(0));
    process.send({ type: "ready", config: {}, generationConfig: {}, numLayers: 1, tokenizer: { json: null, config: {}, eosTokenIds: [] } });
  `;

  it("a cancelled job of a batch does not kill the worker while the others run; all of them stopped does", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "nnsight-fake-worker-"));
    const entry = path.join(dir, "worker.cjs");
    writeFileSync(entry, FAKE);
    const w = new ModelWorker("fake", { model: "none" }, entry);
    await w.start();
    const pid = w.pid;
    const req = (job: string) => ({ req: { job, scan: false, graph: "{}", attachments: new Uint8Array(0), maxResultBytes: 1e6 }, onLog: () => {} });
    const runs = w.runBatch([req("a-0000"), req("stuck"), req("release")]);
    const settled = runs.map((p) => p.then((r) => r.json, (e: NNsightError) => e.code));
    expect(w.idle).toBe(false);
    w.kill("stuck", 50); // the others are still running: no SIGKILL
    await new Promise((r) => setTimeout(r, 200));
    expect(w.pid).toBe(pid);
    w.kill("release", 50); // makes the fake answer a-0000 and release; "stuck" (stopped) remains alone
    expect(await settled[0]).toBe('"a-0000"');
    expect(await settled[2]).toBe('"release"');
    // every unanswered job of the batch was stopped: the worker is killed after the grace period
    expect(await settled[1]).toBe("INTERNAL");
    await new Promise<void>((r) => (w.state === "ready" && w.pid !== pid ? r() : w.once("ready", () => r())));
    expect(w.pid).not.toBe(pid);
    w.stop();
    rmSync(dir, { recursive: true, force: true });
  });
});
