// The reference backend's decoder at GPT-2's setting (spec.arch's defaults): every layer function's input gradient
// against central finite differences, the whole model against a second, naive implementation written here and against
// finite differences, causality, batching and threading to the last bit, f32 against f64, loss_and_grad, truncation,
// and the errors it raises.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "decoder_layers.hpp"
#include "lminv/error.hpp"
#include "lminv/options.hpp"
#include "lminv/rng.hpp"
#include "reference_backend.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

using reference::Index;
using reference::ReferenceBackend;

// ---- helpers ------------------------------------------------------------------------------------------------------

// A tiny GPT-2: d = 16, 2 heads of 8, 3 blocks, 40 tokens, 16 positions, 5 tokens of input.
ModelSpec tiny_spec(Head head = Head::none, InputSpace input = InputSpace::embedding, std::int64_t blocks = 3,
                    std::vector<std::int64_t> layers = {}, DType dtype = DType::f64) {
  ModelSpec spec;
  spec.family = "gpt2";
  spec.kind = ModelKind::decoder;  // arch: GPT-2's setting, the default
  spec.n_layer = 3;
  spec.n_embd = 16;
  spec.n_head = 2;
  spec.vocab_size = 40;
  spec.n_positions = 16;
  spec.seq_len = 5;
  spec.blocks = blocks;
  spec.head = head;
  spec.input = input;
  spec.layers = std::move(layers);
  spec.dtype = dtype;
  return spec;
}

Tensor normal_tensor(Rng& rng, const Shape& shape, double mean, double std) {
  Tensor t(DType::f64, shape);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, mean + std * rng.normal());
  return t;
}

// Random weights for every tensor of `spec`'s n_layer blocks, all of them away from GPT-2's init (non-zero biases,
// LayerNorm weights other than 1, matrices large enough for the attention to be far from uniform), so that a wrong
// index or a missing term shows. f64.
std::shared_ptr<const WeightSet> test_weights(const ModelSpec& spec, std::uint64_t seed = 1) {
  Rng rng(seed);
  const std::int64_t d = spec.n_embd, inner = spec.inner();
  auto w = std::make_shared<WeightSet>();
  w->set("wte.weight", normal_tensor(rng, {spec.vocab_size, d}, 0, 0.3));
  w->set("wpe.weight", normal_tensor(rng, {spec.n_positions, d}, 0, 0.3));
  auto layer_norm = [&](const std::string& name) {
    w->set(name + ".weight", normal_tensor(rng, {d}, 1, 0.2));
    w->set(name + ".bias", normal_tensor(rng, {d}, 0, 0.1));
  };
  auto conv1d = [&](const std::string& name, std::int64_t in, std::int64_t out, double std) {
    w->set(name + ".weight", normal_tensor(rng, {in, out}, 0, std));
    w->set(name + ".bias", normal_tensor(rng, {out}, 0, 0.1));
  };
  for (std::int64_t i = 0; i < spec.n_layer; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    layer_norm(h + "ln_1");
    conv1d(h + "attn.c_attn", d, 3 * d, 0.4);
    conv1d(h + "attn.c_proj", d, d, 0.3);
    layer_norm(h + "ln_2");
    conv1d(h + "mlp.c_fc", d, inner, 0.3);
    conv1d(h + "mlp.c_proj", inner, d, 0.15);
  }
  layer_norm("ln_f");
  return w;
}

std::unique_ptr<Model> make_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads = 1) {
  ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(threads)}}));
  return backend.create_model(spec, std::move(weights));
}

Tensor random_tensor(DType dtype, const Shape& shape, std::uint64_t seed, double scale = 1.0) {
  Tensor t(dtype, shape);
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
  return t;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += a.get(i) * b.get(i);
  return s;
}

Tensor axpy(const Tensor& x, double h, const Tensor& u) {  // x + h u
  Tensor out = x;
  for (std::int64_t i = 0; i < x.numel(); ++i) out.set(i, x.get(i) + h * u.get(i));
  return out;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.get(i)));
  return m;
}

