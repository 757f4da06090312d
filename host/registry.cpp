#include "registry.hpp"

#include <algorithm>
#include <boost/dll/shared_library.hpp>
#include <dlfcn.h>
#include <map>
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

// The dynamic loader's own reason (a missing dependency, an undefined symbol, a wrong ELF class): Boost.DLL reports
// only an errno-style message, so the file is opened once more with dlopen to read dlerror().
std::string loader_message(const fs::path& file, const std::string& fallback) {
  ::dlerror();
  if (void* handle = ::dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL)) {
    ::dlclose(handle);
    return fallback;
  }
  const char* why = ::dlerror();
  return why ? std::string(why) : fallback;
}

std::map<std::string, std::string> tag_words(const std::string& tag) {
  std::map<std::string, std::string> words;
  std::size_t start = 0;
  while (start < tag.size()) {
    std::size_t end = tag.find(' ', start);
    if (end == std::string::npos) end = tag.size();
    const std::string word = tag.substr(start, end - start);
    const std::size_t eq = word.find('=');
    if (eq != std::string::npos) words[word.substr(0, eq)] = word.substr(eq + 1);
    start = end + 1;
  }
  return words;
}

}  // namespace

std::string build_tag_difference(const std::string& plugin_tag) {
  const std::map<std::string, std::string> plugin = tag_words(plugin_tag), host = tag_words(kBuildTag);
  std::string diff;
  for (const char* key : kBuildTagCompared) {
    const auto p = plugin.find(key), h = host.find(key);
    const std::string pv = p == plugin.end() ? "(not given)" : p->second;
    const std::string hv = h == host.end() ? "(not given)" : h->second;
    if (pv != hv) diff += (diff.empty() ? "" : ", ") + std::string(key) + " " + pv + " in the plugin, " + hv + " here";
  }
  if (!diff.empty()) {
    const auto pc = plugin.find("compiler"), hc = host.find("compiler");
    diff += " (plugin compiler " + (pc == plugin.end() ? std::string("unknown") : pc->second) + ", lminv's " +
            (hc == host.end() ? std::string("unknown") : hc->second) + ")";
  }
  return diff;
}

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
    rejected_.push_back({file, "cannot be loaded as a shared library: " + loader_message(file, ec.message())});
    return;
  }
  keep_loaded(library);
  if (!library->has(kPluginEntry)) {
    rejected_.push_back({file, std::string("not an lminv plugin: it exports no '") + kPluginEntry + "' entry"});
    return;
  }
  const PluginDescriptor* descriptor = nullptr;
  try {
    descriptor = library->get<const PluginDescriptor*()>(kPluginEntry)();
  } catch (const std::exception& e) {
    rejected_.push_back({file, std::string("its lminv_plugin entry threw: ") + e.what()});
    return;
  } catch (...) {
    rejected_.push_back({file, "its lminv_plugin entry threw an exception that is not a std::exception"});
    return;
  }
  if (!descriptor) {
    rejected_.push_back({file, "its lminv_plugin entry returned no descriptor"});
    return;
  }
  // abi_version is the one field read before the versions are known to agree; from ABI 5 on, descriptor_size the
  // second.
  if (descriptor->abi_version != kAbiVersion) {
    rejected_.push_back({file, "built for plugin ABI version " + std::to_string(descriptor->abi_version) +
                                   ", this lminv has ABI version " + std::to_string(kAbiVersion) +
                                   ": rebuild the plugin against this lminv's SDK"});
    return;
  }
  if (descriptor->descriptor_size != sizeof(PluginDescriptor)) {
    rejected_.push_back({file, "its plugin descriptor is " + std::to_string(descriptor->descriptor_size) +
                                   " bytes, this lminv's is " + std::to_string(sizeof(PluginDescriptor)) +
                                   " (same ABI number, another layout: an SDK header edited or a compiler packing "
                                   "differently); rebuild the plugin against this lminv's SDK"});
    return;
  }
  if (const std::string diff = build_tag_difference(descriptor->build_tag ? descriptor->build_tag : "");
      !diff.empty()) {
    rejected_.push_back({file, "built with other C++ library settings than this lminv: " + diff +
                                   "; rebuild the plugin with the host's compiler settings"});
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
  T* object = nullptr;
  try {
    object = static_cast<T*>(e.descriptor->create());
  } catch (const std::exception& x) {
    throw Error(std::string(plugin_kind_name(kind)) + " plugin '" + name + "' (" + e.info.file.string() +
                ") failed to make its object: " + x.what());
  } catch (...) {
    throw Error(std::string(plugin_kind_name(kind)) + " plugin '" + name + "' (" + e.info.file.string() +
                ") failed to make its object (an exception that is not a std::exception)");
  }
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
