/**
 * API keys and per-key quotas. Keys come from a JSON file (`--api-keys keys.json`) and/or the
 * NNSIGHT_API_KEYS environment variable (comma-separated keys, default quotas); only their sha256 is kept
 * in memory. With no keys configured the server is open: everyone is the principal "anonymous".
 *
 * keys.json: `[{ "key": "...", "name": "alice", "quota": { "maxConcurrent": 4, "jobsPerMinute": 600,
 * "resultBytes": 1073741824 } }, ...]` or `{ "keys": [...] }`; a plain string entry is a key with default quotas.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

import { NNsightError } from "../errors.js";

export interface Quota {
  /** jobs queued or running at once */
  maxConcurrent: number;
  /** jobs submitted per rolling minute */
  jobsPerMinute: number;
  /** bytes of results held in the result store */
  resultBytes: number;
}

export const DEFAULT_QUOTA: Quota = { maxConcurrent: 256, jobsPerMinute: 60_000, resultBytes: 4 * 1024 ** 3 };

export interface Principal {
  /** stable id (a prefix of the key's hash, or "anonymous"): owns jobs and results */
  id: string;
  name: string;
  quota: Quota;
}

const sha256 = (s: string): Buffer => createHash("sha256").update(s, "utf8").digest();

export class KeyStore {
  private readonly byHash = new Map<string, Principal>();
  readonly open: boolean;
  private readonly openQuota: Quota;

  constructor(entries: Array<{ key: string; name?: string; quota?: Partial<Quota> }>, defaultQuota: Quota = DEFAULT_QUOTA) {
    for (const e of entries) {
      const h = sha256(e.key);
      const id = h.toString("hex").slice(0, 16);
      this.byHash.set(h.toString("hex"), { id, name: e.name ?? id, quota: { ...defaultQuota, ...(e.quota ?? {}) } });
    }
    this.open = this.byHash.size === 0;
    this.openQuota = defaultQuota;
  }

  /** The key's principal, or UNAUTHORIZED. */
  authenticate(key: string | undefined): Principal {
    if (this.open) return { id: "anonymous", name: "anonymous", quota: this.openQuota };
    if (!key) throw new NNsightError("UNAUTHORIZED", "this server needs an API key (connect with { apiKey } or set NNSIGHT_API_KEY)");
    // looked up by hash: the key itself is never compared or kept
    const p = this.byHash.get(sha256(key).toString("hex"));
    if (!p) throw new NNsightError("UNAUTHORIZED", "the API key is not valid");
    return p;
  }

  get size(): number {
    return this.byHash.size;
  }
}

/** Keys from a file and the environment. */
export function loadKeys(file: string | undefined, env: string | undefined = process.env.NNSIGHT_API_KEYS, defaultQuota: Quota = DEFAULT_QUOTA): KeyStore {
  const entries: Array<{ key: string; name?: string; quota?: Partial<Quota> }> = [];
  if (file) {
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(file, "utf8"));
    } catch (e) {
      throw new NNsightError("IO", `cannot read API keys from ${file}: ${(e as Error).message}`);
    }
    const list = Array.isArray(raw) ? raw : (raw as { keys?: unknown })?.keys;
    if (!Array.isArray(list)) throw new NNsightError("IO", `${file}: expected an array of keys or { "keys": [...] }`);
    for (const item of list) {
      if (typeof item === "string") entries.push({ key: item });
      else if (item && typeof item === "object" && typeof (item as { key?: unknown }).key === "string") {
        const it = item as { key: string; name?: unknown; quota?: unknown };
        entries.push({ key: it.key, name: typeof it.name === "string" ? it.name : undefined, quota: parseQuota(it.quota, file) });
      } else throw new NNsightError("IO", `${file}: each key must be a string or { "key": "...", "name"?, "quota"? }`);
    }
  }
  for (const k of (env ?? "").split(",").map((x) => x.trim()).filter(Boolean)) entries.push({ key: k });
  return new KeyStore(entries, defaultQuota);
}

function parseQuota(q: unknown, file: string): Partial<Quota> | undefined {
  if (q === undefined || q === null) return undefined;
  if (typeof q !== "object") throw new NNsightError("IO", `${file}: quota must be an object`);
  const out: Partial<Quota> = {};
  for (const k of ["maxConcurrent", "jobsPerMinute", "resultBytes"] as const) {
    const v = (q as Record<string, unknown>)[k];
    if (v === undefined) continue;
    if (typeof v !== "number" || !(v >= 0)) throw new NNsightError("IO", `${file}: quota.${k} must be a non-negative number`);
    out[k] = v;
  }
  return out;
}
