// Matrix products with few rows ("skinny": a batch of one prompt of a few tokens, a verifier's handful of
// candidates), written to read each weight once, at the speed of memory.
//
// A GEMM library packs its right-hand matrix into blocks before multiplying, which pays off when many rows share
// the packed copy; with 5 rows it reads and writes every weight once more than the product needs (OpenBLAS 0.3.21
// and oneDNN 2.6's sgemm ran [5, 768] x [768, 2304] at a third to half of the machine's read bandwidth, measured
// in bench/RESULTS.md). These two kernels stream the weight once, in memory order, split among the threads:
//
//   times_transposed   y = x W^T (+ b), W stored [N, K]: dot products of W's rows with x's rows;
//   times              y = x W  (+ b), W stored [K, N]: W's rows scaled and summed into y's rows; the threads take
//                      contiguous ranges of W's rows and sum their partial y at the end.
//
// Every weight layout a network keeps uses one of the two for a product and the other for its transpose (the input
// gradient), so a layer's forward and backward both stream its weight once.
//
// Both also take int8 weights (times_int8, times_transposed_int8; ModelSpec::weight_dtype = int8,
// plugins/common/int8_weights.hpp): the integers q stored as W would be and one scale per column of the stored
// matrix. Each element is dequantised in registers as T(q) * s[column], the very value a dequantised copy of the
// matrix holds, and then used as a weight is, in the same order: the results equal the plain kernels' on the
// dequantised matrix bit for bit, while the kernels read a quarter (f32) or an eighth (f64) of the bytes. The
// rounding differs from a GEMM's (other summation orders, fused multiply-adds): these are for the fast backends,
// never for the reference's exact kernels. Rows beyond kSkinnyRows are left to a GEMM library, which is faster
// there (oneDNN's in f32 for both fast backends where the build has it, LibTorch's BLAS otherwise).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lminv::kernels {

using Index = std::int64_t;

// Up to this many rows the kernels below beat OpenBLAS 0.3.21 or match it (bench/RESULTS.md); oneDNN's matmul on
// prepacked weights catches up at about 12 rows, so the onednn backend uses them up to 8, and so does torch in f32
// where its larger products go to oneDNN (torch_networks.cpp, skinny_rows).
inline constexpr Index kSkinnyRows = 16;

namespace detail {

// Threads for a product of `madds` multiply-adds: one below ~64 K (the team's start costs more than it saves).
inline int team(int threads, Index madds) {
  const int wanted = threads > 0 ? threads : omp_get_max_threads();
  const Index useful = std::max<Index>(1, madds >> 16);
  return static_cast<int>(std::min<Index>(wanted, useful));
}

#ifndef LMINV_SKINNY_VECTOR_BYTES
#ifdef __AVX512F__
#define LMINV_SKINNY_VECTOR_BYTES 64
#else
#define LMINV_SKINNY_VECTOR_BYTES 32
#endif
#endif
inline constexpr int kVectorBytes = LMINV_SKINNY_VECTOR_BYTES;
inline constexpr int kVectorRegisters = kVectorBytes == 64 ? 32 : 16;

// kVectorBytes of T as one value (GCC/Clang vector extensions: a ZMM register where the build targets AVX-512, an
// AVX register on other x86-64, two SSE or NEON registers elsewhere), loaded and stored unaligned.
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int lanes = kVectorBytes / sizeof(T);
  // The same vector aligned as T is: loads and stores through it are single unaligned vector moves (GCC 12 splits a
  // 64-byte memcpy into narrower moves when it tunes for an AVX2 core).
  typedef T unaligned __attribute__((vector_size(kVectorBytes), aligned(alignof(T)), may_alias));
  static type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  static type splat(T a) { return type{} + a; }
  // The lanes summed. With 64-byte vectors by halving (log2(lanes) shuffles and adds, GCC's generic vector shuffles:
  // the intrinsics' casts and reductions trip GCC 12's uninitialised-value warning): the chain of 16 scalar adds
  // through memory, kept for narrower vectors, cost as much as the dot products of 768 it ends.
  static T sum(type v) {
    if constexpr (kVectorBytes == 64 && sizeof(T) == 4) {
      typedef T half __attribute__((vector_size(32)));
      typedef T quarter __attribute__((vector_size(16)));
      const half h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
      const quarter h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
      const quarter h2 = h4 + __builtin_shufflevector(h4, h4, 2, 3, 0, 1);
      return h2[0] + h2[1];
    } else if constexpr (kVectorBytes == 64 && sizeof(T) == 8) {
      typedef T half __attribute__((vector_size(32)));
      typedef T quarter __attribute__((vector_size(16)));
      const half h4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
      const quarter h2 = __builtin_shufflevector(h4, h4, 0, 1) + __builtin_shufflevector(h4, h4, 2, 3);
      return h2[0] + h2[1];
    }
    T s = 0;
    for (int j = 0; j < lanes; ++j) s += v[j];
    return s;
  }
};

