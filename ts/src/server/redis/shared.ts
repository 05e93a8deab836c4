/**
 * What front ends and workers in Redis mode agree on: the key layout, the Lua scripts that move a job
 * between states (each one atomic, so every process sees one truth), and the event frames.
 *
 * Keys (P = the prefix, default "nnsight"; standalone Redis, not Cluster: the scripts name their keys):
 *   P:job:ID            hash: owner model cid kind scan state error priority createdAt startedAt finishedAt worker resultBytes
 *   P:cid:OWNER:CID     the job a client id names (resubmits after a reconnect are the same job)
 *   P:payload:ID        the graph and attachments until a worker takes the job
 *   P:result:ID         the result (same layout as a result file on disk), expiring after the retention
 *   P:q:MODEL           zset of queued jobs in service order (score: fair priority, then arrival)
 *   P:fair:MODEL        hash: V (virtual time: the priority of the last job started), o:OWNER (the owner's last priority)
 *   P:run:MODEL         hash: running job → worker id
 *   P:active:OWNER      jobs queued or running (the maxConcurrent quota)
 *   P:recent:OWNER      zset of submission times in the last minute (the jobsPerMinute quota)
 *   P:rb:OWNER, P:rbt:OWNER   stored results ("bytes:id" scored by expiry) and their total (the resultBytes quota)
 *   P:models            set of model ids a worker has registered; P:model:ID its config and tokenizer (JSON)
 *   P:alive:MODEL       zset worker id → when its heartbeat expires (Redis clock, ms)
 * Channels: P:ev:ID (the job's events, as wire frames), P:ctl:WORKER (job ids the worker must stop),
 * P:moved:MODEL (the queue moved: front ends refresh the positions they show).
 * BullMQ: one queue per model, named "m." + encodeURIComponent(model), under the prefix P:bull.
 */
import type { Redis, RedisOptions } from "ioredis";

import { NNsightError } from "../../errors.js";
import { type ErrorJSON, encodeFrame } from "../../remote/protocol.js";

export const DEFAULT_PREFIX = "nnsight";

/** BullMQ's highest priority number (2^21 - 1); fair priorities are clamped to it. */
export const PRIORITY_LIMIT = 2 ** 21 - 1;

export const queueName = (model: string): string => `m.${encodeURIComponent(model)}`;
export const bullPrefix = (prefix: string): string => `${prefix}:bull`;

/**
 * Timing of liveness checks: a worker heartbeats every `heartbeatMs` and counts as dead `aliveMs` after
 * its last beat; BullMQ's job lock lasts `lockMs` (renewed at half that) and its stalled-job check runs
 * as often. NNSIGHT_REDIS_HEARTBEAT_MS (2000), NNSIGHT_REDIS_ALIVE_MS (4 beats), NNSIGHT_REDIS_LOCK_MS
 * (30000) override them; tests shorten them.
 */
export function timing(): { heartbeatMs: number; aliveMs: number; lockMs: number } {
  const heartbeatMs = Math.max(50, Number(process.env.NNSIGHT_REDIS_HEARTBEAT_MS) || 2000);
  const aliveMs = Math.max(2 * heartbeatMs, Number(process.env.NNSIGHT_REDIS_ALIVE_MS) || 4 * heartbeatMs);
  const lockMs = Math.max(500, Number(process.env.NNSIGHT_REDIS_LOCK_MS) || 30_000);
  return { heartbeatMs, aliveMs, lockMs };
}

/** How long a job record and its payload live while the job is not finished (a crashed front end's leftovers expire). */
export const PENDING_TTL_MS = 7 * 24 * 3600_000;

// ------------------------------------------------------------------ scripts
// Every script takes the prefix as ARGV[1] and builds its key names from it.

const NOW = `local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`;

