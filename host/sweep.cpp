#include "sweep.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>

#include "config.hpp"
#include "experiment.hpp"
#include "invert.hpp"
#include "json_depth.hpp"
#include "prompts.hpp"
#include "report.hpp"
#include "report_page.hpp"
#include "run_stats.hpp"
#include "runner.hpp"
#include "train.hpp"

namespace lminv {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// One point of the grid: a config and its assignments, in the order of the dimensions.
struct GridPoint {
  std::string config_file;
  std::string config_name;  // shown in the label when the sweep has several configs
  std::vector<std::pair<std::string, std::string>> values;

  std::string label() const {
    std::string s = config_name;
    for (const auto& [key, value] : values) s += (s.empty() ? "" : " ") + key + "=" + value;
    return s.empty() ? "(config)" : s;
  }
  nlohmann::json json() const {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [key, value] : values) j[key] = value;
    return j;
  }
};

std::vector<GridPoint> grid_points(const SweepRequest& request) {
  std::vector<GridPoint> points;
  for (const std::string& file : request.config_files)
    points.push_back({file, request.config_files.size() > 1 ? fs::path(file).stem().string() : "", {}});
  for (const auto& [key, values] : request.grid) {
    std::vector<GridPoint> next;
    for (const GridPoint& p : points)
      for (const std::string& v : values) {
        GridPoint q = p;
        q.values.emplace_back(key, v);
        next.push_back(std::move(q));
      }
    points = std::move(next);
  }
  return points;
}

// The config as run, without [prompt] (the sweep's prompts replace it) and [output] (where records go and how the
// run is shown do not change its result): runs of the same config on the same prompt are the same run.
std::string config_fingerprint(const RawConfig& raw) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [section, keys] : raw.sections)
    if (section != "prompt" && section != "output") j[section] = keys;
  return fnv1a_hex(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));  // bytes that are not UTF-8: replaced
}

std::string run_key(const std::string& config_print, std::size_t prompt_index, const std::vector<std::int64_t>& ids) {
  std::string key = config_print + "/" + std::to_string(prompt_index) + "/";
  for (std::size_t i = 0; i < ids.size(); ++i) key += (i ? "," : "") + std::to_string(ids[i]);
  return key;
}

// The records already in the file, by run key (RecordsFile has cut off a last line left unfinished).
std::map<std::string, nlohmann::json> read_records(const RecordsFile& records) {
  const fs::path& file = records.path();
  std::map<std::string, nlohmann::json> done;
  const std::string content = records.read_all();
  std::istringstream lines(content);
  std::size_t number = 0;
  for (std::string line; std::getline(lines, line);) {
    ++number;
    if (line.empty()) continue;
    nlohmann::json record;
    try {
      // Records are copied and dumped again (the summary, resumed sweeps): the same nesting limit as every file.
      record = nlohmann::json::parse(line, json_depth_limit(file.string() + ":" + std::to_string(number)));
    } catch (const nlohmann::json::exception& e) {
      throw Error(file.string() + ":" + std::to_string(number) + ": not a JSON record (" + e.what() +
                  "); move the file away or repair the line to resume");
    }
    const nlohmann::json* sweep = record.contains("sweep") ? &record["sweep"] : nullptr;
    if (sweep && sweep->is_object() && sweep->contains("key") && (*sweep)["key"].is_string()) {
      const std::string key = (*sweep)["key"].get<std::string>();
      done[key] = std::move(record);
    }
  }
  return done;
}

std::string fixed(double x, int digits) {
  if (!std::isfinite(x)) return "-";
  std::ostringstream s;
  s << std::fixed << std::setprecision(digits) << x;
  return s.str();
}

std::string duration(double seconds) {
  std::ostringstream s;
  if (seconds < 120) s << static_cast<long long>(std::lround(seconds)) << " s";
  else if (seconds < 7200) s << std::fixed << std::setprecision(1) << seconds / 60 << " min";
  else s << std::fixed << std::setprecision(1) << seconds / 3600 << " h";
  return s.str();
}

}  // namespace

