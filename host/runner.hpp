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
  // The record gets the fields of `extra` and is appended to `records`.
  RunSummary run(const std::vector<std::int64_t>& ids, std::ostream& out, bool quiet,
                 const std::filesystem::path& records, const nlohmann::json& extra = nlohmann::json::object());

 private:
  ExperimentConfig config_;
  std::shared_ptr<Backend> backend_;
  std::shared_ptr<Optimizer> optimizer_;
  std::shared_ptr<Decoder> decoder_;
  std::unique_ptr<ExperimentFactory> factory_;
  bool decoder_prepared_ = false;
  double prepare_seconds_ = 0;
  std::unique_ptr<Model> full_model_;  // the whole decoder with its head, for next-token agreement
};

}  // namespace lminv
