// lminv SDK: the one entry point a plugin exports.
//
// A plugin is a shared library that exports `lminv_plugin`, an extern "C" function returning a plain
// descriptor. The host reads abi_version first and refuses a plugin built against another ABI.
// Bump kAbiVersion whenever a class in this SDK changes its layout or its virtual functions.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lminv/backend.hpp"
#include "lminv/decoder.hpp"
#include "lminv/error.hpp"
#include "lminv/optimizer.hpp"

namespace lminv {

// 1: the first. 2: Result gained ids and series. 3: ModelSpec.kind and .arch (the decoder's architecture),
// BackendInfo.kinds and .features, models of any length.
inline constexpr std::uint32_t kAbiVersion = 4;
inline constexpr const char* kPluginEntry = "lminv_plugin";

enum class PluginKind : std::uint32_t { backend = 1, optimizer = 2, decoder = 3 };

inline const char* plugin_kind_name(PluginKind kind) {
  switch (kind) {
    case PluginKind::backend: return "backend";
    case PluginKind::optimizer: return "optimizer";
    case PluginKind::decoder: return "decoder";
  }
  return "unknown";
}

// Plain data: its layout is part of the ABI. `abi_version` stays the first member for ever.
struct PluginDescriptor {
  std::uint32_t abi_version;
  PluginKind kind;
  const char* name;     // the name configs use: [backend] name = reference
  const char* version;  // the plugin's own version
  const char* summary;  // one line for `lminv plugins`
  // A new object of the kind's interface (Backend*, Optimizer*, Decoder*) as void*; the host owns it.
  void* (*create)();
};

namespace detail {
template <class T>
constexpr PluginKind plugin_kind_of() {
  if constexpr (std::is_base_of_v<Backend, T>) return PluginKind::backend;
  else if constexpr (std::is_base_of_v<Optimizer, T>) return PluginKind::optimizer;
  else {
    static_assert(std::is_base_of_v<Decoder, T>, "a plugin class derives from Backend, Optimizer or Decoder");
    return PluginKind::decoder;
  }
}
// The pointer the host will cast back: converted to the interface first, so multiple inheritance is safe.
template <class T>
void* create_as_interface() {
  if constexpr (std::is_base_of_v<Backend, T>) return static_cast<Backend*>(new T());
  else if constexpr (std::is_base_of_v<Optimizer, T>) return static_cast<Optimizer*>(new T());
  else return static_cast<Decoder*>(new T());
}
}  // namespace detail

}  // namespace lminv

// Declares the plugin in one line of its source file:
//   LMINV_PLUGIN(PseudoInverseDecoder, "pinv", "1.0.0", "argmax / top-k through pinv(wte)")
#define LMINV_PLUGIN(CLASS, NAME, VERSION, SUMMARY)                                                   \
  extern "C" LMINV_EXPORT const ::lminv::PluginDescriptor* lminv_plugin() {                           \
    static const ::lminv::PluginDescriptor descriptor{::lminv::kAbiVersion,                           \
                                                      ::lminv::detail::plugin_kind_of<CLASS>(), NAME, \
                                                      VERSION, SUMMARY,                               \
                                                      &::lminv::detail::create_as_interface<CLASS>};  \
    return &descriptor;                                                                               \
  }
