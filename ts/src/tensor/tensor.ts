/**
 * The JS `Tensor`: a view (dtype, shape, strides, offset) over a native, refcounted storage.
 *
 * Views (`reshape`, `transpose`, `at([":", -1])`, `expand`...) never copy. Compute ops are validated at
 * once (shape and dtype errors throw `NNsightError` synchronously) and run on the native executor thread
 * in order; `await t.data()` waits for the values without blocking the event loop, while
 * `t.toFloat32Array()` / `t.toArray()` block until they are ready.
 *
 * ```ts
 * const x = tensor([[1, 2], [3, 4]]);
 * const y = x.matmul(x.t()).add(1);
 * console.log(y.toArray());        // [[6, 12], [12, 26]]
 * y.dispose();                     // or: using y = ...; or scope(() => ...)
 * ```
 *
 * Devices: `tensor.device` is "cpu" or "cuda:N"; `to("cuda")` / `cpu()` copy between them (see
 * device.ts). Ops run on their inputs' device; JS numbers and arrays used as operands are created on
 * the tensor's device; `copy_` copies across devices; any other mix is a DEVICE error.
 */
import { NNsightError, toNNsightError } from "../errors.js";
import { native, nativeMeta, type NativeTensor } from "../native/binding.js";
import { type Device, defaultDeviceIndex, deviceIndexOf, deviceName, parseDevice } from "./device.js";
import { type DType, dtypeFromId, dtypeId, dtypeSize, isFloat, parseDType, promote } from "./dtype.js";
import { OP_IDS, type NativeOpName } from "./op-names.gen.js";
import { formatTensor } from "./print.js";
import { type ReduceArg, type ReduceOpts, reduceOpts } from "./reduce-arg.js";
import { trackTensor } from "./scope.js";

/** One entry per leading dim: a number, a slice ("1:3", "::2", ":" or {start, stop, step}), an array of indices, or "..." */
export type IndexItem = number | string | { start?: number | null; stop?: number | null; step?: number | null } | number[] | null;
export type Index = IndexItem[] | IndexItem;
export type Scalar = number | boolean;
export type TensorLike = Tensor | Scalar | NestedArray;
export type NestedArray = number[] | NestedArray[] | boolean[];

function call(op: NativeOpName, inputs: Array<Tensor | null>, attrs: number[] = []): NativeTensor | NativeTensor[] {
  const hs = inputs.map((t) => (t === null ? null : t._handle()));
  try {
    return native.op(OP_IDS[op], hs, attrs);
  } catch (e) {
    throw toNNsightError(e);
  }
}

const META_STRIDE = native.metaStride;
const MAX_DIMS = native.maxDims;
const META_DEVICE = native.metaDeviceSlot;

export function shapeStr(s: readonly number[]): string {
  return `[${s.join(", ")}]`;
}

/** Broadcast two shapes (NumPy rules). */
export function broadcastShapes(a: readonly number[], b: readonly number[], what = "broadcast"): number[] {
  const n = Math.max(a.length, b.length);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const da = a[a.length - n + i] ?? 1;
    const db = b[b.length - n + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) {
      throw new NNsightError("SHAPE", `${what}: shapes ${shapeStr(a)} and ${shapeStr(b)} cannot be broadcast together`);
    }
    out[i] = da === 1 ? db : da;
  }
  return out;
}

function normDim(dim: number, ndim: number, what: string): number {
  const d = dim < 0 ? dim + ndim : dim;
  if (!Number.isInteger(d) || d < 0 || d >= Math.max(ndim, 1)) {
    throw new NNsightError("INDEX", `${what}: dim ${dim} is out of range for a ${ndim}-d tensor`);
  }
  return d;
}

function parseSlice(item: string | { start?: number | null; stop?: number | null; step?: number | null }) {
  if (typeof item !== "string") return { start: item.start ?? null, stop: item.stop ?? null, step: item.step ?? null };
  const parts = item.split(":");
  if (parts.length < 2 || parts.length > 3) throw new NNsightError("BAD_INPUT", `bad slice "${item}": use "start:stop" or "start:stop:step"`);
  const num = (s: string | undefined) => {
    if (s === undefined || s.trim() === "") return null;
    const v = Number(s);
    if (!Number.isInteger(v)) throw new NNsightError("BAD_INPUT", `bad slice "${item}": "${s}" is not an integer`);
    return v;
  };
  return { start: num(parts[0]), stop: num(parts[1]), step: num(parts[2]) };
}

/** Resolve python-style slice bounds for a dim of size n. */
export function sliceBounds(n: number, s: { start: number | null; stop: number | null; step: number | null }) {
  const step = s.step ?? 1;
  if (step <= 0) throw new NNsightError("BAD_INPUT", `slice step must be positive, got ${step}`);
  const clamp = (v: number) => Math.min(Math.max(v, 0), n);
  const start = s.start === null ? 0 : clamp(s.start < 0 ? s.start + n : s.start);
  const stop = s.stop === null ? n : clamp(s.stop < 0 ? s.stop + n : s.stop);
  const len = stop > start ? Math.ceil((stop - start) / step) : 0;
  return { start, step, len };
}

export class Tensor {
  /** @internal */ _h: NativeTensor | null;
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  readonly offset: number;
  readonly dtype: DType;
  /** "cpu" or "cuda:N" */
  readonly device: Device;
  /** @internal device index (-1 = cpu) */
  readonly _dev: number;

