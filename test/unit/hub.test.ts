import { createHash } from "node:crypto";
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { NNsightError } from "../../ts/src/errors.js";
import { loadHFDirectory } from "../../ts/src/models/config.js";
import { hfHubCacheDir, hfToken, listSnapshotFiles, looksLikeRepoId, repoFolderName, resolveModelDir } from "../../ts/src/models/hub.js";
import { writeRandomCheckpoint } from "../../ts/src/models/random-checkpoint.js";

const BUNDLED = path.resolve("models");
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const OTHER = "fedcba9876543210fedcba9876543210fedcba98";
const tmp = (p: string) => mkdtempSync(path.join(tmpdir(), p));
const noNetwork: typeof fetch = async () => {
  throw new TypeError("fetch failed");
};

/** Put files into a fake cache as huggingface_hub does: blobs by hash, snapshot symlinks, a ref. */
function cacheRepo(cacheDir: string, repo: string, commit: string, files: Record<string, string | Buffer>, ref: string | null = "main"): string {
  const repoDir = path.join(cacheDir, repoFolderName(repo));
  const snap = path.join(repoDir, "snapshots", commit);
  mkdirSync(path.join(repoDir, "blobs"), { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    const blob = path.join(repoDir, "blobs", createHash("sha256").update(content).digest("hex"));
    writeFileSync(blob, content);
    const link = path.join(snap, name);
    mkdirSync(path.dirname(link), { recursive: true });
    symlinkSync(path.relative(path.dirname(link), blob), link);
  }
  if (ref) {
    mkdirSync(path.dirname(path.join(repoDir, "refs", ref)), { recursive: true });
    writeFileSync(path.join(repoDir, "refs", ref), commit);
  }
  return snap;
}

const MODEL_FILES = { "config.json": "{}", "tokenizer.json": "{}", "model.safetensors": "x" };

async function rejection(p: Promise<unknown>): Promise<NNsightError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(NNsightError);
    return e as NNsightError;
  }
  throw new Error("expected a rejection");
}

describe("cache location and names", () => {
  it("follows huggingface_hub's environment variables", () => {
    expect(hfHubCacheDir({ HF_HUB_CACHE: "/a", HF_HOME: "/b" })).toBe("/a");
    expect(hfHubCacheDir({ HUGGINGFACE_HUB_CACHE: "/c", HF_HOME: "/b" })).toBe("/c");
    expect(hfHubCacheDir({ HF_HOME: "/b" })).toBe("/b/hub");
    expect(hfHubCacheDir({ XDG_CACHE_HOME: "/x" })).toBe("/x/huggingface/hub");
    expect(hfHubCacheDir({})).toMatch(/\.cache\/huggingface\/hub$/);
    expect(repoFolderName("meta-llama/Llama-3.2-1B")).toBe("models--meta-llama--Llama-3.2-1B");
    expect(repoFolderName("gpt2")).toBe("models--gpt2");
    expect(looksLikeRepoId("meta-llama/Llama-3.2-1B")).toBe(true);
    expect(looksLikeRepoId("gpt2")).toBe(true);
    expect(looksLikeRepoId("./models/x")).toBe(false);
    expect(looksLikeRepoId("/abs/path")).toBe(false);
    expect(looksLikeRepoId("a/b/c")).toBe(false);
    expect(looksLikeRepoId("a--b/c")).toBe(false);
  });

  it("reads the token from the environment or the saved login", async () => {
    expect(await hfToken({ HF_TOKEN: "hf_env " })).toBe("hf_env");
    const home = tmp("hfhome-");
    expect(await hfToken({ HF_HOME: home })).toBeUndefined();
    writeFileSync(path.join(home, "token"), "hf_saved\n");
    expect(await hfToken({ HF_HOME: home })).toBe("hf_saved");
  });
});

