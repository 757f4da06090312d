// The family adapters (host/families/): config.json -> spec, canonical <-> Hugging Face tensors (checked element by
// element against the layouts written out here), save -> load identity, shards, f16/bf16, random init per family,
// and the errors for malformed folders.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "families/family.hpp"
#include "lminv/error.hpp"
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
    std::string pattern = (fs::temp_directory_path() / "lminv-families-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
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
void spit(const fs::path& file, const std::string& text) { std::ofstream(file, std::ios::binary) << text; }

void expect_error(const std::function<void()>& call, std::initializer_list<std::string> parts) {
  try {
    call();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
  }
}

// A small model of each family with its own architecture (grouped kv heads where the family has them).
ModelSpec small(const std::string& name) {
  ModelSpec s;
  s.family = name;
  family(name).set_architecture(s);
  s.n_layer = 2;
  s.n_embd = 16;
  s.n_head = 4;
  s.n_inner = 24;
  s.vocab_size = 19;
  s.n_positions = 12;
  s.dtype = DType::f32;
  if (name == "llama" || name == "mistral") s.arch.n_kv_head = 2;
  if (name == "gpt2") s.n_inner = 0;
  if (name == "gpt_neox") {  // head_dim 16, so that rotary_pct 0.25 rotates 4 features
    s.n_embd = 32;
    s.n_head = 2;
  }
  return s;
}

const std::vector<std::string> kFamilies = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox"};

double at(const Tensor& t, std::int64_t r, std::int64_t c) { return t.get(r * t.dim(1) + c); }

TEST(Families, NamesAndKinds) {
  for (const std::string& n : kFamilies) {
    EXPECT_EQ(family(n).name(), n);
    EXPECT_EQ(family(n).kind(), ModelKind::decoder);
    EXPECT_TRUE(family(n).has_checkpoints());
  }
  EXPECT_EQ(family("fcnet").kind(), ModelKind::fcnet);
  EXPECT_FALSE(family("transformer_mlp").has_checkpoints());
  expect_error([] { family("bert"); }, {"unknown model family 'bert'", "gpt2", "gpt_neox"});
}

TEST(Families, ArchitecturesOfEachFamily) {
  const ModelSpec llama = small("llama"), qwen = small("qwen2"), neox = small("gpt_neox"), gpt2 = small("gpt2");
  EXPECT_EQ(llama.arch.norm, Norm::rms_norm);
  EXPECT_EQ(llama.arch.mlp, Mlp::swiglu);
  EXPECT_FALSE(llama.arch.qkv_bias);
  EXPECT_FALSE(llama.arch.tied_head);
  EXPECT_TRUE(qwen.arch.qkv_bias);
  EXPECT_FALSE(qwen.arch.attn_out_bias);
  EXPECT_EQ(neox.arch.residual, Residual::parallel);
  EXPECT_EQ(neox.arch.mlp, Mlp::gelu_erf);
  EXPECT_EQ(neox.arch.positions, Positions::rotary);
  EXPECT_EQ(neox.rotary_dim(), 4);  // a quarter of head_dim 16
  EXPECT_EQ(gpt2.arch.positions, Positions::learned);
  EXPECT_TRUE(gpt2.arch.tied_head);
}

// Every family: random weights -> save -> load gives the same bytes and spec; the stored layout is Hugging Face's.
TEST(Families, SaveLoadRoundTripIsIdentity) {
  for (const std::string& n : kFamilies) {
    SCOPED_TRACE(n);
    TempDir dir;
    const ModelSpec spec = small(n);
    const WeightSet w = init_random_weights(spec, 7);
    check_weights(weight_schema(spec), w, "init", /*exact=*/true);
    save_checkpoint(dir / n, spec, w);
    const Checkpoint c = load_checkpoint(dir / n);
    EXPECT_EQ(c.spec.family, n);
    EXPECT_EQ(c.spec.n_layer, spec.n_layer);
    EXPECT_EQ(c.spec.n_embd, spec.n_embd);
    EXPECT_EQ(c.spec.inner(), spec.inner());
    EXPECT_EQ(c.spec.kv_heads(), spec.kv_heads());
    EXPECT_EQ(c.spec.head_size(), spec.head_size());
    EXPECT_EQ(c.spec.rotary_dim(), spec.rotary_dim());
    EXPECT_EQ(c.spec.arch.norm, spec.arch.norm);
    EXPECT_EQ(c.spec.arch.mlp, spec.arch.mlp);
    EXPECT_EQ(c.spec.arch.residual, spec.arch.residual);
    EXPECT_EQ(c.spec.arch.tied_head, spec.arch.tied_head);
    EXPECT_EQ(c.spec.arch.qkv_bias, spec.arch.qkv_bias);
    EXPECT_EQ(c.spec.arch.attn_out_bias, spec.arch.attn_out_bias);
    EXPECT_EQ(c.spec.arch.norm_eps, spec.arch.norm_eps);
    EXPECT_EQ(c.spec.arch.rope_theta, spec.arch.rope_theta);
    ASSERT_EQ(c.weights.names(), w.names());
    for (const std::string& name : w.names()) {
      const Tensor& a = w.get(name);
      const Tensor& b = c.weights.get(name);
      ASSERT_EQ(a.shape(), b.shape()) << name;
      EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << name;
    }
    // Saving the loaded weights again writes the same tensor file.
    save_checkpoint(dir / (n + "-again"), c.spec, c.weights);
    EXPECT_EQ(slurp(dir / n / "model.safetensors"), slurp(dir / (n + "-again") / "model.safetensors"));
  }
}

// The Llama layout written out independently: q/k/v_proj [out, in] are c_attn's column blocks transposed, gate and up
// are c_fc's halves, o_proj and down_proj are transposed, the head is lm_head.weight as it is.
TEST(Families, LlamaLayoutIsHuggingFaces) {
  TempDir dir;
  const ModelSpec s = small("llama");
  const WeightSet w = init_random_weights(s, 3);
  save_checkpoint(dir / "m", s, w);
  const WeightSet hf = read_safetensors(dir / "m" / "model.safetensors");
  const std::int64_t d = s.n_embd, hd = s.head_size(), q = s.n_head * hd, kv = s.kv_heads() * hd, inner = s.inner();
  const Tensor& c_attn = w.get("h.1.attn.c_attn.weight");
  const Tensor& qp = hf.get("model.layers.1.self_attn.q_proj.weight", {q, d});
  const Tensor& kp = hf.get("model.layers.1.self_attn.k_proj.weight", {kv, d});
  const Tensor& vp = hf.get("model.layers.1.self_attn.v_proj.weight", {kv, d});
  for (std::int64_t i = 0; i < d; ++i) {
    for (std::int64_t o = 0; o < q; ++o) EXPECT_EQ(at(qp, o, i), at(c_attn, i, o));
    for (std::int64_t o = 0; o < kv; ++o) {
      EXPECT_EQ(at(kp, o, i), at(c_attn, i, q + o));
      EXPECT_EQ(at(vp, o, i), at(c_attn, i, q + kv + o));
    }
  }
  const Tensor& c_fc = w.get("h.0.mlp.c_fc.weight");
  const Tensor& gate = hf.get("model.layers.0.mlp.gate_proj.weight", {inner, d});
  const Tensor& up = hf.get("model.layers.0.mlp.up_proj.weight", {inner, d});
  const Tensor& down = hf.get("model.layers.0.mlp.down_proj.weight", {d, inner});
  const Tensor& c_proj = w.get("h.0.mlp.c_proj.weight");
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t o = 0; o < inner; ++o) {
      EXPECT_EQ(at(gate, o, i), at(c_fc, i, o));
      EXPECT_EQ(at(up, o, i), at(c_fc, i, inner + o));
      EXPECT_EQ(at(down, i, o), at(c_proj, o, i));
    }
  EXPECT_TRUE(hf.contains("lm_head.weight"));
  EXPECT_TRUE(hf.contains("model.norm.weight"));
  EXPECT_TRUE(hf.contains("model.embed_tokens.weight"));
  EXPECT_FALSE(hf.contains("model.layers.0.self_attn.q_proj.bias"));
  const json config = json::parse(slurp(dir / "m" / "config.json"));
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["intermediate_size"], 24);
  EXPECT_EQ(config["tie_word_embeddings"], false);
}

