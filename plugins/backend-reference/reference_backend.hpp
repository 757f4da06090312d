// The reference backend: hand-written forward and backward passes in f64 and f32 on the CPU, the numerical ground
// truth other backends are checked against.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lminv/backend.hpp"

namespace lminv::reference {

// The families this backend builds: gpt2, fcnet, fcnet_noninvertible, transformer_mlp.
const std::vector<std::string>& supported_families();

// Config keys of [backend] read here: threads (0 = all cores).
class ReferenceBackend : public Backend {
 public:
  BackendInfo info() const override;
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  int threads() const { return threads_; }

 private:
  int threads_ = 0;
};

// The MLP families (fcnet, fcnet_noninvertible, transformer_mlp) as a Model computing in spec.dtype (f64 or f32).
// Weights already in that dtype are used in place (the model keeps `weights`); others are converted once, here.
// Throws Error for a spec or weight it cannot use. A model is not safe to call from two threads at once (it keeps
// the activations of its last forward pass for the backward pass).
std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads);

// GPT-2 exactly as Hugging Face's GPT2LMHeadModel, truncated to the first spec.blocks blocks, computing in spec.dtype
// (f64 or f32); see gpt2_model.cpp for the output's layout (head, extra layers). Weights are Hugging Face's names
// without the "transformer." prefix, Conv1D layouts [in, out]; a set holding more blocks than used is fine. Weights
// already in spec.dtype are used in place (the model keeps `weights`); others are converted once, here. Throws
// Error for a spec it cannot build (sizes, blocks, layers, seq_len > n_positions) or a weight it lacks or whose shape
// is wrong, naming it. Not safe to call from two threads at once (it keeps its last forward pass's activations).
std::unique_ptr<Model> make_gpt2_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights, int threads);

}  // namespace lminv::reference
