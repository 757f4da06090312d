// The oneDNN backend (plugins/backend-onednn) against the reference backend in f64: forward, input gradient and
// loss_and_grad for every family, head, input space and extra layers on tiny models; batching; plan reuse across batch
// sizes; the loss following the SDK exactly; threads; errors; loading as the "onednn" plugin. A disabled benchmark
// times GPT-2 small (run it with --gtest_also_run_disabled_tests --gtest_filter='*Bench*').
#include "onednn_backend.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "lminv/options.hpp"
#include "lminv/rng.hpp"
#include "reference_backend.hpp"
#include "registry.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

using onednn::OnednnBackend;

constexpr double kTolerance = 1e-4;  // f32 against the f64 reference: max |a - b| / max |reference|

// ---- helpers ------------------------------------------------------------------------------------------------------

// The tiny GPT-2: d = 16, 2 heads, 3 blocks, 40 tokens, 16 positions, 5 tokens of input.
ModelSpec gpt2_spec(Head head = Head::none, InputSpace input = InputSpace::embedding, std::int64_t blocks = 3,
                    std::vector<std::int64_t> layers = {}) {
  ModelSpec s;
  s.family = "gpt2";
  s.n_layer = 3;
  s.n_embd = 16;
  s.n_head = 2;
  s.vocab_size = 40;
  s.n_positions = 16;
  s.seq_len = 5;
  s.blocks = blocks;
  s.head = head;
  s.input = input;
  s.layers = std::move(layers);
  s.dtype = DType::f32;
  return s;
}

// The tiny MLPs: d = 8, T = 3 (vocab_size 40 for input = vocab).
ModelSpec mlp_spec(const std::string& family, InputSpace input = InputSpace::embedding) {
  ModelSpec s;
  s.family = family;
  s.n_embd = 8;
  s.vocab_size = 40;
  s.seq_len = 3;
  s.input = input;
  s.head = Head::none;
  s.blocks = 0;
  s.dtype = DType::f32;
  return s;
}

std::string describe(const ModelSpec& s) {
  std::string layers;
  for (std::int64_t l : s.layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  return s.family + " blocks=" + std::to_string(s.blocks) + " head=" + head_name(s.head) +
         " input=" + input_space_name(s.input) + " layers={" + layers + "}";
}

// Seeded weights (init_random_weights), then made to matter: random biases and LayerNorm parameters, larger matrices
// (GPT-2's init leaves attention nearly uniform), all rounded to f32 values so that both backends see the same
// numbers. Returned in f64 (for the reference) and f32 (for oneDNN).
struct TestWeights {
  std::shared_ptr<const WeightSet> f64, f32;
};
TestWeights test_weights(const ModelSpec& spec, std::uint64_t seed = 7) {
  ModelSpec s = spec;
  s.dtype = DType::f64;
  WeightSet w = init_random_weights(s, seed, 1);
  Rng rng(seed + 100);
  auto f64 = std::make_shared<WeightSet>();
  auto f32 = std::make_shared<WeightSet>();
  auto ends_with = [](const std::string& name, const std::string& end) {
    return name.size() >= end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
  };
  for (const std::string& name : w.names()) {
    Tensor t = w.get(name);
    const bool layer_norm = name.find("ln_") != std::string::npos;
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      double v = t.get(i);
      if (layer_norm && ends_with(name, ".weight"))
        v = 1 + 0.2 * rng.normal();
      else if (ends_with(name, ".bias"))
        v = 0.1 * rng.normal();
      else if (s.family == "gpt2")
        v *= 10;  // N(0, 0.2^2) and the scaled projections
      t.set(i, v);
    }
    f32->set(name, t.to(DType::f32));
    f64->set(name, t.to(DType::f32).to(DType::f64));
  }
  return {f64, f32};
}

// Normal values rounded to f32, as f64.
Tensor random_input(const Shape& shape, std::uint64_t seed, double std = 1.0) {
  Tensor t(DType::f64, shape);
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, static_cast<float>(std * rng.normal()));
  return t;
}

// A target whose every element is at least half the output's scale away from the output's, so the sign of o - t (l1's
// gradient) is the same in f32 and f64.
Tensor far_target(const Tensor& output, std::uint64_t seed) {
  double scale = 0;
  for (std::int64_t i = 0; i < output.numel(); ++i) scale = std::max(scale, std::abs(output.get(i)));
  if (scale == 0) scale = 1;
  Tensor t(DType::f64, output.shape());
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const double offset = (0.5 + 0.5 * rng.uniform()) * scale;
    t.set(i, static_cast<float>(output.get(i) + (rng.uniform() < 0.5 ? -offset : offset)));
  }
  return t;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.get(i)));
  return m;
}

