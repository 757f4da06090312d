// lminv SDK: the one exception type that crosses the plugin boundary.
#pragma once

#include <stdexcept>
#include <string>

#if defined(_WIN32)
#define LMINV_EXPORT __declspec(dllexport)
#else
#define LMINV_EXPORT __attribute__((visibility("default")))
#endif

namespace lminv {

// Every error lminv raises, in the host or in a plugin, is an lminv::Error. The message is complete
// on its own: it names the file, config key, value or plugin that is at fault. Plugins are built with
// hidden visibility, so the type is exported explicitly for catch clauses to match across libraries.
class LMINV_EXPORT Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace lminv
