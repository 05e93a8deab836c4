// Remote execution gives the same numbers as local execution (bit for bit, same machine), for traces,
// sessions, generation with interventions, edits and scans; plus the job handle and the HTTP endpoints.
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, type NNsightError, type RemoteJob, type RemoteLanguageModel, Tensor, tensor } from "../../ts/src/index.js";
import { type TestServer, expectMatching, f32, sameBits, startServer } from "./helpers.js";

let server: TestServer;
let local: LanguageModel;
let remote: RemoteLanguageModel;

beforeAll(async () => {
  // a second model id serves the same weights with eager attention (`:attn=eager`)
  [server, local] = await Promise.all([startServer(["--model", "stories260K", "--model", "eager=stories260K:attn=eager"]), LanguageModel.load("stories260K")]);
  remote = await LanguageModel.connect(server.url, "stories260K");
});
afterAll(async () => {
  await remote?.dispose();
  await local?.dispose();
  await server?.stop();
});

/** Same structure, tensors bit-identical (a is the expected value, b the actual one). */
const expectSame = (a: unknown, b: unknown, where = "result") =>
  expectMatching(b, a, async (y, x, w) => {
    if (x.dtype === "float32") expect(sameBits(await f32(x), await f32(y)), `${w}: bits differ`).toBe(true);
    else expect(y.toArray(), w).toEqual(x.toArray());
  }, where);

describe("remote equals local (T62, T63)", () => {
  it("eager attention served with :attn=eager: the probabilities are hook points, bit-identical to local", async () => {
    const [eagerLocal, eagerRemote] = await Promise.all([LanguageModel.load("stories260K", { attnImplementation: "eager" }), LanguageModel.connect(server.url, "eager")]);
    try {
      expect(eagerRemote.spec.attnImplementation).toBe("eager");
      expect(remote.spec.attnImplementation).toBe("sdpa");
      const run = (m: LanguageModel) =>
        m.trace(["Once upon a time", "Lily"], () => {
          const sm = m.model.layers[2]!.self_attn.source.attention_interface_0.source.nn_functional_softmax_0;
          const probs = sm.output.clone();
          sm.output.set([":", ":", ":", 0], 0); // no weight on the first key
          return { probs, logits: m.lm_head.output.at([":", -1]) };
        });
      await expectSame(await run(eagerLocal), await run(eagerRemote));
    } finally {
      await eagerRemote.dispose();
      await eagerLocal.dispose();
    }
  });

  it("builds the same module tree from the served config", () => {
    expect(remote.modules().map((m) => m.path)).toEqual(local.modules().map((m) => m.path));
    expect(remote.config).toEqual(local.config);
    expect(remote.model.layers.length).toBe(local.model.layers.length);
  });

  it("a trace with an in-place edit, a patch across invokes and a saved value", async () => {
    const run = async (m: LanguageModel) => {
      let saved: { value: unknown } | undefined;
      const out = await m.trace((tr) => {
        let src: unknown;
        tr.invoke("Lily and Ben", () => {
          src = m.model.layers[1]!.output.at([":", -1]);
        });
        tr.invoke("Once upon a time", () => {
          m.model.layers[2]!.mlp.output.set([":", -1], 0);
          m.model.layers[1]!.output.set([":", -1], src as never);
          saved = m.model.layers[3]!.output.mul(2).save();
          return { patched: m.lm_head.output.at([":", -1]), h: m.model.layers[1]!.output };
        });
      });
      return { out, saved: saved!.value };
    };
    const [l, r] = [await run(local), await run(remote)];
    await expectSame(l.out, r.out);
    await expectSame(l.saved, r.saved, "saved");
  });

  it("source operations (a tuple swap) and hooked calls addressed with nth()", async () => {
    const run = (m: LanguageModel) =>
      m.trace("Once upon a time", () => {
        const rope = m.model.layers[1]!.self_attn.source.apply_rotary_pos_emb_0;
        rope.output = [rope.output.at(0).mul(0.5), rope.output.at(1)];
        m.model.layers[2]!.self_attn.source.attention_interface_0.output.set([":", ":", 3], 0);
        const lens = m.lm_head.call(m.model.norm.call(m.model.layers[2]!.output), { hook: true });
        m.lm_head.nth(1).output.set([":", -1], 0);
        return { lens, first: m.lm_head.nth(0).output, own: m.lm_head.nth(1).output, attn: m.model.layers[1]!.self_attn.source.attention_interface_0.output };
      });
    await expectSame(await run(local), await run(remote));
  });

  it("a trace with a tensor attachment", async () => {
    const noise = tensor(Array.from({ length: 64 }, (_, i) => Math.sin(i) / 10), { dtype: "float32", shape: [64] });
    const run = (m: LanguageModel) => m.trace("Once upon a time", () => {
      m.model.layers[0]!.output.set([":", -1], m.model.layers[0]!.output.at([":", -1]).add(noise));
      return { logits: m.lm_head.output };
    });
    await expectSame(await run(local), await run(remote));
  });

  it("a session whose second trace uses the first trace's values", async () => {
    const run = (m: LanguageModel) => m.session((s) => {
      const a = s.trace("Lily and Ben", () => ({ h: m.model.layers[2]!.output.at([":", -1]) }));
      const b = s.trace("Once upon a time", () => {
        m.model.layers[2]!.output.set([":", -1], a.h);
        return { logits: m.lm_head.output.at([":", -1]) };
      });
      return { h: a.h, logits: b.logits };
    });
    await expectSame(await run(local), await run(remote));
  });

  it("generation with interventions at every step and at chosen steps", async () => {
    const run = (m: LanguageModel) => m.generate("Once upon a time", { maxNewTokens: 8 }, (tr) => {
      tr.all(() => {
        m.model.layers[2]!.mlp.output.set([":", -1], 0);
      });
      const logits = tr.iter([1, 3], () => ({ l: m.lm_head.output.at([":", -1]) }));
      return { tokens: m.generator.output, ...logits };
    });
    const [l, r] = [await run(local), await run(remote)];
    await expectSame(l, r);
    expect((l.tokens as Tensor).shape).toEqual([1, 13]);
  });

  it("edits apply remotely too, and scans return shapes", async () => {
    const fn = (m: LanguageModel) => () => {
      m.model.layers[1]!.mlp.output.set([":", ":"], 0);
    };
    const le = local.edit(fn(local));
    const re = remote.edit(fn(remote));
    const run = (m: LanguageModel) => m.trace("Once upon a time", () => ({ logits: m.lm_head.output }));
    await expectSame(await run(le), await run(re));
    const s = await remote.scan("Once upon a time", () => ({ h: remote.model.layers[1]!.output }));
    expect(s).toEqual({ h: { shape: [1, 5, 64], dtype: "float32" } });
  });
});

