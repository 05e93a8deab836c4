// Activation patching: run a corrupted prompt, copy the clean prompt's residual stream (one layer's
// output at one position) into it, and measure how much of the clean behaviour comes back.
// Every (layer, position) is its own invoke, so the whole sweep is one batched forward pass.
//
//   node examples/patching.mjs [model] [--clean "..." --corrupted "..." --target " she" --foil " he" --out file.svg]
//
// Writes a heat map to examples/out/patching.svg (or --out FILE).
import { writeFile } from "node:fs/promises";
import * as path from "node:path";
import { parseArgs } from "node:util";

import { heatmapSvg, loadModel, parts, patchingSweep, sameLengthPair, strongest, timed, tokenLabel, tokenPair, writeOut } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { clean: { type: "string" }, corrupted: { type: "string" }, target: { type: "string", default: " she" }, foil: { type: "string", default: " he" }, out: { type: "string" } },
});

// Candidate pairs, best first: the first whose two prompts have the same token count is used.
const PAIRS = values.clean && values.corrupted
  ? [[values.clean, values.corrupted]]
  : [
      ["The girl was happy because", "The boy was happy because"],
      ["Lily was sad because", "Tom was sad because"],
      ["The girl was happy because", "The king was happy because"], // equal lengths for character tokenizers
    ];

const { id, model } = await loadModel(positionals);
try {
  const tok = model.tokenizer;
  const P = parts(model);
  const [clean, corrupted] = sameLengthPair(tok, PAIRS);
  const [target, foil] = tokenPair(tok, values.target, values.foil);
  const T = tok.encode(clean).length;
  console.log(`model: ${id} (${P.modelType}, ${P.numLayers} layers)`);
  console.log(`clean:     ${JSON.stringify(clean)}`);
  console.log(`corrupted: ${JSON.stringify(corrupted)}   (${T} tokens each)`);
  console.log(`metric:    logit(${JSON.stringify(tok.decodeToken(target))}) - logit(${JSON.stringify(tok.decodeToken(foil))}) at the last position`);

  const { value: res, ms } = await timed(() => patchingSweep(model, { clean, corrupted, target, foil }));
  console.log(`\nclean logit diff ${res.clean.toFixed(3)}, corrupted ${res.corrupted.toFixed(3)}`);
  console.log(`patched ${res.layers.length} layers x ${T} positions = ${res.layers.length * T} invokes in one trace (${(ms / 1000).toFixed(2)} s)`);

  const corruptedLabels = tok.encode(corrupted).map((i) => tokenLabel(tok, i));
  const colLabels = res.labels.map((c, t) => (c === corruptedLabels[t] ? c : `${c} / ${corruptedLabels[t]}`));
  const rowLabels = res.layers.map((l) => `layer ${l}`);
  const svg = heatmapSvg(res.effect, {
    rowLabels,
    colLabels,
    title: `Activation patching: ${id}`,
    subtitle: `clean ${JSON.stringify(clean)} into corrupted ${JSON.stringify(corrupted)}; fraction of the logit difference restored`,
    scale: 1,
    legend: "restored",
  });
  const file = values.out ? (await writeFile(values.out, svg), path.resolve(values.out)) : await writeOut("patching.svg", svg);
  console.log(`\nheat map written to ${file}`);

  const best = strongest(res.effect);
  console.log(`strongest cell: layer ${res.layers[best.row]}, position ${best.col} (${colLabels[best.col]}): ${(best.value * 100).toFixed(1)}% of the difference restored`);
  // a compact text version of the map
  const shade = (v) => " .:-=+*#%@"[Math.max(0, Math.min(9, Math.round(Math.abs(v) * 9)))];
  console.log("\nrestored (|value|: ' ' 0 ... '@' 1), positions across:");
  res.effect.forEach((row, i) => console.log(`  ${rowLabels[i].padEnd(8)} |${row.map(shade).join("")}|`));
} finally {
  await model.dispose();
}
