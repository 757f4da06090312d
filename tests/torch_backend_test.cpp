// The torch backend against the reference backend (the numerical ground truth): forward, the input gradient
// (backward with a random output gradient, loss_and_grad for l1, l2 and cosine) for every family, head, input space
// and extra-layer setting, in f64 (1e-10 relative), f32 (1e-4) and bf16 (3e-2); batches against items one by one;
// the metrics' conventions at o = t and |t| = 0; the errors it raises; loading it as the "torch" plugin. Run with
// --gtest_also_run_disabled_tests for GPT-2 small timings. (The shared backend conformance suite is
// conformance_test.cpp; this one covers what is particular to torch.)
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "lminv/options.hpp"
#include "lminv/rng.hpp"
#include "reference_backend.hpp"
#include "registry.hpp"
#include "torch_backend.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

using torch_backend::TorchBackend;

// ---- helpers ------------------------------------------------------------------------------------------------------

// A tiny GPT-2: d = 16, 2 heads of 8, 3 blocks, 40 tokens, 16 positions, 5 tokens of input.
ModelSpec gpt2_spec(Head head, InputSpace input, std::int64_t blocks = 3, std::vector<std::int64_t> layers = {},
                    DType dtype = DType::f64) {
  ModelSpec spec;
  spec.family = "gpt2";
  spec.n_layer = 3;
  spec.n_embd = 16;
  spec.n_head = 2;
  spec.vocab_size = 40;
  spec.n_positions = 16;
  spec.seq_len = 5;
  spec.blocks = blocks;
  spec.head = head;
  spec.input = input;
  spec.layers = std::move(layers);
  spec.dtype = dtype;
  return spec;
}

// The MLP families at d = 8, T = 3 (V = 40 for vocabulary-space inputs).
ModelSpec mlp_spec(const std::string& family, InputSpace input, DType dtype = DType::f64) {
  ModelSpec spec;
  spec.family = family;
  spec.n_embd = 8;
  spec.seq_len = 3;
  spec.vocab_size = 40;
  spec.input = input;
  spec.head = Head::none;
  spec.blocks = 0;
  spec.dtype = dtype;
  return spec;
}

// Seeded weights (f64), with every bias and LayerNorm parameter moved away from GPT-2's init (0 and 1), so that a
// missing or misplaced bias or LayerNorm weight shows.
std::shared_ptr<const WeightSet> weights_for(const ModelSpec& spec, std::uint64_t seed = 3) {
  ModelSpec f64 = spec;
  f64.dtype = DType::f64;
  WeightSet w = init_random_weights(f64, seed, 1);
  Rng rng(seed + 100);
  WeightSet out;
  for (const auto& [name, tensor] : w.tensors()) {
    Tensor t = tensor;
    const bool bias = name.size() > 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    const bool layer_norm = name.find("ln_") != std::string::npos;
    if (bias || layer_norm)
      for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, t.get(i) + 0.2 * rng.normal());
    out.set(name, std::move(t));
  }
  return std::make_shared<const WeightSet>(std::move(out));
}

// One thread by default: these models are far too small for a team, and on a busy machine every fork and join of
// one costs a scheduling delay.
std::unique_ptr<Model> torch_model(ModelSpec spec, std::shared_ptr<const WeightSet> weights, int threads = 1) {
  TorchBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(threads)}}));
  return backend.create_model(spec, std::move(weights));
}

std::unique_ptr<Model> reference_model(ModelSpec spec, std::shared_ptr<const WeightSet> weights) {
  spec.dtype = DType::f64;
  reference::ReferenceBackend backend;
  backend.configure(Options("backend", "test", {{"threads", "1"}}));
  return backend.create_model(spec, std::move(weights));
}

Tensor random_tensor(const Shape& shape, std::uint64_t seed, double scale = 1.0, DType dtype = DType::f64) {
  Tensor t(dtype, shape);
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
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
  if (a.shape() != b.shape()) return 1e300;
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  return m / std::max(max_abs(b), 1e-300);
}

