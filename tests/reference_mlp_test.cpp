// The reference backend on the MLP families: layer functions and whole models against finite differences and naive
// loops, batching and threading to the last bit, f32 against f64, and the errors it raises.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "layers.hpp"
#include "lminv/error.hpp"
#include "lminv/options.hpp"
#include "lminv/rng.hpp"
#include "lminv/schema.hpp"
#include "reference_backend.hpp"

namespace lminv {
namespace {

using reference::Index;
using reference::ReferenceBackend;

const std::vector<std::string> kFamilies = {"fcnet", "fcnet_noninvertible", "transformer_mlp"};

ModelSpec mlp_spec(const std::string& family, InputSpace input, DType dtype = DType::f64, std::int64_t d = 8,
                   std::int64_t T = 3, std::int64_t V = 50) {
  ModelSpec spec;
  spec.family = family;
  spec.kind = *parse_kind(family);  // what the backend dispatches on; family is a label
  spec.n_embd = d;
  spec.seq_len = T;
  spec.vocab_size = V;
  spec.input = input;
  spec.dtype = dtype;
  return spec;
}

// Seeded weights for every tensor of weight_schema(spec), in `dtype` (rounded from f64): linear layers [out, in] and
// their biases uniform in [-1/sqrt(in), 1/sqrt(in)) as torch's nn.Linear draws them, wte normal with std 0.3.
WeightSet schema_weights(const ModelSpec& spec, std::uint64_t seed, DType dtype = DType::f64) {
  const std::vector<TensorSpec> schema = weight_schema(spec);
  std::map<std::string, std::int64_t> inputs;  // layer -> its input width, from "<layer>.weight" [out, in]
  for (const TensorSpec& t : schema)
    if (t.shape.size() == 2) inputs[t.name.substr(0, t.name.find('.'))] = t.shape[1];
  WeightSet w;
  const Rng root(seed);
  for (const TensorSpec& t : schema) {
    Rng rng = root.fork(t.name);
    const std::string layer = t.name.substr(0, t.name.find('.'));
    const double bound = 1 / std::sqrt(static_cast<double>(inputs.at(layer)));
    Tensor v(DType::f64, t.shape);
    for (std::int64_t i = 0; i < v.numel(); ++i)
      v.set(i, layer == "wte" ? 0.3 * rng.normal() : rng.uniform(-bound, bound));
    w.set(t.name, v.to(dtype));
  }
  return w;
}

std::shared_ptr<const WeightSet> weights_for(const ModelSpec& spec, std::uint64_t seed = 1) {
  // one set of f64 weights for both dtypes: the f32 model converts it
  return std::make_shared<const WeightSet>(schema_weights(spec, seed));
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

// Central difference of f along u at x.
double central_difference(const std::function<double(const Tensor&)>& f, const Tensor& x, const Tensor& u,
                          double h = 1e-5) {
  return (f(axpy(x, h, u)) - f(axpy(x, -h, u))) / (2 * h);
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

// ---- layer functions ----------------------------------------------------------------------------------------------

std::vector<double> random_values(std::size_t n, std::uint64_t seed) {
  std::vector<double> v(n);
  Rng rng(seed);
  for (double& x : v) x = rng.normal();
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

TEST(ReferenceLayers, LinearMatchesNaiveLoopsAtAwkwardSizes) {
  // Sizes off every lane, row-block and group width, and large enough for several threads.
  for (auto [N, C, OC] :
       std::vector<std::tuple<Index, Index, Index>>{{1, 37, 13}, {5, 300, 70}, {9, 17, 1}, {3, 1, 6}}) {
    const auto x = random_values(N * C, 1), W = random_values(OC * C, 2), b = random_values(OC, 3);
    const auto g = random_values(N * OC, 4);
    std::vector<double> out(N * OC), dx(N * C);
    reference::linear_forward(out.data(), x.data(), W.data(), b.data(), N, C, OC, 2);
    reference::linear_backward(dx.data(), g.data(), W.data(), N, C, OC, 2);
    for (Index n = 0; n < N; ++n) {
      for (Index o = 0; o < OC; ++o) {
        double expected = b[o];
        for (Index c = 0; c < C; ++c) expected += W[o * C + c] * x[n * C + c];
        EXPECT_NEAR(out[n * OC + o], expected, 1e-12 * C) << N << " " << C << " " << OC;
      }
      for (Index c = 0; c < C; ++c) {
        double expected = 0;
        for (Index o = 0; o < OC; ++o) expected += g[n * OC + o] * W[o * C + c];
        EXPECT_NEAR(dx[n * C + c], expected, 1e-12 * OC) << N << " " << C << " " << OC;
      }
    }
  }
}

TEST(ReferenceLayers, LinearBackwardIsTheVectorJacobianProduct) {
  const Index N = 3, C = 11, OC = 7;
  const auto x = random_values(N * C, 1), W = random_values(OC * C, 2), b = random_values(OC, 3);
  const auto g = random_values(N * OC, 4), u = random_values(N * C, 5);
  std::vector<double> dx(N * C);
  reference::linear_backward(dx.data(), g.data(), W.data(), N, C, OC);
  auto f = [&](double h) {
    std::vector<double> xh(x), out(N * OC);
    for (std::size_t i = 0; i < xh.size(); ++i) xh[i] += h * u[i];
    reference::linear_forward(out.data(), xh.data(), W.data(), b.data(), N, C, OC);
    return dot(g, out);
  };
  const double fd = (f(1e-5) - f(-1e-5)) / 2e-5, analytic = dot(dx, u);
  EXPECT_GT(std::abs(analytic), 0.1);
  EXPECT_NEAR(fd, analytic, 1e-6 * std::abs(analytic));
}

TEST(ReferenceLayers, EmbedVocabIsVTimesWteAndItsTranspose) {
  const Index N = 4, V = 23, d = 6;
  const auto v = random_values(N * V, 1), wte = random_values(V * d, 2), g = random_values(N * d, 3);
  const auto u = random_values(N * V, 4);
  std::vector<double> x(N * d), dv(N * V);
  reference::embed_vocab_forward(x.data(), v.data(), wte.data(), N, V, d);
  reference::embed_vocab_backward(dv.data(), g.data(), wte.data(), N, V, d);
  for (Index n = 0; n < N; ++n)
    for (Index j = 0; j < d; ++j) {
      double expected = 0;
      for (Index k = 0; k < V; ++k) expected += v[n * V + k] * wte[k * d + j];
      EXPECT_NEAR(x[n * d + j], expected, 1e-12 * V);
    }
  auto f = [&](double h) {
    std::vector<double> vh(v), out(N * d);
    for (std::size_t i = 0; i < vh.size(); ++i) vh[i] += h * u[i];
    reference::embed_vocab_forward(out.data(), vh.data(), wte.data(), N, V, d);
    return dot(g, out);
  };
  const double fd = (f(1e-5) - f(-1e-5)) / 2e-5, analytic = dot(dv, u);
  EXPECT_GT(std::abs(analytic), 0.1);
  EXPECT_NEAR(fd, analytic, 1e-6 * std::abs(analytic));
}

TEST(ReferenceLayers, GeluValues) {
  const double x[] = {-3.0, -1.0, 0.0, 0.5, 1.0, 2.0};
  double exact[6], approx[6];
  reference::gelu_forward(exact, x, 6);
  reference::gelu_tanh_forward(approx, x, 6);
  // x Phi(x) and torch's tanh approximation, from the closed forms (Phi(1) = 0.841344746068543 ...).
  const double expected_exact[] = {-0.00404969409489031, -0.15865525393145707, 0.0,
                                   0.34573123063700656,  0.8413447460685429,   1.9544997361036416};
  const double expected_tanh[] = {-0.0036373920817729943, -0.15880800939172324, 0.0,
                                  0.34571400982514394,    0.8411919906082768,   1.954597694087775};
  for (int i = 0; i < 6; ++i) {
    EXPECT_NEAR(exact[i], expected_exact[i], 1e-15) << x[i];
    EXPECT_NEAR(approx[i], expected_tanh[i], 1e-15) << x[i];
  }
}

TEST(ReferenceLayers, GeluDerivativesMatchFiniteDifferences) {
  std::vector<double> x;
  for (double v = -6; v <= 6; v += 0.37) x.push_back(v);
  x.push_back(0.0);
  const Index n = static_cast<Index>(x.size());
  const std::vector<double> ones(x.size(), 1.0);
  using Forward = void (*)(double*, const double*, Index);
  using Backward = void (*)(double*, const double*, const double*, Index);
  const std::vector<std::tuple<const char*, Forward, Backward>> variants = {
      {"erf", reference::gelu_forward<double>, reference::gelu_backward<double>},
      {"tanh", reference::gelu_tanh_forward<double>, reference::gelu_tanh_backward<double>}};
  for (const auto& [name, forward, backward] : variants) {
    std::vector<double> derivative(x.size()), up(x.size()), down(x.size()), xu(x), xd(x);
    backward(derivative.data(), x.data(), ones.data(), n);
    const double h = 1e-5;
    for (double& v : xu) v += h;
    for (double& v : xd) v -= h;
    forward(up.data(), xu.data(), n);
    forward(down.data(), xd.data(), n);
    for (Index i = 0; i < n; ++i) {
      const double fd = (up[i] - down[i]) / (2 * h);
      EXPECT_NEAR(derivative[i], fd, 1e-6 * std::max(1e-3, std::abs(fd))) << name << " at " << x[i];
    }
    // The chain rule's factor is applied: dinp = f'(x) dout.
    const auto dout = random_values(x.size(), 9);
    std::vector<double> scaled(x.size());
    backward(scaled.data(), x.data(), dout.data(), n);
    for (Index i = 0; i < n; ++i) EXPECT_DOUBLE_EQ(scaled[i], derivative[i] * dout[i]);
  }
}

TEST(ReferenceLayers, SameBitsForAnyThreadCountAndBatchSplit) {
  const Index N = 7, C = 515, OC = 301;  // several threads' worth of work, odd sizes
  const auto x = random_values(N * C, 1), W = random_values(OC * C, 2), b = random_values(OC, 3);
  const auto g = random_values(N * OC, 4);
  std::vector<double> out1(N * OC), dx1(N * C);
  reference::linear_forward(out1.data(), x.data(), W.data(), b.data(), N, C, OC, 1);
  reference::linear_backward(dx1.data(), g.data(), W.data(), N, C, OC, 1);
  for (int threads : {2, 3}) {
    std::vector<double> out(N * OC), dx(N * C);
    reference::linear_forward(out.data(), x.data(), W.data(), b.data(), N, C, OC, threads);
    reference::linear_backward(dx.data(), g.data(), W.data(), N, C, OC, threads);
    EXPECT_EQ(out, out1) << threads;
    EXPECT_EQ(dx, dx1) << threads;
  }
  for (Index n = 0; n < N; ++n) {  // one item at a time
    std::vector<double> out(OC), dx(C);
    reference::linear_forward(out.data(), x.data() + n * C, W.data(), b.data(), 1, C, OC, 2);
    reference::linear_backward(dx.data(), g.data() + n * OC, W.data(), 1, C, OC, 2);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), out1.begin() + n * OC)) << n;
    EXPECT_TRUE(std::equal(dx.begin(), dx.end(), dx1.begin() + n * C)) << n;
  }
}

// ---- whole models -------------------------------------------------------------------------------------------------

using Case = std::tuple<std::string, InputSpace>;

class ReferenceModel : public ::testing::TestWithParam<Case> {
 protected:
  ModelSpec spec(DType dtype = DType::f64) const {
    return mlp_spec(std::get<0>(GetParam()), std::get<1>(GetParam()), dtype);
  }
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::get<0>(info.param) + "_" + input_space_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Families, ReferenceModel,
                         ::testing::Combine(::testing::ValuesIn(kFamilies),
                                            ::testing::Values(InputSpace::embedding, InputSpace::vocab)),
                         case_name);

TEST_P(ReferenceModel, OutputShape) {
  const ModelSpec s = spec();
  auto model = make_model(s, weights_for(s));
  const Tensor out = model->forward(random_tensor(DType::f64, input_shape(s, 2), 1));
  const std::int64_t D = s.seq_len * s.n_embd;
  const Shape expected = s.kind == ModelKind::fcnet                 ? Shape{2, 4 * D}
                         : s.kind == ModelKind::fcnet_noninvertible ? Shape{2, D}
                                                                    : Shape{2, s.seq_len, s.n_embd};
  EXPECT_EQ(out.shape(), expected);
  EXPECT_EQ(out.dtype(), DType::f64);
  EXPECT_GT(max_abs(out), 0.0);
}

TEST_P(ReferenceModel, ForwardMatchesAStraightforwardImplementation) {
  // The model written out with plain loops over the weights, item by item.
  const ModelSpec s = spec();
  const auto weights = weights_for(s);
  auto model = make_model(s, weights);
  const Tensor input = random_tensor(DType::f64, input_shape(s, 2), 3);
  const Tensor out = model->forward(input);
  const Index T = s.seq_len, d = s.n_embd, V = s.vocab_size;
  const bool per_token = s.kind == ModelKind::transformer_mlp;
  const Tensor &W1 = weights->get("fc1.weight"), &b1 = weights->get("fc1.bias");
  const Tensor &W2 = weights->get("fc2.weight"), &b2 = weights->get("fc2.bias");
  const Index rows = per_token ? T : 1, in = W1.dim(1), hidden = W1.dim(0), outw = W2.dim(0);
  for (Index b = 0; b < 2; ++b) {
    std::vector<double> x(T * d);
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < d; ++j) {
        if (s.input == InputSpace::embedding) {
          x[t * d + j] = input.get((b * T + t) * d + j);
        } else {
          for (Index k = 0; k < V; ++k)
            x[t * d + j] += input.get((b * T + t) * V + k) * weights->get("wte.weight").get(k * d + j);
        }
      }
    for (Index r = 0; r < rows; ++r)
      for (Index o = 0; o < outw; ++o) {
        double y = b2.get(o);
        for (Index h = 0; h < hidden; ++h) {
          double a = b1.get(h);
          for (Index c = 0; c < in; ++c) a += W1.get(h * in + c) * x[r * in + c];
          y += W2.get(o * hidden + h) * 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
        }
        EXPECT_NEAR(out.get((b * rows + r) * outw + o), y, 1e-13) << b << " " << r << " " << o;
      }
  }
}

TEST_P(ReferenceModel, BackwardMatchesFiniteDifferences) {
  const ModelSpec s = spec();
  auto model = make_model(s, weights_for(s));
  const Tensor x = random_tensor(DType::f64, input_shape(s, 2), 5);
  const Tensor g = random_tensor(DType::f64, model->forward(x).shape(), 6);
  const Tensor grad = model->backward(x, g);
  ASSERT_EQ(grad.shape(), x.shape());
  auto f = [&](const Tensor& v) { return dot(g, model->forward(v)); };
  for (std::uint64_t seed : {7, 8, 9}) {
    const Tensor u = random_tensor(DType::f64, x.shape(), seed);
    const double analytic = dot(grad, u), fd = central_difference(f, x, u);
    EXPECT_GT(std::abs(analytic), 1e-3);
    EXPECT_LT(std::abs(analytic - fd), 1e-6 * std::abs(fd)) << analytic << " vs " << fd;
  }
}

TEST_P(ReferenceModel, FullJacobianMatchesFiniteDifferences) {
  // Tiny sizes, every input and output: backward with each unit grad_output gives a row of the Jacobian.
  ModelSpec s = mlp_spec(std::get<0>(GetParam()), std::get<1>(GetParam()), DType::f64, 3, 2, 7);
  auto model = make_model(s, weights_for(s, 4));
  const Tensor x = random_tensor(DType::f64, input_shape(s, 1), 10);
  const Tensor y = model->forward(x);
  const double h = 1e-5;
  double worst = 0, largest = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    Tensor e(DType::f64, x.shape());
    e.set(i, 1.0);
    const Tensor up = model->forward(axpy(x, h, e)), down = model->forward(axpy(x, -h, e));
    for (std::int64_t o = 0; o < y.numel(); ++o) {
      Tensor unit(DType::f64, y.shape());
      unit.set(o, 1.0);
      const double analytic = model->backward(x, unit).get(i), fd = (up.get(o) - down.get(o)) / (2 * h);
      worst = std::max(worst, std::abs(analytic - fd));
      largest = std::max(largest, std::abs(fd));
    }
  }
  EXPECT_GT(largest, 1e-3);  // wte's entries are ~0.02, so vocab-space derivatives are small
  EXPECT_LT(worst, 1e-6 * largest);
}

