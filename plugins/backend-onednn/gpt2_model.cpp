// GPT-2 on oneDNN: the same model as the reference backend's gpt2_model.cpp (Hugging Face's GPT2LMHeadModel truncated
// to its first k blocks), f32, forward and input gradient.
//
//   h_0   = x + wpe[0:T],   x = input (input = embedding, [B, T, d]) or input @ wte (input = vocab, [B, T, V])
//   a_l   = h_l + attn.c_proj(attention(attn.c_attn(ln_1(h_l))))                 for l = 0 .. L - 1
//   h_l+1 = a_l + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a_l))))
//   output = [ main(h_k) | h_layers[0] | h_layers[1] | ... ] along the last dimension, [B, T, D_main + d len(layers)]
//   main   = h_k (head none), ln_f(h_k) (head ln_f) or ln_f(h_k) @ wte^T (head lm_head, D_main = V)
// with k = spec.blocks and L = max(k, max(layers)) the blocks actually run.
//
// Primitives (one plan per batch size B, N = B T rows; every primitive made once and reused by all blocks):
//   LayerNorm         layer_normalization_forward (training: it saves mean and variance) / _backward (prop_kind
//                     backward: 2.6 refuses the scale with backward_data), scale and shift from ln_*.weight /
//                     ln_*.bias, epsilon from the spec.
//   Conv1D            matmul on the stored [in, out] weight, bias fused; the residual adds a_l = h_l + ... and
//                     h_l+1 = a_l + ... are fused into the projections as a binary-add post-op. The input gradient is
//                     a matmul on the same bytes read as [out, in] (format ba): no transposed copy is kept.
//   attention         q, k, v are strided 4-D views [B, NH, T, hs] into the [N, 3d] qkv buffer (no split copies):
//                     scores = matmul(q, k^T) with output scale 1/sqrt(hs) and the causal mask added by a binary
//                     post-op (a precomputed [B, NH, T, T] tensor: 0 on and below the diagonal, -1e30 above it, so the
//                     softmax gives exact zeros there; a mask broadcast over B and NH would put oneDNN 2.6's matmul on
//                     its slow reference kernel); softmax_forward over the last axis; y = matmul(att, v) written
//                     straight into the heads' columns of [N, d]. Backward: datt = dy v^T, dv = att^T dy,
//                     dscores = softmax_backward(att, datt), dq = dscores k / sqrt(hs), dk = dscores^T q / sqrt(hs),
//                     each a matmul on strided views, writing into the q, k, v columns of dqkv.
//   GELU (tanh)       eltwise_forward / eltwise_backward with eltwise_gelu_tanh.
//   residual (bwd)    binary add.
//   embedding         binary add of wpe (tiled to [N, d] once per plan) to the input; vocab: matmul with wte [V, d]
//                     and the same add as a post-op. Backward: a copy, or a matmul with wte read as [d, V].
//   lm_head           matmul with wte read as [d, V] (format ba, tied, no copy); backward with wte as stored.
// The extra layers' columns of the output and of its gradient are gathered and scattered with row copies.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "onednn_backend.hpp"
#include "onednn_common.hpp"

