// The decoder's layers for the reference backend (every transformer family, architecture.hpp), in llm.c's style: one
// free function per layer in forward / backward pairs, templated on the scalar (double or float), arguments in the
// order
//   forward  (outputs, saved for the backward pass, inputs, parameters, sizes[, threads])
//   backward (input gradient, saved by the forward pass, output gradient, parameters, sizes[, threads])
// with shapes in comments: B items, T positions, N = B T rows, C = n_embd channels, V tokens, OC outputs; the
// attention's sizes are a HeadLayout (NH query heads, NKV key/value heads, HS features each).
// Backward functions give the input gradient only (inversion needs no weight gradient) and write it (=); the one
// place where two gradients meet, the residual connection, says so (residual_backward).
//
// Matrix products go through the kernels of layers.hpp. The canonical linear layer (GPT-2's Conv1D) keeps its weight
// as [in, out] and computes y = x W + b, out[o] = sum_i x[i] W[i, o]: that is vecmat_rows (rows of W accumulated in
// order of i), and its input gradient dx[i] = <W[i, :], dy> is matvec_rows on the same layout. So the checkpoint's
// layout is used as it is, with no transposed copy. The lm_head ([V, C]: wte when tied, lm_head.weight otherwise) is
// the other way round: logits = x W^T (matvec_rows) and dx = dlogits W (vecmat_rows).
//
// Determinism, as in layers.hpp: every output element is computed by the same operations in the same order whatever
// the batch size, the sequence length and the thread count (threads only split rows, heads or tiles), so a batch is
// bit-identical to its items run one by one, and position t's outputs never read anything at positions > t (the
// causal mask is a loop bound, not a -inf). No multiply and add is fused into an FMA (the project builds with
// -ffp-contract=off, and these functions say so themselves for builds that do not).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "layers.hpp"

namespace lminv::reference {

// Runs f(begin, end) on consecutive ranges of [0, n) of at most `grain` elements, in parallel when the work
// (n elements of `cost` operations each) is worth a team. Ranges are independent: f must not depend on who runs it.
template <class F>
void parallel_ranges(Index n, Index grain, Index cost, int threads, F&& f) {
  const Index ranges = (n + grain - 1) / grain;
  const int team = team_size(threads, n * cost);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && ranges > 1)
  for (Index r = 0; r < ranges; ++r) f(r * grain, std::min(n, (r + 1) * grain));
}

// ---- embedding with positions -------------------------------------------------------------------------------------

// h0 = x (+ wpe[t0 + t] at position t when wpe is given: learned positions), with x = inp (token embeddings,
// wte == nullptr) or x = inp @ wte (vocabulary-space input). t0 is the first row's position (a prefix cache's rows).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void embedding_forward(Real* out, const Real* inp, const Real* wte, const Real* wpe, Index B,
                                                 Index T, Index C, Index V, int threads = 0, Index t0 = 0) {
  LMINV_NO_FP_CONTRACT
  // out (B, T, C), inp (B, T, C) or (B, T, V), wte (V, C) or null, wpe (>= t0 + T, C) or null
  const Index N = B * T;
  if (wte) {
    vecmat_rows(out, inp, wte, N, V, C, threads);  // (B T, V) @ (V, C)
  } else {
    std::memcpy(out, inp, static_cast<std::size_t>(N * C) * sizeof(Real));
  }
  if (!wpe) return;
  for (Index n = 0; n < N; ++n) {
    const Real* pos = wpe + (t0 + n % T) * C;
    Real* o = out + n * C;
    for (Index c = 0; c < C; ++c) o[c] += pos[c];
  }
}

// The positions are constants: dinp = dout, or dout @ wte^T for a vocabulary-space input.
template <class Real>
void embedding_backward(Real* dinp, const Real* dout, const Real* wte, Index B, Index T, Index C, Index V,
                        int threads = 0) {
  // dinp (B, T, C) or (B, T, V), dout (B, T, C), wte (V, C) or null
  const Index N = B * T;
  if (wte) {
    matvec_rows(dinp, dout, wte, static_cast<const Real*>(nullptr), N, C, V, threads);  // (B T, C) @ (C, V)
  } else {
    std::memcpy(dinp, dout, static_cast<std::size_t>(N * C) * sizeof(Real));
  }
}