// The weight matrix a kernel streams, row-major with rows of `ld` elements: load(r, c) is the vector of elements
// [r, c .. c + lanes), at(r, c) one element.
template <class T>
struct Dense {
  const T* w;
  Index ld;
  typename Vec<T>::type load(Index r, Index c) const { return Vec<T>::load(w + r * ld + c); }
  T at(Index r, Index c) const { return w[r * ld + c]; }
  // A hint to fetch the line `ahead` elements past [r, c] (never dereferenced: past the end is harmless).
  void prefetch(Index r, Index c, Index ahead) const { __builtin_prefetch(w + r * ld + c + ahead); }
};

// int8 integers with one scale per column, dequantised as they are read: T(q[r, c]) * s[c].
template <class T>
struct Quantised {
  const std::int8_t* q;
  const T* s;
  Index ld;
  typename Vec<T>::type load(Index r, Index c) const { return widened(q + r * ld + c) * Vec<T>::load(s + c); }

  // lanes int8 values as a vector of T, exactly. With AVX2 the sign extension and conversion instructions (GCC 12
  // turns the generic __builtin_convertvector of 8 bytes into scalar code, 6 times slower than the f32 kernel).
  static typename Vec<T>::type widened(const std::int8_t* p) {
    typename Vec<T>::type out;
#ifdef __AVX512F__
    if constexpr (kVectorBytes == 64 && std::is_same_v<T, float>) {
      // (zero-masked forms throughout: the plain ones trip GCC 12's uninitialised-value warning)
      const __m512 v = _mm512_maskz_cvtepi32_ps(
          0xffff, _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      std::memcpy(&out, &v, sizeof out);
      return out;
    } else if constexpr (kVectorBytes == 64 && std::is_same_v<T, double>) {
      const __m512d v =
          _mm512_maskz_cvtepi32_pd(0xff, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      std::memcpy(&out, &v, sizeof out);
      return out;
    }
#endif
#ifdef __AVX2__
    if constexpr (kVectorBytes == 32 && std::is_same_v<T, float>) {
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      std::memcpy(&out, &v, sizeof out);
      return out;
    } else if constexpr (kVectorBytes == 32 && std::is_same_v<T, double>) {
      std::int32_t four;
      std::memcpy(&four, p, sizeof four);
      const __m256d v = _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four)));
      std::memcpy(&out, &v, sizeof out);
      return out;
    }
#endif
    typedef std::int8_t bytes __attribute__((vector_size(Vec<T>::lanes)));
    bytes v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, typename Vec<T>::type);
  }
  T at(Index r, Index c) const { return static_cast<T>(q[r * ld + c]) * s[c]; }
  void prefetch(Index r, Index c, Index ahead) const { __builtin_prefetch(q + r * ld + c + ahead); }
};

