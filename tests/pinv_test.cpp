// The pinv decoder: round trips, the factored pseudo-inverse against an SVD, top-k, allowed vocabularies,
// option errors, the on-disk cache and vocab-space inputs.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <Eigen/SVD>

#include "lminv/rng.hpp"
#include "pinv_decoder.hpp"
#include "weights_init.hpp"

namespace {

using lminv::DType;
using lminv::InputSpace;
using lminv::PseudoInverseDecoder;
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
  const lminv::ModelSpec spec = spec_of(vocab, d, InputSpace::embedding, dtype);
  return std::make_shared<lminv::WeightSet>(lminv::init_random_weights(spec, seed));
}


lminv::Options options(std::map<std::string, std::string> values) {
  return lminv::Options("decoder", "test.ini", std::move(values));
}

// Test tokenizer: the text is a list of ids ("7 19 300").
std::vector<std::int64_t> ids_tokenizer(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::istringstream in(text);
  for (std::int64_t id = 0; in >> id;) ids.push_back(id);
  return ids;
}

lminv::DecoderSetup setup_of(const lminv::ModelSpec& spec, std::shared_ptr<const lminv::WeightSet> weights,
                             std::string cache_dir = "") {
  return {spec, std::move(weights), std::move(cache_dir), ids_tokenizer};
}

// A prepared decoder; cache off unless a folder is given.
std::unique_ptr<PseudoInverseDecoder> make_decoder(const lminv::ModelSpec& spec,
                                                   std::shared_ptr<const lminv::WeightSet> weights,
                                                   std::map<std::string, std::string> values = {},
                                                   std::string cache_dir = "") {
  auto decoder = std::make_unique<PseudoInverseDecoder>();
  decoder->configure(options(std::move(values)));
  decoder->prepare(setup_of(spec, std::move(weights), std::move(cache_dir)));
  return decoder;
}

// Rows `ids` of w as an f64 tensor [T, d]: the embeddings of those tokens.
Tensor embed(const Tensor& w, const std::vector<std::int64_t>& ids) {
  const std::int64_t d = w.dim(1);
  Tensor x(DType::f64, {static_cast<std::int64_t>(ids.size()), d});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (std::int64_t j = 0; j < d; ++j) x.set(static_cast<std::int64_t>(t) * d + j, w.get(ids[t] * d + j));
  return x;
}

std::vector<std::int64_t> random_ids(std::size_t n, std::int64_t vocab, std::uint64_t seed) {
  lminv::Rng rng(seed);
  std::vector<std::int64_t> ids;
  for (std::size_t i = 0; i < n; ++i) ids.push_back(static_cast<std::int64_t>(rng.below(vocab)));
  return ids;
}

Tensor random_tensor(lminv::Shape shape, std::uint64_t seed, double std = 1.0) {
  lminv::Rng rng(seed);
  Tensor t(DType::f64, std::move(shape));
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, rng.normal(0.0, std));
  return t;
}

Eigen::MatrixXd to_eigen(const Tensor& w) {
  Eigen::MatrixXd m(w.dim(0), w.dim(1));
  for (std::int64_t i = 0; i < w.dim(0); ++i)
    for (std::int64_t j = 0; j < w.dim(1); ++j) m(i, j) = w.get(i * w.dim(1) + j);
  return m;
}

// Expected top-k of one row by brute force: full stable sort by score, higher first, lower id on ties.
std::vector<std::int64_t> brute_top_k(const double* row, std::int64_t cols, std::int64_t k,
                                      const std::set<std::int64_t>* allowed = nullptr) {
  std::vector<std::int64_t> ids;
  for (std::int64_t v = 0; v < cols; ++v)
    if (!allowed || allowed->count(v)) ids.push_back(v);
  std::stable_sort(ids.begin(), ids.end(), [row](std::int64_t a, std::int64_t b) { return row[a] > row[b]; });
  ids.resize(static_cast<std::size_t>(k));
  return ids;
}

