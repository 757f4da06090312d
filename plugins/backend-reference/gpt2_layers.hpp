// GPT-2's layers for the reference backend, as Hugging Face's GPT2Model computes them, in llm.c's style: one free
// function per layer in forward / backward pairs, templated on the scalar (double or float), arguments in the order
//   forward  (outputs, saved for the backward pass, inputs, parameters, sizes[, threads])
//   backward (input gradient, saved by the forward pass, output gradient, parameters, sizes[, threads])
// with shapes in comments: B items, T positions, C = n_embd channels, NH heads of hs = C / NH, V tokens, OC outputs.
// Backward functions give the input gradient only (inversion needs no weight gradient) and write it (=); the one
// place where two gradients meet, the residual connection, says so (residual_backward).
//
// Matrix products go through the kernels of layers.hpp. Hugging Face's Conv1D keeps its weight as [in, out] and
// computes y = x W + b, out[o] = sum_i x[i] W[i, o]: that is vecmat_rows (rows of W accumulated in order of i),
// and its input gradient dx[i] = <W[i, :], dy> is matvec_rows on the same layout. So the checkpoint's layout is used
// as it is, with no transposed copy. The tied lm_head is the other way round: logits = x wte^T (matvec_rows) and
// dx = dlogits wte (vecmat_rows).
//
// Determinism, as in layers.hpp: every output element is computed by the same operations in the same order whatever
// the batch size and the thread count (threads only split rows, heads or tiles), so a batch is bit-identical to its
// items run one by one, and position t's outputs never read anything at positions > t (the causal mask is a loop
// bound, not a -inf). No multiply and add is fused into an FMA (the project builds with -ffp-contract=off, and these
// functions say so themselves for builds that do not).
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

// h0 = x + wpe[0:T], with x = inp (token embeddings, wte == nullptr) or x = inp @ wte (vocabulary-space input).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void embedding_forward(Real* out, const Real* inp, const Real* wte, const Real* wpe, Index B,
                                                 Index T, Index C, Index V, int threads = 0) {
  LMINV_NO_FP_CONTRACT
  // out (B, T, C), inp (B, T, C) or (B, T, V), wte (V, C) or null, wpe (>= T, C)
  const Index N = B * T;
  if (wte) {
    vecmat_rows(out, inp, wte, N, V, C, threads);  // (B T, V) @ (V, C)
  } else {
    std::memcpy(out, inp, static_cast<std::size_t>(N * C) * sizeof(Real));
  }
  for (Index n = 0; n < N; ++n) {
    const Real* pos = wpe + (n % T) * C;
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

// torch.nn.LayerNorm over the last dimension: out = (x - mean) rstd weight + bias, rstd = 1 / sqrt(var + eps) with the
// biased variance. Saves mean and rstd per row for the backward pass.
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
    for (Index c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c] + bias[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

template <class Real>
void layernorm_forward(Real* out, Real* mean, Real* rstd, const Real* inp, const Real* weight, const Real* bias,
                       Index N, Index C, Real eps, int threads = 0) {
  // out (N, C), mean (N), rstd (N), inp (N, C), weight (C), bias (C)
  parallel_ranges(N, 16, 8 * C, threads, [&](Index begin, Index end) {
    layernorm_rows(out, mean, rstd, inp, weight, bias, begin, end, C, eps);
  });
}

// With xhat = (x - mean) rstd and g = dout weight: dx = rstd (g - mean(g) - xhat mean(g xhat)).
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

// ---- Conv1D (Hugging Face's linear layer, weight [in, out]) -------------------------------------------------------

// out = inp @ weight + bias.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR void conv1d_forward(Real* out, const Real* inp, const Real* weight, const Real* bias, Index N,
                                              Index C, Index OC, int threads = 0) {
  LMINV_NO_FP_CONTRACT
  // out (N, OC), inp (N, C), weight (C, OC), bias (OC)
  vecmat_rows(out, inp, weight, N, C, OC, threads);
  for (Index n = 0; n < N; ++n)
    for (Index o = 0; o < OC; ++o) out[n * OC + o] += bias[o];
}

// dinp = dout @ weight^T: dinp[n, c] = <weight[c, :], dout[n, :]>.
template <class Real>
void conv1d_backward(Real* dinp, const Real* dout, const Real* weight, Index N, Index C, Index OC, int threads = 0) {
  // dinp (N, C), dout (N, OC), weight (C, OC)
  matvec_rows(dinp, dout, weight, static_cast<const Real*>(nullptr), N, OC, C, threads);
}

// ---- causal self-attention ----------------------------------------------------------------------------------------

// qkv holds q, k and v side by side, each split into NH heads of hs channels (Hugging Face's split and _split_heads).
// For each item, head and position t: scores s[t2] = <q_t, k_t2> / sqrt(hs) for t2 <= t (the causal mask), att =
// softmax(s) (saved, with zeros above the diagonal), out_t = sum_t2 att[t2] v_t2, heads merged back into C channels.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_forward(Real* out, Real* att, const Real* qkv,
                                                                                Index T, Index C, Index hs) {
  LMINV_NO_FP_CONTRACT
  // out: this head's columns of (T, C), att (T, T), qkv: this head's columns of (T, 3C)
  const Real sqrt_hs = std::sqrt(Real(hs));
  for (Index t = 0; t < T; ++t) {
    const Real* q = qkv + t * 3 * C;
    Real* a = att + t * T;
    Real max_score = -std::numeric_limits<Real>::infinity();
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* k = qkv + t2 * 3 * C + C;
      Real dot = 0;
      for (Index i = 0; i < hs; ++i) dot += q[i] * k[i];
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
    Real* o = out + t * C;
    for (Index i = 0; i < hs; ++i) o[i] = 0;
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* v = qkv + t2 * 3 * C + 2 * C;
      for (Index i = 0; i < hs; ++i) o[i] += a[t2] * v[i];
    }
  }
}

