/**
 * Recording: while a trace callback runs, every module access and every operation on a TracedValue
 * appends a node to the current Recorder. Nothing runs. The recorder knows the current invoke, the
 * generation step cursor of each invoke, and the open block (tr.all / tr.iter / tr.cond).
 */
import { NNsightError } from "../errors.js";
import { Tensor } from "../tensor/tensor.js";
import type { Arg, BlockSpec, GraphNode, InvokeSpec, StepsSpec, TraceGraph } from "./graph.js";
import { GRAPH_VERSION } from "./graph.js";
import { TracedValue } from "./traced-value.js";

let current: Recorder | null = null;

/** The recorder of the trace being recorded, or an error naming what was accessed. */
export function activeRecorder(what: string, owner?: object): Recorder {
  if (!current) {
    throw new NNsightError(
      "BAD_INPUT",
      `Cannot access ${what} outside of interleaving: module values exist only inside model.trace(...) / model.generate(...) callbacks`,
    );
  }
  if (owner && current.owner !== owner) {
    throw new NNsightError("BAD_INPUT", `${what} belongs to another model than the one being traced`);
  }
  return current;
}

export function isRecording(): boolean {
  return current !== null;
}

/**
 * Where the user's code recorded a node: the first stack frame outside this library. Two ways to know it:
 *
 * - eager: the raw frames are captured while recording (Error.captureStackTrace: about 4 µs a node
 *   whatever the depth, so it was a third to a half of what a trace of 100 interventions costs beyond its
 *   compute) and formatted only when an error message or a serialized graph needs them (nodeSource /
 *   withSources). Sessions, edits and remote graphs always do this.
 * - lazy (local traces and generations by default): nothing is captured; when an error that names a node
 *   leaves the trace, the trace's callback is recorded once more with eager capture (no model runs) and
 *   the node with the same id and op gives the line (Recorder.lazySource, used by the trace runner). A callback that records something
 *   else the second time, or throws, leaves the line out rather than naming a wrong one. Errors that are
 *   caught inside the library (a value missing after a stop) never trigger it.
 */
const captured = new WeakMap<GraphNode, { stack?: string }>();

function attachSource(node: GraphNode): void {
  const holder: { stack?: string } = {};
  const limit = Error.stackTraceLimit;
  // the user's frame sits 2-3 frames up (add <- Envoy/TracedValue/Tracer method <- user); frames cost
  // per frame, so take few
  Error.stackTraceLimit = 4;
  Error.captureStackTrace(holder, attachSource);
  Error.stackTraceLimit = limit;
  captured.set(node, holder);
}

/** `file:line:col` of the user code that recorded this node, if known. */
export function nodeSource(node: GraphNode): string | undefined {
  if (node.src !== undefined) return node.src;
  const h = captured.get(node);
  if (!h) return undefined;
  const src = userFrame(h.stack ?? "");
  captured.delete(node);
  if (src !== undefined) node.src = src;
  return src;
}

/** Give a copy of a node the same (still unformatted) source. */
export function copySource(from: GraphNode, to: GraphNode): void {
  const h = captured.get(from);
  if (h) captured.set(to, h);
  else if (from.src !== undefined) to.src = from.src;
}

/** A lazy resolver for the nodes of one trace: `record()` records its callback again with eager capture. */
export function replaySources(record: () => GraphNode[]): (node: GraphNode) => string | undefined {
  let byId: Map<number, GraphNode> | null = null;
  return (node) => {
    if (byId === null) {
      byId = new Map();
      try {
        for (const n of record()) byId.set(n.id, n);
      } catch {
        // the callback does not record the same way twice: no lines
      }
    }
    const twin = byId.get(node.id);
    return twin && twin.op === node.op ? nodeSource(twin) : undefined;
  };
}

/** Fill in every node's `src` (before a graph is serialized). */
export function withSources<G extends { nodes: GraphNode[] }>(g: G): G {
  for (const n of g.nodes) nodeSource(n);
  return g;
}

