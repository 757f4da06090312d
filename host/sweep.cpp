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
#include "mpi.hpp"
#include "prompts.hpp"
#include "report.hpp"
#include "report_page.hpp"
#include "run_stats.hpp"
#include "runner.hpp"
#include "scale_out.hpp"
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


// The progress line of one run, without its counter and ETA: the grid point, the prompt, the verdict, the time.
std::string progress_text(const std::string& label, std::size_t prompt, const std::string& kind,
                          const RunSummary& summary, bool inverting) {
  std::ostringstream out;
  const std::int64_t T = static_cast<std::int64_t>(summary.prompt_ids.size());
  const std::int64_t correct = std::llround(summary.token_accuracy * static_cast<double>(T));
  out << label << "  prompt " << prompt << " (" << kind << ")  ";
  const nlohmann::json& verdict = summary.record.contains("certificate") && summary.record["certificate"].is_object()
                                      ? summary.record["certificate"]["verdict"]
                                      : nlohmann::json(nullptr);
  if (verdict.is_string()) out << verdict.get<std::string>() << "  ";
  if (!inverting || !summary.prompt_ids.empty())
    out << (summary.exact_match ? "exact" : "NOT exact") << " " << correct << "/" << T << "  ";
  out << fixed(number_at(summary.record, {"time_s", "optimize"}), 2) << " s";
  const double per_position = number_at(summary.record, {"values", "candidates_per_position"});
  if (std::isfinite(per_position)) out << "  " << fixed(per_position, 1) << " candidates/position";
  return out.str();
}

