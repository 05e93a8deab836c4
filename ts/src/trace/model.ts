/**
 * `LanguageModel`: a loaded model you can trace. The model object is the root of its module tree
 * (`model.model.layers[3].mlp`, `model.lm_head`), and offers `trace`, `generate`, `scan`, `session` and
 * `edit` as in NNsight.
 *
 * ```ts
 * const model = await LanguageModel.load("stories260K");
 * const { logits } = await model.trace("Once upon a time", () => {
 *   model.model.layers[2].mlp.output.set([":", -1], 0);
 *   return { logits: model.lm_head.output.at([":", -1]) };
 * });
 * ```
 */
import { NNsightError } from "../errors.js";
import type { PromptInput } from "../models/batch.js";
import { CausalLM, type CausalLMParts, type LoadModelOptions } from "../models/causal-lm.js";
import type { GenerateOptions } from "../models/generate.js";
import type { Tensor } from "../tensor/tensor.js";
import { Envoy, type EnvoyClasses, type EnvoyList, buildEnvoys } from "./envoy.js";
import type { ConnectOptions, RemoteLanguageModel } from "../remote/client.js";
import type { RemoteJob } from "../remote/job.js";
import type { AnyGraph, Arg, GraphNode, SessionGraph, TraceGraph } from "./graph.js";
import type { Value } from "./ops.js";
import { Recorder, activeRecorder, copySource, nodeSource, replaySources } from "./recorder.js";
import { executeSession, executeTrace, mergeResult } from "./runner.js";
import { roundTrip } from "./serialize.js";
import { TracedValue } from "./traced-value.js";
import { Tracer, inputToJSON } from "./tracer.js";

/**
 * What a trace gives back: the callback's return value with graph values made real (TracedValue → Tensor),
 * merged with what invokes and blocks returned (hence the open record).
 */
export type TraceResult<R> = [R] extends [void | undefined] ? Record<string, any> : Real<R> & Record<string, any>;

/** Graph values made real. */
export type Real<T> = T extends TracedValue ? any : T extends Tensor ? T : T extends Array<infer U> ? Array<Real<U>> : T extends object ? { [K in keyof T]: Real<T[K]> } : T;

export interface TraceOptions {
  /** run the graph through serialize → parse → validate first (proves it is remote-safe); also NNSIGHT_ROUNDTRIP=1 */
  roundTrip?: boolean;
  /** where tr.log() output goes (default: console.log) */
  log?: (...values: unknown[]) => void;
  /** remote models: `false` returns a RemoteJob (status, result, cancel, events) as soon as the job is queued */
  blocking?: boolean;
  /** generation: receives, after every step, what tr.all / tr.iter blocks returned at that step */
  onStep?: (step: number, values: Record<string, any>) => void;
  /** @internal generation's per-token callback, handed to remote backends */
  stream?: GenerateOptions["stream"];
  /**
   * name the user's source line of the failing node in error messages. `true` (the default): found when
   * such an error leaves the trace, by recording the callback once more (it only records, so anything
   * else it does, such as logging, happens a second time then); `"eager"`: captured for every node while
   * recording (about 4 µs a node; sessions and remote models with edits always do this); `false`: never.
   */
  sourceLines?: boolean | "eager";
}

/** What running a graph gives back (sessions add one entry per trace). */
export interface BackendResult {
  result: Value;
  saved: Map<number, Value>;
  traces?: Array<{ result: Value; saved: Map<number, Value> }>;
}

/**
 * @internal Where recorded graphs run when not here (a remote model sends them to a server). `finish` turns
 * the raw result into what the call returns (and fills saved values); `run` resolves to that, or to a
 * RemoteJob when `opts.blocking === false`.
 */
export interface TraceBackend {
  /** mapError: what a job's error becomes (a lazily sourced graph names the failing node's line) */
  run(req: { graph: AnyGraph; attachments: Tensor[]; scan: boolean; opts: TraceOptions; mapError?: (e: unknown) => unknown }, finish: (r: BackendResult) => unknown): Promise<unknown>;
}

