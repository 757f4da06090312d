// GPT-2 in the reference backend: Hugging Face's GPT2LMHeadModel (GPT2Model + the tied lm_head), truncated to its
// first k blocks, in f64 or f32, forward and input gradient.
//
//   h_0   = x + wpe[0:T],   x = input (input = embedding, [B, T, d]) or input @ wte (input = vocab, [B, T, V])
//   a_l   = h_l + attn.c_proj(attention(attn.c_attn(ln_1(h_l))))                 for l = 0 .. L - 1
//   h_l+1 = a_l + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a_l))))
//   output = [ main(h_k) | h_layers[0] | h_layers[1] | ... ] along the last dimension, [B, T, D_main + d len(layers)]
//   main   = h_k (head none), ln_f(h_k) (head ln_f) or ln_f(h_k) @ wte^T (head lm_head, D_main = V)
// with k = spec.blocks and L = max(k, max(layers)) the blocks actually run.
//
// Weights are Hugging Face's names without the "transformer." prefix and Conv1D layouts [in, out], as in the
// checkpoint (see gpt2_layers.hpp for why no transposed copy is kept). Only the tensors the spec uses are looked at:
// the first L blocks, wte when the input is in vocabulary space or the head is lm_head, ln_f unless the head is none.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpt2_layers.hpp"
#include "lminv/prefix_cache.hpp"
#include "reference_backend.hpp"
#include "tensor_util.hpp"

namespace lminv::reference {

namespace {

const char* const kWho = "reference backend";

// The parameters of one block, as named views into the weights.
template <class Real>
struct BlockParams {
  const Real* ln_1_weight = nullptr;         // (C)
  const Real* ln_1_bias = nullptr;           // (C)
  const Real* attn_c_attn_weight = nullptr;  // (C, 3C)
  const Real* attn_c_attn_bias = nullptr;    // (3C)
  const Real* attn_c_proj_weight = nullptr;  // (C, C)
  const Real* attn_c_proj_bias = nullptr;    // (C)
  const Real* ln_2_weight = nullptr;         // (C)
  const Real* ln_2_bias = nullptr;           // (C)
  const Real* mlp_c_fc_weight = nullptr;     // (C, inner)
  const Real* mlp_c_fc_bias = nullptr;       // (inner)
  const Real* mlp_c_proj_weight = nullptr;   // (inner, C)
  const Real* mlp_c_proj_bias = nullptr;     // (C)
};

template <class Real>
struct Params {
  const Real* wte = nullptr;  // (V, C), when used
  const Real* wpe = nullptr;  // (n_positions, C)
  std::vector<BlockParams<Real>> h;
  const Real* ln_f_weight = nullptr;  // (C), when used
  const Real* ln_f_bias = nullptr;    // (C)
};

// What one block's forward pass keeps for its backward pass. Its input h_l is kept with the residual stream.
template <class Real>
struct BlockActivations {
  std::vector<Real> ln_1_mean, ln_1_rstd;  // (N)
  std::vector<Real> qkv;                   // (N, 3C)
  std::vector<Real> att;                   // (B, NH, T, T) attention probabilities
  std::vector<Real> residual;              // (N, C) a_l, the input of ln_2
  std::vector<Real> ln_2_mean, ln_2_rstd;  // (N)
  std::vector<Real> fc;                    // (N, inner) before the GELU
};

template <class Real>
class Gpt2Model final : public Model {
 public:
  Gpt2Model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads)
      : spec_(spec), weights_(std::move(weights)), threads_(threads) {
    C_ = spec.n_embd;
    NH_ = spec.n_head;
    inner_ = spec.inner();
    T_ = spec.seq_len;
    V_ = spec.vocab_size;
    k_ = spec.blocks;
    L_ = k_;
    for (Index l : spec.layers) L_ = std::max(L_, l);
    main_width_ = spec.head == Head::lm_head ? V_ : C_;
    out_width_ = main_width_ + C_ * static_cast<Index>(spec.layers.size());

    const bool needs_wte = spec.input == InputSpace::vocab || spec.head == Head::lm_head;
    if (needs_wte) params_.wte = map("wte.weight", {V_, C_});
    params_.wpe = map("wpe.weight", {spec.n_positions, C_});
    for (Index l = 0; l < L_; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      BlockParams<Real> p;
      p.ln_1_weight = map(h + "ln_1.weight", {C_});
      p.ln_1_bias = map(h + "ln_1.bias", {C_});
      p.attn_c_attn_weight = map(h + "attn.c_attn.weight", {C_, 3 * C_});
      p.attn_c_attn_bias = map(h + "attn.c_attn.bias", {3 * C_});
      p.attn_c_proj_weight = map(h + "attn.c_proj.weight", {C_, C_});
      p.attn_c_proj_bias = map(h + "attn.c_proj.bias", {C_});
      p.ln_2_weight = map(h + "ln_2.weight", {C_});
      p.ln_2_bias = map(h + "ln_2.bias", {C_});
      p.mlp_c_fc_weight = map(h + "mlp.c_fc.weight", {C_, inner_});
      p.mlp_c_fc_bias = map(h + "mlp.c_fc.bias", {inner_});
      p.mlp_c_proj_weight = map(h + "mlp.c_proj.weight", {inner_, C_});
      p.mlp_c_proj_bias = map(h + "mlp.c_proj.bias", {C_});
      params_.h.push_back(p);
    }
    if (spec.head != Head::none) {
      params_.ln_f_weight = map("ln_f.weight", {C_});
      params_.ln_f_bias = map("ln_f.bias", {C_});
    }
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
    if (name != kPrefixCache) return nullptr;
    if (!cache_) cache_ = std::make_unique<Cache>(*this);
    return static_cast<PrefixCache*>(cache_.get());
  }

