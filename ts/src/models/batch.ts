/**
 * Turning user inputs into one left-padded batch: every accepted prompt form becomes rows of token ids
 * with a mask, rows are left padded to one length, and position ids count real tokens only (so a row
 * gives the same numbers alone or in a batch).
 */
import { NNsightError } from "../errors.js";
import { Tensor } from "../tensor/tensor.js";
import type { ForwardBatch } from "./transformer.js";

/** Anything accepted where a prompt is expected. */
export type PromptInput =
  | string
  | string[]
  | number[]
  | number[][]
  | Tensor
  | { input_ids: number[] | number[][] | Tensor; attention_mask?: number[] | number[][] | Tensor };

export interface Row {
  ids: number[];
  /** 1 = real token, 0 = padding (an explicit mask may mark pads inside the given ids) */
  mask: number[];
}

export interface TextEncoder {
  encode(text: string): number[];
}

function tensorRows(t: Tensor, what: string): number[][] {
  if (!(t.dtype === "int32" || t.dtype === "int64" || t.dtype === "bool")) {
    throw new NNsightError("BAD_INPUT", `${what} must be an integer tensor, got ${t.dtype}`);
  }
  const a = t.toArray();
  if (t.ndim === 1) return [a as number[]];
  if (t.ndim === 2) return a as number[][];
  throw new NNsightError("BAD_INPUT", `${what} must be 1-D or 2-D, got shape [${t.shape.join(", ")}]`);
}

function asRows(v: number[] | number[][] | Tensor, what: string): number[][] {
  if (v instanceof Tensor) return tensorRows(v, what);
  if (v.length > 0 && Array.isArray(v[0])) return v as number[][];
  return [v as number[]];
}

function checkIds(ids: number[], vocab: number | undefined): void {
  for (const id of ids) {
    if (!Number.isInteger(id) || id < 0 || (vocab !== undefined && id >= vocab)) {
      throw new NNsightError("BAD_INPUT", `token id ${id} is not a valid id${vocab !== undefined ? ` (vocabulary of ${vocab})` : ""}`);
    }
  }
}

/** Normalize any prompt form into rows. An empty prompt is BAD_INPUT. */
export function toRows(input: PromptInput, tok: TextEncoder, vocab?: number): Row[] {
  let rows: Row[];
  if (typeof input === "string") {
    if (input.length === 0) throw new NNsightError("BAD_INPUT", "the prompt is an empty string: give at least one token of text");
    rows = [{ ids: tok.encode(input), mask: [] }];
  } else if (Array.isArray(input) && input.length > 0 && typeof input[0] === "string") {
    rows = (input as string[]).map((s, i) => {
      if (typeof s !== "string" || s.length === 0) throw new NNsightError("BAD_INPUT", `prompt ${i} is empty: give at least one token of text`);
      return { ids: tok.encode(s), mask: [] };
    });
  } else if (input instanceof Tensor || Array.isArray(input)) {
    rows = asRows(input as number[] | number[][] | Tensor, "token ids").map((ids) => ({ ids, mask: [] }));
  } else if (input && typeof input === "object" && "input_ids" in input) {
    const ids = asRows(input.input_ids, "input_ids");
    const masks = input.attention_mask === undefined ? null : asRows(input.attention_mask, "attention_mask");
    if (masks && (masks.length !== ids.length || masks.some((m, i) => m.length !== ids[i]!.length))) {
      throw new NNsightError("BAD_INPUT", "attention_mask must have the same shape as input_ids");
    }
    rows = ids.map((r, i) => ({ ids: r, mask: masks ? masks[i]!.map((x) => (x ? 1 : 0)) : [] }));
  } else {
    throw new NNsightError(
      "BAD_INPUT",
      "a prompt must be a string, an array of strings, token ids (number[], number[][] or an integer Tensor), or { input_ids, attention_mask }",
    );
  }
  if (rows.length === 0) throw new NNsightError("BAD_INPUT", "no prompts given");
  for (const r of rows) {
    if (r.ids.length === 0) throw new NNsightError("BAD_INPUT", "a prompt has no tokens");
    checkIds(r.ids, vocab);
    if (r.mask.length === 0) r.mask = r.ids.map(() => 1);
    if (!r.mask.some((m) => m === 1)) throw new NNsightError("BAD_INPUT", "a prompt's attention mask has no real token");
  }
  return rows;
}

/** Left pad rows to one length and compute positions (cumulative count of real tokens - 1; pads at 0). */
export function makeBatch(rows: Row[], padId: number): ForwardBatch & { rows: Row[]; mask: Int32Array } {
  const B = rows.length;
  const T = Math.max(...rows.map((r) => r.ids.length));
  const ids = new Int32Array(B * T).fill(padId);
  const mask = new Int32Array(B * T);
  const positions = new Int32Array(B * T);
  let padded = false;
  rows.forEach((r, b) => {
    const off = T - r.ids.length;
    let count = 0;
    for (let t = 0; t < T; t++) {
      const src = t - off;
      const m = src >= 0 ? r.mask[src]! : 0;
      if (src >= 0) ids[b * T + t] = r.ids[src]!;
      mask[b * T + t] = m;
      if (m) count++;
      else padded = true;
      positions[b * T + t] = m ? count - 1 : 0;
    }
  });
  return { batch: B, seq: T, ids, positions, keyMask: padded ? mask : null, rows, mask };
}
