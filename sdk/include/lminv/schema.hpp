// lminv SDK: the canonical weights of a model (names and shapes), the checks of a spec and of a WeightSet, and the
// features a spec needs of a backend. Backends, checkpoint loading and random initialisation all use these, so a
// tensor's name and shape are written down once.
//
// Decoder (ModelKind::decoder), d = n_embd, V = vocab_size, P = n_positions, hd = head_size(), nh = n_head,
// nkv = kv_heads(), inner = inner(); linear weights are stored [in, out] (x W + b), as GPT-2's Conv1D stores them:
//   wte.weight                 [V, d]
//   wpe.weight                 [P, d]                       positions = learned
//   h.{i}.ln_1.weight          [d]        .bias [d]         (bias: layer_norm with norm_bias)
//   h.{i}.attn.c_attn.weight   [d, (nh + 2 nkv) hd]         columns [q heads | k heads | v heads], each head hd wide
//   h.{i}.attn.c_attn.bias     [(nh + 2 nkv) hd]            qkv_bias
//   h.{i}.attn.c_proj.weight   [nh hd, d] .bias [d]         (bias: attn_out_bias)
//   h.{i}.ln_2.weight          [d]        .bias [d]
//   h.{i}.mlp.c_fc.weight      [d, inner] .bias [inner]     gelu_*; swiglu: [d, 2 inner] = [gate | up], bias [2 inner]
//   h.{i}.mlp.c_proj.weight    [inner, d] .bias [d]         (biases: mlp_bias)
//   ln_f.weight                [d]        .bias [d]
//   lm_head.weight             [V, d]                       tied_head false
// for i in [0, n_layer). With GPT-2's setting these are Hugging Face's GPT-2 names without "transformer.".
// MLP kinds (nn.Linear layout [out, in]), D = seq_len d for the fcnets:
//   wte.weight [V, d];  fcnet: fc1 [4D, D], fc2 [4D, 4D];  fcnet_noninvertible: fc2 [D, 4D];
//   transformer_mlp: fc1 [inner, d], fc2 [d, inner];  each fcN.bias [rows of fcN.weight]
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/architecture.hpp"
#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "lminv/weights.hpp"