TEST_P(ReferenceModel, LossAndGradIsForwardMetricBackward) {
  const ModelSpec s = spec();
  auto model = make_model(s, weights_for(s));
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
    const double analytic = dot(fused.grad, u), fd = central_difference(loss_sum, x, u, 1e-6);
    EXPECT_LT(std::abs(analytic - fd), 1e-6 * std::abs(fd)) << metric_name(metric) << ": " << analytic << " vs " << fd;
  }
}

TEST_P(ReferenceModel, BatchEqualsOneByOneExactly) {
  for (DType dtype : {DType::f64, DType::f32}) {
    ModelSpec s = mlp_spec(std::get<0>(GetParam()), std::get<1>(GetParam()), dtype, 16, 4, 60);
    auto model = make_model(s, weights_for(s), 2);
    for (std::int64_t B : {3, 5}) {
      const Tensor x = random_tensor(dtype, input_shape(s, B), 20 + B);
      const Tensor y = model->forward(x);
      const Tensor g = random_tensor(dtype, y.shape(), 30 + B);
      const Tensor grad = model->backward(x, g);
      const Tensor target = y.slice0(0, 1);
      const LossAndGrad lg = model->loss_and_grad(x, random_tensor(dtype, target.shape(), 40), Metric::l2);
      for (std::int64_t b = 0; b < B; ++b) {
        const Tensor xb = x.slice0(b, b + 1);
        EXPECT_TRUE(same_bytes(model->forward(xb), y.slice0(b, b + 1))) << dtype_name(dtype) << " B=" << B << " " << b;
        EXPECT_TRUE(same_bytes(model->backward(xb, g.slice0(b, b + 1)), grad.slice0(b, b + 1)))
            << dtype_name(dtype) << " B=" << B << " " << b;
        const LossAndGrad one = model->loss_and_grad(xb, random_tensor(dtype, target.shape(), 40), Metric::l2);
        EXPECT_EQ(one.loss[0], lg.loss[b]);
        EXPECT_TRUE(same_bytes(one.grad, lg.grad.slice0(b, b + 1)));
      }
    }
  }
}

