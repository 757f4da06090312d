// Experiment configs: INI files read with Boost.Program_options, plus --set overrides.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/options.hpp"

namespace lminv {

// A config file as written: section -> key -> value, after the --set overrides.
struct RawConfig {
  std::string source;  // the file, for messages
  std::map<std::string, std::map<std::string, std::string>> sections;

  Options section(const std::string& name) const;
};

// Reads FILE. `#` starts a comment anywhere (Boost.Program_options' rule); `;` starts one at the
// beginning of a line or after a space or tab. Keys outside a section, repeated keys and lines
// without '=' are errors naming the file. Each override is "section.key=value" and wins.
RawConfig read_config(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});

// The same from text (for tests and for configs embedded in records).
RawConfig parse_config_text(const std::string& text, const std::string& source,
                            const std::vector<std::string>& overrides = {});

// Ceilings of the [model] sizes (errors name the key): far above any real model, far below an overflow.
inline constexpr std::int64_t kMaxLayers = 4096;
inline constexpr std::int64_t kMaxWidth = std::int64_t{1} << 17;      // n_embd, head_dim
inline constexpr std::int64_t kMaxHeads = 4096;
inline constexpr std::int64_t kMaxInner = std::int64_t{1} << 20;
inline constexpr std::int64_t kMaxVocab = std::int64_t{1} << 24;      // also the largest token id + 1 of a tokenizer
inline constexpr std::int64_t kMaxPositions = std::int64_t{1} << 24;

// One experiment, with every host-level key checked. Plugin sections keep their own keys as Options
// for the plugin to read; the host checks afterwards that nothing unknown was left unread.
struct ExperimentConfig {
  std::string source;
  std::map<std::string, std::map<std::string, std::string>> raw_sections;  // as read, for records

  // [model]
  ModelSpec spec;
  bool vocab_size_explicit = false;  // else the tokenizer's vocabulary size
  bool family_explicit = false;      // [model] family given: a checkpoint of another model_type is an error
  bool no_positions = false;         // [model] positions = none: kept with a checkpoint too (an experiment's choice)
  std::string weights = "random";
  std::uint64_t seed = 0;

  // [backend]: name, dtype, device here; the rest (threads, ...) is the backend's.
  std::string backend = "reference";
  Options backend_options;

  // [prompt]: text, or ids (neither: the prompt is unknown, as for lminv invert; run and forward then refuse)
  std::string prompt_text;
  std::vector<std::int64_t> prompt_ids;
  // A known prefix (a system prompt): text or ids, placed after the tokenizer's special prefix (text prompts) and
  // before the prompt's own tokens; the token searches fix it instead of searching it.
  std::string prefix_text;
  std::vector<std::int64_t> prefix_ids;
  std::string bos = "auto";  // text prompts: auto (the tokenizer's special prefix) | yes (its BOS) | no (nothing)

  // [tokenizer]
  std::string tokenizer_dir;  // empty: the embedded default

  // [optimizer], [decoder]
  std::string optimizer = "descent";
  Options optimizer_options;
  std::string decoder = "pinv";
  Options decoder_options;

  // [model] input = vocab: how the prompt's ids become the vocabulary-space true input [T, V] (the seed study's
  // direct representation): `onehot` is vocab_scale x one-hot (the study's other choice is 10 x one-hot), `pinv` is
  // vocab_scale x W^+ E(a_t), the minimum-norm vectors that wte maps to the tokens' embeddings (the study's
  // a = W^+ E(a_t)).
  std::string vocab_encoding = "onehot";
  double vocab_scale = 1.0;

  // [output]
  std::string output_dir = "runs/default";
  std::vector<std::int64_t> snapshot_steps;  // steps at which the decoded attempt is printed
  double control_sigma = 0.05;               // std of the shifted-input control's noise
  std::string cache_dir;                     // empty: default_cache_dir()
  std::string progress = "auto";             // auto | on | off
  // report.html from the records at the end (lminv report): auto (off for run, on for sweep) | true | false.
  std::string report = "auto";
  // The model whose next token the recovered prompt must agree on: full (every block, ln_f and the LM head) or
  // truncated (the experiment's own blocks and LM head; lm_head_no_ln_f, the seed study's, when its head has none).
  std::string next_token = "full";
};

ExperimentConfig parse_experiment(const RawConfig& raw);

// Throws an Error naming the file, section and keys that nobody read.
void check_all_read(const Options& options);

}  // namespace lminv
