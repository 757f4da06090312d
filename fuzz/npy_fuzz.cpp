// NumPy files (host/npy.cpp): byte 0 picks how the rest is read: as a .npy image in memory (parse_npy, and
// npy_header_size + parse_npy_header + decode_npy_data as states.cpp reads big files), as a .npy file (read_npy), or
// as an .npz archive (NpzFile: libzip's checks, then every member decoded).
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "npy.hpp"

namespace {

void check(const lminv::Tensor& t, const lminv::Shape& shape) {
  if (t.shape() != shape) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::string_view bytes = lminv_fuzz::as_view(data + 1, size - 1);
  const unsigned mode = data[0] % 3;
  try {
    if (mode == 0) {
      const lminv::NpyArray a = lminv::parse_npy(bytes, "input.npy");
      (void)a;
      const std::uint64_t n = lminv::npy_header_size(bytes.substr(0, 16), "input.npy");
      if (n > bytes.size()) return 0;
      const lminv::NpyHeader h = lminv::parse_npy_header(bytes, "input.npy");
      if (h.data_offset != n) __builtin_trap();  // the two ways of finding the data agree
      const lminv::Tensor t = lminv::decode_npy_data(h, bytes.substr(n), "input.npy");
      check(t, h.shape);
    } else if (mode == 1) {
      const auto file = lminv_fuzz::scratch_dir("npy") / "input.npy";
      lminv_fuzz::write_file(file, bytes);
      (void)lminv::looks_like_npy(file);
      (void)lminv::read_npy(file);
    } else {
      const auto file = lminv_fuzz::scratch_dir("npy") / "input.npz";
      lminv_fuzz::write_file(file, bytes);
      (void)lminv::looks_like_zip(file);
      const lminv::NpzFile npz(file);
      for (const std::string& name : npz.names()) {
        if (!npz.contains(name)) __builtin_trap();
        try {
          (void)npz.read(name);  // one damaged member must not hide the others
        } catch (const lminv::Error&) {
        }
      }
    }
  } catch (const lminv::Error&) {
  }
  return 0;
}
