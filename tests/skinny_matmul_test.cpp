// The streaming kernels for products of few rows (plugins/common/skinny_matmul.hpp) against a plain double loop, on
// sizes that exercise every tail (rows, lanes, the blocks of rows, the passes and slabs, the threads' ranges), with
// and without a bias, in f32 and f64, with one and with two threads. tests/CMakeLists.txt builds it once per vector
// width (LMINV_SKINNY_VECTOR_BYTES 32 and 64), each under its own suite name.
#include "skinny_matmul.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#ifndef LMINV_SKINNY_SUITE
#define LMINV_SKINNY_SUITE SkinnyMatmul
#endif

namespace lminv::kernels {
namespace {

static_assert(detail::kVectorBytes == LMINV_SKINNY_VECTOR_BYTES);

template <class T>
std::vector<T> values(Index n, double phase) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<T>(std::sin(0.37 * static_cast<double>(i) + phase));
  return v;
}

// The largest |a - b| / (1 + |b|).
template <class T>
double worst(const std::vector<T>& a, const std::vector<double>& b) {
  double w = 0;
  for (std::size_t i = 0; i < b.size(); ++i) w = std::max(w, std::abs(static_cast<double>(a[i]) - b[i]) / (1 + std::abs(b[i])));
  return w;
}

template <class T>
void check(Index M, Index K, Index N, bool with_bias, int threads, double tolerance) {
  const std::vector<T> x = values<T>(M * K, 0.1), w = values<T>(K * N, 0.7), bias = values<T>(N, 1.3);
  // y = x W with W [K, N]
  std::vector<double> want(static_cast<std::size_t>(M * N));
  for (Index m = 0; m < M; ++m)
    for (Index n = 0; n < N; ++n) {
      double s = with_bias ? bias[n] : 0.0;
      for (Index k = 0; k < K; ++k) s += static_cast<double>(x[m * K + k]) * w[k * N + n];
      want[m * N + n] = s;
    }
  std::vector<T> y(static_cast<std::size_t>(M * N), T(-7));
  times(y.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, M, K, N, threads);
  EXPECT_LT(worst(y, want), tolerance) << "times M " << M << " K " << K << " N " << N << " threads " << threads;
  // y = x V^T with V [N, K]: V = W^T
  std::vector<T> v(static_cast<std::size_t>(N * K));
  for (Index k = 0; k < K; ++k)
    for (Index n = 0; n < N; ++n) v[n * K + k] = w[k * N + n];
  std::fill(y.begin(), y.end(), T(-7));
  times_transposed(y.data(), x.data(), v.data(), with_bias ? bias.data() : nullptr, M, N, K, threads);
  EXPECT_LT(worst(y, want), tolerance) << "times_transposed M " << M << " K " << K << " N " << N << " threads "
                                       << threads;
}

TEST(LMINV_SKINNY_SUITE, MatchesADoubleLoopInF64) {
  for (Index M : {1, 2, 3, 4, 5, 7, 16})
    for (int threads : {1, 2}) {
      check<double>(M, 1, 1, true, threads, 1e-14);
      check<double>(M, 37, 29, M % 2 == 0, threads, 1e-13);
      check<double>(M, 768, 515, true, threads, 1e-12);  // large enough for a team of two
      check<double>(M, 2050, 66, false, threads, 1e-12);
    }
}

TEST(LMINV_SKINNY_SUITE, MatchesADoubleLoopInF32) {
  for (Index M : {1, 5, 6, 8, 9, 11, 16})
    for (int threads : {1, 2}) {
      check<float>(M, 37, 29, true, threads, 1e-5);
      check<float>(M, 768, 515, M % 2 == 1, threads, 1e-4);
    }
}

// The int8 kernels equal the plain ones on the dequantised matrix, bit for bit (each element dequantised as
// T(q) * s[column], then the same operations in the same order), for both stored orientations.
template <class T>
void check_int8(Index M, Index K, Index N, bool with_bias, int threads) {
  const std::vector<T> x = values<T>(M * K, 0.1), bias = values<T>(N, 1.3);
  // q [K, N] with scales per column (times_int8), and its transpose [N, K] with the same scales per column of
  // that stored matrix, here the K axis (times_transposed_int8).
  std::vector<std::int8_t> q(static_cast<std::size_t>(K * N)), qt(q.size());
  std::vector<T> s_n = values<T>(N, 2.1), s_k = values<T>(K, 0.4);
  for (T& v : s_n) v = std::abs(v) / 127 + T(1e-3);
  for (T& v : s_k) v = std::abs(v) / 127 + T(1e-3);
  for (Index i = 0; i < K * N; ++i) q[i] = static_cast<std::int8_t>((i * 37 + 11) % 255 - 127);
  for (Index k = 0; k < K; ++k)
    for (Index n = 0; n < N; ++n) qt[n * K + k] = q[k * N + n];
  std::vector<T> w(q.size()), wt(q.size());
  for (Index k = 0; k < K; ++k)
    for (Index n = 0; n < N; ++n) {
      w[k * N + n] = static_cast<T>(q[k * N + n]) * s_n[n];
      wt[n * K + k] = static_cast<T>(qt[n * K + k]) * s_k[k];
    }
  const T* b = with_bias ? bias.data() : nullptr;
  std::vector<T> want(static_cast<std::size_t>(M * N)), got(want.size(), T(-7));
  times(want.data(), x.data(), w.data(), b, M, K, N, threads);
  times_int8(got.data(), x.data(), q.data(), s_n.data(), b, M, K, N, threads);
  EXPECT_EQ(got, want) << "times_int8 M " << M << " K " << K << " N " << N << " threads " << threads;
  std::fill(got.begin(), got.end(), T(-7));
  times_transposed(want.data(), x.data(), wt.data(), b, M, N, K, threads);
  times_transposed_int8(got.data(), x.data(), qt.data(), s_k.data(), b, M, N, K, threads);
  EXPECT_EQ(got, want) << "times_transposed_int8 M " << M << " K " << K << " N " << N << " threads " << threads;
}

TEST(LMINV_SKINNY_SUITE, Int8EqualsThePlainKernelsOnTheDequantisedMatrix) {
  for (Index M : {1, 2, 3, 5, 16})
    for (int threads : {1, 2}) {
      check_int8<float>(M, 1, 1, true, threads);
      check_int8<float>(M, 37, 29, M % 2 == 0, threads);
      check_int8<float>(M, 768, 515, true, threads);
      check_int8<double>(M, 37, 29, true, threads);
      check_int8<double>(M, 2050, 66, false, threads);
    }
}

}  // namespace
}  // namespace lminv::kernels
