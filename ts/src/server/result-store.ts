/**
 * Finished jobs' results, on disk (in `--results-dir` or a fresh temp dir removed at shutdown) with a
 * bounded in-memory cache of the most recent ones, deleted after a TTL.
 *
 * Results are appended to segment files (`results-<ms>-<n>.seg`), many per write: a put joins the batch
 * that goes out with the next write (one `writev` per batch, one batch in flight at a time), and its
 * promise resolves once its record is written. The front end reports COMPLETED only after that, so a
 * result that was reported is on disk (in the OS page cache: it survives a crash or restart of the
 * server process, not of the machine; nothing is fsync'd). One file per result cost an open, a write, a
 * close and later an unlink per job, most of the store's CPU under load. A write that fails (a full
 * disk) does not fail the job: the result is kept in memory instead until it expires.
 *
 * A new segment starts every `min(ttl / 4, 60 s)` (or after 256 MiB); a segment is deleted once its
 * newest record has expired (records are never served past their TTL). An index in memory maps job ids
 * to records; a server started on an existing `--results-dir` rebuilds it by reading the segments'
 * record headers (a torn last record is ignored), and still reads and expires the one-file-per-result
 * `<id>.result` files of earlier versions. Files are named only by the server (segments) or by
 * server-made job ids (checked), so nothing a client sends names a path.
 *
 * Record: `NXR1` magic, the job id (36 ASCII bytes), u32 meta length, u32 JSON length, u64 bytes length
 * (little-endian), then the meta JSON, the result JSON and the result bytes.
 */
import { closeSync, mkdirSync, mkdtempSync, openSync, readSync, readdirSync, rmSync, statSync } from "node:fs";
import { open, readFile, readdir, rm, stat } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
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

const MAGIC = 0x3152584e; // "NXR1" read as u32 LE
const HEAD = 56;
const SEGMENT = /^results-(\d+)-(\d+)\.seg$/;
const MAX_SEGMENT_BYTES = 256 * 1024 ** 2;

interface Segment {
  name: string;
  /** ids with a record here (to expire them with the segment) */
  ids: string[];
  /** bytes written (and reserved by the batch in flight) */
  size: number;
  openedAt: number;
  /** when its newest record was written */
  lastWriteAt: number;
}

interface Located {
  seg: Segment;
  offset: number;
  length: number;
}

interface PendingPut {
  id: string;
  record: Uint8Array[];
  length: number;
  result: StoredResult;
  done: () => void;
}

function encodeRecord(id: string, r: StoredResult): Uint8Array[] {
  const meta = enc.encode(JSON.stringify(r.meta));
  const json = enc.encode(r.json);
  const head = new Uint8Array(HEAD);
  const dv = new DataView(head.buffer);
  dv.setUint32(0, MAGIC, true);
  head.set(enc.encode(id), 4);
  dv.setUint32(40, meta.length, true);
  dv.setUint32(44, json.length, true);
  dv.setUint32(48, r.bytes.length % 2 ** 32, true);
  dv.setUint32(52, Math.floor(r.bytes.length / 2 ** 32), true);
  return [head, meta, json, r.bytes];
}

function decodeRecord(buf: Uint8Array): StoredResult {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const m = dv.getUint32(40, true), j = dv.getUint32(44, true);
  const meta = JSON.parse(dec.decode(buf.subarray(HEAD, HEAD + m))) as StoredMeta;
  return { meta, json: dec.decode(buf.subarray(HEAD + m, HEAD + m + j)), bytes: buf.slice(HEAD + m + j) };
}

export class ResultStore {
  readonly dir: string;
  readonly ttlMs: number;
  private readonly ownsDir: boolean;
  private readonly cache = new Map<string, StoredResult>();
  private cacheBytes = 0;
  private readonly maxCacheBytes: number;
  /** results whose write failed: kept here until they expire */
  private readonly unwritten = new Map<string, StoredResult>();
  private readonly index = new Map<string, Located>();
  private readonly segments = new Map<string, Segment>();
  private readonly rollMs: number;
  private current: { seg: Segment; fh: Promise<FileHandle> } | null = null;
  private seq = 0;
  /** puts waiting for the next write, the write in flight, and each pending id's promise */
  private queue: PendingPut[] = [];
  private flushing: Promise<void> | null = null;
  private flushScheduled = false;
  private readonly writes = new Map<string, Promise<void>>();
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  /** called when a result expires (to release per-key byte accounting) */
  onExpire: (id: string) => void = () => {};
  /** where a failed write is reported (once per failure streak) */
  warn: (msg: string) => void = (m) => process.stderr.write(`warning: ${m}\n`);
  private writeFailing = false;

