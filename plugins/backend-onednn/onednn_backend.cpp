#include "onednn_backend.hpp"

#include <algorithm>
#include <cmath>

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

const std::vector<std::string>& supported_families() {
  static const std::vector<std::string> families{"gpt2", "fcnet", "fcnet_noninvertible", "transformer_mlp"};
  return families;
}

BackendInfo OnednnBackend::info() const {
  // bf16 is not offered: oneDNN 2.6 computes bf16 matmuls only on CPUs with AVX-512 (avx512_core and up), and this
  // backend has not been written or tested for it.
  return {supported_families(), {DType::f32}, {"cpu"}};
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
  if (std::find(supported.families.begin(), supported.families.end(), spec.family) == supported.families.end())
    throw Error(std::string(kWho) + ": family '" + spec.family +
                "' is not supported (supported: " + join(supported.families) + ")");
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  ThreadScope scope(threads_);
  return guarded("building the model", [&] {
    if (spec.family == "gpt2") return make_gpt2_model(spec, std::move(weights), threads_);
    return make_mlp_model(spec, std::move(weights), threads_);
  });
}

}  // namespace lminv::onednn