namespace lminv::onednn {

namespace {

// A block's weights as oneDNN memory.
struct BlockWeights {
  memory ln_1_w, ln_1_b, ln_2_w, ln_2_b;
  memory c_attn, c_attn_t, c_attn_b;  // [d, 3d] and, for the input gradient, [3d, d]
  memory a_proj, a_proj_t, a_proj_b;  // [d, d]
  memory c_fc, c_fc_t, c_fc_b;        // [d, inner], [inner, d]
  memory m_proj, m_proj_t, m_proj_b;  // [inner, d], [d, inner]
};

class Gpt2Model final : public Model {
 public:
  Gpt2Model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads)
      : spec_(spec), weights_(weights, ctx_, "family 'gpt2'" + sizes()) {
    ctx_.threads = threads;
    C_ = spec.n_embd;
    NH_ = spec.n_head;
    hs_ = C_ / NH_;
    inner_ = spec.inner();
    T_ = spec.seq_len;
    V_ = spec.vocab_size;
    k_ = spec.blocks;
    L_ = k_;
    for (Index l : spec.layers) L_ = std::max(L_, l);
    main_width_ = spec.head == Head::lm_head ? V_ : C_;
    out_width_ = main_width_ + C_ * static_cast<Index>(spec.layers.size());

    const Index m = T_;  // rows of a batch of one
    if (spec.input == InputSpace::vocab) {
      wte_ = weights_.matrix("wte.weight", {V_, C_}, false, m);   // x = v @ wte
      wte_t_ = weights_.matrix("wte.weight", {V_, C_}, true, m);  // dv = dx @ wte^T
    }
    if (spec.head == Head::lm_head) {
      wte_t_ = weights_.matrix("wte.weight", {V_, C_}, true, m);  // logits = x @ wte^T
      wte_ = weights_.matrix("wte.weight", {V_, C_}, false, m);   // dx = dlogits @ wte
    }
    wpe_ = weights_.data("wpe.weight", {spec.n_positions, C_});
    for (Index l = 0; l < L_; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      BlockWeights w;
      w.ln_1_w = weights_.vector(h + "ln_1.weight", C_, {C_});
      w.ln_1_b = weights_.vector(h + "ln_1.bias", C_, {C_});
      w.ln_2_w = weights_.vector(h + "ln_2.weight", C_, {C_});
      w.ln_2_b = weights_.vector(h + "ln_2.bias", C_, {C_});
      w.c_attn = weights_.matrix(h + "attn.c_attn.weight", {C_, 3 * C_}, false, m);
      w.c_attn_t = weights_.matrix(h + "attn.c_attn.weight", {C_, 3 * C_}, true, m);
      w.c_attn_b = weights_.vector(h + "attn.c_attn.bias", 3 * C_, {1, 3 * C_});
      w.a_proj = weights_.matrix(h + "attn.c_proj.weight", {C_, C_}, false, m);
      w.a_proj_t = weights_.matrix(h + "attn.c_proj.weight", {C_, C_}, true, m);
      w.a_proj_b = weights_.vector(h + "attn.c_proj.bias", C_, {1, C_});
      w.c_fc = weights_.matrix(h + "mlp.c_fc.weight", {C_, inner_}, false, m);
      w.c_fc_t = weights_.matrix(h + "mlp.c_fc.weight", {C_, inner_}, true, m);
      w.c_fc_b = weights_.vector(h + "mlp.c_fc.bias", inner_, {1, inner_});
      w.m_proj = weights_.matrix(h + "mlp.c_proj.weight", {inner_, C_}, false, m);
      w.m_proj_t = weights_.matrix(h + "mlp.c_proj.weight", {inner_, C_}, true, m);
      w.m_proj_b = weights_.vector(h + "mlp.c_proj.bias", C_, {1, C_});
      blocks_.push_back(w);
    }
    if (spec.head != Head::none) {
      ln_f_w_ = weights_.vector("ln_f.weight", C_, {C_});
      ln_f_b_ = weights_.vector("ln_f.bias", C_, {C_});
    }
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the forward pass", [&] {
      check_input(input);
      if (input.dim(0) == 0) return Tensor(DType::f32, {0, T_, out_width_});
      Plan& p = prepare(input);
      Tensor output(DType::f32, {p.B, T_, out_width_});
      run_forward(p, input, output.data<float>());
      saved_input_ = input;
      return output;
    });
  }

  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the backward pass", [&] {
      check_input(input);
      const Index B = input.dim(0);
      const Shape expected{B, T_, out_width_};
      if (grad_output.shape() != expected)
        throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                    shape_string(expected) + " (the output's shape for a batch of " + std::to_string(B) + ")");
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
      const Index B = input.dim(0);
      const Shape shape{B, T_, out_width_};
      const bool trailing_equal = target.rank() == 3 && target.dim(1) == T_ && target.dim(2) == out_width_;
      if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != B))
        throw Error("loss: target " + shape_string(target.shape()) + " does not match output " + shape_string(shape));
      if (B == 0) return LossAndGrad{{}, Tensor(input.dtype(), input.shape())};
      Plan& p = prepare(input);
      run_forward(p, input, ensure(p.output, p.N * out_width_));
      ensure(p.grad_out, p.N * out_width_);
      std::vector<double> loss =
          metric_and_grad_f32(p.output.data(), p.B, T_ * out_width_, target, metric, p.grad_out.data(), ctx_.threads);
      return LossAndGrad{std::move(loss), run_backward(p, p.grad_out.data(), input.dtype())};
    });
  }

 private:
  // Everything a batch size needs: buffers, the primitives and their arguments.
  struct Plan {
    Index B = 0, N = 0;
    // forward: residual stream h_0 .. h_L, per block what the backward pass needs, scratch
    std::vector<Buffer> h;
    struct Saved {
      Buffer ln_1_mean, ln_1_var, qkv, att, a, ln_2_mean, ln_2_var, fc;
    };
    std::vector<Saved> saved;
    Buffer ln_f_mean, ln_f_var, ln_f_out, wpe, mask, ln_out, y, fc_act;
    Buffer main, output, grad_out;  // main: the head's output when layers is not empty; output, grad_out: for loss
    // backward scratch
    Buffer dh[2], dmain, dlnf, dhk, dscale, dshift, dfc_act, dfc, dln, dbranch, da, dy, datt, dscores, dqkv;
    std::vector<Buffer> dextra;
    memory in, out_main, grad_main, grad_in;  // bound at every call (out_main, grad_main when layers is empty)
    std::vector<Step> forward, backward;
    std::uint64_t used = 0;
  };

  std::string sizes() const {
    return " (n_embd " + std::to_string(spec_.n_embd) + ", n_inner " + std::to_string(spec_.inner()) + ", vocab_size " +
           std::to_string(spec_.vocab_size) + ", n_positions " + std::to_string(spec_.n_positions) + ")";
  }

  Index width() const { return spec_.input == InputSpace::embedding ? C_ : V_; }

  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) != T_ || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  std::to_string(T_) + ", " + std::to_string(width()) +
                  "] (family 'gpt2', input = " + input_space_name(spec_.input) + ")");
  }

  bool same_input(const Tensor& input) const {
    return input.dtype() == saved_input_.dtype() && input.shape() == saved_input_.shape() &&
           std::memcmp(input.raw(), saved_input_.raw(), input.nbytes()) == 0;
  }

  Plan& prepare(const Tensor& input) {
    check_input(input);
    saved_input_ = Tensor();
    saved_plan_ = nullptr;
    auto it = plans_.find(input.dim(0));
    if (it == plans_.end()) {
      if (plans_.size() >= kMaxPlans) {  // forget the least recently used batch size
        auto oldest = plans_.begin();
        for (auto i = plans_.begin(); i != plans_.end(); ++i)
          if (i->second->used < oldest->second->used) oldest = i;
        plans_.erase(oldest);
      }
      it = plans_.emplace(input.dim(0), build(input.dim(0))).first;
    }
    it->second->used = ++clock_;
    return *it->second;
  }

  // ---- building a plan --------------------------------------------------------------------------------------------

  std::unique_ptr<Plan> build(Index B) {
    auto plan = std::make_unique<Plan>();
    Plan& p = *plan;
    const Index N = B * T_, C = C_, T = T_, NH = NH_, hs = hs_;
    p.B = B;
    p.N = N;
    const bool layers = !spec_.layers.empty();
    const float eps = static_cast<float>(spec_.layer_norm_epsilon);

    // descriptors
    const memory::desc nc = plain({N, C}), n3c = plain({N, 3 * C}), ni = plain({N, inner_}), stat = plain({N});
    const memory::desc scores = plain({B, NH, T, T});
    const memory::desc scores_t = strided({B, NH, T, T}, {NH * T * T, T * T, 1, T});     // att^T, dscores^T
    const memory::desc head_qkv = strided({B, NH, T, hs}, {T * 3 * C, hs, 3 * C, 1});    // q, k or v (offset 0, C, 2C)
    const memory::desc head_qkv_t = strided({B, NH, hs, T}, {T * 3 * C, hs, 1, 3 * C});  // k^T or v^T
    const memory::desc head_y = strided({B, NH, T, hs}, {T * C, hs, C, 1});              // heads' columns of [N, C]
    const memory::desc main_md = plain({N, main_width_});
    const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

    // buffers
    p.h.resize(static_cast<std::size_t>(L_ + 1));
    for (Buffer& b : p.h) b = Buffer(N * C);
    p.saved.resize(static_cast<std::size_t>(L_));
    for (Plan::Saved& s : p.saved) {
      s.ln_1_mean = Buffer(N);
      s.ln_1_var = Buffer(N);
      s.qkv = Buffer(N * 3 * C);
      s.att = Buffer(B * NH * T * T);
      s.a = Buffer(N * C);
      s.ln_2_mean = Buffer(N);
      s.ln_2_var = Buffer(N);
      s.fc = Buffer(N * inner_);
    }
    p.ln_out = Buffer(N * C);
    p.y = Buffer(N * C);
    p.fc_act = Buffer(N * inner_);
    p.wpe = Buffer(N * C);
    for (Index n = 0; n < N; ++n)
      std::memcpy(p.wpe.data() + n * C, wpe_ + (n % T) * C, static_cast<std::size_t>(C) * sizeof(float));
    p.mask = Buffer(B * NH * T * T);
    for (Index bh = 0; bh < B * NH; ++bh)
      for (Index t = 0; t < T; ++t)
        for (Index t2 = t + 1; t2 < T; ++t2) p.mask.data()[(bh * T + t) * T + t2] = -1e30f;

    // ---- primitives (one each, shared by all blocks) ----
    // Steps too small for a team (at batch 1: the LayerNorms, adds, GELUs and the attention core) are made for, and
    // run with, one thread.
    const bool small_rows = N * C < kSmallWork, small_fc = N * inner_ < kSmallWork;
    const bool small_att = B * NH * T * T * hs < kSmallWork;
    const memory::desc b3c = plain({1, 3 * C}), bc = plain({1, C}), bi = plain({1, inner_});
    const auto ln_pd = made_with(small_rows, [&] {
      return make("layer normalization", [&] {
        return dnnl::layer_normalization_forward::primitive_desc(
            dnnl::layer_normalization_forward::desc(dnnl::prop_kind::forward_training, nc, eps, flags), ctx_.engine);
      });
    });
    const dnnl::layer_normalization_forward ln_fwd = made_with(small_rows, [&] {
      return make("layer normalization", [&] { return dnnl::layer_normalization_forward(ln_pd); });
    });
    const auto ln_bwd = made_with(small_rows, [&] {
      return make("layer normalization backward", [&] {
        return dnnl::layer_normalization_backward(dnnl::layer_normalization_backward::primitive_desc(
            dnnl::layer_normalization_backward::desc(dnnl::prop_kind::backward, nc, nc, eps, flags), ctx_.engine,
            ln_pd));
      });
    });
    const dnnl::binary add_nc =
        made_with(small_rows, [&] { return make("residual add", [&] { return add(ctx_, nc); }); });
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    dnnl::matmul mm_qkv, mm_scores, mm_av, mm_a_proj, mm_fc, mm_m_proj;
    dnnl::matmul mm_m_proj_bwd, mm_fc_bwd, mm_a_proj_bwd, mm_datt, mm_dv, mm_dq, mm_dk, mm_qkv_bwd;
    dnnl::softmax_forward softmax_fwd;
    dnnl::softmax_backward softmax_bwd;
    dnnl::eltwise_forward gelu_fwd;
    dnnl::eltwise_backward gelu_bwd;
    if (L_ > 0) {
      mm_qkv = matmul("attn.c_attn matmul", ctx_, nc, desc_of(&BlockWeights::c_attn), &b3c, n3c);
      mm_a_proj =
          matmul("attn.c_proj matmul", ctx_, nc, desc_of(&BlockWeights::a_proj), &bc, nc, matmul_attr(1.f, &nc));
      mm_fc = matmul("mlp.c_fc matmul", ctx_, nc, desc_of(&BlockWeights::c_fc), &bi, ni);
      mm_m_proj = matmul("mlp.c_proj matmul", ctx_, ni, desc_of(&BlockWeights::m_proj), &bc, nc, matmul_attr(1.f, &nc));
      mm_m_proj_bwd = matmul("mlp.c_proj backward matmul", ctx_, nc, desc_of(&BlockWeights::m_proj_t), nullptr, ni);
      mm_fc_bwd = matmul("mlp.c_fc backward matmul", ctx_, ni, desc_of(&BlockWeights::c_fc_t), nullptr, nc);
      mm_a_proj_bwd = matmul("attn.c_proj backward matmul", ctx_, nc, desc_of(&BlockWeights::a_proj_t), nullptr, nc);
      mm_qkv_bwd = matmul("attn.c_attn backward matmul", ctx_, n3c, desc_of(&BlockWeights::c_attn_t), nullptr, nc);
      made_with(small_att, [&] {
        mm_scores =
            matmul("attention scores matmul", ctx_, head_qkv, head_qkv_t, nullptr, scores, matmul_attr(scale, &scores));
        const auto softmax_pd = make("softmax", [&] {
          return dnnl::softmax_forward::primitive_desc(
              dnnl::softmax_forward::desc(dnnl::prop_kind::forward_training, scores, 3), ctx_.engine);
        });
        softmax_fwd = make("softmax", [&] { return dnnl::softmax_forward(softmax_pd); });
        mm_av = matmul("attention output matmul", ctx_, scores, head_qkv, nullptr, head_y);
        mm_datt = matmul("attention probabilities backward matmul", ctx_, head_y, head_qkv_t, nullptr, scores);
        mm_dv = matmul("attention values backward matmul", ctx_, scores_t, head_y, nullptr, head_qkv);
        softmax_bwd = make("softmax backward", [&] {
          return dnnl::softmax_backward(dnnl::softmax_backward::primitive_desc(
              dnnl::softmax_backward::desc(scores, scores, 3), ctx_.engine, softmax_pd));
        });
        mm_dq = matmul("attention queries backward matmul", ctx_, scores, head_qkv, nullptr, head_qkv,
                       matmul_attr(scale, nullptr));
        mm_dk = matmul("attention keys backward matmul", ctx_, scores_t, head_qkv, nullptr, head_qkv,
                       matmul_attr(scale, nullptr));
      });
      made_with(small_fc, [&] {
        const auto gelu_pd = make("GELU", [&] {
          return dnnl::eltwise_forward::primitive_desc(
              dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::eltwise_gelu_tanh, ni,
                                          0.f, 0.f),
              ctx_.engine);
        });
        gelu_fwd = make("GELU", [&] { return dnnl::eltwise_forward(gelu_pd); });
        gelu_bwd = make("GELU backward", [&] {
          return dnnl::eltwise_backward(dnnl::eltwise_backward::primitive_desc(
              dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_gelu_tanh, ni, ni, 0.f, 0.f), ctx_.engine,
              gelu_pd));
        });
      });
    }
    auto reorder = [&](const memory& from, const memory& to) {
      return made_with(small_rows, [&] { return make("copy", [&] { return dnnl::reorder(from, to); }); });
    };

    // ---- forward ----
    auto view = [&](Buffer& b, const memory::desc& md, Index offset = 0) { return b.view(ctx_, md, offset); };
    p.in = external(ctx_, spec_.input == InputSpace::vocab ? plain({N, V_}) : nc);
    memory wpe = view(p.wpe, nc);
    if (spec_.input == InputSpace::embedding) {
      p.forward.push_back(
          {add_nc, {{DNNL_ARG_SRC_0, p.in}, {DNNL_ARG_SRC_1, wpe}, {DNNL_ARG_DST, view(p.h[0], nc)}}, small_rows});
    } else {
      p.forward.push_back(
          {matmul("vocabulary embedding matmul", ctx_, plain({N, V_}), wte_.get_desc(), nullptr, nc,
                  matmul_attr(1.f, &nc)),
           {{DNNL_ARG_SRC, p.in}, {DNNL_ARG_WEIGHTS, wte_}, {DNNL_ARG_DST, view(p.h[0], nc)}, {kPostOpSrc1, wpe}}});
    }
    memory ln_out = view(p.ln_out, nc), y = view(p.y, nc), fc_act = view(p.fc_act, ni);
    for (Index l = 0; l < L_; ++l) {
      const BlockWeights& w = blocks_[l];
      Plan::Saved& s = p.saved[l];
      memory h = view(p.h[l], nc), h_next = view(p.h[l + 1], nc), a = view(s.a, nc);
      memory qkv = view(s.qkv, n3c), att = view(s.att, scores), fc = view(s.fc, ni);
      // a = h + attn.c_proj(attention(attn.c_attn(ln_1(h))))
      p.forward.push_back({ln_fwd,
                           {{DNNL_ARG_SRC, h},
                            {DNNL_ARG_DST, ln_out},
                            {DNNL_ARG_SCALE, w.ln_1_w},
                            {DNNL_ARG_SHIFT, w.ln_1_b},
                            {DNNL_ARG_MEAN, view(s.ln_1_mean, stat)},
                            {DNNL_ARG_VARIANCE, view(s.ln_1_var, stat)}},
                           small_rows});
      p.forward.push_back(
          {mm_qkv,
           {{DNNL_ARG_SRC, ln_out}, {DNNL_ARG_WEIGHTS, w.c_attn}, {DNNL_ARG_BIAS, w.c_attn_b}, {DNNL_ARG_DST, qkv}}});
      p.forward.push_back({mm_scores,
                           {{DNNL_ARG_SRC, view(s.qkv, head_qkv, 0)},
                            {DNNL_ARG_WEIGHTS, view(s.qkv, head_qkv_t, C)},
                            {DNNL_ARG_DST, att},
                            {kPostOpSrc1, view(p.mask, scores)}},
                           small_att});
      p.forward.push_back({softmax_fwd, {{DNNL_ARG_SRC, att}, {DNNL_ARG_DST, att}}, small_att});
      p.forward.push_back(
          {mm_av,
           {{DNNL_ARG_SRC, att}, {DNNL_ARG_WEIGHTS, view(s.qkv, head_qkv, 2 * C)}, {DNNL_ARG_DST, view(p.y, head_y)}}});
      p.forward.push_back({mm_a_proj,
                           {{DNNL_ARG_SRC, y},
                            {DNNL_ARG_WEIGHTS, w.a_proj},
                            {DNNL_ARG_BIAS, w.a_proj_b},
                            {DNNL_ARG_DST, a},
                            {kPostOpSrc1, h}}});
      // h_next = a + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a))))
      p.forward.push_back({ln_fwd,
                           {{DNNL_ARG_SRC, a},
                            {DNNL_ARG_DST, ln_out},
                            {DNNL_ARG_SCALE, w.ln_2_w},
                            {DNNL_ARG_SHIFT, w.ln_2_b},
                            {DNNL_ARG_MEAN, view(s.ln_2_mean, stat)},
                            {DNNL_ARG_VARIANCE, view(s.ln_2_var, stat)}},
                           small_rows});
      p.forward.push_back(
          {mm_fc, {{DNNL_ARG_SRC, ln_out}, {DNNL_ARG_WEIGHTS, w.c_fc}, {DNNL_ARG_BIAS, w.c_fc_b}, {DNNL_ARG_DST, fc}}});
      p.forward.push_back({gelu_fwd, {{DNNL_ARG_SRC, fc}, {DNNL_ARG_DST, fc_act}}, small_fc});
      p.forward.push_back({mm_m_proj,
                           {{DNNL_ARG_SRC, fc_act},
                            {DNNL_ARG_WEIGHTS, w.m_proj},
                            {DNNL_ARG_BIAS, w.m_proj_b},
                            {DNNL_ARG_DST, h_next},
                            {kPostOpSrc1, a}}});
    }
    // the head, into the output (layers empty: bound at every call) or into `main`
    if (layers) p.main = Buffer(N * main_width_);
    p.out_main = layers ? view(p.main, main_md) : external(ctx_, main_md);
    memory h_k = view(p.h[k_], nc);
    if (spec_.head == Head::none) {
      p.forward.push_back({reorder(h_k, p.out_main), {{DNNL_ARG_FROM, h_k}, {DNNL_ARG_TO, p.out_main}}, small_rows});
    } else {
      p.ln_f_mean = Buffer(N);
      p.ln_f_var = Buffer(N);
      memory normed = p.out_main;
      if (spec_.head == Head::lm_head) {
        p.ln_f_out = Buffer(N * C);
        normed = view(p.ln_f_out, nc);
      }
      p.forward.push_back({ln_fwd,
                           {{DNNL_ARG_SRC, h_k},
                            {DNNL_ARG_DST, normed},
                            {DNNL_ARG_SCALE, ln_f_w_},
                            {DNNL_ARG_SHIFT, ln_f_b_},
                            {DNNL_ARG_MEAN, view(p.ln_f_mean, stat)},
                            {DNNL_ARG_VARIANCE, view(p.ln_f_var, stat)}},
                           small_rows});
      if (spec_.head == Head::lm_head) {
        p.forward.push_back({matmul("lm_head matmul", ctx_, nc, wte_t_.get_desc(), nullptr, main_md),
                             {{DNNL_ARG_SRC, normed}, {DNNL_ARG_WEIGHTS, wte_t_}, {DNNL_ARG_DST, p.out_main}}});
      }
    }

    // ---- backward ----
    for (Buffer& b : p.dh) b = Buffer(N * C);
    p.dfc_act = Buffer(N * inner_);
    p.dfc = Buffer(N * inner_);
    p.dln = Buffer(N * C);
    p.dbranch = Buffer(N * C);
    p.da = Buffer(N * C);
    p.dy = Buffer(N * C);
    p.datt = Buffer(B * NH * T * T);
    p.dscores = Buffer(B * NH * T * T);
    p.dqkv = Buffer(N * 3 * C);
    if (layers) {
      p.dmain = Buffer(N * main_width_);
      p.dextra.resize(spec_.layers.size());
      for (Buffer& b : p.dextra) b = Buffer(N * C);
    }
    p.grad_main = layers ? view(p.dmain, main_md) : external(ctx_, main_md);
    // LayerNorm's backward pass in oneDNN 2.6 takes the scale only with prop_kind::backward (backward_data refuses
    // use_scale), which also gives the parameters' gradients: they go to scratch and are not used.
    p.dscale = Buffer(C);
    p.dshift = Buffer(C);
    memory dscale = view(p.dscale, plain({C})), dshift = view(p.dshift, plain({C}));

    // the head's gradient with respect to h_k
    memory dhk = p.grad_main;
    if (spec_.head != Head::none) {
      p.dhk = Buffer(N * C);
      dhk = view(p.dhk, nc);
      memory dnormed = p.grad_main;
      if (spec_.head == Head::lm_head) {
        p.dlnf = Buffer(N * C);
        dnormed = view(p.dlnf, nc);
        p.backward.push_back({matmul("lm_head backward matmul", ctx_, main_md, wte_.get_desc(), nullptr, nc),
                              {{DNNL_ARG_SRC, p.grad_main}, {DNNL_ARG_WEIGHTS, wte_}, {DNNL_ARG_DST, dnormed}}});
      }
      p.backward.push_back({ln_bwd,
                            {{DNNL_ARG_SRC, h_k},
                             {DNNL_ARG_MEAN, view(p.ln_f_mean, stat)},
                             {DNNL_ARG_VARIANCE, view(p.ln_f_var, stat)},
                             {DNNL_ARG_DIFF_DST, dnormed},
                             {DNNL_ARG_SCALE, ln_f_w_},
                             {DNNL_ARG_SHIFT, ln_f_b_},
                             {DNNL_ARG_DIFF_SRC, dhk},
                             {DNNL_ARG_DIFF_SCALE, dscale},
                             {DNNL_ARG_DIFF_SHIFT, dshift}},
                            small_rows});
    }

    // Down the residual stream from h_L to h_0: h_l's gradient is the sum of what reaches it through the blocks above
    // and directly (as h_k under the head, as an extra layer). `cur` is that gradient so far (null: zero); it is one
    // of the two dh buffers, or, before anything was added to it, the one contribution itself.
    memory cur;
    int cur_buffer = -1;  // which dh buffer cur is, or -1
    memory dln = view(p.dln, nc), dbranch = view(p.dbranch, nc), da = view(p.da, nc), dy = view(p.dy, nc);
    memory dfc_act = view(p.dfc_act, ni), dfc = view(p.dfc, ni), dqkv = view(p.dqkv, n3c);
    memory datt = view(p.datt, scores), dscores = view(p.dscores, scores);
    for (Index l = L_; l >= 0; --l) {
      std::vector<memory> parts;
      if (l == k_) parts.push_back(dhk);
      for (std::size_t j = 0; j < spec_.layers.size(); ++j)
        if (spec_.layers[j] == l) parts.push_back(view(p.dextra[j], nc));
      for (memory& part : parts) {
        if (!cur) {
          cur = part;
          continue;
        }
        const int target = cur_buffer >= 0 ? cur_buffer : 0;
        memory sum = view(p.dh[target], nc);
        p.backward.push_back(
            {add_nc, {{DNNL_ARG_SRC_0, cur}, {DNNL_ARG_SRC_1, part}, {DNNL_ARG_DST, sum}}, small_rows});
        cur = sum;
        cur_buffer = target;
      }
      if (l == 0) break;
      // block l - 1: cur is the gradient of h_l, into dh_out the gradient of h_l-1
      const Index b = l - 1;
      const BlockWeights& w = blocks_[b];
      Plan::Saved& s = p.saved[b];
      const int out_buffer = cur_buffer == 0 ? 1 : 0;
      memory dh_out = view(p.dh[out_buffer], nc);
      memory fc = view(s.fc, ni), att = view(s.att, scores);
      // h_next = a + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a))))
      p.backward.push_back(
          {mm_m_proj_bwd, {{DNNL_ARG_SRC, cur}, {DNNL_ARG_WEIGHTS, w.m_proj_t}, {DNNL_ARG_DST, dfc_act}}});
      p.backward.push_back(
          {gelu_bwd, {{DNNL_ARG_SRC, fc}, {DNNL_ARG_DIFF_DST, dfc_act}, {DNNL_ARG_DIFF_SRC, dfc}}, small_fc});
      p.backward.push_back({mm_fc_bwd, {{DNNL_ARG_SRC, dfc}, {DNNL_ARG_WEIGHTS, w.c_fc_t}, {DNNL_ARG_DST, dln}}});
      p.backward.push_back({ln_bwd,
                            {{DNNL_ARG_SRC, view(s.a, nc)},
                             {DNNL_ARG_MEAN, view(s.ln_2_mean, stat)},
                             {DNNL_ARG_VARIANCE, view(s.ln_2_var, stat)},
                             {DNNL_ARG_DIFF_DST, dln},
                             {DNNL_ARG_SCALE, w.ln_2_w},
                             {DNNL_ARG_SHIFT, w.ln_2_b},
                             {DNNL_ARG_DIFF_SRC, dbranch},
                             {DNNL_ARG_DIFF_SCALE, dscale},
                             {DNNL_ARG_DIFF_SHIFT, dshift}},
                            small_rows});
      p.backward.push_back(
          {add_nc, {{DNNL_ARG_SRC_0, cur}, {DNNL_ARG_SRC_1, dbranch}, {DNNL_ARG_DST, da}}, small_rows});
      // a = h + attn.c_proj(attention(attn.c_attn(ln_1(h))))
      p.backward.push_back({mm_a_proj_bwd, {{DNNL_ARG_SRC, da}, {DNNL_ARG_WEIGHTS, w.a_proj_t}, {DNNL_ARG_DST, dy}}});
      p.backward.push_back({mm_datt,
                            {{DNNL_ARG_SRC, view(p.dy, head_y)},
                             {DNNL_ARG_WEIGHTS, view(s.qkv, head_qkv_t, 2 * C)},
                             {DNNL_ARG_DST, datt}},
                            small_att});
      p.backward.push_back({mm_dv,
                            {{DNNL_ARG_SRC, view(s.att, scores_t)},
                             {DNNL_ARG_WEIGHTS, view(p.dy, head_y)},
                             {DNNL_ARG_DST, view(p.dqkv, head_qkv, 2 * C)}},
                            small_att});
      p.backward.push_back(
          {softmax_bwd, {{DNNL_ARG_DST, att}, {DNNL_ARG_DIFF_DST, datt}, {DNNL_ARG_DIFF_SRC, dscores}}, small_att});
      p.backward.push_back({mm_dq,
                            {{DNNL_ARG_SRC, dscores},
                             {DNNL_ARG_WEIGHTS, view(s.qkv, head_qkv, C)},
                             {DNNL_ARG_DST, view(p.dqkv, head_qkv, 0)}},
                            small_att});
      p.backward.push_back({mm_dk,
                            {{DNNL_ARG_SRC, view(p.dscores, scores_t)},
                             {DNNL_ARG_WEIGHTS, view(s.qkv, head_qkv, 0)},
                             {DNNL_ARG_DST, view(p.dqkv, head_qkv, C)}},
                            small_att});
      p.backward.push_back({mm_qkv_bwd, {{DNNL_ARG_SRC, dqkv}, {DNNL_ARG_WEIGHTS, w.c_attn_t}, {DNNL_ARG_DST, dln}}});
      p.backward.push_back({ln_bwd,
                            {{DNNL_ARG_SRC, view(p.h[b], nc)},
                             {DNNL_ARG_MEAN, view(s.ln_1_mean, stat)},
                             {DNNL_ARG_VARIANCE, view(s.ln_1_var, stat)},
                             {DNNL_ARG_DIFF_DST, dln},
                             {DNNL_ARG_SCALE, w.ln_1_w},
                             {DNNL_ARG_SHIFT, w.ln_1_b},
                             {DNNL_ARG_DIFF_SRC, dbranch},
                             {DNNL_ARG_DIFF_SCALE, dscale},
                             {DNNL_ARG_DIFF_SHIFT, dshift}},
                            small_rows});
      p.backward.push_back(
          {add_nc, {{DNNL_ARG_SRC_0, da}, {DNNL_ARG_SRC_1, dbranch}, {DNNL_ARG_DST, dh_out}}, small_rows});
      cur = dh_out;
      cur_buffer = out_buffer;
    }
    // the embedding: the positions are constants
    if (spec_.input == InputSpace::embedding) {
      p.grad_in = external(ctx_, nc);
      p.backward.push_back({reorder(cur, p.grad_in), {{DNNL_ARG_FROM, cur}, {DNNL_ARG_TO, p.grad_in}}, small_rows});
    } else {
      p.grad_in = external(ctx_, plain({N, V_}));
      p.backward.push_back(
          {matmul("vocabulary embedding backward matmul", ctx_, nc, wte_t_.get_desc(), nullptr, plain({N, V_})),
           {{DNNL_ARG_SRC, cur}, {DNNL_ARG_WEIGHTS, wte_t_}, {DNNL_ARG_DST, p.grad_in}}});
    }
    return plan;
  }

  // The desc of one of the blocks' weights (the same for every block: same shape, same preferred layout).
  memory::desc desc_of(memory BlockWeights::*which) const {
    const memory::desc md = (blocks_.front().*which).get_desc();
    for (const BlockWeights& w : blocks_)
      if ((w.*which).get_desc() != md) throw Error(std::string(kWho) + ": blocks' weights differ in layout");
    return md;
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
      const Index N = p.N, C = C_;
      for (Index n = 0; n < N; ++n) {
        float* row = output + n * out_width_;
        std::memcpy(row, p.main.data() + n * main_width_, static_cast<std::size_t>(main_width_) * sizeof(float));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(row + main_width_ + static_cast<Index>(j) * C, p.h[spec_.layers[j]].data() + n * C,
                      static_cast<std::size_t>(C) * sizeof(float));
      }
    }
    saved_plan_ = &p;
  }

  // The input gradient for `dout` ([N, out_width] floats) from the saved activations, in `dtype`.
  Tensor run_backward(Plan& p, const float* dout, DType dtype) {
    const bool layers = !spec_.layers.empty();
    if (layers) {
      const Index N = p.N, C = C_;
      for (Index n = 0; n < N; ++n) {
        const float* row = dout + n * out_width_;
        std::memcpy(p.dmain.data() + n * main_width_, row, static_cast<std::size_t>(main_width_) * sizeof(float));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(p.dextra[j].data() + n * C, row + main_width_ + static_cast<Index>(j) * C,
                      static_cast<std::size_t>(C) * sizeof(float));
      }
    } else {
      bind(p.grad_main, dout);
    }
    Tensor grad(DType::f32, {p.B, T_, width()});
    bind(p.grad_in, grad.data<float>());
    run_steps(ctx_, p.backward);
    return dtype == DType::f32 ? grad : grad.to(dtype);
  }

  static constexpr std::size_t kMaxPlans = 8;

  ModelSpec spec_;
  Context ctx_;
  WeightStore weights_;
  Index C_ = 0, NH_ = 0, hs_ = 0, inner_ = 0, T_ = 0, V_ = 0;
  Index k_ = 0;  // blocks of the main output
  Index L_ = 0;  // blocks run: max(k, layers)
  Index main_width_ = 0, out_width_ = 0;
  memory wte_, wte_t_, ln_f_w_, ln_f_b_;
  const float* wpe_ = nullptr;
  std::vector<BlockWeights> blocks_;

  std::map<Index, std::unique_ptr<Plan>> plans_;
  std::uint64_t clock_ = 0;
  Plan* saved_plan_ = nullptr;  // the plan holding the activations of the forward pass on saved_input_
  Tensor saved_input_;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw Error(std::string(kWho) + ": family 'gpt2' " + what);
}

}  // namespace

