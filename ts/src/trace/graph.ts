/**
 * The intervention graph as data: what `model.trace(...)` records and what the interleaver runs. It is
 * plain JSON (versioned, validated by a zod schema) plus binary attachments for tensors, so the same
 * graph runs locally or on a server, and can be costed and checked before it runs.
 *
 * A node is `{ id, op, args, invoke, step, block }`:
 * - `op` is an allow-listed operation (see ops.ts): a module read (`module`), a write (`set`, `swap`,
 *   `skip`), a tensor method (`add`, `at`, ...), a creation function (`zeros`, `cat`, ...), or control
 *   (`stop`, `log`, `cache`, `step`, `call`).
 * - `args` are JSON values, `{ $ref: id }` (another node's value), `{ $tensor: k }` (attachment k),
 *   arrays and plain objects of those.
 * - `invoke` is the invoke whose batch rows module reads see (null: the whole batch).
 * - `step` is the generation step of module reads (0 = the prompt's pass); nodes inside an `all`/`iter`
 *   block have `block` set and run once per step of the block.
 */
import { z } from "zod";

import { NNsightError } from "../errors.js";
import type { GenerateOptions } from "../models/generate.js";
import { CONTROL_OPS } from "./ops.js";

export const GRAPH_VERSION = 1;

export type Arg = null | boolean | number | string | { $ref: number } | { $tensor: number } | Arg[] | { [k: string]: Arg };

export interface GraphNode {
  id: number;
  op: string;
  args: Arg[];
  /** invoke index (rows of the batch that module reads see); null = all rows */
  invoke: number | null;
  /** generation step for module reads and writes outside blocks */
  step: number;
  /** block id when recorded inside tr.all / tr.iter / tr.cond */
  block: number | null;
  /** `file:line:col` of the user code that recorded it */
  src?: string;
}

export type StepsSpec = { all: true } | { list: number[] } | { start: number; stop: number | null; step: number };

export interface BlockSpec {
  id: number;
  /** steps the block runs at (iteration blocks), or null for a condition block */
  steps: StepsSpec | null;
  /** condition blocks: the node whose value decides whether the block runs */
  cond: Arg | null;
  parent: number | null;
  invoke: number | null;
  /** value returned by the block callback: collected once per step */
  result: Arg;
}

/** A prompt in JSON form: text(s), token id rows, or ids with an attention mask. */
export type InputJSON = string | string[] | number[][] | { input_ids: number[][]; attention_mask?: number[][] };

export interface InvokeSpec {
  /** null: an empty invoke, which adds no rows and sees the whole batch */
  input: InputJSON | null;
}

/**
 * Generation options as a graph carries them: everything but the local streaming callback, plus whether
 * the runner should report tokens (`streamTokens`) and per-step block values (`streamSteps`) as they come
 * (a server sends them as LOG events tagged with STREAM_TAG).
 */
export type GenerateSpec = Omit<GenerateOptions, "stream"> & { streamTokens?: boolean; streamSteps?: boolean };

/** First value of a LOG that carries streamed tokens ([tag, "tokens", tokens, step]) or step values ([tag, "step", step, values]). */
export const STREAM_TAG = "\u0000nnsight:stream";

export interface TraceGraph {
  version: number;
  kind: "trace" | "generate";
  invokes: InvokeSpec[];
  nodes: GraphNode[];
  blocks: BlockSpec[];
  /** the structure the trace callback returned, with node references */
  result: Arg;
  /** nodes marked with .save() */
  saves: number[];
  generate?: GenerateSpec;
}

/** Several traces run in order as one unit; later traces may use earlier traces' nodes by (trace, id). */
export interface SessionGraph {
  version: number;
  kind: "session";
  traces: TraceGraph[];
  /** node ids are unique across the whole session */
  result: Arg;
}

export type AnyGraph = TraceGraph | SessionGraph;

// ------------------------------------------------------------------ schema
/**
 * Arguments are checked by hand: a zod union over recursive values tries every branch and builds an
 * issue object for each failure, which made validation the server's largest per-job cost.
 */
