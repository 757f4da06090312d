// The reference backend's "matmul_probe" (lminv/matmul_probe.hpp): C = A B through vecmat_rows, the kernel its
// layers multiply with (layers.hpp), in f64 or f32 with the model's threads.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "layers.hpp"
#include "lminv/error.hpp"
#include "lminv/matmul_probe.hpp"

namespace lminv::reference {

class ReferenceMatmulProbe final : public MatmulProbe {
 public:
  explicit ReferenceMatmulProbe(int threads) : threads_(threads) {}

  double matmul_seconds(DType dtype, std::int64_t m, std::int64_t n, std::int64_t k, int repeat) override {
    if (dtype == DType::f64) return time<double>(m, n, k, repeat);
    if (dtype == DType::f32) return time<float>(m, n, k, repeat);
    throw Error(std::string("reference: matmul_probe: no matrix product in ") + dtype_name(dtype));
  }

 private:
  template <class T>
  double time(Index m, Index n, Index k, int repeat) const {
    std::vector<T> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n)), c(static_cast<std::size_t>(m * n));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = T(0.001) * static_cast<T>(i % 997);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = T(0.002) * static_cast<T>(i % 991);
    vecmat_rows(c.data(), a.data(), b.data(), m, k, n, threads_);  // c (m, n) = a (m, k) b (k, n)
    double best = INFINITY;
    for (int r = 0; r < std::max(1, repeat); ++r) {
      const auto start = std::chrono::steady_clock::now();
      vecmat_rows(c.data(), a.data(), b.data(), m, k, n, threads_);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  }

  int threads_;
};

}  // namespace lminv::reference
