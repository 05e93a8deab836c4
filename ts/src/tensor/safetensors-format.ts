/**
 * The safetensors file format, in pure TypeScript: parse and validate a header, encode and write
 * files, and read the index of a sharded checkpoint. The native addon memory-maps the bytes; this
 * file only decides where every tensor lives and refuses anything malformed.
 *
 * Layout (little endian): `u64 N`, then `N` bytes of UTF-8 JSON (optionally padded with spaces),
 * then the data buffer. The JSON maps each tensor name to `{dtype, shape, data_offsets: [begin,
 * end]}` (offsets relative to the start of the data buffer) and may hold a `__metadata__` object
 * of string to string. The tensors must cover the data buffer exactly, without holes or overlaps.
 */
import { open, rename, rm } from "node:fs/promises";
import * as path from "node:path";
import { NNsightError } from "../errors.js";

/** Element size in bytes of every dtype the safetensors format defines (sub-byte ones excluded). */
export const SAFETENSORS_DTYPE_SIZES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  I64: 8,
  U64: 8,
  F64: 8,
} as const;

/** A dtype name as it appears in a safetensors header. */
export type SafetensorsDtype = keyof typeof SAFETENSORS_DTYPE_SIZES;

/** The dtypes the tensor runtime computes with; a loader may pass them as `allowedDtypes`. */
export const RUNTIME_DTYPES: readonly SafetensorsDtype[] = ["F32", "F16", "BF16", "I32", "I64", "BOOL"];

/** Largest header accepted, as in the reference implementation (100 MB). */
export const MAX_HEADER_SIZE = 100_000_000;

/** Where one tensor lives in a file; `begin`/`end` are absolute byte offsets in the file. */
export interface SafetensorsTensorInfo {
  dtype: SafetensorsDtype;
  shape: number[];
  begin: number;
  end: number;
}

/** A parsed and validated header. */
export interface SafetensorsHeader {
  /** Length of the JSON header in bytes (the `N` of the 8-byte prefix). */
  headerSize: number;
  /** Absolute offset of the data buffer: `8 + headerSize`. */
  dataStart: number;
  /** The `__metadata__` object, `{}` when absent. */
  metadata: Record<string, string>;
  /** Tensors in header order. */
  tensors: Map<string, SafetensorsTensorInfo>;
}

/** Options of {@link parseSafetensorsHeader}. */
export interface ParseSafetensorsOptions {
  /** Reject (code `DTYPE`) tensors stored in any other dtype, listing them all. */
  allowedDtypes?: readonly SafetensorsDtype[];
}

/** Is `s` a dtype the safetensors format defines? */
export function isSafetensorsDtype(s: unknown): s is SafetensorsDtype {
  return typeof s === "string" && Object.prototype.hasOwnProperty.call(SAFETENSORS_DTYPE_SIZES, s);
}

/** Number of elements of a shape (1 for a scalar `[]`). */
export function shapeNumel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Bytes a tensor of this dtype and shape occupies. */
export function tensorByteSize(dtype: SafetensorsDtype, shape: readonly number[]): number {
  return shapeNumel(shape) * SAFETENSORS_DTYPE_SIZES[dtype];
}

function ioError(fileName: string, message: string, details: Record<string, unknown> = {}): NNsightError {
  return new NNsightError("IO", `${fileName}: ${message}`, { file: fileName, ...details });
}

/**
 * Read the 8-byte header length. Throws IO when the file is too short for it or the length is not
 * sane (larger than {@link MAX_HEADER_SIZE} or than the file).
 */
export function readHeaderSize(buf: Uint8Array, fileSize: number, fileName: string): number {
  if (fileSize < 8 || buf.length < 8) {
    throw ioError(fileName, `not a safetensors file: ${fileSize} bytes, shorter than the 8-byte header length`);
  }
  const n = new DataView(buf.buffer, buf.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_SIZE)) {
    throw ioError(fileName, `not a safetensors file: header length ${n} exceeds the ${MAX_HEADER_SIZE}-byte limit`);
  }
  const headerSize = Number(n);
  if (headerSize < 2) throw ioError(fileName, `malformed safetensors header: length ${headerSize} is too small`);
  if (8 + headerSize > fileSize) {
    throw ioError(fileName, `truncated safetensors file: header needs ${8 + headerSize} bytes, file has ${fileSize}`);
  }
  return headerSize;
}