double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0, largest = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    largest = std::max(largest, std::abs(b[i]));
  }
  return m / std::max(largest, 1e-300);
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not an lminv::Error) ") + e.what();
  }
  return "(no error)";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string describe(const ModelSpec& s) {
  std::string layers;
  for (std::int64_t l : s.layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  return s.family + " blocks=" + std::to_string(s.blocks) + " head=" + head_name(s.head) +
         " input=" + input_space_name(s.input) + " layers={" + layers + "} " + dtype_name(s.dtype) + " " + s.device;
}

// Every spec checked against the reference: GPT-2 with each head, input space and extra-layer setting, the three MLP
// families in both input spaces.
std::vector<ModelSpec> all_specs(DType dtype) {
  std::vector<ModelSpec> specs;
  for (Head head : {Head::none, Head::ln_f, Head::lm_head})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      for (const auto& [blocks, layers] : std::vector<std::pair<std::int64_t, std::vector<std::int64_t>>>{
               {3, {}}, {1, {0, 3}}, {0, {2}}})
        specs.push_back(gpt2_spec(head, input, blocks, layers, dtype));
  for (const char* family : {"fcnet", "fcnet_noninvertible", "transformer_mlp"})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) specs.push_back(mlp_spec(family, input, dtype));
  return specs;
}

std::vector<std::string> devices() {
  std::vector<std::string> out{"cpu"};
  if (torch_backend::cuda_available()) out.push_back("cuda");
  return out;
}

// A batch of B inputs: token embeddings of the model's scale (GPT-2's wte has std 0.02, the MLPs take anything), or
// vocabulary-space vectors.
Tensor input_for(const ModelSpec& spec, std::int64_t B, std::uint64_t seed) {
  const double scale = spec.input == InputSpace::vocab ? 1.0 : (spec.family == "gpt2" ? 0.5 : 1.0);
  return random_tensor(input_shape(spec, B), seed, scale);
}

// Forward, backward with a random output gradient, and loss_and_grad (l1, l2, cosine; target of one item and of B)
// of the torch model in `spec.dtype` on `spec.device` against the reference in f64, within `tolerance` relative.
void expect_matches_reference(const ModelSpec& spec, double tolerance, bool with_l1 = true) {
  SCOPED_TRACE(describe(spec));
  const auto weights = weights_for(spec);
  const auto torch = torch_model(spec, weights);
  const auto ref = reference_model(spec, weights);
  const std::int64_t B = 2;
  const Tensor x = input_for(spec, B, 11);

  const Tensor expected = ref->forward(x);
  const Tensor output = torch->forward(x);
  EXPECT_EQ(output.dtype(), spec.dtype);
  EXPECT_LT(relative_difference(output, expected), tolerance) << "forward";

  const Tensor grad_output = random_tensor(expected.shape(), 12);
  const Tensor grad = torch->backward(x, grad_output);
  EXPECT_EQ(grad.dtype(), DType::f64) << "the input gradient comes in the input's dtype";
  EXPECT_LT(relative_difference(grad, ref->backward(x, grad_output)), tolerance) << "backward";

  // Targets from other inputs, so that no output element equals its target (l1's gradient is a sign).
  const Tensor target_1 = ref->forward(input_for(spec, 1, 13));
  const Tensor target_b = ref->forward(input_for(spec, B, 14));
  for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
    if (metric == Metric::l1 && !with_l1) continue;
    for (const Tensor* target : {&target_1, &target_b}) {
      SCOPED_TRACE(std::string(metric_name(metric)) + " target " + shape_string(target->shape()));
      const LossAndGrad want = ref->loss_and_grad(x, *target, metric);
      const LossAndGrad got = torch->loss_and_grad(x, *target, metric);
      EXPECT_LT(relative_difference(got.loss, want.loss), tolerance) << "loss";
      EXPECT_LT(relative_difference(got.grad, want.grad), tolerance) << "input gradient";
    }
  }
  // A forward on the input of the last loss_and_grad (answered from what that pass kept).
  EXPECT_LT(relative_difference(torch->forward(x), expected), tolerance) << "forward after loss_and_grad";

  // One item alone (for the MLPs, one row: matrix-vector products instead of matrix products).
  const Tensor x1 = x.slice0(1, 2), grad_output_1 = grad_output.slice0(1, 2);
  EXPECT_LT(relative_difference(torch->forward(x1), expected.slice0(1, 2)), tolerance) << "forward of one item";
  EXPECT_LT(relative_difference(torch->backward(x1, grad_output_1), ref->backward(x1, grad_output_1)), tolerance)
      << "backward of one item";
}

// ---- against the reference ----------------------------------------------------------------------------------------

