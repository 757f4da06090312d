// The sequential and brute_force optimizers (plugins/optimizer-sequential): exact recovery on small random GPT-2
// models in every backend built here, with the backend's prefix cache and without it; the certificate; repeated
// tokens, one-token prompts, tokens from the whole id range; epsilon growth; errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "families/family.hpp"
#include "lminv/lminv.hpp"
#include "lminv/prefix_cache.hpp"
#include "registry.hpp"
#include "test_backends.hpp"
#include "sequential.hpp"
#include "weights_init.hpp"

using namespace lminv;

namespace {

using lminv::test::backends_under_test;

std::shared_ptr<Backend> backend(const std::string& name) {
  static const Registry registry({LMINV_BUILD_PLUGIN_DIR});
  static std::map<std::string, std::shared_ptr<Backend>> made;
  std::shared_ptr<Backend>& b = made[name];
  if (!b) {
    b = registry.create_backend(name);
    b->configure(Options("backend", "sequential_test", {{"threads", "1"}}));
  }
  return b;
}

class NoDecoder final : public Decoder {
 public:
  void configure(const Options&) override {}
  void prepare(const DecoderSetup&) override {}
  Decoded decode(const Tensor&) override { throw Error("not used"); }
};

class Quiet final : public Observer {
 public:
  void on_step(const Step& step) override { steps.push_back(step.index); }
  std::vector<std::int64_t> steps;
};

ModelSpec small_gpt2(DType dtype, std::int64_t vocab = 97, std::int64_t T = 6) {
  ModelSpec s;
  s.family = "gpt2";
  s.n_layer = 2;
  s.n_embd = 32;
  s.n_head = 4;
  s.vocab_size = vocab;
  s.n_positions = 16;
  s.seq_len = T;
  s.blocks = 2;
  s.head = Head::none;
  s.dtype = dtype;
  return s;
}

// A small model of a decoder family (its architecture from the family's adapter), grouped kv heads where it has them.
ModelSpec small_family(const std::string& name, DType dtype) {
  ModelSpec s = small_gpt2(dtype);
  s.family = name;
  family(name).set_architecture(s);
  s.n_inner = 48;
  if (name == "llama" || name == "mistral" || name == "qwen2") s.arch.n_kv_head = 2;
  if (name == "gpt_neox") s.n_head = 2;  // head_dim 16: rotary_pct 0.25 rotates 4 features
  return s;
}

std::shared_ptr<const WeightSet> weights_for(const ModelSpec& spec) {
  static std::map<std::string, std::shared_ptr<const WeightSet>> made;
  const std::string key = spec.family + "/" + std::to_string(spec.vocab_size) + "/" + std::to_string(spec.n_embd);
  auto& w = made[key];
  if (!w) w = std::make_shared<const WeightSet>(init_random_weights(spec, 11));
  return w;
}

Tensor embed(const std::vector<std::int64_t>& ids, const ModelSpec& spec, const WeightSet& w) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  Tensor x(spec.dtype, {1, T, spec.input == InputSpace::embedding ? spec.n_embd : spec.vocab_size});
  if (spec.input == InputSpace::vocab) {
    for (std::int64_t t = 0; t < T; ++t) x.set(t * spec.vocab_size + ids[t], 1.0);
    return x;
  }
  const Tensor& wte = w.get("wte.weight");
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < spec.n_embd; ++j) x.set(t * spec.n_embd + j, wte.get(ids[t] * spec.n_embd + j));
  return x;
}

struct Inversion {
  Result result;
  std::vector<std::int64_t> steps;
};

// Inverts ids on `backend` with `optimizer` configured by `options` (on `weights`, else weights_for(spec)).
Inversion invert(const std::string& backend_name, ModelSpec spec, const std::vector<std::int64_t>& ids,
           Optimizer& optimizer, const std::map<std::string, std::string>& options, double target_noise = 0,
           const std::vector<std::int64_t>& known_prefix = {}, std::shared_ptr<const WeightSet> weights = nullptr) {
  spec.seq_len = static_cast<std::int64_t>(ids.size());
  const std::shared_ptr<const WeightSet> w = weights ? weights : weights_for(spec);
  std::unique_ptr<Model> model = backend(backend_name)->create_model(spec, w);
  const Tensor x = embed(ids, spec, *w);
  Tensor target = model->forward(x);
  if (target_noise > 0) {
    Rng rng(3);
    for (std::int64_t i = 0; i < target.numel(); ++i) target.set(i, target.get(i) * (1 + target_noise * rng.normal()));
  }
  optimizer.configure(Options("optimizer", "sequential_test", options));
  NoDecoder decoder;
  Problem problem{*model, target, x, ids, decoder, w, Rng(5), known_prefix, 0};
  Quiet observer;
  Inversion run{optimizer.run(problem, observer), observer.steps};
  return run;
}