// ---- layer norm ---------------------------------------------------------------------------------------------------

// torch.nn.LayerNorm over the last dimension: out = (x - mean) rstd weight (+ bias), rstd = 1 / sqrt(var + eps) with
// the biased variance; bias == nullptr is a layer norm without bias. Saves mean and rstd per row for the backward pass.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void layernorm_rows(Real* out, Real* mean, Real* rstd,
                                                                        const Real* inp, const Real* weight,
                                                                        const Real* bias, Index begin, Index end,
                                                                        Index C, Real eps) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* x = inp + n * C;
    Real m = 0;
    for (Index c = 0; c < C; ++c) m += x[c];
    m = m / Real(C);
    Real v = 0;
    for (Index c = 0; c < C; ++c) v += (x[c] - m) * (x[c] - m);
    v = v / Real(C);
    const Real s = Real(1) / std::sqrt(v + eps);
    Real* o = out + n * C;
    if (bias) {
      for (Index c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c] + bias[c];
    } else {
      for (Index c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c];
    }
    mean[n] = m;
    rstd[n] = s;
  }
}

template <class Real>
void layernorm_forward(Real* out, Real* mean, Real* rstd, const Real* inp, const Real* weight, const Real* bias,
                       Index N, Index C, Real eps, int threads = 0) {
  // out (N, C), mean (N), rstd (N), inp (N, C), weight (C), bias (C) or null
  parallel_ranges(N, 16, 8 * C, threads, [&](Index begin, Index end) {
    layernorm_rows(out, mean, rstd, inp, weight, bias, begin, end, C, eps);
  });
}

// With xhat = (x - mean) rstd and g = dout weight: dx = rstd (g - mean(g) - xhat mean(g xhat)). The bias, if any, is
// a constant: the same gradient with and without it.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void layernorm_backward_rows(Real* dinp, const Real* inp,
                                                                                 const Real* mean, const Real* rstd,
                                                                                 const Real* dout, const Real* weight,
                                                                                 Index begin, Index end, Index C) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* x = inp + n * C;
    const Real* dy = dout + n * C;
    const Real m = mean[n], s = rstd[n];
    Real g_mean = 0, gx_mean = 0;
    for (Index c = 0; c < C; ++c) {
      const Real xhat = (x[c] - m) * s;
      const Real g = dy[c] * weight[c];
      g_mean += g;
      gx_mean += g * xhat;
    }
    g_mean = g_mean / Real(C);
    gx_mean = gx_mean / Real(C);
    Real* dx = dinp + n * C;
    for (Index c = 0; c < C; ++c) {
      const Real xhat = (x[c] - m) * s;
      const Real g = dy[c] * weight[c];
      dx[c] = (g - g_mean - xhat * gx_mean) * s;
    }
  }
}

template <class Real>
void layernorm_backward(Real* dinp, const Real* inp, const Real* mean, const Real* rstd, const Real* dout,
                        const Real* weight, Index N, Index C, int threads = 0) {
  // dinp (N, C), inp (N, C), mean (N), rstd (N), dout (N, C), weight (C)
  parallel_ranges(N, 16, 10 * C, threads, [&](Index begin, Index end) {
    layernorm_backward_rows(dinp, inp, mean, rstd, dout, weight, begin, end, C);
  });
}

// ---- RMS norm -----------------------------------------------------------------------------------------------------

