// Every backend plugin against golden values from an independent PyTorch implementation of Hugging Face's
// LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and GPTNeoXForCausalLM (tests/data/family-golden, made by
// tests/tools/make_family_golden.py; see tests/tools/README.md).
//
// Each fixture folder is a Hugging Face checkpoint read through the host's load_checkpoint (config.json ->
// ModelSpec, Hugging Face tensors -> canonical WeightSet); the golden file holds, per case (blocks, head, input,
// layers), the output and the input gradient of <G, output> for a stored G, computed in float64 and in float32.
//   Family/BackendGolden.MatchesPyTorch/<backend>_<dtype>_<device>_<folder>_<case>: the backend, loaded by name through
//     the registry, on the loaded checkpoint: forward and backward against the float64 values, within 1e-10 for f64
//     and 1e-4 for f32 (max |actual - expected| / max |expected|); f32 also against the float32 values within 1e-4;
//     and the forward pass of the first 3 positions alone against the first 3 positions of the golden output (the
//     same model takes another length). bf16 is left to conformance_test, against the reference.
//     reference and torch must compute every feature a fixture needs (a missing one fails the case); another backend
//     (onednn) may lack one it does not list: that case is skipped, and the features left untested are printed at the
//     end. A backend without f64 (onednn) is tested in f32 only.
//   Folders/FamilyGoldenFixture.<check>/<folder>: what load_checkpoint makes of each folder: the spec is the setting
//     the manifest states, the weights are exactly the canonical schema, the extra folders (two shards, BF16, F16 with
//     inv_freq buffers) load to the same values as their family's folder, batch item 0 of the input is the token
//     ids' embedding rows, and the golden files hold the cases the manifest lists.
//   Families/FamilyGoldenSensitivity.ToleranceSeesASmallWeightChange/<family>: moving one weight by 1e-6 of its value
//     breaks the f64 tolerance (the comparison can fail) for a case that uses it, and not for one that does not.
// LMINV_GOLDEN_VERBOSE=1 prints each golden case's worst normalised errors, to see the margins to the tolerances.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "lminv/lminv.hpp"
#include "registry.hpp"
#include "safetensors.hpp"
#include "test_backends.hpp"

using namespace lminv;
using json = nlohmann::json;

