// The oneDNN backend (plugins/backend-onednn) against the reference backend in f64 (the "reference" plugin, loaded by
// name like any backend): forward, input gradient and loss_and_grad for the decoder at GPT-2's setting and at the
// settings of other families (llama, qwen2, gpt_neox, mistral, layer norm without bias), every head, input space and
// extra layers, and for the MLP kinds, on tiny models; any length on one model; batching; plan reuse across shapes;
// the loss following the SDK exactly; threads; refusals and errors; loading as the "onednn" plugin. A disabled
// benchmark times GPT-2 small (run it with --gtest_also_run_disabled_tests --gtest_filter='*Bench*').
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
#include "lminv/schema.hpp"
#include "registry.hpp"

namespace lminv {
namespace {

using onednn::OnednnBackend;

constexpr double kTolerance = 1e-4;  // f32 against the f64 reference: max |a - b| / max |reference|

// ---- specs --------------------------------------------------------------------------------------------------------

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Tiny decoders: 3 blocks, 40 tokens, 16 positions, 5 tokens of input, at the setting of `family`:
//   gpt2                layer_norm + bias, learned positions, gelu_tanh, all biases, sequential, tied  (d 16, 2 heads)
//   layer_norm_no_bias  GPT-2 with layer norms without bias and no q/k/v bias
//   llama               rms_norm, rotary, 4 heads on 2 kv heads, swiglu (inner 24), no biases, untied  (d 16)
//   qwen2               llama's with q/k/v biases only, rope_theta 1e6, tied
//   gpt_neox            layer_norm + bias, rotary on 25% of each head (4 of 16), parallel residual, gelu_erf, all
//                       biases, untied  (d 32, 2 heads)
//   mistral             llama's with one kv head for 4 query heads, head_dim 8 (4 heads of 8 = 32 != d = 16),
//                       rope_theta 1e6
ModelSpec decoder_spec(const std::string& family, Head head = Head::none, InputSpace input = InputSpace::embedding,
                       std::int64_t blocks = 3, std::vector<std::int64_t> layers = {}) {
  ModelSpec s;
  s.family = family;
  s.kind = ModelKind::decoder;
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
  Architecture& a = s.arch;
  auto llama = [&] {
    s.n_head = 4;
    s.n_inner = 24;
    a.norm = Norm::rms_norm;
    a.norm_bias = false;
    a.norm_eps = 1e-6;
    a.positions = Positions::rotary;
    a.n_kv_head = 2;
    a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;
    a.mlp = Mlp::swiglu;
    a.tied_head = false;
  };
  if (family == "gpt2") {
  } else if (family == "layer_norm_no_bias") {
    a.norm_bias = false;
    a.qkv_bias = false;
  } else if (family == "llama") {
    llama();
  } else if (family == "qwen2") {
    llama();
    a.rope_theta = 1e6;
    a.qkv_bias = true;
    a.tied_head = true;
  } else if (family == "gpt_neox") {
    s.n_embd = 32;
    a.positions = Positions::rotary;
    a.rotary_fraction = 0.25;
    a.residual = Residual::parallel;
    a.mlp = Mlp::gelu_erf;
    a.tied_head = false;
  } else if (family == "mistral") {
    llama();
    a.n_kv_head = 1;
    a.head_dim = 8;
    a.rope_theta = 1e6;
  } else {
    throw Error("decoder_spec: no setting '" + family + "'");
  }
  return s;
}

const std::vector<std::string> kSettings{"gpt2", "layer_norm_no_bias", "llama", "qwen2", "gpt_neox", "mistral"};

// The tiny MLPs: d = 8, T = 3 (vocab_size 40 for input = vocab).
ModelSpec mlp_spec(ModelKind kind, InputSpace input = InputSpace::embedding) {
  ModelSpec s;
  s.family = kind_name(kind);
  s.kind = kind;
  s.n_embd = 8;
  s.vocab_size = 40;
  s.n_positions = 16;
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
  return s.family + " (" + kind_name(s.kind) + ") blocks=" + std::to_string(s.blocks) + " head=" + head_name(s.head) +
         " input=" + input_space_name(s.input) + " layers={" + layers + "} seq_len=" + std::to_string(s.seq_len);
}

// ---- weights and data ---------------------------------------------------------------------------------------------

// Seeded weights for every tensor of weight_schema(spec), made to matter: decoders get norm scales 1 + N(0, 0.2^2),
// biases N(0, 0.1^2) and matrices N(0, 0.2^2) (GPT-2's 0.02 would leave attention nearly uniform); the MLP kinds get
// nn.Linear's uniform +-1/sqrt(in) and wte N(0, 0.02^2). Values are rounded to f32 so that both backends see the same
// numbers; returned in f64 (for the reference) and f32 (for oneDNN).
struct TestWeights {
  std::shared_ptr<const WeightSet> f64, f32;
};
TestWeights test_weights(const ModelSpec& spec, std::uint64_t seed = 7) {
  const std::vector<TensorSpec> schema = weight_schema(spec);
  auto ends_with = [](const std::string& name, const std::string& end) {
    return name.size() >= end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
  };
  auto in_features = [&](const std::string& layer) {  // of an MLP kind's linear layer, [out, in]
    for (const TensorSpec& t : schema)
      if (t.name == layer + ".weight") return t.shape[1];
    return std::int64_t{1};
  };
  const Rng root(seed);
  auto f64 = std::make_shared<WeightSet>();
  auto f32 = std::make_shared<WeightSet>();
  for (const TensorSpec& t : schema) {
    Rng rng = root.fork(t.name);
    Tensor w(DType::f32, t.shape);
    const bool norm_scale = contains(t.name, "ln_") && ends_with(t.name, ".weight");
    const bool bias = ends_with(t.name, ".bias");
    const double bound = 1 / std::sqrt(static_cast<double>(in_features(t.name.substr(0, t.name.find('.')))));
    for (std::int64_t i = 0; i < w.numel(); ++i) {
      double v;
      if (spec.kind == ModelKind::decoder)
        v = norm_scale ? 1 + 0.2 * rng.normal() : (bias ? 0.1 : 0.2) * rng.normal();
      else
        v = t.name == "wte.weight" ? 0.02 * rng.normal() : rng.uniform(-bound, bound);
      w.set(i, v);
    }
    f64->set(t.name, w.to(DType::f64));
    f32->set(t.name, std::move(w));
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
Tensor random_input(const ModelSpec& spec, std::int64_t batch, std::int64_t T, std::uint64_t seed) {
  Shape shape = input_shape(spec, batch);
  shape[1] = T;
  return random_input(shape, seed, spec.input == InputSpace::vocab ? 0.5 : 1.0);
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

// The first n positions of a [B, T, ...] tensor.
Tensor first_positions(const Tensor& t, std::int64_t n) {
  Shape shape = t.shape();
  const std::int64_t B = shape[0], T = shape[1], row = t.numel() / (B * T);
  shape[1] = n;
  Tensor out(t.dtype(), shape);
  const std::size_t bytes = dtype_size(t.dtype());
  for (std::int64_t b = 0; b < B; ++b)
    std::memcpy(static_cast<char*>(out.raw()) + b * n * row * bytes,
                static_cast<const char*>(t.raw()) + b * T * row * bytes, static_cast<std::size_t>(n * row) * bytes);
  return out;
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

// ---- models -------------------------------------------------------------------------------------------------------

std::unique_ptr<Model> onednn_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads = 1) {
  OnednnBackend backend;
  backend.configure(Options("backend", "test", {{"threads", std::to_string(threads)}}));
  return backend.create_model(spec, std::move(weights));
}

// The plugins built here (the registry keeps every library it loads).
const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

// The reference backend, as the plugin "reference", in f64.
std::unique_ptr<Model> reference_model(ModelSpec spec, std::shared_ptr<const WeightSet> weights) {
  static const std::shared_ptr<Backend> backend = [] {
    if (!registry().find(PluginKind::backend, "reference"))
      throw Error(std::string("no backend plugin 'reference' in ") + LMINV_BUILD_PLUGIN_DIR +
                  " (build the target 'reference')");
    std::shared_ptr<Backend> b = registry().create_backend("reference");
    b->configure(Options("backend", "test", {{"threads", "1"}}));
    return b;
  }();
  spec.dtype = DType::f64;
  return backend->create_model(spec, std::move(weights));
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// With LMINV_ONEDNN_TEST_VERBOSE set, the worst errors of each case are printed (to see the margins).
double report(const std::string& what, double error) {
  if (std::getenv("LMINV_ONEDNN_TEST_VERBOSE")) std::printf("    %-28s %.2e\n", what.c_str(), error);
  return error;
}

// Forward, backward (random output gradient) and loss_and_grad (l1, l2, cosine) of the oneDNN model against the
// reference in f64, on a batch of 2 of `x` (T from x; default: the spec's seq_len).
void expect_matches(Model& dnn, Model& ref, const Tensor& x, std::uint64_t seed) {
  const Tensor x32 = x.to(DType::f32);
  const Tensor y_ref = ref.forward(x);
  const Tensor y = dnn.forward(x32);
  ASSERT_EQ(y.dtype(), DType::f32);
  EXPECT_LT(report("forward", relative_difference(y, y_ref)), kTolerance) << "forward";

  const Tensor g = random_input(y_ref.shape(), seed + 1);
  const Tensor dx_ref = ref.backward(x, g);
  const Tensor dx = dnn.backward(x32, g.to(DType::f32));
  ASSERT_EQ(dx.dtype(), DType::f32);
  EXPECT_LT(report("backward", relative_difference(dx, dx_ref)), kTolerance) << "backward";

  const Tensor target = far_target(y_ref, seed + 2);
  for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
    SCOPED_TRACE(metric_name(metric));
    const LossAndGrad lg_ref = ref.loss_and_grad(x, target, metric);
    const LossAndGrad lg = dnn.loss_and_grad(x32, target.to(DType::f32), metric);
    EXPECT_LT(report(std::string(metric_name(metric)) + " loss", relative_difference(lg.loss, lg_ref.loss)), kTolerance)
        << "loss";
    EXPECT_LT(report(std::string(metric_name(metric)) + " gradient", relative_difference(lg.grad, lg_ref.grad)),
              kTolerance)
        << "loss gradient";
  }
}

void expect_matches_reference(const ModelSpec& spec) {
  if (std::getenv("LMINV_ONEDNN_TEST_VERBOSE")) std::printf("%s\n", describe(spec).c_str());
  SCOPED_TRACE(describe(spec));
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> ref = reference_model(spec, w.f64);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  expect_matches(*dnn, *ref, random_input(spec, 2, spec.seq_len, 11), 11);
}

// ---- against the reference ----------------------------------------------------------------------------------------

TEST(OnednnBackend, Gpt2MatchesTheReferenceForEveryHeadInputAndLayers) {
  for (std::int64_t blocks = 0; blocks <= 3; ++blocks)
    for (Head head : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
        for (const std::vector<std::int64_t>& layers : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{1, 3}})
          expect_matches_reference(decoder_spec("gpt2", head, input, blocks, layers));
}

TEST(OnednnBackend, Gpt2LayersMayRepeatAndMeetTheHead) {
  // h_2 reaches the output under the head and twice more as an extra layer: its gradient is the sum of all three.
  expect_matches_reference(decoder_spec("gpt2", Head::ln_f, InputSpace::embedding, 2, {0, 2, 2}));
  expect_matches_reference(decoder_spec("gpt2", Head::none, InputSpace::vocab, 0, {0}));
}

TEST(OnednnBackend, Gpt2WithOwnInnerWidthAndEpsilon) {
  ModelSpec s = decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 2, {1});
  s.n_inner = 24;
  s.arch.norm_eps = 1e-2;  // large enough to matter
  expect_matches_reference(s);
}

// Every family's setting, with every head and input space, with and without an extra layer.
TEST(OnednnBackend, ArchitecturesMatchTheReference) {
  for (const std::string& family : kSettings) {
    if (family == "gpt2") continue;  // above
    for (Head head : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
        for (const std::vector<std::int64_t>& layers : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{1}})
          expect_matches_reference(decoder_spec(family, head, input, 3, layers));
    // fewer blocks than the model has, and none
    expect_matches_reference(decoder_spec(family, Head::lm_head, InputSpace::embedding, 1));
    expect_matches_reference(decoder_spec(family, Head::ln_f, InputSpace::vocab, 0));
  }
}

// One architecture switch at a time from GPT-2's setting, to see which one breaks if one does.
TEST(OnednnBackend, EachSwitchAloneMatchesTheReference) {
  std::vector<std::pair<std::string, std::function<void(ModelSpec&)>>> switches{
      {"rms_norm", [](ModelSpec& s) { s.arch.norm = Norm::rms_norm; }},
      {"layer_norm_no_bias", [](ModelSpec& s) { s.arch.norm_bias = false; }},
      {"rotary", [](ModelSpec& s) { s.arch.positions = Positions::rotary; }},
      {"partial_rotary",
       [](ModelSpec& s) {
         s.arch.positions = Positions::rotary;
         s.arch.rotary_fraction = 0.5;
       }},
      {"grouped_kv",
       [](ModelSpec& s) {
         s.n_head = 4;
         s.arch.n_kv_head = 2;
       }},
      {"head_dim", [](ModelSpec& s) { s.arch.head_dim = 6; }},
      {"no_qkv_bias", [](ModelSpec& s) { s.arch.qkv_bias = false; }},
      {"no_attn_out_bias", [](ModelSpec& s) { s.arch.attn_out_bias = false; }},
      {"no_mlp_bias", [](ModelSpec& s) { s.arch.mlp_bias = false; }},
      {"gelu_erf", [](ModelSpec& s) { s.arch.mlp = Mlp::gelu_erf; }},
      {"swiglu", [](ModelSpec& s) { s.arch.mlp = Mlp::swiglu; }},
      {"parallel_residual", [](ModelSpec& s) { s.arch.residual = Residual::parallel; }},
      {"untied_head", [](ModelSpec& s) { s.arch.tied_head = false; }},
  };
  for (const auto& [name, change] : switches) {
    SCOPED_TRACE(name);
    ModelSpec s = decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 3, {2});
    change(s);
    s.family = "gpt2+" + name;
    expect_matches_reference(s);
  }
}

TEST(OnednnBackend, MlpKindsMatchTheReference) {
  for (ModelKind kind : {ModelKind::fcnet, ModelKind::fcnet_noninvertible, ModelKind::transformer_mlp})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) expect_matches_reference(mlp_spec(kind, input));
  ModelSpec narrow = mlp_spec(ModelKind::transformer_mlp);
  narrow.n_inner = 12;  // an MLP width other than 4 d
  expect_matches_reference(narrow);
}

// ---- any length ---------------------------------------------------------------------------------------------------

// One model, lengths 3, 7, 3 (and the longest, n_positions, and 1): every call against the reference, the second call
// at length 3 giving the first one's bits, and the first 3 positions at length 7 equal to length 3's output (causal).
void expect_any_length(const ModelSpec& spec) {
  SCOPED_TRACE(describe(spec));
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> ref = reference_model(spec, w.f64);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  const Tensor x7 = random_input(spec, 2, 7, 101);
  const Tensor x3 = first_positions(x7, 3);
  Tensor y3_first, dx3_first;
  for (std::int64_t T : std::vector<std::int64_t>{3, 7, 3, spec.n_positions, 1}) {
    SCOPED_TRACE("T = " + std::to_string(T));
    const Tensor x = T == 3 ? x3 : (T == 7 ? x7 : random_input(spec, 2, T, 100 + T));
    expect_matches(*dnn, *ref, x, 200 + T);
    if (T == 3) {
      const Tensor y = dnn->forward(x.to(DType::f32));
      const Tensor dx = dnn->backward(x.to(DType::f32), y);
      if (y3_first.empty()) {
        y3_first = y;
        dx3_first = dx;
      } else {
        EXPECT_TRUE(same_bytes(y, y3_first)) << "length 3 again";
        EXPECT_TRUE(same_bytes(dx, dx3_first)) << "length 3 again (backward)";
      }
    }
  }
  if (spec.kind == ModelKind::decoder || spec.kind == ModelKind::transformer_mlp) {
    const Tensor y7 = dnn->forward(x7.to(DType::f32));
    EXPECT_LT(relative_difference(first_positions(y7, 3), y3_first), 1e-5) << "causal";
  }
}

TEST(OnednnBackend, AnyLengthOnOneModel) {
  expect_any_length(decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 3, {1}));
  expect_any_length(decoder_spec("gpt2", Head::ln_f, InputSpace::vocab, 2));
  expect_any_length(decoder_spec("llama", Head::lm_head, InputSpace::embedding, 3));
  expect_any_length(decoder_spec("gpt_neox", Head::ln_f, InputSpace::vocab, 3, {2}));
  expect_any_length(decoder_spec("mistral", Head::none, InputSpace::embedding, 2));
  expect_any_length(mlp_spec(ModelKind::transformer_mlp));
  expect_any_length(mlp_spec(ModelKind::transformer_mlp, InputSpace::vocab));
}

TEST(OnednnBackend, LengthsOutsideThePositionsAreErrors) {
  for (const ModelSpec& spec : {decoder_spec("llama"), mlp_spec(ModelKind::transformer_mlp)}) {
    SCOPED_TRACE(describe(spec));
    const std::unique_ptr<Model> dnn = onednn_model(spec, test_weights(spec).f32);
    for (std::int64_t T : {std::int64_t{0}, spec.n_positions + 1}) {
      const std::string e = error_of([&] { dnn->forward(Tensor(DType::f32, {1, T, spec.n_embd})); });
      EXPECT_TRUE(contains(e, "input has shape [1, " + std::to_string(T)) && contains(e, "n_positions = 16")) << e;
    }
  }
  // the fcnets are built for their seq_len alone
  const ModelSpec fcnet = mlp_spec(ModelKind::fcnet);
  const std::unique_ptr<Model> dnn = onednn_model(fcnet, test_weights(fcnet).f32);
  const std::string e = error_of([&] { dnn->forward(Tensor(DType::f32, {1, 4, fcnet.n_embd})); });
  EXPECT_TRUE(contains(e, "input has shape [1, 4, 8], expected [B, 3, 8]")) << e;
}

// Shapes where every loop and primitive runs on the team (each step above kSmallWork elements: N d = 8 * 128 * 64) and
// oneDNN takes blocked weight copies: forward and backward against the reference, with 2 threads.
TEST(OnednnBackend, LargerShapesOnTheTeam) {
  for (const std::string family : {"llama", "gpt_neox"}) {
    ModelSpec spec = decoder_spec(family, Head::lm_head, InputSpace::embedding, 2, {1});
    spec.n_layer = 2;
    spec.n_embd = 64;
    spec.n_head = 4;
    spec.n_inner = 128;
    spec.vocab_size = 64;
    spec.n_positions = spec.seq_len = 128;
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    const std::unique_ptr<Model> ref = reference_model(spec, w.f64);
    const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32, 2);
    const Tensor x = random_input(spec, 8, spec.seq_len, 131);
    const Tensor y_ref = ref->forward(x);
    EXPECT_LT(report("forward", relative_difference(dnn->forward(x.to(DType::f32)), y_ref)), kTolerance);
    const Tensor g = random_input(y_ref.shape(), 132);
    EXPECT_LT(
        report("backward", relative_difference(dnn->backward(x.to(DType::f32), g.to(DType::f32)), ref->backward(x, g))),
        kTolerance);
  }
}