std::pair<std::string, std::vector<std::string>> parse_grid(const std::string& text) {
  const std::size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || text.find('.') > eq)
    throw Error("--grid '" + text + "': expected section.key=value1,value2,...");
  std::vector<std::string> values;
  std::stringstream list(text.substr(eq + 1));
  for (std::string v; std::getline(list, v, ',');)
    if (!v.empty()) values.push_back(v);
  if (values.empty()) throw Error("--grid '" + text + "': give at least one value");
  return {text.substr(0, eq), values};
}

void run_sweep(const SweepRequest& request, const Registry& registry, std::ostream& out) {
  const std::vector<GridPoint> points = grid_points(request);
  auto overrides_at = [&](const GridPoint& point) {
    std::vector<std::string> overrides = request.overrides;
    for (const auto& [key, value] : point.values) overrides.push_back(key + "=" + value);
    return overrides;
  };

  // With captured states, every entry is read and checked before any config or model is made.
  const bool inverting = !request.states.empty();
  std::vector<CapturedStates> states;
  if (inverting) states = read_states_set(request.states);

  // Every point's config is read and checked before anything runs: a bad grid value fails at once.
  std::vector<RawConfig> raws;
  std::vector<ExperimentConfig> configs;
  for (const GridPoint& point : points) {
    if (inverting) {
      const std::vector<std::string> overrides = overrides_for_states(states.front(), overrides_at(point));
      raws.push_back(read_config(point.config_file, overrides));
      configs.push_back(invert_config(point.config_file, states.front(), overrides_at(point)));
    } else {
      raws.push_back(read_config(point.config_file, overrides_at(point)));
      configs.push_back(parse_experiment(raws.back()));
    }
  }
  // The records file before any run: one that cannot take records, or that another sweep is writing, fails now.
  RecordsFile records(request.records.empty() ? fs::path(configs.front().output_dir) / "sweep.jsonl"
                                              : fs::path(request.records),
                      &out);

  // The prompts, tokenized with the first point's tokenizer; or one entry per captured states tensor.
  std::unique_ptr<ExperimentSession> session = std::make_unique<ExperimentSession>(configs.front(), registry);
  std::vector<PromptEntry> prompts;
  std::vector<CapturedTarget> targets;
  if (inverting) {
    for (std::size_t i = 0; i < states.size(); ++i) {
      targets.push_back(captured_target(states[i], *session, configs.front()));
      PromptEntry entry;
      entry.ids = states[i].prompt_ids;
      entry.kind = "states";
      entry.line = static_cast<std::int64_t>(i) + 1;
      entry.text = states[i].where();
      prompts.push_back(std::move(entry));
    }
  } else {
    prompts = read_prompt_file(request.prompts, session->tokenizer(), session->vocab_size(),
                               prefix_for_text(configs.front(), session->tokenizer()),
                               prefix_for_ids(configs.front(), session->tokenizer()));
  }
  if (request.limit > 0 && static_cast<std::int64_t>(prompts.size()) > request.limit) {
    prompts.resize(static_cast<std::size_t>(request.limit));
    if (inverting) targets.resize(prompts.size());
  }

  const bool report = report_wanted(configs.front().report, /*by_default=*/true, out);
  std::vector<nlohmann::json> training;
  for (const ExperimentConfig& c : configs)
    training.push_back(c.weights == "random" ? nlohmann::json(nullptr) : training_state_of(c.weights));
  std::map<std::string, nlohmann::json> done = read_records(records);
  std::vector<std::vector<std::string>> keys(points.size());
  std::size_t todo = 0;
  for (std::size_t g = 0; g < points.size(); ++g) {
    const std::string print = config_fingerprint(raws[g]);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      // A states entry is known by its file, tensor and size (its true ids may be unknown).
      keys[g].push_back(inverting ? run_key(print + "/states:" + targets[i].source + ":" +
                                                std::to_string(targets[i].states.dim(0)),
                                            i, prompts[i].ids)
                                  : run_key(print, i, prompts[i].ids));
      todo += done.count(keys[g].back()) ? 0 : 1;
    }
  }
  const std::size_t total = points.size() * prompts.size();
  std::string config_list;
  for (const std::string& file : request.config_files) config_list += (config_list.empty() ? "" : " ") + file;
  out << "lminv sweep " << config_list << "\n"
      << (inverting ? "  states    " : "  prompts   ") << (inverting ? request.states : request.prompts).string()
      << " (" << prompts.size() << ")\n"
      << "  grid      " << points.size() << " point" << (points.size() == 1 ? "" : "s") << ": ";
  for (std::size_t g = 0; g < points.size(); ++g) out << (g ? "; " : "") << points[g].label();
  out << "\n  records   " << records.path().string() << "\n";
  if (todo < total) out << "  resuming: " << total - todo << " of " << total << " runs already recorded\n";
  out << std::flush;

  // The runs not recorded yet, point by point (one session per point: weights and models made once).
  const auto start = Clock::now();
  std::size_t ran = 0;
  for (std::size_t g = 0; g < points.size(); ++g) {
    bool any = false;
    for (const std::string& key : keys[g]) any = any || !done.count(key);
    if (!any) continue;
    if (g > 0 || !session) {
      session = std::make_unique<ExperimentSession>(configs[g], registry);
      if (inverting)  // another grid point may change the layer: its width is checked again
        for (std::size_t i = 0; i < targets.size(); ++i) targets[i] = captured_target(states[i], *session, configs[g]);
    }
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      if (done.count(keys[g][i])) continue;
      nlohmann::json extra = {{"sweep",
                                     {{"key", keys[g][i]},
                                      {"config_file", points[g].config_file},
                                      {"overrides", request.overrides},
                                      {"grid", points[g].json()},
                                      {"grid_label", points[g].label()},
                                      {"prompts_file", (inverting ? request.states : request.prompts).string()},
                                      {"prompt_index", i},
                                      {"prompt_line", prompts[i].line},
                                      {"prompt_kind", prompts[i].kind}}}};
      // Weights that lminv train saved: the training step and losses, for invertibility across training.
      if (training[g].is_object()) extra["sweep"]["training"] = training[g];
      const RunSummary summary = inverting ? session->invert(targets[i], out, /*quiet=*/true, records, extra)
                                           : session->run(prompts[i].ids, out, /*quiet=*/true, records, extra);
      done[keys[g][i]] = summary.record;
      ++ran;
      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      const double eta = elapsed / static_cast<double>(ran) * static_cast<double>(todo - ran);
      const std::int64_t T = static_cast<std::int64_t>(summary.prompt_ids.size());
      const std::int64_t correct = std::llround(summary.token_accuracy * static_cast<double>(T));
      out << "  [" << ran << "/" << todo << "] " << points[g].label() << "  prompt " << i << " (" << prompts[i].kind
          << ")  ";
      const nlohmann::json& verdict = summary.record.contains("certificate") && summary.record["certificate"].is_object()
                                          ? summary.record["certificate"]["verdict"]
                                          : nlohmann::json(nullptr);
      if (verdict.is_string()) out << verdict.get<std::string>() << "  ";
      if (!inverting || !summary.prompt_ids.empty())
        out << (summary.exact_match ? "exact" : "NOT exact") << " " << correct << "/" << T << "  ";
      out
          << fixed(number_at(summary.record, {"time_s", "optimize"}), 2) << " s";
      const double per_position = number_at(summary.record, {"values", "candidates_per_position"});
      if (std::isfinite(per_position)) out << "  " << fixed(per_position, 1) << " candidates/position";
      out << "  ETA " << duration(eta) << "  (" << fixed(60.0 * static_cast<double>(ran) / std::max(elapsed, 1e-9), 1)
          << " runs/min)\n" << std::flush;
    }
  }

  // The summary of every run of this sweep, this invocation's and earlier ones'.
  nlohmann::json table = nlohmann::json::array();
  std::ostringstream md;
  md << "| grid point | runs | exact match | token accuracy | certified unique | time/prompt mean (s) | median (s) | "
        "max (s) | candidates/position |\n|---|---|---|---|---|---|---|---|---|\n";
  out << "\n  " << std::left << std::setw(28) << "grid point" << std::right << std::setw(6) << "runs" << std::setw(8)
      << "exact" << std::setw(10) << "tok acc" << std::setw(8) << "unique" << std::setw(10) << "mean s" << std::setw(10) << "median s"
      << std::setw(10) << "max s" << std::setw(12) << "cand/pos" << "\n";
  for (std::size_t g = 0; g < points.size(); ++g) {
    std::vector<const nlohmann::json*> runs;
    for (const std::string& key : keys[g])
      if (auto it = done.find(key); it != done.end()) runs.push_back(&it->second);
    const RunsSummary s = summarize_runs(runs);
    const std::string exact_text = s.with_truth ? fixed(100 * s.exact_match_rate, 0) + "%" : "-";
    const std::string accuracy_text = s.with_truth ? fixed(100 * s.token_accuracy, 1) + "%" : "-";
    const std::string unique_text = s.certified ? fixed(100 * s.unique_rate, 0) + "%" : "-";
    const Stats& t = s.time_per_prompt;
    out << "  " << std::left << std::setw(28) << points[g].label() << std::right << std::setw(6) << s.runs
        << std::setw(8) << exact_text << std::setw(10) << accuracy_text << std::setw(8) << unique_text
        << std::setw(10) << fixed(t.mean, 2) << std::setw(10) << fixed(t.median, 2) << std::setw(10)
        << fixed(t.max, 2) << std::setw(12) << fixed(s.candidates_per_position.mean, 1) << "\n";
    md << "| " << points[g].label() << " | " << s.runs << " | " << exact_text << " | " << accuracy_text << " | "
       << unique_text << " | " << fixed(t.mean, 2) << " | " << fixed(t.median, 2) << " | "
       << fixed(t.max, 2) << " | " << fixed(s.candidates_per_position.mean, 1) << " |\n";
    nlohmann::json row = {{"grid", points[g].json()}, {"grid_label", points[g].label()}};
    row.update(s.json());
    table.push_back(std::move(row));
  }
  out << "  (time: the inversion itself per prompt, " << "time_s.optimize in the records)\n";

  std::string stem = records.path().string();
  if (stem.size() > 6 && stem.compare(stem.size() - 6, 6, ".jsonl") == 0) stem.resize(stem.size() - 6);
  const nlohmann::json summary = {{"lminv_version", LMINV_VERSION},
                                  {"time", utc_timestamp()},
                                  {"config_files", request.config_files},
                                  {"overrides", request.overrides},
                                  {"prompts_file", (inverting ? request.states : request.prompts).string()},
                                  {"prompts", prompts.size()},
                                  {"records", records.path().string()},
                                  {"table", table}};
  write_file_atomically(stem + "-summary.json", summary.dump(2) + "\n");
  write_file_atomically(stem + "-summary.md", "# lminv sweep " + config_list + "\n\nPrompts: " +
                                                  (inverting ? request.states : request.prompts).string() + " (" +
                                                  std::to_string(prompts.size()) +
                                                  "). Time: the inversion per prompt.\n\n" + md.str());
  out << "  summary   " << stem << "-summary.md, " << stem << "-summary.json\n";
  if (report) write_records_report(records.path(), stem + "-report.html", out);
}

}  // namespace lminv
