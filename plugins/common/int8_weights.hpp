// Int8 block weights (ModelSpec::weight_dtype = int8): the one quantisation every backend uses, so that the
// reference, torch and oneDNN backends hold the same integers and scales and differ only in how they multiply.
//
// A decoder block's four linear weights are stored [in, out] (the canonical Conv1D layout, schema.hpp), so an
// output channel o is column o. Per column, with absmax a_o = max_i |W[i, o]|:
//   s_o = a_o / 127 (in double),  q[i, o] = round_half_even(W[i, o] / s_o), clamped to [-127, 127]
// (a column of zeros has s_o = 0 and q = 0). A backend dequantises an element as Real(q) * Real(s_o): one rounding
// into the model's dtype Real, so two backends on the same dtype see the same dequantised weights.
//
// The four names are the layers Hugging Face's load_in_8bit replaces in GPT-2 (its Conv1D c_attn, c_proj, c_fc,
// c_proj); embeddings, norms, biases and the tied LM head stay in the model's dtype, as there.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "lminv/tensor.hpp"

namespace lminv::int8 {

// Whether `name` is one of the block weights an int8 model quantises ("h.<l>.attn.c_attn.weight", ...).
inline bool quantised(const std::string& name) {
  if (name.rfind("h.", 0) != 0) return false;
  const auto ends = [&](const char* tail) {
    const std::string t(tail);
    return name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0;
  };
  return ends(".attn.c_attn.weight") || ends(".attn.c_proj.weight") || ends(".mlp.c_fc.weight") ||
         ends(".mlp.c_proj.weight");
}

// An [in, out] matrix as int8 with one scale per output column.
struct Matrix {
  std::int64_t in = 0, out = 0;
  std::vector<std::int8_t> q;  // [in, out] row-major
  std::vector<double> scale;   // [out]

  std::size_t bytes() const { return q.size() + scale.size() * sizeof(float); }  // as a backend holds them in f32

  template <class Real>
  Real dequantised(std::int64_t i, std::int64_t o) const {
    return static_cast<Real>(q[static_cast<std::size_t>(i * out + o)]) * static_cast<Real>(scale[o]);
  }

  // The dequantised matrix into dst [in, out] (row-major), or its transpose [out, in] when `transposed`.
  template <class Real>
  void dequantise(Real* dst, bool transposed = false) const {
    std::vector<Real> s(scale.begin(), scale.end());
    for (std::int64_t i = 0; i < in; ++i) {
      const std::int8_t* row = q.data() + i * out;
      if (!transposed)
        for (std::int64_t o = 0; o < out; ++o) dst[i * out + o] = static_cast<Real>(row[o]) * s[o];
      else
        for (std::int64_t o = 0; o < out; ++o) dst[o * in + i] = static_cast<Real>(row[o]) * s[o];
    }
  }
};

namespace detail {
template <class T>
double value(const T* p, std::int64_t i) {
  if constexpr (std::is_same_v<T, bf16>) return p[i].to_float();
  else return static_cast<double>(p[i]);
}

template <class T>
Matrix quantise(const T* w, std::int64_t in, std::int64_t out, const std::string& name) {
  Matrix m;
  m.in = in;
  m.out = out;
  m.scale.assign(static_cast<std::size_t>(out), 0.0);
  for (std::int64_t i = 0; i < in; ++i)
    for (std::int64_t o = 0; o < out; ++o) {
      const double v = value(w, i * out + o);
      if (!std::isfinite(v))
        throw Error("int8 weights: '" + name + "' holds " + std::to_string(v) + " at [" + std::to_string(i) + ", " +
                    std::to_string(o) + "], which has no absmax scale");
      m.scale[o] = std::max(m.scale[o], std::abs(v));
    }
  for (double& s : m.scale) s /= 127.0;
  m.q.resize(static_cast<std::size_t>(in * out));
  for (std::int64_t i = 0; i < in; ++i)
    for (std::int64_t o = 0; o < out; ++o) {
      const double s = m.scale[o];
      const double r = s > 0 ? std::nearbyint(value(w, i * out + o) / s) : 0.0;  // ties to even (default mode)
      m.q[i * out + o] = static_cast<std::int8_t>(std::clamp(r, -127.0, 127.0));
    }
  return m;
}
}  // namespace detail

// Quantises an [in, out] weight (f32, f64 or bf16). Non-finite weights have no absmax: an error naming `name`.
inline Matrix quantise(const Tensor& w, const std::string& name) {
  if (w.rank() != 2) throw Error("int8 weights: '" + name + "' has shape " + shape_string(w.shape()) + ", not 2-d");
  const std::int64_t in = w.dim(0), out = w.dim(1);
  switch (w.dtype()) {
    case DType::f32: return detail::quantise(w.data<float>(), in, out, name);
    case DType::f64: return detail::quantise(w.data<double>(), in, out, name);
    case DType::bf16: return detail::quantise(w.data<bf16>(), in, out, name);
  }
  throw Error("int8 weights: '" + name + "' has an unknown dtype");
}

// The dequantised weight as a tensor of `dtype` (what a same-dtype model given these weights computes with).
inline Tensor dequantised_tensor(const Matrix& m, DType dtype) {
  Tensor t(dtype, {m.in, m.out});
  switch (dtype) {
    case DType::f32: m.dequantise(t.data<float>()); break;
    case DType::f64: m.dequantise(t.data<double>()); break;
    case DType::bf16:
      for (std::int64_t i = 0; i < m.in; ++i)
        for (std::int64_t o = 0; o < m.out; ++o)
          t.set(i * m.out + o, m.dequantised<float>(i, o));
      break;
  }
  return t;
}

}  // namespace lminv::int8
