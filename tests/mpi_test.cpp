// `mpirun -n N lminv sweep ...` end to end (docs/scale-out.md): the records and summary equal one process's, a rank
// killed mid-sweep loses only the run it held and the sweep resumes with any number of ranks, and what MPI refuses.
// Built when CMake found MPI; mpirun is LMINV_MPIEXEC.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>

#include "lminv_process.hpp"
#include "sweep_records.hpp"

namespace fs = std::filesystem;

namespace {

constexpr char kPrefix[] = "mpi";

class MpiSweep : public lminv_test::WithTempDir<kPrefix> {
 protected:
  // mpirun with N ranks on this machine: more ranks than cores allowed (CI has 2), as root where the test runs as
  // root, a time limit so that a hang fails the test instead of stalling CI, and shared-memory messages copied
  // through the shared segment (containers often forbid the cross-process reads of Open MPI's default, CMA).
  static std::string mpirun(int ranks) {
    std::string command = std::string(LMINV_MPIEXEC) + " -n " + std::to_string(ranks) +
                          " --oversubscribe --timeout 300 --mca btl_vader_single_copy_mechanism none";
    if (::geteuid() == 0) command += " --allow-run-as-root";
    return command + " " + LMINV_BINARY + " ";
  }
  // The tiny GPT-2 sweep of tests/data: 6 prompts (PROMPTS: prompts-tiny.txt's 4 tokens each) x blocks 1, 2 = 12 runs,
  // into RECORDS.
  std::string sweep(const fs::path& records, const std::string& more = "",
                    const std::string& prompts = std::string(LMINV_TEST_DATA_DIR) + "/prompts-tiny.txt") const {
    const std::string data = LMINV_TEST_DATA_DIR;
    return "sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + prompts +
           " --grid model.blocks=1,2 --set output.report=false --set output.dir=" + (dir_ / "out").string() +
           " --records " + records.string() + " " + more;
  }
  // Runs COMMAND (a whole shell command line) with stderr folded into stdout.
  static lminv_test::Outcome shell(const std::string& command) {
    lminv_test::Outcome o;
    FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
    if (!pipe) return o;
    char buf[4096];
    while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe)) o.output.append(buf, n);
    const int raw = ::pclose(pipe);
    o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    return o;
  }
};

}  // namespace

// With the session cache off every record is the same as one process's but for times and the rank that ran it; with
// it on (the default) what each run found is the same, and so is the summary's table of rates.
TEST_F(MpiSweep, TwoRanksRecordWhatOneProcessRecords) {
  for (const std::string cache : {"false", "true"}) {
    const std::string setting = "--set optimizer.session_cache=" + cache;
    const fs::path one = dir_ / ("one-" + cache) / "sweep.jsonl", two = dir_ / ("two-" + cache) / "sweep.jsonl";
    const lminv_test::Outcome single = lminv_test::run_lminv(sweep(one, setting));
    ASSERT_EQ(single.status, 0) << single.output;
    const lminv_test::Outcome ranks = shell(mpirun(2) + sweep(two, setting));
    ASSERT_EQ(ranks.status, 0) << ranks.output;
    EXPECT_NE(ranks.output.find("ranks     2 on 1 node"), std::string::npos) << ranks.output;
    EXPECT_NE(ranks.output.find("[12/12]"), std::string::npos) << ranks.output;
    EXPECT_EQ(ranks.output.find("[13/"), std::string::npos) << ranks.output;

    const auto expected = lminv_test::records_by_key(one);
    const auto got = lminv_test::records_by_key(two);
    ASSERT_EQ(got.size(), 12u);
    std::set<int> by_rank;
    for (const auto& [key, record] : expected) {
      ASSERT_TRUE(got.count(key)) << key;
      const nlohmann::json& r = got.at(key);
      by_rank.insert(r["sweep"]["process"]["rank"].get<int>());
      EXPECT_EQ(r["sweep"]["process"]["ranks"], 2);
      if (cache == "false") {
        EXPECT_EQ(lminv_test::without_timing(r), lminv_test::without_timing(record)) << key;
      }
      EXPECT_EQ(lminv_test::results_of(r), lminv_test::results_of(record)) << key;
    }
    EXPECT_EQ(by_rank, (std::set<int>{0, 1})) << "both ranks ran inversions";
    nlohmann::json a = lminv_test::table_without_timing(
        nlohmann::json::parse(lminv_test::slurp(one.parent_path() / "sweep-summary.json")));
    nlohmann::json b = lminv_test::table_without_timing(
        nlohmann::json::parse(lminv_test::slurp(two.parent_path() / "sweep-summary.json")));
    if (cache == "true")
      for (nlohmann::json* t : {&a, &b})
        for (nlohmann::json& row : *t) row.erase("candidates_per_position");  // the search path, see above
    EXPECT_EQ(b, a) << cache;
  }
}

