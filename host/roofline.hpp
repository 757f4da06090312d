// The machine's limits as `lminv bench` measures them, and the roofline bound of a step from them.
//
// A step that reads W bytes of weights and does F floating-point operations cannot take less than W / (read
// bandwidth) nor less than F / (GEMM rate): its bound is the larger of the two. Both limits must be measured the
// way the step uses the machine, or the bound is too lenient and a step comes out "faster than the machine":
//   - read bandwidth: every thread reading its own part of a large buffer that was written first (so its pages
//     exist: reading untouched pages reads the shared zero page and measures the cache), the best of a few passes;
//   - copy: reported as bytes moved (read + written), never used as the read bound;
//   - GEMM rate: the library the backend multiplies with, with the threads its models use (MatmulProbe).
#pragma once

#include <cstddef>
#include <string>

namespace lminv::roofline {

// Bytes per second read by `threads` threads (0: all cores), each summing its share of a buffer of `bytes` that it
// wrote first; the fastest of `repeat` passes.
double read_bandwidth(int threads, std::size_t bytes, int repeat);

// Bytes per second moved (read and written, so twice the buffer) by `threads` threads copying their shares of a
// written buffer of `bytes` into another; the fastest of `repeat` passes.
double copy_bandwidth(int threads, std::size_t bytes, int repeat);

// The threads the bandwidth probes use for 0: every core this process may run on.
int all_threads();

struct Bound {
  double memory_s = 0;   // bytes read / read bandwidth
  double compute_s = 0;  // FLOPs / GEMM rate (0 when no rate is known)
  double seconds() const { return memory_s > compute_s ? memory_s : compute_s; }
  const char* limiter() const { return memory_s >= compute_s ? "memory" : "compute"; }
};

// The roofline bound of a step reading `bytes` and doing `flops` on a machine that reads at `read_bytes_per_s` and
// multiplies at `flop_per_s` (0: unknown, the bound is the memory term alone). Errors on a negative or non-finite
// argument or a zero bandwidth.
Bound bound(double bytes, double flops, double read_bytes_per_s, double flop_per_s);

// Peak resident memory of this process (VmHWM, bytes), and a reset of it to the current resident size (Linux's
// /proc/self/clear_refs "5"), so that a bench cell reports its own peak. peak_resident_bytes() is -1 where the
// kernel does not report it; reset_peak_resident() returns false where the kernel does not allow the reset (the peak
// is then the process's since it started, and the bench says so).
double peak_resident_bytes();
bool reset_peak_resident();

}  // namespace lminv::roofline