function decodeHeaderJson(bytes: Uint8Array, fileName: string): Record<string, unknown> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw ioError(fileName, "malformed safetensors header: not valid UTF-8");
  }
  if (!text.startsWith("{")) throw ioError(fileName, "malformed safetensors header: does not start with '{'");
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw ioError(fileName, `malformed safetensors header: invalid JSON (${(e as Error).message})`);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw ioError(fileName, "malformed safetensors header: not a JSON object");
  }
  return json as Record<string, unknown>;
}

function parseMetadata(value: unknown, fileName: string): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) {
    throw ioError(fileName, "malformed safetensors header: __metadata__ is not an object");
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== "string") throw ioError(fileName, `malformed safetensors header: __metadata__.${k} is not a string`);
    out[k] = v;
  }
  return out;
}

const isIndex = (x: unknown): x is number => typeof x === "number" && Number.isSafeInteger(x) && x >= 0;

/** Validate one entry's fields; offsets are still relative to the data buffer. */
function parseEntry(name: string, value: unknown, fileName: string): { dtype: string; shape: number[]; begin: number; end: number } {
  const bad = (why: string) => ioError(fileName, `malformed safetensors header: tensor "${name}" ${why}`, { tensor: name });
  if (value === null || typeof value !== "object" || Array.isArray(value)) throw bad("is not an object");
  const e = value as Record<string, unknown>;
  if (typeof e.dtype !== "string") throw bad("has no dtype");
  if (!Array.isArray(e.shape) || !e.shape.every(isIndex)) throw bad(`has an invalid shape ${JSON.stringify(e.shape)}`);
  const off = e.data_offsets;
  if (!Array.isArray(off) || off.length !== 2 || !off.every(isIndex)) throw bad(`has invalid data_offsets ${JSON.stringify(off)}`);
  const [begin, end] = off as [number, number];
  if (end < begin) throw bad(`has data_offsets [${begin}, ${end}] that end before they begin`);
  return { dtype: e.dtype, shape: e.shape as number[], begin, end };
}

function checkDtypes(entries: Map<string, { dtype: string }>, fileName: string, allowed?: readonly SafetensorsDtype[]): void {
  const unknown = [...entries].filter(([, e]) => !isSafetensorsDtype(e.dtype));
  if (unknown.length > 0) {
    const list = unknown.map(([n, e]) => `${n} (${e.dtype})`).join(", ");
    throw new NNsightError(
      "DTYPE",
      `${fileName}: unknown safetensors dtype in ${list}; known: ${Object.keys(SAFETENSORS_DTYPE_SIZES).join(", ")}`,
      { file: fileName, tensor: unknown[0]![0] },
    );
  }
  if (!allowed) return;
  const refused = [...entries].filter(([, e]) => !allowed.includes(e.dtype as SafetensorsDtype));
  if (refused.length > 0) {
    const list = refused.map(([n, e]) => `${n} (${e.dtype})`).join(", ");
    throw new NNsightError("DTYPE", `${fileName}: unsupported dtype in ${list}; supported: ${allowed.join(", ")}`, {
      file: fileName,
      tensor: refused[0]![0],
    });
  }
}

/**
 * Check that tensors tile the data buffer `[0, dataSize)` exactly. Entries are visited in offset
 * order, so the first tensor reported for a truncated file is the first one that does not fit.
 */
function checkLayout(entries: Map<string, { begin: number; end: number }>, dataSize: number, fileName: string): void {
  const sorted = [...entries].sort((a, b) => a[1].begin - b[1].begin || a[1].end - b[1].end);
  let cursor = 0;
  for (const [name, e] of sorted) {
    if (e.end > dataSize) {
      throw ioError(
        fileName,
        `truncated safetensors file: tensor "${name}" needs data bytes [${e.begin}, ${e.end}) but the file holds ${dataSize}`,
        { tensor: name },
      );
    }
    if (e.begin !== cursor) {
      const what = e.begin < cursor ? "overlaps the previous tensor" : `leaves a hole of ${e.begin - cursor} bytes before it`;
      throw ioError(fileName, `malformed safetensors header: tensor "${name}" ${what}`, { tensor: name });
    }
    cursor = e.end;
  }
  if (cursor !== dataSize) {
    throw ioError(fileName, `malformed safetensors file: ${dataSize - cursor} trailing bytes after the last tensor`);
  }
}