/** `envoy.source` of a module whose forward has operations `K`. */
type WithSource<K extends string> = { readonly source: Envoy & { readonly [k in K]: k extends "attention_interface_0" ? AttentionInterfaceEnvoy : Envoy } };

/**
 * `attention_interface_0` and the operations inside it: the SDPA call with the default
 * `attnImplementation: "sdpa"`, the scores / softmax / weighted sum with `"eager"` (the other
 * model's names are BAD_PATH).
 */
export type AttentionInterfaceEnvoy = Envoy & {
  readonly source: Envoy & {
    readonly torch_nn_functional_scaled_dot_product_attention_0: Envoy;
    readonly torch_matmul_0: Envoy;
    readonly nn_functional_softmax_0: Envoy;
    readonly torch_matmul_1: Envoy;
  };
};

export interface LlamaLayerEnvoy extends Envoy {
  readonly self_attn: Envoy & { readonly q_proj: Envoy; readonly k_proj: Envoy; readonly v_proj: Envoy; readonly o_proj: Envoy } & WithSource<"apply_rotary_pos_emb_0" | "attention_interface_0">;
  readonly mlp: Envoy & { readonly gate_proj: Envoy; readonly up_proj: Envoy; readonly down_proj: Envoy } & WithSource<"act_fn_0">;
  readonly input_layernorm: Envoy;
  readonly post_attention_layernorm: Envoy;
}
export interface GPT2BlockEnvoy extends Envoy {
  readonly ln_1: Envoy;
  readonly attn: Envoy & { readonly c_attn: Envoy; readonly c_proj: Envoy } & WithSource<"attention_interface_0">;
  readonly ln_2: Envoy;
  readonly mlp: Envoy & { readonly c_fc: Envoy; readonly c_proj: Envoy } & WithSource<"act_0">;
}

interface EditRecord {
  graph: TraceGraph;
  attachments: Tensor[];
}

export interface LanguageModelOptions extends LoadModelOptions {
  /** module aliases: `{ "layers": "blocks" }` (a child name anywhere) or `{ "model.layers": "layers" }` (a path) */
  rename?: Record<string, string>;
  /**
   * Envoy classes (NNsight's `envoys=`): one class for every module, or `{ LlamaAttention: Attn, mlp: Mlp }`
   * by HF class name or path suffix, so helpers live on the envoys (`class Attn extends Envoy { get heads()
   * { ... } }`). See EnvoyClasses.
   */
  envoys?: EnvoyClasses;
}

export class LanguageModel extends CausalLM {
  /** the root envoy (the model itself is also usable as one: `model.get(...)`, `model.output`) */
  readonly envoy: Envoy;
  /** Llama: `model.model.layers[i]...` */
  declare readonly model: Envoy & { readonly embed_tokens: Envoy; readonly layers: EnvoyList<LlamaLayerEnvoy>; readonly norm: Envoy };
  /** GPT-2: `model.transformer.h[i]...` */
  declare readonly transformer: Envoy & { readonly wte: Envoy; readonly wpe: Envoy; readonly h: EnvoyList<GPT2BlockEnvoy>; readonly ln_f: Envoy };
  declare readonly lm_head: Envoy;
  /** aliases given with `rename` resolve here too (`model.layers` when renamed at the root) */
  readonly [alias: string]: unknown;
  /** @internal */ _edits: EditRecord[];
  /** @internal set on remote models: graphs run there */
  _backend: TraceBackend | null = null;
  private readonly renames: Record<string, string>;
  private readonly envoyClasses: EnvoyClasses | undefined;

  /** @internal */
  constructor(init: CausalLMParts, opts: { rename?: Record<string, string>; envoys?: EnvoyClasses; edits?: EditRecord[] } = {}) {
    super(init);
    this.renames = opts.rename ?? {};
    this.envoyClasses = opts.envoys;
    this._edits = opts.edits ?? [];
    this.envoy = buildEnvoys(this.moduleTree, this, this.renames, this.envoyClasses);
    for (const c of this.envoy.children()) Object.defineProperty(this, c._spec.name, { value: c, enumerable: true });
    for (const [name, c] of this.envoy._aliases) if (!(name in this)) Object.defineProperty(this, name, { value: c, enumerable: false });
  }

