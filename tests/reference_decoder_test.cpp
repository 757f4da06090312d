// The reference backend's decoder beyond GPT-2's setting (architecture.hpp): the new layer functions' input gradients
// against central finite differences (rms_norm, layer_norm without bias, rotary full and partial, grouped-query
// attention with any head size, swiglu, gelu_erf, the untied head), the whole model against a naive implementation
// written here and against finite differences for several architectures (llama-, mistral-, qwen2- and gpt_neox-like,
// and GPT-2 with one switch changed at a time), batches and thread counts to the last bit, any length on one model,
// the prefix cache against forward(), f32 against f64, and the errors naming a tensor or a field.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "decoder_layers.hpp"
#include "lminv/error.hpp"
#include "lminv/options.hpp"
#include "lminv/prefix_cache.hpp"
#include "lminv/rng.hpp"
#include "lminv/schema.hpp"
#include "reference_backend.hpp"
#include "tensor_util.hpp"

namespace lminv {
namespace {

using reference::HeadLayout;
using reference::Index;
using reference::ReferenceBackend;

// ---- architectures ------------------------------------------------------------------------------------------------

// A tiny decoder: d = 16, 4 heads, 2 blocks, 40 tokens, 12 positions, 5 tokens of input, MLP width 24.
ModelSpec base_spec() {
  ModelSpec s;
  s.kind = ModelKind::decoder;
  s.family = "gpt2";
  s.n_layer = 2;
  s.n_embd = 16;
  s.n_head = 4;
  s.n_inner = 24;
  s.vocab_size = 40;
  s.n_positions = 12;
  s.seq_len = 5;
  s.blocks = 2;
  s.head = Head::lm_head;
  return s;
}

void llama_like(ModelSpec& s) {
  Architecture& a = s.arch;
  a.norm = Norm::rms_norm;
  a.norm_eps = 1e-6;
  a.positions = Positions::rotary;
  a.rope_theta = 10000;
  a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;
  a.mlp = Mlp::swiglu;
  a.tied_head = false;
}

struct Arch {
  std::string name;
  std::function<void(ModelSpec&)> set;
};

// The settings tested: the families' (as their adapters map them) and GPT-2 with one switch changed.
const std::vector<Arch>& architectures() {
  static const std::vector<Arch> all = {
      {"gpt2", [](ModelSpec&) {}},
      {"llama", [](ModelSpec& s) { s.family = "llama", llama_like(s); }},
      {"mistral",  // llama with grouped-query attention
       [](ModelSpec& s) {
         s.family = "mistral";
         llama_like(s);
         s.arch.n_kv_head = 2;
         s.arch.rope_theta = 1e6;
       }},
      {"qwen2",  // q/k/v biases; one key/value head for all four query heads
       [](ModelSpec& s) {
         s.family = "qwen2";
         llama_like(s);
         s.arch.qkv_bias = true;
         s.arch.n_kv_head = 1;
         s.arch.rope_theta = 1e6;
       }},
      {"gpt_neox",  // partial rotary, parallel residual, exact GELU, untied embed_out, layer norms with bias
       [](ModelSpec& s) {
         s.family = "gpt_neox";
         s.n_head = 2;  // heads of 8, 4 of them rotated
         s.arch.positions = Positions::rotary;
         s.arch.rotary_fraction = 0.5;
         s.arch.residual = Residual::parallel;
         s.arch.mlp = Mlp::gelu_erf;
         s.arch.tied_head = false;
       }},
      {"head_dim",  // head_dim * n_head != n_embd, with grouped kv heads
       [](ModelSpec& s) {
         s.family = "llama";
         llama_like(s);
         s.arch.n_kv_head = 2;
         s.arch.head_dim = 6;
       }},
      {"no_bias",  // layer norms without bias, no bias anywhere, learned positions, tied head
       [](ModelSpec& s) {
         s.arch.norm_bias = false;
         s.arch.qkv_bias = s.arch.attn_out_bias = s.arch.mlp_bias = false;
       }},
      {"gpt2_rms_norm", [](ModelSpec& s) { s.arch.norm = Norm::rms_norm; }},
      {"gpt2_parallel", [](ModelSpec& s) { s.arch.residual = Residual::parallel; }},
      {"gpt2_untied", [](ModelSpec& s) { s.arch.tied_head = false; }},
      {"gpt2_no_positions", [](ModelSpec& s) { s.arch.positions = Positions::none; }},  // the study's InputGPT
      {"gpt2_gelu_erf", [](ModelSpec& s) { s.arch.mlp = Mlp::gelu_erf; }},
      {"gpt2_swiglu", [](ModelSpec& s) { s.arch.mlp = Mlp::swiglu; }},
      {"gpt2_partial_rotary",
       [](ModelSpec& s) {
         s.arch.positions = Positions::rotary;
         s.arch.rotary_fraction = 0.5;  // 2 of each head's 4 features
       }},
  };
  return all;
}

ModelSpec arch_spec(const std::string& name, Head head = Head::lm_head, InputSpace input = InputSpace::embedding,
                    std::int64_t blocks = 2, std::vector<std::int64_t> layers = {}, DType dtype = DType::f64) {
  ModelSpec s = base_spec();
  bool found = false;
  for (const Arch& a : architectures())
    if (a.name == name) {
      a.set(s);
      found = true;
    }
  if (!found) throw Error("reference_decoder_test: no architecture " + name);
  s.head = head;
  s.input = input;
  s.blocks = blocks;
  s.layers = std::move(layers);
  s.dtype = dtype;
  return s;
}

// Seeded weights for every tensor of weight_schema(spec), far from any init (norm weights near 1 but not 1, non-zero
// biases, attention far from uniform) so that a wrong index or a missing term shows. f64.
std::shared_ptr<const WeightSet> decoder_weights(const ModelSpec& spec, std::uint64_t seed = 1) {
  auto w = std::make_shared<WeightSet>();
  const Rng root(seed);
  auto ends_with = [](const std::string& s, const std::string& end) {
    return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  };
  for (const TensorSpec& t : weight_schema(spec)) {
    Rng rng = root.fork(t.name);
    const std::string& n = t.name;
    double mean = 0, std = 0.3;
    if (ends_with(n, "ln_1.weight") || ends_with(n, "ln_2.weight") || n == "ln_f.weight") {
      mean = 1;
      std = 0.2;
    } else if (ends_with(n, ".bias")) {
      std = 0.1;
    } else if (ends_with(n, "attn.c_attn.weight")) {
      std = 0.4;
    } else if (ends_with(n, "mlp.c_proj.weight")) {
      std = 0.15;
    }
    Tensor v(DType::f64, t.shape);
    for (std::int64_t i = 0; i < v.numel(); ++i) v.set(i, mean + std * rng.normal());
    w->set(n, std::move(v));
  }
  return w;
}

std::unique_ptr<Model> make_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads = 1) {
  ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(threads)}}));
  return backend.create_model(spec, std::move(weights));
}

