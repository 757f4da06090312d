// Results written so they survive: JSON Lines records appended whole, files replaced atomically.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace lminv {

// Appends `record` as one line to FILE with a single write on a descriptor opened O_APPEND, so a
// reader (or a crash) never sees half a record and earlier records are never touched.
void append_json_line(const std::filesystem::path& file, const nlohmann::json& record);

// Writes FILE through a temporary file in the same folder and a rename: the old content stays
// whole until the new one is complete.
void write_file_atomically(const std::filesystem::path& file, const std::string& content);

// UTC time as 2026-11-29T12:34:56Z.
std::string utc_timestamp();

}  // namespace lminv
