// `npm run demo`: the bundled model writes a story, then we look inside it: a logit lens (what each
// layer would predict) and activation patching (which layer and position carries "girl" vs "boy").
//
//   node examples/demo.mjs [model]
import { performance } from "node:perf_hooks";

import { heatmapSvg, lensTable, loadModel, logitLens, parts, patchingSweep, sameLengthPair, strongest, timed, tokenPair, writeOut } from "./lib.mjs";

const started = performance.now();
const { id, model } = await loadModel();
try {
  const P = parts(model);
  const tok = model.tokenizer;
  console.log(`nnsight demo: ${id} (${P.modelType}, ${P.numLayers} layers, hidden ${P.hidden}, vocab ${model.spec.vocabSize})\n`);

  // 1. Generate a story; on a terminal the tokens appear as they are produced.
  const prompt = "Once upon a time, there was a little girl named Lily.";
  const maxNewTokens = Math.min(80, Math.floor(model.spec.maxPositions / 2));
  const tty = Boolean(process.stdout.isTTY);
  const decoder = tok.streamDecoder({ skipSpecialTokens: true });
  console.log("1. a story (greedy decoding):\n");
  if (tty) process.stdout.write(`   ${prompt}`);
  for (const t of tok.encode(prompt)) decoder.push(t); // so the first new token keeps its leading space
  const { value: story, ms } = await timed(() =>
    model.generateText(prompt, {
      maxNewTokens,
      stream: tty ? ([t]) => { if (t !== null) process.stdout.write(decoder.push(t).replace(/\n/g, "\n   ")); } : undefined,
    }),
  );
  if (tty) process.stdout.write(decoder.flush() + "\n");
  else console.log(`   ${story.texts[0].replace(/\n/g, "\n   ")}`);
  const n = story.generated[0].length;
  console.log(`\n   (${n} tokens in ${(ms / 1000).toFixed(2)} s, ${(n / (ms / 1000)).toFixed(0)} tokens/s)\n`);

  // 2. Logit lens over the last positions of a short prompt.
  const lensPrompt = "Once upon a time, there was a little";
  const lens = await logitLens(model, lensPrompt);
  console.log(`2. logit lens: the next token each layer would predict (its output through the final norm and lm_head)`);
  console.log(`   prompt: ${JSON.stringify(lensPrompt)}\n`);
  console.log(lensTable(model, lens, { width: 9, last: 8 }).replace(/^/gm, "   "));

  // 3. Activation patching: which (layer, position) carries the gender that picks " she" over " he"?
  const [clean, corrupted] = sameLengthPair(tok, [
    ["The girl was happy because", "The boy was happy because"],
    ["The girl was happy because", "The king was happy because"],
  ]);
  const [target, foil] = tokenPair(tok, " she", " he");
  const res = await patchingSweep(model, { clean, corrupted, target, foil });
  const best = strongest(res.effect.map((row) => row.slice(0, -1))); // the last position trivially restores everything at the top layer
  console.log(`\n3. activation patching: clean ${JSON.stringify(clean)} into corrupted ${JSON.stringify(corrupted)}`);
  console.log(`   logit(${JSON.stringify(tok.decodeToken(target))}) - logit(${JSON.stringify(tok.decodeToken(foil))}): clean ${res.clean.toFixed(2)}, corrupted ${res.corrupted.toFixed(2)}`);
  console.log(`   ${res.layers.length * res.labels.length} patched runs in one batched trace; fraction restored (positions across):\n`);
  const w = 6;
  console.log(`   ${"".padEnd(8)} ${res.labels.map((l) => l.slice(0, w).padEnd(w)).join(" ")}`);
  res.effect.forEach((row, l) => console.log(`   ${`layer ${res.layers[l]}`.padEnd(8)} ${row.map((v) => (Math.abs(v) < 0.005 ? "." : v.toFixed(2)).padEnd(w)).join(" ").trimEnd()}`));
  console.log(`\n   strongest before the last position: layer ${res.layers[best.row]} at ${JSON.stringify(res.labels[best.col])} restores ${(best.value * 100).toFixed(0)}%`);
  const file = await writeOut("demo-patching.svg", heatmapSvg(res.effect, {
    rowLabels: res.layers.map((l) => `layer ${l}`),
    colLabels: res.labels,
    title: `Activation patching: ${id}`,
    subtitle: `clean ${JSON.stringify(clean)} into corrupted ${JSON.stringify(corrupted)}`,
    scale: 1,
    legend: "restored",
  }));
  console.log(`   heat map: ${file}`);
  console.log(`\ndone in ${((performance.now() - started) / 1000).toFixed(1)} s. More in examples/: logit-lens, patching, steering, head-ablation, attention-pattern.`);
} finally {
  await model.dispose();
}
