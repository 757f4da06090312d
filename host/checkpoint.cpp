#include "checkpoint.hpp"
#include "files.hpp"

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

#include "families/family.hpp"
#include "json_depth.hpp"
#include "lminv/error.hpp"
#include "lminv/schema.hpp"
#include "safetensors.hpp"

namespace lminv {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

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

// ---- config.json -----------------------------------------------------------------------------------------------

json read_json_file(const fs::path& file) {
  const std::string text = read_regular_file(file, "the JSON file", max_bytes::kJsonConfig);
  json j;
  try {
    j = json::parse(text, json_depth_limit(file.string()));
  } catch (const json::exception& e) {
    bad(file, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) bad(file, std::string("a JSON ") + j.type_name() + ", not an object");
  return j;
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
           "safetensors, e.g. AutoModelForCausalLM.from_pretrained(folder)"
           ".save_pretrained(folder, safe_serialization=True)";
  bad(single, why);
}


// ---- layouts ---------------------------------------------------------------------------------------------------

// Element-size-generic copies between Hugging Face layouts and canonical ones. `Word` is an unsigned integer of the
// element's size: the bytes move unchanged, whatever the dtype.
//
// rows_to_columns: src [rows, cols] row r -> column col_of(r) of dst [cols, dst_cols] (a transpose that may also
// place rows at other columns); columns_to_rows is its inverse.
template <class Word, class ColOf>
void rows_to_columns(const Word* src, std::int64_t rows, std::int64_t cols, Word* dst, std::int64_t dst_cols,
                     ColOf col_of) {
  constexpr std::int64_t kTile = 64;  // tiles keep both sides in cache
  for (std::int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (std::int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (std::int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) {
        const std::int64_t dc = col_of(r);
        for (std::int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[c * dst_cols + dc] = src[r * cols + c];
      }
}
template <class Word, class ColOf>
void columns_to_rows(const Word* src, std::int64_t src_cols, Word* dst, std::int64_t rows, std::int64_t cols,
                     ColOf col_of) {
  constexpr std::int64_t kTile = 64;
  for (std::int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (std::int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (std::int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) {
        const std::int64_t sc = col_of(r);
        for (std::int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[r * cols + c] = src[c * src_cols + sc];
      }
}

template <class F>
void by_element_size(DType dtype, F&& f) {
  switch (dtype_size(dtype)) {
    case 2: f(std::uint16_t{}); break;
    case 4: f(std::uint32_t{}); break;
    case 8: f(std::uint64_t{}); break;
    default: throw Error("checkpoint: unexpected element size");
  }
}

// GPT-NeoX's fused query_key_value: row (h * 3 + p) * hd + j holds part p (q, k, v) of head h; canonical column
// p * nh * hd + h * hd + j.
std::int64_t neox_column(std::int64_t row, std::int64_t heads, std::int64_t hd) {
  const std::int64_t h = row / (3 * hd), p = (row / hd) % 3, j = row % hd;
  return p * heads * hd + h * hd + j;
}

// The canonical tensor of `rule` from its stored tensors (same dtype: converted to the first's when they differ).
Tensor to_canonical(const TensorRule& rule, std::vector<Tensor> hf, const Shape& canonical_shape) {
  using Op = TensorRule::Op;
  const DType dtype = hf[0].dtype();
  for (Tensor& t : hf)
    if (t.dtype() != dtype) t = t.to(dtype);
  if (rule.op == Op::copy) return std::move(hf[0]);
  Tensor out(dtype, canonical_shape);
  by_element_size(dtype, [&](auto word) {
    using Word = decltype(word);
    Word* dst = static_cast<Word*>(out.raw());
    switch (rule.op) {
      case Op::linear:
      case Op::concat_linear: {
        std::int64_t offset = 0;
        const std::int64_t dst_cols = canonical_shape[1];
        for (const Tensor& t : hf) {
          rows_to_columns(static_cast<const Word*>(t.raw()), t.dim(0), t.dim(1), dst, dst_cols,
                          [&](std::int64_t r) { return offset + r; });
          offset += t.dim(0);
        }
        break;
      }
      case Op::concat: {
        std::int64_t offset = 0;
        for (const Tensor& t : hf) {
          std::memcpy(dst + offset, t.raw(), t.nbytes());
          offset += t.numel();
        }
        break;
      }
      case Op::neox_qkv_weight:
        rows_to_columns(static_cast<const Word*>(hf[0].raw()), hf[0].dim(0), hf[0].dim(1), dst, canonical_shape[1],
                        [&](std::int64_t r) { return neox_column(r, rule.heads, rule.head_size); });
        break;
      case Op::neox_qkv_bias: {
        const Word* src = static_cast<const Word*>(hf[0].raw());
        for (std::int64_t r = 0; r < hf[0].numel(); ++r) dst[neox_column(r, rule.heads, rule.head_size)] = src[r];
        break;
      }
      case Op::copy: break;
    }
  });
  return out;
}

// The stored tensors of `rule` from the canonical one (the inverse of to_canonical).
std::vector<Tensor> to_stored(const TensorRule& rule, const Tensor& canonical) {
  using Op = TensorRule::Op;
  std::vector<Tensor> out;
  for (const Shape& shape : rule.hf_shapes) out.emplace_back(canonical.dtype(), shape);
  if (rule.op == Op::copy) {
    std::memcpy(out[0].raw(), canonical.raw(), canonical.nbytes());
    return out;
  }
  by_element_size(canonical.dtype(), [&](auto word) {
    using Word = decltype(word);
    const Word* src = static_cast<const Word*>(canonical.raw());
    switch (rule.op) {
      case Op::linear:
      case Op::concat_linear: {
        std::int64_t offset = 0;
        for (Tensor& t : out) {
          columns_to_rows(src, canonical.dim(1), static_cast<Word*>(t.raw()), t.dim(0), t.dim(1),
                          [&](std::int64_t r) { return offset + r; });
          offset += t.dim(0);
        }
        break;
      }
      case Op::concat: {
        std::int64_t offset = 0;
        for (Tensor& t : out) {
          std::memcpy(t.raw(), src + offset, t.nbytes());
          offset += t.numel();
        }
        break;
      }
      case Op::neox_qkv_weight:
        columns_to_rows(src, canonical.dim(1), static_cast<Word*>(out[0].raw()), out[0].dim(0), out[0].dim(1),
                        [&](std::int64_t r) { return neox_column(r, rule.heads, rule.head_size); });
        break;
      case Op::neox_qkv_bias: {
        Word* dst = static_cast<Word*>(out[0].raw());
        for (std::int64_t r = 0; r < out[0].numel(); ++r) dst[r] = src[neox_column(r, rule.heads, rule.head_size)];
        break;
      }
      case Op::copy: break;
    }
  });
  return out;
}

// The layer index in a stored name "<prefix>.<i>.rest" for the family's layer prefixes, or nullopt.
std::optional<std::int64_t> layer_index(const std::string& name) {
  for (const char* prefix : {"transformer.h.", "h.", "model.layers.", "layers.", "gpt_neox.layers."}) {
    const std::string p = prefix;
    if (name.rfind(p, 0) != 0) continue;
    const std::size_t dot = name.find('.', p.size());
    if (dot == std::string::npos) continue;
    const std::string digits = name.substr(p.size(), dot - p.size());
    if (is_digits(digits) && digits.size() <= 9) return std::stoll(digits);
  }
  return std::nullopt;
}

// config.json's field for a size, for messages.
std::string size_field(const std::string& family, const char* what) {
  const bool gpt2 = family == "gpt2";
  const std::string w = what;
  if (w == "layers") return gpt2 ? "n_layer" : "num_hidden_layers";
  if (w == "d") return gpt2 ? "n_embd" : "hidden_size";
  if (w == "V") return "vocab_size";
  if (w == "P") return gpt2 ? "n_positions" : "max_position_embeddings";
  if (w == "inner") return gpt2 ? "n_inner" : "intermediate_size";
  return w;
}

bool equal_values(const SafetensorsFile& fa, const std::string& a, const SafetensorsFile& fb, const std::string& b) {
  const SafetensorsEntry& ea = fa.entry(a);
  const SafetensorsEntry& eb = fb.entry(b);
  if (ea.shape != eb.shape) return false;
  if (ea.dtype == eb.dtype) return fa.bytes(a) == fb.bytes(b);
  const Tensor x = fa.read(a), y = fb.read(b);
  for (std::int64_t i = 0; i < x.numel(); ++i)
    if (x.get(i) != y.get(i)) return false;
  return true;
}

}  // namespace

bool is_model_folder(const fs::path& folder) { return fs::is_directory(folder) && fs::exists(folder / "config.json"); }

Checkpoint load_checkpoint(const fs::path& folder) {
  if (!fs::is_directory(folder)) bad(folder, "not a folder (expected a Hugging Face model folder)");
  const fs::path config_file = folder / "config.json";
  if (!fs::exists(config_file))
    bad(config_file, "missing (a Hugging Face model folder has config.json and model.safetensors)");
  const json j = read_json_file(config_file);
  const ConfigFields fields(config_file, j);
  const std::string type = fields.string("model_type").value_or("");
  const FamilyAdapter* fam = find_family(type);
  if (type.empty() || !fam || !fam->has_checkpoints()) {
    std::string known;
    for (const std::string& n : family_names())
      if (find_family(n)->has_checkpoints()) known += (known.empty() ? "" : ", ") + n;
    bad(config_file, (type.empty() ? std::string("has no model_type") : "model_type is " + in_quotes(type)) +
                         "; lminv reads the model types " + known);
  }
  ModelSpec spec;
  spec.family = fam->name();
  fam->read_config(fields, spec);
  spec.blocks = 0;
  spec.seq_len = 0;
  try {
    check_spec(spec, "the model");
  } catch (const Error& e) {
    bad(config_file, e.what());
  }

  FolderTensors tensors = open_tensors(folder);
  const fs::path& where = tensors.where_path;
  const std::vector<TensorRule> rules = fam->tensor_rules(spec);

  // The full stored name (a bare base model's names get the base prefix) -> where it is.
  const std::string prefix = fam->base_prefix();
  std::set<std::string> expected_names;
  for (const TensorRule& r : rules) expected_names.insert(r.hf.begin(), r.hf.end());
  std::map<std::string, Source> found;
  std::optional<Source> stored_head;  // a tied head's stored copy
  for (const auto& file : tensors.files)
    for (const auto& entry : file->entries()) {
      const std::string& stored = entry.first;
      if (fam->is_buffer(stored)) continue;
      std::string name = stored;
      const bool head = name == fam->head_name();
      if (!head && !prefix.empty() && name.rfind(prefix, 0) != 0 && !expected_names.count(name)) name = prefix + name;
      if (head && spec.arch.tied_head) {
        if (stored_head) bad(where, "holds " + fam->head_name() + " twice");
        stored_head = Source{file.get(), stored};
        continue;
      }
      if (auto it = found.find(name); it != found.end())
        bad(where, "holds both " + in_quotes(it->second.stored) + " and " + in_quotes(stored));
      found[name] = Source{file.get(), stored};
    }
  auto shape_of = [&](const std::string& name) -> const Shape& {
    const Source& s = found.at(name);
    return s.file->entry(s.stored).shape;
  };

  // config.json against the tensors, field by field, before the generic shape checks.
  const TensorRule& wte_rule = rules.front();  // every family lists wte first
  const std::string& wte = wte_rule.hf[0];
  auto disagree = [&](const std::string& field, std::int64_t value, const std::string& tensor) {
    bad(config_file, field + " = " + std::to_string(value) + ", but " + where.string() + " has " +
                         in_quotes(found.at(tensor).stored) + " of shape " + shape_string(shape_of(tensor)));
  };
  if (found.count(wte) && shape_of(wte).size() == 2) {
    if (shape_of(wte)[1] != spec.n_embd) disagree(size_field(spec.family, "d"), spec.n_embd, wte);
    if (shape_of(wte)[0] != spec.vocab_size) disagree(size_field(spec.family, "V"), spec.vocab_size, wte);
  }
  if (spec.arch.positions == Positions::learned) {
    const std::string wpe = prefix + "wpe.weight";
    if (found.count(wpe) && shape_of(wpe).size() == 2 && shape_of(wpe)[0] != spec.n_positions)
      disagree(size_field(spec.family, "P"), spec.n_positions, wpe);
  }
  std::set<std::int64_t> layers;
  for (const auto& entry : found)
    if (auto i = layer_index(entry.first)) layers.insert(*i);
  const std::string layers_field = size_field(spec.family, "layers");
  if (layers.empty() && spec.n_layer > 0)
    bad(config_file, layers_field + " = " + std::to_string(spec.n_layer) + ", but " + where.string() +
                         " has no blocks");
  if (!layers.empty() && *layers.rbegin() + 1 != spec.n_layer)
    bad(config_file, layers_field + " = " + std::to_string(spec.n_layer) + ", but " + where.string() +
                         " has blocks h." + std::to_string(*layers.begin()) + " .. h." +
                         std::to_string(*layers.rbegin()));
  // The MLP width, when config.json gives it, against the first block's input projection.
  for (const TensorRule& r : rules) {
    if (r.canonical != "h.0.mlp.c_fc.weight" || (spec.family == "gpt2" && spec.n_inner == 0)) continue;
    const std::string& n = r.hf[0];
    if (!found.count(n) || shape_of(n).size() != 2) break;
    for (std::size_t i = 0; i < 2; ++i)
      if (r.hf_shapes[0][i] == spec.inner() && r.hf_shapes[0][1 - i] == shape_of(n)[1 - i] &&
          shape_of(n)[i] != spec.inner())
        disagree(size_field(spec.family, "inner"), spec.inner(), n);
  }

  // Exactly the expected tensors, each of its exact shape.
  std::vector<std::string> missing, extra;
  for (const std::string& n : expected_names)
    if (!found.count(n)) missing.push_back(n);
  for (const auto& entry : found)
    if (!expected_names.count(entry.first)) extra.push_back(entry.second.stored);
  if (!spec.arch.tied_head && !found.count(fam->head_name()))
    bad(config_file, "tie_word_embeddings is false, but " + where.string() + " has no " + fam->head_name());
  if (!missing.empty()) {
      bad(where, "missing " + std::to_string(missing.size()) + " " + spec.family + " tensor" +
                     (missing.size() > 1 ? "s: " : ": ") + name_list(missing) +
                     (prefix.empty() ? "" : " (with or without the \"" + prefix + "\" prefix)"));
  }
  if (!extra.empty())
    bad(where, "unknown tensor" + std::string(extra.size() > 1 ? "s " : " ") + name_list(extra) + " (not part of " +
                   spec.family + " with these config.json sizes)");
  for (const TensorRule& r : rules)
    for (std::size_t i = 0; i < r.hf.size(); ++i)
      if (shape_of(r.hf[i]) != r.hf_shapes[i]) {
        const bool inner_note = spec.family == "gpt2" && spec.n_inner == 0 && r.canonical.find("mlp.c_") != std::string::npos;
        bad(where, "tensor " + in_quotes(found.at(r.hf[i]).stored) + " has shape " + shape_string(shape_of(r.hf[i])) +
                       ", expected " + shape_string(r.hf_shapes[i]) +
                       (inner_note ? " (config.json n_inner is null: 4 * n_embd)" : ""));
      }

  // A tied head stored anyway must be the token embedding.
  if (stored_head) {
    const Source& e = found.at(wte);
    if (!equal_values(*e.file, e.stored, *stored_head->file, stored_head->stored)) {
      const SafetensorsEntry& a = e.file->entry(e.stored);
      const SafetensorsEntry& b = stored_head->file->entry(stored_head->stored);
      bad(stored_head->file->path(), fam->head_name() + " (" + b.dtype + " " + shape_string(b.shape) +
                                         ") differs from " + in_quotes(e.stored) + " (" + a.dtype + " " +
                                         shape_string(a.shape) + "), but config.json ties them " +
                                         "(tie_word_embeddings true)");
    }
  }

  // Read each file's tensors at once, then convert rule by rule.
  std::map<std::string, Tensor> stored;
  for (const auto& file : tensors.files) {
    std::vector<std::string> names, keys;
    for (const std::string& n : expected_names)
      if (found.at(n).file == file.get()) {
        names.push_back(found.at(n).stored);
        keys.push_back(n);
      }
    std::vector<Tensor> read = file->read_many(names);
    for (std::size_t i = 0; i < keys.size(); ++i) stored.emplace(keys[i], std::move(read[i]));
  }
  std::map<std::string, Shape> canonical_shapes;
  for (const TensorSpec& t : weight_schema(spec)) canonical_shapes[t.name] = t.shape;
  Checkpoint out;
  out.spec = spec;
  out.folder = folder;
  for (const TensorRule& r : rules) {
    std::vector<Tensor> parts;
    for (const std::string& n : r.hf) {
      auto it = stored.find(n);
      parts.push_back(std::move(it->second));
      stored.erase(it);  // each stored tensor is used once; its memory goes as soon as it is converted
    }
    out.weights.set(r.canonical, to_canonical(r, std::move(parts), canonical_shapes.at(r.canonical)));
  }
  check_weights(weight_schema(spec), out.weights, where.string(), /*exact=*/true);
  return out;
}

// ---- saving ----------------------------------------------------------------------------------------------------

namespace {

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

void save_checkpoint(const fs::path& folder, const ModelSpec& spec_in, const WeightSet& weights) {
  const std::string what = "save_checkpoint(" + folder.string() + ")";
  const FamilyAdapter* fam = find_family(spec_in.family);
  if (!fam || !fam->has_checkpoints())
    throw Error(what + ": family is " + in_quotes(spec_in.family) + ", which has no Hugging Face checkpoints");
  ModelSpec spec = spec_in;
  spec.blocks = 0;
  spec.layers.clear();
  spec.seq_len = 0;
  spec.head = Head::none;
  check_spec(spec, what);
  const std::vector<TensorSpec> schema = weight_schema(spec);
  std::vector<std::string> missing, extra;
  std::set<std::string> names;
  for (const TensorSpec& t : schema) {
    names.insert(t.name);
    if (!weights.contains(t.name)) missing.push_back(t.name);
  }
  for (const auto& entry : weights.tensors())
    if (!names.count(entry.first)) extra.push_back(entry.first);
  if (!missing.empty()) throw Error(what + ": the weights lack " + name_list(missing));
  if (!extra.empty()) throw Error(what + ": the weights have unknown tensors " + name_list(extra));
  for (const TensorSpec& t : schema)
    if (weights.get(t.name).shape() != t.shape)
      throw Error(what + ": tensor " + in_quotes(t.name) + " has shape " + shape_string(weights.get(t.name).shape()) +
                  ", expected " + shape_string(t.shape));

  std::map<std::string, Tensor> stored;
  for (const TensorRule& r : fam->tensor_rules(spec)) {
    std::vector<Tensor> parts = to_stored(r, weights.get(r.canonical));
    for (std::size_t i = 0; i < parts.size(); ++i) stored.emplace(r.hf[i], std::move(parts[i]));
  }
  const json config = fam->write_config(spec, weights.get("wte.weight").dtype());
  try {
    fs::create_directories(folder);
  } catch (const fs::filesystem_error& e) {
    throw Error(what + ": cannot create the folder: " + e.code().message());
  }
  write_safetensors(folder / "model.safetensors", stored, {{"format", "pt"}});
  write_text_atomically(folder / "config.json", config.dump(2) + "\n");
}

}  // namespace lminv
