// The backend conformance suite: every backend plugin, loaded by name through the registry, against the reference
// backend in f64 on the same weights.
//
// For each backend named in LMINV_TEST_BACKENDS (set by tests/CMakeLists.txt to the backends built), each dtype
// and device its info() lists, and each model case below:
//   - decoders: GPT-2's setting (blocks 0, 1, 3 x every head x both input spaces, and extra layers); the settings of
//     llama, qwen2, mistral and gpt_neox; and GPT-2's setting with one field changed at a time (rms_norm, layer norm
//     without bias, rotary positions full and partial, grouped kv heads, a head_dim that is not n_embd / n_head,
//     gelu_erf, swiglu, the parallel residual, an untied head, no biases), each in a few heads and input spaces;
//     and int8 block weights (gpt2, llama, gpt2-xl's head pattern), where the reference dequantises the same integers;
//   - the MLP kinds (fcnet, fcnet_noninvertible, transformer_mlp) in both input spaces;
// the checks are:
//   - forward, backward (a vector-Jacobian product) and loss_and_grad (l1, l2, cosine) agree with the reference in f64
//     within the dtype's tolerance, measured as max |a - b| / max |reference| (the normalised error of ggml's
//     test-backend-ops);
//   - a batch of 3 gives what 3 single calls give (bit-identical for the reference, within the tolerance for others);
// and per backend, dtype and device, one decoder (llama's setting) called with T = 2, 5, 2 (directly and through a
// LengthView) matches the reference at each length.
// Which backend is tested on what comes from its info(): a kind it does not list is skipped; a feature
// (schema.hpp's required_features) it does not list fails the case for reference and torch, which must compute every
// architecture, and skips it with a message for another backend (onednn); a cuda case on a machine without a CUDA
// device is skipped with a message.
// Then, per backend: an unsupported dtype, device "tpu", a feature it does not list and a wrong input shape are
// lminv::Errors naming them. And the truth itself: the reference in f64 against central finite differences, on GPT-2,
// each family's setting and an MLP.
//
// Test names: Conformance/BackendCase.MatchesTheReference/<backend>_<dtype>_<device>_<model> (for example
// .../torch_f32_cpu_llama_k3_lm_head_vocab), Conformance/VariableLength.MatchesTheReference/<backend>_<dtype>_<device>,
// Conformance/BackendErrors.<check>/<backend>, ConformanceReference/FiniteDifferences.Match/<model>.
// One backend: --gtest_filter='*/torch_*:*/torch' (or ctest -R '/torch'). LMINV_CONFORMANCE_VERBOSE=1 prints each
// case's worst normalised errors, to see the margins to the tolerances.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
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

constexpr std::uint64_t kSeed = 20240611;
constexpr std::int64_t kBatch = 3;

// ---- the backends under test ----------------------------------------------------------------------------------------

using lminv::test::backends_under_test;

const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

std::string rejections() {
  std::string out;
  for (const RejectedPlugin& p : registry().rejected()) out += "\n  refused " + p.file.string() + ": " + p.reason;
  return out;
}

// The backend plugin `name`, made and configured once per process (threads = 1: the models are tiny). Throws Error
// naming it, with the registry's refusals, when it is not there.
std::shared_ptr<Backend> backend(const std::string& name) {
  static std::map<std::string, std::shared_ptr<Backend>> made;
  auto it = made.find(name);
  if (it != made.end()) return it->second;
  std::shared_ptr<Backend> b;
  try {
    b = registry().create_backend(name);
  } catch (const Error& e) {
    throw Error(e.what() + rejections());
  }
  b->configure(Options("backend", "conformance_test", {{"threads", "1"}}));
  made[name] = b;
  return b;
}