TEST_P(ReferenceModel, SameBitsForAnyThreadCount) {
  // Big enough that every product is split between threads (transformer_mlp: 8 rows x 64 x 256).
  ModelSpec s = mlp_spec(std::get<0>(GetParam()), std::get<1>(GetParam()), DType::f32, 64, 4, 300);
  const auto weights = weights_for(s);
  const Tensor x = random_tensor(DType::f32, input_shape(s, 2), 50);
  auto one = make_model(s, weights, 1);
  const Tensor y = one->forward(x);
  const Tensor grad = one->backward(x, y);
  for (int threads : {2, 3}) {
    auto many = make_model(s, weights, threads);
    EXPECT_TRUE(same_bytes(many->forward(x), y)) << threads;
    EXPECT_TRUE(same_bytes(many->backward(x, y), grad)) << threads;
  }
}

TEST_P(ReferenceModel, F32AgreesWithF64) {
  const ModelSpec s64 = spec(DType::f64), s32 = spec(DType::f32);
  const auto weights = weights_for(s64);  // f64: the f32 model converts them
  auto m64 = make_model(s64, weights), m32 = make_model(s32, weights);
  const Tensor x64 = random_tensor(DType::f64, input_shape(s64, 2), 60);
  const Tensor x32 = x64.to(DType::f32);
  const Tensor y64 = m64->forward(x64), y32 = m32->forward(x32);
  EXPECT_EQ(y32.dtype(), DType::f32);
  EXPECT_LT(relative_difference(y32, y64), 1e-5);
  const Tensor g64 = random_tensor(DType::f64, y64.shape(), 61);
  const Tensor grad64 = m64->backward(x64, g64), grad32 = m32->backward(x32, g64.to(DType::f32));
  EXPECT_EQ(grad32.dtype(), DType::f32);
  EXPECT_LT(relative_difference(grad32, grad64), 1e-5);
  EXPECT_GT(relative_difference(grad32, grad64), 0.0);  // it did compute in f32
  // Weights already in f32 give the same bits as converted ones.
  auto m32_native = make_model(s32, std::make_shared<const WeightSet>(schema_weights(s32, 1, DType::f32)));
  EXPECT_TRUE(same_bytes(m32_native->forward(x32), y32));
  // An input in another dtype is converted, and its gradient comes back in the input's dtype.
  const Tensor grad_mixed = m32->backward(x64, g64.to(DType::f32));
  EXPECT_EQ(grad_mixed.dtype(), DType::f64);
  EXPECT_TRUE(same_bytes(grad_mixed, grad32.to(DType::f64)));
}

