/**
 * Remote tests run a real `nnsight serve` process (dist/cli/main.js) on 127.0.0.1 with port 0. The server
 * forks its model worker from dist/, so dist/ must match the sources: `ensureBuilt()` rebuilds it (once,
 * under a lock shared by the test files) when a source file is newer than the build.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, readdirSync, rmdirSync, statSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { expect } from "vitest";
import WebSocket from "ws";

import { Tensor } from "../../ts/src/index.js";

import { decodeFrame, encodeFrame } from "../../ts/src/remote/protocol.js";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const CLI = path.join(ROOT, "dist/cli/main.js");
const WORKER = path.join(ROOT, "dist/server/worker.js");

function newestSource(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newestSource(p));
    else if (e.name.endsWith(".ts")) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

function isFresh(): boolean {
  if (!existsSync(WORKER) || !existsSync(CLI)) return false;
  const built = Math.min(statSync(WORKER).mtimeMs, statSync(CLI).mtimeMs);
  return built >= Math.max(newestSource(path.join(ROOT, "ts/src")), statSync(path.join(ROOT, "tsup.config.ts")).mtimeMs);
}

export async function ensureBuilt(): Promise<void> {
  if (isFresh()) return;
  const lock = path.join(ROOT, "node_modules/.nnsight-build-lock");
  const deadline = Date.now() + 180_000;
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`timed out waiting for the build lock ${lock}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  try {
    if (!isFresh()) execFileSync(process.execPath, [path.join(ROOT, "node_modules/tsup/dist/cli-default.js")], { cwd: ROOT, stdio: "ignore" });
  } finally {
    rmdirSync(lock);
  }
}

export interface TestServer {
  url: string;
  proc: ChildProcess;
  stderr: () => string;
  /** pid of the (first) model worker */
  workerPid(): number;
  stop(): Promise<void>;
}

export async function startServer(args: string[] = [], env: Record<string, string> = {}): Promise<TestServer> {
  await ensureBuilt();
  const proc = spawn(process.execPath, [CLI, "serve", "--port", "0", "--host", "127.0.0.1", ...args], {
    cwd: ROOT,
    env: { ...process.env, NNSIGHT_API_KEYS: "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  proc.stderr!.on("data", (d) => (err += d));
  const url = await new Promise<string>((resolve, reject) => {
    let out = "";
    const t = setTimeout(() => reject(new Error(`server did not start: ${err}`)), 60_000);
    proc.stdout!.on("data", (d) => {
      out += d;
      const nl = out.indexOf("\n");
      if (nl < 0) return;
      clearTimeout(t);
      const first = out.slice(0, nl);
      const m = /^listening on (http:\/\/127\.0\.0\.1:\d+)$/.exec(first);
      if (m) resolve(m[1]!);
      else reject(new Error(`unexpected first line: ${first}`));
    });
    proc.on("exit", (c) => reject(new Error(`server exited with ${c}: ${err}`)));
  });
  return {
    url,
    proc,
    stderr: () => err,
    workerPid() {
      const kids = readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
      if (!kids.length) throw new Error("no worker process");
      return kids[0]!;
    },
    async stop() {
      if (proc.exitCode !== null) return;
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

export async function f32(t: { data(): Promise<unknown> }): Promise<Float32Array> {
  const d = await t.data();
  if (!(d instanceof Float32Array)) throw new Error("expected float32 data");
  return d;
}

/** Bitwise equality of two float arrays (NaN-safe, -0 ≠ 0). */
export function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length), y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

// ------------------------------------------------------------------ a raw protocol client

export interface RawMessage {
  msg: Record<string, unknown>;
  payload: Uint8Array;
}

/** Speaks the wire protocol directly (for malformed and hostile messages). */
export class RawClient {
  readonly messages: RawMessage[] = [];
  closed: { code: number } | null = null;
  private waiters: Array<() => void> = [];
  private constructor(readonly ws: WebSocket) {
    ws.on("message", (d: Buffer, bin: boolean) => {
      const f = decodeFrame(bin ? new Uint8Array(d) : d.toString());
      this.messages.push({ msg: f.msg as Record<string, unknown>, payload: f.payload });
      for (const w of this.waiters.splice(0)) w();
    });
    ws.on("close", (code) => {
      this.closed = { code };
      for (const w of this.waiters.splice(0)) w();
    });
    ws.on("error", () => {});
  }
  static async open(url: string): Promise<RawClient> {
    const ws = new WebSocket(url.replace(/^http/, "ws") + "/ws");
    await new Promise<void>((res, rej) => {
      ws.once("open", () => res());
      ws.once("error", rej);
    });
    return new RawClient(ws);
  }
  send(msg: object, ...payload: Uint8Array[]): void {
    this.ws.send(encodeFrame(msg, ...payload));
  }
  sendText(s: string): void {
    this.ws.send(s);
  }
  /** The first message (from index `from`) matching, waiting up to `ms`. */
  async waitFor(pred: (m: Record<string, unknown>) => boolean, ms = 30_000): Promise<RawMessage> {
    const deadline = Date.now() + ms;
    for (;;) {
      const hit = this.messages.find((m) => pred(m.msg));
      if (hit) return hit;
      if (this.closed) throw new Error(`socket closed (${this.closed.code}) while waiting`);
      if (Date.now() > deadline) throw new Error(`timed out; got ${JSON.stringify(this.messages.map((m) => m.msg))}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, deadline - Date.now()));
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
  close(): void {
    this.ws.terminate();
  }
}

/**
 * Compare two results of the same structure (tensors, arrays, plain objects, other values) side by side:
 * both must be tensors at the same places, where `tensors(actual, expected, where)` compares them.
 */
export async function expectMatching(
  actual: unknown,
  expected: unknown,
  tensors: (actual: Tensor, expected: Tensor, where: string) => Promise<void>,
  where = "result",
): Promise<void> {
  if (actual instanceof Tensor || expected instanceof Tensor) {
    expect(actual, where).toBeInstanceOf(Tensor);
    expect(expected, where).toBeInstanceOf(Tensor);
    const a = actual as Tensor, e = expected as Tensor;
    expect(a.shape, where).toEqual(e.shape);
    expect(a.dtype, where).toBe(e.dtype);
    return tensors(a, e, where);
  }
  if (Array.isArray(expected)) {
    expect(Array.isArray(actual), where).toBe(true);
    expect((actual as unknown[]).length, where).toBe(expected.length);
    for (let i = 0; i < expected.length; i++) await expectMatching((actual as unknown[])[i], expected[i], tensors, `${where}[${i}]`);
    return;
  }
  if (expected && typeof expected === "object") {
    expect(Object.keys(actual as object).sort(), where).toEqual(Object.keys(expected).sort());
    for (const k of Object.keys(expected)) await expectMatching((actual as Record<string, unknown>)[k], (expected as Record<string, unknown>)[k], tensors, `${where}.${k}`);
    return;
  }
  expect(actual, where).toEqual(expected);
}
