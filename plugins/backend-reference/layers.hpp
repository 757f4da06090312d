// The reference backend's layers, one free function per layer in forward / backward pairs, in the style of llm.c:
// arguments are (outputs, inputs, parameters, sizes[, threads]), shapes are given in comments, every function is
// templated on the scalar (double or float). Backward functions give the input gradient only: inversion never needs
// weight gradients.
//
// Determinism: every output element is computed by the same sequence of operations whatever the batch size and the
// thread count. Dot products run in a fixed lane order (`dots`), vector-matrix products accumulate rows one by one in
// order over column tiles (`axpys`), and threads only decide who computes which elements. So a batch of B items gives
// exactly the bytes of B single calls, and a run gives the same bits with 1 thread or 16. For that, the arithmetic
// functions below do not let the compiler fuse a multiply and an add into an FMA: it fuses in one vectorised loop and
// not in another (seen with GCC 12: dots<double, 1, 3> kept separate multiplies where dots<double, 1, 1> fused), and
// the results would then depend on the batch size. It also gives the same bits on CPUs with and without FMA.
//
// Speed: at the sizes that matter (fcnet at d = 768, T = 6: an 18432 x 18432 fc2) a step is a few matrix-vector
// products, bound by memory bandwidth. The kernels below stream each weight once per call (per group of four items),
// in parallel, with vectorised inner loops; Eigen's GEMV is single-threaded and its GEMM re-packs the weights for a
// handful of right-hand sides, so both are slower here, and neither promises batch-independent rounding. GPT-2's
// layers (decoder_layers.hpp) use the same two kernels.
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>

#include "lminv/rng.hpp"  // LMINV_NO_FP_CONTRACT(_ATTR)

namespace lminv::reference {

using Index = std::int64_t;

// The number of threads to use: `threads` (0 = all cores), but one for work too small to be worth a team.
inline int team_size(int threads, Index work) {
  constexpr Index kMinWorkPerThread = Index{1} << 15;  // multiply-adds; below this the fork costs more than it saves
  const int wanted = threads > 0 ? threads : omp_get_max_threads();
  const Index useful = work / kMinWorkPerThread;
  return static_cast<int>(useful < 1 ? 1 : (useful < wanted ? useful : wanted));
}

// ---- kernels ------------------------------------------------------------------------------------------------------

// The R x K dot products of R consecutive rows of W (row stride ldw) with K vectors x[k] = x + k * x_stride, each of
// n elements; the result of row r and vector k goes to out[r + k * out_stride]. Every element of W and x is loaded
// once per block. Each dot product runs in a fixed order whatever R and K are: kLanes partial sums (the compiler
// vectorises the lane loop), folded pairwise, then the tail. So an item gives the same bits alone or in a batch, and
// a row the same bits in any block. noinline keeps every caller on the one compiled body of each (R, K).
template <class T, int R, int K>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void dots(T* __restrict__ out, Index out_stride,
                                                              const T* __restrict__ W, Index ldw,
                                                              const T* __restrict__ x, Index x_stride, Index n) {
  LMINV_NO_FP_CONTRACT
  constexpr int kLanes = 64 / sizeof(T);  // two AVX registers per dot product; R K <= 4 keeps them all in registers
  T acc[R][K][kLanes] = {};
  Index i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < kLanes; ++j) acc[r][k][j] += W[r * ldw + i + j] * x[k * x_stride + i + j];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) {
      for (int width = kLanes / 2; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) acc[r][k][j] += acc[r][k][j + width];
      T sum = acc[r][k][0];
      for (Index t = i; t < n; ++t) sum += W[r * ldw + t] * x[k * x_stride + t];
      out[r + k * out_stride] = sum;
    }
}

// Items are taken kGroup at a time, so that each weight is loaded once per group while the product is memory-bound.
inline constexpr Index kGroup = 4;

