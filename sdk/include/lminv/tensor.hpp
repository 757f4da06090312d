// lminv SDK: dense row-major host tensors, the data that crosses the plugin boundary.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lminv/error.hpp"

namespace lminv {

enum class DType : std::uint8_t { f32, f64, bf16 };

// bfloat16 stored as its 16 bits; arithmetic goes through float.
struct bf16 {
  std::uint16_t bits = 0;

  static bf16 from_float(float value) {
    std::uint32_t u = 0;
    std::memcpy(&u, &value, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return bf16{static_cast<std::uint16_t>(u >> 16)};
  }
  float to_float() const {
    const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float value = 0;
    std::memcpy(&value, &u, sizeof value);
    return value;
  }
};

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
  }
  return "?";
}

inline std::optional<DType> parse_dtype(std::string_view name) {
  if (name == "f32") return DType::f32;
  if (name == "f64") return DType::f64;
  if (name == "bf16") return DType::bf16;
  return std::nullopt;
}

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::f64;
};
template <>
struct dtype_of<bf16> {
  static constexpr DType value = DType::bf16;
};

using Shape = std::vector<std::int64_t>;

inline std::int64_t shape_numel(const Shape& shape) {
  return std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
}

inline std::string shape_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {
// 64-byte aligned storage so that vector loads and BLAS-style kernels see aligned rows.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, alignment); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
}  // namespace detail

// An owning, dense, row-major tensor in host memory. Copies are deep; moves are cheap.
class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor of the given type and shape.
  Tensor(DType dtype, Shape shape)
      : dtype_(dtype), shape_(std::move(shape)), bytes_(checked_numel(shape_) * dtype_size(dtype_)) {}

  template <class T>
  static Tensor from(Shape shape, const std::vector<T>& values) {
    Tensor t(dtype_of<T>::value, std::move(shape));
    if (static_cast<std::size_t>(t.numel()) != values.size())
      throw Error("Tensor::from: " + std::to_string(values.size()) + " values for shape " + shape_string(t.shape_));
    if (t.nbytes()) std::memcpy(t.raw(), values.data(), t.nbytes());  // memcpy's pointers must not be null, even for 0
    return t;
  }

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  // Size of dimension i; negative i counts from the end.
  std::int64_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i < 0 ? rank() + i : i)); }
  // Elements: the product of the shape; 1 for a scalar (rank 0, made with a dtype), 0 for a default Tensor().
  std::int64_t numel() const { return shape_.empty() && bytes_.empty() ? 0 : shape_numel(shape_); }
  std::size_t nbytes() const { return bytes_.size(); }
  bool empty() const { return shape_.empty(); }

  void* raw() { return bytes_.data(); }
  const void* raw() const { return bytes_.data(); }

  template <class T>
  T* data() {
    check_type<T>();
    return reinterpret_cast<T*>(bytes_.data());
  }
  template <class T>
  const T* data() const {
    check_type<T>();
    return reinterpret_cast<const T*>(bytes_.data());
  }

  // Element i of the flattened tensor as a double, whatever the dtype (slow; for tests and reports).
  double get(std::int64_t i) const {
    switch (dtype_) {
      case DType::f32: return data<float>()[i];
      case DType::f64: return data<double>()[i];
      case DType::bf16: return data<bf16>()[i].to_float();
    }
    return 0;
  }
  void set(std::int64_t i, double value) {
    switch (dtype_) {
      case DType::f32: data<float>()[i] = static_cast<float>(value); break;
      case DType::f64: data<double>()[i] = value; break;
      case DType::bf16: data<bf16>()[i] = bf16::from_float(static_cast<float>(value)); break;
    }
  }

  // A converted copy (a plain copy when the dtype is the same).
  Tensor to(DType target) const {
    if (target == dtype_) return *this;
    Tensor out(target, shape_);
    const std::int64_t n = numel();
    for (std::int64_t i = 0; i < n; ++i) out.set(i, get(i));
    return out;
  }

  // The same elements under another shape of equal size.
  Tensor reshape(Shape shape) const& {
    Tensor out = *this;
    return std::move(out).reshape(std::move(shape));
  }
  Tensor reshape(Shape shape) && {
    if (static_cast<std::int64_t>(checked_numel(shape)) != numel())
      throw Error("Tensor::reshape: " + shape_string(shape_) + " cannot become " + shape_string(shape));
    shape_ = std::move(shape);
    return std::move(*this);
  }

  // Rows [begin, end) along the first dimension, copied.
  Tensor slice0(std::int64_t begin, std::int64_t end) const {
    if (rank() == 0 || begin < 0 || end > shape_[0] || begin > end)
      throw Error("Tensor::slice0: [" + std::to_string(begin) + ", " + std::to_string(end) + ") outside " +
                  shape_string(shape_));
    Shape shape = shape_;
    shape[0] = end - begin;
    Tensor out(dtype_, shape);
    const std::size_t row = nbytes() / static_cast<std::size_t>(shape_[0] ? shape_[0] : 1);
    if (out.nbytes()) std::memcpy(out.raw(), bytes_.data() + static_cast<std::size_t>(begin) * row, out.nbytes());
    return out;
  }

  // Tensors of equal dtype and trailing shape joined along the first dimension.
  static Tensor concat0(const std::vector<Tensor>& parts) {
    if (parts.empty()) throw Error("Tensor::concat0: nothing to join");
    if (parts[0].rank() == 0) throw Error("Tensor::concat0: a scalar (rank 0) has no first dimension to join along");
    Shape shape = parts[0].shape_;
    shape[0] = 0;
    for (const Tensor& p : parts) {
      if (p.dtype_ != parts[0].dtype_ || p.rank() != parts[0].rank() ||
          !std::equal(p.shape_.begin() + 1, p.shape_.end(), parts[0].shape_.begin() + 1))
        throw Error("Tensor::concat0: " + shape_string(p.shape_) + " does not join " + shape_string(parts[0].shape_));
      shape[0] += p.shape_[0];
    }
    Tensor out(parts[0].dtype_, shape);
    std::size_t offset = 0;
    for (const Tensor& p : parts) {
      if (p.nbytes()) std::memcpy(out.bytes_.data() + offset, p.raw(), p.nbytes());  // an empty part has no storage
      offset += p.nbytes();
    }
    return out;
  }

 private:
  // The element count of `shape`, refused when a dimension is negative or when the count or its bytes (in the
  // widest dtype, 8 bytes) do not fit in 63 bits: an absurd size is an Error naming the shape, not an overflow.
  static std::size_t checked_numel(const Shape& shape) {
    std::int64_t n = 1;
    for (std::int64_t d : shape) {
      if (d < 0) throw Error("Tensor: negative dimension in shape " + shape_string(shape));
      if (__builtin_mul_overflow(n, d, &n) || n > (std::numeric_limits<std::int64_t>::max() >> 3))
        throw Error("Tensor: shape " + shape_string(shape) + " has too many elements to hold");
    }
    return static_cast<std::size_t>(n);
  }
  template <class T>
  void check_type() const {
    if (dtype_of<T>::value != dtype_)
      throw Error(std::string("Tensor: accessed a ") + dtype_name(dtype_) + " tensor as " +
                  dtype_name(dtype_of<T>::value));
  }

  DType dtype_ = DType::f32;
  Shape shape_;
  std::vector<std::byte, detail::AlignedAllocator<std::byte>> bytes_;
};