TEST(TorchBackend, MatchesTheReferenceInF64) {
  for (const std::string& device : devices())
    for (ModelSpec spec : all_specs(DType::f64)) {
      spec.device = device;
      expect_matches_reference(spec, 1e-10);
    }
}

TEST(TorchBackend, MatchesTheReferenceInF32) {
  for (const std::string& device : devices())
    for (ModelSpec spec : all_specs(DType::f32)) {
      spec.device = device;
      expect_matches_reference(spec, 1e-4);
    }
}

// bf16 keeps 8 bits of mantissa: within 3e-2 of the f64 truth. l1 is left out: its gradient is sign(o - t), which
// bf16's rounding of o flips wherever o is close to t.
TEST(TorchBackend, MatchesTheReferenceInBf16) {
  for (const std::string& device : devices())
    for (ModelSpec spec : {gpt2_spec(Head::lm_head, InputSpace::embedding, 3, {}, DType::bf16),
                           gpt2_spec(Head::ln_f, InputSpace::vocab, 2, {1}, DType::bf16),
                           mlp_spec("fcnet", InputSpace::embedding, DType::bf16),
                           mlp_spec("fcnet_noninvertible", InputSpace::vocab, DType::bf16),
                           mlp_spec("transformer_mlp", InputSpace::embedding, DType::bf16)}) {
      spec.device = device;
      expect_matches_reference(spec, 3e-2, /*with_l1=*/false);
    }
}

TEST(TorchBackend, BatchEqualsItemsOneByOne) {
  for (const ModelSpec& spec : {gpt2_spec(Head::lm_head, InputSpace::embedding, 2, {3}),
                                gpt2_spec(Head::ln_f, InputSpace::vocab), mlp_spec("fcnet", InputSpace::embedding),
                                mlp_spec("transformer_mlp", InputSpace::vocab)}) {
    SCOPED_TRACE(describe(spec));
    const auto torch = torch_model(spec, weights_for(spec));
    const std::int64_t B = 3;
    const Tensor x = input_for(spec, B, 21);
    const Tensor output = torch->forward(x);
    const Tensor grad_output = random_tensor(output.shape(), 22);
    const Tensor grad = torch->backward(x, grad_output);
    const Tensor target = torch->forward(input_for(spec, B, 23));
    const LossAndGrad lg = torch->loss_and_grad(x, target, Metric::l2);
    for (std::int64_t b = 0; b < B; ++b) {
      SCOPED_TRACE("item " + std::to_string(b));
      const Tensor xb = x.slice0(b, b + 1);
      EXPECT_LT(relative_difference(torch->forward(xb), output.slice0(b, b + 1)), 1e-12);
      EXPECT_LT(relative_difference(torch->backward(xb, grad_output.slice0(b, b + 1)), grad.slice0(b, b + 1)), 1e-12);
      const LossAndGrad one = torch->loss_and_grad(xb, target.slice0(b, b + 1), Metric::l2);
      EXPECT_NEAR(one.loss[0], lg.loss[b], 1e-12 * lg.loss[b]);
      EXPECT_LT(relative_difference(one.grad, lg.grad.slice0(b, b + 1)), 1e-12);
    }
  }
}

TEST(TorchBackend, ConvertsInputsAndWeightsOfOtherDtypes) {
  ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding);
  const auto weights = weights_for(spec);
  // f32 weights and an f32 input for an f64 model: the weights' values are converted, the gradient comes back in f32.
  ModelSpec f32_spec = spec;
  f32_spec.dtype = DType::f32;
  auto weights_f32 = std::make_shared<WeightSet>();
  for (const auto& [name, t] : weights->tensors()) weights_f32->set(name, t.to(DType::f32));
  auto weights_f32_as_f64 = std::make_shared<WeightSet>();
  for (const auto& [name, t] : weights_f32->tensors()) weights_f32_as_f64->set(name, t.to(DType::f64));

  const Tensor x = input_for(spec, 2, 31).to(DType::f32);
  const auto torch = torch_model(spec, weights_f32);
  const auto ref = reference_model(spec, weights_f32_as_f64);
  const Tensor output = torch->forward(x);
  EXPECT_EQ(output.dtype(), DType::f64);
  EXPECT_LT(relative_difference(output, ref->forward(x.to(DType::f64))), 1e-10);
  const Tensor grad_output = random_tensor(output.shape(), 32);
  const Tensor grad = torch->backward(x, grad_output.to(DType::f32));
  EXPECT_EQ(grad.dtype(), DType::f32);
  EXPECT_LT(relative_difference(grad, ref->backward(x.to(DType::f64), grad_output.to(DType::f32).to(DType::f64))),
            1e-6);
}

