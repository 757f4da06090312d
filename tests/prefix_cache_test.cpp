// The "prefix_cache" capability (lminv/prefix_cache.hpp) of every backend plugin, loaded by name through the registry.
//
// For each backend named in LMINV_TEST_BACKENDS (set by tests/CMakeLists.txt to the backends built), each
// dtype and device its info() lists, and each model case below (small random decoders: GPT-2 with every head,
// blocks 0 .. n_layer, extra layers and both input spaces; llama-, mistral-, qwen2- and gpt_neox-like architectures,
// a head_dim that is not n_embd / n_head and a model without biases, each in a few heads and input spaces; and
// transformer_mlp where a backend offers a cache for it):
//   - after a random prefix of each length t = 0 .. seq_len - 1, and of n_positions - 1 (the longest the cache takes
//     for a decoder), next() on B random candidates gives, row by row,
//     (a) forward() on the whole sequence (the prefix, the candidate, random positions after it) at row t, and
//     (b) FullForwardPrefix's rows (t < seq_len), within the dtype's tolerance as max |a - b| / max |expected| (the
//     conformance suite's normalised error); the reference backend's rows are bit-identical to its forward()'s.
// Per backend, dtype, device and architecture (gpt2, mistral): reset() and appending again gives the same rows,
// appending rows one at a time gives what appending them together gives, next() leaves the prefix as it was, and a
// full prefix (n_positions positions for a decoder), a wrong width or a wrong rank are lminv::Errors naming the
// problem (the cache unchanged after them). And per backend: fcnet is not causal, so no backend offers a cache for it.
//
// Which backend is tested on what comes from its info() alone: a model case whose kind the backend does not list,
// or that needs a feature (schema.hpp's required_features) it does not list, is skipped with a message naming it; a
// backend that lists them must build the model, and a backend that lists the feature "prefix_cache" must offer a
// cache for every decoder it builds (the test fails otherwise). transformer_mlp's cache is optional. Test names:
// PrefixCache/NextCase.MatchesForward/<backend>_<dtype>_<device>_<model>,
// PrefixCache/CacheChecks.<check>/<backend>_<dtype>_<device>_<architecture>. LMINV_PREFIX_CACHE_VERBOSE=1 prints
// each case's worst errors; the worst per backend and dtype are printed at the end in any case.
#include "lminv/prefix_cache.hpp"

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <typeinfo>
#include <vector>

#include "lminv/lminv.hpp"
#include "registry.hpp"
#include "test_backends.hpp"

using namespace lminv;

