#!/usr/bin/env bash
# Builds the CPU-only addon with node-gyp from binding.gyp in a scratch copy (node-gyp insists on
# ./build, which cmake-js owns), then loads it once. Used by CI so the fallback build stays honest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/binding.gyp" "$root/kernels" "$root/native" "$root/cluster" "$work/"
mkdir -p "$work/scripts" && cp "$root/scripts/gyp-sources.mjs" "$work/scripts/"
ln -s "$root/node_modules" "$work/node_modules"
# Build against the headers of the running Node (no download): npm's nodedir if set, else the prefix of
# the node binary when it ships include/node.
nodedir="${npm_config_nodedir:-$(node -p "require('path').resolve(process.execPath, '../..')")}"
if [ ! -f "$nodedir/include/node/node_api.h" ]; then
  echo "build-gyp: no Node headers under $nodedir/include/node; skipping the node-gyp build (it would download them)"
  exit 0
fi
(cd "$work" && "$root/node_modules/.bin/node-gyp" rebuild --nodedir="$nodedir" --loglevel=error >/dev/null)
node -e "const a = require('$work/build/Release/nnsight_native.node'); if (!a.opNames.length) process.exit(1); console.log('node-gyp build ok: ' + a.opNames.length + ' ops')"