namespace detail {
// The first element of v[0, n) whose exponent bits are all ones (a NaN or an infinity), or -1. Works on the bits
// (an integer OR per block), so the scan vectorises and costs about a read of the data.
template <class Bits>
std::int64_t first_all_ones_exponent(const Bits* v, std::int64_t n, Bits exponent_mask) {
  constexpr std::int64_t kBlock = 1024;
  for (std::int64_t start = 0; start < n; start += kBlock) {
    const std::int64_t end = std::min(n, start + kBlock);
    bool hit = false;
    for (std::int64_t i = start; i < end; ++i) hit |= (v[i] & exponent_mask) == exponent_mask;
    if (hit)
      for (std::int64_t i = start; i < end; ++i)
        if ((v[i] & exponent_mask) == exponent_mask) return i;
  }
  return -1;
}
}  // namespace detail

// The flat index of the first NaN or infinity in t, or -1 when every element is finite.
inline std::int64_t first_non_finite(const Tensor& t) {
  const std::int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::f32:
      return detail::first_all_ones_exponent(static_cast<const std::uint32_t*>(t.raw()), n, std::uint32_t{0x7f800000u});
    case DType::f64:
      return detail::first_all_ones_exponent(static_cast<const std::uint64_t*>(t.raw()), n,
                                             std::uint64_t{0x7ff0000000000000ull});
    case DType::bf16:
      return detail::first_all_ones_exponent(static_cast<const std::uint16_t*>(t.raw()), n, std::uint16_t{0x7f80u});
  }
  return -1;
}

// A 64-bit content hash of dtype, shape and bytes (not cryptographic): the key of on-disk caches.
inline std::uint64_t content_hash(const Tensor& t) {
  auto mix = [](std::uint64_t h, std::uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 29);
  };
  std::uint64_t h = mix(0x6c6d696e76ull, static_cast<std::uint64_t>(t.dtype()));
  for (std::int64_t d : t.shape()) h = mix(h, static_cast<std::uint64_t>(d));
  const auto* bytes = static_cast<const unsigned char*>(t.raw());
  const std::size_t n = t.nbytes();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t word = 0;
    std::memcpy(&word, bytes + i, 8);
    h = mix(h, word);
  }
  for (; i < n; ++i) h = mix(h, bytes[i]);
  return h;
}

}  // namespace lminv
