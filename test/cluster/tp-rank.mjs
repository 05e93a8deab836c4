// One rank of the tensor-parallel tests (started by launchRanks from tensor-parallel.test.ts; imports the
// built package, dist/). argv[2] is JSON: [{ dir, type }] models to run. For each model this rank loads its
// shard and runs the same jobs as every other rank: a batched forward, greedy generation, and traces that
// read and edit values at sharded boundaries. Every rank sends its results to the launcher; rank 0 also
// loads the plain (unsharded) model and sends the same jobs' results as the reference.
import { LanguageModel, joinGroup, setNumThreads } from "../../dist/index.js";

const models = JSON.parse(process.argv[2]);
setNumThreads(1); // two or three ranks share two cores

const prompts = ["Once upon a time", "Lily and Ben went"];

const f32 = async (t) => Array.from(await t.data());

/** Reads and edits at sharded boundaries (gathered on read, sliced again after edits). */
function traceJobs(model, type) {
  if (type === "llama") {
    const L = model.model.layers;
    return {
      reads: () => ({
        q: L[0].self_attn.q_proj.output, // column-parallel output
        k: L[1].self_attn.k_proj.output, // kv heads (GQA)
        oin: L[1].self_attn.o_proj.input, // row-parallel input
        act: L[0].mlp.source.act_fn_0.output,
        rope: L[1].self_attn.source.apply_rotary_pos_emb_0.output.at(1), // the k of [q, k], [B, Hkv, T, hd]
        attn: L[0].self_attn.source.attention_interface_0.output, // [B, T, H, hd]
        down: L.at(-1).mlp.down_proj.output, // replicated (after the all-reduce)
        layer: L[1].output,
        // inside attention_interface_0, per head: the SDPA call, or (eager) the scores and probabilities
        ...(model.spec.attnImplementation === "eager"
          ? {
              scores: L[0].self_attn.source.attention_interface_0.source.torch_matmul_0.output,
              probs: L[1].self_attn.source.attention_interface_0.source.nn_functional_softmax_0.output,
            }
          : { sdpa: L[1].self_attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output }),
      }),
      edits: () => {
        L[0].mlp.up_proj.output.set([":", -1], 0); // in place on a gathered value
        L[1].self_attn.source.attention_interface_0.output.set([":", ":", 0], 0.5); // head 0 lives on rank 0 only
        if (model.spec.attnImplementation === "eager") {
          L[0].self_attn.source.attention_interface_0.source.nn_functional_softmax_0.output.set([":", -1], 0); // the last head's weights
        }
        L[1].self_attn.v_proj.output = L[1].self_attn.v_proj.output.mul(2); // a replacement
        return { logits: model.lm_head.output, g: L[0].mlp.gate_proj.output };
      },
    };
  }
  const H = model.transformer.h;
  return {
    reads: () => ({
      qkv: H[0].attn.c_attn.output, // fused q|k|v, split per head inside each
      fc: H[1].mlp.c_fc.output,
      pin: H[0].attn.c_proj.input,
      act: H[0].mlp.source.act_0.output,
      attn: H[1].attn.source.attention_interface_0.output,
      layer: H[0].output,
    }),
    edits: () => {
      H[0].attn.c_attn.output.set([":", -1], 0.25);
      H[1].mlp.c_fc.output = H[1].mlp.c_fc.output.mul(0.5);
      return { logits: model.lm_head.output };
    },
  };
}

/** Collectives each kind of pass issues (tensor parallel only): gathers happen only where a hook reads. */
async function countCollectives(model, comm, type) {
  const count = async (fn) => {
    const before = comm.calls;
    await fn();
    return comm.calls - before;
  };
  const layer = (i) => (type === "llama" ? model.model.layers[i] : model.transformer.h[i]);
  const attn = (i) => (type === "llama" ? layer(i).self_attn : layer(i).attn);
  const col = (i) => (type === "llama" ? attn(i).q_proj : attn(i).c_attn);
  const row = (i) => (type === "llama" ? attn(i).o_proj : attn(i).c_proj);
  return {
    layers: model.spec.numLayers,
    plain: await count(async () => (await model.forward(prompts[0])).dispose()),
    replicatedRead: await count(() => model.trace(prompts[0], () => ({ h: layer(1).output, a: attn(0).output, l: model.lm_head.output }))),
    columnOutput: await count(() => model.trace(prompts[0], () => ({ q: col(0).output }))),
    rowOutput: await count(() => model.trace(prompts[0], () => ({ o: row(0).output }))),
    rowInput: await count(() => model.trace(prompts[0], () => ({ o: row(0).input }))),
    rowBoth: await count(() => model.trace(prompts[0], () => ({ i: row(0).input, o: row(0).output }))),
  };
}

async function runJobs(model, type) {
  const out = {};
  const logits = await model.forward(prompts);
  out.forward = { shape: logits.shape, values: await f32(logits) };
  logits.dispose();
  const gen = await model.generateText(prompts, { maxNewTokens: 8 }); // a batch: padding and per-row stops
  out.generate = gen.sequences;
  const jobs = traceJobs(model, type);
  for (const name of ["reads", "edits"]) {
    const r = await model.trace(prompts, jobs[name]);
    out[name] = {};
    for (const [k, v] of Object.entries(r)) out[name][k] = { shape: v.shape, values: await f32(v) };
  }
  // generation with an intervention at every step, at a sharded boundary
  const g = await model.generate(prompts[1], { maxNewTokens: 5 }, (tr) => {
    tr.all(() => {
      const mlp = type === "llama" ? model.model.layers[0].mlp.gate_proj : model.transformer.h[0].mlp.c_fc;
      mlp.output.set([":", -1], mlp.output.at([":", -1]).mul(3));
    });
    return { tokens: model.generator.output };
  });
  out.generateEdited = g.tokens.toArray();
  return out;
}

let comm;
try {
  comm = await joinGroup();
  for (const { dir, type, attn } of models) {
    const model = await LanguageModel.load(dir, { tensorParallel: comm, attnImplementation: attn });
    const tp = await runJobs(model, type);
    tp.collectives = await countCollectives(model, comm, type);
    let reference = null;
    if (comm.rank === 0) {
      const plain = await LanguageModel.load(dir, { attnImplementation: attn });
      reference = await runJobs(plain, type);
      await plain.dispose();
    }
    process.send({ dir, attn, rank: comm.rank, tp, reference });
    await model.dispose();
  }
  await comm.barrier();
  comm.close();
} catch (e) {
  process.send({ error: { code: e.code, message: e.message, stack: e.stack } });
  comm?.abort(String(e.message));
  process.exitCode = 1;
}