// How far ahead of the loads the kernels ask for W's lines, in elements of the stream: for the dot products of R rows
// of W with AVX2, 4 KiB of f32 further along the same row; with AVX-512, the same place in the next block of R rows,
// 1 KiB further (measured better there: 36-44 GB/s at 5 rows against 30-34 without the block's offset); 1 KiB per
// row for the scaled rows. The hardware prefetcher alone kept the loads of these kernels, which do up to 8
// multiply-adds per element loaded, at a third of the read bandwidth of an AVX-512 EPYC (60 GB/s): the hints doubled
// the rate at 5 to 8 rows (bench/RESULTS.md, issue #12).
inline constexpr Index kDotsAhead = kVectorBytes == 64 ? 256 : 1024;
inline constexpr Index kDotsRowsAhead = kVectorBytes == 64 ? 1 : 0;
inline constexpr Index kAxpysAhead = 256;
inline constexpr int kVectorsPerLine = kVectorBytes >= 64 ? 1 : 64 / kVectorBytes;

// y[m * ldy + r] = <W[n + r, :], x[m, :]> for R consecutive rows of W (row length K) from row n and MB rows of x (row
// length K). R MB accumulators and R + 1 loads in flight: rows_for keeps R (MB + 1) + 1 within the vector
// registers (16 with AVX2, 32 with AVX-512). Each (r, m) sums in the same order whatever R and MB are.
template <class T, int R, int MB, class W>
inline void dots(T* __restrict__ y, Index ldy, const W& w, Index n, const T* __restrict__ x, Index K) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  typename V::type acc[R][MB] = {};
  Index i = 0;
  for (; i + L <= K; i += L) {
    typename V::type wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w.load(n + r, i);
    if ((i / L) % kVectorsPerLine == 0)  // one hint per 64-byte line of each row
      for (int r = 0; r < R; ++r) w.prefetch(n + r + kDotsRowsAhead * R, i, kDotsAhead);
    for (int m = 0; m < MB; ++m) {
      const typename V::type xm = V::load(x + m * K + i);
      for (int r = 0; r < R; ++r) acc[r][m] += wr[r] * xm;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      T s = V::sum(acc[r][m]);
      for (Index t = i; t < K; ++t) s += w.at(n + r, t) * x[m * K + t];
      y[m * ldy + r] = s;
    }
}

// Rows of W per block for MB rows of x (see dots).
// Chosen by measurement on a Zen 5 pair with AVX-512: at 5 rows of x, blocks of 5 rows of W streamed at 36-44 GB/s and
// blocks of 4 at 18-21 (on any row length from 768 to 3072; not understood, so measured rather than derived).
constexpr int rows_for(int MB) {
  if (kVectorRegisters >= 32) return MB <= 1 ? 8 : MB <= 2 ? 10 : MB <= 3 ? 7 : MB <= 4 ? 6 : MB <= 5 ? 5 : 3;
  return MB <= 2 ? 4 : MB <= 3 ? 3 : MB <= 6 ? 2 : 1;
}

// Rows [n, n1) of y = x W^T for the MB rows of x.
template <class T, int MB, class W>
inline void dots_rows(T* y, const T* x, const W& w, Index N, Index K, Index n, Index n1) {
  constexpr int R = rows_for(MB);
  for (; n + R <= n1; n += R) dots<T, R, MB>(y + n, N, w, n, x, K);
  for (; n < n1; ++n) dots<T, 1, MB>(y + n, N, w, n, x, K);
}

template <class T, class W>
inline void dots_pass(Index mb, T* y, const T* x, const W& w, Index N, Index K, Index n0, Index n1) {
  switch (mb) {
    case 1: return dots_rows<T, 1>(y, x, w, N, K, n0, n1);
    case 2: return dots_rows<T, 2>(y, x, w, N, K, n0, n1);
    case 3: return dots_rows<T, 3>(y, x, w, N, K, n0, n1);
    case 4: return dots_rows<T, 4>(y, x, w, N, K, n0, n1);
    case 5: return dots_rows<T, 5>(y, x, w, N, K, n0, n1);
    case 6: return dots_rows<T, 6>(y, x, w, N, K, n0, n1);
    case 7: return dots_rows<T, 7>(y, x, w, N, K, n0, n1);
    default: return dots_rows<T, 8>(y, x, w, N, K, n0, n1);
  }
}