// ---- tensors ------------------------------------------------------------------------------------------------------

Tensor random_tensor(DType dtype, const Shape& shape, std::uint64_t seed, double scale = 1.0) {
  Tensor t(dtype, shape);
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
  return t;
}

Shape input_of(const ModelSpec& s, std::int64_t B, std::int64_t T) {
  return {B, T, s.input == InputSpace::embedding ? s.n_embd : s.vocab_size};
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += a.get(i) * b.get(i);
  return s;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.get(i)));
  return m;
}

double relative_difference(const Tensor& a, const Tensor& b) {  // max |a - b| / max |b|
  EXPECT_EQ(a.shape(), b.shape());
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  return m / max_abs(b);
}

// Rows t of each item of [B, T, D]: [B, D].
Tensor row_at(const Tensor& output, std::int64_t t) {
  const std::int64_t B = output.dim(0), T = output.dim(1), D = output.dim(2);
  Tensor rows(output.dtype(), {B, D});
  const std::size_t bytes = static_cast<std::size_t>(D) * dtype_size(output.dtype());
  for (std::int64_t b = 0; b < B; ++b)
    std::memcpy(static_cast<char*>(rows.raw()) + b * bytes,
                static_cast<const char*>(output.raw()) + (b * T + t) * bytes, bytes);
  return rows;
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string describe(const ModelSpec& s, const std::string& arch) {
  std::string layers;
  for (std::int64_t l : s.layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  return arch + " blocks=" + std::to_string(s.blocks) + " head=" + head_name(s.head) +
         " input=" + input_space_name(s.input) + " layers={" + layers + "} " + dtype_name(s.dtype);
}

// ---- finite differences for the layer functions -------------------------------------------------------------------

using Vec = std::vector<double>;

Vec random_values(std::size_t n, std::uint64_t seed, double scale = 1.0, double mean = 0.0) {
  Vec v(n);
  Rng rng(seed);
  for (double& x : v) x = mean + scale * rng.normal();
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// The gradient of <g, f(x)> by central differences, one input element at a time, against `analytic`:
// max |analytic - fd| / max |fd|. Fails the test if the gradient is (nearly) zero, which would check nothing.
double fd_relative_error(const std::function<Vec(const Vec&)>& f, const Vec& x, const Vec& g, const Vec& analytic,
                         double h = 1e-5) {
  EXPECT_EQ(analytic.size(), x.size());
  double worst = 0, largest = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    Vec up = x, down = x;
    up[i] += h;
    down[i] -= h;
    const double fd = (dot(g, f(up)) - dot(g, f(down))) / (2 * h);
    worst = std::max(worst, std::abs(analytic[i] - fd));
    largest = std::max(largest, std::abs(fd));
  }
  EXPECT_GT(largest, 1e-3);
  return worst / largest;
}

TEST(DecoderLayers, RmsNormValueAndInputGradient) {
  const Index N = 3, C = 7;
  const Vec x = random_values(N * C, 1, 2.0, 0.5), w = random_values(C, 2, 0.2, 1.0), g = random_values(N * C, 3);
  const double eps = 1e-6;
  auto f = [&](const Vec& in) {
    Vec out(N * C), rstd(N);
    reference::rmsnorm_forward(out.data(), rstd.data(), in.data(), w.data(), N, C, eps);
    return out;
  };
  Vec out(N * C), rstd(N), dx(N * C);
  reference::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
  reference::rmsnorm_backward(dx.data(), x.data(), rstd.data(), g.data(), w.data(), N, C);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
  // x / sqrt(mean(x^2) + eps) * w: no mean subtracted.
  for (Index n = 0; n < N; ++n) {
    double ms = 0;
    for (Index c = 0; c < C; ++c) ms += x[n * C + c] * x[n * C + c] / C;
    EXPECT_NEAR(rstd[n], 1 / std::sqrt(ms + eps), 1e-12);
    for (Index c = 0; c < C; ++c) EXPECT_NEAR(out[n * C + c], x[n * C + c] / std::sqrt(ms + eps) * w[c], 1e-12);
  }
}

TEST(DecoderLayers, LayerNormWithoutBias) {
  const Index N = 3, C = 7;
  const Vec x = random_values(N * C, 1, 2.0), w = random_values(C, 2, 0.2, 1.0), b = random_values(C, 3),
            g = random_values(N * C, 4);
  auto f = [&](const Vec& in) {
    Vec out(N * C), mean(N), rstd(N);
    reference::layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), w.data(),
                                 static_cast<const double*>(nullptr), N, C, 1e-5);
    return out;
  };
  Vec with_bias(N * C), mean(N), rstd(N), dx(N * C);
  const Vec out = f(x);
  reference::layernorm_forward(with_bias.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5);
  for (Index i = 0; i < N * C; ++i) EXPECT_NEAR(out[i], with_bias[i] - b[i % C], 1e-14);
  reference::layernorm_backward(dx.data(), x.data(), mean.data(), rstd.data(), g.data(), w.data(), N, C);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
}

// Rotates head features by hand: feature i < r/2 pairs with i + r/2 at angle t theta^(-2i/r).
Vec rotate_by_hand(const Vec& qkv, Index N, Index T, Index t0, const HeadLayout& L, Index r, double theta) {
  Vec out = qkv;
  for (Index n = 0; n < N; ++n)
    for (Index head = 0; head < L.NH + L.NKV; ++head)
      for (Index i = 0; i < r / 2; ++i) {
        const double angle = static_cast<double>(t0 + n % T) * std::pow(theta, -2.0 * i / r);
        const Index at = n * L.qkv_width() + head * L.HS;
        const double a = qkv[at + i], b = qkv[at + i + r / 2];
        out[at + i] = a * std::cos(angle) - b * std::sin(angle);
        out[at + i + r / 2] = b * std::cos(angle) + a * std::sin(angle);
      }
  return out;
}

