// The reference backend's gpt2 family against golden values from PyTorch (tests/data/gpt2-golden, made by
// tests/tools/make_gpt2_golden.py; see tests/tools/README.md): a Hugging Face checkpoint folder read by the checkpoint
// loader, and for each case (blocks, head, input space, extra layers) the expected output and the input gradient of
// <G, output> for a stored G, computed in float64 by an independent implementation of GPT2LMHeadModel.
//   f64 model on the F64 checkpoint:                         within 1e-10 (max abs difference / max abs expected)
//   f32 model on the F64 checkpoint (the backend converts):  within 1e-4
//   f32 model on the F32 checkpoint (weights used in place): within 1e-4
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "lminv/error.hpp"
#include "lminv/options.hpp"
#include "reference_backend.hpp"
#include "safetensors.hpp"

namespace lminv {
namespace {

const std::filesystem::path kFixture = std::filesystem::path(LMINV_TEST_DATA_DIR) / "gpt2-golden";
const std::vector<std::int64_t> kTokenIds = {31, 0, 49, 7, 12};
constexpr std::int64_t kSeqLen = 5, kBatch = 2, kEmbd = 16, kVocab = 50;

// ---- the cases, as the generator makes them -----------------------------------------------------------------------

struct GoldenCase {
  std::int64_t blocks;
  Head head;
  InputSpace input;
  std::vector<std::int64_t> layers;

  std::string name() const {
    std::string n = "k" + std::to_string(blocks) + "_" + head_name(head) + "_" + input_space_name(input);
    if (!layers.empty()) {
      n += "_layers";
      for (std::size_t i = 0; i < layers.size(); ++i) n += (i ? "_" : "") + std::to_string(layers[i]);
    }
    return n;
  }
  // The spec string of the fixture's metadata entry "case/NAME".
  std::string spec_string() const {
    std::string s = "blocks=" + std::to_string(blocks) + " head=" + head_name(head) +
                    " input=" + input_space_name(input) + " layers=";
    for (std::size_t i = 0; i < layers.size(); ++i) s += (i ? "," : "") + std::to_string(layers[i]);
    return s;
  }
  std::int64_t output_width() const {
    return (head == Head::lm_head ? kVocab : kEmbd) + kEmbd * static_cast<std::int64_t>(layers.size());
  }
};

// blocks {0, 1, 3} x head {none, ln_f, lm_head} x input {embedding, vocab}, then two cases with extra layers.
std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> cases;
  for (std::int64_t k : {0, 1, 3})
    for (Head h : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace in : {InputSpace::embedding, InputSpace::vocab}) cases.push_back({k, h, in, {}});
  for (InputSpace in : {InputSpace::embedding, InputSpace::vocab}) cases.push_back({2, Head::none, in, {1, 3}});
  for (InputSpace in : {InputSpace::embedding, InputSpace::vocab}) cases.push_back({3, Head::lm_head, in, {0, 2}});
  return cases;
}

struct Variant {
  const char* name;
  const char* checkpoint;  // folder under the fixture
  DType dtype;             // the model's
  double tolerance;        // on max |actual - expected| / max |expected|
};

const std::vector<Variant> kVariants = {
    {"f64", "checkpoint-f64", DType::f64, 1e-10},
    {"f32", "checkpoint-f64", DType::f32, 1e-4},
    {"f32_from_f32_checkpoint", "checkpoint-f32", DType::f32, 1e-4},
};

// ---- the fixture, loaded once per process -------------------------------------------------------------------------

struct Golden {
  std::map<std::string, std::string> metadata;
  WeightSet expected;
};

const Golden& golden() {
  static const Golden g = [] {
    Golden out;
    out.expected = read_safetensors(kFixture / "expected.safetensors", &out.metadata);
    return out;
  }();
  return g;
}

const Checkpoint& checkpoint(const std::string& folder) {
  static std::map<std::string, Checkpoint> loaded;
  auto it = loaded.find(folder);
  if (it == loaded.end()) it = loaded.emplace(folder, load_checkpoint(kFixture / folder)).first;
  return it->second;
}

std::shared_ptr<const WeightSet> weights_of(const std::string& folder) {
  static std::map<std::string, std::shared_ptr<const WeightSet>> shared;
  auto& w = shared[folder];
  if (!w) w = std::make_shared<const WeightSet>(checkpoint(folder).weights);
  return w;
}

const Tensor& expected(const std::string& name) { return golden().expected.get(name); }

std::unique_ptr<Model> make_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) {
  reference::ReferenceBackend backend;
  backend.configure(Options("backend", "gpt2_golden_test", {{"threads", "2"}}));
  return backend.create_model(spec, std::move(weights));
}

