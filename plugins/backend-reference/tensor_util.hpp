// Helpers the reference backend's models share: dtype conversion of inputs and weights (and the converted copies
// of a weight set, shared by the models made on it), and recognising the input of the last forward pass.
#pragma once

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "int8_weights.hpp"
#include "layers.hpp"
#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"

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

// A weight set's tensors in the dtypes its models compute in: the set's own tensor where its dtype is the model's,
// else a copy converted once and kept here for every model made on the same set (an f32 model of every length and
// a second, deeper one share one f32 copy of an f64 or bf16 checkpoint). Safe to use from several threads.
class ConvertedWeights {
 public:
  explicit ConvertedWeights(std::shared_ptr<const WeightSet> source) : source_(std::move(source)) {}

  const WeightSet& source() const { return *source_; }

  // The tensor `name` (checked to have `shape`) as T values.
  template <class T>
  const T* get(const std::string& name, const Shape& shape, int threads) {
    const Tensor& tensor = source_->get(name, shape);
    if (tensor.dtype() == dtype_of<T>::value) return tensor.data<T>();
    const std::string key = name + " as " + dtype_name(dtype_of<T>::value);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!converted_.contains(key)) converted_.set(key, convert<T>(tensor, threads));  // a std::map: nothing moves
    return converted_.get(key).data<T>();
  }

  // The same for an int8 model's block weight (int8_weights.hpp): quantised, then dequantised into T once. The
  // reference multiplies by the dequantised matrix, which is what an int8 model computes (it saves no memory).
  template <class T>
  const T* get_int8(const std::string& name, const Shape& shape) {
    const std::string key = name + " int8 as " + dtype_name(dtype_of<T>::value);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!converted_.contains(key))
      converted_.set(key, int8::dequantised_tensor(int8::quantise(source_->get(name, shape), name),
                                                   dtype_of<T>::value));
    return converted_.get(key).data<T>();
  }

 private:
  std::shared_ptr<const WeightSet> source_;  // the models' weights stay alive with their copies
  std::mutex mutex_;
  WeightSet converted_;
};

// The ConvertedWeights of each weight set a backend has made models on, while some model still uses them.
class ConvertedWeightsCache {
 public:
  std::shared_ptr<ConvertedWeights> of(const std::shared_ptr<const WeightSet>& weights) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::shared_ptr<ConvertedWeights> found;
    std::vector<std::weak_ptr<ConvertedWeights>> alive;
    for (const auto& entry : entries_)
      if (auto c = entry.lock()) {
        if (&c->source() == weights.get()) found = c;
        alive.push_back(entry);
      }
    entries_.swap(alive);
    if (!found) {
      found = std::make_shared<ConvertedWeights>(weights);
      entries_.push_back(found);
    }
    return found;
  }

 private:
  std::mutex mutex_;
  std::vector<std::weak_ptr<ConvertedWeights>> entries_;
};

}  // namespace lminv::reference
