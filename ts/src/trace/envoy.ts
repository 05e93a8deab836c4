/**
 * Envoys: the model's module tree as objects, with Hugging Face names (`model.model.layers[3].mlp`).
 * Inside a trace, `.output`, `.input` and `.inputs` read module values (graph nodes), assigning them
 * swaps the value for the rest of the pass, `skip(v)` replaces a module's computation, and `call(x)`
 * runs a module on any value (logit lens) without firing its hooks.
 *
 * List modules (`layers`, `h`) index with numbers, negative ones too (`layers[-1]`, `layers.at(-1)`),
 * have `length` and iterate.
 */
import { NNsightError } from "../errors.js";
import type { ModuleSpec } from "../models/module-tree.js";
import { activeRecorder } from "./recorder.js";
import type { GraphLike, TracedValue } from "./traced-value.js";

export class Envoy {
  /** dotted module path (`"model.layers.3.mlp"`; `""` for the root) */
  readonly path: string;
  /** the HF class name (`"LlamaMLP"`) */
  readonly type: string;
  /** @internal */ readonly _spec: ModuleSpec;
  /** @internal */ readonly _owner: object;
  /** @internal */ readonly _children: Envoy[];
  /** @internal alias name -> child */ readonly _aliases = new Map<string, Envoy>();
  /** @internal the operations inside this module's forward (`.source`), if it has any */
  readonly _source: Envoy | null;
  /** @internal which call of the module (in a forward pass) reads and writes address; see nth() */
  readonly _call: number = 0;

  /**
   * @internal Subclasses (`LanguageModel.load(..., { envoys })`) inherit this constructor; the model
   * builds every envoy, children first by the same rules.
   */
  constructor(spec: ModuleSpec, owner: object, aliases: Record<string, string> = {}, classes?: EnvoyClasses) {
    this.path = spec.path;
    this.type = spec.type;
    this._spec = spec;
    this._owner = owner;
    this._children = spec.children.map((c) => makeEnvoy(c, owner, aliases, classes));
    this._source = spec.source ? strictSource(new Envoy({ name: "source", path: `${spec.path}.source`, type: "Source", children: spec.source }, owner, {}, classes)) : null;
    for (const c of this._children) {
      const name = c._spec.name;
      Object.defineProperty(this, name, { value: c, enumerable: true, configurable: true });
    }
    // aliases by child name (".h" or "h") apply under every parent; dotted paths alias at the root
    for (const [from, to] of Object.entries(aliases)) {
      const key = from.startsWith(".") ? from.slice(1) : from;
      if (key.includes(".")) continue;
      for (const c of this._children) {
        if (key === c._spec.name) {
          if (!(to in this)) Object.defineProperty(this, to, { value: c, enumerable: false, configurable: true });
          this._aliases.set(to, c);
        }
      }
    }
  }

  private where(kind: string): string {
    return this.path === "" ? `model.${kind}` : `${this.path}.${kind}`;
  }

  /** The module's output (decoder layers: the hidden state [batch, seq, hidden]; the root: `{ logits }`). */
  get output(): TracedValue {
    return activeRecorder(this.where("output"), this._owner).moduleValue(this.path, "output", this._call);
  }
  /** Replace the module's output for the rest of the pass. */
  set output(v: GraphLike) {
    activeRecorder(this.where("output"), this._owner).swap(this.path, "output", v, this._call);
  }
  /** The module's first positional input. */
  get input(): TracedValue {
    return activeRecorder(this.where("input"), this._owner).moduleValue(this.path, "input", this._call);
  }
  set input(v: GraphLike) {
    activeRecorder(this.where("input"), this._owner).swap(this.path, "input", v, this._call);
  }
  /** All positional inputs, as an array value. */
  get inputs(): TracedValue {
    return activeRecorder(this.where("inputs"), this._owner).moduleValue(this.path, "inputs", this._call);
  }
  /** Skip the module: its computation does not run and `value` is its output. */
  skip(value: GraphLike): void {
    activeRecorder(this.where("skip"), this._owner).skip(this.path, value, this._call);
  }
  /**
   * Run this module on any value: `model.lm_head.call(model.model.norm.call(h))`. Its hooks do not fire,
   * unless the last argument is `{ hook: true }`: then the call fires the hooks of the module and its
   * submodules like a forward pass does, and counts as one more call of them (see `nth`).
   */
  call(...inputs: Array<GraphLike | { hook: boolean }>): TracedValue {
    const last = inputs[inputs.length - 1];
    let hook = false;
    if (last !== null && typeof last === "object" && Object.getPrototypeOf(last) === Object.prototype && "hook" in last) {
      hook = !!(last as { hook: boolean }).hook;
      inputs = inputs.slice(0, -1);
    }
    return activeRecorder(this.where("call"), this._owner).add(hook ? "hookedCall" : "call", [this.path, ...inputs]);
  }
  /**
   * The `i`-th call (0-based) of this module within one forward pass, for modules that run several times
   * in a pass (`call(x, { hook: true })` adds calls): `model.lm_head.nth(1).output`. Calls are numbered in
   * the order they run, the model's own call included; a call that never happens is MISSED_PROVIDER.
   */
  nth(i: number): Envoy {
    if (!Number.isInteger(i) || i < 0) throw new NNsightError("BAD_INPUT", `${this.path}.nth(${i}): the call index must be a non-negative integer`);
    const e = Object.create(this) as Envoy;
    Object.defineProperty(e, "_call", { value: i, enumerable: false });
    return e;
  }
  /** Move this invoke's step cursor to the next generation step (same as `tr.next()`). */
  next(n = 1): this {
    activeRecorder(this.where("next"), this._owner).advanceStep(n);
    return this;
  }

