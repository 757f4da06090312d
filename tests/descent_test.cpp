// The `descent` optimizer, loaded as a plugin and run on the identity model of the echo test backend, and on small
// reference-backend models (batched restarts against one-by-one runs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "lminv/ops.hpp"
#include "reference_backend.hpp"
#include "registry.hpp"
#include "weights_init.hpp"

using namespace lminv;

namespace {

// Decodes nothing useful: descent must not depend on the decoder.
class NullDecoder final : public Decoder {
 public:
  void configure(const Options&) override {}
  void prepare(const DecoderSetup&) override {}
  Decoded decode(const Tensor&) override { return {}; }
};

class Recorder final : public Observer {
 public:
  void on_step(const Step& step) override {
    indices.push_back(step.index);
    losses.push_back(step.loss.at(0));
    lrs.push_back(step.values.at("lr"));
    all_losses.push_back(step.loss);
    best_losses.push_back(step.values.at("best_loss"));
    inputs.push_back(*step.input);
  }
  std::vector<std::int64_t> indices;
  std::vector<double> losses, lrs, best_losses;
  std::vector<std::vector<double>> all_losses;  // [step][batch item]
  std::vector<Tensor> inputs;                   // [step] -> [B, T, d or V]
};

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct Fixture {
  Fixture() : registry({LMINV_BUILD_PLUGIN_DIR, LMINV_TEST_PLUGIN_DIR "/good"}) {
    backend = registry.create_backend("echo");
    spec.seq_len = 3;
    spec.n_embd = 4;
    model = keep_alive(backend->create_model(spec, nullptr), backend);
    Rng rng(11);
    true_input = Tensor(DType::f64, {1, 3, 4});
    fill_normal(true_input, rng, 0.0, 1.0);
  }

  Result run(std::map<std::string, std::string> options, Recorder& recorder, std::uint64_t seed = 1) {
    auto optimizer = registry.create_optimizer("descent");
    optimizer->configure(Options("optimizer", "test.ini", std::move(options)));
    Problem problem{*model, model->forward(true_input), true_input, {}, decoder, weights, Rng(seed), {}, 0};
    return optimizer->run(problem, recorder);
  }

  // Switches to vocab-space inputs [1, T, V] (the echo model stays the identity) with one-hot true inputs for `ids`
  // and the token embedding `wte` [V, d].
  void use_vocab(const std::vector<std::int64_t>& ids, const Tensor& wte) {
    spec.input = InputSpace::vocab;
    spec.vocab_size = wte.dim(0);
    spec.n_embd = wte.dim(1);
    spec.seq_len = static_cast<std::int64_t>(ids.size());
    model = keep_alive(backend->create_model(spec, nullptr), backend);
    true_input = Tensor(DType::f64, {1, spec.seq_len, spec.vocab_size});
    for (std::size_t t = 0; t < ids.size(); ++t) true_input.set(static_cast<std::int64_t>(t) * spec.vocab_size + ids[t], 1.0);
    auto w = std::make_shared<WeightSet>();
    w->set("wte.weight", wte);
    weights = w;
  }

  Registry registry;
  std::shared_ptr<Backend> backend;
  std::shared_ptr<Model> model;
  ModelSpec spec;
  Tensor true_input;
  std::shared_ptr<const WeightSet> weights;
  NullDecoder decoder;
};

// A small reference-backend model (f64, one thread) with seeded weights and its true input for `ids`.
struct ReferenceFixture {
  ReferenceFixture(const std::string& family, InputSpace input, const std::vector<std::int64_t>& ids)
      : registry({LMINV_BUILD_PLUGIN_DIR}) {
    spec.family = family;
    if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
    spec.n_embd = 6;
    spec.vocab_size = 20;
    spec.seq_len = static_cast<std::int64_t>(ids.size());
    spec.input = input;
    spec.dtype = DType::f64;
    weights = std::make_shared<const WeightSet>(init_random_weights(spec, 3));
    reference::ReferenceBackend backend;
    backend.configure(Options("backend", "test", {{"threads", "1"}}));
    model = backend.create_model(spec, weights);
    true_input = Tensor(DType::f64, input_shape(spec, 1));
    const Tensor& wte = weights->get("wte.weight");
    for (std::int64_t t = 0; t < spec.seq_len; ++t) {
      if (input == InputSpace::vocab)
        true_input.set(t * spec.vocab_size + ids[t], 1.0);
      else
        for (std::int64_t j = 0; j < spec.n_embd; ++j) true_input.set(t * spec.n_embd + j, wte.get(ids[t] * spec.n_embd + j));
    }
  }