std::vector<std::int64_t> random_ids(std::int64_t T, std::int64_t V, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int64_t> ids;
  for (std::int64_t t = 0; t < T; ++t) ids.push_back(static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(V))));
  return ids;
}

void expect_certified(const Result& r, std::size_t T) {
  ASSERT_EQ(r.series.at("margin").size(), T);
  for (std::size_t t = 0; t < T; ++t) {
    EXPECT_GT(r.series.at("margin")[t], 0) << "position " << t;
    EXPECT_EQ(r.series.at("verified")[t], 1.0) << "position " << t;
    EXPECT_LE(r.series.at("distance")[t], r.series.at("epsilon")[t]) << "position " << t;
    EXPECT_GT(r.series.at("best_rejected")[t], r.series.at("epsilon")[t]) << "position " << t;
  }
}

struct BackendCase {
  std::string backend;
  DType dtype;
};

std::vector<BackendCase> backend_cases() {
  std::vector<BackendCase> cases;
  for (const std::string& b : backends_under_test()) {
    if (b == "reference" || b == "torch") cases.push_back({b, DType::f64});
    cases.push_back({b, DType::f32});
  }
  return cases;
}

}  // namespace

// Every backend, every policy, the backend's prefix cache on and off: the prompt comes back exactly, certified, with
// the same tokens and the same candidates verified either way.
TEST(Sequential, RecoversExactlyInEveryBackendWithAndWithoutCache) {
  for (const BackendCase& c : backend_cases()) {
    const ModelSpec spec = small_gpt2(c.dtype);
    const std::vector<std::int64_t> ids = random_ids(6, spec.vocab_size, 42);
    for (const char* policy : {"linearized", "gradient", "random"}) {
      SCOPED_TRACE(c.backend + " " + dtype_name(c.dtype) + " policy " + policy);
      sequential::SequentialOptimizer with, without;
      const Inversion a = invert(c.backend, spec, ids, with, {{"policy", policy}, {"batch", "4"}, {"proxy_steps", "10"}});
      const Inversion b = invert(c.backend, spec, ids, without,
                           {{"policy", policy}, {"batch", "4"}, {"proxy_steps", "10"}, {"cache", "false"}});
      EXPECT_EQ(a.result.ids, ids);
      EXPECT_EQ(b.result.ids, ids);
      expect_certified(a.result, ids.size());
      expect_certified(b.result, ids.size());
      EXPECT_EQ(b.result.values.at("backend_prefix_cache"), 0.0);
      if (c.backend == "reference" || c.backend == "torch" || c.backend == "onednn") {
        EXPECT_EQ(a.result.values.at("backend_prefix_cache"), 1.0) << "the backend offers no prefix cache";
      }
      if (std::string(policy) != "gradient") {  // the proxy's descent may round differently through the two paths
        EXPECT_EQ(a.result.series.at("candidates"), b.result.series.at("candidates"));
      }
      if (c.backend == "reference") {  // the reference's cached path is its forward pass, operation for operation
        EXPECT_EQ(a.result.series.at("distance"), b.result.series.at("distance"));
      }
      EXPECT_EQ(a.steps, (std::vector<std::int64_t>{1, 2, 3, 4, 5, 6}));
      // The result's input is the tokens' embedding rows.
      const Tensor rows = embed(ids, spec, *weights_for(spec));
      EXPECT_EQ(a.result.input.shape(), rows.shape());
      for (std::int64_t i = 0; i < rows.numel(); ++i) ASSERT_EQ(a.result.input.get(i), rows.get(i));
    }
  }
}

// Every decoder family in every backend: the linearized and gradient policies recover a short prompt exactly.
TEST(Sequential, RecoversEveryFamilyInEveryBackend) {
  for (const char* name : {"llama", "mistral", "qwen2", "gpt_neox"})
    for (const BackendCase& c : backend_cases()) {
      const ModelSpec spec = small_family(name, c.dtype);
      const std::vector<std::int64_t> ids = random_ids(5, spec.vocab_size, 7);
      for (const char* policy : {"linearized", "gradient"}) {
        SCOPED_TRACE(std::string(name) + " " + c.backend + " " + dtype_name(c.dtype) + " policy " + policy);
        sequential::SequentialOptimizer optimizer;
        const Inversion a = invert(c.backend, spec, ids, optimizer, {{"policy", policy}, {"batch", "4"}, {"proxy_steps", "10"}});
        EXPECT_EQ(a.result.ids, ids);
        expect_certified(a.result, ids.size());
      }
    }
}