std::unique_ptr<Model> make_gpt2_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  require(spec.n_embd > 0, "needs a positive n_embd, got " + std::to_string(spec.n_embd));
  require(spec.n_head > 0, "needs a positive n_head, got " + std::to_string(spec.n_head));
  require(spec.n_embd % spec.n_head == 0, "needs n_embd divisible by n_head, got n_embd " +
                                              std::to_string(spec.n_embd) + " and n_head " +
                                              std::to_string(spec.n_head));
  require(spec.n_layer >= 0, "needs n_layer >= 0, got " + std::to_string(spec.n_layer));
  require(spec.inner() > 0, "needs a positive MLP width (n_inner, or 4 n_embd), got " + std::to_string(spec.inner()));
  require(spec.n_positions > 0, "needs a positive n_positions, got " + std::to_string(spec.n_positions));
  require(spec.seq_len > 0, "needs a positive seq_len (the prompt's token count), got " + std::to_string(spec.seq_len));
  require(spec.seq_len <= spec.n_positions, "takes at most n_positions = " + std::to_string(spec.n_positions) +
                                                " tokens, got seq_len " + std::to_string(spec.seq_len));
  require(spec.blocks >= 0 && spec.blocks <= spec.n_layer,
          "has n_layer = " + std::to_string(spec.n_layer) + " blocks: blocks must be in 0 .. " +
              std::to_string(spec.n_layer) + ", got " + std::to_string(spec.blocks));
  for (std::int64_t l : spec.layers)
    require(l >= 0 && l <= spec.n_layer, "has n_layer = " + std::to_string(spec.n_layer) +
                                             " blocks: every entry of layers must be in 0 .. " +
                                             std::to_string(spec.n_layer) + ", got " + std::to_string(l));
  if (spec.input == InputSpace::vocab || spec.head == Head::lm_head)
    require(spec.vocab_size > 0, "needs a positive vocab_size, got " + std::to_string(spec.vocab_size));
  require(std::isfinite(spec.layer_norm_epsilon) && spec.layer_norm_epsilon >= 0,
          "needs a finite layer_norm_epsilon >= 0, got " + std::to_string(spec.layer_norm_epsilon));
  if (spec.dtype != DType::f32)
    throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) + "' is not supported (supported: f32)");
  return std::make_unique<Gpt2Model>(spec, std::move(weights), threads);
}

}  // namespace lminv::onednn