function isArg(v: unknown, depth: number): boolean {
  if (depth > 64) return false;
  if (v === null || typeof v === "boolean") return true;
  if (typeof v === "number") return Number.isFinite(v);
  if (typeof v === "string") return v.length <= 4096;
  if (Array.isArray(v)) {
    if (v.length > 1_000_000) return false;
    for (const x of v) if (!isArg(x, depth + 1)) return false;
    return true;
  }
  if (typeof v !== "object" || Object.getPrototypeOf(v) !== Object.prototype) return false;
  const keys = Object.keys(v);
  if (keys.length === 1 && (keys[0] === "$ref" || keys[0] === "$tensor")) {
    const n = (v as Record<string, unknown>)[keys[0]!];
    return typeof n === "number" && Number.isInteger(n) && n >= 0;
  }
  for (const k of keys) {
    if (k.length > 256 || k.startsWith("$")) return false;
    if (!isArg((v as Record<string, unknown>)[k], depth + 1)) return false;
  }
  return true;
}
const argSchema = z.custom<Arg>((v) => isArg(v, 0), { message: "not a valid graph argument (JSON values, {$ref}, {$tensor})" });

const nodeSchema = z
  .object({
    id: z.number().int().nonnegative(),
    op: z.string().min(1).max(64),
    args: z.array(argSchema).max(64),
    invoke: z.number().int().nonnegative().nullable(),
    step: z.number().int().nonnegative().max(1_000_000),
    block: z.number().int().nonnegative().nullable(),
    src: z.string().max(512).optional(),
  })
  .strict();

const stepsSchema = z.union([
  z.object({ all: z.literal(true) }).strict(),
  z.object({ list: z.array(z.number().int().nonnegative()).max(100_000) }).strict(),
  z.object({ start: z.number().int().nonnegative(), stop: z.number().int().nonnegative().nullable(), step: z.number().int().positive() }).strict(),
]);

const blockSchema = z
  .object({
    id: z.number().int().nonnegative(),
    steps: stepsSchema.nullable(),
    cond: argSchema.nullable(),
    parent: z.number().int().nonnegative().nullable(),
    invoke: z.number().int().nonnegative().nullable(),
    result: argSchema,
  })
  .strict();

const inputSchema = z.union([
  z.string(),
  z.array(z.string()).min(1),
  z.array(z.array(z.number().int().nonnegative())).min(1),
  z.object({ input_ids: z.array(z.array(z.number().int().nonnegative())).min(1), attention_mask: z.array(z.array(z.number().int())).optional() }).strict(),
]);

const generateSchema = z
  .object({
    maxNewTokens: z.number().int().nonnegative().max(100_000).optional(),
    doSample: z.boolean().optional(),
    temperature: z.number().nonnegative().optional(),
    topK: z.number().int().nonnegative().optional(),
    topP: z.number().min(0).max(1).optional(),
    seed: z.number().int().optional(),
    eosTokenId: z.union([z.number().int(), z.array(z.number().int())]).optional(),
    streamTokens: z.boolean().optional(),
    streamSteps: z.boolean().optional(),
  })
  .strict();

export const traceGraphSchema = z
  .object({
    version: z.number().int(),
    kind: z.enum(["trace", "generate"]),
    invokes: z.array(z.object({ input: inputSchema.nullable() }).strict()).max(10_000),
    nodes: z.array(nodeSchema).max(1_000_000),
    blocks: z.array(blockSchema).max(100_000),
    result: argSchema,
    saves: z.array(z.number().int().nonnegative()),
    generate: generateSchema.optional(),
  })
  .strict();

export const sessionGraphSchema = z
  .object({
    version: z.number().int(),
    kind: z.literal("session"),
    traces: z.array(traceGraphSchema).min(1).max(1000),
    result: argSchema,
  })
  .strict();

/** Validate an untrusted graph (JSON already parsed): structure, version, references. */
export function validateGraph(raw: unknown, opts: { attachments?: number; ops?: ReadonlySet<string> } = {}): AnyGraph {
  const kind = (raw as { kind?: unknown } | null)?.kind;
  const version = (raw as { version?: unknown } | null)?.version;
  if (typeof version === "number" && version !== GRAPH_VERSION) {
    throw new NNsightError("VERSION", `graph version ${version} is not supported (this side speaks version ${GRAPH_VERSION})`);
  }
  const parsed = (kind === "session" ? sessionGraphSchema : traceGraphSchema).safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new NNsightError("INVALID_GRAPH", `invalid graph at ${issue.path.join(".") || "(root)"}: ${issue.message}`);
  }
  const g = parsed.data as AnyGraph;
  const traces = g.kind === "session" ? g.traces : [g];
  const seen = new Set<number>();
  for (const t of traces) {
    const blockIds = new Set(t.blocks.map((b) => b.id));
    for (const n of t.nodes) {
      if (seen.has(n.id)) throw new NNsightError("INVALID_GRAPH", `node id ${n.id} appears twice`);
      if (opts.ops && !opts.ops.has(n.op)) throw new NNsightError("INVALID_GRAPH", `unknown op "${n.op}" (node ${n.id})`);
      if (n.invoke !== null && n.invoke >= t.invokes.length) throw new NNsightError("INVALID_GRAPH", `node ${n.id} names invoke ${n.invoke}, but there are ${t.invokes.length}`);
      if (n.block !== null && !blockIds.has(n.block)) throw new NNsightError("INVALID_GRAPH", `node ${n.id} names unknown block ${n.block}`);
      checkRefs(n.args, (r) => r < n.id && seen.has(r), opts.attachments, `node ${n.id}`);
      seen.add(n.id);
    }
    for (const b of t.blocks) {
      checkRefs([b.result], (r) => seen.has(r), opts.attachments, `block ${b.id}`);
      if (b.cond !== null) checkRefs([b.cond], (r) => seen.has(r), opts.attachments, `block ${b.id}`);
    }
    checkRefs([t.result], (r) => seen.has(r), opts.attachments, "result");
    for (const s of t.saves) if (!seen.has(s)) throw new NNsightError("INVALID_GRAPH", `saved node ${s} does not exist`);
  }
  if (g.kind === "session") checkRefs([g.result], (r) => seen.has(r), opts.attachments, "session result");
  return g;
}

