// NNsight's behaviours (../shared/SCENARIOS.md), ported to the bundled model. Expected strings of the
// upstream GPT-2 tests become relations: batched equals unbatched, an edit changes what follows, errors
// name the module, invoke and source line.
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { Envoy, EnvoyList, LanguageModel, NNsightError, Tensor, memory, sync, tensor, zeros } from "../../ts/src/index.js";
import { codeOf } from "../helpers/errors.js";

let model: LanguageModel;
beforeAll(async () => {
  model = await LanguageModel.load("stories260K");
});
afterAll(async () => {
  await model.dispose();
});

const P1 = "Once upon a time";
const P2 = "Lily and Ben";
const arr = (t: Tensor) => Array.from(t.toFloat32Array());
/**
 * max |a - b| relative to b's scale (max(1, max |b|)): batched and single runs may run the GEMMs at
 * another M, which can take a kernel path that sums dot products in another order (f32 rounding).
 */
const maxRel = (a: Tensor, b: Tensor) => {
  const x = a.toFloat32Array(), y = b.toFloat32Array();
  expect(x.length).toBe(y.length);
  let m = 0, scale = 1;
  for (let i = 0; i < x.length; i++) {
    m = Math.max(m, Math.abs(x[i]! - y[i]!));
    scale = Math.max(scale, Math.abs(y[i]!));
  }
  return m / scale;
};
const maxAbs = (a: Tensor, b: Tensor) => {
  const x = a.toFloat32Array(), y = b.toFloat32Array();
  expect(x.length).toBe(y.length);
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]! - y[i]!));
  return m;
};

describe("reading values (T01, T09, T27)", () => {
  it("T01: a saved layer output is a real tensor after the trace", async () => {
    let h: any;
    await model.trace(P1, () => {
      h = model.model.layers[2].output.save();
    });
    expect(h.value).toBeInstanceOf(Tensor);
    expect(h.value.shape).toEqual([1, 5, 64]);
  });

  it("returned values come back as tensors and equal the plain forward", async () => {
    const r = await model.trace(P1, () => ({ logits: model.lm_head.output, out: model.output }));
    const plain = await model.forward(P1);
    expect(maxAbs(r.logits, plain)).toBe(0);
    expect(maxAbs(r.out.logits, plain)).toBe(0);
  });

  it("module inputs: .input is the first positional input, .inputs all of them", async () => {
    const r = await model.trace(P1, () => ({
      in1: model.model.layers[1].input,
      out0: model.model.layers[0].output,
      ins: model.model.layers[1].inputs,
    }));
    expect(maxAbs(r.in1, r.out0)).toBe(0);
    expect(Array.isArray(r.ins)).toBe(true);
    expect(maxAbs(r.ins[0], r.out0)).toBe(0);
  });

  it("T27: token id inputs (array, Tensor, input_ids object) trace like text", async () => {
    const ids = model.tokenizer.encode(P1);
    const a = await model.trace(P1, () => ({ l: model.lm_head.output }));
    const b = await model.trace(ids, () => ({ l: model.lm_head.output }));
    const c = await model.trace(tensor([ids], { dtype: "int64" }), () => ({ l: model.lm_head.output }));
    const d = await model.trace({ input_ids: [ids] }, () => ({ l: model.lm_head.output }));
    for (const x of [b, c, d]) expect(maxAbs(x.l, a.l)).toBe(0);
  });

  it("reading modules in any order inside one invoke works when nothing flows backwards", async () => {
    const r = await model.trace(P1, () => ({ late: model.model.layers[3].output, early: model.model.layers[1].output }));
    const s = await model.trace(P1, () => ({ early: model.model.layers[1].output, late: model.model.layers[3].output }));
    expect(maxAbs(r.late, s.late)).toBe(0);
    expect(maxAbs(r.early, s.early)).toBe(0);
  });
});