// A fresh folder under the system's temporary folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device random;
    path = fs::temp_directory_path() / ("lminv_pinv_test_" + std::to_string(random()) + std::to_string(random()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const lminv::Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool same_bits(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(double)) == 0;
}

// ---- round trips --------------------------------------------------------------------------------------------

TEST(PinvDecoder, RoundTripSmall) {
  for (DType dtype : {DType::f64, DType::f32, DType::bf16}) {
    SCOPED_TRACE(lminv::dtype_name(dtype));
    const auto weights = random_wte(2000, 64, dtype, 1);
    const auto decoder = make_decoder(spec_of(2000, 64), weights);
    EXPECT_EQ(decoder->info().rank, 64);
    const std::vector<std::int64_t> ids = random_ids(40, 2000, 2);
    const lminv::Decoded out = decoder->decode(embed(weights->get("wte.weight"), ids));
    EXPECT_EQ(out.positions, 40);
    EXPECT_EQ(out.k, 1);
    EXPECT_EQ(out.best(), ids);
    // A leading batch dimension of 1 is accepted, and f32 inputs too.
    const Tensor batched = embed(weights->get("wte.weight"), ids).reshape({1, 40, 64}).to(DType::f32);
    EXPECT_EQ(decoder->decode(batched).best(), ids);
  }
}

TEST(PinvDecoder, RoundTripGpt2SizeF32) {
  const std::int64_t vocab = 50257, d = 768;
  const auto weights = random_wte(vocab, d, DType::f32, 3);
  auto start = std::chrono::steady_clock::now();
  const auto decoder = make_decoder(spec_of(vocab, d), weights);
  const double prepare_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto& info = decoder->info();
  std::printf("[ timing   ] %lld x %lld f32, %d threads: Gram %.3f s, eigen + G^+ %.3f s, prepare %.3f s, rank %lld\n",
              static_cast<long long>(vocab), static_cast<long long>(d), omp_get_max_threads(), info.gram_seconds,
              info.eigen_seconds, prepare_s, static_cast<long long>(info.rank));
  EXPECT_EQ(info.rank, d);
  EXPECT_FALSE(info.from_cache);

  const std::vector<std::int64_t> ids = random_ids(20, vocab, 4);
  const Tensor x = embed(weights->get("wte.weight"), ids);
  start = std::chrono::steady_clock::now();
  const lminv::Decoded out = decoder->decode(x);
  const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(out.best(), ids);

  const Tensor x6 = x.slice0(0, 6);
  start = std::chrono::steady_clock::now();
  const int repeats = 5;
  const std::vector<std::int64_t> ids6(ids.begin(), ids.begin() + 6);
  for (int i = 0; i < repeats; ++i) EXPECT_EQ(decoder->decode(x6).best(), ids6);
  const double decode6_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
  std::printf("[ timing   ] decode T=20: %.1f ms, T=6: %.1f ms\n", decode_s * 1e3, decode6_s * 1e3);
}

// ---- the factored pseudo-inverse ----------------------------------------------------------------------------

// pinv(W) by SVD with the usual tolerance sigma_max * max(m, n) * eps.
Eigen::MatrixXd svd_pinv(const Eigen::MatrixXd& w) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd& s = svd.singularValues();
  const double tol = s(0) * static_cast<double>(std::max(w.rows(), w.cols())) * std::numeric_limits<double>::epsilon();
  Eigen::VectorXd inv = Eigen::VectorXd::Zero(s.size());
  for (Eigen::Index i = 0; i < s.size(); ++i)
    if (s(i) > tol) inv(i) = 1.0 / s(i);
  return svd.matrixV() * inv.asDiagonal() * svd.matrixU().transpose();
}

