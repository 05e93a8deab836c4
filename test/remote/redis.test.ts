// Redis mode: a real `redis-server` (no persistence, a free port), two front ends (`serve --redis`) and a
// stand-alone worker (`worker --redis`) against it. Remote equals local bit for bit, a result is fetched
// from the other front end, per-key fairness, cancellation and quotas across front ends, and a worker
// killed mid-job fails that job once while later jobs still succeed. Skipped (with the reason printed)
// where redis-server is not installed. The embedded path is checked never to load ioredis or bullmq.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";

import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, type RemoteJob, type RemoteLanguageModel, type Tensor } from "../../ts/src/index.js";
import { PROTOCOL_VERSION } from "../../ts/src/remote/protocol.js";
import { codeOf } from "../helpers/errors.js";
import { ROOT, RawClient, type TestServer, ensureBuilt, expectMatching, f32, sameBits, startServer } from "./helpers.js";

const REDIS_SERVER = process.env.NNSIGHT_REDIS_SERVER ?? "redis-server";
const found = spawnSync(REDIS_SERVER, ["--version"], { encoding: "utf8" });
const HAVE_REDIS = found.status === 0;
if (!HAVE_REDIS) {
  console.log(`redis.test.ts: skipped: ${REDIS_SERVER} not found (${found.error?.message ?? `exit ${found.status}`}); install the Debian package redis-server (.ci/run does as root)`);
}

const KEYS = { alice: "alice-key-0123456789", bob: "bob-key-0123456789", carol: "carol-key-0123456789", dave: "dave-key-0123456789", erin: "erin-key-0123456789" };
const P = "Once upon a time";
/** short liveness timings, so a dead worker is noticed within a second or two */
/**
 * Short liveness timings: a job's lock expires within 1 s after its worker died and the other worker's
 * stalled-job check (every second) notices within two more checks, 3 s at most; a worker counts as dead
 * 6 s after its last heartbeat (later, so that with a second worker alive the stalled-job check answers
 * first).
 */
const ENV = { NNSIGHT_REDIS_HEARTBEAT_MS: "250", NNSIGHT_REDIS_ALIVE_MS: "6000", NNSIGHT_REDIS_LOCK_MS: "1000", NNSIGHT_REDIS_PREFIX: "nnt" };
const CLI = path.join(ROOT, "dist/cli/main.js");

let dir: string;
let redis: ChildProcess;
let redisUrl: string;
let db: Redis;
let feA: TestServer, feB: TestServer;
const workers: ChildProcess[] = [];
let local: LanguageModel;
const models: RemoteLanguageModel[] = [];

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => resolve(typeof a === "object" && a ? a.port : 0));
    });
  });
}

/** A stand-alone worker process; resolves once it serves its queue. */
async function startWorker(): Promise<ChildProcess> {
  const proc = spawn(process.execPath, [CLI, "worker", "--redis", redisUrl, "--threads", "1"], { cwd: ROOT, env: { ...process.env, ...ENV }, stdio: ["ignore", "pipe", "pipe"] });
  workers.push(proc);
  let err = "";
  proc.stderr!.on("data", (d) => (err += d));
  await new Promise<void>((resolve, reject) => {
    let out = "";
    const t = setTimeout(() => reject(new Error(`worker did not start: ${err}`)), 60_000);
    proc.stdout!.on("data", (d) => {
      out += d;
      if (/^worker \S+ serving stories260K$/m.test(out)) {
        clearTimeout(t);
        resolve();
      }
    });
    proc.once("exit", (c) => reject(new Error(`worker exited with ${c}: ${err}`)));
  });
  return proc;
}

const connect = async (fe: TestServer, key: string) => {
  const m = await LanguageModel.connect(fe.url, "stories260K", { apiKey: key });
  models.push(m);
  return m;
};