ModelSpec spec_for(const GoldenCase& c, const std::string& folder, DType dtype) {
  ModelSpec spec = checkpoint(folder).spec;
  spec.seq_len = kSeqLen;
  spec.blocks = c.blocks;
  spec.head = c.head;
  spec.input = c.input;
  spec.layers = c.layers;
  spec.dtype = dtype;
  return spec;
}

// max |actual - expected| / max |expected|, NaN when anything is NaN; `where` gets the worst element's index.
double relative_difference(const Tensor& actual, const Tensor& expected, std::int64_t* where) {
  double worst = 0, scale = 0;
  *where = -1;
  for (std::int64_t i = 0; i < expected.numel(); ++i) {
    const double d = std::abs(actual.get(i) - expected.get(i));
    if (!(d <= worst)) {  // also takes a NaN, which then sticks
      worst = d;
      *where = i;
    }
    scale = std::max(scale, std::abs(expected.get(i)));
  }
  return worst / scale;
}

// A failure message naming what was compared and its worst element.
::testing::AssertionResult close(const Tensor& actual, const Tensor& expected, double tolerance,
                                 const std::string& what) {
  if (actual.shape() != expected.shape())
    return ::testing::AssertionFailure() << what << ": shape " << shape_string(actual.shape()) << ", expected "
                                         << shape_string(expected.shape());
  std::int64_t where = -1;
  const double rel = relative_difference(actual, expected, &where);
  if (rel <= tolerance) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << what << ": relative difference " << rel << " > " << tolerance;
  if (where >= 0) os << " (worst at flat index " << where << ": " << actual.get(where) << " vs " << expected.get(where) << ")";
  return ::testing::AssertionFailure() << os.str();
}

// ---- the golden comparisons ---------------------------------------------------------------------------------------

class Gpt2Golden : public ::testing::TestWithParam<std::tuple<GoldenCase, Variant>> {};

TEST_P(Gpt2Golden, ForwardAndBackwardMatchPyTorch) {
  const auto& [c, v] = GetParam();
  const std::string label = "case " + c.name() + " (" + v.name + ")";
  const std::string prefix = "case/" + c.name() + "/";

  std::unique_ptr<Model> model;
  try {
    model = make_model(spec_for(c, v.checkpoint, v.dtype), weights_of(v.checkpoint));
  } catch (const Error& e) {
    FAIL() << label << ": create_model failed: " << e.what();
  }
  const Tensor input = expected(std::string("input/") + input_space_name(c.input)).to(v.dtype);
  const Tensor& want_output = expected(prefix + "output");
  const Tensor& grad_output = expected(prefix + "grad_output");
  const Tensor& want_grad = expected(prefix + "grad_input");
  ASSERT_EQ(want_output.shape(), (Shape{kBatch, kSeqLen, c.output_width()})) << label << ": fixture output";

  const Tensor output = model->forward(input);
  EXPECT_EQ(output.dtype(), v.dtype) << label << ": forward's dtype";
  EXPECT_TRUE(close(output, want_output, v.tolerance, label + " forward"));

  const Tensor grad = model->backward(input, grad_output.to(v.dtype));
  EXPECT_EQ(grad.dtype(), v.dtype) << label << ": backward's dtype";
  EXPECT_TRUE(close(grad, want_grad, v.tolerance, label + " backward"));

  // Each batch item alone gives the same values (the items are the token ids and a random input).
  for (std::int64_t b = 0; b < kBatch; ++b) {
    const std::string item = label + " item " + std::to_string(b);
    const Tensor x = input.slice0(b, b + 1);
    EXPECT_TRUE(close(model->forward(x), want_output.slice0(b, b + 1), v.tolerance, item + " forward"));
    EXPECT_TRUE(close(model->backward(x, grad_output.slice0(b, b + 1).to(v.dtype)), want_grad.slice0(b, b + 1),
                      v.tolerance, item + " backward"));
  }
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<GoldenCase, Variant>>& info) {
  return std::get<0>(info.param).name() + "_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Cases, Gpt2Golden,
                         ::testing::Combine(::testing::ValuesIn(golden_cases()), ::testing::ValuesIn(kVariants)),
                         param_name);

// ---- the fixture itself -------------------------------------------------------------------------------------------

TEST(Gpt2GoldenFixture, CasesAreTheOnesThisTestKnows) {
  const auto& meta = golden().metadata;
  std::string names;
  for (const GoldenCase& c : golden_cases()) {
    names += (names.empty() ? "" : " ") + c.name();
    const auto it = meta.find("case/" + c.name());
    ASSERT_NE(it, meta.end()) << "case " << c.name() << " has no metadata entry";
    EXPECT_EQ(it->second, c.spec_string()) << "case " << c.name();
    for (const char* t : {"output", "grad_output", "grad_input"})
      EXPECT_TRUE(golden().expected.contains("case/" + c.name() + "/" + t)) << "case " << c.name() << " lacks " << t;
  }
  ASSERT_TRUE(meta.count("cases"));
  EXPECT_EQ(meta.at("cases"), names) << "the fixture's cases differ from this test's list";
  ASSERT_TRUE(meta.count("token_ids"));
  EXPECT_EQ(meta.at("token_ids"), "31 0 49 7 12");
}