// y[k][c] += sum_o g[k][o] W[o, c] for c < width, o < O, and the K vectors y[k] = y + k * y_stride,
// g[k] = g + k * g_stride. Each element accumulates its terms one by one in order of o, whatever K is and wherever
// the tile starts; four rows of W are taken per pass so that y is loaded and stored once per four terms.
template <class T, int K>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void axpys(T* __restrict__ y, Index y_stride,
                                                               const T* __restrict__ g, Index g_stride,
                                                               const T* __restrict__ W, Index ldw, Index O,
                                                               Index width) {
  LMINV_NO_FP_CONTRACT
  Index o = 0;
  for (; o + 4 <= O; o += 4) {
    const T* w0 = W + o * ldw;
    const T* w1 = w0 + ldw;
    const T* w2 = w1 + ldw;
    const T* w3 = w2 + ldw;
    T a[K][4];
    for (int k = 0; k < K; ++k)
      for (int r = 0; r < 4; ++r) a[k][r] = g[k * g_stride + o + r];
    for (Index c = 0; c < width; ++c) {
      const T v0 = w0[c], v1 = w1[c], v2 = w2[c], v3 = w3[c];
      for (int k = 0; k < K; ++k) {
        T s = y[k * y_stride + c];
        s += a[k][0] * v0;
        s += a[k][1] * v1;
        s += a[k][2] * v2;
        s += a[k][3] * v3;
        y[k * y_stride + c] = s;
      }
    }
  }
  for (; o < O; ++o) {
    const T* w = W + o * ldw;
    for (int k = 0; k < K; ++k) {
      const T a = g[k * g_stride + o];
      for (Index c = 0; c < width; ++c) y[k * y_stride + c] += a * w[c];
    }
  }
}

// out = x @ W^T (+ bias): out[n, o] = <W[o, :], x[n, :]> (+ bias[o]).
// Parallel over blocks of output rows. Several rows at a time keep several memory streams in flight for one item;
// several items at a time read each row of W once per group.
template <class T>
void matvec_rows(T* out, const T* x, const T* W, const T* bias, Index N, Index C, Index O, int threads) {
  // out (N, O), x (N, C), W (O, C), bias (O) or null
  constexpr Index kRows = 4;
  const Index blocks = (O + kRows - 1) / kRows;
  const int team = team_size(threads, N * C * O);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (Index block = 0; block < blocks; ++block) {
    const Index o0 = block * kRows;
    const Index rows = O - o0 < kRows ? O - o0 : kRows;
    const T* w = W + o0 * C;
    if (N == 1 && rows == kRows) {
      dots<T, 4, 1>(out + o0, O, w, C, x, C, C);
    } else {
      for (Index r = 0; r < rows; ++r) {
        Index n = 0;
        for (; n + kGroup <= N; n += kGroup) dots<T, 1, kGroup>(out + n * O + o0 + r, O, w + r * C, C, x + n * C, C, C);
        switch (N - n) {
          case 3: dots<T, 1, 3>(out + n * O + o0 + r, O, w + r * C, C, x + n * C, C, C); break;
          case 2: dots<T, 1, 2>(out + n * O + o0 + r, O, w + r * C, C, x + n * C, C, C); break;
          case 1: dots<T, 1, 1>(out + n * O + o0 + r, O, w + r * C, C, x + n * C, C, C); break;
          default: break;
        }
      }
    }
    if (bias)
      for (Index n = 0; n < N; ++n)
        for (Index o = o0; o < o0 + rows; ++o) out[n * O + o] += bias[o];
  }
}

// out = g @ W: out[n, c] = sum_o g[n, o] W[o, c], accumulated in order of o.
// Parallel over fixed-width column tiles and groups of items: a tile of `out` stays in cache while W streams by.
template <class T>
void vecmat_rows(T* out, const T* g, const T* W, Index N, Index O, Index C, int threads) {
  // out (N, C), g (N, O), W (O, C)
  constexpr Index kTile = 16384 / sizeof(T);  // 16 KiB of each item's output: the group's tiles stay in L2
  const Index tiles = (C + kTile - 1) / kTile;
  const Index groups = (N + kGroup - 1) / kGroup;
  const int team = team_size(threads, N * C * O);
#pragma omp parallel for collapse(2) schedule(static) num_threads(team) if (team > 1)
  for (Index group = 0; group < groups; ++group) {
    for (Index tile = 0; tile < tiles; ++tile) {
      const Index n = group * kGroup;
      const Index items = N - n < kGroup ? N - n : kGroup;
      const Index c0 = tile * kTile;
      const Index width = C - c0 < kTile ? C - c0 : kTile;
      T* y = out + n * C + c0;
      for (Index k = 0; k < items; ++k)
        for (Index c = 0; c < width; ++c) y[k * C + c] = T(0);
      const T* gn = g + n * O;
      switch (items) {
        case 4: axpys<T, 4>(y, C, gn, O, W + c0, C, O, width); break;
        case 3: axpys<T, 3>(y, C, gn, O, W + c0, C, O, width); break;
        case 2: axpys<T, 2>(y, C, gn, O, W + c0, C, O, width); break;
        default: axpys<T, 1>(y, C, gn, O, W + c0, C, O, width); break;
      }
    }
  }
}

