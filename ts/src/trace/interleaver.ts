/**
 * The interleaver runs a validated graph inside the model's forward passes. It is the `ModuleHooks`
 * the forward calls at every module boundary.
 *
 * Scheduling: before each forward pass (generation step), every node that belongs to the step gets an
 * event: the hook where it must run. A module read runs at its module's event; a write (`set` through a
 * view of an activation, `swap`, `skip`) runs at the event of the activation it changes, and all its
 * inputs must be available by then, or the graph asks a value to flow backwards in time (OUT_OF_ORDER,
 * raised before the step runs). Any other node runs at the latest event among its inputs. At one event,
 * nodes run in recording order, which is a topological order. A node whose event never fires (a skipped
 * or stopped module, a step past the end) is a MISSED_PROVIDER.
 *
 * Rows: each invoke owns rows [start, start + n) of the batch; its module reads see a view of those
 * rows, so in-place writes touch only them. Empty invokes (and code outside invokes) see every row.
 */
import { type ErrorCode, NNsightError, toNNsightError } from "../errors.js";
import type { ModuleHooks, TransformerLM } from "../models/transformer.js";
import type { OwnedScope } from "../tensor/scope.js";
import { Tensor, cat, full } from "../tensor/tensor.js";
import { type Arg, type BlockSpec, type GraphNode, type TraceGraph, isRef, isTensorRef, refsOf } from "./graph.js";
import { OPS, type Value } from "./ops.js";
import { nodeSource } from "./recorder.js";

export interface RowRange {
  start: number;
  count: number;
}

export interface InterleaveContext {
  graph: TraceGraph;
  lm: TransformerLM;
  events: Map<string, number>;
  attachments: Tensor[];
  /** rows per invoke (null for an empty invoke: the whole batch) */
  rows: Array<RowRange | null>;
  batchSize: number;
  /** values of nodes from earlier traces of a session */
  outer: Map<number, Value>;
  scope: OwnedScope;
  /** scan: values are shapes only; ops that read data are refused */
  scan?: boolean;
  log?: (values: Value[], node: GraphNode | null) => void;
  /** number of generation steps that will run at most (0-based last step), for MISSED_PROVIDER of steps past the end */
  kind: "trace" | "generate";
}

/** Thrown inside the forward pass to end it after tr.stop(). */
export class StopSignal extends Error {
  constructor() {
    super("stopped");
  }
}

interface Instance {
  node: GraphNode;
  /** call index of a module read/write that runs when that call of the module happens (see countedCall) */
  call?: number;
  /** block instance values (null for non-block nodes) */
  frame: Frame | null;
  event: number;
  done: boolean;
  /** cache capture of one module (for cache nodes) */
  capture?: { path: string; kind: "output" | "input" };
}

interface Frame {
  block: BlockSpec;
  step: number;
  values: Map<number, Value>;
}

const key = (path: string, kind: string) => `${path}\0${kind}`;
/** A module's output: a tensor, or a tuple of them for some source operations (`apply_rotary_pos_emb_0`). */
type MV = Tensor | Tensor[];
const key3 = (path: string, kind: string, call: number) => `${path}\0${kind}\0${call}`;

/** The call index a module read/write addresses (a trailing argument; 0 when absent). */
function callIndexOf(n: GraphNode): number {
  const i = n.op === "module" ? 2 : n.op === "swap" ? 3 : n.op === "skip" ? 2 : -1;
  const c = i >= 0 ? n.args[i] : undefined;
  if (c === undefined || c === null) return 0;
  if (typeof c !== "number" || !Number.isInteger(c) || c < 0) throw new NNsightError("INVALID_GRAPH", `node ${n.id}: the call index must be a non-negative integer`);
  return c;
}

export class Interleaver implements ModuleHooks {
  private readonly g: TraceGraph;
  private readonly ctx: InterleaveContext;
  /** values of non-block nodes */
  readonly values = new Map<number, Value>();
  /** per block: the value its callback returned, once per step it ran */
  readonly blockResults = new Map<number, Value[]>();
  /** the last frame of each block (for values used after the block) */
  private readonly lastFrame = new Map<number, Frame>();
  private readonly byId = new Map<number, GraphNode>();
  private readonly blockNodes = new Map<number, GraphNode[]>();
  private readonly children = new Map<number, BlockSpec[]>();
  /** modules that have scheduled work this step */
  private active = new Set<string>();
  /** per active path, which sides the graph touches: 1 = inputs (read or replaced), 2 = output (read, replaced or skipped) */
  private activeSides = new Map<string, number>();
  private schedule = new Map<number, Instance[]>();
  private instances: Instance[] = [];
  private provided = new Map<string, Tensor | Tensor[]>();
  private skips = new Map<string, Array<{ invoke: number | null; value: Value }>>();
  private step = 0;
  /** cache node id -> collected entries */
  readonly caches = new Map<number, Record<string, { output?: Value; inputs?: Value }>>();
  stopped = false;
  lastStep = -1;

