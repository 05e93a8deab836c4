/**
 * Scopes: deterministic lifetime for tensors, like tfjs's `tidy`. Every tensor created while a scope is
 * open belongs to it and is disposed when the scope closes, unless it is returned from the scope
 * function or passed to `keep()`. A trace is such a scope (`.save()` plays the role of `keep()`).
 *
 * ```ts
 * const y = scope(() => x.mul(2).add(1));   // the temporary x.mul(2) is freed, y is kept
 * ```
 * Native memory is also freed when a tensor is garbage collected; scopes just make it prompt.
 */
import type { Tensor } from "./tensor.js";

const stack: Array<Set<Tensor>> = [];

/** @internal Called by the Tensor constructor. */
export function trackTensor(t: Tensor): void {
  const top = stack[stack.length - 1];
  if (top) top.add(t);
}

/** Keep a tensor beyond the current scope (it moves to the enclosing scope, if any). */
export function keep<T extends Tensor>(t: T): T {
  const top = stack[stack.length - 1];
  if (top && top.delete(t)) {
    const parent = stack[stack.length - 2];
    if (parent) parent.add(t);
  }
  return t;
}

/** Collect the tensors inside a returned value (tensor, array or plain object, nested). */
export function collectTensors(v: unknown, out: Set<Tensor>, isTensor: (x: unknown) => x is Tensor, depth = 0): void {
  if (depth > 8 || v === null || typeof v !== "object") return;
  if (isTensor(v)) {
    out.add(v);
    return;
  }
  if (Array.isArray(v)) for (const e of v) collectTensors(e, out, isTensor, depth + 1);
  else if (Object.getPrototypeOf(v) === Object.prototype) for (const e of Object.values(v)) collectTensors(e, out, isTensor, depth + 1);
}

/** @internal Open a scope; returns a closer that disposes everything not in `keepSet`. */
export function openScope(): (keepSet: Set<Tensor>) => void {
  const s = new Set<Tensor>();
  stack.push(s);
  return (keepSet) => {
    const i = stack.lastIndexOf(s);
    if (i >= 0) stack.splice(i, 1);
    const parent = stack[stack.length - 1];
    for (const t of s) {
      if (keepSet.has(t)) parent?.add(t);
      else t.dispose();
    }
  };
}

/**
 * @internal A scope owned by a long-lived activity (a trace): tensors created inside `within(fn)` belong
 * to it even when fn runs while another scope is open (hooks run inside the model's per-layer scopes).
 */
export class OwnedScope {
  readonly tensors = new Set<Tensor>();
  within<T>(fn: () => T): T {
    stack.push(this.tensors);
    try {
      return fn();
    } finally {
      const i = stack.lastIndexOf(this.tensors);
      if (i >= 0) stack.splice(i, 1);
    }
  }
  /** Dispose everything not in keepSet; kept tensors move to the scope open around the caller, if any. */
  close(keepSet: Set<Tensor>): void {
    const parent = stack[stack.length - 1];
    for (const t of this.tensors) {
      if (keepSet.has(t)) parent?.add(t);
      else t.dispose();
    }
    this.tensors.clear();
  }
}

/** Run fn with no scope collecting what it creates (long-lived tensors made while a scope is open). */
export function untracked<T>(fn: () => T): T {
  return new OwnedScope().within(fn); // a scope that is never closed
}
