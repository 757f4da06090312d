// lminv SDK: a model's parameters by name.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "lminv/tensor.hpp"

namespace lminv {

// Parameters keyed by Hugging Face style names ("wte.weight", "h.0.attn.c_attn.weight", "fc1.weight").
// Made once on the host (random init or checkpoint) and shared read-only by backends and decoders,
// so every backend sees the same bytes.
class WeightSet {
 public:
  void set(const std::string& name, Tensor tensor) { tensors_[name] = std::move(tensor); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const Tensor& get(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw Error("weights: no tensor named '" + name + "'");
    return it->second;
  }

  // The tensor, checked to have the expected shape.
  const Tensor& get(const std::string& name, const Shape& shape) const {
    const Tensor& t = get(name);
    if (t.shape() != shape)
      throw Error("weights: tensor '" + name + "' has shape " + shape_string(t.shape()) + ", expected " +
                  shape_string(shape));
    return t;
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& entry : tensors_) out.push_back(entry.first);
    return out;
  }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  std::size_t nbytes() const {
    std::size_t n = 0;
    for (const auto& entry : tensors_) n += entry.second.nbytes();
    return n;
  }

 private:
  std::map<std::string, Tensor> tensors_;
};

}  // namespace lminv
