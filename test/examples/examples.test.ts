// The examples run as users run them (`node examples/x.mjs`, importing the package by its own name,
// so dist/ must be built: `npm install` does it) and print what the README promises. Each also runs
// on a random GPT-2 checkpoint, which exercises the GPT-2 module names.
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { writeRandomCheckpoint } from "../../ts/src/models/random-checkpoint.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const built = existsSync(path.join(ROOT, "dist/index.js"));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function runExample(name: string, args: string[] = []): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(ROOT, "examples", name), ...args], { cwd: ROOT, timeout: 60_000, env: { ...process.env, NO_COLOR: "1" } }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === "number" ? ((err as { code: number }).code) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

function expectOk(r: Run): void {
  if (r.code !== 0) throw new Error(`exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`);
  // piped output carries no progress bars or warnings
  expect(r.stderr).toBe("");
}

let gpt2Dir = "";
beforeAll(async () => {
  gpt2Dir = await mkdtemp(path.join(tmpdir(), "nnsight-examples-"));
  await writeRandomCheckpoint(gpt2Dir, { preset: "tiny-gpt2" });
});
afterAll(async () => {
  if (gpt2Dir) await rm(gpt2Dir, { recursive: true, force: true });
});

describe.skipIf(!built)("examples on the bundled stories260K", () => {
  it("demo: a story, a logit lens and a patching result", async () => {
    const r = await runExample("demo.mjs");
    expectOk(r);
    expect(r.stdout).toContain("nnsight demo: stories260K");
    expect(r.stdout).toMatch(/Once upon a time, there was a little girl named Lily\. \S/);
    expect(r.stdout).toMatch(/\d+ tokens in [\d.]+ s/);
    expect(r.stdout).toMatch(/^\s+layer 4 .*·time/m); // the lens's last layer predicts "time" after "a"
    expect(r.stdout).toMatch(/strongest before the last position: layer \d at "[^"]+" restores \d+%/);
    const seconds = Number(/done in ([\d.]+) s/.exec(r.stdout)?.[1]);
    expect(seconds).toBeLessThan(10);
  });

  it("logit-lens: one row per layer, the last layer's prediction", async () => {
    const r = await runExample("logit-lens.mjs");
    expectOk(r);
    expect(r.stdout).toContain("model: stories260K (llama, 5 layers, hidden 64)");
    for (let l = 0; l < 5; l++) expect(r.stdout).toMatch(new RegExp(`^layer ${l} `, "m"));
    expect(r.stdout).toContain('next token after the prompt: " Lily"');
  });

  it("patching: writes a heat map SVG and names the strongest cell", async () => {
    const svgPath = path.join(ROOT, "examples/out/patching.svg");
    await rm(svgPath, { force: true });
    const r = await runExample("patching.mjs");
    expectOk(r);
    expect(r.stdout).toContain('clean:     "The girl was happy because"');
    expect(r.stdout).toMatch(/clean logit diff \d+\.\d+, corrupted -\d+\.\d+/);
    expect(r.stdout).toContain(`heat map written to ${svgPath}`);
    expect(r.stdout).toMatch(/strongest cell: layer \d, position \d+ \([^)]+\): [\d.]+% of the difference restored/);
    const svg = await readFile(svgPath, "utf8");
    expect(svg.startsWith("<svg xmlns=\"http://www.w3.org/2000/svg\"")).toBe(true);
    expect(svg.trimEnd().endsWith("</svg>")).toBe(true);
    expect(svg).toContain("Activation patching: stories260K");
    expect(svg.match(/<rect [^>]*fill="rgb/g)!.length).toBeGreaterThanOrEqual(5 * 12); // one cell per (layer, position)
    expect(svg).toContain(">layer 4<");
    expect(svg).toContain("·happy");
    // balanced tags, nothing unescaped
    expect((svg.match(/<text\b/g) ?? []).length).toBe((svg.match(/<\/text>/g) ?? []).length);
  });

  it("steering: unsteered and steered continuations, and the happy/sad odds move", async () => {
    const r = await runExample("steering.mjs");
    expectOk(r);
    expect(r.stdout).toContain("unsteered:");
    expect(r.stdout).toContain('steered towards "happy"');
    expect(r.stdout).toContain('steered towards "sad"');
    const odds = [...r.stdout.matchAll(/alpha\s+[-+]?[\d.]+: P\(" happy"\) ([\d.]+) {2}P\(" sad"\) ([\d.]+)/g)].map((m) => Number(m[1]) - Number(m[2]));
    expect(odds.length).toBe(3);
    expect(odds[0]).toBeLessThan(odds[1]!); // pushing towards sad lowers P(happy) - P(sad)
    expect(odds[1]).toBeLessThan(odds[2]!);
    const texts = r.stdout.split(/\n\n/).filter((b) => /^(unsteered|steered)/.test(b));
    expect(texts.length).toBe(3);
    expect(new Set(texts.map((b) => b.split("\n")[1])).size).toBe(3); // three different continuations
  });

  it("head-ablation: KL for every head of every layer", async () => {
    const r = await runExample("head-ablation.mjs");
    expectOk(r);
    expect(r.stdout).toContain("model: stories260K (llama, 5 layers x 8 heads of 8 dims)");
    expect(r.stdout).toMatch(/clean next-token top 5: /);
    for (let h = 0; h < 8; h++) expect(r.stdout).toMatch(new RegExp(`^head ${h} +\\d+\\.\\d{4} `, "m"));
    expect(r.stdout).toMatch(/most important head for this prediction: layer \d head \d \(KL [\d.]+\)/);
  });
});

describe.skipIf(!built)("the attention-pattern example (eager attention)", () => {
  it("reads every layer's attention probabilities, draws one head, and knocks it out", async () => {
    const svgPath = path.join(ROOT, "examples/out/attention.svg");
    await rm(svgPath, { force: true });
    const r = await runExample("attention-pattern.mjs");
    expectOk(r);
    expect(r.stdout).toContain("model: stories260K (llama, 5 layers x 8 heads), eager attention");
    for (let l = 0; l < 5; l++) expect(r.stdout).toMatch(new RegExp(`^layer ${l} +(0\\.\\d\\d|1\\.00) `, "m"));
    expect(r.stdout).toMatch(/most previous-token-like head: layer \d head \d \(0\.\d\d\)/);
    expect(r.stdout).toMatch(/knocking out its previous-token attention: KL\(clean \|\| knocked\) \d+\.\d{4}/);
    const svg = await readFile(svgPath, "utf8");
    expect(svg).toContain("Attention: stories260K, layer");
    expect((svg.match(/<text\b/g) ?? []).length).toBe((svg.match(/<\/text>/g) ?? []).length);
    const g = await runExample("attention-pattern.mjs", [gpt2Dir, "--out", path.join(gpt2Dir, "attention.svg")]);
    expectOk(g);
    expect(g.stdout).toContain("(gpt2, 2 layers");
  });
});

describe.skipIf(!built)("examples on a random GPT-2 checkpoint", () => {
  it("logit-lens, patching, steering and head-ablation take a model path", async () => {
    const runs = await Promise.all(["logit-lens.mjs", "patching.mjs", "steering.mjs", "head-ablation.mjs"].map((f) => runExample(f, [gpt2Dir, ...(f === "steering.mjs" ? ["--tokens", "8"] : f === "patching.mjs" ? ["--out", path.join(gpt2Dir, "patching.svg")] : [])])));
    for (const r of runs) {
      expectOk(r);
      expect(r.stdout).toContain("(gpt2, 2 layers");
    }
    expect(runs[0]!.stdout).toMatch(/^layer 1 /m);
    expect(runs[1]!.stdout).toContain(`heat map written to ${path.join(gpt2Dir, "patching.svg")}`);
    expect(runs[3]!.stdout).toMatch(/^head 2 /m);
  });
});