  // ---- calls counted within a pass (modules that run several times: `call(x, { hook: true })`, `nth(i)`)
  /** module paths whose calls are counted this step (hooked-call targets; their submodules too), or null */
  private counted: string[] | null = null;
  private callCount = new Map<string, number>();
  /** reads/writes of call i of a module, keyed by key3(path, kind, i); they run when that call happens */
  private dynKeyed = new Map<string, Instance[]>();
  /** nodes that depend on such values: they run as soon as all their inputs exist */
  private dynPending: Instance[] = [];
  /** values of counted calls; `natural` = the forward pass's own call (rows belong to invokes) */
  private dynProvided = new Map<string, { value: Tensor | Tensor[]; natural: boolean }>();
  private dynSkips = new Map<string, Array<{ invoke: number | null; value: Value }>>();
  /** the counted-call event being fired (in-place edits must happen while it is open) */
  private currentDyn: string | null = null;
  private readonly hookedHooks: ModuleHooks = {
    call: <T extends MV>(p: string, ins: Tensor[], body: (x: Tensor[]) => T): T => (this.active.has(p) && this.isCounted(p) ? (this.countedCall(p, ins, body, false) as T) : body(ins)),
    wants: (p: string) => this.active.has(p) && this.isCounted(p), // both sides (counted calls are not split by side)
  };

  constructor(ctx: InterleaveContext) {
    this.ctx = ctx;
    this.g = ctx.graph;
    for (const n of this.g.nodes) {
      this.byId.set(n.id, n);
      if (n.block !== null) {
        let l = this.blockNodes.get(n.block);
        if (!l) this.blockNodes.set(n.block, (l = []));
        l.push(n);
      }
    }
    for (const b of this.g.blocks) {
      const p = b.parent ?? -1;
      let l = this.children.get(p);
      if (!l) this.children.set(p, (l = []));
      l.push(b);
    }
  }

  // ------------------------------------------------------------------ scheduling
  private ev(path: string, kind: "input" | "output", node: GraphNode): number {
    const e = this.ctx.events.get(key(path, kind));
    if (e === undefined) {
      throw this.err("BAD_PATH", `there is no module "${path}" in this model`, node, path);
    }
    return e;
  }

  /** Does this step have any work (else the forward runs without hooks)? */
  hasWork(step: number): boolean {
    return (
      this.g.nodes.some((n) => n.block === null && (n.step === step || (n.op === "cache" && n.step < step)) && !isPost(n, this)) ||
      this.g.blocks.some((b) => b.parent === null && stepIn(b, step, this.ctx.kind))
    );
  }

  /** Prepare the instances of one forward pass; throws OUT_OF_ORDER before anything runs. */
  beginStep(step: number): void {
    this.step = step;
    this.lastStep = step;
    this.provided.clear();
    this.skips.clear();
    this.schedule = new Map();
    this.instances = [];
    this.active = new Set();
    this.activeSides = new Map();
    this.callCount.clear();
    this.dynKeyed.clear();
    this.dynPending = [];
    this.dynProvided.clear();
    this.dynSkips.clear();
    this.counted = null;
    const events = new Map<number, number>(); // node id -> event (this step)
    const frames = new Map<number, Frame>();
    // the nodes of this step, in id order
    const list: Array<{ node: GraphNode; frame: Frame | null }> = [];
    for (const n of this.g.nodes) {
      if (n.block === null) {
        // a cache records every step from the one it was created at (one entry per step)
        const due = n.step === step || (n.op === "cache" && n.step < step);
        if (due && !isPost(n, this)) list.push({ node: n, frame: null });
      }
    }
    const addBlock = (b: BlockSpec) => {
      const f: Frame = { block: b, step, values: new Map() };
      frames.set(b.id, f);
      for (const n of this.blockNodes.get(b.id) ?? []) list.push({ node: n, frame: f });
      for (const c of this.children.get(b.id) ?? []) if (c.steps === null || stepIn(c, step, this.ctx.kind)) addBlock(c);
    };
    for (const b of this.children.get(-1) ?? []) if (stepIn(b, step, this.ctx.kind)) addBlock(b);
    list.sort((a, b) => a.node.id - b.node.id);
    for (const { node } of list) {
      if (node.op === "hookedCall" || ((node.op === "module" || node.op === "swap" || node.op === "skip") && callIndexOf(node) > 0)) {
        (this.counted ??= []).push(String(node.args[0]));
      }
    }

    let maxSoFar = 0;
    const dyn = new Set<number>();
    for (const { node, frame } of list) {
      if (this.scheduleCounted(node, frame, dyn)) continue;
      const depEvent = (r: number): number => {
        const e = events.get(r);
        return e === undefined ? 0 : e; // from an earlier step, an outer trace, or a constant: available
      };
      const refs = refsOf(node.args as Arg);
      const blk = frame ? frame.block : null;
      if (blk && blk.cond !== null) refs.push(...refsOf(blk.cond));
      let deps = 0;
      for (const r of refs) deps = Math.max(deps, depEvent(r));
      let event = deps;
      const a = node.args;
      const anchorCheck = (anchor: number, what: string) => {
        if (deps > anchor) {
          const path = this.pathOf(node);
          throw this.err(
            "OUT_OF_ORDER",
            `${what}${path ? ` of ${path}` : ""} needs a value that is computed later in the forward pass than the point where it must run`,
            node,
            path,
          );
        }
        return anchor;
      };
      switch (node.op) {
        case "module": {
          const [path, kind] = a as [string, string];
          event = this.ev(path, kind === "output" ? "output" : "input", node);
          this.mark(path, kind === "output" ? 2 : 1);
          break;
        }
        case "swap": {
          const [path, kind] = a as [string, "input" | "output"];
          event = anchorCheck(this.ev(path, kind, node), `setting ${path}.${kind}`);
          this.mark(path, kind === "output" ? 2 : 1);
          break;
        }
        case "skip": {
          const [path] = a as [string];
          event = anchorCheck(this.ev(path, "input", node), `skipping ${path}`);
          this.mark(path, 2);
          break;
        }
        case "set": {
          const anchor = this.viewAnchor(a[0] as Arg, events);
          if (anchor !== undefined) event = anchorCheck(anchor, "an in-place edit");
          break;
        }
        case "stop":
          event = maxSoFar;
          break;
        case "cache": {
          const opts = (a[0] ?? {}) as { modules?: string[] | null; inputs?: boolean };
          const mods = opts.modules ?? [...this.ctx.events.keys()].filter((k) => k.endsWith("\0output")).map((k) => k.slice(0, -7)).filter((p) => p !== "" && !p.includes(".source."));
          for (const path of mods) {
            const inst: Instance = { node, frame, event: this.ev(path, "output", node), done: false, capture: { path, kind: "output" } };
            this.push(inst);
            this.mark(path, opts.inputs ? 3 : 2);
          }
          event = 0;
          break;
        }
      }
      events.set(node.id, event);
      maxSoFar = Math.max(maxSoFar, event);
      if (node.op !== "cache") this.push({ node, frame, event, done: false });
    }
    for (const f of frames.values()) this.lastFrame.set(f.block.id, f);
    this.frames = frames;
  }
  private frames = new Map<number, Frame>();