namespace {

constexpr std::uint64_t kSeed = 20240717;

// ---- the backends under test --------------------------------------------------------------------------------------

using lminv::test::backends_under_test;

const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

// The backend plugin `name`, made and configured once per process (threads = 1: the models are small). Throws Error
// naming it, with the registry's refusals, when it is not there.
std::shared_ptr<Backend> backend(const std::string& name) {
  static std::map<std::string, std::shared_ptr<Backend>> made;
  auto it = made.find(name);
  if (it != made.end()) return it->second;
  std::shared_ptr<Backend> b;
  try {
    b = registry().create_backend(name);
  } catch (const Error& e) {
    std::string refused;
    for (const RejectedPlugin& p : registry().rejected()) refused += "\n  refused " + p.file.string() + ": " + p.reason;
    throw Error(e.what() + refused);
  }
  b->configure(Options("backend", "prefix_cache_test", {{"threads", "1"}}));
  made[name] = b;
  return b;
}

// Whether a CUDA device is present, asked of the driver itself (libcuda), so the suite links no CUDA library.
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

template <class T>
bool contains(const std::vector<T>& v, const T& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

std::string sanitize(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

// ---- the model cases ----------------------------------------------------------------------------------------------

struct ModelCase {
  std::string name;  // gpt2_k3_lm_head_vocab, llama_lm_head_embedding, ...
  ModelSpec spec;    // dtype and device are the test case's
};

// n_embd 32 in 4 heads of 8, 3 blocks, 97 tokens, 16 positions, 7 positions of input: GPT-2's architecture.
ModelSpec small_gpt2() {
  ModelSpec s;
  s.family = "gpt2";
  s.kind = ModelKind::decoder;
  s.n_layer = 3;
  s.n_embd = 32;
  s.n_head = 4;
  s.vocab_size = 97;
  s.n_positions = 16;
  s.seq_len = 7;
  return s;
}

void llama_like(ModelSpec& s) {
  s.family = "llama";
  Architecture& a = s.arch;
  a.norm = Norm::rms_norm;
  a.norm_eps = 1e-6;
  a.positions = Positions::rotary;
  a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;
  a.mlp = Mlp::swiglu;
  a.tied_head = false;
}

// The architectures besides GPT-2's, on small_gpt2's sizes.
std::vector<std::pair<std::string, ModelSpec>> architectures() {
  std::vector<std::pair<std::string, ModelSpec>> out;
  ModelSpec s = small_gpt2();
  llama_like(s);
  out.push_back({"llama", s});
  s.family = "mistral";  // grouped-query attention
  s.arch.n_kv_head = 2;
  s.arch.rope_theta = 1e6;
  out.push_back({"mistral", s});
  s.family = "qwen2";  // q/k/v biases, one key/value head for the four query heads
  s.arch.qkv_bias = true;
  s.arch.n_kv_head = 1;
  out.push_back({"qwen2", s});
  s = small_gpt2();
  s.family = "gpt_neox";  // partial rotary (2 of 8 features), parallel residual, exact GELU, untied head
  s.arch.positions = Positions::rotary;
  s.arch.rotary_fraction = 0.25;
  s.arch.residual = Residual::parallel;
  s.arch.mlp = Mlp::gelu_erf;
  s.arch.tied_head = false;
  out.push_back({"gpt_neox", s});
  s = small_gpt2();
  llama_like(s);
  s.arch.n_kv_head = 2;
  s.arch.head_dim = 12;  // 4 heads of 12 on n_embd 32
  out.push_back({"head_dim", s});
  s = small_gpt2();
  s.arch.norm_bias = false;  // layer norms without bias and no other bias either
  s.arch.qkv_bias = s.arch.attn_out_bias = s.arch.mlp_bias = false;
  out.push_back({"no_bias", s});
  return out;
}

std::vector<ModelCase> model_cases() {
  std::vector<ModelCase> out;
  for (std::int64_t k = 0; k <= 3; ++k)
    for (Head head : {Head::none, Head::ln_f, Head::lm_head})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
        ModelSpec s = small_gpt2();
        s.blocks = k;
        s.head = head;
        s.input = input;
        out.push_back({"gpt2_k" + std::to_string(k) + "_" + head_name(head) + "_" + input_space_name(input), s});
      }
  // Extra block outputs: after the main output, from blocks below and above k.
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    ModelSpec s = small_gpt2();
    s.blocks = 2;
    s.head = Head::none;
    s.layers = {1, 3};
    s.input = input;
    out.push_back({std::string("gpt2_k2_none_layers1_3_") + input_space_name(input), s});
    s.blocks = 1;
    s.head = Head::lm_head;
    s.layers = {0, 3, 2};
    out.push_back({std::string("gpt2_k1_lm_head_layers0_3_2_") + input_space_name(input), s});
  }
  // Every other architecture: its own head in both input spaces, ln_f at full depth, and extra layers.
  for (const auto& [name, arch] : architectures()) {
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
      ModelSpec s = arch;
      s.blocks = 3;
      s.head = Head::lm_head;
      s.input = input;
      out.push_back({name + "_k3_lm_head_" + input_space_name(input), s});
    }
    ModelSpec s = arch;
    s.blocks = 3;
    s.head = Head::ln_f;
    out.push_back({name + "_k3_ln_f_embedding", s});
    s.blocks = 2;
    s.head = Head::none;
    s.layers = {1, 3};
    s.input = InputSpace::vocab;
    out.push_back({name + "_k2_none_layers1_3_vocab", s});
  }
  // int8 block weights: the cache dequantises them as forward() does (onednn: into the model's scratch, not into the
  // padded copies the f32 weights get).
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    ModelSpec s = small_gpt2();
    s.blocks = 3;
    s.head = Head::lm_head;
    s.input = input;
    s.weight_dtype = WeightDType::int8;
    out.push_back({std::string("gpt2_k3_lm_head_") + input_space_name(input) + "_int8", s});
  }
  for (const auto& [name, arch] : architectures())
    if (name == "llama") {
      ModelSpec s = arch;
      s.blocks = 3;
      s.head = Head::lm_head;
      s.weight_dtype = WeightDType::int8;
      out.push_back({name + "_k3_lm_head_embedding_int8", s});
    }
  // Causal too: checked where a backend offers a cache for it.
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    ModelSpec s = small_gpt2();
    s.family = "transformer_mlp";
    s.kind = ModelKind::transformer_mlp;
    s.n_layer = 0;
    s.blocks = 0;
    s.head = Head::none;
    s.input = input;
    out.push_back({std::string("transformer_mlp_") + input_space_name(input), s});
  }
  return out;
}

const ModelCase& model_case(const std::string& name) {
  static const std::vector<ModelCase> cases = model_cases();
  for (const ModelCase& c : cases)
    if (c.name == name) return c;
  throw Error("prefix_cache_test: no model case named " + name);
}

