// The reference backend: hand-written forward and backward passes in f64 and f32 on the CPU, the numerical ground
// truth other backends are checked against.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lminv/backend.hpp"
#include "tensor_util.hpp"

namespace lminv::reference {

// Config keys of [backend] read here: threads (0 = all cores).
// Builds every ModelKind, and of decoders every architecture (info().features lists every feature name of
// architecture.hpp), in f64 and f32 on the cpu. create_model checks the spec (check_spec), its features
// (check_features) and the weights it uses (check_weights of used_weights) as schema.hpp says, then dispatches on
// spec.kind.
class ReferenceBackend : public Backend {
 public:
  BackendInfo info() const override;
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  int threads() const { return threads_; }

 private:
  int threads_ = 0;
  // Converted copies of each weight set, shared by the models made on it (backend.hpp allows it).
  std::shared_ptr<ConvertedWeightsCache> converted_ = std::make_shared<ConvertedWeightsCache>();
};

// The models behind create_model, for a spec and weights it has checked. Weights already in spec.dtype are used in
// place (the model keeps `weights`); others are converted once, into `weights`, for every model made on them.
//
// The MLP kinds (fcnet, fcnet_noninvertible, transformer_mlp) as a Model computing in spec.dtype (f64 or f32).
// A model is not safe to call from two threads at once (it keeps the activations of its last forward pass for the
// backward pass).
std::unique_ptr<Model> make_mlp_model(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights, int threads);

// The decoder (every transformer family, spec.arch; see decoder_model.cpp for the output's layout: head, extra
// layers), truncated to the first spec.blocks blocks, computing in spec.dtype (f64 or f32), any length 1 ..
// n_positions per call. Canonical weight names and layouts (schema.hpp); a set holding more blocks than used is
// fine. It offers the "prefix_cache" capability. Not safe to call from two threads at once (it keeps its last forward
// pass's activations).
std::unique_ptr<Model> make_decoder_model(const ModelSpec& spec, std::shared_ptr<ConvertedWeights> weights,
                                          int threads);

}  // namespace lminv::reference
