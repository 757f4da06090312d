// The MLP families on oneDNN, the same computations as the reference backend's mlp_model.cpp:
//   fcnet                flatten [T, d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)      output [B, 4 T d]
//   fcnet_noninvertible  the same with a last layer of T d outputs                                output [B, T d]
//   transformer_mlp      per token: Linear(d, inner) -> GELU -> Linear(inner, d)                 output [B, T, d]
// GELU is the exact erf form (eltwise_gelu_erf). Input = vocab multiplies [B T, V] by wte [V, d] first. Linear
// weights are torch's [out, in]: the forward matmul reads them transposed ([in, out], format ba), the backward one as
// stored.
//
// Per batch size, one plan: the primitives and the activation buffers, made once.
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
  MlpModel(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads)
      : spec_(spec), weights_(weights, ctx_, "family '" + spec.family + "'") {
    ctx_.threads = threads;
    const Index T = spec.seq_len, d = spec.n_embd;
    if (spec.family == "transformer_mlp") {
      rows_per_item_ = T;
      in_ = d;
      hidden_ = spec.inner();
      out_ = d;
    } else {  // fcnet, fcnet_noninvertible
      rows_per_item_ = 1;
      in_ = T * d;
      hidden_ = 4 * in_;
      out_ = spec.family == "fcnet" ? 4 * in_ : in_;
    }
    const Index m_hint = rows_per_item_;                                                   // rows of a batch of one
    fc1_ = weights_.matrix("fc1.weight", {hidden_, in_}, /*transposed=*/true, m_hint);     // [in, hidden]
    fc1_t_ = weights_.matrix("fc1.weight", {hidden_, in_}, /*transposed=*/false, m_hint);  // [hidden, in]
    fc2_ = weights_.matrix("fc2.weight", {out_, hidden_}, true, m_hint);                   // [hidden, out]
    fc2_t_ = weights_.matrix("fc2.weight", {out_, hidden_}, false, m_hint);                // [out, hidden]
    b1_ = weights_.vector("fc1.bias", hidden_, {1, hidden_});
    b2_ = weights_.vector("fc2.bias", out_, {1, out_});
    if (spec.input == InputSpace::vocab) {
      wte_ = weights_.matrix("wte.weight", {spec.vocab_size, d}, false, T);   // [V, d]
      wte_t_ = weights_.matrix("wte.weight", {spec.vocab_size, d}, true, T);  // [d, V]
    }
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    ThreadScope scope(ctx_.threads);
    return guarded("running the forward pass", [&] {
      check_input(input);
      if (input.dim(0) == 0) return Tensor(DType::f32, output_shape(0));
      Plan& p = prepare(input);
      Tensor output(DType::f32, output_shape(p.B));
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
      if (grad_output.shape() != output_shape(B))
        throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                    shape_string(output_shape(B)) + " (the output's shape for a batch of " + std::to_string(B) + ")");
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
      check_target_shape(output_shape(input.dim(0)), target);
      if (input.dim(0) == 0) return LossAndGrad{{}, Tensor(input.dtype(), input.shape())};
      Plan& p = prepare(input);
      run_forward(p, input, ensure(p.output, p.N * out_));
      ensure(p.grad_out, p.N * out_);
      std::vector<double> loss = metric_and_grad_f32(p.output.data(), p.B, rows_per_item_ * out_, target, metric,
                                                     p.grad_out.data(), ctx_.threads);
      return LossAndGrad{std::move(loss), run_backward(p, p.grad_out.data(), input.dtype())};
    });
  }

 private:
  struct Plan {
    Index B = 0, N = 0;
    Buffer embedded, hidden, activated, output, d_activated, d_hidden, d_embedded, grad_out;
    memory in, out, grad_y, grad_in;  // bound at every call
    std::vector<Step> forward, backward;
    std::uint64_t used = 0;
  };

  Index width() const { return spec_.input == InputSpace::embedding ? spec_.n_embd : spec_.vocab_size; }
  Shape output_shape(Index B) const {
    if (spec_.family == "transformer_mlp") return {B, spec_.seq_len, spec_.n_embd};
    return {B, out_};
  }
  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) != spec_.seq_len || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  std::to_string(spec_.seq_len) + ", " + std::to_string(width()) + "] (family '" + spec_.family +
                  "', input = " + input_space_name(spec_.input) + ")");
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

  // The plan for the input's batch size (made on first use), with the saved activations invalidated.
  Plan& prepare(const Tensor& input) {
    check_input(input);
    saved_input_ = Tensor();
    saved_plan_ = nullptr;
    return plan(input.dim(0));
  }

  Plan& plan(Index B) {
    auto it = plans_.find(B);
    if (it == plans_.end()) {
      if (plans_.size() >= kMaxPlans) {  // forget the least recently used batch size
        auto oldest = plans_.begin();
        for (auto i = plans_.begin(); i != plans_.end(); ++i)
          if (i->second->used < oldest->second->used) oldest = i;
        plans_.erase(oldest);
      }
      it = plans_.emplace(B, build(B)).first;
    }
    it->second->used = ++clock_;
    return *it->second;
  }

  std::unique_ptr<Plan> build(Index B) {
    auto p = std::make_unique<Plan>();
    p->B = B;
    const Index N = B * rows_per_item_, BT = B * spec_.seq_len, d = spec_.n_embd, V = spec_.vocab_size;
    p->N = N;
    const bool vocab = spec_.input == InputSpace::vocab;
    p->hidden = Buffer(N * hidden_);
    p->activated = Buffer(N * hidden_);
    p->d_activated = Buffer(N * hidden_);
    p->d_hidden = Buffer(N * hidden_);

    const memory::desc x_md = plain({N, in_}), h_md = plain({N, hidden_}), y_md = plain({N, out_});
    const memory::desc b1_md = b1_.get_desc(), b2_md = b2_.get_desc();
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
          {matmul("vocabulary embedding matmul", ctx_, plain({BT, V}), wte_.get_desc(), nullptr, plain({BT, d})),
           {{DNNL_ARG_SRC, p->in}, {DNNL_ARG_WEIGHTS, wte_}, {DNNL_ARG_DST, e}}});
      x = p->embedded.view(ctx_, x_md);
    }
    memory h = p->hidden.view(ctx_, h_md), a = p->activated.view(ctx_, h_md);
    p->forward.push_back({matmul("fc1 matmul", ctx_, x_md, fc1_.get_desc(), &b1_md, h_md),
                          {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, fc1_}, {DNNL_ARG_BIAS, b1_}, {DNNL_ARG_DST, h}}});
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
    p->forward.push_back({matmul("fc2 matmul", ctx_, h_md, fc2_.get_desc(), &b2_md, y_md),
                          {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, fc2_}, {DNNL_ARG_BIAS, b2_}, {DNNL_ARG_DST, p->out}}});

    // backward
    memory da = p->d_activated.view(ctx_, h_md), dh = p->d_hidden.view(ctx_, h_md);
    p->backward.push_back({matmul("fc2 backward matmul", ctx_, y_md, fc2_t_.get_desc(), nullptr, h_md),
                           {{DNNL_ARG_SRC, p->grad_y}, {DNNL_ARG_WEIGHTS, fc2_t_}, {DNNL_ARG_DST, da}}});
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
    p->backward.push_back({matmul("fc1 backward matmul", ctx_, h_md, fc1_t_.get_desc(), nullptr, x_md),
                           {{DNNL_ARG_SRC, dh}, {DNNL_ARG_WEIGHTS, fc1_t_}, {DNNL_ARG_DST, dx}}});
    if (vocab) {
      memory de = p->d_embedded.view(ctx_, plain({BT, d}));
      p->backward.push_back({matmul("vocabulary embedding backward matmul", ctx_, plain({BT, d}), wte_t_.get_desc(),
                                    nullptr, plain({BT, V})),
                             {{DNNL_ARG_SRC, de}, {DNNL_ARG_WEIGHTS, wte_t_}, {DNNL_ARG_DST, p->grad_in}}});
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
    Tensor grad(DType::f32, {p.B, spec_.seq_len, width()});
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
  WeightStore weights_;
  Index rows_per_item_ = 1, in_ = 0, hidden_ = 0, out_ = 0;
  memory fc1_, fc1_t_, fc2_, fc2_t_, b1_, b2_, wte_, wte_t_;

  std::map<Index, std::unique_ptr<Plan>> plans_;
  std::uint64_t clock_ = 0;
  Plan* saved_plan_ = nullptr;  // the plan holding the last forward pass's activations, for saved_input_
  Tensor saved_input_;
};

void require_positive(const ModelSpec& spec, const char* key, std::int64_t value, const char* why = "") {
  if (value <= 0)
    throw Error(std::string(kWho) + ": family '" + spec.family + "' needs a positive " + key + why + ", got " +
                std::to_string(value));
}

}  // namespace

std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  require_positive(spec, "n_embd", spec.n_embd);
  require_positive(spec, "seq_len", spec.seq_len, " (the prompt's token count)");
  if (spec.family == "transformer_mlp") require_positive(spec, "MLP width (n_inner, or 4 n_embd)", spec.inner());
  if (spec.input == InputSpace::vocab) require_positive(spec, "vocab_size", spec.vocab_size);
  if (!spec.layers.empty())
    throw Error(std::string(kWho) + ": family '" + spec.family +
                "' has no blocks whose outputs could be added (layers is not empty)");
  if (spec.dtype != DType::f32)
    throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) + "' is not supported (supported: f32)");
  return std::make_unique<MlpModel>(spec, std::move(weights), threads);
}

}  // namespace lminv::onednn