// Llama's RMSNorm: out = x rstd weight, rstd = 1 / sqrt(mean(x^2) + eps), no mean subtracted and no bias. Saves rstd
// per row for the backward pass.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void rmsnorm_rows(Real* out, Real* rstd, const Real* inp,
                                                                      const Real* weight, Index begin, Index end,
                                                                      Index C, Real eps) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* x = inp + n * C;
    Real ms = 0;
    for (Index c = 0; c < C; ++c) ms += x[c] * x[c];
    ms = ms / Real(C);
    const Real s = Real(1) / std::sqrt(ms + eps);
    Real* o = out + n * C;
    for (Index c = 0; c < C; ++c) o[c] = x[c] * s * weight[c];
    rstd[n] = s;
  }
}

template <class Real>
void rmsnorm_forward(Real* out, Real* rstd, const Real* inp, const Real* weight, Index N, Index C, Real eps,
                     int threads = 0) {
  // out (N, C), rstd (N), inp (N, C), weight (C)
  parallel_ranges(N, 16, 4 * C, threads,
                  [&](Index begin, Index end) { rmsnorm_rows(out, rstd, inp, weight, begin, end, C, eps); });
}

// With xhat = x rstd and g = dout weight: d rstd / dx_k = -rstd^3 x_k / C, so dx = rstd (g - xhat mean(g xhat)).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void rmsnorm_backward_rows(Real* dinp, const Real* inp,
                                                                               const Real* rstd, const Real* dout,
                                                                               const Real* weight, Index begin,
                                                                               Index end, Index C) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* x = inp + n * C;
    const Real* dy = dout + n * C;
    const Real s = rstd[n];
    Real gx_mean = 0;
    for (Index c = 0; c < C; ++c) gx_mean += dy[c] * weight[c] * (x[c] * s);
    gx_mean = gx_mean / Real(C);
    Real* dx = dinp + n * C;
    for (Index c = 0; c < C; ++c) dx[c] = (dy[c] * weight[c] - x[c] * s * gx_mean) * s;
  }
}

template <class Real>
void rmsnorm_backward(Real* dinp, const Real* inp, const Real* rstd, const Real* dout, const Real* weight, Index N,
                      Index C, int threads = 0) {
  // dinp (N, C), inp (N, C), rstd (N), dout (N, C), weight (C)
  parallel_ranges(N, 16, 8 * C, threads,
                  [&](Index begin, Index end) { rmsnorm_backward_rows(dinp, inp, rstd, dout, weight, begin, end, C); });
}

// ---- the canonical linear layer (GPT-2's Conv1D, weight [in, out]) ------------------------------------------------

// out = inp @ weight (+ bias, when given).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void conv1d_forward(Real* out, const Real* inp, const Real* weight, const Real* bias, Index N,
                                              Index C, Index OC, int threads = 0) {
  LMINV_NO_FP_CONTRACT
  // out (N, OC), inp (N, C), weight (C, OC), bias (OC) or null
  vecmat_rows(out, inp, weight, N, C, OC, threads);
  if (!bias) return;
  for (Index n = 0; n < N; ++n)
    for (Index o = 0; o < OC; ++o) out[n * OC + o] += bias[o];
}

// dinp = dout @ weight^T: dinp[n, c] = <weight[c, :], dout[n, :]>.
template <class Real>
void conv1d_backward(Real* dinp, const Real* dout, const Real* weight, Index N, Index C, Index OC, int threads = 0) {
  // dinp (N, C), dout (N, OC), weight (C, OC)
  matvec_rows(dinp, dout, weight, static_cast<const Real*>(nullptr), N, OC, C, threads);
}

// ---- rotary positions ---------------------------------------------------------------------------------------------

