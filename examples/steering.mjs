// Steering: find a "happy minus sad" direction in the residual stream (the difference of the mean
// layer-k outputs of contrasting prompts) and add it at every generation step. alpha is the size
// of the push as a fraction of the typical residual norm at that layer.
//
//   node examples/steering.mjs [model] [--layer 3] [--alpha 0.3] [--tokens 40] [--prompt "..."]
import { parseArgs } from "node:util";

import { stack } from "nnsight";

import { fitPrompt, loadModel, parts, tokenPair } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    layer: { type: "string" },
    alpha: { type: "string", default: "0.3" },
    tokens: { type: "string", default: "40" },
    prompt: { type: "string", default: "Once upon a time, there was a little girl named Lily. She" },
  },
});

const HAPPY = [
  "Lily was very happy. She laughed and smiled and played with her friends all day.",
  "Tom was so happy and excited. He jumped up and down and hugged his mom.",
  "The sun was shining and everyone was happy. They sang and danced together.",
  "Sue felt glad and proud. She smiled a big smile and said thank you.",
];
const SAD = [
  "Lily was very sad. She cried and cried and did not want to play with anyone.",
  "Tom was so sad and scared. He sat alone and tears fell down his face.",
  "It was dark and cold and everyone was sad. They cried and felt lonely.",
  "Sue felt bad and angry. She frowned and said she was sorry and cried.",
];

const { id, model } = await loadModel(positionals);
try {
  const P = parts(model);
  const layer = values.layer !== undefined ? Number(values.layer) : Math.floor(P.numLayers * 0.6);
  const alpha = Number(values.alpha);
  // tiny test checkpoints have short contexts: keep prompt + new tokens inside them
  const maxNewTokens = Math.min(Number(values.tokens), Math.floor(model.spec.maxPositions / 2));
  const prompt = fitPrompt(model, values.prompt, maxNewTokens);
  const layers = P.layers;
  console.log(`model: ${id} (${P.modelType}, ${P.numLayers} layers); steering at layer ${layer} with alpha ${alpha}`);

  // Mean layer-k output of each prompt (over its positions), one invoke per prompt in one trace.
  async function meanOutput(prompts) {
    const r = await model.trace((tr) => {
      prompts.forEach((p, i) => tr.invoke(fitPrompt(model, p), () => ({ [`m${i}`]: layers[layer].output.mean({ dim: 1 }) })));
    });
    return stack(prompts.map((_, i) => r[`m${i}`].at([0]))).mean({ dim: 0 });
  }
  const happy = await meanOutput(HAPPY);
  const sad = await meanOutput(SAD);
  const diff = happy.sub(sad);
  const norm = (await diff.norm().data())[0];
  const direction = diff.div(norm); // unit vector [hidden]

  // How large is the residual stream there? Scale the push relative to it.
  const probe = await model.trace(prompt, () => ({ n: layers[layer].output.at([0]).norm({ dim: -1 }).mean() }));
  const typical = (await probe.n.data())[0];
  console.log(`|happy - sad| = ${norm.toFixed(3)}, typical |h| at layer ${layer} = ${typical.toFixed(3)}\n`);

  const text = (tokens) => model.tokenizer.decode(tokens.toArray()[0], { skipSpecialTokens: true });
  async function continuation(scale) {
    const push = direction.mul(scale * typical);
    const r = await model.generate(prompt, { maxNewTokens }, (tr) => {
      if (scale !== 0) {
        tr.all(() => {
          const h = layers[layer].output;
          h.set(h.add(push));
        });
      }
      return { tokens: model.generator.output };
    });
    return text(r.tokens);
  }

  // One number that moves with the direction: P(" happy") vs P(" sad") after "Lily felt very".
  const [happyId, sadId] = tokenPair(model.tokenizer, " happy", " sad");
  async function moodOdds(scale) {
    const push = direction.mul(scale * typical);
    const r = await model.trace("Lily felt very", () => {
      const h = layers[layer].output;
      h.set(h.add(push));
      return { p: model.lm_head.output.at([0, -1]).softmax(-1) };
    });
    const p = await r.p.data();
    return `P(" happy") ${p[happyId].toFixed(3)}  P(" sad") ${p[sadId].toFixed(3)}`;
  }
  console.log(`next token after "Lily felt very", pushing the prompt's layer-${layer} output:`);
  for (const scale of [-alpha, 0, alpha]) console.log(`  alpha ${((scale > 0 ? "+" : "") + scale).padStart(String(alpha).length + 1)}: ${await moodOdds(scale)}`);
  console.log();

  const show = (label, s) => console.log(`${label}\n  ${s.replace(/\n/g, "\n  ")}\n`);
  show("unsteered:", await continuation(0));
  show(`steered towards "happy" (h += ${alpha} * |h| * direction at every step):`, await continuation(alpha));
  show(`steered towards "sad" (h -= ${alpha} * |h| * direction at every step):`, await continuation(-alpha));
} finally {
  await model.dispose();
}
