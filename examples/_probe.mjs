import { LanguageModel } from "nnsight";
import { topK, softmax, tokenLabel } from "./lib.mjs";
const model = await LanguageModel.load("stories260K");
const prompts = process.argv.slice(2);
for (const p of prompts) {
  const ids = model.tokenizer.encode(p);
  const l = await model.forward(p);
  const last = Array.from(l.at([0, -1]).toFloat32Array());
  const pr = softmax(last);
  console.log(ids.length, JSON.stringify(p), topK(last, 5).map(i => `${tokenLabel(model.tokenizer,i)}(${i}) ${pr[i].toFixed(2)}`).join(" "));
}
await model.dispose();
