// The lminv command line: `lminv SUBCOMMAND ...`.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace lminv {

// Runs the command line `args` (without the program name). Returns the exit status:
// 0 success, 1 an error (its message on `err`), 2 a usage error.
int run_cli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace lminv
