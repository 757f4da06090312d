#include "states.hpp"
#include "files.hpp"
#include "json_depth.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <sstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "npy.hpp"
#include "safetensors.hpp"

namespace lminv {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string in_quotes(const std::string& s) {
  return "'" + s + "'";
}

std::string lower_extension(const fs::path& file) {
  std::string ext = file.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

enum class Format { safetensors, npy, npz };

// By the extension; another extension by the file's first bytes (safetensors has no magic: it is what is left).
Format format_of(const fs::path& file) {
  // Before any byte is read (sniffing a FIFO's content would wait for a writer, a device's never end).
  require_regular_file(file, "the states file", max_bytes::kStates);
  const std::string ext = lower_extension(file);
  if (ext == ".safetensors") return Format::safetensors;
  if (ext == ".npy") return Format::npy;
  if (ext == ".npz") return Format::npz;
  if (looks_like_npy(file)) return Format::npy;
  if (looks_like_zip(file)) return Format::npz;
  return Format::safetensors;
}

std::string list_names(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + in_quotes(n);
  return s;
}

// A tensor as read, before the states checks.
struct RawTensor {
  std::string name;
  std::string stored_dtype;
  Tensor values;  // any rank; f32 or f64
};

// A states file of any format, opened: its tensor names, metadata, and a reader for one tensor.
class StatesFile {
 public:
  explicit StatesFile(const fs::path& file) : file_(file), format_(format_of(file)) {
    switch (format_) {
      case Format::safetensors:
        st_ = std::make_unique<SafetensorsFile>(file);
        for (const auto& [name, entry] : st_->entries()) names_.push_back(name);
        metadata_ = st_->metadata();
        break;
      case Format::npz:
        npz_ = std::make_unique<NpzFile>(file);
        names_ = npz_->names();
        break;
      case Format::npy: names_.push_back(""); break;
    }
  }

  Format format() const { return format_; }
  const std::vector<std::string>& names() const { return names_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return std::find(names_.begin(), names_.end(), name) != names_.end(); }
  const char* noun() const { return format_ == Format::npz ? "array" : "tensor"; }

  // `name` empty: the only tensor, else "output"; an Error listing the names otherwise.
  std::string choose(const std::string& name) const {
    if (format_ == Format::npy) {
      if (!name.empty())
        throw Error(file_.string() + ": a .npy file holds one unnamed array; there is no tensor " + in_quotes(name) +
                    " to choose (names apply to safetensors and .npz files)");
      return "";
    }
    if (!name.empty()) {
      if (!contains(name))
        throw Error(file_.string() + ": no " + noun() + " " + in_quotes(name) + " (the file holds " +
                    list_names(names_) + ")");
      return name;
    }
    if (names_.size() == 1) return names_.front();
    if (names_.empty()) throw Error(file_.string() + ": the file holds no " + noun() + "s");
    if (contains("output")) return "output";
    throw Error(file_.string() + ": the file holds several " + noun() + "s (" + list_names(names_) +
                ") and none is called 'output': name the one that holds the states");
  }

  RawTensor read(const std::string& name) const {
    RawTensor raw;
    raw.name = name;
    switch (format_) {
      case Format::safetensors: {
        raw.stored_dtype = st_->entry(name).dtype;
        raw.values = st_->read(name);
        if (raw.values.dtype() == DType::bf16) raw.values = raw.values.to(DType::f32);  // exact: bf16 is f32's top
        break;
      }
      case Format::npz: {
        NpyArray a = npz_->read(name);
        raw.stored_dtype = a.stored_dtype;
        raw.values = std::move(a.values);
        break;
      }
      case Format::npy: {
        NpyArray a = read_npy(file_);
        raw.stored_dtype = a.stored_dtype;
        raw.values = std::move(a.values);
        break;
      }
    }
    return raw;
  }

 private:
  fs::path file_;
  Format format_;
  std::unique_ptr<SafetensorsFile> st_;
  std::unique_ptr<NpzFile> npz_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

std::string where_of(const fs::path& file, const std::string& name) {
  if (name.empty()) return file.string();
  return file.string() + ": " + (lower_extension(file) == ".npz" ? "array " : "tensor ") + in_quotes(name);
}

// A JSON list of non-negative integers; `what` names it in the Error.
std::vector<std::int64_t> id_list(const json& v, const std::string& what) {
  if (!v.is_array()) throw Error(what + " is not a list of token ids: " + v.dump());
  std::vector<std::int64_t> ids;
  for (const json& id : v) {
    if (!id.is_number_integer() || (id.is_number_integer() && !id.is_number_unsigned() && id.get<std::int64_t>() < 0) ||
        (id.is_number_unsigned() && id.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX)))
      throw Error(what + ": " + id.dump() + " is not a token id (a non-negative integer)");
    ids.push_back(id.get<std::int64_t>());
  }
  return ids;
}

json parse_json_metadata(const fs::path& file, const std::string& key, const std::string& text) {
  try {
    return json::parse(text, json_depth_limit(file.string() + ": metadata " + in_quotes(key)));
  } catch (const json::exception&) {
    throw Error(file.string() + ": metadata " + in_quotes(key) + " = " + in_quotes(text) + " is not valid JSON");
  }
}

// blocks and head from the file's metadata.
void read_layer_metadata(const fs::path& file, const std::map<std::string, std::string>& metadata, CapturedStates& s) {
  if (auto it = metadata.find("blocks"); it != metadata.end()) {
    const std::string& text = it->second;
    const bool digits = !text.empty() && text.size() <= 18 &&
                        std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); });
    if (!digits)
      throw Error(file.string() + ": metadata 'blocks' = " + in_quotes(text) + " is not a non-negative integer");
    s.blocks = std::stoll(text);
  }
  if (auto it = metadata.find("head"); it != metadata.end()) {
    if (!parse_head(it->second))
      throw Error(file.string() + ": metadata 'head' = " + in_quotes(it->second) +
                  " is not none, ln_f, lm_head or lm_head_no_ln_f");
    s.head = it->second;
  }
}