// The paper's policy and ours differ in how far down their ranking the true token sits; `linearized` should find it
// in the first batch here (a 2-block model), which is what makes it fast. Widths 32 and 40 (the ranking pass reads
// the embeddings 16 entries at a time, then the rest), and either ranking alone.
TEST(Sequential, LinearizedRanksTheTrueTokenFirst) {
  for (std::int64_t d : {32, 40})
    for (const char* scalar : {"true", "false"}) {
      SCOPED_TRACE("d " + std::to_string(d) + " scalar_ranking " + scalar);
      ModelSpec spec = small_gpt2(DType::f64);
      spec.n_embd = d;
      const std::vector<std::int64_t> ids = random_ids(6, spec.vocab_size, 7);
      sequential::SequentialOptimizer opt;
      // certify_next = 0: the candidates counted are the ranking's own, not the certificate's extra ones.
      const Inversion r = invert("reference", spec, ids, opt,
                                 {{"policy", "linearized"}, {"batch", "4"}, {"certify_next", "0"},
                                  {"scalar_ranking", scalar}});
      ASSERT_EQ(r.result.ids, ids);
      for (double rank : r.result.series.at("true_rank")) EXPECT_LT(rank, 4);
      EXPECT_LE(r.result.values.at("candidates_per_position"), 4 * 2);
    }
}

// One optimizer over several prompts (a sweep): the linearizations that do not depend on the prompt are computed once
// and then taken from the session's cache: the first position's and the second's (after the mean embedding) from the
// first prompt on, the later positions' generic ones from the second prompt on, one more per prompt. A linearization
// from the cache gives the same search as the same one computed afresh: same ranks, candidates and distances (the
// reference is deterministic).
TEST(Sequential, LinearizedSessionCacheGivesTheSameSearch) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> a = random_ids(6, spec.vocab_size, 21), b = random_ids(5, spec.vocab_size, 22);
  auto same_search = [](const Result& x, const Result& y, std::size_t positions) {
    for (const char* name : {"rank", "true_rank", "candidates", "distance", "best_rejected"}) {
      const std::vector<double>& p = x.series.at(name);
      const std::vector<double>& q = y.series.at(name);
      ASSERT_GE(p.size(), positions);
      ASSERT_GE(q.size(), positions);
      EXPECT_EQ(std::vector<double>(p.begin(), p.begin() + positions),
                std::vector<double>(q.begin(), q.begin() + positions))
          << name;
    }
  };
  // b as a session's 1st, 2nd, 3rd and 5th prompt.
  std::vector<Inversion> b_runs;
  for (int before : {0, 1, 2, 4}) {
    sequential::SequentialOptimizer session;
    for (int i = 0; i < before; ++i) EXPECT_EQ(invert("reference", spec, a, session, {{"batch", "4"}}).result.ids, a);
    b_runs.push_back(invert("reference", spec, b, session, {{"batch", "4"}}));
  }
  for (const Inversion& r : b_runs) {
    EXPECT_EQ(r.result.ids, b);
    expect_certified(r.result, b.size());
  }
  auto cached = [&](int i) { return b_runs[i].result.values.at("jacobians_cached"); };
  auto computed = [&](int i) { return b_runs[i].result.values.at("jacobians"); };
  // 1st: computes the J of positions 0 and 1 (and any its search needs). 2nd: takes those two and computes the
  // generic J of position 2. 3rd: takes three, computes position 3's. 5th: takes all five it needs (0 .. 4).
  EXPECT_EQ(cached(0), 0.0);
  EXPECT_GE(computed(0), 2.0);
  EXPECT_EQ(cached(1), 2.0);
  EXPECT_GE(computed(1), 1.0);
  EXPECT_EQ(cached(2), 3.0);
  EXPECT_GE(computed(2), 1.0);
  EXPECT_EQ(cached(3), 5.0);
  EXPECT_EQ(computed(3), computed(2) - 1);
  same_search(b_runs[0].result, b_runs[1].result, 2);  // positions 0, 1: the same J's, cached or not
  same_search(b_runs[1].result, b_runs[2].result, 3);  // 0 .. 2
  same_search(b_runs[2].result, b_runs[3].result, 4);  // 0 .. 3
  // session_cache = false keeps nothing.
  sequential::SequentialOptimizer uncached;
  invert("reference", spec, a, uncached, {{"session_cache", "false"}});
  const Inversion again = invert("reference", spec, b, uncached, {{"session_cache", "false"}});
  EXPECT_EQ(again.result.ids, b);
  EXPECT_EQ(again.result.values.at("jacobians_cached"), 0.0);
}

