// Seeded random weights: shapes, reproducibility, independence of streams and threads, statistics, golden values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

ModelSpec mlp_spec(const std::string& family, std::int64_t d = 8, std::int64_t T = 3, std::int64_t V = 50) {
  ModelSpec spec;
  spec.family = family;
  if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
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

TEST(WeightsInit, NormalsAreRngNormalBitForBit) {
  // random_normal computes Rng::normal's values in batches: every value, in every chunk (the last one odd-sized),
  // is the one the plain generator gives, times the scale, rounded once to the dtype.
  const std::int64_t n = 2 * kInitChunkSize + 4099;
  const Tensor t64 = random_normal(Rng(9), "w", DType::f64, {n}, 0.03, 2);
  const Tensor t32 = random_normal(Rng(9), "w", DType::f32, {n}, 0.03, 2);
  std::int64_t mismatches = 0;
  for (std::int64_t c = 0; c * kInitChunkSize < n; ++c) {
    Rng rng = Rng(9).fork("w").fork("chunk " + std::to_string(c));
    for (std::int64_t i = c * kInitChunkSize; i < std::min(n, (c + 1) * kInitChunkSize); ++i) {
      const double expected = 0.03 * rng.normal();
      mismatches += t64.data<double>()[i] != expected;
      mismatches += t32.data<float>()[i] != static_cast<float>(expected);
    }
  }
  EXPECT_EQ(mismatches, 0);
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
  for (const char* family : {"resnet", "GPT2", "gpt-2"}) {
    try {
      init_random_weights(mlp_spec(family), 0);
      FAIL() << family << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + family + "'"), std::string::npos) << e.what();
    }
  }
}

// ---- gpt2 ---------------------------------------------------------------------------------------------------------

ModelSpec gpt2_spec(std::int64_t n_layer = 3, std::int64_t d = 16, std::int64_t V = 40, std::int64_t P = 16) {
  ModelSpec spec;
  spec.family = "gpt2";
  spec.n_layer = n_layer;
  spec.n_embd = d;
  spec.n_head = 2;
  spec.vocab_size = V;
  spec.n_positions = P;
  spec.seq_len = 5;
  spec.blocks = 1;
  return spec;
}

// Hugging Face's names and shapes (Conv1D weights [in, out]) for every block, whatever spec.blocks is.
std::map<std::string, Shape> gpt2_shapes(std::int64_t n_layer, std::int64_t d, std::int64_t inner, std::int64_t V,
                                         std::int64_t P) {
  std::map<std::string, Shape> shapes{
      {"wte.weight", {V, d}}, {"wpe.weight", {P, d}}, {"ln_f.weight", {d}}, {"ln_f.bias", {d}}};
  for (std::int64_t i = 0; i < n_layer; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    shapes[h + "ln_1.weight"] = {d};
    shapes[h + "ln_1.bias"] = {d};
    shapes[h + "attn.c_attn.weight"] = {d, 3 * d};
    shapes[h + "attn.c_attn.bias"] = {3 * d};
    shapes[h + "attn.c_proj.weight"] = {d, d};
    shapes[h + "attn.c_proj.bias"] = {d};
    shapes[h + "ln_2.weight"] = {d};
    shapes[h + "ln_2.bias"] = {d};
    shapes[h + "mlp.c_fc.weight"] = {d, inner};
    shapes[h + "mlp.c_fc.bias"] = {inner};
    shapes[h + "mlp.c_proj.weight"] = {inner, d};
    shapes[h + "mlp.c_proj.bias"] = {d};
  }
  return shapes;
}

TEST(WeightsInit, Gpt2NamesAndShapesForAllBlocks) {
  for (std::int64_t blocks : {0, 1, 3}) {
    ModelSpec spec = gpt2_spec(3, 16, 40, 16);
    spec.blocks = blocks;  // does not matter: every block is made
    const WeightSet w = init_random_weights(spec, 0);
    const auto expected = gpt2_shapes(3, 16, 64, 40, 16);
    std::vector<std::string> names;
    for (const auto& entry : expected) names.push_back(entry.first);
    EXPECT_EQ(w.names(), names) << blocks;
    for (const auto& [name, shape] : expected) {
      EXPECT_EQ(w.get(name).shape(), shape) << name;
      EXPECT_EQ(w.get(name).dtype(), DType::f64) << name;
    }
  }
  ModelSpec spec = gpt2_spec(2, 8, 30, 12);
  spec.n_inner = 20;  // the MLP width follows n_inner when given
  spec.dtype = DType::f32;
  const WeightSet w = init_random_weights(spec, 0);
  EXPECT_EQ(w.names().size(), gpt2_shapes(2, 8, 20, 30, 12).size());
  for (const auto& [name, shape] : gpt2_shapes(2, 8, 20, 30, 12)) {
    EXPECT_EQ(w.get(name).shape(), shape) << name;
    EXPECT_EQ(w.get(name).dtype(), DType::f32) << name;
  }
  EXPECT_FALSE(w.contains("lm_head.weight"));  // tied to wte
}