// Seeded random weights for every tensor of weight_schema(spec), f64, made to matter: matrices N(0, 0.02^2) as
// GPT-2's initialisation, but norm weights N(1, 0.2^2), biases N(0, 0.05^2) and c_attn N(0, 0.2^2), so that the
// attention is far from uniform (a cache that mixed up positions would show). The MLP kinds' layers uniform in
// [-1/sqrt(in), 1/sqrt(in)) as nn.Linear. Each tensor from its own stream, so every backend sees the same bytes.
std::shared_ptr<const WeightSet> weights_for(const ModelSpec& spec) {
  static std::map<std::string, std::shared_ptr<const WeightSet>> made;
  // The values depend on the kind and each tensor's name and shape alone: those are the key.
  std::string key = kind_name(spec.kind);
  for (const TensorSpec& t : weight_schema(spec)) key += " " + t.name + shape_string(t.shape);
  auto it = made.find(key);
  if (it != made.end()) return it->second;
  auto ends_with = [](const std::string& s, const std::string& end) {
    return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  };
  const Rng root = Rng(kSeed).fork("prefix cache");
  const std::vector<TensorSpec> schema = weight_schema(spec);
  auto w = std::make_shared<WeightSet>();
  for (const TensorSpec& t : schema) {
    Rng rng = root.fork(t.name);
    Tensor v(DType::f64, t.shape);
    const std::string& n = t.name;
    if (spec.kind != ModelKind::decoder && n != "wte.weight") {
      const std::string layer = n.substr(0, n.find('.'));
      std::int64_t in = 1;
      for (const TensorSpec& u : schema)
        if (u.name == layer + ".weight") in = u.shape[1];
      const double bound = 1 / std::sqrt(static_cast<double>(in));
      for (std::int64_t i = 0; i < v.numel(); ++i) v.set(i, rng.uniform(-bound, bound));
    } else if (ends_with(n, "ln_1.weight") || ends_with(n, "ln_2.weight") || n == "ln_f.weight") {
      fill_normal(v, rng, 1.0, 0.2);
    } else if (ends_with(n, ".bias")) {
      fill_normal(v, rng, 0.0, 0.05);
    } else if (ends_with(n, "attn.c_attn.weight")) {
      fill_normal(v, rng, 0.0, 0.2);
    } else {
      fill_normal(v, rng, 0.0, 0.02);
    }
    w->set(n, std::move(v));
  }
  made[key] = w;
  return w;
}

// ---- tensors and comparisons --------------------------------------------------------------------------------------

double tolerance(DType t) {
  switch (t) {
    case DType::f64: return 1e-10;
    case DType::f32: return 1e-4;
    case DType::bf16: return 5e-2;
  }
  return 0;
}

std::int64_t width(const ModelSpec& spec) {
  return spec.input == InputSpace::embedding ? spec.n_embd : spec.vocab_size;
}

// Random rows [n, width] in `dtype`: token embeddings (std 0.1, GPT-2's scale) or vocabulary-space vectors (std 1).
Tensor random_rows(const ModelSpec& spec, std::int64_t n, Rng rng, DType dtype) {
  Tensor t(DType::f64, {n, width(spec)});
  fill_normal(t, rng, 0.0, spec.input == InputSpace::vocab ? 1.0 : 0.1);
  return t.to(dtype);
}

// max |got - want| / max |want| (max |got - want| itself when want is all zeros), with where the worst element is.
struct Difference {
  double error = 0;
  std::int64_t at = 0;
  double got = 0, want = 0, scale = 0;
  std::string text() const {
    std::ostringstream s;
    s.precision(3);
    s << "normalised error " << error << " (worst element " << at << ": ";
    s.precision(12);
    s << got << " vs expected " << want;
    s.precision(3);
    s << ", |difference| " << std::abs(got - want) << "; max |expected| " << scale << ")";
    return s.str();
  }
};

Difference difference(const Tensor& got, const Tensor& want) {
  Difference d;
  double worst = -1;
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    d.scale = std::max(d.scale, std::abs(want.get(i)));
    const double e = std::abs(got.get(i) - want.get(i));
    if (!(e <= worst)) {  // NaN counts as worst
      worst = e;
      d.at = i;
      d.got = got.get(i);
      d.want = want.get(i);
    }
  }
  d.error = d.scale > 0 ? worst / d.scale : worst;
  if (std::isnan(worst)) d.error = worst;
  return d;
}

