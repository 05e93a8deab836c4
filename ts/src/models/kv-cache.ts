/**
 * Key/value cache for generation: per layer, K and V buffers [B, Hkv, maxLen, headDim] (f32). New keys
 * are copied into the next free positions; attention reads the filled prefix as a view (no copy).
 */
import { NNsightError } from "../errors.js";
import { Tensor, zeros } from "../tensor/tensor.js";
import { keep } from "../tensor/scope.js";

export class KVCache {
  readonly maxLen: number;
  private readonly k: Tensor[];
  private readonly v: Tensor[];
  /** positions filled (the same for every layer once a forward pass completes) */
  length = 0;

  constructor(layers: number, batch: number, kvHeads: number, maxLen: number, headDim: number) {
    this.maxLen = maxLen;
    this.k = Array.from({ length: layers }, () => keep(zeros([batch, kvHeads, maxLen, headDim])));
    this.v = Array.from({ length: layers }, () => keep(zeros([batch, kvHeads, maxLen, headDim])));
  }

  /** Write k, v ([B, Hkv, T, D], any layout) at positions [length, length + T); return the filled prefix views. */
  append(layer: number, k: Tensor, v: Tensor): [Tensor, Tensor] {
    const T = k.shape[2]!;
    const end = this.length + T;
    if (end > this.maxLen) {
      throw new NNsightError("BAD_INPUT", `sequence of ${end} tokens exceeds the cache of ${this.maxLen} positions`);
    }
    const K = this.k[layer]!, V = this.v[layer]!;
    const ks = K.slice(2, this.length, end), vs = V.slice(2, this.length, end);
    ks.copy_(k);
    vs.copy_(v);
    ks.dispose();
    vs.dispose();
    return [K.slice(2, 0, end), V.slice(2, 0, end)];
  }

  /** Called once per forward pass, after every layer appended. */
  advance(n: number): void {
    this.length += n;
  }

  dispose(): void {
    for (const t of [...this.k, ...this.v]) t.dispose();
  }
}
