// The safetensors reader (host/safetensors.cpp): the input is a whole .safetensors file; every tensor the header
// accepts is then read (pread path, F16 widening) and its mapped bytes touched.
#include <cstdint>
#include <numeric>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = lminv_fuzz::scratch_dir("safetensors") / "model.safetensors";
  lminv_fuzz::write_file(file, lminv_fuzz::as_view(data, size));
  try {
    const lminv::SafetensorsFile st(file);
    std::vector<std::string> names;
    for (const auto& [name, entry] : st.entries()) {
      names.push_back(name);
      const std::string_view bytes = st.bytes(name);
      // Touch the mapped bytes: a range past the mapping would fault here under ASan.
      volatile unsigned sum = std::accumulate(bytes.begin(), bytes.end(), 0u);
      (void)sum;
      const lminv::Tensor t = st.read(name);
      if (t.shape() != entry.shape) __builtin_trap();  // read() must give the header's shape
    }
    const std::vector<lminv::Tensor> all = st.read_many(names, 1);
    if (all.size() != names.size()) __builtin_trap();
    for (const auto& [key, value] : st.metadata()) (void)key, (void)value;
  } catch (const lminv::Error&) {
  }
  return 0;
}