TEST_P(ReferenceModel, BackwardAfterAnotherForwardRecomputes) {
  const ModelSpec s = spec();
  auto model = make_model(s, weights_for(s));
  const Tensor x = random_tensor(DType::f64, input_shape(s, 2), 70), other = random_tensor(DType::f64, x.shape(), 71);
  const Tensor g = random_tensor(DType::f64, model->forward(x).shape(), 72);
  const Tensor after_own = model->backward(x, g);  // saved activations of x
  model->forward(other);
  EXPECT_TRUE(same_bytes(model->backward(x, g), after_own));
  auto fresh = make_model(s, weights_for(s));  // no forward at all before
  EXPECT_TRUE(same_bytes(fresh->backward(x, g), after_own));
  EXPECT_FALSE(same_bytes(fresh->backward(other, g), after_own));
}

// ---- backend and errors -------------------------------------------------------------------------------------------

TEST(ReferenceBackend, Info) {
  const BackendInfo info = ReferenceBackend().info();
  EXPECT_EQ(info.kinds, (std::vector<ModelKind>{ModelKind::decoder, ModelKind::fcnet, ModelKind::fcnet_noninvertible,
                                                ModelKind::transformer_mlp}));
  // Every feature of architecture.hpp: the reference computes every architecture.
  namespace f = feature;
  for (const char* name : {f::layer_norm, f::layer_norm_no_bias, f::rms_norm, f::learned_positions, f::rotary,
                           f::partial_rotary, f::grouped_kv, f::head_dim, f::gelu_tanh, f::gelu_erf, f::swiglu,
                           f::parallel_residual, f::untied_head, f::extra_layers, f::vocab_input, f::prefix_cache})
    EXPECT_NE(std::find(info.features.begin(), info.features.end(), name), info.features.end()) << name;
  EXPECT_EQ(info.dtypes, (std::vector<DType>{DType::f64, DType::f32}));
  EXPECT_EQ(info.devices, (std::vector<std::string>{"cpu"}));
}