// max |a - b| / max |b|
double relative_difference(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  return m / max_abs(b);
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

std::string describe(const ModelSpec& s) {
  std::string layers;
  for (std::int64_t l : s.layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  return std::string("blocks=") + std::to_string(s.blocks) + " head=" + head_name(s.head) +
         " input=" + input_space_name(s.input) + " layers={" + layers + "} " + dtype_name(s.dtype);
}

// Every spec of the tiny model: blocks 0 .. n_layer, each head, each input space, without and with extra layers.
std::vector<ModelSpec> all_tiny_specs(DType dtype = DType::f64) {
  std::vector<ModelSpec> specs;
  for (std::int64_t blocks = 0; blocks <= 3; ++blocks)
    for (Head head : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
        for (const std::vector<std::int64_t>& layers : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{1, 3}})
          specs.push_back(tiny_spec(head, input, blocks, layers, dtype));
  return specs;
}

// ---- finite differences for the layer functions -------------------------------------------------------------------

using Vec = std::vector<double>;

Vec random_values(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  Vec v(n);
  Rng rng(seed);
  for (double& x : v) x = scale * rng.normal();
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

TEST(Gpt2Layers, LayerNormInputGradient) {
  const Index N = 3, C = 7;
  const Vec x = random_values(N * C, 1, 2.0), w = random_values(C, 2), b = random_values(C, 3),
            g = random_values(N * C, 4);
  auto f = [&](const Vec& in) {
    Vec out(N * C), mean(N), rstd(N);
    reference::layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), N, C, 1e-5);
    return out;
  };
  Vec out(N * C), mean(N), rstd(N), dx(N * C);
  reference::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5);
  reference::layernorm_backward(dx.data(), x.data(), mean.data(), rstd.data(), g.data(), w.data(), N, C);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
  // The statistics it saved, and one value, against their definitions.
  double m = 0, v = 0;
  for (Index c = 0; c < C; ++c) m += x[C + c] / C;
  for (Index c = 0; c < C; ++c) v += (x[C + c] - m) * (x[C + c] - m) / C;
  EXPECT_NEAR(mean[1], m, 1e-14);
  EXPECT_NEAR(rstd[1], 1 / std::sqrt(v + 1e-5), 1e-12);
  EXPECT_NEAR(out[C + 2], (x[C + 2] - m) / std::sqrt(v + 1e-5) * w[2] + b[2], 1e-12);
}

TEST(Gpt2Layers, Conv1dIsXWPlusBiasAndItsInputGradient) {
  const Index N = 3, C = 5, OC = 7;
  const Vec x = random_values(N * C, 1), W = random_values(C * OC, 2), b = random_values(OC, 3),
            g = random_values(N * OC, 4);
  auto f = [&](const Vec& in) {
    Vec out(N * OC);
    reference::conv1d_forward(out.data(), in.data(), W.data(), b.data(), N, C, OC);
    return out;
  };
  const Vec out = f(x);
  for (Index n = 0; n < N; ++n)
    for (Index o = 0; o < OC; ++o) {
      double expected = b[o];
      for (Index c = 0; c < C; ++c) expected += x[n * C + c] * W[c * OC + o];  // weight [in, out]
      EXPECT_NEAR(out[n * OC + o], expected, 1e-13);
    }
  Vec dx(N * C);
  reference::conv1d_backward(dx.data(), g.data(), W.data(), N, C, OC);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
}

TEST(Gpt2Layers, AttentionInputGradient) {
  const Index B = 2, T = 4, C = 6, NH = 2;
  const reference::HeadLayout heads{NH, NH, C / NH};  // GPT-2's: every query head has its own key and value head
  const Vec qkv = random_values(B * T * 3 * C, 1, 1.5), g = random_values(B * T * C, 2);
  auto f = [&](const Vec& in) {
    Vec out(B * T * C), att(B * NH * T * T);
    reference::attention_forward(out.data(), att.data(), in.data(), B, T, heads);
    return out;
  };
  Vec out(B * T * C), att(B * NH * T * T), dqkv(B * T * 3 * C);
  reference::attention_forward(out.data(), att.data(), qkv.data(), B, T, heads);
  reference::attention_backward(dqkv.data(), qkv.data(), att.data(), g.data(), B, T, heads);
  EXPECT_LT(fd_relative_error(f, qkv, g, dqkv), 1e-6);
  // The saved probabilities: rows sum to 1, zero above the diagonal, not uniform (the test inputs are not trivial).
  double spread = 0;
  for (Index row = 0; row < B * NH * T; ++row) {
    const Index t = row % T;
    double sum = 0;
    for (Index t2 = 0; t2 < T; ++t2) {
      const double p = att[row * T + t2];
      if (t2 > t) {
        EXPECT_EQ(p, 0.0);
      }
      sum += p;
      if (t2 <= t) spread = std::max(spread, std::abs(p - 1.0 / (t + 1)));
    }
    EXPECT_NEAR(sum, 1.0, 1e-14);
  }
  EXPECT_GT(spread, 0.1);
}

TEST(Gpt2Layers, GeluTanhInputGradient) {
  const Index n = 50;
  const Vec x = random_values(n, 1, 2.0), g = random_values(n, 2);
  auto f = [&](const Vec& in) {
    Vec out(n);
    reference::gelu_tanh_forward_parallel(out.data(), in.data(), n);
    return out;
  };
  Vec dx(n);
  reference::gelu_tanh_backward_parallel(dx.data(), x.data(), g.data(), n);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
  // Hugging Face's gelu_new, written out.
  const Vec out = f(x);
  for (Index i = 0; i < n; ++i)
    EXPECT_NEAR(out[i], 0.5 * x[i] * (1 + std::tanh(std::sqrt(2 / M_PI) * (x[i] + 0.044715 * std::pow(x[i], 3)))),
                1e-15);
}

