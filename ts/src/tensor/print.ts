/** Pretty printing in PyTorch's style: `tensor([[1.0000, 2.0000], ...], dtype=float32)`, summarized when large. */
import type { Tensor } from "./tensor.js";

const EDGE = 3;
const MAX_FULL = 1000;

export function formatTensor(t: Tensor): string {
  if (t.isDisposed) return `Tensor(disposed, shape=[${t.shape.join(", ")}], dtype=${t.dtype})`;
  const vals = t.toFloat32Array();
  const summarize = vals.length > MAX_FULL;
  const isInt = t.dtype === "int32" || t.dtype === "int64";
  const isBool = t.dtype === "bool";
  let maxAbs = 0;
  for (const v of vals) if (Number.isFinite(v)) maxAbs = Math.max(maxAbs, Math.abs(v));
  const sci = !isInt && !isBool && (maxAbs >= 1e8 || (maxAbs > 0 && maxAbs < 1e-4));
  const fmt = (v: number): string => {
    if (isBool) return v ? "True" : "False";
    if (isInt) return String(v);
    if (Number.isNaN(v)) return "nan";
    if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
    return sci ? v.toExponential(4) : v.toFixed(4);
  };
  const strs = Array.from(vals, fmt);
  const width = strs.reduce((w, s) => Math.max(w, s.length), 0);
  const strides: number[] = [];
  let st = 1;
  for (let i = t.ndim - 1; i >= 0; i--) {
    strides[i] = st;
    st *= t.shape[i]!;
  }
  const rec = (dim: number, off: number, indent: string): string => {
    if (t.ndim === 0) return strs[0]!;
    const n = t.shape[dim]!;
    const idx = summarize && n > 2 * EDGE ? [...Array(EDGE).keys(), -1, ...Array.from({ length: EDGE }, (_, i) => n - EDGE + i)] : [...Array(n).keys()];
    if (dim === t.ndim - 1) {
      return "[" + idx.map((i) => (i < 0 ? "..." : strs[off + i]!.padStart(width))).join(", ") + "]";
    }
    const sep = ",\n" + "\n".repeat(Math.max(0, t.ndim - dim - 2)) + indent + " ";
    return "[" + idx.map((i) => (i < 0 ? "..." : rec(dim + 1, off + i * strides[dim]!, indent + " "))).join(sep) + "]";
  };
  const body = rec(0, 0, "       ");
  return `tensor(${body}, dtype=${t.dtype}${t.device === "cpu" ? "" : `, device=${t.device}`})`;
}
