// The torch backend's families, as the reference backend computes them (plugins/backend-reference: mlp_model.cpp,
// gpt2_model.cpp, gpt2_layers.hpp), written as ATen graphs for autograd.
//
// GPT-2 (Hugging Face's GPT2LMHeadModel, first k blocks):
//   h_0   = x + wpe[0:T],   x = input (input = embedding, [B, T, d]) or input @ wte (input = vocab, [B, T, V])
//   a_l   = h_l + attn.c_proj(attention(attn.c_attn(ln_1(h_l))))      causal, scores scaled by 1 / sqrt(head_dim)
//   h_l+1 = a_l + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a_l))))
//   output = [ main(h_k) | h_layers[0] | h_layers[1] | ... ] along the last dimension, [B, T, D_main + d len(layers)]
//   main   = h_k (head none), ln_f(h_k) (head ln_f) or ln_f(h_k) @ wte^T (head lm_head, tied, D_main = V)
// with L = max(k, max(layers)) blocks run. Conv1D weights are [in, out] (x W + b); LayerNorm eps is the spec's.
//
// GPT-2 is causal, so it also runs a few positions at a time against the keys and values of the positions before
// them (the prefix cache: append_prefix, next_after_prefix): each position's row of the attention scores is the same
// as in forward(), split into the part against the kept prefix and the part among the new positions.
//
// MLP families (nn.Linear weights [out, in], GELU in its exact erf form):
//   fcnet                [B, T d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)      output [B, 4 T d]
//   fcnet_noninvertible  the same with a last layer of T d outputs                          output [B, T d]
//   transformer_mlp      per token: Linear(d, inner) -> GELU -> Linear(inner, d)           output [B, T, d]
// after x = input or input @ wte (input = vocab). spec.blocks and spec.head are not used; layers must be empty.
#include "torch_networks.hpp"

#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/softmax.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace lminv::torch_backend {

c10::ScalarType scalar_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return at::kFloat;
    case DType::f64: return at::kDouble;
    case DType::bf16: return at::kBFloat16;  // the same 16 bits as lminv::bf16
  }
  throw Error(std::string(kWho) + ": unknown dtype");
}

at::Tensor to_aten(const Tensor& t, const at::TensorOptions& options) {
  if (t.nbytes() != static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype()))
    throw Error(std::string(kWho) + ": an empty tensor where values were expected");
  const at::Tensor view = at::from_blob(const_cast<void*>(t.raw()), t.shape(),
                                        at::TensorOptions().dtype(scalar_type(t.dtype())));
  return view.to(options, /*non_blocking=*/false, /*copy=*/true);
}

Tensor to_lminv(const at::Tensor& t, DType dtype) {
  const at::Tensor host = t.detach().to(at::kCPU, scalar_type(dtype)).contiguous();
  Tensor out(dtype, Shape(host.sizes().begin(), host.sizes().end()));
  if (out.nbytes()) std::memcpy(out.raw(), host.data_ptr(), out.nbytes());
  return out;
}

// Families without a prefix cache: TorchModel offers none (has_prefix_cache() is false), so these are not reached.
void Network::append_prefix(const at::Tensor& /*rows*/, KeyValueCache& /*cache*/) const {
  throw Error(std::string(kWho) + ": this family has no prefix cache");
}
at::Tensor Network::next_after_prefix(const at::Tensor& /*candidates*/, const KeyValueCache& /*cache*/) const {
  throw Error(std::string(kWho) + ": this family has no prefix cache");
}