  Result run(std::map<std::string, std::string> options, Recorder& recorder) {
    auto optimizer = registry.create_optimizer("descent");
    optimizer->configure(Options("optimizer", "test.ini", std::move(options)));
    Problem problem{*model, model->forward(true_input), true_input, {}, decoder, weights, Rng(7), {}, 0};
    return optimizer->run(problem, recorder);
  }

  Registry registry;
  ModelSpec spec;
  std::shared_ptr<const WeightSet> weights;
  std::unique_ptr<Model> model;
  Tensor true_input;
  NullDecoder decoder;
};

}  // namespace

TEST(Descent, RecoversTheInputOfTheIdentityModelFromNoise) {
  Fixture f;
  Recorder rec;
  const Result r = f.run({{"steps", "200"}, {"lr", "0.5"}, {"lr_final", "0.001"}, {"metric", "l2"}}, rec);
  EXPECT_LT(r.loss, 1e-2 * rec.losses.front());
  EXPECT_LT(l2_distance(r.input, f.true_input), 1e-2);
  EXPECT_EQ(r.metric, Metric::l2);
  EXPECT_EQ(r.steps, 200);
}

TEST(Descent, ObserverSeesEveryStepWithALinearlyDecayingRate) {
  Fixture f;
  Recorder rec;
  f.run({{"steps", "5"}, {"lr", "1.0"}, {"lr_final", "0.2"}}, rec);
  EXPECT_EQ(rec.indices, (std::vector<std::int64_t>{1, 2, 3, 4, 5}));
  const std::vector<double> expected = {1.0, 0.8, 0.6, 0.4, 0.2};
  for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(rec.lrs[i], expected[i], 1e-12);
}

TEST(Descent, StartsFromNoiseAroundInitMean) {
  Fixture f;
  Recorder rec;
  const Result r = f.run({{"steps", "1"}, {"lr", "1e-12"}, {"init_mean", "0.5"}, {"init_std", "0.05"}}, rec);
  double mean = 0;
  for (std::int64_t i = 0; i < r.input.numel(); ++i) mean += r.input.get(i) / r.input.numel();
  EXPECT_NEAR(mean, 0.5, 0.05);
}

TEST(Descent, BlendWithNoNoiseStartsAtTheTrueInput) {
  Fixture f;
  Recorder rec;
  f.run({{"steps", "2"}, {"init", "blend"}, {"blend_s", "0"}, {"blend_t", "1"}}, rec);
  EXPECT_EQ(rec.losses.front(), 0.0);
}

TEST(Descent, SameSeedSameResultOtherSeedOther) {
  Fixture f;
  Recorder a, b, c;
  const Result ra = f.run({{"steps", "3"}}, a, 5);
  const Result rb = f.run({{"steps", "3"}}, b, 5);
  const Result rc = f.run({{"steps", "3"}}, c, 6);
  EXPECT_EQ(l1_distance(ra.input, rb.input), 0.0);
  EXPECT_GT(l1_distance(ra.input, rc.input), 0.0);
}

TEST(Descent, BadOptionsNameTheKey) {
  Fixture f;
  for (auto [key, value, expect] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"steps", "-1", "[optimizer] steps = '-1': must be positive"},
           {"steps", "ten", "'ten' is not an integer"},
           {"lr", "0", "[optimizer] lr = '0': must be positive"},
           {"metric", "l3", "[optimizer] metric = 'l3': expected one of l1 | l2 | cosine"},
           {"init", "zeros", "[optimizer] init = 'zeros': expected one of noise | blend"},
           {"lr", "inf", "[optimizer] lr = 'inf': must be a finite number"},
           {"lr_final", "-0.1", "[optimizer] lr_final = '-0.1': must be >= 0"},
           {"init_std", "-1", "[optimizer] init_std = '-1': must be >= 0"},
           {"init_mean", "nan", "[optimizer] init_mean = 'nan': must be a finite number"},
           {"optimiser", "rmsprop", "[optimizer] optimiser = 'rmsprop': expected one of sgd | adam"},
           {"beta1", "1", "[optimizer] beta1 = '1': must be in [0, 1)"},
           {"beta1", "-0.1", "[optimizer] beta1 = '-0.1': must be in [0, 1)"},
           {"beta2", "1.5", "[optimizer] beta2 = '1.5': must be in [0, 1)"},
           {"eps", "0", "[optimizer] eps = '0': must be positive"},
           {"restarts", "0", "[optimizer] restarts = '0': must be at least 1"},
           {"restarts", "two", "[optimizer] restarts = 'two': 'two' is not an integer"},
           {"restart_offset", "-1", "[optimizer] restart_offset = '-1': must be >= 0"},
           {"vocab_start", "zeros", "[optimizer] vocab_start = 'zeros': expected one of onehot | pinv"},
           {"onehot_scale", "inf", "[optimizer] onehot_scale = 'inf': must be a finite number"},
       }) {
    auto optimizer = f.registry.create_optimizer("descent");
    try {
      optimizer->configure(Options("optimizer", "test.ini", {{key, value}}));
      ADD_FAILURE() << key << " = " << value << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("test.ini"), std::string::npos) << e.what();
    }
  }
}

