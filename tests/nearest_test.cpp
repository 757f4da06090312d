// The nearest decoder: round trips, scores against direct formulas, top-k order and ties, allowed vocabularies,
// l2 against cosine, vocab-space inputs and option errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "lminv/rng.hpp"
#include "nearest_decoder.hpp"
#include "weights_init.hpp"

namespace {

using lminv::Decoded;
using lminv::DType;
using lminv::InputSpace;
using lminv::NearestDecoder;
using lminv::Tensor;
namespace fs = std::filesystem;

lminv::ModelSpec spec_of(std::int64_t vocab, std::int64_t d, InputSpace input = InputSpace::embedding,
                         DType dtype = DType::f64) {
  lminv::ModelSpec spec;
  spec.family = "transformer_mlp";
  if (auto kind = lminv::parse_kind(spec.family)) spec.kind = *kind;
  spec.vocab_size = vocab;
  spec.n_embd = d;
  spec.input = input;
  spec.dtype = dtype;
  return spec;
}

// The host's seeded random weights: wte [V, d] ~ N(0, 0.02^2), in the given dtype.
std::shared_ptr<lminv::WeightSet> random_wte(std::int64_t vocab, std::int64_t d, DType dtype, std::uint64_t seed) {
  return std::make_shared<lminv::WeightSet>(lminv::init_random_weights(spec_of(vocab, d, InputSpace::embedding, dtype), seed));
}

std::shared_ptr<lminv::WeightSet> wte_of(std::int64_t vocab, std::int64_t d, const std::vector<double>& values) {
  auto w = std::make_shared<lminv::WeightSet>();
  w->set("wte.weight", Tensor::from<double>({vocab, d}, values));
  return w;
}

// Test tokenizer: the text is a list of ids ("7 19 300").
std::vector<std::int64_t> ids_tokenizer(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::istringstream in(text);
  std::int64_t id = 0;
  while (in >> id) ids.push_back(id);
  return ids;
}

NearestDecoder make(std::map<std::string, std::string> options, const lminv::ModelSpec& spec,
                    std::shared_ptr<const lminv::WeightSet> weights) {
  NearestDecoder decoder;
  decoder.configure(lminv::Options("decoder", "test.ini", std::move(options)));
  lminv::DecoderSetup setup;
  setup.spec = spec;
  setup.weights = std::move(weights);
  setup.tokenize = ids_tokenizer;
  decoder.prepare(setup);
  return decoder;
}

// The rows of wte for ids, [T, d].
Tensor embed(const lminv::WeightSet& weights, const std::vector<std::int64_t>& ids, DType dtype = DType::f64) {
  const Tensor& wte = weights.get("wte.weight");
  const std::int64_t d = wte.dim(1);
  Tensor x(dtype, {static_cast<std::int64_t>(ids.size()), d});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (std::int64_t j = 0; j < d; ++j) x.set(static_cast<std::int64_t>(t) * d + j, wte.get(ids[t] * d + j));
  return x;
}

// Expects `body` to throw an lminv::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& body, const std::vector<std::string>& parts) {
  try {
    body();
    ADD_FAILURE() << "no error; expected one with '" << parts.front() << "'";
  } catch (const lminv::Error& e) {
    for (const std::string& part : parts)
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what() << "\n  lacks: " << part;
  }
}

}  // namespace

TEST(Nearest, RoundTripIsExactForBothMetricsAndDtypes) {
  const std::vector<std::int64_t> ids = {0, 499, 17, 17, 250, 3, 498};
  for (DType dtype : {DType::f64, DType::f32, DType::bf16})
    for (const char* metric : {"l2", "cosine"}) {
      SCOPED_TRACE(std::string(lminv::dtype_name(dtype)) + " " + metric);
      auto weights = random_wte(500, 24, dtype, 4);
      NearestDecoder decoder = make({{"metric", metric}}, spec_of(500, 24, InputSpace::embedding, dtype), weights);
      const Decoded d = decoder.decode(embed(*weights, ids));
      EXPECT_EQ(d.best(), ids);
      EXPECT_EQ(d.k, 1);
      for (std::int64_t t = 0; t < d.positions; ++t)
        EXPECT_NEAR(d.score(t), std::string(metric) == "l2" ? 0.0 : 1.0, 1e-6);
      // A leading batch dimension of 1 and an f32 input decode the same.
      Tensor batched = embed(*weights, ids, DType::f32);
      batched = std::move(batched).reshape({1, static_cast<std::int64_t>(ids.size()), 24});
      EXPECT_EQ(decoder.decode(batched).best(), ids);
    }
}

