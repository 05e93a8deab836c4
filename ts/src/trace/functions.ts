/**
 * Creation and combination functions that work both eagerly and inside a trace: with a graph value among
 * their arguments (an activation, or a shape read from one) they record a graph node, otherwise they
 * compute at once. `import { cat, zeros } from "nnsight"` gives these.
 *
 * ```ts
 * await model.trace(prompt, () => {
 *   const h = model.model.layers[1].output;
 *   return { z: zeros(h.shape), both: cat([h, h], 1) };
 * });
 * ```
 */
import type { DType } from "../tensor/dtype.js";
import * as eager from "../tensor/tensor.js";
import type { Tensor, TensorLike } from "../tensor/tensor.js";
import { activeRecorder, isRecording } from "./recorder.js";
import { TracedValue } from "./traced-value.js";

type ShapeArg = number[] | TracedValue;
type Opts = { dtype?: DType | string };
type RandnOpts = Opts & { seed?: number; mean?: number; std?: number };

function hasGraphValue(v: unknown, depth = 0): boolean {
  if (v instanceof TracedValue) return true;
  if (depth > 4 || v === null || typeof v !== "object") return false;
  if (Array.isArray(v)) return v.some((x) => hasGraphValue(x, depth + 1));
  return Object.values(v).some((x) => hasGraphValue(x, depth + 1));
}
const record = (op: string, args: unknown[]): TracedValue => activeRecorder(op).add(op, args);
const graphy = (args: unknown[]) => isRecording() && hasGraphValue(args);

export function cat(tensors: Tensor[], dim?: number): Tensor;
export function cat(tensors: Array<Tensor | TracedValue>, dim?: number): TracedValue;
export function cat(tensors: Array<Tensor | TracedValue>, dim = 0): Tensor | TracedValue {
  return graphy([tensors]) ? record("cat", [tensors, dim]) : eager.cat(tensors as Tensor[], dim);
}
export function stack(tensors: Tensor[], dim?: number): Tensor;
export function stack(tensors: Array<Tensor | TracedValue>, dim?: number): TracedValue;
export function stack(tensors: Array<Tensor | TracedValue>, dim = 0): Tensor | TracedValue {
  return graphy([tensors]) ? record("stack", [tensors, dim]) : eager.stack(tensors as Tensor[], dim);
}
export function zeros(shape: number[], opts?: Opts): Tensor;
export function zeros(shape: ShapeArg, opts?: Opts): TracedValue;
export function zeros(shape: ShapeArg, opts: Opts = {}): Tensor | TracedValue {
  return graphy([shape]) ? record("zeros", [shape, opts]) : eager.zeros(shape as number[], opts);
}
export function ones(shape: number[], opts?: Opts): Tensor;
export function ones(shape: ShapeArg, opts?: Opts): TracedValue;
export function ones(shape: ShapeArg, opts: Opts = {}): Tensor | TracedValue {
  return graphy([shape]) ? record("ones", [shape, opts]) : eager.ones(shape as number[], opts);
}
export function full(shape: number[], value: number, opts?: Opts): Tensor;
export function full(shape: ShapeArg, value: number | TracedValue, opts?: Opts): TracedValue;
export function full(shape: ShapeArg, value: number | TracedValue, opts: Opts = {}): Tensor | TracedValue {
  return graphy([shape, value]) ? record("full", [shape, value, opts]) : eager.full(shape as number[], value as number, opts);
}
export function arange(start: number, stop?: number, step?: number, opts?: Opts): Tensor;
export function arange(start: number | TracedValue, stop?: number | TracedValue, step?: number, opts?: Opts): TracedValue;
export function arange(start: number | TracedValue, stop?: number | TracedValue, step = 1, opts: Opts = {}): Tensor | TracedValue {
  return graphy([start, stop]) ? record("arange", [start, stop ?? null, step, opts]) : eager.arange(start as number, stop as number | undefined, step, opts);
}
export function randn(shape: number[], opts?: RandnOpts): Tensor;
export function randn(shape: ShapeArg, opts?: RandnOpts): TracedValue;
export function randn(shape: ShapeArg, opts: RandnOpts = {}): Tensor | TracedValue {
  return graphy([shape]) ? record("randn", [shape, opts]) : eager.randn(shape as number[], opts);
}
export function where(cond: Tensor, a: TensorLike, b: TensorLike): Tensor;
export function where(cond: Tensor | TracedValue, a: TensorLike | TracedValue, b: TensorLike | TracedValue): TracedValue;
export function where(cond: Tensor | TracedValue, a: TensorLike | TracedValue, b: TensorLike | TracedValue): Tensor | TracedValue {
  return graphy([cond, a, b]) ? record("where", [cond, a, b]) : eager.where(cond as Tensor, a as TensorLike, b as TensorLike);
}
