/**
 * Results in Redis (`P:result:ID`), in the layout of a result file on disk: `[u32 meta length][u32 json
 * length][meta JSON][result JSON][safetensors bytes]`, expiring after the retention. Workers write them
 * (inside the script that completes the job, so a result exists exactly when its job is COMPLETED); any
 * front end reads them.
 */
import type { StoredMeta, StoredResult } from "../result-store.js";
import { isJobId } from "../result-store.js";
import type { ResultStoreLike } from "../service.js";
import type { NnRedis } from "./shared.js";

const enc = new TextEncoder();
const dec = new TextDecoder();

export function encodeStored(r: StoredResult): Buffer {
  const meta = enc.encode(JSON.stringify(r.meta));
  const json = enc.encode(r.json);
  const head = Buffer.alloc(8);
  head.writeUInt32LE(meta.length, 0);
  head.writeUInt32LE(json.length, 4);
  return Buffer.concat([head, meta, json, r.bytes]);
}

export function decodeStored(buf: Buffer): StoredResult {
  const m = buf.readUInt32LE(0), j = buf.readUInt32LE(4);
  const meta = JSON.parse(dec.decode(buf.subarray(8, 8 + m))) as StoredMeta;
  return { meta, json: dec.decode(buf.subarray(8 + m, 8 + m + j)), bytes: new Uint8Array(buf.buffer, buf.byteOffset + 8 + m + j, buf.length - 8 - m - j) };
}

export class RedisResultStore implements ResultStoreLike {
  /** Redis expires results by itself; nothing is told */
  onExpire: (id: string) => void = () => {};

  constructor(
    private readonly redis: NnRedis,
    private readonly prefix: string,
    readonly ttlMs: number,
  ) {}

  private key(id: string): string {
    return `${this.prefix}:result:${id}`;
  }

  /** (Workers store results through the completing script; this is for tools and tests.) */
  async put(id: string, r: StoredResult): Promise<void> {
    if (!isJobId(id)) throw new Error(`bad job id ${id}`);
    await this.redis.set(this.key(id), encodeStored(r), "PX", Math.max(1, Math.round(this.ttlMs)));
  }

  async get(id: string): Promise<StoredResult | null> {
    if (!isJobId(id)) return null;
    const buf = await this.redis.getBuffer(this.key(id));
    return buf ? decodeStored(buf) : null;
  }

  async delete(id: string): Promise<void> {
    if (isJobId(id)) await this.redis.del(this.key(id));
  }

  async close(): Promise<void> {}
}