  /**
   * The operations inside this module's forward, each readable and writable like a module
   * (`model.model.layers[0].self_attn.source.attention_interface_0.output`). Names follow NNsight
   * (function name + call index); `String(envoy.source)` lists them. Llama attention:
   * `apply_rotary_pos_emb_0` (output: the tuple [q, k], each [batch, heads, seq, head_dim]) and
   * `attention_interface_0` (inputs q, k, v as [batch, heads, seq, head_dim] with k/v including the KV cache;
   * output [batch, seq, heads, head_dim], before o_proj); GPT-2 attention: `attention_interface_0`; MLPs:
   * `act_fn_0` (Llama) / `act_0` (GPT-2), the activation function's output. `attention_interface_0.source`
   * holds the operations inside attention (NNsight's recursive source): the SDPA call, or with
   * `attnImplementation: "eager"` the scores, the softmax (attention probabilities) and the weighted sum.
   * An operation name the module does not have is BAD_PATH, listing the ones it has.
   */
  get source(): Envoy {
    if (!this._source) {
      throw new NNsightError("BAD_PATH", `${this.path || "the model"} (${this.type}) has no source operations; attention and MLP modules have them`, { path: this.path });
    }
    return this._source;
  }

  /** Every module below this one (pre-order), this one excluded. */
  modules(): Envoy[] {
    const out: Envoy[] = [];
    const walk = (e: Envoy) => {
      for (const c of e._children) {
        out.push(c);
        walk(c);
      }
    };
    walk(this);
    return out;
  }
  /** Named children. */
  children(): Envoy[] {
    return [...this._children];
  }
  /** The module at a dotted path relative to this one (`get("layers.3.mlp")`); aliases allowed. */
  get(path: string): Envoy {
    let cur: Envoy = this;
    if (path === "") return cur;
    for (const part of path.split(".")) {
      const next = cur.child(part);
      if (!next) {
        const valid = cur._children.map((c) => c._spec.name);
        const shown = valid.length > 12 ? [...valid.slice(0, 5), "...", ...valid.slice(-2)] : valid;
        throw new NNsightError(
          "BAD_PATH",
          `${cur.path || "the model"} has no module "${part}"${valid.length ? `; its children are: ${shown.join(", ")}` : " (it has no children)"}`,
          { path: cur.path },
        );
      }
      cur = next;
    }
    return cur;
  }
  /** @internal */
  child(name: string): Envoy | undefined {
    if (/^-?\d+$/.test(name) && this._spec.isList) {
      const i = Number(name);
      return this._children[i < 0 ? i + this._children.length : i];
    }
    if (name === "source" && this._source) return this._source;
    return this._children.find((c) => c._spec.name === name) ?? this._aliases.get(name);
  }
  toString(): string {
    if (this.type === "Source") return `Source(${this.path}: ${this._children.map((c) => c._spec.name).join(", ")})`;
    return `Envoy(${this.path || "<root>"}: ${this.type})`;
  }
}

/** A list module: numeric and negative indexing, `length`, iteration. */
export class EnvoyList<T extends Envoy = Envoy> extends Envoy {
  get length(): number {
    return this._children.length;
  }
  at(i: number): T {
    const n = this._children.length;
    const j = i < 0 ? i + n : i;
    if (!Number.isInteger(j) || j < 0 || j >= n) {
      throw new NNsightError("BAD_PATH", `${this.path} has ${n} entries; index ${i} is out of range`, { path: this.path });
    }
    return this._children[j] as T;
  }
  [Symbol.iterator](): Iterator<T> {
    return (this._children as T[])[Symbol.iterator]();
  }
  readonly [i: number]: T;
}

/** A class for envoys: Envoy or a subclass (EnvoyList or a subclass of it for list modules). */
export type EnvoyClass = new (spec: ModuleSpec, owner: object, aliases: Record<string, string>, classes?: EnvoyClasses) => Envoy;