  /** Load a model from a directory, a Hub id in the local cache, or the bundled `"stories260K"`. */
  static override async load(idOrDir = "stories260K", opts: LanguageModelOptions = {}): Promise<LanguageModel> {
    // `nnsight run script.mjs --remote URL` sets NNSIGHT_REMOTE: the same script then runs on the server
    const remote = process.env.NNSIGHT_REMOTE;
    if (remote) return LanguageModel.connect(remote, idOrDir, { apiKey: process.env.NNSIGHT_API_KEY });
    return new LanguageModel(await CausalLM.loadParts(idOrDir, opts), { rename: opts.rename, envoys: opts.envoys });
  }

  /**
   * A model served by `nnsight serve` at `url`: the same module tree and trace/generate/session/edit calls,
   * run remotely (`{ blocking: false }` returns a job handle). API key: `opts.apiKey` or $NNSIGHT_API_KEY.
   */
  static async connect(url: string, modelId: string, opts: ConnectOptions = {}): Promise<RemoteLanguageModel> {
    const { connect } = await import("../remote/client.js");
    return connect(url, modelId, opts);
  }

  // ------------------------------------------------------------------ root envoy surface
  /** The model's output: `{ logits }`. */
  get output(): TracedValue {
    return this.envoy.output;
  }
  set output(v: unknown) {
    this.envoy.output = v as never;
  }
  /** The token ids of the batch rows (the root module's input). */
  get input(): TracedValue {
    return this.envoy.input;
  }
  /** Generation: `model.generator.output` is every row's tokens (prompt + generated) once generation ends. */
  get generator(): { readonly output: TracedValue } {
    return {
      get output(): TracedValue {
        const rec = activeRecorder("model.generator.output");
        if (rec.kind !== "generate") throw new NNsightError("BAD_INPUT", "model.generator.output exists only inside model.generate(...)");
        return rec.add("module", ["generator", "output"], { step: 0 });
      },
    };
  }
  get(path: string): Envoy {
    return this.envoy.get(path);
  }
  modules(): Envoy[] {
    return this.envoy.modules();
  }

  // ------------------------------------------------------------------ recording
  private recordTrace<R>(kind: "trace" | "generate", input: unknown, fn: ((tr: Tracer) => R) | undefined, firstId = 0, sessionPeers: Recorder[] = [], sourceLines: boolean | "eager" = true) {
    this._checkAlive();
    const editNodes = this._edits.reduce((n, e) => n + e.graph.nodes.length, 0);
    const rec = new Recorder(this, kind, firstId + editNodes);
    // sessions (one callback records several traces) and remote graphs with edits (their lines travel to
    // the server) capture while recording; local and remote traces find a failing node's line when an
    // error naming it comes back (remote: the client adds it, as locally)
    if (sourceLines === false) rec.sources = "off";
    else if (sourceLines === "eager" || sessionPeers.length > 0 || (this._backend && this._edits.length > 0)) rec.sources = "eager";
    else {
      rec.sources = "lazy";
      rec.lazySource = replaySources(() => this.recordTrace(kind, input, fn, firstId, [], "eager").graph.nodes);
    }
    for (const p of sessionPeers) rec.share(p);
    if (sessionPeers.length) rec.sessionLookup = (id) => sessionPeers.map((p) => p.nodeById(id)).find((n) => n !== undefined);
    const tr = new Tracer(rec);
    let ret: R | undefined;
    rec.run(() => {
      if (input !== undefined) {
        if (input === "") throw new NNsightError("BAD_INPUT", "the prompt is an empty string: give at least one token of text");
        const idx = rec.addInvoke(inputToJSON(input));
        ret = fn ? rec.inInvoke(idx, () => fn(tr)) : undefined;
      } else if (fn) {
        ret = fn(tr);
      }
    });
    const result: Arg = { main: rec.arg(ret), parts: tr._returns };
    const own = rec.toGraph(result);
    const { graph, attachments } = this.withEdits(own, rec.attachments, firstId);
    return { rec, graph, attachments, ret };
  }

