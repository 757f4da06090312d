// Progress lines (host/progress.hpp): redrawn in place on a terminal, plain lines without a carriage return
// elsewhere (CI logs), nothing when off; and the lminv program's output when stderr is not a terminal.
#include <gtest/gtest.h>

#include "lminv_process.hpp"
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <string>

#include "progress.hpp"

namespace {

using lminv_test::Outcome;
using lminv_test::run_lminv;

// What a Progress in MODE writes for `updates` updates (at most one line per `seconds`).
std::string written(lminv::ProgressMode mode, int updates, double seconds) {
  std::FILE* f = std::tmpfile();
  {
    lminv::Progress p(mode, "step", updates, seconds, f);
    p.note("preparing");
    for (int i = 1; i <= updates; ++i) p.update(i, "loss 1.0");
  }  // the destructor clears a terminal line
  std::rewind(f);
  std::string s;
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), f)) s.append(buf.data(), n);
  std::fclose(f);
  return s;
}


}  // namespace

TEST(Progress, LinesModeWritesWholeLinesWithoutCarriageReturns) {
  const std::string s = written(lminv::ProgressMode::lines, 5, 0.0);  // a line for every update
  EXPECT_EQ(s.find('\r'), std::string::npos) << s;
  EXPECT_EQ(s.find('\033'), std::string::npos) << s;
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 6) << s;  // the note and five updates
  EXPECT_NE(s.find("  preparing\n"), std::string::npos) << s;
  EXPECT_NE(s.find("  step 5/5  loss 1.0  "), std::string::npos) << s;
  EXPECT_NE(s.find("steps/s  ETA 0 s"), std::string::npos) << s;
  // With a period, updates within it write nothing.
  const std::string quiet = written(lminv::ProgressMode::lines, 50, 3600.0);
  EXPECT_EQ(std::count(quiet.begin(), quiet.end(), '\n'), 1) << quiet;
}

TEST(Progress, TerminalModeRedrawsOneLineAndClearsIt) {
  const std::string s = written(lminv::ProgressMode::terminal, 3, 0.0);
  // Redrawn at most 5 times a second: the note, then the last unit (always drawn).
  EXPECT_EQ(s.find("\r\033[K  preparing"), 0u) << s;
  EXPECT_NE(s.find("\r\033[K  step 3/3  loss 1.0"), std::string::npos) << s;
  EXPECT_EQ(s.find('\n'), std::string::npos) << s;
  EXPECT_EQ(s.substr(s.size() - 4), "\r\033[K");  // cleared at the end
}

TEST(Progress, OffWritesNothing) { EXPECT_EQ(written(lminv::ProgressMode::off, 10, 0.0), ""); }

TEST(Progress, ModeFromTheSetting) {
  EXPECT_EQ(lminv::progress_mode("off"), lminv::ProgressMode::off);
  EXPECT_EQ(lminv::progress_mode("on"), lminv::ProgressMode::terminal);
  EXPECT_EQ(lminv::progress_mode("lines"), lminv::ProgressMode::lines);
  EXPECT_EQ(lminv::progress_mode("on", /*quiet=*/true), lminv::ProgressMode::off);
}

// The program with stderr into a pipe (not a terminal): auto gives no carriage return; on forces the terminal line
// (which shows this test would see one).
TEST(Progress, ProgramOutputToAPipeHasNoCarriageReturns) {
  const std::string config = std::string(LMINV_TEST_DATA_DIR) + "/tiny-fcnet.ini";
  const std::string isolated = " --set output.dir=" + testing::TempDir() + "lminv-progress-test --set output.report=false";
  const std::string piped = run_lminv("run " + config + isolated + " --set output.progress=auto --set optimizer.steps=100").output;
  EXPECT_NE(piped.find("record"), std::string::npos) << piped;
  EXPECT_EQ(piped.find('\r'), std::string::npos) << piped;
  const std::string forced = run_lminv("run " + config + isolated + " --set output.progress=on --set optimizer.steps=100").output;
  EXPECT_NE(forced.find('\r'), std::string::npos) << forced;
  const std::string quiet = run_lminv("run " + config + isolated + " --set output.progress=on --quiet").output;
  EXPECT_EQ(quiet.find('\r'), std::string::npos) << quiet;
}
