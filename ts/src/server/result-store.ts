/**
 * Finished jobs' results, on disk (one file per job, in `--results-dir` or a fresh temp dir removed at
 * shutdown) with a bounded in-memory cache of the most recent ones, deleted after a TTL. Files are named
 * only by server-made job ids (checked), so nothing a client sends names a path.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { readFile, readdir, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";

export interface StoredMeta {
  owner: string;
  kind: string;
  model: string;
  createdAt: number;
}
export interface StoredResult {
  meta: StoredMeta;
  json: string;
  bytes: Uint8Array;
}

const ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const isJobId = (s: string): boolean => ID.test(s);

const enc = new TextEncoder();
const dec = new TextDecoder();

export class ResultStore {
  readonly dir: string;
  readonly ttlMs: number;
  private readonly ownsDir: boolean;
  private readonly cache = new Map<string, StoredResult>();
  private cacheBytes = 0;
  private readonly maxCacheBytes: number;
  private readonly writes = new Map<string, Promise<void>>();
  private readonly timer: NodeJS.Timeout;
  /** called when a result expires (to release per-key byte accounting) */
  onExpire: (id: string) => void = () => {};

  constructor(opts: { dir?: string; ttlMs?: number; maxCacheBytes?: number } = {}) {
    this.ownsDir = !opts.dir;
    this.dir = opts.dir ?? mkdtempSync(path.join(tmpdir(), "nnsight-results-"));
    mkdirSync(this.dir, { recursive: true });
    this.ttlMs = opts.ttlMs ?? 3_600_000;
    this.maxCacheBytes = opts.maxCacheBytes ?? 64 * 1024 ** 2; // results live on disk; this is only a cache
    this.timer = setInterval(() => void this.sweep(), Math.max(1000, Math.min(60_000, this.ttlMs / 4)));
    this.timer.unref();
  }

  private file(id: string): string {
    if (!isJobId(id)) throw new Error(`bad job id ${id}`);
    return path.join(this.dir, `${id}.result`);
  }

  put(id: string, r: StoredResult): void {
    this.remember(id, r);
    const meta = enc.encode(JSON.stringify(r.meta));
    const json = enc.encode(r.json);
    const head = new Uint8Array(8);
    const dv = new DataView(head.buffer);
    dv.setUint32(0, meta.length, true);
    dv.setUint32(4, json.length, true);
    const w = writeFile(this.file(id), Buffer.concat([head, meta, json, r.bytes]))
      .catch(() => {}) // the in-memory copy still serves; a full disk must not fail the job
      .finally(() => this.writes.delete(id));
    this.writes.set(id, w);
  }

  private remember(id: string, r: StoredResult): void {
    const size = r.bytes.length + r.json.length;
    if (size > this.maxCacheBytes / 4) return;
    this.cache.set(id, r);
    this.cacheBytes += size;
    for (const [k, v] of this.cache) {
      if (this.cacheBytes <= this.maxCacheBytes) break;
      this.cache.delete(k);
      this.cacheBytes -= v.bytes.length + v.json.length;
    }
  }

  async get(id: string): Promise<StoredResult | null> {
    if (!isJobId(id)) return null;
    const c = this.cache.get(id);
    if (c) return c;
    await this.writes.get(id);
    let buf: Buffer;
    try {
      buf = await readFile(this.file(id));
    } catch {
      return null;
    }
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const m = dv.getUint32(0, true), j = dv.getUint32(4, true);
    const meta = JSON.parse(dec.decode(buf.subarray(8, 8 + m))) as StoredMeta;
    if (Date.now() - meta.createdAt > this.ttlMs) return null;
    return { meta, json: dec.decode(buf.subarray(8 + m, 8 + m + j)), bytes: new Uint8Array(buf.subarray(8 + m + j)) };
  }

  async delete(id: string): Promise<void> {
    const c = this.cache.get(id);
    if (c) {
      this.cache.delete(id);
      this.cacheBytes -= c.bytes.length + c.json.length;
    }
    await this.writes.get(id);
    if (isJobId(id)) await rm(this.file(id), { force: true });
  }

  /** Delete results older than the TTL. */
  async sweep(now = Date.now()): Promise<void> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch {
      return;
    }
    for (const n of names) {
      const id = n.replace(/\.result$/, "");
      if (!isJobId(id)) continue;
      const s = await stat(path.join(this.dir, n)).catch(() => null);
      if (s && now - s.mtimeMs > this.ttlMs) {
        await this.delete(id);
        this.onExpire(id);
      }
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await Promise.all(this.writes.values());
    if (this.ownsDir) rmSync(this.dir, { recursive: true, force: true });
  }
}