template <class Real>
void attention_forward(Real* out, Real* att, const Real* qkv, Index B, Index T, Index C, Index NH, int threads = 0) {
  // out (B, T, C), att (B, NH, T, T), qkv (B, T, 3C)
  const Index hs = C / NH;
  parallel_ranges(B * NH, 1, T * T * hs, threads, [&](Index begin, Index end) {
    for (Index bh = begin; bh < end; ++bh) {
      const Index b = bh / NH, h = bh % NH;
      attention_head_forward(out + b * T * C + h * hs, att + bh * T * T, qkv + b * T * 3 * C + h * hs, T, C, hs);
    }
  });
}

// The same attention for B new tokens at position t, each against a kept prefix: token b's scores are its query
// against the prefix keys k_cache[0 .. t-1] and then against its own key, in that order, so that its output has the
// bits attention_head_forward gives position t of the whole sequence (same operations, same order).
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_next(Real* out, Real* scores, const Real* qkv,
                                                                             const Real* k_cache, const Real* v_cache,
                                                                             Index t, Index C, Index hs) {
  LMINV_NO_FP_CONTRACT
  // out: this head's columns of (C), scores (t + 1), qkv: this head's columns of one token's (3C),
  // k_cache, v_cache: this head's columns of (t, C)
  const Real sqrt_hs = std::sqrt(Real(hs));
  const Real* q = qkv;
  auto key = [&](Index t2) { return t2 < t ? k_cache + t2 * C : qkv + C; };
  auto value = [&](Index t2) { return t2 < t ? v_cache + t2 * C : qkv + 2 * C; };
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

template <class Real>
void attention_next(Real* out, const Real* qkv, const Real* k_cache, const Real* v_cache, Index B, Index t, Index C,
                    Index NH, int threads = 0) {
  // out (B, C), qkv (B, 3C), k_cache (t, C), v_cache (t, C)
  const Index hs = C / NH;
  parallel_ranges(B * NH, 1, (t + 1) * hs, threads, [&](Index begin, Index end) {
    std::vector<Real> scores(static_cast<std::size_t>(t + 1));
    for (Index bh = begin; bh < end; ++bh) {
      const Index b = bh / NH, h = bh % NH;
      attention_head_next(out + b * C + h * hs, scores.data(), qkv + b * 3 * C + h * hs, k_cache + h * hs,
                          v_cache + h * hs, t, C, hs);
    }
  });
}

// The softmax's backward d s[t2] = att[t2] (datt[t2] - sum_j att[j] datt[j]), then through the scaled dot products.
// One head's gradients are gathered over all positions by one thread, in a fixed order.
template <class Real>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void attention_head_backward(Real* dqkv, const Real* qkv,
                                                                                 const Real* att, const Real* dout,
                                                                                 Index T, Index C, Index hs) {
  LMINV_NO_FP_CONTRACT
  // dqkv, qkv: this head's columns of (T, 3C), att (T, T), dout: this head's columns of (T, C)
  const Real sqrt_hs = std::sqrt(Real(hs));
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < 3 * C; i += C)
      for (Index j = 0; j < hs; ++j) dqkv[t * 3 * C + i + j] = 0;
  std::vector<Real> datt(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    const Real* a = att + t * T;
    const Real* dy = dout + t * C;
    const Real* q = qkv + t * 3 * C;
    Real* dq = dqkv + t * 3 * C;
    Real weighted = 0;  // sum_t2 att[t2] datt[t2]
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real* v = qkv + t2 * 3 * C + 2 * C;
      Real* dv = dqkv + t2 * 3 * C + 2 * C;
      Real dot = 0;
      for (Index i = 0; i < hs; ++i) {
        dot += dy[i] * v[i];
        dv[i] += a[t2] * dy[i];
      }
      datt[t2] = dot;
      weighted += a[t2] * dot;
    }
    for (Index t2 = 0; t2 <= t; ++t2) {
      const Real dscore = a[t2] * (datt[t2] - weighted) / sqrt_hs;
      const Real* k = qkv + t2 * 3 * C + C;
      Real* dk = dqkv + t2 * 3 * C + C;
      for (Index i = 0; i < hs; ++i) {
        dq[i] += dscore * k[i];
        dk[i] += dscore * q[i];
      }
    }
  }
}

