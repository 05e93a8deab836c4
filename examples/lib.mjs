// Small helpers shared by the examples: loading the model named on the command line, finding the
// residual stream / final norm / attention output of Llama- and GPT-2-style models, token labels,
// text tables, and an SVG heat map. Plain ESM so every example runs with `node examples/x.mjs`.
import { mkdir, writeFile } from "node:fs/promises";
import { performance } from "node:perf_hooks";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

import { LanguageModel } from "nnsight";

// `node examples/x.mjs | head` closes the pipe early: end quietly instead of throwing EPIPE.
process.stdout.on("error", (e) => {
  if (e.code === "EPIPE") process.exit(0);
  throw e;
});

/** The folder examples write into (`examples/out`, git-ignored). */
export const OUT_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), "out");

/** Load the model named by the first command-line argument (default: the bundled stories260K); `opts` go to LanguageModel.load. */
export async function loadModel(argv = process.argv.slice(2), opts = {}) {
  const id = argv.find((a) => !a.startsWith("-")) ?? "stories260K";
  const model = await LanguageModel.load(id, opts);
  return { id, model };
}

/**
 * The parts of the module tree the examples touch, for both naming schemes:
 * Llama (`model.model.layers`, `model.model.norm`, `self_attn.o_proj`) and
 * GPT-2 (`model.transformer.h`, `model.transformer.ln_f`, `attn.c_proj`).
 */
export function parts(model) {
  const spec = model.spec;
  const gpt2 = spec.modelType === "gpt2";
  const layers = gpt2 ? model.transformer.h : model.model.layers;
  return {
    modelType: spec.modelType,
    layers,
    numLayers: spec.numLayers,
    numHeads: spec.numHeads,
    headDim: spec.headDim,
    hidden: spec.hiddenSize,
    norm: gpt2 ? model.transformer.ln_f : model.model.norm,
    lmHead: model.lm_head,
    /** the projection that mixes the heads; its input is the heads' outputs side by side */
    attnOut: (l) => (gpt2 ? layers[l].attn.c_proj : layers[l].self_attn.o_proj),
    /** the attention operation inside the attention module: output [batch, seq, heads, head_dim], before the output projection */
    attnHeads: (l) => (gpt2 ? layers[l].attn : layers[l].self_attn).source.attention_interface_0,
    /** logit lens: decode a residual-stream value through the final norm and the unembedding */
    lens: (h) => model.lm_head.call((gpt2 ? model.transformer.ln_f : model.model.norm).call(h)),
  };
}