describe("editing (T10, T11, T21-T24, T33-T35)", () => {
  it("an edit at layer k leaves modules before k bit-identical and changes those after", async () => {
    const paths = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2.mlp", "model.layers.2", "model.layers.3", "model.norm", "lm_head"];
    const base = await model.trace(P1, (tr) => ({ c: tr.cache() }));
    const edited = await model.trace(P1, (tr) => {
      model.model.layers[2].mlp.output.set([":", -1], 0);
      return { c: tr.cache() };
    });
    for (const p of paths) {
      const d = maxAbs((edited.c as any)[p].output, (base.c as any)[p].output);
      if (["model.embed_tokens", "model.layers.0", "model.layers.1"].includes(p)) expect(d, p).toBe(0);
      else expect(d, p).toBeGreaterThan(0);
    }
  });

  it("T10: clone before an in-place zero keeps the old values; a re-read sees zeros", async () => {
    const r = await model.trace(P1, () => {
      const out = model.model.layers[1].output;
      const pre = out.clone();
      out.set([":"], 0);
      return { pre, post: model.model.layers[1].output };
    });
    expect(arr(r.pre).some((v) => v !== 0)).toBe(true);
    expect(arr(r.post).every((v) => v === 0)).toBe(true);
  });

  it("T11 and swap = in-place: replacing an output and editing it in place give the same result", async () => {
    const swap = await model.trace(P1, () => {
      model.model.embed_tokens.output = model.model.embed_tokens.output.mul(0);
      return { l: model.lm_head.output, h: model.model.layers[0].input };
    });
    const inplace = await model.trace(P1, () => {
      model.model.embed_tokens.output.set([":"], 0);
      return { l: model.lm_head.output, h: model.model.layers[0].input };
    });
    expect(arr(swap.h).every((v) => v === 0)).toBe(true);
    expect(maxAbs(swap.l, inplace.l)).toBe(0);
  });

  it("T24: setting a layer's input to a value saved from another trace", async () => {
    const src = await model.trace(P2, () => ({ x: model.model.layers[3].input }));
    const r = await model.trace(P2, () => {
      model.model.layers[3].input = src.x;
      return { l: model.lm_head.output };
    });
    const plain = await model.forward(P2);
    expect(maxAbs(r.l, plain)).toBe(0);
  });

  it("T20: external tensors (a user Linear) applied inside a trace", async () => {
    const W = zeros([64, 64]).add(tensor([1]).mul(0.5));
    const r = await model.trace(P1, () => {
      const m = model.model.layers[0].mlp.output;
      return { y: m.matmul(W).add(1), m };
    });
    const want = r.m.matmul(W).add(1);
    expect(maxAbs(r.y, want)).toBeLessThan(1e-6);
  });

  it("T33: skip makes the module's output the given value; chained skips", async () => {
    const r = await model.trace(P1, () => {
      const h0 = model.model.layers[0].output;
      model.model.layers[1].skip(h0);
      model.model.layers[2].skip(model.model.layers[1].output);
      return { h0, h1: model.model.layers[1].output, h2: model.model.layers[2].output };
    });
    expect(maxAbs(r.h1, r.h0)).toBe(0);
    expect(maxAbs(r.h2, r.h0)).toBe(0);
  });

  it("T34: reading a child of a skipped module is MISSED_PROVIDER naming it", async () => {
    const p = model.trace(P1, () => {
      model.model.layers[1].skip(model.model.layers[0].output);
      return { a: model.model.layers[1].mlp.output };
    });
    await expect(p).rejects.toMatchObject({ code: "MISSED_PROVIDER", message: expect.stringContaining("model.layers.1.mlp") });
  });

  it("T32: skipping layer 1 with a value from layer 2 is OUT_OF_ORDER", async () => {
    const p = model.trace(P1, () => {
      model.model.layers[1].skip(model.model.layers[2].output);
    });
    expect(await codeOf(p)).toBe("OUT_OF_ORDER");
  });

  it("T31: a value needed earlier than it is produced is OUT_OF_ORDER and names module and line", async () => {
    try {
      await model.trace(P1, () => {
        model.model.layers[1].output.set([":", -1], model.model.layers[3].output.at([":", -1]));
      });
      expect.unreachable();
    } catch (e) {
      expect((e as NNsightError).code).toBe("OUT_OF_ORDER");
      expect((e as NNsightError).message).toMatch(/model\.layers\.1/);
      expect((e as NNsightError).message).toMatch(/scenarios\.test\.ts:\d+/);
    }
    // the model is clean afterwards
    const r = await model.trace(P1, () => ({ l: model.lm_head.output }));
    expect(maxAbs(r.l, await model.forward(P1))).toBe(0);
  });
});

describe("batching (T12, T25, T26, T35)", () => {
  it("T26: batched invokes equal each prompt alone (1e-5), rows merged by name", async () => {
    const r = await model.trace((tr) => {
      tr.invoke(P1, () => ({ a: model.lm_head.output.at([":", -1]) }));
      tr.invoke(P2, () => ({ b: model.lm_head.output.at([":", -1]) }));
    });
    const a = await model.trace(P1, () => ({ x: model.lm_head.output.at([":", -1]) }));
    const b = await model.trace(P2, () => ({ x: model.lm_head.output.at([":", -1]) }));
    expect(r.a.shape).toEqual([1, 512]);
    expect(maxRel(r.a, a.x)).toBeLessThan(1e-5);
    expect(maxRel(r.b, b.x)).toBeLessThan(1e-5);
  });

  it("T12: invoke 1 zeroing a layer does not touch invoke 2's rows", async () => {
    const r = await model.trace((tr) => {
      tr.invoke(P1, () => {
        model.model.layers.at(-1).output = zeros([1, 5, 64]);
        return { z: model.model.layers.at(-1).output };
      });
      tr.invoke(P1, () => ({ n: model.model.layers.at(-1).output, l: model.lm_head.output }));
    });
    expect(arr(r.z).every((v) => v === 0)).toBe(true);
    expect(arr(r.n).some((v) => v !== 0)).toBe(true);
    expect(maxRel(r.l, await model.forward(P1))).toBeLessThan(1e-5);
  });

  it("T25: invokes of 1, 2, empty, empty, 1 prompts see 1, 2, 4, 4, 1 rows", async () => {
    const r = await model.trace((tr) => {
      tr.invoke(P1, () => ({ o1: model.model.layers[0].output }));
      tr.invoke([P2, "The dog"], () => ({ o2: model.model.layers[0].output }));
      tr.invoke(() => ({ o3: model.model.layers[0].output }));
      tr.invoke(() => ({ o4: model.model.layers[0].output }));
      tr.invoke("Once upon", () => ({ o5: model.model.layers[0].output }));
    });
    expect([r.o1.shape[0], r.o2.shape[0], r.o3.shape[0], r.o4.shape[0], r.o5.shape[0]]).toEqual([1, 2, 4, 4, 1]);
    const joined = arr(r.o3);
    expect(joined.slice(0, r.o1.numel)).toEqual(arr(r.o1));
  });

  it("T35: per-invoke skip values land in their own rows", async () => {
    const r = await model.trace((tr) => {
      tr.invoke(P1, () => {
        model.model.layers[2].skip(model.model.layers[1].output);
      });
      tr.invoke(P1, () => ({ h2: model.model.layers[2].output, h1: model.model.layers[1].output }));
      tr.invoke(() => ({ all: model.model.layers[2].output }));
    });
    expect(maxAbs(r.h2, r.h1)).toBeGreaterThan(0);
    const h1 = (await model.trace(P1, () => ({ h: model.model.layers[1].output }))).h;
    expect(maxRel(r.all.at([[0]]), h1)).toBeLessThan(1e-5);
  });

  it("activation patching across invokes: values flow between invokes at the same layer", async () => {
    const r = await model.trace((tr) => {
      let src: any;
      tr.invoke(P2, () => {
        src = model.model.layers[1].output.at([":", -1]);
      });
      tr.invoke(P1, () => {
        model.model.layers[1].output.set([":", -1], src);
        return { patched: model.lm_head.output.at([":", -1]), h: model.model.layers[1].output.at([":", -1]), src };
      });
    });
    expect(maxAbs(r.h, r.src)).toBe(0);
  });

  it("a name returned by two invokes is an error", async () => {
    const p = model.trace((tr) => {
      tr.invoke(P1, () => ({ x: model.lm_head.output }));
      tr.invoke(P2, () => ({ x: model.lm_head.output }));
    });
    expect(await codeOf(p)).toBe("BAD_INPUT");
  });
});