/**
 * Admit a job: ARGV prefix id owner model cid kind scan maxConcurrent jobsPerMinute resultBytes pendingTtl
 * retentionMs (how long the result and the record are kept once the job ends) payload (the graph and
 * attachments, kept for the worker when the job is admitted).
 * Returns {"DUP", id, state} for a known client id, {"QUOTA", which, n} when a quota is full, or
 * {"OK", priority, position}. Quotas are counted here, in Redis, so they hold across front ends; the
 * priority is the owner's start tag in start-time fair queuing (see nextPriority in docs/SERVICE.md).
 */
const ADMIT = `
${NOW}
local P, id, owner, model, cid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cidKey = P .. ':cid:' .. owner .. ':' .. cid
local known = redis.call('GET', cidKey)
if known then
  local st = redis.call('HGET', P .. ':job:' .. known, 'state')
  if st then return {'DUP', known, st} end
end
local maxConc, perMin, maxBytes = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local activeKey = P .. ':active:' .. owner
local active = tonumber(redis.call('GET', activeKey) or '0')
if active >= maxConc then return {'QUOTA', 'maxConcurrent', active} end
local recentKey = P .. ':recent:' .. owner
redis.call('ZREMRANGEBYSCORE', recentKey, '-inf', now - 60000)
local recent = redis.call('ZCARD', recentKey)
if recent >= perMin then return {'QUOTA', 'jobsPerMinute', recent} end
local rbKey, rbtKey = P .. ':rb:' .. owner, P .. ':rbt:' .. owner
local gone = redis.call('ZRANGEBYSCORE', rbKey, '-inf', now)
if #gone > 0 then
  local freed = 0
  for _, m in ipairs(gone) do freed = freed + tonumber(string.match(m, '^(%d+):')) end
  redis.call('ZREMRANGEBYSCORE', rbKey, '-inf', now)
  redis.call('DECRBY', rbtKey, freed)
end
local held = tonumber(redis.call('GET', rbtKey) or '0')
if held >= maxBytes then return {'QUOTA', 'resultBytes', held} end
redis.call('INCR', activeKey)
redis.call('ZADD', recentKey, now, id)
redis.call('PEXPIRE', recentKey, 61000)
-- start-time fair queuing: the owner's next tag is one past the later of the virtual time and its last tag
local fairKey = P .. ':fair:' .. model
local V = tonumber(redis.call('HGET', fairKey, 'V') or '0')
local last = tonumber(redis.call('HGET', fairKey, 'o:' .. owner) or '0')
local prio = math.max(V, last) + 1
if prio > ${PRIORITY_LIMIT} then prio = ${PRIORITY_LIMIT} end
redis.call('HSET', fairKey, 'o:' .. owner, prio)
local seq = redis.call('INCR', P .. ':seq:' .. model) % 268435456
local qKey = P .. ':q:' .. model
redis.call('ZADD', qKey, prio * 268435456 + seq, id)
local jobKey = P .. ':job:' .. id
redis.call('HSET', jobKey, 'owner', owner, 'model', model, 'cid', cid, 'kind', ARGV[6], 'scan', ARGV[7], 'state', 'QUEUED', 'priority', prio, 'createdAt', now, 'ttl', ARGV[12])
redis.call('PEXPIRE', jobKey, tonumber(ARGV[11]))
redis.call('SET', cidKey, id, 'PX', tonumber(ARGV[11]))
redis.call('SET', P .. ':payload:' .. id, ARGV[13], 'PX', tonumber(ARGV[11]))
return {'OK', prio, redis.call('ZRANK', qKey, id)}
`;

/**
 * A worker takes a job: ARGV prefix id worker frame(RUNNING). Returns {createdAt, priority} or false when the
 * job is no longer QUEUED (cancelled, or failed because a worker died): the worker skips it.
 */