TEST(DecoderLayers, RotaryFullAndPartial) {
  const HeadLayout L{4, 2, 6};  // 4 query heads, 2 key/value heads of 6
  const Index B = 2, T = 5, N = B * T, t0 = 3;
  for (Index r : {6, 4, 2}) {  // full, then partial
    SCOPED_TRACE("rotary dim " + std::to_string(r));
    const double theta = r == 4 ? 1e6 : 10000;
    const std::vector<double> inv64 = reference::rotary_inv_freq(theta, r);
    Vec cos(T * r / 2), sin(T * r / 2);
    reference::rotary_table(cos.data(), sin.data(), inv64.data(), t0, T, r / 2);
    const Vec qkv = random_values(N * L.qkv_width(), 10 + r), g = random_values(N * L.qkv_width(), 20 + r);
    auto f = [&](const Vec& in) {
      Vec out = in;
      reference::rotary_forward(out.data(), cos.data(), sin.data(), N, T, L, r);
      return out;
    };
    const Vec out = f(qkv), expected = rotate_by_hand(qkv, N, T, t0, L, r, theta);
    for (Index i = 0; i < N * L.qkv_width(); ++i) EXPECT_NEAR(out[i], expected[i], 1e-13) << i;
    // Features past r and the value heads pass through untouched.
    for (Index n = 0; n < N; ++n)
      for (Index c = 0; c < L.qkv_width(); ++c) {
        const Index head = c / L.HS, i = c % L.HS;
        if (head >= L.NH + L.NKV || i >= r) {
          EXPECT_EQ(out[n * L.qkv_width() + c], qkv[n * L.qkv_width() + c]);
        }
      }
    Vec dx = g;
    reference::rotary_backward(dx.data(), cos.data(), sin.data(), N, T, L, r);
    EXPECT_LT(fd_relative_error(f, qkv, g, dx), 1e-8);
  }
}

TEST(DecoderLayers, RotaryScoresDependOnRelativePositionOnly) {
  // <rot(q, m), rot(k, n)> depends on m - n only: the property rotary positions are for.
  const HeadLayout L{1, 1, 8};
  const Index r = 8;
  const std::vector<double> inv = reference::rotary_inv_freq(10000, r);
  const Vec q = random_values(8, 1), k = random_values(8, 2);
  auto score = [&](Index m, Index n) {
    Vec row(L.qkv_width(), 0.0), row2 = row, c(r / 2), s(r / 2);
    std::copy(q.begin(), q.end(), row.begin());
    std::copy(k.begin(), k.end(), row2.begin() + 8);
    reference::rotary_table(c.data(), s.data(), inv.data(), m, 1, r / 2);
    reference::rotary_forward(row.data(), c.data(), s.data(), 1, 1, L, r);
    reference::rotary_table(c.data(), s.data(), inv.data(), n, 1, r / 2);
    reference::rotary_forward(row2.data(), c.data(), s.data(), 1, 1, L, r);
    double d = 0;
    for (Index i = 0; i < 8; ++i) d += row[i] * row2[8 + i];
    return d;
  };
  EXPECT_NEAR(score(5, 2), score(13, 10), 1e-12);
  EXPECT_NEAR(score(2, 2), score(0, 0), 1e-12);
  EXPECT_GT(std::abs(score(5, 2) - score(2, 5)), 1e-3);  // and it does depend on it
}

// Grouped-query attention written out: query head h reads key/value head h / (NH / NKV).
Vec attention_by_hand(const Vec& qkv, Index B, Index T, const HeadLayout& L) {
  Vec out(B * T * L.q_width(), 0.0);
  const Index W = L.qkv_width(), G = L.NH / L.NKV;
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < L.NH; ++h)
      for (Index t = 0; t < T; ++t) {
        const Index kv = h / G;
        std::vector<double> s(t + 1);
        double top = -1e300, z = 0;
        for (Index u = 0; u <= t; ++u) {
          double d = 0;
          for (Index i = 0; i < L.HS; ++i)
            d += qkv[(b * T + t) * W + h * L.HS + i] * qkv[(b * T + u) * W + L.NH * L.HS + kv * L.HS + i];
          s[u] = d / std::sqrt(static_cast<double>(L.HS));
          top = std::max(top, s[u]);
        }
        for (Index u = 0; u <= t; ++u) z += std::exp(s[u] - top);
        for (Index u = 0; u <= t; ++u)
          for (Index i = 0; i < L.HS; ++i)
            out[(b * T + t) * L.q_width() + h * L.HS + i] +=
                std::exp(s[u] - top) / z * qkv[(b * T + u) * W + (L.NH + L.NKV) * L.HS + kv * L.HS + i];
      }
  return out;
}

TEST(DecoderLayers, GroupedQueryAttention) {
  const Index B = 2, T = 4;
  for (const HeadLayout& L : {HeadLayout{4, 2, 3}, HeadLayout{4, 1, 5}, HeadLayout{3, 3, 2}}) {
    SCOPED_TRACE("NH " + std::to_string(L.NH) + " NKV " + std::to_string(L.NKV) + " HS " + std::to_string(L.HS));
    const Vec qkv = random_values(B * T * L.qkv_width(), 1, 1.5), g = random_values(B * T * L.q_width(), 2);
    auto f = [&](const Vec& in) {
      Vec out(B * T * L.q_width()), att(B * L.NH * T * T);
      reference::attention_forward(out.data(), att.data(), in.data(), B, T, L);
      return out;
    };
    const Vec out = f(qkv), expected = attention_by_hand(qkv, B, T, L);
    for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], expected[i], 1e-13) << i;
    Vec att(B * L.NH * T * T), dqkv(B * T * L.qkv_width());
    Vec again(out.size());
    reference::attention_forward(again.data(), att.data(), qkv.data(), B, T, L);
    for (int threads : {1, 3}) {
      reference::attention_backward(dqkv.data(), qkv.data(), att.data(), g.data(), B, T, L, threads);
      EXPECT_LT(fd_relative_error(f, qkv, g, dqkv), 1e-6) << threads;
    }
    // One new token against kept keys and values has the bits of the whole sequence's last position.
    for (Index t = 0; t < T; ++t) {
      Vec k_cache, v_cache;
      for (Index u = 0; u < t; ++u) {  // item 1's rows
        const double* row = qkv.data() + (T + u) * L.qkv_width();
        k_cache.insert(k_cache.end(), row + L.q_width(), row + L.q_width() + L.kv_width());
        v_cache.insert(v_cache.end(), row + L.q_width() + L.kv_width(), row + L.qkv_width());
      }
      Vec next(L.q_width());
      reference::attention_next(next.data(), qkv.data() + (T + t) * L.qkv_width(), k_cache.data(), v_cache.data(), 1, t,
                                L);
      EXPECT_EQ(std::memcmp(next.data(), out.data() + (T + t) * L.q_width(), L.q_width() * sizeof(double)), 0) << t;
    }
  }
}