TEST(PinvDecoder, FactoredPinvEqualsExplicitPseudoInverse) {
  const auto weights = random_wte(40, 8, DType::f64, 5);
  const Tensor& wte = weights->get("wte.weight");
  const Eigen::MatrixXd w = to_eigen(wte);

  lminv::pinv::GramPinvInfo info;
  const Eigen::MatrixXd g_pinv = lminv::pinv::gram_pseudo_inverse(lminv::pinv::gram(wte), 40, &info);
  EXPECT_EQ(info.rank, 8);
  const Eigen::MatrixXd factored = g_pinv * w.transpose();  // [d, V]
  const Eigen::MatrixXd cod = w.completeOrthogonalDecomposition().pseudoInverse();
  EXPECT_LT((factored - svd_pinv(w)).cwiseAbs().maxCoeff(), 1e-10);
  EXPECT_LT((factored - cod).cwiseAbs().maxCoeff(), 1e-10);

  // The decoder's scores are x pinv(W).
  const auto decoder = make_decoder(spec_of(40, 8), weights);
  const Tensor x = random_tensor({5, 8}, 6, 0.02);
  const std::vector<double> scores = decoder->pinv_scores(x);
  const Eigen::MatrixXd expected = to_eigen(x) * svd_pinv(w);
  ASSERT_EQ(scores.size(), 5u * 40u);
  for (int t = 0; t < 5; ++t)
    for (int v = 0; v < 40; ++v) EXPECT_NEAR(scores[t * 40 + v], expected(t, v), 1e-10);
}

TEST(PinvDecoder, RankDeficientPinvUsesTheCutoff) {
  // Columns 5 and 7 repeat columns 2 and 0: W has rank 6 and W^T W has two zero eigenvalues, which rounding
  // turns into tiny numbers of either sign. Without the cutoff, their inverses would swamp G^+.
  auto weights = random_wte(40, 8, DType::f64, 7);
  Tensor wte = weights->get("wte.weight");
  for (std::int64_t i = 0; i < 40; ++i) {
    wte.set(i * 8 + 5, wte.get(i * 8 + 2));
    wte.set(i * 8 + 7, wte.get(i * 8 + 0));
  }
  weights->set("wte.weight", wte);
  const Eigen::MatrixXd w = to_eigen(wte);

  lminv::pinv::GramPinvInfo info;
  const Eigen::MatrixXd g = lminv::pinv::gram(wte);
  const Eigen::MatrixXd g_pinv = lminv::pinv::gram_pseudo_inverse(g, 40, &info);
  EXPECT_EQ(info.rank, 6);
  EXPECT_GT(info.cutoff, 0.0);
  const Eigen::MatrixXd factored = g_pinv * w.transpose();
  EXPECT_LT((factored - svd_pinv(w)).cwiseAbs().maxCoeff(), 1e-10);
  EXPECT_LT((factored - w.completeOrthogonalDecomposition().pseudoInverse()).cwiseAbs().maxCoeff(), 1e-10);
  // Moore-Penrose: W pinv(W) W = W.
  EXPECT_LT((w * factored * w - w).cwiseAbs().maxCoeff(), 1e-12);

  // The test can tell: inverting every eigenvalue (no cutoff) gives something far from the pseudo-inverse.
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(g);
  const Eigen::MatrixXd naive = solver.eigenvectors() * solver.eigenvalues().cwiseInverse().asDiagonal() *
                                solver.eigenvectors().transpose() * w.transpose();
  EXPECT_GT((naive - svd_pinv(w)).cwiseAbs().maxCoeff(), 1.0);

  // Decoding still works on the tokens W can tell apart: scores equal x pinv(W).
  const auto decoder = make_decoder(spec_of(40, 8), weights);
  EXPECT_EQ(decoder->info().rank, 6);
  const Tensor x = random_tensor({3, 8}, 8, 0.02);
  const std::vector<double> scores = decoder->pinv_scores(x);
  const Eigen::MatrixXd expected = to_eigen(x) * svd_pinv(w);
  for (int t = 0; t < 3; ++t)
    for (int v = 0; v < 40; ++v) EXPECT_NEAR(scores[t * 40 + v], expected(t, v), 1e-10);
}

