// The torch backend: configuration, model creation, and the Model calls on top of a family's forward graph
// (torch_networks.cpp): forward without autograd, the input gradient by autograd, and loss_and_grad as one forward,
// the metric and its output gradient on the device (in f64, as the SDK's metric_item computes them), one backward.
#include "torch_backend.hpp"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <utility>

#include "torch_networks.hpp"

namespace lminv::torch_backend {

namespace {

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : ", ") + w;
  return out;
}

// Runs f, turning LibTorch's exceptions (c10::Error and anything else from the standard library) into lminv::Error
// with the backend's name and what it was doing.
template <class F>
auto guarded(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(std::string(kWho) + ": " + what + ": LibTorch error: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw Error(std::string(kWho) + ": " + what + ": " + e.what());
  }
}

// The BLAS library LibTorch's CPU matrix products call (libblas.so.3 on Debian, switched by update-alternatives),
// when it is loaded in this process: a handle that also finds the symbols of its dependencies (libopenblas.so.0).
void* blas_handle() {
  static void* handle = dlopen("libblas.so.3", RTLD_LAZY | RTLD_NOLOAD);
  return handle;
}

// LibTorch's intra-op threads before anything here changed them: "all cores" for threads = 0.
int default_threads() {
  static const int n = at::get_num_threads();
  return n;
}

// Sets LibTorch's intra-op threads, and OpenBLAS's when it is LibTorch's BLAS, to `threads` (0 = all cores).
// Both are process-wide; each call sets them again, so two models with different settings each run with their own.
void apply_threads(int threads) {
  const int n = threads > 0 ? threads : default_threads();
  static int applied = 0;
  if (n == applied && at::get_num_threads() == n) return;
  at::set_num_threads(n);
  if (void* blas = blas_handle()) {
    using SetThreads = void (*)(int);
    if (auto set = reinterpret_cast<SetThreads>(dlsym(blas, "openblas_set_num_threads"))) set(n);
  }
  applied = n;
}

// ---- the model ----------------------------------------------------------------------------------------------------