TEST(Gpt2Layers, EmbeddingWithPositionsInBothInputSpaces) {
  const Index B = 2, T = 3, C = 4, V = 9, P = 5;
  const Vec wte = random_values(V * C, 1), wpe = random_values(P * C, 2), g = random_values(B * T * C, 3);
  for (bool vocab : {false, true}) {
    const Index width = vocab ? V : C;
    const Vec x = random_values(B * T * width, 4);
    const double* w = vocab ? wte.data() : nullptr;
    auto f = [&](const Vec& in) {
      Vec out(B * T * C);
      reference::embedding_forward(out.data(), in.data(), w, wpe.data(), B, T, C, V);
      return out;
    };
    const Vec out = f(x);
    for (Index n = 0; n < B * T; ++n)
      for (Index c = 0; c < C; ++c) {
        double expected = wpe[(n % T) * C + c];
        if (vocab) {
          for (Index v = 0; v < V; ++v) expected += x[n * V + v] * wte[v * C + c];
        } else {
          expected += x[n * C + c];
        }
        EXPECT_NEAR(out[n * C + c], expected, 1e-13) << vocab;
      }
    Vec dx(B * T * width);
    reference::embedding_backward(dx.data(), g.data(), w, B, T, C, V);
    EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6) << vocab;
  }
}

TEST(Gpt2Layers, LmHeadIsTiedToWte) {
  const Index N = 3, C = 5, V = 11;
  const Vec x = random_values(N * C, 1), wte = random_values(V * C, 2), g = random_values(N * V, 3);
  auto f = [&](const Vec& in) {
    Vec out(N * V);
    reference::lm_head_forward(out.data(), in.data(), wte.data(), N, C, V);
    return out;
  };
  const Vec logits = f(x);
  for (Index n = 0; n < N; ++n)
    for (Index v = 0; v < V; ++v) {
      double expected = 0;
      for (Index c = 0; c < C; ++c) expected += x[n * C + c] * wte[v * C + c];
      EXPECT_NEAR(logits[n * V + v], expected, 1e-13);
    }
  Vec dx(N * C);
  reference::lm_head_backward(dx.data(), g.data(), wte.data(), N, C, V);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
}

TEST(Gpt2Layers, ResidualAroundABranch) {
  // y = x + conv1d(x): the gradient is g plus what comes back through the branch.
  const Index N = 2, C = 5;
  const Vec x = random_values(N * C, 1), W = random_values(C * C, 2), b = random_values(C, 3),
            g = random_values(N * C, 4);
  auto f = [&](const Vec& in) {
    Vec branch(N * C), out(N * C);
    reference::conv1d_forward(branch.data(), in.data(), W.data(), b.data(), N, C, C);
    reference::residual_forward(out.data(), in.data(), branch.data(), N * C);
    return out;
  };
  Vec dbranch(N * C), dx(N * C);
  reference::conv1d_backward(dbranch.data(), g.data(), W.data(), N, C, C);
  reference::residual_backward(dx.data(), g.data(), dbranch.data(), N * C);
  EXPECT_LT(fd_relative_error(f, x, g, dx), 1e-6);
}

// ---- a second, naive implementation of the model ------------------------------------------------------------------

// GPT2LMHeadModel's forward pass for one item, written from its definition with nested vectors and plain loops, sharing
// no code with the backend. input: [T][d or V]. Returns [T][D_main + d len(layers)].
using Matrix = std::vector<std::vector<double>>;