// max |a - b| / max |b|
double relative_difference(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  if (a.shape() != b.shape()) return 1e30;
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  const double scale = max_abs(b);
  return scale > 0 ? m / scale : m;
}

double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0, scale = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return scale > 0 ? m / scale : m;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

std::unique_ptr<Model> onednn_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads = 1) {
  OnednnBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(threads)}}));
  return backend.create_model(spec, std::move(weights));
}

std::unique_ptr<Model> reference_model(ModelSpec spec, std::shared_ptr<const WeightSet> weights) {
  spec.dtype = DType::f64;
  reference::ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", "1"}}));
  return backend.create_model(spec, std::move(weights));
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

// With LMINV_ONEDNN_TEST_VERBOSE set, the worst errors of each case are printed (to see the margins).
double report(const std::string& what, double error) {
  if (std::getenv("LMINV_ONEDNN_TEST_VERBOSE")) std::printf("    %-28s %.2e\n", what.c_str(), error);
  return error;
}

// Forward, backward (random output gradient) and loss_and_grad (l1, l2, cosine) of the oneDNN model against the
// reference in f64, on a batch of 2.
void expect_matches_reference(const ModelSpec& spec) {
  if (std::getenv("LMINV_ONEDNN_TEST_VERBOSE")) std::printf("%s\n", describe(spec).c_str());
  SCOPED_TRACE(describe(spec));
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> ref = reference_model(spec, w.f64);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  const Tensor x = random_input(input_shape(spec, 2), 11, spec.input == InputSpace::vocab ? 0.5 : 1.0);
  const Tensor x32 = x.to(DType::f32);

  const Tensor y_ref = ref->forward(x);
  const Tensor y = dnn->forward(x32);
  ASSERT_EQ(y.dtype(), DType::f32);
  EXPECT_LT(report("forward", relative_difference(y, y_ref)), kTolerance) << "forward";

  const Tensor g = random_input(y_ref.shape(), 12);
  const Tensor dx_ref = ref->backward(x, g);
  const Tensor dx = dnn->backward(x32, g.to(DType::f32));
  ASSERT_EQ(dx.dtype(), DType::f32);
  EXPECT_LT(report("backward", relative_difference(dx, dx_ref)), kTolerance) << "backward";

  const Tensor target = far_target(y_ref, 13);
  for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
    SCOPED_TRACE(metric_name(metric));
    const LossAndGrad lg_ref = ref->loss_and_grad(x, target, metric);
    const LossAndGrad lg = dnn->loss_and_grad(x32, target.to(DType::f32), metric);
    EXPECT_LT(report(std::string(metric_name(metric)) + " loss", relative_difference(lg.loss, lg_ref.loss)), kTolerance)
        << "loss";
    EXPECT_LT(report(std::string(metric_name(metric)) + " gradient", relative_difference(lg.grad, lg_ref.grad)),
              kTolerance)
        << "loss gradient";
  }
}

// ---- against the reference ----------------------------------------------------------------------------------------

TEST(OnednnBackend, Gpt2MatchesTheReferenceForEveryHeadInputAndLayers) {
  for (std::int64_t blocks = 0; blocks <= 3; ++blocks)
    for (Head head : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
        for (const std::vector<std::int64_t>& layers : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{1, 3}})
          expect_matches_reference(gpt2_spec(head, input, blocks, layers));
}

TEST(OnednnBackend, Gpt2LayersMayRepeatAndMeetTheHead) {
  // h_2 reaches the output under the head and twice more as an extra layer: its gradient is the sum of all three.
  expect_matches_reference(gpt2_spec(Head::ln_f, InputSpace::embedding, 2, {0, 2, 2}));
  expect_matches_reference(gpt2_spec(Head::none, InputSpace::vocab, 0, {0}));
}

TEST(OnednnBackend, MlpFamiliesMatchTheReference) {
  for (const char* family : {"fcnet", "fcnet_noninvertible", "transformer_mlp"})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      expect_matches_reference(mlp_spec(family, input));
  ModelSpec narrow = mlp_spec("transformer_mlp");
  narrow.n_inner = 12;  // an MLP width other than 4 d
  expect_matches_reference(narrow);
}

