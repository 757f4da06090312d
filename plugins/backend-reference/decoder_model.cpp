// The decoder in the reference backend (ModelKind::decoder: GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, ... as settings
// of spec.arch, architecture.hpp), truncated to its first k blocks, in f64 or f32, forward and input gradient.
//
//   h_0    = x (+ wpe[0:T] for learned positions),  x = input (input = embedding, [B, T, d]) or input @ wte
//            (input = vocab, [B, T, V])
//   block l, with n_1 = ln_1, n_2 = ln_2 (layer norm with or without bias, or RMS norm):
//     a_l    = h_l + attn.c_proj(attention(rotate(attn.c_attn(n_1(h_l)))))     rotate: rotary positions only
//     h_l+1  = a_l + mlp.c_proj(act(mlp.c_fc(n_2(a_l))))                        sequential residual
//     h_l+1  = a_l + mlp.c_proj(act(mlp.c_fc(n_2(h_l))))                        parallel residual (n_2 reads h_l)
//     act    = gelu_tanh | gelu_erf | swiglu (silu(gate) * up on c_fc's [gate | up])
//   output = [ main(h_k) | h_layers[0] | h_layers[1] | ... ] along the last dimension, [B, T, D_main + d len(layers)]
//   main   = h_k (head none), ln_f(h_k) (head ln_f), ln_f(h_k) @ W^T (head lm_head, D_main = V; W = wte when tied,
//            lm_head.weight when not) or h_k @ W^T (head lm_head_no_ln_f, D_main = V)
// with k = spec.blocks and L = max(k, max(layers)) the blocks actually run. Biases are added where the architecture
// has them. The parallel residual is summed as (h + attn) + mlp.
//
// T is the input's: one model takes every length 1 .. n_positions, its activations sized for each call.
//
// Weights are the canonical names and layouts of schema.hpp (linear weights [in, out], see decoder_layers.hpp for
// why no transposed copy is kept); only used_weights(spec) are read. The caller (ReferenceBackend::create_model) has
// checked the spec, the features and those weights.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "decoder_layers.hpp"
#include "lminv/prefix_cache.hpp"
#include "matmul_probe.hpp"
#include "lminv/schema.hpp"
#include "reference_backend.hpp"
#include "tensor_util.hpp"

namespace lminv::reference {

namespace {

const char* const kWho = "reference backend";

// The parameters of one block, as named views into the weights; the biases are null where the architecture has none.
template <class Real>
struct BlockParams {
  const Real* ln_1_weight = nullptr;         // (C)
  const Real* ln_1_bias = nullptr;           // (C)
  const Real* attn_c_attn_weight = nullptr;  // (C, QKV)
  const Real* attn_c_attn_bias = nullptr;    // (QKV)
  const Real* attn_c_proj_weight = nullptr;  // (NH HS, C)
  const Real* attn_c_proj_bias = nullptr;    // (C)
  const Real* ln_2_weight = nullptr;         // (C)
  const Real* ln_2_bias = nullptr;           // (C)
  const Real* mlp_c_fc_weight = nullptr;     // (C, FC)   FC = inner, or 2 inner for swiglu
  const Real* mlp_c_fc_bias = nullptr;       // (FC)
  const Real* mlp_c_proj_weight = nullptr;   // (inner, C)
  const Real* mlp_c_proj_bias = nullptr;     // (C)
};

template <class Real>
struct Params {
  const Real* wte = nullptr;  // (V, C), when used
  const Real* wpe = nullptr;  // (n_positions, C), learned positions
  std::vector<BlockParams<Real>> h;
  const Real* ln_f_weight = nullptr;  // (C), when used
  const Real* ln_f_bias = nullptr;    // (C)
  const Real* lm_head = nullptr;      // (V, C): wte or lm_head.weight, heads lm_head and lm_head_no_ln_f
};

// What one block's forward pass keeps for its backward pass. Its input h_l is kept with the residual stream.
template <class Real>
struct BlockActivations {
  std::vector<Real> ln_1_mean, ln_1_rstd;  // (N)   (mean unused by RMS norm)
  std::vector<Real> qkv;                   // (N, QKV) after the rotation
  std::vector<Real> att;                   // (B, NH, T, T) attention probabilities
  std::vector<Real> residual;              // (N, C) a_l
  std::vector<Real> ln_2_mean, ln_2_rstd;  // (N)
  std::vector<Real> fc;                    // (N, FC) before the activation

