/**
 * `Communicator`: collectives between the ranks (processes) of a tensor-parallel group, over the native
 * communicators of `cluster/` (C++): `shm` for processes on one machine (host tensors, shared memory) and
 * `nccl` for CUDA tensors (libnccl.so.2 loaded at run time).
 *
 * ```ts
 * // in every rank (launchRanks() starts them and joinGroup() reads what it passed):
 * const comm = await Communicator.joinShm(name, rank, world);
 * comm.allReduce_(partial);                 // partial becomes the sum over ranks, in place
 * const full = comm.allGather(shard, -1);   // shards concatenated in rank order along the last dim
 * comm.broadcast_(ids, 0);                  // rank 0's values on every rank
 * await comm.barrier();
 * comm.close();
 * ```
 *
 * Collectives are queued on the native executor like any op: they run on each rank in the order they
 * were issued, after the ops that produce their input, and return at once (read the result, or `await
 * sync()`, to wait). Every rank must issue the same collectives in the same order. Failures are
 * `NNsightError`s: COMM when a peer exited, closed its communicator or aborted, TIMEOUT when a live peer
 * does not arrive in time, SHAPE / DTYPE / BAD_INPUT when the ranks disagree about a call; errors of
 * queued calls surface when their output is read, and break the communicator for later calls.
 */
import { NNsightError, toNNsightError } from "../errors.js";
import { type NativeComm, native } from "../native/binding.js";
import { Tensor } from "../tensor/tensor.js";

export interface CommunicatorOptions {
  /** how long joining and each collective wait for a live peer before TIMEOUT (default 60000 ms) */
  timeoutMs?: number;
  /** shm: bytes each rank stages per round (default 1 MiB); larger tensors move in several rounds */
  slotBytes?: number;
}

export type CommBackend = "shm" | "nccl";

function wrap<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw toNNsightError(e);
  }
}

function checkRank(rank: number, world: number): void {
  if (!Number.isInteger(world) || world < 1) throw new NNsightError("BAD_INPUT", `world size must be a positive integer, got ${world}`);
  if (!Number.isInteger(rank) || rank < 0 || rank >= world) throw new NNsightError("BAD_INPUT", `rank ${rank} is not in [0, ${world})`);
}

export class Communicator {
  readonly rank: number;
  readonly world: number;
  readonly backend: CommBackend;
  /** "cpu" (shm) or "cuda:N" (NCCL) */
  readonly device: string;
  private h: NativeComm | null;

  private constructor(h: NativeComm) {
    this.h = h;
    const info = native.commInfo(h);
    this.rank = info.rank;
    this.world = info.world;
    this.backend = info.backend;
    this.device = info.device < 0 ? "cpu" : `cuda:${info.device}`;
  }

  /**
   * Join the shared-memory group `name` (rank 0 creates it, the others open it). Resolves once every rank
   * joined: TIMEOUT after `timeoutMs` naming the missing ranks; BAD_INPUT when the world sizes disagree,
   * a rank joins twice or the name is in use.
   */
  static async joinShm(name: string, rank: number, world: number, opts: CommunicatorOptions = {}): Promise<Communicator> {
    checkRank(rank, world);
    try {
      return new Communicator(await native.commJoinShm(name, rank, world, opts.timeoutMs, opts.slotBytes));
    } catch (e) {
      throw toNNsightError(e);
    }
  }

  /** Join an NCCL group on CUDA device `device` (default: `rank`) with rank 0's unique id. */
  static async joinNccl(uniqueId: string, rank: number, world: number, opts: CommunicatorOptions & { device?: number } = {}): Promise<Communicator> {
    checkRank(rank, world);
    try {
      return new Communicator(await native.commJoinNccl(uniqueId, rank, world, opts.device ?? rank, opts.timeoutMs));
    } catch (e) {
      throw toNNsightError(e);
    }
  }

  /** A fresh NCCL unique id (rank 0 makes it; DEVICE where NCCL or a GPU is missing). */
  static ncclUniqueId(): string {
    return wrap(() => native.ncclUniqueId());
  }

  /** Whether NCCL can be used here, and why not. */
  static ncclInfo(): { available: boolean; reason: string | null } {
    return native.ncclInfo();
  }

  /** Collectives this rank has issued so far (the same on every rank of a healthy group). */
  get calls(): number {
    return native.commInfo(this.handle()).calls;
  }

  private handle(): NativeComm {
    if (this.h === null) throw new NNsightError("DISPOSED", `the communicator of rank ${this.rank} was closed`);
    return this.h;
  }

  /** Sum `t` over the ranks, in place (queued); returns `t`. `t` must be contiguous and writable. */
  allReduce_(t: Tensor): Tensor {
    const h = this.handle();
    wrap(() => native.commAllReduce(h, t._handle()));
    return t;
  }

  /** A new tensor: every rank's `t` (same shape on all ranks) concatenated in rank order along `dim`. */
  allGather(t: Tensor, dim = 0): Tensor {
    const h = this.handle();
    return new Tensor(wrap(() => native.commAllGather(h, t._handle(), dim)));
  }

  /** Overwrite `t` with rank `root`'s `t` (queued); returns `t`. */
  broadcast_(t: Tensor, root = 0): Tensor {
    const h = this.handle();
    wrap(() => native.commBroadcast(h, t._handle(), root));
    return t;
  }

  /** Resolves once every rank reached this barrier (and everything this rank queued before it ran). */
  async barrier(): Promise<void> {
    const h = this.handle();
    const token = new Tensor(wrap(() => native.commBarrier(h)));
    try {
      await token.data();
    } finally {
      token.dispose();
    }
  }

  /** Fail every rank's pending and later collectives at once with COMM naming this rank and `reason`. */
  abort(reason: string): void {
    if (this.h === null) return;
    wrap(() => native.commAbort(this.h!, reason));
  }

  /** Leave the group once this rank's queued collectives ran; peers still waiting for this rank get COMM. */
  close(): void {
    if (this.h === null) return;
    const h = this.h;
    this.h = null;
    wrap(() => native.commClose(h));
  }
  [Symbol.dispose](): void {
    this.close();
  }
}
