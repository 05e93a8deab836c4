// Shared by the cluster suites: run a group of rank processes (launchRanks over a .mjs script that
// imports dist/, rebuilt first when stale) and collect what each rank sent.
import path from "node:path";
import { fileURLToPath } from "node:url";

import { type LaunchOptions, launchRanks } from "../../ts/src/cluster/launch.js";
import { ensureBuilt } from "../remote/helpers.js";

export const HERE = path.dirname(fileURLToPath(import.meta.url));

export interface GroupRun<M> {
  /** messages by rank, in arrival order */
  byRank: M[][];
  /** how the group ended: null when every rank exited with 0 */
  failure: (Error & { code?: string }) | null;
  ms: number;
}

export async function runGroup<M = Record<string, any>>(script: string, args: string[], opts: Omit<LaunchOptions, "entry" | "args">): Promise<GroupRun<M>> {
  await ensureBuilt();
  const t0 = Date.now();
  const g = launchRanks({ ...opts, entry: path.join(HERE, script), args, silent: false });
  const byRank: M[][] = Array.from({ length: opts.world }, () => []);
  g.on("message", (rank: number, m: M) => byRank[rank]!.push(m));
  let failure: GroupRun<M>["failure"] = null;
  try {
    await g.done;
  } catch (e) {
    failure = e as Error;
  }
  return { byRank, failure, ms: Date.now() - t0 };
}
