// A plugin built "for another ABI": the registry must refuse it without touching anything but abi_version.
#include "lminv/plugin.hpp"

extern "C" LMINV_EXPORT const lminv::PluginDescriptor* lminv_plugin() {
  static const lminv::PluginDescriptor descriptor{lminv::kAbiVersion + 1, sizeof(lminv::PluginDescriptor),
                                                  lminv::kBuildTag, lminv::PluginKind::optimizer, "from-the-future",
                                                  "9.9.9", "refused", nullptr};
  return &descriptor;
}
