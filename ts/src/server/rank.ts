/**
 * The worker side of a tensor-parallel worker group (`nnsight serve --tp N`): N worker processes, forked
 * by the front end with `launchRanks`, each holding its shard of one model. Rank 0 is the worker the
 * front end talks to (the same IPC protocol as a single worker); it hands every job to the other ranks
 * over the group's own communicator, so all ranks see the same jobs in the same order, and every rank
 * runs the same forward passes and generations (with their collectives) on its shard.
 *
 * What goes over the communicator, in this order, for each job (all ranks issue the same calls):
 *
 *   header    int32 [4], broadcast from rank 0: [kind, meta bytes, attachment bytes, 0]; kind 0 is a
 *             heartbeat (nothing follows), 1 a job, 2 the end of the group
 *   payload   int32 [ceil(bytes / 4)], broadcast from rank 0: UTF-8 JSON { job, scan, graph } followed
 *             by the attachments (safetensors bytes)
 *   ...       the job's own collectives (all-reduces and gathers of the forward passes), plus, at every
 *             step boundary where a job may stop (between generation steps and session traces), an
 *             int32 [1] broadcast of rank 0's "stop now?" so every rank stops at the same step
 *   outcome   int32 [2N] all-gather: per rank 0 where it finished the job, 1 where it failed, and a digest
 *             of its encoded result (NNSIGHT_TP_CHECK=1; else 0) that rank 0 compares with its own
 *
 * Followers wait for the next header inside a collective, which times out after the communicator's
 * timeout; rank 0 therefore sends a heartbeat header whenever it has been idle for a quarter of it. A rank
 * that sees the communicator break (a peer died, a collective mismatched or timed out) cannot go on:
 * followers exit, rank 0 reports the job failed with `restart: true`, and the front end restarts the whole
 * group.
 */
import type { Communicator } from "../cluster/communicator.js";
import { NNsightError } from "../errors.js";
import { type Tensor, fromArray } from "../tensor/tensor.js";
import { deviceIndexOf } from "../tensor/device.js";

/** A job as every rank runs it. */
export interface GroupJob {
  job: string;
  scan: boolean;
  graph: string;
  attachments: Uint8Array;
}

const HEARTBEAT = 0;
const JOB = 1;
const END = 2;

const enc = new TextEncoder();
const dec = new TextDecoder();

export class JobChannel {
  readonly comm: Communicator;
  private readonly device: number;
  /** set once a collective of the channel failed: the group cannot run another job */
  broken: NNsightError | null = null;

  constructor(comm: Communicator) {
    this.comm = comm;
    this.device = deviceIndexOf(comm.device) ?? -1;
  }

  get rank(): number {
    return this.comm.rank;
  }
  get world(): number {
    return this.comm.world;
  }

  /** Broadcast `values` from rank 0 (the other ranks pass zeros of the same length) and read the result. */
  private async broadcast(values: Int32Array): Promise<Int32Array> {
    return this.collective(values, (t) => {
      this.comm.broadcast_(t, 0);
      return t;
    });
  }

  private async collective(values: Int32Array, fn: (t: Tensor) => Tensor): Promise<Int32Array> {
    if (this.broken) throw this.broken;
    const t = fromArray(values, "int32", [values.length], this.device);
    let out: Tensor | null = null;
    try {
      out = fn(t);
      return (await out.data()) as Int32Array;
    } catch (e) {
      this.broken = e instanceof NNsightError ? e : new NNsightError("COMM", String((e as Error)?.message ?? e));
      throw this.broken;
    } finally {
      if (out !== t) out?.dispose();
      t.dispose();
    }
  }

  /** Rank 0: hand a job to the other ranks (null: a heartbeat that keeps their wait from timing out). */
  async send(job: GroupJob | null): Promise<void> {
    if (job === null) {
      await this.broadcast(Int32Array.of(HEARTBEAT, 0, 0, 0));
      return;
    }
    const meta = enc.encode(JSON.stringify({ job: job.job, scan: job.scan, graph: job.graph }));
    const n = meta.length + job.attachments.length;
    if (n > 0x7fff_fff0) throw new NNsightError("TOO_LARGE", `a job of ${n} bytes cannot be handed to the tensor-parallel ranks (at most 2 GiB)`);
    const payload = new Uint8Array(Math.ceil(n / 4) * 4);
    payload.set(meta, 0);
    payload.set(job.attachments, meta.length);
    // the header first: the other ranks learn the payload's size from it
    const header = this.broadcast(Int32Array.of(JOB, meta.length, job.attachments.length, 0));
    const body = this.broadcast(new Int32Array(payload.buffer));
    await Promise.all([header, body]);
  }

  /** Rank 0: tell the other ranks that the group ends (they exit). */
  async end(): Promise<void> {
    await this.broadcast(Int32Array.of(END, 0, 0, 0));
  }

  /** Ranks 1..N-1: the next job from rank 0 (heartbeats skipped), or null when the group ends. */
  async receive(): Promise<GroupJob | null> {
    for (;;) {
      const h = await this.broadcast(new Int32Array(4));
      if (h[0] === HEARTBEAT) continue;
      if (h[0] === END) return null;
      if (h[0] !== JOB) throw new NNsightError("INTERNAL", `rank ${this.rank}: unknown message kind ${h[0]} from rank 0`);
      const metaLen = h[1]!, attLen = h[2]!;
      const body = await this.broadcast(new Int32Array(Math.ceil((metaLen + attLen) / 4)));
      const bytes = new Uint8Array(body.buffer, body.byteOffset, metaLen + attLen);
      const meta = JSON.parse(dec.decode(bytes.subarray(0, metaLen))) as Omit<GroupJob, "attachments">;
      return { job: meta.job, scan: meta.scan, graph: meta.graph, attachments: bytes.slice(metaLen) };
    }
  }

  /** Every rank, at a step boundary: rank 0's `stop` (the others' is ignored), the same on every rank. */
  async agree(stop: boolean): Promise<boolean> {
    const v = await this.broadcast(Int32Array.of(stop ? 1 : 0));
    return v[0] === 1;
  }

  /** Every rank, after a job: whether each rank finished it (false where it failed) and its digest, in rank order. */
  async outcomes(ok: boolean, digest = 0): Promise<Array<{ ok: boolean; digest: number }>> {
    const v = await this.collective(Int32Array.of(ok ? 0 : 1, digest | 0), (t) => this.comm.allGather(t, 0));
    return Array.from({ length: v.length / 2 }, (_, r) => ({ ok: v[2 * r] === 0, digest: v[2 * r + 1]! >>> 0 }));
  }
}

/** FNV-1a (32 bits) over some byte arrays: a cheap fingerprint of a result, to compare ranks. */
export function digestOf(...parts: Uint8Array[]): number {
  let h = 0x811c9dc5;
  for (const p of parts) {
    for (let i = 0; i < p.length; i++) {
      h ^= p[i]!;
      h = Math.imul(h, 0x01000193);
    }
  }
  return h >>> 0;
}
