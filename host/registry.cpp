#include "registry.hpp"

#include <algorithm>
#include <boost/dll/shared_library.hpp>
#include <mutex>
#include <set>
#include <system_error>

namespace lminv {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kFilePrefix = "lminv-plugin-";

bool looks_like_plugin(const fs::path& file) {
  const std::string name = file.filename().string();
  return name.rfind(kFilePrefix, 0) == 0 && file.extension() == boost::dll::shared_library::suffix().string();
}

// Plugins are never unloaded: unloading code that still has objects, thread-locals or registered
// callbacks alive is a classic crash at exit. Every library loaded stays referenced here.
void keep_loaded(std::shared_ptr<boost::dll::shared_library> library) {
  static std::mutex mutex;
  static auto* libraries = new std::vector<std::shared_ptr<boost::dll::shared_library>>();
  std::lock_guard<std::mutex> lock(mutex);
  libraries->push_back(std::move(library));
}

}  // namespace

Registry::Registry(const std::vector<fs::path>& search_dirs) {
  std::set<fs::path> seen;
  for (const fs::path& dir : search_dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    const fs::path canonical = fs::canonical(dir, ec);
    if (ec || !seen.insert(canonical).second) continue;
    dirs_.push_back(canonical);
    std::vector<fs::path> files;
    for (const auto& item : fs::directory_iterator(canonical, ec))
      if (looks_like_plugin(item.path())) files.push_back(item.path());
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) load(file);
  }
}

void Registry::load(const fs::path& file) {
  auto library = std::make_shared<boost::dll::shared_library>();
  boost::dll::fs::error_code ec;
  library->load(file, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local, ec);
  if (ec) {
    rejected_.push_back({file, "cannot be loaded as a shared library: " + ec.message()});
    return;
  }
  keep_loaded(library);
  if (!library->has(kPluginEntry)) {
    rejected_.push_back({file, std::string("not an lminv plugin: it exports no '") + kPluginEntry + "' entry"});
    return;
  }
  const PluginDescriptor* descriptor = library->get<const PluginDescriptor*()>(kPluginEntry)();
  if (!descriptor) {
    rejected_.push_back({file, "its lminv_plugin entry returned no descriptor"});
    return;
  }
  // abi_version is the one field read before the versions are known to agree.
  if (descriptor->abi_version != kAbiVersion) {
    rejected_.push_back({file, "built for plugin ABI version " + std::to_string(descriptor->abi_version) +
                                   ", this lminv has ABI version " + std::to_string(kAbiVersion) +
                                   ": rebuild the plugin against this lminv's SDK"});
    return;
  }
  const PluginKind kind = descriptor->kind;
  if (kind != PluginKind::backend && kind != PluginKind::optimizer && kind != PluginKind::decoder) {
    rejected_.push_back({file, "unknown plugin kind " + std::to_string(static_cast<std::uint32_t>(kind))});
    return;
  }
  if (!descriptor->name || !*descriptor->name || !descriptor->create) {
    rejected_.push_back({file, "its descriptor has no name or no factory"});
    return;
  }
  PluginInfo info{kind, descriptor->name, descriptor->version ? descriptor->version : "",
                  descriptor->summary ? descriptor->summary : "", file};
  if (const PluginInfo* earlier = find(kind, info.name)) {
    rejected_.push_back({file, std::string("a ") + plugin_kind_name(kind) + " plugin named '" + info.name +
                                   "' was already loaded from " + earlier->file.string()});
    return;
  }
  entries_.push_back({info, library, descriptor});
  infos_.push_back(std::move(info));
}

const PluginInfo* Registry::find(PluginKind kind, const std::string& name) const {
  for (const PluginInfo& info : infos_)
    if (info.kind == kind && info.name == name) return &info;
  return nullptr;
}

const Registry::Entry& Registry::entry(PluginKind kind, const std::string& name) const {
  for (const Entry& e : entries_)
    if (e.info.kind == kind && e.info.name == name) return e;
  std::string available;
  for (const Entry& e : entries_)
    if (e.info.kind == kind) available += (available.empty() ? "" : ", ") + e.info.name;
  std::string where;
  for (const fs::path& dir : dirs_) where += (where.empty() ? "" : ", ") + dir.string();
  throw Error(std::string("no ") + plugin_kind_name(kind) + " plugin named '" + name + "'; available: " +
              (available.empty() ? "none" : available) + " (searched: " + (where.empty() ? "no folder" : where) +
              "; add folders with --plugin-dir or LMINV_PLUGIN_PATH)");
}

template <class T>
std::shared_ptr<T> Registry::create(PluginKind kind, const std::string& name) const {
  const Entry& e = entry(kind, name);
  // The descriptor's factory returns the object already converted to T's interface (see plugin.hpp).
  T* object = static_cast<T*>(e.descriptor->create());
  if (!object)
    throw Error(std::string(plugin_kind_name(kind)) + " plugin '" + name + "' (" + e.info.file.string() +
                ") made no object");
  return std::shared_ptr<T>(object, [library = e.library](T* p) { delete p; });
}

std::shared_ptr<Backend> Registry::create_backend(const std::string& name) const {
  return create<Backend>(PluginKind::backend, name);
}
std::shared_ptr<Optimizer> Registry::create_optimizer(const std::string& name) const {
  return create<Optimizer>(PluginKind::optimizer, name);
}
std::shared_ptr<Decoder> Registry::create_decoder(const std::string& name) const {
  return create<Decoder>(PluginKind::decoder, name);
}

}  // namespace lminv
