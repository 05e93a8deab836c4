// Attention patterns: load the model with eager attention (HF's attn_implementation="eager"), so the
// softmax inside attention is a hook point (`self_attn.source.attention_interface_0.source
// .nn_functional_softmax_0`, probabilities [batch, heads, query, key]), read it for every layer in one
// trace, find the heads that look at the previous token, draw one head's pattern as an SVG heat map, and
// knock that head's previous-token attention out (an edit of the probabilities) to see what it was worth.
//
//   node examples/attention-pattern.mjs [model] [--prompt "..."] [--out FILE]
import { writeFile, mkdir } from "node:fs/promises";
import * as path from "node:path";
import { parseArgs } from "node:util";

import { OUT_DIR, fitPrompt, heatmapSvg, loadModel, parts, table, tokenLabel } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: "string", default: "Lily and Ben went to the park. Lily gave the ball to Ben" },
    out: { type: "string", default: path.join(OUT_DIR, "attention.svg") },
  },
});

const { id, model } = await loadModel(positionals, { attnImplementation: "eager" });
try {
  const P = parts(model);
  const { numLayers, numHeads } = P;
  const tok = model.tokenizer;
  const prompt = fitPrompt(model, values.prompt);
  const labels = prompt.map((t) => tokenLabel(tok, t));
  const T = prompt.length;
  const softmaxOf = (l) => P.attnHeads(l).source.nn_functional_softmax_0;
  console.log(`model: ${id} (${P.modelType}, ${numLayers} layers x ${numHeads} heads), eager attention`);
  console.log(`prompt: ${JSON.stringify(tok.decode(prompt, { skipSpecialTokens: true }))} (${T} tokens)\n`);

  // one trace: every layer's attention probabilities, [1, heads, T, T] each
  const r = await model.trace(prompt, () => Object.fromEntries(Array.from({ length: numLayers }, (_, l) => [`p${l}`, softmaxOf(l).output])));
  const pattern = async (l) => {
    const flat = await r[`p${l}`].data();
    return (h, i, j) => flat[(h * T + i) * T + j];
  };
  // how much each head attends to the previous token and to the first token, averaged over queries 1..T-1
  const prevScore = [], firstScore = [];
  for (let l = 0; l < numLayers; l++) {
    const at = await pattern(l);
    prevScore.push(Array.from({ length: numHeads }, (_, h) => avg(T, (i) => at(h, i, i - 1))));
    firstScore.push(Array.from({ length: numHeads }, (_, h) => avg(T, (i) => at(h, i, 0))));
  }
  const hs = Array.from({ length: numHeads }, (_, h) => `h${h}`);
  console.log("attention to the previous token (mean over positions; 1 = always):");
  console.log(table(["", ...hs], prevScore.map((row, l) => [`layer ${l}`, ...row.map((v) => v.toFixed(2))]), { width: 6 }));
  console.log("\nattention to the first token:");
  console.log(table(["", ...hs], firstScore.map((row, l) => [`layer ${l}`, ...row.map((v) => v.toFixed(2))]), { width: 6 }));

  let best = [0, 0];
  prevScore.forEach((row, l) => row.forEach((v, h) => { if (v > prevScore[best[0]][best[1]]) best = [l, h]; }));
  const [bl, bh] = best;
  console.log(`\nmost previous-token-like head: layer ${bl} head ${bh} (${prevScore[bl][bh].toFixed(2)})`);

  const at = await pattern(bl);
  const grid = Array.from({ length: T }, (_, i) => Array.from({ length: T }, (_, j) => at(bh, i, j)));
  await mkdir(path.dirname(values.out), { recursive: true });
  await writeFile(values.out, heatmapSvg(grid, {
    rowLabels: labels,
    colLabels: labels,
    title: `Attention: ${id}, layer ${bl} head ${bh}`,
    subtitle: "rows: query positions; columns: the keys they attend to (probabilities)",
    scale: 1,
    legend: "probability",
  }));
  console.log(`heat map written to ${values.out}`);

  // knock the head's previous-token attention out: move that weight to the first token, then compare
  // the next-token distribution with the clean run (one trace, two invokes)
  const next = () => model.lm_head.output.at([0, -1]).softmax(-1);
  const k = await model.trace((tr) => {
    tr.invoke(prompt, () => ({ clean: next() }));
    tr.invoke(prompt, () => {
      const p = softmaxOf(bl).output;
      for (let i = 1; i < T; i++) {
        const w = p.at([":", bh, i, i - 1]);
        p.set([":", bh, i, 0], p.at([":", bh, i, 0]).add(w));
        p.set([":", bh, i, i - 1], 0);
      }
      return { knocked: next() };
    });
  });
  const clean = await k.clean.data(), knocked = await k.knocked.data();
  let kl = 0;
  for (let i = 0; i < clean.length; i++) if (clean[i] > 0) kl += clean[i] * (Math.log(clean[i]) - Math.log(Math.max(knocked[i], 1e-30)));
  const top = clean.indexOf(Math.max(...clean));
  console.log(`knocking out its previous-token attention: KL(clean || knocked) ${kl.toFixed(4)}, P(${tokenLabel(tok, top)}) ${clean[top].toFixed(3)} -> ${knocked[top].toFixed(3)}`);
} finally {
  await model.dispose();
}

function avg(T, f) {
  let s = 0;
  for (let i = 1; i < T; i++) s += f(i);
  return T > 1 ? s / (T - 1) : 0;
}
