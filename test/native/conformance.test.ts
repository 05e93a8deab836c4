// The C++ conformance suite (test/cpp): every fast kernel against its reference on random shapes,
// odd sizes, non-contiguous views and every supported dtype, with the tolerance written beside each
// case. Built by `npm install` (cmake-js builds all targets) and run here so `npm test` covers it.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";

import { describe, expect, it } from "vitest";

const bin = join(import.meta.dirname, "../../build/nx_kernel_tests");

describe("kernel conformance (fast vs reference)", () => {
  it("builds with the addon", () => {
    expect(existsSync(bin), `${bin} is built by npm install`).toBe(true);
  });
  for (const threads of [1, 2]) {
    it(`passes every case on ${threads} thread(s)`, () => {
      const r = spawnSync(bin, [], { env: { ...process.env, NX_THREADS: String(threads) }, encoding: "utf8", timeout: 240_000 });
      const last = r.stdout.trim().split("\n").pop() ?? "";
      if (r.status !== 0) console.error(r.stdout.split("\n").filter((l) => l.startsWith("FAIL")).join("\n"), r.stderr);
      expect(last).toMatch(/^\d+ passed, 0 failed$/);
      expect(r.status).toBe(0);
    });
  }
});