// ---- the metrics' conventions -------------------------------------------------------------------------------------

TEST(TorchBackend, MetricsAtTheirSingularPointsFollowTheSdk) {
  for (const ModelSpec& spec : {gpt2_spec(Head::ln_f, InputSpace::embedding), mlp_spec("fcnet", InputSpace::vocab)}) {
    SCOPED_TRACE(describe(spec));
    const auto torch = torch_model(spec, weights_for(spec));
    const Tensor x = input_for(spec, 2, 41);
    // o = t exactly: l1 and l2 are 0 with a zero gradient (no NaN from 0 / 0).
    const Tensor output = torch->forward(x);
    for (Metric metric : {Metric::l1, Metric::l2}) {
      const LossAndGrad lg = torch->loss_and_grad(x, output, metric);
      const LossAndGrad sdk = metric_and_grad(output, output, metric);
      for (std::size_t b = 0; b < lg.loss.size(); ++b) EXPECT_EQ(lg.loss[b], sdk.loss[b]) << metric_name(metric);
      EXPECT_EQ(max_abs(lg.grad), 0.0) << metric_name(metric);
    }
    // |t| = 0: cosine is 1 with a zero gradient.
    const Tensor zero(output.dtype(), output.slice0(0, 1).shape());
    const LossAndGrad lg = torch->loss_and_grad(x, zero, Metric::cosine);
    for (double loss : lg.loss) EXPECT_EQ(loss, 1.0);
    EXPECT_EQ(max_abs(lg.grad), 0.0);
  }
}

// ---- info, configuration and errors -------------------------------------------------------------------------------

TEST(TorchBackend, InfoListsFamiliesDtypesAndCudaOnlyWhenAvailable) {
  const BackendInfo info = TorchBackend().info();
  EXPECT_EQ(info.families, (std::vector<std::string>{"gpt2", "fcnet", "fcnet_noninvertible", "transformer_mlp"}));
  EXPECT_EQ(info.dtypes, (std::vector<DType>{DType::f32, DType::f64, DType::bf16}));
  const bool lists_cuda = std::find(info.devices.begin(), info.devices.end(), "cuda") != info.devices.end();
  EXPECT_EQ(lists_cuda, torch_backend::cuda_available());
  EXPECT_EQ(info.devices.front(), "cpu");
}

TEST(TorchBackend, ConfigureReadsThreadsAndNamesTheKey) {
  TorchBackend backend;
  const Options options("backend", "cfg.ini", {{"threads", "3"}, {"aten_threads", "2"}});
  backend.configure(options);
  EXPECT_EQ(backend.threads().threads, 3);
  EXPECT_EQ(backend.threads().aten_threads, 2);
  EXPECT_TRUE(options.unread_keys().empty());
  for (const char* key : {"threads", "aten_threads"})
    for (const char* bad : {"-1", "two", "5000"}) {
      const std::string e = error_of([&] { backend.configure(Options("backend", "cfg.ini", {{key, bad}})); });
      EXPECT_TRUE(contains(e, std::string("cfg.ini: [backend] ") + key + " = '" + bad + "'")) << e;
    }
  // Unknown keys are left unread, for the host to report.
  const Options extra("backend", "cfg.ini", {{"threads", "1"}, {"fancy", "yes"}});
  backend.configure(extra);
  EXPECT_EQ(extra.unread_keys(), std::vector<std::string>{"fancy"});
}

TEST(TorchBackend, SameResultsWithOneOrTwoThreads) {
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::vocab);
  const auto weights = weights_for(spec);
  const Tensor x = input_for(spec, 2, 51);
  const Tensor target = torch_model(spec, weights, 1)->forward(input_for(spec, 1, 52));
  const LossAndGrad one = torch_model(spec, weights, 1)->loss_and_grad(x, target, Metric::l2);
  const LossAndGrad two = torch_model(spec, weights, 2)->loss_and_grad(x, target, Metric::l2);
  EXPECT_LT(relative_difference(two.loss, one.loss), 1e-12);
  EXPECT_LT(relative_difference(two.grad, one.grad), 1e-12);
}

