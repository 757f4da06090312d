// The pez optimizer (plugins/optimizer-pez): its nearest-token projection against a brute-force search, and runs on
// small reference models checked from the outside:
//   - every step's input is a hard prompt (exact wte rows) whose loss is the model's distance to the target;
//   - the trajectory is the PEZ rule, re-implemented here with a brute-force projection: the continuous prompt moves
//     by the gradient taken at its projection (sgd and AdamW with decoupled weight decay);
//   - the result is the best projected prompt of the run, its ids the projection of its input;
//   - a tiny GPT-2's prompt is recovered exactly, and the run stops there;
// and bad options, input = vocab and a missing wte.weight are errors naming the key or the weight.
#include "pez.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lminv/ops.hpp"
#include "lminv/options.hpp"
#include "reference_backend.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class NullDecoder final : public Decoder {
 public:
  void configure(const Options&) override {}
  void prepare(const DecoderSetup&) override {}
  Decoded decode(const Tensor&) override { return {}; }
};

// Every step as the observer saw it.
class Recorder final : public Observer {
 public:
  void on_step(const Step& step) override {
    indices.push_back(step.index);
    totals.push_back(step.total);
    ASSERT_EQ(step.loss.size(), 1u);
    losses.push_back(step.loss[0]);
    ASSERT_NE(step.input, nullptr);
    inputs.push_back(*step.input);
    values.push_back(step.values);
  }
  std::vector<std::int64_t> indices, totals;
  std::vector<double> losses;
  std::vector<Tensor> inputs;
  std::vector<std::map<std::string, double>> values;
};

// wte [V, d] in f64 with rows of very different norms (so that l2 and cosine disagree), seeded.
Tensor random_wte(std::int64_t V, std::int64_t d, std::uint64_t seed) {
  Tensor w(DType::f64, {V, d});
  Rng rng(seed);
  for (std::int64_t v = 0; v < V; ++v) {
    const double scale = rng.uniform(0.2, 3.0);
    for (std::int64_t j = 0; j < d; ++j) w.set(v * d + j, scale * rng.normal());
  }
  return w;
}

// The nearest row of w [V, d] to x [d], by a plain loop over every row: l2 = smallest sum (x - w_v)^2, cosine =
// largest <x, w_v> / (|x| |w_v|); the first best on ties.
std::int64_t brute_force_nearest(const Tensor& w, const std::vector<double>& x, pez::Projection projection) {
  const std::int64_t V = w.dim(0), d = w.dim(1);
  std::int64_t best = -1;
  double best_score = 0;
  for (std::int64_t v = 0; v < V; ++v) {
    double score = 0;
    if (projection == pez::Projection::l2) {
      for (std::int64_t j = 0; j < d; ++j) score -= (x[j] - w.get(v * d + j)) * (x[j] - w.get(v * d + j));
    } else {
      double dot = 0, xx = 0, ww = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        dot += x[j] * w.get(v * d + j);
        xx += x[j] * x[j];
        ww += w.get(v * d + j) * w.get(v * d + j);
      }
      score = dot / std::sqrt(xx * ww);
    }
    if (best < 0 || score > best_score) {
      best = v;
      best_score = score;
    }
  }
  return best;
}

std::vector<std::int64_t> brute_force_ids(const Tensor& w, const std::vector<double>& points,
                                          pez::Projection projection) {
  const std::int64_t d = w.dim(1), T = static_cast<std::int64_t>(points.size()) / d;
  std::vector<std::int64_t> ids;
  for (std::int64_t t = 0; t < T; ++t)
    ids.push_back(
        brute_force_nearest(w, std::vector<double>(points.begin() + t * d, points.begin() + (t + 1) * d), projection));
  return ids;
}

