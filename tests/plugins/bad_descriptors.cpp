// Plugins refused by the handshake after the ABI number: one flavour per build, chosen by LMINV_BAD_FLAVOUR.
//   1: a descriptor whose size is not the host's (same ABI number, another layout)
//   2: a build tag of another string ABI (as if built with _GLIBCXX_USE_CXX11_ABI=0)
//   3: an entry that throws
#include <stdexcept>

#include "lminv/plugin.hpp"

extern "C" LMINV_EXPORT const lminv::PluginDescriptor* lminv_plugin() {
#if LMINV_BAD_FLAVOUR == 1
  static const lminv::PluginDescriptor descriptor{lminv::kAbiVersion, sizeof(lminv::PluginDescriptor) + 8,
                                                  lminv::kBuildTag, lminv::PluginKind::optimizer, "wrong-size",
                                                  "1.0.0", "refused", nullptr};
  return &descriptor;
#elif LMINV_BAD_FLAVOUR == 2
  static const lminv::PluginDescriptor descriptor{
      lminv::kAbiVersion, sizeof(lminv::PluginDescriptor),
      "stdlib=libstdc++ cxx11-abi=0 debug-containers=0 pointer-bytes=8 compiler=gcc-4", lminv::PluginKind::optimizer,
      "old-strings", "1.0.0", "refused", nullptr};
  return &descriptor;
#else
  throw std::runtime_error("the plugin's configuration file is missing");
#endif
}