// The thread settings are process-wide (OpenMP's for the calling thread, OpenBLAS's): a call puts them back, so that
// another backend in the process (the reference's "all cores" is omp_get_max_threads()) is not changed by it.
TEST(TorchBackend, CallsLeaveTheProcessThreadSettingsAsTheyWere) {
  const int before = omp_get_max_threads();
  const ModelSpec spec = mlp_spec("fcnet", InputSpace::embedding);
  TorchBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(before + 1)}, {"aten_threads", "1"}}));
  const auto model = backend.create_model(spec, weights_for(spec));
  EXPECT_EQ(omp_get_max_threads(), before);
  const Tensor x = input_for(spec, 2, 55);
  model->loss_and_grad(x, model->forward(x), Metric::l1);
  model->backward(x, random_tensor(model->forward(x).shape(), 56));
  EXPECT_EQ(omp_get_max_threads(), before);
}

TEST(TorchBackend, UnavailableOrUnknownDevicesAndDtypesAreErrors) {
  ModelSpec spec = mlp_spec("transformer_mlp", InputSpace::embedding);
  const auto weights = weights_for(spec);
  TorchBackend backend;
  if (!torch_backend::cuda_available()) {
    spec.device = "cuda";
    const std::string e = error_of([&] { backend.create_model(spec, weights); });
    EXPECT_TRUE(contains(e, "torch backend") && contains(e, "'cuda' is not available")) << e;
  }
  spec.device = "tpu";
  std::string e = error_of([&] { backend.create_model(spec, weights); });
  EXPECT_TRUE(contains(e, "device 'tpu' is not supported (supported: cpu")) << e;
  spec.device = "cpu";
  spec.dtype = static_cast<DType>(7);
  e = error_of([&] { backend.create_model(spec, weights); });
  EXPECT_TRUE(contains(e, "dtype") && contains(e, "not supported (supported: f32, f64, bf16)")) << e;
  spec.dtype = DType::f64;
  spec.family = "rnn";
  e = error_of([&] { backend.create_model(spec, weights); });
  EXPECT_TRUE(contains(e, "family 'rnn' is not supported")) << e;
}

TEST(TorchBackend, SpecErrorsNameTheField) {
  TorchBackend backend;
  auto error_for = [&](const ModelSpec& spec) {
    return error_of([&] { backend.create_model(spec, weights_for(gpt2_spec(Head::lm_head, InputSpace::embedding))); });
  };
  EXPECT_TRUE(contains(error_for(gpt2_spec(Head::none, InputSpace::embedding, 4)), "blocks must be in 0 .. 3, got 4"));
  EXPECT_TRUE(contains(error_for(gpt2_spec(Head::none, InputSpace::embedding, 1, {5})),
                       "every entry of layers must be in 0 .. 3, got 5"));
  ModelSpec heads = gpt2_spec(Head::none, InputSpace::embedding);
  heads.n_head = 3;
  EXPECT_TRUE(contains(error_for(heads), "n_embd divisible by n_head"));
  ModelSpec long_prompt = gpt2_spec(Head::none, InputSpace::embedding);
  long_prompt.seq_len = 17;
  EXPECT_TRUE(contains(error_for(long_prompt), "at most n_positions = 16 tokens, got seq_len 17"));
  ModelSpec mlp = mlp_spec("fcnet", InputSpace::embedding);
  mlp.layers = {1};
  EXPECT_TRUE(contains(error_of([&] { backend.create_model(mlp, weights_for(mlp_spec("fcnet", InputSpace::embedding))); }),
                       "layers is not empty"));
  EXPECT_TRUE(contains(error_of([&] { backend.create_model(mlp, nullptr); }), "no weights"));
}