namespace {

const std::filesystem::path kRoot = std::filesystem::path(LMINV_TEST_DATA_DIR) / "family-golden";
constexpr std::int64_t kSeqLen = 5, kBatch = 2, kPrefix = 3;

// ---- the fixture: manifest, golden files, checkpoints
// ----------------------------------------------------------------

struct Folder {
  std::string folder;  // under kRoot
  std::string family;  // config.json's model_type
  std::string stored;  // F32, BF16, F16
  int shards = 1;
  std::string golden;              // the folder whose golden.safetensors applies
  std::vector<std::string> cases;  // the golden file's cases (empty for the extra folders)
  json lminv;                      // the setting config.json stands for
};

struct Manifest {
  std::vector<Folder> folders;
  std::vector<std::int64_t> token_ids;
  std::string error;  // set when manifest.json cannot be read
};

const Manifest& manifest() {
  static const Manifest m = [] {
    Manifest out;
    try {
      std::ifstream in(kRoot / "manifest.json");
      if (!in) throw std::runtime_error("cannot open " + (kRoot / "manifest.json").string());
      const json j = json::parse(in);
      out.token_ids = j.at("token_ids").get<std::vector<std::int64_t>>();
      for (const json& f : j.at("folders"))
        out.folders.push_back({f.at("folder"), f.at("family"), f.at("stored"), f.at("shards"), f.at("golden"),
                               f.at("cases").get<std::vector<std::string>>(), f.at("lminv")});
    } catch (const std::exception& e) {
      out.error = std::string("family_golden_test: manifest.json: ") + e.what();
    }
    return out;
  }();
  return m;
}

const Folder& folder_info(const std::string& name) {
  for (const Folder& f : manifest().folders)
    if (f.folder == name) return f;
  throw Error("family_golden_test: no folder " + name + " in manifest.json");
}

struct Golden {
  std::map<std::string, std::string> metadata;
  WeightSet tensors;
};

const Golden& golden(const std::string& folder) {
  static std::map<std::string, Golden> read;
  auto it = read.find(folder);
  if (it == read.end()) {
    Golden g;
    g.tensors = read_safetensors(kRoot / folder / "golden.safetensors", &g.metadata);
    it = read.emplace(folder, std::move(g)).first;
  }
  return it->second;
}

const Tensor& golden_tensor(const std::string& folder, const std::string& name) {
  return golden(folder).tensors.get(name);
}

// load_checkpoint of each folder, once per process; a failure is remembered and reported by every case that needs it.
struct Loaded {
  std::shared_ptr<const Checkpoint> checkpoint;
  std::shared_ptr<const WeightSet> weights;
  std::string error;
};

const Loaded& loaded(const std::string& folder) {
  static std::map<std::string, Loaded> made;
  auto it = made.find(folder);
  if (it != made.end()) return it->second;
  Loaded l;
  try {
    auto ck = std::make_shared<Checkpoint>(load_checkpoint(kRoot / folder));
    l.weights = std::make_shared<const WeightSet>(ck->weights);
    l.checkpoint = std::move(ck);
  } catch (const std::exception& e) {
    l.error = e.what();
  }
  return made.emplace(folder, std::move(l)).first->second;
}

// A case of the golden file: its metadata entry "case/NAME" = "blocks=K head=H input=I layers=A,B".
struct GoldenCase {
  std::string name;
  std::int64_t blocks = 0;
  Head head = Head::none;
  InputSpace input = InputSpace::embedding;
  std::vector<std::int64_t> layers;
};

GoldenCase parse_case(const std::string& name, const std::string& text) {
  GoldenCase c;
  c.name = name;
  std::istringstream words(text);
  std::string word;
  std::set<std::string> seen;
  while (words >> word) {
    const auto eq = word.find('=');
    if (eq == std::string::npos) throw Error("case " + name + ": '" + word + "' is not key=value in '" + text + "'");
    const std::string key = word.substr(0, eq), value = word.substr(eq + 1);
    seen.insert(key);
    if (key == "blocks") {
      c.blocks = std::stoll(value);
    } else if (key == "head") {
      const auto h = parse_head(value);
      if (!h) throw Error("case " + name + ": head '" + value + "'");
      c.head = *h;
    } else if (key == "input") {
      const auto i = parse_input_space(value);
      if (!i) throw Error("case " + name + ": input '" + value + "'");
      c.input = *i;
    } else if (key == "layers") {
      std::istringstream list(value);
      std::string l;
      while (std::getline(list, l, ','))
        if (!l.empty()) c.layers.push_back(std::stoll(l));
    } else {
      throw Error("case " + name + ": unknown key '" + key + "' in '" + text + "'");
    }
  }
  for (const char* key : {"blocks", "head", "input", "layers"})
    if (!seen.count(key)) throw Error("case " + name + ": no " + key + " in '" + text + "'");
  return c;
}

GoldenCase golden_case(const std::string& golden_folder, const std::string& name) {
  const auto& meta = golden(golden_folder).metadata;
  const auto it = meta.find("case/" + name);
  if (it == meta.end()) throw Error("golden file of " + golden_folder + " has no metadata for case " + name);
  return parse_case(name, it->second);
}

ModelSpec spec_for(const ModelSpec& loaded_spec, const GoldenCase& c, DType dtype, const std::string& device) {
  ModelSpec s = loaded_spec;
  s.seq_len = kSeqLen;
  s.blocks = c.blocks;
  s.head = c.head;
  s.input = c.input;
  s.layers = c.layers;
  s.dtype = dtype;
  s.device = device;
  return s;
}

// ---- the backends under test ----------------------------------------------------------------------------------------

const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

std::shared_ptr<Backend> backend(const std::string& name) {
  static std::map<std::string, std::shared_ptr<Backend>> made;
  auto it = made.find(name);
  if (it != made.end()) return it->second;
  std::shared_ptr<Backend> b;
  try {
    b = registry().create_backend(name);
  } catch (const Error& e) {
    std::string why = e.what();
    for (const RejectedPlugin& p : registry().rejected()) why += "\n  refused " + p.file.string() + ": " + p.reason;
    throw Error(why);
  }
  b->configure(Options("backend", "family_golden_test", {{"threads", "1"}}));
  made[name] = b;
  return b;
}

// The backends that must compute every feature the fixtures need; others may lack (and then not list) some.
bool must_compute_everything(const std::string& backend_name) {
  return backend_name == "reference" || backend_name == "torch";
}

bool cuda_device_present(std::string& why) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    why = "no CUDA driver on this machine (libcuda.so.1 does not load)";
    return false;
  }
  using Init = int (*)(unsigned);
  using Count = int (*)(int*);
  auto init = reinterpret_cast<Init>(dlsym(lib, "cuInit"));
  auto count = reinterpret_cast<Count>(dlsym(lib, "cuDeviceGetCount"));
  int n = 0;
  if (!init || !count || init(0) != 0 || count(&n) != 0 || n == 0) {
    why = "the CUDA driver reports no usable device";
    return false;
  }
  return true;
}

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

