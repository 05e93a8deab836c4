/**
 * `nnsight serve`: the NDIF front end. One port serves HTTP (`GET /health`, `GET /models`, `GET /metrics`)
 * and the WebSocket endpoint `/ws` speaking the protocol of remote/protocol.ts. Model code runs only in
 * the workers; this process authenticates, admits, queues, schedules and answers.
 *
 * ```ts
 * const server = await serve({ models: ["stories260K"], port: 0 });
 * console.log(server.url);   // http://127.0.0.1:PORT
 * await server.close();
 * ```
 */
import { type IncomingMessage, type ServerResponse, createServer } from "node:http";
import path from "node:path";
import type { Duplex } from "node:stream";

import { WebSocket, WebSocketServer } from "ws";

import { Communicator } from "../cluster/communicator.js";
import { NNsightError } from "../errors.js";
import { cudaInfo } from "../tensor/device.js";
import { type ClientMessage, PROTOCOL_VERSION, type ServerLimits, decodeFrame, encodeFrame, errorToJSON, parseClientMessage, splitPayload } from "../remote/protocol.js";
import { DEFAULT_QUOTA, type KeyStore, type Principal, type Quota, loadKeys } from "./auth.js";
import { JobManager } from "./jobs.js";
import { Metrics } from "./metrics.js";
import type { AttnImplementation } from "../models/config.js";
import { ResultStore } from "./result-store.js";
import { type JobService, type ModelDirectory, type Subscriber, embeddedDirectory } from "./service.js";
import { ModelWorker } from "./worker-pool.js";

export interface ServeOptions {
  /**
   * model ids or directories; `name=dir` names one, a `:tp=N` suffix serves it with tensor parallelism
   * over N ranks (`:tp=N,backend=shm|nccl` also picks the backend), `:attn=eager` loads it with eager
   * attention (the probabilities become hook points) (default: ["stories260K"])
   */
  models?: string[];
  /** tensor-parallel ranks per model where a model does not say (default 1: one worker process) */
  tp?: number;
  /** how the ranks of a group talk: "shm" (CPU), "nccl" (one GPU per rank) or "auto" (default) */
  tpBackend?: TpBackendOption;
  port?: number;
  /** default 127.0.0.1 */
  host?: string;
  /** JSON file of API keys (see auth.ts); NNSIGHT_API_KEYS adds comma-separated keys */
  apiKeys?: string;
  /** keys given directly (tests, embedding) */
  keys?: KeyStore;
  /** default quota for keys that set none, and for everyone on an open server */
  quota?: Partial<Quota>;
  limits?: Partial<ServerLimits>;
  /** where results are kept (default: a temp dir removed at close) */
  resultsDir?: string;
  resultTtlMs?: number;
  /** native threads per worker */
  threads?: number;
  /** plain traces handed to a model's worker at once to share forward passes (default 32; 1: none) */
  maxBatch?: number;
  /** worker entry (default dist/server/worker.js) */
  workerEntry?: string;
  /** where warnings go (default: stderr) */
  warn?: (msg: string) => void;
  /**
   * Redis mode (`redis://HOST:PORT`): jobs go to one BullMQ queue per model shared by every front end on
   * that Redis, results and job records live there, and `models` are served by this process's workers
   * for that queue (none: a front end only). See redis/frontend.ts and docs/SERVICE.md.
   */
  redis?: string;
}

export interface RunningServer {
  url: string;
  host: string;
  port: number;
  /** model id → worker pid, rank 0's for a group (operators and tests) */
  workerPids(): Record<string, number | undefined>;
  /** model id → the pids of every rank of its worker group (one for a single worker) */
  groupPids(): Record<string, Array<number | undefined>>;
  close(): Promise<void>;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxFrameBytes: 256 * 1024 ** 2,
  maxGraphBytes: 16 * 1024 ** 2,
  maxAttachmentBytes: 256 * 1024 ** 2,
  maxResultBytes: 256 * 1024 ** 2,
  maxCost: 1e12,
  jobTimeoutMs: 600_000,
};

const SERVER_NAME = "nnsight-ts";

export type TpBackendOption = "auto" | "shm" | "nccl";

/**
 * What `--model` says after its id (the `:tp=N,backend=B,attn=A` suffix: tensor parallelism and HF's
 * attn_implementation), and the model without it.
 */
