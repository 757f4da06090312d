// lminv SDK: what a model is (ModelSpec), what it does (Model), and the distances it is fitted with.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/architecture.hpp"
#include "lminv/tensor.hpp"

namespace lminv {

// What follows the last block run: nothing (h_k), the final norm ln_f(h_k), ln_f then the LM head (ln_f(h_k) W^T,
// as Hugging Face's *ForCausalLM models do), or the LM head straight after the block, with no final norm (h_k W^T: the
// seed study's truncated GPT-2, `AbbreviatedGPT`, which calls lm_head on a block's output).
enum class Head { none, ln_f, lm_head, lm_head_no_ln_f };
// Whether the head applies the final norm ln_f, and whether it ends in the LM head's matrix W [V, d].
inline bool head_has_ln_f(Head h) { return h == Head::ln_f || h == Head::lm_head; }
inline bool head_has_lm_head(Head h) { return h == Head::lm_head || h == Head::lm_head_no_ln_f; }
enum class InputSpace { embedding, vocab };
enum class Metric { l1, l2, cosine };
// How a decoder's block weights are held (the four linear layers of each block: attn.c_attn, attn.c_proj, mlp.c_fc,
// mlp.c_proj; embeddings, norms, biases and the LM head always stay in the model's dtype).
//   same  in the model's dtype
//   int8  int8 with one absmax scale per output channel (LLM.int8's vector-wise weight quantisation, without its
//         outlier split): s_o = max_i |W[o, i]| / 127, q = round(W / s_o) in [-127, 127]; each matrix product
//         dequantises q s_o into the model's dtype (the seed study loaded gpt2-xl this way, load_in_8bit). The
//         rounding is fixed in plugins/common/int8_weights.hpp, shared by every backend.
enum class WeightDType { same, int8 };

inline const char* head_name(Head h) {
  switch (h) {
    case Head::none: return "none";
    case Head::ln_f: return "ln_f";
    case Head::lm_head: return "lm_head";
    case Head::lm_head_no_ln_f: return "lm_head_no_ln_f";
  }
  return "?";
}
inline std::optional<Head> parse_head(std::string_view s) {
  if (s == "none") return Head::none;
  if (s == "ln_f") return Head::ln_f;
  if (s == "lm_head") return Head::lm_head;
  if (s == "lm_head_no_ln_f") return Head::lm_head_no_ln_f;
  return std::nullopt;
}
inline const char* weight_dtype_name(WeightDType w) { return w == WeightDType::int8 ? "int8" : "same"; }
inline std::optional<WeightDType> parse_weight_dtype(std::string_view s) {
  if (s == "same") return WeightDType::same;
  if (s == "int8") return WeightDType::int8;
  return std::nullopt;
}
inline const char* input_space_name(InputSpace i) { return i == InputSpace::embedding ? "embedding" : "vocab"; }
inline std::optional<InputSpace> parse_input_space(std::string_view s) {
  if (s == "embedding") return InputSpace::embedding;
  if (s == "vocab") return InputSpace::vocab;
  return std::nullopt;
}
inline const char* metric_name(Metric m) {
  switch (m) {
    case Metric::l1: return "l1";
    case Metric::l2: return "l2";
    case Metric::cosine: return "cosine";
  }
  return "?";
}
inline std::optional<Metric> parse_metric(std::string_view s) {
  if (s == "l1") return Metric::l1;
  if (s == "l2") return Metric::l2;
  if (s == "cosine") return Metric::cosine;
  return std::nullopt;
}

// Everything a backend needs to build a model, besides its weights.
//
// `kind` is what a backend dispatches on; `family` is a label (the Hugging Face model_type of the host's family
// adapter, "gpt2", "llama", ..., or the MLP's name) that backends do not look at.
//   decoder              a decoder-only transformer described by `arch` (architecture.hpp): every transformer family
//   fcnet                flatten [T, d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)
//   fcnet_noninvertible  the same with a last layer of T d outputs
//   transformer_mlp      per token: Linear(d, 4 d) -> GELU -> Linear(4 d, d)
// Inputs are [B, T, d] token embeddings (input = embedding) or [B, T, V] vectors that the model
// multiplies by the token-embedding matrix wte [V, d] (input = vocab).
//
// Sequence length: fcnet and fcnet_noninvertible are built for one T (their weights depend on it). A decoder or
// transformer_mlp model takes any T from 1 to n_positions in every call, whatever spec.seq_len says; for them seq_len
// is the length that input_shape() and callers that want one length use (LengthView gives a model of the same
// network with another seq_len, sharing it). Backends check the input's length, not seq_len, for these kinds.
struct ModelSpec {
  std::string family = "gpt2";
  ModelKind kind = ModelKind::decoder;
  Architecture arch;  // decoder only

