// Ablating attention heads: zero one head of the attention operation inside the attention module
// (`self_attn.source.attention_interface_0.output[:, :, h]`, [batch, seq, heads, head_dim], before the
// output projection; GPT-2: `attn.source...`) and compare the next-token distribution with the clean run.
// Every head is its own invoke of one trace.
//
//   node examples/head-ablation.mjs [model] [--layer L] [--prompt "..."]
import { parseArgs } from "node:util";

import { fitPrompt, loadModel, parts, table, tokenLabel, topK } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { layer: { type: "string" }, prompt: { type: "string", default: "Lily and Ben went to the park. Lily gave the ball to" } },
});

/** KL(p || q) in nats, for probability arrays. */
function kl(p, q) {
  let s = 0;
  for (let i = 0; i < p.length; i++) if (p[i] > 0) s += p[i] * (Math.log(p[i]) - Math.log(Math.max(q[i], 1e-30)));
  return s;
}

const { id, model } = await loadModel(positionals);
try {
  const P = parts(model);
  const { numLayers, numHeads, headDim } = P;
  const focus = values.layer !== undefined ? Number(values.layer) : undefined; // default: the layer of the strongest head
  const prompt = fitPrompt(model, values.prompt);
  const tok = model.tokenizer;
  console.log(`model: ${id} (${P.modelType}, ${numLayers} layers x ${numHeads} heads of ${headDim} dims)`);
  console.log(`prompt: ${JSON.stringify(tok.decode(prompt, { skipSpecialTokens: true }))}\n`);

  // One trace: a clean invoke, then one invoke per (layer, head) with that head's output zeroed.
  const nextProbs = () => model.lm_head.output.at([0, -1]).softmax(-1);
  const r = await model.trace((tr) => {
    tr.invoke(prompt, () => ({ clean: nextProbs() }));
    for (let l = 0; l < numLayers; l++) {
      for (let h = 0; h < numHeads; h++) {
        tr.invoke(prompt, () => {
          P.attnHeads(l).output.set([":", ":", h], 0);
          return { [`a_${l}_${h}`]: nextProbs() };
        });
      }
    }
  });
  const clean = Array.from(await r.clean.data());
  const probs = {};
  for (let l = 0; l < numLayers; l++) for (let h = 0; h < numHeads; h++) probs[`${l}_${h}`] = Array.from(await r[`a_${l}_${h}`].data());

  const fmt = (p, ids) => ids.map((i) => `${tokenLabel(tok, i)} ${p[i].toFixed(2)}`).join("  ");
  const cleanTop = topK(clean, 5);
  console.log(`clean next-token top 5: ${fmt(clean, cleanTop)}\n`);

  const klGrid = Array.from({ length: numLayers }, (_, l) => Array.from({ length: numHeads }, (_, h) => kl(clean, probs[`${l}_${h}`])));
  let best = [0, 0];
  klGrid.forEach((row, l) => row.forEach((v, h) => { if (v > klGrid[best[0]][best[1]]) best = [l, h]; }));
  const layer = focus ?? best[0];

  const top = cleanTop[0];
  console.log(`layer ${layer}, one head zeroed at a time:`);
  const rows = [];
  for (let h = 0; h < numHeads; h++) {
    const p = probs[`${layer}_${h}`];
    const dp = p[top] - clean[top];
    rows.push([`head ${h}`, kl(clean, p).toFixed(4), `${dp >= 0 ? "+" : ""}${dp.toFixed(3)}`, fmt(p, topK(p, 5))]);
  }
  console.log(table(["", "KL(clean||abl)", `Δp(${tokenLabel(tok, top)})`, "top 5 after ablation"], rows, { width: [14, 11, 60] }));

  console.log(`\nKL(clean || ablated) for every head (rows: layers, columns: heads):`);
  console.log(table(["", ...Array.from({ length: numHeads }, (_, h) => `h${h}`)], klGrid.map((row, l) => [`layer ${l}`, ...row.map((v) => v.toFixed(3))]), { width: 6 }));
  console.log(`\nmost important head for this prediction: layer ${best[0]} head ${best[1]} (KL ${klGrid[best[0]][best[1]].toFixed(4)})`);
} finally {
  await model.dispose();
}
