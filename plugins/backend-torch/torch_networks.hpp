// Internal to the torch backend: the networks' forward graphs on ATen tensors (the decoder, driven by spec.arch, and
// the MLP kinds), the ATen copies of the weights that models on one WeightSet share, and the conversions between
// lminv and ATen tensors. Autograd differentiates the graphs; nothing here computes a gradient by hand.
//
// Only narrow ATen headers are included (the tensor class and the operators used): <torch/torch.h> would cost
// three times the compile time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/weights.hpp"
#include "torch_backend.hpp"

namespace lminv::torch_backend {

inline const char* const kWho = "torch backend";

// The ATen tensors made from one WeightSet for one dtype and device: every model the backend makes on that WeightSet
// with that dtype and device holds this one object, so each tensor exists once however many models use it. Tensors
// are made on first use. A tensor whose dtype already is the target's, for a CPU model, is not copied at all: it is
// a view of the WeightSet's bytes, and keeps the WeightSet alive (WeightSets are not changed once models use them).
// Also holds tables derived from the weights' spec (the rotary cos / sin), under keys of their own. Thread-safe.
class SharedWeights {
 public:
  explicit SharedWeights(at::TensorOptions options) : options_(std::move(options)) {}

  // The tensor `name` of `source` (the WeightSet this object was made for) in the target dtype and device.
  at::Tensor get(const std::shared_ptr<const WeightSet>& source, const std::string& name);

  // Puts `tensor` under `name`, for the networks made afterwards to use instead of the source's (a trainer's
  // parameters, which require gradients).
  void put(const std::string& name, at::Tensor tensor);

  // A tensor kept under `key`, made by `make` the first time.
  at::Tensor derived(const std::string& key, const std::function<at::Tensor()>& make);

  const at::TensorOptions& options() const { return options_; }
  WeightCacheStats stats() const;  // sets = 1

 private:
  at::TensorOptions options_;
  mutable std::mutex mutex_;
  std::map<std::string, at::Tensor> tensors_;  // by weight name, or by a derived table's key (they cannot clash:
                                               // derived keys contain a space, weight names do not)
  std::size_t copied_bytes_ = 0;
};

// The backend's index of SharedWeights: one per (WeightSet, dtype, device) while a model holds it. A WeightSet is
// recognised by its shared_ptr's control block (kept alive by a weak_ptr here, so a new WeightSet can never take the
// place of a freed one) and its address.
class WeightCache {
 public:
  std::shared_ptr<SharedWeights> acquire(const std::shared_ptr<const WeightSet>& weights,
                                         const at::TensorOptions& options);
  WeightCacheStats stats() const;

 private:
  struct Entry {
    std::weak_ptr<const WeightSet> source;
    const WeightSet* address = nullptr;
    c10::ScalarType dtype;
    at::Device device{at::kCPU};
    std::weak_ptr<SharedWeights> shared;
  };
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;  // a handful: searched in order, expired ones dropped
};

// The attention keys and values of a prefix of `length` positions, one pair per block run, each [n_kv_head, length,
// head_dim], the keys rotated at their positions (rotary): the prefix cache's state (see Network::append_prefix).
struct KeyValueCache {
  std::int64_t length = 0;
  std::vector<at::Tensor> keys, values;  // [L] of [nkv, length, hd]; empty while length is 0
};

// The keys and values that one next_after_prefix call computed for its B candidates at position `position`, one pair
// per block run, each [B, nkv, hd] (rotated at that position): appending candidate b needs nothing more.
struct CandidateKeyValues {
  std::int64_t position = -1;  // -1: none kept
  std::vector<at::Tensor> keys, values;
};

// A model's forward pass: x [B, T, d or V] (the model's dtype, on its device) -> the output [B, ...] as the
// reference backend lays it out. Tensors made here take part in autograd when x requires grad.
class Network {
 public:
  virtual ~Network() = default;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;

  // Whether the network is run position by position against a KeyValueCache (the decoder): the two calls below.
  virtual bool has_prefix_cache() const { return false; }

  // Runs the prefix's next n positions, rows [n, d or V], through the blocks against `cache` and appends their keys
  // and values to it. Nothing changes when it throws. The caller keeps cache.length + n within n_positions.
  virtual void append_prefix(const at::Tensor& rows, KeyValueCache& cache) const;

  // The output at position t = cache.length for each of B candidates [B, d or V] following the cached prefix:
  // [B, D], row b = forward(prefix, candidate b)[t]. The caller keeps t below n_positions.
  // With `kept`, the candidates' keys and values go there.
  virtual at::Tensor next_after_prefix(const at::Tensor& candidates, const KeyValueCache& cache,
                                       CandidateKeyValues* kept = nullptr) const;
};

// The networks of a checked spec (check_spec, check_features and check_weights have passed): they take their weights
// from `weights` (made for `source` and the model's dtype and device) and keep it.
std::unique_ptr<Network> make_decoder_network(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
                                              std::shared_ptr<SharedWeights> weights);
std::unique_ptr<Network> make_mlp_network(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
                                          std::shared_ptr<SharedWeights> weights);

c10::ScalarType scalar_type(DType dtype);

// The threads of the streaming kernels (plugins/common/skinny_matmul.hpp) on the calling thread: set by the model
// calls' thread scope (torch_backend.cpp) to the [backend] `threads` (0 = all cores) for their duration.
int kernel_threads();
void set_kernel_threads(int threads);

// a [m, k] times b [k, n] as the networks multiply an activation with more rows than the streaming kernels take by
// a weight: oneDNN's sgemm for CPU f32 where the build has it, else LibTorch's at::mm (the matmul_probe times this).
at::Tensor large_product(const at::Tensor& a, const at::Tensor& b);

// A copy of `t` as an ATen tensor with `options` (dtype and device); the lminv tensor is not referenced afterwards.
at::Tensor to_aten(const Tensor& t, const at::TensorOptions& options);

// A host copy of `t` (any device) in `dtype`.
Tensor to_lminv(const at::Tensor& t, DType dtype);

}  // namespace lminv::torch_backend
