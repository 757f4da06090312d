// lminv SDK: the optional "matmul_probe" capability: the rate at which a model's backend multiplies matrices.
//
// `lminv bench` sets each step against the machine's limits measured in the same run. The compute limit of a
// backend is the rate of its own matrix-product library (LibTorch's BLAS, oneDNN, the reference's kernels) with the
// thread settings its models use, which no host-side measurement can stand in for. Model::capability(kMatmulProbe)
// returns a MatmulProbe* (owned by the model, alive as long as it) when the backend offers it, nullptr otherwise.
// Adding it broke no plugin: a backend that does not know the name returns nullptr.
#pragma once

#include <cstdint>

#include "lminv/model.hpp"
#include "lminv/tensor.hpp"

namespace lminv {

inline constexpr const char* kMatmulProbe = "matmul_probe";

class MatmulProbe {
 public:
  virtual ~MatmulProbe() = default;

  // Seconds of the fastest of `repeat` products C = A B (A [m, k], B [k, n], C [m, n], dense row-major operands in
  // `dtype` on the model's device, filled before timing), after one untimed product, computed as the model's own
  // matrix products are (same library, same threads). An Error naming the dtype when the backend has no product
  // in it.
  virtual double matmul_seconds(DType dtype, std::int64_t m, std::int64_t n, std::int64_t k, int repeat) = 0;
};

// The model's probe, or nullptr when its backend offers none.
inline MatmulProbe* matmul_probe_of(Model& model) { return static_cast<MatmulProbe*>(model.capability(kMatmulProbe)); }

}  // namespace lminv