export function modelTp(s: string): { model: string; tp?: number; backend?: TpBackendOption; attn?: AttnImplementation } {
  const m = /:((?:tp|backend|attn)=[^:,=]*(?:,(?:tp|backend|attn)=[^:,=]*)*)$/.exec(s);
  if (!m) return { model: s };
  const out: { model: string; tp?: number; backend?: TpBackendOption; attn?: AttnImplementation } = { model: s.slice(0, m.index) };
  for (const kv of m[1]!.split(",")) {
    const [k, v = ""] = kv.split("=") as [string, string | undefined];
    if (k === "tp") out.tp = parseTp(v, `--model ${s}`);
    else if (k === "backend") out.backend = parseTpBackend(v, `--model ${s}`);
    else if (v === "sdpa" || v === "eager") out.attn = v;
    else throw new NNsightError("BAD_INPUT", `--model ${s}: attn is "sdpa" or "eager", got "${v}"`);
  }
  if (!out.model) throw new NNsightError("BAD_INPUT", `--model ${s} names no model before ":"`);
  return out;
}

export function parseTp(v: string | number, where: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 64 || (typeof v === "string" && !/^\d+$/.test(v))) {
    throw new NNsightError("BAD_INPUT", `${where}: the tensor-parallel size must be an integer from 1 to 64, got "${v}"`);
  }
  return n;
}

export function parseTpBackend(v: string, where: string): TpBackendOption {
  if (v === "auto" || v === "shm" || v === "nccl") return v;
  throw new NNsightError("BAD_INPUT", `${where}: the tensor-parallel backend is "shm", "nccl" or "auto", got "${v}"`);
}

/**
 * "auto": NCCL with one GPU per rank where NCCL loads and there are at least `world` CUDA devices, else
 * shared memory between CPU processes.
 */
export function resolveTpBackend(b: TpBackendOption, world: number): "shm" | "nccl" {
  if (b !== "auto") return b;
  if (world <= 1) return "shm";
  const cuda = cudaInfo();
  return cuda.available && cuda.deviceCount >= world && Communicator.ncclInfo().available ? "nccl" : "shm";
}

/** NCCL groups need NCCL and one CUDA device per rank: DEVICE (with the reason) before any rank starts. */
export function checkNccl(world: number, model: string): void {
  const nccl = Communicator.ncclInfo();
  if (!nccl.available) throw new NNsightError("DEVICE", `${model}: a tensor-parallel group over NCCL needs NCCL: ${nccl.reason ?? "it is not available"} (use --tp-backend shm for CPU ranks)`);
  const cuda = cudaInfo();
  if (cuda.deviceCount < world) throw new NNsightError("DEVICE", `${model}: ${world} NCCL ranks need ${world} CUDA devices (one per rank), this machine has ${cuda.deviceCount}`);
}

/** `name=dir` → [name, dir]; a directory → [basename, dir]; an id → [id, id]. */
export function modelSpec(s: string): [string, string] {
  const eq = s.indexOf("=");
  if (eq > 0) return [s.slice(0, eq), s.slice(eq + 1)];
  if (s.includes("/") || s.includes("\\") || s.startsWith(".")) {
    const base = path.basename(path.resolve(s));
    // a Hub-style id (org/name) that is not a path keeps its full name
    return [s.startsWith("/") || s.startsWith(".") ? base : s, s];
  }
  return [s, s];
}

/**
 * One worker (or tensor-parallel group) per `--model` spec (`ID_OR_DIR[:tp=N,backend=B,attn=A]`), not yet
 * started; the embedded server and Redis-mode workers both build theirs here.
 */
export function modelWorkers(models: string[], o: { tp?: number; tpBackend?: TpBackendOption; threads?: number; workerEntry?: string }): Map<string, ModelWorker> {
  const workers = new Map<string, ModelWorker>();
  const defaultTp = parseTp(o.tp ?? 1, "--tp");
  const defaultBackend = parseTpBackend(o.tpBackend ?? "auto", "--tp-backend");
  for (const m of models) {
    const t = modelTp(m);
    const [id, src] = modelSpec(t.model);
    if (workers.has(id)) throw new NNsightError("BAD_INPUT", `the model id "${id}" is served twice`);
    const world = t.tp ?? defaultTp;
    const tp = world > 1 ? { world, backend: resolveTpBackend(t.backend ?? defaultBackend, world) } : undefined;
    if (tp?.backend === "nccl") checkNccl(world, id);
    workers.set(id, new ModelWorker(id, { model: src, threads: o.threads, tp, attnImplementation: t.attn }, o.workerEntry));
  }
  return workers;
}