  /**
   * Nodes tied to counted calls: reads/writes of call i of a module (i > 0, or any call of a module that a
   * hooked call also runs), which run when that call happens, and every node that depends on one, which
   * runs as soon as its inputs exist. Returns false for ordinary nodes (scheduled at a static event).
   */
  private scheduleCounted(node: GraphNode, frame: Frame | null, dyn: Set<number>): boolean {
    const op = node.op;
    const addressed = op === "module" || op === "swap" || op === "skip";
    const call = addressed ? callIndexOf(node) : 0;
    const path = addressed ? String(node.args[0]) : "";
    const keyed = addressed && (call > 0 || this.isCounted(path));
    let dependent = false;
    if (!keyed && dyn.size > 0) {
      if (op === "stop") dependent = true;
      else {
        const refs = refsOf(node.args as Arg);
        if (frame && frame.block.cond !== null) refs.push(...refsOf(frame.block.cond));
        dependent = refs.some((r) => dyn.has(r));
      }
    }
    if (!keyed && !dependent) return false;
    dyn.add(node.id);
    const inst: Instance = { node, frame, event: -1, done: false };
    if (keyed) {
      inst.call = call;
      const kind = op === "skip" ? "input" : op === "swap" ? String(node.args[1]) : node.args[1] === "output" ? "output" : "input";
      const k = key3(path, kind, call);
      let l = this.dynKeyed.get(k);
      if (!l) this.dynKeyed.set(k, (l = []));
      l.push(inst);
      this.mark(path, 3);
    } else {
      this.dynPending.push(inst);
    }
    this.instances.push(inst);
    return true;
  }

  private isCounted(path: string): boolean {
    const c = this.counted;
    if (c === null) return false;
    for (const p of c) if (p === "" || path === p || (path.length > p.length && path.startsWith(p) && path[p.length] === ".")) return true;
    return false;
  }

  /** One call of a counted module: numbered in the order calls happen; fires that call's reads and writes. */
  private countedCall(path: string, inputs: Tensor[], body: (inputs: Tensor[]) => MV, natural: boolean): MV {
    const c = this.callCount.get(path) ?? 0;
    this.callCount.set(path, c + 1);
    const kin = key3(path, "input", c);
    const kout = key3(path, "output", c);
    this.dynProvided.set(kin, { value: inputs, natural });
    this.fireDyn(kin);
    let ins = this.dynProvided.get(kin)!.value as Tensor[];
    if (natural) {
      this.provided.set(key(path, "input"), ins);
      this.fire(this.ctx.events.get(key(path, "input"))!);
      ins = this.provided.get(key(path, "input")) as Tensor[];
    }
    const skip = this.dynSkips.get(kin);
    let out: MV;
    if (skip && (!natural || this.coversAll(skip.map((s) => s.invoke)))) {
      out = this.assembleSkip(natural ? skip : skip.map((s) => ({ invoke: null, value: s.value })));
    } else {
      out = body(ins);
      if (skip) out = this.applyRows(out, skip);
    }
    this.dynProvided.set(kout, { value: out, natural });
    this.fireDyn(kout);
    out = this.dynProvided.get(kout)!.value;
    if (natural) {
      this.provided.set(key(path, "output"), out);
      this.fire(this.ctx.events.get(key(path, "output"))!);
      out = this.provided.get(key(path, "output"))!;
    }
    return out;
  }