 private:
  // The prefix cache: each block's keys and values of the prefix positions, (t, C) each. A position runs through
  // the same layer functions as forward() with its rows as the batch, and attention_next in place of the whole
  // sequence's attention, so its output has forward()'s bits at that position.
  class Cache final : public PrefixCache {
   public:
    explicit Cache(Gpt2Model& model) : m_(model), keys_(model.L_), values_(model.L_) {}

    void reset() override {
      length_ = 0;
      for (auto& k : keys_) k.clear();
      for (auto& v : values_) v.clear();
    }
    std::int64_t length() const override { return length_; }

    void append(const Tensor& rows) override {
      Tensor converted;
      const Real* x = m_.cache_rows<Real>(rows, converted, "append");
      if (length_ + rows.dim(0) > m_.T_)
        throw Error(std::string(kWho) + ": prefix cache: appending " + std::to_string(rows.dim(0)) +
                    " positions to " + std::to_string(length_) + " exceeds seq_len " + std::to_string(m_.T_));
      for (Index i = 0; i < rows.dim(0); ++i) {  // one position at a time: each attends to those before it
        m_.position_forward(x + i * m_.width(), 1, length_, keys_, values_, /*keep=*/true, nullptr);
        ++length_;
      }
    }

    Tensor next(const Tensor& candidates) override {
      Tensor converted;
      const Real* x = m_.cache_rows<Real>(candidates, converted, "next");
      if (length_ >= m_.T_)
        throw Error(std::string(kWho) + ": prefix cache: the prefix already has all " + std::to_string(m_.T_) +
                    " positions (seq_len)");
      Tensor out(dtype_of<Real>::value, {candidates.dim(0), m_.out_width_});
      m_.position_forward(x, candidates.dim(0), length_, keys_, values_, /*keep=*/false, out.data<Real>());
      return out;
    }

   private:
    Gpt2Model& m_;
    Index length_ = 0;
    std::vector<std::vector<Real>> keys_, values_;  // per block: (length, C)
  };

  // Candidate rows [B, d or V] as Real, checked.
  template <class R>
  const R* cache_rows(const Tensor& rows, Tensor& storage, const char* what) const {
    if (rows.rank() != 2 || rows.dim(1) != width())
      throw Error(std::string(kWho) + ": prefix cache: " + what + " takes rows [n, " + std::to_string(width()) +
                  "] (input = " + input_space_name(spec_.input) + "), got " + shape_string(rows.shape()));
    return values_as<R>(rows, storage, threads_);
  }

