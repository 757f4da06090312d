// The MPI side of `lminv sweep` (mpi.hpp), built when CMake finds MPI (Debian's Open MPI: libopenmpi-dev).
#include "mpi.hpp"

#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>

#include "lminv/error.hpp"
#include "scale_out.hpp"

namespace lminv {

namespace {

constexpr int kTagResult = 1;  // worker -> rank 0: a finished run (JSON), or nothing when it first asks for work
constexpr int kTagAssign = 2;  // rank 0 -> worker: the next run to do, or -1 when there is none
constexpr std::int64_t kNoMore = -1;

// Waits between polls: a rank waiting for MPI takes no CPU from the ranks that compute.
void nap(std::chrono::microseconds d) { std::this_thread::sleep_for(d); }

void check(int status, const char* call) {
  if (status != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(status, text, &length);
    throw Error(std::string("MPI: ") + call + " failed: " + std::string(text, static_cast<std::size_t>(length)));
  }
}

// Test hook: with LMINV_TEST_KILL_RANK=R and LMINV_TEST_KILL_AFTER_RUNS=K, rank R dies by SIGKILL when it is handed
// its (K+1)-th run, after its first K records were written: a rank lost mid-sweep, at the same point on any machine.
bool kill_now(int rank, std::size_t finished) {
  static const long kill_rank = [] {
    const char* v = std::getenv("LMINV_TEST_KILL_RANK");
    return v ? std::strtol(v, nullptr, 10) : -1L;
  }();
  static const long after = [] {
    const char* v = std::getenv("LMINV_TEST_KILL_AFTER_RUNS");
    return v ? std::strtol(v, nullptr, 10) : -1L;
  }();
  return kill_rank == rank && after >= 0 && static_cast<long>(finished) == after;
}

std::string encode(const FinishedRun& f) {
  // As RecordsFile writes records: invalid UTF-8 (a decoded attempt may split a character) replaced.
  return nlohmann::json{{"run", f.run}, {"record", f.record}, {"line", f.line}}.dump(
      -1, ' ', false, nlohmann::json::error_handler_t::replace);
}

FinishedRun decode(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  return {j.at("run").get<std::size_t>(), j.at("record"), j.at("line").get<std::string>()};
}

// Rank 0's side: hands out runs (scale_out.hpp RunQueue) and writes what comes back, for the other ranks (the
// coordinator thread) and for its own worker (the main thread), one at a time.
class Dispatcher {
 public:
  Dispatcher(const DistributedRuns& runs, int ranks) : runs_(runs), queue_(runs.todo, runs.runs_per_point, ranks) {}
  std::int64_t next(int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::optional<std::size_t> run = queue_.next(rank);
    return run ? static_cast<std::int64_t>(*run) : kNoMore;
  }
  void finish(FinishedRun&& f, int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    runs_.finish(std::move(f), rank);
  }

 private:
  const DistributedRuns& runs_;
  std::mutex mutex_;
  RunQueue queue_;
};

// Rank 0's thread for the other ranks: answers each request with the next run, after writing the run it reports.
// Ends when every other rank has been told there is no more and rank 0's own worker is done; a failure of that worker
// (`failure`) or of a write here ends the job.
void coordinate(const MpiWorld& world, Dispatcher& dispatcher, std::atomic<int>& ready, std::atomic<bool>& local_done,
                std::atomic<bool>& local_failed, const std::string& failure) {
  try {
    int waiting = world.size() - 1;  // ranks not yet told that there is no more
    std::string buffer;
    while (waiting > 0 || !local_done) {
      if (local_failed) world.abort(failure);
      int flag = 0;
      MPI_Status status;
      check(MPI_Iprobe(MPI_ANY_SOURCE, kTagResult, MPI_COMM_WORLD, &flag, &status), "MPI_Iprobe");
      if (!flag) {
        nap(std::chrono::microseconds(1000));
        continue;
      }
      int count = 0;
      check(MPI_Get_count(&status, MPI_CHAR, &count), "MPI_Get_count");
      buffer.assign(static_cast<std::size_t>(count), '\0');
      check(MPI_Recv(buffer.data(), count, MPI_CHAR, status.MPI_SOURCE, kTagResult, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE),
            "MPI_Recv");
      if (count > 0) dispatcher.finish(decode(buffer), status.MPI_SOURCE);
      else ++ready;  // a rank's first request
      const std::int64_t next = dispatcher.next(status.MPI_SOURCE);
      check(MPI_Send(&next, 1, MPI_INT64_T, status.MPI_SOURCE, kTagAssign, MPI_COMM_WORLD), "MPI_Send");
      if (next == kNoMore) --waiting;
    }
  } catch (const std::exception& e) {
    world.abort(e.what());
  }
}

void work_on_rank_0(const MpiWorld& world, const DistributedRuns& runs) {
  Dispatcher dispatcher(runs, world.size());
  std::atomic<int> ready{0};  // the other ranks that have asked for their first run
  std::atomic<bool> local_done{false}, local_failed{false};
  std::string failure;
  std::thread coordinator(coordinate, std::cref(world), std::ref(dispatcher), std::ref(ready), std::ref(local_done),
                          std::ref(local_failed), std::cref(failure));
  try {
    // Every rank has passed the set-up (MpiWorld::agree): the first round goes to every rank, rank 0 last, so that no
    // rank that is slow to ask finds the work gone.
    while (ready < world.size() - 1) nap(std::chrono::microseconds(200));
    std::size_t finished = 0;
    for (std::int64_t run = dispatcher.next(0); run != kNoMore; run = dispatcher.next(0)) {
      if (kill_now(0, finished)) std::raise(SIGKILL);
      dispatcher.finish(runs.perform(static_cast<std::size_t>(run)), 0);
      ++finished;
    }
  } catch (const std::exception& e) {
    failure = e.what();
    local_failed = true;  // the coordinator, the one thread that calls MPI now, ends the job
    coordinator.join();   // not reached: MPI_Abort ends the process
  }
  local_done = true;
  coordinator.join();
}

void work_on_other_rank(const MpiWorld& world, const DistributedRuns& runs) {
  std::string message;  // empty: the first request
  std::size_t finished = 0;
  for (;;) {
    check(MPI_Send(message.data(), static_cast<int>(message.size()), MPI_CHAR, 0, kTagResult, MPI_COMM_WORLD),
          "MPI_Send");
    std::int64_t run = kNoMore;
    MPI_Request request;
    check(MPI_Irecv(&run, 1, MPI_INT64_T, 0, kTagAssign, MPI_COMM_WORLD, &request), "MPI_Irecv");
    for (int done = 0; !done;) {
      check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done) nap(std::chrono::microseconds(200));
    }
    if (run == kNoMore) return;
    if (kill_now(world.rank(), finished)) std::raise(SIGKILL);
    message = encode(runs.perform(static_cast<std::size_t>(run)));
    ++finished;
  }
}

}  // namespace