std::vector<double> as_doubles(const Tensor& t) {
  const Tensor d = t.to(DType::f64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

// The token ids whose wte rows x [1, T, d] is, exactly (-1 for a row that is no row of wte).
std::vector<std::int64_t> exact_rows(const Tensor& w, const Tensor& x) {
  const std::int64_t V = w.dim(0), d = w.dim(1), T = x.dim(1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T), -1);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t v = 0; v < V && ids[t] < 0; ++v) {
      bool same = true;
      for (std::int64_t j = 0; j < d && same; ++j) same = x.get(t * d + j) == w.get(v * d + j);
      if (same) ids[t] = v;
    }
  return ids;
}

// A small reference model with its true prompt and target.
struct Bench {
  // target = O(wte[true_ids]) (reachable), or with noise_target O(e) of an e ~ N(0, 1) that is no token prompt.
  Bench(const std::string& family, std::int64_t d, std::int64_t T, std::int64_t V, std::uint64_t seed,
        double wte_std = 0.0, bool noise_target = false, std::int64_t blocks = 1) {
    spec.family = family;
    if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
    spec.n_layer = std::max<std::int64_t>(blocks, 1);
    spec.n_embd = d;
    spec.n_head = 2;
    spec.n_positions = 8;
    spec.vocab_size = V;
    spec.seq_len = T;
    spec.blocks = blocks;
    spec.head = Head::lm_head;
    spec.dtype = DType::f64;
    WeightSet w = init_random_weights(spec, seed, 1);
    if (wte_std > 0) {  // GPT-2's N(0, 0.02^2) rows are short: wider ones make the tokens farther apart
      Tensor wte(DType::f64, {V, d});
      Rng rng(seed + 1000);
      fill_normal(wte, rng, 0.0, wte_std);
      w.set("wte.weight", wte);
    }
    weights = std::make_shared<const WeightSet>(std::move(w));
    make_model();
    Rng rng(seed + 2000);
    for (std::int64_t t = 0; t < T; ++t) true_ids.push_back(static_cast<std::int64_t>(rng.below(V)));
    e = pez::NearestTokens(wte(), pez::Projection::l2).embed(true_ids, DType::f64);
    if (noise_target) fill_normal(e, rng, 0.0, 1.0);
    target = model->forward(e);
  }

  void make_model() {
    reference::ReferenceBackend backend;
    backend.configure(Options("backend", "test", {{"threads", "1"}}));
    model = backend.create_model(spec, weights);
  }

  const Tensor& wte() const { return weights->get("wte.weight"); }

  Result run(std::map<std::string, std::string> options, Observer& observer, std::uint64_t seed = 1) {
    Pez pez;
    pez.configure(Options("optimizer", "test.ini", std::move(options)));
    Problem problem{*model, target, e, true_ids, decoder, weights, Rng(seed), {}, 0};
    return pez.run(problem, observer);
  }

  double loss(const Tensor& x, Metric metric) { return distances(model->forward(x), target, metric).at(0); }

  ModelSpec spec;
  std::shared_ptr<const WeightSet> weights;
  std::unique_ptr<Model> model;
  std::vector<std::int64_t> true_ids;
  Tensor e, target;
  NullDecoder decoder;
};

// ---------------------------------------------------------------------------------------------------------------
// The projection

TEST(NearestTokens, MatchesABruteForceSearchByL2AndCosine) {
  const std::int64_t V = 50, d = 12, points = 64;
  const Tensor w = random_wte(V, d, 5);
  std::vector<double> x(static_cast<std::size_t>(points * d));
  Rng rng(6);
  for (double& value : x) value = rng.normal(0.0, 1.5);
  const std::vector<std::int64_t> l2 = pez::NearestTokens(w, pez::Projection::l2).nearest(x);
  const std::vector<std::int64_t> cosine = pez::NearestTokens(w, pez::Projection::cosine).nearest(x);
  EXPECT_EQ(l2, brute_force_ids(w, x, pez::Projection::l2));
  EXPECT_EQ(cosine, brute_force_ids(w, x, pez::Projection::cosine));
  // The rows' norms differ a lot, so the two projections must disagree somewhere (else this test tells them apart
  // from nothing).
  std::int64_t differ = 0;
  for (std::int64_t t = 0; t < points; ++t) differ += l2[t] != cosine[t];
  EXPECT_GT(differ, points / 4);

  // f32 and bf16 weights: the same search over the weights as stored (bf16 widened exactly).
  for (DType dtype : {DType::f32, DType::bf16}) {
    const Tensor narrow = w.to(dtype);
    const Tensor exact = narrow.to(DType::f64);
    for (pez::Projection p : {pez::Projection::l2, pez::Projection::cosine})
      EXPECT_EQ(pez::NearestTokens(narrow, p).nearest(x), brute_force_ids(exact, x, p)) << dtype_name(dtype);
  }
}