TEST(ReferenceBackend, ConfigureReadsThreads) {
  ReferenceBackend backend;
  Options options("backend", "x.ini", {{"threads", "3"}});
  backend.configure(options);
  EXPECT_EQ(backend.threads(), 3);
  EXPECT_TRUE(options.unread_keys().empty());
  ReferenceBackend defaults;
  defaults.configure(Options("backend", "x.ini", {}));
  EXPECT_EQ(defaults.threads(), 0);
  for (const char* bad : {"-1", "two"}) {
    const std::string message = error_of([&] {
      ReferenceBackend().configure(Options("backend", "x.ini", {{"threads", bad}}));
    });
    EXPECT_TRUE(contains(message, "threads") && contains(message, bad)) << message;
  }
}

TEST(ReferenceBackend, UnsupportedKindDtypeDevice) {
  const ModelSpec good = mlp_spec("fcnet", InputSpace::embedding);
  const auto weights = weights_for(good);
  ModelSpec s = good;
  // The family is a label: the kind decides what is built.
  s.family = "my_own_label";
  const Tensor x = random_tensor(DType::f64, input_shape(s, 2), 90);
  EXPECT_TRUE(same_bytes(make_model(s, weights)->forward(x), make_model(good, weights)->forward(x)));
  s.kind = static_cast<ModelKind>(99);
  std::string message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "kind")) << message;
  s = good;
  s.dtype = DType::bf16;
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "'bf16'") && contains(message, "f64, f32")) << message;
  s = good;
  s.device = "cuda";
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "'cuda'") && contains(message, "cpu")) << message;
  s = good;
  s.seq_len = 0;
  message = error_of([&] { make_model(s, weights); });
  EXPECT_TRUE(contains(message, "seq_len")) << message;
  EXPECT_TRUE(contains(error_of([&] { make_model(good, nullptr); }), "no weights"));
}

