// A nesting limit for the JSON lminv reads from files (config.json, safetensors headers, tokenizer files, states
// manifests, prompt files).
//
// nlohmann::json parses without recursion, but dump() (which every message quoting a bad value calls), copies and
// comparisons recurse once per level: a config.json holding 100000 nested "[" (200 KB) overflowed the stack while the
// error message was built (found while fuzzing, by an input made by hand: libFuzzer's inputs stay under 4 KB). No
// format lminv reads nests more than a handful of levels, so a generous limit costs nothing.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "lminv/error.hpp"

namespace lminv {

constexpr int kMaxJsonDepth = 64;

// A parser callback for nlohmann::json::parse: JSON nested deeper than kMaxJsonDepth is an Error "WHERE: ...".
inline nlohmann::json::parser_callback_t json_depth_limit(std::string where) {
  return [where = std::move(where)](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > kMaxJsonDepth)
      throw Error(where + ": JSON nested more than " + std::to_string(kMaxJsonDepth) + " levels deep");
    return true;
  };
}

}  // namespace lminv
