// The oneDNN backend: the decoder (every transformer family, as a setting of spec.arch) and the MLP kinds (fcnet,
// fcnet_noninvertible, transformer_mlp) built from oneDNN 2.6 primitives and hand-written loops on the CPU in f32,
// forward and input gradient, with the semantics of the reference backend (plugins/backend-reference): the same
// weights (schema.hpp's names and layouts), the same ModelSpec options, the same outputs.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lminv/backend.hpp"

namespace lminv::onednn {

class WeightStore;  // onednn_common.hpp

// The kinds and the decoder features this backend builds (BackendInfo).
const std::vector<ModelKind>& supported_kinds();
const std::vector<std::string>& supported_features();

// Config keys of [backend] read here:
//   threads   0 = all cores (or OMP_NUM_THREADS), else the OpenMP team size oneDNN runs with during each call.
class OnednnBackend : public Backend {
 public:
  BackendInfo info() const override;  // kinds and features above, dtype f32, device cpu
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  int threads() const { return threads_; }

  // How many WeightSets have a store alive (the models made on one WeightSet share its oneDNN copies).
  std::size_t weight_stores() const;

 private:
  std::shared_ptr<WeightStore> store_for(const std::shared_ptr<const WeightSet>& weights);

  int threads_ = 0;
  mutable std::mutex mutex_;  // create_model may be called from several threads
  std::map<const WeightSet*, std::weak_ptr<WeightStore>> stores_;
};

// The models, on the weights of `store`. Weights in f32 are used in place (the store keeps the WeightSet), others are
// converted once. Inputs of any
// dtype are accepted (computed in f32); outputs are f32; input gradients come back in the input's dtype. Primitives
// and activation buffers are made once per input shape (batch size, and length for the kinds that take any length)
// and reused; the weights' oneDNN copies once per model. A model is not safe to call from two threads at once (it
// keeps the activations of its last forward pass for the backward pass). The caller (create_model) has checked the
// spec, its features and the weights.
std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads);
std::unique_ptr<Model> make_decoder_model(const ModelSpec& spec, std::shared_ptr<WeightStore> store, int threads);

}  // namespace lminv::onednn
