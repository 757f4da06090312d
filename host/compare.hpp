// `lminv compare`: one experiment run once per value of a config key, compared against the first value.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

#include "registry.hpp"

namespace lminv {

struct CompareRequest {
  std::string config_file;
  std::vector<std::string> overrides;  // --set, applied to every run
  std::string key;                     // section.key, e.g. backend.name
  std::vector<std::string> values;     // the first is the baseline
  std::string table_file;              // JSON Lines; empty: <output.dir>/compare.jsonl of the first value
};

// For each value: the model's output and input gradient (the vector-Jacobian product with one fixed
// random vector, the same for every value) on the prompt, compared with the first value's by max
// absolute and normalised difference (max |a - b| / max |a|); then the experiment itself (final loss,
// decoded text, time). Prints one table and appends its rows to the JSON Lines file.
void run_compare(const CompareRequest& request, const Registry& registry, std::ostream& out);

// "backend.name=reference,torch,onednn" -> key and values; an Error naming the text when malformed.
void parse_across(const std::string& text, CompareRequest& request);

}  // namespace lminv