TEST(PinvDecoder, GramMatchesDirectProductAndIgnoresThreadCount) {
  // d = 150 and V = 1300 are not multiples of the panel and chunk sizes: the edges are exercised.
  for (DType dtype : {DType::f64, DType::f32}) {
    SCOPED_TRACE(lminv::dtype_name(dtype));
    const auto weights = random_wte(1300, 150, dtype, 9);
    const Tensor& wte = weights->get("wte.weight");
    const Eigen::MatrixXd w = to_eigen(wte);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const Eigen::MatrixXd one = lminv::pinv::gram(wte);
    omp_set_num_threads(3);
    const Eigen::MatrixXd three = lminv::pinv::gram(wte);
    omp_set_num_threads(threads);
    const Eigen::MatrixXd direct = w.transpose() * w;
    EXPECT_LT((one - direct).cwiseAbs().maxCoeff(), 1e-12 * direct.cwiseAbs().maxCoeff());
    EXPECT_TRUE(same_bits(one, three));
    EXPECT_TRUE(same_bits(one, one.transpose().eval()));
  }
}

// ---- top-k --------------------------------------------------------------------------------------------------

TEST(PinvTopK, OrderScoresAndTies) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> scores = {
      0.5, 2.0, -1.0, 2.0, 1.0,  // a tie at the top: lower id first
      nan, 1.0, 1.0, 0.0, nan,   // NaN ranks last
      3.0, 3.0, 3.0, 3.0, 3.0,   // all equal: ids in order
  };
  const lminv::Decoded out = lminv::pinv::top_k_rows(scores.data(), 3, 5, 3);
  EXPECT_EQ(out.positions, 3);
  EXPECT_EQ(out.k, 3);
  EXPECT_EQ(out.ids, (std::vector<std::int64_t>{1, 3, 4, 1, 2, 3, 0, 1, 2}));
  EXPECT_EQ(out.scores, (std::vector<double>{2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 3.0, 3.0, 3.0}));
  EXPECT_EQ(out.best(), (std::vector<std::int64_t>{1, 1, 0}));
  EXPECT_EQ(out.id(1, 2), 3);
  EXPECT_EQ(out.score(1, 2), 0.0);

  // The allowed mask restricts the choice.
  const std::vector<std::uint8_t> allowed = {1, 0, 1, 0, 1};
  const lminv::Decoded some = lminv::pinv::top_k_rows(scores.data(), 3, 5, 2, allowed);
  EXPECT_EQ(some.ids, (std::vector<std::int64_t>{4, 0, 2, 0, 0, 2}));  // row 1: a number, then NaNs by id
  EXPECT_EQ(some.score(0, 0), 1.0);
  EXPECT_EQ(some.score(0, 1), 0.5);
  EXPECT_EQ(some.score(1, 0), 1.0);
  EXPECT_TRUE(std::isnan(some.score(1, 1)));
  EXPECT_EQ(some.score(2, 1), 3.0);

  EXPECT_THROW(lminv::pinv::top_k_rows(scores.data(), 3, 5, 4, allowed), lminv::Error);
  EXPECT_THROW(lminv::pinv::top_k_rows(scores.data(), 3, 5, 0), lminv::Error);
}

TEST(PinvDecoder, TopKAgreesWithBruteForce) {
  const auto weights = random_wte(300, 16, DType::f64, 10);
  const auto decoder = make_decoder(spec_of(300, 16), weights, {{"top_k", "7"}});
  const Tensor x = random_tensor({4, 16}, 11, 0.02);
  const lminv::Decoded out = decoder->decode(x);
  const std::vector<double> scores = decoder->pinv_scores(x);
  ASSERT_EQ(out.k, 7);
  for (std::int64_t t = 0; t < 4; ++t) {
    const std::vector<std::int64_t> expected = brute_top_k(scores.data() + t * 300, 300, 7);
    for (std::int64_t r = 0; r < 7; ++r) {
      EXPECT_EQ(out.id(t, r), expected[r]);
      EXPECT_EQ(out.score(t, r), scores[t * 300 + expected[r]]);
      if (r > 0) {
        EXPECT_GE(out.score(t, r - 1), out.score(t, r));
      }
    }
  }
}