TEST(ReferenceBackend, WrongInputShapeNamesBothShapes) {
  const ModelSpec s = mlp_spec("fcnet", InputSpace::embedding);
  auto model = make_model(s, weights_for(s));
  std::string message = error_of([&] { model->forward(Tensor(DType::f64, {1, 4, 8})); });
  EXPECT_TRUE(contains(message, "[1, 4, 8]") && contains(message, "[B, 3, 8]")) << message;
  message = error_of([&] { model->forward(Tensor(DType::f64, {3, 8})); });
  EXPECT_TRUE(contains(message, "[3, 8]") && contains(message, "[B, 3, 8]")) << message;
  const Tensor x(DType::f64, {2, 3, 8});
  message = error_of([&] { model->backward(x, Tensor(DType::f64, {1, 96})); });
  EXPECT_TRUE(contains(message, "[1, 96]") && contains(message, "[2, 96]")) << message;
  message = error_of([&] { model->backward(Tensor(DType::f64, {2, 3, 50}), Tensor(DType::f64, {2, 96})); });
  EXPECT_TRUE(contains(message, "[2, 3, 50]") && contains(message, "[B, 3, 8]")) << message;

  ModelSpec vocab = s;
  vocab.input = InputSpace::vocab;
  auto vmodel = make_model(vocab, weights_for(vocab));
  message = error_of([&] { vmodel->forward(Tensor(DType::f64, {1, 3, 8})); });
  EXPECT_TRUE(contains(message, "[1, 3, 8]") && contains(message, "[B, 3, 50]")) << message;
}

