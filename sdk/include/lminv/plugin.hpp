// lminv SDK: the one entry point a plugin exports.
//
// A plugin is a shared library that exports `lminv_plugin`, an extern "C" function returning a plain
// descriptor. The host reads abi_version first and refuses a plugin built against another ABI, then the
// descriptor's size and the plugin's build tag (the C++ standard library settings it was compiled with).
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
// BackendInfo.kinds and .features, models of any length. 4: Problem.known_prefix and .target_rounding,
// Result.ties. 5: the descriptor carries its size and the build tag; Result.last_step. 6: Head::lm_head_no_ln_f
// and Positions::none (values a backend built before would not know). 7: ModelSpec.weight_dtype, .dropout and
// .dropout_seed.
inline constexpr std::uint32_t kAbiVersion = 7;
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

// The parts of a C++ build that host and plugin must share beyond the SDK's headers, as "key=value" words:
// std::string, std::vector and std::map cross the plugin boundary, so the standard library, its string ABI
// (libstdc++'s _GLIBCXX_USE_CXX11_ABI), its debug containers (another layout) and the pointer size must agree.
// The compiler is named for messages only: GCC and Clang share the Itanium C++ ABI.
#define LMINV_DETAIL_STR2(x) #x
#define LMINV_DETAIL_STR(x) LMINV_DETAIL_STR2(x)
#if defined(__GLIBCXX__)
#define LMINV_DETAIL_STDLIB "stdlib=libstdc++ cxx11-abi=" LMINV_DETAIL_STR(_GLIBCXX_USE_CXX11_ABI)
#elif defined(_LIBCPP_VERSION)
#define LMINV_DETAIL_STDLIB "stdlib=libc++ cxx11-abi=-"
#else
#define LMINV_DETAIL_STDLIB "stdlib=other cxx11-abi=-"
#endif
#if defined(_GLIBCXX_DEBUG) || (defined(_LIBCPP_DEBUG) && _LIBCPP_DEBUG > 0)
#define LMINV_DETAIL_DEBUG "debug-containers=1"
#else
#define LMINV_DETAIL_DEBUG "debug-containers=0"
#endif
#if defined(__clang__)
#define LMINV_DETAIL_COMPILER "compiler=clang-" LMINV_DETAIL_STR(__clang_major__)
#elif defined(__GNUC__)
#define LMINV_DETAIL_COMPILER "compiler=gcc-" LMINV_DETAIL_STR(__GNUC__)
#else
#define LMINV_DETAIL_COMPILER "compiler=other"
#endif
#define LMINV_BUILD_TAG                                                                                   \
  LMINV_DETAIL_STDLIB " " LMINV_DETAIL_DEBUG " pointer-bytes=" LMINV_DETAIL_STR(__SIZEOF_POINTER__) " " \
      LMINV_DETAIL_COMPILER
inline constexpr const char* kBuildTag = LMINV_BUILD_TAG;
// The words of kBuildTag that must be equal in host and plugin (the others are information).
inline constexpr const char* kBuildTagCompared[] = {"stdlib", "cxx11-abi", "debug-containers", "pointer-bytes"};

// Plain data: its layout is part of the ABI. `abi_version` stays the first member for ever and, from ABI 5 on,
// `descriptor_size` the second: the host checks both before it reads anything else.
struct PluginDescriptor {
  std::uint32_t abi_version;
  std::uint32_t descriptor_size;  // sizeof(PluginDescriptor) in the plugin's build
  const char* build_tag;          // kBuildTag of the plugin's build
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
                                                      sizeof(::lminv::PluginDescriptor),              \
                                                      ::lminv::kBuildTag,                             \
                                                      ::lminv::detail::plugin_kind_of<CLASS>(), NAME, \
                                                      VERSION, SUMMARY,                               \
                                                      &::lminv::detail::create_as_interface<CLASS>};  \
    return &descriptor;                                                                               \
  }
