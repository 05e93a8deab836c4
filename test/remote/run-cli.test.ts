// `nnsight run script.mjs --remote URL`: the same script runs locally or against a server with one flag,
// and gives the same numbers.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { type TestServer, startServer } from "./helpers.js";

const root = join(import.meta.dirname, "../..");
const dir = mkdtempSync(join(tmpdir(), "nx-run-"));
let server: TestServer;
beforeAll(async () => {
  server = await startServer([]);
}, 120_000);
afterAll(async () => {
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("nnsight run", () => {
  it("runs a script locally and with --remote, with identical results", () => {
    const script = join(dir, "exp.mjs");
    writeFileSync(
      script,
      `import { LanguageModel } from "${join(root, "dist/index.js").replace(/\\\\/g, "/")}";
const model = await LanguageModel.load("stories260K");
const r = await model.trace("Once upon a time", () => ({ l: model.lm_head.output.at([":", -1]) }));
console.log(JSON.stringify({ remote: model.constructor.name.replace(/^_+/, ""), sum: Array.from(r.l.toFloat32Array()).reduce((a, b) => a + b, 0) }));
process.exit(0);
`,
    );
    const cli = join(root, "dist/cli/main.js");
    const local = spawnSync(process.execPath, [cli, "run", script], { encoding: "utf8", timeout: 60_000 });
    const remote = spawnSync(process.execPath, [cli, "run", script, "--remote", server.url], { encoding: "utf8", timeout: 60_000 });
    expect(local.status, local.stderr).toBe(0);
    expect(remote.status, remote.stderr).toBe(0);
    const a = JSON.parse(local.stdout.trim().split("\n").pop()!);
    const b = JSON.parse(remote.stdout.trim().split("\n").pop()!);
    expect(a.remote).toBe("LanguageModel");
    expect(b.remote).toBe("RemoteLanguageModel");
    expect(b.sum).toBe(a.sum);
  });
});