// What was not tested because a backend does not list a feature: printed when the program ends.
std::map<std::string, std::set<std::string>>& untested() {
  static std::map<std::string, std::set<std::string>> u;  // "backend: feature" -> folders
  return u;
}

class UntestedReport : public ::testing::Environment {
 public:
  void TearDown() override {
    if (untested().empty()) {
      std::cout << "[ golden   ] every backend computed every feature of every fixture\n";
      return;
    }
    for (const auto& [what, where] : untested()) {
      std::vector<std::string> w(where.begin(), where.end());
      std::cout << "[ untested ] " << what << " (not listed by the backend): " << join(w) << "\n";
    }
  }
};
[[maybe_unused]] const auto* const kReport = ::testing::AddGlobalTestEnvironment(new UntestedReport);

// ---- comparisons ----------------------------------------------------------------------------------------------------

double tolerance(DType t) {
  return t == DType::f64 ? 1e-10 : 1e-4;
}

// max |actual - expected| / max |expected| with the worst element, in a failure message naming what was compared.
::testing::AssertionResult close(const Tensor& actual, const Tensor& expected, double tol, const std::string& what) {
  if (actual.shape() != expected.shape())
    return ::testing::AssertionFailure() << what << ": shape " << shape_string(actual.shape()) << ", expected "
                                         << shape_string(expected.shape());
  double worst = -1, scale = 0;
  std::int64_t at = 0;
  for (std::int64_t i = 0; i < expected.numel(); ++i) {
    scale = std::max(scale, std::abs(expected.get(i)));
    const double e = std::abs(actual.get(i) - expected.get(i));
    if (!(e <= worst)) {  // a NaN becomes the worst and stays
      worst = e;
      at = i;
    }
  }
  const double err = scale > 0 ? worst / scale : worst;
  if (err <= tol) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(3);
  os << what << ": normalised error " << err << " > " << tol;
  os.precision(15);
  os << " (worst element " << at << ": " << actual.get(at) << " vs expected " << expected.get(at);
  os.precision(3);
  os << "; max |expected| " << scale << ")";
  return ::testing::AssertionFailure() << os.str();
}

double normalised_error(const Tensor& actual, const Tensor& expected) {
  double worst = 0, scale = 0;
  for (std::int64_t i = 0; i < expected.numel(); ++i) {
    const double e = std::abs(actual.get(i) - expected.get(i));
    if (!(e <= worst)) worst = e;
    scale = std::max(scale, std::abs(expected.get(i)));
  }
  return worst / scale;
}

// The first n positions of a [B, T, W] tensor.
Tensor first_positions(const Tensor& t, std::int64_t n) {
  const std::int64_t B = t.dim(0), T = t.dim(1), W = t.dim(2);
  Tensor out(t.dtype(), {B, n, W});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < n * W; ++i) out.set((b * n) * W + i, t.get((b * T) * W + i));
  return out;
}

// ---- the golden cases, per backend ----------------------------------------------------------------------------------

struct Case {
  std::string backend;
  DType dtype = DType::f64;
  std::string device;
  std::string folder;
  std::string golden_case;
  std::string error;  // the backend or the manifest could not be read: the case fails with it
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.backend << " " << dtype_name(c.dtype) << " " << c.device << " " << c.folder << " " << c.golden_case;
}

std::string sanitize(std::string s) {
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  if (!c.error.empty()) return sanitize(c.backend) + "_not_loaded";
  return sanitize(c.backend + "_" + dtype_name(c.dtype) + "_" + c.device + "_" + c.folder + "_" + c.golden_case);
}