/**
 * Which class each module's envoy gets (NNsight's `envoys=`): one class for every module, or a record
 * keyed by HF class name (`"LlamaAttention"`, `"Linear"`) or by path suffix (`"mlp"`, `"self_attn.o_proj"`,
 * `"layers.0"`: whole dotted components, matched against the real path and the renamed one). A class
 * name beats a path suffix; of two suffixes the longer wins. List modules take only EnvoyList subclasses
 * (a single class for every module leaves them EnvoyLists).
 */
export type EnvoyClasses = EnvoyClass | Record<string, EnvoyClass>;

function pickClass(spec: ModuleSpec, aliases: Record<string, string>, classes: EnvoyClasses | undefined): EnvoyClass | null {
  if (classes === undefined) return null;
  if (typeof classes === "function") return spec.isList && !(classes.prototype instanceof EnvoyList) ? null : classes;
  const byType = Object.hasOwn(classes, spec.type) ? classes[spec.type]! : null;
  let chosen = byType;
  if (!chosen && spec.path !== "") {
    const forms = pathForms(spec.path, aliases);
    let best = -1;
    for (const [key, C] of Object.entries(classes)) {
      const parts = key.replace(/^\./, "").split(".");
      if (forms.some((f) => f.length >= parts.length && parts.every((p, i) => f[f.length - parts.length + i] === p)) && parts.length > best) {
        best = parts.length;
        chosen = C;
      }
    }
  }
  if (chosen && spec.isList && !(chosen.prototype instanceof EnvoyList) && chosen !== (EnvoyList as unknown as EnvoyClass)) {
    throw new NNsightError("BAD_INPUT", `envoys: ${spec.path} is a list module; its class must extend EnvoyList`, { path: spec.path });
  }
  return chosen;
}

/** A module path as components, as written and with the model's renames applied. */
function pathForms(path: string, aliases: Record<string, string>): string[][] {
  const forms = [path.split(".")];
  for (const [from, to] of Object.entries(aliases)) {
    const key = from.startsWith(".") ? from.slice(1) : from;
    if (key.includes(".")) {
      if (path === key || path.startsWith(`${key}.`)) forms.push([...to.split("."), ...path.slice(key.length).split(".").filter(Boolean)]);
    } else if (forms[0]!.includes(key)) {
      forms.push(forms[0]!.map((c) => (c === key ? to : c)));
    }
  }
  return forms;
}

function makeEnvoy(spec: ModuleSpec, owner: object, aliases: Record<string, string>, classes?: EnvoyClasses): Envoy {
  const C = pickClass(spec, aliases, classes);
  if (!spec.isList) return new (C ?? Envoy)(spec, owner, aliases, classes);
  const list = new ((C ?? EnvoyList) as typeof EnvoyList)(spec, owner, aliases, classes);
  return new Proxy(list, {
    get(target, prop, receiver) {
      if (typeof prop === "string" && /^-\d+$/.test(prop)) return target.at(Number(prop));
      if (typeof prop === "string" && /^\d+$/.test(prop) && !(prop in target)) return target.at(Number(prop));
      return Reflect.get(target, prop, receiver);
    },
  });
}

/**
 * A Source envoy that refuses operation names it does not have (NNsight raises AttributeError), so a typo
 * or the other attention implementation's name fails at once rather than as `undefined`. Only
 * snake_case names are checked: JS machinery probes objects for `then`, `toJSON`, `$$typeof` and symbols.
 */
function strictSource(src: Envoy): Envoy {
  return new Proxy(src, {
    get(target, prop, receiver) {
      if (typeof prop === "string" && !(prop in target) && /^[a-z][a-z0-9]*_[a-z0-9_]*$/.test(prop)) {
        const have = target._children.map((c) => c._spec.name).join(", ");
        throw new NNsightError("BAD_PATH", `${target.path} has no operation "${prop}"; it has: ${have}`, { path: `${target.path}.${prop}` });
      }
      return Reflect.get(target, prop, receiver);
    },
  });
}

/** Build the root envoy of a model from its module tree. Dotted-path aliases become root attributes. */
export function buildEnvoys(root: ModuleSpec, owner: object, aliases: Record<string, string> = {}, classes?: EnvoyClasses): Envoy {
  const env = makeEnvoy(root, owner, aliases, classes);
  for (const [from, to] of Object.entries(aliases)) {
    const key = from.startsWith(".") ? from.slice(1) : from;
    if (!key.includes(".")) continue;
    const target = env.get(key);
    env._aliases.set(to, target);
    if (!(to in env)) Object.defineProperty(env, to, { value: target, enumerable: false, configurable: true });
  }
  return env;
}
