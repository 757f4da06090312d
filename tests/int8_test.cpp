// Int8 block weights (ModelSpec::weight_dtype = int8, plugins/common/int8_weights.hpp):
//   - the quantisation itself: the round trip of a weight (every integer in [-127, 127], each column's absmax at
//     +-127, every dequantised value within half a scale step of the weight), ties to even, zero columns, and the
//     error for a non-finite weight;
//   - every backend built here, in f32: an int8 model computes what the same model computes on the dequantised f32
//     weights (forward, and loss_and_grad's input gradient), to rounding;
//   - and against the unquantised model (the reference in f64): the quantisation moves the output, by more than f32
//     rounding and by no more than the int8 tolerance below.
// The conformance suite (conformance_test.cpp) runs the int8 cases against the reference's own int8 model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "int8_weights.hpp"
#include "lminv/lminv.hpp"
#include "registry.hpp"
#include "test_backends.hpp"

using namespace lminv;

namespace {

// ---- the quantisation -------------------------------------------------------------------------------------------

Tensor random_matrix(std::int64_t in, std::int64_t out, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> v(static_cast<std::size_t>(in * out));
  for (std::int64_t i = 0; i < in; ++i)
    for (std::int64_t o = 0; o < out; ++o)
      v[i * out + o] = normal(rng) * std::pow(10.0, -3.0 + 5.0 * static_cast<double>(o) / out);  // 1e-3 .. 1e2
  return Tensor::from<double>({in, out}, v);
}

TEST(Int8Quantise, RoundTripIsWithinHalfAStepAndUsesTheFullRange) {
  const std::int64_t in = 37, out = 23;
  const Tensor w = random_matrix(in, out, 7);
  const int8::Matrix m = int8::quantise(w, "h.0.mlp.c_fc.weight");
  ASSERT_EQ(m.in, in);
  ASSERT_EQ(m.out, out);
  ASSERT_EQ(m.q.size(), static_cast<std::size_t>(in * out));
  ASSERT_EQ(m.scale.size(), static_cast<std::size_t>(out));
  for (std::int64_t o = 0; o < out; ++o) {
    double absmax = 0;
    int widest = 0;
    for (std::int64_t i = 0; i < in; ++i) {
      absmax = std::max(absmax, std::abs(w.get(i * out + o)));
      const int q = m.q[i * out + o];
      EXPECT_GE(q, -127);
      EXPECT_LE(q, 127);
      widest = std::max(widest, std::abs(q));
    }
    EXPECT_DOUBLE_EQ(m.scale[o], absmax / 127) << "column " << o;
    EXPECT_EQ(widest, 127) << "column " << o << ": its absmax element is not at +-127";
    for (std::int64_t i = 0; i < in; ++i) {
      const double err = std::abs(m.dequantised<double>(i, o) - w.get(i * out + o));
      EXPECT_LE(err, 0.5 * m.scale[o] * (1 + 1e-12)) << "at [" << i << ", " << o << "]";
    }
  }
  // dequantise() and dequantised_tensor() give the same values, in either orientation.
  std::vector<double> plain(static_cast<std::size_t>(in * out)), transposed(plain.size());
  m.dequantise(plain.data());
  m.dequantise(transposed.data(), /*transposed=*/true);
  const Tensor as_f32 = int8::dequantised_tensor(m, DType::f32);
  for (std::int64_t i = 0; i < in; ++i)
    for (std::int64_t o = 0; o < out; ++o) {
      EXPECT_EQ(plain[i * out + o], m.dequantised<double>(i, o));
      EXPECT_EQ(transposed[o * in + i], m.dequantised<double>(i, o));
      EXPECT_EQ(as_f32.data<float>()[i * out + o], m.dequantised<float>(i, o));
    }
}

TEST(Int8Quantise, RoundsHalfToEvenAndKeepsZeroColumnsZero) {
  // Column 0 has absmax 127, so its scale is 1 and the other entries are their own quotients; column 1 is zero.
  const Tensor w = Tensor::from<double>({5, 2}, {127, 0, 0.5, 0, 1.5, 0, 2.5, 0, -2.5, 0});
  const int8::Matrix m = int8::quantise(w, "h.0.attn.c_attn.weight");
  EXPECT_EQ(m.scale[0], 1.0);
  EXPECT_EQ(m.scale[1], 0.0);
  const std::vector<int> want{127, 0, 2, 2, -2};
  for (std::int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(m.q[i * 2], want[i]) << "row " << i;
    EXPECT_EQ(m.q[i * 2 + 1], 0);
    EXPECT_EQ(m.dequantised<double>(i, 1), 0.0);
  }
}

TEST(Int8Quantise, NonFiniteWeightIsAnErrorNamingTheTensorAndIndex) {
  Tensor w = random_matrix(4, 3, 1);
  w.set(1 * 3 + 2, std::nan(""));
  try {
    int8::quantise(w, "h.2.mlp.c_proj.weight");
    FAIL() << "no error for a NaN weight";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("h.2.mlp.c_proj.weight"), std::string::npos) << what;
    EXPECT_NE(what.find("[1, 2]"), std::string::npos) << what;
  }
}