  /**
   * @internal Wrap a handle the last native call returned; `slot` is its position among that call's
   * outputs (metadata comes from the shared buffer). Use `tensor()` and friends to make tensors.
   */
  constructor(h: NativeTensor, slot = 0) {
    this._h = h;
    const m = nativeMeta;
    const base = slot * META_STRIDE;
    const nd = m[base + 1]!;
    const shape = new Array<number>(nd), strides = new Array<number>(nd);
    for (let i = 0; i < nd; i++) {
      shape[i] = m[base + 3 + i]!;
      strides[i] = m[base + 3 + MAX_DIMS + i]!;
    }
    this.shape = shape;
    this.strides = strides;
    this.offset = m[base + 2]!;
    this.dtype = dtypeFromId(m[base]!);
    const dev = m[base + META_DEVICE]!;
    this._dev = dev;
    this.device = dev < 0 ? "cpu" : deviceName(dev);
    trackTensor(this);
  }

  /** @internal */
  _handle(): NativeTensor {
    if (this._h === null) throw new NNsightError("DISPOSED", `tensor ${shapeStr(this.shape)} ${this.dtype} was disposed`);
    return this._h;
  }

  get ndim(): number {
    return this.shape.length;
  }
  get numel(): number {
    let n = 1;
    for (const d of this.shape) n *= d;
    return n;
  }
  get isDisposed(): boolean {
    return this._h === null;
  }
  size(dim?: number): number | readonly number[] {
    return dim === undefined ? this.shape : this.shape[normDim(dim, this.ndim, "size")]!;
  }

  /** Free the native memory now (views and queued kernels keep the storage alive as needed). */
  dispose(): void {
    if (this._h) {
      native.dispose(this._h);
      this._h = null;
    }
  }
  [Symbol.dispose](): void {
    this.dispose();
  }

