// Test helpers for tests that run the lminv program (LMINV_BINARY) and read the files it writes.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace lminv_test {

struct Outcome {
  int status = -1;      // the exit status, -1 when it did not exit normally
  std::string output;  // stdout and stderr together
};

// Runs `lminv ARGS` in a shell with stderr folded into stdout.
inline Outcome run_lminv(const std::string& args) {
  const std::string command = std::string(LMINV_BINARY) + " " + args + " 2>&1";
  Outcome o;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return o;
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), pipe)) o.output.append(buf.data(), n);
  const int raw = ::pclose(pipe);
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return o;
}

// A file's bytes ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A fixture with a fresh folder of its own, dir_ (<tmp>/lminv-PREFIX-<test>-<pid>), removed afterwards.
template <const char* Prefix>
class WithTempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("lminv-" + std::string(Prefix) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name() + "-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::filesystem::path dir_;
};

}  // namespace lminv_test
