// Model families: one small adapter per Hugging Face model_type, mapping config.json to a ModelSpec (sizes and the
// decoder's Architecture), Hugging Face tensor names and layouts to lminv's canonical ones (sdk/include/lminv/
// schema.hpp) and back, and saying how the family initialises random weights. The MLP families of the seed study are
// families too (no checkpoints). docs/families.md walks through adding one.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/tensor.hpp"

namespace lminv {

// Typed reads of config.json; every error names the file and the field.
class ConfigFields {
 public:
  ConfigFields(std::filesystem::path file, const nlohmann::json& j) : file_(std::move(file)), j_(j) {}

  const std::filesystem::path& file() const { return file_; }
  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  // Sizes: an integer > 0 (count: >= 0) and at most `max` (lminv's ceilings, config.hpp: beyond them sizes overflow
  // or tables fill memory before any tensor is checked).
  std::int64_t positive_int(const char* key, std::int64_t fallback, std::int64_t max = INT64_MAX) const;
  std::int64_t count(const char* key, std::int64_t fallback, std::int64_t max = INT64_MAX) const;
  double positive_number(const char* key, double fallback) const;
  double fraction(const char* key, double fallback) const;  // in (0, 1]
  bool boolean(const char* key, bool fallback) const;
  std::optional<std::string> string(const char* key) const;
  const nlohmann::json& raw(const char* key) const { return j_[key]; }
  [[noreturn]] void fail(const std::string& what) const;

 private:
  std::filesystem::path file_;
  const nlohmann::json& j_;
};

// How one canonical tensor is stored in a Hugging Face checkpoint.
struct TensorRule {
  enum class Op {
    copy,             // the same layout
    linear,           // nn.Linear [out, in] <-> canonical [in, out]
    concat_linear,    // several nn.Linear [out_i, in] <-> canonical [in, sum out_i], side by side in `hf` order
    concat,           // several vectors <-> one, end to end (biases of concat_linear)
    neox_qkv_weight,  // GPT-NeoX query_key_value [nh * 3 * hd, d], rows per head [q k v] <-> canonical [d, 3 nh hd]
    neox_qkv_bias,    // its bias [nh * 3 * hd] <-> [3 nh hd]
  };
  Op op = Op::copy;
  std::string canonical;
  std::vector<std::string> hf;  // full names as Hugging Face saves them
  std::vector<Shape> hf_shapes;
  std::int64_t heads = 0, head_size = 0;  // neox ops
};

class FamilyAdapter {
 public:
  virtual ~FamilyAdapter() = default;

  // The family's name: Hugging Face's model_type for the transformer families.
  virtual std::string name() const = 0;
  virtual ModelKind kind() const { return ModelKind::decoder; }
  // Whether Hugging Face folders of this family can be read and written (the MLP families: no).
  virtual bool has_checkpoints() const { return kind() == ModelKind::decoder; }

  // The family's architecture for a model made here (weights = random): spec's sizes are set; this sets spec.arch
  // (the [model] keys may then override single fields).
  virtual void set_architecture(ModelSpec& spec) const = 0;

  // config.json -> sizes and architecture. Settings lminv does not compute are errors naming the field.
  virtual void read_config(const ConfigFields& config, ModelSpec& spec) const = 0;
  // The config.json Hugging Face would write for spec (weights stored in `dtype`).
  virtual nlohmann::json write_config(const ModelSpec& spec, DType dtype) const = 0;

  // Every canonical tensor of spec and where Hugging Face keeps it (lm_head only when untied).
  virtual std::vector<TensorRule> tensor_rules(const ModelSpec& spec) const = 0;
  // Stored names that are not weights (buffers such as rotary inv_freq or the causal mask): skipped on loading.
  virtual bool is_buffer(const std::string& /*stored_name*/) const { return false; }
  // Prefixes a bare base model's tensors lack ("transformer." for GPT2Model vs GPT2LMHeadModel): a stored name
  // without it is read as if it had it.
  virtual std::string base_prefix() const { return ""; }
  // The name of the untied output projection as saved ("lm_head.weight", GPT-NeoX: "embed_out.weight").
  virtual std::string head_name() const { return "lm_head.weight"; }

  // Standard deviation of the normal init of a canonical 2-D weight (Hugging Face's _init_weights); 1-D norm weights
  // are 1 and biases 0 for every family.
  virtual double init_std(const ModelSpec& /*spec*/, const std::string& /*canonical*/) const { return 0.02; }
};

// The adapter named `name`, or nullptr.
const FamilyAdapter* find_family(std::string_view name);
// Every family's name, for messages and config checks.
std::vector<std::string> family_names();

// The adapter for `name` (an Error listing the families when there is none).
const FamilyAdapter& family(std::string_view name);

namespace families {
// Helpers shared by the adapters.
std::string block(std::int64_t i);  // "h.{i}."
// The rules of a Llama-style decoder (llama, mistral, qwen2): model.layers.{i}.self_attn.{q,k,v,o}_proj etc.
std::vector<TensorRule> llama_style_rules(const ModelSpec& spec);
// config.json fields every Llama-style family shares (sizes, rope, rms_norm_eps, hidden_act, tie_word_embeddings).
void read_llama_style_config(const ConfigFields& config, ModelSpec& spec, bool tie_default);
nlohmann::json write_llama_style_config(const ModelSpec& spec, DType dtype, const char* model_type,
                                        const char* architecture);
bool is_llama_style_buffer(const std::string& stored_name);
const char* torch_dtype(DType dtype);
}  // namespace families

}  // namespace lminv
