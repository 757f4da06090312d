#include <csignal>
#include <iostream>
#include <string>
#include <vector>

#include "cli.hpp"

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  // A file size limit (ulimit -f) must make a write fail with EFBIG, which lminv reports and recovers from (records
  // are cut back whole), rather than kill the process with SIGXFSZ.
  std::signal(SIGXFSZ, SIG_IGN);
  return lminv::run_cli(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