// Every backend x (f64, f32 where listed) x listed device x folder x the case of its golden file.
std::vector<Case> all_cases() {
  std::vector<Case> out;
  if (!manifest().error.empty()) {
    out.push_back({"manifest", DType::f64, "", "", "", manifest().error});
    return out;
  }
  for (const std::string& name : lminv::test::backends_under_test()) {
    BackendInfo info;
    try {
      info = backend(name)->info();
    } catch (const std::exception& e) {
      out.push_back({name, DType::f64, "", "", "", e.what()});
      continue;
    }
    for (DType dtype : {DType::f64, DType::f32}) {
      if (std::find(info.dtypes.begin(), info.dtypes.end(), dtype) == info.dtypes.end()) continue;
      for (const std::string& device : info.devices)
        for (const Folder& f : manifest().folders)
          for (const std::string& c : folder_info(f.golden).cases)
            out.push_back({name, dtype, device, f.folder, c, ""});
    }
  }
  return out;
}

class BackendGolden : public ::testing::TestWithParam<Case> {};

TEST_P(BackendGolden, MatchesPyTorch) {
  const Case& c = GetParam();
  if (!c.error.empty()) FAIL() << "'" << c.backend << "' cannot be used: " << c.error;
  const Loaded& l = loaded(c.folder);
  ASSERT_TRUE(l.checkpoint) << "load_checkpoint(" << (kRoot / c.folder).string() << ") failed: " << l.error;
  const std::string gfolder = folder_info(c.folder).golden;
  const GoldenCase gc = golden_case(gfolder, c.golden_case);
  const ModelSpec spec = spec_for(l.checkpoint->spec, gc, c.dtype, c.device);
  const std::string label = c.backend + " " + dtype_name(c.dtype) + " " + c.folder + " " + gc.name;

  std::string why;
  if (c.device == "cuda" && !cuda_device_present(why)) GTEST_SKIP() << "device cuda: " << why;
  const std::shared_ptr<Backend> b = backend(c.backend);
  const BackendInfo info = b->info();
  std::vector<std::string> missing;
  for (const std::string& f : required_features(spec))
    if (std::find(info.features.begin(), info.features.end(), f) == info.features.end()) missing.push_back(f);
  if (!missing.empty()) {
    if (must_compute_everything(c.backend))
      FAIL() << label << ": backend '" << c.backend
             << "' must compute every feature of the families, but does not list " << join(missing)
             << " (it lists: " << join(info.features) << ")";
    for (const std::string& f : missing) untested()[c.backend + ": " + f].insert(c.folder);
    GTEST_SKIP() << label << ": backend '" << c.backend << "' does not list " << join(missing) << ": not tested";
  }

  std::unique_ptr<Model> model;
  try {
    model = b->create_model(spec, l.weights);
  } catch (const Error& e) {
    FAIL() << label << ": create_model threw for features the backend lists: " << e.what();
  }
  ASSERT_NE(model, nullptr);

  const std::string p = "case/" + gc.name + "/";
  const Tensor input = golden_tensor(gfolder, std::string("input/") + input_space_name(gc.input)).to(c.dtype);
  const Tensor& grad_output = golden_tensor(gfolder, p + "grad_output");
  const double tol = tolerance(c.dtype);
  // The float64 values always; for f32 also the float32 run's, which carries the same rounding kind as the backend.
  std::vector<std::string> references{"f64"};
  if (c.dtype == DType::f32) references.push_back("f32");

  Tensor output;
  try {
    output = model->forward(input);
  } catch (const Error& e) {
    FAIL() << label << ": forward threw: " << e.what();
  }
  EXPECT_EQ(output.dtype(), c.dtype) << label << ": forward's dtype";
  // The worst normalised errors, as test properties (--gtest_output=xml) and printed with LMINV_GOLDEN_VERBOSE=1.
  std::ostringstream errors;
  errors.precision(2);
  auto note = [&](const std::string& what, const Tensor& a, const Tensor& e) {
    if (a.shape() != e.shape()) return;
    const double err = normalised_error(a, e);
    RecordProperty(what, std::to_string(err));
    errors << " " << what << " " << std::scientific << err;
  };
  for (const std::string& r : references) {
    EXPECT_TRUE(close(output, golden_tensor(gfolder, p + r + "/output"), tol, label + " forward vs " + r));
    note("forward_vs_" + r, output, golden_tensor(gfolder, p + r + "/output"));
  }

  Tensor grad;
  try {
    grad = model->backward(input, grad_output.to(c.dtype));
  } catch (const Error& e) {
    FAIL() << label << ": backward threw: " << e.what();
  }
  EXPECT_EQ(grad.dtype(), c.dtype) << label << ": backward's dtype";
  for (const std::string& r : references) {
    EXPECT_TRUE(close(grad, golden_tensor(gfolder, p + r + "/grad_input"), tol, label + " backward vs " + r));
    note("backward_vs_" + r, grad, golden_tensor(gfolder, p + r + "/grad_input"));
  }

  // The same model on the first positions only: a decoder takes any length, and position t sees positions <= t.
  Tensor prefix;
  try {
    prefix = model->forward(first_positions(input, kPrefix));
  } catch (const Error& e) {
    FAIL() << label << ": forward of the first " << kPrefix << " positions threw: " << e.what();
  }
  EXPECT_TRUE(close(prefix, first_positions(golden_tensor(gfolder, p + "f64/output"), kPrefix), tol,
                    label + " forward of the first " + std::to_string(kPrefix) + " positions"));
  if (std::getenv("LMINV_GOLDEN_VERBOSE")) std::cout << "[  errors  ]" << errors.str() << "\n";
}

