// The decoder on oneDNN (ModelKind::decoder: GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, ... as settings of spec.arch,
// lminv/architecture.hpp), truncated to its first k blocks, f32, forward and input gradient: the same model as the
// reference backend's decoder_model.cpp.
//
//   h_0    = x (+ wpe[0:T] for learned positions),  x = input (input = embedding, [B, T, d]) or input @ wte
//            (input = vocab, [B, T, V])
//   block l, with n_1 = ln_1, n_2 = ln_2 (layer norm with or without bias, or RMS norm):
//     a_l    = h_l + attn.c_proj(attention(rotate(attn.c_attn(n_1(h_l)))))     rotate: rotary positions only
//     h_l+1  = a_l + mlp.c_proj(act(mlp.c_fc(n_2(a_l))))                        sequential residual
//     h_l+1  = a_l + mlp.c_proj(act(mlp.c_fc(n_2(h_l))))                        parallel residual (n_2 reads h_l)
//   output = [ main(h_k) | h_layers[0] | h_layers[1] | ... ] along the last dimension, [B, T, D_main + d len(layers)]
//   main   = h_k (head none), ln_f(h_k) (head ln_f), ln_f(h_k) @ W^T (head lm_head; W = wte when tied, else
//            lm_head.weight) or h_k @ W^T (head lm_head_no_ln_f)
// with k = spec.blocks and L = spec.blocks_run() the blocks actually run. T is the input's (1 .. n_positions).
//
// What runs where. Matrix products are oneDNN matmuls; the element-wise parts oneDNN 2.6 has no primitive for, or
// whose primitive would need extra copies here, are loops written below; GELU and the softmax are oneDNN's.
//   int8 weights    (weight_dtype = int8) the integers and scales of WeightStore::int8_matrix: few rows through the
//                   int8 streaming kernels, more through a matmul on the weight dequantised into the model's scratch
//                   just before (Step::prepare); no f32 copy of a block weight is kept
//   linear layers   matmul on the stored [in, out] weight (or a blocked copy made once, see WeightStore), bias fused
//                   where the architecture has one; the residual adds are fused into attn.c_proj and mlp.c_proj as a
//                   binary-add post-op. Input gradients: a matmul on the same weight read as [out, in].
//   norms           loops (layer_norm with or without bias, rms_norm): the row statistics in double, kept for the
//                   backward pass, whose loop also adds the residual stream's gradient.
//   rotary          a loop rotating q and k in place in the qkv buffer, HF's rotate_half layout, cos/sin computed
//                   once per model in double for every position; the backward loop rotates dq, dk back.
//   attention       with one query head per kv head (n_kv_head = n_head), q, k, v are strided 4-D views into the qkv
//                   buffer and the heads' outputs are written straight into their columns (no copies), as before;
//                   with grouped kv heads (G = n_head / n_kv_head > 1), q, k and v are first copied head-major, so the
//                   G query heads of one kv head are one [G T, hd] matrix against that head's [T, hd] keys and values
//                   (the key and value gradients then sum over the group inside the matmul: dK = dS^T Q with dS^T
//                   read as [T, G T]). scores = matmul(q, k^T) with output scale 1/sqrt(head_dim) and the causal mask
//                   added by a binary post-op (a [B, n_head, T, T] tensor: 0 on and below the diagonal, -1e30 above,
//                   so the softmax gives exact zeros there); softmax_forward over the last axis; y = matmul(att, v).
//   activations     gelu_tanh, gelu_erf: eltwise_forward / _backward; swiglu silu(gate) * up: a loop.
//   embedding, head copies and adds in loops; vocab input: matmul with wte (+ wpe as a post-op); lm_head: matmul.
//
// Plans: one per input shape (B, T), built on first use and kept (least recently used dropped beyond kMaxPlans or
// kPlanBytes): the primitives (oneDNN's depend on the shapes; one of each kind, shared by all blocks), the buffers of
// the activations, and the steps. The weights and their blocked copies are made once, in the constructor.
//
// The prefix cache (capability "prefix_cache", class Cache): each block's keys and values of the prefix, and the
// candidates run as N single positions through the same layers, on copies of the four block weights with padded rows
// (WeightStore::padded: oneDNN's gemm reads GPT-2's [768, 3072] at half speed for few rows otherwise), GELU fused into
// mlp.c_fc as a post-op; the attention over the kept positions is two matmuls per block, batched over the kv heads.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lminv/prefix_cache.hpp"
#include "matmul_probe.hpp"
#include "skinny_matmul.hpp"
#include "onednn_backend.hpp"
#include "onednn_common.hpp"

namespace lminv::onednn {

namespace {

// ---- loops --------------------------------------------------------------------------------------------------------
// Each runs over N rows, split over the calling thread's OpenMP team when `parallel` (see Step::single).

template <class F>
void for_rows(Index N, bool parallel, const F& f) {
#pragma omp parallel for schedule(static) if (parallel)
  for (Index n = 0; n < N; ++n) f(n);
}

inline float* ptr(const memory& m) {
  return static_cast<float*>(m.get_data_handle());
}

// The sum of f(i) for i in [0, n) in double, over 8 independent lanes: the compiler may vectorise it and the adds do
// not wait on one another (one running sum would be latency-bound); the order is fixed, so results are reproducible.
template <class F>
double lane_sum(Index n, const F& f) {
  double acc[8] = {};
  Index i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += f(i + j);
  double s = 0;
  for (; i < n; ++i) s += f(i);
  for (double a : acc) s += a;
  return s;
}

// A norm's parameters: scale w, bias b (null: none), over rows of d values.
struct NormParams {
  Norm kind = Norm::layer_norm;
  const float* w = nullptr;
  const float* b = nullptr;
  double eps = 1e-5;
  Index d = 0;
};

// y = n(x) row by row, keeping each row's mean (layer_norm; 0 for rms_norm) and 1 / sqrt(variance + eps) (rms_norm:
// of the mean square). The statistics are summed in double.
void norm_forward(const NormParams& p, const float* x, float* y, float* mean, float* rstd, Index N, bool parallel) {
  const Index d = p.d;
  const bool centred = p.kind == Norm::layer_norm;
  for_rows(N, parallel, [&](Index n) {
    const float* xr = x + n * d;
    float* yr = y + n * d;
    const double m = centred ? lane_sum(d, [&](Index i) { return static_cast<double>(xr[i]); }) / d : 0.0;
    const double v = lane_sum(d,
                              [&](Index i) {
                                const double c = xr[i] - m;
                                return c * c;
                              }) /
                     d;
    const float mf = static_cast<float>(m), rf = static_cast<float>(1.0 / std::sqrt(v + p.eps));
    mean[n] = mf;
    rstd[n] = rf;
    if (p.b)
      for (Index i = 0; i < d; ++i) yr[i] = (xr[i] - mf) * rf * p.w[i] + p.b[i];
    else
      for (Index i = 0; i < d; ++i) yr[i] = (xr[i] - mf) * rf * p.w[i];
  });
}

// dx = add + the gradient through n of dy, from the statistics the forward pass kept (add null: nothing added).
//   layer_norm: dx = rstd (g - mean(g) - xhat mean(g xhat)),  rms_norm: dx = rstd (g - xhat mean(g xhat)),
//   g = dy w, xhat = (x - mean) rstd.
void norm_backward(const NormParams& p, const float* x, const float* mean, const float* rstd, const float* dy,
                   const float* add, float* dx, Index N, bool parallel) {
  const Index d = p.d;
  const bool centred = p.kind == Norm::layer_norm;
  for_rows(N, parallel, [&](Index n) {
    const float* xr = x + n * d;
    const float* dyr = dy + n * d;
    float* dxr = dx + n * d;
    const float mf = mean[n], rf = rstd[n];
    const double sg = centred ? lane_sum(d, [&](Index i) { return static_cast<double>(dyr[i] * p.w[i]); }) : 0.0;
    const double sgx = lane_sum(d, [&](Index i) { return static_cast<double>(dyr[i] * p.w[i]) * ((xr[i] - mf) * rf); });
    const float mg = centred ? static_cast<float>(sg / static_cast<double>(d)) : 0.0f;
    const float mgx = static_cast<float>(sgx / static_cast<double>(d));
    if (add) {
      const float* ar = add + n * d;
      for (Index i = 0; i < d; ++i) dxr[i] = ar[i] + rf * (dyr[i] * p.w[i] - mg - (xr[i] - mf) * rf * mgx);
    } else {
      for (Index i = 0; i < d; ++i) dxr[i] = rf * (dyr[i] * p.w[i] - mg - (xr[i] - mf) * rf * mgx);
    }
  });
}

// Rotary positions in place: in each row n (position n % T) of a buffer with rows `stride` apart, the first r
// features of each of `heads` heads of hd features from column col0 on. Forward: out[i] = x[i] cos - x[i + r/2] sin,
// out[i + r/2] = x[i + r/2] cos + x[i] sin; inverse (for gradients): the transpose, a rotation by the opposite angle.
struct Rotary {
  const float* cos = nullptr;  // [n_positions, r / 2]
  const float* sin = nullptr;
  Index r = 0;
};
void rotate(const Rotary& rot, float* base, Index N, Index T, Index stride, Index col0, Index heads, Index hd,
            bool inverse, bool parallel) {
  const Index half = rot.r / 2;
  for_rows(N, parallel, [&](Index n) {
    const float* c = rot.cos + (n % T) * half;
    const float* s = rot.sin + (n % T) * half;
    for (Index h = 0; h < heads; ++h) {
      float* x = base + n * stride + col0 + h * hd;
      if (!inverse) {
        for (Index i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i] + a * s[i];
        }
      } else {
        for (Index i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] + b * s[i];
          x[i + half] = b * c[i] - a * s[i];
        }
      }
    }
  });
}

// Head-major copies: hm[b, h, t, :] = rows[b T + t, col0 + h hd ...] for `heads` heads (gather), or back (scatter).
void gather_heads(const float* rows, Index stride, Index col0, Index heads, Index hd, Index B, Index T, float* hm,
                  bool parallel) {
  for_rows(B * T, parallel, [&](Index n) {
    const Index b = n / T, t = n % T;
    for (Index h = 0; h < heads; ++h)
      std::memcpy(hm + ((b * heads + h) * T + t) * hd, rows + n * stride + col0 + h * hd,
                  static_cast<std::size_t>(hd) * sizeof(float));
  });
}
void scatter_heads(const float* hm, Index heads, Index hd, Index B, Index T, float* rows, Index stride, Index col0,
                   bool parallel) {
  for_rows(B * T, parallel, [&](Index n) {
    const Index b = n / T, t = n % T;
    for (Index h = 0; h < heads; ++h)
      std::memcpy(rows + n * stride + col0 + h * hd, hm + ((b * heads + h) * T + t) * hd,
                  static_cast<std::size_t>(hd) * sizeof(float));
  });
}