TEST(WeightsInit, Gpt2StatisticsAreHuggingFacesInit) {
  // n_layer 6: the residual projections have std 0.02 / sqrt(12).
  const std::int64_t n_layer = 6;
  const WeightSet w = init_random_weights(gpt2_spec(n_layer, 64, 2000, 256), 3);
  auto check_normal = [](const Tensor& t, double std, const std::string& name) {
    const double n = static_cast<double>(t.numel());
    double sum = 0, sum2 = 0;
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      sum += t.get(i);
      sum2 += t.get(i) * t.get(i);
    }
    const double mean = sum / n, sd = std::sqrt(sum2 / n - mean * mean);
    EXPECT_NEAR(mean, 0.0, 5 * std / std::sqrt(n)) << name;
    EXPECT_NEAR(sd, std, 5 * std / std::sqrt(2 * n)) << name;  // five times the estimate's own error
  };
  const double proj_std = 0.02 / std::sqrt(2.0 * n_layer);
  std::vector<double> c_proj_values;
  for (const auto& [name, tensor] : w.tensors()) {
    const bool c_proj = name.find("c_proj.weight") != std::string::npos;
    if (name.find("ln_") != std::string::npos) {
      const double value = name.size() > 7 && name.substr(name.size() - 7) == ".weight" ? 1.0 : 0.0;
      for (std::int64_t i = 0; i < tensor.numel(); ++i) ASSERT_EQ(tensor.get(i), value) << name << " " << i;
    } else if (name.size() > 5 && name.substr(name.size() - 5) == ".bias") {
      for (std::int64_t i = 0; i < tensor.numel(); ++i) ASSERT_EQ(tensor.get(i), 0.0) << name << " " << i;
    } else if (c_proj) {
      for (std::int64_t i = 0; i < tensor.numel(); ++i) c_proj_values.push_back(tensor.get(i));
      check_normal(tensor, proj_std, name);
    } else {
      check_normal(tensor, 0.02, name);  // wte, wpe, c_attn, c_fc
    }
  }
  // All 12 residual projections together, at a tighter tolerance: std 0.02 / sqrt(12), not 0.02 or 0.02 / sqrt(6).
  ASSERT_EQ(c_proj_values.size(), static_cast<std::size_t>(n_layer * (64 * 64 + 256 * 64)));
  double sum2 = 0;
  for (double x : c_proj_values) sum2 += x * x;
  EXPECT_NEAR(std::sqrt(sum2 / c_proj_values.size()), proj_std, proj_std * 0.005);
}

TEST(WeightsInit, Gpt2SameSeedSameBytesAndStreamsByName) {
  const ModelSpec spec = gpt2_spec();
  const WeightSet a = init_random_weights(spec, 42), b = init_random_weights(spec, 42, 1);
  EXPECT_TRUE(same_bytes(a, b));
  EXPECT_TRUE(same_bytes(a, init_random_weights(spec, 42, 3)));
  const WeightSet c = init_random_weights(spec, 43);
  for (const std::string& name : a.names()) {
    if (name.find("ln_") == std::string::npos && name.find(".bias") == std::string::npos) {
      EXPECT_FALSE(same_bytes(a.get(name), c.get(name))) << name;
    }
  }
  // Each random tensor is its own stream: Rng(seed).fork(name), chunked as documented.
  const Tensor& c_fc = a.get("h.1.mlp.c_fc.weight");
  EXPECT_TRUE(same_bytes(c_fc, random_normal(Rng(42), "h.1.mlp.c_fc.weight", DType::f64, {16, 64}, 0.02)));
  Rng stream = Rng(42).fork("h.2.attn.c_proj.weight").fork("chunk 0");
  EXPECT_EQ(a.get("h.2.attn.c_proj.weight").get(0), 0.02 / std::sqrt(6.0) * stream.normal());
  // A deeper model keeps the first blocks' weights (and wte, wpe) as they were; only the residual projections'
  // scale follows n_layer.
  const WeightSet deeper = init_random_weights(gpt2_spec(5), 42);
  for (const std::string& name : a.names()) {
    if (name.find("c_proj.weight") == std::string::npos) {
      EXPECT_TRUE(same_bytes(a.get(name), deeper.get(name))) << name;
    }
  }
  EXPECT_FALSE(same_bytes(a.get("h.0.attn.c_proj.weight"), deeper.get("h.0.attn.c_proj.weight")));
  EXPECT_TRUE(deeper.contains("h.4.mlp.c_proj.bias"));
}

TEST(WeightsInit, Gpt2SmallInitialisesCompletely) {
  // The real size: 124,439,808 parameters with 1024 positions and 50257 tokens, in f32 (what the host defaults to
  // for f32 runs).
  ModelSpec spec;  // ModelSpec's defaults are GPT-2 small
  spec.dtype = DType::f32;
  const WeightSet w = init_random_weights(spec, 0);
  std::int64_t params = 0;
  for (const auto& entry : w.tensors()) params += entry.second.numel();
  EXPECT_EQ(params, 124439808);
  EXPECT_EQ(w.names().size(), 2u + 12u * 12u + 2u);
  EXPECT_EQ(w.get("h.11.mlp.c_proj.weight").shape(), (Shape{3072, 768}));
}

TEST(WeightsInit, Gpt2BadSizesAreErrors) {
  ModelSpec spec = gpt2_spec();
  spec.n_positions = 0;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
  spec = gpt2_spec();
  spec.n_layer = -1;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
  spec = gpt2_spec();
  spec.n_layer = 0;  // embeddings and ln_f only
  EXPECT_EQ(init_random_weights(spec, 0).names(),
            (std::vector<std::string>{"ln_f.bias", "ln_f.weight", "wpe.weight", "wte.weight"}));
}

TEST(WeightsInit, FcnetWithoutSeqLenIsAnError) {
  ModelSpec spec = mlp_spec("fcnet");
  spec.seq_len = 0;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
  spec.family = "transformer_mlp";  // per-token sizes: seq_len is not needed
  if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
  EXPECT_NO_THROW(init_random_weights(spec, 0));
  spec.n_embd = 0;
  EXPECT_THROW(init_random_weights(spec, 0), Error);
}

}  // namespace
}  // namespace lminv