  // ---------------------------------------------------------------- reading values
  /** The values as a typed array (f16/bf16 widened to Float32Array), without blocking the event loop. */
  async data(): Promise<Float32Array | Int32Array | BigInt64Array | Uint8Array> {
    let buf: ArrayBuffer;
    try {
      buf = await native.read(this._handle(), true);
    } catch (e) {
      throw toNNsightError(e);
    }
    return typedView(buf, this.dtype);
  }
  /** Blocking read as a typed array. */
  dataSync(): Float32Array | Int32Array | BigInt64Array | Uint8Array {
    let buf: ArrayBuffer;
    try {
      buf = native.readSync(this._handle(), true);
    } catch (e) {
      throw toNNsightError(e);
    }
    return typedView(buf, this.dtype);
  }
  /** The raw bytes in the stored dtype, row-major (bf16/f16 not widened), blocking. */
  bytesSync(): Uint8Array {
    try {
      return new Uint8Array(native.readSync(this._handle(), false));
    } catch (e) {
      throw toNNsightError(e);
    }
  }
  /** A flat Float32Array copy of the values (any dtype). */
  toFloat32Array(): Float32Array {
    const d = this.dataSync();
    if (d instanceof Float32Array) return d;
    const out = new Float32Array(d.length);
    for (let i = 0; i < d.length; i++) out[i] = Number(d[i]);
    return out;
  }
  /** Nested JS arrays (numbers; bools as booleans). */
  toArray(): any {
    const d = this.dataSync();
    const flat: Array<number | boolean> = [];
    if (this.dtype === "bool") for (let i = 0; i < d.length; i++) flat.push(d[i] !== 0);
    else for (let i = 0; i < d.length; i++) flat.push(Number(d[i]));
    if (this.ndim === 0) return flat[0];
    let pos = 0;
    const build = (dim: number): any[] => {
      const n = this.shape[dim]!;
      const out = new Array(n);
      for (let i = 0; i < n; i++) out[i] = dim === this.ndim - 1 ? flat[pos++] : build(dim + 1);
      return out;
    };
    return build(0);
  }
  /** The single value of a one-element tensor. */
  item(): number {
    if (this.numel !== 1) throw new NNsightError("SHAPE", `item() needs a one-element tensor, got ${shapeStr(this.shape)}`);
    return Number(this.dataSync()[0]);
  }
  toString(): string {
    return formatTensor(this);
  }
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }

  // ---------------------------------------------------------------- views (no copy)
  /** @internal A view with explicit layout over this tensor's storage. */
  _view(shape: number[], strides: number[], offset: number): Tensor {
    try {
      return new Tensor(native.view(this._handle(), shape, strides, offset));
    } catch (e) {
      throw toNNsightError(e);
    }
  }
  get isContiguous(): boolean {
    let expect = 1;
    for (let i = this.ndim - 1; i >= 0; i--) {
      if (this.shape[i] !== 1 && this.strides[i] !== expect) return false;
      expect *= this.shape[i]!;
    }
    return true;
  }
  /** Reshape; a view when the layout allows (always for contiguous tensors), else a copy. One dim may be -1. */
  reshape(...shapeArg: Array<number | number[]>): Tensor {
    const shape = inferShape(flatShapeArgs(shapeArg), this.numel, this.shape);
    const strides = viewStrides(this.shape, this.strides, shape);
    if (strides) return this._view(shape, strides, this.offset);
    return this.contiguous().reshape(shape);
  }
  /** Like reshape, but never copies: throws SHAPE when the layout cannot be viewed that way. */
  view(...shapeArg: Array<number | number[]>): Tensor {
    const shape = inferShape(flatShapeArgs(shapeArg), this.numel, this.shape);
    const strides = viewStrides(this.shape, this.strides, shape);
    if (!strides) throw new NNsightError("SHAPE", `view(${shapeStr(shape)}) is not possible on this non-contiguous tensor; use reshape()`);
    return this._view(shape, strides, this.offset);
  }
  flatten(startDim = 0, endDim = -1): Tensor {
    if (this.ndim === 0) return this.reshape([1]);
    const s = normDim(startDim, this.ndim, "flatten"), e = normDim(endDim, this.ndim, "flatten");
    const shape = [...this.shape.slice(0, s), this.shape.slice(s, e + 1).reduce((a, b) => a * b, 1), ...this.shape.slice(e + 1)];
    return this.reshape(shape);
  }
  permute(...dimsArg: Array<number | number[]>): Tensor {
    const dims = flatShapeArgs(dimsArg).map((d) => normDim(d, this.ndim, "permute"));
    if (dims.length !== this.ndim || new Set(dims).size !== dims.length) {
      throw new NNsightError("SHAPE", `permute(${dims.join(", ")}) is not a permutation of ${this.ndim} dims`);
    }
    return this._view(dims.map((d) => this.shape[d]!), dims.map((d) => this.strides[d]!), this.offset);
  }
  transpose(d0 = -2, d1 = -1): Tensor {
    if (this.ndim < 2 && d0 === -2 && d1 === -1) return this._view([...this.shape], [...this.strides], this.offset);
    const a = normDim(d0, this.ndim, "transpose"), b = normDim(d1, this.ndim, "transpose");
    const dims = [...Array(this.ndim).keys()];
    dims[a] = b;
    dims[b] = a;
    return this.permute(dims);
  }
  /** Transpose of a 2-D tensor (matrix). */
  t(): Tensor {
    return this.transpose(0, this.ndim < 2 ? 0 : 1);
  }
  unsqueeze(dim: number): Tensor {
    const d = normDim(dim, this.ndim + 1, "unsqueeze");
    const shape = [...this.shape], strides = [...this.strides];
    const st = d < this.ndim ? this.shape[d]! * this.strides[d]! : 1;
    shape.splice(d, 0, 1);
    strides.splice(d, 0, st);
    return this._view(shape, strides, this.offset);
  }
  squeeze(dim?: number | number[]): Tensor {
    const dims =
      dim === undefined
        ? this.shape.map((s, i) => (s === 1 ? i : -1)).filter((i) => i >= 0)
        : (Array.isArray(dim) ? dim : [dim]).map((d) => normDim(d, this.ndim, "squeeze")).filter((d) => this.shape[d] === 1);
    const keep = [...Array(this.ndim).keys()].filter((i) => !dims.includes(i));
    return this._view(keep.map((i) => this.shape[i]!), keep.map((i) => this.strides[i]!), this.offset);
  }
  /** Broadcast to a larger shape without copying (size-1 dims get stride 0). -1 keeps a size. */
  expand(...shapeArg: Array<number | number[]>): Tensor {
    const shape = flatShapeArgs(shapeArg);
    if (shape.length < this.ndim) throw new NNsightError("SHAPE", `expand: cannot expand ${shapeStr(this.shape)} to ${shapeStr(shape)}`);
    const lead = shape.length - this.ndim;
    const strides: number[] = [];
    const out: number[] = [];
    for (let i = 0; i < shape.length; i++) {
      const src = i - lead;
      const want = shape[i]!;
      if (src < 0) {
        if (want < 0) throw new NNsightError("SHAPE", `expand: -1 is not allowed for new leading dims`);
        out.push(want);
        strides.push(0);
        continue;
      }
      const have = this.shape[src]!;
      if (want === -1 || want === have) {
        out.push(have);
        strides.push(this.strides[src]!);
      } else if (have === 1) {
        out.push(want);
        strides.push(0);
      } else {
        throw new NNsightError("SHAPE", `expand: cannot expand ${shapeStr(this.shape)} to ${shapeStr(shape)}`);
      }
    }
    return this._view(out, strides, this.offset);
  }
  broadcastTo(shape: readonly number[]): Tensor {
    if (shape.length === this.ndim && shape.every((s, i) => s === this.shape[i])) return this;
    return this.expand([...shape]);
  }
  /** Select index i along dim (removes the dim). Negative i counts from the end. */
  select(dim: number, i: number): Tensor {
    const d = normDim(dim, this.ndim, "select");
    const n = this.shape[d]!;
    const idx = i < 0 ? i + n : i;
    if (!Number.isInteger(idx) || idx < 0 || idx >= n) {
      throw new NNsightError("INDEX", `index ${i} is out of range for dim ${d} of size ${n} (shape ${shapeStr(this.shape)})`);
    }
    const shape = [...this.shape], strides = [...this.strides];
    shape.splice(d, 1);
    strides.splice(d, 1);
    return this._view(shape, strides, this.offset + idx * this.strides[d]!);
  }
  /** Python-style slice along dim. */
  slice(dim: number, start: number | null = null, stop: number | null = null, step: number | null = null): Tensor {
    const d = normDim(dim, this.ndim, "slice");
    const b = sliceBounds(this.shape[d]!, { start, stop, step });
    const shape = [...this.shape], strides = [...this.strides];
    shape[d] = b.len;
    strides[d] = this.strides[d]! * b.step;
    return this._view(shape, strides, this.offset + (b.len > 0 ? b.start * this.strides[d]! : 0));
  }
  narrow(dim: number, start: number, length: number): Tensor {
    return this.slice(dim, start, start + length);
  }
  /**
   * Index like PyTorch, one entry per leading dim: `t.at([":", -1])` is `t[:, -1]`. Numbers and slices
   * give views; an array of indices gathers (a copy).
   */
  at(index: Index): Tensor {
    const r = this._at(index);
    return r === this ? this._view([...this.shape], [...this.strides], this.offset) : r;
  }

  /** @internal at() that may return this tensor itself (when the index selects everything). */
  _at(index: Index): Tensor {
    const items = normalizeIndex(index, this.ndim);
    let cur: Tensor = this;
    let dim = 0;
    const gathers: Array<{ dim: number; idx: number[] }> = [];
    for (const it of items) {
      if (typeof it === "number") {
        cur = cur.select(dim, it);
      } else if (Array.isArray(it)) {
        gathers.push({ dim, idx: it });
        dim++;
      } else {
        const n = cur.shape[dim]!;
        const whole = (it.start === null || it.start === 0) && (it.stop === null || it.stop >= n) && (it.step === null || it.step === 1);
        if (!whole) cur = cur.slice(dim, it.start, it.stop, it.step); // ":" needs no new view
        dim++;
      }
    }
    for (const g of gathers) cur = cur.indexSelect(g.dim, g.idx);
    return cur;
  }

  // ---------------------------------------------------------------- writing (in place)
  /**
   * Write `value` into this tensor (whole, or the region `index` selects), broadcasting it. In place:
   * every view of the same storage sees the change. Returns this.
   */
  set(indexOrValue: Index | TensorLike, maybeValue?: TensorLike): this {
    if (maybeValue === undefined) {
      this.copy_(indexOrValue as TensorLike);
      return this;
    }
    const items = normalizeIndex(indexOrValue as Index, this.ndim);
    const arrayAt = items.findIndex((it) => Array.isArray(it));
    if (arrayAt < 0) {
      const region = this._at(items as IndexItem[]);
      try {
        // a number fills in place (one kernel); anything else is copied with broadcasting
        if (typeof maybeValue === "number" && region !== this) region.fill_(maybeValue);
        else region.copy_(maybeValue);
      } finally {
        if (region !== this) region.dispose();
      }
      return this;
    }
    // Index arrays: write each selected position through its own view, so the write stays in place.
    const list = items[arrayAt] as number[];
    const before = items.slice(0, arrayAt), after = items.slice(arrayAt + 1);
    const dimPos = before.filter((b) => typeof b !== "number").length; // where the list's dim sits in the region
    const gathered = this.at(items as IndexItem[]);
    const value = asTensor(maybeValue, this.dtype, this._dev);
    const full = value.broadcastTo(gathered.shape);
    gathered.dispose();
    try {
      list.forEach((ix, j) => {
        const region = this.at([...before, ix, ...after] as IndexItem[]);
        const piece = full.select(dimPos, j);
        region.copy_(piece);
        region.dispose();
        piece.dispose();
      });
    } finally {
      if (full !== value) full.dispose();
      if (value !== maybeValue) value.dispose();
    }
    return this;
  }
  /** Copy values from src (broadcast) into this tensor, in place. */
  copy_(src: TensorLike): this {
    if (typeof src === "number") return this.fill_(src);
    let s = asTensor(src, this.dtype, this._dev);
    if (s._dev !== this._dev) {
      // across devices: move the source first (the one op that accepts another device's tensor)
      const moved = s.to(this.device);
      if (s !== src) s.dispose();
      s = moved;
    }
    const b = s.broadcastTo(this.shape);
    call("copy_", [this, b]);
    if (b !== s) b.dispose();
    if (s !== src) s.dispose();
    return this;
  }
  fill_(value: number): this {
    call("fill_", [this], [value]);
    return this;
  }
  zero_(): this {
    return this.fill_(0);
  }

  // ---------------------------------------------------------------- elementwise math
  add(o: TensorLike): Tensor { return binary("add", this, o); }
  sub(o: TensorLike): Tensor { return binary("sub", this, o); }
  mul(o: TensorLike): Tensor { return binary("mul", this, o); }
  div(o: TensorLike): Tensor { return binary("div", this, o); }
  pow(o: TensorLike): Tensor { return binary("pow", this, o); }
  maximum(o: TensorLike): Tensor { return binary("maximum", this, o); }
  minimum(o: TensorLike): Tensor { return binary("minimum", this, o); }
  eq(o: TensorLike): Tensor { return binary("eq", this, o); }
  ne(o: TensorLike): Tensor { return binary("ne", this, o); }
  lt(o: TensorLike): Tensor { return binary("lt", this, o); }
  le(o: TensorLike): Tensor { return binary("le", this, o); }
  gt(o: TensorLike): Tensor { return binary("gt", this, o); }
  ge(o: TensorLike): Tensor { return binary("ge", this, o); }
  neg(): Tensor { return unary("neg", this); }
  abs(): Tensor { return unary("abs", this); }
  exp(): Tensor { return unary("exp", this); }
  log(): Tensor { return unary("log", this); }
  sqrt(): Tensor { return unary("sqrt", this); }
  rsqrt(): Tensor { return unary("rsqrt", this); }
  relu(): Tensor { return unary("relu", this); }
  /** GELU; `approximate: "tanh"` is GPT-2's gelu_new. */
  gelu(opts: { approximate?: "none" | "tanh" } = {}): Tensor { return unary(opts.approximate === "tanh" ? "gelu_tanh" : "gelu", this); }
  silu(): Tensor { return unary("silu", this); }
  tanh(): Tensor { return unary("tanh", this); }
  sigmoid(): Tensor { return unary("sigmoid", this); }
  sin(): Tensor { return unary("sin", this); }
  cos(): Tensor { return unary("cos", this); }
  square(): Tensor { return unary("square", this); }
  reciprocal(): Tensor { return unary("reciprocal", this); }
  where(cond: Tensor, other: TensorLike): Tensor { return where(cond, this, other); }

  // ---------------------------------------------------------------- reductions
  sum(dim: ReduceArg = {}, keepdim?: boolean): Tensor { return reduce("sum", this, reduceOpts(dim, keepdim)); }
  mean(dim: ReduceArg = {}, keepdim?: boolean): Tensor { return reduce("mean", this, reduceOpts(dim, keepdim)); }
  max(dim: ReduceArg = {}, keepdim?: boolean): Tensor { return reduce("max", this, reduceOpts(dim, keepdim)); }
  min(dim: ReduceArg = {}, keepdim?: boolean): Tensor { return reduce("min", this, reduceOpts(dim, keepdim)); }
  prod(dim: ReduceArg = {}, keepdim?: boolean): Tensor { return reduce("prod", this, reduceOpts(dim, keepdim)); }
  argmax(dim: number | { dim?: number; keepdim?: boolean } = {}, keepdim?: boolean): Tensor { return reduce("argmax", this, reduceOpts(dim, keepdim)); }
  argmin(dim: number | { dim?: number; keepdim?: boolean } = {}, keepdim?: boolean): Tensor { return reduce("argmin", this, reduceOpts(dim, keepdim)); }
  /** p-norm (default 2) over dims (default all). */
  norm(opts: ReduceOpts & { p?: number } = {}): Tensor {
    const p = opts.p ?? 2;
    const a = this.abs();
    const pw = p === 1 ? a : a.pow(p);
    const s = pw.sum(opts);
    const r = p === 1 ? s : s.pow(1 / p);
    if (pw !== a) pw.dispose();
    a.dispose();
    if (r !== s) s.dispose();
    return r;
  }
  cumsum(dim: number): Tensor { return call1("cumsum", [this], [normDim(dim, this.ndim, "cumsum")]); }
  softmax(dim = -1): Tensor { return call1("softmax", [this], [normDim(dim, this.ndim, "softmax")]); }
  logSoftmax(dim = -1): Tensor { return call1("log_softmax", [this], [normDim(dim, this.ndim, "logSoftmax")]); }
  /** The k largest values along the last dim (sorted) and their indices. */
  topk(k: number, opts: { dim?: number } = {}): { values: Tensor; indices: Tensor } {
    const dim = normDim(opts.dim ?? -1, this.ndim, "topk");
    const src = dim === this.ndim - 1 ? this : this.transpose(dim, -1);
    const [v, i] = (call("topk", [src], [k]) as NativeTensor[]).map((h, slot) => new Tensor(h, slot)) as [Tensor, Tensor];
    if (src === this) return { values: v, indices: i };
    const r = { values: v.transpose(dim, -1), indices: i.transpose(dim, -1) };
    src.dispose();
    return r;
  }

  // ---------------------------------------------------------------- linear algebra, conversion
  /** torch.matmul semantics (1-D, 2-D and broadcast batched). Float inputs; the result is float32. */
  matmul(o: Tensor): Tensor { return call1("matmul", [this, o]); }
  /** A contiguous copy (the same tensor's values in fresh storage). */
  clone(): Tensor { return this.to(this.dtype, { copy: true }); }
  contiguous(): Tensor { return this.isContiguous ? this._view([...this.shape], [...this.strides], this.offset) : this.clone(); }
  /**
   * Convert dtype, or move to a device: `to("bfloat16")`, `to("cuda")`, `to("cuda:1")`, `to("cpu")`. A copy
   * unless the tensor already has that dtype / is on that device and copy is false. Moving to CUDA where it
   * is unavailable throws NNsightError DEVICE with the reason.
   */
  to(dtypeOrDevice: DType | Device | "cuda" | string, opts: { copy?: boolean } = {}): Tensor {
    const dev = deviceIndexOf(dtypeOrDevice);
    if (dev !== null) return this._toDevice(dev, opts.copy ?? false);
    if (/^(cpu|cuda)/.test(dtypeOrDevice)) parseDevice(dtypeOrDevice); // a malformed device: DEVICE error
    const d = parseDType(dtypeOrDevice);
    if (d === this.dtype && !opts.copy) return this._view([...this.shape], [...this.strides], this.offset);
    return call1("cast", [this], [dtypeId(d)]);
  }
  float(): Tensor { return this.to("float32"); }
  /** A copy in host memory (a view when already there). */
  cpu(): Tensor { return this._toDevice(-1, false); }
  /** A copy on CUDA device `index` (a view when already there). */
  cuda(index = 0): Tensor { return this._toDevice(index, false); }
  private _toDevice(dev: number, copy: boolean): Tensor {
    if (dev === this._dev) return copy ? this.clone() : this._view([...this.shape], [...this.strides], this.offset);
    try {
      return new Tensor(native.toDevice(this._handle(), dev));
    } catch (e) {
      throw toNNsightError(e);
    }
  }
  indexSelect(dim: number, index: number[] | Tensor): Tensor {
    const d = normDim(dim, this.ndim, "indexSelect");
    const idx = Array.isArray(index) ? fromArray(Int32Array.from(index), "int32", [index.length], this._dev) : index;
    try {
      return call1("index_select", [this, idx], [d]);
    } finally {
      if (idx !== index) idx.dispose();
    }
  }
  gather(dim: number, index: Tensor): Tensor { return call1("gather", [this, index], [normDim(dim, this.ndim, "gather")]); }
  scatter_(dim: number, index: Tensor, src: Tensor): this {
    call("scatter_", [this, index, src], [normDim(dim, this.ndim, "scatter_")]);
    return this;
  }
  // ---------------------------------------------------------------- fused transformer kernels
  /** RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight. */
  rmsnormW(weight: Tensor | null, eps: number): Tensor { return call1("rmsnorm", [this, weight], [eps]); }
  /** LayerNorm over the last dim (biased variance). */
  layernormW(weight: Tensor | null, bias: Tensor | null, eps: number): Tensor { return call1("layernorm", [this, weight, bias], [eps]); }
  /** Rotary embedding of x [B, T, H, D] at positions [B, T]; `interleaved` pairs (2i, 2i+1), else (i, i+R/2). */
  rope(positions: Tensor, invFreq: Tensor, interleaved: boolean): Tensor { return call1("rope", [this, positions, invFreq], [interleaved ? 1 : 0]); }
  /** Causal attention: this = q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; mask [B, Tk] (nonzero = attend). */
  attention(k: Tensor, v: Tensor, mask: Tensor | null, scale: number): Tensor { return call1("attention", [this, k, v, mask], [scale]); }
  /** Rows of this [V, D] table at integer ids: [...ids.shape, D]. */
  embedding(ids: Tensor): Tensor { return call1("embedding", [this, ids]); }
  /** this [M, K] @ w [K, N] + bias [N]. */
  linear(w: Tensor, bias: Tensor | null = null): Tensor { return call1("matmul", [this, w, bias]); }
  /**
   * @internal This weight [K, N] in the GEMM's panel layout (kernels/cpu/gemm.h), for linearPacked. With
   * `release`, the pages of a memory-mapped weight are dropped from the process once packed.
   */
  packWeight(release: boolean): Tensor { return call1("pack_weight", [this], [release ? 1 : 0]); }
  /**
   * @internal residual + act(this [M, K] @ w + bias) with w from packWeight (N columns); act: 0 none,
   * 1 gelu_tanh, 2 gelu; residual [M, N] or null (the same bits as adding it afterwards).
   */
  linearPacked(packed: Tensor, bias: Tensor | null, n: number, act: 0 | 1 | 2 = 0, residual: Tensor | null = null): Tensor {
    return call1("linear_packed", [this, packed, bias, residual], [n, act]);
  }
  /** @internal Rows of the [V, D] table whose transpose this packed weight (packWeight of a [D, V] view) is. */
  embeddingPacked(ids: Tensor, vocab: number): Tensor { return call1("embedding", [this, ids], [vocab]); }
  /** @internal Whether packWeight(true) replaces this tensor's memory (a 2-D f32 view of a mapped file, not in scan). */
  canPackWeight(): boolean { return native.canPackWeight(this._handle()); }
  /** @internal Whether this tensor views a read-only file mapping (a weight loaded in place). */
  isMapped(): boolean { return native.isMapped(this._handle()); }

  /** Whether this tensor shares storage with another (views of one tensor do). */
  sharesStorageWith(o: Tensor): boolean {
    return native.sameStorage(this._handle(), o._handle());
  }
}