Matrix naive_forward(const ModelSpec& s, const WeightSet& w, const Matrix& input) {
  const std::int64_t T = s.seq_len, d = s.n_embd, V = s.vocab_size, H = s.n_head, hs = d / H, inner = s.inner();
  auto W = [&](const std::string& name, std::int64_t i, std::int64_t j = 0) {
    const Tensor& t = w.get(name);
    return t.rank() == 1 ? t.get(i) : t.get(i * t.dim(1) + j);
  };
  auto layer_norm = [&](const Matrix& x, const std::string& name) {
    Matrix y(T, std::vector<double>(d));
    for (std::int64_t t = 0; t < T; ++t) {
      double mean = 0, var = 0;
      for (double v : x[t]) mean += v;
      mean /= d;
      for (double v : x[t]) var += (v - mean) * (v - mean);
      var /= d;
      for (std::int64_t c = 0; c < d; ++c)
        y[t][c] = (x[t][c] - mean) / std::sqrt(var + s.arch.norm_eps) * W(name + ".weight", c) + W(name + ".bias", c);
    }
    return y;
  };
  auto conv1d = [&](const Matrix& x, const std::string& name, std::int64_t out) {
    Matrix y(T, std::vector<double>(out));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < out; ++o) {
        double acc = W(name + ".bias", o);
        for (std::size_t i = 0; i < x[t].size(); ++i) acc += x[t][i] * W(name + ".weight", i, o);
        y[t][o] = acc;
      }
    return y;
  };
  auto add = [&](const Matrix& a, const Matrix& b) {
    Matrix y = a;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < d; ++c) y[t][c] += b[t][c];
    return y;
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
      h[t][c] = x + W("wpe.weight", t, c);
    }
  hidden.push_back(h);
  std::int64_t L = s.blocks;
  for (std::int64_t l : s.layers) L = std::max(L, l);
  for (std::int64_t l = 0; l < L; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    const Matrix qkv = conv1d(layer_norm(h, p + "ln_1"), p + "attn.c_attn", 3 * d);
    Matrix y(T, std::vector<double>(d, 0.0));
    for (std::int64_t head = 0; head < H; ++head)
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> score(T, -INFINITY);
        for (std::int64_t u = 0; u <= t; ++u) {  // causal: position t sees 0 .. t
          double qk = 0;
          for (std::int64_t i = 0; i < hs; ++i) qk += qkv[t][head * hs + i] * qkv[u][d + head * hs + i];
          score[u] = qk / std::sqrt(static_cast<double>(hs));
        }
        const double top = *std::max_element(score.begin(), score.end());
        double z = 0;
        for (std::int64_t u = 0; u <= t; ++u) z += std::exp(score[u] - top);
        for (std::int64_t u = 0; u <= t; ++u)
          for (std::int64_t i = 0; i < hs; ++i)
            y[t][head * hs + i] += std::exp(score[u] - top) / z * qkv[u][2 * d + head * hs + i];
      }
    const Matrix a = add(h, conv1d(y, p + "attn.c_proj", d));
    Matrix fc = conv1d(layer_norm(a, p + "ln_2"), p + "mlp.c_fc", inner);
    for (auto& row : fc)
      for (double& x : row) x = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * std::pow(x, 3))));
    h = add(a, conv1d(fc, p + "mlp.c_proj", d));
    hidden.push_back(h);
  }

  Matrix main = hidden[s.blocks];
  if (s.head != Head::none) main = layer_norm(main, "ln_f");
  if (s.head == Head::lm_head) {
    Matrix logits(T, std::vector<double>(V, 0.0));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t v = 0; v < V; ++v)
        for (std::int64_t c = 0; c < d; ++c) logits[t][v] += main[t][c] * W("wte.weight", v, c);
    main = logits;
  }
  for (std::int64_t l : s.layers)
    for (std::int64_t t = 0; t < T; ++t) main[t].insert(main[t].end(), hidden[l][t].begin(), hidden[l][t].end());
  return main;
}

TEST(Gpt2Model, ForwardMatchesANaiveImplementation) {
  const auto weights = test_weights(tiny_spec());
  std::vector<ModelSpec> specs = all_tiny_specs();
  specs.push_back(tiny_spec(Head::lm_head, InputSpace::vocab, 1, {2, 0, 2}));  // any order, repeats
  for (const ModelSpec& s : specs) {
    auto model = make_model(s, weights);
    const Tensor input = random_tensor(DType::f64, input_shape(s, 2), 3);
    const Tensor out = model->forward(input);
    const std::int64_t T = s.seq_len, width = input.dim(2);
    const std::int64_t D =
        (s.head == Head::lm_head ? s.vocab_size : s.n_embd) + s.n_embd * static_cast<std::int64_t>(s.layers.size());
    ASSERT_EQ(out.shape(), (Shape{2, T, D})) << describe(s);
    double worst = 0, largest = 0;
    for (std::int64_t b = 0; b < 2; ++b) {
      Matrix x(T, std::vector<double>(width));
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t j = 0; j < width; ++j) x[t][j] = input.get((b * T + t) * width + j);
      const Matrix expected = naive_forward(s, *weights, x);
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t j = 0; j < D; ++j) {
          worst = std::max(worst, std::abs(out.get((b * T + t) * D + j) - expected[t][j]));
          largest = std::max(largest, std::abs(expected[t][j]));
        }
    }
    EXPECT_GT(largest, 0.1) << describe(s);
    EXPECT_LE(worst, 1e-12 * std::max(1.0, largest)) << describe(s);
  }
}

// ---- the whole model's gradient -----------------------------------------------------------------------------------

TEST(Gpt2Model, InputGradientMatchesFiniteDifferences) {
  // Every input element, for every spec: the gradient of <g, forward(x)> by central differences.
  const auto weights = test_weights(tiny_spec());
  for (const ModelSpec& s : all_tiny_specs()) {
    auto model = make_model(s, weights);
    const Tensor x = random_tensor(DType::f64, input_shape(s, 1), 10);
    const Tensor g = random_tensor(DType::f64, model->forward(x).shape(), 11);
    const Tensor grad = model->backward(x, g);
    ASSERT_EQ(grad.shape(), x.shape());
    const double h = 1e-5;
    double worst = 0, largest = 0;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      Tensor up = x, down = x;
      up.set(i, x.get(i) + h);
      down.set(i, x.get(i) - h);
      const double fd = (dot(g, model->forward(up)) - dot(g, model->forward(down))) / (2 * h);
      worst = std::max(worst, std::abs(grad.get(i) - fd));
      largest = std::max(largest, std::abs(fd));
    }
    EXPECT_GT(largest, 1e-2) << describe(s);
    EXPECT_LT(worst, 1e-6 * largest) << describe(s) << ": " << worst << " of " << largest;
  }
}