// ---- allowed vocabulary -------------------------------------------------------------------------------------

TEST(PinvDecoder, AllowedVocabularyOnlyReturnsAllowedIds) {
  TempDir dir;
  write_text(dir.path / "ids.txt", "250,\n3  99\n");
  const auto weights = random_wte(500, 32, DType::f64, 12);
  const auto decoder = make_decoder(spec_of(500, 32), weights,
                                    {{"allowed", "7 19 300 42 42"}, {"allowed_ids", (dir.path / "ids.txt").string()},
                                     {"top_k", "2"}});
  const std::set<std::int64_t> allowed = {7, 19, 300, 42, 250, 3, 99};  // text and file together
  std::set<std::int64_t> mask_ids;
  for (std::int64_t v = 0; v < 500; ++v)
    if (decoder->allowed()[v]) mask_ids.insert(v);
  EXPECT_EQ(mask_ids, allowed);

  for (std::uint64_t seed = 0; seed < 50; ++seed) {
    const Tensor x = random_tensor({4, 32}, 100 + seed, 0.02);
    const lminv::Decoded out = decoder->decode(x);
    const std::vector<double> scores = decoder->pinv_scores(x);
    for (std::int64_t t = 0; t < 4; ++t) {
      const std::vector<std::int64_t> expected = brute_top_k(scores.data() + t * 500, 500, 2, &allowed);
      for (std::int64_t r = 0; r < 2; ++r) {
        EXPECT_TRUE(allowed.count(out.id(t, r))) << out.id(t, r);
        EXPECT_EQ(out.id(t, r), expected[r]);
      }
    }
  }
  // Allowed tokens still round-trip.
  const std::vector<std::int64_t> ids = {300, 7, 3, 99};
  EXPECT_EQ(decoder->decode(embed(weights->get("wte.weight"), ids)).best(), ids);
}

TEST(PinvDecoder, AllowedIdsFileErrors) {
  TempDir dir;
  const auto weights = random_wte(2000, 8, DType::f64, 13);
  auto prepare_with = [&](const std::string& path) {
    make_decoder(spec_of(2000, 8), weights, {{"allowed_ids", path}});
  };
  const std::string missing = (dir.path / "missing.txt").string();
  std::string message = error_of([&] { prepare_with(missing); });
  EXPECT_NE(message.find("allowed_ids"), std::string::npos) << message;
  EXPECT_NE(message.find(missing), std::string::npos) << message;

  const std::string bad = (dir.path / "bad.txt").string();
  write_text(bad, "12 1x3 14");
  message = error_of([&] { prepare_with(bad); });
  EXPECT_NE(message.find(bad), std::string::npos) << message;
  EXPECT_NE(message.find("'1x3'"), std::string::npos) << message;

  const std::string negative = (dir.path / "negative.txt").string();
  write_text(negative, "12, -4");
  message = error_of([&] { prepare_with(negative); });
  EXPECT_NE(message.find(negative), std::string::npos) << message;
  EXPECT_NE(message.find("-4"), std::string::npos) << message;

  const std::string outside = (dir.path / "outside.txt").string();
  write_text(outside, "5, 1999, 2000");
  message = error_of([&] { prepare_with(outside); });
  EXPECT_NE(message.find(outside), std::string::npos) << message;
  EXPECT_NE(message.find("2000"), std::string::npos) << message;
  EXPECT_NE(message.find("allowed_ids"), std::string::npos) << message;

  const std::string empty = (dir.path / "empty.txt").string();
  write_text(empty, " \n, \n");
  message = error_of([&] { prepare_with(empty); });
  EXPECT_NE(message.find(empty), std::string::npos) << message;

  const std::string fine = (dir.path / "fine.txt").string();
  write_text(fine, "5 1999");
  EXPECT_NO_THROW(prepare_with(fine));
}

