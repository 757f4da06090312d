// The MLP kinds of the reference backend (spec.kind):
//   fcnet                flatten [T, d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)      output [B, 4 T d]
//   fcnet_noninvertible  the same with a last layer of T d outputs                                output [B, T d]
//   transformer_mlp      per token: Linear(d, inner) -> GELU -> Linear(inner, d)                 output [B, T, d]
// The input is [B, T, d] (input = embedding) or [B, T, V] (input = vocab, multiplied by wte [V, d] first).
// GELU is the exact erf form (torch.nn.GELU's default). These kinds have no blocks or head: spec.blocks and
// spec.head are not used. fcnet and fcnet_noninvertible are built for T = seq_len (their weights depend on it);
// transformer_mlp takes any T in 1 .. n_positions per call, from the input's shape.
//
// Both layouts are the same computation on rows: fcnet treats each item as one row of T d values, transformer_mlp
// treats each token as one row of d values. The embedded input [B T, d] is, in memory, either.

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "layers.hpp"
#include "reference_backend.hpp"
#include "tensor_util.hpp"

namespace lminv::reference {

namespace {

const char* const kWho = "reference backend";

template <class T>
class MlpModel final : public Model {
 public:
  MlpModel(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights, int threads)
      : spec_(spec), weights_(std::move(weights)), threads_(threads) {
    const Index T_ = spec.seq_len, d = spec.n_embd;
    if (per_token()) {
      in_ = d;
      hidden_ = spec.inner();
      out_ = d;
    } else {  // fcnet, fcnet_noninvertible
      in_ = T_ * d;
      hidden_ = 4 * in_;
      out_ = spec.kind == ModelKind::fcnet ? 4 * in_ : in_;
    }
    fc1_w_ = map("fc1.weight", {hidden_, in_});
    fc1_b_ = map("fc1.bias", {hidden_});
    fc2_w_ = map("fc2.weight", {out_, hidden_});
    fc2_b_ = map("fc2.bias", {out_});
    if (spec.input == InputSpace::vocab) wte_ = map("wte.weight", {spec.vocab_size, d});
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override { return forward_saving(input); }

  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    check_input(input);
    // The usual call follows a forward pass on the same input: its hidden activations are still here.
    if (!same_tensor(input, saved_input_)) forward_saving(input, /*to_hidden_only=*/true);
    return backward_saved(grad_output, input.dtype());
  }

  // One forward pass, the metric on the host, then the backward pass from the activations just saved.
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    LossAndGrad on_output = metric_and_grad(forward_saving(input), target, metric);
    return {std::move(on_output.loss), backward_saved(on_output.grad, input.dtype())};
  }

 private:
  bool per_token() const { return spec_.kind == ModelKind::transformer_mlp; }

  // The weight `name` as a T array of the given shape (checked by create_model against used_weights, and here
  // again): in place when its dtype is T, else converted once for every model on these weights.
  const T* map(const std::string& name, const Shape& shape) { return weights_->get<T>(name, shape, threads_); }

  Index width() const { return spec_.input == InputSpace::embedding ? spec_.n_embd : spec_.vocab_size; }

  Shape output_shape(Index batch, Index length) const {
    if (per_token()) return {batch, length, spec_.n_embd};
    return {batch, out_};
  }

  void check_input(const Tensor& input) const {
    const std::string kind = std::string(kind_name(spec_.kind)) + ", family '" + spec_.family +
                             "', input = " + input_space_name(spec_.input);
    if (per_token()) {
      if (input.rank() != 3 || input.dim(1) < 1 || input.dim(1) > spec_.n_positions || input.dim(2) != width())
        throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, T, " +
                    std::to_string(width()) + "] with T in 1 .. " + std::to_string(spec_.n_positions) +
                    " (n_positions; " + kind + ")");
      return;
    }
    if (input.rank() != 3 || input.dim(1) != spec_.seq_len || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  std::to_string(spec_.seq_len) + ", " + std::to_string(width()) + "] (seq_len " +
                  std::to_string(spec_.seq_len) + "; " + kind + ")");
  }