TEST(Gpt2Model, InputGradientWithGpt2sOwnInitialisation) {
  // The init's small weights (std 0.02, zero biases): the gradient is still right, in both input spaces.
  ModelSpec init = tiny_spec();
  const auto weights = std::make_shared<const WeightSet>(init_random_weights(init, 5));
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    const ModelSpec s = tiny_spec(Head::lm_head, input, 3, {2});
    auto model = make_model(s, weights);
    const Tensor x = random_tensor(DType::f64, input_shape(s, 1), 12);
    const Tensor g = random_tensor(DType::f64, model->forward(x).shape(), 13);
    const Tensor grad = model->backward(x, g);
    for (std::uint64_t seed : {14, 15}) {
      const Tensor u = random_tensor(DType::f64, x.shape(), seed);
      const double h = 1e-5;
      const double fd = (dot(g, model->forward(axpy(x, h, u))) - dot(g, model->forward(axpy(x, -h, u)))) / (2 * h);
      EXPECT_GT(std::abs(fd), 1e-4);
      EXPECT_LT(std::abs(dot(grad, u) - fd), 1e-6 * std::abs(fd)) << input_space_name(input);
    }
  }
}

TEST(Gpt2Model, LossAndGradIsForwardMetricBackward) {
  const auto weights = test_weights(tiny_spec());
  for (const ModelSpec& s :
       {tiny_spec(Head::lm_head, InputSpace::embedding, 2, {3}), tiny_spec(Head::ln_f, InputSpace::vocab, 3)}) {
    auto model = make_model(s, weights);
    const Tensor x = random_tensor(DType::f64, input_shape(s, 3), 11);
    const Tensor other = random_tensor(DType::f64, input_shape(s, 1), 12);
    const Tensor target = model->forward(other);
    for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
      const LossAndGrad fused = model->loss_and_grad(x, target, metric);
      model->forward(other);  // so that backward below recomputes its activations
      const LossAndGrad on_output = metric_and_grad(model->forward(x), target, metric);
      model->forward(other);
      const Tensor grad = model->backward(x, on_output.grad);
      EXPECT_EQ(fused.loss, on_output.loss) << metric_name(metric);
      EXPECT_TRUE(same_bytes(fused.grad, grad)) << metric_name(metric);
      EXPECT_GT(max_abs(grad), 0.0);
      // ... and it is the loss's gradient.
      const Tensor u = random_tensor(DType::f64, x.shape(), 13);
      auto loss_sum = [&](const Tensor& v) {
        const std::vector<double> l = distances(model->forward(v), target, metric);
        return l[0] + l[1] + l[2];
      };
      const double h = 1e-6, fd = (loss_sum(axpy(x, h, u)) - loss_sum(axpy(x, -h, u))) / (2 * h);
      EXPECT_LT(std::abs(dot(fused.grad, u) - fd), 1e-6 * std::abs(fd)) << describe(s) << " " << metric_name(metric);
    }
  }
}

TEST(Gpt2Model, BackwardAfterAnotherForwardRecomputes) {
  const ModelSpec s = tiny_spec(Head::lm_head, InputSpace::vocab, 2, {1});
  const auto weights = test_weights(s);
  auto model = make_model(s, weights);
  const Tensor x = random_tensor(DType::f64, input_shape(s, 2), 70), other = random_tensor(DType::f64, x.shape(), 71);
  const Tensor g = random_tensor(DType::f64, model->forward(x).shape(), 72);
  const Tensor after_own = model->backward(x, g);
  model->forward(other);
  EXPECT_TRUE(same_bytes(model->backward(x, g), after_own));
  auto fresh = make_model(s, weights);  // no forward at all before
  EXPECT_TRUE(same_bytes(fresh->backward(x, g), after_own));
  EXPECT_FALSE(same_bytes(fresh->backward(other, g), after_own));
}

// ---- structure: causality, truncation, batching, threads, dtypes --------------------------------------------------

