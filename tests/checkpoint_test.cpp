// Hugging Face GPT-2 folders: save -> load identity, prefixes, tied lm_head, mask buffers, shards, and every way a
// folder can be wrong, each an error naming the file and the problem.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "lminv/error.hpp"
#include "lminv/rng.hpp"
#include "lminv/schema.hpp"
#include "safetensors.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lminv-checkpoint-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

std::string slurp(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void spit(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << text;
}

ModelSpec tiny_spec(std::int64_t n_inner = 0) {
  ModelSpec spec;
  spec.family = "gpt2";
  spec.n_layer = 2;
  spec.n_embd = 8;
  spec.n_head = 2;
  spec.n_inner = n_inner;
  spec.vocab_size = 11;
  spec.n_positions = 7;
  spec.arch.norm_eps = 1e-5;
  return spec;
}

// The canonical names and shapes, written out here independently of weight_schema.
std::map<std::string, Shape> canonical_shapes(const ModelSpec& s) {
  const std::int64_t d = s.n_embd, inner = s.n_inner ? s.n_inner : 4 * d;
  std::map<std::string, Shape> out{{"wte.weight", {s.vocab_size, d}},
                                   {"wpe.weight", {s.n_positions, d}},
                                   {"ln_f.weight", {d}},
                                   {"ln_f.bias", {d}}};
  for (std::int64_t i = 0; i < s.n_layer; ++i) {
    const std::string h = "h." + std::to_string(i);
    out[h + ".ln_1.weight"] = {d};
    out[h + ".ln_1.bias"] = {d};
    out[h + ".attn.c_attn.weight"] = {d, 3 * d};
    out[h + ".attn.c_attn.bias"] = {3 * d};
    out[h + ".attn.c_proj.weight"] = {d, d};
    out[h + ".attn.c_proj.bias"] = {d};
    out[h + ".ln_2.weight"] = {d};
    out[h + ".ln_2.bias"] = {d};
    out[h + ".mlp.c_fc.weight"] = {d, inner};
    out[h + ".mlp.c_fc.bias"] = {inner};
    out[h + ".mlp.c_proj.weight"] = {inner, d};
    out[h + ".mlp.c_proj.bias"] = {d};
  }
  return out;
}

WeightSet random_gpt2(const ModelSpec& spec, DType dtype = DType::f32, std::uint64_t seed = 0) {
  WeightSet w;
  const Rng root(seed);
  for (const auto& [name, shape] : canonical_shapes(spec)) {
    Rng rng = root.fork(name);
    Tensor t(dtype, shape);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, 0.02 * rng.normal());
    w.set(name, std::move(t));
  }
  return w;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void expect_same_weights(const WeightSet& a, const WeightSet& b) {
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& name : a.names()) EXPECT_TRUE(same_bytes(a.get(name), b.get(name))) << name;
}

void expect_same_sizes(const ModelSpec& a, const ModelSpec& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.n_layer, b.n_layer);
  EXPECT_EQ(a.n_embd, b.n_embd);
  EXPECT_EQ(a.n_head, b.n_head);
  EXPECT_EQ(a.n_inner, b.n_inner);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.n_positions, b.n_positions);
  EXPECT_EQ(a.arch.norm_eps, b.arch.norm_eps);
}

// The call throws an lminv::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& call, std::initializer_list<std::string> parts) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one mentioning '" << *parts.begin() << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
  }
}

// A saved tiny checkpoint whose files a test then edits.
struct Folder {
  TempDir dir;
  ModelSpec spec = tiny_spec();
  WeightSet weights = random_gpt2(spec);
  fs::path path = dir / "gpt2-tiny";
  fs::path config = path / "config.json";
  fs::path model = path / "model.safetensors";

  Folder() { save_checkpoint(path, spec, weights); }

  // The stored tensors (names as in the file) and metadata.
  std::map<std::string, Tensor> stored() const {
    const WeightSet all = read_safetensors(model);
    return all.tensors();
  }
  void store(const std::map<std::string, Tensor>& tensors) const { write_safetensors(model, tensors, {{"format", "pt"}}); }
  json config_json() const { return json::parse(slurp(config)); }
  void set_config(const json& j) const { spit(config, j.dump(2)); }
  Checkpoint load() const { return load_checkpoint(path); }
};

// ---- names ---------------------------------------------------------------------------------------------------

std::map<std::string, Shape> schema_map(const ModelSpec& spec) {
  std::map<std::string, Shape> out;
  for (const TensorSpec& t : weight_schema(spec)) out[t.name] = t.shape;
  return out;
}