bool bit_identical(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Rows t of each item of a forward output [B, T, D]: [B, D].
Tensor row_at(const Tensor& output, std::int64_t t) {
  const std::int64_t B = output.dim(0), T = output.dim(1), D = output.dim(2);
  Tensor rows(output.dtype(), {B, D});
  const std::size_t row_bytes = static_cast<std::size_t>(D) * dtype_size(output.dtype());
  for (std::int64_t b = 0; b < B; ++b)
    std::memcpy(static_cast<unsigned char*>(rows.raw()) + static_cast<std::size_t>(b) * row_bytes,
                static_cast<const unsigned char*>(output.raw()) + static_cast<std::size_t>(b * T + t) * row_bytes,
                row_bytes);
  return rows;
}

// The worst normalised errors seen, per "<backend> <dtype> <device>" and check, printed when the suite ends.
std::map<std::string, std::map<std::string, double>>& worst_errors() {
  static std::map<std::string, std::map<std::string, double>> errors;
  return errors;
}

bool verbose() {
  return std::getenv("LMINV_PREFIX_CACHE_VERBOSE") != nullptr;
}

class PrintWorstErrors : public testing::Environment {
 public:
  void TearDown() override {
    for (const auto& [where, checks] : worst_errors()) {
      std::ostringstream line;
      line.precision(2);
      line << "[  errors  ] " << where << ":";
      for (const auto& [check, error] : checks) line << " " << check << " " << std::scientific << error;
      std::cout << line.str() << "\n";
    }
  }
};
const testing::Environment* const kPrintWorstErrors = testing::AddGlobalTestEnvironment(new PrintWorstErrors);

// ---- what every test needs: the backend's model and its cache -----------------------------------------------------

struct Where {
  std::string backend;
  DType dtype = DType::f64;
  std::string device;
  std::string load_error;  // set when the backend could not be made: the test fails with it
  std::string text() const { return backend + " " + dtype_name(dtype) + " " + device; }
};

// The model of `spec` on `where`, and its cache, or a reason to fail or skip (in `failure` or `skip`).
struct CachedModel {
  std::unique_ptr<Model> model;
  PrefixCache* cache = nullptr;
  std::string failure, skip;
};

std::vector<std::string> kind_names(const std::vector<ModelKind>& kinds) {
  std::vector<std::string> out;
  for (ModelKind k : kinds) out.push_back(kind_name(k));
  return out;
}

CachedModel cached_model(const Where& where, ModelSpec spec) {
  CachedModel m;
  if (!where.load_error.empty()) {
    m.failure = "backend '" + where.backend + "' is listed but cannot be made: " + where.load_error;
    return m;
  }
  const std::shared_ptr<Backend> b = backend(where.backend);
  const BackendInfo info = b->info();
  // What the backend does not list is skipped, by its info() alone; what it lists must work.
  if (!contains(info.kinds, spec.kind)) {
    m.skip = "backend '" + where.backend + "' does not list kind '" + kind_name(spec.kind) +
             "' (it lists: " + join(kind_names(info.kinds)) + "): not tested";
    return m;
  }
  std::vector<std::string> missing;
  for (const std::string& f : required_features(spec))
    if (!contains(info.features, f)) missing.push_back(f);
  if (!missing.empty()) {
    m.skip = "backend '" + where.backend + "' does not list the feature(s) " + join(missing) + " that family '" +
             spec.family + "' needs here (it lists: " + join(info.features) + "): not tested";
    return m;
  }
  const bool decoder = spec.kind == ModelKind::decoder;
  if (decoder && !contains(info.features, std::string(feature::prefix_cache))) {
    m.skip = "backend '" + where.backend + "' does not list the feature prefix_cache: not tested";
    return m;
  }
  std::string why;
  if (where.device == "cuda" && !cuda_device_present(why)) {
    m.skip = "backend '" + where.backend + "' lists device cuda, but " + why + ": not tested here";
    return m;
  }
  spec.dtype = where.dtype;
  spec.device = where.device;
  try {
    m.model = b->create_model(spec, weights_for(spec));
  } catch (const Error& e) {
    m.failure =
        std::string("create_model threw for a kind, the features, a dtype and a device the backend lists: ") + e.what();
    return m;
  }
  m.cache = prefix_cache_of(*m.model);
  if (!m.cache) {
    const std::string none = "backend '" + where.backend + "' offers no prefix_cache for family '" + spec.family +
                             "' (Model::capability(\"prefix_cache\") is nullptr)";
    if (decoder)
      m.failure = none + ", which it must: it lists the feature prefix_cache";
    else
      m.skip = none + ": not tested";
  }
  return m;
}

// Fails or skips the calling test as `m` says.
#define LMINV_REQUIRE_CACHE(m)                       \
  do {                                               \
    if (!(m).failure.empty()) FAIL() << (m).failure; \
    if (!(m).skip.empty()) GTEST_SKIP() << (m).skip; \
  } while (false)

// Every backend x listed dtype x listed device. A backend that cannot be made gives one failing entry.
std::vector<Where> all_places() {
  std::vector<Where> out;
  for (const std::string& name : backends_under_test()) {
    BackendInfo info;
    try {
      info = backend(name)->info();
    } catch (const std::exception& e) {
      out.push_back({name, DType::f64, "", e.what()});
      continue;
    }
    for (DType dtype : info.dtypes)
      for (const std::string& device : info.devices) out.push_back({name, dtype, device, ""});
  }
  return out;
}

std::string where_name(const Where& w) {
  if (!w.load_error.empty()) return sanitize(w.backend) + "_not_loaded";
  return sanitize(w.backend + "_" + dtype_name(w.dtype) + "_" + w.device);
}

// ---- next() against forward() and FullForwardPrefix, every model case and prefix length ---------------------------

struct NextCase {
  Where where;
  std::string model;  // a model_cases() name
};

void PrintTo(const NextCase& c, std::ostream* os) {
  *os << c.where.text() << " " << c.model;
}

std::vector<NextCase> all_next_cases() {
  std::vector<NextCase> out;
  for (const Where& w : all_places()) {
    if (!w.load_error.empty()) {
      out.push_back({w, ""});
      continue;
    }
    for (const ModelCase& m : model_cases()) out.push_back({w, m.name});
  }
  return out;
}

std::string next_case_name(const testing::TestParamInfo<NextCase>& info) {
  const NextCase& c = info.param;
  return c.where.load_error.empty() ? where_name(c.where) + "_" + sanitize(c.model) : where_name(c.where);
}

class NextCaseTest : public testing::TestWithParam<NextCase> {};

TEST_P(NextCaseTest, MatchesForward) {
  const NextCase& c = GetParam();
  const ModelCase* m = c.where.load_error.empty() ? &model_case(c.model) : nullptr;
  CachedModel cm = cached_model(c.where, m ? m->spec : small_gpt2());
  LMINV_REQUIRE_CACHE(cm);
  Model& model = *cm.model;
  PrefixCache& cache = *cm.cache;
  const ModelSpec& spec = model.spec();
  const DType dt = spec.dtype;
  const double tol = tolerance(dt);
  const bool exact = c.where.backend == "reference";
  const std::int64_t w = width(spec);
  FullForwardPrefix full(model);
  std::map<std::string, double>& worst = worst_errors()[c.where.text()];
  double worst_forward = 0, worst_full = 0;

  // Every prefix length below seq_len, and for a model of any length the last position it has (n_positions - 1),
  // where forward() runs on a longer sequence than seq_len and FullForwardPrefix (seq_len long) cannot follow.
  std::vector<std::int64_t> lengths;
  for (std::int64_t t = 0; t < spec.seq_len; ++t) lengths.push_back(t);
  if (spec.any_length() && spec.n_positions > spec.seq_len) lengths.push_back(spec.n_positions - 1);
  const Rng rng = Rng(kSeed).fork(c.model).fork(dtype_name(dt));
  for (const std::int64_t t : lengths) {
    SCOPED_TRACE("prefix length t = " + std::to_string(t));
    const std::int64_t T = std::max(spec.seq_len, t + 1);
    const bool with_full = t < spec.seq_len;
    const std::int64_t B = t % 2 == 0 ? 5 : 1;  // single candidates too: a backend may take another path for them
    const Rng rt = rng.fork("t " + std::to_string(t));
    const Tensor prefix = random_rows(spec, t, rt.fork("prefix"), dt);          // [t, w]
    const Tensor candidates = random_rows(spec, B, rt.fork("candidates"), dt);  // [B, w]
    // The whole sequences [B, T, w]: the prefix, candidate b, then random rows (different in each item: position t
    // must not see them).
    const Tensor after = random_rows(spec, B * (T - t - 1), rt.fork("after"), dt);
    Tensor sequences(dt, {B, T, w});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t p = 0; p < T; ++p)
        for (std::int64_t i = 0; i < w; ++i) {
          const double v = p < t    ? prefix.get(p * w + i)
                           : p == t ? candidates.get(b * w + i)
                                    : after.get((b * (T - t - 1) + p - t - 1) * w + i);
          sequences.set((b * T + p) * w + i, v);
        }

    cache.reset();
    if (t > 0) cache.append(prefix);
    ASSERT_EQ(cache.length(), t);
    Tensor rows;
    try {
      rows = cache.next(candidates);
    } catch (const Error& e) {
      FAIL() << "next threw: " << e.what();
    }
    EXPECT_EQ(cache.length(), t) << "next changed the prefix's length";
    const Tensor want = row_at(model.forward(sequences), t);  // [B, D]
    ASSERT_EQ(rows.shape(), want.shape()) << "next's rows have another shape than forward()'s row t";
    EXPECT_EQ(rows.dtype(), dt) << "next's rows are not in the model's dtype";
    Tensor want_full = want;
    if (with_full) {
      full.reset();
      if (t > 0) full.append(prefix);
      want_full = full.next(candidates);
    }

    const Difference df = difference(rows, want), dff = difference(rows, want_full);
    worst_forward = std::max(worst_forward, df.error);
    worst_full = std::max(worst_full, dff.error);
    if (exact) {
      EXPECT_TRUE(bit_identical(rows, want)) << "next's rows are not bit-identical to forward()'s row t: " << df.text();
      EXPECT_TRUE(bit_identical(rows, want_full))
          << "next's rows are not bit-identical to FullForwardPrefix's: " << dff.text();
    } else {
      EXPECT_LE(df.error, tol) << "next against forward()'s row t: " << df.text() << ", tolerance " << tol;
      EXPECT_LE(dff.error, tol) << "next against FullForwardPrefix: " << dff.text() << ", tolerance " << tol;
    }
  }
  worst["vs_forward"] = std::max(worst["vs_forward"], worst_forward);
  worst["vs_full_forward_prefix"] = std::max(worst["vs_full_forward_prefix"], worst_full);
  if (verbose())
    std::cout << "[  errors  ] vs forward " << worst_forward << ", vs FullForwardPrefix " << worst_full << "\n";
}