TEST(DecoderLayers, SwigluValueAndInputGradient) {
  const Index N = 3, inner = 5;
  const Vec fc = random_values(N * 2 * inner, 1, 2.0), g = random_values(N * inner, 2);
  auto f = [&](const Vec& in) {
    Vec out(N * inner);
    reference::swiglu_forward(out.data(), in.data(), N, inner);
    return out;
  };
  const Vec out = f(fc);
  for (Index n = 0; n < N; ++n)
    for (Index i = 0; i < inner; ++i) {
      const double gate = fc[n * 2 * inner + i], up = fc[n * 2 * inner + inner + i];
      EXPECT_NEAR(out[n * inner + i], gate / (1 + std::exp(-gate)) * up, 1e-14);
    }
  Vec dfc(N * 2 * inner);
  reference::swiglu_backward(dfc.data(), fc.data(), g.data(), N, inner);
  EXPECT_LT(fd_relative_error(f, fc, g, dfc), 1e-7);
}

TEST(DecoderLayers, GeluErfValueAndInputGradient) {
  const Index n = 50;
  const Vec x = random_values(n, 1, 2.0), g = random_values(n, 2);
  auto f = [&](const Vec& in) {
    Vec out(n);
    reference::gelu_erf_forward_parallel(out.data(), in.data(), n);
    return out;
  };
  const Vec out = f(x);
  for (Index i = 0; i < n; ++i) EXPECT_NEAR(out[i], 0.5 * x[i] * (1 + std::erf(x[i] / std::sqrt(2.0))), 1e-15);
  Vec dx(n);
  reference::gelu_erf_backward_parallel(dx.data(), x.data(), g.data(), n);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-7);
}

TEST(DecoderLayers, LinearWithoutBiasAndTheUntiedHead) {
  const Index N = 3, C = 5, OC = 7, V = 11;
  const Vec x = random_values(N * C, 1), W = random_values(C * OC, 2), g = random_values(N * OC, 3);
  auto f = [&](const Vec& in) {
    Vec out(N * OC);
    reference::conv1d_forward(out.data(), in.data(), W.data(), static_cast<const double*>(nullptr), N, C, OC);
    return out;
  };
  const Vec out = f(x);
  for (Index n = 0; n < N; ++n)
    for (Index o = 0; o < OC; ++o) {
      double e = 0;
      for (Index c = 0; c < C; ++c) e += x[n * C + c] * W[c * OC + o];
      EXPECT_NEAR(out[n * OC + o], e, 1e-13);
    }
  Vec dx(N * C);
  reference::conv1d_backward(dx.data(), g.data(), W.data(), N, C, OC);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-7);
  // The head with any [V, C] matrix (lm_head.weight when untied).
  const Vec lm = random_values(V * C, 4), gl = random_values(N * V, 5);
  auto head = [&](const Vec& in) {
    Vec logits(N * V);
    reference::lm_head_forward(logits.data(), in.data(), lm.data(), N, C, V);
    return logits;
  };
  reference::lm_head_backward(dx.data(), gl.data(), lm.data(), N, C, V);
  EXPECT_LT(fd_relative_error(head, x, gl, dx), 1e-7);
}

// ---- a naive implementation of the decoder ------------------------------------------------------------------------

// The decoder of architecture.hpp for one item, written from its definition with nested vectors and plain loops,
// sharing no code with the backend. input: [T][d or V]. Returns [T][D_main + d len(layers)].
using Matrix = std::vector<std::vector<double>>;

Matrix naive_forward(const ModelSpec& s, const WeightSet& w, const Matrix& input) {
  const Architecture& a = s.arch;
  const std::int64_t T = static_cast<std::int64_t>(input.size()), d = s.n_embd, V = s.vocab_size, H = s.n_head;
  const std::int64_t KV = s.arch.n_kv_head > 0 ? s.arch.n_kv_head : H;
  const std::int64_t hs = s.arch.head_dim > 0 ? s.arch.head_dim : d / H, inner = s.n_inner;
  std::int64_t r = 0;
  if (a.positions == Positions::rotary) {
    r = static_cast<std::int64_t>(std::floor(hs * a.rotary_fraction));
    r -= r % 2;
  }
  auto has = [&](const std::string& name) { return w.contains(name); };
  auto W = [&](const std::string& name, std::int64_t i, std::int64_t j = 0) {
    const Tensor& t = w.get(name);
    return t.rank() == 1 ? t.get(i) : t.get(i * t.dim(1) + j);
  };
  auto norm = [&](const Matrix& x, const std::string& name) {
    Matrix y(T, std::vector<double>(d));
    for (std::int64_t t = 0; t < T; ++t) {
      double mean = 0, var = 0;
      if (a.norm == Norm::layer_norm) {
        for (double v : x[t]) mean += v / d;
        for (double v : x[t]) var += (v - mean) * (v - mean) / d;
      } else {
        for (double v : x[t]) var += v * v / d;  // the mean square
      }
      for (std::int64_t c = 0; c < d; ++c) {
        y[t][c] = (x[t][c] - mean) / std::sqrt(var + a.norm_eps) * W(name + ".weight", c);
        if (a.norm == Norm::layer_norm && a.norm_bias) y[t][c] += W(name + ".bias", c);
      }
    }
    return y;
  };
  auto linear = [&](const Matrix& x, const std::string& name, std::int64_t out, bool bias) {
    EXPECT_EQ(has(name + ".bias"), bias) << name;
    Matrix y(T, std::vector<double>(out));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < out; ++o) {
        double acc = bias ? W(name + ".bias", o) : 0.0;
        for (std::size_t i = 0; i < x[t].size(); ++i) acc += x[t][i] * W(name + ".weight", i, o);
        y[t][o] = acc;
      }
    return y;
  };
  // Rotates features [at, at + r) of row t in place, rotate_half style.
  auto rotate = [&](std::vector<double>& row, std::int64_t at, std::int64_t t) {
    for (std::int64_t i = 0; i < r / 2; ++i) {
      const double angle = t * std::pow(a.rope_theta, -2.0 * i / r);
      const double x1 = row[at + i], x2 = row[at + i + r / 2];
      row[at + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
      row[at + i + r / 2] = x2 * std::cos(angle) + x1 * std::sin(angle);
    }
  };

  std::vector<Matrix> hidden;  // h_0, h_1, ...
  Matrix h(T, std::vector<double>(d));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < d; ++c) {
      double x = 0;
      if (s.input == InputSpace::embedding) {
        x = input[t][c];
      } else {
        for (std::int64_t v = 0; v < V; ++v) x += input[t][v] * W("wte.weight", v, c);
      }
      h[t][c] = x + (a.positions == Positions::learned ? W("wpe.weight", t, c) : 0.0);
    }
  EXPECT_EQ(has("wpe.weight"), a.positions == Positions::learned);
  hidden.push_back(h);
  std::int64_t L = s.blocks;
  for (std::int64_t l : s.layers) L = std::max(L, l);
  const std::int64_t qw = H * hs, kvw = KV * hs;
  for (std::int64_t l = 0; l < L; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    Matrix qkv = linear(norm(h, p + "ln_1"), p + "attn.c_attn", qw + 2 * kvw, a.qkv_bias);
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t head = 0; head < H; ++head) rotate(qkv[t], head * hs, t);        // queries
      for (std::int64_t head = 0; head < KV; ++head) rotate(qkv[t], qw + head * hs, t);  // keys
    }
    Matrix y(T, std::vector<double>(qw, 0.0));
    for (std::int64_t head = 0; head < H; ++head) {
      const std::int64_t kv = head * KV / H;  // the key/value head of this query head
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> score(T, -INFINITY);
        for (std::int64_t u = 0; u <= t; ++u) {  // causal: position t sees 0 .. t
          double qk = 0;
          for (std::int64_t i = 0; i < hs; ++i) qk += qkv[t][head * hs + i] * qkv[u][qw + kv * hs + i];
          score[u] = qk / std::sqrt(static_cast<double>(hs));
        }
        const double top = *std::max_element(score.begin(), score.end());
        double z = 0;
        for (std::int64_t u = 0; u <= t; ++u) z += std::exp(score[u] - top);
        for (std::int64_t u = 0; u <= t; ++u)
          for (std::int64_t i = 0; i < hs; ++i)
            y[t][head * hs + i] += std::exp(score[u] - top) / z * qkv[u][qw + kvw + kv * hs + i];
      }
    }
    const Matrix attn = linear(y, p + "attn.c_proj", d, a.attn_out_bias);
    Matrix after_attn = h;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) after_attn[t][c] += attn[t][c];
    const Matrix& mlp_in = a.residual == Residual::parallel ? h : after_attn;
    const std::int64_t fc_width = a.mlp == Mlp::swiglu ? 2 * inner : inner;
    const Matrix fc = linear(norm(mlp_in, p + "ln_2"), p + "mlp.c_fc", fc_width, a.mlp_bias);
    Matrix act(T, std::vector<double>(inner));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < inner; ++i) {
        const double x = fc[t][i];
        switch (a.mlp) {
          case Mlp::gelu_tanh:
            act[t][i] = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
            break;
          case Mlp::gelu_erf: act[t][i] = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); break;
          case Mlp::swiglu: act[t][i] = x / (1 + std::exp(-x)) * fc[t][inner + i]; break;  // silu(gate) * up
        }
      }
    const Matrix mlp = linear(act, p + "mlp.c_proj", d, a.mlp_bias);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) h[t][c] = after_attn[t][c] + mlp[t][c];
    hidden.push_back(h);
  }

  Matrix main = hidden[s.blocks];
  if (s.head == Head::ln_f || s.head == Head::lm_head) main = norm(main, "ln_f");
  if (s.head == Head::lm_head || s.head == Head::lm_head_no_ln_f) {
    const std::string head = a.tied_head ? "wte.weight" : "lm_head.weight";
    Matrix logits(T, std::vector<double>(V, 0.0));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t v = 0; v < V; ++v)
        for (std::int64_t c = 0; c < d; ++c) logits[t][v] += main[t][c] * W(head, v, c);
    main = logits;
  }
  for (std::int64_t l : s.layers)
    for (std::int64_t t = 0; t < T; ++t) main[t].insert(main[t].end(), hidden[l][t].begin(), hidden[l][t].end());
  return main;
}