TEST(TorchBackend, MissingOrMisshapedWeightsAreNamed) {
  TorchBackend backend;
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::embedding);
  auto weights = std::make_shared<WeightSet>(*weights_for(spec));
  WeightSet lacking = *weights;
  WeightSet without;
  for (const auto& [name, t] : lacking.tensors())
    if (name != "h.2.mlp.c_fc.bias") without.set(name, t);
  std::string e = error_of([&] { backend.create_model(spec, std::make_shared<WeightSet>(without)); });
  EXPECT_TRUE(contains(e, "needs weight 'h.2.mlp.c_fc.bias' [64], which the weights lack")) << e;
  weights->set("h.1.attn.c_attn.weight", Tensor(DType::f64, {48, 16}));  // transposed
  e = error_of([&] { backend.create_model(spec, weights); });
  EXPECT_TRUE(contains(e, "weight 'h.1.attn.c_attn.weight' has shape [48, 16], expected [16, 48]")) << e;

  const ModelSpec mlp = mlp_spec("fcnet_noninvertible", InputSpace::vocab);
  auto mlp_weights = std::make_shared<WeightSet>(*weights_for(mlp));
  mlp_weights->set("fc2.weight", Tensor(DType::f64, {96, 96}));  // fcnet's, not fcnet_noninvertible's
  e = error_of([&] { backend.create_model(mlp, mlp_weights); });
  EXPECT_TRUE(contains(e, "weight 'fc2.weight' has shape [96, 96], expected [24, 96]")) << e;
}

TEST(TorchBackend, WrongShapesAreErrors) {
  for (const ModelSpec& spec : {gpt2_spec(Head::lm_head, InputSpace::embedding), mlp_spec("fcnet", InputSpace::vocab)}) {
    SCOPED_TRACE(describe(spec));
    const auto torch = torch_model(spec, weights_for(spec));
    const Tensor x = input_for(spec, 2, 61);
    for (const Shape& bad : {Shape{2, spec.seq_len + 1, x.dim(2)}, Shape{2, spec.seq_len, x.dim(2) + 1},
                             Shape{spec.seq_len, x.dim(2)}}) {
      const std::string e = error_of([&] { torch->forward(Tensor(DType::f64, bad)); });
      EXPECT_TRUE(contains(e, "torch backend: input has shape " + shape_string(bad))) << e;
      EXPECT_TRUE(contains(error_of([&] { torch->loss_and_grad(Tensor(DType::f64, bad), x, Metric::l2); }),
                           "input has shape"));
    }
    const Tensor output = torch->forward(x);
    Shape wrong = output.shape();
    wrong.back() += 1;
    std::string e = error_of([&] { torch->backward(x, Tensor(DType::f64, wrong)); });
    EXPECT_TRUE(contains(e, "grad_output has shape " + shape_string(wrong))) << e;
    e = error_of([&] { torch->loss_and_grad(x, Tensor(DType::f64, wrong), Metric::l1); });
    EXPECT_TRUE(contains(e, "target " + shape_string(wrong) + " does not match output")) << e;
    Shape three = output.shape();
    three[0] = 3;
    e = error_of([&] { torch->loss_and_grad(x, Tensor(DType::f64, three), Metric::l1); });
    EXPECT_TRUE(contains(e, "does not match output")) << e;
  }
}

// ---- as a plugin --------------------------------------------------------------------------------------------------

TEST(TorchBackend, LoadsAsTheTorchPlugin) {
  Registry registry({LMINV_BUILD_PLUGIN_DIR});
  const PluginInfo* info = registry.find(PluginKind::backend, "torch");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->version, "0.1.0");
  EXPECT_EQ(info->file.filename(), "lminv-plugin-torch.so");
  std::shared_ptr<Backend> backend = registry.create_backend("torch");
  backend->configure(Options("backend", "test", {{"threads", "2"}}));
  const ModelSpec spec = gpt2_spec(Head::lm_head, InputSpace::vocab, 2, {1});
  const auto weights = weights_for(spec);
  const auto model = keep_alive(backend->create_model(spec, weights), backend);
  const Tensor x = input_for(spec, 2, 71);
  EXPECT_LT(relative_difference(model->forward(x), reference_model(spec, weights)->forward(x)), 1e-10);
  // Errors from inside the module are lminv::Error here too.
  EXPECT_TRUE(contains(error_of([&] { model->forward(Tensor(DType::f64, {1, 2, 3})); }), "torch backend"));
}

// ---- what LibTorch runs on ----------------------------------------------------------------------------------------