TEST(Nearest, ScoresAreMinusTheDistanceOrTheCosine) {
  auto weights = random_wte(40, 8, DType::f64, 2);
  const Tensor& wte = weights->get("wte.weight");
  Tensor x(DType::f64, {3, 8});
  lminv::Rng rng(1);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.set(i, 0.02 * rng.normal());
  const NearestDecoder l2 = make({}, spec_of(40, 8), weights);
  const NearestDecoder cosine = make({{"metric", "cosine"}}, spec_of(40, 8), weights);
  const std::vector<double> s2 = l2.scores(x), sc = cosine.scores(x);
  for (std::int64_t t = 0; t < 3; ++t)
    for (std::int64_t v = 0; v < 40; ++v) {
      double dist = 0, dot = 0, xx = 0, ww = 0;
      for (std::int64_t j = 0; j < 8; ++j) {
        const double a = x.get(t * 8 + j), b = wte.get(v * 8 + j);
        dist += (a - b) * (a - b);
        dot += a * b;
        xx += a * a;
        ww += b * b;
      }
      EXPECT_NEAR(s2[t * 40 + v], -std::sqrt(dist), 1e-12) << t << " " << v;
      EXPECT_NEAR(sc[t * 40 + v], dot / std::sqrt(xx * ww), 1e-12) << t << " " << v;
    }
}

TEST(Nearest, TopKIsOrderedByDistanceWithTiesToTheLowerId) {
  // Tokens on a line: w_v = (v, 0). From x = 2.3 the order is 2, 3, 1, 4, 0, 5; from x = 2.5, 2 and 3 tie.
  auto weights = wte_of(6, 2, {0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0});
  NearestDecoder decoder = make({{"top_k", "6"}}, spec_of(6, 2), weights);
  const Decoded d = decoder.decode(Tensor::from<double>({2, 2}, {2.3, 0, 2.5, 0}));
  ASSERT_EQ(d.k, 6);
  EXPECT_EQ(std::vector<std::int64_t>(d.ids.begin(), d.ids.begin() + 6), (std::vector<std::int64_t>{2, 3, 1, 4, 0, 5}));
  const std::vector<double> expected = {-0.3, -0.7, -1.3, -1.7, -2.3, -2.7};
  for (std::int64_t r = 0; r < 6; ++r) EXPECT_NEAR(d.score(0, r), expected[r], 1e-12) << r;
  EXPECT_EQ(std::vector<std::int64_t>(d.ids.begin() + 6, d.ids.end()), (std::vector<std::int64_t>{2, 3, 1, 4, 0, 5}));
  EXPECT_EQ(d.score(1, 0), d.score(1, 1));  // an exact tie, broken by id
}

TEST(Nearest, CosineAndL2DisagreeOnACraftedExample) {
  // x = (5, 0.6) is closer to w0 = (1, 0) in distance (4.04 against 5.02) but closer to w1 = (10, 1) in direction.
  auto weights = wte_of(2, 2, {1, 0, 10, 1});
  const Tensor x = Tensor::from<double>({1, 2}, {5, 0.6});
  EXPECT_EQ(make({{"metric", "l2"}}, spec_of(2, 2), weights).decode(x).best(), (std::vector<std::int64_t>{0}));
  EXPECT_EQ(make({{"metric", "cosine"}}, spec_of(2, 2), weights).decode(x).best(), (std::vector<std::int64_t>{1}));
  // The default is l2.
  EXPECT_EQ(make({}, spec_of(2, 2), weights).decode(x).best(), (std::vector<std::int64_t>{0}));
}

TEST(Nearest, AllowedVocabularyOnlyReturnsAllowedIds) {
  auto weights = random_wte(300, 16, DType::f64, 7);
  const std::vector<std::int64_t> ids = {5, 100, 299, 42};
  const fs::path file = fs::temp_directory_path() / ("lminv-nearest-allowed-" + std::to_string(::getpid()) + ".txt");
  {
    std::ofstream out(file);
    out << "7, 11\n13\n";
  }
  for (const char* metric : {"l2", "cosine"}) {
    SCOPED_TRACE(metric);
    const NearestDecoder decoder =
        make({{"metric", metric}, {"top_k", "3"}, {"allowed", "100 250 42"}, {"allowed_ids", file.string()}},
             spec_of(300, 16), weights);
    const std::set<std::int64_t> allowed = {7, 11, 13, 42, 100, 250};
    const Tensor x = embed(*weights, ids);
    NearestDecoder copy = decoder;
    const Decoded d = copy.decode(x);
    for (std::int64_t id : d.ids) EXPECT_TRUE(allowed.count(id)) << id;
    // Each position gets the allowed tokens in the order of their scores among all tokens.
    const std::vector<double> s = decoder.scores(x);
    for (std::int64_t t = 0; t < 4; ++t) {
      std::vector<std::int64_t> order(allowed.begin(), allowed.end());
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int64_t a, std::int64_t b) { return s[t * 300 + a] > s[t * 300 + b]; });
      EXPECT_EQ(std::vector<std::int64_t>(d.ids.begin() + t * 3, d.ids.begin() + (t + 1) * 3),
                std::vector<std::int64_t>(order.begin(), order.begin() + 3))
          << t;
    }
    // Allowed prompt tokens are found exactly.
    EXPECT_EQ(d.id(1), 100);
    EXPECT_EQ(d.id(3), 42);
  }
  fs::remove(file);
}

