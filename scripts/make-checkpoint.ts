/**
 * Write a random-weight HF checkpoint: `make-checkpoint <preset> <out-dir> [--dtype ...]
 * [--shards N] [--seed N] [--force]`. The logic lives in ts/src/models/random-checkpoint.ts
 * (also reachable as `nnsight make-checkpoint` once the CLI wires it). Without a build, run it
 * with vitest's bundled TypeScript runner: `npx vite-node scripts/make-checkpoint.ts tiny-llama /tmp/tiny`.
 */
import { runMakeCheckpointCli } from "../ts/src/models/random-checkpoint.js";

process.exitCode = await runMakeCheckpointCli(process.argv.slice(2));
