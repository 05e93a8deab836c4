/**
 * The allow-list of graph operations and how each runs on real values. Nothing outside this table can
 * run from a graph (remote graphs are data, never code). `view` marks ops whose result shares storage
 * with their first argument, so an in-place write through them reaches the model's activation.
 */
import { NNsightError } from "../errors.js";
import { Tensor, arange, cat, full, ones, randn, stack, where, zeros } from "../tensor/tensor.js";

export type Value = Tensor | number | boolean | string | null | undefined | Value[] | { [k: string]: Value };

export interface OpDef {
  /** number of leading tensor args the op requires (for error messages) */
  run: (args: any[]) => Value;
  /** result is a view of args[0] */
  view?: boolean;
  /** the op needs the values (reads data back): not allowed in scan */
  reads?: boolean;
}

function tensorArg(v: unknown, op: string, i = 0): Tensor {
  if (v instanceof Tensor) return v;
  throw new NNsightError("BAD_INPUT", `${op}: argument ${i} must be a tensor, got ${v === undefined ? "nothing" : typeof v}`);
}

const m = (name: string, view = false): OpDef => ({
  view,
  run: (a) => {
    const self = tensorArg(a[0], name);
    const fn = (self as unknown as Record<string, (...x: unknown[]) => Value>)[name];
    if (typeof fn !== "function") throw new NNsightError("INVALID_GRAPH", `unknown tensor method ${name}`);
    return fn.apply(self, a.slice(1));
  },
});

const METHODS = [
  "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
  "neg", "abs", "exp", "log", "sqrt", "rsqrt", "relu", "gelu", "silu", "tanh", "sigmoid", "sin", "cos", "square", "reciprocal",
  "sum", "mean", "max", "min", "prod", "argmax", "argmin", "norm", "cumsum", "softmax", "logSoftmax", "topk",
  "matmul", "clone", "to", "float", "indexSelect", "gather",
] as const;
const VIEW_METHODS = ["at", "reshape", "view", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "expand", "contiguous", "t", "select", "slice", "narrow"] as const;

export const OPS: Record<string, OpDef> = {};
for (const n of METHODS) OPS[n] = m(n);
for (const n of VIEW_METHODS) OPS[n] = m(n, true);
// contiguous/reshape may copy; they are still "views" when the layout allows, which is what matters for writes.
// `at` also indexes tuples (a source operation's output such as [q, k]): `value.at(0)`, negative too.
const tensorAt = OPS.at!.run;
OPS.at = {
  view: true,
  run: (a) => {
    if (!Array.isArray(a[0])) return tensorAt(a);
    const tuple = a[0] as Value[];
    const idx = Array.isArray(a[1]) && a[1].length === 1 ? a[1][0] : a[1];
    if (typeof idx !== "number" || !Number.isInteger(idx)) throw new NNsightError("BAD_INPUT", "a tuple is indexed with one integer");
    const i = idx < 0 ? idx + tuple.length : idx;
    if (i < 0 || i >= tuple.length) throw new NNsightError("BAD_INPUT", `index ${idx} is out of range for a tuple of ${tuple.length}`);
    return tuple[i];
  },
};

Object.assign(OPS, {
  /** in-place write: target.set(index?, value); returns the target */
  set: {
    run: ([target, index, value]) => {
      const t = tensorArg(target, "set");
      if (index === null || index === undefined) t.set(value as never);
      else t.set(index as never, value as never);
      return t;
    },
    view: true,
  },
  /** property of a value: tensor shape/ndim/dtype, an object's field, an array's element */
  get: {
    run: ([obj, key]) => {
      if (obj instanceof Tensor) {
        if (key === "shape") return [...obj.shape];
        if (key === "ndim") return obj.ndim;
        if (key === "dtype") return obj.dtype;
        if (key === "numel") return obj.numel;
        throw new NNsightError("BAD_INPUT", `tensors have no property "${String(key)}" in a graph (shape, ndim, dtype, numel)`);
      }
      if (obj !== null && typeof obj === "object" && (typeof key === "string" || typeof key === "number")) {
        // own entries only: a graph must never reach prototypes or functions
        if (!Object.prototype.hasOwnProperty.call(obj, key)) throw new NNsightError("BAD_INPUT", `no entry "${key}" in the value`);
        return (obj as Record<string | number, Value>)[key];
      }
      throw new NNsightError("BAD_INPUT", `cannot read "${String(key)}" of ${typeof obj}`);
    },
  },
  item: { run: ([t]) => tensorArg(t, "item").item(), reads: true },
  tolist: { run: ([t]) => tensorArg(t, "tolist").toArray(), reads: true },
  where: { run: ([c, a, b]) => where(tensorArg(c, "where"), a as never, b as never) },
  cat: { run: ([ts, dim]) => cat(ts as Tensor[], (dim as number) ?? 0) },
  stack: { run: ([ts, dim]) => stack(ts as Tensor[], (dim as number) ?? 0) },
  zeros: { run: ([shape, opts]) => zeros(shape as number[], (opts as object) ?? {}) },
  ones: { run: ([shape, opts]) => ones(shape as number[], (opts as object) ?? {}) },
  full: { run: ([shape, v, opts]) => full(shape as number[], v as number, (opts as object) ?? {}) },
  arange: { run: ([a, b, s, opts]) => arange(a as number, (b as number | null) ?? undefined, (s as number) ?? 1, (opts as object) ?? {}) },
  randn: { run: ([shape, opts]) => randn(shape as number[], (opts as object) ?? {}) },
  /** identity (a user tensor or constant brought into the graph) */
  const: { run: ([v]) => v },
  /** JS-side scalar arithmetic on graph numbers (e.g. a step index): [a, op, b] */
  scalar: {
    run: ([a, op, b]) => {
      const x = Number(a), y = Number(b);
      switch (op) {
        case "+": return x + y;
        case "-": return x - y;
        case "*": return x * y;
        case "/": return x / y;
        case "==": return x === y;
        case "<": return x < y;
        case ">": return x > y;
        default: throw new NNsightError("INVALID_GRAPH", `unknown scalar op ${String(op)}`);
      }
    },
  },
} satisfies Record<string, OpDef>);

/** Control ops handled by the interleaver itself (not in OPS). */
export const CONTROL_OPS = ["module", "swap", "skip", "call", "hookedCall", "step", "log", "stop", "cache", "blockResult"] as const;

export const ALLOWED_OPS: ReadonlySet<string> = new Set([...Object.keys(OPS), ...CONTROL_OPS]);
