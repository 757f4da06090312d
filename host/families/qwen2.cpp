// Qwen2 (model_type "qwen2", Qwen2 and Qwen2.5): Llama's layout with a bias on q, k and v (not on o), RMSNorm eps 1e-6,
// rope_theta usually 1e6; small models tie the lm_head. Sliding-window attention (use_sliding_window) is off in the
// released models; lminv refuses it when it would change the attention of sequences it can take.
#include "family.hpp"

namespace lminv {
namespace {

using json = nlohmann::json;

class Qwen2Family final : public FamilyAdapter {
 public:
  std::string name() const override { return "qwen2"; }

  void set_architecture(ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    s.arch = Architecture{};
    s.arch.norm = Norm::rms_norm;
    s.arch.norm_bias = false;
    s.arch.norm_eps = 1e-6;
    s.arch.positions = Positions::rotary;
    s.arch.qkv_bias = true;
    s.arch.attn_out_bias = false;
    s.arch.mlp = Mlp::swiglu;
    s.arch.mlp_bias = false;
    s.arch.tied_head = false;
  }

  void read_config(const ConfigFields& f, ModelSpec& s) const override {
    families::read_llama_style_config(f, s, /*tie_default=*/false);
    s.arch.qkv_bias = true;
    s.arch.attn_out_bias = false;
    s.arch.mlp_bias = false;
    if (f.boolean("use_sliding_window", false) && f.has("sliding_window")) {
      const std::int64_t w = f.positive_int("sliding_window", 4096);
      // Layers from max_window_layers on use the window; a sequence no longer than it attends the same either way.
      s.n_positions = std::min(s.n_positions, w);
    }
  }

  json write_config(const ModelSpec& s, DType dtype) const override {
    json j = families::write_llama_style_config(s, dtype, "qwen2", "Qwen2ForCausalLM");
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = s.n_layer;
    return j;
  }

  std::vector<TensorRule> tensor_rules(const ModelSpec& s) const override { return families::llama_style_rules(s); }
  bool is_buffer(const std::string& n) const override { return families::is_llama_style_buffer(n); }
  std::string base_prefix() const override { return "model."; }
};

}  // namespace

const FamilyAdapter& qwen2_family() {
  static const Qwen2Family f;
  return f;
}

}  // namespace lminv