namespace {

// x [..., in] times a weight along the last dimension, plus bias (when defined): x W + b for a weight stored
// [in, out] (Conv1D, wte for a vocabulary-space input), x W^T + b for one stored [out, in] (nn.Linear, the tied
// lm_head). A single row goes through a matrix-vector product: OpenBLAS 0.3.21 packs the whole weight for a GEMM
// even when it has one row, which made fcnet's batch-1 steps 2.5 to 4 times slower (measured); from two rows on,
// the GEMM is as fast as row-by-row products or faster.
enum class Layout { in_out, out_in };
at::Tensor affine(const at::Tensor& x, const at::Tensor& weight, Layout layout, const at::Tensor& bias = {}) {
  const std::int64_t in = x.size(-1);
  const at::Tensor w = layout == Layout::out_in ? weight : weight.t();  // [out, in]
  std::vector<std::int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  if (x.numel() == in) {
    const at::Tensor v = x.reshape({in});
    return (bias.defined() ? at::addmv(bias, w, v) : at::mv(w, v)).view(sizes);
  }
  const at::Tensor rows = x.reshape({-1, in});
  return (bias.defined() ? at::addmm(bias, rows, w.t()) : at::mm(rows, w.t())).view(sizes);
}

// The weights a network uses, checked and converted once. `sizes` describes the spec for error messages.
class WeightLoader {
 public:
  WeightLoader(const WeightSet& weights, const at::TensorOptions& options, std::string family, std::string sizes)
      : weights_(weights), options_(options), family_(std::move(family)), sizes_(std::move(sizes)) {}

  at::Tensor operator()(const std::string& name, const Shape& shape) const {
    if (!weights_.contains(name))
      throw Error(std::string(kWho) + ": family '" + family_ + "' needs weight '" + name + "' " + shape_string(shape) +
                  ", which the weights lack" + sizes_);
    const Tensor& tensor = weights_.get(name);
    if (tensor.shape() != shape)
      throw Error(std::string(kWho) + ": weight '" + name + "' has shape " + shape_string(tensor.shape()) +
                  ", expected " + shape_string(shape) + sizes_);
    return to_aten(tensor, options_);
  }

 private:
  const WeightSet& weights_;
  at::TensorOptions options_;
  std::string family_, sizes_;
};

// ---- GPT-2 --------------------------------------------------------------------------------------------------------

class Gpt2Network final : public Network {
 public:
  Gpt2Network(const ModelSpec& spec, const WeightSet& weights, const at::TensorOptions& options)
      : C_(spec.n_embd),
        NH_(spec.n_head),
        hs_(spec.n_embd / spec.n_head),
        T_(spec.seq_len),
        k_(spec.blocks),
        eps_(spec.layer_norm_epsilon),
        head_(spec.head),
        vocab_input_(spec.input == InputSpace::vocab),
        layers_(spec.layers) {
    const std::int64_t V = spec.vocab_size, inner = spec.inner();
    std::int64_t L = k_;
    for (std::int64_t l : layers_) L = std::max(L, l);
    const WeightLoader load(weights, options, "gpt2",
                            " (family 'gpt2' with n_embd " + std::to_string(spec.n_embd) + ", n_inner " +
                                std::to_string(inner) + ", vocab_size " + std::to_string(V) + ", n_positions " +
                                std::to_string(spec.n_positions) + ")");
    if (vocab_input_ || head_ == Head::lm_head) wte_ = load("wte.weight", {V, C_});
    // Only the first T positions are ever added: keep them, contiguous.
    wpe_ = load("wpe.weight", {spec.n_positions, C_}).narrow(0, 0, T_).contiguous();
    for (std::int64_t l = 0; l < L; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      Block b;
      b.ln_1_weight = load(h + "ln_1.weight", {C_});
      b.ln_1_bias = load(h + "ln_1.bias", {C_});
      b.attn_weight = load(h + "attn.c_attn.weight", {C_, 3 * C_});
      b.attn_bias = load(h + "attn.c_attn.bias", {3 * C_});
      b.attn_proj_weight = load(h + "attn.c_proj.weight", {C_, C_});
      b.attn_proj_bias = load(h + "attn.c_proj.bias", {C_});
      b.ln_2_weight = load(h + "ln_2.weight", {C_});
      b.ln_2_bias = load(h + "ln_2.bias", {C_});
      b.fc_weight = load(h + "mlp.c_fc.weight", {C_, inner});
      b.fc_bias = load(h + "mlp.c_fc.bias", {inner});
      b.mlp_proj_weight = load(h + "mlp.c_proj.weight", {inner, C_});
      b.mlp_proj_bias = load(h + "mlp.c_proj.bias", {C_});
      blocks_.push_back(std::move(b));
    }
    if (head_ != Head::none) {
      ln_f_weight_ = load("ln_f.weight", {C_});
      ln_f_bias_ = load("ln_f.bias", {C_});
    }
    // True above the diagonal: position t attends to positions <= t only.
    causal_mask_ = at::ones({T_, T_}, options.dtype(at::kBool)).triu(1);
  }