// Not an assertion: the BLAS LibTorch's CPU matrix products call, and how fast a GEMM is (OpenBLAS gives tens of
// GFLOP/s per core, the reference BLAS about one).
TEST(TorchBackend, ReportsItsRuntime) {
  const torch_backend::TorchRuntime r = torch_backend::torch_runtime();
  std::cout << "LibTorch " << r.version << ", CUDA " << (r.cuda ? "available" : "not available") << "\n"
            << "BLAS (sgemm_ from): " << (r.blas_library.empty() ? "(none found)" : r.blas_library) << "\n"
            << "OpenBLAS config: " << (r.openblas_config.empty() ? "(not OpenBLAS)" : r.openblas_config)
            << ", threading " << r.openblas_parallel << " (0 sequential, 1 pthreads, 2 OpenMP)\n";
  for (DType dtype : {DType::f32, DType::f64}) {
    const std::int64_t n = 512;
    const double seconds = torch_backend::time_cpu_gemm(n, dtype, 3);
    std::cout << "GEMM " << n << "^3 " << dtype_name(dtype) << ": " << seconds * 1e3 << " ms, "
              << 2.0 * n * n * n / seconds / 1e9 << " GFLOP/s\n";
    RecordProperty(std::string("gemm_gflops_") + dtype_name(dtype), std::to_string(2.0 * n * n * n / seconds / 1e9));
  }
  RecordProperty("blas", r.blas_library);
  EXPECT_FALSE(r.version.empty());
}

// GPT-2 small (12 blocks + lm_head, T = 5): forward and loss_and_grad (l2), best of 5 after a warm-up, next to the
// reference backend's in the same process (the machine's load then weighs on both alike). Slow (random init of
// 124M parameters): run with --gtest_also_run_disabled_tests --gtest_filter='*Gpt2Small*'. LMINV_BENCH_THREADS
// (default 2), LMINV_BENCH_DEVICE=cuda times the GPU.
TEST(TorchBackendBench, DISABLED_Gpt2SmallLossAndGrad) {
  ModelSpec spec;  // GPT-2 small's defaults
  spec.seq_len = 5;
  spec.blocks = 12;
  spec.head = Head::lm_head;
  spec.dtype = DType::f32;  // f32 weights (half the memory of f64), converted by each model
  const auto weights = std::make_shared<const WeightSet>(init_random_weights(spec, 0));
  const int threads = std::getenv("LMINV_BENCH_THREADS") ? std::atoi(std::getenv("LMINV_BENCH_THREADS")) : 2;
  const std::string device = std::getenv("LMINV_BENCH_DEVICE") ? std::getenv("LMINV_BENCH_DEVICE") : "cpu";
  auto best_of_5 = [](const std::function<void()>& f) {
    double best = 1e300;
    for (int i = 0; i < 6; ++i) {  // the first one warms up
      const auto start = std::chrono::steady_clock::now();
      f();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (i > 0) best = std::min(best, s);
    }
    return best * 1e3;
  };
  for (const auto& [dtype, batch] : std::vector<std::pair<DType, std::int64_t>>{
           {DType::f32, 1}, {DType::f64, 1}, {DType::f32, 8}, {DType::f32, 32}, {DType::bf16, 1}}) {
    spec.dtype = dtype;
    const Tensor x = random_tensor(input_shape(spec, batch), 81, 0.02, DType::f32);
    const Tensor x1 = random_tensor(input_shape(spec, 1), 82, 0.02, DType::f32);
    std::vector<std::pair<std::string, std::unique_ptr<Model>>> models;
    spec.device = device;
    models.emplace_back("torch " + device, torch_model(spec, weights, threads));
    spec.device = "cpu";
    if (dtype != DType::bf16 && batch <= 8) {
      reference::ReferenceBackend backend;
      backend.configure(Options("backend", "bench", {{"threads", std::to_string(threads)}}));
      models.emplace_back("reference cpu", backend.create_model(spec, weights));
    }
    for (const auto& [name, model] : models) {
      const Tensor target = model->forward(x1);
      const double forward = best_of_5([&] { model->forward(x); });
      const double loss_and_grad = best_of_5([&] { EXPECT_TRUE(std::isfinite(model->loss_and_grad(x, target, Metric::l2).loss[0])); });
      std::cout << "GPT-2 small " << name << " " << dtype_name(dtype) << " B=" << batch << " threads=" << threads
                << ": forward " << forward << " ms, loss_and_grad " << loss_and_grad << " ms ("
                << loss_and_grad / batch << " ms/item)" << std::endl;
    }
  }
}

}  // namespace
}  // namespace lminv
