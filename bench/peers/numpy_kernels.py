#!/usr/bin/env python3
"""GEMM and matvec peers for bench/kernels.mjs: numpy (OpenBLAS) and, when importable, torch.

  OPENBLAS_CORETYPE=Cooperlake /usr/bin/python3 bench/peers/numpy_kernels.py --threads 2 \
      --gemm 128x768x3072,1024x768x3072 --matvec 4096x16384

Prints one JSON line per (library, case) in the bench schema: bench, shape [M, K, N], threads, ms
(median), best_ms, reps, gflops (GEMM) or gbps (matvec, weight bytes / time), peak_rss_mib.
Benchmark-only tool: never a test dependency.
"""
import argparse
import json
import os
import resource
import sys
import time


def peak_rss_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timeit(fn, warmup=3, reps=10, min_s=0.5):
    for _ in range(warmup):
        fn()
    ts = []
    t0 = time.perf_counter()
    while len(ts) < reps or (time.perf_counter() - t0 < min_s and len(ts) < 1000):
        a = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - a) * 1e3)
    ts.sort()
    n = len(ts)
    med = ts[n // 2] if n % 2 else (ts[n // 2 - 1] + ts[n // 2]) / 2
    return med, ts[0], n


def emit(d):
    d.setdefault("command", " ".join(["python3"] + sys.argv))
    d["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(d), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm", default="128x768x3072")
    ap.add_argument("--matvec", default="4096x16384")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()

    import numpy as np

    blas = {}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(limits=a.threads, user_api="blas")
        for p in threadpool_info():
            if p.get("user_api") == "blas":
                blas = {"internal_api": p.get("internal_api"), "version": p.get("version"), "architecture": p.get("architecture"), "num_threads": p.get("num_threads")}
                break
    except ImportError:
        blas = {"note": "threadpoolctl missing; threads from OPENBLAS_NUM_THREADS"}
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    rng = np.random.default_rng(0)

    gemms = [tuple(int(v) for v in s.split("x")) for s in a.gemm.split(",") if s]
    mvs = [tuple(int(v) for v in s.split("x")) for s in a.matvec.split(",") if s]

    for (m, k, n) in gemms:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        med, best, reps = timeit(lambda: np.matmul(x, w, out=out))
        emit({"bench": "kernels.gemm", "peer": "numpy-openblas", "shape": [m, k, n], "dtype": "float32", "threads": a.threads, "ms": round(med, 4), "best_ms": round(best, 4), "reps": reps, "gflops": round(2 * m * k * n / med / 1e6, 2), "blas": blas, "openblas_coretype": coretype})
    for (k, n) in mvs:
        w = rng.standard_normal((k, n), dtype=np.float32)
        x = rng.standard_normal((1, k), dtype=np.float32)
        out = np.empty((1, n), dtype=np.float32)
        med, best, reps = timeit(lambda: np.matmul(x, w, out=out))
        emit({"bench": "kernels.matvec", "peer": "numpy-openblas", "layout": "in_out", "shape": [1, k, n], "dtype": "float32", "threads": a.threads, "ms": round(med, 4), "best_ms": round(best, 4), "reps": reps, "gbps": round(k * n * 4 / med / 1e6, 2), "blas": blas, "openblas_coretype": coretype})
        del w

    if a.no_torch:
        return
    try:
        import torch
    except ImportError as e:
        emit({"bench": "kernels.skip", "peer": "torch", "reason": f"torch not importable: {e}"})
        return
    torch.set_num_threads(a.threads)
    with torch.inference_mode():
        for (m, k, n) in gemms:
            x = torch.randn(m, k)
            w = torch.randn(k, n)
            out = torch.empty(m, n)
            med, best, reps = timeit(lambda: torch.matmul(x, w, out=out))
            emit({"bench": "kernels.gemm", "peer": "torch", "torch": torch.__version__, "shape": [m, k, n], "dtype": "float32", "threads": a.threads, "ms": round(med, 4), "best_ms": round(best, 4), "reps": reps, "gflops": round(2 * m * k * n / med / 1e6, 2), "openblas_coretype": coretype})
        for (k, n) in mvs:
            for dt, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
                # nn.Linear layout: weight [out, in], y = x @ W^T
                w = torch.randn(n, k).to(dt)
                x = torch.randn(1, k).to(dt)
                med, best, reps = timeit(lambda: torch.nn.functional.linear(x, w))
                emit({"bench": "kernels.matvec", "peer": "torch", "torch": torch.__version__, "layout": "out_in", "shape": [1, k, n], "dtype": name, "threads": a.threads, "ms": round(med, 4), "best_ms": round(best, 4), "reps": reps, "gbps": round(k * n * w.element_size() / med / 1e6, 2), "openblas_coretype": coretype})
                del w


if __name__ == "__main__":
    main()
