#include "family.hpp"

#include <algorithm>
#include <cmath>

#include "config.hpp"  // the size ceilings
#include "lminv/error.hpp"

namespace lminv {

using json = nlohmann::json;

void ConfigFields::fail(const std::string& what) const { throw Error(file_.string() + ": " + what); }

std::int64_t ConfigFields::positive_int(const char* key, std::int64_t fallback, std::int64_t max) const {
  if (!j_.contains(key)) return fallback;
  const json& v = j_[key];
  if (!(v.is_number_unsigned() || v.is_number_integer()) || v.get<std::int64_t>() <= 0)
    fail(std::string(key) + " is " + v.dump() + ", not a positive integer");
  if (v.get<std::int64_t>() > max)
    fail(std::string(key) + " is " + v.dump() + ", beyond lminv's limit of " + std::to_string(max));
  return v.get<std::int64_t>();
}

std::int64_t ConfigFields::count(const char* key, std::int64_t fallback, std::int64_t max) const {
  if (!j_.contains(key)) return fallback;
  const json& v = j_[key];
  if (!(v.is_number_unsigned() || v.is_number_integer()) || v.get<std::int64_t>() < 0)
    fail(std::string(key) + " is " + v.dump() + ", not a non-negative integer");
  if (v.get<std::int64_t>() > max)
    fail(std::string(key) + " is " + v.dump() + ", beyond lminv's limit of " + std::to_string(max));
  return v.get<std::int64_t>();
}

double ConfigFields::positive_number(const char* key, double fallback) const {
  if (!j_.contains(key)) return fallback;
  const json& v = j_[key];
  if (v.is_number() && v.get<double>() > 0 && std::isfinite(v.get<double>())) return v.get<double>();
  fail(std::string(key) + " is " + v.dump() + ", not a positive number");
}

double ConfigFields::fraction(const char* key, double fallback) const {
  const double v = positive_number(key, fallback);
  if (v > 1) fail(std::string(key) + " is " + j_[key].dump() + ", not in (0, 1]");
  return v;
}

bool ConfigFields::boolean(const char* key, bool fallback) const {
  if (!has(key)) return fallback;
  if (!j_[key].is_boolean()) fail(std::string(key) + " is " + j_[key].dump() + ", not true or false");
  return j_[key].get<bool>();
}

std::optional<std::string> ConfigFields::string(const char* key) const {
  if (!has(key)) return std::nullopt;
  if (!j_[key].is_string()) fail(std::string(key) + " is " + j_[key].dump() + ", not a string");
  return j_[key].get<std::string>();
}

const FamilyAdapter& gpt2_family();
const FamilyAdapter& llama_family();
const FamilyAdapter& mistral_family();
const FamilyAdapter& qwen2_family();
const FamilyAdapter& gpt_neox_family();
const FamilyAdapter& fcnet_family();
const FamilyAdapter& fcnet_noninvertible_family();
const FamilyAdapter& transformer_mlp_family();

namespace {
const std::vector<const FamilyAdapter*>& all_families() {
  static const std::vector<const FamilyAdapter*> all{
      &gpt2_family(),  &llama_family(), &mistral_family(), &qwen2_family(), &gpt_neox_family(),
      &fcnet_family(), &fcnet_noninvertible_family(), &transformer_mlp_family()};
  return all;
}
}  // namespace

const FamilyAdapter* find_family(std::string_view name) {
  for (const FamilyAdapter* f : all_families())
    if (f->name() == name) return f;
  return nullptr;
}

std::vector<std::string> family_names() {
  std::vector<std::string> out;
  for (const FamilyAdapter* f : all_families()) out.push_back(f->name());
  return out;
}

const FamilyAdapter& family(std::string_view name) {
  if (const FamilyAdapter* f = find_family(name)) return *f;
  std::string known;
  for (const std::string& n : family_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown model family '" + std::string(name) + "' (lminv has: " + known + ")");
}

namespace families {

std::string block(std::int64_t i) { return "h." + std::to_string(i) + "."; }

const char* torch_dtype(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
  }
  return "float32";
}

std::vector<TensorRule> llama_style_rules(const ModelSpec& s) {
  using Op = TensorRule::Op;
  const Architecture& a = s.arch;
  const std::int64_t d = s.n_embd, hd = s.head_size(), q = s.n_head * hd, kv = s.kv_heads() * hd, inner = s.inner();
  std::vector<TensorRule> r;
  r.push_back({Op::copy, "wte.weight", {"model.embed_tokens.weight"}, {{s.vocab_size, d}}});
  for (std::int64_t i = 0; i < s.n_layer; ++i) {
    const std::string h = block(i), m = "model.layers." + std::to_string(i) + ".";
    r.push_back({Op::copy, h + "ln_1.weight", {m + "input_layernorm.weight"}, {{d}}});
    r.push_back({Op::concat_linear,
                 h + "attn.c_attn.weight",
                 {m + "self_attn.q_proj.weight", m + "self_attn.k_proj.weight", m + "self_attn.v_proj.weight"},
                 {{q, d}, {kv, d}, {kv, d}}});
    if (a.qkv_bias)
      r.push_back({Op::concat,
                   h + "attn.c_attn.bias",
                   {m + "self_attn.q_proj.bias", m + "self_attn.k_proj.bias", m + "self_attn.v_proj.bias"},
                   {{q}, {kv}, {kv}}});
    r.push_back({Op::linear, h + "attn.c_proj.weight", {m + "self_attn.o_proj.weight"}, {{d, q}}});
    if (a.attn_out_bias) r.push_back({Op::copy, h + "attn.c_proj.bias", {m + "self_attn.o_proj.bias"}, {{d}}});
    r.push_back({Op::copy, h + "ln_2.weight", {m + "post_attention_layernorm.weight"}, {{d}}});
    r.push_back({Op::concat_linear,
                 h + "mlp.c_fc.weight",
                 {m + "mlp.gate_proj.weight", m + "mlp.up_proj.weight"},
                 {{inner, d}, {inner, d}}});
    if (a.mlp_bias)
      r.push_back(
          {Op::concat, h + "mlp.c_fc.bias", {m + "mlp.gate_proj.bias", m + "mlp.up_proj.bias"}, {{inner}, {inner}}});
    r.push_back({Op::linear, h + "mlp.c_proj.weight", {m + "mlp.down_proj.weight"}, {{d, inner}}});
    if (a.mlp_bias) r.push_back({Op::copy, h + "mlp.c_proj.bias", {m + "mlp.down_proj.bias"}, {{d}}});
  }
  r.push_back({Op::copy, "ln_f.weight", {"model.norm.weight"}, {{d}}});
  if (!a.tied_head) r.push_back({Op::copy, "lm_head.weight", {"lm_head.weight"}, {{s.vocab_size, d}}});
  return r;
}

void read_llama_style_config(const ConfigFields& c, ModelSpec& s, bool tie_default) {
  s.kind = ModelKind::decoder;
  s.n_embd = c.positive_int("hidden_size", 4096, kMaxWidth);
  s.n_inner = c.positive_int("intermediate_size", 11008, kMaxInner);
  s.n_layer = c.count("num_hidden_layers", 32, kMaxLayers);
  s.n_head = c.positive_int("num_attention_heads", 32, kMaxHeads);
  s.vocab_size = c.positive_int("vocab_size", 32000, kMaxVocab);
  s.n_positions = c.positive_int("max_position_embeddings", 2048, kMaxPositions);
  Architecture& a = s.arch;
  a = Architecture{};
  a.norm = Norm::rms_norm;
  a.norm_bias = false;
  a.norm_eps = c.positive_number("rms_norm_eps", 1e-6);
  a.positions = Positions::rotary;
  a.rope_theta = c.positive_number("rope_theta", 10000.0);
  a.rotary_fraction = c.fraction("partial_rotary_factor", 1.0);
  a.n_kv_head = c.positive_int("num_key_value_heads", s.n_head, kMaxHeads);
  if (s.n_head % a.n_kv_head != 0)
    c.fail("num_attention_heads = " + std::to_string(s.n_head) + " is not a multiple of num_key_value_heads = " +
           std::to_string(a.n_kv_head));
  a.head_dim = c.positive_int("head_dim", s.n_embd / s.n_head, kMaxWidth);
  if (a.head_dim * s.n_head == s.n_embd) a.head_dim = 0;  // the default: say so in the spec
  else if (!c.has("head_dim"))
    c.fail("hidden_size = " + std::to_string(s.n_embd) + " is not a multiple of num_attention_heads = " +
           std::to_string(s.n_head) + " and there is no head_dim");
  a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;  // the families that have biases set them
  a.mlp = Mlp::swiglu;
  a.residual = Residual::sequential;
  a.tied_head = c.boolean("tie_word_embeddings", tie_default);
  if (c.has("rope_scaling"))
    c.fail("rope_scaling is " + c.raw("rope_scaling").dump() +
           "; lminv computes plain rotary positions (rope_scaling null)");
  if (auto act = c.string("hidden_act"); act && *act != "silu")
    c.fail("hidden_act is '" + *act + "'; lminv's gated MLP computes silu(gate) * up (hidden_act \"silu\")");
  if (c.has("pretraining_tp") && c.positive_int("pretraining_tp", 1) != 1)
    c.fail("pretraining_tp is " + c.raw("pretraining_tp").dump() + "; lminv reads checkpoints with pretraining_tp 1");
}

json write_llama_style_config(const ModelSpec& s, DType dtype, const char* model_type, const char* architecture) {
  const Architecture& a = s.arch;
  json j = {
      {"architectures", {architecture}},
      {"model_type", model_type},
      {"hidden_size", s.n_embd},
      {"intermediate_size", s.inner()},
      {"num_hidden_layers", s.n_layer},
      {"num_attention_heads", s.n_head},
      {"num_key_value_heads", s.kv_heads()},
      {"head_dim", s.head_size()},
      {"vocab_size", s.vocab_size},
      {"max_position_embeddings", s.n_positions},
      {"rms_norm_eps", a.norm_eps},
      {"rope_theta", a.rope_theta},
      {"rope_scaling", nullptr},
      {"hidden_act", "silu"},
      {"initializer_range", 0.02},
      {"tie_word_embeddings", a.tied_head},
      {"torch_dtype", torch_dtype(dtype)},
      {"use_cache", true},
      {"attention_dropout", 0.0},
  };
  if (a.rotary_fraction != 1.0) j["partial_rotary_factor"] = a.rotary_fraction;
  return j;
}

bool is_llama_style_buffer(const std::string& n) {
  const std::string suffix = "rotary_emb.inv_freq";
  return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace families
}  // namespace lminv