// max |model - naive| over a batch of 2 at length T, and max |naive|.
std::pair<double, double> against_naive(const ModelSpec& s, const std::shared_ptr<const WeightSet>& weights,
                                        std::int64_t T, std::uint64_t seed) {
  auto model = make_model(s, weights);
  const Tensor input = random_tensor(DType::f64, input_of(s, 2, T), seed);
  const Tensor out = model->forward(input);
  const std::int64_t width = input.dim(2), D = out.dim(2);
  double worst = 0, largest = 0;
  for (std::int64_t b = 0; b < 2; ++b) {
    Matrix x(T, std::vector<double>(width));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < width; ++j) x[t][j] = input.get((b * T + t) * width + j);
    const Matrix expected = naive_forward(s, *weights, x);
    EXPECT_EQ(static_cast<std::int64_t>(expected[0].size()), D);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < D; ++j) {
        worst = std::max(worst, std::abs(out.get((b * T + t) * D + j) - expected[t][j]));
        largest = std::max(largest, std::abs(expected[t][j]));
      }
  }
  return {worst, largest};
}

TEST(DecoderModel, RotaryGqaSwigluForwardMatchesTheNaiveImplementation) {
  // Mistral-like (rms_norm, rotary, 4 query heads on 2 kv heads, swiglu, no biases, untied head), every head, both
  // input spaces, truncated and with extra layers.
  for (Head head : {Head::none, Head::ln_f, Head::lm_head, Head::lm_head_no_ln_f})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      for (std::int64_t blocks : {0, 1, 2}) {
        const ModelSpec s = arch_spec("mistral", head, input, blocks,
                                      blocks == 1 ? std::vector<std::int64_t>{2, 0} : std::vector<std::int64_t>{});
        const auto [worst, largest] = against_naive(s, decoder_weights(s), 5, 3);
        EXPECT_GT(largest, 0.1) << describe(s, "mistral");
        EXPECT_LE(worst, 1e-12 * std::max(1.0, largest)) << describe(s, "mistral");
      }
}

TEST(DecoderModel, EveryArchitectureMatchesTheNaiveImplementation) {
  for (const Arch& a : architectures())
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      for (std::int64_t T : {1, 5, 12}) {
        const ModelSpec s = arch_spec(a.name, Head::lm_head, input, 2, {1});
        const auto [worst, largest] = against_naive(s, decoder_weights(s), T, 4);
        EXPECT_GT(largest, 0.1) << describe(s, a.name) << " T=" << T;
        EXPECT_LE(worst, 1e-12 * std::max(1.0, largest)) << describe(s, a.name) << " T=" << T;
      }
}

// ---- the whole model's gradient -----------------------------------------------------------------------------------

// max |backward - fd| / max |fd| over every input element, for <g, forward(x)>.
double model_fd_error(Model& model, const Tensor& x, std::uint64_t seed) {
  const Tensor g = random_tensor(DType::f64, model.forward(x).shape(), seed);
  const Tensor grad = model.backward(x, g);
  EXPECT_EQ(grad.shape(), x.shape());
  const double h = 1e-5;
  double worst = 0, largest = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    Tensor up = x, down = x;
    up.set(i, x.get(i) + h);
    down.set(i, x.get(i) - h);
    const double fd = (dot(g, model.forward(up)) - dot(g, model.forward(down))) / (2 * h);
    worst = std::max(worst, std::abs(grad.get(i) - fd));
    largest = std::max(largest, std::abs(fd));
  }
  EXPECT_GT(largest, 1e-2);
  return worst / largest;
}

