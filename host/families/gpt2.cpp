// GPT-2 (model_type "gpt2", GPT2LMHeadModel): learned positions, pre-LayerNorm blocks with biases, GELU (tanh),
// fused c_attn, tied lm_head. Its Conv1D weights are already stored [in, out], so every tensor is copied as it is,
// under "transformer." + the canonical name.
#include <cmath>

#include "config.hpp"  // the size ceilings
#include "family.hpp"
#include "lminv/schema.hpp"

namespace lminv {
namespace {

using json = nlohmann::json;

class Gpt2Family final : public FamilyAdapter {
 public:
  std::string name() const override { return "gpt2"; }

  void set_architecture(ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    const double eps = s.arch.norm_eps;
    s.arch = Architecture{};  // the defaults are GPT-2's setting
    s.arch.norm_eps = eps;
  }

  void read_config(const ConfigFields& f, ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    s.n_layer = f.count("n_layer", 12, kMaxLayers);  // 0 blocks is a model of embeddings and ln_f
    s.n_embd = f.positive_int("n_embd", 768, kMaxWidth);
    s.n_head = f.positive_int("n_head", 12, kMaxHeads);
    s.n_inner = f.has("n_inner") ? f.positive_int("n_inner", 0, kMaxInner) : 0;
    s.vocab_size = f.positive_int("vocab_size", 50257, kMaxVocab);
    s.n_positions = f.positive_int("n_positions", 1024, kMaxPositions);
    s.arch = Architecture{};
    s.arch.norm_eps = f.positive_number("layer_norm_epsilon", 1e-5);
    if (s.n_embd % s.n_head != 0)
      f.fail("n_head = " + std::to_string(s.n_head) + " does not divide n_embd = " + std::to_string(s.n_embd));
    if (auto act = f.string("activation_function"); act && *act != "gelu_new" && *act != "gelu_pytorch_tanh")
      f.fail("activation_function is '" + *act + "'; lminv's gpt2 computes gelu_new (the tanh approximation)");
    if (!f.boolean("scale_attn_weights", true))
      f.fail("scale_attn_weights is false; lminv's gpt2 scales attention scores by 1/sqrt(head size)");
    if (f.boolean("scale_attn_by_inverse_layer_idx", false))
      f.fail("scale_attn_by_inverse_layer_idx is true; lminv's gpt2 does not scale attention by layer index");
    s.arch.tied_head = f.boolean("tie_word_embeddings", true);
  }

  json write_config(const ModelSpec& s, DType dtype) const override {
    return {
        {"activation_function", "gelu_new"},
        {"architectures", {"GPT2LMHeadModel"}},
        {"attn_pdrop", 0.1},
        {"bos_token_id", s.vocab_size - 1},
        {"embd_pdrop", 0.1},
        {"eos_token_id", s.vocab_size - 1},  // GPT-2's <|endoftext|> is its last token
        {"initializer_range", 0.02},
        {"layer_norm_epsilon", s.arch.norm_eps},
        {"model_type", "gpt2"},
        {"n_embd", s.n_embd},
        {"n_head", s.n_head},
        {"n_inner", s.n_inner > 0 ? json(s.n_inner) : json(nullptr)},
        {"n_layer", s.n_layer},
        {"n_positions", s.n_positions},
        {"reorder_and_upcast_attn", false},
        {"resid_pdrop", 0.1},
        {"scale_attn_by_inverse_layer_idx", false},
        {"scale_attn_weights", true},
        {"summary_activation", nullptr},
        {"summary_first_dropout", 0.1},
        {"summary_proj_to_labels", true},
        {"summary_type", "cls_index"},
        {"summary_use_proj", true},
        {"tie_word_embeddings", s.arch.tied_head},
        {"torch_dtype", families::torch_dtype(dtype)},
        {"use_cache", true},
        {"vocab_size", s.vocab_size},
    };
  }

  std::vector<TensorRule> tensor_rules(const ModelSpec& s) const override {
    std::vector<TensorRule> r;
    for (const TensorSpec& t : weight_schema(s)) {
      const std::string stored = t.name == "lm_head.weight" ? t.name : "transformer." + t.name;
      r.push_back({TensorRule::Op::copy, t.name, {stored}, {t.shape}});
    }
    return r;
  }

  // h.{i}.attn.bias and h.{i}.attn.masked_bias: the causal-mask buffers older checkpoints store.
  bool is_buffer(const std::string& n) const override {
    const auto ends = [&](const std::string& suffix) {
      return n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    return (n.rfind("transformer.h.", 0) == 0 || n.rfind("h.", 0) == 0) && (ends(".attn.bias") || ends(".attn.masked_bias"));
  }
  std::string base_prefix() const override { return "transformer."; }

  // Hugging Face's GPT2PreTrainedModel._init_weights: N(0, 0.02^2), and the two residual projections
  // ("c_proj.weight") N(0, (0.02 / sqrt(2 n_layer))^2).
  double init_std(const ModelSpec& s, const std::string& canonical) const override {
    const std::string suffix = "c_proj.weight";
    const bool proj = canonical.size() > suffix.size() &&
                      canonical.compare(canonical.size() - suffix.size(), suffix.size(), suffix) == 0;
    return proj ? 0.02 / std::sqrt(2.0 * static_cast<double>(s.n_layer)) : 0.02;
  }
};

}  // namespace

const FamilyAdapter& gpt2_family() {
  static const Gpt2Family f;
  return f;
}

}  // namespace lminv