/**
 * Parse and validate a safetensors header.
 *
 * @param buf the first bytes of the file: at least `8 + headerSize` of them (more is fine)
 * @param fileSize the size of the whole file, to check that every tensor fits
 * @param fileName used in error messages and `details.file`
 * @throws NNsightError `IO` for a truncated or malformed file (naming the file and, where one is
 *   to blame, the tensor in `details.tensor`), `DTYPE` for unknown or refused dtypes
 */
export function parseSafetensorsHeader(
  buf: Uint8Array,
  fileSize: number,
  fileName: string,
  options: ParseSafetensorsOptions = {},
): SafetensorsHeader {
  const headerSize = readHeaderSize(buf, fileSize, fileName);
  const dataStart = 8 + headerSize;
  if (buf.length < dataStart) {
    throw ioError(fileName, `safetensors header needs ${dataStart} bytes, only ${buf.length} were read`);
  }
  const json = decodeHeaderJson(buf.subarray(8, dataStart), fileName);
  const metadata = parseMetadata(json.__metadata__, fileName);
  const entries = new Map<string, { dtype: string; shape: number[]; begin: number; end: number }>();
  for (const [name, value] of Object.entries(json)) {
    if (name !== "__metadata__") entries.set(name, parseEntry(name, value, fileName));
  }
  checkDtypes(entries, fileName, options.allowedDtypes);
  for (const [name, e] of entries) {
    const expected = tensorByteSize(e.dtype as SafetensorsDtype, e.shape);
    if (e.end - e.begin !== expected) {
      throw ioError(
        fileName,
        `malformed safetensors header: tensor "${name}" (${e.dtype} [${e.shape.join(", ")}]) needs ${expected} bytes but data_offsets span ${e.end - e.begin}`,
        { tensor: name },
      );
    }
  }
  checkLayout(entries, fileSize - dataStart, fileName);
  const tensors = new Map<string, SafetensorsTensorInfo>();
  for (const [name, e] of entries) {
    tensors.set(name, { dtype: e.dtype as SafetensorsDtype, shape: e.shape, begin: dataStart + e.begin, end: dataStart + e.end });
  }
  return { headerSize, dataStart, metadata, tensors };
}

/**
 * Read and parse the header of a safetensors file on disk (two small reads; the data is not
 * touched). Throws `IO` when the file is missing, naming it.
 */