  constructor(opts: { dir?: string; ttlMs?: number; maxCacheBytes?: number } = {}) {
    this.ownsDir = !opts.dir;
    this.dir = opts.dir ?? mkdtempSync(path.join(tmpdir(), "nnsight-results-"));
    mkdirSync(this.dir, { recursive: true });
    this.ttlMs = opts.ttlMs ?? 3_600_000;
    this.maxCacheBytes = opts.maxCacheBytes ?? 64 * 1024 ** 2; // results live on disk; this is only a cache
    this.rollMs = Math.max(1000, Math.min(60_000, this.ttlMs / 4));
    if (!this.ownsDir) this.loadSegments();
    this.timer = setInterval(() => void this.sweep(), Math.max(1000, Math.min(60_000, this.ttlMs / 4)));
    this.timer.unref();
  }

  private file(id: string): string {
    if (!isJobId(id)) throw new Error(`bad job id ${id}`);
    return path.join(this.dir, `${id}.result`);
  }

  /** A persistent directory: index the records of its segments (headers only). */
  private loadSegments(): void {
    for (const name of readdirSync(this.dir)) {
      const m = SEGMENT.exec(name);
      if (!m) continue;
      this.seq = Math.max(this.seq, Number(m[2]) + 1);
      const file = path.join(this.dir, name);
      let fd: number;
      try {
        fd = openSync(file, "r");
      } catch {
        continue;
      }
      try {
        const st = statSync(file);
        const seg: Segment = { name, ids: [], size: st.size, openedAt: Number(m[1]), lastWriteAt: st.mtimeMs };
        const head = new Uint8Array(HEAD);
        const dv = new DataView(head.buffer);
        for (let off = 0; off + HEAD <= st.size; ) {
          if (readSync(fd, head, 0, HEAD, off) !== HEAD || dv.getUint32(0, true) !== MAGIC) break;
          const id = dec.decode(head.subarray(4, 40));
          const length = HEAD + dv.getUint32(40, true) + dv.getUint32(44, true) + dv.getUint32(48, true) + dv.getUint32(52, true) * 2 ** 32;
          if (off + length > st.size || !isJobId(id)) break; // a torn last record
          this.index.set(id, { seg, offset: off, length });
          seg.ids.push(id);
          off += length;
        }
        this.segments.set(name, seg);
      } finally {
        closeSync(fd);
      }
    }
  }

  /** Store a result; resolves once it is written (or, if the write failed, kept in memory). */
  put(id: string, r: StoredResult): Promise<void> {
    if (!isJobId(id)) return Promise.reject(new Error(`bad job id ${id}`));
    this.remember(id, r);
    const record = encodeRecord(id, r);
    const w = new Promise<void>((done) => {
      this.queue.push({ id, record, length: record.reduce((a, b) => a + b.length, 0), result: r, done });
    }).finally(() => {
      if (this.writes.get(id) === w) this.writes.delete(id);
    });
    this.writes.set(id, w);
    this.scheduleFlush();
    return w;
  }

  private scheduleFlush(): void {
    if (this.flushScheduled || this.flushing || this.queue.length === 0) return;
    this.flushScheduled = true;
    // puts of the same turn of the event loop join one write
    setImmediate(() => {
      this.flushScheduled = false;
      this.flushing = this.flush().finally(() => {
        this.flushing = null;
        this.scheduleFlush();
      });
    });
  }

  private segment(now: number, bytes: number): { seg: Segment; fh: Promise<FileHandle> } {
    const c = this.current;
    if (c && now - c.seg.openedAt < this.rollMs && (c.seg.size === 0 || c.seg.size + bytes <= MAX_SEGMENT_BYTES)) return c;
    if (c) void c.fh.then((f) => f.close()).catch(() => {});
    const name = `results-${now}-${this.seq++}.seg`;
    const seg: Segment = { name, ids: [], size: 0, openedAt: now, lastWriteAt: now };
    this.segments.set(name, seg);
    const fh = open(path.join(this.dir, name), "a");
    fh.catch(() => {});
    this.current = { seg, fh };
    return this.current;
  }