export type { ReduceOpts, ReduceArg };

function typedView(buf: ArrayBuffer, dtype: DType) {
  switch (dtype) {
    case "int32": return new Int32Array(buf);
    case "int64": return new BigInt64Array(buf);
    case "bool": return new Uint8Array(buf);
    default: return new Float32Array(buf);
  }
}

function flatShapeArgs(a: Array<number | number[]>): number[] {
  return a.length === 1 && Array.isArray(a[0]) ? [...(a[0] as number[])] : (a as number[]);
}

function inferShape(shape: number[], numel: number, from: readonly number[]): number[] {
  const neg = shape.filter((s) => s === -1).length;
  if (neg > 1) throw new NNsightError("SHAPE", `reshape: only one dim may be -1 in ${shapeStr(shape)}`);
  const known = shape.filter((s) => s !== -1).reduce((a, b) => a * b, 1);
  const out = shape.map((s) => (s === -1 ? (known === 0 ? 0 : numel / known) : s));
  if (out.some((s) => !Number.isInteger(s) || s < 0) || out.reduce((a, b) => a * b, 1) !== numel) {
    throw new NNsightError("SHAPE", `cannot reshape ${shapeStr(from)} (${numel} elements) to ${shapeStr(shape)}`);
  }
  return out;
}

/**
 * Strides for viewing (shape, strides) as newShape without copying, or null when impossible. Walks
 * the old dims from the innermost, grouping runs that are contiguous with each other ("chunks"); every
 * new dim must fall inside one chunk.
 */
