// The records file a sweep resumes from (host/sweep.cpp read_records, host/report.cpp RecordsFile): the input is the
// records file. It is opened as a sweep opens it (locked, a cut-off last line dropped), read back, and every record
// found is read the way the summary table reads records.
//
// read_records and the summary's helpers are internal to sweep.cpp, so this file compiles sweep.cpp itself (the
// linker then takes nothing of sweep.cpp from lminv_host).
#include "../host/sweep.cpp"

#include <cstdint>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = lminv_fuzz::scratch_dir("records") / "sweep.jsonl";
  lminv_fuzz::write_file(file, lminv_fuzz::as_view(data, size));
  try {
    std::ostringstream notes;
    const lminv::RecordsFile records(file, &notes);
    const std::string content = records.read_all();
    if (!content.empty() && content.back() != '\n') __builtin_trap();  // the cut-off last line is gone
    const std::map<std::string, nlohmann::json> done = lminv::read_records(records);
    for (const auto& [key, r] : done) {
      (void)key;
      (void)lminv::number_at(r, {"token_accuracy"}, 0);
      (void)lminv::number_at(r, {"time_s", "optimize"});
      (void)lminv::number_at(r, {"values", "candidates_per_position"});
    }
  } catch (const lminv::Error&) {
  }
  return 0;
}