class TorchModel final : public Model {
 public:
  TorchModel(const ModelSpec& spec, std::unique_ptr<Network> network, at::TensorOptions options, int threads)
      : spec_(spec), network_(std::move(network)), options_(std::move(options)), threads_(threads) {}

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    check_input(input);
    return guarded("forward", [&] {
      apply_threads(threads_);
      // The output of the last backward or loss_and_grad, when it was for this input (optimizers that walk call
      // backward, then forward on the same point).
      if (last_output_.defined() && same_tensor(input, last_input_)) return to_lminv(last_output_, spec_.dtype);
      at::NoGradGuard no_grad;
      return to_lminv(network_->forward(to_aten(input, options_)), spec_.dtype);
    });
  }

  Tensor backward(const Tensor& input, const Tensor& grad_output) override {
    check_input(input);
    return guarded("backward", [&] {
      apply_threads(threads_);
      at::AutoGradMode grad_mode(true);
      const at::Tensor x = to_aten(input, options_).requires_grad_(true);
      const at::Tensor output = network_->forward(x);
      remember(input, output);
      const Shape expected(output.sizes().begin(), output.sizes().end());
      if (grad_output.shape() != expected)
        throw Error(std::string(kWho) + ": grad_output has shape " + shape_string(grad_output.shape()) +
                    ", expected " + shape_string(expected) + " (the output's shape for a batch of " +
                    std::to_string(input.dim(0)) + ")");
      const at::Tensor dout = to_aten(grad_output, options_);
      const at::Tensor grad = torch::autograd::grad({output}, {x}, {dout})[0];
      return to_lminv(grad, input.dtype());
    });
  }

  // One forward pass with autograd, the metric and its gradient with respect to the output on the device, one
  // backward pass. Item b's loss depends on input b only, so the gradient of their sum is every item's gradient.
  LossAndGrad loss_and_grad(const Tensor& input, const Tensor& target, Metric metric) override {
    check_input(input);
    return guarded("loss_and_grad", [&] {
      apply_threads(threads_);
      at::AutoGradMode grad_mode(true);
      const at::Tensor x = to_aten(input, options_).requires_grad_(true);
      const at::Tensor output = network_->forward(x);
      remember(input, output);
      at::Tensor dout;
      const at::Tensor loss = metric_and_output_grad(output, target, metric, dout);
      const at::Tensor grad = torch::autograd::grad({output}, {x}, {dout.to(output.scalar_type())})[0];
      LossAndGrad result;
      const at::Tensor loss_host = loss.to(at::kCPU).contiguous();
      result.loss.assign(loss_host.data_ptr<double>(), loss_host.data_ptr<double>() + loss_host.numel());
      result.grad = to_lminv(grad, input.dtype());
      return result;
    });
  }

 private:
  std::int64_t width() const { return spec_.input == InputSpace::embedding ? spec_.n_embd : spec_.vocab_size; }

  void check_input(const Tensor& input) const {
    if (input.rank() != 3 || input.dim(1) != spec_.seq_len || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  std::to_string(spec_.seq_len) + ", " + std::to_string(width()) + "] (family '" + spec_.family +
                  "', input = " + input_space_name(spec_.input) + ")");
  }

  static bool same_tensor(const Tensor& a, const Tensor& b) {
    return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
  }

  void remember(const Tensor& input, const at::Tensor& output) {
    last_output_ = at::Tensor();  // invalid while the input is copied
    last_input_ = input;
    last_output_ = output.detach();
  }

  // The target on the device in f64, kept while the same target comes back (an optimizer's every step).
  const at::Tensor& device_target(const Tensor& target) {
    if (!target_device_.defined() || !same_tensor(target, target_host_)) {
      target_device_ = at::Tensor();
      target_host_ = target;
      target_device_ = to_aten(target, options_.dtype(at::kDouble));
    }
    return target_device_;
  }

  // Per-item losses [B] (f64) of output [B, ...] against target [1 or B, ...], and in `dout` their gradient with
  // respect to the output (f64), exactly as lminv::detail::metric_item defines them:
  //   l1      sum |o - t|                gradient sign(o - t), 0 where o = t
  //   l2      ||o - t||_2                gradient (o - t) / ||o - t||, 0 when o = t
  //   cosine  1 - <o, t> / (|o| |t|)     gradient -(t / (|o| |t|) - cos o / |o|^2); loss 1, gradient 0 when |o| |t| = 0
  at::Tensor metric_and_output_grad(const at::Tensor& output, const Tensor& target, Metric metric, at::Tensor& dout) {
    const std::int64_t B = output.size(0);
    const bool trailing_equal = target.rank() == output.dim() && target.rank() > 0 &&
                                std::equal(target.shape().begin() + 1, target.shape().end(), output.sizes().begin() + 1);
    if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != B))
      throw Error("loss: target " + shape_string(target.shape()) + " does not match output " +
                  shape_string(Shape(output.sizes().begin(), output.sizes().end())));
    const at::Tensor o = output.detach().to(at::kDouble).reshape({B, -1});
    const at::Tensor t = device_target(target).reshape({target.dim(0), -1});  // broadcasts over B when it is [1, n]
    at::Tensor loss;
    switch (metric) {
      case Metric::l1: {
        const at::Tensor d = o.sub(t);
        loss = d.abs().sum(1);
        dout = d.sign();
        break;
      }
      case Metric::l2: {
        const at::Tensor d = o.sub(t);
        loss = d.mul(d).sum(1).sqrt();
        const at::Tensor inverse = loss.reciprocal().masked_fill(loss.eq(0), 0.0);
        dout = d.mul(inverse.unsqueeze(1));
        break;
      }
      case Metric::cosine: {
        const at::Tensor dot = o.mul(t).sum(1), oo = o.mul(o).sum(1), tt = t.mul(t).sum(1);
        const at::Tensor norms = oo.sqrt().mul(tt.sqrt());
        const at::Tensor zero = norms.eq(0);  // [B]
        const at::Tensor cos = dot.div(norms);
        loss = cos.neg().add(1.0).masked_fill(zero, 1.0);
        dout = t.div(norms.unsqueeze(1)).sub(o.mul(cos.div(oo).unsqueeze(1))).neg().masked_fill(zero.unsqueeze(1), 0.0);
        break;
      }
    }
    dout = dout.reshape(output.sizes());
    return loss;
  }

  ModelSpec spec_;
  std::unique_ptr<Network> network_;
  at::TensorOptions options_;
  int threads_ = 0;
  Tensor last_input_;        // the input of the last pass run with autograd ...
  at::Tensor last_output_;   // ... and its output (detached), for a forward on the same input
  Tensor target_host_;       // the last target ...
  at::Tensor target_device_;  // ... on the device, f64
};

}  // namespace

