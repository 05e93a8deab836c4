/**
 * Starting a tensor-parallel group, torchrun-style: `launchRanks()` forks one process per rank, each
 * running the same script with `NNSIGHT_TP` set in its environment (rank, world, backend and the group's
 * unique name); in the rank, `joinGroup()` reads it and joins the communicator.
 *
 * ```ts
 * // tp.mjs: run with `node tp.mjs`; the same file is the launcher and every rank
 * import { LanguageModel, launchRanks, joinGroup, rankInfo } from "nnsight";
 * if (!rankInfo()) {
 *   await launchRanks({ world: 2 }).done;          // forks `node tp.mjs` twice
 * } else {
 *   const comm = await joinGroup();
 *   const model = await LanguageModel.load("stories260K", { tensorParallel: comm });
 *   const out = await model.trace("Once upon a time", () => ({ h: model.model.layers[1].output }));
 *   if (comm.rank === 0) console.log(out.h.shape);
 *   comm.close();
 * }
 * ```
 *
 * shm groups get a fresh name from the launcher (`nnsight-tp-<pid>-<random>`). NCCL groups need rank 0's
 * `ncclUniqueId`: rank 0 makes it in joinGroup() and sends it to the launcher over the fork IPC channel,
 * which relays it to the other ranks. `done` resolves when every rank exited with code 0 and rejects
 * (COMM) when one failed; the others are killed `graceMs` later if they have not stopped by themselves
 * (a communicator notices a dead peer within milliseconds, so they normally fail on their own first).
 */
import { randomBytes } from "node:crypto";
import { type ChildProcess, fork } from "node:child_process";
import { EventEmitter } from "node:events";
import { existsSync, unlinkSync } from "node:fs";
import path from "node:path";

import { NNsightError } from "../errors.js";
import { type CommBackend, Communicator, type CommunicatorOptions } from "./communicator.js";

/** What a rank process learns from its launcher (the NNSIGHT_TP environment variable, JSON). */
export interface RankInfo {
  rank: number;
  world: number;
  backend: CommBackend;
  /** the shm group's name (NCCL groups use it only in messages) */
  group: string;
  timeoutMs?: number;
  slotBytes?: number;
}

const ENV = "NNSIGHT_TP";
const TAG = "__nnsightTp";

export interface LaunchOptions extends CommunicatorOptions {
  world: number;
  /** the script every rank runs (default: this process's script, `process.argv[1]`) */
  entry?: string;
  args?: string[];
  /** "shm" (default: host tensors on one machine) or "nccl" (one GPU per rank) */
  backend?: CommBackend;
  /** extra environment for the ranks (added to this process's) */
  env?: NodeJS.ProcessEnv;
  /** node flags for the ranks (default: none) */
  execArgv?: string[];
  /** pipe the ranks' stdout/stderr (read them from `procs[i].stdout`) instead of inheriting them */
  silent?: boolean;
  /** once a rank failed, kill the others if they are still running after this long (default 5000 ms) */
  graceMs?: number;
}

/** The parsed NNSIGHT_TP of this process, or null when it is not a rank of a launched group. */
export function rankInfo(): RankInfo | null {
  const s = process.env[ENV];
  if (!s) return null;
  let v: RankInfo;
  try {
    v = JSON.parse(s) as RankInfo;
  } catch {
    throw new NNsightError("BAD_INPUT", `${ENV} is not valid JSON: ${s}`);
  }
  if (!Number.isInteger(v.rank) || !Number.isInteger(v.world) || typeof v.group !== "string" || (v.backend !== "shm" && v.backend !== "nccl")) {
    throw new NNsightError("BAD_INPUT", `${ENV} must hold { rank, world, backend: "shm" | "nccl", group }, got ${s}`);
  }
  return v;
}

/** In a rank started by launchRanks(): join the group described by NNSIGHT_TP. */
export async function joinGroup(opts: CommunicatorOptions & { device?: number } = {}): Promise<Communicator> {
  const info = rankInfo();
  if (!info) throw new NNsightError("BAD_INPUT", `joinGroup() runs in a rank started by launchRanks() (${ENV} is not set)`);
  const o = { timeoutMs: opts.timeoutMs ?? info.timeoutMs, slotBytes: opts.slotBytes ?? info.slotBytes };
  if (info.backend === "shm") return Communicator.joinShm(info.group, info.rank, info.world, o);
  let id: string;
  if (info.rank === 0) {
    id = Communicator.ncclUniqueId();
    if (!process.send) throw new NNsightError("BAD_INPUT", "an NCCL rank needs the launcher's IPC channel to share its unique id");
    process.send({ [TAG]: "nccl-id", id });
  } else {
    id = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new NNsightError("TIMEOUT", `rank ${info.rank}: rank 0's NCCL unique id did not arrive within ${o.timeoutMs ?? 60000} ms`)), o.timeoutMs ?? 60000);
      const on = (m: unknown) => {
        if (m && typeof m === "object" && (m as Record<string, unknown>)[TAG] === "nccl-id") {
          clearTimeout(timer);
          process.off("message", on);
          resolve(String((m as { id: unknown }).id));
        }
      };
      process.on("message", on);
    });
  }
  return Communicator.joinNccl(id, info.rank, info.world, { ...o, device: opts.device });
}

