/** The tensor layer's public surface. */
import { native } from "../native/binding.js";
import { collectTensors, keep, openScope } from "./scope.js";
import { Tensor } from "./tensor.js";

export { Tensor, makeTensor as tensor, empty, zeros, ones, full, arange, randn, cat, stack, where, broadcastShapes } from "./tensor.js";
export type { Index, IndexItem, TensorLike, ReduceOpts } from "./tensor.js";
export { DTYPES, type DType, parseDType, isFloat, dtypeSize } from "./dtype.js";
export { type Device, type CudaInfo, cudaAvailable, cudaInfo } from "./device.js";
export { keep };

const isTensor = (x: unknown): x is Tensor => x instanceof Tensor;

/**
 * Run fn; dispose every tensor it created except those it returns (anywhere inside arrays / plain
 * objects) or passed to keep(). Async functions are supported: the scope closes when the promise settles.
 */
export function scope<T>(fn: () => T): T {
  const close = openScope();
  let result: T;
  try {
    result = fn();
  } catch (e) {
    close(new Set());
    throw e;
  }
  if (result instanceof Promise) {
    return result.then(
      (v) => {
        const ks = new Set<Tensor>();
        collectTensors(v, ks, isTensor);
        close(ks);
        return v;
      },
      (e) => {
        close(new Set());
        throw e;
      },
    ) as T;
  }
  const ks = new Set<Tensor>();
  collectTensors(result, ks, isTensor);
  close(ks);
  return result;
}

/** Native memory: live tensor handles, storages, bytes allocated and mapped, kernels still queued. */
export function memory() {
  return native.memory();
}
/** Threads the CPU kernels use (default: all cores). */
export function setNumThreads(n: number): void {
  native.setThreads(n);
}
export function getNumThreads(): number {
  return native.getThreads();
}
/** Wait until every queued kernel has run. */
export function sync(): Promise<void> {
  return native.sync();
}