TEST(NearestTokens, RowsProjectToThemselvesAndTiesGoToTheLowerId) {
  const std::int64_t V = 30, d = 8;
  Tensor w = random_wte(V, d, 9);
  for (std::int64_t j = 0; j < d; ++j) w.set(17 * d + j, w.get(4 * d + j));  // row 17 repeats row 4
  for (pez::Projection p : {pez::Projection::l2, pez::Projection::cosine}) {
    const pez::NearestTokens tokens(w, p);
    std::vector<std::int64_t> all(static_cast<std::size_t>(V));
    for (std::int64_t v = 0; v < V; ++v) all[v] = v;
    const Tensor rows = tokens.embed(all, DType::f64);
    std::vector<std::int64_t> expected = all;
    expected[17] = 4;
    EXPECT_EQ(tokens.nearest(as_doubles(rows)), expected);
    // Cosine ignores the length, l2 does not: twice row 7 is still row 7 by cosine.
    if (p == pez::Projection::cosine) {
      std::vector<double> twice = tokens.row(7);
      for (double& value : twice) value *= 2;
      EXPECT_EQ(tokens.nearest(twice), std::vector<std::int64_t>{7});
    }
  }
}

TEST(NearestTokens, EmbedGivesTheRowsRoundedToTheDtypeAndRefusesBadIds) {
  const Tensor w = random_wte(20, 6, 2);
  const pez::NearestTokens tokens(w, pez::Projection::cosine);
  EXPECT_EQ(tokens.row_norms().size(), 20u);
  const std::vector<std::int64_t> ids = {3, 19, 0, 3};
  for (DType dtype : {DType::f64, DType::f32}) {
    const Tensor x = tokens.embed(ids, dtype);
    ASSERT_EQ(x.shape(), (Shape{1, 4, 6}));
    EXPECT_EQ(x.dtype(), dtype);
    EXPECT_EQ(exact_rows(w.to(dtype), x), ids);
  }
  EXPECT_THROW(tokens.embed({20}, DType::f64), Error);
  EXPECT_THROW(tokens.embed({-1}, DType::f64), Error);
  std::vector<double> bad(6, 0.5);
  bad[2] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(tokens.nearest(bad), Error);
  EXPECT_THROW(tokens.nearest(std::vector<double>(7, 1.0)), Error);  // not rows of d = 6
}

// ---------------------------------------------------------------------------------------------------------------
// Runs