  at::Tensor forward(const at::Tensor& x) const override {
    std::vector<at::Tensor> stream;  // h_0 .. h_L
    stream.reserve(blocks_.size() + 1);
    stream.push_back(embed(x, 0));
    for (const Block& b : blocks_) stream.push_back(block(stream.back(), b));
    return output(stream);
  }

  bool has_prefix_cache() const override { return true; }

  void append_prefix(const at::Tensor& rows, KeyValueCache& cache) const override {
    const std::int64_t n = rows.size(0), t = cache.length;
    std::vector<at::Tensor> keys(blocks_.size()), values(blocks_.size());  // the cache's next state
    at::Tensor h = embed(rows.unsqueeze(0), t);                            // [1, n, C]
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      const Block& b = blocks_[l];
      at::Tensor new_keys, new_values;  // [NH, n, hs]
      const at::Tensor att = attention_after_prefix(qkv(h, b), prefix_part(cache.keys, t, l),
                                                    prefix_part(cache.values, t, l), &new_keys, &new_values);
      keys[l] = t > 0 ? at::cat({cache.keys[l], new_keys}, 1) : new_keys.contiguous();
      values[l] = t > 0 ? at::cat({cache.values[l], new_values}, 1) : new_values.contiguous();
      // The last block's output at the prefix is not needed: only later blocks read h at earlier positions.
      if (l + 1 < blocks_.size()) h = after_attention(h, att, b);
    }
    // Nothing below throws: the cache changes whole or not at all.
    cache.keys = std::move(keys);
    cache.values = std::move(values);
    cache.length = t + n;
  }