function viewStrides(shape: readonly number[], strides: readonly number[], newShape: number[]): number[] | null {
  const numel = shape.reduce((a, b) => a * b, 1);
  const out = new Array<number>(newShape.length).fill(1);
  if (numel === 0 || shape.length === 0) {
    let st = 1;
    for (let i = newShape.length - 1; i >= 0; i--) {
      out[i] = st;
      st *= Math.max(newShape[i]!, 1);
    }
    return out;
  }
  let viewD = newShape.length - 1;
  let chunkBase = strides[strides.length - 1]!;
  let tensorNumel = 1;
  let viewNumel = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    tensorNumel *= shape[d]!;
    const chunkEnds = d === 0 || (shape[d - 1] !== 1 && strides[d - 1] !== tensorNumel * chunkBase);
    if (!chunkEnds) continue;
    while (viewD >= 0 && (viewNumel < tensorNumel || newShape[viewD] === 1)) {
      out[viewD] = viewNumel * chunkBase;
      viewNumel *= newShape[viewD]!;
      viewD--;
    }
    if (viewNumel !== tensorNumel) return null;
    if (d > 0) {
      chunkBase = strides[d - 1]!;
      tensorNumel = 1;
      viewNumel = 1;
    }
  }
  return viewD === -1 ? out : null;
}