// lminv sweep --merge: the records of every shard file of SWEEP_RECORDS appended to RECORDS (the sweep's file) in run
// order, each run once (those RECORDS holds already are skipped, so merging again adds nothing). Every shard record
// is checked first: one whose run is not among KEYS (another sweep's: other configs, --set, grid or prompts) fails
// the merge before anything is written. Returns how many records were added.
std::size_t merge_shards(const fs::path& sweep_records, const std::vector<std::string>& keys, RecordsFile& records,
                         std::map<std::string, nlohmann::json>& done, std::ostream& out) {
  const std::vector<fs::path> files = shard_files(sweep_records);
  if (files.empty())
    throw Error(sweep_records.string() + ": no shard files to merge (" +
                fs::path(sweep_records).replace_extension().filename().string() +
                ".shard-I-of-N.jsonl beside it, as lminv sweep --shard I/N writes them)");
  std::map<std::string, std::size_t> run_of;
  for (std::size_t r = 0; r < keys.size(); ++r) run_of[keys[r]] = r;
  std::vector<const nlohmann::json*> found(keys.size(), nullptr);
  std::vector<std::map<std::string, nlohmann::json>> shards;
  shards.reserve(files.size());
  for (const fs::path& file : files) {
    // Opened as a records file: locked (a shard still running is refused) and a cut-off last line dropped.
    const RecordsFile shard(file, &out);
    shards.push_back(read_records(shard));
    for (const auto& [key, record] : shards.back()) {
      const auto it = run_of.find(key);
      if (it == run_of.end())
        throw Error(file.string() + ": holds a record of another sweep (prompt " +
                    record["sweep"].value("prompt_index", nlohmann::json(nullptr)).dump() + " of " +
                    record["sweep"].value("prompts_file", nlohmann::json("?")).dump() + ", grid point " +
                    record["sweep"].value("grid_label", nlohmann::json("?")).dump() +
                    "): its configs, --set, --grid or prompts are not this sweep's. Merge it with its own sweep's "
                    "command, or move it away; nothing was merged");
      found[it->second] = &record;
    }
  }
  std::size_t added = 0;
  for (std::size_t r = 0; r < keys.size(); ++r)
    if (found[r] && !done.count(keys[r])) {
      records.append(*found[r]);
      done[keys[r]] = *found[r];
      ++added;
    }
  out << "  shards    " << files.size() << " file" << (files.size() == 1 ? "" : "s") << ": ";
  for (std::size_t k = 0; k < files.size(); ++k) out << (k ? ", " : "") << files[k].filename().string();
  out << "\n";
  return added;
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
  // Under mpirun every rank makes the same checks and numbers the runs the same way; rank 0 alone writes (mpi.hpp).
  MpiWorld* world = request.world;
  const bool writer = !world || world->rank() == 0;
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
  // A shard writes a file of its own beside the sweep's (scale_out.hpp), which --merge gathers.
  const fs::path sweep_records =
      request.records.empty() ? fs::path(configs.front().output_dir) / "sweep.jsonl" : fs::path(request.records);
  const fs::path records_path = request.shard ? shard_records_path(sweep_records, *request.shard) : sweep_records;
  std::unique_ptr<RecordsFile> records;
  if (writer) records = std::make_unique<RecordsFile>(records_path, &out);

  // The prompts, tokenized with the first point's tokenizer; or one entry per captured states tensor.
  std::unique_ptr<ExperimentSession> session = std::make_unique<ExperimentSession>(configs.front(), registry);
  std::size_t session_point = 0;
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

  const bool report = writer && report_wanted(configs.front().report, /*by_default=*/true, out);
  std::vector<nlohmann::json> training;
  for (const ExperimentConfig& c : configs)
    training.push_back(c.weights == "random" ? nlohmann::json(nullptr) : training_state_of(c.weights));

  // The runs, numbered grid point by grid point and prompt by prompt: run r is point r / P, prompt r % P.
  const std::size_t P = prompts.size();
  const std::size_t total = points.size() * P;
  std::vector<std::string> keys(total);
  for (std::size_t g = 0; g < points.size(); ++g) {
    const std::string print = config_fingerprint(raws[g]);
    for (std::size_t i = 0; i < P; ++i)
      // A states entry is known by its file, tensor and size (its true ids may be unknown).
      keys[g * P + i] = inverting ? run_key(print + "/states:" + targets[i].source + ":" +
                                                std::to_string(targets[i].states.dim(0)),
                                            i, prompts[i].ids)
                                  : run_key(print, i, prompts[i].ids);
  }
  std::map<std::string, nlohmann::json> done;
  if (writer) done = read_records(*records);

  // What this invocation covers (a shard's runs, or all; none when merging) and, of those, what no record holds.
  std::size_t scope = 0;
  std::vector<std::size_t> todo;
  for (std::size_t r = 0; r < total; ++r) {
    if (request.merge || (request.shard && !request.shard->holds(r))) continue;
    ++scope;
    if (!done.count(keys[r])) todo.push_back(r);
  }
  std::vector<std::string> placements;
  if (world) {
    // Every rank's set-up went well, or every rank stops here with the failures (cli.cpp reports them).
    const std::vector<std::string> errors = world->agree("");
    for (const std::string& e : errors)
      if (!e.empty()) throw SetupFailed(errors);
    // Rank 0's list of runs to do, and a check that every rank numbered the same runs (the same files everywhere).
    std::string plan = nlohmann::json{{"todo", todo}, {"keys", fnv1a_hex(nlohmann::json(keys).dump())}}.dump();
    world->broadcast(plan);
    const nlohmann::json agreed = nlohmann::json::parse(plan);
    if (agreed["keys"] != fnv1a_hex(nlohmann::json(keys).dump()))
      throw Error("this rank's runs differ from rank 0's (" + std::to_string(total) +
                  " here): the configs, checkpoints or prompt files it reads are not the same files as rank 0's");
    todo = agreed["todo"].get<std::vector<std::size_t>>();
    placements = world->gather(world->host() + " " + request.placement);
  }

  std::string config_list;
  for (const std::string& file : request.config_files) config_list += (config_list.empty() ? "" : " ") + file;
  if (writer) {
    out << "lminv sweep " << config_list << "\n"
        << (inverting ? "  states    " : "  prompts   ") << (inverting ? request.states : request.prompts).string()
        << " (" << prompts.size() << ")\n"
        << "  grid      " << points.size() << " point" << (points.size() == 1 ? "" : "s") << ": ";
    for (std::size_t g = 0; g < points.size(); ++g) out << (g ? "; " : "") << points[g].label();
    out << "\n  records   " << records_path.string() << "\n";
    if (request.shard)
      out << "  shard     " << request.shard->label() << ": " << scope << " of the sweep's " << total << " runs\n";
    if (world) {
      out << "  ranks     " << world->size() << " on " << world->nodes() << " node" << (world->nodes() == 1 ? "" : "s")
          << ":";
      for (std::size_t r = 0; r < placements.size() && r < 8; ++r) out << (r ? "," : "") << " " << r << " " << placements[r];
      if (placements.size() > 8) out << ", ...";
      out << "\n";
    }
    if (todo.size() < scope) out << "  resuming: " << scope - todo.size() << " of " << scope << " runs already recorded\n";
    out << std::flush;
  }
  const std::size_t merged = request.merge ? merge_shards(sweep_records, keys, *records, done, out) : 0;

  // One run, on whichever rank it was handed to (one session per grid point per rank: weights and models made once).
  auto perform = [&](std::size_t r) {
    const std::size_t g = r / P, i = r % P;
    if (g != session_point) {
      session.reset();  // the previous point's weights go before this point's come
      session = std::make_unique<ExperimentSession>(configs[g], registry);
      session_point = g;
      if (inverting)  // another grid point may change the layer: its width is checked again
        for (std::size_t k = 0; k < targets.size(); ++k) targets[k] = captured_target(states[k], *session, configs[g]);
    }
    nlohmann::json extra = {{"sweep",
                             {{"key", keys[r]},
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
    if (request.shard) extra["sweep"]["shard"] = request.shard->label();
    if (world)
      extra["sweep"]["process"] = {
          {"rank", world->rank()}, {"ranks", world->size()}, {"host", world->host()}, {"placement", request.placement}};
    const RunSummary summary = inverting ? session->invert(targets[i], out, /*quiet=*/true, nullptr, extra)
                                         : session->run(prompts[i].ids, out, /*quiet=*/true, nullptr, extra);
    return FinishedRun{r, summary.record, progress_text(points[g].label(), i, prompts[i].kind, summary, inverting)};
  };
  // Its record written and its line shown, on the writer, one run at a time.
  const auto start = Clock::now();
  std::size_t ran = 0;
  auto finish = [&](FinishedRun&& f, int rank) {
    records->append(f.record);
    done[keys[f.run]] = std::move(f.record);
    ++ran;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double eta = elapsed / static_cast<double>(ran) * static_cast<double>(todo.size() - ran);
    out << "  [" << ran << "/" << todo.size() << "] " << f.line << "  ETA " << duration(eta) << "  ("
        << fixed(60.0 * static_cast<double>(ran) / std::max(elapsed, 1e-9), 1) << " runs/min)";
    if (world) out << "  rank " << rank;
    out << "\n" << std::flush;
  };
  if (world) {
    run_distributed(*world, DistributedRuns{todo, P, perform, finish});
    if (!writer) return;
  } else {
    for (std::size_t r : todo) finish(perform(r), 0);
  }
  session.reset();

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
    for (std::size_t i = 0; i < P; ++i)
      if (auto it = done.find(keys[g * P + i]); it != done.end()) runs.push_back(&it->second);
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

  if (request.merge || request.shard) {
    std::size_t missing = 0;
    for (std::size_t r = 0; r < total; ++r)
      missing += (request.shard && !request.shard->holds(r)) || done.count(keys[r]) ? 0 : 1;
    if (request.merge) out << "  merged    " << merged << " records from the shards\n";
    if (missing)
      out << "  missing   " << missing << " run" << (missing == 1 ? "" : "s") << " without a record: "
          << (request.merge ? "run the shards that hold them (or this sweep without --merge) and merge again\n"
                            : "this shard was cut short: run the same command again\n");
  }

  std::string stem = records->path().string();
  if (stem.size() > 6 && stem.compare(stem.size() - 6, 6, ".jsonl") == 0) stem.resize(stem.size() - 6);
  const nlohmann::json summary = {{"lminv_version", LMINV_VERSION},
                                  {"time", utc_timestamp()},
                                  {"config_files", request.config_files},
                                  {"overrides", request.overrides},
                                  {"prompts_file", (inverting ? request.states : request.prompts).string()},
                                  {"prompts", prompts.size()},
                                  {"records", records->path().string()},
                                  {"table", table}};
  write_file_atomically(stem + "-summary.json", summary.dump(2) + "\n");
  write_file_atomically(stem + "-summary.md", "# lminv sweep " + config_list + "\n\nPrompts: " +
                                                  (inverting ? request.states : request.prompts).string() + " (" +
                                                  std::to_string(prompts.size()) +
                                                  "). Time: the inversion per prompt.\n\n" + md.str());
  out << "  summary   " << stem << "-summary.md, " << stem << "-summary.json\n";
  if (report) write_records_report(records->path(), stem + "-report.html", out);
}

}  // namespace lminv