namespace lminv {

struct TensorSpec {
  std::string name;
  Shape shape;
};

namespace detail {
inline void add_norm(std::vector<TensorSpec>& out, const ModelSpec& s, const std::string& name) {
  out.push_back({name + ".weight", {s.n_embd}});
  if (s.arch.norm == Norm::layer_norm && s.arch.norm_bias) out.push_back({name + ".bias", {s.n_embd}});
}

inline void add_block(std::vector<TensorSpec>& out, const ModelSpec& s, std::int64_t i) {
  const Architecture& a = s.arch;
  const std::int64_t d = s.n_embd, hd = s.head_size(), q = s.n_head * hd, kv = s.kv_heads() * hd;
  const std::int64_t fc = a.mlp == Mlp::swiglu ? 2 * s.inner() : s.inner();
  const std::string h = "h." + std::to_string(i) + ".";
  add_norm(out, s, h + "ln_1");
  out.push_back({h + "attn.c_attn.weight", {d, q + 2 * kv}});
  if (a.qkv_bias) out.push_back({h + "attn.c_attn.bias", {q + 2 * kv}});
  out.push_back({h + "attn.c_proj.weight", {q, d}});
  if (a.attn_out_bias) out.push_back({h + "attn.c_proj.bias", {d}});
  add_norm(out, s, h + "ln_2");
  out.push_back({h + "mlp.c_fc.weight", {d, fc}});
  if (a.mlp_bias) out.push_back({h + "mlp.c_fc.bias", {fc}});
  out.push_back({h + "mlp.c_proj.weight", {s.inner(), d}});
  if (a.mlp_bias) out.push_back({h + "mlp.c_proj.bias", {d}});
}

inline void add_linear(std::vector<TensorSpec>& out, const std::string& name, std::int64_t in, std::int64_t outs) {
  out.push_back({name + ".weight", {outs, in}});
  out.push_back({name + ".bias", {outs}});
}

inline std::string join_words(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}
}  // namespace detail

// Every canonical tensor of a model of `spec` (all n_layer blocks), in a fixed order.
inline std::vector<TensorSpec> weight_schema(const ModelSpec& s) {
  std::vector<TensorSpec> out;
  const std::int64_t d = s.n_embd;
  out.push_back({"wte.weight", {s.vocab_size, d}});
  switch (s.kind) {
    case ModelKind::decoder:
      if (s.arch.positions == Positions::learned) out.push_back({"wpe.weight", {s.n_positions, d}});
      for (std::int64_t i = 0; i < s.n_layer; ++i) detail::add_block(out, s, i);
      detail::add_norm(out, s, "ln_f");
      if (!s.arch.tied_head) out.push_back({"lm_head.weight", {s.vocab_size, d}});
      break;
    case ModelKind::fcnet:
    case ModelKind::fcnet_noninvertible: {
      const std::int64_t D = s.seq_len * d;
      detail::add_linear(out, "fc1", D, 4 * D);
      detail::add_linear(out, "fc2", 4 * D, s.kind == ModelKind::fcnet ? 4 * D : D);
      break;
    }
    case ModelKind::transformer_mlp:
      detail::add_linear(out, "fc1", d, s.inner());
      detail::add_linear(out, "fc2", s.inner(), d);
      break;
  }
  return out;
}

// The tensors a model of `spec` reads: for a decoder the blocks it runs (blocks_run()), wte when the input is in
// vocabulary space or the head ends in a tied lm_head, wpe for learned positions, ln_f when the head applies it (ln_f,
// lm_head), lm_head when untied and the head ends in it (lm_head, lm_head_no_ln_f). For the MLP kinds, wte only with
// input = vocab.
inline std::vector<TensorSpec> used_weights(const ModelSpec& s) {
  const std::vector<TensorSpec> all = weight_schema(s);
  const bool vocab = s.input == InputSpace::vocab;
  if (s.kind != ModelKind::decoder) {
    std::vector<TensorSpec> out;
    for (const TensorSpec& t : all)
      if (t.name != "wte.weight" || vocab) out.push_back(t);
    return out;
  }
  const std::int64_t L = s.blocks_run();
  const bool lm_head = head_has_lm_head(s.head);
  std::vector<TensorSpec> out;
  for (const TensorSpec& t : all) {
    const std::string& n = t.name;
    bool use = true;
    if (n == "wte.weight") use = vocab || (lm_head && s.arch.tied_head);
    else if (n == "lm_head.weight") use = lm_head;
    else if (n.rfind("ln_f.", 0) == 0) use = head_has_ln_f(s.head);
    else if (n.rfind("h.", 0) == 0) use = std::stoll(n.substr(2, n.find('.', 2) - 2)) < L;
    if (use) out.push_back(t);
  }
  return out;
}

// Checks the fields of a spec a backend builds from; throws Error("<who>: <field> ...") naming the field and value.
inline void check_spec(const ModelSpec& s, std::string_view who) {
  auto fail = [&](const std::string& what) {
    throw Error(std::string(who) + ": " + kind_name(s.kind) + " model (family '" + s.family + "') " + what);
  };
  auto str = [](auto v) { return std::to_string(v); };
  if (s.n_embd <= 0) fail("needs a positive n_embd, got " + str(s.n_embd));
  if (s.input == InputSpace::vocab || (s.kind == ModelKind::decoder && head_has_lm_head(s.head)))
    if (s.vocab_size <= 0) fail("needs a positive vocab_size, got " + str(s.vocab_size));
  if (s.kind == ModelKind::fcnet || s.kind == ModelKind::fcnet_noninvertible) {
    if (s.seq_len <= 0) fail("needs a positive seq_len (the prompt's token count), got " + str(s.seq_len));
    if (!s.layers.empty()) fail("has no blocks: layers must be empty");
    return;
  }
  if (s.kind == ModelKind::transformer_mlp) {
    if (s.inner() <= 0) fail("needs a positive MLP width (n_inner, or 4 n_embd), got " + str(s.inner()));
    if (!s.layers.empty()) fail("has no blocks: layers must be empty");
    return;
  }
  const Architecture& a = s.arch;
  if (s.n_head <= 0) fail("needs a positive n_head, got " + str(s.n_head));
  if (a.head_dim < 0) fail("needs head_dim >= 0 (0: n_embd / n_head), got " + str(a.head_dim));
  if (a.head_dim == 0 && s.n_embd % s.n_head != 0)
    fail("needs n_embd divisible by n_head, got n_embd " + str(s.n_embd) + " and n_head " + str(s.n_head));
  if (a.n_kv_head < 0) fail("needs n_kv_head >= 0 (0: n_head), got " + str(a.n_kv_head));
  if (s.n_head % s.kv_heads() != 0)
    fail("needs n_head divisible by n_kv_head, got n_head " + str(s.n_head) + " and n_kv_head " + str(s.kv_heads()));
  if (s.n_layer < 0) fail("needs n_layer >= 0, got " + str(s.n_layer));
  if (s.inner() <= 0) fail("needs a positive MLP width (n_inner, or 4 n_embd), got " + str(s.inner()));
  if (s.n_positions <= 0) fail("needs a positive n_positions, got " + str(s.n_positions));
  if (s.seq_len < 0 || s.seq_len > s.n_positions)
    fail("takes at most n_positions = " + str(s.n_positions) + " tokens, got seq_len " + str(s.seq_len));
  if (s.blocks < 0 || s.blocks > s.n_layer)
    fail("has n_layer = " + str(s.n_layer) + " blocks: blocks must be in 0 .. " + str(s.n_layer) + ", got " +
         str(s.blocks));
  for (std::int64_t l : s.layers)
    if (l < 0 || l > s.n_layer)
      fail("has n_layer = " + str(s.n_layer) + " blocks: every entry of layers must be in 0 .. " + str(s.n_layer) +
           ", got " + str(l));
  if (!std::isfinite(a.norm_eps) || a.norm_eps < 0)
    fail("needs a finite norm_eps >= 0, got " + std::to_string(a.norm_eps));
  if (a.positions == Positions::rotary) {
    if (!(a.rope_theta > 0) || !std::isfinite(a.rope_theta))
      fail("needs a positive rope_theta, got " + std::to_string(a.rope_theta));
    if (!(a.rotary_fraction > 0 && a.rotary_fraction <= 1))
      fail("needs rotary_fraction in (0, 1], got " + std::to_string(a.rotary_fraction));
    if (s.rotary_dim() < 2)
      fail("rotates no feature: floor(head_dim " + str(s.head_size()) + " * rotary_fraction " +
           std::to_string(a.rotary_fraction) + ") rounded down to even is " + str(s.rotary_dim()));
  }
}

// The features a model of `spec` needs of its backend (architecture.hpp's feature names).
inline std::vector<std::string> required_features(const ModelSpec& s) {
  std::vector<std::string> f;
  if (s.input == InputSpace::vocab) f.push_back(feature::vocab_input);
  if (s.kind != ModelKind::decoder) return f;
  const Architecture& a = s.arch;
  if (a.norm == Norm::rms_norm) f.push_back(feature::rms_norm);
  else f.push_back(a.norm_bias ? feature::layer_norm : feature::layer_norm_no_bias);
  if (a.positions == Positions::learned) {
    f.push_back(feature::learned_positions);
  } else {
    f.push_back(feature::rotary);
    if (s.rotary_dim() < s.head_size()) f.push_back(feature::partial_rotary);
  }
  if (s.kv_heads() < s.n_head) f.push_back(feature::grouped_kv);
  if (s.head_size() * s.n_head != s.n_embd) f.push_back(feature::head_dim);
  f.push_back(mlp_name(a.mlp));
  if (a.residual == Residual::parallel) f.push_back(feature::parallel_residual);
  if (!a.tied_head && head_has_lm_head(s.head)) f.push_back(feature::untied_head);
  if (!s.layers.empty()) f.push_back(feature::extra_layers);
  if (s.weight_dtype == WeightDType::int8) f.push_back(feature::int8_weights);
  if (s.dropout > 0) f.push_back(feature::dropout);
  return f;
}

// Throws Error naming the first feature of `spec` not in `supported`, and the backend.
inline void check_features(const ModelSpec& s, const std::vector<std::string>& supported, std::string_view who) {
  for (const std::string& f : required_features(s))
    if (std::find(supported.begin(), supported.end(), f) == supported.end())
      throw Error(std::string(who) + ": family '" + s.family + "' needs feature '" + f +
                  "', which this backend does not compute (it has: " + detail::join_words(supported) + ")");
}

// Checks that `weights` holds every tensor in `expected` with its shape. With `exact`, a tensor not in `expected` is an
// error too (checkpoints, random init); backends check used_weights(spec) without it. Errors name the tensor.
inline void check_weights(const std::vector<TensorSpec>& expected, const WeightSet& weights, std::string_view who,
                          bool exact = false) {
  for (const TensorSpec& t : expected) {
    if (!weights.contains(t.name))
      throw Error(std::string(who) + ": missing tensor '" + t.name + "' (expected shape " + shape_string(t.shape) +
                  ")");
    const Tensor& w = weights.get(t.name);
    if (w.shape() != t.shape)
      throw Error(std::string(who) + ": tensor '" + t.name + "' has shape " + shape_string(w.shape()) +
                  ", expected " + shape_string(t.shape));
  }
  if (!exact) return;
  std::set<std::string> names;
  for (const TensorSpec& t : expected) names.insert(t.name);
  for (const std::string& n : weights.names())
    if (!names.count(n)) throw Error(std::string(who) + ": unexpected tensor '" + n + "'");
}

}  // namespace lminv
