// The pinv decoder's files (plugins/decoder-pinv/pinv_decoder.cpp): its cache of G^+ (read_cache) and the
// allowed_ids file (read_ids_file).
//
// Byte 0 picks the weights the cache is checked against (wte [V, d], V and d in 1..8, fixed values); byte 1's bits
// say what the harness makes right in the 72-byte header before writing the file, so that the fuzzer also gets past
// the checks it could not guess (bit 0: magic, version and header size; bit 1: d, V and the weights' hash; bit 2:
// the payload's checksum) and bit 3 reads the rest of the input as an ids file instead.
#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "pinv_decoder.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // read_cache warns on std::cerr for every file it ignores: silenced, or the log is all warnings.
  static const bool quiet = (std::cerr.rdbuf(nullptr), true);
  (void)quiet;
  if (size < 2) return 0;
  const std::int64_t vocab = 1 + (data[0] & 7), d = 1 + ((data[0] >> 3) & 7);
  const unsigned fix = data[1];
  std::string bytes(reinterpret_cast<const char*>(data + 2), size - 2);
  const auto file = lminv_fuzz::scratch_dir("pinv_cache") / "pinv.bin";

  if (fix & 8) {
    lminv_fuzz::write_file(file, bytes);
    try {
      const std::vector<std::int64_t> ids = lminv::pinv::read_ids_file(file.string());
      if (ids.empty()) __builtin_trap();  // an empty file is an Error
      (void)lminv::pinv::allowed_mask(ids, 1000, "the ids file");
    } catch (const lminv::Error&) {
    }
    return 0;
  }

  lminv::Tensor w(lminv::DType::f32, {vocab, d});
  for (std::int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = static_cast<float>(i % 7) - 3.0f;
  constexpr std::size_t kHeader = 72;
  if (bytes.size() >= kHeader) {
    char* h = bytes.data();
    auto put = [&](std::size_t at, auto value) { std::memcpy(h + at, &value, sizeof value); };
    if (fix & 1) {
      std::memcpy(h, "LMINVPIV", 8);
      put(8, std::uint32_t{1});
      put(12, std::uint32_t{kHeader});
    }
    if (fix & 2) {
      put(16, d);
      put(24, vocab);
      put(32, lminv::content_hash(w));
    }
    if ((fix & 4) && bytes.size() >= kHeader + static_cast<std::size_t>(d * d) * 8) {
      lminv::Tensor payload(lminv::DType::f64, {d, d});
      std::memcpy(payload.raw(), h + kHeader, payload.nbytes());
      put(40, lminv::content_hash(payload));
    }
  }
  lminv_fuzz::write_file(file, bytes);
  lminv::pinv::GramPinvInfo info;
  try {
    const std::optional<Eigen::MatrixXd> g = lminv::pinv::read_cache(file.string(), w, &info);
    if (g && (g->rows() != d || g->cols() != d)) __builtin_trap();
  } catch (const lminv::Error&) {
  }
  return 0;
}