INSTANTIATE_TEST_SUITE_P(Family, BackendGolden, ::testing::ValuesIn(all_cases()), case_name);

// ---- the fixture as load_checkpoint reads it ------------------------------------------------------------------------

std::vector<std::string> folder_names() {
  std::vector<std::string> out;
  for (const Folder& f : manifest().folders) out.push_back(f.folder);
  if (out.empty()) out.push_back("manifest_json_unreadable");
  return out;
}

std::string folder_param_name(const ::testing::TestParamInfo<std::string>& info) {
  return sanitize(info.param);
}

class FamilyGoldenFixture : public ::testing::TestWithParam<std::string> {
 protected:
  const Folder& info() const { return folder_info(GetParam()); }
  const Checkpoint& checkpoint() const {
    if (!manifest().error.empty()) throw Error(manifest().error);
    const Loaded& l = loaded(GetParam());
    if (!l.checkpoint) throw Error("load_checkpoint(" + (kRoot / GetParam()).string() + ") failed: " + l.error);
    return *l.checkpoint;
  }
};

TEST_P(FamilyGoldenFixture, SpecIsTheConfigsSetting) {
  const Checkpoint& ck = checkpoint();
  const ModelSpec& s = ck.spec;
  const json& want = info().lminv;
  const std::string where = GetParam() + "/config.json";
  EXPECT_EQ(s.family, info().family) << where;
  EXPECT_EQ(s.kind, ModelKind::decoder) << where;
  EXPECT_EQ(s.n_layer, want.at("n_layer").get<std::int64_t>()) << where << ": n_layer";
  EXPECT_EQ(s.n_embd, want.at("n_embd").get<std::int64_t>()) << where << ": n_embd";
  EXPECT_EQ(s.n_head, want.at("n_head").get<std::int64_t>()) << where << ": n_head";
  EXPECT_EQ(s.inner(), want.at("n_inner").get<std::int64_t>()) << where << ": inner()";
  EXPECT_EQ(s.vocab_size, want.at("vocab_size").get<std::int64_t>()) << where << ": vocab_size";
  EXPECT_EQ(s.n_positions, want.at("n_positions").get<std::int64_t>()) << where << ": n_positions";
  const Architecture& a = s.arch;
  EXPECT_EQ(norm_name(a.norm), want.at("norm").get<std::string>()) << where << ": norm";
  if (a.norm == Norm::layer_norm) {
    EXPECT_EQ(a.norm_bias, want.at("norm_bias").get<bool>()) << where << ": norm_bias";
  }
  EXPECT_EQ(a.norm_eps, want.at("norm_eps").get<double>()) << where << ": norm_eps";
  EXPECT_EQ(positions_name(a.positions), want.at("positions").get<std::string>()) << where << ": positions";
  EXPECT_EQ(a.rope_theta, want.at("rope_theta").get<double>()) << where << ": rope_theta";
  EXPECT_EQ(s.rotary_dim(), want.at("rotary_dim").get<std::int64_t>()) << where << ": rotary_dim()";
  EXPECT_EQ(s.kv_heads(), want.at("kv_heads").get<std::int64_t>()) << where << ": kv_heads()";
  EXPECT_EQ(s.head_size(), want.at("head_size").get<std::int64_t>()) << where << ": head_size()";
  EXPECT_EQ(a.qkv_bias, want.at("qkv_bias").get<bool>()) << where << ": qkv_bias";
  EXPECT_EQ(a.attn_out_bias, want.at("attn_out_bias").get<bool>()) << where << ": attn_out_bias";
  EXPECT_EQ(mlp_name(a.mlp), want.at("mlp").get<std::string>()) << where << ": mlp";
  EXPECT_EQ(a.mlp_bias, want.at("mlp_bias").get<bool>()) << where << ": mlp_bias";
  EXPECT_EQ(residual_name(a.residual), want.at("residual").get<std::string>()) << where << ": residual";
  EXPECT_EQ(a.tied_head, want.at("tied_head").get<bool>()) << where << ": tied_head";
  EXPECT_NO_THROW(check_spec(s, "family_golden_test")) << where;
}