TEST(Gpt2Model, CausalPositionTSeesOnlyPositionsUpToT) {
  const auto weights = test_weights(tiny_spec());
  for (Head head : {Head::none, Head::ln_f, Head::lm_head})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
      const ModelSpec s = tiny_spec(head, input, 3, {1, 2});
      auto model = make_model(s, weights);
      const Tensor x = random_tensor(DType::f64, input_shape(s, 1), 20);
      const Tensor y = model->forward(x);
      const std::int64_t T = s.seq_len, width = x.dim(2), D = y.dim(2);
      for (std::int64_t t = 0; t + 1 < T; ++t) {
        Tensor changed = x;
        Rng rng(21 + t);
        for (std::int64_t i = (t + 1) * width; i < T * width; ++i) changed.set(i, rng.normal());
        const Tensor z = model->forward(changed);
        const std::size_t kept = static_cast<std::size_t>((t + 1) * D) * sizeof(double);
        EXPECT_EQ(std::memcmp(y.raw(), z.raw(), kept), 0) << describe(s) << " t=" << t;
        EXPECT_NE(std::memcmp(static_cast<const char*>(y.raw()) + kept, static_cast<const char*>(z.raw()) + kept,
                              y.nbytes() - kept),
                  0)
            << describe(s) << " t=" << t;
      }
    }
}

TEST(Gpt2Model, TruncationAndExtraLayersAgree) {
  // The main output of blocks = k, head none, is the residual stream after block k, which is also the extra layer k
  // of a deeper model; a weight set holding only the blocks used gives the same bits.
  const auto weights = test_weights(tiny_spec());
  const Tensor x = random_tensor(DType::f64, input_shape(tiny_spec(), 2), 30);
  auto deep = make_model(tiny_spec(Head::lm_head, InputSpace::embedding, 3, {0, 1, 2, 3}), weights);
  const Tensor all = deep->forward(x);
  const std::int64_t V = 40, d = 16, T = 5;
  for (std::int64_t k = 0; k <= 3; ++k) {
    const Tensor main = make_model(tiny_spec(Head::none, InputSpace::embedding, k), weights)->forward(x);
    for (std::int64_t n = 0; n < 2 * T; ++n)
      EXPECT_EQ(std::memcmp(main.data<double>() + n * d, all.data<double>() + n * (V + 4 * d) + V + k * d,
                            d * sizeof(double)),
                0)
          << k;
    auto only_used = std::make_shared<WeightSet>();
    for (const auto& [name, tensor] : weights->tensors())
      if (name.rfind("h.", 0) != 0 || std::stoll(name.substr(2)) < k) only_used->set(name, tensor);
    EXPECT_TRUE(same_bytes(make_model(tiny_spec(Head::none, InputSpace::embedding, k), only_used)->forward(x), main));
  }
  // Blocks change the output: block 1's output is not block 0's.
  EXPECT_NE(std::memcmp(all.data<double>() + V, all.data<double>() + V + d, d * sizeof(double)), 0);
  // The main output at blocks = 3 is the lm_head of the last extra layer (block 3's output).
  const Tensor lm = make_model(tiny_spec(Head::lm_head, InputSpace::embedding, 3), weights)->forward(x);
  for (std::int64_t n = 0; n < 2 * T; ++n)
    EXPECT_EQ(std::memcmp(lm.data<double>() + n * V, all.data<double>() + n * (V + 4 * d), V * sizeof(double)), 0);
}

TEST(Gpt2Model, BatchEqualsOneByOneExactly) {
  for (DType dtype : {DType::f64, DType::f32})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
      const ModelSpec s = tiny_spec(Head::lm_head, input, 2, {0, 3}, dtype);
      auto model = make_model(s, test_weights(s), 2);
      const std::int64_t B = 3;
      const Tensor x = random_tensor(dtype, input_shape(s, B), 40);
      const Tensor y = model->forward(x);
      const Tensor g = random_tensor(dtype, y.shape(), 41);
      const Tensor grad = model->backward(x, g);
      const Tensor target = random_tensor(dtype, y.slice0(0, 1).shape(), 42);
      const LossAndGrad lg = model->loss_and_grad(x, target, Metric::l2);
      for (std::int64_t b = 0; b < B; ++b) {
        const Tensor xb = x.slice0(b, b + 1);
        EXPECT_TRUE(same_bytes(model->forward(xb), y.slice0(b, b + 1))) << describe(s) << " " << b;
        EXPECT_TRUE(same_bytes(model->backward(xb, g.slice0(b, b + 1)), grad.slice0(b, b + 1)))
            << describe(s) << " " << b;
        const LossAndGrad one = model->loss_and_grad(xb, target, Metric::l2);
        EXPECT_EQ(one.loss[0], lg.loss[b]) << describe(s) << " " << b;
        EXPECT_TRUE(same_bytes(one.grad, lg.grad.slice0(b, b + 1))) << describe(s) << " " << b;
      }
      // The items differ, so the comparison above compared something.
      EXPECT_FALSE(same_bytes(y.slice0(0, 1), y.slice0(1, 2)));
    }
}