TEST(OnednnBackend, Gpt2WithOwnInnerWidthAndEpsilon) {
  ModelSpec s = gpt2_spec(Head::lm_head, InputSpace::embedding, 2, {1});
  s.n_inner = 24;
  s.layer_norm_epsilon = 1e-2;  // large enough to matter
  expect_matches_reference(s);
}

// ---- batching and plans -------------------------------------------------------------------------------------------

// A batch of 3 against three single calls, for forward, backward and loss_and_grad, with every backward following a
// forward pass on another input (so saved activations must be recognised as stale) and batch sizes alternating (so
// plans are reused).
void expect_batch_equals_items(const ModelSpec& spec) {
  SCOPED_TRACE(describe(spec));
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  const Tensor x = random_input(input_shape(spec, 3), 21, spec.input == InputSpace::vocab ? 0.5 : 1.0).to(DType::f32);
  const Tensor y = dnn->forward(x);
  const Tensor g = random_input(y.shape(), 22).to(DType::f32);
  const Tensor target = far_target(y, 23).to(DType::f32);
  std::vector<Tensor> ys, dxs, lgs;
  std::vector<double> losses;
  for (std::int64_t b = 0; b < 3; ++b) {
    const Tensor xb = x.slice0(b, b + 1);
    dxs.push_back(dnn->backward(xb, g.slice0(b, b + 1)));
    ys.push_back(dnn->forward(xb));
    const LossAndGrad lb = dnn->loss_and_grad(xb, target.slice0(b, b + 1), Metric::l2);
    losses.push_back(lb.loss.at(0));
    lgs.push_back(lb.grad);
  }
  const Tensor dx = dnn->backward(x, g);
  const LossAndGrad lg = dnn->loss_and_grad(x, target, Metric::l2);
  EXPECT_LT(relative_difference(y, Tensor::concat0(ys)), 1e-5) << "forward";
  EXPECT_LT(relative_difference(dx, Tensor::concat0(dxs)), 1e-5) << "backward";
  EXPECT_LT(relative_difference(lg.grad, Tensor::concat0(lgs)), 1e-5) << "loss_and_grad";
  EXPECT_LT(relative_difference(lg.loss, losses), 1e-5) << "losses";
  // and the batch once more, after the single items: the same bits as the first time
  EXPECT_TRUE(same_bytes(dnn->forward(x), y));
}

TEST(OnednnBackend, BatchEqualsItemsOneByOne) {
  expect_batch_equals_items(gpt2_spec(Head::lm_head, InputSpace::embedding, 3, {1}));
  expect_batch_equals_items(gpt2_spec(Head::ln_f, InputSpace::vocab, 2));
  for (const char* family : {"fcnet", "fcnet_noninvertible", "transformer_mlp"})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      expect_batch_equals_items(mlp_spec(family, input));
}

TEST(OnednnBackend, ManyBatchSizesInTurn) {
  // More batch sizes than the plans kept (8): old plans are dropped and rebuilt, results do not change.
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding, 3);
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  const Tensor x = random_input(input_shape(spec, 1), 31).to(DType::f32);
  const Tensor y = dnn->forward(x);
  const Tensor dx = dnn->backward(x, y);
  for (std::int64_t B = 1; B <= 10; ++B) {
    std::vector<Tensor> copies(static_cast<std::size_t>(B), x);
    const Tensor yb = dnn->forward(Tensor::concat0(copies));
    EXPECT_LT(relative_difference(yb.slice0(B - 1, B), y), 1e-5) << "B = " << B;
  }
  EXPECT_TRUE(same_bytes(dnn->forward(x), y));
  EXPECT_TRUE(same_bytes(dnn->backward(x, y), dx));
}

TEST(OnednnBackend, EmptyBatchesAsTheReference) {
  for (const ModelSpec& spec : {gpt2_spec(Head::lm_head, InputSpace::vocab, 2, {1}), mlp_spec("fcnet")}) {
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32), ref = reference_model(spec, w.f64);
    const Tensor x(DType::f32, input_shape(spec, 0));
    const Tensor y = dnn->forward(x);
    EXPECT_EQ(y.shape(), ref->forward(x.to(DType::f64)).shape());
    EXPECT_EQ(dnn->backward(x, y).shape(), x.shape());
    Shape one = y.shape();
    one[0] = 1;
    const LossAndGrad lg = dnn->loss_and_grad(x, Tensor(DType::f32, one), Metric::l2);
    EXPECT_TRUE(lg.loss.empty());
    EXPECT_EQ(lg.grad.shape(), x.shape());
  }
}

