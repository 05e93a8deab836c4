/**
 * Running a recorded graph on a loaded model: builds the batch from the invokes, drives the forward pass
 * (or generation) with the interleaver as hooks, and collects returned and saved values. The same code
 * runs local traces and the server's jobs; it only sees graph data and attachments.
 */
import { NNsightError, toNNsightError } from "../errors.js";
import type { Row } from "../models/batch.js";
import type { CausalLM } from "../models/causal-lm.js";
import { eventOrder } from "../models/module-tree.js";
import { native } from "../native/binding.js";
import { OwnedScope, collectTensors } from "../tensor/scope.js";
import { Tensor, fromArray } from "../tensor/tensor.js";
import type { GenerateOptions } from "../models/generate.js";
import type { ModuleHooks } from "../models/transformer.js";
import { type Arg, type GraphNode, STREAM_TAG, type SessionGraph, type TraceGraph, batchableGraph } from "./graph.js";
import { type InterleaveContext, Interleaver, type RowRange, StopSignal } from "./interleaver.js";
import type { Value } from "./ops.js";

export interface ExecOptions {
  scan?: boolean;
  log?: (values: Value[], node: GraphNode | null) => void;
  /** values of earlier traces (sessions) */
  outer?: Map<number, Value>;
  /** the owned scope to create tensors in (sessions share one) */
  scope?: OwnedScope;
  /**
   * checked between generation steps and between the traces of a session: true ends the job as CANCELLED
   * (a promise is awaited: a tensor-parallel rank agrees with the others before answering)
   */
  shouldAbort?: () => boolean | Promise<boolean>;
  /** generation: called after each step with what the blocks that ran at that step returned (streaming) */
  onStep?: (step: number, values: Record<string, Value>) => void;
}

export interface ExecResult {
  /** graph.result resolved (undefined where a value was never computed) */
  result: Value;
  /** values of saved nodes */
  saved: Map<number, Value>;
  /** values of every non-block node computed (for sessions) */
  values: Map<number, Value>;
  stopped: boolean;
}

const isTensor = (x: unknown): x is Tensor => x instanceof Tensor;

/** Rows of every invoke and the row range each owns (empty invokes own none and see all). */
function invokeRows(model: CausalLM, graph: TraceGraph): { rows: Row[]; ranges: Array<RowRange | null> } {
  const rows: Row[] = [];
  const ranges: Array<RowRange | null> = [];
  for (const inv of graph.invokes) {
    if (inv.input === null) {
      ranges.push(null);
      continue;
    }
    const r = model.toRows(inv.input as never);
    ranges.push({ start: rows.length, count: r.length });
    rows.push(...r);
  }
  if (rows.length === 0) {
    throw new NNsightError("BAD_INPUT", "Cannot run the trace: no invoke has an input, so there is nothing to interleave with");
  }
  return { rows, ranges };
}

export async function executeTrace(model: CausalLM, graph: TraceGraph, attachments: Tensor[], opts: ExecOptions = {}): Promise<ExecResult> {
  const { rows, ranges } = invokeRows(model, graph);
  const ownScope = !opts.scope;
  const scope = opts.scope ?? new OwnedScope();
  const ctx: InterleaveContext = {
    graph,
    lm: model._lm,
    events: eventOrderOf(model),
    attachments,
    rows: ranges,
    batchSize: rows.length,
    outer: opts.outer ?? new Map(),
    scope,
    scan: opts.scan,
    log: opts.log,
    kind: graph.kind,
  };
  const il = new Interleaver(ctx);
  let generatorOutput: Tensor | null = null;
  try {
    if (graph.kind === "trace") {
      il.beginStep(0);
      if (opts.scan) native.setMetaMode(true); // shapes only: no memory, no kernels
      try {
        // a graph with no nodes needs no hooks: the plain forward
        const logits = model._forwardRows(rows, graph.nodes.length === 0 ? null : il);
        logits.dispose();
      } catch (e) {
        if (!(e instanceof StopSignal)) throw e;
      } finally {
        if (opts.scan) native.setMetaMode(false);
      }
      il.endStep();
    } else {
      const { streamTokens, streamSteps, ...g } = graph.generate ?? {};
      if (streamTokens && opts.log) {
        const log = opts.log;
        (g as GenerateOptions).stream = (tokens, step) => log([STREAM_TAG, "tokens", tokens, step], null);
      }
      const onStep = opts.onStep ?? (streamSteps && opts.log ? (step: number, values: Record<string, Value>) => opts.log!([STREAM_TAG, "step", step, values], null) : undefined);
      let res;
      try {
        res = await model._generateRows(rows, g, {
          forStep: (s) => {
            if (!il.hasWork(s)) return null;
            il.beginStep(s);
            return il;
          },
          afterStep: (s) => {
            const after = (abort: boolean): boolean => {
              if (abort) throw new NNsightError("CANCELLED", `the job was stopped after generation step ${s}`);
              if (il.lastStep === s) {
                il.endStep();
                if (onStep) onStep(s, il.stepValues());
              }
              return il.stopped;
            };
            const abort = opts.shouldAbort?.() ?? false;
            return abort instanceof Promise ? abort.then(after) : after(abort);
          },
        });
      } catch (e) {
        if (!(e instanceof StopSignal)) throw e;
        il.endStep();
      }
      if (res) {
        const T = Math.max(...res.sequences.map((s) => s.length));
        const pad = model.tokenizer.padTokenId;
        const ids = new Int32Array(res.sequences.length * T).fill(pad);
        res.sequences.forEach((s, b) => ids.set(s, b * T));
        generatorOutput = scope.within(() => fromArray(ids, "int32", [res.sequences.length, T]));
      }
    }
    if (graph.kind === "generate") il.checkUnreached();
    il.runPost(generatorOutput);
    await native.sync();
    const result = il.resolveLenient(graph.result as Arg, null);
    const saved = new Map<number, Value>();
    for (const id of graph.saves) saved.set(id, il.resolveLenient({ $ref: id }, null));
    const keepSet = new Set<Tensor>();
    collectTensors(result, keepSet, isTensor);
    for (const v of saved.values()) collectTensors(v, keepSet, isTensor);
    // surface kernel errors of returned values now, with the trace, not at a later read
    for (const t of keepSet) {
      const err = native.errorOf(t._handle());
      if (err) throw toNNsightError(err);
    }
    if (ownScope) scope.close(keepSet);
    return { result, saved, values: il.values, stopped: il.stopped };
  } catch (e) {
    if (ownScope) scope.close(new Set());
    throw e;
  }
}

