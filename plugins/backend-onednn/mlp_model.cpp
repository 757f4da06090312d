// The MLP kinds on oneDNN, the same computations as the reference backend's mlp_model.cpp:
//   fcnet                flatten [T, d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)      output [B, 4 T d]
//   fcnet_noninvertible  the same with a last layer of T d outputs                                output [B, T d]
//   transformer_mlp      per token: Linear(d, inner) -> GELU -> Linear(inner, d)                 output [B, T, d]
// GELU is the exact erf form (eltwise_gelu_erf). Input = vocab multiplies [B T, V] by wte [V, d] first. Linear
// weights are torch's [out, in]: the forward matmul reads them transposed ([in, out], format ba), the backward one as
// stored.
//
// transformer_mlp takes any length T in 1 .. n_positions (from the input); the fcnets the spec's seq_len alone.
// Per input shape (B, T), one plan: the primitives and the activation buffers, made once.
//   forward:  [vocab: x = v @ wte]  ->  h = x @ fc1^T + b1 (saved)  ->  a = gelu_erf(h)  ->  y = a @ fc2^T + b2
//   backward: da = dy @ fc2  ->  dh = gelu_erf'(h) da  ->  dx = dh @ fc1  ->  [vocab: dv = dx @ wte^T]

#include <list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "onednn_backend.hpp"
#include "onednn_common.hpp"