TEST(Descent, ReadsEveryKeyItDocuments) {
  Fixture f;
  Options options("optimizer", "test.ini",
                  {{"steps", "2"}, {"lr", "0.1"}, {"lr_final", "0.05"}, {"metric", "l2"}, {"init", "blend"},
                   {"init_mean", "0"}, {"init_std", "1"}, {"blend_s", "1"}, {"blend_t", "0"}, {"optimiser", "adam"},
                   {"beta1", "0.8"}, {"beta2", "0.99"}, {"eps", "1e-6"}, {"restarts", "2"}, {"restart_offset", "3"},
                   {"vocab_start", "pinv"}, {"onehot_scale", "2"}});
  f.registry.create_optimizer("descent")->configure(options);
  EXPECT_TRUE(options.unread_keys().empty());
}

TEST(Descent, AdamRecoversTheInputOfTheIdentityModel) {
  Fixture f;
  Recorder rec;
  const Result r = f.run(
      {{"optimiser", "adam"}, {"steps", "300"}, {"lr", "0.05"}, {"lr_final", "0.0005"}, {"metric", "l2"}}, rec);
  EXPECT_LT(r.loss, 1e-2 * rec.losses.front());
  EXPECT_LT(l2_distance(r.input, f.true_input), 1e-2);
}

TEST(Descent, AdamStepsAreItsUpdateRuleNotSgd) {
  // l2 on the identity model: g = (x - e) / |x - e|. Adam's first step moves every element by lr against the sign
  // of its gradient (m_hat = g, v_hat = g^2); its second by lr2 m_hat2 / (sqrt(v_hat2) + eps).
  Fixture f;
  Recorder rec;
  const double lr1 = 0.1, lr2 = 0.05, b1 = 0.8, b2 = 0.99, eps = 1e-8;
  f.run({{"optimiser", "adam"}, {"steps", "3"}, {"lr", "0.1"}, {"lr_final", "0"}, {"metric", "l2"}, {"beta1", "0.8"},
         {"beta2", "0.99"}},
        rec);
  ASSERT_EQ(rec.inputs.size(), 3u);
  const Tensor &x1 = rec.inputs[0], &x2 = rec.inputs[1], &x3 = rec.inputs[2];
  const double n1 = l2_distance(x1, f.true_input), n2 = l2_distance(x2, f.true_input);
  for (std::int64_t i = 0; i < x1.numel(); ++i) {
    const double g1 = (x1.get(i) - f.true_input.get(i)) / n1, g2 = (x2.get(i) - f.true_input.get(i)) / n2;
    EXPECT_NEAR(x2.get(i), x1.get(i) - lr1 * g1 / (std::abs(g1) + eps), 1e-12) << i;
    const double m = b1 * (1 - b1) * g1 + (1 - b1) * g2, v = b2 * (1 - b2) * g1 * g1 + (1 - b2) * g2 * g2;
    const double m_hat = m / (1 - b1 * b1), v_hat = v / (1 - b2 * b2);
    EXPECT_NEAR(x3.get(i), x2.get(i) - lr2 * m_hat / (std::sqrt(v_hat) + eps), 1e-12) << i;
  }
}