describe("control (T07, T13, T49-T53, T54-T57, logs)", () => {
  it("T07: after tr.stop(), values saved before exist and later ones do not", async () => {
    let a: any, b: any;
    await model.trace(P1, (tr) => {
      a = model.model.layers[1].output.save();
      tr.stop();
      b = model.model.layers[3].output.save();
    });
    expect(a.value.shape).toEqual([1, 5, 64]);
    expect(() => b.value).toThrow(NNsightError);
  });

  it("T13: logit lens through envoy.call() matches the model's own last layer", async () => {
    const r = await model.trace(P1, () => {
      const last = model.lm_head.call(model.model.norm.call(model.model.layers[-1].output));
      return { lens: last, logits: model.lm_head.output };
    });
    expect(maxAbs(r.lens, r.logits)).toBeLessThan(1e-5);
  });

  it("T49-T51: tr.cache() records outputs (not inputs unless asked), filtered by path or envoy", async () => {
    const r = await model.trace(P1, (tr) => ({
      all: tr.cache(),
      some: tr.cache({ modules: ["model.layers.0", model.model.layers[1]], inputs: true }),
    }));
    expect(Object.keys(r.all)).toContain("model.layers.4.mlp.down_proj");
    expect(r.all["model.layers.0"].inputs).toBeUndefined();
    expect(Object.keys(r.some).sort()).toEqual(["model.layers.0", "model.layers.1"]);
    expect(maxAbs(r.some["model.layers.0"].output, r.some["model.layers.1"].inputs[0])).toBe(0);
  });

  it("T50: the cache records post-intervention values", async () => {
    const r = await model.trace(P1, (tr) => {
      model.model.layers[1].output.set([":"], 0);
      return { c: tr.cache({ modules: ["model.layers.1"] }) };
    });
    expect(arr(r.c["model.layers.1"].output).every((v: number) => v === 0)).toBe(true);
  });

  it("T53: rename gives architecture-agnostic names that resolve to the same values", async () => {
    const renamed = await LanguageModel.load("stories260K", { rename: { "model.layers": "layers", mlp: "ffn" } });
    const r = await renamed.trace(P1, () => ({ a: (renamed as any).layers[1].ffn.output, b: renamed.get("model.layers.1.mlp").output }));
    expect(maxAbs(r.a, r.b)).toBe(0);
    await renamed.dispose();
  });

  it("T54: an invoke inside an invoke is BAD_INPUT", async () => {
    const p = model.trace((tr) => {
      tr.invoke(P1, () => {
        tr.invoke(P2, () => {});
      });
    });
    expect(await codeOf(p)).toBe("BAD_INPUT");
  });

  it("T55: a module read with no input says 'Cannot access' and 'interleaving'", async () => {
    await expect(model.trace(() => ({ x: model.lm_head.output }))).rejects.toThrow(/Cannot access.*interleaving/);
  });

  it("T57: an empty prompt is an actionable BAD_INPUT", async () => {
    await expect(model.trace("", () => {})).rejects.toMatchObject({ code: "BAD_INPUT", message: expect.stringContaining("empty") });
  });

  it("T56: an index error inside the graph keeps its type and names the user line", async () => {
    try {
      await model.trace(P1, () => ({ x: model.model.layers[1].output.at([0, 99]) }));
      expect.unreachable();
    } catch (e) {
      expect((e as NNsightError).code).toBe("INDEX");
      expect((e as NNsightError).message).toMatch(/scenarios\.test\.ts:\d+/);
      expect((e as NNsightError).details.path).toBe("model.layers.1");
    }
  });

  it("unknown module paths are BAD_PATH listing the valid children", () => {
    expect(() => model.get("model.layerz")).toThrow(/embed_tokens, layers, norm/);
    try {
      model.get("model.layers.9");
    } catch (e) {
      expect((e as NNsightError).code).toBe("BAD_PATH");
    }
  });

  it("tr.log prints values while the graph runs", async () => {
    const logged: unknown[][] = [];
    await model.trace(P1, (tr) => tr.log("shape", model.model.layers[0].output.shape), { log: (...v) => logged.push(v) });
    expect(logged).toEqual([["shape", [1, 5, 64]]]);
  });

  it("T04: tr.cond runs an intervention only when a graph value is true", async () => {
    const run = (threshold: number) =>
      model.trace(P1, (tr) => {
        const h = model.model.layers[1].output;
        tr.cond(h.abs().max().gt(threshold), () => {
          h.set([":"], 0);
        });
        return { h: model.model.layers[1].output };
      });
    expect(arr((await run(1e9)).h).some((v) => v !== 0)).toBe(true);
    expect(arr((await run(0)).h).every((v) => v === 0)).toBe(true);
  });

  it("T02: creation ops using activation shapes", async () => {
    const r = await model.trace(P1, () => {
      const h = model.model.layers[0].output;
      return { z: h.mul(0).add(1), s: h.shape };
    });
    expect(r.s).toEqual([1, 5, 64]);
    expect(arr(r.z).every((v) => v === 1)).toBe(true);
  });
});

