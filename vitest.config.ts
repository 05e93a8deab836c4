import { defineConfig } from "vitest/config";

// Addon tests run in forked workers (a native crash cannot take the runner down, and each file gets
// its own addon instance). Two workers: the machines here have two cores.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    pool: "forks",
    poolOptions: { forks: { maxForks: 2, minForks: 1 } },
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: process.env.CI ? ["default"] : ["default"],
  },
});
