// lminv SDK: model backends.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/options.hpp"
#include "lminv/schema.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// What a backend can build: shown by `lminv plugins`, checked by the host before it asks.
// A backend builds the kinds it lists (ModelKind), and of decoders those whose required_features(spec)
// (schema.hpp) it lists; it lists a feature only when it computes it in every dtype it lists.
struct BackendInfo {
  std::vector<ModelKind> kinds;
  std::vector<std::string> features;  // architecture.hpp's lminv::feature names
  std::vector<DType> dtypes;
  std::vector<std::string> devices;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual BackendInfo info() const = 0;

  // Reads the backend's own keys of the [backend] section (every key but name, dtype and device;
  // `threads` is one: 0 means all cores). Called once, before any model is made.
  virtual void configure(const Options& options) = 0;

  // A model of `spec` on `weights`. The model may keep the weights; they stay unchanged, and a backend may share
  // what it derives from them (converted copies) among the models it makes on the same WeightSet.
  // Throws Error naming what is unsupported (kind, feature, dtype, device, spec option) or which weight is wrong
  // (check_spec and check_weights(used_weights(spec), ...) of schema.hpp say it the same way in every backend).
  // A decoder or transformer_mlp model takes every length 1 .. n_positions (ModelSpec), whatever spec.seq_len is.
  virtual std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) = 0;
};

}  // namespace lminv