  /** Prepend persistent edits (renumbered, whole-batch) to a recorded graph. */
  private withEdits(g: TraceGraph, attachments: Tensor[], firstId: number): { graph: TraceGraph; attachments: Tensor[] } {
    if (this._edits.length === 0) return { graph: g, attachments };
    const nodes: GraphNode[] = [];
    const allAtt: Tensor[] = [];
    let nextId = firstId;
    for (const e of this._edits) {
      const idMap = new Map<number, number>();
      const attBase = allAtt.length;
      allAtt.push(...e.attachments);
      for (const n of e.graph.nodes) {
        idMap.set(n.id, nextId);
        const copy = withArgs(n, n.args.map((a) => remap(a, idMap, attBase)));
        copy.id = nextId++;
        copy.invoke = null;
        nodes.push(copy);
      }
    }
    const attBase = allAtt.length;
    allAtt.push(...attachments);
    const shift = (a: Arg) => remap(a, new Map(), attBase);
    return {
      graph: {
        ...g,
        nodes: [...nodes, ...g.nodes.map((n) => withArgs(n, n.args.map(shift)))],
        blocks: g.blocks.map((b) => ({ ...b, result: shift(b.result), cond: b.cond === null ? null : shift(b.cond) })),
        result: shift(g.result),
      },
      attachments: allAtt,
    };
  }

  private async runRecorded(rec: Recorder, graph: TraceGraph, attachments: Tensor[], opts: TraceOptions, scan = false): Promise<Value> {
    if (this._backend) {
      const finish = (res: BackendResult) => {
        publish(rec, res.result, res.saved, graph);
        return mergeResult(res.result);
      };
      const mapError = (e: unknown) => withSourceLine(e, graph, rec);
      try {
        return (await this._backend.run({ graph, attachments, scan, opts, mapError }, finish)) as Value;
      } catch (e) {
        throw mapError(e);
      }
    }
    if (opts.blocking === false) throw new NNsightError("UNSUPPORTED", "{ blocking: false } needs a remote model (LanguageModel.connect)");
    let g = graph, att = attachments;
    if (opts.roundTrip || process.env.NNSIGHT_ROUNDTRIP === "1") {
      const rt = roundTrip(graph, attachments);
      g = rt.graph as TraceGraph;
      att = rt.attachments;
    }
    const log = opts.log ?? ((...v: unknown[]) => console.log(...v));
    let res;
    try {
      res = await executeTrace(this, g, att, { scan, log: (vals) => log(...vals), onStep: opts.onStep });
    } catch (e) {
      throw withSourceLine(e, graph, rec);
    }
    publish(rec, res.result, res.saved, g);
    return mergeResult(res.result);
  }

  // ------------------------------------------------------------------ public calls
  /**
   * Record the callback as an intervention graph and run it interleaved with one forward pass.
   * `model.trace(input, (tr) => ...)` traces one input; `model.trace((tr) => { tr.invoke(...) })` batches invokes.
   */
  trace<R>(input: PromptInput, fn: (tr: Tracer) => R, opts: TraceOptions & { blocking: false }): Promise<RemoteJob<TraceResult<R>>>;
  trace<R>(input: PromptInput, fn: (tr: Tracer) => R, opts?: TraceOptions): Promise<TraceResult<R>>;
  trace<R>(fn: (tr: Tracer) => R, opts: TraceOptions & { blocking: false }): Promise<RemoteJob<TraceResult<R>>>;
  trace<R>(fn: (tr: Tracer) => R, opts?: TraceOptions): Promise<TraceResult<R>>;
  async trace<R>(a: unknown, b?: unknown, c?: unknown): Promise<any> {
    const [input, fn, opts] = typeof a === "function" ? [undefined, a, b] : [a, b, c];
    const { rec, graph, attachments } = this.recordTrace("trace", input, fn as (tr: Tracer) => R, 0, [], (opts as TraceOptions | undefined)?.sourceLines ?? true);
    return this.runRecorded(rec, graph, attachments, (opts as TraceOptions) ?? {});
  }

