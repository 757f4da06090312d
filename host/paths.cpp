#include "paths.hpp"

#include <boost/dll/runtime_symbol_info.hpp>
#include <cstdlib>
#include <string>

namespace lminv {

namespace fs = std::filesystem;

fs::path executable_dir() { return boost::dll::program_location().parent_path(); }

std::vector<fs::path> plugin_search_dirs(const std::vector<fs::path>& extra_dirs) {
  std::vector<fs::path> dirs = extra_dirs;
  if (const char* env = std::getenv("LMINV_PLUGIN_PATH")) {
    std::string list = env;
    std::size_t start = 0;
    while (start <= list.size()) {
      const std::size_t end = std::min(list.find(':', start), list.size());
      if (end > start) dirs.emplace_back(list.substr(start, end - start));
      start = end + 1;
    }
  }
  const fs::path exe = executable_dir();
  dirs.push_back(exe);
  dirs.push_back(exe.parent_path() / LMINV_PLUGIN_SUBDIR);
  return dirs;
}

fs::path default_cache_dir() {
  if (const char* env = std::getenv("LMINV_CACHE_DIR"); env && *env) return env;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "lminv";
  if (const char* home = std::getenv("HOME"); home && *home) return fs::path(home) / ".cache" / "lminv";
  return fs::temp_directory_path() / "lminv-cache";
}

}  // namespace lminv
