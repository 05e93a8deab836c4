// probe.h: machine probes that benchmarks divide by, so results read as "fraction of what this machine
// can do" instead of raw numbers that mean nothing on another box.
//
//   probe_fma_peak_gflops(threads, isa): fp32 FMA throughput, GFLOP/s (one FMA = 2 flops per lane).
//   probe_triad_gbps(threads, bytes):    STREAM triad a[i] = b[i] + s*c[i] bandwidth, GB/s (1e9 B/s).
//
// Both run on `threads` dedicated std::threads (not the kernel pool, so the pool size does not matter)
// that start together on a spin barrier; the time is wall time from the release of the barrier until
// the last thread finishes, best of several repetitions.
//
// Usage:
//   double peak = nx::probe_fma_peak_gflops(2, 512);       // AVX-512 zmm FMAs on 2 threads
//   double bw = nx::probe_triad_gbps(2, 64u << 20);        // three 64 MiB float arrays
#pragma once
#include <cstddef>

namespace nx {
// isa: 512 = AVX-512 zmm FMAs, 256 = AVX2/FMA ymm FMAs, 0 = scalar FMAs (compiler's choice of code).
// Returns 0.0 when the requested ISA was not compiled in (build with -march=native to get it).
double probe_fma_peak_gflops(int threads, int isa);
// Counts 3 arrays of traffic per pass (2 reads + 1 write) as STREAM does; the write-allocate read of
// `a` that a plain store costs is NOT counted, so the true DRAM traffic is ~4/3 of what is reported.
// Each array has bytes_per_array bytes (floats); the arrays should be far larger than the L3.
double probe_triad_gbps(int threads, size_t bytes_per_array);
}  // namespace nx