const orders = new WeakMap<object, Map<string, number>>();
function eventOrderOf(model: CausalLM): Map<string, number> {
  let o = orders.get(model.moduleTree);
  if (!o) orders.set(model.moduleTree, (o = eventOrder(model.moduleTree)));
  return o;
}

/** Run the traces of a session in order; later traces see earlier traces' values. */
export async function executeSession(model: CausalLM, session: SessionGraph, attachments: Tensor[], opts: ExecOptions = {}): Promise<{ result: Value; saved: Map<number, Value>; traces: ExecResult[] }> {
  const scope = new OwnedScope();
  const outer = new Map<number, Value>();
  const traces: ExecResult[] = [];
  const saved = new Map<number, Value>();
  try {
    for (const g of session.traces) {
      if (await opts.shouldAbort?.()) throw new NNsightError("CANCELLED", "the session was stopped between traces");
      const r = await executeTrace(model, g, attachments, { ...opts, outer, scope });
      for (const [k, v] of r.values) outer.set(k, v);
      for (const [k, v] of r.saved) saved.set(k, v);
      traces.push(r);
    }
    const result = resolveWith(session.result as Arg, outer);
    const keepSet = new Set<Tensor>();
    collectTensors(result, keepSet, isTensor);
    for (const v of saved.values()) collectTensors(v, keepSet, isTensor);
    for (const t of traces) collectTensors(t.result, keepSet, isTensor);
    scope.close(keepSet);
    return { result, saved, traces };
  } catch (e) {
    scope.close(new Set());
    throw e;
  }
}

function resolveWith(a: Arg, values: Map<number, Value>): Value {
  if (a === null || typeof a !== "object") return a;
  if (Array.isArray(a)) return a.map((x) => resolveWith(x, values));
  if ("$ref" in a && typeof a.$ref === "number") return values.get(a.$ref);
  const out: Record<string, Value> = {};
  for (const [k, v] of Object.entries(a)) out[k] = resolveWith(v as Arg, values);
  return out;
}

/**
 * The user-facing result of a trace: the callback's return value merged with the objects that invokes
 * and blocks returned (block values hold one entry per step). A name used twice for different values is
 * an error; returning a block's own result again is not.
 */
export function mergeResult(result: Value): Value {
  const r = result as { main: Value; parts: Value[] } | undefined;
  if (!r || typeof r !== "object" || !("parts" in r)) return result;
  const isObj = (o: Value): o is Record<string, Value> => o !== null && typeof o === "object" && !Array.isArray(o) && !(o instanceof Tensor);
  const parts = r.parts.filter(isObj);
  if (parts.length === 0) return r.main;
  if (r.main !== undefined && r.main !== null && !isObj(r.main)) {
    throw new NNsightError("BAD_INPUT", "when invokes or blocks return values, the trace callback must return an object of named values (or nothing)");
  }
  const out: Record<string, Value> = {};
  for (const o of [r.main, ...parts]) {
    if (!isObj(o)) continue;
    for (const [k, v] of Object.entries(o)) {
      if (k in out && out[k] !== v) throw new NNsightError("BAD_INPUT", `the result name "${k}" is returned twice (by two invokes or blocks); use distinct names`);
      out[k] = v;
    }
  }
  return out;
}

