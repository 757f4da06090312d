#include "scale_out.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <regex>
#include <sstream>

#include "lminv/error.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {

// RECORDS without its ".jsonl" (or whole, for another name).
std::string records_stem(const fs::path& records) {
  std::string name = records.filename().string();
  if (name.size() > 6 && name.compare(name.size() - 6, 6, ".jsonl") == 0) name.resize(name.size() - 6);
  return name;
}

bool all_digits(const std::string& s) {
  return !s.empty() && s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

Shard parse_shard(const std::string& text) {
  const std::size_t slash = text.find('/');
  const std::string i = slash == std::string::npos ? "" : text.substr(0, slash);
  const std::string n = slash == std::string::npos ? "" : text.substr(slash + 1);
  if (!all_digits(i) || !all_digits(n))
    throw Error("--shard '" + text + "': expected I/N, the shard I (counted from 0) of N, e.g. 0/4");
  Shard s{std::stoul(i), std::stoul(n)};
  if (s.count == 0 || s.index >= s.count)
    throw Error("--shard '" + text + "': I must be in 0.." + (s.count ? std::to_string(s.count - 1) : "N-1") +
                " (shards are counted from 0) and N at least 1");
  return s;
}

fs::path shard_records_path(const fs::path& records, const Shard& shard) {
  return records.parent_path() / (records_stem(records) + ".shard-" + std::to_string(shard.index) + "-of-" +
                                  std::to_string(shard.count) + ".jsonl");
}

std::vector<fs::path> shard_files(const fs::path& records) {
  const fs::path folder = records.parent_path().empty() ? fs::path(".") : records.parent_path();
  const std::string stem = records_stem(records);
  const std::regex pattern("\\.shard-([0-9]+)-of-([0-9]+)\\.jsonl");
  std::vector<fs::path> files;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(folder, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() <= stem.size() || name.compare(0, stem.size(), stem) != 0) continue;
    if (std::regex_match(name.substr(stem.size()), pattern))
      files.push_back(records.parent_path() / name);
  }
  std::sort(files.begin(), files.end());
  return files;
}

RunQueue::RunQueue(const std::vector<std::size_t>& todo, std::size_t runs_per_point, int ranks)
    : point_of_rank_(static_cast<std::size_t>(std::max(ranks, 1)), kNone) {
  const std::size_t per_point = std::max<std::size_t>(runs_per_point, 1);
  for (std::size_t run : todo) {
    const std::size_t point = run / per_point;
    if (points_.empty() || points_.back().point != point) points_.push_back({{}, point, false});
    points_.back().runs.push_back(run);
  }
}

std::optional<std::size_t> RunQueue::next(int rank) {
  std::size_t& mine = point_of_rank_.at(static_cast<std::size_t>(rank));
  if (mine == kNone || points_[mine].runs.empty()) mine = choose();
  if (mine == kNone) return std::nullopt;
  Point& point = points_[mine];
  point.started = true;
  const std::size_t run = point.runs.front();
  point.runs.pop_front();
  return run;
}

std::size_t RunQueue::choose() const {
  for (std::size_t p = 0; p < points_.size(); ++p)
    if (!points_[p].started && !points_[p].runs.empty()) return p;
  std::size_t best = kNone;
  for (std::size_t p = 0; p < points_.size(); ++p)
    if (!points_[p].runs.empty() && (best == kNone || points_[p].runs.size() > points_[best].runs.size())) best = p;
  return best;
}

std::optional<std::string> mpi_launcher_variable() {
  // Open MPI's mpirun, PMIx launchers (Open MPI 5, srun --mpi=pmix), MPICH's hydra and srun --mpi=pmi2.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(name)) return std::string(name);
  return std::nullopt;
}

std::string Placement::describe() const {
  std::string s = std::to_string(threads) + " thread" + (threads == 1 ? "" : "s");
  if (gpu) s += ", GPU " + *gpu;
  return s;
}

Placement place_rank(int local_rank, int local_size, int affinity, int online, const std::vector<std::string>& gpus) {
  Placement p;
  local_size = std::max(local_size, 1);
  online = std::max(online, 1);
  affinity = std::clamp(affinity, 1, online);
  // Bound by the launcher to part of the node (mpirun binds to cores for small jobs): that part is the rank's.
  p.threads = affinity < online ? affinity : std::max(1, online / local_size);
  if (!gpus.empty()) p.gpu = gpus[static_cast<std::size_t>(std::max(local_rank, 0)) % gpus.size()];
  return p;
}

std::vector<std::string> visible_gpus() {
  std::vector<std::string> gpus;
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) {
    std::stringstream list(v);
    for (std::string entry; std::getline(list, entry, ',');)
      if (!entry.empty()) gpus.push_back(entry);
    return gpus;  // set and empty: no GPU is visible
  }
  for (int i = 0;; ++i) {
    std::error_code ec;
    if (!fs::exists("/dev/nvidia" + std::to_string(i), ec)) break;
    gpus.push_back(std::to_string(i));
  }
  return gpus;
}

int affinity_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return online_cpus();
  return std::max(1, CPU_COUNT(&set));
}

int online_cpus() {
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace lminv
