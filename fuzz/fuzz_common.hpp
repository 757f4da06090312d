// Shared by the harnesses: a scratch folder in /dev/shm per process, writing the input to files there, and splitting
// an input into parts.
//
// A harness passes when the parser returns or throws lminv::Error (bad input refused with a message). Every other
// exception escapes LLVMFuzzerTestOneInput, and libFuzzer reports it as a crash (an undocumented exception type, e.g.
// a nlohmann::json::type_error or std::bad_alloc, is a finding like a sanitizer report).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace lminv_fuzz {

namespace fs = std::filesystem;

// /dev/shm/lminv-fuzz-NAME-PID: one per process (libFuzzer's -jobs/-workers run several), removed at exit.
inline const fs::path& scratch_dir(const char* name) {
  static const fs::path dir = [name] {
    fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    fs::path d = base / ("lminv-fuzz-" + std::string(name) + "-" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }();
  static const bool registered = [] {
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(dir, ec);
    });
    return true;
  }();
  (void)registered;
  return dir;
}

// Writes exactly `bytes` to FILE (replacing it); aborts if it cannot, which is the harness's fault, not the parser's.
inline void write_file(const fs::path& file, std::string_view bytes) {
  std::FILE* f = std::fopen(file.c_str(), "wb");
  if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
    std::perror(file.c_str());
    std::abort();
  }
}

// The input cut at each occurrence of `separator` (the dictionaries hold it, so the fuzzer finds it).
inline std::vector<std::string_view> split(std::string_view input, std::string_view separator, std::size_t most) {
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < most) {
    const std::size_t at = input.find(separator);
    if (at == std::string_view::npos) break;
    parts.push_back(input.substr(0, at));
    input.remove_prefix(at + separator.size());
  }
  parts.push_back(input);
  return parts;
}

inline std::string_view as_view(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// The source tree (data/, tests/data/), compiled in by fuzz/CMakeLists.txt.
inline fs::path source_dir() {
  if (const char* d = std::getenv("LMINV_SOURCE_DIR"); d && *d) return d;
  return LMINV_SOURCE_DIR;
}

}  // namespace lminv_fuzz