// ---- the backend --------------------------------------------------------------------------------------------------

const std::vector<std::string>& supported_families() {
  static const std::vector<std::string> families{"gpt2", "fcnet", "fcnet_noninvertible", "transformer_mlp"};
  return families;
}

bool cuda_available() {
  return guarded("checking for CUDA", [] { return torch::cuda::is_available(); });
}

BackendInfo TorchBackend::info() const {
  BackendInfo info{supported_families(), {DType::f32, DType::f64, DType::bf16}, {"cpu"}};
  if (cuda_available()) info.devices.push_back("cuda");
  return info;
}

void TorchBackend::configure(const Options& options) {
  const std::int64_t threads = options.get_int("threads", 0);
  if (threads < 0) options.fail("threads", "expected 0 (all cores) or a positive number of threads");
  if (threads > 4096) options.fail("threads", "expected at most 4096 threads");
  threads_ = static_cast<int>(threads);
}

std::unique_ptr<Model> TorchBackend::create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  if (spec.device == "cuda") {
    if (!cuda_available())
      throw Error(std::string(kWho) + ": device 'cuda' is not available: torch::cuda::is_available() is false (this "
                  "LibTorch " TORCH_VERSION " was built without CUDA, or no CUDA device is visible); use device = "
                  "cpu, or build the torch backend against a CUDA LibTorch");
  } else if (spec.device != "cpu") {
    throw Error(std::string(kWho) + ": device '" + spec.device + "' is not supported (supported: " +
                join(info().devices) + ")");
  }
  if (spec.dtype != DType::f32 && spec.dtype != DType::f64 && spec.dtype != DType::bf16)
    throw Error(std::string(kWho) + ": dtype #" + std::to_string(static_cast<int>(spec.dtype)) +
                " is not supported (supported: f32, f64, bf16)");
  const auto& families = supported_families();
  if (std::find(families.begin(), families.end(), spec.family) == families.end())
    throw Error(std::string(kWho) + ": family '" + spec.family + "' is not supported (supported: " + join(families) +
                ")");
  return guarded("create_model", [&]() -> std::unique_ptr<Model> {
    apply_threads(threads_);
    const at::TensorOptions options =
        at::TensorOptions().dtype(scalar_type(spec.dtype)).device(spec.device == "cuda" ? at::kCUDA : at::kCPU);
    std::unique_ptr<Network> network =
        spec.family == "gpt2" ? make_gpt2_network(spec, *weights, options) : make_mlp_network(spec, *weights, options);
    return std::make_unique<TorchModel>(spec, std::move(network), options, threads_);
  });
}

// ---- diagnostics --------------------------------------------------------------------------------------------------

TorchRuntime torch_runtime() {
  return guarded("torch_runtime", [] {
    TorchRuntime r;
    r.version = TORCH_VERSION;
    r.build_config = at::show_config();
    r.parallel_info = at::get_parallel_info();
    r.cuda = torch::cuda::is_available();
    if (void* blas = blas_handle()) {
      Dl_info info{};
      if (void* gemm = dlsym(blas, "sgemm_"); gemm && dladdr(gemm, &info) && info.dli_fname) {
        char resolved[PATH_MAX];
        r.blas_library = realpath(info.dli_fname, resolved) ? resolved : info.dli_fname;
      }
      using GetConfig = char* (*)();
      if (auto get = reinterpret_cast<GetConfig>(dlsym(blas, "openblas_get_config"))) r.openblas_config = get();
    }
    return r;
  });
}

double time_cpu_gemm(std::int64_t n, DType dtype, int repeats) {
  return guarded("time_cpu_gemm", [&] {
    at::NoGradGuard no_grad;
    const at::Tensor a = at::ones({n, n}, at::TensorOptions().dtype(scalar_type(dtype)));
    double best = 1e300;
    for (int i = 0; i < std::max(1, repeats); ++i) {
      const auto start = std::chrono::steady_clock::now();
      const at::Tensor c = at::matmul(a, a);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  });
}

}  // namespace lminv::torch_backend