  void resize(Index N, Index att_size, Index C, Index QKV, Index FC) {
    const auto n = static_cast<std::size_t>(N);
    ln_1_mean.resize(n);
    ln_1_rstd.resize(n);
    qkv.resize(n * static_cast<std::size_t>(QKV));
    att.resize(static_cast<std::size_t>(att_size));
    residual.resize(n * static_cast<std::size_t>(C));
    ln_2_mean.resize(n);
    ln_2_rstd.resize(n);
    fc.resize(n * static_cast<std::size_t>(FC));
  }
};

template <class Real>
class DecoderModel final : public Model {
 public:
  DecoderModel(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights, int threads)
      : spec_(spec), weights_(std::move(weights)), threads_(threads) {
    const Architecture& a = spec.arch;
    C_ = spec.n_embd;
    heads_ = {spec.n_head, spec.kv_heads(), spec.head_size()};
    inner_ = spec.inner();
    fc_width_ = a.mlp == Mlp::swiglu ? 2 * inner_ : inner_;
    rotary_ = spec.rotary_dim();
    V_ = spec.vocab_size;
    k_ = spec.blocks;
    L_ = spec.blocks_run();
    main_width_ = head_has_lm_head(spec.head) ? V_ : C_;
    out_width_ = main_width_ + C_ * static_cast<Index>(spec.layers.size());
    rms_ = a.norm == Norm::rms_norm;
    eps_ = static_cast<Real>(a.norm_eps);
    for (const double f : rotary_inv_freq(a.rope_theta, rotary_)) inv_freq_.push_back(static_cast<Real>(f));

    for (const TensorSpec& t : used_weights(spec)) used_[t.name] = t.shape;
    auto norm = [&](const std::string& name, const Real*& weight, const Real*& bias) {
      weight = map(name + ".weight");
      bias = optional(name + ".bias");
    };
    if (spec.input == InputSpace::vocab || (head_has_lm_head(spec.head) && a.tied_head))
      params_.wte = map("wte.weight");
    params_.wpe = optional("wpe.weight");
    for (Index l = 0; l < L_; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      BlockParams<Real> p;
      norm(h + "ln_1", p.ln_1_weight, p.ln_1_bias);
      p.attn_c_attn_weight = map(h + "attn.c_attn.weight");
      p.attn_c_attn_bias = optional(h + "attn.c_attn.bias");
      p.attn_c_proj_weight = map(h + "attn.c_proj.weight");
      p.attn_c_proj_bias = optional(h + "attn.c_proj.bias");
      norm(h + "ln_2", p.ln_2_weight, p.ln_2_bias);
      p.mlp_c_fc_weight = map(h + "mlp.c_fc.weight");
      p.mlp_c_fc_bias = optional(h + "mlp.c_fc.bias");
      p.mlp_c_proj_weight = map(h + "mlp.c_proj.weight");
      p.mlp_c_proj_bias = optional(h + "mlp.c_proj.bias");
      params_.h.push_back(p);
    }
    if (head_has_ln_f(spec.head)) norm("ln_f", params_.ln_f_weight, params_.ln_f_bias);
    if (head_has_lm_head(spec.head)) params_.lm_head = a.tied_head ? params_.wte : map("lm_head.weight");
  }

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override { return forward_saving(input); }

  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    check_input(input);
    // The usual call follows a forward pass on the same input: its activations are still here.
    if (!same_tensor(input, saved_input_)) forward_saving(input, /*with_output=*/false);
    return backward_saved(grad_output, input.dtype());
  }

  // One forward pass, the metric on the host, then the backward pass from the activations just saved.
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    LossAndGrad on_output = metric_and_grad(forward_saving(input), target, metric);
    return {std::move(on_output.loss), backward_saved(on_output.grad, input.dtype())};
  }

  void* capability(std::string_view name) override {
    if (name == kMatmulProbe) {
      if (!probe_) probe_ = std::make_unique<ReferenceMatmulProbe>(threads_);
      return static_cast<MatmulProbe*>(probe_.get());
    }
    if (name != kPrefixCache) return nullptr;
    if (!cache_) cache_ = std::make_unique<Cache>(*this);
    return static_cast<PrefixCache*>(cache_.get());
  }