// swiglu on c_fc's output [N, 2 I] = [gate | up]: act = silu(gate) up, silu(g) = g sigmoid(g).
void swiglu_forward(const float* fc, float* act, Index N, Index I, bool parallel) {
  for_rows(N, parallel, [&](Index n) {
    const float* g = fc + n * 2 * I;
    const float* u = g + I;
    float* a = act + n * I;
    for (Index i = 0; i < I; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}
// d gate = dact up silu'(gate), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g);  d up = dact silu(gate).
void swiglu_backward(const float* fc, const float* dact, float* dfc, Index N, Index I, bool parallel) {
  for_rows(N, parallel, [&](Index n) {
    const float* g = fc + n * 2 * I;
    const float* u = g + I;
    const float* da = dact + n * I;
    float* dg = dfc + n * 2 * I;
    float* du = dg + I;
    for (Index i = 0; i < I; ++i) {
      const float s = 1.0f / (1.0f + std::exp(-g[i]));
      dg[i] = da[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
      du[i] = da[i] * (g[i] * s);
    }
  });
}

// out = a + b over N rows of d (b null: a copy); out may be a.
void add_rows(const float* a, const float* b, float* out, Index N, Index d, bool parallel) {
  for_rows(N, parallel, [&](Index n) {
    if (!b) {
      if (out != a) std::memcpy(out + n * d, a + n * d, static_cast<std::size_t>(d) * sizeof(float));
      return;
    }
    for (Index i = n * d; i < (n + 1) * d; ++i) out[i] = a[i] + b[i];
  });
}

// ---- the model ----------------------------------------------------------------------------------------------------

// A block's weights: the norms' parameters as pointers, the matrices (and their transposed use for the input
// gradient), the biases as oneDNN memory (empty where the architecture has none).
struct BlockWeights {
  NormParams ln_1, ln_2;
  Matrix c_attn, c_attn_t, a_proj, a_proj_t, c_fc, c_fc_t, m_proj, m_proj_t;
  memory c_attn_b, a_proj_b, c_fc_b, m_proj_b;
  Matrix c_attn_p, a_proj_p, c_fc_p, m_proj_p;  // WeightStore::padded copies, made for the prefix cache
};

class DecoderModel final : public Model {
 public:
  DecoderModel(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads)
      : spec_(spec), store_(std::move(store)) {
    ctx_.threads = threads;
    const Architecture& a = spec.arch;
    d_ = spec.n_embd;
    nh_ = spec.n_head;
    nkv_ = spec.kv_heads();
    G_ = nh_ / nkv_;
    hd_ = spec.head_size();
    qw_ = nh_ * hd_;
    kvw_ = nkv_ * hd_;
    W_ = qw_ + 2 * kvw_;
    inner_ = spec.inner();
    fcw_ = a.mlp == Mlp::swiglu ? 2 * inner_ : inner_;
    V_ = spec.vocab_size;
    P_ = spec.n_positions;
    k_ = spec.blocks;
    L_ = spec.blocks_run();
    main_width_ = head_has_lm_head(spec.head) ? V_ : d_;
    out_width_ = main_width_ + d_ * static_cast<Index>(spec.layers.size());

    // The row count oneDNN chooses weight layouts for, the same for every model so that their copies are shared (on
    // the CPUs seen, brgemm's blocked layout is the same for any row count; where a shape's kernel does not take it,
    // the plan uses the stored bytes, see weight_matmul).
    const Index m = 8;
    if (spec.input == InputSpace::vocab) {
      wte_ = store_->matrix("wte.weight", {V_, d_}, false, m);   // x = v @ wte
      wte_t_ = store_->matrix("wte.weight", {V_, d_}, true, m);  // dv = dx @ wte^T
    }
    if (head_has_lm_head(spec.head)) {
      const std::string head = a.tied_head ? "wte.weight" : "lm_head.weight";
      head_t_ = store_->matrix(head, {V_, d_}, true, m);  // logits = x @ W^T
      head_ = store_->matrix(head, {V_, d_}, false, m);   // dx = dlogits @ W
    }
    if (a.positions == Positions::learned) {
      wpe_ = store_->data("wpe.weight", {P_, d_});
    } else if (a.positions == Positions::rotary) {
      rot_.r = spec.rotary_dim();
      const Index half = rot_.r / 2;
      cos_.assign(static_cast<std::size_t>(P_ * half), 0.0f);
      sin_.assign(static_cast<std::size_t>(P_ * half), 0.0f);
      for (Index i = 0; i < half; ++i) {
        const double inv_freq = std::pow(a.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(rot_.r));
        for (Index t = 0; t < P_; ++t) {
          const double angle = static_cast<double>(t) * inv_freq;
          cos_[t * half + i] = static_cast<float>(std::cos(angle));
          sin_[t * half + i] = static_cast<float>(std::sin(angle));
        }
      }
      rot_.cos = cos_.data();
      rot_.sin = sin_.data();
    }
    // An int8 model's four block weights are dequantised, one at a time, into scratch_ before each product.
    const bool int8 = spec.weight_dtype == WeightDType::int8;
    if (int8 && L_ > 0) scratch_ = Buffer(std::max({d_ * W_, qw_ * d_, d_ * fcw_, inner_ * d_}));
    auto pair = [&](const std::string& name, const Shape& stored, Matrix& plain, Matrix& transposed) {
      if (int8) {
        plain = store_->int8_matrix(name, stored, false, scratch_.data());
        transposed = store_->int8_matrix(name, stored, true, scratch_.data());
      } else {
        plain = store_->matrix(name, stored, false, m);
        transposed = store_->matrix(name, stored, true, m);
      }
    };
    for (Index l = 0; l < L_; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      BlockWeights w;
      w.ln_1 = norm(h + "ln_1");
      w.ln_2 = norm(h + "ln_2");
      pair(h + "attn.c_attn.weight", {d_, W_}, w.c_attn, w.c_attn_t);
      if (a.qkv_bias) w.c_attn_b = store_->vector(h + "attn.c_attn.bias", W_, {1, W_});
      pair(h + "attn.c_proj.weight", {qw_, d_}, w.a_proj, w.a_proj_t);
      if (a.attn_out_bias) w.a_proj_b = store_->vector(h + "attn.c_proj.bias", d_, {1, d_});
      pair(h + "mlp.c_fc.weight", {d_, fcw_}, w.c_fc, w.c_fc_t);
      pair(h + "mlp.c_proj.weight", {inner_, d_}, w.m_proj, w.m_proj_t);
      if (a.mlp_bias) {
        w.c_fc_b = store_->vector(h + "mlp.c_fc.bias", fcw_, {1, fcw_});
        w.m_proj_b = store_->vector(h + "mlp.c_proj.bias", d_, {1, d_});
      }
      blocks_.push_back(w);
    }
    if (head_has_ln_f(spec.head)) ln_f_ = norm("ln_f");
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the forward pass", [&] {
      check_input(input);
      const Index T = input.dim(1);
      if (input.dim(0) == 0) return Tensor(DType::f32, {0, T, out_width_});
      Plan& p = prepare(input);
      Tensor output(DType::f32, {p.B, T, out_width_});
      run_forward(p, input, output.data<float>());
      saved_input_ = input;
      return output;
    });
  }

  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the backward pass", [&] {
      check_input(input);
      const Index B = input.dim(0), T = input.dim(1);
      const Shape expected{B, T, out_width_};
      if (grad_output.shape() != expected)
        throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                    shape_string(expected) + " (the output's shape for this input)");
      if (B == 0) return Tensor(input.dtype(), input.shape());
      Plan* p = saved_plan_;
      if (!p || !same_input(input)) {  // usually the forward pass on this input has just run
        p = &prepare(input);
        run_forward(*p, input, ensure(p->output, p->N * out_width_));
        saved_input_ = input;
      }
      Tensor converted;
      if (grad_output.dtype() != DType::f32) converted = grad_output.to(DType::f32);
      return run_backward(*p, grad_output.dtype() == DType::f32 ? grad_output.data<float>() : converted.data<float>(),
                          input.dtype());
    });
  }

  // One forward pass keeping the activations, the metric on its output, one backward pass.
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    ThreadScope scope(ctx_.threads);
    return guarded("computing loss_and_grad", [&] {
      check_input(input);
      const Index B = input.dim(0), T = input.dim(1);
      const Shape shape{B, T, out_width_};
      const bool trailing_equal = target.rank() == 3 && target.dim(1) == T && target.dim(2) == out_width_;
      if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != B))
        throw Error("loss: target " + shape_string(target.shape()) + " does not match output " + shape_string(shape));
      if (B == 0) return LossAndGrad{{}, Tensor(input.dtype(), input.shape())};
      Plan& p = prepare(input);
      run_forward(p, input, ensure(p.output, p.N * out_width_));
      ensure(p.grad_out, p.N * out_width_);
      std::vector<double> loss =
          metric_and_grad_f32(p.output.data(), p.B, T * out_width_, target, metric, p.grad_out.data(), ctx_.threads);
      return LossAndGrad{std::move(loss), run_backward(p, p.grad_out.data(), input.dtype())};
    });
  }

  // "prefix_cache" (class Cache below), made on the first request.
  void* capability(std::string_view name) override {
    if (name == kMatmulProbe) {
      if (!probe_) probe_ = std::make_unique<OnednnMatmulProbe>(ctx_.threads);
      return static_cast<MatmulProbe*>(probe_.get());
    }
    if (name != kPrefixCache) return nullptr;
    if (!cache_) cache_ = std::make_unique<Cache>(*this);
    return static_cast<PrefixCache*>(cache_.get());
  }

 private:
  // Everything one input shape (B, T) needs: buffers, the primitives and their arguments, as steps.
  struct Plan {
    Index B = 0, T = 0, N = 0;
    std::vector<Buffer> h;  // the residual stream h_0 .. h_L
    struct Saved {          // what block l's backward pass reads
      Buffer n1_mean, n1_rstd, qkv, q, k, v, att, a, n2_mean, n2_rstd, fc;
    };
    std::vector<Saved> saved;
    Buffer qkv, wpe, mask, ln_out, y, yh, fc_act, lnf_mean, lnf_rstd, lnf_out;
    Buffer main, output, grad_out;  // main: the head's output when layers is not empty; output, grad_out: for loss
    Buffer dh[2], dmain, dlnf, dhk, dfc_act, dfc, dln, da, dy, dyh, datt, dscores, dqkv, dq, dk, dv;
    std::vector<Buffer> dextra;
    memory in, out_main, grad_main, grad_in;  // bound at every call (out_main, grad_main when layers is empty)
    std::vector<Step> forward, backward;
    std::uint64_t used = 0;
    Index floats = 0;  // in the buffers above
  };

  NormParams norm(const std::string& name) {
    const Architecture& a = spec_.arch;
    NormParams p;
    p.kind = a.norm;
    p.d = d_;
    p.eps = a.norm_eps;
    p.w = store_->data(name + ".weight", {d_});
    if (a.norm == Norm::layer_norm && a.norm_bias) p.b = store_->data(name + ".bias", {d_});
    return p;
  }

  Index width() const { return spec_.input == InputSpace::embedding ? d_ : V_; }

  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) < 1 || input.dim(1) > P_ || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, T, " +
                  std::to_string(width()) + "] with T in 1 .. n_positions = " + std::to_string(P_) +
                  " (decoder, input = " + input_space_name(spec_.input) + ")");
  }

  bool same_input(const Tensor& input) const {
    return input.dtype() == saved_input_.dtype() && input.shape() == saved_input_.shape() &&
           std::memcmp(input.raw(), saved_input_.raw(), input.nbytes()) == 0;
  }

  // The plan for the input's shape (built on first use), with the saved activations invalidated.
  Plan& prepare(const Tensor& input) {
    saved_input_ = Tensor();
    saved_plan_ = nullptr;
    const std::pair<Index, Index> key{input.dim(0), input.dim(1)};
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      while (plans_.size() >= kMaxPlans) forget_oldest(plans_.end());
      it = plans_.emplace(key, build(key.first, key.second)).first;
      // Large plans: keep the buffers of all plans within kPlanBytes, the new one whatever its size.
      while (plans_.size() > 1 && floats_held() * static_cast<Index>(sizeof(float)) > kPlanBytes) forget_oldest(it);
    }
    it->second->used = ++clock_;
    return *it->second;
  }
  Index floats_held() const {
    Index n = 0;
    for (const auto& [key, plan] : plans_) n += plan->floats;
    return n;
  }
  // Drops the least recently used plan other than `keep`.
  void forget_oldest(std::map<std::pair<Index, Index>, std::unique_ptr<Plan>>::iterator keep) {
    auto oldest = plans_.end();
    for (auto i = plans_.begin(); i != plans_.end(); ++i)
      if (i != keep && (oldest == plans_.end() || i->second->used < oldest->second->used)) oldest = i;
    if (oldest != plans_.end()) plans_.erase(oldest);
  }

  // ---- building a plan --------------------------------------------------------------------------------------------

  // A matmul of the blocks' copies of one weight (`which`, with its bias when the architecture has one) for a source
  // of `src`'s shape: every block's copy must have the layout of block 0's, so that one primitive serves them all.
  WeightMatmul block_matmul(const std::string& what, const memory::desc& src, Matrix BlockWeights::*which,
                            const memory BlockWeights::*bias, const memory::desc& dst,
                            const dnnl::primitive_attr& attr = dnnl::primitive_attr()) const {
    const BlockWeights& w0 = blocks_.front();
    const memory::desc b = bias && w0.*bias ? (w0.*bias).get_desc() : memory::desc();
    WeightMatmul mm = weight_matmul(what, ctx_, src, w0.*which, bias && w0.*bias ? &b : nullptr, dst, attr);
    for (const BlockWeights& w : blocks_)
      if (mm.pick(w.*which).get_desc() != mm.pick(w0.*which).get_desc())
        throw Error(std::string(kWho) + ": the blocks' " + what + " weights differ in layout");
    return mm;
  }

  // The step running `mm` on one block's weight `w`: dst = src @ w (+ bias) (+ *added).
  static Step block_step(const WeightMatmul& mm, const memory& src, const Matrix& w, const memory& bias,
                         const memory& dst, const memory* added = nullptr) {
    Step s{mm.primitive, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, mm.pick(w)}, {DNNL_ARG_DST, dst}}};
    if (bias) s.args[DNNL_ARG_BIAS] = bias;
    if (added) s.args[kPostOpSrc1] = *added;
    return reading(w, std::move(s));
  }

  // `s`, a step that reads weight w, preceded by w's dequantisation when it is int8.
  static Step reading(const Matrix& w, Step s) {
    if (w.q) s.prepare = [w] { w.dequantise(); };
    return s;
  }

  // The step of dst = src @ w (+ bias) (+ *added) for a plan's forward or backward pass: with few source rows
  // (up to 8, skinny_step) the streaming kernels of plugins/common/skinny_matmul.hpp on w's stored bytes, which read
  // the weight once where oneDNN's gemm-based matmul packs it first (at 5 rows it read GPT-2's weights at a third to
  // half of the machine's bandwidth: bench/RESULTS.md); otherwise, or for layouts the kernels do not take, `mm`.
  static Step matmul_step(const WeightMatmul& mm, const memory& src, const Matrix& w, const memory& bias,
                          const memory& dst, const memory* added = nullptr) {
    if (std::optional<Step> s = skinny_step(src, w, bias, dst, added)) return std::move(*s);
    return block_step(mm, src, w, bias, dst, added);
  }

  // The streaming kernels' step for dst = src @ w (+ bias) (+ *added) on w's stored bytes, when the source has at
  // most 8 rows and every operand is a plain row-major matrix they take; otherwise nothing.
  static std::optional<Step> skinny_step(const memory& src, const Matrix& w, const memory& bias, const memory& dst,
                                         const memory* added = nullptr) {
    const memory::desc smd = src.get_desc(), wmd = w.stored.get_desc(), dmd = dst.get_desc();
    const auto &sd = smd.data, &wd = wmd.data, &dd = dmd.data;
    const bool plain2 = sd.ndims == 2 && wd.ndims == 2 && dd.ndims == 2 && is_plain_layout(smd) &&
                        is_plain_layout(wmd) && is_plain_layout(dmd);
    // oneDNN's own matmul (on prepacked or padded weights) catches up with the kernels at about 12 rows and is
    // faster at 16 (bench/RESULTS.md): up to 8 rows here.
    constexpr Index kRows = std::min<Index>(8, kernels::kSkinnyRows);
    if (!plain2 || sd.dims[0] > kRows) return std::nullopt;
    const Index M = sd.dims[0], K = sd.dims[1], N = wd.dims[1];
    const auto* ss = sd.format_desc.blocking.strides;
    const auto* ws = wd.format_desc.blocking.strides;
    const auto* ds = dd.format_desc.blocking.strides;
    const bool rows_plain = ss[0] == K && ss[1] == 1 && ds[0] == N && ds[1] == 1;
    const bool w_rows = ws[0] == N && ws[1] == 1;  // stored [K, N]: y = x W
    const bool w_cols = ws[0] == 1 && ws[1] == K;  // stored [N, K], the transpose: y = x (W^T)^T
    bool added_plain = true;
    if (added) {
      const memory::desc amd = added->get_desc();
      added_plain = is_plain_layout(amd) && amd.data.ndims == 2 && amd.data.format_desc.blocking.strides[0] == N &&
                    amd.data.format_desc.blocking.strides[1] == 1 &&
                    added->get_data_handle() != dst.get_data_handle();  // the kernels overwrite dst first
    }
    if (!rows_plain || !(w_rows || w_cols) || !added_plain) return std::nullopt;
    const memory x = src, weight = w.stored, b = bias, y = dst, add = added ? *added : memory();
    if (w.q) {  // an int8 weight: the int8 kernels dequantise in registers, nothing goes through the scratch
      const std::shared_ptr<const int8::Matrix> q = w.q;
      const std::shared_ptr<const std::vector<float>> scales = w.scales;
      return Step(
          [=] {
            const auto* xp = static_cast<const float*>(x.get_data_handle());
            const auto* bp = b ? static_cast<const float*>(b.get_data_handle()) : nullptr;
            auto* yp = static_cast<float*>(y.get_data_handle());
            if (w_rows)
              kernels::times_int8(yp, xp, q->q.data(), scales->data(), bp, M, K, N, 0);
            else
              kernels::times_transposed_int8(yp, xp, q->q.data(), scales->data(), bp, M, N, K, 0);
            if (add) {
              const auto* ap = static_cast<const float*>(add.get_data_handle());
              for (Index i = 0; i < M * N; ++i) yp[i] += ap[i];
            }
          },
          /*one_thread=*/false);
    }
    return reading(w, Step(
        [=] {
          const auto* xp = static_cast<const float*>(x.get_data_handle());
          const auto* wp = static_cast<const float*>(weight.get_data_handle());
          const auto* bp = b ? static_cast<const float*>(b.get_data_handle()) : nullptr;
          auto* yp = static_cast<float*>(y.get_data_handle());
          if (w_rows)
            kernels::times(yp, xp, wp, bp, M, K, N, 0);
          else
            kernels::times_transposed(yp, xp, wp, bp, M, N, K, 0);
          if (add) {  // the residual: the matmul's post-op sum
            const auto* ap = static_cast<const float*>(add.get_data_handle());
            for (Index i = 0; i < M * N; ++i) yp[i] += ap[i];
          }
        },
        /*one_thread=*/false));
  }

  std::unique_ptr<Plan> build(Index B, Index T) {
    auto plan = std::make_unique<Plan>();
    Plan& p = *plan;
    const Architecture& arch = spec_.arch;
    const Index N = B * T, d = d_, nh = nh_, nkv = nkv_, G = G_, hd = hd_, qw = qw_, kvw = kvw_, W = W_;
    const Index S = G * T;  // query rows per kv head
    const bool grouped = G > 1, rotary = arch.positions == Positions::rotary, swiglu = arch.mlp == Mlp::swiglu;
    const bool sequential = arch.residual == Residual::sequential;
    const bool layers = !spec_.layers.empty();
    p.B = B;
    p.T = T;
    p.N = N;
    auto buffer = [&](Index n) {
      p.floats += n;
      return Buffer(n);
    };
    auto view = [&](Buffer& b, const memory::desc& md, Index offset = 0) { return b.view(ctx_, md, offset); };

    // descriptors
    const memory::desc nd = plain({N, d}), nW = plain({N, W}), nq = plain({N, qw}), nfc = plain({N, fcw_});
    const memory::desc ni = plain({N, inner_}), main_md = plain({N, main_width_});
    // attention: [B, nkv, S, *] for the queries' side (S = G T rows per kv head), [B, nkv, T, *] for keys and values
    const memory::desc scores = plain({B, nkv, S, T});
    const memory::desc scores_t = strided({B, nkv, T, S}, {nkv * S * T, S * T, 1, T});  // att^T, dscores^T
    memory::desc q_md, kv_md, kv_t_md, y_md;
    if (!grouped) {  // strided views into the token-major qkv [N, W] and y [N, qw]
      q_md = strided({B, nkv, S, hd}, {T * W, hd, W, 1});
      kv_md = strided({B, nkv, T, hd}, {T * W, hd, W, 1});
      kv_t_md = strided({B, nkv, hd, T}, {T * W, hd, 1, W});
      y_md = strided({B, nkv, S, hd}, {T * qw, hd, qw, 1});
    } else {  // head-major copies
      q_md = plain({B, nkv, S, hd});
      kv_md = plain({B, nkv, T, hd});
      kv_t_md = strided({B, nkv, hd, T}, {nkv * T * hd, T * hd, 1, hd});
      y_md = plain({B, nkv, S, hd});
    }

    // buffers
    p.h.resize(static_cast<std::size_t>(L_ + 1));
    for (Buffer& b : p.h) b = buffer(N * d);
    p.saved.resize(static_cast<std::size_t>(L_));
    for (Plan::Saved& s : p.saved) {
      s.n1_mean = buffer(N);
      s.n1_rstd = buffer(N);
      if (grouped) {
        s.q = buffer(N * qw);
        s.k = buffer(N * kvw);
        s.v = buffer(N * kvw);
      } else {
        s.qkv = buffer(N * W);
      }
      s.att = buffer(B * nh * T * T);
      s.a = buffer(N * d);
      s.n2_mean = buffer(N);
      s.n2_rstd = buffer(N);
      s.fc = buffer(N * fcw_);
    }
    if (grouped) {
      p.qkv = buffer(N * W);
      p.yh = buffer(N * qw);
    }
    p.ln_out = buffer(N * d);
    p.y = buffer(N * qw);
    p.fc_act = buffer(N * inner_);
    p.mask = buffer(B * nh * T * T);
    for (Index row = 0; row < B * nh * T; ++row)  // row (b, head, t): position t = row % T
      for (Index t2 = row % T + 1; t2 < T; ++t2) p.mask.data()[row * T + t2] = -1e30f;

    // ---- primitives (one of each, shared by all blocks) ----
    // Steps too small for a team (at batch 1: the norms, adds, activations and the attention core) are made for, and
    // run with, one thread.
    const bool small_rows = N * d < kSmallWork, small_fc = N * fcw_ < kSmallWork, small_qkv = N * W < kSmallWork;
    const bool small_att = B * nh * T * T * hd < kSmallWork;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    auto loop = [](bool single, std::function<void()> f) { return Step(std::move(f), single); };
    WeightMatmul mm_qkv, mm_a_proj, mm_fc, mm_m_proj, mm_m_proj_bwd, mm_fc_bwd, mm_a_proj_bwd, mm_qkv_bwd;
    dnnl::matmul mm_scores, mm_av, mm_datt, mm_dv, mm_dq, mm_dk;
    dnnl::softmax_forward softmax_fwd;
    dnnl::softmax_backward softmax_bwd;
    dnnl::eltwise_forward gelu_fwd;
    dnnl::eltwise_backward gelu_bwd;
    if (L_ > 0) {
      mm_qkv = block_matmul("attn.c_attn matmul", nd, &BlockWeights::c_attn, &BlockWeights::c_attn_b, nW);
      mm_a_proj = block_matmul("attn.c_proj matmul", nq, &BlockWeights::a_proj, &BlockWeights::a_proj_b, nd,
                               matmul_attr(1.f, &nd));
      mm_fc = block_matmul("mlp.c_fc matmul", nd, &BlockWeights::c_fc, &BlockWeights::c_fc_b, nfc);
      mm_m_proj = block_matmul("mlp.c_proj matmul", ni, &BlockWeights::m_proj, &BlockWeights::m_proj_b, nd,
                               matmul_attr(1.f, &nd));
      mm_m_proj_bwd = block_matmul("mlp.c_proj backward matmul", nd, &BlockWeights::m_proj_t, nullptr, ni);
      mm_fc_bwd = block_matmul("mlp.c_fc backward matmul", nfc, &BlockWeights::c_fc_t, nullptr, nd);
      mm_a_proj_bwd = block_matmul("attn.c_proj backward matmul", nd, &BlockWeights::a_proj_t, nullptr, nq);
      mm_qkv_bwd = block_matmul("attn.c_attn backward matmul", nW, &BlockWeights::c_attn_t, nullptr, nd);
      made_with(small_att, [&] {
        mm_scores =
            matmul("attention scores matmul", ctx_, q_md, kv_t_md, nullptr, scores, matmul_attr(scale, &scores));
        const auto softmax_pd = make("softmax", [&] {
          return dnnl::softmax_forward::primitive_desc(
              dnnl::softmax_forward::desc(dnnl::prop_kind::forward_training, scores, 3), ctx_.engine);
        });
        softmax_fwd = make("softmax", [&] { return dnnl::softmax_forward(softmax_pd); });
        mm_av = matmul("attention output matmul", ctx_, scores, kv_md, nullptr, y_md);
        mm_datt = matmul("attention probabilities backward matmul", ctx_, y_md, kv_t_md, nullptr, scores);
        mm_dv = matmul("attention values backward matmul", ctx_, scores_t, y_md, nullptr, kv_md);
        softmax_bwd = make("softmax backward", [&] {
          return dnnl::softmax_backward(dnnl::softmax_backward::primitive_desc(
              dnnl::softmax_backward::desc(scores, scores, 3), ctx_.engine, softmax_pd));
        });
        mm_dq = matmul("attention queries backward matmul", ctx_, scores, kv_md, nullptr, q_md,
                       matmul_attr(scale, nullptr));
        mm_dk =
            matmul("attention keys backward matmul", ctx_, scores_t, q_md, nullptr, kv_md, matmul_attr(scale, nullptr));
      });
      if (!swiglu) {
        const auto algorithm =
            arch.mlp == Mlp::gelu_tanh ? dnnl::algorithm::eltwise_gelu_tanh : dnnl::algorithm::eltwise_gelu_erf;
        made_with(small_fc, [&] {
          const auto gelu_pd = make("GELU", [&] {
            return dnnl::eltwise_forward::primitive_desc(
                dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, algorithm, ni, 0.f, 0.f), ctx_.engine);
          });
          gelu_fwd = make("GELU", [&] { return dnnl::eltwise_forward(gelu_pd); });
          gelu_bwd = make("GELU backward", [&] {
            return dnnl::eltwise_backward(dnnl::eltwise_backward::primitive_desc(
                dnnl::eltwise_backward::desc(algorithm, ni, ni, 0.f, 0.f), ctx_.engine, gelu_pd));
          });
        });
      }
    }

    // ---- forward ----
    const bool vocab = spec_.input == InputSpace::vocab;
    p.in = external(ctx_, vocab ? plain({N, V_}) : nd);
    {
      memory in = p.in, h0 = view(p.h[0], nd);
      if (!vocab) {
        const float* wpe = wpe_;
        p.forward.push_back(loop(small_rows, [in, h0, wpe, N, T, d, small_rows] {
          const float* x = ptr(in);
          float* h = ptr(h0);
          if (!wpe) return add_rows(x, nullptr, h, N, d, !small_rows);
          for_rows(N, !small_rows, [&](Index n) {
            const float* pos = wpe + (n % T) * d;
            for (Index i = 0; i < d; ++i) h[n * d + i] = x[n * d + i] + pos[i];
          });
        }));
      } else if (wpe_) {  // h_0 = v @ wte + wpe (tiled over the batch, for the post-op)
        p.wpe = buffer(N * d);
        for (Index n = 0; n < N; ++n)
          std::memcpy(p.wpe.data() + n * d, wpe_ + (n % T) * d, static_cast<std::size_t>(d) * sizeof(float));
        memory wpe = view(p.wpe, nd);
        const WeightMatmul mm = weight_matmul("vocabulary embedding matmul", ctx_, plain({N, V_}), wte_, nullptr, nd,
                                              matmul_attr(1.f, &nd));
        p.forward.push_back(matmul_step(mm, in, wte_, memory(), h0, &wpe));
      } else {
        const WeightMatmul mm = weight_matmul("vocabulary embedding matmul", ctx_, plain({N, V_}), wte_, nullptr, nd);
        p.forward.push_back(matmul_step(mm, in, wte_, memory(), h0));
      }
    }
    memory ln_out = view(p.ln_out, nd), y = view(p.y, nq), fc_act = view(p.fc_act, ni);
    for (Index l = 0; l < L_; ++l) {
      const BlockWeights& w = blocks_[l];
      Plan::Saved& s = p.saved[l];
      memory h = view(p.h[l], nd), h_next = view(p.h[l + 1], nd), a = view(s.a, nd);
      memory att = view(s.att, scores), fc = view(s.fc, nfc);
      memory qkv = view(grouped ? p.qkv : s.qkv, nW);
      // a = h + attn.c_proj(attention(rotate(attn.c_attn(n_1(h)))))
      {
        const NormParams n1 = w.ln_1;
        float *x = p.h[l].data(), *out = p.ln_out.data(), *mean = s.n1_mean.data(), *rstd = s.n1_rstd.data();
        p.forward.push_back(loop(small_rows, [=] { norm_forward(n1, x, out, mean, rstd, N, !small_rows); }));
      }
      p.forward.push_back(matmul_step(mm_qkv, ln_out, w.c_attn, w.c_attn_b, qkv));
      if (rotary) {
        const Rotary rot = rot_;
        float* base = ptr(qkv);
        p.forward.push_back(loop(small_qkv, [=] {
          rotate(rot, base, N, T, W, 0, nh + nkv, hd, false, !small_qkv);  // q heads, then k heads right after them
        }));
      }
      memory q, k, v, k_t, v_t;
      if (grouped) {
        float *base = ptr(qkv), *qh = s.q.data(), *kh = s.k.data(), *vh = s.v.data();
        p.forward.push_back(loop(small_qkv, [=] {
          gather_heads(base, W, 0, nh, hd, B, T, qh, !small_qkv);
          gather_heads(base, W, qw, nkv, hd, B, T, kh, !small_qkv);
          gather_heads(base, W, qw + kvw, nkv, hd, B, T, vh, !small_qkv);
        }));
        q = view(s.q, q_md);
        k = view(s.k, kv_md);
        k_t = view(s.k, kv_t_md);
        v = view(s.v, kv_md);
        v_t = view(s.v, kv_t_md);
      } else {
        q = view(s.qkv, q_md, 0);
        k = view(s.qkv, kv_md, qw);
        k_t = view(s.qkv, kv_t_md, qw);
        v = view(s.qkv, kv_md, qw + kvw);
        v_t = view(s.qkv, kv_t_md, qw + kvw);
      }
      p.forward.push_back(
          {mm_scores,
           {{DNNL_ARG_SRC, q}, {DNNL_ARG_WEIGHTS, k_t}, {DNNL_ARG_DST, att}, {kPostOpSrc1, view(p.mask, scores)}},
           small_att});
      p.forward.push_back({softmax_fwd, {{DNNL_ARG_SRC, att}, {DNNL_ARG_DST, att}}, small_att});
      if (grouped) {
        p.forward.push_back(
            {mm_av, {{DNNL_ARG_SRC, att}, {DNNL_ARG_WEIGHTS, v}, {DNNL_ARG_DST, view(p.yh, y_md)}}, small_att});
        float *yh = p.yh.data(), *yt = p.y.data();
        p.forward.push_back(loop(small_rows, [=] { scatter_heads(yh, nh, hd, B, T, yt, qw, 0, !small_rows); }));
      } else {
        p.forward.push_back(
            {mm_av, {{DNNL_ARG_SRC, att}, {DNNL_ARG_WEIGHTS, v}, {DNNL_ARG_DST, view(p.y, y_md)}}, small_att});
      }
      p.forward.push_back(matmul_step(mm_a_proj, y, w.a_proj, w.a_proj_b, a, &h));
      // h_next = a + mlp.c_proj(act(mlp.c_fc(n_2(a or h))))
      {
        const NormParams n2 = w.ln_2;
        float *x = sequential ? s.a.data() : p.h[l].data(), *out = p.ln_out.data();
        float *mean = s.n2_mean.data(), *rstd = s.n2_rstd.data();
        p.forward.push_back(loop(small_rows, [=] { norm_forward(n2, x, out, mean, rstd, N, !small_rows); }));
      }
      p.forward.push_back(matmul_step(mm_fc, ln_out, w.c_fc, w.c_fc_b, fc));
      if (swiglu) {
        float *f = s.fc.data(), *act = p.fc_act.data();
        const Index I = inner_;
        p.forward.push_back(loop(small_fc, [=] { swiglu_forward(f, act, N, I, !small_fc); }));
      } else {
        p.forward.push_back({gelu_fwd, {{DNNL_ARG_SRC, fc}, {DNNL_ARG_DST, fc_act}}, small_fc});
      }
      p.forward.push_back(matmul_step(mm_m_proj, fc_act, w.m_proj, w.m_proj_b, h_next, &a));
    }
    // the head, into the output (layers empty: bound at every call) or into `main`
    if (layers) p.main = buffer(N * main_width_);
    p.out_main = layers ? view(p.main, main_md) : external(ctx_, main_md);
    memory h_k = view(p.h[k_], nd);
    if (spec_.head == Head::none) {
      memory out = p.out_main;
      p.forward.push_back(loop(small_rows, [=] { add_rows(ptr(h_k), nullptr, ptr(out), N, d, !small_rows); }));
    } else if (spec_.head == Head::lm_head_no_ln_f) {
      const WeightMatmul mm = weight_matmul("lm_head matmul", ctx_, nd, head_t_, nullptr, main_md);
      p.forward.push_back(matmul_step(mm, h_k, head_t_, memory(), p.out_main));
    } else {
      p.lnf_mean = buffer(N);
      p.lnf_rstd = buffer(N);
      memory normed = p.out_main;
      if (spec_.head == Head::lm_head) {
        p.lnf_out = buffer(N * d);
        normed = view(p.lnf_out, nd);
      }
      const NormParams nf = ln_f_;
      float *x = p.h[k_].data(), *mean = p.lnf_mean.data(), *rstd = p.lnf_rstd.data();
      p.forward.push_back(loop(small_rows, [=] { norm_forward(nf, x, ptr(normed), mean, rstd, N, !small_rows); }));
      if (spec_.head == Head::lm_head) {
        const WeightMatmul mm = weight_matmul("lm_head matmul", ctx_, nd, head_t_, nullptr, main_md);
        p.forward.push_back(matmul_step(mm, normed, head_t_, memory(), p.out_main));
      }
    }

    // ---- backward ----
    for (Buffer& b : p.dh) b = buffer(N * d);
    p.dfc_act = buffer(N * inner_);
    p.dfc = buffer(N * fcw_);
    p.dln = buffer(N * d);
    p.da = buffer(N * d);
    p.dy = buffer(N * qw);
    p.datt = buffer(B * nh * T * T);
    p.dscores = buffer(B * nh * T * T);
    p.dqkv = buffer(N * W);
    if (grouped) {
      p.dyh = buffer(N * qw);
      p.dq = buffer(N * qw);
      p.dk = buffer(N * kvw);
      p.dv = buffer(N * kvw);
    }
    if (layers) {
      p.dmain = buffer(N * main_width_);
      p.dextra.resize(spec_.layers.size());
      for (Buffer& b : p.dextra) b = buffer(N * d);
    }
    p.grad_main = layers ? view(p.dmain, main_md) : external(ctx_, main_md);

    // the head's gradient with respect to h_k
    memory dhk = p.grad_main;
    if (spec_.head == Head::lm_head_no_ln_f) {
      p.dhk = buffer(N * d);
      dhk = view(p.dhk, nd);
      const WeightMatmul mm = weight_matmul("lm_head backward matmul", ctx_, main_md, head_, nullptr, nd);
      p.backward.push_back(matmul_step(mm, p.grad_main, head_, memory(), dhk));
    } else if (spec_.head != Head::none) {
      p.dhk = buffer(N * d);
      dhk = view(p.dhk, nd);
      memory dnormed = p.grad_main;
      if (spec_.head == Head::lm_head) {
        p.dlnf = buffer(N * d);
        dnormed = view(p.dlnf, nd);
        const WeightMatmul mm = weight_matmul("lm_head backward matmul", ctx_, main_md, head_, nullptr, nd);
        p.backward.push_back(matmul_step(mm, p.grad_main, head_, memory(), dnormed));
      }
      const NormParams nf = ln_f_;
      float *x = p.h[k_].data(), *mean = p.lnf_mean.data(), *rstd = p.lnf_rstd.data(), *dx = p.dhk.data();
      p.backward.push_back(
          loop(small_rows, [=] { norm_backward(nf, x, mean, rstd, ptr(dnormed), nullptr, dx, N, !small_rows); }));
    }

    // Down the residual stream from h_L to h_0: h_l's gradient is the sum of what reaches it through the blocks above
    // and directly (as h_k under the head, as an extra layer). `cur` is that gradient so far (null: zero); it is one
    // of the two dh buffers, or, before anything was added to it, the one contribution itself.
    memory cur;
    int cur_buffer = -1;  // which dh buffer cur is, or -1
    memory dln = view(p.dln, nd), da = view(p.da, nd), dy = view(p.dy, nq);
    memory dfc_act = view(p.dfc_act, ni), dfc = view(p.dfc, nfc), dqkv = view(p.dqkv, nW);
    memory datt = view(p.datt, scores), dscores = view(p.dscores, scores);
    for (Index l = L_; l >= 0; --l) {
      std::vector<memory> parts;
      if (l == k_) parts.push_back(dhk);
      for (std::size_t j = 0; j < spec_.layers.size(); ++j)
        if (spec_.layers[j] == l) parts.push_back(view(p.dextra[j], nd));
      for (memory& part : parts) {
        if (!cur) {
          cur = part;
          continue;
        }
        const int target = cur_buffer >= 0 ? cur_buffer : 0;
        memory sum = view(p.dh[target], nd), before = cur;
        p.backward.push_back(loop(small_rows, [=] { add_rows(ptr(before), ptr(part), ptr(sum), N, d, !small_rows); }));
        cur = sum;
        cur_buffer = target;
      }
      if (l == 0) break;
      // block l - 1: cur is the gradient of h_l, into dh_out the gradient of h_l-1
      const Index b = l - 1;
      const BlockWeights& w = blocks_[b];
      Plan::Saved& s = p.saved[b];
      const int out_buffer = cur_buffer == 0 ? 1 : 0;
      memory dh_out = view(p.dh[out_buffer], nd);
      memory fc = view(s.fc, nfc), att = view(s.att, scores);
      // h_next = a + mlp.c_proj(act(mlp.c_fc(n_2(x)))), x = a (sequential) or h (parallel): into da the gradient of
      // a plus, when x = a, the MLP's; for the parallel residual the MLP's gradient reaches h and da goes on with it.
      p.backward.push_back(matmul_step(mm_m_proj_bwd, cur, w.m_proj_t, memory(), dfc_act));
      if (swiglu) {
        float *f = s.fc.data(), *dact = p.dfc_act.data(), *df = p.dfc.data();
        const Index I = inner_;
        p.backward.push_back(loop(small_fc, [=] { swiglu_backward(f, dact, df, N, I, !small_fc); }));
      } else {
        p.backward.push_back(
            {gelu_bwd, {{DNNL_ARG_SRC, fc}, {DNNL_ARG_DIFF_DST, dfc_act}, {DNNL_ARG_DIFF_SRC, dfc}}, small_fc});
      }
      p.backward.push_back(matmul_step(mm_fc_bwd, dfc, w.c_fc_t, memory(), dln));
      {
        const NormParams n2 = w.ln_2;
        float *x = sequential ? s.a.data() : p.h[b].data(), *mean = s.n2_mean.data(), *rstd = s.n2_rstd.data();
        float *g = p.dln.data(), *dx = p.da.data();
        memory c = cur;
        p.backward.push_back(
            loop(small_rows, [=] { norm_backward(n2, x, mean, rstd, g, ptr(c), dx, N, !small_rows); }));
      }
      // a = h + attn.c_proj(attention(...)): the attention branch's output gradient is a's (sequential: da; parallel:
      // h_next's, cur), and h gets da plus what comes through n_1.
      const memory& dattn_out = sequential ? da : cur;
      p.backward.push_back(matmul_step(mm_a_proj_bwd, dattn_out, w.a_proj_t, memory(), dy));
      memory dy_h = view(p.dy, y_md), dq, dk, dv, q, k;
      if (grouped) {
        float *src = p.dy.data(), *dst = p.dyh.data();
        p.backward.push_back(loop(small_rows, [=] { gather_heads(src, qw, 0, nh, hd, B, T, dst, !small_rows); }));
        dy_h = view(p.dyh, y_md);
        dq = view(p.dq, q_md);
        dk = view(p.dk, kv_md);
        dv = view(p.dv, kv_md);
        q = view(s.q, q_md);
        k = view(s.k, kv_md);
      } else {
        dq = view(p.dqkv, q_md, 0);
        dk = view(p.dqkv, kv_md, qw);
        dv = view(p.dqkv, kv_md, qw + kvw);
        q = view(s.qkv, q_md, 0);
        k = view(s.qkv, kv_md, qw);
      }
      memory v_t = grouped ? view(s.v, kv_t_md) : view(s.qkv, kv_t_md, qw + kvw);
      p.backward.push_back({mm_datt, {{DNNL_ARG_SRC, dy_h}, {DNNL_ARG_WEIGHTS, v_t}, {DNNL_ARG_DST, datt}}, small_att});
      p.backward.push_back(
          {mm_dv, {{DNNL_ARG_SRC, view(s.att, scores_t)}, {DNNL_ARG_WEIGHTS, dy_h}, {DNNL_ARG_DST, dv}}, small_att});
      p.backward.push_back(
          {softmax_bwd, {{DNNL_ARG_DST, att}, {DNNL_ARG_DIFF_DST, datt}, {DNNL_ARG_DIFF_SRC, dscores}}, small_att});
      p.backward.push_back({mm_dq, {{DNNL_ARG_SRC, dscores}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DST, dq}}, small_att});
      p.backward.push_back(
          {mm_dk, {{DNNL_ARG_SRC, view(p.dscores, scores_t)}, {DNNL_ARG_WEIGHTS, q}, {DNNL_ARG_DST, dk}}, small_att});
      if (grouped) {
        float *dqh = p.dq.data(), *dkh = p.dk.data(), *dvh = p.dv.data(), *rows = p.dqkv.data();
        p.backward.push_back(loop(small_qkv, [=] {
          scatter_heads(dqh, nh, hd, B, T, rows, W, 0, !small_qkv);
          scatter_heads(dkh, nkv, hd, B, T, rows, W, qw, !small_qkv);
          scatter_heads(dvh, nkv, hd, B, T, rows, W, qw + kvw, !small_qkv);
        }));
      }
      if (rotary) {
        const Rotary rot = rot_;
        float* base = p.dqkv.data();
        p.backward.push_back(loop(small_qkv, [=] { rotate(rot, base, N, T, W, 0, nh + nkv, hd, true, !small_qkv); }));
      }
      p.backward.push_back(matmul_step(mm_qkv_bwd, dqkv, w.c_attn_t, memory(), dln));
      {
        const NormParams n1 = w.ln_1;
        float *x = p.h[b].data(), *mean = s.n1_mean.data(), *rstd = s.n1_rstd.data(), *g = p.dln.data();
        float *skip = p.da.data(), *dx = ptr(dh_out);
        p.backward.push_back(loop(small_rows, [=] { norm_backward(n1, x, mean, rstd, g, skip, dx, N, !small_rows); }));
      }
      cur = dh_out;
      cur_buffer = out_buffer;
    }
    // the embedding: the positions are constants
    if (!vocab) {
      p.grad_in = external(ctx_, nd);
      memory from = cur, to = p.grad_in;
      p.backward.push_back(loop(small_rows, [=] { add_rows(ptr(from), nullptr, ptr(to), N, d, !small_rows); }));
    } else {
      p.grad_in = external(ctx_, plain({N, V_}));
      const WeightMatmul mm =
          weight_matmul("vocabulary embedding backward matmul", ctx_, nd, wte_t_, nullptr, plain({N, V_}));
      p.backward.push_back(matmul_step(mm, cur, wte_t_, memory(), p.grad_in));
    }
    return plan;
  }

  // ---- running ----------------------------------------------------------------------------------------------------

  // The forward pass into `output` ([N, out_width] floats), keeping the activations: the plan is then the saved one.
  void run_forward(Plan& p, const Tensor& input, float* output) {
    Tensor converted;
    if (input.dtype() != DType::f32) converted = input.to(DType::f32);
    bind(p.in, input.dtype() == DType::f32 ? input.data<float>() : converted.data<float>());
    const bool layers = !spec_.layers.empty();
    if (!layers) bind(p.out_main, output);
    run_steps(ctx_, p.forward);
    if (layers) {  // [ main | h_layers[0] | ... ] per row
      const Index N = p.N, d = d_;
      for (Index n = 0; n < N; ++n) {
        float* row = output + n * out_width_;
        std::memcpy(row, p.main.data() + n * main_width_, static_cast<std::size_t>(main_width_) * sizeof(float));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(row + main_width_ + static_cast<Index>(j) * d, p.h[spec_.layers[j]].data() + n * d,
                      static_cast<std::size_t>(d) * sizeof(float));
      }
    }
    bind(p.in, nullptr);  // the caller's input is not kept
    saved_plan_ = &p;
  }

  // The input gradient for `dout` ([N, out_width] floats) from the saved activations, in `dtype`.
  Tensor run_backward(Plan& p, const float* dout, DType dtype) {
    const bool layers = !spec_.layers.empty();
    if (layers) {
      const Index N = p.N, d = d_;
      for (Index n = 0; n < N; ++n) {
        const float* row = dout + n * out_width_;
        std::memcpy(p.dmain.data() + n * main_width_, row, static_cast<std::size_t>(main_width_) * sizeof(float));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(p.dextra[j].data() + n * d, row + main_width_ + static_cast<Index>(j) * d,
                      static_cast<std::size_t>(d) * sizeof(float));
      }
    } else {
      bind(p.grad_main, dout);
    }
    Tensor grad(DType::f32, {p.B, p.T, width()});
    bind(p.grad_in, grad.data<float>());
    run_steps(ctx_, p.backward);
    return dtype == DType::f32 ? grad : grad.to(dtype);
  }

  // ---- the prefix cache -------------------------------------------------------------------------------------------

  // The "prefix_cache" capability (lminv/prefix_cache.hpp): per block, the prefix's keys (rotated at their positions)
  // and values, one row [k | v] of 2 kvw floats per position, as the qkv buffer holds them after the queries. A call
  // runs N rows through the blocks, each row as one position (so every matrix product is [N, in] x [in, out], the
  // weights read once for all rows):
  //   next      N = B candidates, all at position t = length(): each attends to the t kept positions and to itself;
  //   append    N = n rows at positions t .. t + n - 1: each block first writes the rows' keys and values after the
  //             kept ones, then row i attends to positions 0 .. t + i (causal).
  // Per kv head, the attention over the S = t (next) or t + n (append) kept positions is two oneDNN matmuls, all the
  // kv head's G N query rows at once: scores = q K^T / sqrt(hd) [G N, S] and y = p V; the candidate's own key and
  // value (next), the causal limit (append) and the softmax are loops. next() keeps the candidates' keys and values
  // (each block's qkv buffer of its plan) until the next append or reset, for append_from_last_next.
  //
  // The weight matmuls read WeightStore::padded copies of the block weights (made when the cache is first asked
  // for, shared by the models on the same weights); with GELU, it is mlp.c_fc's post-op. Plans per row count N (one
  // map for next, one for append, each least recently used first out beyond kMaxPlans): the weight matmuls, the
  // buffers, and per S the whole pass as steps (the attention matmuls depend on S; a pass is rebuilt when the kept
  // rows move to a larger buffer, or its scores buffer grows). Once its plan and pass exist, a call allocates nothing
  // but its output rows (and an f32 copy of rows given in another dtype).
  // A prefix-cache step dst = src @ w (+ bias) (+ *added), then GELU when `gelu` (the architecture) is given: with
  // few rows the streaming kernels on the weight as stored and GELU by hand; otherwise oneDNN's matmul `mm`, made for
  // the row-padded copy (with GELU as its post-op where asked).
  static void cache_matmul(std::vector<Step>& steps, const WeightMatmul& mm, const memory& src, const Matrix& plain_w,
                           const Matrix& padded_w, const memory& bias, const memory& dst,
                           const memory* added = nullptr, const Architecture* gelu = nullptr) {
    std::optional<Step> s = skinny_step(src, plain_w, bias, dst, added);
    if (!s) {
      steps.push_back(block_step(mm, src, padded_w, bias, dst, added));
      return;
    }
    steps.push_back(std::move(*s));
    if (!gelu) return;
    const memory y = dst;
    const Index n = static_cast<Index>(dst.get_desc().get_size() / sizeof(float));
    const bool tanh_form = gelu->mlp == Mlp::gelu_tanh;
    steps.push_back(Step(
        [=] {
          float* v = static_cast<float*>(y.get_data_handle());
          constexpr float kTanhScale = 0.7978845608028654f;  // sqrt(2 / pi)
          constexpr float kErfScale = 0.7071067811865476f;   // 1 / sqrt(2)
          for (Index i = 0; i < n; ++i) {
            const float x = v[i];
            v[i] = tanh_form ? 0.5f * x * (1.f + std::tanh(kTanhScale * (x + 0.044715f * x * x * x)))
                             : 0.5f * x * (1.f + std::erf(x * kErfScale));
          }
        },
        /*one_thread=*/true));
  }

  class Cache final : public PrefixCache {
   public:
    explicit Cache(DecoderModel& model)
        : m_(model),
          limit_(model.spec_.any_length() ? model.spec_.n_positions : model.spec_.seq_len),
          limit_name_(model.spec_.any_length() ? "n_positions" : "seq_len"),
          kv_(static_cast<std::size_t>(model.L_)) {
      guarded("copying the weights for the prefix cache", [&] {
        for (Index l = 0; l < model.L_; ++l) {
          const std::string h = "h." + std::to_string(l) + ".";
          BlockWeights& w = model.blocks_[l];
          w.c_attn_p = model.store_->padded(h + "attn.c_attn.weight", w.c_attn);
          w.a_proj_p = model.store_->padded(h + "attn.c_proj.weight", w.a_proj);
          w.c_fc_p = model.store_->padded(h + "mlp.c_fc.weight", w.c_fc);
          w.m_proj_p = model.store_->padded(h + "mlp.c_proj.weight", w.m_proj);
        }
      });
    }

    void reset() override {
      length_ = 0;
      last_count_ = 0;
    }
    std::int64_t length() const override { return length_; }

    void append(const Tensor& rows) override {
      check_rows(rows, "append");
      const Index n = rows.dim(0);
      if (length_ + n > limit_)
        throw Error(std::string(kWho) + ": prefix cache: appending " + std::to_string(n) +
                    " positions to a prefix of " + std::to_string(length_) + " exceeds " + limit_name_ + " " +
                    std::to_string(limit_));
      last_count_ = 0;
      if (n == 0) return;
      ThreadScope scope(m_.ctx_.threads);
      guarded("appending to the prefix cache", [&] {
        reserve(length_ + n);
        // The rows' keys and values go to positions length_ .. length_ + n - 1, which count once the pass is done.
        if (m_.L_ > 0) run(plan(n, true), length_ + n, true, rows, nullptr);
      });
      length_ += n;
    }

    Tensor next(const Tensor& candidates) override {
      check_rows(candidates, "next");
      if (length_ >= limit_)
        throw Error(std::string(kWho) + ": prefix cache: the prefix already has all " + std::to_string(limit_) +
                    " positions (" + limit_name_ + " " + std::to_string(limit_) + "): no position is left for next()");
      last_count_ = 0;
      const Index B = candidates.dim(0);
      Tensor out(DType::f32, {B, m_.out_width_});
      if (B == 0) return out;
      ThreadScope scope(m_.ctx_.threads);
      guarded("running next() on the prefix cache", [&] {
        RowPlan& p = plan(B, false);
        run(p, length_, false, candidates, out.data<float>());
        last_ = &p;
      });
      last_count_ = B;
      return out;
    }

    // The candidate's keys and values as next() computed them: one row of a product of B rows where append() runs
    // one, so they may differ from append()'s in the last bits.
    bool append_from_last_next(std::int64_t b) override {
      if (last_count_ == 0) return false;
      if (b < 0 || b >= last_count_)
        throw Error(std::string(kWho) + ": prefix cache: append_from_last_next(" + std::to_string(b) +
                    "): the last next() had " + std::to_string(last_count_) + " candidates");
      guarded("appending to the prefix cache", [&] { reserve(length_ + 1); });
      const Index KV = 2 * m_.kvw_;
      for (Index l = 0; l < m_.L_; ++l)
        std::memcpy(kv_[l].data() + length_ * KV, last_->qkv[l].data() + b * m_.W_ + m_.qw_,
                    static_cast<std::size_t>(KV) * sizeof(float));
      ++length_;
      last_count_ = 0;
      return true;
    }

   private:
    struct Pass {
      std::vector<Step> steps;
      std::uint64_t generation = 0;  // of the kept rows' buffers it reads and writes
    };
    // What N rows need. The buffers are the plan's; mean and rstd are scratch (nothing runs backward).
    struct RowPlan {
      Index N = 0;
      std::vector<Buffer> h;    // h_0 .. h_L, [N, d]
      std::vector<Buffer> qkv;  // per block [N, W]: the rows' q, k, v (rotated); next() keeps k and v here
      Buffer ln_out, mean, rstd, a, y, qh, yh, fc, fc_act, scores, own, lnf_out, main;
      WeightMatmul mm_wte, mm_qkv, mm_a_proj, mm_fc, mm_m_proj, mm_head;
      memory in, out_main;  // the caller's rows and output rows (out_main: when layers is empty), bound per call
      std::map<Index, Pass> passes;  // by S
      std::uint64_t used = 0;
      Index floats = 0;  // in the buffers, scores at its current size
    };
    using Plans = std::map<Index, std::unique_ptr<RowPlan>>;

    void check_rows(const Tensor& rows, const char* call) const {
      const bool embedding = m_.spec_.input == InputSpace::embedding;
      const Index width = m_.width();
      if (rows.rank() != 2 || rows.dim(1) != width)
        throw Error(std::string(kWho) + ": prefix cache: " + call + " takes rows [n, " + std::to_string(width) +
                    "] (input = " + input_space_name(m_.spec_.input) + ", " + (embedding ? "n_embd " : "vocab_size ") +
                    std::to_string(width) + "), got " + shape_string(rows.shape()));
    }

    // Room for `positions` kept rows per block: the buffers grow geometrically (up to the limit), keeping the rows.
    void reserve(Index positions) {
      if (positions <= capacity_) return;
      const Index capacity = std::min(limit_, std::max({positions, 2 * capacity_, Index{64}}));
      const Index KV = 2 * m_.kvw_;
      for (Buffer& b : kv_) {
        Buffer grown(capacity * KV);
        if (length_ > 0) std::memcpy(grown.data(), b.data(), static_cast<std::size_t>(length_ * KV) * sizeof(float));
        b = std::move(grown);
      }
      capacity_ = capacity;
      ++generation_;  // the passes built on the old buffers are stale
    }

    // The plan for N rows (next: append = false), made on first use.
    RowPlan& plan(Index N, bool append) {
      Plans& plans = plans_[append ? 1 : 0];
      auto it = plans.find(N);
      if (it == plans.end()) {
        while (plans.size() >= kMaxPlans) drop_oldest(plans, plans.end());
        it = plans.emplace(N, make_plan(N, append)).first;
        auto floats = [&] {
          Index n = 0;
          for (const Plans& ps : plans_)
            for (const auto& [rows, p] : ps) n += p->floats;
          return n;
        };
        while (plans.size() > 1 && floats() * static_cast<Index>(sizeof(float)) > kPlanBytes) drop_oldest(plans, it);
      }
      it->second->used = ++clock_;
      return *it->second;
    }
    void drop_oldest(Plans& plans, Plans::iterator keep) {
      auto oldest = plans.end();
      for (auto i = plans.begin(); i != plans.end(); ++i)
        if (i != keep && (oldest == plans.end() || i->second->used < oldest->second->used)) oldest = i;
      if (oldest == plans.end()) return;
      if (oldest->second.get() == last_) last_count_ = 0;  // its keys and values go with it
      plans.erase(oldest);
    }

    std::unique_ptr<RowPlan> make_plan(Index N, bool append) {
      DecoderModel& m = m_;
      auto plan = std::make_unique<RowPlan>();
      RowPlan& p = *plan;
      p.N = N;
      auto buffer = [&](Index n) {
        p.floats += n;
        return Buffer(n);
      };
      const Index d = m.d_, L = m.L_;
      const bool layers = !m.spec_.layers.empty();
      p.h.resize(static_cast<std::size_t>(L + 1));
      for (Buffer& b : p.h) b = buffer(N * d);
      p.qkv.resize(static_cast<std::size_t>(L));
      for (Buffer& b : p.qkv) b = buffer(N * m.W_);
      p.ln_out = buffer(N * d);
      p.mean = buffer(N);
      p.rstd = buffer(N);
      p.a = buffer(N * d);
      p.y = buffer(N * m.qw_);
      if (m.G_ > 1) {
        p.qh = buffer(N * m.qw_);
        p.yh = buffer(N * m.qw_);
      }
      if (m.spec_.arch.mlp == Mlp::swiglu) p.fc = buffer(N * m.fcw_);  // else GELU is c_fc's post-op, into fc_act
      p.fc_act = buffer(N * m.inner_);
      p.own = buffer(N * m.nh_);
      if (!append && m.spec_.head == Head::lm_head) p.lnf_out = buffer(N * d);
      if (!append && layers) p.main = buffer(N * m.main_width_);

      const memory::desc nd = plain({N, d}), nW = plain({N, m.W_}), nq = plain({N, m.qw_});
      const memory::desc nfc = plain({N, m.fcw_}), ni = plain({N, m.inner_}), main_md = plain({N, m.main_width_});
      const bool vocab = m.spec_.input == InputSpace::vocab;
      p.in = external(m.ctx_, vocab ? plain({N, m.V_}) : nd);
      if (vocab) p.mm_wte = weight_matmul("vocabulary embedding matmul", m.ctx_, plain({N, m.V_}), m.wte_, nullptr, nd);
      if (L > 0) {
        p.mm_qkv = m.block_matmul("attn.c_attn matmul", nd, &BlockWeights::c_attn_p, &BlockWeights::c_attn_b, nW);
        p.mm_a_proj = m.block_matmul("attn.c_proj matmul", nq, &BlockWeights::a_proj_p, &BlockWeights::a_proj_b, nd,
                                     matmul_attr(1.f, &nd));
        // GELU as the matmul's post-op (on each tile of the output while it is in cache: no pass of its own)
        dnnl::primitive_attr fc_attr;
        if (m.spec_.arch.mlp != Mlp::swiglu) {
          dnnl::post_ops ops;
          ops.append_eltwise(1.f,
                             m.spec_.arch.mlp == Mlp::gelu_tanh ? dnnl::algorithm::eltwise_gelu_tanh
                                                                : dnnl::algorithm::eltwise_gelu_erf,
                             0.f, 0.f);
          fc_attr.set_post_ops(ops);
        }
        p.mm_fc = m.block_matmul("mlp.c_fc matmul", nd, &BlockWeights::c_fc_p, &BlockWeights::c_fc_b, nfc, fc_attr);
        p.mm_m_proj = m.block_matmul("mlp.c_proj matmul", ni, &BlockWeights::m_proj_p, &BlockWeights::m_proj_b, nd,
                                     matmul_attr(1.f, &nd));
      }
      if (!append) {
        p.out_main = layers ? p.main.view(m.ctx_, main_md) : external(m.ctx_, main_md);
        if (head_has_lm_head(m.spec_.head))
          p.mm_head = weight_matmul("lm_head matmul", m.ctx_, nd, m.head_t_, nullptr, main_md);
      }
      return plan;
    }

    // The pass of `p` over S kept positions, built on first use (or again, when stale).
    Pass& pass(RowPlan& p, Index S, bool append) {
      auto it = p.passes.find(S);
      if (it != p.passes.end() && it->second.generation == generation_) return it->second;
      // The scores [nkv, G N, S]: the buffer grows geometrically; the passes built on the old one are dropped.
      const Index scores = m_.nh_ * p.N * S;
      if (p.scores.size() < scores) {
        p.floats += std::max(scores, 2 * p.scores.size()) - p.scores.size();
        p.scores = Buffer(std::max(scores, 2 * p.scores.size()));
        p.passes.clear();
      }
      if (p.passes.size() >= kMaxPasses) p.passes.clear();  // a long prefix: keep the memory bounded
      Pass& made = p.passes[S];
      made.steps = build_pass(p, S, append);
      made.generation = generation_;
      return made;
    }

    std::vector<Step> build_pass(RowPlan& p, Index S, bool append) {
      DecoderModel& m = m_;
      const Context& ctx = m.ctx_;
      const Architecture& arch = m.spec_.arch;
      const Index N = p.N, t = append ? S - N : S;  // the rows' first position
      const Index d = m.d_, nh = m.nh_, nkv = m.nkv_, G = m.G_, hd = m.hd_, qw = m.qw_, kvw = m.kvw_, W = m.W_;
      const Index R = G * N;     // query rows per kv head: (g, row) at g N + row
      const Index KV = 2 * kvw;  // a kept position's floats
      const bool grouped = G > 1, rotary = arch.positions == Positions::rotary, swiglu = arch.mlp == Mlp::swiglu;
      const bool sequential = arch.residual == Residual::sequential, vocab = m.spec_.input == InputSpace::vocab;
      const bool small_rows = N * d < kSmallWork, small_fc = N * m.fcw_ < kSmallWork, small_qkv = N * W < kSmallWork;
      const bool small_att = nkv * R * (S + 1) * hd < kSmallWork;
      const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
      std::vector<Step> steps;
      auto loop = [&](bool single, std::function<void()> f) { steps.push_back(Step(std::move(f), single)); };
      auto view = [&](Buffer& b, const memory::desc& md) { return b.view(ctx, md); };
      const memory::desc nd = plain({N, d}), nW = plain({N, W}), nq = plain({N, qw});
      const memory::desc nfc = plain({N, m.fcw_}), ni = plain({N, m.inner_});

      // h_0 = x (+ wpe at the rows' positions: t for every candidate, t + i for appended row i)
      {
        memory in = p.in;
        float* h0 = p.h[0].data();
        const float* wpe = m.wpe_ ? m.wpe_ + t * d : nullptr;
        const Index advance = append ? d : 0;
        if (vocab) steps.push_back(block_step(p.mm_wte, in, m.wte_, memory(), view(p.h[0], nd)));
        if (!vocab || wpe)
          loop(small_rows, [=] {
            const float* x = vocab ? h0 : ptr(in);
            if (!wpe) return add_rows(x, nullptr, h0, N, d, !small_rows);
            for_rows(N, !small_rows, [&](Index n) {
              const float* pos = wpe + n * advance;
              for (Index i = 0; i < d; ++i) h0[n * d + i] = x[n * d + i] + pos[i];
            });
          });
      }

      // The attention's layouts. Queries and outputs: strided views into qkv [N, W] and y [N, qw] with one query
      // head per kv head; with G > 1, head-major copies [nh, N, hd], so a kv head's G query heads are G N rows.
      const memory::desc q_md = grouped ? plain({nkv, R, hd}) : strided({nkv, N, hd}, {hd, W, 1});
      const memory::desc y_md = grouped ? plain({nkv, R, hd}) : strided({nkv, N, hd}, {hd, qw, 1});
      const memory::desc scores_md = plain({nkv, R, S});
      const memory::desc keys_md = strided({nkv, hd, S}, {hd, 1, KV}), values_md = strided({nkv, S, hd}, {hd, KV, 1});
      const Index q_head = grouped ? R * hd : hd, q_row = grouped ? hd : W;  // row r of kv head c: c q_head + r q_row
      const Index y_head = grouped ? R * hd : hd, y_row = grouped ? hd : qw;
      dnnl::matmul mm_scores, mm_av;
      if (S > 0 && m.L_ > 0)
        made_with(small_att, [&] {
          mm_scores = matmul("prefix cache attention scores matmul", ctx, q_md, keys_md, nullptr, scores_md,
                             matmul_attr(scale, nullptr));
          mm_av = matmul("prefix cache attention output matmul", ctx, scores_md, values_md, nullptr, y_md);
        });

      memory ln_out = view(p.ln_out, nd), a = view(p.a, nd), y = view(p.y, nq), fc_act = view(p.fc_act, ni);
      memory fc = swiglu ? view(p.fc, nfc) : memory();  // with GELU, c_fc writes fc_act
      memory scores = S > 0 ? view(p.scores, scores_md) : memory();
      for (Index l = 0; l < m.L_; ++l) {
        const BlockWeights& w = m.blocks_[l];
        memory h = view(p.h[l], nd), h_next = view(p.h[l + 1], nd);
        float* qkv = p.qkv[l].data();
        float* kept = kv_[l].data();  // [capacity, 2 kvw]: keys, then values
        {
          const NormParams n1 = w.ln_1;
          float *x = p.h[l].data(), *out = p.ln_out.data(), *mean = p.mean.data(), *rstd = p.rstd.data();
          loop(small_rows, [=] { norm_forward(n1, x, out, mean, rstd, N, !small_rows); });
        }
        cache_matmul(steps, p.mm_qkv, ln_out, w.c_attn, w.c_attn_p, w.c_attn_b, view(p.qkv[l], nW));
        if (rotary) {  // row n at position t (next) or t + n (append)
          Rotary rot = m.rot_;
          rot.cos += t * (rot.r / 2);
          rot.sin += t * (rot.r / 2);
          const Index T = append ? N : 1;
          loop(small_qkv, [=] { rotate(rot, qkv, N, T, W, 0, nh + nkv, hd, false, !small_qkv); });
        }
        if (append) {
          loop(small_qkv, [=] {
            for (Index n = 0; n < N; ++n)
              std::memcpy(kept + (t + n) * KV, qkv + n * W + qw, static_cast<std::size_t>(KV) * sizeof(float));
          });
          if (l + 1 == m.L_) break;  // the last block's keys and values are all a later position reads of it
        }
        // y = attention over the kept positions (and, in next, the row's own key and value)
        const float* q = qkv;
        float* yb = p.y.data();
        memory q_mem = view(p.qkv[l], q_md), y_mem = y;
        if (grouped) {
          float* qh = p.qh.data();
          loop(small_qkv, [=] { gather_heads(qkv, W, 0, nh, hd, 1, N, qh, !small_qkv); });
          q = qh;
          yb = p.yh.data();
          q_mem = view(p.qh, q_md);
          y_mem = view(p.yh, y_md);
        }
        if (S > 0)
          steps.push_back(
              {mm_scores,
               {{DNNL_ARG_SRC, q_mem}, {DNNL_ARG_WEIGHTS, memory(keys_md, ctx.engine, kept)}, {DNNL_ARG_DST, scores}},
               small_att});
        {
          float *sc = p.scores.data(), *own = p.own.data();
          loop(small_att, [=] {
            for_rows(nkv * R, !small_att, [&](Index row) {
              const Index c = row / R, r = row % R, n = r % N;
              float* s = sc + row * S;
              const Index valid = append ? t + n + 1 : S;  // append: causal, up to the row's own position
              float top = -std::numeric_limits<float>::infinity(), self = 0;
              if (!append) {
                const float* qr = q + c * q_head + r * q_row;
                const float* kr = qkv + n * W + qw + c * hd;
                float dot = 0;
                for (Index i = 0; i < hd; ++i) dot += qr[i] * kr[i];
                top = self = dot * scale;
              }
              for (Index j = 0; j < valid; ++j) top = std::max(top, s[j]);
              float sum = 0;
              for (Index j = 0; j < valid; ++j) sum += (s[j] = std::exp(s[j] - top));
              for (Index j = valid; j < S; ++j) s[j] = 0;
              if (!append) sum += (self = std::exp(self - top));
              const float inv = 1.0f / sum;
              for (Index j = 0; j < valid; ++j) s[j] *= inv;
              if (!append) own[row] = self * inv;
            });
          });
        }
        if (S > 0)
          steps.push_back({mm_av,
                           {{DNNL_ARG_SRC, scores},
                            {DNNL_ARG_WEIGHTS, memory(values_md, ctx.engine, kept + kvw)},
                            {DNNL_ARG_DST, y_mem}},
                           small_att});
        if (!append) {  // + the row's own value, weighted
          const float* own = p.own.data();
          const bool small_y = N * qw < kSmallWork;
          loop(small_y, [=] {
            for_rows(nkv * R, !small_y, [&](Index row) {
              const Index c = row / R, r = row % R, n = r % N;
              float* yr = yb + c * y_head + r * y_row;
              const float* vr = qkv + n * W + qw + kvw + c * hd;
              const float pr = own[row];
              if (S > 0)
                for (Index i = 0; i < hd; ++i) yr[i] += pr * vr[i];
              else
                for (Index i = 0; i < hd; ++i) yr[i] = pr * vr[i];
            });
          });
        }
        if (grouped) {
          float *yh = p.yh.data(), *yt = p.y.data();
          loop(small_rows, [=] { scatter_heads(yh, nh, hd, 1, N, yt, qw, 0, !small_rows); });
        }
        cache_matmul(steps, p.mm_a_proj, y, w.a_proj, w.a_proj_p, w.a_proj_b, a, &h);
        // h_next = a + mlp.c_proj(act(mlp.c_fc(n_2(a or h))))
        {
          const NormParams n2 = w.ln_2;
          float *x = sequential ? p.a.data() : p.h[l].data(), *out = p.ln_out.data();
          float *mean = p.mean.data(), *rstd = p.rstd.data();
          loop(small_rows, [=] { norm_forward(n2, x, out, mean, rstd, N, !small_rows); });
        }
        // GELU fused into oneDNN's matmul, or after the streaming kernels
        cache_matmul(steps, p.mm_fc, ln_out, w.c_fc, w.c_fc_p, w.c_fc_b, swiglu ? fc : fc_act, nullptr,
                     swiglu ? nullptr : &m.spec_.arch);
        if (swiglu) {
          float *f = p.fc.data(), *act = p.fc_act.data();
          const Index I = m.inner_;
          loop(small_fc, [=] { swiglu_forward(f, act, N, I, !small_fc); });
        }
        cache_matmul(steps, p.mm_m_proj, fc_act, w.m_proj, w.m_proj_p, w.m_proj_b, h_next, &a);
      }
      if (append) return steps;

      // the head, into out_main
      memory out = p.out_main;
      float* hk = p.h[m.k_].data();
      if (m.spec_.head == Head::none) {
        loop(small_rows, [=] { add_rows(hk, nullptr, ptr(out), N, d, !small_rows); });
      } else if (m.spec_.head == Head::lm_head_no_ln_f) {
        steps.push_back(block_step(p.mm_head, view(p.h[m.k_], nd), m.head_t_, memory(), out));
      } else {
        const bool lm_head = m.spec_.head == Head::lm_head;
        memory normed = lm_head ? view(p.lnf_out, nd) : out;
        const NormParams nf = m.ln_f_;
        float *mean = p.mean.data(), *rstd = p.rstd.data();
        loop(small_rows, [=] { norm_forward(nf, hk, ptr(normed), mean, rstd, N, !small_rows); });
        if (lm_head) steps.push_back(block_step(p.mm_head, normed, m.head_t_, memory(), out));
      }
      return steps;
    }

    // One pass of `p` over S kept positions on `rows` ([N, width], any dtype); next: the output rows into `out`.
    void run(RowPlan& p, Index S, bool append, const Tensor& rows, float* out) {
      Pass& ps = pass(p, S, append);
      Tensor converted;
      if (rows.dtype() != DType::f32) converted = rows.to(DType::f32);
      bind(p.in, rows.dtype() == DType::f32 ? rows.data<float>() : converted.data<float>());
      const bool layers = !m_.spec_.layers.empty();
      if (!append && !layers) bind(p.out_main, out);
      run_steps(m_.ctx_, ps.steps);
      bind(p.in, nullptr);  // the caller's rows are not kept
      if (!append && !layers) bind(p.out_main, nullptr);
      if (append || !layers) return;
      const Index N = p.N, d = m_.d_, main_width = m_.main_width_, out_width = m_.out_width_;
      for (Index n = 0; n < N; ++n) {  // [ main | h_layers[0] | ... ] per row
        float* row = out + n * out_width;
        std::memcpy(row, p.main.data() + n * main_width, static_cast<std::size_t>(main_width) * sizeof(float));
        for (std::size_t j = 0; j < m_.spec_.layers.size(); ++j)
          std::memcpy(row + main_width + static_cast<Index>(j) * d, p.h[m_.spec_.layers[j]].data() + n * d,
                      static_cast<std::size_t>(d) * sizeof(float));
      }
    }

    static constexpr std::size_t kMaxPasses = 64;  // per plan

    DecoderModel& m_;
    const Index limit_;       // the longest prefix plus candidate
    const char* limit_name_;  // n_positions or seq_len
    Index length_ = 0;
    std::vector<Buffer> kv_;  // per block [capacity_, 2 kvw]: the kept positions' [k | v]
    Index capacity_ = 0;
    std::uint64_t generation_ = 0;  // bumped when kv_ moves
    Plans plans_[2];                // for next, for append
    std::uint64_t clock_ = 0;
    RowPlan* last_ = nullptr;  // the last next()'s plan, holding its candidates' keys and values ...
    Index last_count_ = 0;     // ... for its last_count_ candidates; 0: none (an append or reset since)
  };

  static constexpr std::size_t kMaxPlans = 8;
  static constexpr Index kPlanBytes = Index{4} << 30;  // the plans' buffers together, beyond the newest one

  ModelSpec spec_;
  Context ctx_;
  std::shared_ptr<WeightStore> store_;  // the weights, shared with the other models on them
  Index d_ = 0, nh_ = 0, nkv_ = 0, G_ = 1, hd_ = 0, qw_ = 0, kvw_ = 0, W_ = 0, inner_ = 0, fcw_ = 0, V_ = 0, P_ = 0;
  Index k_ = 0;  // blocks of the main output
  Index L_ = 0;  // blocks run
  Index main_width_ = 0, out_width_ = 0;
  Matrix wte_, wte_t_, head_, head_t_;
  NormParams ln_f_;
  const float* wpe_ = nullptr;  // learned positions
  Rotary rot_;                  // rotary positions
  std::vector<float> cos_, sin_;
  std::vector<BlockWeights> blocks_;
  Buffer scratch_;  // int8 models: the one block weight dequantised at a time (Matrix::dequantise)

  std::map<std::pair<Index, Index>, std::unique_ptr<Plan>> plans_;  // by (B, T)
  std::uint64_t clock_ = 0;
  Plan* saved_plan_ = nullptr;  // the plan holding the activations of the forward pass on saved_input_
  Tensor saved_input_;
  std::unique_ptr<Cache> cache_;  // made on the first request for the capability
  std::unique_ptr<OnednnMatmulProbe> probe_;  // likewise
};

}  // namespace

std::unique_ptr<Model> make_decoder_model(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads) {
  return std::make_unique<DecoderModel>(spec, std::move(store), threads);
}

}  // namespace lminv::onednn
