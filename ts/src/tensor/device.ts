/**
 * Devices: `"cpu"` and `"cuda:N"` (`"cuda"` means `"cuda:0"`). A tensor lives on one device
 * (`tensor.device`); ops run on the device of their inputs, and inputs on different devices are a
 * `DEVICE` error (`tensor.to("cuda")` / `tensor.cpu()` move them). CUDA needs an addon built with a
 * CUDA toolkit, an NVIDIA driver and a GPU: `cudaInfo()` says which is missing.
 *
 * ```ts
 * if (cudaAvailable()) {
 *   const x = tensor([1, 2, 3]).to("cuda");   // x.device === "cuda:0"
 *   console.log(x.mul(2).cpu().toArray());
 * }
 * ```
 */
import { NNsightError } from "../errors.js";
import { native } from "../native/binding.js";

export type Device = "cpu" | `cuda:${number}`;

const NAMES: Device[] = [];
/** "cpu" for -1, "cuda:N" for N (interned). */
export function deviceName(index: number): Device {
  if (index < 0) return "cpu";
  return (NAMES[index] ??= `cuda:${index}`);
}

/** The device index of a device string ("cpu" -1, "cuda" 0, "cuda:1" 1), or null when it is not one. */
export function deviceIndexOf(s: string): number | null {
  if (s === "cpu") return -1;
  if (s === "cuda") return 0;
  const m = /^cuda:(\d+)$/.exec(s);
  return m ? Number(m[1]) : null;
}

/** Parse a device string; throws NNsightError DEVICE for anything else. */
export function parseDevice(d: string): number {
  const i = typeof d === "string" ? deviceIndexOf(d) : null;
  if (i === null) throw new NNsightError("DEVICE", `unknown device ${JSON.stringify(d)}; expected "cpu", "cuda" or "cuda:N"`);
  return i;
}

export interface CudaInfo {
  /** the addon was built with CUDA kernels */
  compiled: boolean;
  /** a CUDA device can be used now */
  available: boolean;
  /** number of usable CUDA devices */
  deviceCount: number;
  /** why CUDA cannot be used (null when it can) */
  reason: string | null;
}

/** What this addon and machine offer for CUDA (the driver is probed once, on the first call). */
export function cudaInfo(): CudaInfo {
  const i = native.cudaInfo();
  return { compiled: i.compiled, available: i.available, deviceCount: i.devices, reason: i.reason };
}

/** Whether tensors can be moved to `"cuda"`. */
export function cudaAvailable(): boolean {
  return native.cudaInfo().available;
}

/** Throws NNsightError DEVICE (with the reason) unless `index` names a usable device. */
export function requireDevice(index: number, what: string): void {
  if (index < 0) return;
  const i = native.cudaInfo();
  if (!i.available) throw new NNsightError("DEVICE", `${what} needs ${deviceName(index)}, but CUDA is not available: ${i.reason}`);
  if (index >= i.devices) throw new NNsightError("DEVICE", `${what}: ${deviceName(index)} does not exist (${i.devices} CUDA device(s))`);
}

let current = -1;

/** @internal The device new tensors are created on when no device is given (-1 = cpu). */
export function defaultDeviceIndex(): number {
  return current;
}

/**
 * @internal Run `fn` (synchronously) with new tensors created on `index` by default: a model on a GPU
 * wraps its forward pass in this, so the ids, positions, masks and caches it builds land on its device.
 */
export function withDefaultDevice<T>(index: number, fn: () => T): T {
  const prev = current;
  current = index;
  try {
    return fn();
  } finally {
    current = prev;
  }
}
