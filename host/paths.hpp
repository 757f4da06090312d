// Where lminv finds things: its own executable, plugins, data and caches.
#pragma once

#include <filesystem>
#include <vector>

namespace lminv {

// Folder of the running lminv executable (or test program).
std::filesystem::path executable_dir();

// Plugin folders in search order: each --plugin-dir, then $LMINV_PLUGIN_PATH (colon-separated),
// then the executable's own folder, then <exe>/../lib/lminv/plugins (the build and install trees).
std::vector<std::filesystem::path> plugin_search_dirs(const std::vector<std::filesystem::path>& extra_dirs);

// Where weight-keyed caches (the decoder's pseudo-inverse) go: $LMINV_CACHE_DIR, else
// $XDG_CACHE_HOME/lminv, else ~/.cache/lminv.
std::filesystem::path default_cache_dir();

}  // namespace lminv
