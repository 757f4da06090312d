// A plugin that needs a shared library the loader cannot find (built without a run path to it): the registry's
// reason must be the loader's own message, which names the missing library.
#include "lminv/plugin.hpp"

extern "C" int lminv_test_dependency_value();

extern "C" LMINV_EXPORT const lminv::PluginDescriptor* lminv_plugin() {
  static int value = lminv_test_dependency_value();
  (void)value;
  return nullptr;
}
