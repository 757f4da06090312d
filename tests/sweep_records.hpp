// Test helpers for sweeps split over processes (shards, MPI ranks): the records of a sweep file by run key, and the
// parts of a record that must not depend on which process ran it or when.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

namespace lminv_test {

// The records of FILE by run key; a key recorded twice or a line that is not whole JSON fails the test.
inline std::map<std::string, nlohmann::json> records_by_key(const std::filesystem::path& file) {
  std::map<std::string, nlohmann::json> records;
  std::ifstream in(file);
  std::size_t number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    EXPECT_TRUE(nlohmann::json::accept(line)) << file << ":" << number << " is not a whole record";
    if (!nlohmann::json::accept(line)) continue;
    nlohmann::json r = nlohmann::json::parse(line);
    const std::string key = r["sweep"]["key"].get<std::string>();
    EXPECT_FALSE(records.count(key)) << file << ": run recorded twice: " << key;
    records[key] = std::move(r);
  }
  return records;
}

// RECORD without what differs from one execution to the next: wall times, the time stamp, and which process ran it
// (sweep.process under MPI, sweep.shard).
inline nlohmann::json without_timing(nlohmann::json record) {
  record.erase("time");
  record.erase("time_s");
  record.erase("steps_per_s");
  if (record.contains("series")) record["series"].erase("seconds");
  record["sweep"].erase("process");
  record["sweep"].erase("shard");
  return record;
}

// What a run found, independent of the search path: the recovered ids and text, the exact match, the token accuracy,
// and per position the accepted token, its distance and verdict. (The sequential search's session cache makes the
// candidates tried, and so the best rejected distance, depend on the runs a session did before.)
inline nlohmann::json results_of(const nlohmann::json& record) {
  nlohmann::json r = {{"decoded", record["decoded"]},
                      {"exact_match", record["exact_match"]},
                      {"token_accuracy", record["token_accuracy"]},
                      {"prompt", record["prompt"]}};
  if (record.contains("certificate") && record["certificate"].is_object()) {
    r["verdict"] = record["certificate"]["verdict"];
    for (const nlohmann::json& p : record["certificate"]["positions"])
      r["positions"].push_back({p["id"], p["distance"], p["verdict"]});
  }
  return r;
}

// A sweep summary's table without its times (rates, counts and candidates stay).
inline nlohmann::json table_without_timing(const nlohmann::json& summary) {
  nlohmann::json table = summary["table"];
  for (nlohmann::json& row : table) row.erase("time_per_prompt_s");
  return table;
}

}  // namespace lminv_test
