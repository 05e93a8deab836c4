/**
 * Graphs on the wire: the graph as JSON text plus its tensor attachments as one safetensors buffer
 * (tensors never travel as JSON numbers). `roundTrip` runs a graph through serialize → parse →
 * validate, the proof that a locally traced experiment is remote-safe.
 */
import { NNsightError } from "../errors.js";
import { parseDType } from "../tensor/dtype.js";
import { SAFETENSORS_DTYPE_OF } from "../tensor/safetensors.js";
import { encodeSafetensors, parseSafetensorsHeader } from "../tensor/safetensors-format.js";
import { Tensor, fromArray } from "../tensor/tensor.js";
import { type AnyGraph, validateGraph } from "./graph.js";
import { ALLOWED_OPS } from "./ops.js";
import { withSources } from "./recorder.js";

export interface WireGraph {
  json: string;
  /** safetensors buffer with tensors named "0", "1", ... (empty when there are none) */
  attachments: Uint8Array;
}

export function concatChunks(chunks: Uint8Array[]): Uint8Array {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

/** Tensors to one safetensors buffer, named by index (or by the given names). */
export function tensorsToBuffer(tensors: Tensor[] | Map<string, Tensor>): Uint8Array {
  const entries = tensors instanceof Map ? [...tensors.entries()] : tensors.map((t, i) => [String(i), t] as const);
  if (entries.length === 0) return new Uint8Array(0);
  return concatChunks(encodeSafetensors(entries.map(([name, t]) => ({ name, dtype: SAFETENSORS_DTYPE_OF[t.dtype], shape: [...t.shape], bytes: t.bytesSync() }))));
}

/** A safetensors buffer back to tensors (copies into native memory). */
export function bufferToTensors(buf: Uint8Array, what = "attachments"): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  if (buf.length === 0) return out;
  const h = parseSafetensorsHeader(buf, buf.length, what);
  for (const [name, info] of h.tensors) {
    const dt = parseDType(info.dtype);
    const bytes = buf.slice(info.begin, info.end);
    out.set(name, fromArray(bytes, dt, info.shape));
  }
  return out;
}

export function serializeGraph(graph: AnyGraph, attachments: Tensor[]): WireGraph {
  for (const t of graph.kind === "session" ? graph.traces : [graph]) withSources(t);
  return { json: JSON.stringify(graph), attachments: tensorsToBuffer(attachments) };
}

/** Parse and validate an untrusted graph with its attachments. */
export function deserializeGraph(w: WireGraph): { graph: AnyGraph; attachments: Tensor[] } {
  let raw: unknown;
  try {
    raw = JSON.parse(w.json);
  } catch (e) {
    throw new NNsightError("INVALID_GRAPH", `the graph is not valid JSON: ${(e as Error).message}`);
  }
  const map = bufferToTensors(w.attachments);
  const attachments: Tensor[] = [];
  for (let i = 0; i < map.size; i++) {
    const t = map.get(String(i));
    if (!t) throw new NNsightError("INVALID_GRAPH", `attachment ${i} is missing`);
    attachments.push(t);
  }
  const graph = validateGraph(raw, { attachments: attachments.length, ops: ALLOWED_OPS });
  return { graph, attachments };
}

/** serialize → parse → validate: returns the graph and attachments as a server would see them. */
export function roundTrip(graph: AnyGraph, attachments: Tensor[]): { graph: AnyGraph; attachments: Tensor[] } {
  return deserializeGraph(serializeGraph(graph, attachments));
}