// Rows of x per pass over W: one pass reads each vector of W from memory once and multiplies it with that many rows.
// With AVX-512, passes of more than 5 rows ran slower (at 6 to 8 rows 15-19 GB/s, against 36-44 at 5, in isolation on
// a Zen 5 core pair): more rows go in passes over slabs of W that the second pass reads from the second-level cache.
inline constexpr Index kPassRows = kVectorRegisters >= 32 ? 5 : 8;

// Rows of W per slab when M needs more than one pass: 16 KiB (the first-level cache) with AVX2; with AVX-512, about
// 192 KiB (the second-level cache), a multiple of 60 rows so that every block size rows_for picks divides it.
template <class T>
Index slab_rows(Index K) {
  const Index row = K * static_cast<Index>(sizeof(T));
  if (kVectorRegisters >= 32) return std::max<Index>(60, 196608 / row / 60 * 60);
  return std::max<Index>(4, 16384 / row / 4 * 4);
}

// Rows [n0, n1) of y = x W^T for every row of x (M <= kSkinnyRows): every row of x in one pass over W when M <=
// kPassRows, which reads each vector of W from memory once; more rows in passes over slabs of W (slab_rows). Each
// (row of W, row of x) is summed in the same order however M is split.
template <class T, class W>
inline void dots_range(T* y, const T* x, const W& w, Index M, Index N, Index K, Index n0, Index n1) {
  const Index passes = (M + kPassRows - 1) / kPassRows;
  const Index slab = passes == 1 ? n1 - n0 : slab_rows<T>(K);
  for (Index s = n0; s < n1; s += slab) {
    const Index e = std::min(n1, s + slab);
    for (Index m = 0, left = passes; m < M; --left) {
      const Index mb = (M - m + left - 1) / left;  // the rows left shared evenly among the passes left
      dots_pass(mb, y + m * N, x + m * K, w, N, K, s, e);
      m += mb;
    }
  }
}

// y[m, :] += sum over rows k in [k0, k1) of x[m, k] W[k, :] (row length N), eight rows of W per pass so that each
// element of y is loaded and stored once per eight of them (measured faster than four at 5 and 8 rows of x).
template <class T, class W>
inline void axpys_range(T* __restrict__ y, const T* __restrict__ x, const W& w, Index M, Index K, Index N, Index k0,
                        Index k1) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  constexpr int RR = 8;
  Index k = k0;
  for (; k + RR <= k1; k += RR) {
    // Each vector of the eight rows is loaded (for int8: dequantised) once and used for every row of x.
    Index c = 0;
    for (; c + L <= N; c += L) {
      typename V::type wr[RR];
      for (int r = 0; r < RR; ++r) wr[r] = w.load(k + r, c);
      if ((c / L) % kVectorsPerLine == 0)  // one hint per 64-byte line of each row
        for (int r = 0; r < RR; ++r) w.prefetch(k + r, c, kAxpysAhead);
      for (Index m = 0; m < M; ++m) {
        const T* xm = x + m * K + k;
        T* __restrict__ ym = y + m * N + c;
        typename V::type acc = V::load(ym);
        for (int r = 0; r < RR; ++r) acc += V::splat(xm[r]) * wr[r];
        V::store(ym, acc);
      }
    }
    for (; c < N; ++c)
      for (Index m = 0; m < M; ++m) {
        T acc = y[m * N + c];
        for (int r = 0; r < RR; ++r) acc += x[m * K + k + r] * w.at(k + r, c);
        y[m * N + c] = acc;
      }
  }
  for (; k < k1; ++k) {
    for (Index m = 0; m < M; ++m) {
      const T a = x[m * K + k];
      T* __restrict__ ym = y + m * N;
      for (Index c = 0; c < N; ++c) ym[c] += a * w.at(k, c);
    }
  }
}

// y [M, N] = x [M, K] W^T (+ bias [N]) for W stored [N, K].
template <class T, class W>
void times_transposed(T* y, const T* x, const W& w, const T* bias, Index M, Index N, Index K, int threads) {
  const int team = detail::team(threads, M * N * K);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const Index parts = omp_get_num_threads(), part = omp_get_thread_num();
    // Contiguous ranges of W's rows (multiples of 4 but for the last), one per thread.
    const Index per = ((N + parts - 1) / parts + 3) / 4 * 4;
    const Index n0 = std::min(N, part * per), n1 = std::min(N, n0 + per);
    detail::dots_range(y, x, w, M, N, K, n0, n1);
    if (bias)
      for (Index m = 0; m < M; ++m)
        for (Index n = n0; n < n1; ++n) y[m * N + n] += bias[n];
  }
}