const START = `
${NOW}
local P, id, worker = ARGV[1], ARGV[2], ARGV[3]
local jobKey = P .. ':job:' .. id
local st = redis.call('HGET', jobKey, 'state')
if st ~= 'QUEUED' then return false end
local model = redis.call('HGET', jobKey, 'model')
local prio = tonumber(redis.call('HGET', jobKey, 'priority') or '0')
redis.call('HSET', jobKey, 'state', 'RUNNING', 'startedAt', now, 'worker', worker)
redis.call('HSET', P .. ':run:' .. model, id, worker)
local qKey, fairKey = P .. ':q:' .. model, P .. ':fair:' .. model
redis.call('ZREM', qKey, id)
if redis.call('ZCARD', qKey) == 0 then
  -- nothing queued: tags restart from 0 (keeps them far below BullMQ's priority limit)
  redis.call('DEL', fairKey)
else
  local V = tonumber(redis.call('HGET', fairKey, 'V') or '0')
  if prio > V then redis.call('HSET', fairKey, 'V', prio) end
end
redis.call('PUBLISH', P .. ':ev:' .. id, ARGV[4])
redis.call('PUBLISH', P .. ':moved:' .. model, id)
return {redis.call('HGET', jobKey, 'createdAt'), prio}
`;

/**
 * The one place a job ends: ARGV prefix id state errorJSON frame [result resultBytes]. A job already
 * finished is left alone (returns false), so a job is answered exactly once whoever tries (its worker, a
 * cancel on any front end, a time-out, the stalled-job check, the liveness sweep). Otherwise: records the
 * state, releases the quota, stores the result (COMPLETED), publishes the event, tells the job's worker to
 * stop it (when it was running and did not complete), and returns {previous state, worker or ""}.
 */
const FINISH = `
${NOW}
local P, id, state = ARGV[1], ARGV[2], ARGV[3]
local jobKey = P .. ':job:' .. id
local st = redis.call('HGET', jobKey, 'state')
if not st or st == 'COMPLETED' or st == 'ERROR' or st == 'CANCELLED' then return false end
local owner, model = redis.call('HGET', jobKey, 'owner'), redis.call('HGET', jobKey, 'model')
local ttl = tonumber(redis.call('HGET', jobKey, 'ttl') or '3600000')
redis.call('HSET', jobKey, 'state', state, 'finishedAt', now)
if ARGV[4] ~= '' then redis.call('HSET', jobKey, 'error', ARGV[4]) end
local worker = redis.call('HGET', P .. ':run:' .. model, id) or ''
redis.call('HDEL', P .. ':run:' .. model, id)
local qKey = P .. ':q:' .. model
if st == 'QUEUED' then
  redis.call('ZREM', qKey, id)
  if redis.call('ZCARD', qKey) == 0 then redis.call('DEL', P .. ':fair:' .. model) end
end
local activeKey = P .. ':active:' .. owner
if tonumber(redis.call('DECR', activeKey)) < 0 then redis.call('SET', activeKey, 0) end
if state == 'COMPLETED' and ARGV[6] then
  local bytes = tonumber(ARGV[7])
  redis.call('SET', P .. ':result:' .. id, ARGV[6], 'PX', ttl)
  redis.call('ZADD', P .. ':rb:' .. owner, now + ttl, bytes .. ':' .. id)
  redis.call('INCRBY', P .. ':rbt:' .. owner, bytes)
  redis.call('HSET', jobKey, 'resultBytes', bytes)
end
redis.call('PEXPIRE', jobKey, ttl)
redis.call('PEXPIRE', P .. ':cid:' .. owner .. ':' .. redis.call('HGET', jobKey, 'cid'), ttl)
redis.call('DEL', P .. ':payload:' .. id)
redis.call('PUBLISH', P .. ':ev:' .. id, ARGV[5])
if st == 'QUEUED' then redis.call('PUBLISH', P .. ':moved:' .. model, id) end
if worker ~= '' and state ~= 'COMPLETED' then redis.call('PUBLISH', P .. ':ctl:' .. worker, id) end
return {st, worker}
`;

/**
 * A worker's heartbeat: ARGV prefix model worker aliveMs. Returns 1 when the model's registration is
 * there, 0 when it is missing (a Redis that restarted empty): the worker registers it again.
 */
