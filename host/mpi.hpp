// `mpirun -n N lminv sweep ...`: the processes of one sweep under an MPI launcher (docs/scale-out.md).
//
// How the work is split: every rank reads and checks the configs and prompts and numbers the runs the same way.
// Rank 0 alone opens the records file, decides which runs no record holds yet, and hands them out one at a time to
// whichever rank asks (rank 0's own worker too), so that a rank that drew a cheap run comes back for the next sooner:
// the next run of the grid point the rank is on, else the first point nobody has started, else the point with the
// most runs left. A rank sends each finished run's record to rank 0, which appends it to the one records file, whole,
// before giving that rank its next run: a rank that dies loses the run it holds and nothing else, and the file never
// has more than one writer.
//
// On rank 0 a second thread answers the other ranks while the first runs inversions; it polls with short sleeps
// rather than blocking in MPI (whose waits spin), so it takes no core from the inversions. It is the only thread that
// calls MPI while it lives (MPI_THREAD_SERIALIZED).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace lminv {

class MpiWorld {
 public:
  // Joins the MPI job when an MPI launcher started this process (scale_out.hpp mpi_launcher_variable), else returns
  // null and MPI is never initialised. In a build without MPI a launched process gets an Error saying so, rather
  // than N processes each running the whole sweep.
  static std::unique_ptr<MpiWorld> join_if_launched();
  ~MpiWorld();  // MPI_Finalize
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // among the ranks on this node
  int local_size() const { return local_size_; }
  int nodes() const { return nodes_; }
  const std::string& host() const { return host_; }

  // Every rank's outcome of a sweep's set-up (reading and checking its inputs): ERROR, "" when it went well, from
  // every rank in rank order, on every rank. The first collective call of a sweep, made by every rank whether its
  // set-up failed or not, so that a bad input ends every rank cleanly with its message (no rank left waiting, no
  // MPI_Abort, the records file as it was).
  std::vector<std::string> agree(const std::string& error);
  bool agreed() const { return agreed_; }
  // Rank 0's TEXT, on every rank.
  void broadcast(std::string& text) const;
  // Every rank's TEXT, in rank order, on every rank (a collective call).
  std::vector<std::string> gather(const std::string& text) const;
  // Prints "lminv: error (rank R of N on HOST): MESSAGE" to stderr and ends the whole job (MPI_Abort): a rank that
  // fails cannot leave the others waiting for it.
  [[noreturn]] void abort(const std::string& message) const;

 private:
  MpiWorld() = default;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1, nodes_ = 1;
  bool agreed_ = false;
  std::string host_;
};

// A sweep's set-up failed on some rank (MpiWorld::agree): ERRORS per rank ("" where it went well).
struct SetupFailed : std::runtime_error {
  explicit SetupFailed(std::vector<std::string> errors)
      : std::runtime_error("the sweep's set-up failed on some rank"), errors(std::move(errors)) {}
  std::vector<std::string> errors;
};

// "lminv: error (rank 1 of 2): MESSAGE" lines, one per distinct message with the ranks that gave it.
std::string setup_errors_text(const std::vector<std::string>& errors);

// One finished run, as a rank reports it to rank 0.
struct FinishedRun {
  std::size_t run = 0;       // its number in the sweep
  nlohmann::json record;     // what goes to the records file
  std::string line;          // the progress line's text, without the counter and ETA
};

struct DistributedRuns {
  std::vector<std::size_t> todo;  // the runs to do, in run order (rank 0's list; other ranks' is ignored)
  std::size_t runs_per_point = 1;  // run r belongs to grid point r / runs_per_point
  // Runs one sweep run on this rank. Called on every rank, one run at a time, in the order the runs were handed
  // out: a rank stays on one grid point while it has runs left (its session is made once), then moves to another.
  std::function<FinishedRun(std::size_t run)> perform;
  // On rank 0 only, one call at a time, as runs finish: appends the record and reports progress.
  std::function<void(FinishedRun&& finished, int rank)> finish;
};

// Every rank takes part; returns on every rank when every run of `todo` is finished (or throws on the rank whose
// run or write failed: the caller aborts the job).
void run_distributed(const MpiWorld& world, const DistributedRuns& runs);

}  // namespace lminv
