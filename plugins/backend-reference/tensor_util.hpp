// Helpers the reference backend's models share: dtype conversion of inputs and weights, and recognising the input
// of the last forward pass.
#pragma once

#include <cstring>

#include "layers.hpp"
#include "lminv/tensor.hpp"

namespace lminv::reference {

// A tensor's values in dtype T: fast paths between f64 and f32, the generic element access for bf16.
template <class T>
Tensor convert(const Tensor& source, int threads) {
  if (source.dtype() == dtype_of<T>::value) return source;
  Tensor out(dtype_of<T>::value, source.shape());
  T* dst = out.data<T>();
  const Index n = source.numel();
  const int team = team_size(threads, n);
  if (source.dtype() == DType::f64) {
    const double* src = source.data<double>();
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (Index i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else if (source.dtype() == DType::f32) {
    const float* src = source.data<float>();
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (Index i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else {
    for (Index i = 0; i < n; ++i) dst[i] = static_cast<T>(source.get(i));
  }
  return out;
}

// The values of `t` as T: in place when its dtype is T, else converted into `storage`.
template <class T>
const T* values_as(const Tensor& t, Tensor& storage, int threads) {
  if (t.dtype() == dtype_of<T>::value) return t.data<T>();
  storage = convert<T>(t, threads);
  return storage.data<T>();
}

// Same dtype, shape and bytes.
inline bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

}  // namespace lminv::reference
