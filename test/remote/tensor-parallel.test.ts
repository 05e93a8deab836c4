// A model served as a tensor-parallel worker group: `nnsight serve --tp 2` runs stories260K on two rank
// processes (shm communicator) and a second copy, `single`, as a plain worker (`:tp=1`). Remote results
// equal the same experiments run locally in one process within 1e-5 of the values' scale: a row-parallel
// layer sums two partial products where one process runs one GEMM, so the bits differ by a few ulps;
// greedy tokens are equal. The ranks agree with each other bit for bit (NNSIGHT_TP_CHECK=1 makes every
// rank encode its result and rank 0 compare digests; a mismatch would fail the job). Failing graphs,
// cancellation, the run-time limit, idle periods longer than the communicator's timeout and killed ranks
// all leave the group serving.
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { Communicator, LanguageModel, NNsightError, type RemoteJob, type RemoteLanguageModel, Tensor, cudaInfo, tensor } from "../../ts/src/index.js";
import { modelTp } from "../../ts/src/server/http.js";
import { codeOf } from "../helpers/errors.js";
import { ROOT, type TestServer, expectMatching, f32, startServer } from "./helpers.js";

const TP_TIMEOUT_MS = 6000; // the group's collective timeout (heartbeats every 1.5 s while idle); generous so a starved CI machine does not time out a job
const JOB_TIMEOUT_MS = 2000;
let server: TestServer;
let local: LanguageModel;
let remote: RemoteLanguageModel;
const P = "Once upon a time";

beforeAll(async () => {
  [server, local] = await Promise.all([
    startServer(["--tp", "2", "--threads", "1", "--job-timeout-ms", String(JOB_TIMEOUT_MS), "--model", "stories260K", "--model", "single=stories260K:tp=1"], {
      NNSIGHT_TP_TIMEOUT_MS: String(TP_TIMEOUT_MS),
      NNSIGHT_TP_CHECK: "1",
    }),
    LanguageModel.load("stories260K"),
  ]);
  remote = await LanguageModel.connect(server.url, "stories260K");
});
afterAll(async () => {
  await remote?.dispose();
  await local?.dispose();
  await server?.stop();
});

/** rank → pid of the server's worker group (children whose NNSIGHT_TP names a rank). */
function rankPids(): number[] {
  const pid = server.proc.pid!;
  const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  const ranks: number[] = [];
  for (const k of kids) {
    let env: string;
    try {
      env = readFileSync(`/proc/${k}/environ`, "utf8");
    } catch {
      continue; // exited meanwhile
    }
    const tp = env.split("\0").find((e) => e.startsWith("NNSIGHT_TP="));
    if (tp) ranks[(JSON.parse(tp.slice("NNSIGHT_TP=".length)) as { rank: number }).rank] = k;
  }
  return ranks;
}

async function modelsInfo(): Promise<Array<{ id: string; status: string; world: number; backend: string | null }>> {
  return ((await (await fetch(`${server.url}/models`)).json()) as { models: Array<{ id: string; status: string; world: number; backend: string | null }> }).models;
}