// The cache follows what the linearizations depend on: another output (blocks, head), another dtype, another weights
// object of the same shape or another known prefix finds nothing kept; the prompt's length does not matter.
TEST(Sequential, LinearizedSessionCacheFollowsTheModelWeightsAndPrefix) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> ids = random_ids(5, spec.vocab_size, 31);
  sequential::SequentialOptimizer session;
  auto cached = [&](const ModelSpec& s, std::shared_ptr<const WeightSet> w = nullptr,
                    const std::vector<std::int64_t>& known = {}) {
    const Inversion r = invert("reference", s, ids, session, {}, 0, known, std::move(w));
    EXPECT_EQ(r.result.ids, ids);
    return r.result.values.at("jacobians_cached");
  };
  EXPECT_EQ(cached(spec), 0.0);
  EXPECT_EQ(cached(spec), 2.0);
  ModelSpec fewer = spec;
  fewer.blocks = 1;
  EXPECT_EQ(cached(fewer), 0.0) << "blocks";
  ModelSpec normed = spec;
  normed.head = Head::ln_f;
  EXPECT_EQ(cached(normed), 0.0) << "head";
  ModelSpec single = spec;
  single.dtype = DType::f32;
  EXPECT_EQ(cached(single), 0.0) << "dtype";
  EXPECT_EQ(cached(spec, nullptr, {ids[0]}), 0.0) << "a known prefix";
  EXPECT_EQ(cached(spec, nullptr, {ids[0]}), 2.0);
  const auto other = std::make_shared<const WeightSet>(init_random_weights(spec, 12));
  EXPECT_EQ(cached(spec, other), 0.0) << "another weights object";
  EXPECT_EQ(cached(spec, other), 2.0);
  EXPECT_EQ(cached(spec), 0.0) << "back to the first weights: their entries went with the other weights";
  // A longer prompt of the same model: seq_len is not part of the key.
  const std::vector<std::int64_t> longer = random_ids(7, spec.vocab_size, 32);
  const Inversion r = invert("reference", spec, longer, session, {});
  EXPECT_EQ(r.result.ids, longer);
  EXPECT_EQ(r.result.values.at("jacobians_cached"), 2.0);
}

// Forced fallbacks (relinearize_after = 1, one candidate per call, no certificate candidates): when the reused J's
// first candidate misses, the policy takes this position's exact gradient J_t^T r by a backward pass, once, before
// any new J; a Jacobian comes only when the gradient's ranking misses too. The search stays exact either way.
TEST(Sequential, LinearizedGradientFallbackBeforeANewJacobian) {
  for (const BackendCase& c : backend_cases()) {
    SCOPED_TRACE(c.backend + " " + dtype_name(c.dtype));
    ModelSpec spec = small_gpt2(c.dtype);
    spec.head = Head::ln_f;
    const std::vector<std::int64_t> ids = random_ids(8, spec.vocab_size, 41);
    // A finite-difference step 1e6 times the embeddings' spread: with ln_f's bounded output, a J near 0 whose
    // rankings miss (the backward pass's gradient does not depend on the step).
    const std::map<std::string, std::string> forced{
        {"batch", "1"},           {"relinearize_after", "1"},  {"certify_next", "0"}, {"scalar_ranking", "false"},
        {"session_cache", "false"}, {"fd_step", "1e6"}};
    std::map<std::string, std::string> no_fallback = forced;
    no_fallback["gradient_fallback"] = "false";
    sequential::SequentialOptimizer with, without;
    const Inversion g = invert(c.backend, spec, ids, with, forced);
    const Inversion j = invert(c.backend, spec, ids, without, no_fallback);
    EXPECT_EQ(g.result.ids, ids);
    EXPECT_EQ(j.result.ids, ids);
    for (double ok : g.result.series.at("verified")) EXPECT_EQ(ok, 1.0);
    auto positions_beyond = [&](const Result& r, double n) {  // positions after the first with > n candidates
      double count = 0;
      for (std::size_t t = 1; t < ids.size(); ++t) count += r.series.at("candidates")[t] > n ? 1 : 0;
      return count;
    };
    ASSERT_GT(positions_beyond(g.result, 1), 0) << "no reused ranking missed: the fallback was not exercised";
    EXPECT_EQ(g.result.values.at("gradients"), positions_beyond(g.result, 1));
    EXPECT_GE(g.result.values.at("jacobians"), 1 + positions_beyond(g.result, 2));
    EXPECT_EQ(j.result.values.at("gradients"), 0.0);
    EXPECT_GE(j.result.values.at("jacobians"), 1 + positions_beyond(j.result, 1));
    EXPECT_LT(g.result.values.at("jacobians"), j.result.values.at("jacobians"));
  }
}