 private:
  // The prefix cache: each block's keys (after the rotation at their position) and values of the prefix positions,
  // (t, NKV HS) each. A position runs through the same block as forward() with its rows as a batch of items of one
  // position at t, and attention_next in place of the whole sequence's attention, so its output has forward()'s bits
  // at that position. Up to n_positions positions.
  class Cache final : public PrefixCache {
   public:
    explicit Cache(DecoderModel& model) : m_(model), keys_(model.L_), values_(model.L_) {}

    void reset() override {
      length_ = 0;
      for (auto& k : keys_) k.clear();
      for (auto& v : values_) v.clear();
      last_count_ = 0;
    }
    std::int64_t length() const override { return length_; }

    void append(const Tensor& rows) override {
      Tensor converted;
      const Real* x = m_.cache_rows(rows, converted, "append");
      const Index P = m_.spec_.n_positions;
      if (length_ + rows.dim(0) > P)
        throw Error(std::string(kWho) + ": prefix cache: appending " + std::to_string(rows.dim(0)) + " positions to " +
                    std::to_string(length_) + " exceeds n_positions " + std::to_string(P));
      last_count_ = 0;
      for (Index i = 0; i < rows.dim(0); ++i) {  // one position at a time: each attends to those before it
        m_.position_forward(x + i * m_.width(), 1, length_, keys_, values_, /*keep=*/true, nullptr);
        ++length_;
      }
    }

    Tensor next(const Tensor& candidates) override {
      Tensor converted;
      const Real* x = m_.cache_rows(candidates, converted, "next");
      const Index P = m_.spec_.n_positions;
      if (length_ >= P)
        throw Error(std::string(kWho) + ": prefix cache: the prefix already has all " + std::to_string(P) +
                    " positions (n_positions)");
      Tensor out(dtype_of<Real>::value, {candidates.dim(0), m_.out_width_});
      last_count_ = 0;
      m_.position_forward(x, candidates.dim(0), length_, keys_, values_, /*keep=*/false, out.data<Real>(),
                          &last_keys_, &last_values_);
      last_count_ = candidates.dim(0);
      return out;
    }

    // The candidate's keys and values as next() computed them: the rows append() would compute, bit for bit (a
    // position's rows do not depend on the others in its batch).
    bool append_from_last_next(std::int64_t b) override {
      if (last_count_ == 0) return false;
      if (b < 0 || b >= last_count_)
        throw Error(std::string(kWho) + ": prefix cache: append_from_last_next(" + std::to_string(b) +
                    "): the last next() had " + std::to_string(last_count_) + " candidates");
      const Index KV = m_.heads_.kv_width();
      for (std::size_t l = 0; l < keys_.size(); ++l) {
        keys_[l].insert(keys_[l].end(), last_keys_[l].begin() + b * KV, last_keys_[l].begin() + (b + 1) * KV);
        values_[l].insert(values_[l].end(), last_values_[l].begin() + b * KV, last_values_[l].begin() + (b + 1) * KV);
      }
      ++length_;
      last_count_ = 0;
      return true;
    }

   private:
    DecoderModel& m_;
    Index length_ = 0;
    std::vector<std::vector<Real>> keys_, values_;  // per block: (length, NKV HS)
    // The last next()'s candidates' keys and values per block, (last_count_, NKV HS); last_count_ 0: none kept (an
    // append or reset since).
    std::vector<std::vector<Real>> last_keys_, last_values_;
    Index last_count_ = 0;
  };

  // Candidate rows [B, d or V] as Real, checked.
  const Real* cache_rows(const Tensor& rows, Tensor& storage, const char* what) const {
    if (rows.rank() != 2 || rows.dim(1) != width())
      throw Error(std::string(kWho) + ": prefix cache: " + what + " takes rows [n, " + std::to_string(width()) +
                  "] (input = " + input_space_name(spec_.input) + "), got " + shape_string(rows.shape()));
    return values_as<Real>(rows, storage, threads_);
  }

  // ---- the pieces forward(), backward() and the cache share ----

  void norm_forward(Real* out, Real* mean, Real* rstd, const Real* x, const Real* weight, const Real* bias,
                    Index N) const {
    if (rms_)
      rmsnorm_forward(out, rstd, x, weight, N, C_, eps_, threads_);
    else
      layernorm_forward(out, mean, rstd, x, weight, bias, N, C_, eps_, threads_);
  }

