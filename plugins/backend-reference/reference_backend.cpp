#include "reference_backend.hpp"

#include <algorithm>

#include "lminv/schema.hpp"

namespace lminv::reference {

namespace {

const char* const kWho = "reference backend";

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

}  // namespace

BackendInfo ReferenceBackend::info() const {
  namespace f = feature;
  BackendInfo info;
  info.kinds = {ModelKind::decoder, ModelKind::fcnet, ModelKind::fcnet_noninvertible, ModelKind::transformer_mlp};
  info.features = {f::layer_norm,  f::layer_norm_no_bias, f::rms_norm,    f::learned_positions,
                   f::rotary,      f::partial_rotary,     f::grouped_kv,  f::head_dim,
                   f::gelu_tanh,   f::gelu_erf,           f::swiglu,      f::parallel_residual,
                   f::untied_head, f::extra_layers,       f::vocab_input, f::prefix_cache,
                   f::int8_weights};
  info.dtypes = {DType::f64, DType::f32};
  info.devices = {"cpu"};
  return info;
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
    throw Error(std::string(kWho) + ": device '" + spec.device +
                "' is not supported (supported: " + join(supported.devices) + ")");
  if (std::find(supported.dtypes.begin(), supported.dtypes.end(), spec.dtype) == supported.dtypes.end())
    throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) + "' is not supported (supported: f64, f32)");
  if (std::find(supported.kinds.begin(), supported.kinds.end(), spec.kind) == supported.kinds.end())
    throw Error(std::string(kWho) + ": model kind '" + kind_name(spec.kind) + "' is not supported");
  check_spec(spec, kWho);
  check_features(spec, supported.features, kWho);
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  check_weights(used_weights(spec), *weights, kWho);
  std::shared_ptr<ConvertedWeights> shared = converted_->of(weights);
  if (spec.kind == ModelKind::decoder) return make_decoder_model(spec, std::move(shared), threads_);
  return make_mlp_model(spec, std::move(shared), threads_);
}

}  // namespace lminv::reference
