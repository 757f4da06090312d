// `lminv sweep`: configs run on every prompt of a file, at every point of a grid of config values, with one JSON
// Lines record per run, resumable, and a summary table at the end.
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "registry.hpp"
#include "scale_out.hpp"

namespace lminv {

class MpiWorld;

struct SweepRequest {
  // One or more configs (several: a comparison, e.g. sequential against its baselines); each runs at every point.
  std::vector<std::string> config_files;
  std::vector<std::string> overrides;  // --set, applied at every grid point
  std::filesystem::path prompts;       // one prompt a line, or JSON Lines (prompts.hpp)
  // Or captured states, one entry per prompt (states.hpp read_states_set): each run is an lminv invert.
  std::filesystem::path states;
  // --grid section.key=v1,v2,...: each a dimension; the runs cover their product, the first dimension outermost.
  std::vector<std::pair<std::string, std::vector<std::string>>> grid;
  std::filesystem::path records;  // JSON Lines; empty: <output.dir>/sweep.jsonl of the first config
  std::int64_t limit = 0;         // the first N prompts only; 0: all
  // --shard I/N: only the runs of that shard, into <records>.shard-I-of-N.jsonl (scale_out.hpp).
  std::optional<Shard> shard;
  // --merge: run nothing; append every shard file's records to the records file, then the summary.
  bool merge = false;
  // Under mpirun: this process's place in the job (null: one process, as without MPI). Only rank 0 writes records
  // and prints; the others return when every run is done.
  MpiWorld* world = nullptr;
  std::string placement;  // this rank's threads and GPU, as the header and records show them
};

// Runs every (grid point, prompt) whose record is not in the records file yet (a record whose config, prompt index
// and tokens match counts as done; a last line cut short by an interruption is dropped and its run redone), appends
// one record per run as it finishes, then prints the summary of every run of this sweep, per grid point: runs,
// exact-match rate, token accuracy, inversion time per prompt (mean, median, max), candidates verified per position.
// The summary also goes to <records without .jsonl>-summary.md and -summary.json, written atomically.
void run_sweep(const SweepRequest& request, const Registry& registry, std::ostream& out);

// "section.key=v1,v2,..." -> a grid dimension; an Error naming the text when malformed.
std::pair<std::string, std::vector<std::string>> parse_grid(const std::string& text);

}  // namespace lminv
