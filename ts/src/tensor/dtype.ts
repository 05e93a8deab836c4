/** dtypes: names as in PyTorch (`"float32"`), ids shared with the addon (exported by it, never hard-coded). */
import { NNsightError } from "../errors.js";
import { native } from "../native/binding.js";

export const DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "bool"] as const;
export type DType = (typeof DTYPES)[number];

/** Accepted spellings: PyTorch names, short names and safetensors names. */
const ALIASES: Record<string, DType> = {
  float32: "float32", f32: "float32", float: "float32", F32: "float32",
  float16: "float16", f16: "float16", half: "float16", F16: "float16",
  bfloat16: "bfloat16", bf16: "bfloat16", BF16: "bfloat16",
  int32: "int32", i32: "int32", I32: "int32",
  int64: "int64", i64: "int64", long: "int64", I64: "int64",
  bool: "bool", BOOL: "bool",
};

export function parseDType(d: string): DType {
  const r = ALIASES[d];
  if (!r) throw new NNsightError("DTYPE", `unknown dtype "${d}"; expected one of ${DTYPES.join(", ")}`);
  return r;
}

export function dtypeId(d: DType): number {
  const id = native.dtypes[d];
  if (id === undefined) throw new NNsightError("DTYPE", `the addon does not know dtype ${d}`);
  return id;
}

const BY_ID: DType[] = [];
for (const d of DTYPES) BY_ID[native.dtypes[d]!] = d;
export function dtypeFromId(id: number): DType {
  const d = BY_ID[id];
  if (!d) throw new NNsightError("DTYPE", `unknown dtype id ${id}`);
  return d;
}

export const isFloat = (d: DType): boolean => d === "float32" || d === "float16" || d === "bfloat16";
export const isInt = (d: DType): boolean => d === "int32" || d === "int64";
export const dtypeSize = (d: DType): number => ({ float32: 4, float16: 2, bfloat16: 2, int32: 4, int64: 8, bool: 1 })[d];

/** PyTorch-like promotion for binary ops. */
export function promote(a: DType, b: DType): DType {
  if (a === b) return a;
  if (isFloat(a) && isFloat(b)) return "float32";
  if (isFloat(a)) return a;
  if (isFloat(b)) return b;
  if (a === "bool") return b;
  if (b === "bool") return a;
  return "int64";
}

export type TypedArrayFor<D extends DType> = D extends "int32"
  ? Int32Array
  : D extends "int64"
    ? BigInt64Array
    : D extends "bool"
      ? Uint8Array
      : Float32Array;