  private async flush(): Promise<void> {
    const batch = this.queue;
    this.queue = [];
    const now = Date.now();
    const bytes = batch.reduce((a, p) => a + p.length, 0);
    const { seg, fh } = this.segment(now, bytes);
    const start = seg.size;
    seg.size += bytes;
    try {
      const f = await fh;
      const bufs = batch.flatMap((p) => p.record);
      // writev takes at most IOV_MAX (1024) buffers at a time
      for (let i = 0; i < bufs.length; i += 1024) {
        const part = bufs.slice(i, i + 1024);
        const want = part.reduce((a, b) => a + b.length, 0);
        let { bytesWritten } = await f.writev(part);
        while (bytesWritten < want) {
          // a short write: the rest, byte for byte
          const rest = Buffer.concat(part).subarray(bytesWritten);
          bytesWritten += (await f.write(rest)).bytesWritten;
        }
      }
      let off = start;
      for (const p of batch) {
        this.index.set(p.id, { seg, offset: off, length: p.length });
        seg.ids.push(p.id);
        off += p.length;
      }
      seg.lastWriteAt = Date.now();
      this.writeFailing = false;
    } catch (e) {
      // the segment may now hold a partial write: start a new one, keep this batch in memory
      if (this.current?.seg === seg) this.current = null;
      void fh.then((f) => f.close()).catch(() => {});
      for (const p of batch) this.unwritten.set(p.id, p.result);
      if (!this.writeFailing) this.warn(`the result store cannot write to ${this.dir} (${(e as Error).message}); results are kept in memory until it can`);
      this.writeFailing = true;
    }
    for (const p of batch) p.done();
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

  /** A stored result (waits for its write: nothing is served that a crash could still lose). */
  async get(id: string): Promise<StoredResult | null> {
    if (!isJobId(id)) return null;
    await this.writes.get(id);
    const r = this.cache.get(id) ?? this.unwritten.get(id) ?? (await this.read(id));
    if (!r || Date.now() - r.meta.createdAt > this.ttlMs) return null;
    return r;
  }

  private async read(id: string): Promise<StoredResult | null> {
    const at = this.index.get(id);
    try {
      if (!at) return decodeLegacy(await readFile(this.file(id)));
      const f = await open(path.join(this.dir, at.seg.name), "r");
      try {
        const buf = new Uint8Array(at.length);
        const { bytesRead } = await f.read(buf, 0, at.length, at.offset);
        return bytesRead === at.length ? decodeRecord(buf) : null;
      } finally {
        await f.close();
      }
    } catch {
      return null;
    }
  }

  /** Forget a result (its bytes leave the disk with its segment). */
  async delete(id: string): Promise<void> {
    const c = this.cache.get(id);
    if (c) {
      this.cache.delete(id);
      this.cacheBytes -= c.bytes.length + c.json.length;
    }
    await this.writes.get(id);
    this.unwritten.delete(id);
    this.index.delete(id);
    if (isJobId(id)) await rm(this.file(id), { force: true });
  }

  /** Delete results older than the TTL: whole segments, and results kept in memory or in legacy files. */
  async sweep(now = Date.now()): Promise<void> {
    // the current segment rolls over even when no result comes to start the next one
    const c = this.current;
    if (c && now - c.seg.openedAt >= this.rollMs && !this.flushing && this.queue.length === 0) {
      this.current = null;
      void c.fh.then((f) => f.close()).catch(() => {});
    }
    for (const seg of [...this.segments.values()]) {
      if (seg === this.current?.seg || now - seg.lastWriteAt <= this.ttlMs) continue;
      this.segments.delete(seg.name);
      await rm(path.join(this.dir, seg.name), { force: true }).catch(() => {});
      for (const id of seg.ids) {
        if (this.index.get(id)?.seg !== seg) continue;
        await this.delete(id);
        this.onExpire(id);
      }
    }
    for (const [id, r] of [...this.unwritten]) {
      if (now - r.meta.createdAt <= this.ttlMs) continue;
      await this.delete(id);
      this.onExpire(id);
    }
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch {
      return;
    }
    for (const n of names) {
      if (!n.endsWith(".result")) continue;
      const id = n.slice(0, -".result".length);
      if (!isJobId(id)) continue;
      const s = await stat(path.join(this.dir, n)).catch(() => null);
      if (s && now - s.mtimeMs > this.ttlMs) {
        await this.delete(id);
        this.onExpire(id);
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    while (this.flushing || this.queue.length) {
      if (this.flushing) await this.flushing;
      else await this.flush();
    }
    await this.current?.fh.then((f) => f.close()).catch(() => {});
    this.current = null;
    if (this.ownsDir) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A result file of the one-file-per-result layout (earlier versions). */
function decodeLegacy(buf: Buffer): StoredResult {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const m = dv.getUint32(0, true), j = dv.getUint32(4, true);
  const meta = JSON.parse(dec.decode(buf.subarray(8, 8 + m))) as StoredMeta;
  return { meta, json: dec.decode(buf.subarray(8 + m, 8 + m + j)), bytes: new Uint8Array(buf.subarray(8 + m + j)) };
}