TEST(Sequential, RepeatedTokensOneTokenAndTheWholeIdRange) {
  sequential::SequentialOptimizer opt;
  const ModelSpec spec = small_gpt2(DType::f64);
  EXPECT_EQ(invert("reference", spec, {5, 5, 5, 5, 5}, opt, {}).result.ids, (std::vector<std::int64_t>{5, 5, 5, 5, 5}));
  const Inversion one = invert("reference", spec, {96}, opt, {});
  EXPECT_EQ(one.result.ids, (std::vector<std::int64_t>{96}));
  expect_certified(one.result, 1);
  // GPT-2's whole vocabulary (d = 32): the first and last ids, and some in between.
  const ModelSpec big = small_gpt2(DType::f32, 50257);
  const std::vector<std::int64_t> edge{0, 50256, 25128, 1, 50255, 50256};
  const Inversion r = invert("reference", big, edge, opt, {{"batch", "8"}});
  EXPECT_EQ(r.result.ids, edge);
  expect_certified(r.result, edge.size());
}

TEST(Sequential, InputInVocabularySpace) {
  ModelSpec spec = small_gpt2(DType::f64);
  spec.input = InputSpace::vocab;
  spec.head = Head::lm_head;
  const std::vector<std::int64_t> ids = random_ids(4, spec.vocab_size, 9);
  sequential::SequentialOptimizer gradient, random, linearized;
  EXPECT_EQ(invert("reference", spec, ids, gradient, {{"policy", "gradient"}, {"proxy_steps", "5"}}).result.ids, ids);
  EXPECT_EQ(invert("reference", spec, ids, random, {{"policy", "random"}}).result.ids, ids);
  try {
    invert("reference", spec, ids, linearized, {{"policy", "linearized"}});
    ADD_FAILURE() << "policy linearized with input = vocab did not fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("input = embedding"), std::string::npos) << e.what();
  }
}

// A head, extra layers, a truncated model: the search works from any output.
TEST(Sequential, AnyOutput) {
  for (Head head : {Head::none, Head::ln_f, Head::lm_head})
    for (std::int64_t blocks : {0, 1, 2}) {
      ModelSpec spec = small_gpt2(DType::f64);
      spec.head = head;
      spec.blocks = blocks;
      if (blocks == 1) spec.layers = {2};
      SCOPED_TRACE(std::string(head_name(head)) + " blocks " + std::to_string(blocks));
      const std::vector<std::int64_t> ids = random_ids(5, spec.vocab_size, 100 + blocks);
      sequential::SequentialOptimizer opt;
      const Inversion r = invert("reference", spec, ids, opt, {});
      EXPECT_EQ(r.result.ids, ids);
      expect_certified(r.result, ids.size());
    }
}

// A target no token reaches exactly (noise of 1e-6 relative): without relax, nothing passes the first epsilon, a
// whole pass runs, and epsilon grows until the closest token passes: still the true one.
TEST(Sequential, EpsilonGrowsOnlyWhenNothingVerifies) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> ids = random_ids(4, spec.vocab_size, 12);
  sequential::SequentialOptimizer opt;
  const Inversion r = invert("reference", spec, ids, opt, {{"epsilon", "1e-12"}, {"relax", "false"}}, 1e-6);
  EXPECT_EQ(r.result.ids, ids);
  for (std::size_t t = 0; t < ids.size(); ++t) {
    EXPECT_GT(r.result.series.at("epsilon")[t], 1e-12);
    EXPECT_EQ(r.result.series.at("candidates")[t], spec.vocab_size);  // the whole pass
    EXPECT_EQ(r.result.series.at("verified")[t], 1.0);
  }
  sequential::SequentialOptimizer clean;
  const Inversion c = invert("reference", spec, ids, clean, {{"epsilon", "1e-12"}});
  for (double eps : c.result.series.at("epsilon")) EXPECT_EQ(eps, 1e-12);
}