TEST(DecoderModel, InputGradientMatchesFiniteDifferencesForEveryArchitecture) {
  for (const Arch& a : architectures())
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      for (Head head : {Head::ln_f, Head::lm_head, Head::lm_head_no_ln_f}) {
        const ModelSpec s = arch_spec(a.name, head, input, 2,
                                      head == Head::ln_f ? std::vector<std::int64_t>{1} : std::vector<std::int64_t>{});
        auto model = make_model(s, decoder_weights(s));
        const Tensor x = random_tensor(DType::f64, input_of(s, 1, 5), 10);
        EXPECT_LT(model_fd_error(*model, x, 11), 1e-6) << describe(s, a.name);
      }
}

TEST(DecoderModel, LossAndGradIsForwardMetricBackward) {
  for (const char* arch : {"qwen2", "gpt_neox"}) {
    const ModelSpec s = arch_spec(arch, Head::lm_head, InputSpace::vocab, 2, {1});
    auto model = make_model(s, decoder_weights(s));
    const Tensor x = random_tensor(DType::f64, input_of(s, 3, 4), 11);
    const Tensor target = model->forward(random_tensor(DType::f64, input_of(s, 1, 4), 12));
    for (Metric metric : {Metric::l2, Metric::cosine}) {
      const LossAndGrad fused = model->loss_and_grad(x, target, metric);
      const LossAndGrad on_output = metric_and_grad(model->forward(x), target, metric);
      EXPECT_EQ(fused.loss, on_output.loss) << arch;
      EXPECT_TRUE(same_bytes(fused.grad, model->backward(x, on_output.grad))) << arch;
    }
  }
}

// ---- structure: batching, threads, lengths, causality, dtypes -----------------------------------------------------

TEST(DecoderModel, BatchEqualsOneByOneExactly) {
  for (const Arch& a : architectures())
    for (DType dtype : {DType::f64, DType::f32}) {
      const ModelSpec s = arch_spec(a.name, Head::lm_head, InputSpace::vocab, 1, {2}, dtype);
      auto model = make_model(s, decoder_weights(s), 2);
      const std::int64_t B = 3;
      const Tensor x = random_tensor(dtype, input_of(s, B, 6), 40);
      const Tensor y = model->forward(x);
      const Tensor g = random_tensor(dtype, y.shape(), 41);
      const Tensor grad = model->backward(x, g);
      const Tensor target = random_tensor(dtype, y.slice0(0, 1).shape(), 42);
      const LossAndGrad lg = model->loss_and_grad(x, target, Metric::l2);
      for (std::int64_t b = 0; b < B; ++b) {
        const Tensor xb = x.slice0(b, b + 1);
        EXPECT_TRUE(same_bytes(model->forward(xb), y.slice0(b, b + 1))) << describe(s, a.name) << " " << b;
        EXPECT_TRUE(same_bytes(model->backward(xb, g.slice0(b, b + 1)), grad.slice0(b, b + 1)))
            << describe(s, a.name) << " " << b;
        const LossAndGrad one = model->loss_and_grad(xb, target, Metric::l2);
        EXPECT_EQ(one.loss[0], lg.loss[b]) << describe(s, a.name) << " " << b;
        EXPECT_TRUE(same_bytes(one.grad, lg.grad.slice0(b, b + 1))) << describe(s, a.name) << " " << b;
      }
      EXPECT_FALSE(same_bytes(y.slice0(0, 1), y.slice0(1, 2)));
    }
}

TEST(DecoderModel, SameBitsForAnyThreadCount) {
  // Big enough that products, norms, rotations, activations and the attention's (item, kv head) groups are split
  // between threads.
  for (const char* arch : {"mistral", "gpt_neox"}) {
    ModelSpec s = arch_spec(arch, Head::lm_head, InputSpace::vocab, 2, {1});
    s.n_embd = 64;
    s.n_head = 8;
    if (s.arch.n_kv_head > 0) s.arch.n_kv_head = 2;
    s.n_inner = 96;
    s.vocab_size = 300;
    s.n_positions = 32;
    const auto weights = decoder_weights(s);
    for (DType dtype : {DType::f64, DType::f32}) {
      s.dtype = dtype;
      const Tensor x = random_tensor(dtype, input_of(s, 3, 24), 50);
      auto one = make_model(s, weights, 1);
      const Tensor y = one->forward(x);
      const Tensor g = random_tensor(dtype, y.shape(), 51);
      const Tensor grad = one->backward(x, g);
      for (int threads : {2, 3}) {
        auto many = make_model(s, weights, threads);
        EXPECT_TRUE(same_bytes(many->forward(x), y)) << arch << " " << dtype_name(dtype) << " " << threads;
        EXPECT_TRUE(same_bytes(many->backward(x, g), grad)) << arch << " " << dtype_name(dtype) << " " << threads;
      }
    }
  }
}

TEST(DecoderModel, OneModelTakesAnyLength) {
  // T = 3, then 7, then 3 on one model (built with seq_len 5): each call equals a fresh model's, bit for bit, and a
  // backward pass after a forward pass of another length recomputes.
  for (const Arch& a : architectures()) {
    const ModelSpec s = arch_spec(a.name, Head::lm_head, InputSpace::embedding, 2, {1});
    const auto weights = decoder_weights(s);
    auto model = make_model(s, weights);
    std::vector<Tensor> grads;
    for (std::int64_t T : {3, 7, 3, 12, 1}) {
      ModelSpec at = s;
      at.seq_len = T;
      auto fresh = make_model(at, weights);
      const Tensor x = random_tensor(DType::f64, input_of(s, 2, T), 60 + T);
      const Tensor g = random_tensor(DType::f64, {2, T, s.vocab_size + s.n_embd}, 70 + T);
      const Tensor y = model->forward(x);
      ASSERT_EQ(y.shape(), (Shape{2, T, s.vocab_size + s.n_embd})) << a.name;
      EXPECT_TRUE(same_bytes(y, fresh->forward(x))) << a.name << " T=" << T;
      EXPECT_TRUE(same_bytes(model->backward(x, g), fresh->backward(x, g))) << a.name << " T=" << T;
      model->forward(random_tensor(DType::f64, input_of(s, 1, 2), 80));  // another length in between
      EXPECT_TRUE(same_bytes(model->backward(x, g), fresh->backward(x, g))) << a.name << " T=" << T;
    }
  }
}