export async function serve(opts: ServeOptions = {}): Promise<RunningServer> {
  const warn = opts.warn ?? ((m: string) => process.stderr.write(`warning: ${m}\n`));
  const limits: ServerLimits = { ...DEFAULT_LIMITS, ...(opts.limits ?? {}) };
  const quota: Quota = { ...DEFAULT_QUOTA, ...(opts.quota ?? {}) };
  const keys = opts.keys ?? loadKeys(opts.apiKeys, process.env.NNSIGHT_API_KEYS, quota);
  if (keys.open) warn("no API keys configured (--api-keys or NNSIGHT_API_KEYS): this server is open to anyone who can reach it");

  if (opts.redis) {
    // loaded only here: the embedded default never loads ioredis or bullmq
    const { startRedisBackend } = await import("./redis/frontend.js");
    const backend = await startRedisBackend({ ...opts, warn, redis: opts.redis }, limits);
    return listen(opts, limits, keys, backend.jobs, backend.models, backend.metrics, {
      workerPids: backend.workerPids,
      groupPids: backend.groupPids,
      close: backend.close,
    });
  }
  const workers = modelWorkers(opts.models?.length ? opts.models : ["stories260K"], opts);
  try {
    await Promise.all([...workers.values()].map((w) => w.start()));
  } catch (e) {
    for (const w of workers.values()) w.stop();
    throw e;
  }
  const store = new ResultStore({ dir: opts.resultsDir, ttlMs: opts.resultTtlMs });
  const metrics = new Metrics();
  const jobs = new JobManager(workers, store, metrics, limits, { maxBatch: opts.maxBatch });
  return listen(opts, limits, keys, jobs, embeddedDirectory(workers, jobs), metrics, {
    workerPids: () => Object.fromEntries([...workers].map(([id, w]) => [id, w.pid])),
    groupPids: () => Object.fromEntries([...workers].map(([id, w]) => [id, w.pids])),
    async close() {
      jobs.close();
      for (const w of workers.values()) w.stop();
      await store.close();
    },
  });
}

