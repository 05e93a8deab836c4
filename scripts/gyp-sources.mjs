// Prints the C++ sources of the CPU addon, one per line, for binding.gyp (node-gyp has no glob).
import { readdirSync } from "node:fs";
const dirs = ["kernels/cpu", "native/src/core", "cluster", "native/src/napi"];
for (const d of dirs) for (const f of readdirSync(d).sort()) if (f.endsWith(".cpp")) console.log(`${d}/${f}`);