TEST(DecoderModel, CausalPositionTSeesOnlyPositionsUpToT) {
  for (const Arch& a : architectures()) {
    const ModelSpec s = arch_spec(a.name, Head::lm_head, InputSpace::embedding, 2, {1});
    auto model = make_model(s, decoder_weights(s));
    const std::int64_t T = 6;
    const Tensor x = random_tensor(DType::f64, input_of(s, 1, T), 20);
    const Tensor y = model->forward(x);
    const std::int64_t D = y.dim(2);
    for (std::int64_t t = 0; t + 1 < T; ++t) {
      Tensor changed = x;
      Rng rng(21 + t);
      for (std::int64_t i = (t + 1) * s.n_embd; i < T * s.n_embd; ++i) changed.set(i, rng.normal());
      const Tensor z = model->forward(changed);
      const std::size_t kept = static_cast<std::size_t>((t + 1) * D) * sizeof(double);
      EXPECT_EQ(std::memcmp(y.raw(), z.raw(), kept), 0) << a.name << " t=" << t;
      EXPECT_NE(std::memcmp(static_cast<const char*>(y.raw()) + kept, static_cast<const char*>(z.raw()) + kept,
                            y.nbytes() - kept),
                0)
          << a.name << " t=" << t;
    }
  }
}

TEST(DecoderModel, RotaryPositionsOrderThePrefix) {
  // Without positions, attention would not see the order of the prefix: swapping positions 0 and 1 would leave
  // position 2's output as it is. Rotary positions (there is no wpe) make it see the order.
  for (const char* arch : {"llama", "gpt_neox", "gpt2_partial_rotary"}) {
    const ModelSpec s = arch_spec(arch, Head::none, InputSpace::embedding, 2);
    auto model = make_model(s, decoder_weights(s));
    const Tensor x = random_tensor(DType::f64, input_of(s, 1, 3), 30);
    Tensor swapped = x;
    for (std::int64_t c = 0; c < s.n_embd; ++c) {
      swapped.set(c, x.get(s.n_embd + c));
      swapped.set(s.n_embd + c, x.get(c));
    }
    EXPECT_GT(relative_difference(row_at(model->forward(swapped), 2), row_at(model->forward(x), 2)), 1e-6) << arch;
  }
}

TEST(DecoderModel, F32AgreesWithF64) {
  for (const Arch& a : architectures()) {
    const ModelSpec s64 = arch_spec(a.name, Head::lm_head, InputSpace::vocab, 2, {1});
    ModelSpec s32 = s64;
    s32.dtype = DType::f32;
    const auto weights = decoder_weights(s64);  // f64: the f32 model converts them
    auto m64 = make_model(s64, weights), m32 = make_model(s32, weights);
    const Tensor x64 = random_tensor(DType::f64, input_of(s64, 2, 12), 60);
    const Tensor y64 = m64->forward(x64), y32 = m32->forward(x64.to(DType::f32));
    EXPECT_EQ(y32.dtype(), DType::f32);
    EXPECT_LT(relative_difference(y32, y64), 1e-4) << a.name;
    const Tensor g = random_tensor(DType::f64, y64.shape(), 61);
    const Tensor grad64 = m64->backward(x64, g), grad32 = m32->backward(x64.to(DType::f32), g.to(DType::f32));
    EXPECT_LT(relative_difference(grad32, grad64), 1e-4) << a.name;
    EXPECT_GT(relative_difference(grad32, grad64), 0.0) << a.name;  // it did compute in f32
  }
}

// ---- the prefix cache ---------------------------------------------------------------------------------------------

TEST(DecoderModel, PrefixCacheRowsAreForwardsBits) {
  // (prefix_cache_test checks every backend through the registry; here the reference's own, in both dtypes, up to
  // the last of n_positions.)
  for (const Arch& a : architectures())
    for (DType dtype : {DType::f64, DType::f32}) {
      const ModelSpec s = arch_spec(a.name, Head::lm_head, InputSpace::vocab, 1, {2}, dtype);
      auto model = make_model(s, decoder_weights(s));
      PrefixCache* cache = prefix_cache_of(*model);
      ASSERT_NE(cache, nullptr) << a.name;
      const std::int64_t P = s.n_positions;
      const Tensor sequence = random_tensor(dtype, input_of(s, 1, P), 90);
      const Tensor candidates = random_tensor(dtype, {3, s.vocab_size}, 91);
      cache->reset();
      for (std::int64_t t = 0; t < P; t += t % 2 == 0 ? 1 : 3) {
        while (cache->length() < t) {
          const std::int64_t p = cache->length();
          cache->append(sequence.reshape({P, s.vocab_size}).slice0(p, p + 1));
        }
        Tensor whole(dtype, {3, t + 1, s.vocab_size});
        for (std::int64_t b = 0; b < 3; ++b)
          for (std::int64_t p = 0; p <= t; ++p)
            for (std::int64_t v = 0; v < s.vocab_size; ++v)
              whole.set((b * (t + 1) + p) * s.vocab_size + v,
                        p < t ? sequence.get(p * s.vocab_size + v) : candidates.get(b * s.vocab_size + v));
        EXPECT_TRUE(same_bytes(cache->next(candidates), row_at(model->forward(whole), t)))
            << a.name << " " << dtype_name(dtype) << " t=" << t;
      }
    }
}

TEST(DecoderModel, PrefixCacheLimitIsNPositions) {
  const ModelSpec s = arch_spec("qwen2", Head::lm_head);  // seq_len 5, n_positions 12
  auto model = make_model(s, decoder_weights(s));
  PrefixCache& cache = *prefix_cache_of(*model);
  cache.append(random_tensor(DType::f64, {11, s.n_embd}, 1));
  EXPECT_EQ(cache.next(random_tensor(DType::f64, {2, s.n_embd}, 2)).shape(), (Shape{2, s.vocab_size}));
  std::string message = error_of([&] { cache.append(random_tensor(DType::f64, {2, s.n_embd}, 3)); });
  EXPECT_TRUE(contains(message, "n_positions 12")) << message;
  EXPECT_EQ(cache.length(), 11);
  cache.append(random_tensor(DType::f64, {1, s.n_embd}, 4));
  message = error_of([&] { cache.next(random_tensor(DType::f64, {2, s.n_embd}, 5)); });
  EXPECT_TRUE(contains(message, "12")) << message;
}

// ---- backend and errors -------------------------------------------------------------------------------------------

std::shared_ptr<WeightSet> without(const std::shared_ptr<const WeightSet>& full, const std::string& skip) {
  auto w = std::make_shared<WeightSet>();
  for (const auto& [name, tensor] : full->tensors())
    if (name != skip) w->set(name, tensor);
  return w;
}