function userFrame(stack: string): string | undefined {
  const lines = stack.split("\n").slice(1);
  for (const l of lines) {
    if (/[\\/](ts[\\/]src[\\/](trace|tensor|models)|dist)[\\/]/.test(l) || l.includes("node:internal")) continue;
    const m = /\(?((?:file:\/\/)?[^\s()]+:\d+:\d+)\)?\s*$/.exec(l.trim());
    if (m) return m[1]!.replace(/^file:\/\//, "");
  }
  return undefined;
}

export class Recorder {
  readonly nodes: GraphNode[] = [];
  readonly blocks: BlockSpec[] = [];
  readonly invokes: InvokeSpec[] = [];
  /** user tensors brought into the graph (binary attachments) */
  readonly attachments: Tensor[] = [];
  private readonly attachmentIndex = new Map<Tensor, number>();
  readonly saves = new Set<number>();
  /** TracedValues handed out, so results can be attached after the run */
  readonly values = new Map<number, TracedValue[]>();
  currentInvoke: number | null = null;
  private readonly stepCursor: number[] = [];
  private blockStack: number[] = [];
  /** node ids start here (sessions keep ids unique across traces) */
  private nextId: number;
  readonly kind: "trace" | "generate";
  /** the model whose envoys may record here */
  readonly owner: object;
  /** stop was recorded */
  stopped = false;
  /** how each node's user source line is found (TraceOptions.sourceLines; see `captured` above) */
  sources: "eager" | "lazy" | "off" = "eager";
  /** with sources "lazy": this trace's resolver (nodes without a captured source are looked up here by id) */
  lazySource: ((node: GraphNode) => string | undefined) | null = null;

  constructor(owner: object, kind: "trace" | "generate", firstId = 0) {
    this.owner = owner;
    this.kind = kind;
    this.nextId = firstId;
  }

  /** Run fn with this recorder active (nested recorders are refused: one trace at a time). */
  run<T>(fn: () => T): T {
    if (current !== null && current !== this) {
      throw new NNsightError("BAD_INPUT", "a trace is already being recorded: traces cannot nest (use model.session for several traces)");
    }
    const prev = current;
    current = this;
    try {
      return fn();
    } finally {
      current = prev;
    }
  }

  get lastId(): number {
    return this.nextId - 1;
  }

  // ---------------------------------------------------------------- invokes and steps
  addInvoke(input: InvokeSpec["input"]): number {
    this.invokes.push({ input });
    this.stepCursor.push(0);
    return this.invokes.length - 1;
  }
  inInvoke<T>(idx: number, fn: () => T): T {
    if (this.currentInvoke !== null) throw new NNsightError("BAD_INPUT", "an invoke cannot be opened inside another invoke");
    this.currentInvoke = idx;
    try {
      return fn();
    } finally {
      this.currentInvoke = null;
    }
  }
  step(): number {
    return this.currentInvoke === null ? 0 : this.stepCursor[this.currentInvoke]!;
  }
  advanceStep(n: number): void {
    if (this.currentInvoke === null) {
      for (let i = 0; i < this.stepCursor.length; i++) this.stepCursor[i]! += n;
    } else {
      this.stepCursor[this.currentInvoke]! += n;
    }
  }
  get block(): number | null {
    return this.blockStack.length ? this.blockStack[this.blockStack.length - 1]! : null;
  }
  inBlock<T>(steps: StepsSpec | null, cond: Arg | null, fn: (b: BlockSpec) => T): { block: BlockSpec; value: T } {
    const b: BlockSpec = { id: this.blocks.length, steps, cond, parent: this.block, invoke: this.currentInvoke, result: null };
    this.blocks.push(b);
    this.blockStack.push(b.id);
    try {
      const value = fn(b);
      return { block: b, value };
    } finally {
      this.blockStack.pop();
    }
  }

  // ---------------------------------------------------------------- nodes
  /** Turn a JS value into a graph argument (TracedValues become references, tensors attachments). */
  arg(v: unknown, depth = 0): Arg {
    if (depth > 32) throw new NNsightError("BAD_INPUT", "argument nests too deeply");
    if (v instanceof TracedValue) {
      if (v.recorder !== this && !v.recorder.sharedWith(this)) {
        throw new NNsightError("BAD_INPUT", "a value from another trace was used; to pass values between traces use model.session(...)");
      }
      return { $ref: v.id };
    }
    if (v instanceof Tensor) {
      let k = this.attachmentIndex.get(v);
      if (k === undefined) {
        k = this.attachments.length;
        this.attachments.push(v);
        this.attachmentIndex.set(v, k);
      }
      return { $tensor: k };
    }
    if (v === null || v === undefined) return null;
    if (typeof v === "number" || typeof v === "string" || typeof v === "boolean") return v;
    if (Array.isArray(v)) return v.map((x) => this.arg(x, depth + 1));
    if (typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype) {
      const out: Record<string, Arg> = {};
      for (const [k, x] of Object.entries(v)) out[k] = this.arg(x, depth + 1);
      return out;
    }
    throw new NNsightError("BAD_INPUT", `a ${typeof v === "function" ? "function" : (v as object).constructor?.name ?? typeof v} cannot be part of an intervention graph`);
  }

  /** Append a node; returns its TracedValue. `step` defaults to the max step of its references. */
  add(op: string, args: unknown[], opts: { step?: number; invoke?: number | null } = {}): TracedValue {
    const a = args.map((x) => this.arg(x));
    const id = this.nextId++;
    let step = opts.step;
    if (step === undefined) {
      step = this.step();
      for (const r of refsIn(a)) {
        const n = this.nodeById(r);
        if (n && n.block === null && n.step > step) step = n.step;
      }
    }
    const node: GraphNode = { id, op, args: a, invoke: opts.invoke === undefined ? this.currentInvoke : opts.invoke, step, block: this.block };
    if (this.sources === "eager") attachSource(node);
    this.nodes.push(node);
    const tv = new TracedValue(this, id);
    return tv;
  }

  /** A module value read (`envoy.output` / `.input` / `.inputs`). */
  moduleValue(path: string, kind: "output" | "input" | "inputs", call = 0): TracedValue {
    this.requireInvoke(`${path || "model"}.${kind}`);
    return this.add("module", call === 0 ? [path, kind] : [path, kind, call], { step: this.block === null ? this.step() : 0 });
  }
  /** `envoy.output = v`: replace the module's value for the rest of the pass. */
  swap(path: string, kind: "output" | "input", value: unknown, call = 0): void {
    this.requireInvoke(`${path || "model"}.${kind}`);
    this.add("swap", call === 0 ? [path, kind, value] : [path, kind, value, call], { step: this.block === null ? Math.max(this.step(), this.maxStepOf([value])) : 0 });
  }
  /** `envoy.skip(v)`. */
  skip(path: string, value: unknown, call = 0): void {
    this.requireInvoke(`${path || "model"}.skip`);
    this.add("skip", call === 0 ? [path, value] : [path, value, call], { step: this.block === null ? Math.max(this.step(), this.maxStepOf([value])) : 0 });
  }
  private maxStepOf(values: unknown[]): number {
    let m = 0;
    for (const r of refsIn(values.map((v) => this.arg(v)))) {
      const n = this.nodeById(r);
      if (n && n.block === null) m = Math.max(m, n.step);
    }
    return m;
  }
  private requireInvoke(what: string): void {
    if (this.currentInvoke === null && this.invokes.length > 0) {
      // outside any invoke but the trace has invokes: NNsight semantics are to see the whole batch
      return;
    }
    if (this.invokes.length === 0) {
      throw new NNsightError(
        "BAD_INPUT",
        `Cannot access ${what}: this trace has no input, so there is no interleaving; pass an input (model.trace(input, fn)) or open tr.invoke(input, fn)`,
      );
    }
  }

  nodeById(id: number): GraphNode | undefined {
    const first = this.nodes.length ? this.nodes[0]!.id : 0;
    const n = this.nodes[id - first];
    if (n && n.id === id) return n;
    return this.sessionLookup?.(id);
  }

  /** In a session, earlier traces' nodes are visible through this. */
  sessionLookup?: (id: number) => GraphNode | undefined;
  private shared: Set<Recorder> = new Set();
  /** Recorders of one session share values. */
  share(other: Recorder): void {
    this.shared.add(other);
    other.shared.add(this);
  }
  sharedWith(other: Recorder): boolean {
    return this.shared.has(other);
  }

  toGraph(result: Arg): TraceGraph {
    return {
      version: GRAPH_VERSION,
      kind: this.kind,
      invokes: this.invokes,
      nodes: this.nodes,
      blocks: this.blocks,
      result,
      saves: [...this.saves],
    };
  }
}

function refsIn(a: Arg[], out: number[] = []): number[] {
  for (const x of a) collect(x, out);
  return out;
}
function collect(a: Arg, out: number[]): void {
  if (a === null || typeof a !== "object") return;
  if (Array.isArray(a)) {
    for (const x of a) collect(x, out);
    return;
  }
  if (typeof (a as { $ref?: unknown }).$ref === "number") {
    out.push((a as { $ref: number }).$ref);
    return;
  }
  for (const v of Object.values(a)) collect(v, out);
}