  private fireDyn(k: string): void {
    const list = this.dynKeyed.get(k);
    if (!list && this.dynPending.length === 0) return;
    const prev = this.currentDyn;
    this.currentDyn = k;
    try {
      if (list) {
        for (const inst of list) {
          if (inst.done) continue;
          if (!this.ready(inst)) {
            const path = this.pathOf(inst.node);
            throw this.err("OUT_OF_ORDER", `${inst.node.op} of ${path} (call ${inst.call}) needs a value that is computed later than that call`, inst.node, path);
          }
          this.execute(inst);
        }
      }
      this.runReady();
    } finally {
      this.currentDyn = prev;
    }
  }

  /** Run every pending dependent of counted-call values whose inputs now exist. */
  private runReady(): void {
    let progress = true;
    while (progress) {
      progress = false;
      for (const inst of this.dynPending) {
        if (inst.done || !this.ready(inst)) continue;
        if (inst.node.op === "set") this.checkEditOpen(inst.node);
        this.execute(inst);
        progress = true;
      }
    }
  }

  private ready(inst: Instance): boolean {
    const n = inst.node;
    if (n.op === "stop") return this.instances.every((o) => o.done || o.node.id > n.id || o.capture !== undefined);
    const refs = refsOf(n.args as Arg);
    if (inst.frame && inst.frame.block.cond !== null) refs.push(...refsOf(inst.frame.block.cond));
    for (const r of refs) if (!this.hasValue(r, inst.frame)) return false;
    return true;
  }

  private hasValue(id: number, frame: Frame | null): boolean {
    for (let f: Frame | null = frame; f; f = f.block.parent !== null ? (this.frames.get(f.block.parent) ?? null) : null) {
      if (f.values.has(id)) return true;
    }
    if (this.values.has(id) || this.ctx.outer.has(id)) return true;
    const n = this.byId.get(id);
    if (n && n.block !== null) return this.lastFrame.get(n.block)?.values.has(id) ?? false;
    return n === undefined; // unknown ids fail later with INVALID_GRAPH
  }

  /** An in-place edit of a counted call's value must run while that call's hook is open. */
  private checkEditOpen(n: GraphNode): void {
    let a = n.args[0] as Arg;
    for (let depth = 0; depth < 1000 && isRef(a); depth++) {
      const d = this.byId.get(a.$ref);
      if (!d) return;
      if (d.op === "module") {
        const c = callIndexOf(d);
        const path = String(d.args[0]);
        if (c === 0 && !this.isCounted(path)) return;
        const k = key3(path, d.args[1] === "output" ? "output" : "input", c);
        if (this.currentDyn !== k) {
          throw this.err("OUT_OF_ORDER", `an in-place edit of ${path} (call ${c}) needs a value that is computed later than that call`, n, path);
        }
        return;
      }
      if (d.op !== "set" && !OPS[d.op]?.view) return;
      a = d.args[0] as Arg;
    }
  }

  private push(inst: Instance): void {
    let l = this.schedule.get(inst.event);
    if (!l) this.schedule.set(inst.event, (l = []));
    l.push(inst);
    this.instances.push(inst);
  }

  /** The event of the activation a value is a view of, if any. */
  private viewAnchor(a: Arg, events: Map<number, number>): number | undefined {
    if (!isRef(a)) return undefined;
    const n = this.byId.get(a.$ref);
    if (!n) return undefined;
    if (n.op === "module") return events.get(n.id);
    if (n.op === "set" || OPS[n.op]?.view) return this.viewAnchor(n.args[0] as Arg, events);
    return undefined;
  }

  // ------------------------------------------------------------------ hooks
  wants(path: string, kind?: "input" | "output"): boolean {
    if (kind === undefined) return this.active.has(path);
    return ((this.activeSides.get(path) ?? 0) & (kind === "input" ? 1 : 2)) !== 0;
  }

  private mark(path: string, sides: number): void {
    this.active.add(path);
    this.activeSides.set(path, (this.activeSides.get(path) ?? 0) | sides);
  }

  call<T extends MV>(path: string, inputs: Tensor[], body: (inputs: Tensor[]) => T): T {
    if (!this.active.has(path) && path !== "") return body(inputs);
    if (this.counted !== null && this.isCounted(path)) return this.countedCall(path, inputs, body, true) as T;
    const ein = this.ctx.events.get(key(path, "input"))!;
    this.provided.set(key(path, "input"), inputs);
    this.fire(ein);
    const ins = this.provided.get(key(path, "input")) as Tensor[];
    const skip = this.skips.get(path);
    let out: MV;
    if (skip && this.coversAll(skip.map((s) => s.invoke))) {
      out = this.assembleSkip(skip);
    } else {
      out = body(ins);
      if (skip) out = this.applyRows(out, skip);
    }
    const eout = this.ctx.events.get(key(path, "output"))!;
    this.provided.set(key(path, "output"), out);
    this.fire(eout);
    return this.provided.get(key(path, "output")) as T;
  }