TEST(Descent, ObserverSeesEveryRestartAndTheBestLossSoFar) {
  Fixture f;
  Recorder rec;
  const Result r = f.run({{"restarts", "4"}, {"steps", "5"}, {"init_std", "1"}}, rec);
  ASSERT_EQ(rec.all_losses.size(), 5u);
  double best = std::numeric_limits<double>::infinity();
  for (std::size_t n = 0; n < rec.all_losses.size(); ++n) {
    ASSERT_EQ(rec.all_losses[n].size(), 4u);
    EXPECT_EQ(rec.inputs[n].shape(), (Shape{4, 3, 4}));
    for (double l : rec.all_losses[n]) best = std::min(best, l);
    EXPECT_EQ(rec.best_losses[n], best) << "step " << n + 1;
    for (std::int64_t b = 0; b < 4; ++b)  // each loss belongs to its own item
      EXPECT_DOUBLE_EQ(rec.all_losses[n][b], l1_distance(rec.inputs[n].slice0(b, b + 1), f.true_input));
  }
  EXPECT_EQ(r.input.shape(), (Shape{1, 3, 4}));
  EXPECT_LE(r.loss, best);
}

TEST(Descent, TheBestRestartIsKept) {
  // Steps so large that every update overshoots (l1 moves each element by lr = 100, 75, 50 towards the truth, a
  // few units away): each start is best at its start, and the result is the start with the lowest first loss.
  Fixture f;
  Recorder rec;
  const Result r = f.run(
      {{"restarts", "6"}, {"steps", "3"}, {"lr", "100"}, {"lr_final", "50"}, {"init_std", "1"}, {"init_mean", "0"}}, rec);
  const std::vector<double>& first = rec.all_losses.front();
  const std::int64_t argmin = std::min_element(first.begin(), first.end()) - first.begin();
  ASSERT_NE(argmin, 0) << "pick a seed whose best start is not the first, so that the test means something";
  EXPECT_EQ(r.values.at("best_restart"), static_cast<double>(argmin));
  EXPECT_EQ(r.loss, first[argmin]);
  EXPECT_TRUE(same_bytes(r.input, rec.inputs.front().slice0(argmin, argmin + 1)));
  for (std::size_t n = 1; n < rec.all_losses.size(); ++n)
    for (double l : rec.all_losses[n]) EXPECT_GT(l, first[argmin]);  // the premise: later steps are worse
}

TEST(Descent, RestartsInOneBatchGiveTheSameResultAsTheSameStartsRunOneByOne) {
  const std::vector<std::tuple<std::string, InputSpace, std::string>> cases = {
      {"transformer_mlp", InputSpace::embedding, "sgd"},
      {"fcnet", InputSpace::embedding, "adam"},
      {"transformer_mlp", InputSpace::vocab, "adam"},
  };
  for (const auto& [family, space, optimiser] : cases) {
    SCOPED_TRACE(family + " " + input_space_name(space) + " " + optimiser);
    ReferenceFixture f(family, space, {3, 17, 5});
    const std::int64_t B = 3;
    std::map<std::string, std::string> options = {{"steps", "8"},       {"lr", "0.05"},       {"lr_final", "0.01"},
                                                  {"metric", "l2"},     {"init", "blend"},    {"blend_s", "1"},
                                                  {"blend_t", "0.5"},   {"init_std", "0.5"},  {"optimiser", optimiser},
                                                  {"restart_offset", "2"}};
    Recorder batched;
    options["restarts"] = std::to_string(B);
    const Result all = f.run(options, batched);

    std::vector<Result> singles;
    for (std::int64_t b = 0; b < B; ++b) {
      Recorder one;
      options["restarts"] = "1";
      options["restart_offset"] = std::to_string(2 + b);
      singles.push_back(f.run(options, one));
      ASSERT_EQ(one.all_losses.size(), batched.all_losses.size());
      for (std::size_t n = 0; n < one.all_losses.size(); ++n) {
        EXPECT_EQ(one.all_losses[n].at(0), batched.all_losses[n].at(b)) << "start " << b << " step " << n + 1;
        EXPECT_TRUE(same_bytes(one.inputs[n], batched.inputs[n].slice0(b, b + 1))) << "start " << b << " step " << n + 1;
      }
      EXPECT_EQ(singles.back().values.at("best_restart"), static_cast<double>(2 + b));
    }
    std::int64_t best = 0;
    for (std::int64_t b = 1; b < B; ++b)
      if (singles[b].loss < singles[best].loss) best = b;
    EXPECT_EQ(all.loss, singles[best].loss);
    EXPECT_TRUE(same_bytes(all.input, singles[best].input));
    EXPECT_EQ(all.values.at("best_restart"), static_cast<double>(2 + best));
    // The starts differ from one another (else the comparison above proves little).
    EXPECT_NE(batched.all_losses[0][0], batched.all_losses[0][1]);
  }
}