TEST(DecoderBackend, MissingOrMisshapedTensorsAreNamed) {
  const ModelSpec llama = arch_spec("llama");
  const auto llama_w = decoder_weights(llama);
  std::string message = error_of([&] { make_model(llama, without(llama_w, "lm_head.weight")); });
  EXPECT_TRUE(contains(message, "'lm_head.weight'") && contains(message, "[40, 16]")) << message;
  // An untied head does not read wte, and a rotary model has no wpe.
  EXPECT_NO_THROW(make_model(llama, without(llama_w, "wte.weight")));
  EXPECT_FALSE(llama_w->contains("wpe.weight"));
  EXPECT_NO_THROW(make_model(arch_spec("gpt2_untied", Head::lm_head),
                             without(decoder_weights(arch_spec("gpt2_untied")), "wte.weight")));

  const ModelSpec qwen = arch_spec("qwen2");  // 4 query heads of 4, 1 kv head: c_attn [16, 24]
  const auto qwen_w = decoder_weights(qwen);
  message = error_of([&] { make_model(qwen, without(qwen_w, "h.1.attn.c_attn.bias")); });
  EXPECT_TRUE(contains(message, "'h.1.attn.c_attn.bias'") && contains(message, "[24]")) << message;
  auto misshaped = without(qwen_w, "");
  misshaped->set("h.0.attn.c_attn.weight", Tensor(DType::f64, {16, 48}));  // as if every head had its own kv head
  message = error_of([&] { make_model(qwen, misshaped); });
  EXPECT_TRUE(contains(message, "'h.0.attn.c_attn.weight'") && contains(message, "[16, 48]") &&
              contains(message, "[16, 24]"))
      << message;

  const ModelSpec swiglu = arch_spec("gpt2_swiglu");  // c_fc = [gate | up]: [16, 48]
  auto half = without(decoder_weights(swiglu), "");
  half->set("h.0.mlp.c_fc.weight", Tensor(DType::f64, {16, 24}));
  message = error_of([&] { make_model(swiglu, half); });
  EXPECT_TRUE(contains(message, "'h.0.mlp.c_fc.weight'") && contains(message, "[16, 48]")) << message;

  const ModelSpec head_dim = arch_spec("head_dim");  // 4 heads of 6: c_proj [24, 16]
  auto wrong = without(decoder_weights(head_dim), "");
  wrong->set("h.1.attn.c_proj.weight", Tensor(DType::f64, {16, 16}));
  message = error_of([&] { make_model(head_dim, wrong); });
  EXPECT_TRUE(contains(message, "'h.1.attn.c_proj.weight'") && contains(message, "[24, 16]")) << message;
}

TEST(DecoderBackend, BadFieldsAreNamed) {
  const auto weights = decoder_weights(arch_spec("llama"));
  auto refused = [&](const std::function<void(ModelSpec&)>& change, const std::vector<std::string>& needles) {
    ModelSpec s = arch_spec("llama");
    change(s);
    const std::string message = error_of([&] { make_model(s, weights); });
    for (const std::string& n : needles) EXPECT_TRUE(contains(message, n)) << "'" << n << "' not in: " << message;
  };
  refused([](ModelSpec& s) { s.arch.n_kv_head = 3; }, {"n_kv_head", "n_head 4", "3"});
  refused([](ModelSpec& s) { s.arch.n_kv_head = -1; }, {"n_kv_head"});
  refused([](ModelSpec& s) { s.arch.head_dim = -2; }, {"head_dim"});
  refused([](ModelSpec& s) { s.arch.rope_theta = 0; }, {"rope_theta"});
  refused([](ModelSpec& s) { s.arch.rotary_fraction = 1.5; }, {"rotary_fraction"});
  refused([](ModelSpec& s) { s.arch.rotary_fraction = 0.1; }, {"rotary_fraction", "rotates no feature"});
  refused([](ModelSpec& s) { s.arch.norm_eps = -1; }, {"norm_eps"});
  refused([](ModelSpec& s) { s.seq_len = 13; }, {"n_positions = 12", "seq_len 13"});
  refused([](ModelSpec& s) { s.n_head = 5; }, {"n_embd", "n_head 5"});
}

TEST(DecoderBackend, InputLengthIsChecked) {
  const ModelSpec s = arch_spec("gpt_neox");
  auto model = make_model(s, decoder_weights(s));
  std::string message = error_of([&] { model->forward(Tensor(DType::f64, {1, 13, 16})); });
  EXPECT_TRUE(contains(message, "[1, 13, 16]") && contains(message, "n_positions")) << message;
  const Tensor x = random_tensor(DType::f64, {2, 4, 16}, 1);
  model->forward(x);
  message = error_of([&] { model->backward(x, Tensor(DType::f64, {2, 5, 40})); });
  EXPECT_TRUE(contains(message, "[2, 5, 40]") && contains(message, "[2, 4, 40]")) << message;
}

TEST(DecoderBackend, ModelsOnOneWeightSetShareItsConvertedCopies) {
  // f32 models of an f64 weight set convert each tensor once for all of them; f64 models read the set in place.
  const auto w = decoder_weights(arch_spec("llama"));
  reference::ConvertedWeightsCache cache;
  const auto a = cache.of(w), b = cache.of(w);
  EXPECT_EQ(a, b);
  const Shape shape = w->get("h.0.attn.c_attn.weight").shape();
  const float* f = a->get<float>("h.0.attn.c_attn.weight", shape, 1);
  EXPECT_EQ(b->get<float>("h.0.attn.c_attn.weight", shape, 1), f);
  EXPECT_EQ(f[3], static_cast<float>(w->get("h.0.attn.c_attn.weight").get(3)));
  EXPECT_EQ(a->get<double>("h.0.attn.c_attn.weight", shape, 1), w->get("h.0.attn.c_attn.weight").data<double>());
  EXPECT_NE(cache.of(decoder_weights(arch_spec("llama"))), a);  // another set with the same values: its own copies
  // Two f32 models through the backend, one dropped: the other still works and gives the same bits as a fresh one.
  ModelSpec s = arch_spec("llama");
  s.dtype = DType::f32;
  ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", "1"}}));
  auto first = backend.create_model(s, w);
  auto second = backend.create_model(s, w);
  const Tensor x = random_tensor(DType::f32, input_of(s, 1, 4), 3);
  const Tensor y = first->forward(x);
  first.reset();
  EXPECT_TRUE(same_bytes(second->forward(x), y));
  EXPECT_TRUE(same_bytes(make_model(s, w)->forward(x), y));
}

TEST(DecoderBackend, InfoListsEveryFeatureEveryArchitectureNeeds) {
  const BackendInfo info = ReferenceBackend().info();
  for (const Arch& a : architectures())
    for (const std::string& f : required_features(arch_spec(a.name, Head::lm_head, InputSpace::vocab, 1, {2})))
      EXPECT_NE(std::find(info.features.begin(), info.features.end(), f), info.features.end()) << a.name << " " << f;
  EXPECT_NE(std::find(info.features.begin(), info.features.end(), std::string(feature::prefix_cache)),
            info.features.end());
}

}  // namespace
}  // namespace lminv
