// The torch backend: the reference backend's models (the decoder with every architecture setting of spec.arch, fcnet,
// fcnet_noninvertible, transformer_mlp; every ModelSpec option) in LibTorch, f32 / f64 / bf16 on the CPU, and on CUDA
// where the LibTorch it was built against has it. Input gradients come from autograd; loss_and_grad is one forward
// and one backward pass on the device.
//
// This header needs only the SDK (no LibTorch header), so the plugin's entry and the tests compile fast; the torch
// code is in torch_backend.cpp (the backend, the autograd and the metrics) and torch_networks.cpp (the networks and
// the shared weights).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lminv/backend.hpp"

namespace lminv::torch_backend {

// What this backend builds: every ModelKind, and of decoders every feature of architecture.hpp's list.
const std::vector<ModelKind>& supported_kinds();
const std::vector<std::string>& supported_features();

// Whether LibTorch sees a CUDA device (torch::cuda::is_available()).
bool cuda_available();

// Threads, from the [backend] keys:
//   threads       0 = all cores (omp_get_max_threads(), as the reference backend counts them), or how many
//   aten_threads  LibTorch's intra-op (OpenMP) pool; 0 = automatic: 1 when the model's matrix products go to a
//                 pthreads OpenBLAS as LibTorch's BLAS (Debian's: OpenBLAS then gets `threads` for the products, and
//                 two pools of busy-waiting threads do not fight over the same cores), else `threads`
// Both are process-wide settings: each model call sets them for its duration and puts the previous values back.
// `blas_products` is the model's own: false where its matrix products do not go to LibTorch's BLAS (CPU f32 with
// oneDNN's sgemm, torch_networks.cpp), so that there is no second pool to keep ATen's off the cores and automatic
// aten_threads is `threads`.
struct ThreadSettings {
  int threads = 0;
  int aten_threads = 0;
  bool blas_products = true;
};

// The ATen weight tensors that a backend's live models hold (TorchBackend::weight_cache_stats): `sets` distinct
// (WeightSet, dtype, device) triples, `tensors` distinct tensors of `bytes` bytes in all, of which `copied_bytes` were
// converted copies (the rest are views of the WeightSets' own bytes, where the dtype already was the model's, on the
// CPU). The rotary tables count among them.
struct WeightCacheStats {
  std::size_t sets = 0;
  std::size_t tensors = 0;
  std::size_t bytes = 0;
  std::size_t copied_bytes = 0;
};

class WeightCache;  // torch_networks.hpp

// Config keys of [backend] read here: threads, aten_threads (see ThreadSettings).
//
// Models: each weight is made an ATen tensor of the spec's dtype and device once per WeightSet: the models a backend
// makes on the same WeightSet (the same shared_ptr target) with the same dtype and device share those tensors (and
// the rotary tables), which live while one of those models does. Where a weight already has the model's dtype on
// the CPU, the tensor is a view of the WeightSet's bytes (no copy; the models then keep the WeightSet alive).
// Decoder and transformer_mlp models take any length 1 .. n_positions in every call. Inputs of any dtype are
// converted to the model's; outputs are in the model's dtype, input gradients in the input's. A forward on the input
// of the last backward or loss_and_grad reuses that pass's output. Decoder models offer the "prefix_cache"
// capability (lminv/prefix_cache.hpp: the prefix's keys, rotated at their positions, and values per block, candidates
// run as single positions against them; up to n_positions); the MLP kinds offer none. A model and its prefix cache
// are not safe to call from two threads at once; create_model is. Every error thrown is an lminv::Error (LibTorch's
// c10::Error is caught and rethrown with the backend's name).
class TorchBackend : public Backend {
 public:
  TorchBackend();
  ~TorchBackend() override;

  BackendInfo info() const override;  // devices: cpu, and cuda only when cuda_available()
  void configure(const Options& options) override;
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) override;

  const ThreadSettings& threads() const { return threads_; }

  // What the models made by this backend and still alive hold (see WeightCacheStats): for tests and diagnostics.
  WeightCacheStats weight_cache_stats() const;

 private:
  ThreadSettings threads_;
  std::shared_ptr<WeightCache> weights_;
};

// For tests and benchmarks: what LibTorch was built with and what it runs on.
struct TorchRuntime {
  std::string version;        // TORCH_VERSION
  std::string build_config;   // at::show_config()
  std::string parallel_info;  // at::get_parallel_info()
  std::string blas_library;   // the file that provides sgemm_ in this process (resolved symlinks), or "" if none
  std::string openblas_config;  // openblas_get_config(), when OpenBLAS is loaded
  int openblas_parallel = -1;   // openblas_get_parallel(): 0 sequential, 1 pthreads, 2 OpenMP; -1 not OpenBLAS
  bool cuda = false;
};
TorchRuntime torch_runtime();

// Seconds of the fastest of `repeats` n x n x n matrix products on the CPU in `dtype` (a BLAS sanity check).
double time_cpu_gemm(std::int64_t n, DType dtype, int repeats = 5);

}  // namespace lminv::torch_backend