INSTANTIATE_TEST_SUITE_P(PrefixCache, NextCaseTest, testing::ValuesIn(all_next_cases()), next_case_name);

// ---- the cache's own behaviour, per backend, dtype and device -----------------------------------------------------

// A model with everything in its output: 3 blocks, lm_head, and block 1's output after it; GPT-2's architecture or
// mistral's (rms_norm, rotary, grouped kv heads, swiglu, untied head).
ModelSpec checks_spec(const std::string& arch, InputSpace input) {
  ModelSpec s = small_gpt2();
  for (const auto& [name, spec] : architectures())
    if (name == arch) s = spec;
  s.blocks = 3;
  s.head = Head::lm_head;
  s.layers = {1};
  s.input = input;
  return s;
}

struct CheckCase {
  Where where;
  std::string arch;  // gpt2 or an architectures() name
};

void PrintTo(const CheckCase& c, std::ostream* os) {
  *os << c.where.text() << " " << c.arch;
}

class CacheChecks : public testing::TestWithParam<CheckCase> {
 protected:
  // Expects `got` to be `want`: bit-identical on the reference, within the tolerance elsewhere.
  void expect_same(const Tensor& got, const Tensor& want, const std::string& what) {
    ASSERT_EQ(got.shape(), want.shape()) << what;
    const Difference d = difference(got, want);
    double& worst = worst_errors()[GetParam().where.text()][test_name()];
    worst = std::max(worst, d.error);
    if (GetParam().where.backend == "reference")
      EXPECT_TRUE(bit_identical(got, want)) << what << ": not bit-identical: " << d.text();
    else
      EXPECT_LE(d.error, tolerance(GetParam().where.dtype)) << what << ": " << d.text();
  }