  void norm_backward(Real* dx, const Real* x, const Real* mean, const Real* rstd, const Real* dy, const Real* weight,
                     Index N) const {
    if (rms_)
      rmsnorm_backward(dx, x, rstd, dy, weight, N, C_, threads_);
    else
      layernorm_backward(dx, x, mean, rstd, dy, weight, N, C_, threads_);
  }

  // cos and sin (T, rotary / 2) of positions t0 .. t0 + T - 1; empty without rotary positions.
  void rotary_tables(std::vector<Real>& cos, std::vector<Real>& sin, Index t0, Index T) const {
    const Index half = rotary_ / 2;
    cos.resize(static_cast<std::size_t>(T * half));
    sin.resize(cos.size());
    if (half > 0) rotary_table(cos.data(), sin.data(), inv_freq_.data(), t0, T, half);
  }

  // One block on B items of T positions (N = B T rows, row n at table row n % T): h (N, C) -> h_next (N, C), keeping
  // its activations in `a`. attend(qkv, y) computes the heads' merged outputs y (N, NH HS) from the rotated qkv.
  template <class Attend>
  void block_forward(const BlockParams<Real>& p, BlockActivations<Real>& a, const Real* h, Real* h_next, Index B,
                     Index T, const std::vector<Real>& cos, const std::vector<Real>& sin, Attend&& attend) const {
    const Index N = B * T, C = C_, QKV = heads_.qkv_width(), Q = heads_.q_width();
    std::vector<Real> ln(static_cast<std::size_t>(N * C));        // (N, C)      n_1(h), then n_2(a or h)
    std::vector<Real> y(static_cast<std::size_t>(N * Q));         // (N, Q)      the heads' outputs, merged
    std::vector<Real> branch(static_cast<std::size_t>(N * C));    // (N, C)      attn.c_proj(y), then the MLP's
    std::vector<Real> act(static_cast<std::size_t>(N * inner_));  // (N, inner)  act(a.fc)

    // a = h + attn.c_proj(attention(rotate(attn.c_attn(n_1(h)))))
    norm_forward(ln.data(), a.ln_1_mean.data(), a.ln_1_rstd.data(), h, p.ln_1_weight, p.ln_1_bias, N);
    conv1d_forward(a.qkv.data(), ln.data(), p.attn_c_attn_weight, p.attn_c_attn_bias, N, C, QKV, threads_);
    if (rotary_ > 0) rotary_forward(a.qkv.data(), cos.data(), sin.data(), N, T, heads_, rotary_, threads_);
    attend(a.qkv.data(), y.data());
    conv1d_forward(branch.data(), y.data(), p.attn_c_proj_weight, p.attn_c_proj_bias, N, Q, C, threads_);
    residual_forward(a.residual.data(), h, branch.data(), N * C);

    // h_next = a + mlp.c_proj(act(mlp.c_fc(n_2(a, or h for the parallel residual))))
    const Real* mlp_in = spec_.arch.residual == Residual::parallel ? h : a.residual.data();
    norm_forward(ln.data(), a.ln_2_mean.data(), a.ln_2_rstd.data(), mlp_in, p.ln_2_weight, p.ln_2_bias, N);
    conv1d_forward(a.fc.data(), ln.data(), p.mlp_c_fc_weight, p.mlp_c_fc_bias, N, C, fc_width_, threads_);
    switch (spec_.arch.mlp) {
      case Mlp::gelu_tanh: gelu_tanh_forward_parallel(act.data(), a.fc.data(), N * inner_, threads_); break;
      case Mlp::gelu_erf: gelu_erf_forward_parallel(act.data(), a.fc.data(), N * inner_, threads_); break;
      case Mlp::swiglu: swiglu_forward(act.data(), a.fc.data(), N, inner_, threads_); break;
    }
    conv1d_forward(branch.data(), act.data(), p.mlp_c_proj_weight, p.mlp_c_proj_bias, N, inner_, C, threads_);
    residual_forward(h_next, a.residual.data(), branch.data(), N * C);
  }

  // The main output (N, D_main) of h_k (N, C); ln_f's statistics go to mean and rstd (N).
  void head_forward(Real* main, Real* mean, Real* rstd, const Real* h_k, Index N) const {
    if (spec_.head == Head::none) {
      std::memcpy(main, h_k, static_cast<std::size_t>(N * C_) * sizeof(Real));
      return;
    }
    if (spec_.head == Head::lm_head_no_ln_f) {
      lm_head_forward(main, h_k, params_.lm_head, N, C_, V_, threads_);  // (N, V)
      return;
    }
    std::vector<Real> ln_f(spec_.head == Head::ln_f ? 0 : static_cast<std::size_t>(N * C_));
    Real* normed = spec_.head == Head::ln_f ? main : ln_f.data();  // (N, C)
    norm_forward(normed, mean, rstd, h_k, params_.ln_f_weight, params_.ln_f_bias, N);
    if (spec_.head == Head::lm_head) lm_head_forward(main, normed, params_.lm_head, N, C_, V_, threads_);  // (N, V)
  }