describe("resolveModelDir", () => {
  it("finds the bundled model and existing directories", async () => {
    expect(await resolveModelDir("stories260K", { bundledDir: BUNDLED })).toBe(path.join(BUNDLED, "stories260K"));
    const d = tmp("local-");
    expect(await resolveModelDir(d, { bundledDir: BUNDLED })).toBe(d);
    const e = await rejection(resolveModelDir("./no/such/dir", { bundledDir: BUNDLED, offline: true }));
    expect(e.code).toBe("MODEL_NOT_FOUND");
    expect(e.message).toContain(path.resolve("no/such/dir"));
    await expect(resolveModelDir("", { bundledDir: BUNDLED })).rejects.toMatchObject({ code: "BAD_INPUT" });
    await expect(resolveModelDir("package.json", { bundledDir: BUNDLED, offline: true })).rejects.toMatchObject({ code: "MODEL_NOT_FOUND", message: expect.stringMatching(/is a file/) });
  });

  it("resolves a Hub id through refs/main to its snapshot", async () => {
    const cache = tmp("hub-");
    const snap = cacheRepo(cache, "org/model", COMMIT, MODEL_FILES);
    expect(await resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, offline: true })).toBe(snap);
  });

  it("resolves a named revision through its ref, and a commit hash directly", async () => {
    const cache = tmp("hub-");
    cacheRepo(cache, "org/model", COMMIT, MODEL_FILES);
    const v1 = cacheRepo(cache, "org/model", OTHER, MODEL_FILES, "v1.0");
    expect(await resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, revision: "v1.0", offline: true })).toBe(v1);
    expect(await resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, revision: OTHER, offline: true })).toBe(v1);
    // a PR ref lives under refs/refs/pr/N, as huggingface_hub writes it
    const pr = cacheRepo(cache, "org/model", "1".repeat(40), MODEL_FILES, "refs/pr/3");
    expect(await resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, revision: "refs/pr/3", offline: true })).toBe(pr);
  });

  it("explains a revision that was never downloaded", async () => {
    const cache = tmp("hub-");
    cacheRepo(cache, "org/model", COMMIT, MODEL_FILES);
    const e = await rejection(resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, revision: "dev", offline: true }));
    expect(e.code).toBe("MODEL_NOT_FOUND");
    expect(e.message).toContain(path.join(cache, "models--org--model", "refs", "dev"));
    expect(e.message).toMatch(/HF_HUB_CACHE|HF_HOME/);
    expect(e.details).toMatchObject({ repo: "org/model", revision: "dev", cacheDir: cache });
    const e2 = await rejection(resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, revision: OTHER, offline: true }));
    expect(e2.message).toContain(path.join("snapshots", OTHER));
  });

  it("lists files missing from a snapshot (absent, dangling symlink, missing shard)", async () => {
    const cache = tmp("hub-");
    const snap = cacheRepo(cache, "org/model", COMMIT, { "config.json": "{}", "tokenizer.json": "{}" });
    let e = await rejection(resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, offline: true }));
    expect(e.message).toMatch(/model\.safetensors \(or model\.safetensors\.index\.json\)/);

    const blob = path.join(cache, "models--org--model", "blobs", "deadbeef");
    symlinkSync(path.relative(snap, blob), path.join(snap, "model.safetensors")); // blob deleted: dangling
    e = await rejection(resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, offline: true }));
    expect(e.message).toMatch(/files missing: model\.safetensors/);

    rmSync(path.join(snap, "model.safetensors"));
    writeFileSync(path.join(snap, "model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors" } }));
    writeFileSync(path.join(snap, "model-00001-of-00002.safetensors"), "");
    e = await rejection(resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, offline: true }));
    expect(e.message).toMatch(/files missing: model-00002-of-00002\.safetensors/);
    writeFileSync(path.join(snap, "model-00002-of-00002.safetensors"), "");
    expect(await resolveModelDir("org/model", { bundledDir: BUNDLED, cacheDir: cache, offline: true })).toBe(snap);
  });

  it("fails fast with MODEL_NOT_FOUND when the Hub cannot be reached", async () => {
    const cache = tmp("hub-");
    const started = Date.now();
    const e = await rejection(resolveModelDir("org/absent", { bundledDir: BUNDLED, cacheDir: cache, fetch: noNetwork, progress: false, offline: false }));
    expect(Date.now() - started).toBeLessThan(5000);
    expect(e.code).toBe("MODEL_NOT_FOUND");
    expect(e.message).toContain(path.join(cache, "models--org--absent"));
    expect(e.message).toMatch(/downloading failed: fetch failed/);
    expect(e.message).toMatch(/huggingface-cli download org\/absent/);
    const off = await rejection(resolveModelDir("org/absent", { bundledDir: BUNDLED, cacheDir: cache, offline: true }));
    expect(off.message).toMatch(/offline/);
  });
});