  /**
   * Generate with interventions. `fn` may use `tr.all`, `tr.iter`, `tr.next` and `model.generator.output`.
   * Without `fn`, returns `{ tokens }`.
   */
  generate<R>(input: PromptInput, options: GenerateOptions & TraceOptions & { blocking: false }, fn?: (tr: Tracer) => R): Promise<RemoteJob<TraceResult<R>>>;
  generate<R>(input: PromptInput, options: GenerateOptions & TraceOptions, fn?: (tr: Tracer) => R): Promise<TraceResult<R>>;
  generate<R>(options: GenerateOptions & TraceOptions, fn: (tr: Tracer) => R): Promise<TraceResult<R>>;
  async generate<R>(a: unknown, b?: unknown, c?: unknown): Promise<any> {
    const noInput = typeof b === "function" || (b === undefined && a !== null && typeof a === "object" && !Array.isArray(a) && !("input_ids" in (a as object)));
    const [input, options, fn] = noInput ? [undefined, a as GenerateOptions & TraceOptions, b as ((tr: Tracer) => R) | undefined] : [a, (b ?? {}) as GenerateOptions & TraceOptions, c as ((tr: Tracer) => R) | undefined];
    const { stream, roundTrip: rt, log, blocking, onStep, sourceLines: _sl, ...gen } = options;
    const userFn = fn ?? (() => ({ tokens: this.generator.output }) as unknown as R);
    const { rec, graph, attachments } = this.recordTrace("generate", input, userFn, 0, [], options.sourceLines ?? true);
    graph.generate = gen;
    if (this._backend) {
      // remotely, tokens and step values come back as tagged LOG events while the job runs
      if (stream) graph.generate.streamTokens = true;
      if (onStep) graph.generate.streamSteps = true;
      return this.runRecorded(rec, graph, attachments, { roundTrip: rt, log, blocking, onStep, stream });
    }
    if (stream) return this.runGenerateStreaming(rec, graph, attachments, { roundTrip: rt, log, onStep }, stream);
    return this.runRecorded(rec, graph, attachments, { roundTrip: rt, log, blocking, onStep });
  }

  private async runGenerateStreaming(rec: Recorder, graph: TraceGraph, attachments: Tensor[], opts: TraceOptions, stream: NonNullable<GenerateOptions["stream"]>) {
    const prev = this._streamHook;
    this._streamHook = stream;
    try {
      return await this.runRecorded(rec, graph, attachments, opts);
    } finally {
      this._streamHook = prev;
    }
  }
  /** @internal */ _streamHook: GenerateOptions["stream"] | undefined;
  override _generateRows(...args: Parameters<CausalLM["_generateRows"]>) {
    const [rows, opts, hooks] = args;
    return super._generateRows(rows, this._streamHook ? { ...opts, stream: this._streamHook } : opts, hooks);
  }

  /** Record and check like trace, computing nothing: returned values come back as `{ shape, dtype }`. */
  async scan<R>(input: PromptInput, fn: (tr: Tracer) => R): Promise<Record<string, any>> {
    const { rec, graph, attachments } = this.recordTrace("trace", input, fn);
    const res = await this.runRecorded(rec, graph, attachments, {}, true);
    return toShapes(res) as Record<string, any>;
  }