TEST_P(FamilyGoldenFixture, WeightsAreExactlyTheCanonicalSchema) {
  const Checkpoint& ck = checkpoint();
  try {
    check_weights(weight_schema(ck.spec), ck.weights, GetParam(), /*exact=*/true);
  } catch (const Error& e) {
    FAIL() << e.what();
  }
  // dtypes as stored: BF16 stays bf16, F16 is widened to f32
  const DType want = info().stored == "BF16" ? DType::bf16 : DType::f32;
  for (const auto& [name, t] : ck.weights.tensors()) EXPECT_EQ(t.dtype(), want) << GetParam() << ": " << name;
}

TEST_P(FamilyGoldenFixture, ExtraFoldersLoadToTheSameValues) {
  const Folder& f = info();
  if (f.golden == f.folder) GTEST_SKIP() << GetParam() << " is a family's own folder";
  const Checkpoint& ck = checkpoint();
  const Loaded& main = loaded(f.golden);
  ASSERT_TRUE(main.checkpoint) << "load_checkpoint(" << f.golden << ") failed: " << main.error;
  ASSERT_EQ(ck.weights.names(), main.checkpoint->weights.names()) << GetParam() << " against " << f.golden;
  for (const auto& [name, t] : ck.weights.tensors()) {
    const Tensor& m = main.checkpoint->weights.get(name);
    ASSERT_EQ(t.shape(), m.shape()) << name;
    for (std::int64_t i = 0; i < t.numel(); ++i)
      ASSERT_EQ(t.get(i), m.get(i)) << GetParam() << ": " << name << " element " << i << " differs from " << f.golden;
  }
}

TEST_P(FamilyGoldenFixture, BatchItemZeroIsTheTokenIds) {
  const Checkpoint& ck = checkpoint();
  const Folder& f = info();
  const Tensor& wte = ck.weights.get("wte.weight");
  const Tensor& emb = golden_tensor(f.golden, "input/embedding");
  const Tensor& voc = golden_tensor(f.golden, "input/vocab");
  const std::int64_t d = ck.spec.n_embd, V = ck.spec.vocab_size;
  ASSERT_EQ(emb.shape(), (Shape{kBatch, kSeqLen, d}));
  ASSERT_EQ(voc.shape(), (Shape{kBatch, kSeqLen, V}));
  const std::vector<std::int64_t>& ids = manifest().token_ids;
  ASSERT_EQ(static_cast<std::int64_t>(ids.size()), kSeqLen);
  for (std::int64_t t = 0; t < kSeqLen; ++t) {
    for (std::int64_t j = 0; j < d; ++j)
      ASSERT_EQ(emb.get(t * d + j), wte.get(ids[t] * d + j)) << GetParam() << ": position " << t << " feature " << j;
    for (std::int64_t w = 0; w < V; ++w)
      ASSERT_EQ(voc.get(t * V + w), w == ids[t] ? 1.0 : 0.0) << GetParam() << ": position " << t;
  }
}

