// Splitting sweeps over processes without MPI (docs/scale-out.md): the shard arithmetic, a rank's placement, and
// `lminv sweep --shard I/N` / `--merge` end to end against one process's sweep.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "lminv_process.hpp"
#include "scale_out.hpp"
#include "sweep_records.hpp"

namespace fs = std::filesystem;
using lminv::Shard;

TEST(Shard, ParsesIOfNCountedFromZero) {
  const Shard s = lminv::parse_shard("2/5");
  EXPECT_EQ(s.index, 2u);
  EXPECT_EQ(s.count, 5u);
  EXPECT_EQ(s.label(), "2/5");
  EXPECT_EQ(lminv::parse_shard("0/1").count, 1u);
  for (const char* bad : {"5/5", "1-3", "a/b", "0/0", "-1/3", "1/", "/3", "", "1/3/4", "99999999999/3"})
    EXPECT_THROW(lminv::parse_shard(bad), lminv::Error) << bad;
  try {
    lminv::parse_shard("3/3");
  } catch (const lminv::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--shard '3/3': I must be in 0..2"), std::string::npos) << e.what();
  }
}

TEST(Shard, TheShardsOfASweepCoverEveryRunExactlyOnce) {
  for (std::size_t n = 1; n <= 7; ++n)
    for (std::size_t run = 0; run < 100; ++run) {
      int holders = 0;
      for (std::size_t i = 0; i < n; ++i) holders += Shard{i, n}.holds(run) ? 1 : 0;
      EXPECT_EQ(holders, 1) << "run " << run << " of " << n << " shards";
    }
  // Round-robin: a grid point's runs (consecutive numbers) are spread over the shards.
  std::set<std::size_t> owners;
  for (std::size_t run = 0; run < 4; ++run)
    for (std::size_t i = 0; i < 4; ++i)
      if (Shard{i, 4}.holds(run)) owners.insert(i);
  EXPECT_EQ(owners.size(), 4u);
}

TEST(Shard, RecordsGoBesideTheSweepsAndMergeFindsOnlyThose) {
  EXPECT_EQ(lminv::shard_records_path("runs/x/sweep.jsonl", Shard{0, 4}), fs::path("runs/x/sweep.shard-0-of-4.jsonl"));
  EXPECT_EQ(lminv::shard_records_path("out.records", Shard{3, 10}), fs::path("out.records.shard-3-of-10.jsonl"));
  const fs::path dir = fs::temp_directory_path() / ("lminv-shard-files-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  for (const char* name : {"sweep.jsonl", "sweep.shard-1-of-2.jsonl", "sweep.shard-0-of-2.jsonl",
                           "sweep.shard-x-of-2.jsonl", "other.shard-0-of-2.jsonl", "sweep.shard-0-of-2.jsonl.tmp.7",
                           "sweep.shard-0-of-2-summary.json", "sweepy.shard-0-of-2.jsonl"})
    std::ofstream(dir / name) << "\n";
  const std::vector<fs::path> found = lminv::shard_files(dir / "sweep.jsonl");
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(found[0], dir / "sweep.shard-0-of-2.jsonl");
  EXPECT_EQ(found[1], dir / "sweep.shard-1-of-2.jsonl");
  fs::remove_all(dir);
}

// Every run handed out exactly once, whatever order the ranks ask in; a rank keeps its grid point while it has runs.
TEST(RunQueue, RanksKeepTheirGridPointAndShareTheLastRuns) {
  // 3 grid points of 4 runs; run 5 already recorded (not in the list).
  const std::vector<std::size_t> todo = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11};
  lminv::RunQueue queue(todo, 4, 2);
  // Rank 0 starts point 0, rank 1 point 1 (nobody's), each keeps to its point.
  EXPECT_EQ(queue.next(0), 0u);
  EXPECT_EQ(queue.next(1), 4u);
  EXPECT_EQ(queue.next(1), 6u);
  EXPECT_EQ(queue.next(0), 1u);
  EXPECT_EQ(queue.next(1), 7u);
  // Rank 1's point is done: it starts point 2, the one nobody has.
  EXPECT_EQ(queue.next(1), 8u);
  EXPECT_EQ(queue.next(1), 9u);
  EXPECT_EQ(queue.next(1), 10u);
  // Rank 0 is still on point 0.
  EXPECT_EQ(queue.next(0), 2u);
  EXPECT_EQ(queue.next(1), 11u);
  // Rank 1's point is done and every point is started: it joins the one with the most runs left, point 0.
  EXPECT_EQ(queue.next(1), 3u);
  EXPECT_FALSE(queue.next(0).has_value());
  EXPECT_FALSE(queue.next(1).has_value());

  // Many ranks asking in a scrambled order: each run once, and each rank on few grid points.
  std::vector<std::size_t> all(60);
  for (std::size_t r = 0; r < all.size(); ++r) all[r] = r;
  lminv::RunQueue many(all, 10, 3);  // 6 grid points of 10 runs, 3 ranks
  std::set<std::size_t> seen;
  std::vector<std::set<std::size_t>> points(3);
  for (int turn = 0;; ++turn) {
    const int rank = (turn * 7 + turn / 3) % 3;
    const std::optional<std::size_t> run = many.next(rank);
    if (!run) break;
    EXPECT_TRUE(seen.insert(*run).second) << *run << " handed out twice";
    points[static_cast<std::size_t>(rank)].insert(*run / 10);
  }
  EXPECT_EQ(seen.size(), 60u);
  for (const auto& p : points) EXPECT_LE(p.size(), 4u) << "a rank moved between too many grid points";
}