// The backends that must compute every architecture feature; another may leave out (and then not list) some.
bool must_compute_everything(const std::string& name) {
  return name == "reference" || name == "torch";
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

std::string dtype_list(const std::vector<DType>& dtypes) {
  std::vector<std::string> names;
  for (DType t : dtypes) names.push_back(dtype_name(t));
  return join(names);
}

std::vector<std::string> kind_list(const std::vector<ModelKind>& kinds) {
  std::vector<std::string> names;
  for (ModelKind k : kinds) names.push_back(kind_name(k));
  return names;
}

// The features `spec` needs that `info` does not list.
std::vector<std::string> missing_features(const ModelSpec& spec, const BackendInfo& info) {
  std::vector<std::string> out;
  for (const std::string& f : required_features(spec))
    if (!contains(info.features, f)) out.push_back(f);
  return out;
}

// ---- the model cases ------------------------------------------------------------------------------------------------

struct ModelCase {
  std::string name;  // gpt2_k3_lm_head_vocab, llama_k3_lm_head_embedding, fcnet_embedding, ...
  std::string arch;  // the architecture setting (arch_settings()) or the MLP kind: the weights' key
  ModelSpec spec;    // dtype and device are the test case's
};

ModelSpec tiny_gpt2() {
  ModelSpec s;
  s.family = "gpt2";
  s.n_layer = 3;
  s.n_embd = 16;
  s.n_head = 2;
  s.vocab_size = 40;
  s.n_positions = 16;
  s.seq_len = 5;
  return s;
}

// GPT-2's setting on sizes where every other setting fits: 4 heads of 8 features (so 2 kv heads make groups of 2,
// and a quarter of a head is 2 rotary features), an MLP width that is not 4 n_embd.
ModelSpec tiny_decoder() {
  ModelSpec s = tiny_gpt2();
  s.family = "decoder";
  s.n_embd = 32;
  s.n_head = 4;
  s.n_inner = 48;
  return s;
}

void llama_setting(ModelSpec& s) {
  Architecture& a = s.arch;
  a.norm = Norm::rms_norm;
  a.norm_bias = false;
  a.norm_eps = 1e-6;
  a.positions = Positions::rotary;
  a.rope_theta = 10000;
  a.n_kv_head = 2;
  a.qkv_bias = a.attn_out_bias = a.mlp_bias = false;
  a.mlp = Mlp::swiglu;
  a.tied_head = false;
}

// Every decoder setting but GPT-2's own: the families', then GPT-2's with one field changed.
std::vector<std::pair<std::string, ModelSpec>> arch_settings() {
  std::vector<std::pair<std::string, ModelSpec>> out;
  auto add = [&](const std::string& name, const std::function<void(ModelSpec&)>& change) {
    ModelSpec s = tiny_decoder();
    s.family = name;
    change(s);
    out.push_back({name, s});
  };
  add("llama", llama_setting);
  add("qwen2", [](ModelSpec& s) {
    llama_setting(s);
    s.arch.qkv_bias = true;
    s.arch.tied_head = true;
    s.arch.rope_theta = 1e6;
  });
  add("mistral", [](ModelSpec& s) {
    llama_setting(s);
    s.arch.head_dim = 16;  // 4 heads of 16 on n_embd 32 (Mistral-Nemo style)
    s.arch.norm_eps = 1e-5;
  });
  add("gpt_neox", [](ModelSpec& s) {
    s.arch.positions = Positions::rotary;
    s.arch.rotary_fraction = 0.25;  // 2 of 8 features
    s.arch.mlp = Mlp::gelu_erf;
    s.arch.residual = Residual::parallel;
    s.arch.tied_head = false;
  });
  add("rms_norm", [](ModelSpec& s) {
    s.arch.norm = Norm::rms_norm;
    s.arch.norm_bias = false;
  });
  add("layer_norm_no_bias", [](ModelSpec& s) { s.arch.norm_bias = false; });
  add("rotary", [](ModelSpec& s) { s.arch.positions = Positions::rotary; });
  add("partial_rotary", [](ModelSpec& s) {
    s.arch.positions = Positions::rotary;
    s.arch.rotary_fraction = 0.5;  // 4 of 8 features
    s.arch.rope_theta = 500;
  });
  add("grouped_kv", [](ModelSpec& s) { s.arch.n_kv_head = 2; });
  add("head_dim", [](ModelSpec& s) { s.arch.head_dim = 12; });  // 4 heads of 12 on n_embd 32
  add("gelu_erf", [](ModelSpec& s) { s.arch.mlp = Mlp::gelu_erf; });
  add("swiglu", [](ModelSpec& s) { s.arch.mlp = Mlp::swiglu; });
  add("parallel_residual", [](ModelSpec& s) { s.arch.residual = Residual::parallel; });
  add("untied_head", [](ModelSpec& s) { s.arch.tied_head = false; });
  add("no_positions", [](ModelSpec& s) { s.arch.positions = Positions::none; });
  // gpt2-xl's head pattern (25 heads, an odd count, of d / 25 features) on a size CI can run: the code path of the
  // seed study's 1600-wide, 25-head model (its 48 blocks are measured in bench/RESULTS.md, not here).
  add("gpt2_xl_heads", [](ModelSpec& s) {
    s.n_embd = 50;
    s.n_head = 25;
    s.n_inner = 0;
  });
  add("no_biases", [](ModelSpec& s) { s.arch.qkv_bias = s.arch.attn_out_bias = s.arch.mlp_bias = false; });
  return out;
}

ModelSpec tiny_mlp(ModelKind kind) {
  ModelSpec s;
  s.family = kind_name(kind);
  s.kind = kind;
  s.n_layer = 0;
  s.n_embd = 8;
  s.n_head = 1;
  s.vocab_size = 40;
  s.n_positions = 3;
  s.seq_len = 3;
  s.blocks = 0;
  s.head = Head::none;
  return s;
}

std::vector<ModelCase> model_cases() {
  std::vector<ModelCase> out;
  for (std::int64_t k : {0, 1, 3})
    for (Head head : {Head::none, Head::ln_f, Head::lm_head, Head::lm_head_no_ln_f})
      for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
        ModelSpec s = tiny_gpt2();
        s.blocks = k;
        s.head = head;
        s.input = input;
        out.push_back(
            {"gpt2_k" + std::to_string(k) + "_" + head_name(head) + "_" + input_space_name(input), "gpt2", s});
      }
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    ModelSpec s = tiny_gpt2();
    s.blocks = 2;
    s.head = Head::none;
    s.layers = {1, 3};
    s.input = input;
    out.push_back({std::string("gpt2_k2_none_layers1_3_") + input_space_name(input), "gpt2", s});
  }
  // Each other setting: the lm_head in both input spaces, ln_f after one block, extra layers around the output.
  for (const auto& [name, base] : arch_settings()) {
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
      ModelSpec s = base;
      s.blocks = 3;
      s.head = Head::lm_head;
      s.input = input;
      out.push_back({name + "_k3_lm_head_" + input_space_name(input), name, s});
    }
    ModelSpec s = base;
    if (name == "untied_head") {  // the study's head without ln_f on its own lm_head.weight
      s.blocks = 1;
      s.head = Head::lm_head_no_ln_f;
      out.push_back({name + "_k1_lm_head_no_ln_f_embedding", name, s});
    }
    s.blocks = 1;
    s.head = Head::ln_f;
    out.push_back({name + "_k1_ln_f_embedding", name, s});
    s.blocks = 2;
    s.head = Head::none;
    s.layers = {1, 3};
    out.push_back({name + "_k2_none_layers1_3_embedding", name, s});
  }
  // int8 block weights (weight_dtype = int8): the reference in f64 dequantises the same integers and scales
  // (plugins/common/int8_weights.hpp), so a backend agrees with it within its dtype's tolerance; int8_test.cpp bounds
  // the quantisation error against the unquantised model.
  for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
    ModelSpec s = tiny_gpt2();
    s.blocks = 3;
    s.head = Head::lm_head;
    s.input = input;
    s.weight_dtype = WeightDType::int8;
    out.push_back({std::string("gpt2_k3_lm_head_") + input_space_name(input) + "_int8", "gpt2", s});
  }
  for (const auto& [name, base] : arch_settings())
    if (name == "llama" || name == "gpt2_xl_heads") {
      ModelSpec s = base;
      s.blocks = 3;
      s.head = Head::lm_head;
      s.weight_dtype = WeightDType::int8;
      out.push_back({name + "_k3_lm_head_embedding_int8", name, s});
    }
  for (ModelKind kind : {ModelKind::fcnet, ModelKind::fcnet_noninvertible, ModelKind::transformer_mlp})
    for (InputSpace input : {InputSpace::embedding, InputSpace::vocab}) {
      ModelSpec s = tiny_mlp(kind);
      s.input = input;
      out.push_back({std::string(kind_name(kind)) + "_" + input_space_name(input), kind_name(kind), s});
    }
  return out;
}