/** A fake Hub serving one repo's files, with the endpoints @huggingface/hub calls. */
function fakeHub(repo: string, files: Record<string, Buffer>, opts: { gated?: boolean } = {}) {
  const requested: string[] = [];
  const HUB = "https://hub.test";
  const json = (v: unknown, status = 200) => new Response(JSON.stringify(v), { status, headers: { "Content-Type": "application/json" } });
  const oid = (b: Buffer) => createHash("sha256").update(b).digest("hex");
  const entry = (p: string) => ({ type: "file", path: p, size: files[p]!.length, oid: oid(files[p]!) });
  const fetchFn: typeof fetch = async (input, init) => {
    const url = new URL(typeof input === "string" ? input : input instanceof URL ? input.href : input.url);
    const headers = new Headers(init?.headers);
    if (opts.gated && headers.get("Authorization") !== "Bearer hf_good") return json({ error: "gated" }, 401);
    const p = decodeURIComponent(url.pathname);
    if (p === `/api/models/${repo}/revision/main`) return json({ _id: "x", id: repo, sha: COMMIT, private: false, lastModified: "2024-01-01" });
    if (p.startsWith(`/api/models/`) && p.includes("/revision/")) return json({ error: "Repository not found" }, 404);
    if (p === `/api/models/${repo}/tree/${COMMIT}`) return json([...Object.keys(files).map(entry), { type: "directory", path: "original", size: 0, oid: "0" }]);
    if (p === `/api/models/${repo}/paths-info/${COMMIT}`) {
      const body = JSON.parse(String(init?.body)) as { paths: string[] };
      return json(body.paths.map(entry));
    }
    const prefix = `/${repo}/resolve/${COMMIT}/`;
    if (p.startsWith(prefix)) {
      const name = p.slice(prefix.length);
      const data = files[name];
      if (!data) return new Response("", { status: 404, headers: { "X-Error-Code": "EntryNotFound" } });
      const range = headers.get("Range");
      const common = { ETag: `"${oid(data)}"`, "Content-Type": "application/octet-stream" };
      if (range) {
        const [a, b] = range.replace("bytes=", "").split("-").map(Number) as [number, number];
        return new Response(data.subarray(a, b + 1), { status: 206, headers: { ...common, "Content-Range": `bytes ${a}-${b}/${data.length}` } });
      }
      requested.push(name);
      return new Response(data, { status: 200, headers: { ...common, "Content-Length": String(data.length) } });
    }
    return json({ error: `unexpected ${p}` }, 500);
  };
  return { HUB, fetch: fetchFn, requested };
}

describe("downloading into the cache", () => {
  let files: Record<string, Buffer>;
  beforeAll(async () => {
    const src = tmp("src-");
    await writeRandomCheckpoint(src, { preset: "tiny-llama", shards: 2 });
    files = Object.fromEntries(readdirSync(src).map((f) => [f, readFileSync(path.join(src, f))]));
    files["pytorch_model.bin"] = Buffer.from("pickle"); // must not be fetched
  });

  it("fetches config, tokenizer and shards into blobs + snapshot symlinks + refs/main", async () => {
    const cache = tmp("hub-");
    const hub = fakeHub("org/tiny", files);
    const dir = await resolveModelDir("org/tiny", { bundledDir: BUNDLED, cacheDir: cache, fetch: hub.fetch, hubUrl: hub.HUB, progress: false, offline: false });
    const repoDir = path.join(cache, "models--org--tiny");
    expect(dir).toBe(path.join(repoDir, "snapshots", COMMIT));
    expect(readFileSync(path.join(repoDir, "refs", "main"), "utf8")).toBe(COMMIT);
    expect(await listSnapshotFiles(dir)).toEqual(Object.keys(files).filter((f) => f !== "pytorch_model.bin").sort());
    expect(hub.requested).not.toContain("pytorch_model.bin");
    const link = path.join(dir, "model-00001-of-00002.safetensors");
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    expect(path.resolve(dir, readlinkSync(link)).startsWith(path.join(repoDir, "blobs"))).toBe(true);
    expect(readFileSync(link).equals(files["model-00001-of-00002.safetensors"]!)).toBe(true);
    const loaded = await loadHFDirectory(dir);
    expect(loaded.weightFiles).toHaveLength(2);
    // now cached: found offline, without the network
    expect(await resolveModelDir("org/tiny", { bundledDir: BUNDLED, cacheDir: cache, fetch: noNetwork, offline: true })).toBe(dir);
  });

  it("maps a missing repo to MODEL_NOT_FOUND and a refused token to UNAUTHORIZED", async () => {
    const cache = tmp("hub-");
    const hub = fakeHub("org/tiny", files);
    const e = await rejection(resolveModelDir("org/other", { bundledDir: BUNDLED, cacheDir: cache, fetch: hub.fetch, hubUrl: hub.HUB, progress: false, offline: false }));
    expect(e.code).toBe("MODEL_NOT_FOUND");
    expect(e.message).toMatch(/Repository not found/);
    const gated = fakeHub("org/tiny", files, { gated: true });
    const opts = { bundledDir: BUNDLED, cacheDir: cache, fetch: gated.fetch, hubUrl: gated.HUB, progress: false, offline: false };
    const u = await rejection(resolveModelDir("org/tiny", { ...opts, token: "hf_bad" }));
    expect(u.code).toBe("UNAUTHORIZED");
    expect(u.message).toMatch(/gated|invalid/);
    const anon = await rejection(resolveModelDir("org/tiny", { ...opts, token: undefined }));
    expect(anon.code).toBe("MODEL_NOT_FOUND"); // the Hub answers 401 for missing repos too
    expect(anon.message).toMatch(/HF_TOKEN/);
    expect(await resolveModelDir("org/tiny", { ...opts, token: "hf_good" })).toBe(path.join(cache, "models--org--tiny", "snapshots", COMMIT));
  });
});