/** Wait until the group runs on fresh processes (both ranks replaced) and is ready again. */
async function restarted(before: number[]): Promise<number[]> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const now = rankPids();
    const ready = (await modelsInfo()).find((m) => m.id === "stories260K")!.status === "ready";
    if (ready && now.length === 2 && now.every((p, r) => p && p !== before[r])) return now;
    if (Date.now() > deadline) throw new Error(`the group did not restart: ${JSON.stringify({ before, now })}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Same structure; tensors close within 1e-5 of the reference's scale (ints equal). */
const expectClose = (actual: unknown, expected: unknown, where = "result") =>
  expectMatching(actual, expected, async (a, e, w) => {
    if (e.dtype !== "float32") {
      expect(a.toArray(), w).toEqual(e.toArray());
      return;
    }
    const [x, y] = [await f32(a), await f32(e)];
    let scale = 1, diff = 0;
    for (let i = 0; i < y.length; i++) {
      scale = Math.max(scale, Math.abs(y[i]!));
      diff = Math.max(diff, Math.abs(x[i]! - y[i]!));
    }
    expect(diff / scale, `${w}: max |diff| ${diff} at scale ${scale}`).toBeLessThan(1e-5);
  }, where);

async function works(): Promise<void> {
  const r = await remote.trace(P, () => ({ q: remote.model.layers[0]!.self_attn.q_proj.output }));
  expect((r.q as Tensor).shape).toEqual([1, 5, 64]);
}

/** A generation that cannot finish within the run-time limit (8 rows × 4000 tokens). */
const longJob = () => remote.generate(Array.from({ length: 8 }, (_, i) => `${P} ${i}`), { maxNewTokens: 4000, blocking: false });
const running = (job: RemoteJob<unknown>) => new Promise<void>((res) => (job.state === "RUNNING" ? res() : job.once("RUNNING", () => res())));

describe("serving a tensor-parallel group", () => {
  it("GET /models shows each model's world size: 2 ranks over shm, and a plain worker", async () => {
    const models = await modelsInfo();
    expect(models.map((m) => [m.id, m.status, m.world, m.backend])).toEqual([
      ["stories260K", "ready", 2, "shm"],
      ["single", "ready", 1, null],
    ]);
    expect(rankPids()).toHaveLength(2);
    const health = (await (await fetch(`${server.url}/health`)).json()) as { models: Array<{ world: number }> };
    expect(health.models.map((m) => m.world)).toEqual([2, 1]);
  });

  it("--model ID:tp=N,backend=B parses; bad sizes and backends are BAD_INPUT", () => {
    expect(modelTp("stories260K")).toEqual({ model: "stories260K" });
    expect(modelTp("big=/models/llama:tp=4")).toEqual({ model: "big=/models/llama", tp: 4 });
    expect(modelTp("org/name:tp=2,backend=nccl")).toEqual({ model: "org/name", tp: 2, backend: "nccl" });
    for (const bad of ["m:tp=0", "m:tp=x", "m:tp=1.5", "m:backend=gloo"]) {
      expect(() => modelTp(bad), bad).toThrow(NNsightError);
      expect(() => modelTp(bad), bad).toThrow(/tensor-parallel/);
    }
  });
});

describe("refusals at start", () => {
  const serveFails = (...args: string[]) => {
    const r = spawnSync(process.execPath, [path.join(ROOT, "dist/cli/main.js"), "serve", "--port", "0", "--threads", "1", ...args], { encoding: "utf8", timeout: 60_000, env: { ...process.env, NNSIGHT_API_KEYS: "" } });
    expect(r.status, r.stdout).not.toBe(0);
    return r.stderr;
  };
  it("sizes that do not divide the heads, bad flags, and NCCL without NCCL or enough GPUs", () => {
    expect(serveFails("--tp", "3")).toMatch(/BAD_INPUT: cannot split this llama model over 3 ranks: 8 attention heads/);
    expect(serveFails("--tp", "two")).toMatch(/BAD_INPUT: --tp: the tensor-parallel size must be an integer/);
    expect(serveFails("--tp", "2", "--tp-backend", "gloo")).toMatch(/BAD_INPUT: --tp-backend: the tensor-parallel backend is "shm", "nccl" or "auto"/);
    if (!Communicator.ncclInfo().available || cudaInfo().deviceCount < 2) {
      expect(serveFails("--model", "stories260K:tp=2,backend=nccl")).toMatch(/DEVICE: stories260K: .*NCCL/);
    }
  });
});

describe("remote on 2 ranks equals local in one process (within 1e-5)", () => {
  it("a trace with an in-place edit at a sharded boundary, a patch across invokes and saved values", async () => {
    const run = async (m: LanguageModel) => {
      let saved: { value: unknown } | undefined;
      const out = await m.trace((tr) => {
        let src: unknown;
        tr.invoke("Lily and Ben", () => {
          src = m.model.layers[1]!.output.at([":", -1]);
        });
        tr.invoke(P, () => {
          m.model.layers[0]!.mlp.up_proj.output.set([":", -1], 0); // column-parallel: gathered, edited, re-sliced
          m.model.layers[1]!.output.set([":", -1], src as never);
          saved = m.model.layers[1]!.self_attn.o_proj.input.mul(2).save(); // a row-parallel input
          return { patched: m.lm_head.output.at([":", -1]), q: m.model.layers[2]!.self_attn.q_proj.output, h: m.model.layers[3]!.output };
        });
      });
      return { out, saved: saved!.value };
    };
    await expectClose(await run(remote), await run(local));
  });

  it("source operations and an attachment", async () => {
    const noise = tensor(Array.from({ length: 64 }, (_, i) => Math.sin(i) / 10), { dtype: "float32", shape: [64] });
    const run = (m: LanguageModel) =>
      m.trace(P, () => {
        m.model.layers[1]!.self_attn.source.attention_interface_0.output.set([":", ":", 3], 0); // head 3 lives on rank 0 only
        m.model.layers[0]!.output.set([":", -1], m.model.layers[0]!.output.at([":", -1]).add(noise));
        return { act: m.model.layers[2]!.mlp.source.act_fn_0.output, logits: m.lm_head.output };
      });
    await expectClose(await run(remote), await run(local));
  });

  it("generation with interventions at every step and at chosen steps: the same tokens", async () => {
    const streamed = new Map<LanguageModel, Array<Array<number | null>>>([[local, []], [remote, []]]);
    const run = (m: LanguageModel) =>
      m.generate(["Once upon a time", "Lily and Ben went"], { maxNewTokens: 8, stream: (t) => streamed.get(m)!.push(t) }, (tr) => {
        tr.all(() => {
          m.model.layers[0]!.mlp.gate_proj.output.set([":", -1], m.model.layers[0]!.mlp.gate_proj.output.at([":", -1]).mul(3));
        });
        const logits = tr.iter([1, 3], () => ({ l: m.lm_head.output.at([":", -1]) }));
        return { tokens: m.generator.output, ...logits };
      });
    const [r, l] = [await run(remote), await run(local)];
    await expectClose(r, l);
    expect((l.tokens as Tensor).shape[0]).toBe(2);
    // tokens streamed from rank 0 as they came, as a local generation streams them
    expect(streamed.get(remote)!.length).toBe(8);
    expect(streamed.get(remote)).toEqual(streamed.get(local));
  });

  it("a session whose second trace uses the first trace's values", async () => {
    const run = (m: LanguageModel) =>
      m.session((s) => {
        const a = s.trace("Lily and Ben", () => ({ h: m.model.layers[2]!.output.at([":", -1]) }));
        const b = s.trace(P, () => {
          m.model.layers[2]!.output.set([":", -1], a.h);
          return { logits: m.lm_head.output.at([":", -1]), k: m.model.layers[3]!.self_attn.k_proj.output };
        });
        return { h: a.h, logits: b.logits, k: b.k };
      });
    await expectClose(await run(remote), await run(local));
  });

  it("scans return shapes; every job so far ran on both ranks with bit-identical results", async () => {
    expect(await remote.scan(P, () => ({ q: remote.model.layers[1]!.self_attn.q_proj.output }))).toEqual({ q: { shape: [1, 5, 64], dtype: "float32" } });
    // the lines come on the workers' stderr, a channel of their own: wait for the last
    const agreed = () => server.stderr().match(/tp-check: job \S+: 2 ranks agree bit for bit/g)?.length ?? 0;
    for (let i = 0; i < 100 && agreed() < 5; i++) await new Promise((r) => setTimeout(r, 20));
    expect(agreed()).toBe(5); // two traces, a generation, a session and the scan
    expect(server.stderr()).not.toMatch(/differs from rank 0/);
  });
});

describe("failures", () => {
  it("a graph that fails mid-run gets its own error; the group keeps serving", async () => {
    const pids = rankPids();
    const wrong = tensor([1, 2, 3], { dtype: "float32", shape: [3] });
    let err: NNsightError | undefined;
    try {
      await remote.trace(P, () => ({ h: remote.model.layers[1]!.self_attn.q_proj.output.add(wrong) }));
    } catch (e) {
      err = e as NNsightError;
    }
    expect(err).toBeInstanceOf(NNsightError);
    expect(err!.code).toBe("SHAPE");
    // failing at generation step 3, after many collectives
    const late = remote.generate(P, { maxNewTokens: 6 }, (tr) => tr.iter([3], () => ({ x: remote.lm_head.output.add(wrong) })));
    expect(await codeOf(late)).toBe("SHAPE");
    await works();
    expect(rankPids()).toEqual(pids);
  });

  it("cancelling a running generation stops it on every rank at the same step; no restart", async () => {
    const pids = rankPids();
    const job = await longJob();
    await running(job);
    await new Promise((r) => setTimeout(r, 100));
    await job.cancel();
    expect(await codeOf(job.result())).toBe("CANCELLED");
    await works();
    expect(rankPids()).toEqual(pids);
  });

  it("the run-time limit stops a job (TIMEOUT) the same way", async () => {
    const pids = rankPids();
    const job = await longJob();
    const t0 = Date.now();
    let err: NNsightError | undefined;
    try {
      await job.result();
    } catch (e) {
      err = e as NNsightError;
    }
    expect(err?.code).toBe("TIMEOUT");
    expect(Date.now() - t0).toBeGreaterThanOrEqual(JOB_TIMEOUT_MS - 100);
    await works();
    expect(rankPids()).toEqual(pids);
  });

  it("an idle group outlives its collective timeout (rank 0 sends heartbeats)", async () => {
    const pids = rankPids();
    await new Promise((r) => setTimeout(r, TP_TIMEOUT_MS + 500));
    await works();
    expect(rankPids()).toEqual(pids);
  });

  it("killing rank 1 mid-job fails that job with a clear error; the whole group restarts and serves", async () => {
    const pids = rankPids();
    const job = await longJob();
    await running(job);
    await new Promise((r) => setTimeout(r, 100));
    process.kill(pids[1]!, "SIGKILL");
    let err: NNsightError | undefined;
    try {
      await job.result();
    } catch (e) {
      err = e as NNsightError;
    }
    expect(err).toBeInstanceOf(NNsightError);
    expect(err!.code).toBe("INTERNAL");
    expect(err!.message).toMatch(/rank 1 .*tensor-parallel group|tensor-parallel group .*rank 1/);
    expect(err!.message).toMatch(/the group restarts \(all 2 ranks\)/);
    await restarted(pids);
    await works();
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/nnsight_worker_restarts_total [1-9]/);
  });

  it("killing rank 0 (the worker the front end talks to) mid-job does the same", async () => {
    const pids = rankPids();
    const job = await longJob();
    await running(job);
    process.kill(pids[0]!, "SIGKILL");
    let err: NNsightError | undefined;
    try {
      await job.result();
    } catch (e) {
      err = e as NNsightError;
    }
    expect(err?.code).toBe("INTERNAL");
    expect(err!.message).toMatch(new RegExp(`rank 0 \\(pid ${pids[0]}\\) of the tensor-parallel group for stories260K exited \\(SIGKILL\\)`));
    await restarted(pids);
    await works();
  });

  it("killing rank 1 between jobs restarts the group; the plain worker was never touched", async () => {
    const single = await LanguageModel.connect(server.url, "single");
    const before = await single.trace(P, () => ({ l: single.lm_head.output }));
    const pids = rankPids();
    process.kill(pids[1]!, "SIGKILL");
    await restarted(pids);
    await works();
    const after = await single.trace(P, () => ({ l: single.lm_head.output }));
    expect(Array.from(await f32(after.l as Tensor))).toEqual(Array.from(await f32(before.l as Tensor)));
    await single.dispose();
  });
});
