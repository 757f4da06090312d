#include "files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "lminv/error.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {

// What a stat'ed path is, when it is not a regular file.
const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a folder";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

void check_stat(const fs::path& file, const std::string& what, const struct stat& st, std::uintmax_t limit) {
  if (!S_ISREG(st.st_mode))
    throw Error(file.string() + ": " + what + " must be a regular file, and this is " + kind_of(st.st_mode));
  if (static_cast<std::uintmax_t>(st.st_size) > limit)
    throw Error(file.string() + ": " + what + " is " + byte_size(static_cast<std::uintmax_t>(st.st_size)) +
                ", more than the " + byte_size(limit) + " lminv reads of such a file");
}

[[noreturn]] void fail_errno(const fs::path& file, const std::string& what, const char* doing) {
  const int e = errno;
  if (e == ENOENT) throw Error(file.string() + ": " + what + " does not exist");
  throw Error(file.string() + ": cannot " + doing + " " + what + ": " + std::strerror(e));
}

}  // namespace

std::string byte_size(std::uintmax_t bytes) {
  char buf[64];
  if (bytes < 1024) std::snprintf(buf, sizeof buf, "%ju bytes", bytes);
  else if (bytes < (std::uintmax_t{1} << 20)) std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  else if (bytes < (std::uintmax_t{1} << 30)) std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / 1048576.0);
  else std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / 1073741824.0);
  return buf;
}

void require_regular_file(const fs::path& file, const std::string& what, std::uintmax_t limit) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) fail_errno(file, what, "examine");
  check_stat(file, what, st, limit);
}

std::string read_regular_file(const fs::path& file, const std::string& what, std::uintmax_t limit) {
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer; on a regular file it changes nothing.
  const int fd = ::open(file.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail_errno(file, what, "open");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail_errno(file, what, "examine");
  check_stat(file, what, st, limit);
  std::string bytes(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno(file, what, "read");
    if (n == 0) break;  // shrank while being read: what is there
    done += static_cast<std::size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace lminv
