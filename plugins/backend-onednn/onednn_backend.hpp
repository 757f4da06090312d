// The oneDNN backend: GPT-2 and the MLP families (fcnet, fcnet_noninvertible, transformer_mlp) built from oneDNN 2.6
// primitives on the CPU in f32, forward and input gradient, with the semantics of the reference backend
// (plugins/backend-reference): the same weights (names, layouts), the same ModelSpec options, the same outputs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lminv/backend.hpp"

namespace lminv::onednn {

// The families this backend builds: gpt2, fcnet, fcnet_noninvertible, transformer_mlp.
const std::vector<std::string>& supported_families();

// Config keys of [backend] read here:
//   threads   0 = all cores (or OMP_NUM_THREADS), else the OpenMP team size oneDNN runs with during each call.
class OnednnBackend : public Backend {
 public:
  BackendInfo info() const override;  // families above, dtype f32, device cpu
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  int threads() const { return threads_; }

 private:
  int threads_ = 0;
};

// The models. Weights in f32 are used in place (the model keeps `weights`), others are converted once. Inputs of any
// dtype are accepted (computed in f32); outputs are f32; input gradients come back in the input's dtype. Primitives
// and activation buffers are made once per batch size and reused. A model is not safe to call from two threads at
// once (it keeps the activations of its last forward pass for the backward pass).
std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads);
std::unique_ptr<Model> make_gpt2_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads);

}  // namespace lminv::onednn