  // B inputs x (B, d or V) at position t, after the prefix whose keys and values are kept per block. With keep
  // (B = 1), the input's own keys and values are appended to them. With out, writes the output rows (B, out_width).
  void position_forward(const Real* x, Index B, Index t, std::vector<std::vector<Real>>& keys,
                        std::vector<std::vector<Real>>& values, bool keep, Real* out) const {
    const Index C = C_;
    const Real eps = static_cast<Real>(spec_.layer_norm_epsilon);
    std::vector<std::vector<Real>> stream(static_cast<std::size_t>(L_ + 1), std::vector<Real>(B * C));
    std::vector<Real> ln(B * C), qkv(B * 3 * C), y(B * C), branch(B * C), residual(B * C), mean(B), rstd(B);
    std::vector<Real> fc(B * inner_), fc_gelu(B * inner_);

    // h_0 = x + wpe[t], as embedding_forward computes each row
    Real* h0 = stream[0].data();
    if (spec_.input == InputSpace::vocab) {
      vecmat_rows(h0, x, params_.wte, B, V_, C, threads_);
    } else {
      std::memcpy(h0, x, static_cast<std::size_t>(B * C) * sizeof(Real));
    }
    const Real* pos = params_.wpe + t * C;
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) h0[b * C + c] += pos[c];

    for (Index l = 0; l < L_; ++l) {  // block_forward with attention_next
      const BlockParams<Real>& p = params_.h[l];
      const Real* h = stream[l].data();
      layernorm_forward(ln.data(), mean.data(), rstd.data(), h, p.ln_1_weight, p.ln_1_bias, B, C, eps, threads_);
      conv1d_forward(qkv.data(), ln.data(), p.attn_c_attn_weight, p.attn_c_attn_bias, B, C, 3 * C, threads_);
      attention_next(y.data(), qkv.data(), keys[l].data(), values[l].data(), B, t, C, NH_, threads_);
      if (keep) {
        keys[l].insert(keys[l].end(), qkv.begin() + C, qkv.begin() + 2 * C);
        values[l].insert(values[l].end(), qkv.begin() + 2 * C, qkv.begin() + 3 * C);
      }
      conv1d_forward(branch.data(), y.data(), p.attn_c_proj_weight, p.attn_c_proj_bias, B, C, C, threads_);
      residual_forward(residual.data(), h, branch.data(), B * C);
      layernorm_forward(ln.data(), mean.data(), rstd.data(), residual.data(), p.ln_2_weight, p.ln_2_bias, B, C, eps,
                        threads_);
      conv1d_forward(fc.data(), ln.data(), p.mlp_c_fc_weight, p.mlp_c_fc_bias, B, C, inner_, threads_);
      gelu_tanh_forward_parallel(fc_gelu.data(), fc.data(), B * inner_, threads_);
      conv1d_forward(branch.data(), fc_gelu.data(), p.mlp_c_proj_weight, p.mlp_c_proj_bias, B, inner_, C, threads_);
      residual_forward(stream[l + 1].data(), residual.data(), branch.data(), B * C);
    }
    if (!out) return;

    // The output rows, laid out as forward()'s: [ main(h_k) | h_layers[0] | ... ]
    const Real* h_k = stream[k_].data();
    std::vector<Real> main(static_cast<std::size_t>(B * main_width_));
    if (spec_.head == Head::none) {
      std::memcpy(main.data(), h_k, static_cast<std::size_t>(B * C) * sizeof(Real));
    } else {
      std::vector<Real> normed(static_cast<std::size_t>(B * C));
      layernorm_forward(normed.data(), mean.data(), rstd.data(), h_k, params_.ln_f_weight, params_.ln_f_bias, B, C,
                        eps, threads_);
      if (spec_.head == Head::lm_head)
        lm_head_forward(main.data(), normed.data(), params_.wte, B, C, V_, threads_);
      else
        main.swap(normed);
    }
    for (Index b = 0; b < B; ++b) {
      Real* row = out + b * out_width_;
      std::memcpy(row, main.data() + b * main_width_, static_cast<std::size_t>(main_width_) * sizeof(Real));
      for (std::size_t j = 0; j < spec_.layers.size(); ++j)
        std::memcpy(row + main_width_ + static_cast<Index>(j) * C, stream[spec_.layers[j]].data() + b * C,
                    static_cast<std::size_t>(C) * sizeof(Real));
    }
  }

  // The weight `name` as a Real array of the given shape: in place when its dtype is Real, else converted once.
  const Real* map(const std::string& name, const Shape& shape) {
    if (!weights_->contains(name))
      throw Error(std::string(kWho) + ": family 'gpt2' needs weight '" + name + "' " + shape_string(shape) +
                  ", which the weights lack" + sizes());
    const Tensor& tensor = weights_->get(name);
    if (tensor.shape() != shape)
      throw Error(std::string(kWho) + ": weight '" + name + "' has shape " + shape_string(tensor.shape()) +
                  ", expected " + shape_string(shape) + sizes());
    if (tensor.dtype() == dtype_of<Real>::value) return tensor.data<Real>();
    converted_.set(name, convert<Real>(tensor, threads_));  // a std::map: later insertions move no tensor
    return converted_.get(name).data<Real>();
  }

