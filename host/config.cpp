#include "config.hpp"
#include "files.hpp"

#include "families/family.hpp"

#include <boost/program_options/parsers.hpp>
#include <boost/program_options/variables_map.hpp>
#include <fstream>
#include <set>
#include <sstream>

namespace lminv {

namespace po = boost::program_options;

namespace {

const std::set<std::string> kSections = {"model",     "backend", "prompt", "tokenizer",
                                          "optimizer", "decoder", "output", "train"};

// Boost.Program_options knows only '#' comments; INI files commonly use ';' too.
std::string strip_semicolon_comments(const std::string& text) {
  std::istringstream in(text);
  std::string out, line;
  while (std::getline(in, line)) {
    for (std::size_t i = 0; i < line.size(); ++i)
      if (line[i] == ';' && (i == 0 || line[i - 1] == ' ' || line[i - 1] == '\t')) {
        line.resize(i);
        break;
      }
    out += line + '\n';
  }
  return out;
}

void set_value(RawConfig& raw, const std::string& dotted, const std::string& value, const std::string& where,
               bool allow_repeat) {
  const std::size_t dot = dotted.find('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == dotted.size())
    throw Error(where + ": '" + dotted + "' is outside a [section]: every key belongs to one of " +
                "[model] [backend] [prompt] [tokenizer] [optimizer] [decoder] [output]");
  const std::string section = dotted.substr(0, dot), key = dotted.substr(dot + 1);
  if (!kSections.count(section)) {
    std::string known;
    for (const std::string& s : kSections) known += " [" + s + "]";
    throw Error(where + ": unknown section [" + section + "] (key '" + key + "'); sections are" + known);
  }
  auto& keys = raw.sections[section];
  if (!allow_repeat && keys.count(key)) throw Error(where + ": [" + section + "] " + key + " is given twice");
  keys[key] = value;
}

}  // namespace

Options RawConfig::section(const std::string& name) const {
  auto it = sections.find(name);
  return Options(name, source, it == sections.end() ? std::map<std::string, std::string>{} : it->second);
}

RawConfig parse_config_text(const std::string& text, const std::string& source,
                            const std::vector<std::string>& overrides) {
  RawConfig raw;
  raw.source = source;
  std::istringstream in(strip_semicolon_comments(text));
  po::parsed_options parsed(nullptr);
  try {
    parsed = po::parse_config_file(in, po::options_description(), /*allow_unregistered=*/true);
  } catch (const po::invalid_config_file_syntax& e) {
    // Not e.what(): Boost substitutes the line into its message in a loop that never ends when the line itself
    // holds "%invalid_line%" (found by fuzz/config_fuzz). The same words, built here.
    throw Error(source + ": the options configuration file contains an invalid line '" + e.tokens() + "'");
  } catch (const po::error& e) {
    throw Error(source + ": " + e.what());
  }
  for (const po::option& opt : parsed.options) {
    const std::string value = opt.value.empty() ? std::string() : opt.value.front();
    set_value(raw, opt.string_key, value, source, /*allow_repeat=*/false);
  }
  for (const std::string& o : overrides) {
    const std::size_t eq = o.find('=');
    if (eq == std::string::npos) throw Error("--set '" + o + "': expected section.key=value");
    set_value(raw, o.substr(0, eq), o.substr(eq + 1), "--set '" + o + "'", /*allow_repeat=*/true);
  }
  return raw;
}

RawConfig read_config(const std::filesystem::path& file, const std::vector<std::string>& overrides) {
  return parse_config_text(read_regular_file(file, "the config file", max_bytes::kConfig), file.string(), overrides);
}

void check_all_read(const Options& options) {
  const std::vector<std::string> unread = options.unread_keys();
  if (unread.empty()) return;
  std::string keys;
  for (const std::string& k : unread) keys += (keys.empty() ? "" : ", ") + k + " = '" + options.values().at(k) + "'";
  throw Error(options.source() + ": unknown key" + (unread.size() > 1 ? "s" : "") + " in [" + options.section() +
              "]: " + keys);
}

ExperimentConfig parse_experiment(const RawConfig& raw) {
  ExperimentConfig c;
  c.source = raw.source;
  c.raw_sections = raw.sections;

  const Options model = raw.section("model");
  ModelSpec& s = c.spec;
  c.family_explicit = model.has("family");
  s.family = model.get_string("family", s.family);
  if (!find_family(s.family)) {
    std::string list;
    for (const std::string& n : family_names()) list += (list.empty() ? "" : " | ") + n;
    model.fail("family", "expected one of " + list);
  }
  const FamilyAdapter& fam = family(s.family);
  fam.set_architecture(s);  // the family's setting; the keys below may change single fields
  c.weights = model.get_string("weights", c.weights);
  const bool random = c.weights == "random";
  const std::int64_t seed = model.get_int("seed", 0);
  if (seed < 0) model.fail("seed", "must be >= 0");
  c.seed = static_cast<std::uint64_t>(seed);
  // Each size has a ceiling far above any real model's (GPT-2 xl: 48 layers, d 1600; Llama 3 405B: 126 layers,
  // d 16384, vocabulary 128256), so that a typing slip is an error naming the key, not a failed allocation later.
  auto positive = [&](const char* key, std::int64_t fallback, std::int64_t most) {
    const std::int64_t v = model.get_int(key, fallback);
    if (v <= 0) model.fail(key, "must be positive");
    if (v > most) model.fail(key, std::to_string(v) + " is beyond lminv's limit of " + std::to_string(most));
    return v;
  };
  s.n_layer = positive("n_layer", s.n_layer, kMaxLayers);
  s.n_embd = positive("n_embd", s.n_embd, kMaxWidth);
  s.n_head = positive("n_head", s.n_head, kMaxHeads);
  s.n_inner = model.get_int("n_inner", s.n_inner);
  if (s.n_inner < 0) model.fail("n_inner", "must be >= 0 (0: 4 * n_embd)");
  if (s.n_inner > kMaxInner) model.fail("n_inner", std::to_string(s.n_inner) + " is beyond lminv's limit of " +
                                                      std::to_string(kMaxInner));
  c.vocab_size_explicit = model.has("vocab_size");
  s.vocab_size = positive("vocab_size", s.vocab_size, kMaxVocab);
  s.n_positions = positive("n_positions", s.n_positions, kMaxPositions);

  // Architecture fields (docs/families.md): for models made here; a checkpoint's config.json sets its own.
  Architecture& a = s.arch;
  const std::vector<std::string> arch_keys = {"norm", "norm_bias", "norm_eps", "layer_norm_epsilon", "positions",
                                              "rope_theta", "rotary_fraction", "n_kv_head", "head_dim", "qkv_bias",
                                              "attn_out_bias", "mlp", "mlp_bias", "residual", "tied_head"};
  // With a checkpoint its config.json wins over these keys, as over the size keys.
  for (const std::string& key : arch_keys)
    if (model.has(key) && fam.kind() != ModelKind::decoder)
      model.fail(key, "applies to decoder families, not " + s.family);
  if (!random && !fam.has_checkpoints())
    model.fail("weights", "family " + s.family + " has no Hugging Face checkpoints (use weights = random)");
  a.norm = *parse_norm(model.get_choice("norm", norm_name(a.norm), {"layer_norm", "rms_norm"}));
  a.norm_bias = model.get_bool("norm_bias", a.norm == Norm::layer_norm && a.norm_bias);
  if (a.norm_bias && a.norm == Norm::rms_norm) model.fail("norm_bias", "rms_norm has no bias");
  a.norm_eps = model.get_double(model.has("layer_norm_epsilon") ? "layer_norm_epsilon" : "norm_eps", a.norm_eps);
  if (!(a.norm_eps > 0)) model.fail(model.has("layer_norm_epsilon") ? "layer_norm_epsilon" : "norm_eps", "must be positive");
  a.positions =
      *parse_positions(model.get_choice("positions", positions_name(a.positions), {"learned", "rotary", "none"}));
  c.no_positions = a.positions == Positions::none;
  a.rope_theta = model.get_double("rope_theta", a.rope_theta);
  if (!(a.rope_theta > 0)) model.fail("rope_theta", "must be positive");
  a.rotary_fraction = model.get_double("rotary_fraction", a.rotary_fraction);
  if (!(a.rotary_fraction > 0 && a.rotary_fraction <= 1)) model.fail("rotary_fraction", "must be in (0, 1]");
  a.n_kv_head = model.get_int("n_kv_head", a.n_kv_head);
  if (a.n_kv_head < 0 || (a.n_kv_head > 0 && s.n_head % a.n_kv_head != 0))
    model.fail("n_kv_head", "must divide n_head (" + std::to_string(s.n_head) + "), or be 0 for n_head");
  a.head_dim = model.get_int("head_dim", a.head_dim);
  if (a.head_dim < 0) model.fail("head_dim", "must be >= 0 (0: n_embd / n_head)");
  if (a.head_dim > kMaxWidth) model.fail("head_dim", "beyond lminv's limit of " + std::to_string(kMaxWidth));
  a.qkv_bias = model.get_bool("qkv_bias", a.qkv_bias);
  a.attn_out_bias = model.get_bool("attn_out_bias", a.attn_out_bias);
  a.mlp = *parse_mlp(model.get_choice("mlp", mlp_name(a.mlp), {"gelu_tanh", "gelu_erf", "swiglu"}));
  a.mlp_bias = model.get_bool("mlp_bias", a.mlp_bias);
  a.residual = *parse_residual(model.get_choice("residual", residual_name(a.residual), {"sequential", "parallel"}));
  a.tied_head = model.get_bool("tied_head", a.tied_head);

  // With a checkpoint, blocks and layers are checked against its layer count once its config.json is read.
  s.blocks = model.get_int("blocks", s.blocks);
  if (s.blocks < 0 || (random && s.blocks > s.n_layer))
    model.fail("blocks", "must be in 0..n_layer (" + std::to_string(s.n_layer) + ")");
  s.head = *parse_head(model.get_choice("head", head_name(s.head), {"none", "ln_f", "lm_head", "lm_head_no_ln_f"}));
  s.input = *parse_input_space(model.get_choice("input", input_space_name(s.input), {"embedding", "vocab"}));
  c.vocab_encoding = model.get_choice("vocab_encoding", c.vocab_encoding, {"onehot", "pinv"});
  c.vocab_scale = model.get_double("vocab_scale", c.vocab_scale);
  if (!(c.vocab_scale > 0) || !std::isfinite(c.vocab_scale)) model.fail("vocab_scale", "must be a positive number");
  for (const char* key : {"vocab_encoding", "vocab_scale"})
    if (model.has(key) && s.input != InputSpace::vocab) model.fail(key, "applies to input = vocab only");
  s.layers = model.get_ints("layers", {});
  for (std::int64_t l : s.layers)
    if (l < 0 || (random && l > s.n_layer)) model.fail("layers", "each entry must be in 0..n_layer");
  s.dropout = model.get_double("dropout", s.dropout);
  if (!(s.dropout >= 0 && s.dropout < 1)) model.fail("dropout", "must be in [0, 1) (0: off, as in evaluation)");
  if (s.dropout > 0 && fam.kind() != ModelKind::decoder)
    model.fail("dropout", "applies to decoder families, not " + s.family);
  s.dropout_seed = c.seed;  // the masks' generator: the model's seed, so a config's run is repeatable
  check_all_read(model);

  Options backend = raw.section("backend");
  c.backend = backend.get_string("name", c.backend);
  const std::string dtype = backend.get_choice("dtype", dtype_name(s.dtype), {"f32", "f64", "bf16"});
  s.dtype = *parse_dtype(dtype);
  s.device = backend.get_choice("device", s.device, {"cpu", "cuda"});
  s.weight_dtype = *parse_weight_dtype(backend.get_choice("weight_dtype", weight_dtype_name(s.weight_dtype),
                                                          {"same", "int8"}));
  if (s.weight_dtype != WeightDType::same && fam.kind() != ModelKind::decoder)
    backend.fail("weight_dtype", "int8 applies to decoder families (their block weights), not " + s.family);
  c.backend_options = backend;  // the backend reads the rest; the read marks travel with the copy

  const Options prompt = raw.section("prompt");
  c.prompt_text = prompt.get_string("text", "");
  c.prompt_ids = prompt.get_ints("ids", {});
  if (!c.prompt_text.empty() && !c.prompt_ids.empty()) prompt.fail("ids", "give one of text or ids, not both");
  for (std::int64_t id : c.prompt_ids)
    if (id < 0) prompt.fail("ids", "token ids are >= 0");
  c.prefix_text = prompt.get_string("prefix", "");
  c.prefix_ids = prompt.get_ints("prefix_ids", {});
  if (!c.prefix_text.empty() && !c.prefix_ids.empty()) prompt.fail("prefix_ids", "give one of prefix or prefix_ids");
  for (std::int64_t id : c.prefix_ids)
    if (id < 0) prompt.fail("prefix_ids", "token ids are >= 0");
  c.bos = prompt.get_choice("bos", c.bos, {"auto", "yes", "no"});
  check_all_read(prompt);

  const Options tokenizer = raw.section("tokenizer");
  c.tokenizer_dir = tokenizer.get_string("path", "");
  check_all_read(tokenizer);

  Options optimizer = raw.section("optimizer");
  c.optimizer = optimizer.get_string("name", c.optimizer);
  c.optimizer_options = optimizer;
  Options decoder = raw.section("decoder");
  c.decoder = decoder.get_string("name", c.decoder);
  c.decoder_options = decoder;

  const Options output = raw.section("output");
  c.output_dir = output.get_string("dir", c.output_dir);
  c.snapshot_steps = output.get_ints("snapshot_steps", {});
  c.control_sigma = output.get_double("control_sigma", c.control_sigma);
  if (!(c.control_sigma >= 0)) output.fail("control_sigma", "must be >= 0");
  c.cache_dir = output.get_string("cache_dir", "");
  c.progress = output.get_choice("progress", c.progress, {"auto", "on", "lines", "off"});
  c.next_token = output.get_choice("next_token", c.next_token, {"full", "truncated"});
  c.report = output.get_choice("report", c.report, {"auto", "true", "false"});
  check_all_read(output);
  return c;
}

}  // namespace lminv