const HEARTBEAT = `
${NOW}
local P, model = ARGV[1], ARGV[2]
local aliveKey = P .. ':alive:' .. model
redis.call('ZADD', aliveKey, now + tonumber(ARGV[4]), ARGV[3])
redis.call('SADD', P .. ':models', model)
return redis.call('EXISTS', P .. ':model:' .. model)
`;

/**
 * Running jobs whose worker stopped heartbeating: ARGV prefix model. Returns {id, worker, ...}; the
 * caller fails each through FINISH (which answers a job once, so sweeping front ends may race freely).
 */
const ORPHANS = `
${NOW}
local P, model = ARGV[1], ARGV[2]
local aliveKey = P .. ':alive:' .. model
local running = redis.call('HGETALL', P .. ':run:' .. model)
local out = {}
for i = 1, #running, 2 do
  local s = redis.call('ZSCORE', aliveKey, running[i + 1])
  if not s or tonumber(s) < now then table.insert(out, running[i]); table.insert(out, running[i + 1]) end
end
return out
`;

/**
 * Queued jobs that never reached BullMQ (their front end stopped between admitting and queuing them):
 * ARGV prefix model bullJobKeyPrefix graceMs. Looks at the oldest 1000 queued jobs; returns the ids of
 * those admitted more than graceMs ago with no BullMQ job. The caller fails them (releasing the quota).
 */
const STRANDED = `
${NOW}
local P, model, bull, grace = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. ':q:' .. model, 0, 999)) do
  local created = tonumber(redis.call('HGET', P .. ':job:' .. id, 'createdAt') or '0')
  if created < now - grace and redis.call('EXISTS', bull .. id) == 0 then table.insert(out, id) end
end
return out
`;

/**
 * The models and their queues: ARGV prefix. Returns {now, [model, info, liveWorkers, queued, running]...}
 * for every registered model with a live worker or jobs waiting.
 */
const MODELS = `
${NOW}
local P = ARGV[1]
local out = {now}
for _, m in ipairs(redis.call('SMEMBERS', P .. ':models')) do
  local aliveKey = P .. ':alive:' .. m
  redis.call('ZREMRANGEBYSCORE', aliveKey, '-inf', now - 600000)
  local live = redis.call('ZCOUNT', aliveKey, now, '+inf')
  local queued = redis.call('ZCARD', P .. ':q:' .. m)
  local running = redis.call('HLEN', P .. ':run:' .. m)
  local info = redis.call('GET', P .. ':model:' .. m)
  if info and (live > 0 or queued > 0 or running > 0) then
    table.insert(out, m); table.insert(out, info); table.insert(out, live); table.insert(out, queued); table.insert(out, running)
  end
end
return out
`;

export interface Scripts {
  nnAdmit(...args: Array<string | number | Buffer>): Promise<[string, string | number, string | number]>;
  nnStart(...args: Array<string | number | Buffer>): Promise<[string, number] | null>;
  nnFinish(...args: Array<string | number | Buffer>): Promise<[string, string] | null>;
  nnHeartbeat(...args: Array<string | number>): Promise<number>;
  nnOrphans(...args: Array<string | number>): Promise<string[]>;
  nnModels(...args: Array<string | number>): Promise<Array<string | number>>;
  nnStranded(...args: Array<string | number>): Promise<string[]>;
}
export type NnRedis = Redis & Scripts;

/** A connection with the scripts above defined on it. */
export async function connectRedis(url: string, opts: RedisOptions = {}): Promise<NnRedis> {
  const { Redis } = await import("ioredis");
  const r = new Redis(url, { maxRetriesPerRequest: null, enableReadyCheck: true, lazyConnect: true, ...opts });
  let last: Error | null = null;
  r.on("error", (e: Error) => (last = e)); // reconnects by itself; commands wait for it meanwhile
  try {
    await r.connect();
  } catch (e) {
    r.disconnect();
    throw new NNsightError("IO", `cannot reach Redis at ${url}: ${(last ?? (e as Error)).message}`);
  }
  r.defineCommand("nnAdmit", { numberOfKeys: 0, lua: ADMIT });
  r.defineCommand("nnStart", { numberOfKeys: 0, lua: START });
  r.defineCommand("nnFinish", { numberOfKeys: 0, lua: FINISH });
  r.defineCommand("nnHeartbeat", { numberOfKeys: 0, lua: HEARTBEAT });
  r.defineCommand("nnOrphans", { numberOfKeys: 0, lua: ORPHANS });
  r.defineCommand("nnModels", { numberOfKeys: 0, lua: MODELS });
  r.defineCommand("nnStranded", { numberOfKeys: 0, lua: STRANDED });
  return r as NnRedis;
}

