#include "report.hpp"

#include <cstdio>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <ostream>

#include "lminv/error.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {
[[noreturn]] void fail(const fs::path& file, const std::string& what) {
  throw Error(file.string() + ": " + what + ": " + std::strerror(errno));
}

void write_all(int fd, const std::string& data, const fs::path& file) {
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(file, "cannot write");
    done += static_cast<std::size_t>(n);
  }
}
// Test hook: with LMINV_TEST_KILL_IN_RECORD=N in the environment, the N-th record this process appends is cut in
// half by a SIGKILL, the fault a resumed sweep must repair, at a point the test knows on any machine.
bool kill_in_this_record() {
  static const long target = [] {
    const char* v = std::getenv("LMINV_TEST_KILL_IN_RECORD");
    return v ? std::strtol(v, nullptr, 10) : 0L;
  }();
  static long appended = 0;
  return target > 0 && ++appended == target;
}

}  // namespace

RecordsFile::RecordsFile(const fs::path& file, std::ostream* notes) : path_(file) {
  std::error_code ec;
  const fs::file_status st = fs::status(file, ec);
  if (fs::exists(st) && !fs::is_regular_file(st)) {
    const char* kind = fs::is_directory(st) ? "a folder" : fs::is_character_file(st) ? "a character device"
                       : fs::is_block_file(st) ? "a block device" : fs::is_fifo(st) ? "a FIFO" : "not a regular file";
    throw Error(file.string() + ": records go to a regular file, and this is " + kind);
  }
  if (file.has_parent_path()) {
    fs::create_directories(file.parent_path(), ec);
    if (ec) throw Error(file.parent_path().string() + ": cannot create the folder for " + file.filename().string() +
                        ": " + ec.message());
  }
  // O_NONBLOCK: a FIFO swapped in after the check must not block the open (fstat refuses it below). O_EXCL first,
  // to know whether this command made the file (and may remove it if no record comes).
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC | O_NONBLOCK, 0644);
  created_ = fd_ >= 0;
  if (fd_ < 0 && errno == EEXIST) fd_ = ::open(file.c_str(), O_RDWR | O_APPEND | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) fail(file, "cannot open the records file for appending");
  try {
    struct stat fst {};
    if (::fstat(fd_, &fst) != 0) fail(file, "cannot examine");
    if (!S_ISREG(fst.st_mode)) throw Error(file.string() + ": records go to a regular file, and this is not one");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        throw Error(file.string() + ": another lminv process is writing records to this file (it holds its lock; "
                    "or this command writes two outputs to it); wait for it to finish or give another file");
      fail(file, "cannot lock");
    }
    // A cut-off last line: drop it (its run is redone by a resumed sweep).
    const off_t size = fst.st_size;
    if (size > 0) {
      char last = '\n';
      if (::pread(fd_, &last, 1, size - 1) != 1) fail(file, "cannot read");
      if (last != '\n') {
        const std::string content = read_all();
        const std::size_t nl = content.rfind('\n');
        const std::size_t keep = nl == std::string::npos ? 0 : nl + 1;
        if (::ftruncate(fd_, static_cast<off_t>(keep)) != 0) fail(file, "cannot cut off its unfinished last line");
        if (notes)
          *notes << "  " << file.string() << ": its last line was cut short (" << content.size() - keep
                 << " bytes, an interrupted write): dropped, its run is redone\n";
      }
    }
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

RecordsFile::~RecordsFile() {
  // A file this command made and never wrote (its run failed) is not left behind.
  struct stat st {};
  if (created_ && ::fstat(fd_, &st) == 0 && st.st_size == 0) ::unlink(path_.c_str());
  ::close(fd_);  // closing releases the lock
}

std::string RecordsFile::read_all() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail(path_, "cannot examine");
  std::string content(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::pread(fd_, content.data() + done, content.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path_, "cannot read");
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  content.resize(done);
  return content;
}

void RecordsFile::append(const nlohmann::json& record) {
  // Invalid UTF-8 (a decoded attempt can split a character) is replaced rather than refused.
  const std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail(path_, "cannot examine");
  const off_t before = st.st_size;  // the lock keeps other lminv processes out, so this is where the record starts
  std::size_t done = 0;
  if (kill_in_this_record()) {  // the test hook: half the line, then the process dies as if killed mid-write
    done = static_cast<std::size_t>(std::max<ssize_t>(::write(fd_, line.data(), line.size() / 2), 0));
    ::raise(SIGKILL);
  }
  while (done < line.size()) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int cause = n < 0 ? errno : ENOSPC;
      // Cut back what part of the record did land, so the file holds whole records only.
      const bool restored = ::ftruncate(fd_, before) == 0;
      throw Error(path_.string() + ": cannot append a whole record (" + std::strerror(cause) + "); " +
                  (restored ? "the file is as it was before this record"
                            : "its last line is unfinished and will be cut off when the file is next opened"));
    }
    done += static_cast<std::size_t>(n);
  }
}

void append_json_line(const fs::path& file, const nlohmann::json& record) { RecordsFile(file).append(record); }

void write_file_atomically(const fs::path& file, const std::string& content) {
  if (file.has_parent_path()) fs::create_directories(file.parent_path());
  fs::path tmp = file;
  tmp += ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp, "cannot create");
  try {
    write_all(fd, content, tmp);
    if (::fsync(fd) != 0) fail(tmp, "cannot sync");
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), file.c_str()) != 0) {
    ::unlink(tmp.c_str());
    fail(file, "cannot replace");
  }
}

std::string fnv1a_hex(const std::string& text) {
  std::uint64_t h = 14695981039346656037ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

std::string utc_timestamp() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace lminv
