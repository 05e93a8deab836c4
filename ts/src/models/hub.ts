/**
 * Where a model's files are: the bundled test model, a local folder, or a Hugging Face Hub id
 * found in (or downloaded into) the local Hugging Face cache, laid out exactly as Python's
 * `huggingface_hub` lays it out, so both share one cache:
 *
 * ```
 * $HF_HUB_CACHE/models--{org}--{name}/
 *   refs/{revision}                 the commit hash a branch or tag points to
 *   blobs/{etag}                    file contents
 *   snapshots/{commit}/{file}       symlinks to blobs (or plain files)
 * ```
 */
import { mkdir, readFile, readdir, stat, writeFile } from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { NNsightError } from "../errors.js";
import { parseShardIndex } from "../tensor/safetensors-format.js";

/** Options of {@link resolveModelDir}. */
export interface ResolveModelOptions {
  /** Branch, tag or commit hash on the Hub (default `main`). */
  revision?: string;
  /** Hub access token for gated or private models (default: `$HF_TOKEN`, then the saved login). */
  token?: string;
  /** Hub cache folder (default: {@link hfHubCacheDir}). */
  cacheDir?: string;
  /** The package's `models/` folder, home of the bundled models (`stories260K`). */
  bundledDir: string;
  /** Never touch the network (default: `$HF_HUB_OFFLINE` is set to 1/true/yes/on). */
  offline?: boolean;
  /** fetch used for Hub requests (default: global fetch); tests inject one. */
  fetch?: typeof fetch;
  /** Hub URL (default: `$HF_ENDPOINT` or https://huggingface.co). */
  hubUrl?: string;
  /** Show a download progress bar (default: when stderr is a TTY). */
  progress?: boolean;
}

/** Files a model needs besides the weights. */
const REQUIRED_FILES = ["config.json", "tokenizer.json"];
/** Small files fetched when the Hub has them. */
const OPTIONAL_FILES = ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];
const SINGLE_WEIGHTS = "model.safetensors";
const SHARD_INDEX = "model.safetensors.index.json";

const truthy = (v: string | undefined) => v !== undefined && ["1", "true", "yes", "on"].includes(v.toLowerCase());

function expandHome(p: string): string {
  return p === "~" || p.startsWith("~/") ? path.join(os.homedir(), p.slice(1)) : p;
}

/**
 * The Hub cache folder, as huggingface_hub computes it: `$HF_HUB_CACHE`, else
 * `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where `HF_HOME` defaults to
 * `$XDG_CACHE_HOME/huggingface` and `XDG_CACHE_HOME` to `~/.cache`.
 */
export function hfHubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const direct = env.HF_HUB_CACHE ?? env.HUGGINGFACE_HUB_CACHE;
  if (direct) return expandHome(direct);
  return path.join(hfHome(env), "hub");
}

function hfHome(env: NodeJS.ProcessEnv): string {
  if (env.HF_HOME) return expandHome(env.HF_HOME);
  return path.join(expandHome(env.XDG_CACHE_HOME ?? "~/.cache"), "huggingface");
}

/**
 * The Hub token: `$HF_TOKEN`, else `$HUGGING_FACE_HUB_TOKEN`, else the file `huggingface-cli
 * login` writes (`$HF_TOKEN_PATH`, default `$HF_HOME/token`); `undefined` when none.
 */
export async function hfToken(env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  const t = env.HF_TOKEN ?? env.HUGGING_FACE_HUB_TOKEN;
  if (t) return t.trim();
  const file = env.HF_TOKEN_PATH ? expandHome(env.HF_TOKEN_PATH) : path.join(hfHome(env), "token");
  const saved = await readFile(file, "utf8").then((s) => s.trim(), () => "");
  return saved || undefined;
}

/** Cache folder name of a model repo: `org/name` → `models--org--name`. */
export function repoFolderName(repoId: string): string {
  return ["models", ...repoId.split("/")].join("--");
}

/** Is this a full 40-hex-digit commit hash? */
export function isCommitHash(revision: string): boolean {
  return /^[0-9a-f]{40}$/.test(revision);
}

/** Could this string be a Hub repo id (`name` or `org/name`, as huggingface_hub validates)? */
export function looksLikeRepoId(s: string): boolean {
  return (
    /^[A-Za-z0-9_.-]{1,96}(\/[A-Za-z0-9_.-]{1,96})?$/.test(s) &&
    !s.includes("--") &&
    !s.includes("..") &&
    !s.split("/").some((p) => /^[-.]|[-.]$/.test(p))
  );
}

async function isDir(p: string): Promise<boolean> {
  return stat(p).then((s) => s.isDirectory(), () => false);
}