  // Runs the model on `input`, keeping what the backward pass needs: the input itself (to recognise it) and the
  // pre-GELU activations h. With to_hidden_only, stops there.
  Tensor forward_saving(const Tensor& input, bool to_hidden_only = false) {
    check_input(input);
    const Index B = input.dim(0), T_ = input.dim(1), N = per_token() ? B * T_ : B;
    saved_input_ = Tensor();  // invalid until h is complete
    saved_batch_ = B;
    saved_length_ = T_;
    Tensor converted;
    const T* x = values_as<T>(input, converted, threads_);  // (N, in) or, for input = vocab, (B T, V)
    std::vector<T> embedded;
    if (spec_.input == InputSpace::vocab) {
      embedded.resize(static_cast<std::size_t>(N * in_));
      embed_vocab_forward(embedded.data(), x, wte_, B * T_, spec_.vocab_size, spec_.n_embd, threads_);
      x = embedded.data();
    }
    hidden_pre_.resize(static_cast<std::size_t>(N * hidden_));
    linear_forward(hidden_pre_.data(), x, fc1_w_, fc1_b_, N, in_, hidden_, threads_);  // (N, hidden)
    saved_input_ = input;
    if (to_hidden_only) return Tensor();

    std::vector<T> activated(hidden_pre_.size());
    gelu_forward(activated.data(), hidden_pre_.data(), N * hidden_);  // (N, hidden)
    Tensor output(dtype_of<T>::value, output_shape(B, T_));
    linear_forward(output.data<T>(), activated.data(), fc2_w_, fc2_b_, N, hidden_, out_, threads_);  // (N, out)
    return output;
  }

  // The input gradient for grad_output, from the activations of the last forward pass, in the input's dtype.
  Tensor backward_saved(const Tensor& grad_output, DType input_dtype) const {
    const Index B = saved_batch_, T_ = saved_length_, N = per_token() ? B * T_ : B;
    if (grad_output.shape() != output_shape(B, T_))
      throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                  shape_string(output_shape(B, T_)) + " (the output's shape for a batch of " + std::to_string(B) + ")");
    Tensor converted;
    const T* dy = values_as<T>(grad_output, converted, threads_);  // (N, out)

    std::vector<T> d_activated(hidden_pre_.size()), d_hidden(hidden_pre_.size());
    linear_backward(d_activated.data(), dy, fc2_w_, N, hidden_, out_, threads_);          // (N, hidden)
    gelu_backward(d_hidden.data(), hidden_pre_.data(), d_activated.data(), N * hidden_);  // (N, hidden)

    Tensor grad(dtype_of<T>::value, {B, T_, width()});
    if (spec_.input == InputSpace::embedding) {
      linear_backward(grad.data<T>(), d_hidden.data(), fc1_w_, N, in_, hidden_, threads_);  // (N, in)
    } else {
      std::vector<T> d_embedded(static_cast<std::size_t>(N * in_));
      linear_backward(d_embedded.data(), d_hidden.data(), fc1_w_, N, in_, hidden_, threads_);  // (B T, d)
      embed_vocab_backward(grad.data<T>(), d_embedded.data(), wte_, B * T_, spec_.vocab_size, spec_.n_embd,
                           threads_);  // (B T, V)
    }
    return input_dtype == grad.dtype() ? grad : grad.to(input_dtype);
  }

  ModelSpec spec_;
  std::shared_ptr<ConvertedWeights> weights_;  // the tensors mapped below live here
  int threads_ = 0;

  // The model as rows: (N, in) -> (N, hidden) -> (N, out), N = batch (fcnets) or batch * T (transformer_mlp).
  Index in_ = 0, hidden_ = 0, out_ = 0;
  const T* fc1_w_ = nullptr;  // (hidden, in)
  const T* fc1_b_ = nullptr;  // (hidden)
  const T* fc2_w_ = nullptr;  // (out, hidden)
  const T* fc2_b_ = nullptr;  // (out)
  const T* wte_ = nullptr;    // (V, d), input = vocab only

  // The last forward pass: its input, batch size, length and pre-GELU activations h (N, hidden).
  Tensor saved_input_;
  Index saved_batch_ = 0, saved_length_ = 0;
  std::vector<T> hidden_pre_;
};

}  // namespace

std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights, int threads) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  switch (spec.dtype) {
    case DType::f64: return std::make_unique<MlpModel<double>>(spec, std::move(weights), threads);
    case DType::f32: return std::make_unique<MlpModel<float>>(spec, std::move(weights), threads);
    default:
      throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) +
                  "' is not supported (supported: f64, f32)");
  }
}

}  // namespace lminv::reference
