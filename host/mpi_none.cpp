// mpi.hpp in a build without MPI (CMake found no MPI library): lminv sweep runs as one process, and a process that an
// MPI launcher started is told that this build cannot take part.
#include <cstdlib>
#include <iostream>

#include "lminv/error.hpp"
#include "mpi.hpp"
#include "scale_out.hpp"

namespace lminv {

std::unique_ptr<MpiWorld> MpiWorld::join_if_launched() {
  if (const auto variable = mpi_launcher_variable())
    throw Error("this process was started by an MPI launcher (" + *variable +
                " is set), but this lminv was built without MPI: every process would run the whole sweep. Install "
                "Open MPI (Debian: libopenmpi-dev openmpi-bin) and build again, or run lminv sweep without mpirun "
                "(--shard I/N splits a sweep without MPI)");
  return nullptr;
}

MpiWorld::~MpiWorld() = default;

std::vector<std::string> MpiWorld::agree(const std::string& error) {
  agreed_ = true;
  return {error};
}

void MpiWorld::broadcast(std::string&) const {}

std::vector<std::string> MpiWorld::gather(const std::string& text) const { return {text}; }

void MpiWorld::abort(const std::string& message) const {
  std::cerr << "lminv: error: " << message << std::endl;
  std::_Exit(1);
}

std::string setup_errors_text(const std::vector<std::string>& errors) {
  return errors.empty() || errors[0].empty() ? "" : "lminv: error: " + errors[0] + "\n";
}

void run_distributed(const MpiWorld&, const DistributedRuns&) {
  throw Error("this lminv was built without MPI");  // not reached: no MpiWorld exists in such a build
}

}  // namespace lminv