TEST_P(FamilyGoldenFixture, GoldenFileHoldsTheManifestsCases) {
  const Folder& f = info();
  if (f.golden != f.folder) GTEST_SKIP() << GetParam() << " uses the golden file of " << f.golden;
  const auto& meta = golden(f.folder).metadata;
  ASSERT_TRUE(meta.count("cases")) << f.folder;
  std::string listed;
  for (const std::string& c : f.cases) listed += (listed.empty() ? "" : " ") + c;
  EXPECT_EQ(meta.at("cases"), listed) << f.folder << ": the golden file's cases differ from the manifest's";
  ASSERT_TRUE(meta.count("family"));
  EXPECT_EQ(meta.at("family"), f.family);
  EXPECT_FALSE(f.cases.empty()) << f.folder;
  for (const std::string& name : f.cases) {
    const GoldenCase c = golden_case(f.folder, name);
    for (const char* t : {"grad_output", "f64/output", "f64/grad_input", "f32/output", "f32/grad_input"})
      EXPECT_TRUE(golden(f.folder).tensors.contains("case/" + name + "/" + t)) << f.folder << " " << name << " " << t;
    EXPECT_EQ(golden_tensor(f.folder, "case/" + name + "/f32/output").dtype(), DType::f32);
    EXPECT_EQ(golden_tensor(f.folder, "case/" + name + "/f64/output").dtype(), DType::f64);
    EXPECT_LE(c.blocks, info().lminv.at("n_layer").get<std::int64_t>());
  }
}

INSTANTIATE_TEST_SUITE_P(Folders, FamilyGoldenFixture, ::testing::ValuesIn(folder_names()), folder_param_name);

// ---- the comparison can fail ----------------------------------------------------------------------------------------

std::vector<std::string> family_folders() {
  std::vector<std::string> out;
  for (const Folder& f : manifest().folders)
    if (f.golden == f.folder) out.push_back(f.folder);
  if (out.empty()) out.push_back("manifest_json_unreadable");
  return out;
}

class FamilyGoldenSensitivity : public ::testing::TestWithParam<std::string> {};

// One element of the last block's key weights moved by 1e-6 of its value: the case through every block and the
// lm_head sees it beyond the f64 tolerance, the case that stops after block 1 (of 2 or 3) does not.
TEST_P(FamilyGoldenSensitivity, ToleranceSeesASmallWeightChange) {
  if (!manifest().error.empty()) FAIL() << manifest().error;
  const Loaded& l = loaded(GetParam());
  ASSERT_TRUE(l.checkpoint) << "load_checkpoint(" << GetParam() << ") failed: " << l.error;
  const ModelSpec& base = l.checkpoint->spec;
  const std::int64_t L = base.n_layer;
  auto perturbed = std::make_shared<WeightSet>(*l.weights);
  const std::string name = "h." + std::to_string(L - 1) + ".attn.c_attn.weight";
  {
    Tensor w = perturbed->get(name).to(DType::f64);
    const std::int64_t cols = w.dim(1), q = base.n_head * base.head_size();
    const std::int64_t at = 3 * cols + q + 1;  // row 3, the second column of the first key head
    w.set(at, w.get(at) * (1 + 1e-6));
    perturbed->set(name, std::move(w));
  }
  const std::string late = "k" + std::to_string(L) + "_lm_head_embedding", early = "k1_none_embedding";
  for (const std::string& cname : {late, early}) {
    const GoldenCase c = golden_case(GetParam(), cname);
    auto model = backend("reference")->create_model(spec_for(base, c, DType::f64, "cpu"), perturbed);
    const Tensor& input = golden_tensor(GetParam(), "input/embedding");
    const std::string p = "case/" + cname + "/";
    const double fwd = normalised_error(model->forward(input), golden_tensor(GetParam(), p + "f64/output"));
    const double bwd = normalised_error(model->backward(input, golden_tensor(GetParam(), p + "grad_output")),
                                        golden_tensor(GetParam(), p + "f64/grad_input"));
    if (cname == late) {
      EXPECT_GT(fwd, 1e-10) << GetParam() << " " << cname << ": forward does not see the change of " << name;
      EXPECT_GT(bwd, 1e-10) << GetParam() << " " << cname << ": backward does not see the change of " << name;
    } else {
      EXPECT_LE(fwd, 1e-10) << GetParam() << " " << cname;
      EXPECT_LE(bwd, 1e-10) << GetParam() << " " << cname;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyGoldenSensitivity, ::testing::ValuesIn(family_folders()), folder_param_name);

}  // namespace