  // The test's name without its parameter's: ErrorsNameTheProblem, ...
  static std::string test_name() {
    const std::string name = testing::UnitTest::GetInstance()->current_test_info()->name();
    return name.substr(0, name.find('/'));
  }

  // Expects f to throw an lminv::Error whose message contains every one of `needles`.
  template <class F>
  void expect_error(F&& f, const std::vector<std::string>& needles, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << what << " was accepted";
    } catch (const Error& e) {
      for (const std::string& needle : needles)
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
            << "the error for " << what << " does not name '" << needle << "': " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << " threw a " << typeid(e).name() << ", not an lminv::Error: " << e.what();
    }
  }
};

TEST_P(CacheChecks, ResetThenAppendAgainGivesTheSame) {
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    SCOPED_TRACE(std::string("input = ") + input_space_name(input));
    CachedModel cm = cached_model(GetParam().where, checks_spec(GetParam().arch, input));
    LMINV_REQUIRE_CACHE(cm);
    PrefixCache& cache = *cm.cache;
    const ModelSpec& spec = cm.model->spec();
    EXPECT_EQ(prefix_cache_of(*cm.model), cm.cache) << "the model's cache is one object";
    const Rng rng = Rng(kSeed).fork("reset").fork(input_space_name(input));
    const Tensor prefix = random_rows(spec, 4, rng.fork("prefix"), spec.dtype);
    const Tensor other = random_rows(spec, 5, rng.fork("other prefix"), spec.dtype);
    const Tensor candidates = random_rows(spec, 6, rng.fork("candidates"), spec.dtype);
    cache.reset();
    cache.append(prefix);
    const Tensor first = cache.next(candidates);
    // Another prefix, longer, then reset: nothing of it may remain.
    cache.reset();
    cache.append(other);
    cache.reset();
    EXPECT_EQ(cache.length(), 0);
    cache.append(prefix);
    EXPECT_EQ(cache.length(), 4);
    expect_same(cache.next(candidates), first, "next after reset() and the same prefix again");
  }
}

TEST_P(CacheChecks, AppendingRowsOneAtATimeEqualsAppendingThemTogether) {
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    SCOPED_TRACE(std::string("input = ") + input_space_name(input));
    CachedModel cm = cached_model(GetParam().where, checks_spec(GetParam().arch, input));
    LMINV_REQUIRE_CACHE(cm);
    PrefixCache& cache = *cm.cache;
    const ModelSpec& spec = cm.model->spec();
    const Rng rng = Rng(kSeed).fork("one at a time").fork(input_space_name(input));
    const std::int64_t t = spec.n_positions - 1;  // the longest prefix with a position left
    const Tensor prefix = random_rows(spec, t, rng.fork("prefix"), spec.dtype);
    const Tensor candidates = random_rows(spec, 3, rng.fork("candidates"), spec.dtype);
    cache.reset();
    cache.append(prefix);
    const Tensor together = cache.next(candidates);
    cache.reset();
    for (std::int64_t p = 0; p < t; ++p) {
      cache.append(prefix.slice0(p, p + 1));
      EXPECT_EQ(cache.length(), p + 1);
    }
    expect_same(cache.next(candidates), together, "next after appending the prefix one row at a time");
    // And in uneven parts: 2, then the rest.
    cache.reset();
    cache.append(prefix.slice0(0, 2));
    cache.append(prefix.slice0(2, t));
    expect_same(cache.next(candidates), together, "next after appending the prefix in two parts");
  }
}

