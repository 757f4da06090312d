#include "invert.hpp"

#include <ostream>

#include "lminv/error.hpp"

namespace lminv {

namespace fs = std::filesystem;

std::vector<std::string> overrides_for_states(const CapturedStates& states, const std::vector<std::string>& user) {
  std::vector<std::string> overrides;
  if (states.blocks) overrides.push_back("model.blocks=" + std::to_string(*states.blocks));
  if (states.head) overrides.push_back("model.head=" + *states.head);
  overrides.insert(overrides.end(), user.begin(), user.end());
  return overrides;
}

ExperimentConfig invert_config(const std::string& config_file, const CapturedStates& states,
                               const std::vector<std::string>& user_overrides) {
  RawConfig raw = read_config(config_file, overrides_for_states(states, user_overrides));
  // The prompt is unknown: a config made for lminv run keeps its [prompt] text or ids, which are not used.
  auto prompt = raw.sections.find("prompt");
  if (prompt != raw.sections.end()) {
    prompt->second.erase("text");
    prompt->second.erase("ids");
  }
  auto optimizer = raw.sections.find("optimizer");
  if (optimizer == raw.sections.end() || !optimizer->second.count("name")) {
    raw.sections["optimizer"]["name"] = "sequential";
  } else {
    const std::string name = optimizer->second.at("name");
    if (name != "sequential" && name != "brute_force")
      throw Error(config_file + ": [optimizer] name = " + name +
                  ": lminv invert runs a token search that verifies each position (sequential or brute_force); "
                  "remove the key or use --set optimizer.name=sequential");
  }
  return parse_experiment(raw);
}

CapturedTarget captured_target(const CapturedStates& states, ExperimentSession& session, const ExperimentConfig& config) {
  const ModelSpec& s = config.spec;
  std::string model = s.family + " (" + config.source + ")";
  if (s.kind == ModelKind::decoder) model += " at block " + std::to_string(s.blocks) + ", head " + head_name(s.head);
  check_states(states, session.output_width(), session.max_positions(), model);
  CapturedTarget target;
  target.states = states.states;
  target.rounding = states.rounding;
  target.stored_dtype = states.stored_dtype;
  target.source = states.where();
  target.true_ids = states.prompt_ids;
  return target;
}

RunSummary run_invert(const InvertRequest& request, const Registry& registry, std::ostream& out) {
  const CapturedStates states = read_states(request.states, request.tensor);
  const ExperimentConfig config = invert_config(request.config_file, states, request.overrides);
  // The records file before the search: one that cannot take records fails now, not after it.
  RecordsFile records(request.records.empty() ? fs::path(config.output_dir) / "records.jsonl" : request.records, &out);
  ExperimentSession session(config, registry);
  const CapturedTarget target = captured_target(states, session, config);
  return session.invert(target, out, /*quiet=*/false, &records);
}

}  // namespace lminv
