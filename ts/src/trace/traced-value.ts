/**
 * A TracedValue is a node of the intervention graph seen from user code: every method records a new
 * node and returns its TracedValue; nothing computes. After the trace has run, `.value` holds the real
 * result of values that were returned or `.save()`d.
 *
 * ```ts
 * await model.trace("Hello", () => {
 *   const h = model.model.layers[1].output;           // TracedValue
 *   h.set([":", -1], 0);                               // records an in-place edit
 *   return { last: h.at([":", -1]).softmax(-1) };     // returned values come back as Tensors
 * });
 * ```
 */
import { NNsightError } from "../errors.js";
import { type ReduceArg, reduceOpts } from "../tensor/reduce-arg.js";
import type { Index } from "../tensor/tensor.js";
import { type Recorder, activeRecorder } from "./recorder.js";

/** Anything a graph op accepts as an argument. */
export type GraphLike = TracedValue | number | boolean | string | null | import("../tensor/tensor.js").Tensor | GraphLike[] | { [k: string]: GraphLike };

type Dim = { dim?: number | number[]; keepdim?: boolean };

export class TracedValue {
  /** @internal */ readonly recorder: Recorder;
  /** node id in the graph */
  readonly id: number;
  /** @internal filled after the run */ _result: unknown = undefined;
  /** @internal */ _hasResult = false;

  /** @internal */
  constructor(recorder: Recorder, id: number) {
    this.recorder = recorder;
    this.id = id;
    let list = recorder.values.get(id);
    if (!list) recorder.values.set(id, (list = []));
    list.push(this);
  }

  /** The trace being recorded now (a value from an earlier trace of a session records into the current one). */
  private get rec(): Recorder {
    return activeRecorder(`an operation on graph value ${this.id} (graph values only work inside a trace)`);
  }
  private op(name: string, ...args: unknown[]): TracedValue {
    return this.rec.add(name, [this, ...args]);
  }

  /** Keep this value after the trace: `.value` is a real Tensor once the trace has finished. */
  save(): this {
    this.rec.saves.add(this.id);
    return this;
  }
  /** The real value, once the trace that recorded this node has run. */
  get value(): any {
    if (!this._hasResult) {
      throw new NNsightError(
        "BAD_INPUT",
        `node ${this.id} has no value: it is available after the trace finished, and only for saved or returned values that were computed (not after a stop)`,
      );
    }
    return this._result;
  }

  // indexing and writes
  at(index: Index): TracedValue { return this.op("at", index); }
  /** In-place write of value into the region `index` selects (or the whole value). Affects the live forward pass. */
  set(indexOrValue: Index | GraphLike, value?: GraphLike): TracedValue {
    if (value === undefined) return this.rec.add("set", [this, null, indexOrValue]);
    return this.rec.add("set", [this, indexOrValue, value]);
  }
  /** A property of the value: `"shape"`, `"ndim"`, `"dtype"`, or a field/element of a structured value. */
  get(key: string | number): TracedValue { return this.op("get", key); }
  get shape(): TracedValue { return this.get("shape"); }
  get ndim(): TracedValue { return this.get("ndim"); }
  get dtype(): TracedValue { return this.get("dtype"); }