/** The HTTP + WebSocket front end over a job service and a model directory (embedded or Redis). */
async function listen(
  opts: ServeOptions,
  limits: ServerLimits,
  keys: KeyStore,
  jobs: JobService,
  models: ModelDirectory,
  metrics: Metrics,
  backend: Pick<RunningServer, "workerPids" | "groupPids" | "close">,
): Promise<RunningServer> {
  const http = createServer((req, res) => {
    handleHttp(req, res).catch((e: unknown) => {
      if (!res.headersSent) json(res, 500, { error: (e as Error)?.message ?? String(e) });
      else res.destroy();
    });
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: limits.maxFrameBytes * 2 + 1024, perMessageDeflate: false });
  http.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname !== "/ws") {
      socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws));
  });

  function json(res: ServerResponse, code: number, body: unknown): void {
    const s = JSON.stringify(body);
    res.writeHead(code, { "content-type": "application/json", "content-length": Buffer.byteLength(s) });
    res.end(s);
  }
  async function handleHttp(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://x");
    if (req.method !== "GET") return json(res, 405, { error: "only GET" });
    switch (url.pathname) {
      case "/health":
        return json(res, 200, { status: "ok", server: SERVER_NAME, protocol: PROTOCOL_VERSION, models: (await models.list()).map((w) => ({ id: w.id, status: w.status, world: w.world })) });
      case "/models":
        // per model: status, queue, running, world and backend (tensor parallelism: ranks in its worker
        // group, 1 for one worker, and how they talk), config, generationConfig (Redis mode: workers)
        return json(res, 200, { models: await models.list() });
      case "/metrics": {
        const body = metrics.render((await models.list()).map((m) => ({ model: m.id, queued: m.queue, running: m.running })));
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
        res.end(body);
        return;
      }
      default: {
        const m = /^\/models\/([^/]+)\/tokenizer$/.exec(url.pathname);
        const t = m ? await models.tokenizer(decodeURIComponent(m[1]!)) : null;
        if (t) return json(res, 200, t);
        return json(res, 404, { error: `no route ${url.pathname}` });
      }
    }
  }

  function onConnection(ws: WebSocket): void {
    let principal: Principal | null = null;
    // frames sent in one tick (an ack and its QUEUED event, ...) leave in one write: the socket stays
    // corked until the tick ends (ws's own cork/uncork per frame nests inside)
    const socket = (ws as unknown as { _socket?: Duplex })._socket;
    let corked = false;
    const uncork = () => {
      corked = false;
      socket?.uncork();
    };
    const sub: Subscriber = {
      send(msg, ...payload) {
        if (ws.readyState !== WebSocket.OPEN) return;
        const f = encodeFrame(msg, ...payload);
        metrics.bytesOut += f.length;
        if (socket && !corked) {
          corked = true;
          socket.cork();
          process.nextTick(uncork);
        }
        ws.send(f);
      },
    };
    const fail = (e: unknown, rid?: number, job?: string) => {
      const error = errorToJSON(e);
      if (error.code === "INTERNAL" && !(e instanceof NNsightError)) error.message = "internal server error";
      sub.send({ type: "error", ...(rid !== undefined ? { rid } : {}), ...(job ? { job } : {}), error });
    };
    const helloTimer = setTimeout(() => ws.close(4008, "no hello"), 10_000);
    helloTimer.unref();
    ws.on("error", () => {});
    ws.on("close", () => {
      clearTimeout(helloTimer);
      jobs.unsubscribe(sub);
    });
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      metrics.bytesIn += data.length;
      let rid: number | undefined;
      try {
        const frame = decodeFrame(isBinary ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data.toString());
        const r = (frame.msg as { rid?: unknown } | null)?.rid;
        if (typeof r === "number") rid = r;
        if (data.length > limits.maxFrameBytes) throw new NNsightError("TOO_LARGE", `the message is ${data.length} bytes; this server accepts at most ${limits.maxFrameBytes} per message`);
        const msg = parseClientMessage(frame.msg);
        if (!principal) {
          if (msg.type !== "hello") throw new NNsightError("UNAUTHORIZED", "say hello (with your API key) first");
          if (msg.protocol !== PROTOCOL_VERSION) {
            throw new NNsightError("VERSION", `this server speaks protocol version ${PROTOCOL_VERSION}, the client ${msg.protocol}: upgrade the older side`, { server: PROTOCOL_VERSION, client: msg.protocol });
          }
          principal = keys.authenticate(msg.apiKey);
          clearTimeout(helloTimer);
          sub.send({ type: "welcome", protocol: PROTOCOL_VERSION, server: SERVER_NAME, limits });
          return;
        }
        handle(principal, msg, frame.payload).catch((e) => fail(e, rid, (msg as { job?: string }).job));
      } catch (e) {
        fail(e, rid);
        if (e instanceof NNsightError && e.code !== "TOO_LARGE") metrics.jobRejected(e.code);
        if (!principal) ws.close(4001, "handshake failed");
      }
    });

    async function handle(p: Principal, msg: ClientMessage, payload: Uint8Array): Promise<void> {
      switch (msg.type) {
        case "hello":
          throw new NNsightError("BAD_INPUT", "hello was already said on this connection");
        case "submit": {
          const { json: graph, bytes } = splitPayload(payload, msg.split);
          let res;
          try {
            res = await jobs.submit(p, { model: msg.model, cid: msg.cid, scan: msg.scan, graph, attachments: bytes.slice() }, sub);
          } catch (e) {
            if (e instanceof NNsightError) metrics.jobRejected(e.code);
            throw e;
          }
          sub.send({ type: "ack", rid: msg.rid, job: res.job.id, state: res.job.state });
          if (res.fresh) jobs.announce(res.job);
          else await jobs.subscribe(p, res.job.id, sub);
          return;
        }
        case "cancel": {
          const j = await jobs.cancel(p, msg.job);
          sub.send({ type: "ack", rid: msg.rid, job: j.id, state: j.state });
          return;
        }
        case "status": {
          const j = await jobs.get(p, msg.job);
          const pos = jobs.position(j);
          sub.send({ type: "ack", rid: msg.rid, job: j.id, state: j.state, ...(pos !== undefined ? { position: pos } : {}), ...(j.error ? { error: j.error } : {}) });
          return;
        }
        case "subscribe":
        case "result":
          // the job's current state, answering the request (with the result when done); later events follow
          await jobs.subscribe(p, msg.job, sub, msg.rid);
          return;
      }
    }
  }

  const host = opts.host ?? "127.0.0.1";
  await new Promise<void>((resolve, reject) => {
    http.once("error", reject);
    http.listen(opts.port ?? 8080, host, () => resolve());
  });
  const addr = http.address();
  const port = typeof addr === "object" && addr ? addr.port : (opts.port ?? 8080);
  const shownHost = host.includes(":") ? `[${host}]` : host;
  let closed: Promise<void> | null = null;
  return {
    url: `http://${shownHost}:${port}`,
    host,
    port,
    workerPids: backend.workerPids,
    groupPids: backend.groupPids,
    close() {
      closed ??= (async () => {
        for (const c of wss.clients) c.terminate();
        wss.close();
        const done = new Promise<void>((r) => http.close(() => r()));
        http.closeAllConnections();
        await done;
        await backend.close();
      })();
      return closed;
    },
  };
}