  /**
   * Several traces as one unit, run in order: inside, `s.trace(input, fn)` returns what fn returns as graph
   * values that later traces may use. Resolves to what the callback returns, made real.
   */
  session<R>(fn: (s: { trace: <T>(input: PromptInput | ((tr: Tracer) => T), fn?: (tr: Tracer) => T) => T }) => R, opts: TraceOptions & { blocking: false }): Promise<RemoteJob<Real<R>>>;
  session<R>(fn: (s: { trace: <T>(input: PromptInput | ((tr: Tracer) => T), fn?: (tr: Tracer) => T) => T }) => R, opts?: TraceOptions): Promise<Real<R>>;
  async session<R>(fn: (s: { trace: <T>(input: PromptInput | ((tr: Tracer) => T), fn?: (tr: Tracer) => T) => T }) => R, opts: TraceOptions = {}): Promise<any> {
    this._checkAlive();
    const recs: Recorder[] = [];
    const graphs: TraceGraph[] = [];
    const attachments: Tensor[] = [];
    let nextId = 0;
    const s = {
      trace: <T>(input: PromptInput | ((tr: Tracer) => T), f?: (tr: Tracer) => T): T => {
        const [inp, body] = typeof input === "function" ? [undefined, input] : [input, f];
        const r = this.recordTrace("trace", inp, body, nextId, recs);
        // attachments are per trace: shift this trace's into the session's list
        const base = attachments.length;
        attachments.push(...r.attachments);
        const shift = (a: Arg) => remap(a, new Map(), base);
        const g: TraceGraph = { ...r.graph, nodes: r.graph.nodes.map((n) => withArgs(n, n.args.map(shift))), blocks: r.graph.blocks.map((b) => ({ ...b, result: shift(b.result), cond: b.cond === null ? null : shift(b.cond) })), result: shift(r.graph.result) };
        graphs.push(g);
        recs.push(r.rec);
        nextId = r.rec.lastId + 1;
        return r.ret as T;
      },
    };
    const sessionRec = new Recorder(this, "trace", 0);
    const ret = fn(s);
    for (const r of recs) sessionRec.share(r);
    const resultArg = recs.length ? recs[recs.length - 1]!.arg(ret) : sessionRec.arg(ret);
    let session: SessionGraph = { version: 1, kind: "session", traces: graphs, result: resultArg };
    let att = attachments;
    if (this._backend) {
      const finish = (res: BackendResult) => {
        (res.traces ?? []).forEach((t, i) => publish(recs[i]!, t.result, t.saved, graphs[i]!));
        return res.result;
      };
      return this._backend.run({ graph: session, attachments, scan: false, opts }, finish);
    }
    if (opts.blocking === false) throw new NNsightError("UNSUPPORTED", "{ blocking: false } needs a remote model (LanguageModel.connect)");
    if (opts.roundTrip || process.env.NNSIGHT_ROUNDTRIP === "1") {
      const rt = roundTrip(session, attachments);
      session = rt.graph as SessionGraph;
      att = rt.attachments;
    }
    const log = opts.log ?? ((...v: unknown[]) => console.log(...v));
    const res = await executeSession(this, session, att, { log: (vals) => log(...vals) });
    res.traces.forEach((t, i) => publish(recs[i]!, t.result, t.saved, graphs[i]!));
    return res.result as Real<R>;
  }

  /**
   * Record interventions applied to every later trace. Returns a new model sharing the weights, or with
   * `{ inplace: true }` applies them to this model and returns a handle whose `remove()` takes them off.
   */
  edit(fn: (tr: Tracer) => unknown, opts: { inplace: true }): { remove(): void };
  edit(fn: (tr: Tracer) => unknown, opts?: { inplace?: false }): LanguageModel;
  edit(fn: (tr: Tracer) => unknown, opts: { inplace?: boolean } = {}): LanguageModel | { remove(): void } {
    this._checkAlive();
    const rec = new Recorder(this, "trace", 0);
    const tr = new Tracer(rec);
    rec.run(() => {
      const idx = rec.addInvoke(null);
      rec.inInvoke(idx, () => fn(tr));
    });
    const e: EditRecord = { graph: rec.toGraph(null), attachments: rec.attachments };
    if (opts.inplace) {
      this._edits.push(e);
      return { remove: () => void (this._edits = this._edits.filter((x) => x !== e)) };
    }
    const copy = new LanguageModel(
      { dir: this.dir, spec: this.spec, tokenizer: this.tokenizer, lm: this._lm, generationConfig: this._generationConfig },
      { rename: this.renames, envoys: this.envoyClasses, edits: [...this._edits, e] },
    );
    copy._sharedFrom = true; // shares this model's weights: disposing the copy must not free them
    copy._backend = this._backend; // an edited remote model runs remotely too
    return copy;
  }
  /** Remove every edit applied in place. */
  clearEdits(): void {
    this._edits = [];
  }