  at::Tensor next_after_prefix(const at::Tensor& candidates, const KeyValueCache& cache) const override {
    const std::int64_t t = cache.length;
    std::vector<at::Tensor> stream;  // h_0 .. h_L at position t, [B, 1, C]
    stream.reserve(blocks_.size() + 1);
    stream.push_back(embed(candidates.unsqueeze(1), t));
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      const Block& b = blocks_[l];
      const at::Tensor& h = stream.back();
      const at::Tensor att =
          attention_after_prefix(qkv(h, b), prefix_part(cache.keys, t, l), prefix_part(cache.values, t, l));
      stream.push_back(after_attention(h, att, b));
    }
    return output(stream).select(1, 0);  // [B, D]
  }

 private:
  struct Block {
    at::Tensor ln_1_weight, ln_1_bias;            // [C]
    at::Tensor attn_weight, attn_bias;            // [C, 3C], [3C]
    at::Tensor attn_proj_weight, attn_proj_bias;  // [C, C], [C]
    at::Tensor ln_2_weight, ln_2_bias;            // [C]
    at::Tensor fc_weight, fc_bias;                // [C, inner], [inner]
    at::Tensor mlp_proj_weight, mlp_proj_bias;    // [inner, C], [C]
  };

  at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) const {
    return at::layer_norm(x, {C_}, weight, bias, eps_, /*cudnn_enable=*/true);
  }

  // Hugging Face's Conv1D: [B, T, in] -> [B, T, out], x W + b with W [in, out] as stored.
  static at::Tensor conv1d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    return affine(x, weight, Layout::in_out, bias);
  }

  // h_0 = x + wpe at positions start .. start + n - 1, for x [B, n, d or V] -> [B, n, C].
  at::Tensor embed(const at::Tensor& x, std::int64_t start) const {
    const at::Tensor e = vocab_input_ ? affine(x, wte_, Layout::in_out) : x;
    return e.add(wpe_.narrow(0, start, x.size(1)));
  }

  // The output from the residual stream h_0 .. h_L ([B, n, C] each): [ main(h_k) | h_layers[0] | ... ], [B, n, D].
  at::Tensor output(const std::vector<at::Tensor>& stream) const {
    const at::Tensor& h_k = stream[static_cast<std::size_t>(k_)];
    at::Tensor main = h_k;
    if (head_ != Head::none) main = layer_norm(h_k, ln_f_weight_, ln_f_bias_);
    if (head_ == Head::lm_head) main = affine(main, wte_, Layout::out_in);  // ln_f(h_k) wte^T
    if (layers_.empty()) return main;
    std::vector<at::Tensor> parts{main};
    for (std::int64_t l : layers_) parts.push_back(stream[static_cast<std::size_t>(l)]);
    return at::cat(parts, -1);
  }

  // Causal self-attention of qkv [B, T, 3C] -> [B, T, C] (heads merged).
  at::Tensor attention(const at::Tensor& qkv) const {
    const std::int64_t B = qkv.size(0);
    const std::vector<at::Tensor> qkv_parts = qkv.split(C_, -1);
    auto heads = [&](const at::Tensor& t) { return t.reshape({B, T_, NH_, hs_}).transpose(1, 2); };  // [B, NH, T, hs]
    const at::Tensor q = heads(qkv_parts[0]), k = heads(qkv_parts[1]), v = heads(qkv_parts[2]);
    const at::Tensor scores = at::matmul(q, k.transpose(-2, -1))
                                  .div(std::sqrt(static_cast<double>(hs_)))
                                  .masked_fill(causal_mask_, -std::numeric_limits<double>::infinity());
    const at::Tensor att = at::softmax(scores, -1);                          // [B, NH, T, T]
    return at::matmul(att, v).transpose(1, 2).reshape({B, T_, C_});  // [B, T, C]
  }

  // Attention of n new positions in each of B sequences that share a prefix of t positions, whose keys and values
  // per head are given (prefix_keys, prefix_values [NH, t, hs]; undefined when t is 0): qkv [B, n, 3C] of the new
  // positions -> [B, n, C] (heads merged). A new position attends to the whole prefix and, causally, to the new
  // positions up to itself: its row of forward()'s scores, in two parts. The prefix is the same for the B sequences,
  // so each head meets the queries of all B n positions in one matrix product. When given, new_keys and new_values
  // receive the new positions' keys and values [NH, n, hs] (of sequence 0: the prefix's own, when B is 1).
  at::Tensor attention_after_prefix(const at::Tensor& qkv, const at::Tensor& prefix_keys,
                                    const at::Tensor& prefix_values, at::Tensor* new_keys = nullptr,
                                    at::Tensor* new_values = nullptr) const {
    const std::int64_t B = qkv.size(0), n = qkv.size(1), t = prefix_keys.defined() ? prefix_keys.size(1) : 0;
    const std::vector<at::Tensor> qkv_parts = qkv.split(C_, -1);
    auto heads = [&](const at::Tensor& x) { return x.reshape({B, n, NH_, hs_}).transpose(1, 2); };  // [B, NH, n, hs]
    const at::Tensor q = heads(qkv_parts[0]), k = heads(qkv_parts[1]), v = heads(qkv_parts[2]);
    if (new_keys) *new_keys = k[0];
    if (new_values) *new_values = v[0];
    const double scale = std::sqrt(static_cast<double>(hs_));
    at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).div(scale);  // [B, NH, n, n]: among the new positions
    if (n > 1) {  // the top-left n x n of the T x T mask: true above the diagonal
      const at::Tensor mask = causal_mask_.narrow(0, 0, n).narrow(1, 0, n);
      scores = scores.masked_fill(mask, -std::numeric_limits<double>::infinity());
    }
    if (t > 0) {
      const at::Tensor queries = q.permute({1, 0, 2, 3}).reshape({NH_, B * n, hs_});  // per head, every query a row
      const at::Tensor prefix_scores = at::bmm(queries, prefix_keys.transpose(1, 2))  // [NH, B n, t]
                                           .div(scale)
                                           .view({NH_, B, n, t})
                                           .permute({1, 0, 2, 3});  // [B, NH, n, t]
      scores = at::cat({prefix_scores, scores}, -1);                // [B, NH, n, t + n]
    }
    const at::Tensor att = at::softmax(scores, -1);        // subtracts each row's maximum first: stable
    at::Tensor out = at::matmul(att.narrow(-1, t, n), v);  // [B, NH, n, hs]
    if (t > 0) {
      const at::Tensor weights = att.narrow(-1, 0, t).permute({1, 0, 2, 3}).reshape({NH_, B * n, t});
      out = out.add(at::bmm(weights, prefix_values).view({NH_, B, n, hs_}).permute({1, 0, 2, 3}));
    }
    return out.transpose(1, 2).reshape({B, n, C_});  // [B, n, C]
  }

  // The prefix's keys or values of block l: [NH, t, hs], undefined while the prefix is empty.
  static at::Tensor prefix_part(const std::vector<at::Tensor>& parts, std::int64_t t, std::size_t l) {
    return t > 0 ? parts[l] : at::Tensor();
  }

  // The block's attention input: c_attn(ln_1(h)), [B, n, C] -> [B, n, 3C].
  at::Tensor qkv(const at::Tensor& h, const Block& b) const {
    return conv1d(layer_norm(h, b.ln_1_weight, b.ln_1_bias), b.attn_weight, b.attn_bias);
  }

  // The rest of the block from its attention's output att [B, n, C]: a = h + c_proj(att); a + mlp(ln_2(a)).
  at::Tensor after_attention(const at::Tensor& h, const at::Tensor& att, const Block& b) const {
    const at::Tensor a = h.add(conv1d(att, b.attn_proj_weight, b.attn_proj_bias));
    const at::Tensor fc = conv1d(layer_norm(a, b.ln_2_weight, b.ln_2_bias), b.fc_weight, b.fc_bias);
    return a.add(conv1d(at::gelu(fc, "tanh"), b.mlp_proj_weight, b.mlp_proj_bias));
  }

  at::Tensor block(const at::Tensor& h, const Block& b) const { return after_attention(h, attention(qkv(h, b)), b); }

  std::int64_t C_, NH_, hs_, T_, k_;
  double eps_;
  Head head_;
  bool vocab_input_;
  std::vector<std::int64_t> layers_;
  at::Tensor wte_;  // [V, C], when the input is in vocabulary space or the head is lm_head
  at::Tensor wpe_;  // [T, C]
  std::vector<Block> blocks_;
  at::Tensor ln_f_weight_, ln_f_bias_;  // [C], unless the head is none
  at::Tensor causal_mask_;              // [T, T] bool
};