// [T, D] from [T, D] or [1, T, D]; every other shape, T = 0 and D = 0 are Errors.
Tensor one_prompt(Tensor t, const std::string& where) {
  if (t.rank() == 3 && t.dim(0) != 1)
    throw Error(where + ": shape " + shape_string(t.shape()) + " holds " + std::to_string(t.dim(0)) +
                " prompts; states of one prompt are [T, D] or [1, T, D] (a stacked [N, T, D] tensor is a set of "
                "captured states, for lminv sweep --states)");
  if (t.rank() != 2 && t.rank() != 3)
    throw Error(where + ": shape " + shape_string(t.shape()) + " has rank " + std::to_string(t.rank()) +
                "; states are [T, D] or [1, T, D] (T positions of D features)");
  if (t.rank() == 3) t = std::move(t).reshape({t.dim(1), t.dim(2)});
  if (t.dim(0) == 0) throw Error(where + ": shape " + shape_string(t.shape()) + " has no positions (T = 0)");
  if (t.dim(1) == 0) throw Error(where + ": shape " + shape_string(t.shape()) + " has no features (D = 0)");
  return t;
}

template <class T>
void check_finite_values(const T* v, std::int64_t rows, std::int64_t cols, const std::string& where) {
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t j = 0; j < cols; ++j) {
      const T x = v[t * cols + j];
      if (!std::isfinite(x))
        throw Error(where + ": entry at position t = " + std::to_string(t) + ", feature j = " + std::to_string(j) +
                    " is " +
                    (std::isnan(x) ? "NaN"
                     : x > 0       ? "+Inf"
                                   : "-Inf") +
                    "; captured states must be finite");
    }
}

