// Results written so they survive: JSON Lines records appended whole, files replaced atomically.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace lminv {

// A JSON Lines file of records (runs, sweeps, benchmark cells), held open and locked for as long as a command writes
// to it. Opening it is the check a command makes before its long work: the file must be a regular file (or not yet
// exist: it is created, with its folder), appendable, and not locked by another lminv process (flock). A last line
// without its newline (a process stopped while writing it) is cut off, with a note, so the next record starts on a
// line of its own. append() writes a record whole or not at all: after a failed write (a full disk, a file size
// limit) the file is cut back to what it held before, and the error names the file and the cause. A file it created
// and never wrote to (the command failed first) is removed when it closes.
class RecordsFile {
 public:
  // `notes`: where the note about a cut-off last line goes (nowhere when null).
  explicit RecordsFile(const std::filesystem::path& file, std::ostream* notes = nullptr);
  ~RecordsFile();
  RecordsFile(const RecordsFile&) = delete;
  RecordsFile& operator=(const RecordsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // The file's content as it is now (every record whole, each line ending in a newline).
  std::string read_all() const;
  void append(const nlohmann::json& record);

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  bool created_ = false;  // made by this object: removed again if it stays empty
};

// Appends `record` as one line to FILE (a RecordsFile opened for this one record).
void append_json_line(const std::filesystem::path& file, const nlohmann::json& record);

// Writes FILE through a temporary file in the same folder and a rename: the old content stays
// whole until the new one is complete.
void write_file_atomically(const std::filesystem::path& file, const std::string& content);

// FNV-1a of TEXT as 16 hex digits: a fingerprint (of a config, say) that is the same on every machine and build.
std::string fnv1a_hex(const std::string& text);

// UTC time as 2026-11-29T12:34:56Z.
std::string utc_timestamp();

}  // namespace lminv