  // math
  add(o: GraphLike): TracedValue { return this.op("add", o); }
  sub(o: GraphLike): TracedValue { return this.op("sub", o); }
  mul(o: GraphLike): TracedValue { return this.op("mul", o); }
  div(o: GraphLike): TracedValue { return this.op("div", o); }
  pow(o: GraphLike): TracedValue { return this.op("pow", o); }
  maximum(o: GraphLike): TracedValue { return this.op("maximum", o); }
  minimum(o: GraphLike): TracedValue { return this.op("minimum", o); }
  eq(o: GraphLike): TracedValue { return this.op("eq", o); }
  ne(o: GraphLike): TracedValue { return this.op("ne", o); }
  lt(o: GraphLike): TracedValue { return this.op("lt", o); }
  le(o: GraphLike): TracedValue { return this.op("le", o); }
  gt(o: GraphLike): TracedValue { return this.op("gt", o); }
  ge(o: GraphLike): TracedValue { return this.op("ge", o); }
  matmul(o: GraphLike): TracedValue { return this.op("matmul", o); }
  neg(): TracedValue { return this.op("neg"); }
  abs(): TracedValue { return this.op("abs"); }
  exp(): TracedValue { return this.op("exp"); }
  log(): TracedValue { return this.op("log"); }
  sqrt(): TracedValue { return this.op("sqrt"); }
  rsqrt(): TracedValue { return this.op("rsqrt"); }
  relu(): TracedValue { return this.op("relu"); }
  gelu(opts?: { approximate?: "none" | "tanh" }): TracedValue { return this.op("gelu", opts ?? {}); }
  silu(): TracedValue { return this.op("silu"); }
  tanh(): TracedValue { return this.op("tanh"); }
  sigmoid(): TracedValue { return this.op("sigmoid"); }
  sin(): TracedValue { return this.op("sin"); }
  cos(): TracedValue { return this.op("cos"); }
  square(): TracedValue { return this.op("square"); }
  reciprocal(): TracedValue { return this.op("reciprocal"); }
  softmax(dim = -1): TracedValue { return this.op("softmax", dim); }
  logSoftmax(dim = -1): TracedValue { return this.op("logSoftmax", dim); }
  sum(dim: ReduceArg = {}, keepdim?: boolean): TracedValue { return this.op("sum", reduceOpts(dim, keepdim)); }
  mean(dim: ReduceArg = {}, keepdim?: boolean): TracedValue { return this.op("mean", reduceOpts(dim, keepdim)); }
  max(dim: ReduceArg = {}, keepdim?: boolean): TracedValue { return this.op("max", reduceOpts(dim, keepdim)); }
  min(dim: ReduceArg = {}, keepdim?: boolean): TracedValue { return this.op("min", reduceOpts(dim, keepdim)); }
  prod(dim: ReduceArg = {}, keepdim?: boolean): TracedValue { return this.op("prod", reduceOpts(dim, keepdim)); }
  argmax(dim: number | { dim?: number; keepdim?: boolean } = {}, keepdim?: boolean): TracedValue { return this.op("argmax", reduceOpts(dim, keepdim)); }
  argmin(dim: number | { dim?: number; keepdim?: boolean } = {}, keepdim?: boolean): TracedValue { return this.op("argmin", reduceOpts(dim, keepdim)); }
  norm(opts: Dim & { p?: number } = {}): TracedValue { return this.op("norm", opts); }
  cumsum(dim: number): TracedValue { return this.op("cumsum", dim); }
  /** `{ values, indices }` of the k largest entries along the last dim. */
  topk(k: number, opts: { dim?: number } = {}): { values: TracedValue; indices: TracedValue } {
    const r = this.op("topk", k, opts);
    return { values: r.get("values"), indices: r.get("indices") };
  }
  item(): TracedValue { return this.op("item"); }

  // shape
  reshape(...shape: Array<number | number[] | TracedValue>): TracedValue { return this.op("reshape", ...shape); }
  view(...shape: Array<number | number[] | TracedValue>): TracedValue { return this.op("view", ...shape); }
  transpose(d0 = -2, d1 = -1): TracedValue { return this.op("transpose", d0, d1); }
  permute(...dims: Array<number | number[]>): TracedValue { return this.op("permute", ...dims); }
  unsqueeze(dim: number): TracedValue { return this.op("unsqueeze", dim); }
  squeeze(dim?: number | number[]): TracedValue { return dim === undefined ? this.op("squeeze") : this.op("squeeze", dim); }
  flatten(startDim = 0, endDim = -1): TracedValue { return this.op("flatten", startDim, endDim); }
  expand(...shape: Array<number | number[] | TracedValue>): TracedValue { return this.op("expand", ...shape); }
  select(dim: number, i: number): TracedValue { return this.op("select", dim, i); }
  slice(dim: number, start: number | null = null, stop: number | null = null, step: number | null = null): TracedValue {
    return this.op("slice", dim, start, stop, step);
  }
  narrow(dim: number, start: number, length: number): TracedValue { return this.op("narrow", dim, start, length); }
  t(): TracedValue { return this.op("t"); }
  clone(): TracedValue { return this.op("clone"); }
  contiguous(): TracedValue { return this.op("contiguous"); }
  to(dtype: string): TracedValue { return this.op("to", dtype); }
  float(): TracedValue { return this.op("float"); }
  indexSelect(dim: number, index: number[] | GraphLike): TracedValue { return this.op("indexSelect", dim, index); }
  gather(dim: number, index: GraphLike): TracedValue { return this.op("gather", dim, index); }

  toString(): string {
    return `TracedValue(node ${this.id})`;
  }
}
