// lminv SDK: the few element-wise operations optimizers need on host tensors of the input's size.
// Accumulations are in double whatever the tensor's dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "lminv/rng.hpp"
#include "lminv/tensor.hpp"

namespace lminv {

namespace detail {
template <class F>
void for_each_element(Tensor& t, F&& f) {
  const std::int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::f32: {
      float* p = t.data<float>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(f(i, static_cast<double>(p[i])));
      break;
    }
    case DType::f64: {
      double* p = t.data<double>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = f(i, p[i]);
      break;
    }
    case DType::bf16: {
      bf16* p = t.data<bf16>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = bf16::from_float(static_cast<float>(f(i, p[i].to_float())));
      break;
    }
  }
}
inline void check_same_size(const Tensor& a, const Tensor& b, const char* what) {
  if (a.numel() != b.numel())
    throw Error(std::string(what) + ": " + shape_string(a.shape()) + " and " + shape_string(b.shape()) +
                " differ in size");
}
}  // namespace detail

// y <- y + alpha x
inline void add_scaled(Tensor& y, double alpha, const Tensor& x) {
  detail::check_same_size(y, x, "add_scaled");
  detail::for_each_element(y, [&](std::int64_t i, double v) { return v + alpha * x.get(i); });
}

// t <- t * alpha
inline void scale(Tensor& t, double alpha) {
  detail::for_each_element(t, [&](std::int64_t, double v) { return v * alpha; });
}

// Each element drawn from N(mean, std), in order, from `rng`.
inline void fill_normal(Tensor& t, Rng& rng, double mean, double std) {
  detail::for_each_element(t, [&](std::int64_t, double) { return rng.normal(mean, std); });
}

// ||a - b||_2 and sum |a - b| over all elements.
inline double l2_distance(const Tensor& a, const Tensor& b) {
  detail::check_same_size(a, b, "l2_distance");
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += (a.get(i) - b.get(i)) * (a.get(i) - b.get(i));
  return std::sqrt(s);
}
inline double l1_distance(const Tensor& a, const Tensor& b) {
  detail::check_same_size(a, b, "l1_distance");
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += std::abs(a.get(i) - b.get(i));
  return s;
}

}  // namespace lminv
