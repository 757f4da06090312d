#include "reference_backend.hpp"

#include <algorithm>

namespace lminv::reference {

namespace {

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

}  // namespace

const std::vector<std::string>& supported_families() {
  static const std::vector<std::string> families{"gpt2", "fcnet", "fcnet_noninvertible", "transformer_mlp"};
  return families;
}

BackendInfo ReferenceBackend::info() const {
  return {supported_families(), {DType::f64, DType::f32}, {"cpu"}};
}

void ReferenceBackend::configure(const Options& options) {
  const std::int64_t threads = options.get_int("threads", 0);
  if (threads < 0) options.fail("threads", "expected 0 (all cores) or a positive number of threads");
  if (threads > 4096) options.fail("threads", "expected at most 4096 threads");
  threads_ = static_cast<int>(threads);
}

std::unique_ptr<Model> ReferenceBackend::create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) {
  const BackendInfo supported = info();
  if (std::find(supported.devices.begin(), supported.devices.end(), spec.device) == supported.devices.end())
    throw Error("reference backend: device '" + spec.device +
                "' is not supported (supported: " + join(supported.devices) + ")");
  if (std::find(supported.dtypes.begin(), supported.dtypes.end(), spec.dtype) == supported.dtypes.end())
    throw Error(std::string("reference backend: dtype '") + dtype_name(spec.dtype) +
                "' is not supported (supported: f64, f32)");
  if (std::find(supported.families.begin(), supported.families.end(), spec.family) == supported.families.end())
    throw Error("reference backend: family '" + spec.family +
                "' is not supported (supported: " + join(supported.families) + ")");
  if (spec.family == "gpt2") return make_gpt2_model(spec, std::move(weights), threads_);
  return make_mlp_model(spec, std::move(weights), threads_);
}

}  // namespace lminv::reference
