#include "roofline.hpp"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lminv/error.hpp"

namespace lminv::roofline {

namespace {

using Clock = std::chrono::steady_clock;

// A buffer of n 64-bit words that nobody has touched yet (no value-initialisation: the threads write it first).
std::unique_ptr<std::uint64_t[]> untouched_words(std::size_t n) { return std::unique_ptr<std::uint64_t[]>(new std::uint64_t[n]); }

// Runs f(thread, begin, end) on `threads` threads over [0, n) split into contiguous shares; returns the seconds from
// the start of the first to the end of the last.
template <class F>
double on_threads(int threads, std::size_t n, F&& f) {
  std::vector<std::thread> team;
  team.reserve(static_cast<std::size_t>(threads));
  const auto start = Clock::now();
  for (int k = 0; k < threads; ++k) {
    const std::size_t begin = n * static_cast<std::size_t>(k) / static_cast<std::size_t>(threads);
    const std::size_t end = n * static_cast<std::size_t>(k + 1) / static_cast<std::size_t>(threads);
    team.emplace_back([&f, k, begin, end] { f(k, begin, end); });
  }
  for (std::thread& t : team) t.join();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int resolve(int threads) {
  if (threads < 0) throw Error("roofline: threads must be 0 (all cores) or positive, got " + std::to_string(threads));
  return threads == 0 ? all_threads() : threads;
}

std::size_t words_of(std::size_t bytes) {
  const std::size_t n = bytes / sizeof(std::uint64_t);
  if (n == 0) throw Error("roofline: the probe buffer must hold at least one 8-byte word");
  return n;
}

}  // namespace

int all_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

double read_bandwidth(int threads, std::size_t bytes, int repeat) {
  threads = resolve(threads);
  const std::size_t n = words_of(bytes);
  auto data = untouched_words(n);
  std::uint64_t* a = data.get();
  // Each thread writes the share it will read: its pages are then real (and local to it where that matters).
  on_threads(threads, n, [a](int, std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) a[i] = i;
  });
  std::atomic<std::uint64_t> sink{0};
  double best = INFINITY;
  for (int r = 0; r < std::max(1, repeat); ++r) {
    best = std::min(best, on_threads(threads, n, [a, &sink](int, std::size_t begin, std::size_t end) {
      // Integer sums: the compiler may reorder and vectorise them (floating-point sums it may not), so the loop
      // runs at the memory's speed, not at the latency of one chain of additions.
      // Four independent sums besides, so that an unvectorised build still keeps several loads in flight.
      std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      std::size_t i = begin;
      for (; i + 4 <= end; i += 4) {
        s0 += a[i];
        s1 += a[i + 1];
        s2 += a[i + 2];
        s3 += a[i + 3];
      }
      for (; i < end; ++i) s0 += a[i];
      sink.fetch_add(s0 + s1 + s2 + s3, std::memory_order_relaxed);
    }));
  }
  if (sink.load() == 42) std::fputs("", stderr);  // keeps the sums observable
  return static_cast<double>(n * sizeof(std::uint64_t)) / best;
}

double copy_bandwidth(int threads, std::size_t bytes, int repeat) {
  threads = resolve(threads);
  const std::size_t n = words_of(bytes);
  auto from = untouched_words(n), to = untouched_words(n);
  std::uint64_t* a = from.get();
  std::uint64_t* b = to.get();
  on_threads(threads, n, [a, b](int, std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) a[i] = i;
    std::memset(b + begin, 0, (end - begin) * sizeof(std::uint64_t));
  });
  double best = INFINITY;
  for (int r = 0; r < std::max(1, repeat); ++r)
    best = std::min(best, on_threads(threads, n, [a, b](int, std::size_t begin, std::size_t end) {
      std::memcpy(b + begin, a + begin, (end - begin) * sizeof(std::uint64_t));
    }));
  return 2.0 * static_cast<double>(n * sizeof(std::uint64_t)) / best;
}

Bound bound(double bytes, double flops, double read_bytes_per_s, double flop_per_s) {
  const auto check = [](double v, const char* what) {
    if (!std::isfinite(v) || v < 0) throw Error(std::string("roofline: ") + what + " must be finite and >= 0, got " + std::to_string(v));
  };
  check(bytes, "bytes");
  check(flops, "flops");
  check(read_bytes_per_s, "the read bandwidth");
  check(flop_per_s, "the GEMM rate");
  if (read_bytes_per_s == 0) throw Error("roofline: the read bandwidth is 0 (not measured?)");
  Bound b;
  b.memory_s = bytes / read_bytes_per_s;
  b.compute_s = flop_per_s > 0 ? flops / flop_per_s : 0.0;
  return b;
}

double peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) * 1024.0;  // "VmHWM:  123 kB"
  return -1;
}

bool reset_peak_resident() {
  std::ofstream clear("/proc/self/clear_refs");
  if (!clear) return false;
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
}

}  // namespace lminv::roofline