namespace lminv::onednn {

namespace {

class MlpModel final : public Model {
 public:
  MlpModel(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads)
      : spec_(spec), store_(std::move(store)) {
    ctx_.threads = threads;
    per_token_ = spec.kind == ModelKind::transformer_mlp;
    const Index d = spec.n_embd;
    // The row count oneDNN chooses weight layouts for: a batch of one.
    const Index T = spec.seq_len > 0 ? spec.seq_len : std::min<Index>(spec.n_positions > 0 ? spec.n_positions : 1, 16);
    if (per_token_) {
      in_ = d;
      hidden_ = spec.inner();
      out_ = d;
    } else {  // fcnet, fcnet_noninvertible
      in_ = T * d;
      hidden_ = 4 * in_;
      out_ = spec.kind == ModelKind::fcnet ? 4 * in_ : in_;
    }
    const Index m_hint = per_token_ ? T : 1;                                              // rows of a batch of one
    fc1_ = store_->matrix("fc1.weight", {hidden_, in_}, /*transposed=*/true, m_hint);     // [in, hidden]
    fc1_t_ = store_->matrix("fc1.weight", {hidden_, in_}, /*transposed=*/false, m_hint);  // [hidden, in]
    fc2_ = store_->matrix("fc2.weight", {out_, hidden_}, true, m_hint);                   // [hidden, out]
    fc2_t_ = store_->matrix("fc2.weight", {out_, hidden_}, false, m_hint);                // [out, hidden]
    b1_ = store_->vector("fc1.bias", hidden_, {1, hidden_});
    b2_ = store_->vector("fc2.bias", out_, {1, out_});
    if (spec.input == InputSpace::vocab) {
      wte_ = store_->matrix("wte.weight", {spec.vocab_size, d}, false, T);   // [V, d]
      wte_t_ = store_->matrix("wte.weight", {spec.vocab_size, d}, true, T);  // [d, V]
    }
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the forward pass", [&] {
      check_input(input);
      if (input.dim(0) == 0) return Tensor(DType::f32, output_shape(0, input.dim(1)));
      Plan& p = prepare(input);
      Tensor output(DType::f32, output_shape(p.B, p.T));
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
      if (grad_output.shape() != output_shape(B, T))
        throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                    shape_string(output_shape(B, T)) + " (the output's shape for this input)");
      if (B == 0) return Tensor(input.dtype(), input.shape());
      Plan* p = saved_plan_;
      if (!p || !same_input(input)) {
        p = &prepare(input);
        run_forward(*p, input, ensure(p->output, p->N * out_));
        saved_input_ = input;
      }
      Tensor converted;
      const float* dy = as_f32(grad_output, converted);
      return run_backward(*p, dy, input.dtype());
    });
  }

  // One forward pass keeping the activations, the metric on its output, one backward pass.
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    ThreadScope scope(ctx_.threads);
    return guarded("computing loss_and_grad", [&] {
      check_input(input);
      check_target_shape(output_shape(input.dim(0), input.dim(1)), target);
      if (input.dim(0) == 0) return LossAndGrad{{}, Tensor(input.dtype(), input.shape())};
      Plan& p = prepare(input);
      run_forward(p, input, ensure(p.output, p.N * out_));
      ensure(p.grad_out, p.N * out_);
      std::vector<double> loss = metric_and_grad_f32(p.output.data(), p.B, (p.N / p.B) * out_, target, metric,
                                                     p.grad_out.data(), ctx_.threads);
      return LossAndGrad{std::move(loss), run_backward(p, p.grad_out.data(), input.dtype())};
    });
  }

 private:
  struct Plan {
    Index B = 0, T = 0, N = 0;  // N: the rows of the matmuls (B T per token, B for the fcnets)
    Buffer embedded, hidden, activated, output, d_activated, d_hidden, d_embedded, grad_out;
    memory in, out, grad_y, grad_in;  // bound at every call
    std::vector<Step> forward, backward;
    std::uint64_t used = 0;
  };

  Index width() const { return spec_.input == InputSpace::embedding ? spec_.n_embd : spec_.vocab_size; }
  Shape output_shape(Index B, Index T) const {
    if (per_token_) return {B, T, spec_.n_embd};
    return {B, out_};
  }
  void check_input(const Tensor& input) const {
    const bool length_ok = input.rank() == 3 && (per_token_ ? input.dim(1) >= 1 && input.dim(1) <= spec_.n_positions
                                                            : input.dim(1) == spec_.seq_len);
    if (!length_ok || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  (per_token_ ? "T" : std::to_string(spec_.seq_len)) + ", " + std::to_string(width()) + "]" +
                  (per_token_ ? " with T in 1 .. n_positions = " + std::to_string(spec_.n_positions) : "") + " (" +
                  kind_name(spec_.kind) + ", input = " + input_space_name(spec_.input) + ")");
  }

  bool same_input(const Tensor& input) const {
    return input.dtype() == saved_input_.dtype() && input.shape() == saved_input_.shape() &&
           std::memcmp(input.raw(), saved_input_.raw(), input.nbytes()) == 0;
  }
  static const float* as_f32(const Tensor& t, Tensor& storage) {
    if (t.dtype() == DType::f32) return t.data<float>();
    storage = t.to(DType::f32);
    return storage.data<float>();
  }

  // The plan for the input's shape (made on first use), with the saved activations invalidated.
  Plan& prepare(const Tensor& input) {
    check_input(input);
    saved_input_ = Tensor();
    saved_plan_ = nullptr;
    return plan(input.dim(0), input.dim(1));
  }

  Plan& plan(Index B, Index T) {
    const std::pair<Index, Index> key{B, T};
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      if (plans_.size() >= kMaxPlans) {  // forget the least recently used shape
        auto oldest = plans_.begin();
        for (auto i = plans_.begin(); i != plans_.end(); ++i)
          if (i->second->used < oldest->second->used) oldest = i;
        plans_.erase(oldest);
      }
      it = plans_.emplace(key, build(B, T)).first;
    }
    it->second->used = ++clock_;
    return *it->second;
  }

  std::unique_ptr<Plan> build(Index B, Index T) {
    auto p = std::make_unique<Plan>();
    p->B = B;
    p->T = T;
    const Index N = per_token_ ? B * T : B, BT = B * T, d = spec_.n_embd, V = spec_.vocab_size;
    p->N = N;
    const bool vocab = spec_.input == InputSpace::vocab;
    p->hidden = Buffer(N * hidden_);
    p->activated = Buffer(N * hidden_);
    p->d_activated = Buffer(N * hidden_);
    p->d_hidden = Buffer(N * hidden_);

    const memory::desc x_md = plain({N, in_}), h_md = plain({N, hidden_}), y_md = plain({N, out_});
    const memory::desc b1_md = b1_.get_desc(), b2_md = b2_.get_desc();
    auto step = [](const WeightMatmul& mm, const memory& src, const Matrix& w, const memory* bias, const memory& dst) {
      Step s{mm.primitive, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, mm.pick(w)}, {DNNL_ARG_DST, dst}}};
      if (bias) s.args[DNNL_ARG_BIAS] = *bias;
      return s;
    };
    p->in = external(ctx_, vocab ? plain({BT, V}) : x_md);
    p->out = external(ctx_, y_md);
    p->grad_y = external(ctx_, y_md);
    p->grad_in = external(ctx_, vocab ? plain({BT, V}) : x_md);

    // forward
    memory x = p->in;
    if (vocab) {
      p->embedded = Buffer(BT * d);
      memory e = p->embedded.view(ctx_, plain({BT, d}));
      p->forward.push_back(
          step(weight_matmul("vocabulary embedding matmul", ctx_, plain({BT, V}), wte_, nullptr, plain({BT, d})), p->in,
               wte_, nullptr, e));
      x = p->embedded.view(ctx_, x_md);
    }
    memory h = p->hidden.view(ctx_, h_md), a = p->activated.view(ctx_, h_md);
    p->forward.push_back(step(weight_matmul("fc1 matmul", ctx_, x_md, fc1_, &b1_md, h_md), x, fc1_, &b1_, h));
    const bool small = N * hidden_ < kSmallWork;  // the GELU is then made for, and run with, one thread
    const auto gelu_pd = made_with(small, [&] {
      return make("GELU", [&] {
        return dnnl::eltwise_forward::primitive_desc(
            dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::eltwise_gelu_erf, h_md, 0.f,
                                        0.f),
            ctx_.engine);
      });
    });
    p->forward.push_back({made_with(small, [&] { return dnnl::eltwise_forward(gelu_pd); }),
                          {{DNNL_ARG_SRC, h}, {DNNL_ARG_DST, a}},
                          small});
    p->forward.push_back(step(weight_matmul("fc2 matmul", ctx_, h_md, fc2_, &b2_md, y_md), a, fc2_, &b2_, p->out));

    // backward
    memory da = p->d_activated.view(ctx_, h_md), dh = p->d_hidden.view(ctx_, h_md);
    p->backward.push_back(
        step(weight_matmul("fc2 backward matmul", ctx_, y_md, fc2_t_, nullptr, h_md), p->grad_y, fc2_t_, nullptr, da));
    const auto gelu_bwd = made_with(small, [&] {
      return make("GELU backward", [&] {
        return dnnl::eltwise_backward(dnnl::eltwise_backward::primitive_desc(
            dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_gelu_erf, h_md, h_md, 0.f, 0.f), ctx_.engine,
            gelu_pd));
      });
    });
    p->backward.push_back({gelu_bwd, {{DNNL_ARG_SRC, h}, {DNNL_ARG_DIFF_DST, da}, {DNNL_ARG_DIFF_SRC, dh}}, small});
    memory dx = p->grad_in;
    if (vocab) {
      p->d_embedded = Buffer(BT * d);
      dx = p->d_embedded.view(ctx_, x_md);
    }
    p->backward.push_back(
        step(weight_matmul("fc1 backward matmul", ctx_, h_md, fc1_t_, nullptr, x_md), dh, fc1_t_, nullptr, dx));
    if (vocab) {
      memory de = p->d_embedded.view(ctx_, plain({BT, d}));
      p->backward.push_back(step(
          weight_matmul("vocabulary embedding backward matmul", ctx_, plain({BT, d}), wte_t_, nullptr, plain({BT, V})),
          de, wte_t_, nullptr, p->grad_in));
    }
    return p;
  }

  // Runs the forward pass into `output` (N x out floats), keeping the activations; the plan is then the saved one.
  void run_forward(Plan& p, const Tensor& input, float* output) {
    Tensor converted;
    bind(p.in, as_f32(input, converted));
    bind(p.out, output);
    run_steps(ctx_, p.forward);
    saved_plan_ = &p;
  }

  // The input gradient for dy (N x out floats) from the saved activations, in `dtype`.
  Tensor run_backward(Plan& p, const float* dy, DType dtype) {
    Tensor grad(DType::f32, {p.B, p.T, width()});
    bind(p.grad_y, dy);
    bind(p.grad_in, grad.data<float>());
    run_steps(ctx_, p.backward);
    return dtype == DType::f32 ? grad : grad.to(dtype);
  }

 private:
  static void check_target_shape(const Shape& output, const Tensor& target) {
    const bool trailing_equal = static_cast<std::size_t>(target.rank()) == output.size() && target.rank() > 0 &&
                                std::equal(output.begin() + 1, output.end(), target.shape().begin() + 1);
    if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != output[0]))
      throw Error("loss: target " + shape_string(target.shape()) + " does not match output " + shape_string(output));
  }

  static constexpr std::size_t kMaxPlans = 8;

  ModelSpec spec_;
  Context ctx_;
  std::shared_ptr<WeightStore> store_;  // the weights, shared with the other models on them
  bool per_token_ = false;              // transformer_mlp: rows are tokens; the fcnets: rows are items
  Index in_ = 0, hidden_ = 0, out_ = 0;
  Matrix fc1_, fc1_t_, fc2_, fc2_t_, wte_, wte_t_;
  memory b1_, b2_;

  std::map<std::pair<Index, Index>, std::unique_ptr<Plan>> plans_;  // by (B, T)
  std::uint64_t clock_ = 0;
  Plan* saved_plan_ = nullptr;  // the plan holding the last forward pass's activations, for saved_input_
  Tensor saved_input_;
};

}  // namespace

std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads) {
  return std::make_unique<MlpModel>(spec, std::move(store), threads);
}

}  // namespace lminv::onednn