type NormItem = number | number[] | { start: number | null; stop: number | null; step: number | null };
function normalizeIndex(index: Index, ndim: number): NormItem[] {
  const items: IndexItem[] = Array.isArray(index) ? (index as IndexItem[]) : [index as IndexItem];
  const ell = items.findIndex((it) => it === "...");
  let expanded: IndexItem[] = items;
  if (ell >= 0) {
    const rest = items.length - 1;
    expanded = [...items.slice(0, ell), ...Array(Math.max(ndim - rest, 0)).fill(":"), ...items.slice(ell + 1)];
  }
  if (expanded.length > ndim) {
    throw new NNsightError("INDEX", `too many indices (${expanded.length}) for a ${ndim}-d tensor`);
  }
  return expanded.map((it) => {
    if (typeof it === "number") return it;
    if (Array.isArray(it)) return it as number[];
    if (it === null) return { start: null, stop: null, step: null };
    if (typeof it === "string" || typeof it === "object") return parseSlice(it as string);
    throw new NNsightError("BAD_INPUT", `bad index entry ${JSON.stringify(it)}`);
  });
}

function call1(op: NativeOpName, inputs: Array<Tensor | null>, attrs: number[] = []): Tensor {
  return new Tensor(call(op, inputs, attrs) as NativeTensor);
}

/**
 * @internal Build a tensor from a typed array (copies). `device`: index (-1 = cpu); default: the
 * current default device (cpu unless a CUDA model's forward pass is running).
 */