  private fire(event: number): void {
    const list = this.schedule.get(event);
    if (!list) return;
    for (const inst of list) {
      if (inst.done) continue;
      this.execute(inst);
    }
    if (this.dynPending.length > 0) this.runReady();
  }

  private execute(inst: Instance): void {
    const { node } = inst;
    inst.done = true;
    if (inst.frame && !this.condHolds(inst.frame.block, inst.frame)) {
      inst.frame.values.set(node.id, undefined);
      return;
    }
    let v: Value;
    try {
      v = this.ctx.scope.within(() => this.run(inst));
    } catch (e) {
      if (e instanceof StopSignal) throw e;
      const err = toNNsightError(e);
      if (err.details.node !== undefined) throw err;
      throw this.err(err.code, err.message, node, this.pathOf(node), e);
    }
    if (inst.capture) return;
    if (inst.frame) inst.frame.values.set(node.id, v);
    else this.values.set(node.id, v);
  }

  private condHolds(b: BlockSpec, frame: Frame): boolean {
    if (b.cond !== null) {
      const c = this.resolve(b.cond, frame);
      const truthy = c instanceof Tensor ? c.item() !== 0 : !!c;
      if (!truthy) return false;
    }
    if (b.parent !== null) {
      const pf = this.frames.get(b.parent);
      if (pf && !this.condHolds(pf.block, pf)) return false;
    }
    return true;
  }

  private run(inst: Instance): Value {
    const { node, frame } = inst;
    const a = node.args;
    if (inst.capture) {
      this.capture(node, inst.capture.path);
      return undefined;
    }
    switch (node.op) {
      case "module": {
        const [path, kind] = a as [string, "output" | "input" | "inputs"];
        if (inst.call !== undefined) {
          const e = this.dynGet(path, kind === "output" ? "output" : "input", inst);
          const rows = e.natural ? node.invoke : null;
          if (kind === "output") {
            const t = this.rowsOf(e.value, rows);
            return path === "" ? { logits: t } : t;
          }
          const ins = e.value as Tensor[];
          return kind === "input" ? this.rowsView(ins[0]!, rows) : ins.map((t) => this.rowsView(t, rows));
        }
        if (path === "" && kind === "output") return { logits: this.rowsView(this.get(path, "output", node) as Tensor, node.invoke) };
        if (kind === "output") return this.rowsOf(this.get(path, "output", node), node.invoke);
        const ins = this.get(path, "input", node) as Tensor[];
        if (kind === "input") return this.rowsView(ins[0]!, node.invoke);
        return ins.map((t) => this.rowsView(t, node.invoke));
      }
      case "swap": {
        const [path, kind, value] = a as [string, "input" | "output", Arg];
        const v = this.resolve(value, frame);
        if (inst.call !== undefined) {
          const e = this.dynGet(path, kind, inst);
          const rows = e.natural ? node.invoke : null;
          if (kind === "output") {
            const nv = path === "" && v !== null && typeof v === "object" && !(v instanceof Tensor) && "logits" in v ? (v as { logits: Value }).logits : v;
            e.value = this.replaceValue(e.value, nv, rows);
          } else {
            const ins = [...(e.value as Tensor[])];
            ins[0] = this.replaceRows(ins[0]!, v, rows);
            e.value = ins;
          }
          return undefined;
        }
        if (kind === "output") {
          const cur = this.get(path, "output", node);
          const nv = path === "" && v !== null && typeof v === "object" && !(v instanceof Tensor) && "logits" in v ? (v as { logits: Value }).logits : v;
          this.provided.set(key(path, "output"), this.replaceValue(cur, nv, node.invoke));
        } else {
          const ins = [...(this.get(path, "input", node) as Tensor[])];
          ins[0] = this.replaceRows(ins[0]!, v, node.invoke);
          this.provided.set(key(path, "input"), ins);
        }
        return undefined;
      }
      case "skip": {
        const [path, value] = a as [string, Arg];
        const skips = inst.call !== undefined ? this.dynSkips : this.skips;
        const sk = inst.call !== undefined ? key3(path, "input", inst.call) : path;
        let l = skips.get(sk);
        if (!l) skips.set(sk, (l = []));
        l.push({ invoke: node.invoke, value: this.resolve(value, frame) });
        return undefined;
      }
      case "step":
        return this.step;
      case "stop":
        this.stopped = true;
        throw new StopSignal();
      case "log": {
        const vals = a.map((x) => this.resolve(x, frame));
        if (this.ctx.log) this.ctx.log(vals, node);
        return undefined;
      }
      case "call":
      case "hookedCall": {
        const [path, ...rest] = a as [string, ...Arg[]];
        const ins = rest.map((x) => this.resolve(x, frame));
        for (const t of ins) if (!(t instanceof Tensor)) throw new NNsightError("BAD_INPUT", `${path}.call() takes tensors`);
        return this.ctx.lm.callModule(path, ins as Tensor[], node.op === "hookedCall" ? this.hookedHooks : null);
      }
      case "cache":
        return this.cacheValue(node);
      case "blockResult":
        return perStep(this.blockResults.get(a[0] as number) ?? [], (a[1] as string[] | undefined) ?? []);
      default: {
        const def = OPS[node.op];
        if (!def) throw new NNsightError("INVALID_GRAPH", `unknown op "${node.op}"`);
        if (this.ctx.scan && def.reads) throw new NNsightError("BAD_INPUT", `${node.op} reads values, which scan() does not compute`);
        return def.run(a.map((x) => this.resolve(x, frame)));
      }
    }
  }