// Models made on one WeightSet share its oneDNN copies (one store while any of them lives), whatever their specs, and
// compute what a model of their own would.
TEST(OnednnBackend, ModelsOnOneWeightSetShareItsCopies) {
  const ModelSpec spec = decoder_spec("llama", Head::lm_head, InputSpace::embedding, 3);
  ModelSpec shorter = spec;
  shorter.blocks = 1;
  shorter.head = Head::ln_f;
  shorter.seq_len = 9;
  const TestWeights w = test_weights(spec), other = test_weights(spec, 8);
  const Tensor x = random_input(spec, 2, 4, 121).to(DType::f32);
  OnednnBackend backend;
  backend.configure(Options("backend", "test", {{"threads", "1"}}));
  EXPECT_EQ(backend.weight_stores(), 0u);
  {
    const std::unique_ptr<Model> a = backend.create_model(spec, w.f32);
    const std::unique_ptr<Model> b = backend.create_model(shorter, w.f32);
    EXPECT_EQ(backend.weight_stores(), 1u);
    const std::unique_ptr<Model> c = backend.create_model(spec, other.f32);
    EXPECT_EQ(backend.weight_stores(), 2u);
    EXPECT_TRUE(same_bytes(a->forward(x), onednn_model(spec, w.f32)->forward(x)));
    EXPECT_TRUE(same_bytes(b->forward(x), onednn_model(shorter, w.f32)->forward(x)));
    EXPECT_FALSE(same_bytes(c->forward(x), a->forward(x)));
  }
  EXPECT_EQ(backend.weight_stores(), 0u);
}