TEST(Placement, RanksShareTheirNodesCoresAndGpus) {
  // Two ranks on a 2-core node, not bound: one thread each; alone: both cores.
  EXPECT_EQ(lminv::place_rank(0, 2, 2, 2, {}).threads, 1);
  EXPECT_EQ(lminv::place_rank(0, 1, 2, 2, {}).threads, 2);
  // More ranks than cores: still one each (oversubscribed by the user's choice, not multiplied by threads).
  EXPECT_EQ(lminv::place_rank(2, 3, 2, 2, {}).threads, 1);
  EXPECT_EQ(lminv::place_rank(1, 4, 64, 64, {}).threads, 16);
  // Bound by the launcher to 4 of 64 CPUs: those 4, whatever the number of ranks.
  EXPECT_EQ(lminv::place_rank(0, 2, 4, 64, {}).threads, 4);
  // One GPU per local rank, round the visible ones; none without GPUs.
  EXPECT_FALSE(lminv::place_rank(0, 2, 2, 2, {}).gpu.has_value());
  EXPECT_EQ(*lminv::place_rank(3, 4, 8, 8, {"0", "1"}).gpu, "1");
  EXPECT_EQ(*lminv::place_rank(0, 2, 8, 8, {"2", "5"}).gpu, "2");
  EXPECT_EQ(*lminv::place_rank(1, 2, 8, 8, {"2", "5"}).gpu, "5");
  EXPECT_EQ(lminv::place_rank(1, 2, 8, 8, {"2", "5"}).describe(), "4 threads, GPU 5");
}

TEST(Placement, VisibleGpusFollowCudaVisibleDevices) {
  ::setenv("CUDA_VISIBLE_DEVICES", "3,1", 1);
  EXPECT_EQ(lminv::visible_gpus(), (std::vector<std::string>{"3", "1"}));
  ::setenv("CUDA_VISIBLE_DEVICES", "", 1);
  EXPECT_TRUE(lminv::visible_gpus().empty());
  ::unsetenv("CUDA_VISIBLE_DEVICES");
}

TEST(Launcher, OnlyALauncherVariableMakesAnMpiProcess) {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) ::unsetenv(name);
  EXPECT_FALSE(lminv::mpi_launcher_variable().has_value());
  ::setenv("PMI_RANK", "0", 1);
  EXPECT_EQ(lminv::mpi_launcher_variable().value_or(""), "PMI_RANK");
  ::unsetenv("PMI_RANK");
}

// ---- lminv sweep --shard / --merge -------------------------------------------------------------------------------

namespace {
constexpr char kPrefix[] = "shard";
class ShardSweep : public lminv_test::WithTempDir<kPrefix> {
 protected:
  // The tiny GPT-2 sweep of tests/data: 6 prompts x blocks 1, 2 = 12 runs. The session cache off, so that a run's
  // record does not depend on the runs its process did before (tests/sweep_records.hpp).
  std::string sweep(const fs::path& records, const std::string& more = "") const {
    const std::string data = LMINV_TEST_DATA_DIR;
    return "sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + data +
           "/prompts-tiny.txt --grid model.blocks=1,2 --set optimizer.session_cache=false --set output.report=false "
           "--set output.dir=" + (dir_ / "out").string() + " --records " + records.string() + " " + more;
  }
};
}  // namespace