describe("job handles", () => {
  it("{ blocking: false } gives status, events, LOG values and the result", async () => {
    const logged: unknown[][] = [];
    const job = await remote.trace("Once upon a time", (tr) => {
      tr.log("mean", remote.model.layers[0]!.output.mean());
      return { h: remote.model.layers[1]!.output };
    }, { blocking: false, log: (...v) => logged.push(v) });
    expect(job.id).toMatch(/^[0-9a-f-]{36}$/);
    const seen: string[] = [];
    for await (const e of job) seen.push(e.status);
    expect(seen[0]).toBe("QUEUED");
    expect(seen).toContain("LOG");
    expect(seen.at(-1)).toBe("COMPLETED");
    const r = await job.result();
    expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
    expect((await job.status()).state).toBe("COMPLETED");
    expect(logged[0]![0]).toBe("mean");
    expect(logged[0]![1]).toBeInstanceOf(Tensor);
  });

  it("an error names the failing node's user line remotely as it does locally (blocking or not)", async () => {
    const bad = tensor([1, 2, 3], { dtype: "float32", shape: [3, 1] });
    const fail = (m: LanguageModel, opts?: object) => m.trace("Once upon a time", () => ({ x: m.model.layers[2]!.output.matmul(bad) }), opts as never);
    const message = async (p: Promise<unknown>) => {
      try {
        await p;
      } catch (e) {
        return e as NNsightError;
      }
      throw new Error("expected an error");
    };
    const l = await message(fail(local));
    const r = await message(fail(remote));
    const line = /recorded at (\S+?):(\d+):\d+\]$/.exec(l.message);
    expect(line, l.message).not.toBeNull();
    expect(r.code).toBe(l.code);
    expect(r.message).toBe(l.message);
    expect(r.details.source).toBe(l.details.source);
    const job = (await fail(remote, { blocking: false })) as unknown as RemoteJob<unknown>;
    const j = await message(job.result());
    const events: Array<{ status: string; error?: NNsightError }> = [];
    for await (const e of job) events.push(e);
    expect(j.message).toBe(l.message);
    expect(events.at(-1)!.error!.message).toBe(l.message);
  });

  it("serves /health, /models and /metrics", async () => {
    const health = (await (await fetch(`${server.url}/health`)).json()) as { status: string };
    expect(health.status).toBe("ok");
    const models = (await (await fetch(`${server.url}/models`)).json()) as { models: Array<{ id: string; status: string; queue: number }> };
    expect(models.models[0]).toMatchObject({ id: "stories260K", status: "ready", queue: 0 });
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/nnsight_jobs\{model="stories260K",state="COMPLETED"\} \d+/);
    expect(metrics).toMatch(/nnsight_queue_wait_seconds_bucket/);
    expect(metrics).toMatch(/nnsight_run_seconds_count\{model="stories260K"\} \d+/);
    expect(metrics).toMatch(/nnsight_bytes_in_total \d+/);
    expect((await fetch(`${server.url}/nope`)).status).toBe(404);
  });
});

describe("remote tokenizer", () => {
  it("a remote model has the served model's tokenizer (encode, decode, chat-free)", async () => {
    expect(remote.tokenizer).toBeDefined();
    expect(remote.tokenizer.encode("Once upon a time")).toEqual(local.tokenizer.encode("Once upon a time"));
    const r = await remote.generate("Once upon a time", { maxNewTokens: 8 });
    const l = await local.generate("Once upon a time", { maxNewTokens: 8 });
    expect(remote.tokenizer.decode(r.tokens.toArray()[0], { skipSpecialTokens: true })).toBe(local.tokenizer.decode(l.tokens.toArray()[0], { skipSpecialTokens: true }));
  });
});

describe("remote streaming", () => {
  it("generate({ stream, onStep }) streams tokens and step values from the server as they come", async () => {
    const toks: number[] = [], steps: number[] = [];
    const r = await remote.generate("Once upon a time", { maxNewTokens: 5, stream: (t) => toks.push(t[0]!), onStep: (s, v) => { steps.push(s); expect(v.top).toBeInstanceOf(Tensor); } },
      (tr) => ({ ...tr.all(() => ({ top: remote.lm_head.output.at([0, -1]).argmax() })), tokens: remote.generator.output }));
    const l = await local.generate("Once upon a time", { maxNewTokens: 5 }, () => ({ tokens: local.generator.output }));
    expect(steps).toEqual([0, 1, 2, 3, 4]);
    expect(toks).toEqual(l.tokens.toArray()[0].slice(-5));
    expect(r.tokens.toArray()).toEqual(l.tokens.toArray());
  });
});