const PROMPTS = Array.from({ length: 8 }, (_, i) => `${P} ${i}`);
/** runs for a while (seconds), unless cancelled */
const longJob = (m: RemoteLanguageModel) => m.generate(PROMPTS, { maxNewTokens: 480, blocking: false });
const running = (job: RemoteJob<unknown>) => new Promise<void>((res) => (job.state === "RUNNING" ? res() : job.once("RUNNING", () => res())));

const expectSame = (a: unknown, b: unknown) =>
  expectMatching(b, a, async (y, x, w) => {
    if (x.dtype === "float32") expect(sameBits(await f32(x), await f32(y)), `${w}: bits differ`).toBe(true);
    else expect(y.toArray(), w).toEqual(x.toArray());
  });

describe.skipIf(!HAVE_REDIS)("Redis mode: two front ends and a stand-alone worker", () => {
  beforeAll(async () => {
    delete process.env.NNSIGHT_API_KEY;
    dir = mkdtempSync(path.join(tmpdir(), "nnsight-redis-"));
    const port = await freePort();
    redisUrl = `redis://127.0.0.1:${port}`;
    redis = spawn(REDIS_SERVER, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, "--protected-mode", "no"], { stdio: ["ignore", "pipe", "pipe"] });
    await new Promise<void>((resolve, reject) => {
      let out = "";
      const t = setTimeout(() => reject(new Error(`redis-server did not start: ${out}`)), 20_000);
      redis.stdout!.on("data", (d) => {
        out += d;
        if (/Ready to accept connections/.test(out)) {
          clearTimeout(t);
          resolve();
        }
      });
      redis.once("exit", (c) => reject(new Error(`redis-server exited with ${c}: ${out}`)));
    });
    db = new Redis(redisUrl);
    writeFileSync(
      path.join(dir, "keys.json"),
      JSON.stringify([
        { key: KEYS.alice, name: "alice" },
        { key: KEYS.bob, name: "bob" },
        { key: KEYS.carol, name: "carol", quota: { maxConcurrent: 2 } },
        { key: KEYS.dave, name: "dave", quota: { jobsPerMinute: 2 } },
        { key: KEYS.erin, name: "erin", quota: { resultBytes: 1000 } },
      ]),
    );
    await ensureBuilt();
    const fe = () => startServer(["--redis", redisUrl, "--api-keys", path.join(dir, "keys.json")], ENV);
    [feA, feB, local] = await Promise.all([fe(), fe(), LanguageModel.load("stories260K"), startWorker()]);
  });

  afterAll(async () => {
    for (const m of models) await m.dispose();
    await local?.dispose();
    await Promise.all([feA?.stop(), feB?.stop()]);
    for (const w of workers) if (w.exitCode === null && w.signalCode === null) w.kill("SIGTERM");
    await Promise.all(workers.map((w) => (w.exitCode === null && w.signalCode === null ? new Promise((r) => w.once("exit", r)) : null)));
    db?.disconnect();
    redis?.kill("SIGKILL");
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("both front ends list the model the stand-alone worker serves (GET /models)", async () => {
    for (const fe of [feA, feB]) {
      const { models: list } = (await (await fetch(`${fe.url}/models`)).json()) as { models: Array<Record<string, unknown>> };
      expect(list.map((m) => m.id)).toEqual(["stories260K"]);
      expect(list[0]).toMatchObject({ status: "ready", workers: 1, world: 1, queue: 0, running: 0 });
      expect(list[0]!.config).toEqual(local.config);
      const tok = (await (await fetch(`${fe.url}/models/stories260K/tokenizer`)).json()) as { eosTokenIds: number[] };
      expect(tok.eosTokenIds).toEqual(local.tokenizer.eosTokenIds);
    }
  });

  it("remote equals local bit for bit (a trace with an edit, a generation)", async () => {
    const a = await connect(feA, KEYS.alice);
    const run = (m: LanguageModel) =>
      m.trace(P, () => {
        m.model.layers[2]!.mlp.output.set([":", -1], 0);
        return { h: m.model.layers[1]!.output, logits: m.lm_head.output.at([":", -1]) };
      });
    await expectSame(await run(local), await run(a));
    const gen = (m: LanguageModel) => m.generate(P, { maxNewTokens: 8 }, () => ({ tokens: m.generator.output, h: m.model.layers[3]!.output }));
    await expectSame(await gen(local), await gen(a));
    // a result over 1 MiB is not sent in its COMPLETED event through Redis: the front end reads it from the store
    const big = (m: LanguageModel) => m.trace(PROMPTS.map((x) => x.repeat(10)), () => ({ logits: m.lm_head.output }));
    const [lb, rb] = [await big(local), await big(a)];
    expect((lb.logits as Tensor).shape.reduce((x, y) => x * y) * 4).toBeGreaterThan(1024 * 1024);
    await expectSame(lb, rb);
  });

  it("a job submitted to one front end is watched, fetched and reported by the other", async () => {
    const a = await connect(feA, KEYS.alice);
    const b = await connect(feB, KEYS.alice);
    const job = await a.trace(P, () => ({ h: a.model.layers[1]!.output }), { blocking: false });
    const first = (await job.result()) as { h: Tensor };
    const again = await b.job(job.id);
    expect((await again.status()).state).toBe("COMPLETED");
    const second = (await again.result()) as { h: Tensor };
    expect(sameBits(await f32(first.h), await f32(second.h))).toBe(true);
    // someone else's job is not visible from any front end
    const bob = await connect(feB, KEYS.bob);
    expect(await codeOf(bob.job(job.id))).toBe("BAD_INPUT");
  });

  it("job events travel through Redis in order: QUEUED, RUNNING, LOG values, streamed tokens, COMPLETED", async () => {
    const a = await connect(feA, KEYS.alice);
    const logged: unknown[][] = [];
    const job = await a.trace(P, (tr) => {
      tr.log("mean", a.model.layers[0]!.output.mean());
      return { h: a.model.layers[1]!.output };
    }, { blocking: false, log: (...v) => logged.push(v) });
    const seen: string[] = [];
    for await (const e of job) seen.push(e.status);
    expect(seen[0]).toBe("QUEUED");
    expect(seen.filter((x) => x !== "QUEUED")).toEqual(["RUNNING", "LOG", "COMPLETED"]);
    const mean = await local.trace(P, () => ({ m: local.model.layers[0]!.output.mean() }));
    expect(logged[0]![0]).toBe("mean");
    expect(sameBits(await f32(logged[0]![1] as Tensor), await f32(mean.m as Tensor))).toBe(true);

    const toks: number[] = [], steps: number[] = [];
    const r = await a.generate(P, { maxNewTokens: 5, stream: (t) => toks.push(t[0]!), onStep: (st) => steps.push(st) },
      (tr) => ({ ...tr.all(() => ({ top: a.lm_head.output.at([0, -1]).argmax() })), tokens: a.generator.output }));
    const l = await local.generate(P, { maxNewTokens: 5 }, () => ({ tokens: local.generator.output }));
    expect(steps).toEqual([0, 1, 2, 3, 4]);
    expect(toks).toEqual(l.tokens.toArray()[0].slice(-5));
    expect(r.tokens.toArray()).toEqual(l.tokens.toArray());
    const metrics = await (await fetch(`${feA.url}/metrics`)).text();
    expect(metrics).toMatch(/nnsight_jobs\{model="stories260K",state="COMPLETED"\} \d+/);
    expect(metrics).toMatch(/nnsight_run_seconds_count\{model="stories260K"\} \d+/);
  });

  it("the time limit of the front end that admitted a job holds on the worker (TIMEOUT); the worker goes on", async () => {
    const feC = await startServer(["--redis", redisUrl, "--api-keys", path.join(dir, "keys.json"), "--job-timeout-ms", "300"], ENV);
    try {
      const c = await connect(feC, KEYS.alice);
      const job = await longJob(c);
      expect(await codeOf(job.result())).toBe("TIMEOUT");
      const r = await c.trace(P, () => ({ h: c.model.layers[1]!.output }));
      expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
    } finally {
      await feC.stop();
    }
  });

  it("a job admitted but never queued (its front end died in between) is failed and gives its quota back", async () => {
    // what a front end killed between the admission script and BullMQ's add leaves behind
    const id = "00000000-0000-4000-8000-000000000001";
    const t = Number((await db.time())[0]) * 1000 - 120_000;
    await db.hset(`nnt:job:${id}`, { owner: "ghost", model: "stories260K", cid: "c1", kind: "trace", scan: "0", state: "QUEUED", priority: "1", createdAt: String(t), ttl: "60000" });
    await db.zadd("nnt:q:stories260K", 1, id);
    await db.set("nnt:active:ghost", "1");
    const deadline = Date.now() + 15_000;
    while ((await db.hget(`nnt:job:${id}`, "state")) === "QUEUED" && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(await db.hget(`nnt:job:${id}`, "state")).toBe("ERROR");
    expect(await db.hget(`nnt:job:${id}`, "error")).toMatch(/never queued/);
    expect(await db.get("nnt:active:ghost")).toBe("0");
    expect(await db.zcard("nnt:q:stories260K")).toBe(0);
  });

  it("fair scheduling across keys holds for one queue fed by two front ends", async () => {
    const bob = await connect(feA, KEYS.bob);
    const alice = await connect(feB, KEYS.alice);
    const carol = await connect(feA, KEYS.carol);
    // the worker is busy, so every job below waits in the queue before any of them runs
    const blocker = await longJob(carol);
    await running(blocker);
    const jobs: Array<[string, RemoteJob<unknown>]> = [];
    const note = (who: string, j: RemoteJob<unknown>) => jobs.push([who, j]);
    const prompts = PROMPTS.slice(0, 4);
    const bobs: RemoteJob<unknown>[] = [];
    for (let i = 0; i < 8; i++) {
      const j = await bob.generate(prompts, { maxNewTokens: 20, blocking: false });
      note(`bob${i}`, j);
      bobs.push(j);
    }
    const positions: number[] = [];
    bobs[7]!.on("QUEUED", (e: { position?: number }) => positions.push(e.position ?? -1));
    const mine = await alice.trace(P, () => ({ h: alice.model.layers[1]!.output }), { blocking: false });
    expect((await mine.status()).position).toBe(1); // behind bob's first job only
    note("alice", mine);
    await blocker.cancel();
    await Promise.all([mine.result(), ...bobs.map((j) => j.result())]);
    // the order they ran in, from the job records (events reach two front ends at their own pace)
    const started = await Promise.all(jobs.map(async ([who, j]) => [who, Number(await db.hget(`nnt:job:${j.id}`, "startedAt"))] as const));
    const order = started.sort((x, y) => x[1] - y[1]).map(([who]) => who);
    // bob queued 8 jobs before alice's one: hers runs after one of his (equal turns), not after all eight,
    // and each key's jobs run in the order they came
    expect(order).toEqual(["bob0", "alice", ...bobs.slice(1).map((_, i) => `bob${i + 1}`)]);
    // bob's last job was told its place as the queue moved (from whichever front end's events; not
    // monotonic: alice's job, admitted later, was placed ahead of it)
    expect(positions.length, positions.join(" ")).toBeGreaterThan(1);
    expect(positions.at(-1)!, positions.join(" ")).toBeLessThan(Math.max(...positions));
  });

  it("cancelling from the other front end: a queued job and a running one; the worker keeps serving", async () => {
    const a = await connect(feA, KEYS.alice);
    const b = await connect(feB, KEYS.alice);
    const first = await longJob(a);
    const second = await longJob(a);
    await running(first);
    expect((await second.status()).state).toBe("QUEUED");
    await (await b.job(second.id)).cancel();
    expect(await codeOf(second.result())).toBe("CANCELLED");
    const t0 = Date.now();
    await (await b.job(first.id)).cancel();
    expect(await codeOf(first.result())).toBe("CANCELLED");
    expect((await (await b.job(first.id)).status()).state).toBe("CANCELLED");
    const r = await b.trace(P, () => ({ h: b.model.layers[1]!.output }));
    expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it("clients' events survive Redis dropping the subscriber connections again and again mid-job", async () => {
    const a = await connect(feA, KEYS.alice);
    const b = await connect(feB, KEYS.alice);
    const job = await a.generate(PROMPTS, { maxNewTokens: 120, blocking: false });
    await running(job);
    // the front ends' event subscriptions and the worker's control channel: events published while one
    // is down are lost, and the front end catches up from the job's state when it is back
    let done = false;
    const result = job.result().finally(() => (done = true));
    const until = Date.now() + 20_000;
    while (!done && Date.now() < until) {
      await db.client("KILL", "TYPE", "pubsub");
      await new Promise((r) => setTimeout(r, 10));
    }
    const tokens = ((await result) as { tokens: Tensor }).tokens;
    expect(tokens.shape[0]).toBe(8);
    expect(tokens.shape[1]).toBeGreaterThan(120); // the prompt and 120 new tokens
    // both front ends relay events again, and a cancel still reaches the worker
    const next = await longJob(b);
    await running(next);
    await next.cancel();
    expect(await codeOf(next.result())).toBe("CANCELLED");
    const t = (await a.trace(P, () => ({ h: a.model.layers[1]!.output }))) as { h: Tensor };
    expect(t.h.shape).toEqual([1, 5, 64]);
  });

  it("quotas count in Redis: concurrent jobs and jobs per minute hold across front ends", async () => {
    const cA = await connect(feA, KEYS.carol);
    const cB = await connect(feB, KEYS.carol);
    const j1 = await longJob(cA);
    const j2 = await longJob(cB);
    const err = await cA.trace(P, () => ({ h: cA.model.layers[1]!.output })).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "QUOTA", details: { quota: "maxConcurrent" } });
    await j1.cancel();
    await j2.cancel();
    await codeOf(j1.result());
    await codeOf(j2.result());
    const ok = await cB.trace(P, () => ({ h: cB.model.layers[1]!.output })); // the slots came back
    expect((ok.h as Tensor).shape).toEqual([1, 5, 64]);

    const dA = await connect(feA, KEYS.dave);
    const dB = await connect(feB, KEYS.dave);
    await dA.trace(P, () => ({ h: dA.model.layers[1]!.output }));
    await dB.trace(P, () => ({ h: dB.model.layers[1]!.output }));
    const err2 = await dB.trace(P, () => ({ h: dB.model.layers[1]!.output })).catch((e: unknown) => e);
    expect(err2).toMatchObject({ code: "QUOTA", details: { quota: "jobsPerMinute" } });
    const err3 = await dA.trace(P, () => ({ h: dA.model.layers[1]!.output })).catch((e: unknown) => e);
    expect(err3).toMatchObject({ code: "QUOTA", details: { quota: "jobsPerMinute" } });

    // stored result bytes: erin's first result (1280 bytes of tensor) fills her 1000-byte quota
    const eA = await connect(feA, KEYS.erin);
    const eB = await connect(feB, KEYS.erin);
    await eA.trace(P, () => ({ h: eA.model.layers[1]!.output }));
    const err4 = await eB.trace(P, () => ({ h: eB.model.layers[1]!.output })).catch((e: unknown) => e);
    expect(err4).toMatchObject({ code: "QUOTA", details: { quota: "resultBytes" } });
  });

  /**
   * Kill the worker process running a long job (SIGKILL: it cannot say goodbye) and check the job fails
   * once, for the reason `how`, as seen at the wire from the other front end.
   */
  async function killMidJob(m: RemoteLanguageModel, how: RegExp): Promise<void> {
    const job = await longJob(m);
    await running(job);
    const raw = await RawClient.open(feB.url);
    raw.send({ type: "hello", protocol: PROTOCOL_VERSION, apiKey: KEYS.bob });
    await raw.waitFor((x) => x.type === "welcome");
    raw.send({ type: "subscribe", rid: 1, job: job.id });
    await raw.waitFor((x) => x.rid === 1);
    const who = await db.hget(`nnt:job:${job.id}`, "worker");
    const victim = workers.find((w) => w.pid === Number(who!.split("/")[1]));
    expect(victim, `${who} is one of the test's workers`).toBeDefined();
    const exited = new Promise((r) => victim!.once("exit", r));
    victim!.kill("SIGKILL");
    await exited;
    const err = await job.result().catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "INTERNAL" });
    expect((err as Error).message).toMatch(/stopped while running job .*; the job was lost and is not retried/);
    expect((err as Error).message).toMatch(how);
    // long enough for the stalled-job check and every sweep to look at it again: still one answer
    await new Promise((r) => setTimeout(r, 2500));
    const terminal = raw.messages.filter((x) => x.msg.type === "event" && ["COMPLETED", "ERROR", "CANCELLED"].includes(x.msg.status as string));
    expect(terminal.map((x) => x.msg.status)).toEqual(["ERROR"]);
    raw.close();
    expect(await db.hget(`nnt:job:${job.id}`, "state")).toBe("ERROR");
  }

  const works = async (m: RemoteLanguageModel) => {
    const r = await m.trace(P, () => ({ h: m.model.layers[1]!.output }));
    expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
  };

  it("a worker killed mid-job fails that job once (BullMQ's stalled-job check, in the other worker); later jobs succeed", async () => {
    await startWorker(); // a second worker for the model, which survives
    const a = await connect(feA, KEYS.bob);
    await killMidJob(a, /stalled job/);
    for (let i = 0; i < 3; i++) await works(a);
    const { models: list } = (await (await fetch(`${feA.url}/models`)).json()) as { models: Array<Record<string, unknown>> };
    expect(list[0]).toMatchObject({ status: "ready", workers: 1 });
  });

  it("the model's only worker killed mid-job: the front ends' liveness sweep fails the job once; a new worker serves", async () => {
    const a = await connect(feA, KEYS.bob);
    await killMidJob(a, /heartbeat stopped/);
    const { models: list } = (await (await fetch(`${feB.url}/models`)).json()) as { models: Array<Record<string, unknown>> };
    expect(list.map((x) => x.status)).toEqual([]); // no live worker and nothing queued: not listed
    const next = a.trace(P, () => ({ h: a.model.layers[1]!.output }), { blocking: false });
    await startWorker();
    const r = (await (await next).result()) as { h: Tensor };
    expect(r.h.shape).toEqual([1, 5, 64]);
    await works(a);
  });
});

describe("the embedded default", () => {
  it("never loads ioredis or bullmq: they are reached only through dynamic imports", async () => {
    await ensureBuilt();
    // follow the static imports of the entry points through dist/: none may name ioredis or bullmq
    const seen = new Set<string>();
    const visit = (file: string) => {
      if (seen.has(file) || !existsSync(file)) return;
      seen.add(file);
      const src = readFileSync(file, "utf8");
      expect(src, file).not.toMatch(/(?:from|import)\s*["'](?:ioredis|bullmq)["']/);
      for (const m of src.matchAll(/(?:from|import)\s*["'](\.{1,2}\/[^"']+)["']/g)) visit(path.resolve(path.dirname(file), m[1]!));
    };
    for (const e of ["index.js", "cli/main.js", "server/worker.js"]) visit(path.join(ROOT, "dist", e));
    expect(seen.size).toBeGreaterThan(3);
  });
});