TEST(Descent, VocabSpaceStartsFromTheScaledOneHot) {
  Fixture f;
  Rng rng(5);
  Tensor wte(DType::f64, {7, 3});
  fill_normal(wte, rng, 0.0, 1.0);
  f.use_vocab({4, 0, 6}, wte);
  Recorder rec;
  f.run({{"steps", "1"}, {"init", "blend"}, {"blend_s", "0"}, {"blend_t", "1"}, {"onehot_scale", "3"}}, rec);
  Tensor expected = f.true_input;
  scale(expected, 3.0);
  EXPECT_TRUE(same_bytes(rec.inputs.front(), expected));
  // blend_t weighs X like the embedding-space true input.
  Recorder half;
  f.run({{"steps", "1"}, {"init", "blend"}, {"blend_s", "0"}, {"blend_t", "0.5"}}, half);
  scale(expected, 1.0 / 6.0);
  EXPECT_TRUE(same_bytes(half.inputs.front(), expected));
}

TEST(Descent, VocabSpacePinvStartIsTheProjectionOntoTheColumnsOfWte) {
  // wte [5, 2] with orthogonal columns c1 = (1, 0, 1, 0, 0), c2 = (0, 2, 0, 0, -2): G = wte^T wte = diag(2, 8), so
  // the start of token v is X_v = wte G^-1 wte^T onehot_v = c1 c1_v / 2 + c2 c2_v / 8 (times onehot_scale).
  Fixture f;
  const Tensor wte = Tensor::from<double>({5, 2}, {1, 0, 0, 2, 1, 0, 0, 0, 0, -2});
  f.use_vocab({0, 1, 3, 4}, wte);
  Recorder rec;
  f.run({{"steps", "1"}, {"init", "blend"}, {"blend_s", "0"}, {"blend_t", "1"}, {"vocab_start", "pinv"},
         {"onehot_scale", "2"}},
        rec);
  const std::vector<double> expected = {
      0.5, 0.0, 0.5, 0.0, 0.0,    // token 0: c1 / 2
      0.0, 0.5, 0.0, 0.0, -0.5,   // token 1: 2 c2 / 8
      0.0, 0.0, 0.0, 0.0, 0.0,    // token 3: a zero row of wte
      0.0, -0.5, 0.0, 0.0, 0.5};  // token 4: -2 c2 / 8
  const Tensor& x = rec.inputs.front();
  ASSERT_EQ(x.shape(), (Shape{1, 4, 5}));
  for (std::int64_t i = 0; i < x.numel(); ++i) EXPECT_NEAR(x.get(i), 2.0 * expected[i], 1e-14) << i;

  // On a random, full-rank wte the start maps back to the true embeddings: X wte = onehot_scale * e.
  Tensor wide(DType::f64, {30, 4});
  Rng rng(9);
  fill_normal(wide, rng, 0.0, 0.02);
  f.use_vocab({29, 0, 11}, wide);
  Recorder rec2;
  f.run({{"steps", "1"}, {"init", "blend"}, {"blend_s", "0"}, {"blend_t", "1"}, {"vocab_start", "pinv"},
         {"onehot_scale", "2"}},
        rec2);
  const Tensor& y = rec2.inputs.front();
  for (std::int64_t t = 0; t < 3; ++t)
    for (std::int64_t j = 0; j < 4; ++j) {
      double mapped = 0;
      for (std::int64_t v = 0; v < 30; ++v) mapped += y.get(t * 30 + v) * wide.get(v * 4 + j);
      const std::int64_t id = std::vector<std::int64_t>{29, 0, 11}[t];
      EXPECT_NEAR(mapped, 2.0 * wide.get(id * 4 + j), 1e-12) << t << " " << j;
    }
  // ... and it is not the one-hot itself.
  EXPECT_GT(l1_distance(y, f.true_input), 1.0);
}

TEST(Descent, VocabSpacePinvStartNeedsTheTokenEmbedding) {
  Fixture f;
  f.use_vocab({0, 1}, Tensor::from<double>({3, 2}, {1, 0, 0, 1, 1, 1}));
  f.weights = std::make_shared<const WeightSet>();
  Recorder rec;
  try {
    f.run({{"steps", "1"}, {"init", "blend"}, {"vocab_start", "pinv"}}, rec);
    ADD_FAILURE() << "no wte accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("wte.weight"), std::string::npos) << e.what();
  }
}