// The same noisy target with relax (the default): position 0 verifies relax_after candidates, takes the clear winner
// and raises epsilon to its distance; the later positions accept at the first hit under epsilon = level_factor x
// that level (level_factor 2). Every position is marked relaxed, and the true token is found at each.
TEST(Sequential, RelaxFollowsTheObservedLevel) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> ids = random_ids(4, spec.vocab_size, 12);
  sequential::SequentialOptimizer opt;
  const Inversion r =
      invert("reference", spec, ids, opt, {{"epsilon", "1e-12"}, {"relax_after", "8"}, {"batch", "4"}}, 1e-6);
  EXPECT_EQ(r.result.ids, ids);
  const auto& s = r.result.series;
  EXPECT_GE(s.at("candidates")[0], 8);
  EXPECT_LT(s.at("candidates")[0], spec.vocab_size);  // no whole pass
  for (std::size_t t = 0; t < ids.size(); ++t) {
    EXPECT_EQ(s.at("relaxed")[t], 1.0) << t;
    EXPECT_EQ(s.at("verified")[t], 1.0) << t;
    EXPECT_GT(s.at("distance")[t], 1e-9) << t;  // the noise, not rounding
    EXPECT_EQ(s.at("ties")[t], 0.0) << t;
  }
  for (std::size_t t = 1; t < ids.size(); ++t) {
    EXPECT_GE(s.at("epsilon")[t], 2 * s.at("distance")[0] * 0.999) << t;
    EXPECT_LT(s.at("candidates")[t], spec.vocab_size) << t;
  }
  EXPECT_GT(r.result.values.at("observed_level"), 1e-9);
}

// A policy with a fixed order at one position (the test's), vocabulary order elsewhere.
class FixedOrder final : public sequential::CandidateSource {
 public:
  FixedOrder(sequential::Index position, std::vector<sequential::Index> order)
      : position_(position), fixed_(std::move(order)) {}
  void begin(sequential::Verifier& v) override {
    order_.clear();
    at_ = 0;
    if (v.position() == position_) order_ = fixed_;
    else
      for (sequential::Index id = 0; id < v.vocab(); ++id) order_.push_back(id);
  }
  std::vector<sequential::Index> next(sequential::Verifier& v, sequential::Index n) override {
    std::vector<sequential::Index> ids;
    while (at_ < order_.size() && static_cast<sequential::Index>(ids.size()) < n) {
      const sequential::Index id = order_[at_++];
      if (!v.verified(id)) ids.push_back(id);
    }
    return ids;
  }

 private:
  sequential::Index position_;
  std::vector<sequential::Index> fixed_, order_;
  std::size_t at_ = 0;
};