TEST_F(ShardSweep, ShardsCoverEveryRunOnceAndTheirMergeEqualsOneProcess) {
  const lminv_test::Outcome single = lminv_test::run_lminv(sweep(dir_ / "one" / "sweep.jsonl"));
  ASSERT_EQ(single.status, 0) << single.output;
  const auto expected = lminv_test::records_by_key(dir_ / "one" / "sweep.jsonl");
  ASSERT_EQ(expected.size(), 12u);

  const fs::path records = dir_ / "split" / "sweep.jsonl";
  std::set<std::string> seen;
  for (int i = 0; i < 3; ++i) {
    const lminv_test::Outcome o = lminv_test::run_lminv(sweep(records, "--shard " + std::to_string(i) + "/3"));
    ASSERT_EQ(o.status, 0) << o.output;
    EXPECT_NE(o.output.find("shard     " + std::to_string(i) + "/3: 4 of the sweep's 12 runs"), std::string::npos)
        << o.output;
    const auto part = lminv_test::records_by_key(dir_ / "split" / ("sweep.shard-" + std::to_string(i) + "-of-3.jsonl"));
    EXPECT_EQ(part.size(), 4u);
    for (const auto& [key, record] : part) {
      EXPECT_TRUE(seen.insert(key).second) << "two shards ran " << key;
      EXPECT_EQ(record["sweep"]["shard"], std::to_string(i) + "/3");
    }
  }
  EXPECT_EQ(seen.size(), 12u);
  EXPECT_FALSE(fs::exists(records));  // the shards wrote only their own files

  const lminv_test::Outcome merged = lminv_test::run_lminv(sweep(records, "--merge"));
  ASSERT_EQ(merged.status, 0) << merged.output;
  EXPECT_NE(merged.output.find("merged    12 records from the shards"), std::string::npos) << merged.output;
  EXPECT_EQ(merged.output.find("missing"), std::string::npos) << merged.output;
  const auto got = lminv_test::records_by_key(records);
  ASSERT_EQ(got.size(), 12u);
  for (const auto& [key, record] : expected) {
    ASSERT_TRUE(got.count(key)) << key;
    EXPECT_EQ(lminv_test::without_timing(got.at(key)), lminv_test::without_timing(record)) << key;
  }
  const nlohmann::json one = nlohmann::json::parse(lminv_test::slurp(dir_ / "one" / "sweep-summary.json"));
  const nlohmann::json all = nlohmann::json::parse(lminv_test::slurp(dir_ / "split" / "sweep-summary.json"));
  EXPECT_EQ(lminv_test::table_without_timing(all), lminv_test::table_without_timing(one));

  // Merging again adds nothing.
  const lminv_test::Outcome again = lminv_test::run_lminv(sweep(records, "--merge"));
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_NE(again.output.find("merged    0 records"), std::string::npos) << again.output;
  EXPECT_EQ(lminv_test::records_by_key(records).size(), 12u);
}

TEST_F(ShardSweep, AShardCutShortResumesAndMergeSaysWhatIsMissing) {
  const fs::path records = dir_ / "sweep.jsonl";
  // Shard 1 of 2 only (6 runs), and of shard 0 only its first 2 records: the process killed in its 3rd.
  ASSERT_EQ(lminv_test::run_lminv(sweep(records, "--shard 1/2")).status, 0);
  const std::string killed = "LMINV_TEST_KILL_IN_RECORD=3 " + std::string(LMINV_BINARY) + " " +
                             sweep(records, "--shard 0/2") + " > /dev/null 2>&1";
  EXPECT_NE(std::system(killed.c_str()), 0);
  const lminv_test::Outcome partial = lminv_test::run_lminv(sweep(records, "--merge"));
  ASSERT_EQ(partial.status, 0) << partial.output;
  EXPECT_NE(partial.output.find("merged    8 records"), std::string::npos) << partial.output;
  EXPECT_NE(partial.output.find("missing   4 runs without a record"), std::string::npos) << partial.output;

  const lminv_test::Outcome resumed = lminv_test::run_lminv(sweep(records, "--shard 0/2"));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming: 2 of 6 runs already recorded"), std::string::npos) << resumed.output;
  const lminv_test::Outcome complete = lminv_test::run_lminv(sweep(records, "--merge"));
  ASSERT_EQ(complete.status, 0) << complete.output;
  EXPECT_NE(complete.output.find("merged    4 records"), std::string::npos) << complete.output;
  EXPECT_EQ(lminv_test::records_by_key(records).size(), 12u);
}

TEST_F(ShardSweep, MergeRefusesAnotherSweepsRecordsBeforeWritingAny) {
  const fs::path records = dir_ / "sweep.jsonl";
  ASSERT_EQ(lminv_test::run_lminv(sweep(records, "--shard 0/2")).status, 0);
  // The same files and grid, another optimizer setting: another sweep.
  const lminv_test::Outcome other = lminv_test::run_lminv(sweep(records, "--merge --set optimizer.policy=random"));
  EXPECT_EQ(other.status, 1) << other.output;
  EXPECT_NE(other.output.find("sweep.shard-0-of-2.jsonl: holds a record of another sweep"), std::string::npos)
      << other.output;
  EXPECT_NE(other.output.find("nothing was merged"), std::string::npos) << other.output;
  EXPECT_FALSE(fs::exists(records));
  // Nothing to merge at all.
  const lminv_test::Outcome none = lminv_test::run_lminv(sweep(dir_ / "elsewhere" / "sweep.jsonl", "--merge"));
  EXPECT_EQ(none.status, 1) << none.output;
  EXPECT_NE(none.output.find("no shard files to merge"), std::string::npos) << none.output;
  // Bad shards, and --shard with --merge.
  for (const auto& [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"--shard 2/2", "--shard '2/2': I must be in 0..1"},
           {"--shard 1:2", "--shard '1:2': expected I/N"},
           {"--shard 0/2 --merge", "--shard and --merge together"}}) {
    const lminv_test::Outcome o = lminv_test::run_lminv(sweep(records, args));
    EXPECT_NE(o.status, 0) << args;
    EXPECT_NE(o.output.find(message), std::string::npos) << args << "\n" << o.output;
  }
}