// ---- batching and plans -------------------------------------------------------------------------------------------

// A batch of 3 against three single calls, for forward, backward and loss_and_grad, with every backward following a
// forward pass on another input (so saved activations must be recognised as stale) and batch sizes alternating (so
// plans are reused).
void expect_batch_equals_items(const ModelSpec& spec) {
  SCOPED_TRACE(describe(spec));
  const TestWeights w = test_weights(spec);
  const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
  const Tensor x = random_input(spec, 3, spec.seq_len, 21).to(DType::f32);
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
  expect_batch_equals_items(decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 3, {1}));
  expect_batch_equals_items(decoder_spec("gpt2", Head::ln_f, InputSpace::vocab, 2));
  expect_batch_equals_items(decoder_spec("mistral", Head::lm_head, InputSpace::embedding, 3, {1}));
  expect_batch_equals_items(decoder_spec("gpt_neox", Head::ln_f, InputSpace::vocab, 2));
  for (ModelKind kind : {ModelKind::fcnet, ModelKind::fcnet_noninvertible, ModelKind::transformer_mlp})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab})
      expect_batch_equals_items(mlp_spec(kind, input));
}

TEST(OnednnBackend, ManyShapesInTurn) {
  // More shapes than the plans kept (8): old plans are dropped and rebuilt, results do not change.
  for (const std::string family : {"gpt2", "qwen2"}) {
    const ModelSpec spec = decoder_spec(family, Head::lm_head, InputSpace::embedding, 3);
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    const std::unique_ptr<Model> dnn = onednn_model(spec, w.f32);
    const Tensor x = random_input(spec, 1, spec.seq_len, 31).to(DType::f32);
    const Tensor y = dnn->forward(x);
    const Tensor dx = dnn->backward(x, y);
    for (std::int64_t B = 1; B <= 10; ++B) {
      std::vector<Tensor> copies(static_cast<std::size_t>(B), x);
      const Tensor yb = dnn->forward(Tensor::concat0(copies));
      EXPECT_LT(relative_difference(yb.slice0(B - 1, B), y), 1e-5) << "B = " << B;
      dnn->forward(random_input(spec, 1, 1 + B % 4, 32).to(DType::f32));  // and other lengths in between
    }
    EXPECT_TRUE(same_bytes(dnn->forward(x), y));
    EXPECT_TRUE(same_bytes(dnn->backward(x, y), dx));
  }
}