// GPT-NeoX's query_key_value is laid out head by head: rows [(h * 3 + p) * hd, +hd) are part p (q, k, v) of head h.
TEST(Families, GptNeoxQueryKeyValueIsPerHead) {
  TempDir dir;
  const ModelSpec s = small("gpt_neox");
  const WeightSet w = init_random_weights(s, 5);
  WeightSet biased = w;  // non-zero biases, so the bias permutation is seen
  Tensor bias(DType::f32, {3 * s.n_embd});
  for (std::int64_t i = 0; i < bias.numel(); ++i) bias.set(i, 0.5 + i);
  biased.set("h.0.attn.c_attn.bias", bias);
  save_checkpoint(dir / "m", s, biased);
  const WeightSet hf = read_safetensors(dir / "m" / "model.safetensors");
  const std::int64_t d = s.n_embd, nh = s.n_head, hd = s.head_size();
  const Tensor& qkv = hf.get("gpt_neox.layers.0.attention.query_key_value.weight", {3 * d, d});
  const Tensor& qkv_bias = hf.get("gpt_neox.layers.0.attention.query_key_value.bias", {3 * d});
  const Tensor& c_attn = w.get("h.0.attn.c_attn.weight");
  for (std::int64_t h = 0; h < nh; ++h)
    for (std::int64_t p = 0; p < 3; ++p)
      for (std::int64_t j = 0; j < hd; ++j) {
        const std::int64_t row = (h * 3 + p) * hd + j, col = p * nh * hd + h * hd + j;
        EXPECT_EQ(qkv_bias.get(row), bias.get(col));
        for (std::int64_t i = 0; i < d; ++i) EXPECT_EQ(at(qkv, row, i), at(c_attn, i, col));
      }
  EXPECT_TRUE(hf.contains("embed_out.weight"));
  EXPECT_TRUE(hf.contains("gpt_neox.final_layer_norm.bias"));
  const json config = json::parse(slurp(dir / "m" / "config.json"));
  EXPECT_EQ(config["rotary_pct"], 0.25);
  EXPECT_EQ(config["use_parallel_residual"], true);
  EXPECT_EQ(config["hidden_act"], "gelu");
  const Checkpoint c = load_checkpoint(dir / "m");
  EXPECT_EQ(std::memcmp(c.weights.get("h.0.attn.c_attn.bias").raw(), bias.raw(), bias.nbytes()), 0);
}