// ---- options ------------------------------------------------------------------------------------------------

TEST(PinvDecoder, TopKErrorsNameTheKey) {
  const auto weights = random_wte(50, 8, DType::f64, 14);
  std::string message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"top_k", "0"}}); });
  EXPECT_NE(message.find("top_k"), std::string::npos) << message;
  EXPECT_NE(message.find("test.ini"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"top_k", "-2"}}); });
  EXPECT_NE(message.find("top_k"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"top_k", "two"}}); });
  EXPECT_NE(message.find("top_k"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"top_k", "51"}}); });
  EXPECT_NE(message.find("top_k"), std::string::npos) << message;
  EXPECT_NE(message.find("50"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"top_k", "4"}, {"allowed", "1 2 3 2"}}); });
  EXPECT_NE(message.find("top_k"), std::string::npos) << message;
  EXPECT_NO_THROW(make_decoder(spec_of(50, 8), weights, {{"top_k", "50"}}));
  EXPECT_NO_THROW(make_decoder(spec_of(50, 8), weights, {{"top_k", "3"}, {"allowed", "1 2 3 2"}}));

  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"allowed", "7 50"}}); });
  EXPECT_NE(message.find("allowed"), std::string::npos) << message;
  EXPECT_NE(message.find("50"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"allowed", ""}}); });
  EXPECT_NE(message.find("allowed"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(50, 8), weights, {{"cache", "maybe"}}); });
  EXPECT_NE(message.find("cache"), std::string::npos) << message;
}

TEST(PinvDecoder, ReadsEveryKeyItSupports) {
  TempDir dir;
  write_text(dir.path / "ids.txt", "1 2");
  PseudoInverseDecoder decoder;
  const lminv::Options all = options({{"top_k", "1"},
                                      {"allowed", "1"},
                                      {"allowed_ids", (dir.path / "ids.txt").string()},
                                      {"cache", "false"},
                                      {"restrict", "mask"},
                                      {"topk", "3"}});
  decoder.configure(all);
  EXPECT_EQ(all.unread_keys(), std::vector<std::string>{"topk"});
}

// ---- cache --------------------------------------------------------------------------------------------------