  private dynGet(path: string, kind: "input" | "output", inst: Instance): { value: Tensor | Tensor[]; natural: boolean } {
    const e = this.dynProvided.get(key3(path, kind, inst.call!));
    if (e === undefined) throw this.err("MISSED_PROVIDER", `call ${inst.call} of ${path || "model"} did not happen in this pass`, inst.node, path);
    return e;
  }

  private get(path: string, kind: "input" | "output", node: GraphNode): Tensor | Tensor[] {
    const v = this.provided.get(key(path, kind));
    if (v === undefined) throw this.err("MISSED_PROVIDER", `${path || "model"}.${kind} was not produced in this pass`, node, path);
    return v;
  }

  /** A fresh view handle of the invoke's rows (never the model's own handle, which the model may free). */
  private rowsView(t: Tensor, invoke: number | null): Tensor {
    const r = invoke === null ? null : this.ctx.rows[invoke]!;
    if (r === null || (r.start === 0 && r.count === t.shape[0])) return t._view([...t.shape], [...t.strides], t.offset);
    return t.narrow(0, r.start, r.count);
  }

  private coversAll(invokes: Array<number | null>): boolean {
    if (invokes.includes(null)) return true;
    let n = 0;
    for (const i of new Set(invokes)) n += this.ctx.rows[i!]?.count ?? this.ctx.batchSize;
    return n >= this.ctx.batchSize;
  }

  /** The value that replaces rows of `cur` for `invoke`: the whole value when the invoke has every row. */
  private replaceRows(cur: Tensor, v: Value, invoke: number | null): Tensor {
    const r = invoke === null ? null : this.ctx.rows[invoke]!;
    if (r === null || (r.start === 0 && r.count === cur.shape[0])) {
      if (v instanceof Tensor) return v._view([...v.shape], [...v.strides], v.offset);
      if (typeof v === "number" || typeof v === "boolean") return full([...cur.shape], Number(v), { dtype: cur.dtype });
      throw new NNsightError("BAD_INPUT", "a module value can only be replaced by a tensor or a number");
    }
    const next = cur.clone();
    const region = next.narrow(0, r.start, r.count);
    region.copy_(v as Tensor | number);
    return next;
  }

  /** rowsView over a module value (each element of a tuple). */
  private rowsOf(v: MV, invoke: number | null): Value {
    return Array.isArray(v) ? v.map((t) => this.rowsView(t, invoke)) : this.rowsView(v, invoke);
  }

  /** replaceRows over a module value: a tuple is replaced element by element by an array of the same length. */
  private replaceValue(cur: MV, v: Value, invoke: number | null): MV {
    if (!Array.isArray(cur)) return this.replaceRows(cur, v, invoke);
    if (!Array.isArray(v) || v.length !== cur.length) {
      throw new NNsightError("BAD_INPUT", `this value is a tuple of ${cur.length} tensors: replace it with an array of ${cur.length}`);
    }
    return cur.map((t, i) => this.replaceRows(t, v[i], invoke));
  }

  private assembleSkip(skips: Array<{ invoke: number | null; value: Value }>): MV {
    const whole = skips.find((s) => s.invoke === null || this.ctx.rows[s.invoke]?.count === this.ctx.batchSize);
    const viewOf = (v: Value): Tensor => {
      if (!(v instanceof Tensor)) throw new NNsightError("BAD_INPUT", "skip() needs a tensor value (or an array of tensors for a tuple)");
      return v._view([...v.shape], [...v.strides], v.offset);
    };
    if (whole) return Array.isArray(whole.value) ? whole.value.map(viewOf) : viewOf(whole.value);
    const ordered = [...skips].sort((x, y) => this.ctx.rows[x.invoke!]!.start - this.ctx.rows[y.invoke!]!.start);
    const first = ordered[0]!.value;
    if (Array.isArray(first)) return first.map((_, i) => cat(ordered.map((s) => viewOf((s.value as Value[])[i])), 0));
    return cat(ordered.map((s) => viewOf(s.value)), 0);
  }

  private applyRows(out: MV, skips: Array<{ invoke: number | null; value: Value }>): MV {
    let cur = out;
    for (const s of skips) cur = this.replaceValue(cur, s.value, s.invoke);
    return cur;
  }