TEST(Checkpoint, CanonicalShapes) {
  EXPECT_EQ(schema_map(tiny_spec()), canonical_shapes(tiny_spec()));
  EXPECT_EQ(schema_map(tiny_spec(12)), canonical_shapes(tiny_spec(12)));
  ModelSpec small;  // GPT-2 small: 124,439,808 parameters
  std::int64_t params = 0;
  for (const auto& entry : schema_map(small)) params += shape_numel(entry.second);
  EXPECT_EQ(params, 124439808);
  EXPECT_EQ(schema_map(small).size(), 4u + 12u * 12u);
}

// ---- save -> load ----------------------------------------------------------------------------------------------

TEST(Checkpoint, SaveThenLoadIsIdentical) {
  Folder f;
  const Checkpoint c = f.load();
  expect_same_sizes(c.spec, f.spec);
  EXPECT_EQ(c.folder, f.path);
  expect_same_weights(c.weights, f.weights);

  // The folder holds exactly the two files, no temporary ones.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(f.path)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"config.json", "model.safetensors"}));
}

TEST(Checkpoint, SavedFilesAreWhatTransformersWrites) {
  Folder f;
  std::map<std::string, std::string> metadata;
  const WeightSet stored = read_safetensors(f.model, &metadata);
  EXPECT_EQ(metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  for (const std::string& name : stored.names()) EXPECT_EQ(name.rfind("transformer.", 0), 0u) << name;
  EXPECT_FALSE(stored.contains("lm_head.weight"));
  EXPECT_TRUE(same_bytes(stored.get("transformer.h.1.attn.c_attn.weight"), f.weights.get("h.1.attn.c_attn.weight")));
  EXPECT_EQ(stored.names().size(), f.weights.names().size());

  const json config = f.config_json();
  EXPECT_EQ(config["model_type"], "gpt2");
  EXPECT_EQ(config["architectures"], json::array({"GPT2LMHeadModel"}));
  EXPECT_EQ(config["activation_function"], "gelu_new");
  EXPECT_EQ(config["n_layer"], 2);
  EXPECT_EQ(config["n_embd"], 8);
  EXPECT_EQ(config["n_head"], 2);
  EXPECT_TRUE(config["n_inner"].is_null());
  EXPECT_EQ(config["vocab_size"], 11);
  EXPECT_EQ(config["n_positions"], 7);
  EXPECT_EQ(config["layer_norm_epsilon"], 1e-5);
  EXPECT_EQ(config["tie_word_embeddings"], true);
  EXPECT_EQ(config["torch_dtype"], "float32");
  EXPECT_EQ(config["bos_token_id"], 10);
  EXPECT_EQ(config["eos_token_id"], 10);
}

TEST(Checkpoint, RoundTripOtherDtypesAndExplicitInner) {
  for (DType dtype : {DType::f64, DType::bf16}) {
    TempDir dir;
    ModelSpec spec = tiny_spec(12);
    spec.n_layer = 3;
    spec.arch.norm_eps = 1.25e-6;
    const WeightSet w = random_gpt2(spec, dtype, 9);
    save_checkpoint(dir / "m", spec, w);
    const Checkpoint c = load_checkpoint(dir / "m");
    expect_same_sizes(c.spec, spec);
    expect_same_weights(c.weights, w);
    EXPECT_EQ(json::parse(slurp(dir / "m" / "config.json"))["n_inner"], 12);
    EXPECT_EQ(json::parse(slurp(dir / "m" / "config.json"))["torch_dtype"],
              dtype == DType::f64 ? "float64" : "bfloat16");
  }
}

TEST(Checkpoint, SaveReplacesAnEarlierCheckpoint) {
  Folder f;
  const WeightSet other = random_gpt2(f.spec, DType::f32, 77);
  save_checkpoint(f.path, f.spec, other);
  expect_same_weights(f.load().weights, other);
}

TEST(Checkpoint, SeededInitFollowsTheCanonicalNamesAndRoundTrips) {
  for (DType dtype : {DType::f32, DType::f64, DType::bf16}) {
    ModelSpec spec = tiny_spec();
    spec.dtype = dtype;
    const WeightSet w = init_random_weights(spec, 3);
    std::map<std::string, Shape> shapes;
    for (const auto& [name, t] : w.tensors()) shapes[name] = t.shape();
    EXPECT_EQ(shapes, canonical_shapes(spec));
    TempDir dir;
    save_checkpoint(dir / "m", spec, w);
    expect_same_weights(load_checkpoint(dir / "m").weights, w);
  }
}

TEST(Checkpoint, ZeroBlocksRoundTrip) {
  ModelSpec spec = tiny_spec();
  spec.n_layer = 0;
  const WeightSet w = random_gpt2(spec);
  EXPECT_EQ(w.names().size(), 4u);
  TempDir dir;
  save_checkpoint(dir / "m", spec, w);
  const Checkpoint c = load_checkpoint(dir / "m");
  EXPECT_EQ(c.spec.n_layer, 0);
  expect_same_weights(c.weights, w);
}

// ---- what loading accepts --------------------------------------------------------------------------------------

TEST(Checkpoint, LoadsNamesWithoutThePrefix) {
  Folder f;
  f.store(f.weights.tensors());  // canonical names, as the hub's gpt2/model.safetensors has them
  expect_same_weights(f.load().weights, f.weights);
}

TEST(Checkpoint, IgnoresTheCausalMaskBuffers) {
  Folder f;
  auto t = f.stored();
  t.emplace("transformer.h.0.attn.bias", Tensor(DType::f32, {1, 1, 7, 7}));
  t.emplace("h.1.attn.bias", Tensor(DType::f32, {1, 1, 7, 7}));
  t.emplace("transformer.h.1.attn.masked_bias", Tensor::from<float>({}, {-1e4f}));
  f.store(t);
  const Checkpoint c = f.load();
  expect_same_weights(c.weights, f.weights);
  EXPECT_FALSE(c.weights.contains("h.0.attn.bias"));
}

TEST(Checkpoint, TiedLmHeadIsAcceptedAndAnUntiedOneRefused) {
  Folder f;
  auto t = f.stored();
  t.emplace("lm_head.weight", f.weights.get("wte.weight"));
  f.store(t);
  expect_same_weights(f.load().weights, f.weights);

  Tensor changed = f.weights.get("wte.weight");
  changed.set(17, changed.get(17) + 1e-3);
  t["lm_head.weight"] = changed;
  f.store(t);
  expect_error([&] { f.load(); }, {f.model.string(), "lm_head.weight", "differs from 'transformer.wte.weight'", "tie"});

  t["lm_head.weight"] = Tensor(DType::f32, {11, 9});
  f.store(t);
  expect_error([&] { f.load(); }, {f.model.string(), "lm_head.weight (F32 [11, 9]) differs"});

  // Same values in another dtype are still tied.
  t["lm_head.weight"] = f.weights.get("wte.weight").to(DType::f64);
  f.store(t);
  EXPECT_NO_THROW(f.load());
}

TEST(Checkpoint, UntiedConfigNeedsAnEqualLmHead) {
  Folder f;
  json config = f.config_json();
  config["tie_word_embeddings"] = false;
  f.set_config(config);
  expect_error([&] { f.load(); }, {f.config.string(), "tie_word_embeddings is false", "no lm_head.weight"});
  auto t = f.stored();
  t.emplace("lm_head.weight", f.weights.get("wte.weight"));
  f.store(t);
  EXPECT_NO_THROW(f.load());
}

TEST(Checkpoint, AbsentConfigFieldsTakeGpt2ConfigDefaults) {
  Folder f;
  json config = f.config_json();
  config.erase("layer_norm_epsilon");
  config.erase("activation_function");
  config.erase("n_inner");
  f.set_config(config);
  const Checkpoint c = f.load();
  EXPECT_EQ(c.spec.arch.norm_eps, 1e-5);
  EXPECT_EQ(c.spec.n_inner, 0);
  // model_type picks the family: without it there is nothing to go by.
  config.erase("model_type");
  f.set_config(config);
  expect_error([&] { f.load(); }, {f.config.string(), "has no model_type", "gpt2, llama"});
}

TEST(Checkpoint, LoadsShardedCheckpoints) {
  Folder f;
  std::map<std::string, Tensor> first, second;
  json index = {{"metadata", {{"total_size", f.weights.nbytes()}}}, {"weight_map", json::object()}};
  for (const auto& [name, tensor] : f.stored()) {
    const bool one = name.find(".h.1.") == std::string::npos;
    (one ? first : second).emplace(name, tensor);
    index["weight_map"][name] = one ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(f.path / "model-00001-of-00002.safetensors", first, {{"format", "pt"}});
  write_safetensors(f.path / "model-00002-of-00002.safetensors", second, {{"format", "pt"}});
  spit(f.path / "model.safetensors.index.json", index.dump(2));
  fs::remove(f.model);
  expect_same_weights(f.load().weights, f.weights);

  index["weight_map"]["transformer.ln_f.bias"] = "model-00002-of-00002.safetensors";
  spit(f.path / "model.safetensors.index.json", index.dump(2));
  expect_error([&] { f.load(); },
               {(f.path / "model-00002-of-00002.safetensors").string(), "no tensor 'transformer.ln_f.bias'"});
  index["weight_map"]["transformer.ln_f.bias"] = "../elsewhere.safetensors";
  spit(f.path / "model.safetensors.index.json", index.dump(2));
  expect_error([&] { f.load(); }, {"model.safetensors.index.json", "not a file in the folder"});
}

// ---- what loading refuses --------------------------------------------------------------------------------------

TEST(Checkpoint, MissingTensorIsNamed) {
  Folder f;
  auto t = f.stored();
  t.erase("transformer.h.1.mlp.c_fc.bias");
  f.store(t);
  expect_error([&] { f.load(); }, {f.model.string(), "missing 1 gpt2 tensor", "'transformer.h.1.mlp.c_fc.bias'"});
}

TEST(Checkpoint, MisshapedTensorIsNamedWithBothShapes) {
  Folder f;
  auto t = f.stored();
  t["transformer.ln_f.bias"] = Tensor(DType::f32, {9});
  f.store(t);
  expect_error([&] { f.load(); },
               {f.model.string(), "tensor 'transformer.ln_f.bias' has shape [9], expected [8]"});
  // A transposed Conv1D weight (nn.Linear's [out, in]) is refused too.
  t = f.stored();
  t["transformer.h.0.attn.c_attn.weight"] = Tensor(DType::f32, {24, 8});
  f.store(t);
  expect_error([&] { f.load(); }, {"'transformer.h.0.attn.c_attn.weight' has shape [24, 8], expected [8, 24]"});
}

TEST(Checkpoint, ExtraTensorsAreNamed) {
  Folder f;
  auto t = f.stored();
  t.emplace("transformer.h.0.attn.rotary.weight", Tensor(DType::f32, {4}));
  t.emplace("score.weight", Tensor(DType::f32, {2, 8}));
  f.store(t);
  expect_error([&] { f.load(); },
               {f.model.string(), "unknown tensors", "'score.weight'", "'transformer.h.0.attn.rotary.weight'"});
}

TEST(Checkpoint, BothPrefixedAndPlainNamesAreRefused) {
  Folder f;
  auto t = f.stored();
  t.emplace("wpe.weight", f.weights.get("wpe.weight"));
  f.store(t);
  expect_error([&] { f.load(); }, {f.model.string(), "holds both", "'wpe.weight'", "'transformer.wpe.weight'"});
}

TEST(Checkpoint, ConfigDisagreeingWithTheTensorsNamesTheField) {
  struct Case {
    const char* field;
    json value;
    std::vector<std::string> message;
  };
  const std::vector<Case> cases = {
      {"n_embd", 16, {"n_embd = 16", "'transformer.wte.weight' of shape [11, 8]"}},
      {"vocab_size", 12, {"vocab_size = 12", "'transformer.wte.weight' of shape [11, 8]"}},
      {"n_positions", 1024, {"n_positions = 1024", "'transformer.wpe.weight' of shape [7, 8]"}},
      {"n_layer", 3, {"n_layer = 3", "has blocks h.0 .. h.1"}},
      {"n_layer", 1, {"n_layer = 1", "has blocks h.0 .. h.1"}},
      {"n_layer", 0, {"n_layer = 0", "has blocks h.0 .. h.1"}},
      {"n_inner", 16, {"n_inner = 16", "'transformer.h.0.mlp.c_fc.weight' of shape [8, 32]"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.field) + " = " + c.value.dump());
    Folder f;
    json config = f.config_json();
    config[c.field] = c.value;
    f.set_config(config);
    try {
      f.load();
      ADD_FAILURE() << "loaded";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(f.config.string() + ": ", 0), 0u) << message;
      for (const std::string& part : c.message) EXPECT_NE(message.find(part), std::string::npos) << message;
    }
  }
}

TEST(Checkpoint, BadConfigValuesNameTheField) {
  struct Case {
    const char* field;
    json value;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"n_layer", "12", "n_layer is \"12\", not a non-negative integer"},
      {"n_layer", -1, "n_layer is -1, not a non-negative integer"},
      {"n_embd", 8.5, "n_embd is 8.5, not a positive integer"},
      {"n_head", 0, "n_head is 0, not a positive integer"},
      {"n_head", 3, "n_head = 3 does not divide n_embd = 8"},
      {"layer_norm_epsilon", "small", "layer_norm_epsilon is \"small\", not a positive number"},
      {"model_type", "bert", "model_type is 'bert'"},
      {"activation_function", "relu", "activation_function is 'relu'"},
      {"scale_attn_weights", false, "scale_attn_weights is false"},
      {"scale_attn_by_inverse_layer_idx", true, "scale_attn_by_inverse_layer_idx is true"},
      {"tie_word_embeddings", "yes", "tie_word_embeddings is \"yes\", not true or false"},
      // Sizes past lminv's ceilings: 4 * n_embd overflowed (a UBSan report), a huge n_layer hung building the names.
      {"n_embd", std::int64_t{1} << 62, "n_embd is 4611686018427387904, beyond lminv's limit of 131072"},
      {"n_layer", 100000000, "n_layer is 100000000, beyond lminv's limit of 4096"},
      {"vocab_size", std::int64_t{1} << 40, "vocab_size is 1099511627776, beyond lminv's limit of 16777216"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    Folder f;
    json config = f.config_json();
    config[c.field] = c.value;
    f.set_config(config);
    expect_error([&] { f.load(); }, {f.config.string() + ": ", c.message});
  }
}

TEST(Checkpoint, BadJsonInConfigIsNamed) {
  Folder f;
  spit(f.config, "{\"n_layer\": 2,");
  expect_error([&] { f.load(); }, {f.config.string(), "not valid JSON"});
  spit(f.config, "[2, 8]");
  expect_error([&] { f.load(); }, {f.config.string(), "a JSON array, not an object"});
}

// A value nested 200000 levels deep overflowed the stack while the message quoting it was built (host/json_depth.hpp):
// refused when it is parsed instead.
TEST(Checkpoint, DeeplyNestedConfigIsRefused) {
  Folder f;
  const std::size_t depth = 200000;
  spit(f.config, "{\"model_type\": \"gpt2\", \"n_layer\": " + std::string(depth, '[') + std::string(depth, ']') + "}");
  expect_error([&] { f.load(); }, {f.config.string(), "nested more than 64 levels deep"});
}

TEST(Checkpoint, MissingFilesAreNamed) {
  {
    Folder f;
    fs::remove(f.config);
    expect_error([&] { f.load(); }, {f.config.string(), "missing"});
  }
  {
    Folder f;
    fs::remove(f.model);
    expect_error([&] { f.load(); }, {f.model.string(), "missing"});
    spit(f.path / "pytorch_model.bin", "not really a pickle");
    expect_error([&] { f.load(); }, {f.model.string(), "missing", "pytorch_model.bin", "does not read"});
  }
  {
    TempDir dir;
    expect_error([&] { load_checkpoint(dir / "nowhere"); }, {(dir / "nowhere").string(), "not a folder"});
  }
}

TEST(Checkpoint, BadSafetensorsFileIsNamed) {
  Folder f;
  spit(f.model, "tiny");
  expect_error([&] { f.load(); }, {f.model.string(), "shorter than the 8-byte"});
}

// ---- what saving refuses ---------------------------------------------------------------------------------------

TEST(Checkpoint, SaveRefusesWeightsThatAreNotTheSpecsGpt2) {
  TempDir dir;
  const ModelSpec spec = tiny_spec();
  const fs::path out = dir / "out";
  auto expect_nothing_written = [&] { EXPECT_FALSE(fs::exists(out)); };

  WeightSet missing;
  const WeightSet full = random_gpt2(spec);
  for (const auto& [name, t] : full.tensors())
    if (name != "h.0.ln_2.bias") missing.set(name, t);
  expect_error([&] { save_checkpoint(out, spec, missing); }, {out.string(), "lack 'h.0.ln_2.bias'"});
  expect_nothing_written();

  WeightSet extra = random_gpt2(spec);
  extra.set("lm_head.weight", extra.get("wte.weight"));
  expect_error([&] { save_checkpoint(out, spec, extra); }, {out.string(), "unknown tensors 'lm_head.weight'"});
  expect_nothing_written();

  WeightSet misshaped = random_gpt2(spec);
  misshaped.set("wpe.weight", Tensor(DType::f32, {8, 8}));
  expect_error([&] { save_checkpoint(out, spec, misshaped); },
               {out.string(), "'wpe.weight' has shape [8, 8], expected [7, 8]"});
  expect_nothing_written();

  ModelSpec mlp = spec;
  mlp.family = "transformer_mlp";
  expect_error([&] { save_checkpoint(out, mlp, random_gpt2(spec)); }, {"family is 'transformer_mlp'"});
  ModelSpec heads = spec;
  heads.n_head = 3;
  expect_error([&] { save_checkpoint(out, heads, random_gpt2(spec)); }, {"n_embd divisible by n_head", "n_head 3"});
  expect_nothing_written();
}

}  // namespace
}  // namespace lminv