TEST(Gpt2Model, SameBitsForAnyThreadCount) {
  // Big enough that the products, the layer norms, the GELU and the attention heads are all split between threads.
  ModelSpec s = tiny_spec(Head::lm_head, InputSpace::vocab, 2, {1});
  s.n_layer = 2;
  s.n_embd = 64;
  s.n_head = 4;
  s.vocab_size = 300;
  s.n_positions = 32;
  s.seq_len = 24;
  const auto weights = test_weights(s);
  for (DType dtype : {DType::f64, DType::f32}) {
    s.dtype = dtype;
    const Tensor x = random_tensor(dtype, input_shape(s, 3), 50);
    auto one = make_model(s, weights, 1);
    const Tensor y = one->forward(x);
    const Tensor g = random_tensor(dtype, y.shape(), 51);
    const Tensor grad = one->backward(x, g);
    for (int threads : {2, 3}) {
      auto many = make_model(s, weights, threads);
      EXPECT_TRUE(same_bytes(many->forward(x), y)) << dtype_name(dtype) << " " << threads;
      EXPECT_TRUE(same_bytes(many->backward(x, g), grad)) << dtype_name(dtype) << " " << threads;
    }
  }
}

TEST(Gpt2Model, F32AgreesWithF64) {
  const auto weights = test_weights(tiny_spec());  // f64: the f32 model converts them
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
    for (Head head : {Head::none, Head::lm_head}) {
      const ModelSpec s64 = tiny_spec(head, input, 3, {1}), s32 = tiny_spec(head, input, 3, {1}, DType::f32);
      auto m64 = make_model(s64, weights), m32 = make_model(s32, weights);
      const Tensor x64 = random_tensor(DType::f64, input_shape(s64, 2), 60);
      const Tensor x32 = x64.to(DType::f32);
      const Tensor y64 = m64->forward(x64), y32 = m32->forward(x32);
      EXPECT_EQ(y32.dtype(), DType::f32);
      EXPECT_LT(relative_difference(y32, y64), 1e-4) << describe(s32);
      const Tensor g64 = random_tensor(DType::f64, y64.shape(), 61);
      const Tensor grad64 = m64->backward(x64, g64), grad32 = m32->backward(x32, g64.to(DType::f32));
      EXPECT_EQ(grad32.dtype(), DType::f32);
      EXPECT_LT(relative_difference(grad32, grad64), 1e-4) << describe(s32);
      EXPECT_GT(relative_difference(grad32, grad64), 0.0);  // it did compute in f32
    }
}

TEST(Gpt2Model, WeightsInAnotherDtypeAreConverted) {
  // f32 weights in an f64 model give the bits of the same weights converted to f64 first, and the other way round.
  const ModelSpec s64 = tiny_spec(Head::lm_head, InputSpace::vocab, 2),
                  s32 = tiny_spec(Head::lm_head, InputSpace::vocab, 2, {}, DType::f32);
  const auto w64 = test_weights(s64);
  auto w32 = std::make_shared<WeightSet>(), w32_as_64 = std::make_shared<WeightSet>();
  for (const auto& [name, tensor] : w64->tensors()) {
    w32->set(name, tensor.to(DType::f32));
    w32_as_64->set(name, tensor.to(DType::f32).to(DType::f64));
  }
  const Tensor x = random_tensor(DType::f64, input_shape(s64, 2), 80);
  EXPECT_TRUE(same_bytes(make_model(s64, w32)->forward(x), make_model(s64, w32_as_64)->forward(x)));
  EXPECT_TRUE(
      same_bytes(make_model(s32, w64)->forward(x.to(DType::f32)), make_model(s32, w32)->forward(x.to(DType::f32))));
  // An input in another dtype is converted, and its gradient comes back in the input's dtype.
  auto m32 = make_model(s32, w32);
  const Tensor g = random_tensor(DType::f32, m32->forward(x.to(DType::f32)).shape(), 81);
  const Tensor grad_mixed = m32->backward(x, g);
  EXPECT_EQ(grad_mixed.dtype(), DType::f64);
  EXPECT_TRUE(same_bytes(grad_mixed, m32->backward(x.to(DType::f32), g).to(DType::f64)));
}

// ---- backend and errors -------------------------------------------------------------------------------------------

TEST(Gpt2Backend, InfoListsTheDecoderWithGpt2sFeatures) {
  const BackendInfo info = ReferenceBackend().info();
  EXPECT_NE(std::find(info.kinds.begin(), info.kinds.end(), ModelKind::decoder), info.kinds.end());
  for (const std::string& f : required_features(tiny_spec(Head::lm_head, InputSpace::vocab, 3, {1})))
    EXPECT_NE(std::find(info.features.begin(), info.features.end(), f), info.features.end()) << f;
}