TEST(Pez, RecoversATinyGpt2PromptAndStopsThere) {
  struct Case {
    double wte_std;  // 0: GPT-2's own N(0, 0.02^2) initialisation
    const char* projection;
    const char* lr;
  };
  int runs = 0;
  // The l2 projection is not scale-free: with GPT-2's short initial rows (|w| about 0.08 at d = 16) the default
  // lr = 0.1 throws P far past every row, where the longest rows are nearest, and a run can stall (seed 1 does at
  // loss 0.34); an lr on the rows' scale finds the prompt.
  for (const Case& c :
       {Case{0.0, "cosine", "0.1"}, Case{0.3, "cosine", "0.1"}, Case{0.3, "l2", "0.1"}, Case{0.0, "l2", "0.01"}})
    for (std::uint64_t seed : {1, 2, 3}) {
      const std::string projection = c.projection;
      Bench bench("gpt2", 16, 3, 50, seed, c.wte_std);
      Recorder rec;
      const Result r = bench.run({{"projection", projection}, {"lr", c.lr}, {"steps", "500"}}, rec, seed);
      SCOPED_TRACE(projection + " lr " + c.lr + " wte_std " + std::to_string(c.wte_std) + " seed " +
                   std::to_string(seed));
      EXPECT_EQ(r.ids, bench.true_ids);
      EXPECT_EQ(r.loss, 0.0);
      // Stopped at the first exact step: fewer steps than planned, that step the last one reported.
      ASSERT_FALSE(rec.losses.empty());
      EXPECT_LT(r.steps, 500);
      EXPECT_EQ(r.steps, static_cast<std::int64_t>(rec.losses.size()));
      EXPECT_EQ(rec.losses.back(), 0.0);
      EXPECT_EQ(std::count(rec.losses.begin(), rec.losses.end(), 0.0), 1);
      EXPECT_EQ(r.values.at("best_step"), static_cast<double>(r.steps));
      EXPECT_EQ(r.values.at("steps_run"), static_cast<double>(r.steps));
      EXPECT_EQ(exact_rows(bench.wte(), r.input), r.ids);
      EXPECT_EQ(r.metric, Metric::l2);
      ++runs;
    }
  EXPECT_EQ(runs, 12);
}

// A target no token prompt reaches, so that the run goes the whole way and the best step is somewhere inside.
TEST(Pez, ReportsHardPromptsAndReturnsTheBestOfThem) {
  for (const char* metric : {"l2", "l1", "cosine"}) {
    SCOPED_TRACE(metric);
    Bench bench("gpt2", 16, 4, 40, 11, 0.5, /*noise_target=*/true, /*blocks=*/2);
    Recorder rec;
    const std::int64_t steps = 80;
    const Result r = bench.run({{"metric", metric}, {"steps", std::to_string(steps)}, {"lr", "0.05"}}, rec, 4);
    const Metric m = *parse_metric(metric);
    ASSERT_EQ(r.steps, steps);
    ASSERT_EQ(static_cast<std::int64_t>(rec.losses.size()), steps);
    double best = std::numeric_limits<double>::infinity();
    std::int64_t best_step = 0;
    std::vector<std::int64_t> previous;
    std::int64_t distinct = 0, evaluated = 0;
    for (std::int64_t n = 0; n < steps; ++n) {
      EXPECT_EQ(rec.indices[n], n + 1);
      EXPECT_EQ(rec.totals[n], steps);
      const std::vector<std::int64_t> ids = exact_rows(bench.wte(), rec.inputs[n]);
      ASSERT_TRUE(std::none_of(ids.begin(), ids.end(), [](std::int64_t v) { return v < 0; }))
          << "step " << n + 1 << " reported an input that is not a hard prompt";
      EXPECT_EQ(rec.losses[n], bench.loss(rec.inputs[n], m)) << "step " << n + 1;
      if (rec.losses[n] < best) {
        best = rec.losses[n];
        best_step = n + 1;
      }
      EXPECT_EQ(rec.values[n].at("best_loss"), best) << "step " << n + 1;  // best so far never rises
      std::int64_t changes = 0;
      for (std::size_t t = 0; t < ids.size(); ++t) changes += previous.empty() || ids[t] != previous[t];
      EXPECT_EQ(rec.values[n].at("token_changes"), static_cast<double>(changes)) << "step " << n + 1;
      EXPECT_EQ(rec.values[n].at("evaluated"), changes > 0 ? 1.0 : 0.0) << "step " << n + 1;
      distinct += changes > 0;
      evaluated += rec.values[n].at("evaluated") == 1.0;
      previous = ids;
    }
    EXPECT_GT(distinct, 3) << "the run hardly moved: a weak test";
    EXPECT_GT(best_step, 1);
    EXPECT_EQ(r.loss, best);
    EXPECT_EQ(r.values.at("best_step"), static_cast<double>(best_step));
    EXPECT_EQ(r.values.at("model_evaluations"), static_cast<double>(evaluated));
    EXPECT_EQ(r.ids, exact_rows(bench.wte(), rec.inputs[best_step - 1]));
    EXPECT_EQ(as_doubles(r.input), as_doubles(rec.inputs[best_step - 1]));
    EXPECT_EQ(r.input.shape(), (Shape{1, 4, 16}));
    EXPECT_EQ(r.loss, bench.loss(r.input, m));
    EXPECT_EQ(r.metric, m);
    // The ids are the projection of the input, by both projections (the input is made of wte rows).
    for (pez::Projection p : {pez::Projection::l2, pez::Projection::cosine})
      EXPECT_EQ(brute_force_ids(bench.wte(), as_doubles(r.input), p), r.ids);
    EXPECT_EQ(r.series.at("loss"), rec.losses);
    EXPECT_EQ(r.values.at("series_stride"), 1.0);
  }
}