/** Follows symlinks: a link to a deleted blob counts as missing. */
async function isFile(p: string): Promise<boolean> {
  return stat(p).then((s) => s.isFile(), () => false);
}

/**
 * Files a model folder lacks: config.json, tokenizer.json, and weights (model.safetensors, or the
 * index and every shard it names). Empty when the folder is complete.
 */
export async function missingModelFiles(dir: string): Promise<string[]> {
  const missing: string[] = [];
  for (const f of REQUIRED_FILES) if (!(await isFile(path.join(dir, f)))) missing.push(f);
  if (await isFile(path.join(dir, SINGLE_WEIGHTS))) return missing;
  const indexText = await readFile(path.join(dir, SHARD_INDEX), "utf8").catch(() => null);
  if (indexText === null) return [...missing, `${SINGLE_WEIGHTS} (or ${SHARD_INDEX})`];
  let shards: string[];
  try {
    shards = parseShardIndex(indexText, dir).files;
  } catch {
    return [...missing, `${SHARD_INDEX} (malformed)`];
  }
  for (const f of shards) if (!(await isFile(f))) missing.push(path.relative(dir, f));
  return missing;
}

/** What a look-up in the cache found. */
export interface CacheLookup {
  /** The repo's cache folder (`.../models--org--name`). */
  repoDir: string;
  /** The commit the revision resolves to, when the cache knows it. */
  commit: string | null;
  /** `snapshots/{commit}`, when it exists. */
  snapshotDir: string | null;
  /** Files the snapshot lacks (empty when complete). */
  missing: string[];
  /** Why the lookup failed, in words; `null` when the snapshot is complete. */
  problem: string | null;
}

/**
 * Look a Hub model up in the cache, offline: `refs/{revision}` (or the revision itself when it is
 * a commit hash) names the snapshot, which must hold every file {@link missingModelFiles} checks.
 */
export async function lookupCachedModel(repoId: string, revision: string, cacheDir: string): Promise<CacheLookup> {
  const repoDir = path.join(cacheDir, repoFolderName(repoId));
  const result: CacheLookup = { repoDir, commit: null, snapshotDir: null, missing: [], problem: null };
  if (!(await isDir(repoDir))) return { ...result, problem: `${repoDir} does not exist` };
  if (isCommitHash(revision)) {
    result.commit = revision;
  } else {
    const refFile = path.join(repoDir, "refs", revision);
    const ref = await readFile(refFile, "utf8").then((s) => s.trim(), () => null);
    if (ref === null) return { ...result, problem: `${refFile} does not exist (revision "${revision}" was never downloaded)` };
    if (!isCommitHash(ref)) return { ...result, problem: `${refFile} does not hold a commit hash` };
    result.commit = ref;
  }
  const snapshotDir = path.join(repoDir, "snapshots", result.commit);
  if (!(await isDir(snapshotDir))) return { ...result, problem: `${snapshotDir} does not exist` };
  result.snapshotDir = snapshotDir;
  result.missing = await missingModelFiles(snapshotDir);
  if (result.missing.length > 0) result.problem = `${snapshotDir} lacks ${result.missing.join(", ")}`;
  return result;
}

/**
 * Find a model's folder.
 *
 * 1. A bundled model name (`stories260K`) → `bundledDir/stories260K`.
 * 2. An existing directory → itself (absolute).
 * 3. A Hub id (`org/name`) → its snapshot in the Hub cache (see {@link lookupCachedModel}).
 * 4. Not cached (or incomplete) and not offline → downloaded into the cache with
 *    `@huggingface/hub` (only config, tokenizer and safetensors files), then 3.
 *
 * @throws NNsightError `MODEL_NOT_FOUND` saying where it looked and how to fix it,
 *   `UNAUTHORIZED` when the Hub refuses the token (gated or private model)
 */
