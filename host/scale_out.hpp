// Splitting a sweep over processes (docs/scale-out.md): shards for schedulers' job arrays, where a rank's threads and
// GPU come from, and whether this process was started by an MPI launcher. Nothing here needs MPI itself.
#pragma once

#include <cstddef>
#include <deque>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lminv {

// --shard I/N: the runs r (numbered grid point by grid point, prompt by prompt, done or not) with r mod N = I.
// Round-robin rather than blocks, so that each shard gets its share of every grid point's cost (block 12 runs cost
// ten times block 1 runs).
struct Shard {
  std::size_t index = 0;  // I, 0 <= I < N (Slurm's --array=0-<N-1> gives $SLURM_ARRAY_TASK_ID)
  std::size_t count = 1;  // N
  bool holds(std::size_t run) const { return run % count == index; }
  std::string label() const { return std::to_string(index) + "/" + std::to_string(count); }
};

// "I/N" -> the shard; an Error naming the text unless 0 <= I < N.
Shard parse_shard(const std::string& text);

// Where a shard's records go: RECORDS with ".shard-I-of-N" before ".jsonl" (sweep.jsonl -> sweep.shard-0-of-4.jsonl).
std::filesystem::path shard_records_path(const std::filesystem::path& records, const Shard& shard);

// The shard files of RECORDS that exist (any N), in name order: what `lminv sweep --merge` reads.
std::vector<std::filesystem::path> shard_files(const std::filesystem::path& records);

// Which run a rank gets next under MPI (host/mpi.cpp): the next of the grid point it is on while that point has runs
// left, so that it keeps its session (weights, models, the search's session cache); else the first grid point nobody
// has started; else it joins the point with the most runs left. A grid of G points on N ranks thus costs each rank
// about G / N sessions rather than G, and the last runs are still shared by every rank that is free. Not thread-safe.
class RunQueue {
 public:
  // TODO: the runs to hand out, in run order; run r belongs to grid point r / RUNS_PER_POINT.
  RunQueue(const std::vector<std::size_t>& todo, std::size_t runs_per_point, int ranks);
  // The next run for RANK (0 <= RANK < ranks), or nothing when every run has been handed out.
  std::optional<std::size_t> next(int rank);

 private:
  static constexpr std::size_t kNone = static_cast<std::size_t>(-1);
  struct Point {
    std::deque<std::size_t> runs;  // its runs still to hand out, in order
    std::size_t point = 0;
    bool started = false;
  };
  std::size_t choose() const;
  std::vector<Point> points_;
  std::vector<std::size_t> point_of_rank_;  // the index in points_ each rank is on, or kNone
};

// The environment variable that says an MPI launcher (mpirun/mpiexec of Open MPI or MPICH, srun with PMI or PMIx)
// started this process, or nothing: then lminv runs as one process and never touches MPI.
std::optional<std::string> mpi_launcher_variable();

// How many threads and which GPU one rank gets, so that the ranks of a node share its cores and GPUs without
// oversubscription.
struct Placement {
  int threads = 1;          // the rank's "all cores" (backends with threads = 0 use this many)
  std::optional<std::string> gpu;  // the CUDA_VISIBLE_DEVICES entry for the rank, when the node has GPUs
  std::string describe() const;
};

// LOCAL_RANK of LOCAL_SIZE ranks on this node. AFFINITY_CPUS: the CPUs this process may run on; ONLINE_CPUS: the
// node's. A launcher that bound the rank to fewer CPUs than the node has decided its share: the rank gets those.
// Otherwise the node's CPUs are divided evenly (at least 1 each). GPUS: the node's visible GPUs (the entries of
// CUDA_VISIBLE_DEVICES, or 0..n-1): local rank k gets entry k mod n.
Placement place_rank(int local_rank, int local_size, int affinity_cpus, int online_cpus,
                     const std::vector<std::string>& gpus);

// The GPUs this process sees: CUDA_VISIBLE_DEVICES's entries when set, else /dev/nvidia0, /dev/nvidia1, ... as 0, 1.
std::vector<std::string> visible_gpus();

// CPUs in this process's affinity mask, and online on the node.
int affinity_cpus();
int online_cpus();

}  // namespace lminv