// ------------------------------------------------------------------ batches of jobs (the service)
/** A graph prepared to share a pass: its rows, and their common length (null where it cannot share one). */
export interface BatchItem {
  graph: TraceGraph;
  attachments: Tensor[];
  rows: Row[];
  ranges: RowRange[];
  /** the length of every row: graphs share a pass only with graphs of the same length (no padding) */
  length: number;
}

/** A batchable graph's rows, or null (not batchable, or rows of different lengths, or padded ones). */
export function prepareBatchItem(model: CausalLM, graph: TraceGraph, attachments: Tensor[]): BatchItem | null {
  // Only where a row computes the same bits whatever rows share its pass (TransformerLM.rowsIndependent:
  // every weight packed for the CPU GEMM). Unpacked weights (bf16, converted dtypes) take another summation
  // order for a few rows than for many, and GPU libraries promise nothing: those models run every job alone.
  if (!batchableGraph(graph) || !model._lm.rowsIndependent()) return null;
  const { rows, ranges } = invokeRows(model, graph);
  const length = rows[0]!.ids.length;
  for (const r of rows) if (r.ids.length !== length || r.mask.some((m) => m !== 1)) return null;
  return { graph, attachments, rows, ranges: ranges as RowRange[], length };
}

/** Hooks that run each graph's interleaver around the same module call, each on its own rows. */
function composeHooks(ils: Interleaver[]): ModuleHooks {
  return {
    call: <T extends Tensor | Tensor[]>(path: string, inputs: Tensor[], body: (x: Tensor[]) => T): T => {
      let f = body;
      for (let i = ils.length - 1; i >= 0; i--) {
        const il = ils[i]!;
        if (!il.wants(path)) continue;
        const inner = f;
        f = (x: Tensor[]) => il.call(path, x, inner);
      }
      return f(inputs);
    },
    wants: (path: string, kind?: "input" | "output") => ils.some((il) => il.wants(path, kind)),
  };
}

/**
 * Run several batchable graphs of the same row length in ONE forward pass: the rows of all of them
 * form one batch, and each graph's interleaver sees only its own rows (its invokes' ranges moved to
 * where its rows sit). Every row is computed as it would be alone (no padding; the kernels treat rows
 * independently), so each result equals that graph's own executeTrace bit for bit
 * (test/remote/batching.test.ts). Any error fails the whole call: the caller reruns the graphs alone,
 * so a graph that fails does not fail the others.
 */
export async function executeTraceBatch(model: CausalLM, items: BatchItem[]): Promise<ExecResult[]> {
  if (items.some((it) => it.length !== items[0]!.length)) throw new NNsightError("INTERNAL", "a batch of graphs with rows of different lengths");
  const rows: Row[] = [];
  const offsets: number[] = [];
  for (const it of items) {
    offsets.push(rows.length);
    rows.push(...it.rows);
  }
  const scope = new OwnedScope();
  const events = eventOrderOf(model);
  const ils = items.map(
    (it, k) =>
      new Interleaver({
        graph: it.graph,
        lm: model._lm,
        events,
        attachments: it.attachments,
        rows: it.ranges.map((r) => ({ start: r.start + offsets[k]!, count: r.count })),
        batchSize: rows.length,
        outer: new Map(),
        scope,
        kind: "trace",
      }),
  );
  try {
    for (const il of ils) il.beginStep(0);
    const active = ils.filter((_, k) => items[k]!.graph.nodes.length > 0);
    const logits = model._forwardRows(rows, active.length ? composeHooks(active) : null);
    logits.dispose();
    for (const il of ils) il.endStep();
    for (const il of ils) il.runPost(null);
    await native.sync();
    const keepSet = new Set<Tensor>();
    const out: ExecResult[] = ils.map((il, k) => {
      const g = items[k]!.graph;
      const result = il.resolveLenient(g.result as Arg, null);
      const saved = new Map<number, Value>();
      for (const id of g.saves) saved.set(id, il.resolveLenient({ $ref: id }, null));
      collectTensors(result, keepSet, isTensor);
      for (const v of saved.values()) collectTensors(v, keepSet, isTensor);
      return { result, saved, values: il.values, stopped: false };
    });
    for (const t of keepSet) {
      const err = native.errorOf(t._handle());
      if (err) throw toNNsightError(err);
    }
    scope.close(keepSet);
    return out;
  } catch (e) {
    scope.close(new Set());
    throw e;
  }
}
