// The `descent` optimizer, loaded as a plugin and run on the identity model of the echo test backend.
#include <gtest/gtest.h>

#include "lminv/ops.hpp"
#include "registry.hpp"

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
  }
  std::vector<std::int64_t> indices;
  std::vector<double> losses, lrs;
};

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
    Problem problem{*model, model->forward(true_input), true_input, {}, decoder, nullptr, Rng(seed)};
    return optimizer->run(problem, recorder);
  }

  Registry registry;
  std::shared_ptr<Backend> backend;
  std::shared_ptr<Model> model;
  ModelSpec spec;
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