export async function resolveModelDir(idOrDir: string, opts: ResolveModelOptions): Promise<string> {
  if (typeof idOrDir !== "string" || idOrDir.trim() === "") {
    throw new NNsightError("BAD_INPUT", "expected a model name, Hub id or directory");
  }
  if (!idOrDir.includes("/") && !idOrDir.startsWith(".") && (await isDir(path.join(opts.bundledDir, idOrDir)))) {
    return path.resolve(opts.bundledDir, idOrDir);
  }
  const local = path.resolve(expandHome(idOrDir));
  const localStat = await stat(local).catch(() => null);
  if (localStat?.isDirectory()) return local;
  if (localStat) throw new NNsightError("MODEL_NOT_FOUND", `${local} is a file, not a model directory`, { dir: local });
  if (!looksLikeRepoId(idOrDir)) {
    throw new NNsightError("MODEL_NOT_FOUND", `model directory ${local} does not exist (and "${idOrDir}" is not a Hub id)`, { dir: local });
  }
  const revision = opts.revision ?? "main";
  const cacheDir = path.resolve(expandHome(opts.cacheDir ?? hfHubCacheDir()));
  const found = await lookupCachedModel(idOrDir, revision, cacheDir);
  if (found.problem === null) return found.snapshotDir!;
  const offline = opts.offline ?? truthy(process.env.HF_HUB_OFFLINE);
  if (offline) throw notFound(idOrDir, revision, found, "offline mode (HF_HUB_OFFLINE) forbids downloading");
  try {
    return await downloadModelToCache(idOrDir, revision, cacheDir, {
      token: opts.token ?? (await hfToken()),
      fetch: opts.fetch,
      hubUrl: opts.hubUrl ?? process.env.HF_ENDPOINT,
      progress: opts.progress ?? Boolean(process.stderr.isTTY),
    });
  } catch (e) {
    if (e instanceof NNsightError && e.code === "UNAUTHORIZED") throw e;
    throw notFound(idOrDir, revision, found, `downloading failed: ${(e as Error).message}`, e);
  }
}

function notFound(repoId: string, revision: string, found: CacheLookup, why: string, cause?: unknown): NNsightError {
  const message =
    `model "${repoId}" (revision ${revision}) is not in the Hugging Face cache: ${found.problem}; ${why}. ` +
    `Fix: pass a local model directory, or download it where there is network ` +
    `(\`huggingface-cli download ${repoId}\`) and point HF_HUB_CACHE or HF_HOME at that cache` +
    (found.missing.length > 0 ? ` (files missing: ${found.missing.join(", ")})` : "") +
    `; gated models need HF_TOKEN.`;
  return new NNsightError("MODEL_NOT_FOUND", message, { repo: repoId, revision, cacheDir: path.dirname(found.repoDir) }, { cause });
}

/** List the files in a snapshot folder (relative paths), for diagnostics and tests. */
export async function listSnapshotFiles(snapshotDir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await readdir(path.join(snapshotDir, rel), { withFileTypes: true })) {
      const p = path.join(rel, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push(p);
    }
  };
  await walk("");
  return out.sort();
}

/** Write `refs/{revision}` = commit, as huggingface_hub does after resolving a branch or tag. */
export async function writeRef(repoDir: string, revision: string, commit: string): Promise<void> {
  if (isCommitHash(revision)) return;
  const refFile = path.join(repoDir, "refs", revision);
  await mkdir(path.dirname(refFile), { recursive: true });
  await writeFile(refFile, commit);
}


// ---------------------------------------------------------------------------------------------
// Downloading

/** Options of {@link downloadModelToCache}. */
export interface DownloadOptions {
  token?: string;
  fetch?: typeof fetch;
  hubUrl?: string;
  progress?: boolean;
  /** Seconds to wait for the Hub to answer each request (default `$HF_HUB_ETAG_TIMEOUT` or 10). */
  timeoutS?: number;
}

type HubModule = typeof import("@huggingface/hub");
type HubCommon = { hubUrl?: string; fetch: typeof fetch; accessToken?: `hf_${string}` };

/**
 * A fetch that gives up when no response headers arrive within `ms` (the body may then take as
 * long as it needs), so a machine without network fails fast.
 */
export function fetchWithTimeout(f: typeof fetch, ms: number): typeof fetch {
  return async (input, init) => {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(new Error(`no answer from the Hub within ${ms / 1000} s`)), ms);
    const signal = init?.signal ? AbortSignal.any([init.signal, ctrl.signal]) : ctrl.signal;
    try {
      return await f(input, { ...init, signal });
    } finally {
      clearTimeout(timer);
    }
  };
}

/**
 * Map the Hub client's errors to ours: 401/403 with a token are `UNAUTHORIZED`; the rest pass
 * through (without a token the Hub answers 401 for missing repos too, so that reads as not found).
 */
function hubError(e: unknown, repoId: string, withToken: boolean): unknown {
  const status = (e as { statusCode?: unknown }).statusCode;
  if (withToken && (status === 401 || status === 403)) {
    return new NNsightError(
      "UNAUTHORIZED",
      `the Hub refused the token for "${repoId}" (HTTP ${status}): the token is invalid, or the model is gated and its license was not accepted on huggingface.co with this account`,
      { repo: repoId },
      { cause: e },
    );
  }
  return e;
}

