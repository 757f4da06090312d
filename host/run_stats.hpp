// Figures over a set of run records: what `lminv sweep` prints per grid point and `lminv report` plots.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <vector>

namespace lminv {

// The number at PATH in a record (e.g. {"time_s", "optimize"}), or `fallback` when any step is missing or the value
// is not a number (null, as NaN is written).
double number_at(const nlohmann::json& j, std::initializer_list<const char*> path, double fallback = NAN);

// Mean, median and maximum of the finite values (NaN each when there are none).
struct Stats {
  double mean = NAN, median = NAN, max = NAN;
};
Stats stats_of(std::vector<double> values);

// The summary of some runs (one grid point of a sweep): runs; of those whose prompt is known (exact_match is a
// boolean), the exact-match rate and mean token accuracy; of those with a certificate, the share certified unique;
// the inversion time per prompt (time_s.optimize) and candidates verified per position (values.candidates_per_position).
struct RunsSummary {
  std::size_t runs = 0, with_truth = 0, certified = 0;
  double exact_match_rate = NAN, token_accuracy = NAN, unique_rate = NAN;
  Stats time_per_prompt, candidates_per_position;

  // As sweep's summary.json writes it: rates and statistics, null where there is nothing to count.
  nlohmann::json json() const;
};
RunsSummary summarize_runs(const std::vector<const nlohmann::json*>& records);

}  // namespace lminv