TEST(Int8Quantise, QuantisesTheFourBlockMatricesOnly) {
  for (const char* name : {"h.0.attn.c_attn.weight", "h.11.attn.c_proj.weight", "h.3.mlp.c_fc.weight",
                           "h.47.mlp.c_proj.weight"})
    EXPECT_TRUE(int8::quantised(name)) << name;
  for (const char* name : {"wte.weight", "wpe.weight", "lm_head.weight", "h.0.attn.c_attn.bias", "h.0.ln_1.weight",
                           "h.0.mlp.c_proj.bias", "ln_f.weight", "attn.c_attn.weight"})
    EXPECT_FALSE(int8::quantised(name)) << name;
}

// ---- the backends -------------------------------------------------------------------------------------------------

const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

std::shared_ptr<Backend> backend(const std::string& name) {
  std::shared_ptr<Backend> b = registry().create_backend(name);
  b->configure(Options("backend", "int8_test", {{"threads", "1"}}));
  return b;
}

// A GPT-2-like decoder (3 blocks, 4 heads of 8, lm_head) or llama's setting on the same sizes.
ModelSpec small_decoder(bool llama) {
  ModelSpec s;
  s.family = llama ? "llama" : "gpt2";
  s.n_layer = 3;
  s.n_embd = 32;
  s.n_head = 4;
  s.n_inner = 48;
  s.vocab_size = 40;
  s.n_positions = 16;
  s.seq_len = 5;
  s.blocks = 3;
  s.head = Head::lm_head;
  if (llama) {
    Architecture& a = s.arch;
    a.norm = Norm::rms_norm;
    a.norm_bias = false;
    a.norm_eps = 1e-6;
    a.positions = Positions::rotary;
    a.n_kv_head = 2;
    a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;
    a.mlp = Mlp::swiglu;
    a.tied_head = false;
  }
  return s;
}

// Seeded f64 weights: matrices N(0, 1 / fan_in), norm weights N(1, 0.2^2), biases N(0, 0.05^2), wte N(0, 0.3^2).
std::shared_ptr<WeightSet> weights_for(const ModelSpec& spec) {
  auto w = std::make_shared<WeightSet>();
  std::mt19937_64 rng(20261203);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const TensorSpec& t : weight_schema(spec)) {
    std::int64_t n = 1;
    for (std::int64_t d : t.shape) n *= d;
    const bool vector = t.shape.size() == 1, bias = t.name.find(".bias") != std::string::npos;
    const double mean = vector && !bias ? 1.0 : 0.0;
    const double std = vector ? (bias ? 0.05 : 0.2)
                       : t.name == "wte.weight" || t.name == "lm_head.weight" ? 0.3
                                                                              : 1.0 / std::sqrt(t.shape[0]);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (double& x : v) x = mean + std * normal(rng);
    w->set(t.name, Tensor::from<double>(t.shape, v));
  }
  return w;
}

// The weights with the four block matrices replaced by their dequantised f32 values, everything else in f32.
std::shared_ptr<WeightSet> dequantised_f32(const WeightSet& w) {
  auto out = std::make_shared<WeightSet>();
  for (const std::string& name : w.names())
    out->set(name, int8::quantised(name) ? int8::dequantised_tensor(int8::quantise(w.get(name), name), DType::f32)
                                         : w.get(name).to(DType::f32));
  return out;
}

// B prompts: B T rows through every product (2: 10 rows, the streaming kernels' few rows, which the plain f32 weights
// of the torch backend leave to oneDNN from 9 on; 5: beyond kSkinnyRows, where the weight is dequantised for a GEMM).
Tensor input_for(const ModelSpec& spec, std::int64_t B = 2) {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> v(static_cast<std::size_t>(B * spec.seq_len * spec.n_embd));
  for (float& x : v) x = static_cast<float>(0.5 * normal(rng));
  return Tensor::from<float>({B, spec.seq_len, spec.n_embd}, v);
}

// max |a - b| / max |b|.
double normalised_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double diff = 0, scale = 0;
  for (std::int64_t i = 0; i < b.numel(); ++i) {
    diff = std::max(diff, std::abs(a.get(i) - b.get(i)));
    scale = std::max(scale, std::abs(b.get(i)));
  }
  return scale > 0 ? diff / scale : diff;
}