/** A fresh group name for an shm communicator. */
export function newGroupName(): string {
  return `nnsight-tp-${process.pid}-${randomBytes(6).toString("hex")}`;
}

function shmDir(): string {
  if (process.env.NX_SHM_DIR) return process.env.NX_SHM_DIR;
  if (existsSync("/dev/shm")) return "/dev/shm";
  return process.env.TMPDIR || "/tmp";
}

/**
 * The ranks of a launched group. Emits `"message"` (rank, message) for what a rank sends with
 * `process.send` and `"exit"` (rank, code, signal) when one exits.
 */
export class RankGroup extends EventEmitter {
  readonly name: string;
  readonly world: number;
  readonly procs: ChildProcess[];
  /** resolves when every rank exited with code 0; rejects with COMM naming the first rank that did not */
  readonly done: Promise<void>;

  /** @internal */
  constructor(name: string, procs: ChildProcess[], graceMs: number) {
    super();
    this.name = name;
    this.world = procs.length;
    this.procs = procs;
    this.done = new Promise<void>((resolve, reject) => {
      let exited = 0;
      let failure: NNsightError | null = null;
      procs.forEach((p, rank) => {
        p.on("message", (m: unknown) => {
          if (m && typeof m === "object" && (m as Record<string, unknown>)[TAG] === "nccl-id") {
            for (const [r, q] of procs.entries()) if (r !== rank && q.connected) q.send(m);
            return;
          }
          this.emit("message", rank, m);
        });
        p.on("exit", (code, signal) => {
          exited++;
          this.emit("exit", rank, code, signal);
          if ((code !== 0 || signal) && !failure) {
            failure = new NNsightError("COMM", `rank ${rank} (pid ${p.pid}) of group ${name} ${signal ? `was killed by ${signal}` : `exited with code ${code}`}`, { rank });
            const t = setTimeout(() => this.kill("SIGKILL"), graceMs);
            t.unref();
          }
          if (exited === procs.length) {
            this.cleanup();
            if (failure) reject(failure);
            else resolve();
          }
        });
      });
    });
    this.done.catch(() => {}); // callers that only kill() must not see an unhandled rejection
  }

  /** Send a message to one rank (its `process.on("message")`). */
  send(rank: number, message: unknown): void {
    const p = this.procs[rank];
    if (!p) throw new NNsightError("BAD_INPUT", `rank ${rank} is not in [0, ${this.world})`);
    p.send(message as never);
  }

  /** Kill every rank that still runs. */
  kill(signal: NodeJS.Signals = "SIGTERM"): void {
    for (const p of this.procs) if (p.exitCode === null && p.signalCode === null) p.kill(signal);
  }

  private cleanup(): void {
    // rank 0 unlinks the segment once every rank joined; this covers a group that never got that far
    try {
      unlinkSync(path.join(shmDir(), this.name));
    } catch {
      /* already gone */
    }
  }
}

/** Fork `world` processes of `entry`, rank r with NNSIGHT_TP = { rank: r, world, backend, group, ... }. */
export function launchRanks(opts: LaunchOptions): RankGroup {
  const { world } = opts;
  if (!Number.isInteger(world) || world < 1) throw new NNsightError("BAD_INPUT", `world must be a positive integer, got ${world}`);
  const entry = opts.entry ?? process.argv[1];
  if (!entry) throw new NNsightError("BAD_INPUT", "launchRanks needs an entry script (none given and process.argv[1] is empty)");
  const backend = opts.backend ?? "shm";
  const name = newGroupName();
  const procs: ChildProcess[] = [];
  for (let rank = 0; rank < world; rank++) {
    const info: RankInfo = { rank, world, backend, group: name, timeoutMs: opts.timeoutMs, slotBytes: opts.slotBytes };
    procs.push(
      fork(entry, opts.args ?? [], {
        env: { ...process.env, ...opts.env, [ENV]: JSON.stringify(info) },
        execArgv: opts.execArgv ?? [],
        serialization: "advanced",
        stdio: opts.silent ? ["ignore", "pipe", "pipe", "ipc"] : ["ignore", "inherit", "inherit", "ipc"],
      }),
    );
  }
  return new RankGroup(name, procs, opts.graceMs ?? 5000);
}