// The clear-winner rule on a target this computation made itself (every earlier position matched within epsilon):
// the policy hands out first a wrong token that stands clear (by unique_ratio) of the next 7 it hands out, and the
// prompt's own token last. Taken as a clear winner after relax_after = 8 candidates, the wrong token would be
// accepted (as relax_after_exact = 8 shows); by default the rule waits for relax_after_exact (4096) candidates, so
// the search reaches the right token (found this way on trained weights: docs/exact-inversion.md).
TEST(Sequential, AClearWinnerWaitsWhileTheTargetIsThisComputationsOwn) {
  const ModelSpec spec = [] {
    ModelSpec s = small_gpt2(DType::f64);
    s.seq_len = 3;
    return s;
  }();
  const std::vector<std::int64_t> ids = random_ids(3, spec.vocab_size, 21);
  const std::shared_ptr<const WeightSet> w = weights_for(spec);
  std::unique_ptr<Model> model = backend("reference")->create_model(spec, w);
  const Tensor x = embed(ids, spec, *w);
  const Tensor target = model->forward(x);
  // Every token's relative distance at position 1 after the prompt's first token.
  const std::int64_t V = spec.vocab_size, d = spec.n_embd, D = target.dim(-1);
  ModelSpec two = spec;
  two.seq_len = 2;
  std::unique_ptr<Model> pair_model = backend("reference")->create_model(two, w);
  const Tensor& wte = w->get("wte.weight");
  Tensor pairs(DType::f64, {V, 2, d});
  for (std::int64_t v = 0; v < V; ++v)
    for (std::int64_t j = 0; j < d; ++j) {
      pairs.set((v * 2) * d + j, wte.get(ids[0] * d + j));
      pairs.set((v * 2 + 1) * d + j, wte.get(v * d + j));
    }
  const Tensor out = pair_model->forward(pairs);
  double y_norm = 0;
  for (std::int64_t j = 0; j < D; ++j) y_norm += target.get(D + j) * target.get(D + j);
  std::vector<std::pair<double, std::int64_t>> dist;
  for (std::int64_t v = 0; v < V; ++v) {
    if (v == ids[1]) continue;
    double sq = 0;
    for (std::int64_t j = 0; j < D; ++j) {
      const double e = out.get((v * 2 + 1) * D + j) - target.get(D + j);
      sq += e * e;
    }
    dist.emplace_back(std::sqrt(sq / y_norm), v);
  }
  std::sort(dist.begin(), dist.end());
  // The decoy: the closest wrong token, then the 7 farthest, the rest, and the prompt's token last. On random weights
  // the wrong tokens lie closer together than on trained ones, so unique_ratio is set between the decoy's distance
  // and the nearest of the 7 (the default 3 on trained weights).
  std::vector<sequential::Index> order{dist[0].second};
  for (std::size_t i = dist.size() - 7; i < dist.size(); ++i) order.push_back(dist[i].second);
  for (std::size_t i = 1; i + 7 < dist.size(); ++i) order.push_back(dist[i].second);
  order.push_back(ids[1]);
  ASSERT_EQ(static_cast<std::int64_t>(order.size()), V);
  const double gap = dist[dist.size() - 7].first / dist[0].first;
  ASSERT_GT(gap, 1.1);
  const std::string ratio = std::to_string((1 + gap) / 2);

  auto search = [&](const std::map<std::string, std::string>& settings) {
    sequential::SearchOptions options;
    options.read(Options("optimizer", "sequential_test", settings));
    FixedOrder policy(1, order);
    NoDecoder decoder;
    Problem problem{*model, target, x, ids, decoder, w, Rng(5), {}, 0};
    Quiet observer;
    return sequential::run_search(problem, observer, options, policy, "test");
  };
  const std::map<std::string, std::string> base{
      {"relax_after", "8"}, {"batch", "8"}, {"unique_ratio", ratio}, {"epsilon_max", "10"}};
  std::map<std::string, std::string> hasty_settings = base;
  hasty_settings["relax_after_exact"] = "8";
  const Result hasty = search(hasty_settings);
  EXPECT_EQ(hasty.ids[1], dist[0].second);  // the wrong token, taken as a clear winner
  EXPECT_EQ(hasty.series.at("relaxed")[1], 1.0);
  const Result patient = search(base);
  EXPECT_EQ(patient.ids, ids);
  EXPECT_EQ(patient.series.at("relaxed")[1], 0.0);
  EXPECT_EQ(patient.series.at("candidates")[1], V);  // it went on to the last, the right one
}

// A known prefix is checked and fixed, never searched; a wrong one is an error naming the position.
TEST(Sequential, KnownPrefixIsFixedAndChecked) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> ids = random_ids(5, spec.vocab_size, 21);
  sequential::SequentialOptimizer opt;
  const Inversion r = invert("reference", spec, ids, opt, {}, 0, {ids[0], ids[1]});
  EXPECT_EQ(r.result.ids, ids);
  EXPECT_EQ(r.result.series.at("known")[0], 1.0);
  EXPECT_EQ(r.result.series.at("known")[1], 1.0);
  EXPECT_EQ(r.result.series.at("candidates")[1], 1.0);
  EXPECT_EQ(r.result.series.at("known")[2], 0.0);
  EXPECT_EQ(r.result.values.at("known_positions"), 2.0);
  sequential::SequentialOptimizer wrong;
  try {
    invert("reference", spec, ids, wrong, {}, 0, {ids[0], (ids[1] + 1) % spec.vocab_size});
    ADD_FAILURE() << "a wrong known prefix was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not match the target at position 1"), std::string::npos) << e.what();
  }
}

