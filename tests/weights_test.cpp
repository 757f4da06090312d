// Seeded random weights: shapes, reproducibility, independence of streams and threads, statistics, golden values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

ModelSpec mlp_spec(const std::string& family, std::int64_t d = 8, std::int64_t T = 3, std::int64_t V = 50) {
  ModelSpec spec;
  spec.family = family;
  spec.n_embd = d;
  spec.seq_len = T;
  spec.vocab_size = V;
  return spec;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

bool same_bytes(const WeightSet& a, const WeightSet& b) {
  if (a.names() != b.names()) return false;
  for (const std::string& name : a.names())
    if (!same_bytes(a.get(name), b.get(name))) return false;
  return true;
}

TEST(WeightsInit, ShapesOfFcnet) {
  const WeightSet w = init_random_weights(mlp_spec("fcnet", 8, 3, 50), 0);
  EXPECT_EQ(w.names(), (std::vector<std::string>{"fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "wte.weight"}));
  EXPECT_EQ(w.get("wte.weight").shape(), (Shape{50, 8}));
  EXPECT_EQ(w.get("fc1.weight").shape(), (Shape{96, 24}));
  EXPECT_EQ(w.get("fc1.bias").shape(), (Shape{96}));
  EXPECT_EQ(w.get("fc2.weight").shape(), (Shape{96, 96}));
  EXPECT_EQ(w.get("fc2.bias").shape(), (Shape{96}));
  EXPECT_EQ(w.get("fc2.weight").dtype(), DType::f64);
}

TEST(WeightsInit, ShapesOfFcnetNoninvertible) {
  const WeightSet w = init_random_weights(mlp_spec("fcnet_noninvertible", 8, 3, 50), 0);
  EXPECT_EQ(w.get("fc1.weight").shape(), (Shape{96, 24}));
  EXPECT_EQ(w.get("fc2.weight").shape(), (Shape{24, 96}));
  EXPECT_EQ(w.get("fc2.bias").shape(), (Shape{24}));
}

TEST(WeightsInit, ShapesOfTransformerMlp) {
  ModelSpec spec = mlp_spec("transformer_mlp", 8, 3, 50);
  WeightSet w = init_random_weights(spec, 0);
  EXPECT_EQ(w.get("wte.weight").shape(), (Shape{50, 8}));
  EXPECT_EQ(w.get("fc1.weight").shape(), (Shape{32, 8}));
  EXPECT_EQ(w.get("fc1.bias").shape(), (Shape{32}));
  EXPECT_EQ(w.get("fc2.weight").shape(), (Shape{8, 32}));
  EXPECT_EQ(w.get("fc2.bias").shape(), (Shape{8}));
  spec.n_inner = 20;  // the width follows n_inner when given
  w = init_random_weights(spec, 0);
  EXPECT_EQ(w.get("fc1.weight").shape(), (Shape{20, 8}));
  EXPECT_EQ(w.get("fc2.weight").shape(), (Shape{8, 20}));
}

TEST(WeightsInit, DtypeIsTheSpecsAndF32IsRoundedF64) {
  ModelSpec spec = mlp_spec("fcnet");
  const WeightSet w64 = init_random_weights(spec, 5);
  spec.dtype = DType::f32;
  const WeightSet w32 = init_random_weights(spec, 5);
  spec.dtype = DType::bf16;
  const WeightSet w16 = init_random_weights(spec, 5);
  for (const std::string& name : w64.names()) {
    const Tensor& a = w64.get(name);
    ASSERT_EQ(w32.get(name).dtype(), DType::f32);
    ASSERT_EQ(w16.get(name).dtype(), DType::bf16);
    for (std::int64_t i = 0; i < a.numel(); ++i) {
      ASSERT_EQ(w32.get(name).data<float>()[i], static_cast<float>(a.data<double>()[i])) << name << " " << i;
      ASSERT_EQ(w16.get(name).data<bf16>()[i].bits, bf16::from_float(static_cast<float>(a.data<double>()[i])).bits);
    }
  }
}

TEST(WeightsInit, SameSeedSameBytesOtherSeedOtherBytes) {
  const ModelSpec spec = mlp_spec("fcnet");
  const WeightSet a = init_random_weights(spec, 42), b = init_random_weights(spec, 42);
  const WeightSet c = init_random_weights(spec, 43);
  EXPECT_TRUE(same_bytes(a, b));
  for (const std::string& name : a.names()) EXPECT_FALSE(same_bytes(a.get(name), c.get(name))) << name;
}

TEST(WeightsInit, TensorsDrawFromTheirOwnStreams) {
  // A bigger vocabulary adds rows to wte and changes no other tensor; wte's first rows stay as they were.
  const WeightSet small = init_random_weights(mlp_spec("fcnet", 8, 3, 50), 7);
  const WeightSet big = init_random_weights(mlp_spec("fcnet", 8, 3, 5000), 7);
  for (const char* name : {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})
    EXPECT_TRUE(same_bytes(small.get(name), big.get(name))) << name;
  EXPECT_EQ(std::memcmp(small.get("wte.weight").raw(), big.get("wte.weight").raw(), small.get("wte.weight").nbytes()),
            0);
  // fc1 has the same name and shape in both fcnet variants, so the same values.
  const WeightSet other = init_random_weights(mlp_spec("fcnet_noninvertible", 8, 3, 50), 7);
  EXPECT_TRUE(same_bytes(small.get("fc1.weight"), other.get("fc1.weight")));
  EXPECT_TRUE(same_bytes(small.get("wte.weight"), other.get("wte.weight")));
  // Weight and bias of a layer are different streams, not the same numbers.
  EXPECT_NE(small.get("fc2.weight").get(0), small.get("fc2.bias").get(0));
}

TEST(WeightsInit, ChunksAreForkedStreams) {
  // The documented scheme: chunk c of tensor `name` draws from Rng(seed).fork(name).fork("chunk c").
  const Tensor t = random_normal(Rng(3), "x", DType::f64, {kInitChunkSize + 10}, 0.5);
  Rng chunk0 = Rng(3).fork("x").fork("chunk 0");
  Rng chunk1 = Rng(3).fork("x").fork("chunk 1");
  EXPECT_EQ(t.get(0), 0.5 * chunk0.normal());
  EXPECT_EQ(t.get(1), 0.5 * chunk0.normal());
  EXPECT_EQ(t.get(kInitChunkSize), 0.5 * chunk1.normal());
  EXPECT_EQ(t.get(kInitChunkSize + 1), 0.5 * chunk1.normal());
}

TEST(WeightsInit, ResultDoesNotDependOnThreadCount) {
  const ModelSpec spec = mlp_spec("fcnet", 64, 4, 3000);  // fc2 [1024, 1024] is 16 chunks, wte [3000, 64] 3
  const WeightSet one = init_random_weights(spec, 11, 1);
  EXPECT_GT(one.get("fc2.weight").numel(), 8 * kInitChunkSize);
  for (int threads : {2, 3, 0}) EXPECT_TRUE(same_bytes(one, init_random_weights(spec, 11, threads))) << threads;
}

TEST(WeightsInit, EmbeddingIsNormalWithStd002) {
  const WeightSet w = init_random_weights(mlp_spec("transformer_mlp", 64, 3, 4000), 1);
  const Tensor& wte = w.get("wte.weight");
  const double n = static_cast<double>(wte.numel());
  double sum = 0, sum2 = 0, within1 = 0, within2 = 0;
  for (std::int64_t i = 0; i < wte.numel(); ++i) {
    const double x = wte.get(i);
    sum += x;
    sum2 += x * x;
    within1 += std::abs(x) < 0.02;
    within2 += std::abs(x) < 0.04;
  }
  const double mean = sum / n, std = std::sqrt(sum2 / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 5 * 0.02 / std::sqrt(n));
  EXPECT_NEAR(std, 0.02, 0.02 * 0.01);  // 7 times the estimate's own relative error, 1/sqrt(2 n)
  EXPECT_NEAR(within1 / n, 0.682689, 0.005);
  EXPECT_NEAR(within2 / n, 0.954500, 0.003);
}

TEST(WeightsInit, LinearLayersAreUniformInTorchsBound) {
  const WeightSet w = init_random_weights(mlp_spec("fcnet", 32, 4, 10), 2);  // fc1 [512, 128], fc2 [512, 512]
  for (const auto& [name, fan_in] : std::vector<std::pair<std::string, double>>{
           {"fc1.weight", 128}, {"fc2.weight", 512}, {"fc1.bias", 128}, {"fc2.bias", 512}}) {
    const Tensor& t = w.get(name);
    const double bound = 1 / std::sqrt(fan_in);
    const double n = static_cast<double>(t.numel());
    std::vector<double> bins(10, 0);
    double sum = 0, sum2 = 0, largest = 0;
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const double x = t.get(i);
      ASSERT_LE(std::abs(x), bound) << name << " " << i;
      largest = std::max(largest, std::abs(x));
      sum += x;
      sum2 += x * x;
      bins[std::min<std::size_t>(9, static_cast<std::size_t>((x + bound) / (2 * bound) * 10))] += 1;
    }
    EXPECT_GT(largest, 0.9 * bound) << name;  // the whole range is used
    EXPECT_NEAR(sum / n, 0.0, 5 * bound / std::sqrt(3 * n)) << name;
    EXPECT_NEAR(sum2 / n, bound * bound / 3, 5 * bound * bound * 0.3 / std::sqrt(n)) << name;
    if (n >= 10000) {  // each bin holds n/10 +- sqrt(0.09 n): allow five of those
      for (double b : bins) EXPECT_NEAR(b, n / 10, 5 * std::sqrt(0.09 * n)) << name;
    }
  }
}

TEST(WeightsInit, GoldenValuesOfSeed0) {
  // Written once from this implementation; any change of the generator, the stream names or the initialisation,
  // or any platform that rounds differently, fails here.
  const WeightSet w = init_random_weights(mlp_spec("fcnet", 8, 3, 50), 0);
  const double* wte = w.get("wte.weight").data<double>();
  const double expected[] = {-0x1.cd6a86e5fd5eep-6,  -0x1.d73f79fc150c4p-9, 0x1.c824ef74576b6p-7,
                             -0x1.269cd91ef410fp-8,  0x1.2e2b1ebc9971ep-7,  -0x1.67ca9cbab4ebcp-5,
                             -0x1.00ca65131da7ap-10, 0x1.75492d6bbb3d2p-5};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(wte[i], expected[i]) << "wte.weight[" << i << "]";
  // fc1 is [96, 24]: bound 1/sqrt(24).
  const double* fc1 = w.get("fc1.weight").data<double>();
  const double expected_fc1[] = {-0x1.ab18a58f59d84p-5, -0x1.02eb454c19a73p-3, 0x1.bf53f1d1b7071p-5,
                                 -0x1.e88030b5efc1dp-5};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(fc1[i], expected_fc1[i]) << "fc1.weight[" << i << "]";
}

TEST(WeightsInit, UnsupportedFamilyIsAnErrorNamingIt) {
  for (const char* family : {"gpt2", "resnet"}) {
    try {
      init_random_weights(mlp_spec(family), 0);
      FAIL() << family << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + family + "'"), std::string::npos) << e.what();
    }
  }
}

TEST(WeightsInit, FcnetWithoutSeqLenIsAnError) {
  ModelSpec spec = mlp_spec("fcnet");
  spec.seq_len = 0;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
  spec.family = "transformer_mlp";  // per-token sizes: seq_len is not needed
  EXPECT_NO_THROW(init_random_weights(spec, 0));
  spec.n_embd = 0;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
}

}  // namespace
}  // namespace lminv