void check_finite(const Tensor& states, const std::string& where) {
  if (states.dtype() == DType::f64)
    check_finite_values(states.data<double>(), states.dim(0), states.dim(1), where);
  else
    check_finite_values(states.data<float>(), states.dim(0), states.dim(1), where);
}

// The entry with its states checked and its metadata parsed (prompt_ids are the caller's).
CapturedStates make_entry(const fs::path& file, const std::string& name, const std::string& stored_dtype, Tensor values,
                          const std::map<std::string, std::string>& metadata) {
  CapturedStates s;
  s.file = file;
  s.name = name;
  s.stored_dtype = stored_dtype;
  s.rounding = stored_rounding(stored_dtype);
  s.metadata = metadata;
  read_layer_metadata(file, metadata, s);
  s.states = std::move(values);
  check_finite(s.states, s.where());
  return s;
}

void set_prompt_ids(CapturedStates& s, std::vector<std::int64_t> ids, const std::string& what) {
  if (!ids.empty() && static_cast<std::int64_t>(ids.size()) != s.positions())
    throw Error(s.where() + ": " + what + " has " + std::to_string(ids.size()) + " ids but the states have " +
                std::to_string(s.positions()) + " positions");
  s.prompt_ids = std::move(ids);
}

// Natural order: runs of digits compare by value ("2" < "10"), the rest by character; ties by plain order.
bool natural_less(const std::string& a, const std::string& b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i])), db = std::isdigit(static_cast<unsigned char>(b[j]));
    if (da && db) {
      std::size_t ei = i, ej = j;
      while (ei < a.size() && std::isdigit(static_cast<unsigned char>(a[ei]))) ++ei;
      while (ej < b.size() && std::isdigit(static_cast<unsigned char>(b[ej]))) ++ej;
      std::size_t si = i, sj = j;  // skip leading zeros, then the longer run is the larger number
      while (si + 1 < ei && a[si] == '0') ++si;
      while (sj + 1 < ej && b[sj] == '0') ++sj;
      if (ei - si != ej - sj) return ei - si < ej - sj;
      const int c = a.compare(si, ei - si, b, sj, ej - sj);
      if (c != 0) return c < 0;
      i = ei;
      j = ej;
      continue;
    }
    if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
    ++i;
    ++j;
  }
  if ((i == a.size()) != (j == b.size())) return i == a.size();
  return a < b;
}

// One model inverts a whole set: every entry has the same D, and the entries that name their layer (blocks, head)
// name the same one, which the entries without metadata (npy, npz) then take.
void check_set(std::vector<CapturedStates>& set) {
  const CapturedStates& first = set.front();
  const CapturedStates* blocks = nullptr;
  const CapturedStates* head = nullptr;
  for (const CapturedStates& s : set) {
    if (s.width() != first.width())
      throw Error(s.where() + ": " + std::to_string(s.width()) + " features wide, but " + first.where() + " is " +
                  std::to_string(first.width()) + " wide: every entry of a set must have the same D");
    if (s.blocks && blocks && *s.blocks != *blocks->blocks)
      throw Error(s.where() + ": metadata 'blocks' " + std::to_string(*s.blocks) + ", but " + blocks->where() +
                  " has " + std::to_string(*blocks->blocks) + ": every entry of a set must come from the same layer");
    if (s.head && head && *s.head != *head->head)
      throw Error(s.where() + ": metadata 'head' " + *s.head + ", but " + head->where() + " has " + *head->head +
                  ": every entry of a set must come from the same layer");
    if (s.blocks && !blocks) blocks = &s;
    if (s.head && !head) head = &s;
  }
  const std::optional<std::int64_t> set_blocks = blocks ? blocks->blocks : std::nullopt;
  const std::optional<std::string> set_head = head ? head->head : std::nullopt;
  for (CapturedStates& s : set) {
    s.blocks = set_blocks;
    s.head = set_head;
  }
}