describe("sessions, edits, scan (T05, T15, T21, T22, T29)", () => {
  it("T15/T05: a session passes values between traces; a value mutated in trace 2 shows it", async () => {
    const r = await model.session((s) => {
      const a = s.trace(P2, () => ({ emb: model.model.embed_tokens.output, h: model.model.layers[0].output.clone() }));
      const b = s.trace(P2, () => {
        model.model.embed_tokens.output = a.emb;
        a.h.set([":"], 7);
        return { l: model.lm_head.output };
      });
      return { l: b.l, h: a.h };
    });
    expect(maxAbs(r.l, await model.forward(P2))).toBe(0);
    expect(arr(r.h).every((v: number) => v === 7)).toBe(true);
  });

  it("T21/T22: edit() returns a model with the intervention; the base is unaffected; clearEdits()", async () => {
    const edited = model.edit(() => {
      model.model.layers[1].output.set([":", 0], 0);
    });
    void edited;
    const handle = model.edit(
      () => {
        model.model.layers[1].output.set([":", 1], 0);
      },
      { inplace: true },
    );
    const r = await model.trace(P1, () => ({ h: model.model.layers[1].output }));
    const row = r.h.toArray()[0];
    expect(row[1].every((v: number) => v === 0)).toBe(true);
    expect(row[0].some((v: number) => v !== 0)).toBe(true);
    handle.remove();
    const r2 = await model.trace(P1, () => ({ h: model.model.layers[1].output }));
    expect(r2.h.toArray()[0][1].some((v: number) => v !== 0)).toBe(true);
    model.edit(() => model.model.layers[1].output.set([":", 2], 0), { inplace: true });
    model.clearEdits();
    const r3 = await model.trace(P1, () => ({ h: model.model.layers[1].output }));
    expect(r3.h.toArray()[0][2].some((v: number) => v !== 0)).toBe(true);
  });

  it("T29: scan gives shapes without computing; a swapped value changes the read shape", async () => {
    const before = memory().hostBytes;
    const r = await model.scan(P1, () => ({ a: model.model.layers[0].self_attn.output, i: model.model.layers[0].self_attn.input }));
    expect(r.a).toEqual({ shape: [1, 5, 64], dtype: "float32" });
    expect(r.i).toEqual({ shape: [1, 5, 64], dtype: "float32" });
    expect(memory().hostBytes - before).toBeLessThan(1 << 16);
    const s = await model.scan(P1, () => {
      model.model.layers[0].self_attn.output = zeros([1, 1, 64]);
      return { a: model.model.layers[0].self_attn.output };
    });
    expect(s.a.shape).toEqual([1, 1, 64]);
  });

  it("T30: scan on a freshly loaded model reads no weight: nothing is packed until a real pass", async () => {
    const fresh = await LanguageModel.load("stories260K");
    try {
      await fresh.scan(P1, () => ({ h: fresh.model.layers[1].output }));
      expect(fresh._lm.rowsIndependent()).toBe(false); // no weight packed (packing reads the mapped weights)
      await fresh.forward(P1);
      expect(fresh._lm.rowsIndependent()).toBe(true);
    } finally {
      await fresh.dispose();
    }
  });
});