void require(bool ok, const std::string& what) {
  if (!ok) throw Error(std::string(kWho) + ": family 'gpt2' " + what);
}

// ---- MLP families -------------------------------------------------------------------------------------------------

class MlpNetwork final : public Network {
 public:
  MlpNetwork(const ModelSpec& spec, const WeightSet& weights, const at::TensorOptions& options)
      : per_token_(spec.family == "transformer_mlp"), vocab_input_(spec.input == InputSpace::vocab) {
    const std::int64_t T = spec.seq_len, d = spec.n_embd;
    std::int64_t in = d, hidden = spec.inner(), out = d;
    if (!per_token_) {
      in = T * d;
      hidden = 4 * in;
      out = spec.family == "fcnet" ? 4 * in : in;
    }
    const WeightLoader load(weights, options, spec.family,
                            " for family '" + spec.family + "' with n_embd " + std::to_string(d) + ", seq_len " +
                                std::to_string(T) +
                                (vocab_input_ ? ", vocab_size " + std::to_string(spec.vocab_size) : ""));
    fc1_weight_ = load("fc1.weight", {hidden, in});
    fc1_bias_ = load("fc1.bias", {hidden});
    fc2_weight_ = load("fc2.weight", {out, hidden});
    fc2_bias_ = load("fc2.bias", {out});
    if (vocab_input_) wte_ = load("wte.weight", {spec.vocab_size, d});
  }