const ModelCase& model_case(const std::string& name) {
  static const std::vector<ModelCase> cases = model_cases();
  for (const ModelCase& c : cases)
    if (c.name == name) return c;
  throw Error("conformance_test: no model case named " + name);
}

bool ends_with(const std::string& s, const std::string& end) {
  return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
}

// The weights every backend gets, one set per setting (all its cases share it): every tensor of weight_schema(spec)
// from its own seeded stream, in f64, made to matter everywhere: norm weights N(1, 0.2^2) and biases N(0, 0.05^2),
// so a backend that ignored one would not agree; c_attn N(0, 1 / fan_in), so that the attention is far from uniform
// (scores of unit size); the other matrices N(0, 0.25 / fan_in); wte N(0, 0.3^2), wpe N(0, 0.1^2). The MLP kinds'
// layers are nn.Linear's [out, in] with N(0, 1 / in) weights.
std::shared_ptr<const WeightSet> weights_for(const ModelCase& m) {
  static std::map<std::string, std::shared_ptr<const WeightSet>> made;
  const std::string key = m.arch + "/" + std::to_string(m.spec.seq_len);  // the fcnets' weights depend on T
  auto it = made.find(key);
  if (it != made.end()) return it->second;
  const Rng root = Rng(kSeed).fork("conformance").fork(m.arch);
  const bool decoder = m.spec.kind == ModelKind::decoder;
  auto w = std::make_shared<WeightSet>();
  for (const TensorSpec& t : weight_schema(m.spec)) {
    const std::string& n = t.name;
    Rng rng = root.fork(n);
    Tensor v(DType::f64, t.shape);
    const bool norm = ends_with(n, "ln_1.weight") || ends_with(n, "ln_2.weight") || n == "ln_f.weight";
    if (n == "wte.weight") {
      fill_normal(v, rng, 0.0, 0.3);
    } else if (n == "wpe.weight") {
      fill_normal(v, rng, 0.0, 0.1);
    } else if (norm) {
      fill_normal(v, rng, 1.0, 0.2);
    } else if (ends_with(n, ".bias")) {
      fill_normal(v, rng, 0.0, 0.05);
    } else {
      // canonical decoder matrices are [in, out]; lm_head.weight and the MLP kinds' layers are [out, in]
      const double fan_in = static_cast<double>(decoder && n != "lm_head.weight" ? t.shape[0] : t.shape[1]);
      const double gain = !decoder || ends_with(n, "attn.c_attn.weight") ? 1.0 : 0.5;
      fill_normal(v, rng, 0.0, gain / std::sqrt(fan_in));
    }
    w->set(n, std::move(v));
  }
  made[key] = w;
  return w;
}

// ---- comparisons ----------------------------------------------------------------------------------------------------

