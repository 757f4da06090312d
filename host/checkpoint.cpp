#include "checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include "lminv/error.hpp"
#include "safetensors.hpp"

namespace lminv {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kPrefix = "transformer.";

[[noreturn]] void bad(const fs::path& file, const std::string& what) { throw Error(file.string() + ": " + what); }

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

// "a, b, c" for the first `most` names, then "and N more".
std::string name_list(const std::vector<std::string>& names, std::size_t most = 8) {
  std::string out;
  for (std::size_t i = 0; i < names.size() && i < most; ++i) out += (i ? ", " : "") + in_quotes(names[i]);
  if (names.size() > most) out += " and " + std::to_string(names.size() - most) + " more";
  return out;
}

bool is_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The block index of "h.{i}.rest", or nullopt.
std::optional<std::int64_t> block_index(const std::string& name) {
  if (name.rfind("h.", 0) != 0) return std::nullopt;
  const std::size_t dot = name.find('.', 2);
  if (dot == std::string::npos) return std::nullopt;
  const std::string digits = name.substr(2, dot - 2);
  if (!is_digits(digits) || digits.size() > 9) return std::nullopt;
  return std::stoll(digits);
}

// h.{i}.attn.bias and h.{i}.attn.masked_bias: the causal-mask buffers older checkpoints store.
bool is_mask_buffer(const std::string& name) {
  if (!block_index(name)) return false;
  const std::string rest = name.substr(name.find('.', 2) + 1);
  return rest == "attn.bias" || rest == "attn.masked_bias";
}

// ---- config.json -----------------------------------------------------------------------------------------------

json read_json_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) bad(file, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    bad(file, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) bad(file, std::string("a JSON ") + j.type_name() + ", not an object");
  return j;
}

struct ConfigFields {
  const fs::path& file;
  const json& j;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

  std::int64_t positive_int(const char* key, std::int64_t fallback) const {
    if (!j.contains(key)) return fallback;
    const json& v = j[key];
    if ((v.is_number_unsigned() || v.is_number_integer()) && v.get<std::int64_t>() > 0) return v.get<std::int64_t>();
    bad(file, std::string(key) + " is " + v.dump() + ", not a positive integer");
  }
  std::int64_t count(const char* key, std::int64_t fallback) const {
    if (!j.contains(key)) return fallback;
    const json& v = j[key];
    if ((v.is_number_unsigned() || v.is_number_integer()) && v.get<std::int64_t>() >= 0) return v.get<std::int64_t>();
    bad(file, std::string(key) + " is " + v.dump() + ", not a non-negative integer");
  }
  double positive_number(const char* key, double fallback) const {
    if (!j.contains(key)) return fallback;
    const json& v = j[key];
    if (v.is_number() && v.get<double>() > 0) return v.get<double>();
    bad(file, std::string(key) + " is " + v.dump() + ", not a positive number");
  }
  std::optional<bool> boolean(const char* key) const {
    if (!has(key)) return std::nullopt;
    if (!j[key].is_boolean()) bad(file, std::string(key) + " is " + j[key].dump() + ", not true or false");
    return j[key].get<bool>();
  }
  std::optional<std::string> string(const char* key) const {
    if (!has(key)) return std::nullopt;
    if (!j[key].is_string()) bad(file, std::string(key) + " is " + j[key].dump() + ", not a string");
    return j[key].get<std::string>();
  }
};

struct Gpt2Config {
  ModelSpec spec;
  bool tied = true;
};

