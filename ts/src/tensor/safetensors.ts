/**
 * Safetensors on the native runtime: files are memory-mapped once and every tensor is a zero-copy view
 * into the mapping when used in its stored dtype (a bf16 checkpoint stays bf16 and is not read until a
 * kernel touches it). Writing turns tensors back into a file (results travel this way too).
 *
 * ```ts
 * const w = await loadSafetensors(["model.safetensors"]);     // Map<name, Tensor>
 * await saveSafetensors("out.safetensors", { h: hidden });
 * ```
 */
import { NNsightError, toNNsightError } from "../errors.js";
import { native } from "../native/binding.js";
import { type DType, dtypeId, dtypeSize, isFloat, parseDType } from "./dtype.js";
import {
  RUNTIME_DTYPES,
  type SafetensorsDtype,
  readSafetensorsHeader,
  writeSafetensorsFile,
} from "./safetensors-format.js";
import { keep } from "./scope.js";
import { Tensor } from "./tensor.js";

const TO_ST: Record<DType, SafetensorsDtype> = { float32: "F32", float16: "F16", bfloat16: "BF16", int32: "I32", int64: "I64", bool: "BOOL" };

export interface LoadOptions {
  /** convert float tensors to this dtype while loading (a copy); default: keep as stored (zero-copy) */
  dtype?: DType | string;
  /** only these tensor names (others are skipped) */
  filter?: (name: string) => boolean;
  /** called after each tensor with (done, total) */
  onProgress?: (done: number, total: number, name: string) => void;
  /**
   * skip tensors stored in dtypes the runtime lacks (U8 attention-mask buffers of old GPT-2 files, ...)
   * instead of failing; a model that needs one then reports it missing by name
   */
  skipUnsupported?: boolean;
}

export async function loadSafetensors(files: string[], opts: LoadOptions = {}): Promise<Map<string, Tensor>> {
  const want = opts.dtype ? parseDType(opts.dtype) : undefined;
  const headers = [];
  for (const f of files) headers.push({ file: f, header: await readSafetensorsHeader(f, opts.skipUnsupported ? {} : { allowedDtypes: RUNTIME_DTYPES }) });
  const total = headers.reduce((n, h) => n + h.header.tensors.size, 0);
  const out = new Map<string, Tensor>();
  let done = 0;
  for (const { file, header } of headers) {
    const mapping = mapOrThrow(file);
    try {
      for (const [name, info] of header.tensors) {
        done++;
        if (opts.filter && !opts.filter(name)) continue;
        if (!(RUNTIME_DTYPES as readonly string[]).includes(info.dtype)) continue; // only reachable with skipUnsupported
        if (out.has(name)) throw new NNsightError("IO", `${file}: tensor "${name}" appears in more than one file`, { file, tensor: name });
        const dt = parseDType(info.dtype);
        const convert = want !== undefined && isFloat(dt) && dt !== want;
        // A tensor converted while loading is read once from a mapping of its own, unmapped as soon as
        // the conversion ran: through the shared mapping, every converted tensor's source pages would
        // stay resident until the whole file is done (peak = converted copies + the file).
        const src = convert ? mapOrThrow(file) : mapping;
        let t: Tensor;
        try {
          t = new Tensor(native.viewBytes(src, info.begin, dtypeId(dt), info.shape));
        } catch (e) {
          const err = toNNsightError(e);
          throw new NNsightError(err.code, `${file}: tensor "${name}": ${err.message}`, { file, tensor: name });
        } finally {
          if (src !== mapping) native.dispose(src);
        }
        if (convert) {
          const c = t.to(want);
          t.dispose();
          t = c;
        }
        out.set(name, keep(t));
        opts.onProgress?.(done, total, name);
      }
    } finally {
      native.dispose(mapping);
    }
  }
  return out;
}

function mapOrThrow(file: string) {
  try {
    return native.mapFile(file);
  } catch (e) {
    throw toNNsightError(e);
  }
}

/** Write tensors (any layout; stored row-major in their dtype) to a safetensors file. */
export async function saveSafetensors(path: string, tensors: Record<string, Tensor> | Map<string, Tensor>, metadata?: Record<string, string>) {
  // widest dtypes first: with the 8-byte-aligned header every tensor then starts aligned to its own
  // size, so readers can map it without copying
  const entries = (tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors)).sort((a, b) => dtypeSize(b[1].dtype) - dtypeSize(a[1].dtype));
  await writeSafetensorsFile(
    path,
    entries.map(([name, t]) => ({ name, dtype: TO_ST[t.dtype], shape: [...t.shape], bytes: () => t.bytesSync() })),
    metadata,
  );
}

/** Serialize tensors to an in-memory safetensors buffer (the remote protocol's attachment format). */
export { encodeSafetensors, parseSafetensorsHeader } from "./safetensors-format.js";
export { TO_ST as SAFETENSORS_DTYPE_OF };