template <class Real>
void attention_backward(Real* dqkv, const Real* qkv, const Real* att, const Real* dout, Index B, Index T, Index C,
                        Index NH, int threads = 0) {
  // dqkv (B, T, 3C), qkv (B, T, 3C), att (B, NH, T, T), dout (B, T, C)
  const Index hs = C / NH;
  parallel_ranges(B * NH, 1, 2 * T * T * hs, threads, [&](Index begin, Index end) {
    for (Index bh = begin; bh < end; ++bh) {
      const Index b = bh / NH, h = bh % NH;
      attention_head_backward(dqkv + b * T * 3 * C + h * hs, qkv + b * T * 3 * C + h * hs, att + bh * T * T,
                              dout + b * T * C + h * hs, T, C, hs);
    }
  });
}

// ---- GELU, tanh form ("gelu_new") ---------------------------------------------------------------------------------

// gelu_tanh_forward / gelu_tanh_backward of layers.hpp, over ranges in parallel.
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

// ---- tied language-model head -------------------------------------------------------------------------------------

// logits = inp @ wte^T.
template <class Real>
void lm_head_forward(Real* logits, const Real* inp, const Real* wte, Index N, Index C, Index V, int threads = 0) {
  // logits (N, V), inp (N, C), wte (V, C)
  matvec_rows(logits, inp, wte, static_cast<const Real*>(nullptr), N, C, V, threads);
}

// dinp = dlogits @ wte.
template <class Real>
void lm_head_backward(Real* dinp, const Real* dlogits, const Real* wte, Index N, Index C, Index V, int threads = 0) {
  // dinp (N, C), dlogits (N, V), wte (V, C)
  vecmat_rows(dinp, dlogits, wte, N, V, C, threads);
}

}  // namespace lminv::reference