/** The files of a repo worth fetching: config, tokenizer and safetensors (no pickles, no `original/`). */
function selectFiles(listed: Map<string, number>): string[] {
  const want = [...REQUIRED_FILES, ...OPTIONAL_FILES].filter((f) => listed.has(f));
  if (listed.has(SINGLE_WEIGHTS)) return [...want, SINGLE_WEIGHTS];
  if (listed.has(SHARD_INDEX)) return [...want, SHARD_INDEX];
  throw new NNsightError("UNSUPPORTED", `the Hub repo has no ${SINGLE_WEIGHTS} or ${SHARD_INDEX}; only safetensors weights are supported`);
}

/** A one-line progress bar on stderr, refreshed from the sizes of the blobs being written. */
function startProgress(repoId: string, blobsDir: string, total: number, enabled: boolean) {
  let done = 0;
  const draw = async () => {
    const partial = await readdir(blobsDir).then(
      (names) => Promise.all(names.filter((n) => n.endsWith(".incomplete")).map((n) => stat(path.join(blobsDir, n)).then((s) => s.size, () => 0))),
      () => [0],
    );
    const bytes = Math.min(total, done + partial.reduce((a, b) => a + b, 0));
    const pct = total > 0 ? Math.floor((100 * bytes) / total) : 100;
    const bar = "#".repeat(Math.floor(pct / 4)).padEnd(25, ".");
    process.stderr.write(`\rDownloading ${repoId} [${bar}] ${pct}% ${(bytes / 1e9).toFixed(2)}/${(total / 1e9).toFixed(2)} GB`);
  };
  const timer = enabled ? setInterval(() => void draw(), 250) : null;
  return {
    fileDone(size: number) {
      done += size;
    },
    async stop() {
      if (!timer) return;
      clearInterval(timer);
      await draw();
      process.stderr.write("\n");
    },
  };
}

/** Run `fn` with the Hub client's "Downloading x to y.incomplete" debug lines silenced. */
async function quietly<T>(fn: () => Promise<T>): Promise<T> {
  const debug = console.debug;
  console.debug = (...args: unknown[]) => {
    if (!(typeof args[0] === "string" && args[0].startsWith("Downloading "))) debug(...args);
  };
  try {
    return await fn();
  } finally {
    console.debug = debug;
  }
}

/**
 * Download a model's config, tokenizer and safetensors files from the Hub into the cache (blobs
 * plus snapshot symlinks, and `refs/{revision}`), and return the snapshot folder.
 */
export async function downloadModelToCache(repoId: string, revision: string, cacheDir: string, opts: DownloadOptions = {}): Promise<string> {
  const hub: HubModule = await import("@huggingface/hub");
  const timeoutS = opts.timeoutS ?? (Number(process.env.HF_HUB_ETAG_TIMEOUT) || 10);
  const common: HubCommon = {
    hubUrl: opts.hubUrl,
    fetch: fetchWithTimeout(opts.fetch ?? globalThis.fetch, timeoutS * 1000),
    ...(opts.token ? { accessToken: opts.token as `hf_${string}` } : {}),
  };
  const repoDir = path.join(cacheDir, repoFolderName(repoId));
  try {
    const info = await hub.modelInfo({ name: repoId, revision, additionalFields: ["sha"], ...common });
    const commit = info.sha;
    if (typeof commit !== "string" || !isCommitHash(commit)) throw new Error(`the Hub did not give a commit hash for revision ${revision}`);
    const listed = new Map<string, number>();
    for await (const e of hub.listFiles({ repo: { type: "model", name: repoId }, revision: commit, ...common })) {
      if (e.type === "file") listed.set(e.path, e.lfs?.size ?? e.size);
    }
    const fetchOne = (file: string) =>
      quietly(() => hub.downloadFileToCacheDir({ repo: { type: "model", name: repoId }, path: file, revision: commit, cacheDir, ...common }));
    const files = selectFiles(listed);
    const small = files.filter((f) => f !== SINGLE_WEIGHTS);
    for (const f of small) await fetchOne(f);
    const snapshotDir = path.join(repoDir, "snapshots", commit);
    const weights = files.includes(SINGLE_WEIGHTS)
      ? [SINGLE_WEIGHTS]
      : parseShardIndex(await readFile(path.join(snapshotDir, SHARD_INDEX), "utf8"), snapshotDir).files.map((f) => path.relative(snapshotDir, f));
    const total = weights.reduce((a, f) => a + (listed.get(f) ?? 0), 0);
    const progress = startProgress(repoId, path.join(repoDir, "blobs"), total, opts.progress ?? false);
    try {
      for (const f of weights) {
        await fetchOne(f);
        progress.fileDone(listed.get(f) ?? 0);
      }
    } finally {
      await progress.stop();
    }
    await writeRef(repoDir, revision, commit);
    return snapshotDir;
  } catch (e) {
    throw hubError(e, repoId, Boolean(opts.token));
  }
}