TEST(PinvDecoder, CacheIsWrittenReadAndRecomputedWhenCorrupt) {
  TempDir dir;
  const std::string cache_dir = (dir.path / "nested" / "cache").string();  // missing: created on demand
  const auto weights = random_wte(700, 24, DType::f32, 15);
  const Tensor& wte = weights->get("wte.weight");
  const auto spec = spec_of(700, 24);
  const Tensor x = random_tensor({5, 24}, 16, 0.02);

  const auto first = make_decoder(spec, weights, {}, cache_dir);
  const fs::path file = fs::path(cache_dir) / lminv::pinv::cache_file_name(wte);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(lminv::content_hash(wte)));
  EXPECT_EQ(file.filename().string(), "pinv-" + std::string(hex) + "-24.bin");
  ASSERT_TRUE(fs::exists(file));
  EXPECT_EQ(fs::file_size(file), 72u + 24u * 24u * 8u);
  EXPECT_FALSE(first->info().from_cache);
  EXPECT_EQ(first->info().cache_path, file.string());
  // Nothing but the cache file is left behind (no temporary files).
  EXPECT_EQ(std::distance(fs::directory_iterator(cache_dir), fs::directory_iterator()), 1);
  const std::vector<double> scores = first->pinv_scores(x);

  const auto second = make_decoder(spec, weights, {}, cache_dir);
  EXPECT_TRUE(second->info().from_cache);
  EXPECT_EQ(second->info().rank, 24);
  EXPECT_EQ(second->info().cutoff, first->info().cutoff);
  EXPECT_EQ(second->info().lambda_max, first->info().lambda_max);
  EXPECT_TRUE(same_bits(second->gram_pinv(), first->gram_pinv()));
  EXPECT_EQ(second->pinv_scores(x), scores);  // bit-identical
  EXPECT_EQ(second->decode(x).ids, first->decode(x).ids);

  // Each corruption is noticed, warned about, and repaired by recomputing; nothing crashes.
  const std::vector<std::pair<std::string, std::function<void()>>> corruptions = {
      {"magic", [&] { std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary); f.put('X'); }},
      {"d", [&] { std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary); f.seekp(16); f.put(25); }},
      {"payload", [&] {
         std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
         f.seekp(72 + 8 * 100 + 3);
         f.put(0x5a);
       }},
      {"truncated", [&] { fs::resize_file(file, 100); }},
      {"empty", [&] { fs::resize_file(file, 0); }},
  };
  for (const auto& [what, corrupt] : corruptions) {
    SCOPED_TRACE(what);
    corrupt();
    testing::internal::CaptureStderr();
    const auto again = make_decoder(spec, weights, {}, cache_dir);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_FALSE(again->info().from_cache);
    EXPECT_NE(err.find("warning"), std::string::npos) << err;
    EXPECT_NE(err.find(file.string()), std::string::npos) << err;
    EXPECT_TRUE(same_bits(again->gram_pinv(), first->gram_pinv()));
    EXPECT_EQ(again->pinv_scores(x), scores);
    // ... and the file was rewritten whole.
    testing::internal::CaptureStderr();
    EXPECT_TRUE(make_decoder(spec, weights, {}, cache_dir)->info().from_cache);
    EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  }

  // Other weights get another file; cache = false and an empty cache_dir write nothing.
  const auto other = random_wte(700, 24, DType::f32, 16);
  EXPECT_FALSE(make_decoder(spec, other, {}, cache_dir)->info().from_cache);
  EXPECT_EQ(std::distance(fs::directory_iterator(cache_dir), fs::directory_iterator()), 2);
  const std::string unused = (dir.path / "unused").string();
  const auto uncached = make_decoder(spec, weights, {{"cache", "false"}}, unused);
  EXPECT_FALSE(uncached->info().from_cache);
  EXPECT_EQ(uncached->info().cache_path, "");
  EXPECT_FALSE(fs::exists(unused));
  EXPECT_TRUE(same_bits(uncached->gram_pinv(), first->gram_pinv()));
}

// ---- vocab space and input errors ---------------------------------------------------------------------------

// restrict = mask, the seed study's masked_decode: scores * mask, then argmax over the whole vocabulary. Where an
// allowed token scores above 0 it agrees with restrict = allowed; where every allowed token scores below 0 a
// disallowed one (score 0: the lowest disallowed id, as torch.argmax takes the first maximum) wins.
TEST(PinvDecoder, MaskDecodeIsTheStudysMaskedArgmax) {
  const auto spec = spec_of(120, 8, InputSpace::vocab);
  const auto masked = make_decoder(spec, nullptr, {{"allowed", "3 77"}, {"restrict", "mask"}});
  const auto ranked = make_decoder(spec, nullptr, {{"allowed", "3 77"}});
  Tensor x = random_tensor({4, 120}, 23);
  // Rows 0 and 3: both allowed scores negative, so the disallowed id 0 wins the mask; rows 1 and 2: one or both
  // positive, so the best allowed one wins either way.
  const double set[4][2] = {{-0.5, -0.1}, {-0.5, 0.2}, {0.3, 0.7}, {-2.0, -3.0}};
  for (std::int64_t t = 0; t < 4; ++t) {
    x.set(t * 120 + 3, set[t][0]);
    x.set(t * 120 + 77, set[t][1]);
  }
  const std::vector<std::int64_t> m = masked->decode(x).best(), r = ranked->decode(x).best();
  EXPECT_EQ(m, (std::vector<std::int64_t>{0, 77, 77, 0}));
  EXPECT_EQ(r, (std::vector<std::int64_t>{77, 77, 77, 3}));
  // The same through the helper, against a literal masked argmax.
  std::vector<std::uint8_t> mask(120, 0);
  mask[3] = mask[77] = 1;
  const lminv::Decoded top = lminv::pinv::masked_top_k_rows(x.data<double>(), 4, 120, 2, mask);
  for (std::int64_t t = 0; t < 4; ++t) {
    std::vector<double> row(120);
    for (std::int64_t v = 0; v < 120; ++v) row[v] = x.get(t * 120 + v) * mask[v];
    const std::vector<std::int64_t> expected = brute_top_k(row.data(), 120, 2);
    EXPECT_EQ(top.id(t, 0), expected[0]);
    EXPECT_EQ(top.id(t, 1), expected[1]);
  }
  // A mask needs tokens to keep.
  const std::string message = error_of([&] { make_decoder(spec, nullptr, {{"restrict", "mask"}}); });
  EXPECT_NE(message.find("restrict"), std::string::npos) << message;
  EXPECT_NE(error_of([&] { make_decoder(spec, nullptr, {{"restrict", "argmax"}}); }).find("allowed | mask"),
            std::string::npos);
}