// The PEZ rule, written out with the brute-force projection: P moves by the gradient at proj(P).
std::vector<std::vector<std::int64_t>> reference_trajectory(Bench& bench, const std::vector<double>& start,
                                                            pez::Projection projection, bool adam, double lr,
                                                            double weight_decay, std::int64_t steps) {
  const Tensor& w = bench.wte();
  const pez::NearestTokens embedder(w, projection);
  std::vector<double> p = start, m(p.size(), 0.0), v(p.size(), 0.0);
  std::vector<std::vector<std::int64_t>> out;
  for (std::int64_t n = 1; n <= steps; ++n) {
    const std::vector<std::int64_t> ids = brute_force_ids(w, p, projection);
    out.push_back(ids);
    const std::vector<double> g =
        as_doubles(bench.model->loss_and_grad(embedder.embed(ids, DType::f64), bench.target, Metric::l2).grad);
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - lr * weight_decay;
      if (!adam) {
        p[i] -= lr * g[i];
        continue;
      }
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      const double m_hat = m[i] / (1.0 - std::pow(0.9, static_cast<double>(n)));
      const double v_hat = v[i] / (1.0 - std::pow(0.999, static_cast<double>(n)));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + 1e-8);
    }
  }
  return out;
}

TEST(Pez, FollowsTheGradientTakenAtTheProjection) {
  struct Case {
    const char* update;
    double lr, weight_decay;
    pez::Projection projection;
  };
  for (const Case& c :
       {Case{"sgd", 2.0, 0.0, pez::Projection::l2}, Case{"sgd", 1.0, 0.1, pez::Projection::cosine},
        Case{"adam", 0.05, 0.1, pez::Projection::cosine}, Case{"adam", 0.05, 0.0, pez::Projection::l2}}) {
    SCOPED_TRACE(std::string(c.update) + " lr " + std::to_string(c.lr));
    Bench bench("gpt2", 16, 3, 40, 21, 0.5, /*noise_target=*/true);
    Recorder rec;
    const std::int64_t steps = 30;
    bench.run({{"update", c.update},
               {"lr", std::to_string(c.lr)},
               {"weight_decay", std::to_string(c.weight_decay)},
               {"projection", c.projection == pez::Projection::l2 ? "l2" : "cosine"},
               {"steps", std::to_string(steps)}},
              rec, 8);
    ASSERT_EQ(static_cast<std::int64_t>(rec.inputs.size()), steps);
    // init = random_tokens: P_0 is the first hard prompt itself.
    const std::vector<std::vector<std::int64_t>> expected = reference_trajectory(
        bench, as_doubles(rec.inputs[0]), c.projection, c.update == std::string("adam"), c.lr, c.weight_decay, steps);
    std::int64_t moves = 0;
    for (std::int64_t n = 0; n < steps; ++n) {
      EXPECT_EQ(exact_rows(bench.wte(), rec.inputs[n]), expected[n]) << "step " << n + 1;
      moves += n > 0 && expected[n] != expected[n - 1];
    }
    EXPECT_GE(moves, 2) << "the trajectory hardly moved: a weak test";
  }
}