  // The output rows (N, out_width) = [ main | stream[layers[0]] | ... ] from main (N, D_main) and the stream.
  void assemble(Real* out, const Real* main, const std::vector<std::vector<Real>>& stream, Index N) const {
    for (Index n = 0; n < N; ++n) {
      Real* row = out + n * out_width_;
      std::memcpy(row, main + n * main_width_, static_cast<std::size_t>(main_width_) * sizeof(Real));
      for (std::size_t j = 0; j < spec_.layers.size(); ++j)
        std::memcpy(row + main_width_ + static_cast<Index>(j) * C_, stream[spec_.layers[j]].data() + n * C_,
                    static_cast<std::size_t>(C_) * sizeof(Real));
    }
  }

  // B inputs x (B, d or V) at position t, after the prefix whose keys and values are kept per block. With keep
  // (B = 1), the input's own keys and values are appended to them. With out, writes the output rows (B, out_width).
  // With new_keys and new_values, each block's (B, NKV HS) keys and values of the inputs go there.
  void position_forward(const Real* x, Index B, Index t, std::vector<std::vector<Real>>& keys,
                        std::vector<std::vector<Real>>& values, bool keep, Real* out,
                        std::vector<std::vector<Real>>* new_keys = nullptr,
                        std::vector<std::vector<Real>>* new_values = nullptr) const {
    const Index C = C_, Q = heads_.q_width(), KV = heads_.kv_width();
    if (new_keys) {
      new_keys->resize(static_cast<std::size_t>(L_));
      new_values->resize(static_cast<std::size_t>(L_));
    }
    std::vector<std::vector<Real>> stream(static_cast<std::size_t>(L_ + 1),
                                          std::vector<Real>(static_cast<std::size_t>(B * C)));
    BlockActivations<Real> a;
    a.resize(B, 0, C, heads_.qkv_width(), fc_width_);
    std::vector<Real> cos, sin;
    rotary_tables(cos, sin, t, 1);

    // h_0 = x (+ wpe[t]), as forward() computes each row: B items of one position
    embedding_forward(stream[0].data(), x, spec_.input == InputSpace::vocab ? params_.wte : nullptr, params_.wpe, B, 1,
                      C, V_, threads_, t);
    for (Index l = 0; l < L_; ++l) {
      auto attend = [&](const Real* qkv, Real* y) {
        attention_next(y, qkv, keys[l].data(), values[l].data(), B, t, heads_, threads_);
        if (keep) {  // the row's k and v heads, rotated at t
          keys[l].insert(keys[l].end(), qkv + Q, qkv + Q + KV);
          values[l].insert(values[l].end(), qkv + Q + KV, qkv + Q + 2 * KV);
        }
        if (new_keys) {
          const Index QKV = heads_.qkv_width();
          std::vector<Real>& k = (*new_keys)[l];
          std::vector<Real>& v = (*new_values)[l];
          k.resize(static_cast<std::size_t>(B * KV));
          v.resize(k.size());
          for (Index b = 0; b < B; ++b) {
            std::copy(qkv + b * QKV + Q, qkv + b * QKV + Q + KV, k.begin() + b * KV);
            std::copy(qkv + b * QKV + Q + KV, qkv + b * QKV + Q + 2 * KV, v.begin() + b * KV);
          }
        }
      };
      block_forward(params_.h[l], a, stream[l].data(), stream[l + 1].data(), B, 1, cos, sin, attend);
    }
    if (!out) return;

    std::vector<Real> main(static_cast<std::size_t>(B * main_width_)), mean(B), rstd(B);
    head_forward(main.data(), mean.data(), rstd.data(), stream[k_].data(), B);
    assemble(out, main.data(), stream, B);
  }