// Rows of qkv, q and k heads both: the first `rotary` features of each head are rotated by the position, in
// Hugging Face's rotate_half layout (architecture.hpp): with r = rotary and i < r / 2, at angle a_i,
//   out[i] = x[i] cos a_i - x[i + r/2] sin a_i,   out[i + r/2] = x[i + r/2] cos a_i + x[i] sin a_i.
// The features from r on pass through (partial rotary, GPT-NeoX's rotary_pct).
//
// The angles: inv_freq[i] = theta^(-2i / r) is computed in double (rotary_inv_freq) and rounded once to Real; then,
// in Real, a_i = Real(t) inv_freq[i] and cos a_i, sin a_i (rotary_table). In f64 that is the exact recipe; in f32 it
// is what Hugging Face computes for a float32 model (float32 inv_freq, angles and cos/sin), up to the rounding of
// inv_freq itself. A position's table row is the same bits whoever asks for it (a whole sequence, a prefix cache).
inline std::vector<double> rotary_inv_freq(double theta, Index rotary) {
  std::vector<double> inv(static_cast<std::size_t>(rotary / 2));
  for (Index i = 0; i < rotary / 2; ++i)
    inv[static_cast<std::size_t>(i)] = std::pow(theta, -static_cast<double>(2 * i) / static_cast<double>(rotary));
  return inv;
}

// cos and sin of the angles of positions t0 .. t0 + T - 1, one row of half = rotary / 2 values each.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void rotary_table(Real* cos, Real* sin, const Real* inv_freq, Index t0, Index T, Index half) {
  LMINV_NO_FP_CONTRACT
  // cos (T, half), sin (T, half), inv_freq (half)
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < half; ++i) {
      const Real angle = static_cast<Real>(t0 + t) * inv_freq[i];
      cos[t * half + i] = std::cos(angle);
      sin[t * half + i] = std::sin(angle);
    }
}

// The rotation of `heads` consecutive heads of HS features in rows [begin, end) of x (row stride `stride`), row n at
// table row n % T. With `inverse`, the transposed rotation (the backward pass: a rotation's gradient is rotated back).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void rotary_rows(Real* x, const Real* cos, const Real* sin,
                                                                     Index begin, Index end, Index T, Index stride,
                                                                     Index heads, Index HS, Index half, bool inverse) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* c = cos + (n % T) * half;
    const Real* s = sin + (n % T) * half;
    for (Index j = 0; j < heads; ++j) {
      Real* x1 = x + n * stride + j * HS;  // first halves ...
      Real* x2 = x1 + half;                // ... and second halves of the rotated features
      if (!inverse) {
        for (Index i = 0; i < half; ++i) {
          const Real a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      } else {
        for (Index i = 0; i < half; ++i) {
          const Real a = x1[i], b = x2[i];
          x1[i] = a * c[i] + b * s[i];
          x2[i] = b * c[i] - a * s[i];
        }
      }
    }
  }
}

// ---- causal self-attention ----------------------------------------------------------------------------------------

// Where the heads are in a row of qkv: [q heads | k heads | v heads], NH query heads and NKV key/value heads of HS
// features each; query head h reads key/value head h / (NH / NKV) (grouped-query attention; NKV = NH is GPT-2's
// multi-head attention). The heads' outputs are merged into rows of NH HS features.
struct HeadLayout {
  Index NH = 0, NKV = 0, HS = 0;

  Index q_width() const { return NH * HS; }
  Index kv_width() const { return NKV * HS; }
  Index qkv_width() const { return (NH + 2 * NKV) * HS; }
  Index group() const { return NH / NKV; }  // query heads per key/value head
  Index q_col(Index h) const { return h * HS; }
  Index k_col(Index h) const { return NH * HS + h / group() * HS; }  // query head h's key head
  Index v_col(Index h) const { return (NH + NKV) * HS + h / group() * HS; }
};

// rotary_rows on the q and k heads (the first NH + NKV heads of each row) of qkv, rows at positions given by the
// table: row n of a batch of items of T positions uses table row n % T.
template <class Real>
void rotary_forward(Real* qkv, const Real* cos, const Real* sin, Index N, Index T, const HeadLayout& L, Index rotary,
                    int threads = 0) {
  // qkv (N, QKV), cos (T, rotary / 2), sin (T, rotary / 2)
  parallel_ranges(N, 16, 3 * (L.NH + L.NKV) * rotary, threads, [&](Index begin, Index end) {
    rotary_rows(qkv, cos, sin, begin, end, T, L.qkv_width(), L.NH + L.NKV, L.HS, rotary / 2, false);
  });
}

