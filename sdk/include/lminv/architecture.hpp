// lminv SDK: what kind of network a model is, and for the decoder-only transformer, its architecture as fields.
//
// Every transformer family (gpt2, llama, mistral, qwen2, gpt_neox, ...) is one setting of `Architecture`: a backend
// implements the decoder once, with these switches, and never looks at a family's name. The host's family adapters
// (host/families/) map a Hugging Face config.json to these fields; docs/families.md lists each family's setting.
//
// One block of the decoder, for the residual stream h [T, d] (n = norm, as set by `norm`):
//   sequential:  a = h + attn(n_1(h));   h' = a + mlp(n_2(a))
//   parallel:    h' = h + attn(n_1(h)) + mlp(n_2(h))                       (GPT-NeoX's use_parallel_residual)
//   attn(x)  = c_proj(concat_heads(softmax(q k^T / sqrt(head_dim) + causal mask) v)),
//              [q | k | v] = x c_attn (+ bias),  n_head query heads, n_kv_head key/value heads (query head j uses kv
//              head j / (n_head / n_kv_head)), q and k rotated by position when positions = rotary
//   mlp(x)   = c_proj(act(x c_fc)) for gelu_tanh and gelu_erf;  c_proj(silu(x W_gate) * (x W_up)) for swiglu, where
//              c_fc = [W_gate | W_up] along its output dimension
// The model: h_0 = x (+ wpe[0:T] when positions = learned; nothing when none), blocks, then the head (none, the final norm ln_f, or
// ln_f followed by the lm_head: wte^T when tied_head, else lm_head.weight^T).
//
// Rotary positions (Hugging Face's rotate_half layout, as Llama and GPT-NeoX use it): the first r = rotary_dim()
// features of each query and key head are rotated, the rest pass through. With inv_freq[i] = rope_theta^(-2i / r),
// i in [0, r/2), angle a = t inv_freq[i] at position t: out[i] = x[i] cos a - x[i + r/2] sin a and
// out[i + r/2] = x[i + r/2] cos a + x[i] sin a.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lminv {

// The network a backend builds. `decoder` is every transformer family; the others are the seed study's MLPs.
enum class ModelKind { decoder, fcnet, fcnet_noninvertible, transformer_mlp };

enum class Norm { layer_norm, rms_norm };
// learned: wpe [n_positions, d] added to the input; rotary: q and k rotated by position; none: no position signal
// at all (the seed study's InputGPT multiplies its vocabulary-space input by wte and adds no wpe).
enum class Positions { learned, rotary, none };
enum class Mlp { gelu_tanh, gelu_erf, swiglu };
enum class Residual { sequential, parallel };

struct Architecture {
  Norm norm = Norm::layer_norm;
  bool norm_bias = true;   // layer_norm only: a bias after the scale (rms_norm has none)
  double norm_eps = 1e-5;  // added to the variance (layer_norm) or the mean square (rms_norm)

  Positions positions = Positions::learned;
  double rope_theta = 10000.0;   // rotary base
  double rotary_fraction = 1.0;  // rotary features per head: floor(head_dim * fraction), even

  std::int64_t n_kv_head = 0;  // key/value heads (grouped-query attention); 0 means n_head
  std::int64_t head_dim = 0;   // features per head; 0 means n_embd / n_head
  bool qkv_bias = true;        // c_attn has a bias
  bool attn_out_bias = true;   // attn.c_proj has a bias

  Mlp mlp = Mlp::gelu_tanh;
  bool mlp_bias = true;  // c_fc and mlp.c_proj have biases

  Residual residual = Residual::sequential;
  bool tied_head = true;  // the lm_head is wte^T; otherwise lm_head.weight [V, d]
};

inline const char* kind_name(ModelKind k) {
  switch (k) {
    case ModelKind::decoder: return "decoder";
    case ModelKind::fcnet: return "fcnet";
    case ModelKind::fcnet_noninvertible: return "fcnet_noninvertible";
    case ModelKind::transformer_mlp: return "transformer_mlp";
  }
  return "?";
}
inline std::optional<ModelKind> parse_kind(std::string_view s) {
  if (s == "decoder") return ModelKind::decoder;
  if (s == "fcnet") return ModelKind::fcnet;
  if (s == "fcnet_noninvertible") return ModelKind::fcnet_noninvertible;
  if (s == "transformer_mlp") return ModelKind::transformer_mlp;
  return std::nullopt;
}

inline const char* norm_name(Norm n) { return n == Norm::layer_norm ? "layer_norm" : "rms_norm"; }
inline std::optional<Norm> parse_norm(std::string_view s) {
  if (s == "layer_norm") return Norm::layer_norm;
  if (s == "rms_norm") return Norm::rms_norm;
  return std::nullopt;
}
inline const char* positions_name(Positions p) {
  switch (p) {
    case Positions::learned: return "learned";
    case Positions::rotary: return "rotary";
    case Positions::none: return "none";
  }
  return "?";
}
inline std::optional<Positions> parse_positions(std::string_view s) {
  if (s == "learned") return Positions::learned;
  if (s == "rotary") return Positions::rotary;
  if (s == "none") return Positions::none;
  return std::nullopt;
}
inline const char* mlp_name(Mlp m) {
  switch (m) {
    case Mlp::gelu_tanh: return "gelu_tanh";
    case Mlp::gelu_erf: return "gelu_erf";
    case Mlp::swiglu: return "swiglu";
  }
  return "?";
}
inline std::optional<Mlp> parse_mlp(std::string_view s) {
  if (s == "gelu_tanh") return Mlp::gelu_tanh;
  if (s == "gelu_erf") return Mlp::gelu_erf;
  if (s == "swiglu") return Mlp::swiglu;
  return std::nullopt;
}
inline const char* residual_name(Residual r) { return r == Residual::sequential ? "sequential" : "parallel"; }
inline std::optional<Residual> parse_residual(std::string_view s) {
  if (s == "sequential") return Residual::sequential;
  if (s == "parallel") return Residual::parallel;
  return std::nullopt;
}

// Feature names: what a spec needs of a backend and what BackendInfo::features lists. A backend that lists a
// feature computes it in every dtype it lists; one that cannot refuses the spec with a message naming the feature.
namespace feature {
inline constexpr const char* layer_norm = "layer_norm";
inline constexpr const char* layer_norm_no_bias = "layer_norm_no_bias";
inline constexpr const char* rms_norm = "rms_norm";
inline constexpr const char* learned_positions = "learned_positions";
inline constexpr const char* rotary = "rotary";
inline constexpr const char* partial_rotary = "partial_rotary";
inline constexpr const char* grouped_kv = "grouped_kv";  // n_kv_head < n_head
inline constexpr const char* head_dim = "head_dim";      // head_dim * n_head != n_embd
inline constexpr const char* gelu_tanh = "gelu_tanh";
inline constexpr const char* gelu_erf = "gelu_erf";
inline constexpr const char* swiglu = "swiglu";
inline constexpr const char* parallel_residual = "parallel_residual";
inline constexpr const char* untied_head = "untied_head";
inline constexpr const char* extra_layers = "extra_layers";  // spec.layers not empty
inline constexpr const char* vocab_input = "vocab_input";    // input = vocab
inline constexpr const char* prefix_cache = "prefix_cache";  // decoder models offer the prefix_cache capability
inline constexpr const char* int8_weights = "int8_weights";  // weight_dtype = int8
inline constexpr const char* dropout = "dropout";            // dropout > 0
}  // namespace feature

}  // namespace lminv