  // The weight `name` as a Real array (in place when its dtype is Real, else converted once for every model on
  // these weights); its shape was checked against used_weights(spec) before the model was made.
  // An int8 model's block weights are their dequantised int8 values (int8_weights.hpp).
  const Real* map(const std::string& name) {
    if (spec_.weight_dtype == WeightDType::int8 && int8::quantised(name))
      return weights_->get_int8<Real>(name, used_.at(name));
    return weights_->get<Real>(name, used_.at(name), threads_);
  }

  // The same for a tensor the architecture may lack (a bias, wpe): null when used_weights has no such tensor.
  const Real* optional(const std::string& name) { return used_.count(name) ? map(name) : nullptr; }

  Index width() const { return spec_.input == InputSpace::embedding ? C_ : V_; }

  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) < 1 || input.dim(1) > spec_.n_positions || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, T, " +
                  std::to_string(width()) + "] with T in 1 .. " + std::to_string(spec_.n_positions) +
                  " (n_positions; decoder, family '" + spec_.family + "', input = " + input_space_name(spec_.input) +
                  ")");
  }

  // Sizes the buffers for a batch of B items of T positions.
  void allocate(Index B, Index T) {
    const Index N = B * T;
    stream_.resize(static_cast<std::size_t>(L_ + 1));
    for (auto& h : stream_) h.resize(static_cast<std::size_t>(N * C_));
    blocks_.resize(static_cast<std::size_t>(L_));
    for (auto& a : blocks_) a.resize(N, B * heads_.NH * T * T, C_, heads_.qkv_width(), fc_width_);
    ln_f_mean_.resize(static_cast<std::size_t>(N));
    ln_f_rstd_.resize(static_cast<std::size_t>(N));
  }

  // One block backward: the gradient dh_next of h_l+1 -> the gradient dh of h_l, both (N, C).
  void block_backward(Real* dh, const Real* dh_next, Index l, Index B, Index T) const {
    const Index N = B * T, C = C_, QKV = heads_.qkv_width(), Q = heads_.q_width();
    const BlockParams<Real>& p = params_.h[l];
    const BlockActivations<Real>& a = blocks_[l];
    const bool parallel = spec_.arch.residual == Residual::parallel;
    const auto n = static_cast<std::size_t>(N);
    std::vector<Real> dact(n * inner_);    // (N, inner)  of act(a.fc)
    std::vector<Real> dfc(n * fc_width_);  // (N, FC)     of a.fc
    std::vector<Real> dln(n * C);          // (N, C)      of n_2(.), then of n_1(h)
    std::vector<Real> dmlp_inp(n * C);     // (N, C)      of n_2's input, through the MLP
    std::vector<Real> dattn_inp(n * C);    // (N, C)      of h, through the attention
    std::vector<Real> da(n * C);           // (N, C)      of a
    std::vector<Real> dy(n * Q);           // (N, Q)      of the attention heads' outputs
    std::vector<Real> dqkv(n * QKV);       // (N, QKV)    of qkv

    // h_next = a + mlp.c_proj(act(mlp.c_fc(n_2(mlp_in))))
    conv1d_backward(dact.data(), dh_next, p.mlp_c_proj_weight, N, inner_, C, threads_);
    switch (spec_.arch.mlp) {
      case Mlp::gelu_tanh:
        gelu_tanh_backward_parallel(dfc.data(), a.fc.data(), dact.data(), N * inner_, threads_);
        break;
      case Mlp::gelu_erf: gelu_erf_backward_parallel(dfc.data(), a.fc.data(), dact.data(), N * inner_, threads_); break;
      case Mlp::swiglu: swiglu_backward(dfc.data(), a.fc.data(), dact.data(), N, inner_, threads_); break;
    }
    conv1d_backward(dln.data(), dfc.data(), p.mlp_c_fc_weight, N, C, fc_width_, threads_);
    const Real* mlp_in = parallel ? stream_[l].data() : a.residual.data();
    norm_backward(dmlp_inp.data(), mlp_in, a.ln_2_mean.data(), a.ln_2_rstd.data(), dln.data(), p.ln_2_weight, N);
    if (parallel)  // a reaches h_next only directly; the MLP's gradient goes to h below
      std::memcpy(da.data(), dh_next, n * C * sizeof(Real));
    else
      residual_backward(da.data(), dh_next, dmlp_inp.data(), N * C);

    // a = h + attn.c_proj(attention(rotate(attn.c_attn(n_1(h)))))
    conv1d_backward(dy.data(), da.data(), p.attn_c_proj_weight, N, Q, C, threads_);
    attention_backward(dqkv.data(), a.qkv.data(), a.att.data(), dy.data(), B, T, heads_, threads_);
    if (rotary_ > 0)
      rotary_backward(dqkv.data(), rotary_cos_.data(), rotary_sin_.data(), N, T, heads_, rotary_, threads_);
    conv1d_backward(dln.data(), dqkv.data(), p.attn_c_attn_weight, N, C, QKV, threads_);
    norm_backward(dattn_inp.data(), stream_[l].data(), a.ln_1_mean.data(), a.ln_1_rstd.data(), dln.data(),
                  p.ln_1_weight, N);
    residual_backward(dh, da.data(), dattn_inp.data(), N * C);
    if (parallel) residual_backward(dh, dh, dmlp_inp.data(), N * C);
  }

  // Runs the model on `input`, keeping what the backward pass needs: the input itself (to recognise it), the
  // residual stream h_0 .. h_L, every block's activations, the rotary tables and ln_f's statistics. Without
  // with_output, stops there (no lm_head, no output tensor).
  Tensor forward_saving(const Tensor& input, bool with_output = true) {
    check_input(input);
    const Index B = input.dim(0), T = input.dim(1), N = B * T, C = C_;
    saved_input_ = Tensor();  // invalid until the activations are complete
    saved_batch_ = B;
    saved_length_ = T;
    allocate(B, T);
    rotary_tables(rotary_cos_, rotary_sin_, 0, T);
    Tensor converted;
    const Real* x = values_as<Real>(input, converted, threads_);  // (B, T, C) or (B, T, V)

    embedding_forward(stream_[0].data(), x, spec_.input == InputSpace::vocab ? params_.wte : nullptr, params_.wpe, B, T,
                      C, V_, threads_);  // (N, C)
    for (Index l = 0; l < L_; ++l) {
      BlockActivations<Real>& a = blocks_[l];
      auto attend = [&](const Real* qkv, Real* y) { attention_forward(y, a.att.data(), qkv, B, T, heads_, threads_); };
      block_forward(params_.h[l], a, stream_[l].data(), stream_[l + 1].data(), B, T, rotary_cos_, rotary_sin_, attend);
    }

    const Real* h_k = stream_[k_].data();
    if (!with_output) {  // ln_f's statistics are all the backward pass needs of the head
      if (head_has_ln_f(spec_.head)) {
        std::vector<Real> normed(static_cast<std::size_t>(N * C));
        norm_forward(normed.data(), ln_f_mean_.data(), ln_f_rstd_.data(), h_k, params_.ln_f_weight, params_.ln_f_bias,
                     N);
      }
      saved_input_ = input;
      return Tensor();
    }

    Tensor output(dtype_of<Real>::value, {B, T, out_width_});
    Real* out = output.data<Real>();
    const bool direct = spec_.layers.empty();  // the main output is the whole output
    std::vector<Real> main_buffer(direct ? 0 : static_cast<std::size_t>(N * main_width_));
    Real* main = direct ? out : main_buffer.data();  // (N, D_main)
    head_forward(main, ln_f_mean_.data(), ln_f_rstd_.data(), h_k, N);
    if (!direct) assemble(out, main, stream_, N);
    saved_input_ = input;
    return output;
  }

  // The input gradient for grad_output, from the activations of the last forward pass, in the input's dtype.
  Tensor backward_saved(const Tensor& grad_output, DType input_dtype) const {
    const Index B = saved_batch_, T = saved_length_, N = B * T, C = C_;
    const Shape expected{B, T, out_width_};
    if (grad_output.shape() != expected)
      throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                  shape_string(expected) + " (the output's shape for a batch of " + std::to_string(B) + " of " +
                  std::to_string(T) + " positions)");
    Tensor converted;
    const Real* dout = values_as<Real>(grad_output, converted, threads_);  // (N, D_main + C len(layers))

    // The output gradient's parts: the main output's (N, D_main) and each extra layer's (N, C).
    const bool direct = spec_.layers.empty();
    std::vector<Real> dmain_buffer(direct ? 0 : static_cast<std::size_t>(N * main_width_));
    std::vector<std::vector<Real>> dextra(spec_.layers.size(), std::vector<Real>(static_cast<std::size_t>(N * C)));
    if (!direct) {
      for (Index n = 0; n < N; ++n) {
        const Real* row = dout + n * out_width_;
        std::memcpy(dmain_buffer.data() + n * main_width_, row, static_cast<std::size_t>(main_width_) * sizeof(Real));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(dextra[j].data() + n * C, row + main_width_ + static_cast<Index>(j) * C,
                      static_cast<std::size_t>(C) * sizeof(Real));
      }
    }
    const Real* dmain = direct ? dout : dmain_buffer.data();

    // The main output's gradient with respect to h_k.
    std::vector<Real> dh_k(static_cast<std::size_t>(N * C));
    if (spec_.head == Head::none) {
      std::memcpy(dh_k.data(), dmain, static_cast<std::size_t>(N * C) * sizeof(Real));
    } else if (spec_.head == Head::lm_head_no_ln_f) {
      lm_head_backward(dh_k.data(), dmain, params_.lm_head, N, C, V_, threads_);  // (N, C)
    } else {
      std::vector<Real> dnormed;
      const Real* dln_f = dmain;  // (N, C)
      if (spec_.head == Head::lm_head) {
        dnormed.resize(static_cast<std::size_t>(N * C));
        lm_head_backward(dnormed.data(), dmain, params_.lm_head, N, C, V_, threads_);  // (N, C)
        dln_f = dnormed.data();
      }
      norm_backward(dh_k.data(), stream_[k_].data(), ln_f_mean_.data(), ln_f_rstd_.data(), dln_f, params_.ln_f_weight,
                    N);  // (N, C)
    }

    // Down the residual stream, from h_L to h_0.
    std::vector<Real> dh(static_cast<std::size_t>(N * C), Real(0)), dh_below(dh.size());
    for (Index l = L_; l >= 0; --l) {
      // h_l reaches the output through the blocks above and directly (as h_k under the head, as an extra layer):
      // its gradient is the sum, as at a residual connection.
      if (l == k_) residual_backward(dh.data(), dh.data(), dh_k.data(), N * C);
      for (std::size_t j = 0; j < spec_.layers.size(); ++j)
        if (spec_.layers[j] == l) residual_backward(dh.data(), dh.data(), dextra[j].data(), N * C);
      if (l == 0) break;
      block_backward(dh_below.data(), dh.data(), l - 1, B, T);
      dh.swap(dh_below);
    }

    Tensor grad(dtype_of<Real>::value, {B, T, width()});
    embedding_backward(grad.data<Real>(), dh.data(), spec_.input == InputSpace::vocab ? params_.wte : nullptr, B, T, C,
                       V_, threads_);  // (B, T, C) or (B, T, V)
    return input_dtype == grad.dtype() ? grad : grad.to(input_dtype);
  }

  ModelSpec spec_;
  std::shared_ptr<ConvertedWeights> weights_;  // the tensors mapped below live here
  std::map<std::string, Shape> used_;          // used_weights(spec_)
  int threads_ = 0;

  Index C_ = 0, inner_ = 0, fc_width_ = 0, rotary_ = 0, V_ = 0;
  HeadLayout heads_;
  Index k_ = 0;  // blocks of the main output
  Index L_ = 0;  // blocks run: max(k, layers)
  Index main_width_ = 0, out_width_ = 0;
  bool rms_ = false;
  Real eps_ = 0;
  std::vector<Real> inv_freq_;  // (rotary / 2), rounded from double once
  Params<Real> params_;

  // The last forward pass: its input, batch size and length, the residual stream h_0 .. h_L (each (N, C)), the
  // blocks' activations, the rotary tables of its positions and ln_f's statistics.
  Tensor saved_input_;
  Index saved_batch_ = 0, saved_length_ = 0;
  std::vector<std::vector<Real>> stream_;
  std::vector<BlockActivations<Real>> blocks_;
  std::vector<Real> rotary_cos_, rotary_sin_;
  std::vector<Real> ln_f_mean_, ln_f_rstd_;

  std::unique_ptr<Cache> cache_;  // made on the first request for the capability
  std::unique_ptr<ReferenceMatmulProbe> probe_;  // likewise
};

}  // namespace

std::unique_ptr<Model> make_decoder_model(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights,
                                          int threads) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  switch (spec.dtype) {
    case DType::f64: return std::make_unique<DecoderModel<double>>(spec, std::move(weights), threads);
    case DType::f32: return std::make_unique<DecoderModel<float>>(spec, std::move(weights), threads);
    default:
      throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) +
                  "' is not supported (supported: f64, f32)");
  }
}

}  // namespace lminv::reference
