// How reductions take their dims, shared by Tensor and TracedValue (no native code here: the recorder
// and a remote client use it too).

export interface ReduceOpts {
  dim?: number | number[];
  keepdim?: boolean;
}

/**
 * How reductions take their dims: `{ dim, keepdim }`, or torch's positional form `x.sum(-1)`,
 * `x.sum([0, 2], true)`.
 */
export type ReduceArg = ReduceOpts | number | number[];

/** @internal Normalize a ReduceArg (and a positional keepdim) to ReduceOpts. */
export function reduceOpts(dim: ReduceArg, keepdim?: boolean): ReduceOpts {
  const o: ReduceOpts = typeof dim === "number" || Array.isArray(dim) ? { dim } : dim;
  return keepdim === undefined ? o : { ...o, keepdim };
}