// ---- the loss -----------------------------------------------------------------------------------------------------

// loss_and_grad is forward, the SDK's metric_and_grad, backward: the same bits, also at the metrics' singular points
// (o = t for l1 and l2, a zero target for cosine), for a target per item and one broadcast over the batch.
TEST(OnednnBackend, LossFollowsTheSdkExactly) {
  for (const ModelSpec& spec : {gpt2_spec(Head::lm_head, InputSpace::embedding, 2), mlp_spec("fcnet")}) {
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
    const Tensor x = random_input(input_shape(spec, 2), 41).to(DType::f32);
    const Tensor y = dnn->forward(x);
    Tensor zero(DType::f32, y.slice0(0, 1).shape());
    for (const Tensor& target : {far_target(y, 42).to(DType::f32), y, y.slice0(1, 2), zero, far_target(y, 43)}) {
      for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
        SCOPED_TRACE(std::string(metric_name(metric)) + " target " + shape_string(target.shape()) + " " +
                     dtype_name(target.dtype()));
        const LossAndGrad lg = dnn->loss_and_grad(x, target, metric);
        const LossAndGrad sdk = metric_and_grad(dnn->forward(x), target, metric);
        EXPECT_EQ(lg.loss, sdk.loss);
        EXPECT_TRUE(same_bytes(lg.grad, dnn->backward(x, sdk.grad)));
      }
    }
    EXPECT_TRUE(contains(error_of([&] { dnn->loss_and_grad(x, Tensor(DType::f32, {2, 7}), Metric::l2); }), "target"));
  }
}

// ---- dtypes, threads ----------------------------------------------------------------------------------------------

TEST(OnednnBackend, InputsOfOtherDtypesAndWeightsOfOtherDtypes) {
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::vocab, 2);
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> from32 = onednn_model(spec, w.f32);
  const std::unique_ptr<Model> from64 = onednn_model(spec, w.f64);  // f64 weights: converted once
  const Tensor x = random_input(input_shape(spec, 2), 51, 0.5);
  const Tensor y = from32->forward(x.to(DType::f32));
  EXPECT_TRUE(same_bytes(from64->forward(x.to(DType::f32)), y));
  EXPECT_TRUE(same_bytes(from32->forward(x), y));  // f64 input, exactly f32 values
  const Tensor dx = from32->backward(x, y.to(DType::f64));
  EXPECT_EQ(dx.dtype(), DType::f64);  // the gradient comes back in the input's dtype
  EXPECT_TRUE(same_bytes(dx.to(DType::f32), from32->backward(x.to(DType::f32), y)));
}

TEST(OnednnBackend, ThreadsOptionIsReadAndTheCallersTeamIsRestored) {
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding, 3, {2});
  const TestWeights w = test_weights(spec);
  const Tensor x = random_input(input_shape(spec, 4), 61).to(DType::f32);
  const std::unique_ptr<Model> one = onednn_model(spec, w.f32, 1);
  const std::unique_ptr<Model> two = onednn_model(spec, w.f32, 2);
  const int before = omp_get_max_threads();
  const Tensor y1 = one->forward(x), y2 = two->forward(x);
  EXPECT_EQ(omp_get_max_threads(), before);
  EXPECT_LT(relative_difference(y2, y1), 1e-5);
  EXPECT_LT(relative_difference(two->backward(x, y2), one->backward(x, y1)), 1e-5);

  OnednnBackend backend;
  EXPECT_EQ(backend.threads(), 0);
  const Options options("backend", "cfg.ini", {{"threads", "3"}});
  backend.configure(options);
  EXPECT_EQ(backend.threads(), 3);
  EXPECT_TRUE(options.unread_keys().empty());
  for (const char* bad : {"-1", "two", "5000"}) {
    const std::string e = error_of([&] { backend.configure(Options("backend", "cfg.ini", {{"threads", bad}})); });
    EXPECT_TRUE(contains(e, "threads")) << e;
    EXPECT_TRUE(contains(e, bad)) << e;
  }
}

// ---- errors -------------------------------------------------------------------------------------------------------

