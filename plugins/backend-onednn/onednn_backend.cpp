#include "onednn_backend.hpp"

#include <algorithm>
#include <cmath>

#include "lminv/schema.hpp"
#include "onednn_common.hpp"

namespace lminv::onednn {

namespace {

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

// The values of a target as f32 or f64 pointers (bf16 widened to f32 into `storage`).
template <class T>
double metric_item(const float* o, const T* t, Index n, Metric metric, float* g) {
  double loss = 0;
  switch (metric) {
    case Metric::l1: {
      for (Index i = 0; i < n; ++i) loss += std::abs(static_cast<double>(o[i]) - static_cast<double>(t[i]));
      if (g)
        for (Index i = 0; i < n; ++i) {
          const double d = static_cast<double>(o[i]) - static_cast<double>(t[i]);
          g[i] = static_cast<float>(d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0));
        }
      break;
    }
    case Metric::l2: {
      for (Index i = 0; i < n; ++i) {
        const double d = static_cast<double>(o[i]) - static_cast<double>(t[i]);
        loss += d * d;
      }
      loss = std::sqrt(loss);
      if (g)
        for (Index i = 0; i < n; ++i)
          g[i] = static_cast<float>(loss > 0 ? (static_cast<double>(o[i]) - static_cast<double>(t[i])) / loss : 0.0);
      break;
    }
    case Metric::cosine: {
      double dot = 0, oo = 0, tt = 0;
      for (Index i = 0; i < n; ++i) {
        const double a = o[i], b = static_cast<double>(t[i]);
        dot += a * b;
        oo += a * a;
        tt += b * b;
      }
      const double no = std::sqrt(oo), nt = std::sqrt(tt);
      if (no == 0 || nt == 0) {
        loss = 1;
        if (g)
          for (Index i = 0; i < n; ++i) g[i] = 0.0f;
        break;
      }
      const double cos = dot / (no * nt);
      loss = 1 - cos;
      if (g)
        for (Index i = 0; i < n; ++i)
          g[i] = static_cast<float>(-(static_cast<double>(t[i]) / (no * nt) - cos * static_cast<double>(o[i]) / oo));
      break;
    }
  }
  return loss;
}

template <class T>
std::vector<double> metric_all(const float* output, Index B, Index n, const T* target, Index target_items,
                               Metric metric, float* grad, int threads) {
  std::vector<double> loss(static_cast<std::size_t>(B));
  const int team = std::max(1, std::min<int>(threads > 0 ? threads : omp_get_max_threads(), static_cast<int>(B)));
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && B * n > (1 << 16))
  for (Index b = 0; b < B; ++b)
    loss[b] =
        metric_item(output + b * n, target + (target_items == 1 ? 0 : b) * n, n, metric, grad ? grad + b * n : nullptr);
  return loss;
}

}  // namespace

std::vector<double> metric_and_grad_f32(const float* output, Index B, Index n, const Tensor& target, Metric metric,
                                        float* grad, int threads) {
  const Index items = target.dim(0);
  switch (target.dtype()) {
    case DType::f32: return metric_all(output, B, n, target.data<float>(), items, metric, grad, threads);
    case DType::f64: return metric_all(output, B, n, target.data<double>(), items, metric, grad, threads);
    case DType::bf16: {
      const Tensor widened = target.to(DType::f32);
      return metric_all(output, B, n, widened.data<float>(), items, metric, grad, threads);
    }
  }
  return {};
}

const std::vector<ModelKind>& supported_kinds() {
  static const std::vector<ModelKind> kinds{ModelKind::decoder, ModelKind::fcnet, ModelKind::fcnet_noninvertible,
                                            ModelKind::transformer_mlp};
  return kinds;
}

const std::vector<std::string>& supported_features() {
  namespace f = feature;
  static const std::vector<std::string> features{
      f::layer_norm,  f::layer_norm_no_bias, f::rms_norm,    f::learned_positions, f::rotary, f::partial_rotary,
      f::grouped_kv,  f::head_dim,           f::gelu_tanh,   f::gelu_erf,          f::swiglu, f::parallel_residual,
      f::untied_head, f::extra_layers,       f::vocab_input, f::prefix_cache, f::int8_weights};
  return features;
}

BackendInfo OnednnBackend::info() const {
  // bf16 is not offered: oneDNN 2.6 computes bf16 matmuls only on CPUs with AVX-512 (avx512_core and up), and this
  // backend has not been written or tested for it. prefix_cache: the decoder's (decoder_model.cpp, class Cache); the
  // MLP kinds offer none (transformer_mlp's would be optional).
  return {supported_kinds(), supported_features(), {DType::f32}, {"cpu"}};
}

void OnednnBackend::configure(const Options& options) {
  const std::int64_t threads = options.get_int("threads", 0);
  if (threads < 0) options.fail("threads", "expected 0 (all cores) or a positive number of threads");
  if (threads > 4096) options.fail("threads", "expected at most 4096 threads");
  threads_ = static_cast<int>(threads);
}

std::unique_ptr<Model> OnednnBackend::create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) {
  const BackendInfo supported = info();
  if (std::find(supported.devices.begin(), supported.devices.end(), spec.device) == supported.devices.end())
    throw Error(std::string(kWho) + ": device '" + spec.device +
                "' is not supported (supported: " + join(supported.devices) + ")");
  if (std::find(supported.dtypes.begin(), supported.dtypes.end(), spec.dtype) == supported.dtypes.end())
    throw Error(std::string(kWho) + ": dtype '" + dtype_name(spec.dtype) +
                "' is not supported (supported: f32; oneDNN has no f64, and bf16 is not offered by this backend)");
  if (std::find(supported.kinds.begin(), supported.kinds.end(), spec.kind) == supported.kinds.end())
    throw Error(std::string(kWho) + ": model kind '" + kind_name(spec.kind) + "' is not supported");
  check_spec(spec, kWho);
  check_features(spec, supported.features, kWho);
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  check_weights(used_weights(spec), *weights, kWho);
  ThreadScope scope(threads_);
  const std::lock_guard<std::mutex> lock(mutex_);  // the store is filled while the model is built
  return guarded("building the model", [&] {
    std::shared_ptr<WeightStore> store = store_for(weights);
    if (spec.kind == ModelKind::decoder) return make_decoder_model(spec, std::move(store), threads_);
    return make_mlp_model(spec, std::move(store), threads_);
  });
}

// The store of `weights` while a model uses it, else a new one. A store keeps its WeightSet, so the address cannot be
// reused by another WeightSet while the entry is alive.
std::shared_ptr<WeightStore> OnednnBackend::store_for(const std::shared_ptr<const WeightSet>& weights) {
  for (auto it = stores_.begin(); it != stores_.end();) it = it->second.expired() ? stores_.erase(it) : std::next(it);
  if (auto it = stores_.find(weights.get()); it != stores_.end())
    if (std::shared_ptr<WeightStore> store = it->second.lock()) return store;
  auto store = std::make_shared<WeightStore>(weights);
  stores_[weights.get()] = store;
  return store;
}

std::size_t OnednnBackend::weight_stores() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  std::size_t n = 0;
  for (const auto& [key, store] : stores_) n += store.expired() ? 0 : 1;
  return n;
}

}  // namespace lminv::onednn
