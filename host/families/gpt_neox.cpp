// GPT-NeoX (model_type "gpt_neox": Pythia, GPT-NeoX-20B): LayerNorm with biases, rotary positions on a fraction of
// each head (rotary_pct, 0.25 in Pythia), the parallel residual (use_parallel_residual), GELU (erf), biases
// everywhere, an untied output projection "embed_out". Its fused query_key_value weight [3 d, d] is laid out head by
// head ([q k v] of head 0, then of head 1, ...); the canonical c_attn puts all q heads first, then k, then v.
#include "config.hpp"  // the size ceilings
#include "family.hpp"

namespace lminv {
namespace {

using json = nlohmann::json;
using Op = TensorRule::Op;

class GptNeoxFamily final : public FamilyAdapter {
 public:
  std::string name() const override { return "gpt_neox"; }

  void set_architecture(ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    s.arch = Architecture{};
    s.arch.positions = Positions::rotary;
    s.arch.rotary_fraction = 0.25;
    s.arch.mlp = Mlp::gelu_erf;
    s.arch.residual = Residual::parallel;
    s.arch.tied_head = false;
  }

  void read_config(const ConfigFields& f, ModelSpec& s) const override {
    s.kind = ModelKind::decoder;
    s.n_embd = f.positive_int("hidden_size", 6144, kMaxWidth);
    s.n_layer = f.count("num_hidden_layers", 44, kMaxLayers);
    s.n_head = f.positive_int("num_attention_heads", 64, kMaxHeads);
    s.n_inner = f.positive_int("intermediate_size", 24576, kMaxInner);
    s.vocab_size = f.positive_int("vocab_size", 50432, kMaxVocab);
    s.n_positions = f.positive_int("max_position_embeddings", 2048, kMaxPositions);
    if (s.n_embd % s.n_head != 0)
      f.fail("num_attention_heads = " + std::to_string(s.n_head) + " does not divide hidden_size = " +
             std::to_string(s.n_embd));
    Architecture& a = s.arch;
    a = Architecture{};
    a.norm_eps = f.positive_number("layer_norm_eps", 1e-5);
    a.positions = Positions::rotary;
    a.rotary_fraction = f.fraction("rotary_pct", 0.25);
    // Older configs name the rotary base rotary_emb_base, newer ones rope_theta.
    a.rope_theta = f.positive_number("rope_theta", f.positive_number("rotary_emb_base", 10000.0));
    a.qkv_bias = a.attn_out_bias = f.boolean("attention_bias", true);
    a.mlp_bias = true;
    a.residual = f.boolean("use_parallel_residual", true) ? Residual::parallel : Residual::sequential;
    a.tied_head = f.boolean("tie_word_embeddings", false);
    const std::string act = f.string("hidden_act").value_or("gelu");
    if (act == "gelu") a.mlp = Mlp::gelu_erf;
    else if (act == "gelu_new" || act == "gelu_pytorch_tanh") a.mlp = Mlp::gelu_tanh;
    else f.fail("hidden_act is '" + act + "'; lminv's gpt_neox computes gelu (erf), gelu_new or gelu_pytorch_tanh");
    if (f.has("rope_scaling"))
      f.fail("rope_scaling is " + f.raw("rope_scaling").dump() +
             "; lminv computes plain rotary positions (rope_scaling null)");
  }

  json write_config(const ModelSpec& s, DType dtype) const override {
    const Architecture& a = s.arch;
    return {
        {"architectures", {"GPTNeoXForCausalLM"}},
        {"model_type", "gpt_neox"},
        {"hidden_size", s.n_embd},
        {"intermediate_size", s.inner()},
        {"num_hidden_layers", s.n_layer},
        {"num_attention_heads", s.n_head},
        {"vocab_size", s.vocab_size},
        {"max_position_embeddings", s.n_positions},
        {"layer_norm_eps", a.norm_eps},
        {"rotary_pct", a.rotary_fraction},
        {"rotary_emb_base", a.rope_theta},
        {"rope_scaling", nullptr},
        {"attention_bias", a.qkv_bias},
        {"use_parallel_residual", a.residual == Residual::parallel},
        {"hidden_act", a.mlp == Mlp::gelu_erf ? "gelu" : "gelu_new"},
        {"tie_word_embeddings", a.tied_head},
        {"initializer_range", 0.02},
        {"torch_dtype", families::torch_dtype(dtype)},
        {"use_cache", true},
        {"attention_dropout", 0.0},
        {"hidden_dropout", 0.0},
        {"bos_token_id", 0},
        {"eos_token_id", 0},
    };
  }

  std::vector<TensorRule> tensor_rules(const ModelSpec& s) const override {
    const Architecture& a = s.arch;
    const std::int64_t d = s.n_embd, hd = s.head_size(), nh = s.n_head, inner = s.inner();
    std::vector<TensorRule> r;
    r.push_back({Op::copy, "wte.weight", {"gpt_neox.embed_in.weight"}, {{s.vocab_size, d}}});
    auto norm = [&](const std::string& canonical, const std::string& stored) {
      r.push_back({Op::copy, canonical + ".weight", {stored + ".weight"}, {{d}}});
      r.push_back({Op::copy, canonical + ".bias", {stored + ".bias"}, {{d}}});
    };
    for (std::int64_t i = 0; i < s.n_layer; ++i) {
      const std::string h = families::block(i), m = "gpt_neox.layers." + std::to_string(i) + ".";
      norm(h + "ln_1", m + "input_layernorm");
      r.push_back({Op::neox_qkv_weight, h + "attn.c_attn.weight", {m + "attention.query_key_value.weight"},
                   {{3 * nh * hd, d}}, nh, hd});
      if (a.qkv_bias)
        r.push_back({Op::neox_qkv_bias, h + "attn.c_attn.bias", {m + "attention.query_key_value.bias"},
                     {{3 * nh * hd}}, nh, hd});
      r.push_back({Op::linear, h + "attn.c_proj.weight", {m + "attention.dense.weight"}, {{d, nh * hd}}});
      if (a.attn_out_bias) r.push_back({Op::copy, h + "attn.c_proj.bias", {m + "attention.dense.bias"}, {{d}}});
      norm(h + "ln_2", m + "post_attention_layernorm");
      r.push_back({Op::linear, h + "mlp.c_fc.weight", {m + "mlp.dense_h_to_4h.weight"}, {{inner, d}}});
      r.push_back({Op::copy, h + "mlp.c_fc.bias", {m + "mlp.dense_h_to_4h.bias"}, {{inner}}});
      r.push_back({Op::linear, h + "mlp.c_proj.weight", {m + "mlp.dense_4h_to_h.weight"}, {{d, inner}}});
      r.push_back({Op::copy, h + "mlp.c_proj.bias", {m + "mlp.dense_4h_to_h.bias"}, {{d}}});
    }
    norm("ln_f", "gpt_neox.final_layer_norm");
    if (!a.tied_head) r.push_back({Op::copy, "lm_head.weight", {"embed_out.weight"}, {{s.vocab_size, d}}});
    return r;
  }

  // attention.bias / attention.masked_bias (causal mask) and attention.rotary_emb.inv_freq in older checkpoints.
  bool is_buffer(const std::string& n) const override {
    for (const char* suffix : {".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"}) {
      const std::string s = suffix;
      if (n.size() > s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0) return true;
    }
    return false;
  }
  std::string base_prefix() const override { return "gpt_neox."; }
  std::string head_name() const override { return "embed_out.weight"; }
};

}  // namespace

const FamilyAdapter& gpt_neox_family() {
  static const GptNeoxFamily f;
  return f;
}

}  // namespace lminv