TEST(OnednnBackend, EmptyBatchesAsTheReference) {
  for (const ModelSpec& spec : {decoder_spec("gpt2", Head::lm_head, InputSpace::vocab, 2, {1}),
                                decoder_spec("llama", Head::lm_head), mlp_spec(ModelKind::fcnet)}) {
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
  for (const ModelSpec& spec : {decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 2),
                                decoder_spec("qwen2", Head::lm_head), mlp_spec(ModelKind::fcnet)}) {
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
  for (const ModelSpec& spec :
       {decoder_spec("gpt2", Head::lm_head, InputSpace::vocab, 2), decoder_spec("llama", Head::lm_head)}) {
    SCOPED_TRACE(describe(spec));
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
}

TEST(OnednnBackend, ThreadsOptionIsReadAndTheCallersTeamIsRestored) {
  for (const ModelSpec& spec : {decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 3, {2}),
                                decoder_spec("gpt_neox", Head::lm_head, InputSpace::embedding, 3, {2})}) {
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    const Tensor x = random_input(input_shape(spec, 4), 61).to(DType::f32);
    const std::unique_ptr<Model> one = onednn_model(spec, w.f32, 1);
    const std::unique_ptr<Model> two = onednn_model(spec, w.f32, 2);
    const int before = omp_get_max_threads();
    const Tensor y1 = one->forward(x), y2 = two->forward(x);
    EXPECT_EQ(omp_get_max_threads(), before);
    EXPECT_LT(relative_difference(y2, y1), 1e-5);
    EXPECT_LT(relative_difference(two->backward(x, y2), one->backward(x, y1)), 1e-5);
  }

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

// ---- what it builds, refusals, errors -----------------------------------------------------------------------------

TEST(OnednnBackend, InfoListsKindsFeaturesDtypesDevices) {
  const BackendInfo info = OnednnBackend().info();
  EXPECT_EQ(info.kinds, (std::vector<ModelKind>{ModelKind::decoder, ModelKind::fcnet, ModelKind::fcnet_noninvertible,
                                                ModelKind::transformer_mlp}));
  namespace f = feature;
  std::vector<std::string> features = info.features;
  std::sort(features.begin(), features.end());
  std::vector<std::string> expected{f::layer_norm,  f::layer_norm_no_bias, f::rms_norm,    f::learned_positions,
                                    f::rotary,      f::partial_rotary,     f::grouped_kv,  f::head_dim,
                                    f::gelu_tanh,   f::gelu_erf,           f::swiglu,      f::parallel_residual,
                                    f::untied_head, f::extra_layers,       f::vocab_input, f::prefix_cache,
                                    f::int8_weights};  // not dropout: the reference and onednn are deterministic
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(features, expected);
  EXPECT_EQ(info.dtypes, std::vector<DType>{DType::f32});
  EXPECT_EQ(info.devices, std::vector<std::string>{"cpu"});
  // every setting tested here needs only listed features
  for (const std::string& family : kSettings)
    EXPECT_NO_THROW(
        check_features(decoder_spec(family, Head::lm_head, InputSpace::vocab, 3, {1}), info.features, "test"))
        << family;
  // and a decoder offers the prefix cache it lists (tests/prefix_cache_test.cpp checks what it computes)
  const ModelSpec spec = decoder_spec("gpt2");
  EXPECT_NE(onednn_model(spec, test_weights(spec).f32)->capability("prefix_cache"), nullptr);
}

TEST(OnednnBackend, RefusalsNameWhatIsUnsupported) {
  OnednnBackend backend;
  for (const std::string family : {"gpt2", "llama"}) {
    const ModelSpec spec = decoder_spec(family, Head::lm_head);
    SCOPED_TRACE(describe(spec));
    const TestWeights w = test_weights(spec);
    ModelSpec f64 = spec;
    f64.dtype = DType::f64;
    std::string e = error_of([&] { backend.create_model(f64, w.f32); });
    EXPECT_TRUE(contains(e, "dtype 'f64'") && contains(e, "supported: f32") && contains(e, "onednn")) << e;
    ModelSpec bf16 = spec;
    bf16.dtype = DType::bf16;
    e = error_of([&] { backend.create_model(bf16, w.f32); });
    EXPECT_TRUE(contains(e, "dtype 'bf16'") && contains(e, "supported: f32")) << e;
    ModelSpec cuda = spec;
    cuda.device = "cuda";
    e = error_of([&] { backend.create_model(cuda, w.f32); });
    EXPECT_TRUE(contains(e, "device 'cuda'") && contains(e, "cpu")) << e;
    ModelSpec unknown = spec;
    unknown.kind = static_cast<ModelKind>(99);
    e = error_of([&] { backend.create_model(unknown, w.f32); });
    EXPECT_TRUE(contains(e, "model kind") && contains(e, "not supported")) << e;
    e = error_of([&] { backend.create_model(spec, nullptr); });
    EXPECT_TRUE(contains(e, "no weights")) << e;
  }
}

TEST(OnednnBackend, SpecAndWeightErrorsNameTheField) {
  OnednnBackend backend;
  const ModelSpec spec = decoder_spec("gpt2", Head::lm_head, InputSpace::embedding, 2);
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
  s.arch.n_kv_head = 3;  // 2 heads
  refused(s, "n_head divisible by n_kv_head");
  s = spec;
  s.arch.positions = Positions::rotary;
  s.arch.rotary_fraction = 0.1;  // 8 features per head: none rotated
  refused(s, "rotates no feature");
  s = spec;
  s.arch.norm_eps = -1;
  refused(s, "norm_eps");
  s = spec;
  s.n_embd = 8;  // the weights are for 16
  refused(s, "wte.weight");
  auto missing = std::make_shared<WeightSet>(*w.f32);
  missing->set("h.1.mlp.c_fc.bias", Tensor(DType::f32, {3}));
  refused(spec, "h.1.mlp.c_fc.bias", missing);
  // weights of another setting: llama's need an lm_head, and grouped kv heads make c_attn narrower
  const ModelSpec llama = decoder_spec("llama", Head::lm_head);
  s = llama;
  s.arch.tied_head = true;
  refused(llama, "lm_head.weight", test_weights(s).f32);
  s = llama;
  s.arch.n_kv_head = 0;
  refused(s, "h.0.attn.c_attn.weight", test_weights(llama).f32);
  ModelSpec mlp = mlp_spec(ModelKind::fcnet);
  mlp.layers = {1};
  refused(mlp, "layers", test_weights(mlp_spec(ModelKind::fcnet)).f32);
  refused(mlp_spec(ModelKind::fcnet), "fc1.weight", w.f32);  // GPT-2's weights for an MLP
}

TEST(OnednnBackend, WrongShapesAreErrors) {
  for (const ModelSpec& spec : {decoder_spec("gpt2", Head::ln_f, InputSpace::embedding, 1), decoder_spec("mistral"),
                                mlp_spec(ModelKind::transformer_mlp)}) {
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
  const PluginInfo* info = registry().find(PluginKind::backend, "onednn");
  ASSERT_NE(info, nullptr) << "no backend plugin 'onednn' in " << LMINV_BUILD_PLUGIN_DIR;
  EXPECT_EQ(info->version, "0.1.0");
  EXPECT_TRUE(contains(info->summary, "oneDNN"));
  const std::shared_ptr<Backend> backend = registry().create_backend("onednn");
  const Options options("backend", "test", {{"threads", "1"}});
  backend->configure(options);
  EXPECT_TRUE(options.unread_keys().empty());
  for (const std::string family : {"gpt2", "gpt_neox"}) {
    const ModelSpec spec = decoder_spec(family, Head::lm_head, InputSpace::embedding, 3);
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
}

// ---- benchmark ----------------------------------------------------------------------------------------------------

// GPT-2 small (12 blocks + ln_f + tied lm_head, T = 5) in f32, loss_and_grad (l2) best and mean of 5, and forward, at
// batch 1, 8, 32. Weights N(0, 0.02^2) (norms 1, biases 0). Threads: LMINV_BENCH_THREADS (default 2); batch sizes:
// LMINV_BENCH_BATCHES (default "1 8 32"); length: LMINV_BENCH_T (default 5); LMINV_BENCH_FAMILY: one of the settings
// above at GPT-2 small's sizes instead (e.g. llama: 12 heads on 4 kv heads, swiglu 2048 wide).
TEST(OnednnBackendBench, DISABLED_Gpt2SmallLossAndGrad) {
  const std::string family = std::getenv("LMINV_BENCH_FAMILY") ? std::getenv("LMINV_BENCH_FAMILY") : "gpt2";
  ModelSpec spec = decoder_spec(family, Head::lm_head);
  spec.n_layer = spec.blocks = 12;
  spec.n_embd = 768;
  spec.n_head = 12;
  spec.n_inner = family == "gpt2" ? 0 : 2048;
  if (spec.arch.n_kv_head > 0) spec.arch.n_kv_head = 4;
  spec.arch.head_dim = 0;
  spec.vocab_size = 50257;
  spec.n_positions = 1024;
  spec.seq_len = std::getenv("LMINV_BENCH_T") ? std::atoll(std::getenv("LMINV_BENCH_T")) : 5;
  const int threads = std::getenv("LMINV_BENCH_THREADS") ? std::atoi(std::getenv("LMINV_BENCH_THREADS")) : 2;
  auto seconds = [](auto since) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
  };
  auto t0 = std::chrono::steady_clock::now();
  auto weights = std::make_shared<WeightSet>();
  for (const TensorSpec& t : weight_schema(spec)) {
    Tensor w(DType::f32, t.shape);
    const bool norm_scale = contains(t.name, "ln_") && t.name.find(".weight") != std::string::npos;
    if (!contains(t.name, ".bias")) {
      Rng rng = Rng(0).fork(t.name);
      for (std::int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = norm_scale ? 1.0f : 0.02f * rng.normal();
    }
    weights->set(t.name, std::move(w));
  }
  std::printf("weights: %.2f s\n", seconds(t0));
  t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Model> model = onednn_model(spec, weights, threads);
  std::printf("create_model: %.3f s (%s, threads %d)\n", seconds(t0), family.c_str(), threads);
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
      best = std::min(best, s);
      sum += s;
    }
    double fwd = 1e30;
    for (int r = 0; r < 3; ++r) {
      t0 = std::chrono::steady_clock::now();
      model->forward(x);
      fwd = std::min(fwd, seconds(t0));
    }
    std::printf(
        "B = %2lld, T = %lld: loss_and_grad best %.4f s, mean %.4f s (first call %.3f s); forward best %.4f s\n",
        static_cast<long long>(B), static_cast<long long>(spec.seq_len), best, sum / 5, first, fwd);
  }
}

}  // namespace
}  // namespace lminv
