// Internal to the torch backend: the families' forward graphs on ATen tensors, and the conversions between lminv
// and ATen tensors. Autograd differentiates the graphs; nothing here computes a gradient by hand.
//
// Only narrow ATen headers are included (the tensor class and the operators used): <torch/torch.h> would cost
// three times the compile time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/weights.hpp"

namespace lminv::torch_backend {

inline const char* const kWho = "torch backend";

// The attention keys and values of a prefix of `length` positions, one pair per block run, each [NH, length, hs]:
// the prefix cache's state (see Network::append_prefix).
struct KeyValueCache {
  std::int64_t length = 0;
  std::vector<at::Tensor> keys, values;  // [L] of [NH, length, hs]; empty while length is 0
};

// A family's forward pass: x [B, T, d or V] (the model's dtype, on its device) -> the output [B, ...] as the
// reference backend lays it out. Tensors made here take part in autograd when x requires grad.
class Network {
 public:
  virtual ~Network() = default;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;

  // Whether the family is run position by position against a KeyValueCache (gpt2): the two calls below.
  virtual bool has_prefix_cache() const { return false; }

  // Runs the prefix's next n positions, rows [n, d or V], through the blocks against `cache` and appends their keys
  // and values to it. Nothing changes when it throws. The caller keeps cache.length + n within seq_len.
  virtual void append_prefix(const at::Tensor& rows, KeyValueCache& cache) const;

  // The output at position t = cache.length for each of B candidates [B, d or V] following the cached prefix:
  // [B, D], row b = forward(prefix, candidate b)[t]. The caller keeps t below seq_len.
  virtual at::Tensor next_after_prefix(const at::Tensor& candidates, const KeyValueCache& cache) const;
};

// Check the spec as the reference backend does (errors name the field), load and convert the weights the spec uses
// (errors name the weight, its shape and the expected one) to `options` (dtype and device).
std::unique_ptr<Network> make_gpt2_network(const ModelSpec& spec, const WeightSet& weights,
                                           const at::TensorOptions& options);
std::unique_ptr<Network> make_mlp_network(const ModelSpec& spec, const WeightSet& weights,
                                          const at::TensorOptions& options);

c10::ScalarType scalar_type(DType dtype);

// A copy of `t` as an ATen tensor with `options` (dtype and device); the lminv tensor is not referenced afterwards.
at::Tensor to_aten(const Tensor& t, const at::TensorOptions& options);

// A host copy of `t` (any device) in `dtype`.
Tensor to_lminv(const at::Tensor& t, DType dtype);

}  // namespace lminv::torch_backend
