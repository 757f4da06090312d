// `lminv invert`: the prompt behind hidden states captured by another program, with a certificate per position.
#pragma once

#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

#include "config.hpp"
#include "registry.hpp"
#include "runner.hpp"
#include "states.hpp"

namespace lminv {

struct InvertRequest {
  std::string config_file;
  std::vector<std::string> overrides;  // --set, applied after what the states file says (so they win)
  std::filesystem::path states;
  std::string tensor;                  // --tensor; empty: the only tensor, or "output"
  std::filesystem::path records;       // empty: <output.dir>/records.jsonl
};

// The overrides a states file implies: model.blocks and model.head from its metadata (lminv forward writes them),
// followed by the user's. The config's own values lose to the file's, the user's --set wins over both.
std::vector<std::string> overrides_for_states(const CapturedStates& states, const std::vector<std::string>& user);

// The config for inverting states: read with those overrides; the optimizer, unless the config names one, is
// sequential; a config naming a method that is not a token search (sequential, brute_force) is an Error.
ExperimentConfig invert_config(const std::string& config_file, const CapturedStates& states,
                               const std::vector<std::string>& user_overrides);

// Checks the states against the session's model (width, positions) and makes the target a session inverts.
CapturedTarget captured_target(const CapturedStates& states, ExperimentSession& session, const ExperimentConfig& config);

// Reads and checks the states (before any model is built), builds the session, inverts, prints the certificate and
// appends the record.
RunSummary run_invert(const InvertRequest& request, const Registry& registry, std::ostream& out);

}  // namespace lminv