// Sizes as GPT2Config reads them (absent fields take its defaults), and a refusal of settings lminv does not compute.
Gpt2Config parse_config(const fs::path& file) {
  const json j = read_json_file(file);
  const ConfigFields f{file, j};
  Gpt2Config c;
  ModelSpec& s = c.spec;
  s.family = "gpt2";
  if (auto type = f.string("model_type"); type && *type != "gpt2")
    bad(file, "model_type is " + in_quotes(*type) + "; lminv reads GPT-2 checkpoints (model_type \"gpt2\")");
  s.n_layer = f.count("n_layer", 12);  // 0 blocks is a model of embeddings and ln_f
  s.n_embd = f.positive_int("n_embd", 768);
  s.n_head = f.positive_int("n_head", 12);
  s.n_inner = f.has("n_inner") ? f.positive_int("n_inner", 0) : 0;
  s.vocab_size = f.positive_int("vocab_size", 50257);
  s.n_positions = f.positive_int("n_positions", 1024);
  s.layer_norm_epsilon = f.positive_number("layer_norm_epsilon", 1e-5);
  if (s.n_embd % s.n_head != 0)
    bad(file, "n_head = " + std::to_string(s.n_head) + " does not divide n_embd = " + std::to_string(s.n_embd));
  if (auto act = f.string("activation_function"); act && *act != "gelu_new" && *act != "gelu_pytorch_tanh")
    bad(file, "activation_function is " + in_quotes(*act) + "; lminv's gpt2 computes gelu_new (the tanh approximation)");
  if (f.boolean("scale_attn_weights") == false)
    bad(file, "scale_attn_weights is false; lminv's gpt2 scales attention scores by 1/sqrt(head size)");
  if (f.boolean("scale_attn_by_inverse_layer_idx") == true)
    bad(file, "scale_attn_by_inverse_layer_idx is true; lminv's gpt2 does not scale attention by layer index");
  c.tied = f.boolean("tie_word_embeddings").value_or(true);
  return c;
}

// ---- the tensors of a folder -----------------------------------------------------------------------------------

struct Source {
  const SafetensorsFile* file = nullptr;
  std::string stored;  // the name in the file
};

struct FolderTensors {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::string where;  // model.safetensors, or the index, for messages
  fs::path where_path;
};

// model.safetensors, or model.safetensors.index.json and its shards.
FolderTensors open_tensors(const fs::path& folder) {
  FolderTensors t;
  const fs::path single = folder / "model.safetensors";
  const fs::path index = folder / "model.safetensors.index.json";
  if (fs::exists(single)) {
    t.files.push_back(std::make_unique<SafetensorsFile>(single));
    t.where_path = single;
    return t;
  }
  if (fs::exists(index)) {
    const json j = read_json_file(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      bad(index, "no \"weight_map\" object (tensor name -> shard file)");
    std::map<std::string, const SafetensorsFile*> by_shard;
    for (const auto& [name, shard] : j["weight_map"].items()) {
      if (!shard.is_string()) bad(index, "weight_map entry " + in_quotes(name) + " is not a file name");
      const std::string file = shard.get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        bad(index, "weight_map entry " + in_quotes(name) + " names " + in_quotes(file) + ", not a file in the folder");
      if (!by_shard.count(file)) {
        t.files.push_back(std::make_unique<SafetensorsFile>(folder / file));
        by_shard[file] = t.files.back().get();
      }
      if (!by_shard[file]->contains(name)) bad(folder / file, "no tensor " + in_quotes(name) + " (the index puts it here)");
    }
    t.where_path = index;
    return t;
  }
  std::string why = "missing";
  if (fs::exists(folder / "pytorch_model.bin") || fs::exists(folder / "pytorch_model.bin.index.json"))
    why += "; the folder has pytorch_model.bin, which lminv does not read (a pickle, unsafe to load): convert it to "
           "safetensors, e.g. GPT2LMHeadModel.from_pretrained(folder).save_pretrained(folder, "
           "safe_serialization=True)";
  bad(single, why);
}

}  // namespace

