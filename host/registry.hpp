// The plugin registry: finds, checks and loads plugins with Boost.DLL, and makes their objects.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "lminv/plugin.hpp"

namespace boost::dll {
class shared_library;
}

namespace lminv {

struct PluginInfo {
  PluginKind kind;
  std::string name;
  std::string version;
  std::string summary;
  std::filesystem::path file;
};

// A file that looked like a plugin but was refused, and why.
struct RejectedPlugin {
  std::filesystem::path file;
  std::string reason;
};

// What differs between a plugin's build tag and this lminv's (kBuildTag, plugin.hpp) in the words that must agree,
// as "cxx11-abi 0 in the plugin, 1 here (plugin compiler gcc-12, lminv's gcc-12)"; empty when they agree.
std::string build_tag_difference(const std::string& plugin_tag);

// Scans folders for files named lminv-plugin-*.so and loads each one. A plugin is refused, with a
// reason naming its file, when it does not load (the dynamic loader's message is given), lacks the lminv_plugin
// entry or its entry throws, was built for another ABI version, with another descriptor size or other C++ library
// settings (the build tag), or repeats the kind and name of one found earlier in the search order.
// Loaded libraries are never unloaded; every object made here keeps its library referenced too.
class Registry {
 public:
  explicit Registry(const std::vector<std::filesystem::path>& search_dirs);

  const std::vector<PluginInfo>& plugins() const { return infos_; }
  const std::vector<RejectedPlugin>& rejected() const { return rejected_; }
  const std::vector<std::filesystem::path>& search_dirs() const { return dirs_; }

  // The plugin of that kind and name, or nullptr.
  const PluginInfo* find(PluginKind kind, const std::string& name) const;

  // New objects; an unknown name is an Error listing the plugins of that kind that are available.
  std::shared_ptr<Backend> create_backend(const std::string& name) const;
  std::shared_ptr<Optimizer> create_optimizer(const std::string& name) const;
  std::shared_ptr<Decoder> create_decoder(const std::string& name) const;

 private:
  struct Entry {
    PluginInfo info;
    std::shared_ptr<boost::dll::shared_library> library;
    const PluginDescriptor* descriptor = nullptr;
  };
  void load(const std::filesystem::path& file);
  const Entry& entry(PluginKind kind, const std::string& name) const;
  template <class T>
  std::shared_ptr<T> create(PluginKind kind, const std::string& name) const;

  std::vector<std::filesystem::path> dirs_;
  std::vector<Entry> entries_;
  std::vector<PluginInfo> infos_;
  std::vector<RejectedPlugin> rejected_;
};

// A shared_ptr to `object` that also keeps `owner` (the plugin object that made it, and so its
// library) alive: for models made by a backend.
template <class T>
std::shared_ptr<T> keep_alive(std::unique_ptr<T> object, std::shared_ptr<const void> owner) {
  return std::shared_ptr<T>(object.release(), [owner = std::move(owner)](T* p) { delete p; });
}

}  // namespace lminv