TEST(BruteForce, ScansInVocabularyOrder) {
  const ModelSpec spec = small_gpt2(DType::f64);
  const std::vector<std::int64_t> ids{40, 3, 96, 3};
  sequential::BruteForceOptimizer first, all;
  const Inversion a = invert("reference", spec, ids, first, {{"batch", "8"}});
  EXPECT_EQ(a.result.ids, ids);
  // scan = first stops in the batch holding the token: ids rounded up to the batch.
  for (std::size_t t = 0; t < ids.size(); ++t)
    EXPECT_EQ(a.result.series.at("candidates")[t], std::min<double>(spec.vocab_size, (ids[t] / 8 + 1) * 8));
  const Inversion b = invert("reference", spec, ids, all, {{"scan", "all"}, {"batch", "32"}});
  EXPECT_EQ(b.result.ids, ids);
  expect_certified(b.result, ids.size());
  for (double n : b.result.series.at("candidates")) EXPECT_EQ(n, spec.vocab_size);
}

TEST(Sequential, Errors) {
  sequential::SequentialOptimizer opt;
  auto configure_fails = [&](const std::map<std::string, std::string>& o, const std::string& key) {
    try {
      opt.configure(Options("optimizer", "test.ini", o));
      ADD_FAILURE() << "accepted " << key;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  configure_fails({{"policy", "magic"}}, "policy");
  configure_fails({{"batch", "0"}}, "batch");
  configure_fails({{"epsilon", "-1"}}, "epsilon");
  configure_fails({{"epsilon_growth", "1"}}, "epsilon_growth");
  configure_fails({{"fd_step", "0"}}, "fd_step");
  // A model whose output at t depends on later positions cannot be searched position by position.
  ModelSpec fc;
  fc.family = "fcnet";
  if (auto kind = parse_kind(fc.family)) fc.kind = *kind;
  fc.n_embd = 8;
  fc.vocab_size = 11;
  fc.seq_len = 2;
  fc.dtype = DType::f64;
  const auto w = std::make_shared<const WeightSet>(init_random_weights(fc, 1));
  std::unique_ptr<Model> model = backend("reference")->create_model(fc, w);
  const Tensor x = embed({1, 2}, fc, *w);
  NoDecoder decoder;
  Quiet observer;
  Problem problem{*model, model->forward(x), x, {1, 2}, decoder, w, Rng(1), {}, 0};
  sequential::SequentialOptimizer ok;
  ok.configure(Options("optimizer", "test.ini", {}));
  try {
    ok.run(problem, observer);
    ADD_FAILURE() << "fcnet accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("causal"), std::string::npos) << e.what();
  }
}

// NaN where the search looks: a target that holds one is refused at once; a candidate whose output is NaN (its
// embedding row spoilt) stops the search with an Error naming it, in every policy. Before, NaN distances never
// verified and the linearized policy read row -1 of the embeddings (a crash).
TEST(Sequential, NanTargetsAndNanOutputsAreErrorsNotCrashes) {
  const ModelSpec spec = small_gpt2(DType::f64, 23, 3);
  WeightSet spoilt = *weights_for(spec);
  Tensor wte = spoilt.get("wte.weight");
  for (std::int64_t j = 0; j < spec.n_embd; ++j) wte.set(5 * spec.n_embd + j, NAN);
  spoilt.set("wte.weight", std::move(wte));
  const auto w = std::make_shared<const WeightSet>(std::move(spoilt));
  for (const char* policy : {"linearized", "gradient", "random"}) {
    SCOPED_TRACE(policy);
    sequential::SequentialOptimizer opt;
    try {
      invert("reference", spec, {1, 2, 3}, opt, {{"policy", policy}}, 0, {}, w);
      ADD_FAILURE() << "a search through a NaN output succeeded";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_TRUE(msg.find("not finite") != std::string::npos || msg.find("NaN") != std::string::npos) << msg;
    }
  }
  // The target itself.
  ModelSpec s = spec;
  s.seq_len = 2;
  const auto good = weights_for(spec);
  std::unique_ptr<Model> model = backend("reference")->create_model(s, good);
  const Tensor x = embed({1, 2}, s, *good);
  Tensor target = model->forward(x);
  target.set(target.numel() - 1, NAN);
  NoDecoder decoder;
  Quiet observer;
  Problem problem{*model, target, x, {1, 2}, decoder, good, Rng(1), {}, 0};
  sequential::SequentialOptimizer opt;
  opt.configure(Options("optimizer", "test.ini", {}));
  try {
    opt.run(problem, observer);
    ADD_FAILURE() << "a NaN target was searched";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the target holds NaN at position 1"), std::string::npos) << e.what();
  }
}
