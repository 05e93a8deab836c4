import { defineConfig } from "tsup";

export default defineConfig({
  entry: { index: "ts/src/index.ts", "cli/main": "ts/src/cli/main.ts", "server/worker": "ts/src/server/worker.ts" },
  format: ["esm"],
  target: "node20",
  platform: "node",
  dts: { entry: { index: "ts/src/index.ts" } },
  sourcemap: true,
  clean: true,
  splitting: true,
  silent: true,
  shims: false,
});