TEST(Nearest, VocabSpaceInputsDecodeByArgmax) {
  NearestDecoder decoder = make({{"top_k", "2"}}, spec_of(4, 3, InputSpace::vocab), nullptr);
  const Decoded d = decoder.decode(Tensor::from<double>({2, 4}, {0.1, 0.9, 0.5, 0.0, 2.0, -1.0, 3.0, 3.0}));
  EXPECT_EQ(d.ids, (std::vector<std::int64_t>{1, 2, 2, 3}));
  EXPECT_EQ(d.scores, (std::vector<double>{0.9, 0.5, 3.0, 3.0}));
}

TEST(Nearest, BadOptionsNameTheKey) {
  auto weights = random_wte(10, 4, DType::f64, 1);
  expect_error([&] { make({{"top_k", "0"}}, spec_of(10, 4), weights); },
               {"test.ini", "[decoder] top_k = '0'", "at least 1"});
  expect_error([&] { make({{"top_k", "11"}}, spec_of(10, 4), weights); },
               {"test.ini", "[decoder] top_k = '11'", "exceeds the vocabulary size 10"});
  expect_error([&] { make({{"top_k", "3"}, {"allowed", "1 2"}}, spec_of(10, 4), weights); },
               {"[decoder] top_k = '3'", "exceeds the 2 allowed tokens"});
  expect_error([&] { make({{"metric", "l1"}}, spec_of(10, 4), weights); },
               {"[decoder] metric = 'l1'", "expected one of l2 | cosine"});
  expect_error([&] { make({{"allowed", "3 10"}}, spec_of(10, 4), weights); },
               {"[decoder] allowed = '3 10'", "token id 10 is outside [0, 10)"});
  expect_error([&] { make({{"allowed_ids", "/no/such/ids.txt"}}, spec_of(10, 4), weights); },
               {"[decoder] allowed_ids = '/no/such/ids.txt'", "cannot read the ids file"});
  expect_error([&] { make({}, spec_of(10, 4), std::make_shared<lminv::WeightSet>()); }, {"wte.weight"});
  NearestDecoder decoder = make({}, spec_of(10, 4), weights);
  expect_error([&] { decoder.decode(Tensor(DType::f64, {3, 5})); }, {"[3, 5]", "d = 4"});
  // The configured options are all read.
  lminv::Options options("decoder", "test.ini", {{"metric", "cosine"}, {"top_k", "2"}, {"allowed", "1"}});
  NearestDecoder fresh;
  fresh.configure(options);
  EXPECT_TRUE(options.unread_keys().empty());
}

TEST(Nearest, Gpt2SizedDecodeFindsEveryToken) {
  // 50257 x 768 f32 weights, T = 16: one pass over wte.
  auto weights = std::make_shared<lminv::WeightSet>();
  Tensor wte(DType::f32, {50257, 768});
  lminv::Rng rng(3);
  float* p = wte.data<float>();
  for (std::int64_t i = 0; i < wte.numel(); ++i) p[i] = static_cast<float>(0.02 * rng.uniform(-1.0, 1.0));
  weights->set("wte.weight", std::move(wte));
  NearestDecoder decoder = make({{"top_k", "5"}}, spec_of(50257, 768, InputSpace::embedding, DType::f32), weights);
  const std::vector<std::int64_t> ids = {464, 6766, 318, 4171, 13, 0, 50256, 1000, 2000, 3000, 4000, 5000, 6000,
                                         7000, 8000, 9000};
  const Tensor x = embed(*weights, ids);
  const auto start = std::chrono::steady_clock::now();
  const Decoded d = decoder.decode(x);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(d.best(), ids);
  std::cout << "nearest decode, 50257 x 768, T = 16: " << seconds << " s (timed in lminv bench, not asserted)\n";
}

// Far from every token (|x| ~ 1e20) the distances differ in digits a double does not hold: ranked on
// |w|^2 - 2 <w, x> the nearest token is still found, where the full distance made every token tie (and id 0 win).
TEST(Nearest, AHugeInputStillFindsTheNearestTokenByDirection) {
  auto weights = wte_of(3, 2, {1, 0, 0, 1, -1, 0});
  NearestDecoder decoder = make({{"top_k", "3"}}, spec_of(3, 2), weights);
  const Decoded d = decoder.decode(Tensor::from<double>({2, 2}, {0, 1e20, -1e20, 1}));
  EXPECT_EQ(d.id(0), 1);  // straight up: token 1 = (0, 1)
  EXPECT_EQ(d.id(1), 2);  // far left: token 2 = (-1, 0)
  EXPECT_EQ(d.id(1, 2), 0);
  // The scores are still minus the distances (equal at this magnitude).
  EXPECT_DOUBLE_EQ(d.score(0), -1e20);
}