std::vector<CapturedStates> read_manifest(const fs::path& manifest) {
  std::istringstream in(read_regular_file(manifest, "the states manifest", max_bytes::kPrompts));
  std::vector<CapturedStates> set;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    const std::string at = manifest.string() + ":" + std::to_string(number);
    if (std::all_of(line.begin(), line.end(), [](unsigned char c) { return std::isspace(c); })) continue;
    json entry;
    try {
      entry = json::parse(line, json_depth_limit(at));
    } catch (const json::exception&) {
      throw Error(at + ": not a JSON object");
    }
    if (!entry.is_object()) throw Error(at + ": not a JSON object but " + entry.dump());
    for (const auto& [key, value] : entry.items())
      if (key != "states" && key != "name" && key != "ids" && key != "text")
        throw Error(at + ": unknown key " + in_quotes(key) + " (a line holds states, and optionally name, ids, text)");
    if (!entry.contains("states") || !entry["states"].is_string() || entry["states"].get<std::string>().empty())
      throw Error(at + ": no \"states\": \"FILE\" (the states file, relative to the manifest's folder)");
    if (entry.contains("name") && !entry["name"].is_string()) throw Error(at + ": \"name\" is not a string");
    if (entry.contains("text") && !entry["text"].is_string()) throw Error(at + ": \"text\" is not a string");
    fs::path file = entry["states"].get<std::string>();
    if (file.is_relative()) file = manifest.parent_path() / file;
    CapturedStates s;
    try {
      s = read_states(file, entry.value("name", std::string()));
    } catch (const Error& e) {
      throw Error(at + ": " + e.what());
    }
    if (entry.contains("ids")) {
      const std::vector<std::int64_t> ids = id_list(entry["ids"], at + ": \"ids\"");
      if (!s.prompt_ids.empty() && s.prompt_ids != ids)
        throw Error(at + ": \"ids\" " + json(ids).dump() + " disagree with the prompt_ids metadata of " + s.where() +
                    ": " + json(s.prompt_ids).dump());
      try {
        set_prompt_ids(s, ids, "\"ids\" of line " + std::to_string(number) + " of " + manifest.string());
      } catch (const Error& e) {
        throw Error(at + ": " + e.what());
      }
    }
    set.push_back(std::move(s));
  }
  if (set.empty()) throw Error(manifest.string() + ": the states manifest has no entries");
  return set;
}

}  // namespace

std::string CapturedStates::where() const {
  return where_of(file, name);
}

double stored_rounding(const std::string& stored_dtype) {
  if (stored_dtype == "F64") return std::ldexp(1.0, -53);
  if (stored_dtype == "F32") return std::ldexp(1.0, -24);
  if (stored_dtype == "F16") return std::ldexp(1.0, -11);
  if (stored_dtype == "BF16") return std::ldexp(1.0, -8);
  throw Error("stored dtype " + in_quotes(stored_dtype) + " is not F64, F32, F16 or BF16");
}

CapturedStates read_states(const fs::path& file, const std::string& name) {
  const StatesFile f(file);
  const std::string chosen = f.choose(name);
  RawTensor raw = f.read(chosen);
  const std::string where = where_of(file, chosen);
  CapturedStates s = make_entry(file, chosen, raw.stored_dtype, one_prompt(std::move(raw.values), where), f.metadata());
  if (auto it = f.metadata().find("prompt_ids"); it != f.metadata().end()) {
    const json ids = parse_json_metadata(file, "prompt_ids", it->second);
    const std::string what = "metadata 'prompt_ids'";
    // A flat list, or a list of one list (a set of one, as a stacked writer makes it).
    if (ids.is_array() && ids.size() == 1 && ids[0].is_array())
      set_prompt_ids(s, id_list(ids[0], file.string() + ": " + what), what);
    else
      set_prompt_ids(s, id_list(ids, file.string() + ": " + what), what);
  }
  return s;
}