// How far int8 block weights may move these models' outputs (normalised error against the unquantised f64 model):
// each weight moves by at most half of its column's step absmax / 127, about 1.4% of a N(0, 1 / fan_in) column's
// absmax of ~3.5 sigma; a product's error is a sum of fan_in such independent errors, of relative size ~0.4%, and
// three blocks and the head compound it. 3e-2 is twice the largest seen here (1.5e-2, GPT-2's setting;
// llama's 1.3e-2).
constexpr double kInt8Tolerance = 3e-2;
// f32 rounding of a different order of operations, on these sizes (the conformance suite allows 1e-4).
constexpr double kF32Tolerance = 1e-5;

struct Int8Case {
  std::string backend;
  bool llama;
};

std::vector<Int8Case> all_cases() {
  std::vector<Int8Case> out;
  for (const std::string& b : test::backends_under_test())
    for (bool llama : {false, true}) out.push_back({b, llama});
  return out;
}

void PrintTo(const Int8Case& c, std::ostream* os) { *os << c.backend << (c.llama ? " llama" : " gpt2"); }

class Int8Backend : public testing::TestWithParam<Int8Case> {};

TEST_P(Int8Backend, EqualsTheModelOnDequantisedWeights) {
  const Int8Case& c = GetParam();
  const std::shared_ptr<Backend> b = backend(c.backend);
  ModelSpec spec = small_decoder(c.llama);
  spec.dtype = DType::f32;
  const auto weights = weights_for(spec);
  ModelSpec int8_spec = spec;
  int8_spec.weight_dtype = WeightDType::int8;
  std::unique_ptr<Model> quantised = b->create_model(int8_spec, weights);
  std::unique_ptr<Model> plain = b->create_model(spec, dequantised_f32(*weights));
  for (std::int64_t B : {2, 5}) {
    SCOPED_TRACE("batch " + std::to_string(B));
    const Tensor x = input_for(spec, B);
    const Tensor y_q = quantised->forward(x), y = plain->forward(x);
    const double forward_error = normalised_error(y_q, y);
    // The same target for both: the plain model's output at a moved input. Moved by a pattern, not a constant: a
    // constant shift of every element is removed by GPT-2's first layer norm, which left a loss of f32 rounding
    // (~1e-6) whose gradients only bit-identical products could match.
    Tensor shifted = x;
    for (std::int64_t i = 0; i < shifted.numel(); ++i) shifted.set(i, x.get(i) + (i % 3 == 0 ? 0.1 : -0.05));
    const Tensor target = plain->forward(shifted);
    const LossAndGrad g_q = quantised->loss_and_grad(x, target, Metric::l2);
    const LossAndGrad g = plain->loss_and_grad(x, target, Metric::l2);
    const double grad_error = normalised_error(g_q.grad, g.grad);
    if (c.backend == "reference") {  // the same loops on the same f32 values
      EXPECT_EQ(forward_error, 0.0);
      EXPECT_EQ(grad_error, 0.0);
  }
  EXPECT_LE(forward_error, kF32Tolerance);
  EXPECT_LE(grad_error, kF32Tolerance);
  for (std::size_t i = 0; i < g.loss.size(); ++i) EXPECT_NEAR(g_q.loss[i], g.loss[i], 1e-5 * std::abs(g.loss[i]));
  }
}

TEST_P(Int8Backend, StaysWithinTheInt8ToleranceOfTheUnquantisedModel) {
  const Int8Case& c = GetParam();
  ModelSpec spec = small_decoder(c.llama);
  const auto weights = weights_for(spec);
  std::unique_ptr<Model> truth = backend("reference")->create_model(spec, weights);  // f64, unquantised
  spec.dtype = DType::f32;
  spec.weight_dtype = WeightDType::int8;
  std::unique_ptr<Model> quantised = backend(c.backend)->create_model(spec, weights);
  const Tensor x = input_for(spec);
  const double error = normalised_error(quantised->forward(x), truth->forward(x.to(DType::f64)));
  RecordProperty("int8_error", std::to_string(error));
  EXPECT_LE(error, kInt8Tolerance);
  EXPECT_GT(error, 100 * kF32Tolerance) << "the int8 model computes what the unquantised one does: not quantised";
}

std::string case_name(const testing::TestParamInfo<Int8Case>& info) {
  return info.param.backend + (info.param.llama ? "_llama" : "_gpt2");
}

INSTANTIATE_TEST_SUITE_P(Backends, Int8Backend, testing::ValuesIn(all_cases()), case_name);

}  // namespace