describe("generation (T08, T38-T45, T48)", () => {
  it("T08: generate without interventions equals plain generation", async () => {
    const r = await model.generate(P1, { maxNewTokens: 10 });
    const plain = await model.generateText(P1, { maxNewTokens: 10 });
    expect(r.tokens.toArray()[0]).toEqual(plain.sequences[0]);
  });

  it("T38: tr.all collects one value per step; T39: iter slices; T40: iter index", async () => {
    const r = await model.generate(P1, { maxNewTokens: 3 }, (tr) => {
      tr.all(() => ({ am: model.lm_head.output.at([0, -1]).argmax() }));
      tr.iter({ start: 1, stop: 3 }, (step) => ({ st: step }));
      return { tokens: model.generator.output };
    });
    expect(r.am.length).toBe(3);
    const toks = r.tokens.toArray()[0];
    expect(r.am.map((t: Tensor) => t.item())).toEqual(toks.slice(5, 8));
    expect(r.st).toEqual([1, 2]);
  });

  it("T09: inside generate, block input and output are 3-D at every step", async () => {
    const r = await model.generate(P1, { maxNewTokens: 3 }, (tr) => tr.all(() => ({ i: model.model.layers[0].input, o: model.model.layers[0].output })));
    expect(r.i.map((t: Tensor) => t.shape)).toEqual([[1, 5, 64], [1, 1, 64], [1, 1, 64]]);
    expect(r.o.every((t: Tensor) => t.ndim === 3)).toBe(true);
  });

  it("T42: an edit at one step changes that step only (and what later steps read)", async () => {
    const r = await model.generate(P1, { maxNewTokens: 3 }, (tr) => {
      tr.iter(1, () => model.model.layers[0].output.set([":"], 0));
      return tr.all(() => ({ o: model.model.layers[0].output }));
    });
    expect(arr(r.o[0]).some((v: number) => v !== 0)).toBe(true);
    expect(arr(r.o[1]).every((v: number) => v === 0)).toBe(true);
    expect(arr(r.o[2]).some((v: number) => v !== 0)).toBe(true);
  });

  it("T41: each invoke has its own step cursor (tr.next)", async () => {
    const r = await model.generate({ maxNewTokens: 3 }, (tr) => {
      tr.invoke(P1, () => {
        tr.next();
        return { a: model.lm_head.output };
      });
      tr.invoke(P2, () => ({ b: model.lm_head.output }));
    });
    expect(r.a.shape[1]).toBe(1); // step 1: one new position
    expect(r.b.shape[1]).toBeGreaterThan(1); // step 0: the prompt
  });

  it("T45: a step past the end is MISSED_PROVIDER; iter past the end just does not run", async () => {
    const p = model.generate(P1, { maxNewTokens: 2 }, (tr) => {
      tr.next(5);
      return { x: model.lm_head.output };
    });
    expect(await codeOf(p)).toBe("MISSED_PROVIDER");
    const r = await model.generate(P1, { maxNewTokens: 2 }, (tr) => tr.iter({ start: 5, stop: 7 }, () => ({ y: model.lm_head.output })));
    expect(r.y ?? []).toEqual([]);
  });

  it("steering: adding a vector at every step changes the generated text", async () => {
    const plain = await model.generateText(P1, { maxNewTokens: 8 });
    const steer = tensor(Array.from({ length: 64 }, (_, i) => (i % 2 ? 4 : -4)));
    const r = await model.generate(P1, { maxNewTokens: 8 }, (tr) => {
      tr.all(() => {
        const h = model.model.layers[2].output;
        h.set([":", -1], h.at([":", -1]).add(steer));
      });
      return { tokens: model.generator.output };
    });
    expect(r.tokens.toArray()[0]).not.toEqual(plain.sequences[0]);
  });
});

describe("remote-safety and lifetime (T60, serialization)", () => {
  it("serialize-round-tripped graphs give bit-identical results", async () => {
    const steer = tensor(Array.from({ length: 64 }, (_, i) => i / 64));
    const fn = () => {
      model.model.layers[2].output.set([":", -1], model.model.layers[2].output.at([":", -1]).add(steer));
      return { l: model.lm_head.output, h: model.model.layers[1].output.at([":", "1:3"]).softmax(-1) };
    };
    const a = await model.trace(P1, fn);
    const b = await model.trace(P1, fn, { roundTrip: true });
    expect(maxAbs(a.l, b.l)).toBe(0);
    expect(maxAbs(a.h, b.h)).toBe(0);
  });

  it("T60: nothing unsaved outlives its trace; errors leak nothing", async () => {
    const run = () => model.trace(P1, () => ({ h: model.model.layers[1].output.at([":", -1]).mul(2) }));
    const r0 = await run();
    r0.h.dispose();
    await sync();
    const base = memory();
    for (let i = 0; i < 20; i++) (await run()).h.dispose();
    await expect(model.trace(P1, () => ({ x: model.model.layers[1].output.at([0, 99]) }))).rejects.toThrow();
    await sync(); // kernels queued before the error still hold their inputs until they ran
    const after = memory();
    // garbage collection of earlier tests' tensors may only lower the counts
    expect(after.handles).toBeLessThanOrEqual(base.handles);
    expect(after.hostBytes).toBeLessThanOrEqual(base.hostBytes);
  });
});

describe("graph-aware functions (API: nnsight.cat/stack/zeros/...)", () => {
  it("cat, stack, zeros with activation shapes record graph nodes; eager outside", async () => {
    const { cat, stack, zeros: z, full } = await import("../../ts/src/index.js");
    const r = await model.trace(P1, () => {
      const h = model.model.layers[1].output;
      return { c: cat([h, h], 1), s: stack([h, h]), z: z(h.shape), f: full(h.shape, 2) };
    });
    expect(r.c.shape).toEqual([1, 10, 64]);
    expect(r.s.shape).toEqual([2, 1, 5, 64]);
    expect(arr(r.z).every((v) => v === 0)).toBe(true);
    expect(arr(r.f).every((v) => v === 2)).toBe(true);
    expect(z([2]).toArray()).toEqual([0, 0]);
  });
});

