// The torch backend: the reference backend's models (gpt2, fcnet, fcnet_noninvertible, transformer_mlp, every
// ModelSpec option) in LibTorch, f32 / f64 / bf16 on the CPU, and on CUDA where the LibTorch it was built against
// has it. Input gradients come from autograd; loss_and_grad is one forward and one backward pass on the device.
//
// This header needs only the SDK (no LibTorch header), so the plugin's entry and the tests compile fast; the torch
// code is in torch_backend.cpp (the backend, the autograd and the metrics) and torch_networks.cpp (the families).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lminv/backend.hpp"

namespace lminv::torch_backend {

// The families this backend builds: gpt2, fcnet, fcnet_noninvertible, transformer_mlp.
const std::vector<std::string>& supported_families();

// Whether LibTorch sees a CUDA device (torch::cuda::is_available()).
bool cuda_available();

// Config keys of [backend] read here: threads (0 = all cores; sets LibTorch's intra-op threads and, when LibTorch's
// BLAS is OpenBLAS, OpenBLAS's threads: both are process-wide settings).
//
// Models: weights are converted once, in create_model, to the spec's dtype and device, and kept for the model's
// life (the WeightSet is not kept). Inputs of any dtype are converted to the model's; outputs are in the model's
// dtype, input gradients in the input's. A model is not safe to call from two threads at once. Every error thrown
// is an lminv::Error (LibTorch's c10::Error is caught and rethrown with the backend's name).
class TorchBackend : public Backend {
 public:
  BackendInfo info() const override;  // devices: cpu, and cuda only when cuda_available()
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  int threads() const { return threads_; }

 private:
  int threads_ = 0;
};

// For tests and benchmarks: what LibTorch was built with and what it runs on.
struct TorchRuntime {
  std::string version;        // TORCH_VERSION
  std::string build_config;   // at::show_config()
  std::string parallel_info;  // at::get_parallel_info()
  std::string blas_library;   // the file that provides sgemm_ in this process (resolved symlinks), or "" if none
  std::string openblas_config;  // openblas_get_config(), when OpenBLAS is loaded
  bool cuda = false;
};
TorchRuntime torch_runtime();

// Seconds of the fastest of `repeats` n x n x n matrix products on the CPU in `dtype` (a BLAS sanity check).
double time_cpu_gemm(std::int64_t n, DType dtype, int repeats = 5);

}  // namespace lminv::torch_backend
