// Llama (model_type "llama": Llama 2 and 3, TinyLlama, SmolLM) and Mistral (model_type "mistral"): RMSNorm, rotary
// positions, grouped-query attention, a SwiGLU MLP, no biases by default, usually an untied lm_head. Hugging Face
// keeps q/k/v and gate/up as separate nn.Linear weights [out, in]; the canonical c_attn and c_fc are them transposed
// and side by side (family.cpp: llama_style_rules).
#include "family.hpp"

namespace lminv {
namespace {

using json = nlohmann::json;

class LlamaFamily : public FamilyAdapter {
 public:
  std::string name() const override { return "llama"; }

  void set_architecture(ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    s.arch = Architecture{};
    s.arch.norm = Norm::rms_norm;
    s.arch.norm_bias = false;
    s.arch.norm_eps = 1e-6;
    s.arch.positions = Positions::rotary;
    s.arch.qkv_bias = s.arch.attn_out_bias = false;
    s.arch.mlp = Mlp::swiglu;
    s.arch.mlp_bias = false;
    s.arch.tied_head = false;
  }

  void read_config(const ConfigFields& f, ModelSpec& s) const override {
    families::read_llama_style_config(f, s, /*tie_default=*/false);
    // Llama's attention_bias puts a bias on q, k, v and o alike; mlp_bias on gate, up and down.
    s.arch.qkv_bias = s.arch.attn_out_bias = f.boolean("attention_bias", false);
    s.arch.mlp_bias = f.boolean("mlp_bias", false);
  }

  json write_config(const ModelSpec& s, DType dtype) const override {
    json j = families::write_llama_style_config(s, dtype, "llama", "LlamaForCausalLM");
    j["attention_bias"] = s.arch.qkv_bias;
    j["mlp_bias"] = s.arch.mlp_bias;
    j["pretraining_tp"] = 1;
    return j;
  }

  std::vector<TensorRule> tensor_rules(const ModelSpec& s) const override { return families::llama_style_rules(s); }
  bool is_buffer(const std::string& n) const override { return families::is_llama_style_buffer(n); }
  std::string base_prefix() const override { return "model."; }
};

// Mistral: Llama's layout without biases, plus a sliding attention window. lminv computes full causal attention, which
// is the same wherever the sequence fits in the window: n_positions is capped at sliding_window.
class MistralFamily final : public LlamaFamily {
 public:
  std::string name() const override { return "mistral"; }

  void read_config(const ConfigFields& f, ModelSpec& s) const override {
    families::read_llama_style_config(f, s, /*tie_default=*/false);
    if (f.has("sliding_window")) s.n_positions = std::min(s.n_positions, f.positive_int("sliding_window", 4096));
  }

  json write_config(const ModelSpec& s, DType dtype) const override {
    json j = families::write_llama_style_config(s, dtype, "mistral", "MistralForCausalLM");
    j["sliding_window"] = nullptr;
    return j;
  }
  void set_architecture(ModelSpec& s) const override {
    LlamaFamily::set_architecture(s);
    s.arch.norm_eps = 1e-5;  // MistralConfig's rms_norm_eps default
  }
};

}  // namespace

const FamilyAdapter& llama_family() {
  static const LlamaFamily f;
  return f;
}
const FamilyAdapter& mistral_family() {
  static const MistralFamily f;
  return f;
}

}  // namespace lminv
