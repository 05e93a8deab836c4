/**
 * The one file that loads and types the native addon (`build/Release/nnsight_native.node`, built by
 * cmake-js during `npm install`). Everything else imports `native` from here.
 */
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { NNsightError } from "../errors.js";

/**
 * A native tensor handle (an opaque external). Its metadata is written by every call that returns
 * handles into the Float64Array registered with setMetaBuffer: slot i (for the i-th returned handle)
 * holds [dtype, ndim, offset, shape[maxDims], strides[maxDims], device] (device: -1 = cpu, n = cuda:n;
 * at index metaDeviceSlot).
 */
export interface NativeTensor {
  readonly __nativeTensor: unique symbol;
}

/** A native communicator handle (cluster/communicator.h): an opaque external. */
export interface NativeComm {
  readonly __nativeComm: unique symbol;
}

export interface NativeCommInfo {
  rank: number;
  world: number;
  backend: "shm" | "nccl";
  /** -1 = host tensors (shm), n = cuda:n (NCCL) */
  device: number;
  /** collectives issued so far on this rank */
  calls: number;
}

export interface NativeMemory {
  /** tensor handles not yet disposed or collected */
  handles: number;
  storages: number;
  hostBytes: number;
  mappedBytes: number;
  /** freed large blocks kept for reuse (not in hostBytes) */
  cachedBytes: number;
  pendingKernels: number;
  /** CUDA memory held by tensors (all devices; 0 without CUDA) */
  deviceBytes: number;
  /** freed CUDA blocks the caching allocator keeps for reuse */
  cachedDeviceBytes: number;
}

/** What the addon knows about CUDA on this machine. */
export interface NativeCudaInfo {
  /** the addon was built with CUDA kernels (a CUDA toolkit was found at build time) */
  compiled: boolean;
  /** a CUDA device is usable now (driver present, at least one device) */
  available: boolean;
  devices: number;
  /** why CUDA is unavailable (null when available) */
  reason: string | null;
}

export interface NativeAddon {
  readonly opNames: string[];
  readonly metaStride: number;
  readonly maxDims: number;
  /** index of the device entry inside a metadata slot */
  readonly metaDeviceSlot: number;
  setMetaBuffer(buf: Float64Array): void;
  dispose(t: NativeTensor): void;
  isDisposed(t: NativeTensor): boolean;
  sameStorage(a: NativeTensor, b: NativeTensor): boolean;
  readonly dtypes: Record<string, number>;
  readonly cudaCompiled: boolean;
  /** device: -1 / omitted = cpu, n = cuda:n */
  empty(shape: number[], dtype: number, device?: number): NativeTensor;
  fromBuffer(data: ArrayBufferView, dtype: number, shape: number[], device?: number): NativeTensor;
  /** a contiguous copy on `device` (-1 = cpu), or a new handle over t's storage when it is already there */
  toDevice(t: NativeTensor, device: number): NativeTensor;
  cudaInfo(): NativeCudaInfo;
  view(t: NativeTensor, shape: number[], strides: number[], offset: number): NativeTensor;
  viewBytes(t: NativeTensor, byteOffset: number, dtype: number, shape: number[]): NativeTensor;
  mapFile(path: string): NativeTensor;
  op(opId: number, inputs: Array<NativeTensor | null>, attrs?: number[]): NativeTensor | NativeTensor[];
  readSync(t: NativeTensor, widen: boolean): ArrayBuffer;
  read(t: NativeTensor, widen: boolean): Promise<ArrayBuffer>;
  sync(): Promise<void>;
  syncBlocking(): void;
  errorOf(t: NativeTensor): Error | null;
  memory(): NativeMemory;
  setThreads(n: number): void;
  getThreads(): number;
  setReferenceKernels(on: boolean): void;
  /** tensors allocated while on carry shapes only and run no kernels (scan) */
  setMetaMode(on: boolean): void;
  /** return cached freed blocks to the system */
  releaseCachedMemory(): void;
  /** largest single tensor allocation in bytes (0 = unlimited): TOO_LARGE beyond it */
  setMaxAllocation(bytes: number): void;
  // ---- communicators (cluster/): joining waits for every rank; collectives are queued like ops
  commJoinShm(name: string, rank: number, world: number, timeoutMs?: number, slotBytes?: number): Promise<NativeComm>;
  commJoinNccl(uniqueId: string, rank: number, world: number, device: number, timeoutMs?: number): Promise<NativeComm>;
  /** 256 hex characters (ncclGetUniqueId); DEVICE where NCCL or a GPU is missing */
  ncclUniqueId(): string;
  ncclInfo(): { available: boolean; reason: string | null };
  commInfo(c: NativeComm): NativeCommInfo;
  /** in place */
  commAllReduce(c: NativeComm, t: NativeTensor): void;
  commAllGather(c: NativeComm, t: NativeTensor, dim: number): NativeTensor;
  /** in place */
  commBroadcast(c: NativeComm, t: NativeTensor, root: number): void;
  /** a 1-element tensor whose read completes once every rank arrived */
  commBarrier(c: NativeComm): NativeTensor;
  commAbort(c: NativeComm, reason: string): void;
  commClose(c: NativeComm): void;
  probeFmaPeak(threads: number, isa: 512 | 256): number;
  probeTriad(threads: number, bytesPerArray: number): number;
  /** turn the executor's per-op profile on or off (also NX_PROFILE=1 at startup) */
  setProfiling(on: boolean): void;
  /** a 2-D f32 host tensor over a read-only file mapping, outside meta mode: pack_weight(t, release) replaces its memory */
  canPackWeight(t: NativeTensor): boolean;
  /** whether t views a read-only file mapping (a weight loaded in place) */
  isMapped(t: NativeTensor): boolean;
  /** the per-op profile since the last reset, heaviest first (waits for queued work); reset clears it after */
  profile(reset?: boolean): Array<{ label: string; calls: number; ms: number; maxMs: number }>;
}

function packageRoot(): string {
  // dist/index.js, dist/chunk-*.js and ts/src/native/binding.ts all sit below the package root.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    if (existsSync(join(dir, "package.json")) && existsSync(join(dir, "CMakeLists.txt"))) return dir;
    dir = dirname(dir);
  }
  throw new NNsightError("INTERNAL", "cannot find the nnsight package root from " + fileURLToPath(import.meta.url));
}

function load(): NativeAddon {
  const root = packageRoot();
  const candidates = [
    process.env.NNSIGHT_ADDON,
    join(root, "build/Release/nnsight_native.node"),
    join(root, "build-gyp/Release/nnsight_native.node"),
  ].filter((p): p is string => !!p);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new NNsightError(
      "INTERNAL",
      `the native addon is not built (looked in ${candidates.join(", ")}); run \`npm install\` or \`npm run build:native\``,
    );
  }
  const require = createRequire(import.meta.url);
  return require(found) as NativeAddon;
}

export const native: NativeAddon = load();
/** Metadata of the handles the last native call returned (see NativeTensor). */
export const nativeMeta = new Float64Array(native.metaStride * 4);
native.setMetaBuffer(nativeMeta);
export const PACKAGE_ROOT = packageRoot();