describe("streaming and empty-invoke iteration (T43, T48)", () => {
  it("T48: onStep streams each step's block values as they are computed; stream gives tokens", async () => {
    const seen: number[] = [];
    const tokens: number[] = [];
    const r = await model.generate(P1, {
      maxNewTokens: 4,
      onStep: (step, v) => {
        seen.push(step);
        expect(v.top).toBeInstanceOf(Tensor);
      },
      stream: (t) => tokens.push(t[0]!),
    }, (tr) => tr.all(() => ({ top: model.lm_head.output.at([0, -1]).argmax() })));
    expect(seen).toEqual([0, 1, 2, 3]);
    expect(r.top.map((t: Tensor) => t.item())).toEqual(tokens);
  });

  it("T43: iter inside an empty invoke edits every row for a later empty invoke's read", async () => {
    const r = await model.generate({ maxNewTokens: 2 }, (tr) => {
      tr.invoke(P1);
      tr.invoke(P2);
      tr.invoke(() => tr.iter(0, () => model.model.layers[0].output.set([":"], 0)));
      tr.invoke(() => ({ h: model.model.layers[0].output }));
    });
    expect(r.h.shape[0]).toBe(2);
    expect(arr(r.h).every((v) => v === 0)).toBe(true);
  });
});

describe("stop during generation", () => {
  it("tr.stop() at a step ends generation; values before it exist", async () => {
    const r = await model.generate(P1, { maxNewTokens: 5 }, (tr) => {
      const out = tr.iter(0, () => ({ first: model.lm_head.output }));
      tr.iter(1, () => tr.stop());
      return { ...out, tokens: model.generator.output };
    });
    expect(r.first.length).toBe(1);
    expect(r.tokens).toBeUndefined();
  });
});

describe("source lines", () => {
  it("sourceLines: false skips capturing them; errors keep their code and module", async () => {
    try {
      await model.trace(P1, () => ({ x: model.model.layers[1].output.at([0, 99]) }), { sourceLines: false });
      expect.unreachable();
    } catch (e) {
      expect((e as NNsightError).code).toBe("INDEX");
      expect((e as NNsightError).message).not.toMatch(/scenarios\.test\.ts/);
      expect((e as NNsightError).details.path).toBe("model.layers.1");
    }
  });

  const failing = (opts: { sourceLines?: boolean | "eager" }, onRecord = () => {}) =>
    model.trace(
      P1,
      () => {
        onRecord();
        const h = model.model.layers[0].output.save();
        return { h, x: model.model.layers[1].output.at([0, 99]) }; // the failing node, on this line
      },
      opts,
    );
  const lineOf = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (e) {
      expect((e as NNsightError).code).toBe("INDEX");
      const m = /scenarios\.test\.ts:(\d+):\d+/.exec((e as NNsightError).message);
      expect((e as NNsightError).details.source?.match(/scenarios\.test\.ts:(\d+)/)?.[1]).toBe(m?.[1]);
      return m?.[1] ?? null;
    }
    throw new Error("the trace should have failed");
  };

  it("lazy (the default) and eager capture name the same line; only an error records the callback again", async () => {
    let recordings = 0;
    const lazy = await lineOf(failing({}, () => recordings++));
    expect(recordings).toBe(2); // the trace, and once more to find the failing node's line
    const eager = await lineOf(failing({ sourceLines: "eager" }, () => recordings++));
    expect(recordings).toBe(3);
    expect(lazy).not.toBeNull();
    expect(lazy).toBe(eager);
    // no error, or an error caught inside the library (values after a stop): the callback runs once
    recordings = 0;
    await model.trace(P1, () => {
      recordings++;
      return { h: model.model.layers[0].output };
    });
    await model.trace(P1, (tr) => {
      recordings++;
      const a = model.model.layers[0].output.save();
      tr.stop();
      return { a, b: model.model.layers[2].output };
    });
    expect(recordings).toBe(2);
  });

  it("a callback that records something else the second time gives no line rather than a wrong one", async () => {
    let n = 0;
    const p = model.trace(P1, () => {
      if (n++ === 0) return { x: model.model.layers[1].output.at([0, 99]) };
      model.model.layers[0].output.save(); // the second recording has another op under that id
      return {};
    });
    expect(await lineOf(p)).toBeNull();
    let m = 0;
    const q = model.trace(P1, () => {
      if (m++ > 0) throw new Error("not twice");
      return { x: model.model.layers[1].output.at([0, 99]) };
    });
    expect(await lineOf(q)).toBeNull();
    // the model is clean afterwards
    const r = await model.trace(P1, () => ({ l: model.lm_head.output }));
    expect(maxAbs(r.l, await model.forward(P1))).toBe(0);
  });
});

describe("cache during generation (T51)", () => {
  it("a cache created in generate records one entry per step", async () => {
    const r = await model.generate(P1, { maxNewTokens: 3 }, (tr) => ({ c: tr.cache({ modules: ["model.layers.0"] }) }));
    const outs = r.c["model.layers.0"].output as Tensor[];
    expect(outs.map((t) => t.shape)).toEqual([[1, 5, 64], [1, 1, 64], [1, 1, 64]]);
  });
});

describe("fused residual adds (Llama)", () => {
  it("o_proj / down_proj with the residual fused equal the separate adds bit for bit", async () => {
    const l1 = (model as any).model.layers[1];
    const fused = await model.trace(P1, () => ({ o: l1.output, l: model.lm_head.output }));
    const split = await model.trace(P1, () => ({ o: l1.output, a: l1.self_attn.o_proj.output, m: l1.mlp.down_proj.output, l: model.lm_head.output }));
    expect(arr(fused.o as Tensor)).toEqual(arr(split.o as Tensor));
    expect(arr(fused.l as Tensor)).toEqual(arr(split.l as Tensor));
    const plain = await model.forward(P1);
    expect(arr(plain)).toEqual(arr(split.l as Tensor));
    plain.dispose();
  });
});