// ---- layers -------------------------------------------------------------------------------------------------------

// Linear layer with torch's weight layout [out, in]: out = inp @ weight^T + bias.
template <class T>
void linear_forward(T* out, const T* inp, const T* weight, const T* bias, Index N, Index C, Index OC, int threads = 0) {
  // out (N, OC), inp (N, C), weight (OC, C), bias (OC)
  matvec_rows(out, inp, weight, bias, N, C, OC, threads);
}

// Input gradient of the linear layer: dinp = dout @ weight.
template <class T>
void linear_backward(T* dinp, const T* dout, const T* weight, Index N, Index C, Index OC, int threads = 0) {
  // dinp (N, C), dout (N, OC), weight (OC, C)
  vecmat_rows(dinp, dout, weight, N, OC, C, threads);
}

// Input in vocabulary space: each position's V-vector mixes the token embeddings, x = v @ wte.
template <class T>
void embed_vocab_forward(T* out, const T* v, const T* wte, Index N, Index V, Index d, int threads = 0) {
  // out (N, d), v (N, V), wte (V, d)
  vecmat_rows(out, v, wte, N, V, d, threads);
}

// dv = dout @ wte^T.
template <class T>
void embed_vocab_backward(T* dv, const T* dout, const T* wte, Index N, Index V, Index d, int threads = 0) {
  // dv (N, V), dout (N, d), wte (V, d)
  matvec_rows(dv, dout, wte, static_cast<const T*>(nullptr), N, d, V, threads);
}

// GELU, exact form (torch.nn.GELU's default): x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
template <class T>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void gelu_forward(T* out, const T* inp, Index n) {
  LMINV_NO_FP_CONTRACT
  // out (n), inp (n)
  const T inv_sqrt2 = T(0.70710678118654752440);
  for (Index i = 0; i < n; ++i) out[i] = T(0.5) * inp[i] * (T(1) + std::erf(inp[i] * inv_sqrt2));
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x), with phi the standard normal density.
template <class T>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void gelu_backward(T* dinp, const T* inp, const T* dout, Index n) {
  LMINV_NO_FP_CONTRACT
  // dinp (n), inp (n), dout (n)
  const T inv_sqrt2 = T(0.70710678118654752440);
  const T inv_sqrt2pi = T(0.39894228040143267794);
  for (Index i = 0; i < n; ++i) {
    const T x = inp[i];
    const T cdf = T(0.5) * (T(1) + std::erf(x * inv_sqrt2));
    const T pdf = inv_sqrt2pi * std::exp(T(-0.5) * x * x);
    dinp[i] = (cdf + x * pdf) * dout[i];
  }
}

// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <class T>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void gelu_tanh_forward(T* out, const T* inp, Index n) {
  LMINV_NO_FP_CONTRACT
  // out (n), inp (n)
  const T s = T(0.79788456080286535588);  // sqrt(2 / pi)
  for (Index i = 0; i < n; ++i) {
    const T x = inp[i];
    out[i] = T(0.5) * x * (T(1) + std::tanh(s * (x + T(0.044715) * x * x * x)));
  }
}

// d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(sqrt(2/pi) (x + 0.044715 x^3)).
template <class T>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void gelu_tanh_backward(T* dinp, const T* inp, const T* dout,
                                                                            Index n) {
  LMINV_NO_FP_CONTRACT
  // dinp (n), inp (n), dout (n)
  const T s = T(0.79788456080286535588);
  for (Index i = 0; i < n; ++i) {
    const T x = inp[i];
    const T t = std::tanh(s * (x + T(0.044715) * x * x * x));
    const T local = T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * s * (T(1) + T(3 * 0.044715) * x * x);
    dinp[i] = local * dout[i];
  }
}

}  // namespace lminv::reference