// The gradient with respect to the unrotated q and k, in place: the inverse (transposed) rotation of dqkv's q and k.
template <class Real>
void rotary_backward(Real* dqkv, const Real* cos, const Real* sin, Index N, Index T, const HeadLayout& L, Index rotary,
                     int threads = 0) {
  // dqkv (N, QKV), cos (T, rotary / 2), sin (T, rotary / 2)
  parallel_ranges(N, 16, 3 * (L.NH + L.NKV) * rotary, threads, [&](Index begin, Index end) {
    rotary_rows(dqkv, cos, sin, begin, end, T, L.qkv_width(), L.NH + L.NKV, L.HS, rotary / 2, true);
  });
}

// One head of one item: q, k and v point at the head's columns of the item's first row of qkv (row stride `stride`),
// out at its columns of the merged output (row stride `out_stride`). For each position t: scores s[t2] =
// <q_t, k_t2> / sqrt(hs) for t2 <= t (the causal mask), att = softmax(s) (saved, with zeros above the diagonal),
// out_t = sum_t2 att[t2] v_t2.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_forward(Real* out, Real* att, const Real* q,
                                                                                const Real* k, const Real* v, Index T,
                                                                                Index stride, Index out_stride,
                                                                                Index hs) {
  LMINV_NO_FP_CONTRACT
  // out: this head's columns of (T, out_stride), att (T, T), q, k, v: this head's columns of (T, stride)
  const Real sqrt_hs = std::sqrt(Real(hs));
  for (Index t = 0; t < T; ++t) {
    const Real* qt = q + t * stride;
    Real* a = att + t * T;
    Real max_score = -std::numeric_limits<Real>::infinity();
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* kt = k + t2 * stride;
      Real dot = 0;
      for (Index i = 0; i < hs; ++i) dot += qt[i] * kt[i];
      a[t2] = dot / sqrt_hs;
      max_score = std::max(max_score, a[t2]);
    }
    Real sum = 0;
    for (Index t2 = 0; t2 <= t; ++t2) {
      a[t2] = std::exp(a[t2] - max_score);
      sum += a[t2];
    }
    for (Index t2 = 0; t2 <= t; ++t2) a[t2] = a[t2] / sum;
    for (Index t2 = t + 1; t2 < T; ++t2) a[t2] = 0;
    Real* o = out + t * out_stride;
    for (Index i = 0; i < hs; ++i) o[i] = 0;
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* vt = v + t2 * stride;
      for (Index i = 0; i < hs; ++i) o[i] += a[t2] * vt[i];
    }
  }
}

template <class Real>
void attention_forward(Real* out, Real* att, const Real* qkv, Index B, Index T, const HeadLayout& L, int threads = 0) {
  // out (B, T, NH HS), att (B, NH, T, T), qkv (B, T, QKV)
  const Index stride = L.qkv_width(), out_stride = L.q_width();
  parallel_ranges(B * L.NH, 1, T * T * L.HS, threads, [&](Index begin, Index end) {
    for (Index bh = begin; bh < end; ++bh) {
      const Index b = bh / L.NH, h = bh % L.NH;
      const Real* item = qkv + b * T * stride;
      attention_head_forward(out + b * T * out_stride + L.q_col(h), att + bh * T * T, item + L.q_col(h),
                             item + L.k_col(h), item + L.v_col(h), T, stride, out_stride, L.HS);
    }
  });
}

