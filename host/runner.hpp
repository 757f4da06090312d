// One experiment, end to end: tokens -> weights -> model -> target -> optimizer -> decoder -> metrics.
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config.hpp"
#include "registry.hpp"
#include "report.hpp"
#include "tokenizer.hpp"

namespace lminv {

struct RunSummary {
  std::vector<std::int64_t> prompt_ids;
  std::vector<std::int64_t> decoded_ids;
  std::string decoded_text;
  bool exact_match = false;
  double token_accuracy = 0;
  double final_loss = 0;
  nlohmann::json record;  // what was appended to <output.dir>/records.jsonl
};

// Runs the experiment, printing its progress and summary to `out`. Every plugin is made and
// configured before anything expensive, so a bad option fails at once.
RunSummary run_experiment(const ExperimentConfig& config, const Registry& registry, std::ostream& out);

// States captured elsewhere, as lminv invert hands them to a session.
struct CapturedTarget {
  Tensor states;                        // [T, D]
  double rounding = 0;                  // relative rounding of the stored dtype (Problem::target_rounding)
  std::string stored_dtype;             // "F32", "BF16", ...
  std::string source;                   // "FILE" or "FILE:NAME", for records and messages
  std::vector<std::int64_t> true_ids;   // the prompt that made them, when the file says (reports only)
};

class ExperimentFactory;
class Backend;
class Optimizer;
class Decoder;

// One config run on many prompts (lminv sweep): plugins made and configured once, weights and models made once
// (experiment.hpp's ExperimentFactory), the decoder prepared on the first run.
class ExperimentSession {
 public:
  ExperimentSession(const ExperimentConfig& config, const Registry& registry);
  ~ExperimentSession();

  const ExperimentConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const;
  std::int64_t vocab_size() const;

  // Runs the prompt. With `quiet`, prints nothing (the caller reports); else the run's header, steps and summary.
  // The record gets the fields of `extra` and is appended to `records` (when null, the caller does: a sweep's rank
  // sends it to the rank that writes).
  RunSummary run(const std::vector<std::int64_t>& ids, std::ostream& out, bool quiet,
                 RecordsFile* records, const nlohmann::json& extra = nlohmann::json::object());

  // Inverts states captured elsewhere (lminv invert): the prompt is unknown, T comes from the states, the config's
  // known prefix (BOS, [prompt] prefix) is fixed and checked. The optimizer must be a token search (sequential,
  // brute_force). Prints the certificate table unless quiet; the record (prompt unknown: no control, no exact
  // match unless the file gave the true ids) is appended to `records` (or left to the caller, as for run).
  RunSummary invert(const CapturedTarget& target, std::ostream& out, bool quiet, RecordsFile* records,
                    const nlohmann::json& extra = nlohmann::json::object());

  // The width D of the model's output rows (n_embd, the vocabulary for lm_head, more with extra layers).
  std::int64_t output_width();
  // The longest sequence the model takes (n_positions; from the checkpoint when there is one).
  std::int64_t max_positions();

 private:
  ExperimentConfig config_;
  std::shared_ptr<Backend> backend_;
  std::shared_ptr<Optimizer> optimizer_;
  std::shared_ptr<Decoder> decoder_;
  std::unique_ptr<ExperimentFactory> factory_;
  bool decoder_prepared_ = false;
  double prepare_seconds_ = 0;
  std::unique_ptr<Model> next_model_;  // the decoder next-token agreement is measured on ([output] next_token)
};

}  // namespace lminv