  std::int64_t n_layer = 12;
  std::int64_t n_embd = 768;  // d
  std::int64_t n_head = 12;
  std::int64_t n_inner = 0;  // MLP width; 0 means 4 * n_embd
  std::int64_t vocab_size = 50257;
  std::int64_t n_positions = 1024;  // the longest sequence

  std::int64_t seq_len = 0;  // T: the prompt's token count
  std::int64_t blocks = 1;   // use the first k blocks
  Head head = Head::lm_head;
  InputSpace input = InputSpace::embedding;
  std::vector<std::int64_t> layers;  // extra block outputs concatenated into the output

  DType dtype = DType::f64;
  WeightDType weight_dtype = WeightDType::same;  // decoder only
  // Dropout as a GPT-2 in training mode applies it (decoder only): on the embedding sum, on the attention
  // probabilities and on each block's two residual branches, with probability `dropout`, a fresh mask in every
  // forward pass (inverse scaling by 1 / (1 - p)), drawn from a generator seeded with dropout_seed. 0: off (what
  // evaluation does). The seed study builds its untrained GPT-2 from a config and never calls eval(), so its
  // dropout (p = 0.1) may have been on.
  double dropout = 0;
  std::uint64_t dropout_seed = 0;
  std::string device = "cpu";

  std::int64_t inner() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  std::int64_t kv_heads() const { return arch.n_kv_head > 0 ? arch.n_kv_head : n_head; }
  std::int64_t head_size() const { return arch.head_dim > 0 ? arch.head_dim : (n_head > 0 ? n_embd / n_head : 0); }
  std::int64_t rotary_dim() const {
    if (arch.positions != Positions::rotary) return 0;
    const auto r = static_cast<std::int64_t>(std::floor(static_cast<double>(head_size()) * arch.rotary_fraction));
    return r - r % 2;
  }
  // Whether the output at position t depends on positions 0 .. t only (so a prefix cache applies).
  bool causal() const { return kind == ModelKind::decoder || kind == ModelKind::transformer_mlp; }
  // Whether one model takes every length up to n_positions (see above).
  bool any_length() const { return kind == ModelKind::decoder || kind == ModelKind::transformer_mlp; }
  // The blocks a forward pass runs: max(blocks, max(layers)).
  std::int64_t blocks_run() const {
    std::int64_t L = blocks;
    for (std::int64_t l : layers) L = l > L ? l : L;
    return L;
  }
};

// Shape of a batch of B model inputs.
inline Shape input_shape(const ModelSpec& spec, std::int64_t batch) {
  return {batch, spec.seq_len, spec.input == InputSpace::embedding ? spec.n_embd : spec.vocab_size};
}

// Per-item losses of a batch and their gradient with respect to the input.
struct LossAndGrad {
  std::vector<double> loss;  // [B]
  Tensor grad;               // like the input
};

namespace detail {
// Loss of item b of `output` against `target` (one item broadcast over the batch, or one per item),
// and the gradient of that loss with respect to the output, written into `grad` when given.
//   l1:     sum |o - t|
//   l2:     ||o - t||_2                (gradient 0 where o = t)
//   cosine: 1 - <o, t> / (|o| |t|)
inline double metric_item(const Tensor& output, const Tensor& target, Metric metric, std::int64_t b,
                          Tensor* grad) {
  const std::int64_t n = output.numel() / output.dim(0);
  const std::int64_t tb = target.dim(0) == 1 ? 0 : b;
  auto o = [&](std::int64_t i) { return output.get(b * n + i); };
  auto t = [&](std::int64_t i) { return target.get(tb * n + i); };
  double loss = 0;
  switch (metric) {
    case Metric::l1: {
      for (std::int64_t i = 0; i < n; ++i) loss += std::abs(o(i) - t(i));
      if (grad)
        for (std::int64_t i = 0; i < n; ++i) {
          const double d = o(i) - t(i);
          grad->set(b * n + i, d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0));
        }
      break;
    }
    case Metric::l2: {
      for (std::int64_t i = 0; i < n; ++i) loss += (o(i) - t(i)) * (o(i) - t(i));
      loss = std::sqrt(loss);
      if (grad)
        for (std::int64_t i = 0; i < n; ++i) grad->set(b * n + i, loss > 0 ? (o(i) - t(i)) / loss : 0.0);
      break;
    }
    case Metric::cosine: {
      double dot = 0, oo = 0, tt = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        dot += o(i) * t(i);
        oo += o(i) * o(i);
        tt += t(i) * t(i);
      }
      const double no = std::sqrt(oo), nt = std::sqrt(tt);
      if (no == 0 || nt == 0) {
        loss = 1;
        if (grad)
          for (std::int64_t i = 0; i < n; ++i) grad->set(b * n + i, 0.0);
        break;
      }
      const double cos = dot / (no * nt);
      loss = 1 - cos;
      if (grad)  // d(1 - cos)/do = -(t / (|o||t|) - cos o / |o|^2)
        for (std::int64_t i = 0; i < n; ++i) grad->set(b * n + i, -(t(i) / (no * nt) - cos * o(i) / oo));
      break;
    }
  }
  return loss;
}