TEST(Gpt2Backend, SpecErrors) {
  const auto weights = test_weights(tiny_spec());
  ModelSpec s = tiny_spec();
  s.seq_len = 17;
  std::string message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "n_positions = 16") && contains(message, "seq_len 17")) << message;
  s.seq_len = 16;  // exactly n_positions is fine
  EXPECT_NO_THROW(make_model(s, weights));

  s = tiny_spec();
  s.n_head = 3;
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "divisible") && contains(message, "n_embd 16") && contains(message, "n_head 3"))
      << message;

  for (std::int64_t blocks : {4, -1}) {
    s = tiny_spec(Head::none, InputSpace::embedding, blocks);
    message = error_of([&] { make_model(s, weights); });
    EXPECT_TRUE(contains(message, "blocks") && contains(message, "0 .. 3") && contains(message, std::to_string(blocks)))
        << message;
  }
  s = tiny_spec(Head::none, InputSpace::embedding, 1, {1, 4});
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "layers") && contains(message, "got 4")) << message;

  s = tiny_spec();
  s.dtype = DType::bf16;
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "'bf16'")) << message;
  EXPECT_TRUE(contains(error_of([&] { make_model(tiny_spec(), nullptr); }), "no weights"));
}

TEST(Gpt2Backend, MissingOrMisshapedWeightsAreNamed) {
  const auto full = test_weights(tiny_spec());
  auto without = [&](const std::string& skip) {
    auto w = std::make_shared<WeightSet>();
    for (const auto& [name, tensor] : full->tensors())
      if (name != skip) w->set(name, tensor);
    return w;
  };
  std::string message = error_of([&] { make_model(tiny_spec(), without("h.2.mlp.c_fc.bias")); });
  EXPECT_TRUE(contains(message, "'h.2.mlp.c_fc.bias'") && contains(message, "[64]")) << message;
  // ... but a model of the first two blocks does not need block 2, unless an extra layer reads past it.
  EXPECT_NO_THROW(make_model(tiny_spec(Head::none, InputSpace::embedding, 2), without("h.2.mlp.c_fc.bias")));
  message =
      error_of([&] { make_model(tiny_spec(Head::none, InputSpace::embedding, 2, {3}), without("h.2.mlp.c_fc.bias")); });
  EXPECT_TRUE(contains(message, "'h.2.mlp.c_fc.bias'")) << message;

  message = error_of([&] { make_model(tiny_spec(), without("wpe.weight")); });
  EXPECT_TRUE(contains(message, "'wpe.weight'") && contains(message, "[16, 16]")) << message;

  // wte is needed by a vocabulary-space input or the lm_head only; ln_f by a head only.
  EXPECT_NO_THROW(make_model(tiny_spec(Head::ln_f), without("wte.weight")));
  for (const ModelSpec& s : {tiny_spec(Head::lm_head), tiny_spec(Head::none, InputSpace::vocab)}) {
    message = error_of([&] { make_model(s, without("wte.weight")); });
    EXPECT_TRUE(contains(message, "'wte.weight'") && contains(message, "[40, 16]")) << message;
  }
  EXPECT_NO_THROW(make_model(tiny_spec(Head::none), without("ln_f.bias")));
  message = error_of([&] { make_model(tiny_spec(Head::ln_f), without("ln_f.bias")); });
  EXPECT_TRUE(contains(message, "'ln_f.bias'")) << message;

  auto misshaped = without("");
  misshaped->set("h.0.attn.c_attn.weight", Tensor(DType::f64, {48, 16}));  // torch's Linear layout, not Conv1D's
  message = error_of([&] { make_model(tiny_spec(), misshaped); });
  EXPECT_TRUE(contains(message, "'h.0.attn.c_attn.weight'") && contains(message, "[48, 16]") &&
              contains(message, "[16, 48]"))
      << message;
}

TEST(Gpt2Backend, WrongInputOrGradientShape) {
  const ModelSpec s = tiny_spec(Head::lm_head);
  auto model = make_model(s, test_weights(s));
  // Any length up to n_positions = 16 is fine; 17 positions or a wrong width are not.
  EXPECT_EQ(model->forward(Tensor(DType::f64, {1, 6, 16})).shape(), (Shape{1, 6, 40}));
  std::string message = error_of([&] { model->forward(Tensor(DType::f64, {1, 17, 16})); });
  EXPECT_TRUE(contains(message, "[1, 17, 16]") && contains(message, "T in 1 .. 16")) << message;
  message = error_of([&] { model->forward(Tensor(DType::f64, {1, 5, 15})); });
  EXPECT_TRUE(contains(message, "[1, 5, 15]") && contains(message, "[B, T, 16]")) << message;
  message = error_of([&] { model->forward(Tensor(DType::f64, {1, 0, 16})); });
  EXPECT_TRUE(contains(message, "[1, 0, 16]")) << message;
  const Tensor x(DType::f64, {2, 5, 16});
  message = error_of([&] { model->backward(x, Tensor(DType::f64, {2, 5, 16})); });
  EXPECT_TRUE(contains(message, "[2, 5, 16]") && contains(message, "[2, 5, 40]")) << message;
}

}  // namespace
}  // namespace lminv