// The rest of the catalogue. Not ported: T16-T19 (gradients: not part of this issue). Ported as the
// behaviour that replaces a Python mechanism: T14's barrier (invokes share values directly), T58's
// transforms (values are views of the model's own tensors, so edits through reshaped views reach it),
// T61's two wrappers (two edited models over one set of weights).
describe("the rest of the catalogue (T03, T06, T14, T23, T28, T44, T52, T58, T59, T61)", () => {
  it("T03: a value saved in a branch that did not run has no value (a clear error); values outside it do", async () => {
    let inBranch: { value: unknown } | undefined, outside: { value: unknown } | undefined;
    await model.trace(P1, (tr) => {
      tr.cond(model.model.layers[0].output.abs().sum().gt(1e9), () => {
        inBranch = model.model.layers[1].output.save();
      });
      outside = model.model.layers[2].output.save();
    });
    expect(() => inBranch!.value).toThrow(/has no value/);
    expect((outside!.value as Tensor).shape).toEqual([1, 5, 64]);
  });

  it("T06: loops with continue and break around the traces of a session collect [0, 2]", async () => {
    const r = await model.session((s) => {
      const out: Record<string, unknown> = {};
      for (let i = 0; i < 10; i++) {
        if (i === 3) break;
        if (i % 2 === 1) continue;
        out[`t${i}`] = s.trace(P1, () => ({ h: model.model.layers[i]!.output.at([":", -1]) })).h;
      }
      return out;
    });
    expect(Object.keys(r)).toEqual(["t0", "t2"]);
    const direct = await model.trace(P1, () => ({ h0: model.model.layers[0].output.at([":", -1]), h2: model.model.layers[2].output.at([":", -1]) }));
    expect(maxAbs(r.t0 as Tensor, direct.h0)).toBe(0);
    expect(maxAbs(r.t2 as Tensor, direct.h2)).toBe(0);
  });

  it("T14 without a barrier: invoke 2 takes invoke 1's embeddings and then computes invoke 1's logits", async () => {
    const ids = model.tokenizer.encode(P1);
    const other = ids.map((t, i) => (i === 0 ? t : 40 + i)); // same length, other tokens
    const r = await model.trace((tr) => {
      let emb: unknown;
      tr.invoke([ids], () => {
        emb = model.model.embed_tokens.output;
        return { a: model.lm_head.output };
      });
      tr.invoke([other], () => {
        model.model.embed_tokens.output = emb as never;
        return { b: model.lm_head.output };
      });
    });
    expect(maxRel(r.b, r.a)).toBeLessThan(1e-5);
    const alone = await model.trace([other], () => ({ l: model.lm_head.output }));
    expect(maxAbs(alone.l, r.b)).toBeGreaterThan(1e-2); // the transfer changed invoke 2
  });

  it("T23: an edit that calls a module with its hooks: later traces see that call, at their batch size", async () => {
    const edited = model.edit(() => {
      model.lm_head.call(model.model.norm.call(model.model.layers[0].output), { hook: true }); // a logit lens of layer 0
    });
    const r = await edited.trace([P1, P2], () => ({ lens: edited.lm_head.nth(0).output, main: edited.lm_head.nth(1).output }));
    expect(r.lens.shape[0]).toBe(2);
    const direct = await model.trace([P1, P2], () => ({ lens: model.lm_head.call(model.model.norm.call(model.model.layers[0].output)), main: model.lm_head.output }));
    expect(maxAbs(r.lens, direct.lens)).toBe(0);
    expect(maxAbs(r.main, direct.main)).toBe(0);
  });

  it("T28: generate with no top-level input takes its prompts from invokes", async () => {
    const r = await model.generate({ maxNewTokens: 3 }, (tr) => {
      tr.invoke(P1, () => ({ a: model.generator.output }));
      tr.invoke(P2, () => ({ b: model.generator.output }));
    });
    const [a, b] = [await model.generateText(P1, { maxNewTokens: 3 }), await model.generateText(P2, { maxNewTokens: 3 })];
    const row = (t: Tensor) => (t.toArray() as number[][])[0]!.filter((x) => x !== model.tokenizer.padTokenId);
    expect(row(r.a)).toEqual(a.sequences[0]);
    expect(row(r.b)).toEqual(b.sequences[0]);
  });

  it("T44: code after tr.all runs; blocks do not move the step cursor, so a read after one is step 0's", async () => {
    let after = false;
    const r = await model.generate(P1, { maxNewTokens: 3 }, (tr) => {
      const per = tr.all(() => ({ h: model.model.layers[0].output }));
      after = true;
      return { per, later: model.model.layers[0].output };
    });
    expect(after).toBe(true);
    const steps = (r.per as { h: Tensor[] }).h;
    expect(steps.length).toBe(3);
    expect(maxAbs(r.later, steps[0]!)).toBe(0);
  });

  it("T58 without transforms: an edit through a per-head view reaches the model; an edit of a clone does not", async () => {
    const oProj = model.model.layers[1].self_attn.o_proj;
    const base = await model.trace(P1, () => ({ out: oProj.output, inp: oProj.input }));
    const viaView = await model.trace(P1, () => {
      oProj.input.reshape([1, 5, 8, 8]).set([":", ":", 3], 0); // head 3 of [batch, seq, heads, head_dim]
      return { out: oProj.output, inp: oProj.input };
    });
    const inp = viaView.inp.reshape([1, 5, 8, 8]).toArray()[0] as number[][][];
    for (const pos of inp) {
      expect(pos[3]!.every((v) => v === 0)).toBe(true);
      expect(pos[2]!.some((v) => v !== 0)).toBe(true);
    }
    expect(maxAbs(viaView.out, base.out)).toBeGreaterThan(0);
    const viaClone = await model.trace(P1, () => {
      oProj.input.clone().reshape([1, 5, 8, 8]).set([":", ":", 3], 0);
      return { out: oProj.output };
    });
    expect(maxAbs(viaClone.out, base.out)).toBe(0);
  });

  it("T61: wrappers over the same weights (edited models) run concurrently with independent edits and skips", async () => {
    const a = model.edit(() => model.model.layers[1].output.set([":"], 0));
    const b = model.edit(() => model.model.layers[2].skip(model.model.layers[1].output));
    const run = (w: LanguageModel) =>
      w.generate(P1, { maxNewTokens: 4 }, (tr) => ({ t: w.generator.output, ...tr.all(() => ({ h1: w.model.layers[1].output, h2: w.model.layers[2].output })) }));
    const together = await Promise.all([run(a), run(b), run(model)]); // three generations in flight at once
    const alone = [await run(a), await run(b), await run(model)];
    for (let i = 0; i < 3; i++) {
      expect(together[i].t.toArray()).toEqual(alone[i].t.toArray());
      for (const k of ["h1", "h2"] as const) for (let s = 0; s < 4; s++) expect(maxAbs(together[i][k][s], alone[i][k][s])).toBe(0);
    }
    const [ra, rb, rm] = alone;
    expect(arr(ra.h1[0]).every((v) => v === 0)).toBe(true); // a's edit
    expect(arr(rm.h1[0]).some((v) => v !== 0)).toBe(true); // not on the base
    expect(maxAbs(rb.h2[0], rb.h1[0])).toBe(0); // b's skip: layer 2 passes layer 1 on
    expect(maxAbs(rm.h2[0], rm.h1[0])).toBeGreaterThan(0);
  });

  it("T59: envoy classes by HF class name or path suffix (type beats suffix, longer suffix wins), helpers on them", async () => {
    class Attn extends Envoy {
      /** the heads before o_proj, [batch, seq, heads, head_dim] */
      get heads() {
        return (this as unknown as { source: Envoy & { attention_interface_0: Envoy } }).source.attention_interface_0.output;
      }
    }
    class Mlp extends Envoy {}
    class Down extends Envoy {}
    class Proj extends Envoy {}
    class Everything extends Envoy {}
    const m = await LanguageModel.load("stories260K", {
      rename: { mlp: "ffn" },
      envoys: { LlamaAttention: Attn, self_attn: Mlp, ffn: Mlp, "mlp.down_proj": Down, down_proj: Proj, Linear: Proj },
    });
    try {
      const L = m.model.layers;
      expect(L[0].self_attn).toBeInstanceOf(Attn); // the class name beats the "self_attn" suffix
      expect(L[1].mlp).toBeInstanceOf(Mlp); // by its alias "ffn"
      expect(L[1].mlp.down_proj).toBeInstanceOf(Proj); // "Linear" (a class name) beats both suffixes
      expect(L[1].mlp.up_proj).toBeInstanceOf(Proj);
      expect(L).toBeInstanceOf(EnvoyList); // list modules stay lists
      const r = await m.trace(P1, () => ({ heads: (L[1].self_attn as unknown as Attn).heads, oIn: L[1].self_attn.o_proj.input }));
      expect(maxAbs(r.heads.reshape([1, 5, 64]), r.oIn)).toBe(0);
      const byPath = await LanguageModel.load("stories260K", { envoys: { "mlp.down_proj": Down, down_proj: Proj } });
      expect(byPath.model.layers[0].mlp.down_proj).toBeInstanceOf(Down); // the longer suffix wins
      await byPath.dispose();
      const all = await LanguageModel.load("stories260K", { envoys: Everything });
      expect(all.model.layers[2].mlp.gate_proj).toBeInstanceOf(Everything);
      expect(all.model.layers).toBeInstanceOf(EnvoyList);
      expect(all.model.layers[0]).toBeInstanceOf(Everything);
      expect(all.edit(() => {}).model.layers[0]).toBeInstanceOf(Everything); // edited copies keep them
      await all.dispose();
      expect(await codeOf(LanguageModel.load("stories260K", { envoys: { layers: Mlp } }))).toBe("BAD_INPUT"); // a list needs an EnvoyList class
    } finally {
      await m.dispose();
    }
  });

  it("T52: cache entries are keyed by the module path, which alias envoys report too", async () => {
    const renamed = await LanguageModel.load("stories260K", { rename: { "model.layers": "layers" } });
    try {
      const r = await renamed.trace(P1, (tr) => ({ c: tr.cache({ modules: [(renamed as any).layers[1]] }), h: (renamed as any).layers[1].output }));
      const key = (renamed as any).layers[1].path;
      expect(key).toBe("model.layers.1");
      expect(Object.keys(r.c)).toEqual([key]);
      expect(maxAbs(r.c[key].output, r.h)).toBe(0);
      expect(r.c["layers.1"]).toBeUndefined(); // a plain object: unknown keys are undefined
    } finally {
      await renamed.dispose();
    }
  });
});