std::map<std::string, Shape> gpt2_weight_shapes(const ModelSpec& spec) {
  const std::int64_t d = spec.n_embd, inner = spec.inner();
  std::map<std::string, Shape> shapes{
      {"wte.weight", {spec.vocab_size, d}},
      {"wpe.weight", {spec.n_positions, d}},
      {"ln_f.weight", {d}},
      {"ln_f.bias", {d}},
  };
  for (std::int64_t i = 0; i < spec.n_layer; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    shapes[h + "ln_1.weight"] = {d};
    shapes[h + "ln_1.bias"] = {d};
    shapes[h + "attn.c_attn.weight"] = {d, 3 * d};
    shapes[h + "attn.c_attn.bias"] = {3 * d};
    shapes[h + "attn.c_proj.weight"] = {d, d};
    shapes[h + "attn.c_proj.bias"] = {d};
    shapes[h + "ln_2.weight"] = {d};
    shapes[h + "ln_2.bias"] = {d};
    shapes[h + "mlp.c_fc.weight"] = {d, inner};
    shapes[h + "mlp.c_fc.bias"] = {inner};
    shapes[h + "mlp.c_proj.weight"] = {inner, d};
    shapes[h + "mlp.c_proj.bias"] = {d};
  }
  return shapes;
}

Checkpoint load_gpt2_checkpoint(const fs::path& folder) {
  if (!fs::is_directory(folder)) bad(folder, "not a folder (expected a Hugging Face GPT-2 folder)");
  const fs::path config_file = folder / "config.json";
  if (!fs::exists(config_file))
    bad(config_file, "missing (a Hugging Face GPT-2 folder has config.json and model.safetensors)");
  const Gpt2Config config = parse_config(config_file);
  const ModelSpec& spec = config.spec;

  FolderTensors tensors = open_tensors(folder);
  const fs::path& where = tensors.where_path;

  // Canonical name -> where it is stored.
  std::map<std::string, Source> found;
  std::optional<Source> lm_head;
  for (const auto& file : tensors.files)
    for (const auto& entry : file->entries()) {
      const std::string& stored = entry.first;
      if (stored == "lm_head.weight") {
        if (lm_head) bad(where, "holds lm_head.weight twice");
        lm_head = Source{file.get(), stored};
        continue;
      }
      const std::string name = stored.rfind(kPrefix, 0) == 0 ? stored.substr(kPrefix.size()) : stored;
      if (is_mask_buffer(name)) continue;
      if (auto it = found.find(name); it != found.end())
        bad(where, "holds both " + in_quotes(it->second.stored) + " and " + in_quotes(stored));
      found[name] = Source{file.get(), stored};
    }
  auto shape_of = [&](const std::string& name) -> const Shape& {
    const Source& s = found.at(name);
    return s.file->entry(s.stored).shape;
  };

  // config.json against the tensors, field by field, before the generic shape checks.
  auto disagree = [&](const std::string& field, std::int64_t value, const std::string& tensor) {
    bad(config_file, field + " = " + std::to_string(value) + ", but " + where.string() + " has " +
                         in_quotes(found.at(tensor).stored) + " of shape " + shape_string(shape_of(tensor)));
  };
  if (found.count("wte.weight") && shape_of("wte.weight").size() == 2) {
    if (shape_of("wte.weight")[1] != spec.n_embd) disagree("n_embd", spec.n_embd, "wte.weight");
    if (shape_of("wte.weight")[0] != spec.vocab_size) disagree("vocab_size", spec.vocab_size, "wte.weight");
  }
  if (found.count("wpe.weight") && shape_of("wpe.weight").size() == 2 && shape_of("wpe.weight")[0] != spec.n_positions)
    disagree("n_positions", spec.n_positions, "wpe.weight");
  std::set<std::int64_t> blocks;
  for (const auto& entry : found)
    if (auto i = block_index(entry.first)) blocks.insert(*i);
  if (blocks.empty() && spec.n_layer > 0)
    bad(config_file, "n_layer = " + std::to_string(spec.n_layer) + ", but " + where.string() +
                         " has no blocks (no h.{i}.* tensors)");
  if (!blocks.empty() && *blocks.rbegin() + 1 != spec.n_layer)
    bad(config_file, "n_layer = " + std::to_string(spec.n_layer) + ", but " + where.string() + " has blocks h." +
                         std::to_string(*blocks.begin()) + " .. h." + std::to_string(*blocks.rbegin()));
  if (spec.n_inner > 0 && found.count("h.0.mlp.c_fc.weight") && shape_of("h.0.mlp.c_fc.weight").size() == 2 &&
      shape_of("h.0.mlp.c_fc.weight")[1] != spec.n_inner)
    disagree("n_inner", spec.n_inner, "h.0.mlp.c_fc.weight");

  // Exactly the expected tensors, each of its exact shape.
  const std::map<std::string, Shape> expected = gpt2_weight_shapes(spec);
  std::vector<std::string> missing, extra;
  for (const auto& entry : expected)
    if (!found.count(entry.first)) missing.push_back(entry.first);
  for (const auto& entry : found)
    if (!expected.count(entry.first)) extra.push_back(entry.second.stored);
  if (!missing.empty())
    bad(where, "missing " + std::to_string(missing.size()) + " GPT-2 tensor" + (missing.size() > 1 ? "s: " : ": ") +
                   name_list(missing) + " (with or without the \"transformer.\" prefix)");
  if (!extra.empty())
    bad(where, "unknown tensor" + std::string(extra.size() > 1 ? "s " : " ") + name_list(extra) +
                   " (not part of GPT-2 with these config.json sizes)");
  for (const auto& [name, shape] : expected)
    if (shape_of(name) != shape)
      bad(where, "tensor " + in_quotes(found.at(name).stored) + " has shape " + shape_string(shape_of(name)) +
                     ", expected " + shape_string(shape) +
                     (name.find("mlp.c_") != std::string::npos && spec.n_inner == 0
                          ? " (config.json n_inner is null: 4 * n_embd)"
                          : ""));

  // lm_head: absent (tied) or equal to wte.
  const Source& wte = found.at("wte.weight");
  if (lm_head) {
    const SafetensorsEntry& a = wte.file->entry(wte.stored);
    const SafetensorsEntry& b = lm_head->file->entry(lm_head->stored);
    bool equal = a.shape == b.shape;
    if (equal && a.dtype == b.dtype) {
      equal = wte.file->bytes(wte.stored) == lm_head->file->bytes(lm_head->stored);
    } else if (equal) {
      const Tensor x = wte.file->read(wte.stored), y = lm_head->file->read(lm_head->stored);
      for (std::int64_t i = 0; equal && i < x.numel(); ++i) equal = x.get(i) == y.get(i);
    }
    if (!equal)
      bad(lm_head->file->path(), "lm_head.weight (" + b.dtype + " " + shape_string(b.shape) + ") differs from " +
                                     in_quotes(wte.stored) + " (" + a.dtype + " " + shape_string(a.shape) +
                                     "); lminv's gpt2 ties the output projection to the token embedding");
  } else if (!config.tied) {
    bad(config_file, "tie_word_embeddings is false, but " + where.string() +
                         " has no lm_head.weight; lminv's gpt2 ties the output projection to the token embedding");
  }

  Checkpoint out;
  out.spec = spec;
  out.folder = folder;
  for (const auto& file : tensors.files) {
    std::vector<std::string> canonical, stored;
    for (const auto& entry : expected)
      if (found.at(entry.first).file == file.get()) {
        canonical.push_back(entry.first);
        stored.push_back(found.at(entry.first).stored);
      }
    std::vector<Tensor> read = file->read_many(stored);
    for (std::size_t i = 0; i < canonical.size(); ++i) out.weights.set(canonical[i], std::move(read[i]));
  }
  return out;
}