TEST(Gpt2GoldenFixture, CheckpointsHoldTheConfigAndTheSameWeights) {
  const Checkpoint& f64 = checkpoint("checkpoint-f64");
  const Checkpoint& f32 = checkpoint("checkpoint-f32");
  for (const Checkpoint* ck : {&f64, &f32}) {
    const ModelSpec& s = ck->spec;
    EXPECT_EQ(s.family, "gpt2") << ck->folder;
    EXPECT_EQ(s.n_layer, 3) << ck->folder;
    EXPECT_EQ(s.n_embd, kEmbd) << ck->folder;
    EXPECT_EQ(s.n_head, 2) << ck->folder;
    EXPECT_EQ(s.inner(), 4 * kEmbd) << ck->folder;
    EXPECT_EQ(s.vocab_size, kVocab) << ck->folder;
    EXPECT_EQ(s.n_positions, 16) << ck->folder;
    EXPECT_EQ(s.arch.norm_eps, 1e-5) << ck->folder;
    EXPECT_EQ(ck->weights.names().size(), 4u + 12u * 3u) << ck->folder;
  }
  for (const auto& [name, t] : f64.weights.tensors()) {
    ASSERT_EQ(t.dtype(), DType::f64) << name;
    ASSERT_TRUE(f32.weights.contains(name)) << name;
    const Tensor& r = f32.weights.get(name);
    ASSERT_EQ(r.dtype(), DType::f32) << name;
    ASSERT_EQ(r.shape(), t.shape()) << name;
    for (std::int64_t i = 0; i < t.numel(); ++i)
      ASSERT_EQ(r.data<float>()[i], static_cast<float>(t.data<double>()[i])) << name << " element " << i;
  }
}

TEST(Gpt2GoldenFixture, BatchItemZeroIsTheTokenIds) {
  const Tensor& wte = checkpoint("checkpoint-f64").weights.get("wte.weight");
  const Tensor& emb = expected("input/embedding");
  const Tensor& voc = expected("input/vocab");
  ASSERT_EQ(emb.shape(), (Shape{kBatch, kSeqLen, kEmbd}));
  ASSERT_EQ(voc.shape(), (Shape{kBatch, kSeqLen, kVocab}));
  for (std::int64_t t = 0; t < kSeqLen; ++t) {
    for (std::int64_t j = 0; j < kEmbd; ++j)
      EXPECT_EQ(emb.get(t * kEmbd + j), wte.get(kTokenIds[t] * kEmbd + j)) << "position " << t;
    for (std::int64_t w = 0; w < kVocab; ++w)
      EXPECT_EQ(voc.get(t * kVocab + w), w == kTokenIds[t] ? 1.0 : 0.0) << "position " << t;
  }
}

// The comparison is sharp enough to see a small error: moving one weight by 1e-6 of its value breaks the f64
// tolerance for a case that uses it, and leaves a case that does not use it within it.
TEST(Gpt2GoldenFixture, ToleranceSeesASmallWeightChange) {
  auto perturbed = std::make_shared<WeightSet>(checkpoint("checkpoint-f64").weights);
  {
    Tensor w = perturbed->get("h.2.mlp.c_fc.weight");
    w.set(5, w.get(5) * (1 + 1e-6));
    perturbed->set("h.2.mlp.c_fc.weight", std::move(w));
  }
  for (const GoldenCase& c : {GoldenCase{3, Head::lm_head, InputSpace::embedding, {}},
                              GoldenCase{1, Head::lm_head, InputSpace::embedding, {}}}) {
    auto model = make_model(spec_for(c, "checkpoint-f64", DType::f64), perturbed);
    const Tensor input = expected("input/embedding");
    std::int64_t where = 0;
    const double fwd = relative_difference(model->forward(input), expected("case/" + c.name() + "/output"), &where);
    const double bwd = relative_difference(model->backward(input, expected("case/" + c.name() + "/grad_output")),
                                           expected("case/" + c.name() + "/grad_input"), &where);
    if (c.blocks == 3) {
      EXPECT_GT(fwd, 1e-10) << "case " << c.name() << ": forward does not see the change";
      EXPECT_GT(bwd, 1e-10) << "case " << c.name() << ": backward does not see the change";
    } else {
      EXPECT_LE(fwd, 1e-10) << "case " << c.name();
      EXPECT_LE(bwd, 1e-10) << "case " << c.name();
    }
  }
}

}  // namespace
}  // namespace lminv