TEST_P(CacheChecks, NextLeavesThePrefixAsItWas) {
  CachedModel cm = cached_model(GetParam().where, checks_spec(GetParam().arch, InputSpace::embedding));
  LMINV_REQUIRE_CACHE(cm);
  PrefixCache& cache = *cm.cache;
  const ModelSpec& spec = cm.model->spec();
  const Rng rng = Rng(kSeed).fork("next leaves");
  const Tensor prefix = random_rows(spec, 3, rng.fork("prefix"), spec.dtype);
  const Tensor a = random_rows(spec, 4, rng.fork("a"), spec.dtype);
  const Tensor b = random_rows(spec, 7, rng.fork("b"), spec.dtype);
  cache.reset();
  cache.append(prefix);
  const Tensor first = cache.next(a);
  cache.next(b);
  EXPECT_EQ(cache.length(), 3);
  expect_same(cache.next(a), first, "next on the same candidates after next on others");
  // Candidates in another dtype are converted to the model's.
  expect_same(cache.next(a.to(DType::f64)), first, "next on the same candidates given in f64");
}

// append_from_last_next(b) after next(candidates) gives the prefix append(candidate b) gives (bit for bit on the
// reference), in the backend's cache and in FullForwardPrefix over the same model; nothing is kept across an append
// or a reset, a kept row is used once, and b outside the last call's candidates is refused.
TEST_P(CacheChecks, AppendFromLastNextEqualsAppendingTheRow) {
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    SCOPED_TRACE(std::string("input = ") + input_space_name(input));
    CachedModel cm = cached_model(GetParam().where, checks_spec(GetParam().arch, input));
    LMINV_REQUIRE_CACHE(cm);
    const ModelSpec& spec = cm.model->spec();
    const Rng rng = Rng(kSeed).fork("append from last next").fork(input_space_name(input));
    const Tensor prefix = random_rows(spec, 3, rng.fork("prefix"), spec.dtype);
    const Tensor candidates = random_rows(spec, 5, rng.fork("candidates"), spec.dtype);
    const Tensor after = random_rows(spec, 4, rng.fork("after"), spec.dtype);
    FullForwardPrefix full(*cm.model);
    const bool implemented = GetParam().where.backend == "reference" || GetParam().where.backend == "torch" ||
                             GetParam().where.backend == "onednn";
    for (PrefixCache* cache : {cm.cache, static_cast<PrefixCache*>(&full)}) {
      const std::string which = cache == cm.cache ? "the backend's cache" : "FullForwardPrefix";
      SCOPED_TRACE(which);
      for (std::int64_t t : {std::int64_t{0}, std::int64_t{3}}) {  // an empty prefix and a prefix of 3
        for (std::int64_t b : {std::int64_t{0}, std::int64_t{2}, std::int64_t{4}}) {
          cache->reset();
          if (t > 0) cache->append(prefix);
          cache->append(candidates.slice0(b, b + 1));
          const Tensor want = cache->next(after);
          cache->reset();
          if (t > 0) cache->append(prefix);
          cache->next(candidates);
          const bool kept = cache->append_from_last_next(b);
          if (!kept) {
            EXPECT_FALSE(implemented && cache == cm.cache) << "the backend keeps no candidates' keys and values";
            continue;
          }
          EXPECT_EQ(cache->length(), t + 1);
          expect_same(cache->next(after), want,
                      "next after append_from_last_next(" + std::to_string(b) + ") at t = " + std::to_string(t));
          EXPECT_EQ(cache->length(), t + 1) << "next changed the prefix";
        }
      }
      // Kept only until an append or a reset, and used once.
      cache->reset();
      cache->next(candidates);
      ASSERT_EQ(cache->append_from_last_next(1), implemented || cache == &full);
      if (!implemented && cache == cm.cache) continue;
      EXPECT_FALSE(cache->append_from_last_next(1)) << "a kept candidate was appended twice";
      cache->next(candidates);
      cache->append(prefix.slice0(0, 1));
      EXPECT_FALSE(cache->append_from_last_next(0)) << "kept across an append";
      cache->next(candidates);
      cache->reset();
      EXPECT_FALSE(cache->append_from_last_next(0)) << "kept across a reset";
      EXPECT_EQ(cache->length(), 0);
      // b outside the last call's candidates: an error naming it, the prefix unchanged.
      cache->append(prefix);
      cache->next(candidates);
      expect_error([&] { cache->append_from_last_next(5); }, {"append_from_last_next(5)", "5 candidates"},
                   "append_from_last_next(5) after 5 candidates");
      expect_error([&] { cache->append_from_last_next(-1); }, {"append_from_last_next(-1)"},
                   "append_from_last_next(-1)");
      EXPECT_EQ(cache->length(), 3) << "a refused append_from_last_next changed the prefix";
    }
  }
}