TEST(OnednnBackend, InfoAndUnsupportedDtypesDevicesFamilies) {
  OnednnBackend backend;
  const BackendInfo info = backend.info();
  EXPECT_EQ(info.dtypes, std::vector<DType>{DType::f32});
  EXPECT_EQ(info.devices, std::vector<std::string>{"cpu"});
  EXPECT_EQ(info.families, (std::vector<std::string>{"gpt2", "fcnet", "fcnet_noninvertible", "transformer_mlp"}));

  const ModelSpec spec = gpt2_spec();
  const TestWeights w = test_weights(spec);
  ModelSpec f64 = spec;
  f64.dtype = DType::f64;
  std::string e = error_of([&] { backend.create_model(f64, w.f32); });
  EXPECT_TRUE(contains(e, "dtype 'f64'") && contains(e, "f32") && contains(e, "onednn")) << e;
  ModelSpec bf16 = spec;
  bf16.dtype = DType::bf16;
  e = error_of([&] { backend.create_model(bf16, w.f32); });
  EXPECT_TRUE(contains(e, "dtype 'bf16'") && contains(e, "supported: f32")) << e;
  ModelSpec cuda = spec;
  cuda.device = "cuda";
  e = error_of([&] { backend.create_model(cuda, w.f32); });
  EXPECT_TRUE(contains(e, "device 'cuda'") && contains(e, "cpu")) << e;
  ModelSpec unknown = spec;
  unknown.family = "lstm";
  e = error_of([&] { backend.create_model(unknown, w.f32); });
  EXPECT_TRUE(contains(e, "family 'lstm'") && contains(e, "transformer_mlp")) << e;
  e = error_of([&] { backend.create_model(spec, nullptr); });
  EXPECT_TRUE(contains(e, "no weights")) << e;
}

TEST(OnednnBackend, SpecAndWeightErrorsNameTheField) {
  OnednnBackend backend;
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding, 2);
  const TestWeights w = test_weights(spec);
  auto refused = [&](ModelSpec s, const std::string& part, std::shared_ptr<const WeightSet> weights = nullptr) {
    const std::string e = error_of([&] { backend.create_model(s, weights ? weights : w.f32); });
    EXPECT_TRUE(contains(e, part)) << "expected '" << part << "' in: " << e;
  };
  ModelSpec s = spec;
  s.blocks = 4;
  refused(s, "blocks must be in 0 .. 3, got 4");
  s = spec;
  s.layers = {5};
  refused(s, "every entry of layers must be in 0 .. 3, got 5");
  s = spec;
  s.seq_len = 17;
  refused(s, "at most n_positions = 16");
  s = spec;
  s.n_head = 3;
  refused(s, "divisible by n_head");
  s = spec;
  s.n_embd = 8;  // the weights are for 16
  refused(s, "wte.weight");
  auto missing = std::make_shared<WeightSet>(*w.f32);
  missing->set("h.1.mlp.c_fc.bias", Tensor(DType::f32, {3}));
  refused(spec, "h.1.mlp.c_fc.bias", missing);
  ModelSpec mlp = mlp_spec("fcnet");
  mlp.layers = {1};
  refused(mlp, "layers", test_weights(mlp_spec("fcnet")).f32);
  refused(mlp_spec("fcnet"), "fc1.weight", w.f32);  // GPT-2's weights for an MLP
}

TEST(OnednnBackend, WrongShapesAreErrors) {
  for (const ModelSpec& spec : {gpt2_spec(Head::ln_f, InputSpace::embedding, 1), mlp_spec("transformer_mlp")}) {
    SCOPED_TRACE(describe(spec));
    const std::unique_ptr<Model> dnn = onednn_model(spec, test_weights(spec).f32);
    std::string e = error_of([&] { dnn->forward(Tensor(DType::f32, {2, spec.seq_len, spec.n_embd + 1})); });
    EXPECT_TRUE(contains(e, "input has shape [2, " + std::to_string(spec.seq_len))) << e;
    e = error_of([&] { dnn->forward(Tensor(DType::f32, {spec.seq_len, spec.n_embd})); });
    EXPECT_TRUE(contains(e, "input has shape")) << e;
    const Tensor x = random_input(input_shape(spec, 2), 71).to(DType::f32);
    e = error_of([&] { dnn->backward(x, Tensor(DType::f32, {1, 2, 3})); });
    EXPECT_TRUE(contains(e, "grad_output has shape [1, 2, 3]")) << e;
  }
}

// ---- as a plugin --------------------------------------------------------------------------------------------------