// y [M, N] = x [M, K] W (+ bias [N]) for W stored [K, N]. Each thread sums its range of W's rows into a partial y of
// its own (M N values), then the partials are added in thread order.
template <class T, class W>
void times(T* y, const T* x, const W& w, const T* bias, Index M, Index K, Index N, int threads) {
  const int team = detail::team(threads, M * N * K);
  if (team == 1) {
    for (Index m = 0; m < M; ++m) {
      if (bias)
        std::memcpy(y + m * N, bias, static_cast<std::size_t>(N) * sizeof(T));
      else
        std::fill(y + m * N, y + (m + 1) * N, T(0));
    }
    detail::axpys_range(y, x, w, M, K, N, 0, K);
    return;
  }
  thread_local std::vector<T> scratch;  // the partials of threads 1 .. team - 1, kept between calls
  const std::size_t block = static_cast<std::size_t>(M * N);
  if (scratch.size() < block * static_cast<std::size_t>(team - 1)) scratch.assign(block * static_cast<std::size_t>(team - 1), T(0));
  T* partials = scratch.data();
#pragma omp parallel num_threads(team)
  {
    const Index parts = omp_get_num_threads(), part = omp_get_thread_num();
    const Index per = ((K + parts - 1) / parts + 7) / 8 * 8;  // multiples of 8 rows, but for the last range
    const Index k0 = std::min(K, part * per), k1 = std::min(K, k0 + per);
    T* mine = part == 0 ? y : partials + static_cast<std::size_t>(part - 1) * block;
    std::fill(mine, mine + block, T(0));
    detail::axpys_range(mine, x, w, M, K, N, k0, k1);
#pragma omp barrier
    // The sum of the partials, split by columns of y among the threads.
    const Index cper = (N + parts - 1) / parts;
    const Index c0 = std::min(N, part * cper), c1 = std::min(N, c0 + cper);
    for (Index m = 0; m < M; ++m)
      for (Index c = c0; c < c1; ++c) {
        T s = y[m * N + c];
        for (Index p = 1; p < parts; ++p) s += partials[static_cast<std::size_t>(p - 1) * block + m * N + c];
        y[m * N + c] = bias ? s + bias[c] : s;
      }
  }
}

}  // namespace detail

// y [M, N] = x [M, K] W^T (+ bias [N]) for W stored [N, K] row-major; y must not overlap x or W.
template <class T>
void times_transposed(T* y, const T* x, const T* W, const T* bias, Index M, Index N, Index K, int threads) {
  detail::times_transposed(y, x, detail::Dense<T>{W, K}, bias, M, N, K, threads);
}

// y [M, N] = x [M, K] W (+ bias [N]) for W stored [K, N] row-major; y must not overlap x or W.
template <class T>
void times(T* y, const T* x, const T* W, const T* bias, Index M, Index K, Index N, int threads) {
  detail::times(y, x, detail::Dense<T>{W, N}, bias, M, K, N, threads);
}

// The same with W the int8 matrix q (stored as W is) times one scale per column of the stored matrix: scale [K] for
// times_transposed_int8 (q [N, K]), scale [N] for times_int8 (q [K, N]).
template <class T>
void times_transposed_int8(T* y, const T* x, const std::int8_t* q, const T* scale, const T* bias, Index M, Index N,
                           Index K, int threads) {
  detail::times_transposed(y, x, detail::Quantised<T>{q, scale, K}, bias, M, N, K, threads);
}
template <class T>
void times_int8(T* y, const T* x, const std::int8_t* q, const T* scale, const T* bias, Index M, Index K, Index N,
                int threads) {
  detail::times(y, x, detail::Quantised<T>{q, scale, N}, bias, M, K, N, threads);
}

}  // namespace lminv::kernels
