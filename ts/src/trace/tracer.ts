/**
 * The tracer `tr` handed to trace callbacks: invokes (batched prompts), generation steps (`all`, `iter`,
 * `next`), `stop`, `log`, `cache`, and conditional blocks (`cond`).
 */
import { NNsightError } from "../errors.js";
import { Tensor } from "../tensor/tensor.js";
import type { Arg, InputJSON, StepsSpec } from "./graph.js";
import type { Recorder } from "./recorder.js";
import { TracedValue } from "./traced-value.js";

/** A prompt as the graph stores it (token tensors become id rows). */
export function inputToJSON(input: unknown): InputJSON {
  const rows = (v: unknown, what: string): number[][] => {
    if (v instanceof Tensor) {
      const a = v.toArray();
      return v.ndim === 1 ? [a as number[]] : (a as number[][]);
    }
    if (Array.isArray(v) && v.length > 0 && Array.isArray(v[0])) return v as number[][];
    if (Array.isArray(v) && v.every((x) => typeof x === "number")) return [v as number[]];
    throw new NNsightError("BAD_INPUT", `${what} must be token ids (number[], number[][] or an integer Tensor)`);
  };
  if (typeof input === "string") return input;
  if (Array.isArray(input) && input.length > 0 && input.every((x) => typeof x === "string")) return input as string[];
  if (input instanceof Tensor || Array.isArray(input)) {
    if (Array.isArray(input) && input.length === 0) throw new NNsightError("BAD_INPUT", "the prompt is empty");
    return rows(input, "token ids");
  }
  if (input && typeof input === "object" && "input_ids" in input) {
    const o = input as { input_ids: unknown; attention_mask?: unknown };
    const r: { input_ids: number[][]; attention_mask?: number[][] } = { input_ids: rows(o.input_ids, "input_ids") };
    if (o.attention_mask !== undefined) r.attention_mask = rows(o.attention_mask, "attention_mask");
    return r;
  }
  throw new NNsightError(
    "BAD_INPUT",
    "a prompt must be a string, an array of strings, token ids (number[], number[][] or an integer Tensor), or { input_ids, attention_mask }",
  );
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype;
}

export interface CacheOptions {
  /** module paths or envoys to record (default: every module) */
  modules?: Array<string | { path: string }>;
  /** also record each module's inputs */
  inputs?: boolean;
}

export class Tracer {
  /** @internal */ readonly _rec: Recorder;
  /** @internal values returned from invokes and blocks, merged into the trace result */
  readonly _returns: Arg[] = [];

  /** @internal */
  constructor(rec: Recorder) {
    this._rec = rec;
  }

  /**
   * Add a prompt to the batch; module values read inside `fn` see only its rows. With no input the
   * invoke adds no rows and sees the whole batch of the other invokes.
   */
  invoke<T>(input: unknown, fn?: () => T): T;
  invoke<T>(fn: () => T): T;
  invoke<T>(inputOrFn: unknown, maybeFn?: () => T): T {
    const rec = this._rec;
    if (rec.currentInvoke !== null) throw new NNsightError("BAD_INPUT", "an invoke cannot be opened inside another invoke");
    const hasInput = typeof inputOrFn !== "function";
    const fn = (hasInput ? maybeFn : inputOrFn) as (() => T) | undefined;
    if (hasInput && inputOrFn === "") throw new NNsightError("BAD_INPUT", "the prompt is an empty string: give at least one token of text");
    const idx = rec.addInvoke(hasInput ? inputToJSON(inputOrFn) : null);
    if (!fn) return undefined as T;
    const r = rec.inInvoke(idx, fn);
    if (isPlainObject(r)) this._returns.push(rec.arg(r));
    return r;
  }

  /** Run `fn`'s interventions at every generation step. What it returns comes back as one entry per step. */
  all<T>(fn: (step: TracedValue) => T): T {
    return this.block({ all: true }, fn);
  }
  /** Run `fn` at the given steps: a number, a list, or `{ start, stop, step }` (stop exclusive). */
  iter<T>(steps: number | number[] | { start?: number; stop?: number | null; step?: number }, fn: (step: TracedValue) => T): T {
    let spec: StepsSpec;
    if (typeof steps === "number") spec = { list: [steps] };
    else if (Array.isArray(steps)) spec = { list: [...steps] };
    else spec = { start: steps.start ?? 0, stop: steps.stop ?? null, step: steps.step ?? 1 };
    if ("list" in spec && spec.list.some((s) => !Number.isInteger(s) || s < 0)) throw new NNsightError("BAD_INPUT", "steps must be non-negative integers");
    return this.block(spec, fn);
  }
  /** Run `fn`'s interventions only when `condition` (a graph value) is true (a non-zero scalar tensor). */
  cond<T>(condition: TracedValue | boolean, fn: () => T): T {
    const rec = this._rec;
    const { value } = rec.inBlock(null, rec.arg(condition), (b) => {
      const v = fn();
      b.result = null;
      return v;
    });
    return value;
  }

  private block<T>(spec: StepsSpec, fn: (step: TracedValue) => T): T {
    const rec = this._rec;
    const { block, value } = rec.inBlock(spec, null, (b) => {
      const step = rec.add("step", []);
      const v = fn(step);
      b.result = rec.arg(v);
      return v;
    });
    if (!isPlainObject(value)) return value;
    // after the run each name holds one value per step: return graph values that say so
    const ref = rec.add("blockResult", [block.id, Object.keys(value as object)], { step: 0 });
    this._returns.push({ $ref: ref.id });
    const perStep: Record<string, TracedValue> = {};
    for (const k of Object.keys(value as object)) perStep[k] = ref.get(k);
    return perStep as T;
  }

  /** Move the step cursor (of the current invoke, or of all invokes outside one) to the next generation step. */
  next(n = 1): void {
    this._rec.advanceStep(n);
  }
  /** End the forward pass (and generation) once every node recorded before this has run. */
  stop(): void {
    this._rec.add("stop", []);
    this._rec.stopped = true;
  }
  /** Print values while the graph runs (remotely: LOG events). */
  log(...values: unknown[]): void {
    this._rec.add("log", values);
  }
  /**
   * Record module outputs (and inputs, if asked) as the pass runs: once returned, an object keyed by module
   * path (`"model.layers.0"`) whose entries hold `output` (and `inputs`).
   */
  cache(opts: CacheOptions = {}): TracedValue {
    const modules = opts.modules?.map((m) => (typeof m === "string" ? m : m.path)) ?? null;
    return this._rec.add("cache", [{ modules, inputs: !!opts.inputs }]);
  }
}