TEST(Families, Qwen2HasQkvBiasesAndNoOutputBias) {
  TempDir dir;
  ModelSpec s = small("qwen2");
  s.arch.tied_head = true;
  const WeightSet w = init_random_weights(s, 1);
  save_checkpoint(dir / "m", s, w);
  const WeightSet hf = read_safetensors(dir / "m" / "model.safetensors");
  EXPECT_TRUE(hf.contains("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(hf.contains("model.layers.0.self_attn.v_proj.bias"));
  EXPECT_FALSE(hf.contains("model.layers.0.self_attn.o_proj.bias"));
  EXPECT_FALSE(hf.contains("lm_head.weight"));  // tied: not saved, as transformers does
  EXPECT_TRUE(load_checkpoint(dir / "m").spec.arch.tied_head);
}

// Sharded folders (model.safetensors.index.json) and 16-bit tensors load to the same canonical weights.
TEST(Families, ShardedAndHalfPrecisionFolders) {
  TempDir dir;
  const ModelSpec s = small("llama");
  const WeightSet w = init_random_weights(s, 2);
  save_checkpoint(dir / "m", s, w);
  const WeightSet hf = read_safetensors(dir / "m" / "model.safetensors");
  fs::create_directories(dir / "sharded");
  fs::copy_file(dir / "m" / "config.json", dir / "sharded" / "config.json");
  std::map<std::string, Tensor> a, b;
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  int i = 0;
  for (const auto& [name, t] : hf.tensors()) {
    const bool first = (i++ % 2) == 0;
    (first ? a : b).emplace(name, t);
    index["weight_map"][name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(dir / "sharded" / "model-00001-of-00002.safetensors", a, {{"format", "pt"}});
  write_safetensors(dir / "sharded" / "model-00002-of-00002.safetensors", b, {{"format", "pt"}});
  spit(dir / "sharded" / "model.safetensors.index.json", index.dump(2));
  const Checkpoint c = load_checkpoint(dir / "sharded");
  for (const std::string& name : w.names())
    EXPECT_EQ(std::memcmp(c.weights.get(name).raw(), w.get(name).raw(), w.get(name).nbytes()), 0) << name;

  // bf16 tensors stay bf16 through the layout changes.
  WeightSet w16;
  for (const auto& [name, t] : w.tensors()) w16.set(name, t.to(DType::bf16));
  save_checkpoint(dir / "bf16", s, w16);
  const Checkpoint c16 = load_checkpoint(dir / "bf16");
  for (const std::string& name : w.names()) {
    EXPECT_EQ(c16.weights.get(name).dtype(), DType::bf16);
    EXPECT_EQ(std::memcmp(c16.weights.get(name).raw(), w16.get(name).raw(), w16.get(name).nbytes()), 0) << name;
  }
  EXPECT_EQ(json::parse(slurp(dir / "bf16" / "config.json"))["torch_dtype"], "bfloat16");
}

// A folder from another program: bare base-model names (no "model." prefix) and rotary buffers are accepted.
TEST(Families, BareNamesAndBuffersAreAccepted) {
  TempDir dir;
  const ModelSpec s = small("llama");
  save_checkpoint(dir / "m", s, init_random_weights(s, 2));
  const WeightSet hf = read_safetensors(dir / "m" / "model.safetensors");
  std::map<std::string, Tensor> bare;
  for (const auto& [name, t] : hf.tensors())
    bare.emplace(name.rfind("model.", 0) == 0 ? name.substr(6) : name, t);
  bare.emplace("layers.0.self_attn.rotary_emb.inv_freq", Tensor(DType::f32, {2}));
  write_safetensors(dir / "m" / "model.safetensors", bare, {{"format", "pt"}});
  EXPECT_NO_THROW(load_checkpoint(dir / "m"));
}

TEST(Families, MalformedFoldersNameFileAndTensor) {
  TempDir dir;
  const ModelSpec s = small("llama");
  save_checkpoint(dir / "m", s, init_random_weights(s, 2));
  const fs::path model = dir / "m" / "model.safetensors", config = dir / "m" / "config.json";
  const std::map<std::string, Tensor> good = read_safetensors(model).tensors();
  const json good_config = json::parse(slurp(config));
  auto with = [&](const std::function<void(std::map<std::string, Tensor>&)>& edit) {
    std::map<std::string, Tensor> t = good;
    edit(t);
    write_safetensors(model, t, {{"format", "pt"}});
  };
  with([](auto& t) { t.erase("model.layers.1.mlp.up_proj.weight"); });
  expect_error([&] { load_checkpoint(dir / "m"); }, {model.string(), "missing 1 llama tensor", "up_proj"});
  with([](auto& t) { t["model.layers.0.self_attn.k_proj.weight"] = Tensor(DType::f32, {16, 16}); });
  expect_error([&] { load_checkpoint(dir / "m"); },
               {model.string(), "'model.layers.0.self_attn.k_proj.weight' has shape [16, 16], expected [8, 16]"});
  with([](auto& t) { t.erase("lm_head.weight"); });
  expect_error([&] { load_checkpoint(dir / "m"); }, {config.string(), "tie_word_embeddings is false", "lm_head"});
  with([](auto& t) { t.emplace("model.layers.0.self_attn.q_norm.weight", Tensor(DType::f32, {4})); });
  expect_error([&] { load_checkpoint(dir / "m"); }, {model.string(), "unknown tensor", "q_norm"});
  with([](auto&) {});

  struct Case {
    const char* field;
    json value;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {"num_key_value_heads", 3, "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"},
           {"hidden_act", "gelu", "hidden_act is 'gelu'"},
           {"rope_scaling", json{{"type", "linear"}, {"factor", 2.0}}, "rope_scaling is"},
           {"rms_norm_eps", -1, "rms_norm_eps is -1, not a positive number"},
           {"hidden_size", 32, "hidden_size = 32, but"},
           {"num_hidden_layers", 3, "num_hidden_layers = 3, but"},
           {"model_type", "bert", "model_type is 'bert'"},
       }) {
    SCOPED_TRACE(c.field);
    json j = good_config;
    j[c.field] = c.value;
    spit(config, j.dump());
    expect_error([&] { load_checkpoint(dir / "m"); }, {config.string(), c.message});
  }
}

// Random init follows each family's _init_weights: 2-D weights N(0, 0.02^2) (GPT-2's c_proj scaled), norms 1,
// biases 0; the same seed gives the same bytes.
TEST(Families, RandomInitPerFamily) {
  for (const std::string& n : kFamilies) {
    SCOPED_TRACE(n);
    ModelSpec s = small(n);
    s.n_embd = 64;
    s.n_inner = 96;
    if (n == "gpt2") s.n_inner = 0;
    const WeightSet w = init_random_weights(s, 11);
    for (const TensorSpec& t : weight_schema(s)) {
      const Tensor& x = w.get(t.name);
      if (t.shape.size() == 1) {
        const bool bias = t.name.find(".bias") != std::string::npos;
        for (std::int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(x.get(i), bias ? 0.0 : 1.0) << t.name;
        continue;
      }
      double sum2 = 0;
      for (std::int64_t i = 0; i < x.numel(); ++i) sum2 += x.get(i) * x.get(i);
      const double std = std::sqrt(sum2 / static_cast<double>(x.numel()));
      const bool scaled = n == "gpt2" && t.name.find("c_proj.weight") != std::string::npos;
      const double expected = scaled ? 0.02 / std::sqrt(2.0 * static_cast<double>(s.n_layer)) : 0.02;
      EXPECT_NEAR(std, expected, 0.15 * expected) << t.name;
    }
    const WeightSet again = init_random_weights(s, 11);
    for (const std::string& name : w.names())
      EXPECT_EQ(std::memcmp(w.get(name).raw(), again.get(name).raw(), w.get(name).nbytes()), 0) << name;
  }
}

}  // namespace
}  // namespace lminv