export function fromArray(data: ArrayBufferView, dtype: DType, shape: number[], device: number = defaultDeviceIndex()): Tensor {
  try {
    return new Tensor(device < 0 ? native.fromBuffer(data, dtypeId(dtype), shape) : native.fromBuffer(data, dtypeId(dtype), shape, device));
  } catch (e) {
    throw toNNsightError(e);
  }
}

/**
 * @internal A scalar or array operand as a tensor (dtype chosen to match `like` for scalars), created on
 * `device` (the other operand's; default: the current default device).
 */
export function asTensor(v: TensorLike, like: DType, device: number = defaultDeviceIndex()): Tensor {
  if (v instanceof Tensor) return v;
  if (typeof v === "number" || typeof v === "boolean") {
    const num = Number(v);
    let dt: DType = like;
    if (!isFloat(like) && !Number.isInteger(num)) dt = "float32";
    if (like === "bool" && typeof v !== "boolean") dt = Number.isInteger(num) ? "int64" : "float32";
    return scalarTensor(num, dt, device);
  }
  return makeTensor(v, { dtype: isFloat(like) ? like : undefined, device: deviceName(device) });
}

function scalarTensor(v: number, dt: DType, dev: number = defaultDeviceIndex()): Tensor {
  switch (dt) {
    case "int32": return fromArray(Int32Array.of(v), dt, [], dev);
    case "int64": return fromArray(BigInt64Array.of(BigInt(Math.trunc(v))), dt, [], dev);
    case "bool": return fromArray(Uint8Array.of(v ? 1 : 0), dt, [], dev);
    case "float32": return fromArray(Float32Array.of(v), dt, [], dev);
    default: {
      const t = fromArray(Float32Array.of(v), "float32", [], dev);
      const r = t.to(dt);
      t.dispose();
      return r;
    }
  }
}

function binary(op: NativeOpName, a: Tensor, o: TensorLike): Tensor {
  const b = asTensor(o, a.dtype, a._dev);
  try {
    const shape = broadcastShapes(a.shape, b.shape, op);
    const ea = a.broadcastTo(shape), eb = b.broadcastTo(shape);
    try {
      return call1(op, [ea, eb]);
    } finally {
      if (ea !== a) ea.dispose();
      if (eb !== b) eb.dispose();
    }
  } finally {
    if (b !== o) b.dispose();
  }
}
function unary(op: NativeOpName, a: Tensor): Tensor {
  return call1(op, [a]);
}

/** Elementwise select: cond ? a : b (broadcast). */
export function where(cond: Tensor, a: TensorLike, b: TensorLike): Tensor {
  const ta = asTensor(a, "float32", cond._dev), tb = asTensor(b, ta.dtype, cond._dev);
  const shape = broadcastShapes(broadcastShapes(cond.shape, ta.shape, "where"), tb.shape, "where");
  const ec = cond.broadcastTo(shape), ea = ta.broadcastTo(shape), eb = tb.broadcastTo(shape);
  try {
    return call1("where", [ec, ea, eb]);
  } finally {
    for (const [x, orig] of [[ec, cond], [ea, ta], [eb, tb]] as const) if (x !== orig) x.dispose();
    if (ta !== a) ta.dispose();
    if (tb !== b) tb.dispose();
  }
}

function reduce(op: NativeOpName, x: Tensor, opts: ReduceOpts): Tensor {
  const keepdim = opts.keepdim ?? false;
  if (opts.dim === undefined) {
    if (op === "argmax" || op === "argmin") {
      const flat = x.reshape([-1]);
      const r = call1(op, [flat], [0]);
      flat.dispose();
      const out = keepdim ? r.reshape(x.shape.map(() => 1)) : r.reshape([]);
      r.dispose();
      return out;
    }
    return reduce(op, x, { dim: [...x.shape.keys()], keepdim });
  }
  const dims = (Array.isArray(opts.dim) ? opts.dim : [opts.dim]).map((d) => normDim(d, x.ndim, op));
  if (x.ndim === 0) return x.clone();
  if (op === "mean" && dims.length > 1) {
    // mean over several dims = sum / count (one rounding, as PyTorch)
    const s = reduce("sum", x, opts);
    const count = dims.reduce((a, d) => a * x.shape[d]!, 1);
    const r = s.div(count);
    s.dispose();
    return r;
  }
  let cur = x;
  for (const d of [...dims].sort((a, b) => b - a)) {
    const next = call1(op, [cur], [d]);
    if (cur !== x) cur.dispose();
    cur = next;
  }
  if (keepdim) return cur;
  const out = cur.squeeze(dims);
  cur.dispose();
  return out;
}

// ---------------------------------------------------------------- creation

/** Where to create a tensor: "cpu" or "cuda[:N]" (default: cpu). */
export interface DeviceOpts {
  device?: Device | "cuda" | string;
}
function deviceOpt(opts: DeviceOpts): number {
  return opts.device === undefined ? defaultDeviceIndex() : parseDevice(opts.device);
}

