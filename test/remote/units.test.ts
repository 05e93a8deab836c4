// The service's parts without a server: fair queue, key store, result store, value encoding, cost.
import { mkdtempSync, readdirSync, rmSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { describe, expect, it } from "vitest";

import { NNsightError, Tensor, tensor } from "../../ts/src/index.js";
import { decodeFrame, decodeValues, encodeFrame, encodeValues } from "../../ts/src/remote/protocol.js";
import { KeyStore } from "../../ts/src/server/auth.js";
import { estimateCost } from "../../ts/src/server/jobs.js";
import { FairQueue } from "../../ts/src/server/queue.js";
import { ResultStore } from "../../ts/src/server/result-store.js";
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
  it("keeps results on disk by job id, refuses other names, expires them", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "nnsight-store-"));
    const id = "0123abcd-0000-4000-8000-0123456789ab";
    const store = new ResultStore({ dir, ttlMs: 60_000, maxCacheBytes: 0 });
    store.put(id, { meta: { owner: "o", kind: "trace", model: "m", createdAt: Date.now() }, json: '{"x":1}', bytes: new Uint8Array([1, 2, 3]) });
    const r = await store.get(id);
    expect(r?.json).toBe('{"x":1}');
    expect(Array.from(r!.bytes)).toEqual([1, 2, 3]);
    expect(await store.get("../../etc/passwd")).toBeNull();
    const expired: string[] = [];
    store.onExpire = (x) => expired.push(x);
    const old = new Date(Date.now() - 120_000);
    utimesSync(path.join(dir, `${id}.result`), old, old);
    await store.sweep();
    expect(expired).toEqual([id]);
    expect(readdirSync(dir)).toEqual([]);
    await store.close();
    rmSync(dir, { recursive: true, force: true });
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