  at::Tensor forward(const at::Tensor& x) const override {
    at::Tensor e = vocab_input_ ? affine(x, wte_, Layout::in_out) : x;  // [B, T, d]
    if (!per_token_) e = e.reshape({x.size(0), -1});                     // [B, T d]
    const at::Tensor hidden = at::gelu(affine(e, fc1_weight_, Layout::out_in, fc1_bias_));
    return affine(hidden, fc2_weight_, Layout::out_in, fc2_bias_);
  }

 private:
  bool per_token_, vocab_input_;
  at::Tensor fc1_weight_, fc1_bias_, fc2_weight_, fc2_bias_;  // nn.Linear: [out, in], [out]
  at::Tensor wte_;                                            // [V, d], input = vocab only
};

void require_positive(const ModelSpec& spec, const char* key, std::int64_t value, const char* why = "") {
  if (value <= 0)
    throw Error(std::string(kWho) + ": family '" + spec.family + "' needs a positive " + key + why + ", got " +
                std::to_string(value));
}

}  // namespace

std::unique_ptr<Network> make_gpt2_network(const ModelSpec& spec, const WeightSet& weights,
                                           const at::TensorOptions& options) {
  require(spec.n_embd > 0, "needs a positive n_embd, got " + std::to_string(spec.n_embd));
  require(spec.n_head > 0, "needs a positive n_head, got " + std::to_string(spec.n_head));
  require(spec.n_embd % spec.n_head == 0, "needs n_embd divisible by n_head, got n_embd " +
                                              std::to_string(spec.n_embd) + " and n_head " +
                                              std::to_string(spec.n_head));
  require(spec.n_layer >= 0, "needs n_layer >= 0, got " + std::to_string(spec.n_layer));
  require(spec.inner() > 0, "needs a positive MLP width (n_inner, or 4 n_embd), got " + std::to_string(spec.inner()));
  require(spec.n_positions > 0, "needs a positive n_positions, got " + std::to_string(spec.n_positions));
  require(spec.seq_len > 0, "needs a positive seq_len (the prompt's token count), got " + std::to_string(spec.seq_len));
  require(spec.seq_len <= spec.n_positions, "takes at most n_positions = " + std::to_string(spec.n_positions) +
                                                " tokens, got seq_len " + std::to_string(spec.seq_len));
  require(spec.blocks >= 0 && spec.blocks <= spec.n_layer,
          "has n_layer = " + std::to_string(spec.n_layer) + " blocks: blocks must be in 0 .. " +
              std::to_string(spec.n_layer) + ", got " + std::to_string(spec.blocks));
  for (std::int64_t l : spec.layers)
    require(l >= 0 && l <= spec.n_layer, "has n_layer = " + std::to_string(spec.n_layer) +
                                             " blocks: every entry of layers must be in 0 .. " +
                                             std::to_string(spec.n_layer) + ", got " + std::to_string(l));
  if (spec.input == InputSpace::vocab || spec.head == Head::lm_head)
    require(spec.vocab_size > 0, "needs a positive vocab_size, got " + std::to_string(spec.vocab_size));
  require(std::isfinite(spec.layer_norm_epsilon) && spec.layer_norm_epsilon >= 0,
          "needs a finite layer_norm_epsilon >= 0, got " + std::to_string(spec.layer_norm_epsilon));
  return std::make_unique<Gpt2Network>(spec, weights, options);
}

std::unique_ptr<Network> make_mlp_network(const ModelSpec& spec, const WeightSet& weights,
                                          const at::TensorOptions& options) {
  require_positive(spec, "n_embd", spec.n_embd);
  require_positive(spec, "seq_len", spec.seq_len, " (the prompt's token count)");
  if (spec.family == "transformer_mlp") require_positive(spec, "MLP width (n_inner, or 4 n_embd)", spec.inner());
  if (spec.input == InputSpace::vocab) require_positive(spec, "vocab_size", spec.vocab_size);
  if (!spec.layers.empty())
    throw Error(std::string(kWho) + ": family '" + spec.family +
                "' has no blocks whose outputs could be added (layers is not empty)");
  return std::make_unique<MlpNetwork>(spec, weights, options);
}

}  // namespace lminv::torch_backend