/** Build a tensor from nested arrays, a typed array, or a number. Default dtype: float32 (int64 for BigInt64Array, ...). */
export function makeTensor(
  data: NestedArray | ArrayBufferView | number | boolean,
  opts: { dtype?: DType | string; shape?: number[] } & DeviceOpts = {},
): Tensor {
  const want = opts.dtype ? parseDType(opts.dtype) : undefined;
  const dev = deviceOpt(opts);
  if (ArrayBuffer.isView(data)) {
    const native_dt: DType =
      data instanceof Int32Array ? "int32" : data instanceof BigInt64Array ? "int64" : data instanceof Uint8Array ? "bool" : "float32";
    let src: ArrayBufferView = data;
    if (!(data instanceof Float32Array || data instanceof Int32Array || data instanceof BigInt64Array || data instanceof Uint8Array)) {
      src = Float32Array.from(data as unknown as ArrayLike<number>);
    }
    const n = (src as unknown as { length: number }).length;
    const shape = opts.shape ?? [n];
    const t = fromArray(src, native_dt, shape, dev);
    if (!want || want === native_dt) return t;
    const r = t.to(want);
    t.dispose();
    return r;
  }
  if (typeof data === "number" || typeof data === "boolean") {
    const dt = want ?? (typeof data === "boolean" ? "bool" : "float32");
    return scalarTensor(Number(data), dt, dev).reshape(opts.shape ?? []);
  }
  // nested arrays
  const shape: number[] = [];
  let probe: unknown = data;
  while (Array.isArray(probe)) {
    shape.push(probe.length);
    probe = probe[0];
  }
  const flat: number[] = [];
  let allBool = true;
  const walk = (v: unknown, d: number) => {
    if (Array.isArray(v)) {
      if (v.length !== shape[d]) throw new NNsightError("SHAPE", `ragged nested array: expected length ${shape[d]} at depth ${d}, got ${v.length}`);
      for (const e of v) walk(e, d + 1);
    } else {
      if (d !== shape.length) throw new NNsightError("SHAPE", `ragged nested array at depth ${d}`);
      if (typeof v !== "boolean") allBool = false;
      if (typeof v !== "number" && typeof v !== "boolean") throw new NNsightError("BAD_INPUT", `tensor data must be numbers, got ${typeof v}`);
      flat.push(Number(v));
    }
  };
  walk(data, 0);
  const dt = want ?? (allBool && flat.length > 0 ? "bool" : "float32");
  const finalShape = opts.shape ?? shape;
  switch (dt) {
    case "int32": return fromArray(Int32Array.from(flat), dt, finalShape, dev);
    case "int64": return fromArray(BigInt64Array.from(flat.map((x) => BigInt(Math.trunc(x)))), dt, finalShape, dev);
    case "bool": return fromArray(Uint8Array.from(flat.map((x) => (x ? 1 : 0))), dt, finalShape, dev);
    case "float32": return fromArray(Float32Array.from(flat), dt, finalShape, dev);
    default: {
      const t = fromArray(Float32Array.from(flat), "float32", finalShape, dev);
      const r = t.to(dt);
      t.dispose();
      return r;
    }
  }
}

export function empty(shape: number[], dtype: DType | string = "float32", opts: DeviceOpts = {}): Tensor {
  const id = dtypeId(parseDType(dtype));
  const dev = deviceOpt(opts);
  try {
    return new Tensor(dev < 0 ? native.empty(shape, id) : native.empty(shape, id, dev));
  } catch (e) {
    throw toNNsightError(e);
  }
}
export function full(shape: number[], value: number, opts: { dtype?: DType | string } & DeviceOpts = {}): Tensor {
  return empty(shape, opts.dtype ?? "float32", opts).fill_(value);
}
export function zeros(shape: number[], opts: { dtype?: DType | string } & DeviceOpts = {}): Tensor {
  return full(shape, 0, opts);
}
export function ones(shape: number[], opts: { dtype?: DType | string } & DeviceOpts = {}): Tensor {
  return full(shape, 1, opts);
}
/** Values start, start+step, ... < stop. Integer arguments give int64 (like PyTorch), else float32. */
export function arange(startOrStop: number, stop?: number, step = 1, opts: { dtype?: DType | string } & DeviceOpts = {}): Tensor {
  const [a, b] = stop === undefined ? [0, startOrStop] : [startOrStop, stop];
  if (step === 0) throw new NNsightError("BAD_INPUT", "arange: step must not be 0");
  const n = Math.max(0, Math.ceil((b - a) / step));
  const ints = [a, b, step].every(Number.isInteger);
  const dt = opts.dtype ? parseDType(opts.dtype) : ints ? "int64" : "float32";
  const vals = Array.from({ length: n }, (_, i) => a + i * step);
  return makeTensor(vals, { dtype: dt, shape: [n], device: opts.device });
}
/** Standard normal samples; the same seed gives the same values on every machine. */
export function randn(shape: number[], opts: { seed?: number; dtype?: DType | string; mean?: number; std?: number } & DeviceOpts = {}): Tensor {
  const t = empty(shape, opts.dtype ?? "float32", opts);
  const seed = opts.seed ?? Math.floor(Math.random() * 2 ** 31);
  call("randn_", [t], [seed, opts.mean ?? 0, opts.std ?? 1]);
  return t;
}
export function cat(tensors: Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw new NNsightError("BAD_INPUT", "cat needs at least one tensor");
  const first = tensors[0]!;
  const d = normDim(dim, first.ndim, "cat");
  let dtype = first.dtype;
  for (const t of tensors) {
    if (t.ndim !== first.ndim || t.shape.some((s, i) => i !== d && s !== first.shape[i])) {
      throw new NNsightError("SHAPE", `cat: shapes ${tensors.map((x) => shapeStr(x.shape)).join(", ")} differ outside dim ${d}`);
    }
    dtype = promote(dtype, t.dtype);
    if (t._dev !== first._dev) throw new NNsightError("DEVICE", `cat: tensors are on different devices (${first.device} and ${t.device})`);
  }
  const shape = [...first.shape];
  shape[d] = tensors.reduce((a, t) => a + t.shape[d]!, 0);
  const out = empty(shape, dtype, { device: first.device });
  let pos = 0;
  for (const t of tensors) {
    const n = t.shape[d]!;
    if (n > 0) {
      const region = out.slice(d, pos, pos + n);
      region.copy_(t);
      region.dispose();
    }
    pos += n;
  }
  return out;
}
export function stack(tensors: Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw new NNsightError("BAD_INPUT", "stack needs at least one tensor");
  const d = normDim(dim, tensors[0]!.ndim + 1, "stack");
  const us = tensors.map((t) => t.unsqueeze(d));
  try {
    return cat(us, d);
  } finally {
    us.forEach((u) => u.dispose());
  }
}

export { dtypeSize };