/** A second connection for SUBSCRIBE (a subscribed connection can do nothing else). */
export async function subscriber(url: string): Promise<Redis> {
  const { Redis } = await import("ioredis");
  const r = new Redis(url, { maxRetriesPerRequest: null, lazyConnect: true });
  r.on("error", () => {});
  try {
    await r.connect();
  } catch (e) {
    r.disconnect();
    throw new NNsightError("IO", `cannot reach Redis at ${url}: ${(e as Error).message}`);
  }
  return r;
}

/** The frame of a job event, as front ends forward it to clients. */
export const eventFrame = (job: string, msg: Record<string, unknown>, ...payload: Uint8Array[]): Buffer => {
  const f = encodeFrame({ type: "event", job, ...msg }, ...payload);
  return Buffer.from(f.buffer, f.byteOffset, f.byteLength);
};

/** Results up to this size also travel in their COMPLETED event (saving front ends a read). */
export const INLINE_RESULT_BYTES = 1024 * 1024;

/**
 * End a job (see FINISH). The event carries the state and error; a COMPLETED event carries the result
 * when it is small (`inline`: its JSON and tensor bytes), else only `stored: true`: front ends read the
 * result from P:result:ID, so a large result goes through Redis once.
 */
export async function finishJob(
  r: NnRedis,
  prefix: string,
  id: string,
  state: "COMPLETED" | "ERROR" | "CANCELLED",
  opts: { error?: ErrorJSON; result?: Buffer; kind?: string; inline?: { json: Uint8Array; bytes: Uint8Array } } = {},
): Promise<{ previous: string; worker: string } | null> {
  const small = opts.inline && opts.inline.json.length + opts.inline.bytes.length <= INLINE_RESULT_BYTES ? opts.inline : undefined;
  const frame =
    state === "COMPLETED" && small
      ? eventFrame(id, { status: state, split: small.json.length, kind: opts.kind }, small.json, small.bytes)
      : eventFrame(id, { status: state, ...(opts.error ? { error: opts.error } : {}), ...(state === "COMPLETED" ? { stored: true, kind: opts.kind } : {}) });
  const args: Array<string | number | Buffer> = [prefix, id, state, opts.error ? JSON.stringify(opts.error) : "", frame];
  if (opts.result) args.push(opts.result, opts.result.length);
  const r2 = await r.nnFinish(...args);
  return r2 ? { previous: r2[0], worker: r2[1] } : null;
}

/** Why a job whose worker vanished failed (the same words from the stalled check and the liveness sweep). */
export function lostWorkerError(id: string, model: string, worker: string, how: string, beforeStart = false): ErrorJSON {
  return {
    code: "INTERNAL",
    message: beforeStart
      ? `a worker serving ${model} stopped after taking job ${id} from the queue, before starting it (${how}); the job was lost and is not retried`
      : `the worker ${worker || "(unknown)"} serving ${model} stopped while running job ${id} (${how}); the job was lost and is not retried`,
    details: { job: id, worker },
  };
}

/** `p`, or undefined after `ms` (shutdown must not wait for an unreachable Redis: commands wait for it forever). */
export function bounded<T>(p: Promise<T>, ms = 2000): Promise<T | undefined> {
  let t: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((r) => (t = setTimeout(() => r(undefined), ms)));
  return Promise.race([p.catch(() => undefined), late]).finally(() => clearTimeout(t));
}