std::unique_ptr<MpiWorld> MpiWorld::join_if_launched() {
  if (!mpi_launcher_variable()) return nullptr;
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
  std::unique_ptr<MpiWorld> world(new MpiWorld());
  if (provided < MPI_THREAD_SERIALIZED)
    world->abort("this MPI library does not let two threads take turns calling it (MPI_THREAD_SERIALIZED), which "
                 "rank 0 needs to answer the other ranks while it runs inversions");
  MPI_Comm_rank(MPI_COMM_WORLD, &world->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world->size_);
  MPI_Comm node;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world->rank_, MPI_INFO_NULL, &node),
        "MPI_Comm_split_type");
  MPI_Comm_rank(node, &world->local_rank_);
  MPI_Comm_size(node, &world->local_size_);
  MPI_Comm_free(&node);
  int first_on_node = world->local_rank_ == 0 ? 1 : 0;
  check(MPI_Allreduce(&first_on_node, &world->nodes_, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
  char name[MPI_MAX_PROCESSOR_NAME];
  int length = 0;
  MPI_Get_processor_name(name, &length);
  world->host_.assign(name, static_cast<std::size_t>(length));
  return world;
}

MpiWorld::~MpiWorld() { MPI_Finalize(); }

std::vector<std::string> MpiWorld::agree(const std::string& error) {
  agreed_ = true;
  return gather(error);
}

void MpiWorld::broadcast(std::string& text) const {
  std::uint64_t size = text.size();
  check(MPI_Bcast(&size, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD), "MPI_Bcast");
  text.resize(size);
  // In pieces: MPI counts are ints.
  constexpr std::uint64_t kPiece = std::uint64_t{1} << 30;
  for (std::uint64_t at = 0; at < size; at += kPiece)
    check(MPI_Bcast(text.data() + at, static_cast<int>(std::min(kPiece, size - at)), MPI_CHAR, 0, MPI_COMM_WORLD),
          "MPI_Bcast");
}

std::vector<std::string> MpiWorld::gather(const std::string& text) const {
  const int length = static_cast<int>(text.size());
  std::vector<int> lengths(static_cast<std::size_t>(size_));
  check(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, MPI_COMM_WORLD), "MPI_Allgather");
  std::vector<int> offsets(lengths.size());
  int total = 0;
  for (std::size_t r = 0; r < lengths.size(); ++r) {
    offsets[r] = total;
    total += lengths[r];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  check(MPI_Allgatherv(text.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(), MPI_CHAR,
                       MPI_COMM_WORLD),
        "MPI_Allgatherv");
  std::vector<std::string> texts;
  for (std::size_t r = 0; r < lengths.size(); ++r)
    texts.push_back(all.substr(static_cast<std::size_t>(offsets[r]), static_cast<std::size_t>(lengths[r])));
  return texts;
}

void MpiWorld::abort(const std::string& message) const {
  // One write: the ranks' messages do not interleave.
  const std::string line =
      "lminv: error (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " on " + host_ + "): " + message + "\n";
  [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, line.data(), line.size());
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);  // not reached
}

std::string setup_errors_text(const std::vector<std::string>& errors) {
  std::string text;
  std::vector<bool> told(errors.size(), false);
  for (std::size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty() || told[r]) continue;
    std::string ranks;
    for (std::size_t q = r; q < errors.size(); ++q)
      if (errors[q] == errors[r]) {
        told[q] = true;
        ranks += (ranks.empty() ? "" : ", ") + std::to_string(q);
      }
    text += "lminv: error (rank" + std::string(ranks.find(',') == std::string::npos ? " " : "s ") + ranks + " of " +
            std::to_string(errors.size()) + "): " + errors[r] + "\n";
  }
  return text;
}

void run_distributed(const MpiWorld& world, const DistributedRuns& runs) {
  if (world.rank() == 0) work_on_rank_0(world, runs);
  else work_on_other_rank(world, runs);
}

}  // namespace lminv