export async function readSafetensorsHeader(file: string, options: ParseSafetensorsOptions = {}): Promise<SafetensorsHeader> {
  let fh;
  try {
    fh = await open(file, "r");
  } catch (e) {
    throw new NNsightError("IO", `${file}: cannot open safetensors file (${(e as Error).message})`, { file }, { cause: e });
  }
  try {
    const { size } = await fh.stat();
    const prefix = Buffer.alloc(Math.min(8, size));
    await fh.read(prefix, 0, prefix.length, 0);
    const headerSize = readHeaderSize(prefix, size, file);
    const buf = Buffer.alloc(8 + headerSize);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return parseSafetensorsHeader(buf.subarray(0, bytesRead), size, file, options);
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

/** What a header needs to know about a tensor. */
export interface SafetensorsTensorSpec {
  name: string;
  dtype: SafetensorsDtype;
  shape: readonly number[];
}

/** A tensor with its bytes in memory, for {@link encodeSafetensors}. */
export interface SafetensorsTensorData extends SafetensorsTensorSpec {
  bytes: Uint8Array;
}

/**
 * A tensor for {@link writeSafetensorsFile}: bytes in memory, or a function producing them on
 * demand (one array, or several chunks in order), so that only one tensor at a time is resident.
 */
export interface SafetensorsTensorSource extends SafetensorsTensorSpec {
  bytes: Uint8Array | (() => Uint8Array | Iterable<Uint8Array>);
}

/**
 * Build the 8-byte length plus JSON header for tensors laid out in the given order. The JSON is
 * padded with spaces so that the data buffer starts at a multiple of 8.
 */
export function encodeSafetensorsHeader(specs: readonly SafetensorsTensorSpec[], metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  const seen = new Set<string>();
  for (const t of specs) {
    if (t.name === "__metadata__" || seen.has(t.name)) {
      throw new NNsightError("BAD_INPUT", `safetensors: duplicate or reserved tensor name "${t.name}"`, { tensor: t.name });
    }
    if (!isSafetensorsDtype(t.dtype)) throw new NNsightError("DTYPE", `safetensors: unknown dtype ${String(t.dtype)} for "${t.name}"`);
    if (t.shape.some((d) => !isIndex(d))) throw new NNsightError("SHAPE", `safetensors: invalid shape [${t.shape.join(", ")}] for "${t.name}"`);
    seen.add(t.name);
    const size = tensorByteSize(t.dtype, t.shape);
    header[t.name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + size] };
    offset += size;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20, 8 + json.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}

function checkByteLength(t: SafetensorsTensorSpec, got: number): void {
  const want = tensorByteSize(t.dtype, t.shape);
  if (got !== want) {
    throw new NNsightError(
      "SHAPE",
      `safetensors: tensor "${t.name}" (${t.dtype} [${t.shape.join(", ")}]) needs ${want} bytes, got ${got}`,
      { tensor: t.name },
    );
  }
}

/**
 * Encode tensors (in the given order) as a safetensors file, returned as chunks to write or
 * concatenate: the header first, then each tensor's bytes (not copied).
 */
export function encodeSafetensors(tensors: readonly SafetensorsTensorData[], metadata?: Record<string, string>): Uint8Array[] {
  for (const t of tensors) checkByteLength(t, t.bytes.length);
  return [encodeSafetensorsHeader(tensors, metadata), ...tensors.map((t) => t.bytes)];
}

function* chunksOf(t: SafetensorsTensorSource): Iterable<Uint8Array> {
  const b = typeof t.bytes === "function" ? t.bytes() : t.bytes;
  if (b instanceof Uint8Array) yield b;
  else yield* b;
}

/**
 * Write a safetensors file, one tensor at a time. The file appears atomically (written to a
 * temporary name in the same folder, then renamed). `onTensor` is called after each tensor.
 */
export async function writeSafetensorsFile(
  file: string,
  tensors: readonly SafetensorsTensorSource[],
  metadata?: Record<string, string>,
  onTensor?: (name: string, bytes: number) => void,
): Promise<void> {
  const header = encodeSafetensorsHeader(tensors, metadata);
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const fh = await open(tmp, "w");
  try {
    await fh.write(header);
    for (const t of tensors) {
      let n = 0;
      for (const chunk of chunksOf(t)) {
        await fh.write(chunk);
        n += chunk.length;
      }
      checkByteLength(t, n);
      onTensor?.(t.name, n);
    }
    await fh.close();
    await rename(tmp, file);
  } catch (e) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

/** A parsed `model.safetensors.index.json`. */
export interface ShardIndex {
  /** Tensor name → absolute path of the shard that holds it. */
  weightMap: Map<string, string>;
  /** The distinct shard files, absolute, in order of first appearance. */
  files: string[];
  /** The index's `metadata` object (`total_size` etc.), `{}` when absent. */
  metadata: Record<string, unknown>;
}

/**
 * Parse the index of a sharded checkpoint.
 *
 * @param json the file's text or its parsed JSON
 * @param dir the folder the shard names are relative to
 * @throws NNsightError `IO` when the index is malformed or names a shard outside `dir`
 */
export function parseShardIndex(json: string | unknown, dir: string, fileName = path.join(dir, "model.safetensors.index.json")): ShardIndex {
  let obj: unknown = json;
  if (typeof json === "string") {
    try {
      obj = JSON.parse(json);
    } catch (e) {
      throw ioError(fileName, `invalid JSON (${(e as Error).message})`);
    }
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw ioError(fileName, "shard index is not a JSON object");
  const { weight_map: wm, metadata } = obj as Record<string, unknown>;
  if (wm === null || typeof wm !== "object" || Array.isArray(wm)) throw ioError(fileName, "shard index has no weight_map object");
  const entries = Object.entries(wm as Record<string, unknown>);
  if (entries.length === 0) throw ioError(fileName, "shard index has an empty weight_map");
  const weightMap = new Map<string, string>();
  const files = new Set<string>();
  for (const [name, shard] of entries) {
    if (typeof shard !== "string" || shard === "" || path.isAbsolute(shard) || shard.split(/[\\/]/).includes("..")) {
      throw ioError(fileName, `weight_map["${name}"] is not a shard file name inside the folder: ${JSON.stringify(shard)}`, { tensor: name });
    }
    const abs = path.join(dir, shard);
    files.add(abs);
    weightMap.set(name, abs);
  }
  const meta = metadata && typeof metadata === "object" && !Array.isArray(metadata) ? (metadata as Record<string, unknown>) : {};
  return { weightMap, files: [...files], metadata: meta };
}