inline void check_target(const Tensor& output, const Tensor& target) {
  const bool trailing_equal = output.rank() == target.rank() && output.rank() > 0 &&
                              std::equal(output.shape().begin() + 1, output.shape().end(), target.shape().begin() + 1);
  if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != output.dim(0)))
    throw Error("loss: target " + shape_string(target.shape()) + " does not match output " +
                shape_string(output.shape()));
}
}  // namespace detail

// Distance of each item of a batch of outputs [B, ...] to a target [1 or B, ...], accumulated in fp64.
inline std::vector<double> distances(const Tensor& output, const Tensor& target, Metric metric) {
  detail::check_target(output, target);
  std::vector<double> out(static_cast<std::size_t>(output.dim(0)));
  for (std::int64_t b = 0; b < output.dim(0); ++b) out[b] = detail::metric_item(output, target, metric, b, nullptr);
  return out;
}

// Per-item loss and its gradient with respect to the output (same dtype as the output).
inline LossAndGrad metric_and_grad(const Tensor& output, const Tensor& target, Metric metric) {
  detail::check_target(output, target);
  LossAndGrad r{std::vector<double>(static_cast<std::size_t>(output.dim(0))), Tensor(output.dtype(), output.shape())};
  for (std::int64_t b = 0; b < output.dim(0); ++b) r.loss[b] = detail::metric_item(output, target, metric, b, &r.grad);
  return r;
}

// A model instance made by a backend: a differentiable map from a batch of inputs to a batch of outputs.
// Every call is batched: item b of the result depends on item b of the input alone.
class Model {
 public:
  virtual ~Model() = default;

  virtual const ModelSpec& spec() const = 0;

  // [B, T, d or V] -> [B, ...] (the output's trailing shape depends on blocks, head and layers).
  virtual Tensor forward(const Tensor& input) = 0;

  // Vector-Jacobian product: the gradient with respect to the input of <grad_output, forward(input)>.
  virtual Tensor backward(const Tensor& input, const Tensor& grad_output) = 0;

  // Loss of each item against the target and its input gradient. This default runs the model twice
  // (forward, then backward); a backend may fuse it.
  virtual LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) {
    LossAndGrad on_output = metric_and_grad(forward(input), target, metric);
    return {std::move(on_output.loss), backward(input, on_output.grad)};
  }

  // Optional capabilities, asked for by name (for example "prefix_cache"); nullptr when absent.
  // Adding one breaks no plugin that does not know it.
  virtual void* capability(std::string_view /*name*/) { return nullptr; }
};

// The same network as `model` (a decoder or transformer_mlp model, which takes any length) presented with another
// seq_len: forward, backward and capabilities go to `model`, so many lengths share one model and its weights.
class LengthView final : public Model {
 public:
  LengthView(std::shared_ptr<Model> model, std::int64_t seq_len) : model_(std::move(model)) {
    if (!model_) throw Error("LengthView: no model");
    spec_ = model_->spec();
    if (!spec_.any_length())
      throw Error(std::string("LengthView: a ") + kind_name(spec_.kind) + " model is built for one length");
    if (seq_len < 1 || seq_len > spec_.n_positions)
      throw Error("LengthView: seq_len " + std::to_string(seq_len) + " is outside 1 .. n_positions = " +
                  std::to_string(spec_.n_positions));
    spec_.seq_len = seq_len;
  }
  const ModelSpec& spec() const override { return spec_; }
  Tensor forward(const Tensor& input) override { return model_->forward(input); }
  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    return model_->backward(input, grad_output);
  }
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    return model_->loss_and_grad(input, target, metric);
  }
  void* capability(std::string_view name) override { return model_->capability(name); }
  const std::shared_ptr<Model>& base() const { return model_; }

 private:
  std::shared_ptr<Model> model_;
  ModelSpec spec_;
};

}  // namespace lminv