TEST(Pez, StartsWhereInitSays) {
  Bench bench("gpt2", 16, 5, 40, 3, 0.5, /*noise_target=*/true);
  // random_tokens: T tokens drawn uniformly from problem.rng.fork("pez/init").
  {
    Recorder rec;
    bench.run({{"steps", "1"}}, rec, 77);
    Rng rng = Rng(77).fork("pez/init");
    std::vector<std::int64_t> drawn;
    for (int t = 0; t < 5; ++t) drawn.push_back(static_cast<std::int64_t>(rng.below(40)));
    EXPECT_EQ(exact_rows(bench.wte(), rec.inputs.at(0)), drawn);
  }
  // mean: every position starts at the same point, so at the same token, the one nearest the mean row.
  for (const char* projection : {"cosine", "l2"}) {
    Recorder rec;
    bench.run({{"steps", "1"}, {"init", "mean"}, {"projection", projection}}, rec, 77);
    std::vector<double> mean(16, 0.0);
    for (std::int64_t v = 0; v < 40; ++v)
      for (std::int64_t j = 0; j < 16; ++j) mean[j] += bench.wte().get(v * 16 + j) / 40.0;
    const std::int64_t nearest =
        brute_force_nearest(bench.wte(), mean, *projection == 'l' ? pez::Projection::l2 : pez::Projection::cosine);
    EXPECT_EQ(exact_rows(bench.wte(), rec.inputs.at(0)), std::vector<std::int64_t>(5, nearest)) << projection;
  }
  // noise: a start from the seed (same seed, same start; another seed, another start).
  Recorder a, b, c;
  bench.run({{"steps", "1"}, {"init", "noise"}}, a, 5);
  bench.run({{"steps", "1"}, {"init", "noise"}}, b, 5);
  bench.run({{"steps", "1"}, {"init", "noise"}}, c, 6);
  EXPECT_EQ(as_doubles(a.inputs.at(0)), as_doubles(b.inputs.at(0)));
  EXPECT_NE(as_doubles(a.inputs.at(0)), as_doubles(c.inputs.at(0)));
}

TEST(Pez, SameSeedSameRunOtherSeedOther) {
  Bench bench("gpt2", 16, 4, 40, 13, 0.5, /*noise_target=*/true);
  Recorder a, b, c;
  const Result ra = bench.run({{"steps", "40"}}, a, 1);
  const Result rb = bench.run({{"steps", "40"}}, b, 1);
  const Result rc = bench.run({{"steps", "40"}}, c, 2);
  EXPECT_EQ(ra.ids, rb.ids);
  EXPECT_EQ(ra.loss, rb.loss);
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_NE(a.losses, c.losses);
}

TEST(Pez, ToleranceStopsAtTheFirstStepWithin) {
  Bench bench("gpt2", 16, 4, 40, 13, 0.5, /*noise_target=*/true);
  Recorder all;
  bench.run({{"steps", "40"}}, all, 1);
  // A tolerance between the run's best and worst losses stops at the first step at or below it.
  const double tolerance = (*std::min_element(all.losses.begin(), all.losses.end()) + all.losses.front()) / 2;
  ASSERT_LT(tolerance, all.losses.front());
  const auto first = std::find_if(all.losses.begin(), all.losses.end(), [&](double l) { return l <= tolerance; });
  ASSERT_NE(first, all.losses.end());
  Recorder rec;
  const Result r = bench.run({{"steps", "40"}, {"tolerance", std::to_string(tolerance)}}, rec, 1);
  EXPECT_EQ(r.steps, first - all.losses.begin() + 1);
  EXPECT_EQ(rec.losses.size(), static_cast<std::size_t>(r.steps));
  EXPECT_LE(r.loss, tolerance);
}