// The same attention for one new token at position t against a kept prefix: its scores are its query against the
// prefix keys k_cache[0 .. t-1] and then against its own key, in that order, so that its output has the bits
// attention_head_forward gives position t of the whole sequence (same operations, same order).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_next(Real* out, Real* scores, const Real* q,
                                                                             const Real* k_own, const Real* v_own,
                                                                             const Real* k_cache, const Real* v_cache,
                                                                             Index cache_stride, Index t, Index hs) {
  LMINV_NO_FP_CONTRACT
  // out (hs), scores (t + 1), q, k_own, v_own (hs), k_cache, v_cache: this head's columns of (t, cache_stride)
  const Real sqrt_hs = std::sqrt(Real(hs));
  auto key = [&](Index t2) { return t2 < t ? k_cache + t2 * cache_stride : k_own; };
  auto value = [&](Index t2) { return t2 < t ? v_cache + t2 * cache_stride : v_own; };
  Real max_score = -std::numeric_limits<Real>::infinity();
  for (Index t2 = 0; t2 <= t; ++t2) {
    const Real* k = key(t2);
    Real dot = 0;
    for (Index i = 0; i < hs; ++i) dot += q[i] * k[i];
    scores[t2] = dot / sqrt_hs;
    max_score = std::max(max_score, scores[t2]);
  }
  Real sum = 0;
  for (Index t2 = 0; t2 <= t; ++t2) {
    scores[t2] = std::exp(scores[t2] - max_score);
    sum += scores[t2];
  }
  for (Index t2 = 0; t2 <= t; ++t2) scores[t2] = scores[t2] / sum;
  for (Index i = 0; i < hs; ++i) out[i] = 0;
  for (Index t2 = 0; t2 <= t; ++t2) {
    const Real* v = value(t2);
    for (Index i = 0; i < hs; ++i) out[i] += scores[t2] * v[i];
  }
}

// B new tokens (rows of qkv, already rotated at position t), each against the prefix's keys and values: the k and v
// heads of its rows, (t, NKV HS) each, as the prefix's rows of qkv held them.
template <class Real>
void attention_next(Real* out, const Real* qkv, const Real* k_cache, const Real* v_cache, Index B, Index t,
                    const HeadLayout& L, int threads = 0) {
  // out (B, NH HS), qkv (B, QKV), k_cache (t, NKV HS), v_cache (t, NKV HS)
  const Index stride = L.qkv_width(), kv = L.kv_width();
  parallel_ranges(B * L.NH, 1, (t + 1) * L.HS, threads, [&](Index begin, Index end) {
    std::vector<Real> scores(static_cast<std::size_t>(t + 1));
    for (Index bh = begin; bh < end; ++bh) {
      const Index b = bh / L.NH, h = bh % L.NH;
      const Real* row = qkv + b * stride;
      const Index kv_col = h / L.group() * L.HS;  // in the cache's rows
      attention_head_next(out + b * L.q_width() + L.q_col(h), scores.data(), row + L.q_col(h), row + L.k_col(h),
                          row + L.v_col(h), k_cache + kv_col, v_cache + kv_col, kv, t, L.HS);
    }
  });
}

// One query head's part of the gradient, added to dq (its own) and dk, dv (its key/value head's, shared by the
// group): the softmax's backward d s[t2] = att[t2] (datt[t2] - sum_j att[j] datt[j]), then through the scaled dot
// products. Positions in a fixed order.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_backward(
    Real* dq, Real* dk, Real* dv, const Real* q, const Real* k, const Real* v, const Real* att, const Real* dout,
    Index T, Index stride, Index out_stride, Index hs) {
  LMINV_NO_FP_CONTRACT
  // dq, dk, dv, q, k, v: the heads' columns of (T, stride), att (T, T), dout: this head's columns of (T, out_stride)
  const Real sqrt_hs = std::sqrt(Real(hs));
  std::vector<Real> datt(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    const Real* a = att + t * T;
    const Real* dy = dout + t * out_stride;
    const Real* qt = q + t * stride;
    Real* dqt = dq + t * stride;
    Real weighted = 0;  // sum_t2 att[t2] datt[t2]
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* vt = v + t2 * stride;
      Real* dvt = dv + t2 * stride;
      Real dot = 0;
      for (Index i = 0; i < hs; ++i) {
        dot += dy[i] * vt[i];
        dvt[i] += a[t2] * dy[i];
      }
      datt[t2] = dot;
      weighted += a[t2] * dot;
    }
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real dscore = a[t2] * (datt[t2] - weighted) / sqrt_hs;
      const Real* kt = k + t2 * stride;
      Real* dkt = dk + t2 * stride;
      for (Index i = 0; i < hs; ++i) {
        dqt[i] += dscore * kt[i];
        dkt[i] += dscore * qt[i];
      }
    }
  }
}