  // ------------------------------------------------------------------ cache
  private cacheValue(node: GraphNode): Value {
    let c = this.caches.get(node.id);
    if (!c) this.caches.set(node.id, (c = {}));
    return c as Value;
  }
  private capture(node: GraphNode, path: string): void {
    const c = this.cacheValue(node) as Record<string, { output?: Value; inputs?: Value }>;
    const opts = (node.args[0] ?? {}) as { inputs?: boolean };
    const out = this.provided.get(key(path, "output"));
    if (!(out instanceof Tensor)) return;
    const entry = (c[path] ??= {});
    const o = this.rowsView(out, node.invoke);
    const ins = opts.inputs ? ((this.provided.get(key(path, "input")) as Tensor[] | undefined) ?? []).map((t) => this.rowsView(t, node.invoke)) : undefined;
    if (this.ctx.kind === "generate") {
      ((entry.output ??= []) as Value[]).push(o);
      if (ins) ((entry.inputs ??= []) as Value[]).push(ins);
    } else {
      entry.output = o;
      if (ins) entry.inputs = ins;
    }
    this.values.set(node.id, c as Value);
  }

  // ------------------------------------------------------------------ values
  resolve(a: Arg, frame: Frame | null): Value {
    if (a === null || typeof a !== "object") return a;
    if (Array.isArray(a)) return a.map((x) => this.resolve(x, frame));
    if (isRef(a)) return this.valueOf(a.$ref, frame);
    if (isTensorRef(a)) {
      const t = this.ctx.attachments[a.$tensor];
      if (!t) throw new NNsightError("INVALID_GRAPH", `attachment ${a.$tensor} is missing`);
      return t;
    }
    const out: Record<string, Value> = {};
    for (const [k, v] of Object.entries(a)) out[k] = this.resolve(v, frame);
    return out;
  }

  valueOf(id: number, frame: Frame | null): Value {
    for (let f: Frame | null = frame; f; f = f.block.parent !== null ? (this.frames.get(f.block.parent) ?? null) : null) {
      if (f.values.has(id)) return f.values.get(id);
    }
    if (this.values.has(id)) return this.values.get(id);
    if (this.ctx.outer.has(id)) return this.ctx.outer.get(id);
    const n = this.byId.get(id);
    if (n && n.block !== null) {
      const lf = this.lastFrame.get(n.block);
      if (lf && lf.values.has(id)) return lf.values.get(id);
    }
    if (n) {
      const st = this.ctx.kind === "generate" ? `step ${n.step}` : "this pass";
      throw this.err("MISSED_PROVIDER", `node ${id} (${n.op}) has no value: its module did not run in ${st}`, n, this.pathOf(n));
    }
    throw new NNsightError("INVALID_GRAPH", `node ${id} is unknown`);
  }

  /** Raise MISSED_PROVIDER for work scheduled this step that never ran (unless a stop ended the pass). */
  endStep(): void {
    // block results: one entry per step the block ran
    for (const f of this.frames.values()) {
      if (!this.condHolds(f.block, f)) continue;
      let l = this.blockResults.get(f.block.id);
      if (!l) this.blockResults.set(f.block.id, (l = []));
      l.push(this.resolveLenient(f.block.result, f));
    }
    if (this.stopped) return;
    for (const inst of this.instances) {
      if (inst.done || inst.capture) continue;
      const n = inst.node;
      if (inst.frame && !this.safeCond(inst.frame)) continue;
      const path = this.pathOf(n);
      if (inst.call !== undefined) {
        throw this.err(
          "MISSED_PROVIDER",
          `${path || "model"} ran ${this.callCount.get(path) ?? 0} time(s) in ${this.ctx.kind === "generate" ? `step ${this.step}` : "this pass"}, so its call ${inst.call} never happened and node ${n.id} (${n.op}) could not run`,
          n,
          path,
        );
      }
      throw this.err(
        "MISSED_PROVIDER",
        `${path ? `${path} ` : ""}never ran in ${this.ctx.kind === "generate" ? `step ${this.step}` : "this pass"} (skipped, or after the module's own output was replaced), so node ${n.id} (${n.op}) could not run`,
        n,
        path,
      );
    }
  }
  private safeCond(f: Frame): boolean {
    try {
      return this.condHolds(f.block, f);
    } catch {
      return true;
    }
  }

  /** Resolve, giving undefined for nodes that have no value (after a stop, an unreached step). */
  resolveLenient(a: Arg, frame: Frame | null): Value {
    if (a === null || typeof a !== "object") return a;
    if (Array.isArray(a)) return a.map((x) => this.resolveLenient(x, frame));
    if (isRef(a)) {
      try {
        return this.valueOf(a.$ref, frame);
      } catch {
        return undefined;
      }
    }
    if (isTensorRef(a)) return this.ctx.attachments[a.$tensor];
    const out: Record<string, Value> = {};
    for (const [k, v] of Object.entries(a)) out[k] = this.resolveLenient(v, frame);
    return out;
  }

