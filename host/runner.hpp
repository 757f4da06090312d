// One experiment, end to end: tokens -> weights -> model -> target -> optimizer -> decoder -> metrics.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config.hpp"
#include "registry.hpp"

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

}  // namespace lminv