// Parallel over (item, key/value head): one thread gathers a key/value head's gradient from its group's query heads,
// in order of the query head, so the sums have one order whatever the thread count.
template <class Real>
void attention_backward(Real* dqkv, const Real* qkv, const Real* att, const Real* dout, Index B, Index T,
                        const HeadLayout& L, int threads = 0) {
  // dqkv (B, T, QKV), qkv (B, T, QKV), att (B, NH, T, T), dout (B, T, NH HS)
  const Index stride = L.qkv_width(), out_stride = L.q_width(), G = L.group();
  parallel_ranges(B * L.NKV, 1, 2 * G * T * T * L.HS, threads, [&](Index begin, Index end) {
    for (Index bg = begin; bg < end; ++bg) {
      const Index b = bg / L.NKV, g = bg % L.NKV;
      const Real* item = qkv + b * T * stride;
      Real* ditem = dqkv + b * T * stride;
      Real* dk = ditem + L.k_col(g * G);
      Real* dv = ditem + L.v_col(g * G);
      for (Index t = 0; t < T; ++t)
        for (Index i = 0; i < L.HS; ++i) dk[t * stride + i] = dv[t * stride + i] = 0;
      for (Index h = g * G; h < (g + 1) * G; ++h) {
        Real* dq = ditem + L.q_col(h);
        for (Index t = 0; t < T; ++t)
          for (Index i = 0; i < L.HS; ++i) dq[t * stride + i] = 0;
        attention_head_backward(dq, dk, dv, item + L.q_col(h), item + L.k_col(h), item + L.v_col(h),
                                att + (b * L.NH + h) * T * T, dout + b * T * out_stride + L.q_col(h), T, stride,
                                out_stride, L.HS);
      }
    }
  });
}

// ---- MLP activations ----------------------------------------------------------------------------------------------

// gelu_tanh_forward / gelu_tanh_backward of layers.hpp (GPT-2's "gelu_new"), over ranges in parallel.
template <class Real>
void gelu_tanh_forward_parallel(Real* out, const Real* inp, Index n, int threads = 0) {
  // out (n), inp (n)
  parallel_ranges(n, 4096, 32, threads,
                  [&](Index begin, Index end) { gelu_tanh_forward(out + begin, inp + begin, end - begin); });
}

template <class Real>
void gelu_tanh_backward_parallel(Real* dinp, const Real* inp, const Real* dout, Index n, int threads = 0) {
  // dinp (n), inp (n), dout (n)
  parallel_ranges(n, 4096, 40, threads, [&](Index begin, Index end) {
    gelu_tanh_backward(dinp + begin, inp + begin, dout + begin, end - begin);
  });
}

// gelu_forward / gelu_backward of layers.hpp (the exact erf form, GPT-NeoX's "gelu"), over ranges in parallel.
template <class Real>
void gelu_erf_forward_parallel(Real* out, const Real* inp, Index n, int threads = 0) {
  // out (n), inp (n)
  parallel_ranges(n, 4096, 32, threads,
                  [&](Index begin, Index end) { gelu_forward(out + begin, inp + begin, end - begin); });
}

template <class Real>
void gelu_erf_backward_parallel(Real* dinp, const Real* inp, const Real* dout, Index n, int threads = 0) {
  // dinp (n), inp (n), dout (n)
  parallel_ranges(n, 4096, 40, threads,
                  [&](Index begin, Index end) { gelu_backward(dinp + begin, inp + begin, dout + begin, end - begin); });
}