// ---- saving ----------------------------------------------------------------------------------------------------

namespace {

const char* torch_dtype(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
  }
  return "float32";
}

void write_text_atomically(const fs::path& file, const std::string& text) {
  fs::path tmp = file;
  tmp += ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) bad(file, "cannot create " + tmp.string() + ": " + std::strerror(errno));
  auto fail = [&](const char* step) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    ::unlink(tmp.c_str());
    bad(file, std::string("cannot ") + step + " " + tmp.string() + ": " + why);
  };
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = EIO;
    if (n <= 0) fail("write");
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("sync");
  if (::close(fd) != 0 || ::rename(tmp.c_str(), file.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    bad(file, "cannot replace with " + tmp.string() + ": " + why);
  }
}

}  // namespace

void save_gpt2_checkpoint(const fs::path& folder, const ModelSpec& spec, const WeightSet& weights) {
  const std::string what = "save_gpt2_checkpoint(" + folder.string() + ")";
  if (spec.family != "gpt2") throw Error(what + ": family is " + in_quotes(spec.family) + ", not gpt2");
  if (spec.n_layer < 0) throw Error(what + ": n_layer = " + std::to_string(spec.n_layer) + " is negative");
  for (const auto& [field, value] : std::map<std::string, std::int64_t>{{"n_embd", spec.n_embd},
                                                                         {"n_head", spec.n_head},
                                                                         {"vocab_size", spec.vocab_size},
                                                                         {"n_positions", spec.n_positions}})
    if (value <= 0) throw Error(what + ": " + field + " = " + std::to_string(value) + " is not positive");
  if (spec.n_inner < 0) throw Error(what + ": n_inner = " + std::to_string(spec.n_inner) + " is negative");
  if (spec.n_embd % spec.n_head != 0)
    throw Error(what + ": n_head = " + std::to_string(spec.n_head) + " does not divide n_embd = " +
                std::to_string(spec.n_embd));
  if (!(spec.layer_norm_epsilon > 0)) throw Error(what + ": layer_norm_epsilon is not positive");

  const std::map<std::string, Shape> expected = gpt2_weight_shapes(spec);
  std::vector<std::string> missing, extra;
  for (const auto& entry : expected)
    if (!weights.contains(entry.first)) missing.push_back(entry.first);
  for (const auto& entry : weights.tensors())
    if (!expected.count(entry.first)) extra.push_back(entry.first);
  if (!missing.empty()) throw Error(what + ": the weights lack " + name_list(missing));
  if (!extra.empty()) throw Error(what + ": the weights have unknown tensors " + name_list(extra));
  for (const auto& [name, shape] : expected)
    if (weights.get(name).shape() != shape)
      throw Error(what + ": tensor " + in_quotes(name) + " has shape " + shape_string(weights.get(name).shape()) +
                  ", expected " + shape_string(shape));

  json config = {
      {"activation_function", "gelu_new"},
      {"architectures", {"GPT2LMHeadModel"}},
      {"attn_pdrop", 0.1},
      {"bos_token_id", spec.vocab_size - 1},
      {"embd_pdrop", 0.1},
      {"eos_token_id", spec.vocab_size - 1},
      {"initializer_range", 0.02},
      {"layer_norm_epsilon", spec.layer_norm_epsilon},
      {"model_type", "gpt2"},
      {"n_embd", spec.n_embd},
      {"n_head", spec.n_head},
      {"n_inner", spec.n_inner > 0 ? json(spec.n_inner) : json(nullptr)},
      {"n_layer", spec.n_layer},
      {"n_positions", spec.n_positions},
      {"reorder_and_upcast_attn", false},
      {"resid_pdrop", 0.1},
      {"scale_attn_by_inverse_layer_idx", false},
      {"scale_attn_weights", true},
      {"summary_activation", nullptr},
      {"summary_first_dropout", 0.1},
      {"summary_proj_to_labels", true},
      {"summary_type", "cls_index"},
      {"summary_use_proj", true},
      {"tie_word_embeddings", true},
      {"torch_dtype", torch_dtype(weights.get("wte.weight").dtype())},
      {"use_cache", true},
      {"vocab_size", spec.vocab_size},
  };

  try {
    fs::create_directories(folder);
  } catch (const fs::filesystem_error& e) {
    throw Error(what + ": cannot create the folder: " + e.code().message());
  }
  std::map<std::string, const Tensor*> views;
  for (const auto& [name, tensor] : weights.tensors()) views.emplace(kPrefix + name, &tensor);
  write_safetensors_views(folder / "model.safetensors", views, {{"format", "pt"}});
  write_text_atomically(folder / "config.json", config.dump(2) + "\n");
}

}  // namespace lminv