double tolerance(DType t) {
  switch (t) {
    case DType::f64: return 1e-10;
    case DType::f32: return 1e-4;
    case DType::bf16: return 8e-2;  // 8 mantissa bits; llama gradients reached 0.051 on an AVX2 EPYC's LibTorch
  }
  return 0;
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

Difference difference(const std::vector<double>& got, const std::vector<double>& want) {
  return difference(Tensor::from<double>({static_cast<std::int64_t>(got.size())}, got),
                    Tensor::from<double>({static_cast<std::int64_t>(want.size())}, want));
}

bool verbose() {
  return std::getenv("LMINV_CONFORMANCE_VERBOSE") != nullptr;
}

bool bit_identical(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    if (!(a.get(i) == b.get(i)) && !(std::isnan(a.get(i)) && std::isnan(b.get(i)))) return false;
  return true;
}

Tensor normal_tensor(Shape shape, Rng rng, double std) {
  Tensor t(DType::f64, std::move(shape));
  fill_normal(t, rng, 0.0, std);
  return t;
}

// Values exactly representable in `dtype`, as f64: what both the backend and the reference are given.
Tensor rounded(const Tensor& t, DType dtype) {
  return t.to(dtype).to(DType::f64);
}

// The standard deviation of random inputs: vocabulary-space rows N(0, 1), embeddings N(0, 0.5^2).
double input_std(const ModelSpec& spec) {
  return spec.input == InputSpace::vocab || spec.kind != ModelKind::decoder ? 1.0 : 0.5;
}

// Targets whose every element is at least half the output's scale away from that element of every item of the batch,
// so the sign of o - t (l1's gradient) is the same in every dtype: one per item ([B, ...]) or one for all ([1, ...]).
Tensor far_target(const Tensor& output, Rng rng, bool one_for_all) {
  const std::int64_t B = output.dim(0), n = output.numel() / B;
  double scale = 0;
  for (std::int64_t i = 0; i < output.numel(); ++i) scale = std::max(scale, std::abs(output.get(i)));
  if (scale == 0) scale = 1;
  Shape shape = output.shape();
  if (one_for_all) shape[0] = 1;
  Tensor t(DType::f64, shape);
  for (std::int64_t i = 0; i < n; ++i) {
    double lo = output.get(i), hi = lo;
    for (std::int64_t b = 1; b < B; ++b) {
      lo = std::min(lo, output.get(b * n + i));
      hi = std::max(hi, output.get(b * n + i));
    }
    for (std::int64_t b = 0; b < shape[0]; ++b) {
      const double offset = (0.5 + 0.5 * rng.uniform()) * scale;
      const double o = output.get(b * n + i);
      t.set(b * n + i, rng.uniform() < 0.5 ? (one_for_all ? lo : o) - offset : (one_for_all ? hi : o) + offset);
    }
  }
  return t;
}

// Why a backend is not tested on `spec` ("" when it is): a kind it does not list, or a feature it does not list and
// may leave out. A feature that reference or torch does not list is a failure (`*failure` set), not a skip.
std::string not_tested(const std::string& name, const BackendInfo& info, const ModelSpec& spec, bool* failure) {
  *failure = false;
  if (!contains(info.kinds, spec.kind))
    return "backend '" + name + "' does not list kind '" + kind_name(spec.kind) +
           "' (it lists: " + join(kind_list(info.kinds)) + "): not tested";
  const std::vector<std::string> missing = missing_features(spec, info);
  if (missing.empty()) return "";
  *failure = must_compute_everything(name);
  return "backend '" + name + "' does not list feature(s) " + join(missing) + " that '" + spec.family +
         "' needs (it lists: " + join(info.features) + ")" +
         (*failure ? ": reference and torch must compute every architecture" : ": not tested");
}

// ---- the parametrized cases -----------------------------------------------------------------------------------------

struct Case {
  std::string backend;
  DType dtype = DType::f64;
  std::string device;
  std::string model;       // a model_cases() name
  std::string load_error;  // set when the backend could not be made: the case fails with it
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.backend << " " << dtype_name(c.dtype) << " " << c.device << " " << c.model;
}

std::string sanitize(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  if (!c.load_error.empty()) return sanitize(c.backend) + "_not_loaded";
  std::string name = c.backend + "_" + dtype_name(c.dtype) + "_" + c.device;
  if (!c.model.empty()) name += "_" + c.model;
  return sanitize(name);
}

// Every backend x listed dtype x listed device (x model case, with `models`). A backend that cannot be made gives one
// failing case.
std::vector<Case> all_cases(bool models) {
  std::vector<Case> out;
  for (const std::string& name : backends_under_test()) {
    BackendInfo info;
    try {
      info = backend(name)->info();
    } catch (const std::exception& e) {
      out.push_back({name, DType::f64, "", "", e.what()});
      continue;
    }
    for (DType dtype : info.dtypes)
      for (const std::string& device : info.devices) {
        if (!models) {
          out.push_back({name, dtype, device, "", ""});
          continue;
        }
        for (const ModelCase& m : model_cases()) out.push_back({name, dtype, device, m.name, ""});
      }
  }
  return out;
}

// The worst normalised error of each check, printed at the end when LMINV_CONFORMANCE_VERBOSE is set (to see the
// margins) and recorded as test properties (in --gtest_output=xml).
class NotedErrors : public testing::Test {
 protected:
  void note(const std::string& what, double error) {
    double& worst = errors_[what];
    worst = std::max(worst, error);
  }
  void TearDown() override {
    if (errors_.empty()) return;
    std::ostringstream line;
    line.precision(2);
    for (const auto& [what, error] : errors_) {
      line << " " << what << " " << std::scientific << error;
      RecordProperty(what, std::to_string(error));
    }
    if (verbose()) std::cout << "[  errors  ]" << line.str() << "\n";
  }

 private:
  std::map<std::string, double> errors_;
};

class BackendCase : public NotedErrors, public testing::WithParamInterface<Case> {};

TEST_P(BackendCase, MatchesTheReference) {
  const Case& c = GetParam();
  if (!c.load_error.empty()) FAIL() << "backend '" << c.backend << "' is listed but cannot be made: " << c.load_error;
  const std::shared_ptr<Backend> under_test = backend(c.backend);
  const BackendInfo info = under_test->info();
  const ModelCase& m = model_case(c.model);
  bool failure = false;
  const std::string why_not = not_tested(c.backend, info, m.spec, &failure);
  if (failure) FAIL() << why_not;
  if (!why_not.empty()) GTEST_SKIP() << why_not;
  std::string why;
  if (c.device == "cuda" && !cuda_device_present(why))
    GTEST_SKIP() << "backend '" << c.backend << "' lists device cuda, but " << why << ": not tested here";

  ModelSpec spec = m.spec;
  spec.dtype = c.dtype;
  spec.device = c.device;
  ModelSpec ref_spec = m.spec;
  ref_spec.dtype = DType::f64;
  ref_spec.device = "cpu";
  const auto weights = weights_for(m);
  std::unique_ptr<Model> ref = backend("reference")->create_model(ref_spec, weights);
  std::unique_ptr<Model> model;
  try {
    model = under_test->create_model(spec, weights);
  } catch (const Error& e) {
    FAIL() << "create_model threw for a kind, features, dtype and device the backend lists: " << e.what();
  }
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->spec().family, spec.family);
  EXPECT_EQ(model->spec().kind, spec.kind);

  const double tol = tolerance(c.dtype);
  const DType dt = c.dtype;
  const Rng rng = Rng(kSeed).fork(c.model);
  // Inputs, output gradients and targets hold values exact in the dtype: both sides see the same numbers.
  const Tensor x = rounded(normal_tensor(input_shape(spec, kBatch), rng.fork("input"), input_std(spec)), dt);
  const Tensor x_dt = x.to(dt);

  // forward
  const Tensor y_ref = ref->forward(x);
  Tensor y;
  try {
    y = model->forward(x_dt);
  } catch (const Error& e) {
    FAIL() << "forward threw: " << e.what();
  }
  ASSERT_EQ(y.shape(), y_ref.shape()) << "forward: output shape differs from the reference's";
  {
    const Difference d = difference(y, y_ref);
    note("forward", d.error);
    EXPECT_LE(d.error, tol) << "forward: " << d.text() << ", tolerance " << tol;
  }

  // backward: the input gradient of <g, forward(x)> for a fixed random g
  const Tensor g = rounded(normal_tensor(y_ref.shape(), rng.fork("grad_output"), 1.0), dt);
  const Tensor dx_ref = ref->backward(x, g);
  const Tensor dx = model->backward(x_dt, g.to(dt));
  ASSERT_EQ(dx.shape(), x.shape()) << "backward: the gradient's shape differs from the input's";
  {
    const Difference d = difference(dx, dx_ref);
    note("backward", d.error);
    EXPECT_LE(d.error, tol) << "backward: " << d.text() << ", tolerance " << tol;
  }

  // loss_and_grad for each metric: one target per item, and one target broadcast over the batch
  const Tensor target = rounded(far_target(y_ref, rng.fork("target"), false), dt);
  const Tensor target1 = rounded(far_target(y_ref, rng.fork("target for all"), true), dt);
  for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
    for (const Tensor* t : {&target, &target1}) {
      SCOPED_TRACE(std::string("loss_and_grad ") + metric_name(metric) + ", target " + shape_string(t->shape()));
      const LossAndGrad want = ref->loss_and_grad(x, *t, metric);
      const LossAndGrad got = model->loss_and_grad(x_dt, t->to(dt), metric);
      ASSERT_EQ(got.loss.size(), want.loss.size()) << "one loss per item";
      ASSERT_EQ(got.grad.shape(), x.shape()) << "the gradient's shape differs from the input's";
      const Difference dl = difference(got.loss, want.loss);
      note(std::string(metric_name(metric)) + "_loss", dl.error);
      EXPECT_LE(dl.error, tol) << "loss: " << dl.text() << ", tolerance " << tol;
      const Difference dg = difference(got.grad, want.grad);
      note(std::string(metric_name(metric)) + "_grad", dg.error);
      EXPECT_LE(dg.error, tol) << "gradient: " << dg.text() << ", tolerance " << tol;
    }
  }

  // batched = one by one: forward, backward and loss_and_grad of the batch against single calls on each item. Each
  // backward here follows a forward pass on another input, so a backend that keeps activations must notice.
  const bool exact = c.backend == "reference";
  const Tensor y_batch = model->forward(x_dt);
  const LossAndGrad l_batch = model->loss_and_grad(x_dt, target.to(dt), Metric::l2);
  std::vector<Tensor> ys, dxs, lgs;
  std::vector<double> losses;
  for (std::int64_t b = 0; b < kBatch; ++b) {
    const Tensor xb = x_dt.slice0(b, b + 1);
    dxs.push_back(model->backward(xb, g.to(dt).slice0(b, b + 1)));
    ys.push_back(model->forward(xb));
    LossAndGrad lb = model->loss_and_grad(xb, target.to(dt).slice0(b, b + 1), Metric::l2);
    ASSERT_EQ(lb.loss.size(), 1u);
    losses.push_back(lb.loss[0]);
    lgs.push_back(std::move(lb.grad));
  }
  const Tensor dx_batch = model->backward(x_dt, g.to(dt));
  const std::vector<std::pair<const char*, std::pair<Tensor, Tensor>>> batched{
      {"forward", {y_batch, Tensor::concat0(ys)}},
      {"backward", {dx_batch, Tensor::concat0(dxs)}},
      {"loss_and_grad l2 (gradient)", {l_batch.grad, Tensor::concat0(lgs)}},
      {"loss_and_grad l2 (loss)",
       {Tensor::from<double>({kBatch}, l_batch.loss), Tensor::from<double>({kBatch}, losses)}}};
  for (const auto& [what, pair] : batched) {
    const Tensor& batch = pair.first;
    const Tensor& singles = pair.second;
    ASSERT_EQ(batch.shape(), singles.shape()) << what << ": batched and one-by-one shapes differ";
    if (exact) {
      EXPECT_TRUE(bit_identical(batch, singles))
          << what << ": a batch of " << kBatch
          << " is not bit-identical to single calls: " << difference(batch, singles).text();
    } else {
      const Difference d = difference(batch, singles);
      note("batched", d.error);
      EXPECT_LE(d.error, tol) << what << ": a batch of " << kBatch << " against single calls: " << d.text()
                              << ", tolerance " << tol;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Conformance, BackendCase, testing::ValuesIn(all_cases(true)), case_name);

// ---- one model, several lengths -------------------------------------------------------------------------------------

class VariableLength : public NotedErrors, public testing::WithParamInterface<Case> {};

// A decoder takes any T in 1 .. n_positions in every call: one model (built with seq_len 5) called with T = 2, 5, 2,
// each forward followed by a backward, against one reference model. The second T = 2 call goes through a LengthView,
// which must show the length and pass the calls on.
TEST_P(VariableLength, MatchesTheReference) {
  const Case& c = GetParam();
  if (!c.load_error.empty()) FAIL() << "backend '" << c.backend << "' is listed but cannot be made: " << c.load_error;
  const std::shared_ptr<Backend> under_test = backend(c.backend);
  const ModelCase& m = model_case("llama_k3_lm_head_embedding");
  bool failure = false;
  const std::string why_not = not_tested(c.backend, under_test->info(), m.spec, &failure);
  if (failure) FAIL() << why_not;
  if (!why_not.empty()) GTEST_SKIP() << why_not;
  std::string why;
  if (c.device == "cuda" && !cuda_device_present(why)) GTEST_SKIP() << "device cuda: " << why;

  ModelSpec spec = m.spec, ref_spec = m.spec;
  spec.dtype = c.dtype;
  spec.device = c.device;
  ref_spec.dtype = DType::f64;
  ref_spec.device = "cpu";
  std::unique_ptr<Model> ref = backend("reference")->create_model(ref_spec, weights_for(m));
  std::shared_ptr<Model> model;
  try {
    model = under_test->create_model(spec, weights_for(m));
  } catch (const Error& e) {
    FAIL() << "create_model threw: " << e.what();
  }
  const double tol = tolerance(c.dtype);
  const std::vector<std::int64_t> lengths{2, 5, 2};
  for (std::size_t call = 0; call < lengths.size(); ++call) {
    const std::int64_t T = lengths[call];
    SCOPED_TRACE("call " + std::to_string(call) + ": T = " + std::to_string(T));
    const Rng rng = Rng(kSeed).fork("variable length").fork(std::to_string(call));
    const Tensor x = rounded(normal_tensor({2, T, spec.n_embd}, rng.fork("input"), input_std(spec)), c.dtype);
    const bool through_view = call == 2;
    LengthView view(model, T);
    Model& target = through_view ? static_cast<Model&>(view) : *model;
    if (through_view) {
      EXPECT_EQ(view.spec().seq_len, T) << "LengthView's spec";
    }
    Tensor y;
    try {
      y = target.forward(x.to(c.dtype));
    } catch (const Error& e) {
      FAIL() << "forward with T = " << T << " threw: " << e.what();
    }
    const Tensor y_ref = ref->forward(x);
    ASSERT_EQ(y.shape(), y_ref.shape()) << "forward with T = " << T;
    const Difference d = difference(y, y_ref);
    note("forward_T" + std::to_string(T), d.error);
    EXPECT_LE(d.error, tol) << "forward with T = " << T << ": " << d.text();
    const Tensor g = rounded(normal_tensor(y_ref.shape(), rng.fork("grad_output"), 1.0), c.dtype);
    const Tensor dx = target.backward(x.to(c.dtype), g.to(c.dtype));
    const Tensor dx_ref = ref->backward(x, g);
    ASSERT_EQ(dx.shape(), x.shape()) << "backward with T = " << T;
    const Difference db = difference(dx, dx_ref);
    note("backward_T" + std::to_string(T), db.error);
    EXPECT_LE(db.error, tol) << "backward with T = " << T << ": " << db.text();
  }
}

INSTANTIATE_TEST_SUITE_P(Conformance, VariableLength, testing::ValuesIn(all_cases(false)), case_name);

// ---- errors, per backend --------------------------------------------------------------------------------------------

class BackendErrors : public testing::TestWithParam<std::string> {
 protected:
  // A case the backend builds (tiny GPT-2, blocks 1, lm_head, preferred), in its first dtype, on the cpu when it
  // lists it.
  const ModelCase& supported_case(const BackendInfo& info) const {
    auto builds = [&](const ModelCase& m) {
      return contains(info.kinds, m.spec.kind) && missing_features(m.spec, info).empty();
    };
    if (builds(model_case("gpt2_k1_lm_head_embedding"))) return model_case("gpt2_k1_lm_head_embedding");
    for (const ModelCase& m : model_cases())
      if (builds(m)) return m;
    throw Error("backend '" + GetParam() +
                "' builds none of the cases this suite tests (it lists kinds: " + join(kind_list(info.kinds)) + ")");
  }
  ModelSpec supported_spec(const BackendInfo& info) const {
    ModelSpec s = supported_case(info).spec;
    s.dtype = info.dtypes.empty() ? DType::f32 : info.dtypes.front();
    s.device = contains(info.devices, std::string("cpu")) || info.devices.empty() ? "cpu" : info.devices.front();
    return s;
  }

  // Expects create_model(spec) to throw an lminv::Error whose message contains `needle`.
  void expect_refused(Backend& b, const ModelCase& m, const ModelSpec& spec, const std::string& needle,
                      const std::string& what) {
    try {
      b.create_model(spec, weights_for(m));
      ADD_FAILURE() << "create_model accepted " << what << " (backend '" << GetParam() << "')";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << "the error for " << what << " does not name '" << needle << "': " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "create_model threw a " << typeid(e).name() << ", not an lminv::Error, for " << what << ": "
                    << e.what();
    }
  }
};

std::vector<std::string> backends_that_load() {
  std::vector<std::string> out;
  for (const std::string& name : backends_under_test()) {
    try {
      backend(name);
      out.push_back(name);
    } catch (const std::exception&) {  // reported by Conformance/BackendCase.MatchesTheReference/<name>_not_loaded
    }
  }
  return out;
}

std::string backend_name(const testing::TestParamInfo<std::string>& info) {
  return sanitize(info.param);
}

TEST_P(BackendErrors, UnsupportedDtypeIsAnErrorNamingIt) {
  const std::shared_ptr<Backend> b = backend(GetParam());
  const BackendInfo info = b->info();
  const ModelCase& m = supported_case(info);
  const ModelSpec base = supported_spec(info);
  int checked = 0;
  for (DType dtype : {DType::f64, DType::f32, DType::bf16}) {
    if (contains(info.dtypes, dtype)) continue;
    ModelSpec s = base;
    s.dtype = dtype;
    expect_refused(*b, m, s, dtype_name(dtype), std::string("dtype ") + dtype_name(dtype));
    ++checked;
  }
  if (checked == 0)
    GTEST_SKIP() << "backend '" << GetParam() << "' lists every dtype (" << dtype_list(info.dtypes)
                 << "): no unsupported dtype to try";
}

TEST_P(BackendErrors, UnknownDeviceIsAnErrorNamingIt) {
  const std::shared_ptr<Backend> b = backend(GetParam());
  const BackendInfo info = b->info();
  ModelSpec s = supported_spec(info);
  s.device = "tpu";
  expect_refused(*b, supported_case(info), s, "tpu", "device tpu");
}

// Each decoder setting that needs a feature the backend does not list is refused with an error naming the feature.
TEST_P(BackendErrors, UnlistedFeatureIsAnErrorNamingIt) {
  const std::shared_ptr<Backend> b = backend(GetParam());
  const BackendInfo info = b->info();
  if (!contains(info.kinds, ModelKind::decoder)) GTEST_SKIP() << "backend '" << GetParam() << "' builds no decoder";
  std::vector<std::string> tried;
  for (const ModelCase& m : model_cases()) {
    if (m.spec.kind != ModelKind::decoder) continue;
    const std::vector<std::string> missing = missing_features(m.spec, info);
    if (missing.empty()) continue;
    ModelSpec s = m.spec;
    s.dtype = info.dtypes.front();
    s.device = info.devices.front();
    expect_refused(*b, m, s, missing.front(),
                   "case " + m.name + ", which needs the unlisted feature " + missing.front());
    tried.push_back(m.name);
  }
  if (tried.empty()) GTEST_SKIP() << "backend '" << GetParam() << "' lists every feature these cases need";
  std::cout << "[ refused  ] backend '" << GetParam() << "' refused, naming the feature: " << join(tried) << "\n";
}

TEST_P(BackendErrors, WrongInputShapeIsAnErrorNamingIt) {
  const std::shared_ptr<Backend> b = backend(GetParam());
  const BackendInfo info = b->info();
  const ModelSpec s = supported_spec(info);
  std::string why;
  if (s.device == "cuda" && !cuda_device_present(why)) GTEST_SKIP() << "only cuda is listed, but " << why;
  std::unique_ptr<Model> model = b->create_model(s, weights_for(supported_case(info)));
  const Shape good = input_shape(s, 1);
  // A decoder takes any length up to n_positions: a wrong length is one beyond it (or none at all).
  std::vector<Shape> wrong{{1, good[1], good[2] + 1}, {good[1], good[2]}};
  if (s.any_length()) {
    wrong.push_back({1, s.n_positions + 1, good[2]});
    wrong.push_back({1, 0, good[2]});
  } else {
    wrong.push_back({1, good[1] + 1, good[2]});
  }
  for (const Shape& shape : wrong) {
    const Tensor x(s.dtype, shape);
    try {
      model->forward(x);
      ADD_FAILURE() << "forward accepted an input of shape " << shape_string(shape) << " (expected "
                    << shape_string(good) << ")";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(shape_string(shape)), std::string::npos)
          << "the error for input shape " << shape_string(shape) << " does not name it: " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "forward threw a " << typeid(e).name() << ", not an lminv::Error, for input shape "
                    << shape_string(shape) << ": " << e.what();
    }
  }
}

GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(BackendErrors);
INSTANTIATE_TEST_SUITE_P(Conformance, BackendErrors, testing::ValuesIn(backends_that_load()), backend_name);

// ---- the truth itself: the reference in f64 against central finite differences --------------------------------------

// Every input element of one item: the gradients of <g, forward(x)> and of each metric's loss against central
// differences, all 2n perturbed inputs of a function run as one batch.
class FiniteDifferences : public testing::TestWithParam<std::string> {};

TEST_P(FiniteDifferences, Match) {
  const std::string case_name = GetParam();
  const ModelCase& m = model_case(case_name);
  ModelSpec spec = m.spec;
  spec.dtype = DType::f64;
  spec.device = "cpu";
  std::unique_ptr<Model> ref = backend("reference")->create_model(spec, weights_for(m));
  const Rng rng = Rng(kSeed).fork("finite differences " + case_name);
  const Tensor x = normal_tensor(input_shape(spec, 1), rng.fork("input"), input_std(spec));
  const std::int64_t n = x.numel();
  const double h = 1e-5;

  // x + h e_i and x - h e_i for every i, as one batch of 2n
  Tensor perturbed(DType::f64, input_shape(spec, 2 * n));
  for (std::int64_t i = 0; i < n; ++i)
    for (int side = 0; side < 2; ++side) {
      const std::int64_t item = 2 * i + side;
      for (std::int64_t j = 0; j < n; ++j) perturbed.set(item * n + j, x.get(j));
      perturbed.set(item * n + i, x.get(i) + (side == 0 ? h : -h));
    }

  auto check = [&](const std::string& what, const Tensor& analytic, const std::function<double(std::int64_t)>& f) {
    Tensor fd(DType::f64, x.shape());
    for (std::int64_t i = 0; i < n; ++i) fd.set(i, (f(2 * i) - f(2 * i + 1)) / (2 * h));
    const Difference d = difference(analytic, fd);
    if (verbose()) std::cout << "[  errors  ] " << case_name << " " << what << " " << d.error << "\n";
    EXPECT_LT(d.error, 1e-6) << case_name << ", " << what
                             << ": analytic gradient against central differences: " << d.text();
  };

  const Tensor y = ref->forward(x);
  const Tensor g = normal_tensor(y.shape(), rng.fork("grad_output"), 1.0);
  const Tensor dx = ref->backward(x, g);
  const Tensor ys = ref->forward(perturbed);
  const std::int64_t m_out = y.numel();
  check("backward", dx, [&](std::int64_t item) {
    double s = 0;
    for (std::int64_t j = 0; j < m_out; ++j) s += g.get(j) * ys.get(item * m_out + j);
    return s;
  });

  const Tensor target = far_target(y, rng.fork("target"), false);
  for (Metric metric : {Metric::l1, Metric::l2, Metric::cosine}) {
    const LossAndGrad lg = ref->loss_and_grad(x, target, metric);
    const std::vector<double> losses = distances(ys, target, metric);
    check(std::string("loss_and_grad ") + metric_name(metric), lg.grad,
          [&](std::int64_t item) { return losses[static_cast<std::size_t>(item)]; });
  }
}

std::string plain_name(const testing::TestParamInfo<std::string>& info) {
  return sanitize(info.param);
}

INSTANTIATE_TEST_SUITE_P(ConformanceReference, FiniteDifferences,
                         testing::Values("gpt2_k3_lm_head_vocab", "llama_k3_lm_head_vocab", "qwen2_k3_lm_head_vocab",
                                         "mistral_k2_none_layers1_3_embedding", "gpt_neox_k3_lm_head_vocab",
                                         "partial_rotary_k3_lm_head_embedding", "fcnet_vocab"),
                         plain_name);

}  // namespace
