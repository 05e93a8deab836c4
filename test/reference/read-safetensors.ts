// Test-only safetensors reader: just enough to load small fixtures into Float32Arrays for the
// reference forward pass. (The library has its own reader; this one is deliberately separate
// so the reference does not depend on the code it checks.)
//
// Format: u64 little-endian header length N, then N bytes of JSON
// { name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__"?: {...} }, then the
// data block; offsets are relative to the start of the data block.

import { readFileSync } from "node:fs";
import type { RefTensor } from "./forward.js";

interface HeaderEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

/** IEEE half (binary16) bits → number. */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24; // zero / subnormal
  if (exp === 0x1f) return frac === 0 ? sign * Infinity : NaN;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** bfloat16 bits → number (the top 16 bits of a float32). */
export function bf16ToF32(h: number): number {
  const buf = new DataView(new ArrayBuffer(4));
  buf.setUint32(0, (h & 0xffff) << 16, true);
  return buf.getFloat32(0, true);
}

export function readSafetensors(path: string): Map<string, RefTensor> {
  const file = readFileSync(path);
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  const header = JSON.parse(file.subarray(8, 8 + headerLen).toString("utf8")) as Record<string, HeaderEntry>;
  const dataStart = 8 + headerLen;
  const out = new Map<string, RefTensor>();
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = entry.data_offsets;
    const count = entry.shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(count);
    const base = dataStart + begin;
    switch (entry.dtype) {
      case "F32":
        if (end - begin !== count * 4) throw new Error(`${name}: size mismatch`);
        for (let i = 0; i < count; i++) data[i] = view.getFloat32(base + 4 * i, true);
        break;
      case "BF16":
        if (end - begin !== count * 2) throw new Error(`${name}: size mismatch`);
        for (let i = 0; i < count; i++) data[i] = bf16ToF32(view.getUint16(base + 2 * i, true));
        break;
      case "F16":
        if (end - begin !== count * 2) throw new Error(`${name}: size mismatch`);
        for (let i = 0; i < count; i++) data[i] = f16ToF32(view.getUint16(base + 2 * i, true));
        break;
      default:
        throw new Error(`${name}: unsupported dtype ${entry.dtype} (test reader handles F32/BF16/F16)`);
    }
    out.set(name, { shape: entry.shape.slice(), data });
  }
  return out;
}
