#include "run_stats.hpp"

#include <algorithm>
#include <cmath>

namespace lminv {

double number_at(const nlohmann::json& j, std::initializer_list<const char*> path, double fallback) {
  const nlohmann::json* p = &j;
  for (const char* k : path) {
    if (!p->is_object() || !p->contains(k)) return fallback;
    p = &(*p)[k];
  }
  return p->is_number() ? p->get<double>() : fallback;
}

Stats stats_of(std::vector<double> v) {
  v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return !std::isfinite(x); }), v.end());
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  Stats s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  const std::size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  s.max = v.back();
  return s;
}

RunsSummary summarize_runs(const std::vector<const nlohmann::json*>& records) {
  RunsSummary s;
  std::vector<double> times, per_position;
  double exact = 0, accuracy = 0, unique = 0;
  for (const nlohmann::json* record : records) {
    const nlohmann::json& r = *record;
    ++s.runs;
    // Inverted states without their prompt have no exact match to count (null in the record).
    if (r.contains("exact_match") && r["exact_match"].is_boolean()) {
      ++s.with_truth;
      exact += r["exact_match"].get<bool>() ? 1 : 0;
      accuracy += number_at(r, {"token_accuracy"}, 0);
    }
    if (r.contains("certificate") && r["certificate"].is_object()) {
      ++s.certified;
      // Not value("verdict", ""): it throws json's type_error for a record read back with a verdict of another type.
      unique += r["certificate"].contains("verdict") && r["certificate"]["verdict"] == "unique" ? 1 : 0;
    }
    times.push_back(number_at(r, {"time_s", "optimize"}));
    per_position.push_back(number_at(r, {"values", "candidates_per_position"}));
  }
  if (s.with_truth) {
    s.exact_match_rate = exact / static_cast<double>(s.with_truth);
    s.token_accuracy = accuracy / static_cast<double>(s.with_truth);
  }
  if (s.certified) s.unique_rate = unique / static_cast<double>(s.certified);
  s.time_per_prompt = stats_of(times);
  s.candidates_per_position = stats_of(per_position);
  return s;
}

nlohmann::json RunsSummary::json() const {
  auto or_null = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
  return {{"runs", runs},
          {"exact_match_rate", or_null(exact_match_rate)},
          {"token_accuracy", or_null(token_accuracy)},
          {"unique_rate", or_null(unique_rate)},
          {"time_per_prompt_s",
           {{"mean", or_null(time_per_prompt.mean)},
            {"median", or_null(time_per_prompt.median)},
            {"max", or_null(time_per_prompt.max)}}},
          {"candidates_per_position", or_null(candidates_per_position.mean)}};
}

}  // namespace lminv