// SwiGLU on rows of c_fc's output [gate | up] (each `inner` wide): out = silu(gate) * up, silu(x) = x / (1 + e^-x)
// (torch's silu).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void swiglu_rows(Real* out, const Real* fc, Index begin, Index end,
                                                                     Index inner) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* gate = fc + n * 2 * inner;
    const Real* up = gate + inner;
    Real* o = out + n * inner;
    for (Index i = 0; i < inner; ++i) o[i] = gate[i] / (Real(1) + std::exp(-gate[i])) * up[i];
  }
}

template <class Real>
void swiglu_forward(Real* out, const Real* fc, Index N, Index inner, int threads = 0) {
  // out (N, inner), fc (N, 2 inner)
  parallel_ranges(N, 16, 24 * inner, threads, [&](Index begin, Index end) { swiglu_rows(out, fc, begin, end, inner); });
}

// With s = sigmoid(gate): d gate = dout up s (1 + gate (1 - s)), d up = dout silu(gate).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void swiglu_backward_rows(Real* dfc, const Real* fc,
                                                                              const Real* dout, Index begin, Index end,
                                                                              Index inner) {
  LMINV_NO_FP_CONTRACT
  for (Index n = begin; n < end; ++n) {
    const Real* gate = fc + n * 2 * inner;
    const Real* up = gate + inner;
    const Real* dy = dout + n * inner;
    Real* dgate = dfc + n * 2 * inner;
    Real* dup = dgate + inner;
    for (Index i = 0; i < inner; ++i) {
      const Real x = gate[i];
      const Real s = Real(1) / (Real(1) + std::exp(-x));
      dgate[i] = dy[i] * up[i] * (s * (Real(1) + x * (Real(1) - s)));
      dup[i] = dy[i] * (x / (Real(1) + std::exp(-x)));
    }
  }
}

template <class Real>
void swiglu_backward(Real* dfc, const Real* fc, const Real* dout, Index N, Index inner, int threads = 0) {
  // dfc (N, 2 inner), fc (N, 2 inner), dout (N, inner)
  parallel_ranges(N, 16, 40 * inner, threads,
                  [&](Index begin, Index end) { swiglu_backward_rows(dfc, fc, dout, begin, end, inner); });
}

// ---- residual connection ------------------------------------------------------------------------------------------

// out = inp + branch, where branch was computed from inp.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void residual_forward(Real* out, const Real* inp, const Real* branch, Index n) {
  LMINV_NO_FP_CONTRACT
  // out (n), inp (n), branch (n)
  for (Index i = 0; i < n; ++i) out[i] = inp[i] + branch[i];
}

// inp reaches the output twice, directly and through the branch: dinp = dout + dbranch_inp, where dbranch_inp is the
// gradient that came back through the branch (whose own output gradient is dout, unchanged).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void residual_backward(Real* dinp, const Real* dout, const Real* dbranch_inp, Index n) {
  LMINV_NO_FP_CONTRACT
  // dinp (n), dout (n), dbranch_inp (n)
  for (Index i = 0; i < n; ++i) dinp[i] = dout[i] + dbranch_inp[i];
}

// ---- language-model head ------------------------------------------------------------------------------------------

// logits = inp @ W^T, W [V, C]: wte (tied head) or lm_head.weight (untied).
template <class Real>
void lm_head_forward(Real* logits, const Real* inp, const Real* W, Index N, Index C, Index V, int threads = 0) {
  // logits (N, V), inp (N, C), W (V, C)
  matvec_rows(logits, inp, W, static_cast<const Real*>(nullptr), N, C, V, threads);
}

// dinp = dlogits @ W.
template <class Real>
void lm_head_backward(Real* dinp, const Real* dlogits, const Real* W, Index N, Index C, Index V, int threads = 0) {
  // dinp (N, C), dlogits (N, V), W (V, C)
  vecmat_rows(dinp, dlogits, W, N, V, C, threads);
}

}  // namespace lminv::reference