  /** @internal used by edit() copies: they share weights, so disposing a copy must not free them */
  override async dispose(): Promise<void> {
    if (this._sharedFrom) return;
    await super.dispose();
  }
  /** @internal */ _sharedFrom = false;
}

/** Give TracedValues their results: saved values, and every returned value. */
function publish(rec: Recorder, result: Value, saved: Map<number, Value>, graph: TraceGraph): void {
  for (const [id, v] of saved) setResult(rec, id, v);
  const walk = (a: Arg, v: Value) => {
    if (a === null || typeof a !== "object") return;
    if (Array.isArray(a)) {
      a.forEach((x, i) => walk(x, Array.isArray(v) ? v[i] : undefined));
      return;
    }
    if ("$ref" in a && typeof a.$ref === "number") {
      if (v !== undefined) setResult(rec, a.$ref, v);
      return;
    }
    for (const [k, x] of Object.entries(a)) walk(x as Arg, v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, Value>)[k] : undefined);
  };
  walk(graph.result as Arg, result);
}
function setResult(rec: Recorder, id: number, v: Value): void {
  if (v === undefined) return; // never computed (after a stop, a step not reached)
  for (const tv of rec.values.get(id) ?? []) {
    tv._result = v;
    tv._hasResult = true;
  }
}

/**
 * An error that names a node of a lazily sourced graph gets the user's line now (see recorder.ts): the
 * message's "[module ..., invoke ...]" part gains "recorded at file:line", and details.source is set.
 */
function withSourceLine(e: unknown, graph: TraceGraph, rec: Recorder): unknown {
  if (!(e instanceof NNsightError) || e.details.node === undefined || e.details.source !== undefined || rec.lazySource === null) return e;
  const node = graph.nodes.find((n) => n.id === e.details.node);
  const src = node ? (nodeSource(node) ?? rec.lazySource(node)) : undefined;
  if (src === undefined) return e;
  e.details.source = src;
  const m = e.message;
  e.message = m.endsWith(" []") ? `${m.slice(0, -1)}recorded at ${src}]` : m.endsWith("]") ? `${m.slice(0, -1)}, recorded at ${src}]` : `${m} [recorded at ${src}]`;
  return e;
}

/** A copy of a node with new args (its source line comes along). */
function withArgs(n: GraphNode, args: Arg[]): GraphNode {
  const copy: GraphNode = { ...n, args };
  copySource(n, copy);
  return copy;
}

function remap(a: Arg, ids: Map<number, number>, attBase: number): Arg {
  if (a === null || typeof a !== "object") return a;
  if (Array.isArray(a)) return a.map((x) => remap(x, ids, attBase));
  if ("$ref" in a && typeof a.$ref === "number") return { $ref: ids.get(a.$ref) ?? a.$ref };
  if ("$tensor" in a && typeof a.$tensor === "number") return { $tensor: a.$tensor + attBase };
  const out: Record<string, Arg> = {};
  for (const [k, v] of Object.entries(a)) out[k] = remap(v as Arg, ids, attBase);
  return out;
}

function toShapes(v: unknown): unknown {
  if (v === null || typeof v !== "object") return v;
  if ((v as { shape?: unknown }).shape !== undefined && typeof (v as Tensor).dtype === "string" && typeof (v as Tensor).dispose === "function") {
    const t = v as Tensor;
    const r = { shape: [...t.shape], dtype: t.dtype };
    t.dispose();
    return r;
  }
  if (Array.isArray(v)) return v.map(toShapes);
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) out[k] = toShapes(x);
  return out;
}