  std::string sizes() const {
    return " (family 'gpt2' with n_embd " + std::to_string(spec_.n_embd) + ", n_inner " +
           std::to_string(spec_.inner()) + ", vocab_size " + std::to_string(spec_.vocab_size) + ", n_positions " +
           std::to_string(spec_.n_positions) + ")";
  }

  Index width() const { return spec_.input == InputSpace::embedding ? C_ : V_; }

  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) != T_ || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  std::to_string(T_) + ", " + std::to_string(width()) +
                  "] (family 'gpt2', input = " + input_space_name(spec_.input) + ")");
  }

  // Sizes the buffers for a batch of B.
  void allocate(Index B) {
    const std::size_t N = static_cast<std::size_t>(B * T_), C = static_cast<std::size_t>(C_);
    const std::size_t inner = static_cast<std::size_t>(inner_);
    stream_.resize(static_cast<std::size_t>(L_ + 1));
    for (auto& h : stream_) h.resize(N * C);
    blocks_.resize(static_cast<std::size_t>(L_));
    for (auto& a : blocks_) {
      a.ln_1_mean.resize(N);
      a.ln_1_rstd.resize(N);
      a.qkv.resize(N * 3 * C);
      a.att.resize(static_cast<std::size_t>(B * NH_ * T_ * T_));
      a.residual.resize(N * C);
      a.ln_2_mean.resize(N);
      a.ln_2_rstd.resize(N);
      a.fc.resize(N * inner);
    }
    ln_f_mean_.resize(N);
    ln_f_rstd_.resize(N);
  }

  // One block: h_l -> h_l+1, keeping its activations.
  void block_forward(Index l, Index B) {
    const Index N = B * T_, C = C_;
    const BlockParams<Real>& p = params_.h[l];
    BlockActivations<Real>& a = blocks_[l];
    const Real* h = stream_[l].data();     // (N, C)
    Real* h_next = stream_[l + 1].data();  // (N, C)
    const Real eps = static_cast<Real>(spec_.layer_norm_epsilon);
    std::vector<Real> ln(N * C);            // (N, C)      ln_1(h), then ln_2(a)
    std::vector<Real> y(N * C);             // (N, C)      the attention heads' outputs, merged
    std::vector<Real> branch(N * C);        // (N, C)      attn.c_proj(y), then the MLP's output
    std::vector<Real> fc_gelu(N * inner_);  // (N, inner)  gelu_tanh(a.fc)

    // a = h + attn.c_proj(attention(attn.c_attn(ln_1(h))))
    layernorm_forward(ln.data(), a.ln_1_mean.data(), a.ln_1_rstd.data(), h, p.ln_1_weight, p.ln_1_bias, N, C, eps,
                      threads_);
    conv1d_forward(a.qkv.data(), ln.data(), p.attn_c_attn_weight, p.attn_c_attn_bias, N, C, 3 * C, threads_);
    attention_forward(y.data(), a.att.data(), a.qkv.data(), B, T_, C, NH_, threads_);
    conv1d_forward(branch.data(), y.data(), p.attn_c_proj_weight, p.attn_c_proj_bias, N, C, C, threads_);
    residual_forward(a.residual.data(), h, branch.data(), N * C);

    // h_next = a + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a))))
    layernorm_forward(ln.data(), a.ln_2_mean.data(), a.ln_2_rstd.data(), a.residual.data(), p.ln_2_weight, p.ln_2_bias,
                      N, C, eps, threads_);
    conv1d_forward(a.fc.data(), ln.data(), p.mlp_c_fc_weight, p.mlp_c_fc_bias, N, C, inner_, threads_);
    gelu_tanh_forward_parallel(fc_gelu.data(), a.fc.data(), N * inner_, threads_);
    conv1d_forward(branch.data(), fc_gelu.data(), p.mlp_c_proj_weight, p.mlp_c_proj_bias, N, inner_, C, threads_);
    residual_forward(h_next, a.residual.data(), branch.data(), N * C);
  }

  // One block backward: the gradient dh_next of h_l+1 -> the gradient dh of h_l, both (N, C).
  void block_backward(Real* dh, const Real* dh_next, Index l, Index B) const {
    const Index N = B * T_, C = C_;
    const BlockParams<Real>& p = params_.h[l];
    const BlockActivations<Real>& a = blocks_[l];
    std::vector<Real> dfc_gelu(N * inner_);  // (N, inner)  of gelu_tanh(a.fc)
    std::vector<Real> dfc(N * inner_);       // (N, inner)  of a.fc
    std::vector<Real> dln(N * C);            // (N, C)      of ln_2(a), then of ln_1(h)
    std::vector<Real> dbranch_inp(N * C);    // (N, C)      of a, then of h, through the branch
    std::vector<Real> da(N * C);             // (N, C)      of a
    std::vector<Real> dy(N * C);             // (N, C)      of the attention heads' outputs
    std::vector<Real> dqkv(N * 3 * C);       // (N, 3C)     of qkv

    // h_next = a + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(a))))
    conv1d_backward(dfc_gelu.data(), dh_next, p.mlp_c_proj_weight, N, inner_, C, threads_);
    gelu_tanh_backward_parallel(dfc.data(), a.fc.data(), dfc_gelu.data(), N * inner_, threads_);
    conv1d_backward(dln.data(), dfc.data(), p.mlp_c_fc_weight, N, C, inner_, threads_);
    layernorm_backward(dbranch_inp.data(), a.residual.data(), a.ln_2_mean.data(), a.ln_2_rstd.data(), dln.data(),
                       p.ln_2_weight, N, C, threads_);
    residual_backward(da.data(), dh_next, dbranch_inp.data(), N * C);

    // a = h + attn.c_proj(attention(attn.c_attn(ln_1(h))))
    conv1d_backward(dy.data(), da.data(), p.attn_c_proj_weight, N, C, C, threads_);
    attention_backward(dqkv.data(), a.qkv.data(), a.att.data(), dy.data(), B, T_, C, NH_, threads_);
    conv1d_backward(dln.data(), dqkv.data(), p.attn_c_attn_weight, N, C, 3 * C, threads_);
    layernorm_backward(dbranch_inp.data(), stream_[l].data(), a.ln_1_mean.data(), a.ln_1_rstd.data(), dln.data(),
                       p.ln_1_weight, N, C, threads_);
    residual_backward(dh, da.data(), dbranch_inp.data(), N * C);
  }

  // Runs the model on `input`, keeping what the backward pass needs: the input itself (to recognise it), the
  // residual stream h_0 .. h_L, every block's activations and ln_f's statistics. Without with_output, stops there
  // (no lm_head, no output tensor).
  Tensor forward_saving(const Tensor& input, bool with_output = true) {
    check_input(input);
    const Index B = input.dim(0), N = B * T_, C = C_;
    saved_input_ = Tensor();  // invalid until the activations are complete
    saved_batch_ = B;
    allocate(B);
    Tensor converted;
    const Real* x = values_as<Real>(input, converted, threads_);  // (B, T, C) or (B, T, V)

    embedding_forward(stream_[0].data(), x, spec_.input == InputSpace::vocab ? params_.wte : nullptr, params_.wpe, B,
                      T_, C, V_, threads_);  // (N, C)
    for (Index l = 0; l < L_; ++l) block_forward(l, B);

    const Real* h_k = stream_[k_].data();
    const Real eps = static_cast<Real>(spec_.layer_norm_epsilon);
    if (!with_output) {  // ln_f's statistics are all the backward pass needs of the head
      if (spec_.head != Head::none) {
        std::vector<Real> normed(static_cast<std::size_t>(N * C));
        layernorm_forward(normed.data(), ln_f_mean_.data(), ln_f_rstd_.data(), h_k, params_.ln_f_weight,
                          params_.ln_f_bias, N, C, eps, threads_);
      }
      saved_input_ = input;
      return Tensor();
    }

    Tensor output(dtype_of<Real>::value, {B, T_, out_width_});
    Real* out = output.data<Real>();
    const bool direct = spec_.layers.empty();  // the main output is the whole output
    std::vector<Real> main_buffer(direct ? 0 : static_cast<std::size_t>(N * main_width_));
    Real* main = direct ? out : main_buffer.data();  // (N, D_main)
    if (spec_.head == Head::none) {
      std::memcpy(main, h_k, static_cast<std::size_t>(N * C) * sizeof(Real));
    } else {
      std::vector<Real> ln_f(spec_.head == Head::ln_f ? 0 : static_cast<std::size_t>(N * C));
      Real* normed = spec_.head == Head::ln_f ? main : ln_f.data();  // (N, C)
      layernorm_forward(normed, ln_f_mean_.data(), ln_f_rstd_.data(), h_k, params_.ln_f_weight, params_.ln_f_bias, N, C,
                        eps, threads_);
      if (spec_.head == Head::lm_head) lm_head_forward(main, normed, params_.wte, N, C, V_, threads_);  // (N, V)
    }
    if (!direct) {
      for (Index n = 0; n < N; ++n) {
        Real* row = out + n * out_width_;
        std::memcpy(row, main + n * main_width_, static_cast<std::size_t>(main_width_) * sizeof(Real));
        for (std::size_t j = 0; j < spec_.layers.size(); ++j)
          std::memcpy(row + main_width_ + static_cast<Index>(j) * C, stream_[spec_.layers[j]].data() + n * C,
                      static_cast<std::size_t>(C) * sizeof(Real));
      }
    }
    saved_input_ = input;
    return output;
  }

  // The input gradient for grad_output, from the activations of the last forward pass, in the input's dtype.
  Tensor backward_saved(const Tensor& grad_output, DType input_dtype) const {
    const Index B = saved_batch_, N = B * T_, C = C_;
    const Shape expected{B, T_, out_width_};
    if (grad_output.shape() != expected)
      throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) + ", expected " +
                  shape_string(expected) + " (the output's shape for a batch of " + std::to_string(B) + ")");
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
    } else {
      std::vector<Real> dnormed;
      const Real* dln_f = dmain;  // (N, C)
      if (spec_.head == Head::lm_head) {
        dnormed.resize(static_cast<std::size_t>(N * C));
        lm_head_backward(dnormed.data(), dmain, params_.wte, N, C, V_, threads_);  // (N, C)
        dln_f = dnormed.data();
      }
      layernorm_backward(dh_k.data(), stream_[k_].data(), ln_f_mean_.data(), ln_f_rstd_.data(), dln_f,
                         params_.ln_f_weight, N, C, threads_);  // (N, C)
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
      block_backward(dh_below.data(), dh.data(), l - 1, B);
      dh.swap(dh_below);
    }

    Tensor grad(dtype_of<Real>::value, {B, T_, width()});
    embedding_backward(grad.data<Real>(), dh.data(), spec_.input == InputSpace::vocab ? params_.wte : nullptr, B, T_, C,
                       V_, threads_);  // (B, T, C) or (B, T, V)
    return input_dtype == grad.dtype() ? grad : grad.to(input_dtype);
  }

  ModelSpec spec_;
  std::shared_ptr<const WeightSet> weights_;  // the tensors mapped below live here ...
  WeightSet converted_;                       // ... or here, when their dtype was not Real
  int threads_ = 0;

  Index C_ = 0, NH_ = 0, inner_ = 0, T_ = 0, V_ = 0;
  Index k_ = 0;  // blocks of the main output
  Index L_ = 0;  // blocks run: max(k, layers)
  Index main_width_ = 0, out_width_ = 0;
  Params<Real> params_;

  // The last forward pass: its input and batch size, the residual stream h_0 .. h_L (each (N, C)), the blocks'
  // activations and ln_f's statistics.
  Tensor saved_input_;
  Index saved_batch_ = 0;
  std::vector<std::vector<Real>> stream_;
  std::vector<BlockActivations<Real>> blocks_;
  std::vector<Real> ln_f_mean_, ln_f_rstd_;

  std::unique_ptr<Cache> cache_;  // made on the first request for the capability
};

void require(bool ok, const std::string& what) {
  if (!ok) throw Error(std::string(kWho) + ": family 'gpt2' " + what);
}

}  // namespace

std::unique_ptr<Model> make_gpt2_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
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
  switch (spec.dtype) {
    case DType::f64: return std::make_unique<Gpt2Model<double>>(spec, std::move(weights), threads);
    case DType::f32: return std::make_unique<Gpt2Model<float>>(spec, std::move(weights), threads);
    default:
      throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) +
                  "' is not supported (supported: f64, f32)");
  }
}

}  // namespace lminv::reference