TEST(PinvDecoder, VocabSpaceInputDecodesDirectly) {
  // No wte needed: the input already is a score per token.
  const auto spec = spec_of(120, 8, InputSpace::vocab);
  const auto decoder = make_decoder(spec, std::make_shared<lminv::WeightSet>(), {{"top_k", "3"}});
  const Tensor x = random_tensor({6, 120}, 17);
  const lminv::Decoded out = decoder->decode(x);
  for (std::int64_t t = 0; t < 6; ++t) {
    const std::vector<std::int64_t> expected = brute_top_k(x.data<double>() + t * 120, 120, 3);
    for (std::int64_t r = 0; r < 3; ++r) {
      EXPECT_EQ(out.id(t, r), expected[r]);
      EXPECT_EQ(out.score(t, r), x.get(t * 120 + expected[r]));
    }
  }
  // One-hot rows decode to their ids, in f32 and with a batch dimension.
  const std::vector<std::int64_t> ids = {5, 119, 0, 64};
  Tensor one_hot(DType::f32, {1, 4, 120});
  for (std::size_t t = 0; t < ids.size(); ++t) one_hot.set(static_cast<std::int64_t>(t) * 120 + ids[t], 1.0);
  EXPECT_EQ(decoder->decode(one_hot).best(), ids);

  const auto restricted = make_decoder(spec, nullptr, {{"allowed", "3 77"}});
  const lminv::Decoded some = restricted->decode(x);
  for (std::int64_t t = 0; t < 6; ++t)
    EXPECT_EQ(some.id(t), x.get(t * 120 + 3) >= x.get(t * 120 + 77) ? 3 : 77);

  EXPECT_THROW(decoder->decode(random_tensor({6, 8}, 18)), lminv::Error);
  EXPECT_THROW(decoder->pinv_scores(random_tensor({6, 8}, 18)), lminv::Error);
}

TEST(PinvDecoder, InputAndSetupErrors) {
  const auto weights = random_wte(100, 8, DType::f64, 19);
  PseudoInverseDecoder unprepared;
  unprepared.configure(options({}));
  EXPECT_THROW(unprepared.decode(random_tensor({2, 8}, 20)), lminv::Error);

  const auto decoder = make_decoder(spec_of(100, 8), weights);
  std::string message = error_of([&] { decoder->decode(random_tensor({2, 9}, 21)); });
  EXPECT_NE(message.find("[2, 9]"), std::string::npos) << message;
  EXPECT_THROW(decoder->decode(random_tensor({2, 2, 8}, 21)), lminv::Error);

  // wte missing or of the wrong shape for the spec.
  message = error_of([&] { make_decoder(spec_of(100, 8), std::make_shared<lminv::WeightSet>()); });
  EXPECT_NE(message.find("wte.weight"), std::string::npos) << message;
  message = error_of([&] { make_decoder(spec_of(101, 8), weights); });
  EXPECT_NE(message.find("wte.weight"), std::string::npos) << message;
}

}  // namespace
