/**
 * Autoregressive generation with a KV cache: greedy, or sampling with temperature / top-k / top-p from
 * a seeded generator (the same seed gives the same tokens). Rows of a batch stop independently on EOS;
 * a finished row keeps receiving pad tokens (masked out) until every row is done.
 */
import { NNsightError } from "../errors.js";
import type { Tensor } from "../tensor/tensor.js";
import { makeBatch, type Row } from "./batch.js";
import type { ForwardBatch, ModuleHooks, TransformerLM } from "./transformer.js";

export interface GenerateOptions {
  maxNewTokens?: number;
  doSample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  /** stop ids (default: generation_config.json / config.json eos ids) */
  eosTokenId?: number | number[];
  /** called after every step with the new token of each row (null for rows already finished) */
  stream?: (tokens: Array<number | null>, step: number) => void;
}

export interface GenerateHooks {
  /** hooks for forward step `step` (0 = the prompt), or null for a plain pass */
  forStep(step: number): ModuleHooks | null;
  /** called after each step's forward pass; returning true stops generation (a promise is awaited) */
  afterStep?(step: number): boolean | void | Promise<boolean | void>;
}

export interface GenerateResult {
  /** per row: prompt ids followed by the generated ids (EOS included when hit) */
  sequences: number[][];
  /** per row: the generated ids only */
  generated: number[][];
  /** forward passes run (1 + tokens generated after the first) */
  steps: number;
}

/** A small seeded PRNG (splitmix64 on BigInt would be slow; this is mulberry32, fine for sampling). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Choose the next token from one row of logits. */
export function pickToken(logits: Float32Array, opts: GenerateOptions, rand: () => number): number {
  const sample = opts.doSample ?? (opts.temperature !== undefined || opts.topK !== undefined || opts.topP !== undefined);
  if (!sample || opts.temperature === 0) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
    return best;
  }
  const temp = opts.temperature ?? 1;
  if (!(temp > 0)) throw new NNsightError("BAD_INPUT", `temperature must be > 0, got ${temp}`);
  let idx = Array.from(logits.keys());
  idx.sort((a, b) => logits[b]! - logits[a]! || a - b);
  if (opts.topK !== undefined && opts.topK > 0) idx = idx.slice(0, opts.topK);
  const max = logits[idx[0]!]!;
  let probs = idx.map((i) => Math.exp((logits[i]! - max) / temp));
  let sum = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / sum);
  if (opts.topP !== undefined && opts.topP < 1) {
    let acc = 0;
    let keep = 0;
    while (keep < probs.length) {
      acc += probs[keep]!;
      keep++;
      if (acc >= opts.topP) break;
    }
    idx = idx.slice(0, keep);
    probs = probs.slice(0, keep);
    sum = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / sum);
  }
  let r = rand();
  for (let i = 0; i < probs.length; i++) {
    r -= probs[i]!;
    if (r <= 0) return idx[i]!;
  }
  return idx[idx.length - 1]!;
}

export async function generateTokens(
  lm: TransformerLM,
  rows: Row[],
  opts: GenerateOptions & { padId: number; defaultEos: number[] },
  hooks?: GenerateHooks,
): Promise<GenerateResult> {
  const maxNew = opts.maxNewTokens ?? 20;
  if (!Number.isInteger(maxNew) || maxNew < 0) throw new NNsightError("BAD_INPUT", `maxNewTokens must be a non-negative integer, got ${maxNew}`);
  const eos = new Set(opts.eosTokenId === undefined ? opts.defaultEos : Array.isArray(opts.eosTokenId) ? opts.eosTokenId : [opts.eosTokenId]);
  const rand = seededRandom(opts.seed ?? 0x5eed);
  const first = makeBatch(rows, opts.padId);
  const longest = Math.max(...rows.map((r) => r.mask.reduce((a, m) => a + m, 0)));
  if (lm.config.positionEmbedding === "learned" && longest + maxNew > lm.config.maxPositions) {
    throw new NNsightError(
      "BAD_INPUT",
      `a prompt of ${longest} tokens plus ${maxNew} new tokens needs ${longest + maxNew} positions, but this model has ${lm.config.maxPositions}; lower maxNewTokens or shorten the prompt`,
    );
  }
  const B = first.batch;
  const cache = lm.newCache(B, first.seq + Math.max(maxNew, 1));
  const generated: number[][] = rows.map(() => []);
  const done = rows.map(() => false);
  const mask = Array.from(first.mask);
  const lastPos = rows.map((_, b) => first.positions[b * first.seq + first.seq - 1]!);
  let batch: ForwardBatch = first;
  let steps = 0;
  try {
    // maxNewTokens forward passes (each yields one token); with maxNewTokens = 0, just the prompt's pass
    for (let step = 0; step < Math.max(maxNew, 1); step++) {
      const h = hooks?.forStep(step) ?? null;
      const logits: Tensor = lm.forward(batch, { cache, hooks: h, lastOnly: h === null });
      steps++;
      let after = hooks?.afterStep?.(step);
      if (after instanceof Promise) after = await after;
      const stop = after === true;
      if (maxNew === 0 || stop) {
        logits.dispose();
        break;
      }
      // next tokens from the last position
      const V = logits.shape[2]!;
      const T = logits.shape[1]!;
      const last = T === 1 ? logits : logits.slice(1, -1);
      const data = (await last.data()) as Float32Array;
      if (last !== logits) last.dispose();
      logits.dispose();
      const next: Array<number | null> = [];
      for (let b = 0; b < B; b++) {
        if (done[b]) {
          next.push(null);
          continue;
        }
        const tok = pickToken(data.subarray(b * V, (b + 1) * V), opts, rand);
        generated[b]!.push(tok);
        next.push(tok);
        if (eos.has(tok)) done[b] = true;
      }
      opts.stream?.(next, step);
      if (done.every(Boolean) || step === maxNew - 1) break;
      const ids = new Int32Array(B);
      const positions = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        const live = next[b] !== null;
        ids[b] = next[b] ?? opts.padId;
        positions[b] = live ? ++lastPos[b]! : lastPos[b]!;
      }
      // key mask grows by one column: 1 for live rows, 0 for finished rows
      const prevLen = mask.length / B;
      const grown: number[] = [];
      for (let b = 0; b < B; b++) {
        for (let t = 0; t < prevLen; t++) grown.push(mask[b * prevLen + t]!);
        grown.push(next[b] !== null ? 1 : 0);
      }
      mask.length = 0;
      mask.push(...grown);
      const anyPad = grown.some((m) => m === 0);
      batch = { batch: B, seq: 1, ids, positions, keyMask: anyPad ? Int32Array.from(grown) : null };
    }
  } finally {
    cache.dispose();
  }
  return { sequences: rows.map((r, b) => [...r.ids, ...generated[b]!]), generated, steps };
}