/** A readable label for one token: its text with spaces shown as "·" and control characters escaped. */
export function tokenLabel(tokenizer, id) {
  const special = tokenizer.decode([id], { skipSpecialTokens: true }) === "" && tokenizer.decode([id]) !== "";
  let text = special ? tokenizer.decode([id]) : tokenizer.decodeToken(id);
  if (text === "") text = tokenizer.idToToken(id) ?? `#${id}`;
  return JSON.stringify(text)
    .slice(1, -1)
    .replace(/ /g, "·")
    .replace(/\\"/g, '"');
}

/** Labels of the prompt's tokens (BOS included when the tokenizer adds one). */
export function promptLabels(tokenizer, prompt) {
  return tokenizer.encode(prompt).map((id) => tokenLabel(tokenizer, id));
}

/** Cut a label to `w` characters. */
export function fit(s, w) {
  return s.length <= w ? s : s.slice(0, Math.max(1, w - 1)) + "…";
}

/**
 * A fixed-width text table: `header` is a list of column titles, `rows` lists of cells. `width` is
 * the width of every column after the first, or a list of widths (one per column after the first).
 */
export function table(header, rows, { width = 10, firstWidth } = {}) {
  const fw = firstWidth ?? Math.max(header[0].length, ...rows.map((r) => String(r[0]).length));
  const wOf = (i) => (Array.isArray(width) ? width[i - 1] : width);
  const line = (cells) => cells.map((c, i) => (i === 0 ? String(c).padEnd(fw) : fit(String(c), wOf(i)).padEnd(wOf(i)))).join(" ").trimEnd();
  return [line(header), "-".repeat(line(header).length), ...rows.map(line)].join("\n");
}

/** Softmax of a plain array (numerically stable). */
export function softmax(xs) {
  const m = Math.max(...xs);
  const e = xs.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

/** Indices of the `k` largest entries, largest first. */
export function topK(xs, k) {
  return Array.from(xs.keys())
    .sort((a, b) => xs[b] - xs[a])
    .slice(0, k);
}

/** Same-length prompt pairs: the first pair from `pairs` whose token counts agree. */
export function sameLengthPair(tokenizer, pairs) {
  for (const [a, b] of pairs) if (tokenizer.encode(a).length === tokenizer.encode(b).length) return [a, b];
  throw new Error(`no pair of prompts with the same token count among ${pairs.length}`);
}

/**
 * The token ids that tell two continuations apart (e.g. " she" and " he"): the first position where
 * their encodings differ, so a tokenizer that splits off a leading space piece still works.
 */
export function tokenPair(tokenizer, a, b) {
  const x = tokenizer.encode(a, { addSpecialTokens: false });
  const y = tokenizer.encode(b, { addSpecialTokens: false });
  let i = 0;
  while (i < x.length && i < y.length && x[i] === y[i]) i++;
  if (i === x.length || i === y.length) throw new Error(`${JSON.stringify(a)} and ${JSON.stringify(b)} do not differ in their tokens`);
  return [x[i], y[i]];
}

/**
 * A prompt as token ids that fit the model's context, keeping room for `reserve` new tokens
 * (tiny test checkpoints have only 64 positions).
 */
export function fitPrompt(model, text, reserve = 0) {
  const ids = model.tokenizer.encode(text);
  const room = Math.max(1, model.spec.maxPositions - reserve);
  return ids.length <= room ? ids : ids.slice(0, room);
}

/**
 * Logit lens: the top token of every layer's output at every position, decoded through the final
 * norm and the unembedding. Returns `{ labels, grid }` with `grid[layer][pos] = { id, p }`.
 */
export async function logitLens(model, prompt) {
  const P = parts(model);
  const r = await model.trace(prompt, () => {
    const out = {};
    for (let l = 0; l < P.numLayers; l++) {
      const probs = P.lens(P.layers[l].output).at([0]).softmax(-1);
      out[`p${l}`] = probs.max({ dim: -1 });
      out[`i${l}`] = probs.argmax({ dim: -1 });
    }
    return out;
  });
  const grid = [];
  for (let l = 0; l < P.numLayers; l++) {
    const ids = Array.from(await r[`i${l}`].data(), Number);
    const ps = Array.from(await r[`p${l}`].data());
    grid.push(ids.map((id, t) => ({ id, p: ps[t] })));
  }
  return { labels: promptLabels(model.tokenizer, prompt), grid };
}

/** Render a logit-lens grid as a text table (layers down, positions across). */
export function lensTable(model, { labels, grid }, { width = 9, probs = false, last = Infinity } = {}) {
  const from = Math.max(0, labels.length - last);
  const cell = ({ id, p }) => {
    const tok = fit(tokenLabel(model.tokenizer, id), probs ? width - 4 : width);
    return probs ? `${tok} ${p >= 0.995 ? "1.0" : p.toFixed(2).slice(1)}` : tok;
  };
  const rows = grid.map((row, l) => [`layer ${l}`, ...row.slice(from).map(cell)]);
  const header = ["input →", ...labels.slice(from)];
  if (from > 0) header[1] = `…${header[1]}`;
  return table(header, rows, { width });
}

/**
 * Activation patching in one batched trace: a clean invoke, then for every (layer, position) one
 * corrupted invoke whose residual stream at that layer and position is replaced by the clean one.
 * The metric is the logit difference `logit(target) - logit(foil)` at the last position.
 * Returns `{ labels, clean, corrupted, effect }` where `effect[layer][pos]` is the fraction of the
 * clean-vs-corrupted gap that the patch restores (1 = fully restored, 0 = no effect).
 */
export async function patchingSweep(model, { clean, corrupted, target, foil, layers: layerList }) {
  const P = parts(model);
  const ids = model.tokenizer.encode(clean);
  const T = ids.length;
  if (model.tokenizer.encode(corrupted).length !== T) throw new Error("clean and corrupted prompts must have the same token count");
  const layers = layerList ?? Array.from({ length: P.numLayers }, (_, l) => l);
  const diff = (logits) => logits.at([":", -1, target]).sub(logits.at([":", -1, foil]));
  const r = await model.trace((tr) => {
    const src = {};
    tr.invoke(clean, () => {
      for (const l of layers) src[l] = P.layers[l].output;
      return { clean: diff(model.lm_head.output) };
    });
    tr.invoke(corrupted, () => ({ corrupted: diff(model.lm_head.output) }));
    for (const l of layers) {
      for (let t = 0; t < T; t++) {
        tr.invoke(corrupted, () => {
          P.layers[l].output.set([":", t], src[l].at([":", t]));
          return { [`d_${l}_${t}`]: diff(model.lm_head.output) };
        });
      }
    }
  });
  const num = async (v) => (await v.data())[0];
  const cleanD = await num(r.clean);
  const corrD = await num(r.corrupted);
  const effect = [];
  for (const l of layers) {
    const row = [];
    for (let t = 0; t < T; t++) row.push(((await num(r[`d_${l}_${t}`])) - corrD) / (cleanD - corrD));
    effect.push(row);
  }
  return { labels: ids.map((id) => tokenLabel(model.tokenizer, id)), layers, clean: cleanD, corrupted: corrD, effect };
}

/** The cell with the largest |value| of a 2-D array: `{ row, col, value }`. */
export function strongest(grid) {
  let best = { row: 0, col: 0, value: 0 };
  grid.forEach((r, i) => r.forEach((v, j) => {
    if (Math.abs(v) > Math.abs(best.value)) best = { row: i, col: j, value: v };
  }));
  return best;
}

const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

/** Diverging colour: blue for negative, white at 0, red for positive; `x` in [-1, 1]. */
function colour(x) {
  const c = Math.max(-1, Math.min(1, x));
  const mix = (a, b, t) => Math.round(a + (b - a) * t);
  const [r, g, b] = c >= 0 ? [mix(255, 178, c), mix(255, 24, c), mix(255, 43, c)] : [mix(255, 33, -c), mix(255, 102, -c), mix(255, 172, -c)];
  return `rgb(${r},${g},${b})`;
}

/**
 * A heat map as an SVG document: rows labelled `rowLabels`, columns `colLabels`, a title, and a
 * colour bar. Values are scaled by the largest |value| (or `scale`).
 */
export function heatmapSvg(values, { rowLabels, colLabels, title, subtitle = "", scale, legend = "" }) {
  const cell = 44, left = 80, top = 70, rows = values.length, cols = values[0].length;
  const max = scale ?? Math.max(1e-9, ...values.flat().map(Math.abs));
  const w = Math.max(left + cols * cell + 110, Math.ceil(subtitle.length * 6.6) + 40, Math.ceil(title.length * 9.5) + 40);
  const h = top + rows * cell + 90;
  const num = (v) => (Math.abs(v) < 0.005 ? "0.00" : v.toFixed(2));
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" font-family="sans-serif" font-size="12">`,
    `<rect width="${w}" height="${h}" fill="white"/>`,
    `<text x="${w / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">${esc(title)}</text>`,
    `<text x="${w / 2}" y="44" text-anchor="middle" fill="#555">${esc(subtitle)}</text>`,
  ];
  values.forEach((row, i) => {
    out.push(`<text x="${left - 8}" y="${top + i * cell + cell / 2 + 4}" text-anchor="end">${esc(rowLabels[i])}</text>`);
    row.forEach((v, j) => {
      const x = left + j * cell, y = top + i * cell;
      out.push(`<rect x="${x}" y="${y}" width="${cell}" height="${cell}" fill="${colour(v / max)}" stroke="#ddd"><title>${esc(`${rowLabels[i]}, ${colLabels[j]}: ${v.toFixed(3)}`)}</title></rect>`);
      out.push(`<text x="${x + cell / 2}" y="${y + cell / 2 + 4}" text-anchor="middle" font-size="10" fill="${Math.abs(v / max) > 0.6 ? "white" : "#222"}">${num(v)}</text>`);
    });
  });
  colLabels.forEach((c, j) => {
    const x = left + j * cell + cell / 2, y = top + rows * cell + 10;
    out.push(`<text x="${x}" y="${y}" text-anchor="end" transform="rotate(-45 ${x} ${y})">${esc(c)}</text>`);
  });
  // colour bar
  const bx = left + cols * cell + 30, bh = rows * cell, steps = 20;
  for (let k = 0; k < steps; k++) {
    const v = 1 - (2 * (k + 0.5)) / steps;
    out.push(`<rect x="${bx}" y="${top + (k * bh) / steps}" width="16" height="${bh / steps + 0.5}" fill="${colour(v)}"/>`);
  }
  out.push(`<text x="${bx + 22}" y="${top + 10}">${max.toFixed(2)}</text>`);
  out.push(`<text x="${bx + 22}" y="${top + bh / 2 + 4}">0</text>`);
  out.push(`<text x="${bx + 22}" y="${top + bh}">${(-max).toFixed(2)}</text>`);
  if (legend) out.push(`<text x="${bx + 8}" y="${top + bh + 24}" text-anchor="middle" fill="#555">${esc(legend)}</text>`);
  out.push("</svg>");
  return out.join("\n") + "\n";
}

/** Write a file under examples/out (created if needed); returns its path. */
export async function writeOut(name, text) {
  await mkdir(OUT_DIR, { recursive: true });
  const file = path.join(OUT_DIR, name);
  await writeFile(file, text);
  return file;
}

/** Time a promise-returning function: `{ value, ms }`. */
export async function timed(fn) {
  const t0 = performance.now();
  const value = await fn();
  return { value, ms: performance.now() - t0 };
}