function checkRefs(args: Arg[], ok: (r: number) => boolean, attachments: number | undefined, where: string): void {
  const visit = (a: Arg, depth: number): void => {
    if (depth > 64) throw new NNsightError("INVALID_GRAPH", `${where}: arguments nest too deeply`);
    if (a === null || typeof a !== "object") return;
    if (Array.isArray(a)) {
      for (const x of a) visit(x, depth + 1);
      return;
    }
    if ("$ref" in a && typeof a.$ref === "number") {
      if (!ok(a.$ref)) throw new NNsightError("INVALID_GRAPH", `${where} refers to node ${a.$ref}, which is not recorded before it`);
      return;
    }
    if ("$tensor" in a && typeof a.$tensor === "number") {
      if (attachments !== undefined && a.$tensor >= attachments) {
        throw new NNsightError("INVALID_GRAPH", `${where} refers to attachment ${a.$tensor}, but there are ${attachments}`);
      }
      return;
    }
    for (const v of Object.values(a)) visit(v, depth + 1);
  };
  for (const a of args) visit(a, 0);
}

export const isRef = (a: Arg): a is { $ref: number } => a !== null && typeof a === "object" && !Array.isArray(a) && typeof (a as { $ref?: unknown }).$ref === "number";
export const isTensorRef = (a: Arg): a is { $tensor: number } =>
  a !== null && typeof a === "object" && !Array.isArray(a) && typeof (a as { $tensor?: unknown }).$tensor === "number";

/** Every node id an argument refers to. */
export function refsOf(a: Arg, out: number[] = []): number[] {
  if (a === null || typeof a !== "object") return out;
  if (Array.isArray(a)) {
    for (const x of a) refsOf(x, out);
    return out;
  }
  if (isRef(a)) {
    out.push(a.$ref);
    return out;
  }
  if (isTensorRef(a)) return out;
  for (const v of Object.values(a)) refsOf(v, out);
  return out;
}

/**
 * The control ops a graph may use and still share a forward pass: module reads. Every other control op
 * keeps it alone, `swap` too: alone, a replaced value is used as it is (its dtype, its layout), while in a
 * shared pass it would be copied into the batch's rows (in-place edits, `set`, are shareable).
 */
const SHAREABLE_CONTROL: ReadonlySet<string> = new Set(["module"]);
const CONTROL: ReadonlySet<string> = new Set(CONTROL_OPS);

/**
 * Whether a graph may run in one forward pass with other graphs, each on its own rows: a plain trace
 * (no generation) whose every invoke has an input, no blocks, whose module reads each belong to an
 * invoke (so they see only that invoke's rows) and address the module's own call, and no control op
 * but module reads (no swap, skip, stop, cache, module calls, or logs, which a rerun after a failure
 * would repeat). Tensor ops and in-place edits are fine. Checked by the front end to pick jobs and again
 * by the worker.
 */
export function batchableGraph(g: TraceGraph): boolean {
  if (g.kind !== "trace" || g.blocks.length > 0 || g.invokes.length === 0 || g.invokes.some((i) => i.input === null)) return false;
  for (const n of g.nodes) {
    if ((CONTROL.has(n.op) && !SHAREABLE_CONTROL.has(n.op)) || n.block !== null || n.step !== 0) return false;
    if (n.op === "module") {
      if (n.invoke === null) return false;
      const c = n.args[2];
      if (c !== undefined && c !== null && c !== 0) return false;
    }
  }
  return true;
}