std::vector<CapturedStates> read_states_set(const fs::path& file) {
  if (lower_extension(file) == ".jsonl") {
    std::vector<CapturedStates> set = read_manifest(file);
    check_set(set);
    return set;
  }
  const StatesFile f(file);
  std::vector<CapturedStates> set;
  const bool one_tensor = f.names().size() == 1 || f.contains("output");
  if (f.names().empty()) throw Error(file.string() + ": the file holds no tensors");

  if (one_tensor) {
    // One tensor: [T, D] or [1, T, D] (a set of one) or [N, T, D].
    const std::string chosen = f.choose("");
    RawTensor raw = f.read(chosen);
    const std::string where = where_of(file, chosen);
    if (raw.values.rank() != 3) return {read_states(file, chosen)};
    const Tensor& all = raw.values;
    const std::int64_t n = all.dim(0);
    if (n == 0) throw Error(where + ": shape " + shape_string(all.shape()) + " holds no prompts (N = 0)");
    std::vector<std::vector<std::int64_t>> ids(static_cast<std::size_t>(n));
    if (auto it = f.metadata().find("prompt_ids"); it != f.metadata().end()) {
      const json list = parse_json_metadata(file, "prompt_ids", it->second);
      const std::string what = file.string() + ": metadata 'prompt_ids'";
      if (n == 1 && list.is_array() && (list.empty() || !list[0].is_array())) {
        ids[0] = id_list(list, what);
      } else {
        if (!list.is_array() || static_cast<std::int64_t>(list.size()) != n)
          throw Error(what + " is not a list of " + std::to_string(n) + " lists of token ids, one per prompt of " +
                      shape_string(all.shape()));
        for (std::int64_t i = 0; i < n; ++i) ids[i] = id_list(list[i], what + "[" + std::to_string(i) + "]");
      }
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const std::string name = chosen + "[" + std::to_string(i) + "]";
      Tensor one = all.slice0(i, i + 1);
      CapturedStates s =
          make_entry(file, name, raw.stored_dtype, one_prompt(std::move(one), where_of(file, name)), f.metadata());
      set_prompt_ids(s, ids[i], "metadata 'prompt_ids'[" + std::to_string(i) + "]");
      set.push_back(std::move(s));
    }
  } else {
    // Several tensors, one prompt each, in natural name order.
    std::vector<std::string> names = f.names();
    std::sort(names.begin(), names.end(), natural_less);
    for (const std::string& name : names) {
      RawTensor raw = f.read(name);
      const std::string where = where_of(file, name);
      CapturedStates s =
          make_entry(file, name, raw.stored_dtype, one_prompt(std::move(raw.values), where), f.metadata());
      const std::string key = name + ".prompt_ids";
      if (auto it = f.metadata().find(key); it != f.metadata().end())
        set_prompt_ids(
            s, id_list(parse_json_metadata(file, key, it->second), file.string() + ": metadata " + in_quotes(key)),
            "metadata " + in_quotes(key));
      set.push_back(std::move(s));
    }
  }
  check_set(set);
  return set;
}

void check_states(const CapturedStates& s, std::int64_t width, std::int64_t max_positions,
                  const std::string& what_model) {
  if (s.states.rank() != 2)
    throw Error(s.where() + ": states of shape " + shape_string(s.states.shape()) + " are not [T, D]");
  if (s.width() != width)
    throw Error(s.where() + ": the states are D = " + std::to_string(s.width()) + " features wide, but " + what_model +
                " gives outputs of width " + std::to_string(width) + " (wrong model or layer?)");
  if (s.positions() < 1) throw Error(s.where() + ": the states have no positions (T = 0)");
  if (s.positions() > max_positions)
    throw Error(s.where() + ": the states have T = " + std::to_string(s.positions()) + " positions, more than the " +
                std::to_string(max_positions) + " that " + what_model + " takes");
}

}  // namespace lminv
