// Logit lens: decode every layer's residual stream through the final norm and the unembedding
// (`lm_head.call(norm.call(h))`) and print the top token at every position.
//
//   node examples/logit-lens.mjs [model] [--prompt "text"]
//
// Works on the bundled stories260K and on any Llama or GPT-2 checkpoint directory.
import { parseArgs } from "node:util";

import { lensTable, loadModel, logitLens, parts } from "./lib.mjs";

const { values, positionals } = parseArgs({ allowPositionals: true, options: { prompt: { type: "string" }, last: { type: "string", default: "12" } } });
const prompt = values.prompt ?? "Once upon a time, there was a little girl named";

const { id, model } = await loadModel(positionals);
try {
  const P = parts(model);
  console.log(`model: ${id} (${P.modelType}, ${P.numLayers} layers, hidden ${P.hidden})`);
  console.log(`prompt: ${JSON.stringify(prompt)}\n`);
  const lens = await logitLens(model, prompt);
  const last = Number(values.last);
  const shown = Math.min(last, lens.labels.length);
  console.log(`top token of each layer's output through the final norm and lm_head, with its probability (last ${shown} of ${lens.labels.length} positions):\n`);
  console.log(lensTable(model, lens, { width: 11, probs: true, last }));

  // how early does each position settle on the model's final answer?
  const final = lens.grid.at(-1);
  const settle = final.map((cell, t) => {
    let l = lens.grid.length - 1;
    while (l > 0 && lens.grid[l - 1][t].id === cell.id) l--;
    return l;
  });
  const mean = settle.reduce((a, b) => a + b, 0) / settle.length;
  console.log(`\nthe final prediction first appears, on average, at layer ${mean.toFixed(1)} of ${P.numLayers - 1}`);
  console.log(`next token after the prompt: ${JSON.stringify(model.tokenizer.decodeToken(final.at(-1).id))}`);
} finally {
  await model.dispose();
}
