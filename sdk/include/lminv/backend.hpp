// lminv SDK: model backends.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/options.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// What a backend can build: shown by `lminv plugins`, checked by the host before it asks.
struct BackendInfo {
  std::vector<std::string> families;
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

  // A model of `spec` on `weights`. The model may keep the weights; they stay unchanged.
  // Throws Error naming what is unsupported (family, dtype, device, spec option) or which weight is wrong.
  virtual std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) = 0;
};

}  // namespace lminv
