// The states files of `lminv invert` and `lminv sweep --states` (host/states.cpp): byte 0 picks the extension the
// rest is written under (.safetensors, .npy, .npz, .jsonl manifest, or .bin, recognised by its first bytes) and
// whether it is read as one states tensor (read_states, with no name, "output" or "x") or as a set
// (read_states_set). A manifest's lines may name the valid files put beside it: f32.safetensors, set.npz, v1.npy.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "states.hpp"

namespace {

namespace fs = std::filesystem;

const fs::path& dir() {
  static const fs::path d = [] {
    const fs::path out = lminv_fuzz::scratch_dir("states");
    const fs::path src = lminv_fuzz::source_dir() / "tests/data/states";
    for (const auto& [from, to] : {std::pair{"f32.safetensors", "f32.safetensors"},
                                   std::pair{"set-members.npz", "set.npz"}, std::pair{"v1-f4.npy", "v1.npy"}})
      fs::copy_file(src / from, out / to, fs::copy_options::overwrite_existing);
    return out;
  }();
  return d;
}

void check(const lminv::CapturedStates& s) {
  if (s.states.rank() != 2 || s.positions() < 1 || s.width() < 1) __builtin_trap();  // [T, D], T, D >= 1
  (void)s.where();
  (void)lminv::stored_rounding(s.stored_dtype);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  static const char* kExtensions[] = {".safetensors", ".npy", ".npz", ".jsonl", ".bin"};
  const unsigned mode = data[0];
  const fs::path file = dir() / (std::string("input") + kExtensions[mode % 5]);
  lminv_fuzz::write_file(file, lminv_fuzz::as_view(data + 1, size - 1));
  try {
    if ((mode / 5) % 2 == 0) {
      static const char* kNames[] = {"", "output", "x", ""};
      check(lminv::read_states(file, kNames[(mode / 10) % 4]));
    } else {
      const std::vector<lminv::CapturedStates> set = lminv::read_states_set(file);
      if (set.empty()) __builtin_trap();
      for (const lminv::CapturedStates& s : set) {
        check(s);
        if (s.width() != set.front().width()) __builtin_trap();  // one D for the whole set
      }
    }
  } catch (const lminv::Error&) {
  }
  std::error_code ec;
  fs::remove(file, ec);
  return 0;
}