TEST(ReferenceBackend, MissingOrMisshapedWeights) {
  const ModelSpec s = mlp_spec("fcnet", InputSpace::embedding);
  const WeightSet full = schema_weights(s, 0);
  auto without = [&](const std::string& skip) {
    auto w = std::make_shared<WeightSet>();
    for (const auto& [name, tensor] : full.tensors())
      if (name != skip) w->set(name, tensor);
    return w;
  };
  std::string message = error_of([&] { make_model(s, without("fc2.bias")); });
  EXPECT_TRUE(contains(message, "'fc2.bias'") && contains(message, "[96]")) << message;

  auto misshaped = without("");
  misshaped->set("fc1.weight", Tensor(DType::f64, {24, 96}));  // transposed
  message = error_of([&] { make_model(s, misshaped); });
  EXPECT_TRUE(contains(message, "'fc1.weight'") && contains(message, "[24, 96]") && contains(message, "[96, 24]"))
      << message;

  // wte is needed for vocab inputs only.
  EXPECT_NO_THROW(make_model(s, without("wte.weight")));
  ModelSpec vocab = s;
  vocab.input = InputSpace::vocab;
  message = error_of([&] { make_model(vocab, without("wte.weight")); });
  EXPECT_TRUE(contains(message, "'wte.weight'") && contains(message, "[50, 8]")) << message;

  // Weights for another seq_len do not fit: fc1 is [4 T d, T d].
  ModelSpec longer = s;
  longer.seq_len = 4;
  message = error_of([&] { make_model(longer, std::make_shared<const WeightSet>(full)); });
  EXPECT_TRUE(contains(message, "'fc1.weight'") && contains(message, "[96, 24]") && contains(message, "[128, 32]"))
      << message;
}

TEST(ReferenceBackend, TransformerMlpTakesAnyLengthUpToNPositions) {
  // One model, calls of several lengths: each equals a fresh model built with that seq_len, bit for bit.
  ModelSpec s = mlp_spec("transformer_mlp", InputSpace::vocab);
  s.n_positions = 8;
  const auto weights = weights_for(s);
  auto model = make_model(s, weights);
  for (std::int64_t T : {2, 7, 2, 8, 1}) {
    ModelSpec at = s;
    at.seq_len = T;
    auto fresh = make_model(at, weights);
    const Tensor x = random_tensor(DType::f64, input_shape(at, 2), 100 + T);
    const Tensor y = model->forward(x);
    ASSERT_EQ(y.shape(), (Shape{2, T, s.n_embd}));
    EXPECT_TRUE(same_bytes(y, fresh->forward(x))) << T;
    const Tensor g = random_tensor(DType::f64, y.shape(), 200 + T);
    EXPECT_TRUE(same_bytes(model->backward(x, g), fresh->backward(x, g))) << T;
  }
  const std::string message = error_of([&] { model->forward(Tensor(DType::f64, {1, 9, 50})); });
  EXPECT_TRUE(contains(message, "[1, 9, 50]") && contains(message, "T in 1 .. 8")) << message;
}

}  // namespace
}  // namespace lminv