TEST(Pez, KeepsTheLossSeriesBounded) {
  Bench bench("gpt2", 16, 3, 40, 13, 0.5, /*noise_target=*/true);
  Recorder rec;
  const Result r = bench.run({{"steps", "2500"}}, rec, 1);
  ASSERT_EQ(r.steps, 2500);
  EXPECT_EQ(r.values.at("series_stride"), 3.0);
  const std::vector<double>& series = r.series.at("loss");
  ASSERT_EQ(series.size(), 834u);  // steps 1, 4, ..., 2500
  for (std::size_t k = 0; k < series.size(); ++k) EXPECT_EQ(series[k], rec.losses[3 * k]) << k;
  EXPECT_LE(static_cast<std::int64_t>(series.size()), Pez::kMaxSeries);
  // Most steps stay on the hard prompt of the step before and cost no model call.
  EXPECT_LT(r.values.at("model_evaluations"), 2500.0);
}

TEST(Pez, RecoversPromptsOfTheMlpFamilies) {
  for (const char* family : {"transformer_mlp", "fcnet"}) {
    SCOPED_TRACE(family);
    Bench bench(family, 8, 3, 30, 4, 0.5);
    Recorder rec;
    const Result r = bench.run({{"steps", "300"}}, rec, 2);
    ASSERT_EQ(r.ids.size(), 3u);
    EXPECT_EQ(exact_rows(bench.wte(), r.input), r.ids);
    EXPECT_EQ(r.loss, bench.loss(r.input, Metric::l2));
    EXPECT_LE(r.loss, rec.losses.front());
    // Small invertible MLPs: the prompt is found (in 22 and 13 steps).
    EXPECT_EQ(r.ids, bench.true_ids);
    EXPECT_EQ(r.loss, 0.0);
    EXPECT_LT(r.steps, 300);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

std::string configure_error(std::map<std::string, std::string> options) {
  Pez pez;
  try {
    pez.configure(Options("optimizer", "test.ini", std::move(options)));
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Pez, BadOptionsNameTheKey) {
  EXPECT_TRUE(contains(configure_error({{"lr", "-0.1"}}), "[optimizer] lr = '-0.1'"));
  EXPECT_TRUE(contains(configure_error({{"lr", "0"}}), "[optimizer] lr"));
  EXPECT_TRUE(contains(configure_error({{"lr", "inf"}}), "[optimizer] lr"));
  EXPECT_TRUE(contains(configure_error({{"projection", "manhattan"}}), "[optimizer] projection = 'manhattan'"));
  EXPECT_TRUE(contains(configure_error({{"projection", "manhattan"}}), "cosine | l2"));
  EXPECT_TRUE(contains(configure_error({{"update", "lbfgs"}}), "[optimizer] update"));
  EXPECT_TRUE(contains(configure_error({{"init", "zeros"}}), "[optimizer] init"));
  EXPECT_TRUE(contains(configure_error({{"metric", "l3"}}), "[optimizer] metric"));
  EXPECT_TRUE(contains(configure_error({{"steps", "0"}}), "[optimizer] steps"));
  EXPECT_TRUE(contains(configure_error({{"steps", "ten"}}), "[optimizer] steps"));
  EXPECT_TRUE(contains(configure_error({{"weight_decay", "-1"}}), "[optimizer] weight_decay"));
  EXPECT_TRUE(contains(configure_error({{"beta1", "1"}}), "[optimizer] beta1"));
  EXPECT_TRUE(contains(configure_error({{"beta2", "-0.5"}}), "[optimizer] beta2"));
  EXPECT_TRUE(contains(configure_error({{"eps", "0"}}), "[optimizer] eps"));
  EXPECT_TRUE(contains(configure_error({{"tolerance", "-1"}}), "[optimizer] tolerance"));
  EXPECT_EQ(configure_error({{"lr", "0.3"}, {"projection", "l2"}, {"update", "sgd"}, {"init", "noise"}}), "");

  // Every key is read (the host reports unread ones as unknown), and a failed configure changes nothing.
  Pez pez;
  const Options good("optimizer", "test.ini",
                     {{"steps", "7"},
                      {"lr", "0.3"},
                      {"weight_decay", "0"},
                      {"update", "sgd"},
                      {"beta1", "0.8"},
                      {"beta2", "0.99"},
                      {"eps", "1e-6"},
                      {"projection", "l2"},
                      {"init", "mean"},
                      {"metric", "l1"},
                      {"tolerance", "0.5"}});
  pez.configure(good);
  EXPECT_TRUE(good.unread_keys().empty());
  EXPECT_THROW(pez.configure(Options("optimizer", "test.ini", {{"steps", "3"}, {"lr", "-1"}})), Error);
  EXPECT_EQ(pez.settings().steps, 7);
  EXPECT_EQ(pez.settings().lr, 0.3);
  EXPECT_FALSE(pez.settings().adam);
  EXPECT_EQ(pez.settings().projection, pez::Projection::l2);
  EXPECT_EQ(pez.settings().metric, Metric::l1);

  // The defaults: the paper's AdamW (lr 0.1, weight decay 0.1) with the cosine projection.
  Pez defaults;
  defaults.configure(Options("optimizer", "test.ini", {}));
  EXPECT_EQ(defaults.settings().steps, 1000);
  EXPECT_EQ(defaults.settings().lr, 0.1);
  EXPECT_EQ(defaults.settings().weight_decay, 0.1);
  EXPECT_TRUE(defaults.settings().adam);
  EXPECT_EQ(defaults.settings().projection, pez::Projection::cosine);
  EXPECT_EQ(defaults.settings().init, "random_tokens");
  EXPECT_EQ(defaults.settings().metric, Metric::l2);
  EXPECT_EQ(defaults.settings().tolerance, 0.0);
}

TEST(Pez, VocabInputIsAnErrorNamingModelInput) {
  ModelSpec spec;
  spec.family = "transformer_mlp";
  if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
  spec.n_embd = 8;
  spec.seq_len = 3;
  spec.vocab_size = 20;
  spec.input = InputSpace::vocab;
  auto weights = std::make_shared<const WeightSet>(init_random_weights(spec, 1, 1));
  reference::ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", "1"}}));
  auto model = backend.create_model(spec, weights);
  Tensor e(DType::f64, input_shape(spec, 1));
  const Tensor target = model->forward(e);
  NullDecoder decoder;
  Recorder rec;
  Pez pez;
  pez.configure(Options("optimizer", "test.ini", {}));
  Problem problem{*model, target, e, {}, decoder, weights, Rng(1), {}, 0};
  try {
    pez.run(problem, rec);
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_TRUE(contains(err.what(), "[model] input = vocab")) << err.what();
  }
  EXPECT_TRUE(rec.losses.empty());
}

TEST(Pez, MissingTokenEmbeddingIsAnErrorNamingIt) {
  Bench bench("fcnet", 8, 3, 20, 1, 0.5);
  WeightSet without;
  for (const auto& [name, tensor] : bench.weights->tensors())
    if (name != "wte.weight") without.set(name, tensor);
  bench.weights = std::make_shared<const WeightSet>(std::move(without));
  bench.make_model();  // fcnet with input = embedding needs no wte of its own
  Recorder rec;
  try {
    bench.run({}, rec);
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_TRUE(contains(err.what(), "wte.weight")) << err.what();
  }
  // No weights at all: the same error.
  bench.weights = nullptr;
  try {
    bench.run({}, rec);
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_TRUE(contains(err.what(), "wte.weight")) << err.what();
  }
}

}  // namespace
}  // namespace lminv