TEST_P(CacheChecks, ErrorsNameTheProblem) {
  CachedModel cm = cached_model(GetParam().where, checks_spec(GetParam().arch, InputSpace::embedding));
  LMINV_REQUIRE_CACHE(cm);
  PrefixCache& cache = *cm.cache;
  const ModelSpec& spec = cm.model->spec();
  // The longest prefix: n_positions for a decoder (any length), named in the errors.
  const std::int64_t T = spec.any_length() ? spec.n_positions : spec.seq_len, w = width(spec);
  const std::string limit = std::to_string(T), limit_name = spec.any_length() ? "n_positions" : "seq_len";
  const Rng rng = Rng(kSeed).fork("errors");
  const DType dt = spec.dtype;

  // Wrong width or rank, in append and next: the error names the shape given.
  cache.reset();
  cache.append(random_rows(spec, 2, rng.fork("prefix"), dt));
  for (const Shape& shape : {Shape{2, w + 1}, Shape{1, w - 1}, Shape{1, 1, w}, Shape{w}}) {
    const Tensor rows(dt, shape);
    expect_error([&] { cache.append(rows); }, {shape_string(shape)}, "append of rows " + shape_string(shape));
    expect_error([&] { cache.next(rows); }, {shape_string(shape)}, "next on candidates " + shape_string(shape));
  }
  EXPECT_EQ(cache.length(), 2) << "a refused call changed the prefix";

  // More positions than the model has: refused, the prefix unchanged.
  expect_error([&] { cache.append(random_rows(spec, T - 1, rng.fork("too many"), dt)); }, {limit},
               "appending " + std::to_string(T - 1) + " rows to a prefix of 2 (" + limit_name + " " + limit + ")");
  EXPECT_EQ(cache.length(), 2) << "a refused append changed the prefix";
  const Tensor candidates = random_rows(spec, 2, rng.fork("candidates"), dt);
  EXPECT_NO_THROW(cache.next(candidates)) << "the cache is unusable after a refused append";

  // A full prefix: next has no position left, append no room.
  cache.append(random_rows(spec, T - 2, rng.fork("rest"), dt));
  EXPECT_EQ(cache.length(), T);
  expect_error([&] { cache.next(candidates); }, {limit}, "next on a full prefix (" + limit_name + " " + limit + ")");
  expect_error([&] { cache.append(random_rows(spec, 1, rng.fork("one more"), dt)); }, {limit},
               "appending to a full prefix (" + limit_name + " " + limit + ")");
  EXPECT_EQ(cache.length(), T);
  cache.reset();
  EXPECT_NO_THROW(cache.next(candidates)) << "next after reset() of a full prefix";
}

std::vector<CheckCase> all_check_cases() {
  std::vector<CheckCase> out;
  for (const Where& w : all_places()) {
    if (!w.load_error.empty()) {
      out.push_back({w, ""});
      continue;
    }
    for (const char* arch : {"gpt2", "mistral"}) out.push_back({w, arch});
  }
  return out;
}

std::string check_case_name(const testing::TestParamInfo<CheckCase>& info) {
  const CheckCase& c = info.param;
  return c.where.load_error.empty() ? where_name(c.where) + "_" + c.arch : where_name(c.where);
}

INSTANTIATE_TEST_SUITE_P(PrefixCache, CacheChecks, testing::ValuesIn(all_check_cases()), check_case_name);

// ---- per backend: no cache for a family that is not causal --------------------------------------------------------

std::vector<std::string> backends_that_load() {
  std::vector<std::string> out;
  for (const std::string& name : backends_under_test()) {
    try {
      backend(name);
      out.push_back(name);
    } catch (const std::exception&) {  // reported by PrefixCache/NextCaseTest.MatchesForward/<name>_not_loaded
    }
  }
  return out;
}

class NotCausal : public testing::TestWithParam<std::string> {};

TEST_P(NotCausal, FcnetOffersNoPrefixCache) {
  const std::shared_ptr<Backend> b = backend(GetParam());
  const BackendInfo info = b->info();
  if (!contains(info.kinds, ModelKind::fcnet)) GTEST_SKIP() << "backend does not list kind fcnet";
  ModelSpec s = small_gpt2();
  s.family = "fcnet";
  s.kind = ModelKind::fcnet;
  s.n_layer = 0;
  s.blocks = 0;
  s.head = Head::none;
  s.n_embd = 8;
  s.seq_len = 3;
  s.dtype = info.dtypes.front();
  s.device = contains(info.devices, std::string("cpu")) ? "cpu" : info.devices.front();
  std::string why;
  if (s.device == "cuda" && !cuda_device_present(why)) GTEST_SKIP() << "only cuda is listed, but " << why;
  const std::unique_ptr<Model> model = b->create_model(s, weights_for(s));
  EXPECT_EQ(prefix_cache_of(*model), nullptr)
      << "fcnet's output at a position depends on every position: a prefix cache cannot give it";
  EXPECT_EQ(model->capability("no such capability"), nullptr);
}

std::string backend_name(const testing::TestParamInfo<std::string>& info) {
  return sanitize(info.param);
}

GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(NotCausal);
INSTANTIATE_TEST_SUITE_P(PrefixCache, NotCausal, testing::ValuesIn(backends_that_load()), backend_name);

}  // namespace