  /** Nodes that run after the last forward pass: reads of the generator's output and anything using block values. */
  runPost(generatorOutput: Tensor | null): void {
    if (generatorOutput) this.provided.set(key("generator", "output"), generatorOutput);
    for (const n of this.g.nodes) {
      if (n.block !== null || !isPost(n, this)) continue;
      const inst: Instance = { node: n, frame: null, event: 0, done: false };
      if (n.op === "module") {
        const v = this.provided.get(key(n.args[0] as string, "output"));
        if (!(v instanceof Tensor)) {
          if (this.stopped) continue; // tr.stop() ended generation: nothing to read
          throw this.err("MISSED_PROVIDER", `${String(n.args[0])}.output is not available`, n, String(n.args[0]));
        }
        this.values.set(n.id, this.ctx.scope.within(() => this.rowsView(v, n.invoke)));
        continue;
      }
      if (this.stopped && refsOf(n.args as Arg).some((r) => !this.values.has(r) && !this.ctx.outer.has(r) && !this.isBlockNode(r))) continue;
      this.execute(inst);
    }
  }
  private isBlockNode(id: number): boolean {
    return (this.byId.get(id)?.block ?? null) !== null;
  }

  /** What the blocks that ran in the current step returned, merged by name (for streaming). */
  stepValues(): Record<string, Value> {
    const out: Record<string, Value> = {};
    for (const f of this.frames.values()) {
      const list = this.blockResults.get(f.block.id);
      const last = list?.[list.length - 1];
      if (last && typeof last === "object" && !Array.isArray(last) && !(last instanceof Tensor)) Object.assign(out, last);
    }
    return out;
  }

  /** MISSED_PROVIDER for nodes bound to a step that never ran (generation ended earlier). */
  checkUnreached(): void {
    if (this.stopped) return;
    for (const n of this.g.nodes) {
      if (n.block === null && n.step > this.lastStep && !isPost(n, this)) {
        const path = this.pathOf(n);
        throw this.err("MISSED_PROVIDER", `${path || "the model"} was not provided at step ${n.step}: generation ended after step ${this.lastStep}`, n, path);
      }
    }
  }

  /** @internal post nodes: cached per node id */
  postCache = new Map<number, boolean>();

  pathOf(n: GraphNode): string {
    if (n.op === "module" || n.op === "swap" || n.op === "skip" || n.op === "call" || n.op === "hookedCall") return String(n.args[0]);
    for (const r of refsOf(n.args as Arg)) {
      const d = this.byId.get(r);
      if (d) {
        const p = this.pathOf(d);
        if (p) return p;
      }
    }
    return "";
  }

  err(code: ErrorCode, msg: string, n: GraphNode, path: string, cause?: unknown): NNsightError {
    const where = [
      path ? `module ${path}` : null,
      n.invoke !== null ? `invoke ${n.invoke}` : null,
      this.ctx.kind === "generate" ? `step ${n.block === null ? n.step : this.step}` : null,
      nodeSource(n) ? `recorded at ${nodeSource(n)}` : null,
    ].filter(Boolean);
    return new NNsightError(code, `${msg} [${where.join(", ")}]`, { path, invoke: n.invoke ?? undefined, step: n.block === null ? n.step : this.step, source: nodeSource(n), node: n.id }, { cause });
  }
}

/** Block values, one per step: objects become an object of per-step arrays ([{h: a}, {h: b}] -> {h: [a, b]}). */
function perStep(list: Value[], keys: string[]): Value {
  const objects = list.every((x) => x !== null && typeof x === "object" && !Array.isArray(x) && !(x instanceof Tensor));
  if (!objects || (list.length === 0 && keys.length === 0)) return list;
  const out: Record<string, Value[]> = {};
  for (const k of keys) out[k] = [];
  for (const item of list) for (const [k, v] of Object.entries(item as Record<string, Value>)) (out[k] ??= []).push(v);
  return out;
}

/** Whether a block runs at `step`. A plain trace has one pass: step 0. */
export function stepIn(b: BlockSpec, step: number, kind: "trace" | "generate"): boolean {
  const s = b.steps;
  if (s === null) return true;
  if ("all" in s) return true;
  if ("list" in s) return s.list.includes(step);
  if (step < s.start) return false;
  if (s.stop !== null && step >= s.stop) return false;
  void kind;
  return (step - s.start) % s.step === 0;
}

/** A node that runs after generation: a read of the generator's output, or anything using such or block values. */
function isPost(n: GraphNode, il: Interleaver): boolean {
  const c = il.postCache.get(n.id);
  if (c !== undefined) return c;
  let r = false;
  if ((n.op === "module" && n.args[0] === "generator") || n.op === "blockResult") r = true;
  else if (n.block === null) {
    for (const id of refsOf(n.args as Arg)) {
      const d = (il as unknown as { byId: Map<number, GraphNode> }).byId.get(id);
      if (d && (d.block !== null || isPost(d, il))) {
        r = true;
        break;
      }
    }
  }
  il.postCache.set(n.id, r);
  return r;
}