// Rank 1 killed (SIGKILL, the test hook) when it is handed its 2nd run, then the same sweep again with 1 process and,
// from a second kill, with 3 ranks: every run recorded exactly once, the records written before the kill kept.
// Every rank gets one run of the first round, and rank 1 a grid point of its own (6 runs of 0.1 to 0.7 s): it is
// handed a second run unless the machine stalls it for seconds.
TEST_F(MpiSweep, AKilledRankLosesItsRunOnlyAndTheSweepResumesWithAnyNumberOfRanks) {
  const std::string prompts20 = std::string(LMINV_TEST_DATA_DIR) + "/prompts-20.txt";
  for (const int resume_ranks : {1, 3}) {
    const fs::path records = dir_ / ("resume-" + std::to_string(resume_ranks)) / "sweep.jsonl";
    const lminv_test::Outcome killed =
        shell("LMINV_TEST_KILL_RANK=1 LMINV_TEST_KILL_AFTER_RUNS=1 " + mpirun(2) + sweep(records, "--limit 6", prompts20));
    EXPECT_NE(killed.status, 0) << killed.output;
    const auto before = lminv_test::records_by_key(records);
    // Rank 1 finished 1 run and died holding its second: at most 11 of the 12 are recorded, its 1 among them.
    EXPECT_LT(before.size(), 12u) << killed.output;
    int by_rank_1 = 0;
    for (const auto& [key, record] : before) by_rank_1 += record["sweep"]["process"]["rank"] == 1 ? 1 : 0;
    EXPECT_EQ(by_rank_1, 1) << killed.output;

    const lminv_test::Outcome resumed = resume_ranks == 1 ? lminv_test::run_lminv(sweep(records, "--limit 6", prompts20))
                                                          : shell(mpirun(resume_ranks) + sweep(records, "--limit 6", prompts20));
    ASSERT_EQ(resumed.status, 0) << resumed.output;
    EXPECT_NE(resumed.output.find("resuming: " + std::to_string(before.size()) + " of 12 runs already recorded"),
              std::string::npos)
        << resumed.output;
    const auto after = lminv_test::records_by_key(records);  // fails on a key recorded twice
    EXPECT_EQ(after.size(), 12u);
    for (const auto& [key, record] : before) {
      ASSERT_TRUE(after.count(key));
      EXPECT_EQ(after.at(key), record) << "a record written before the kill changed";
    }
  }
}

TEST_F(MpiSweep, ShardsAndMergeAreRefusedUnderMpiWithTheReason) {
  const lminv_test::Outcome o = shell(mpirun(2) + sweep(dir_ / "sweep.jsonl", "--shard 0/2"));
  EXPECT_NE(o.status, 0) << o.output;
  EXPECT_EQ(o.status, 1) << o.output;
  // One message for both ranks, from rank 0, and no MPI_Abort: every rank stopped by itself.
  EXPECT_NE(o.output.find("lminv: error (ranks 0, 1 of 2): sweep: --shard is for sweeps without MPI"),
            std::string::npos)
      << o.output;
  EXPECT_EQ(o.output.find("MPI_ABORT"), std::string::npos) << o.output;
}

// A bad input fails on every rank before any run, and every rank ends with the message (none waits for another),
// leaving no records file behind.
TEST_F(MpiSweep, ABadPromptFileEndsTheJobWithItsName) {
  const std::string data = LMINV_TEST_DATA_DIR;
  const lminv_test::Outcome o = shell(mpirun(2) + "sweep " + data + "/tiny-gpt2-sequential.ini --prompts " +
                                      (dir_ / "missing.txt").string() + " --records " +
                                      (dir_ / "sweep.jsonl").string());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_NE(o.output.find("lminv: error (ranks 0, 1 of 2): " + (dir_ / "missing.txt").string()), std::string::npos)
      << o.output;
  EXPECT_EQ(o.output.find("MPI_ABORT"), std::string::npos) << o.output;
  EXPECT_FALSE(fs::exists(dir_ / "sweep.jsonl"));
}
