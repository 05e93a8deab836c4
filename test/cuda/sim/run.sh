#!/usr/bin/env bash
# Runs the CUDA conformance suite (test/cuda) on the CPU stand-in runtime (test/cuda/sim): the .cu
# kernels are compiled as plain C++ (launches `k<<<g, b, s, st>>>(args)` rewritten into sim calls,
# threads of a block as coroutines that meet at __syncthreads), with a naive column-major cuBLAS
# stand-in loaded through the same dlopen path. It checks the kernels' LOGIC (indexing, strides,
# reductions, barriers, the error slot, the cuBLAS operand mapping) against the CPU references on any
# machine. It says nothing about real GPUs: libdevice math, occupancy, launch limits, memory ordering
# and the real cuBLAS are not modelled. Needs g++ and node; no CUDA toolkit.
#
#   bash test/cuda/sim/run.sh [filter]      (exit code of nx_cuda_tests; about 1 minute on 2 cores)
#
# NX_SIM_ADDON=1 also links the addon against the stand-in and runs the JS GPU tests on it
# (test/native/cuda.test.ts with NNSIGHT_ADDON pointing at it: tensors on "cuda:0", stories260K on the
# "GPU" against the CPU); the conformance-binary case there then fails by design (the real binary sees no
# GPU) and is filtered out. The addon run also loads a one-rank NCCL stand-in (fake_nccl.cpp: every
# collective is a copy) and runs the one-rank test of test/cluster/nccl.test.ts: the NCCL communicator's
# own logic, not NCCL. NX_SIM_DIR=dir keeps the build.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
work="${NX_SIM_DIR:-$(mktemp -d)}"
[ -n "${NX_SIM_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work/kernels/cuda" "$work/obj" "$work/lib"
cp "$root/kernels/common.h" "$work/kernels/"
cp -r "$root/kernels/cpu" "$work/kernels/"
cp "$root/kernels/cuda/cuda.h" "$root/kernels/cuda/common.cuh" "$root/kernels/cuda/dl.h" "$work/kernels/cuda/"
node - "$root/kernels/cuda" "$work/kernels/cuda" <<'JS'
const fs = require("fs"), path = require("path");
const [src, dst] = process.argv.slice(2);
for (const f of fs.readdirSync(src).filter((f) => f.endsWith(".cu"))) {
  let s = fs.readFileSync(path.join(src, f), "utf8");
  let n = 0;
  s = s.replace(/(\w+)<<<(.*?)>>>\((.*)\);/g, (_m, k, cfg, args) => (n++, `nx_sim_launch(${cfg}, [&] { ${k}(${args}); });`));
  s = s.replace(/extern __shared__ (\w+) (\w+)\[\];/g, (_m, t, v) => `${t}* ${v} = static_cast<${t}*>(nx_sim_dynamic_smem());`);
  if (/<<<|>>>/.test(s)) throw new Error(`${f}: a launch the rewrite did not understand`);
  fs.writeFileSync(path.join(dst, f.replace(/\.cu$/, ".cpp")), s);
  console.error(`sim: ${f}: ${n} launches`);
}
JS
flags=(-std=c++17 -O1 -g0 -fPIC -U_FORTIFY_SOURCE -DNX_WITH_CUDA=1 -I"$root/test/cuda/sim" -I"$work" -I"$root" -Wno-unknown-pragmas -pthread)
srcs=("$work"/kernels/cuda/*.cpp "$root"/test/cuda/sim/sim.cpp "$root"/kernels/cpu/*.cpp "$root"/native/src/core/*.cpp "$root"/cluster/*.cpp "$root"/test/cuda/*.cpp)
printf '%s\n' "${srcs[@]}" | xargs -P "$(nproc)" -I{} sh -c 'g++ "$@" -c "{}" -o "'"$work"'/obj/$(echo "{}" | tr / _).o"' _ "${flags[@]}"
g++ -pthread "$work"/obj/*.o -ldl -o "$work/nx_cuda_sim_tests"
g++ -shared -fPIC -O1 "$root/test/cuda/sim/fake_cublas.cpp" -o "$work/lib/libcublas.so.13"
g++ -shared -fPIC -O1 "$root/test/cuda/sim/fake_nccl.cpp" -o "$work/lib/libnccl.so.2"
export LD_LIBRARY_PATH="$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
"$work/nx_cuda_sim_tests" "$@" || status=$?
if [ "${NX_SIM_ADDON:-0}" = "1" ]; then
  nodeinc="$(node -p "require('path').resolve(process.execPath, '../..')")/include/node"
  g++ "${flags[@]}" -DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED -I"$nodeinc" \
    -I"$root/node_modules/node-addon-api" -c "$root/native/src/napi/addon.cpp" -o "$work/addon.o"
  g++ -shared -pthread "$work/addon.o" $(ls "$work"/obj/*.o | grep -v -E '_test_cuda_(harness|[a-z_]+_test)\.cpp\.o$') -ldl -o "$work/nnsight_native_sim.node"
  (cd "$root" && NNSIGHT_ADDON="$work/nnsight_native_sim.node" npx vitest run test/native/cuda.test.ts test/cluster/nccl.test.ts -t "moves|refuses|stories260K|eager|devices|one-rank") || status=$?
fi
exit $status