TEST(OnednnBackend, LoadsAsTheOnednnPlugin) {
  Registry registry({LMINV_BUILD_PLUGIN_DIR});
  const PluginInfo* info = registry.find(PluginKind::backend, "onednn");
  ASSERT_NE(info, nullptr) << "no backend plugin 'onednn' in " << LMINV_BUILD_PLUGIN_DIR;
  EXPECT_EQ(info->version, "0.1.0");
  EXPECT_TRUE(contains(info->summary, "oneDNN"));
  const std::shared_ptr<Backend> backend = registry.create_backend("onednn");
  const Options options("backend", "test", {{"threads", "1"}});
  backend->configure(options);
  EXPECT_TRUE(options.unread_keys().empty());
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding, 3);
  const TestWeights w = test_weights(spec);
  const Tensor x = random_input(input_shape(spec, 2), 81).to(DType::f32);
  EXPECT_TRUE(same_bytes(backend->create_model(spec, w.f32)->forward(x), onednn_model(spec, w.f32)->forward(x)));
  ModelSpec f64 = spec;
  f64.dtype = DType::f64;
  try {  // an lminv::Error from inside the plugin is caught as one here
    backend->create_model(f64, w.f32);
    ADD_FAILURE() << "f64 accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "f64"));
  }
}

// ---- benchmark ----------------------------------------------------------------------------------------------------

// GPT-2 small (12 blocks + ln_f + tied lm_head, T = 5), loss_and_grad (l2) in f32, best of 5, at batch 1, 8, 32.
// Threads: LMINV_BENCH_THREADS (default 2); batch sizes: LMINV_BENCH_BATCHES (default "1 8 32");
// LMINV_BENCH_REFERENCE=1 times the reference backend (f32) instead; LMINV_BENCH_VERBOSE=1 prints every call.
TEST(OnednnBackendBench, DISABLED_Gpt2SmallLossAndGrad) {
  ModelSpec spec;  // GPT-2 small's defaults
  spec.family = "gpt2";
  spec.seq_len = 5;
  spec.blocks = 12;
  spec.head = Head::lm_head;
  spec.dtype = DType::f32;
  const int threads = std::getenv("LMINV_BENCH_THREADS") ? std::atoi(std::getenv("LMINV_BENCH_THREADS")) : 2;
  auto t0 = std::chrono::steady_clock::now();
  auto weights = std::make_shared<const WeightSet>(init_random_weights(spec, 0, 0));
  auto seconds = [](auto since) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
  };
  std::printf("weights: %.2f s\n", seconds(t0));
  t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Model> model = onednn_model(spec, weights, threads);
  std::printf("create_model: %.3f s (threads %d)\n", seconds(t0), threads);
  if (std::getenv("LMINV_BENCH_REFERENCE")) {  // the reference backend in f32 instead, for comparison
    reference::ReferenceBackend backend;
    backend.configure(Options("backend", "bench", {{"threads", std::to_string(threads)}}));
    model = backend.create_model(spec, weights);
    std::printf("(reference backend, f32)\n");
  }
  std::vector<std::int64_t> batches{1, 8, 32};
  if (const char* list = std::getenv("LMINV_BENCH_BATCHES")) {  // e.g. "1 4"
    batches.clear();
    for (const std::string& word : Options::split_list(list)) batches.push_back(std::stoll(word));
  }
  for (std::int64_t B : batches) {
    const Tensor x = random_input(input_shape(spec, B), 91, 0.1).to(DType::f32);
    const Tensor target(DType::f32, {1, spec.seq_len, spec.vocab_size});
    t0 = std::chrono::steady_clock::now();
    model->loss_and_grad(x, target, Metric::l2);  // builds the plan
    const double first = seconds(t0);
    double best = 1e30, sum = 0;
    for (int r = 0; r < 5; ++r) {
      t0 = std::chrono::steady_clock::now();
      model->loss_and_grad(x, target, Metric::l2);
      const double s = seconds(t0);
      if (std::getenv("LMINV_BENCH_VERBOSE")) std::printf("  call %d: %.4f s\n", r, s);
      best = std::min(best, s);
      sum += s;
    }
    double fwd = 1e30;
    for (int r = 0; r < 3; ++r) {
      t0 = std::chrono::steady_clock::now();
      model->forward(x);
      fwd = std::min(fwd, seconds(t0));
    }
    std::printf("B = %2lld: loss_and_grad best %.4f s, mean %.4f s (first call %.3f s); forward best %.4f s\n",
                static_cast<long long>(B), best, sum / 5, first, fwd);
  }
}

}  // namespace
}  // namespace lminv
