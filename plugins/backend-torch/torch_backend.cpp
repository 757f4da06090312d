// The torch backend: configuration, model creation, and the Model calls on top of a family's forward graph
// (torch_networks.cpp): forward without autograd, the input gradient by autograd, and loss_and_grad as one forward,
// the metric and its output gradient on the device (in f64, as the SDK's metric_item computes them), one backward;
// and the "prefix_cache" capability of the decoder on top of the network's cached-prefix calls, and the "trainer"
// capability (lminv train): the same forward graph on trainable copies of the weights, autograd, AdamW.
#include "torch_backend.hpp"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Version.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/ones.h>
#include <dlfcn.h>
#include <omp.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <utility>

#include "lminv/matmul_probe.hpp"
#include "lminv/prefix_cache.hpp"
#include "lminv/schema.hpp"
#include "lminv/trainer.hpp"
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

// How the OpenBLAS that LibTorch calls runs its threads (openblas_get_parallel): 0 sequential, 1 its own pthreads,
// 2 OpenMP; -1 when LibTorch's BLAS is not OpenBLAS (MKL in pip's LibTorch, say).
int openblas_parallel() {
  static const int mode = [] {
    using GetParallel = int (*)();
    void* blas = blas_handle();
    auto get = blas ? reinterpret_cast<GetParallel>(dlsym(blas, "openblas_get_parallel")) : nullptr;
    return get ? get() : -1;
  }();
  return mode;
}

// OpenBLAS's thread count functions, when LibTorch's BLAS is OpenBLAS.
struct OpenBlasThreads {
  int (*get)() = nullptr;
  void (*set)(int) = nullptr;
};
const OpenBlasThreads& openblas_threads() {
  static const OpenBlasThreads f = [] {
    OpenBlasThreads t;
    if (void* blas = blas_handle()) {
      t.get = reinterpret_cast<int (*)()>(dlsym(blas, "openblas_get_num_threads"));
      t.set = reinterpret_cast<void (*)(int)>(dlsym(blas, "openblas_set_num_threads"));
      if (!t.get || !t.set) t = {};
    }
    return t;
  }();
  return f;
}

// For the life of a model call: the threads of LibTorch's intra-op pool (OpenMP, the calling thread's setting) and
// of OpenBLAS for `settings`, and the previous values back afterwards. Both are process-wide, and another backend
// in the same process (`lminv compare` runs several) must not find its "all cores" turned into one.
//
// With Debian's pthreads OpenBLAS there are two pools of busy-waiting threads, ATen's for element-wise kernels and
// OpenBLAS's for matrix products, and on the same cores they slow each other down (GPT-2 small + lm_head, f64,
// 2 cores, 2026-12-04: loss_and_grad at batch 32 took 2.32 s with both pools at 2 threads, 1.43 s with ATen at 1
// and OpenBLAS at 2). So where a model's products go to that OpenBLAS the products get the threads and ATen one,
// unless aten_threads says otherwise. Where they do not (CPU f32 with oneDNN, ThreadSettings::blas_products), and
// for an OpenMP OpenBLAS, which shares ATen's pool, ATen gets them all (f32, batch 32: 0.32 s against 0.35 s with
// ATen at 1); other BLAS libraries are LibTorch's business: ATen gets them too.
class ThreadScope {
 public:
  explicit ThreadScope(const ThreadSettings& settings) {
    // The caller's OpenMP setting, read before any ATen call: ATen's first use in a thread sets it to its own
    // default (half the logical CPUs on x86, assuming hyper-threads: 1 on a 2-core machine without them).
    omp_before_ = omp_get_max_threads();
    static const int all = omp_before_;  // "all cores" as the reference backend counts them (OMP_NUM_THREADS or all)
    const int n = settings.threads > 0 ? settings.threads : all;
    const int aten = settings.aten_threads > 0                                  ? settings.aten_threads
                     : settings.blas_products && openblas_parallel() == 1 ? 1
                                                                          : n;
    // ATen's OpenMP parallel_for takes its team from the OpenMP setting, so that is the one to set, once ATen has
    // made its first-use setting in this thread (get_num_threads). Not at::set_num_threads: in LibTorch 1.13 that
    // also rebuilds caffe2's pthreadpool at the new size on every call, and the fresh pool's spinning worker took a
    // core from the kernels (GPT-2 small at batch 1: 0.065-0.083 s per step against 0.047 s).
    (void)at::get_num_threads();
    omp_set_num_threads(aten);
    const OpenBlasThreads& blas = openblas_threads();
    if (blas.get) {
      blas_before_ = blas.get();
      if (n != blas_before_) blas.set(n);
    }
    kernels_before_ = kernel_threads();
    set_kernel_threads(n);
  }
  ~ThreadScope() {
    set_kernel_threads(kernels_before_);
    omp_set_num_threads(omp_before_);
    const OpenBlasThreads& blas = openblas_threads();
    if (blas.get && blas.get() != blas_before_) blas.set(blas_before_);
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int omp_before_ = 1;
  int blas_before_ = 1;
  int kernels_before_ = 0;
};

// ---- the prefix cache ---------------------------------------------------------------------------------------------

// The "prefix_cache" capability of a model whose network has one (the decoder): the prefix's attention keys and
// values per block, in the model's dtype on its device (Network::append_prefix), and the candidates run as B single
// positions against them (Network::next_after_prefix): per block a few [B, d] x [d, *] matrix products and per kv
// head one [B g, hd] x [hd, t] product, where FullForwardPrefix runs B forward passes over all seq_len positions.
// The prefix may grow to the model's longest sequence, n_positions (seq_len for a kind built for one length). Calls
// run under the model's thread settings and without autograd, like forward().
class TorchPrefixCache final : public PrefixCache {
 public:
  TorchPrefixCache(const ModelSpec& spec, const Network& network, const at::TensorOptions& options,
                   const ThreadSettings& threads)
      : spec_(spec),
        network_(network),
        options_(options),
        threads_(threads),
        limit_(spec.any_length() ? spec.n_positions : spec.seq_len),
        limit_name_(spec.any_length() ? "n_positions" : "seq_len") {}

  void reset() override {
    cache_ = KeyValueCache();
    kept_ = CandidateKeyValues();
  }
  std::int64_t length() const override { return cache_.length; }

  void append(const Tensor& rows) override {
    check_rows(rows, "append");
    const std::int64_t n = rows.dim(0);
    if (cache_.length + n > limit_)
      throw Error(std::string(kWho) + ": prefix cache: appending " + std::to_string(n) + " positions to a prefix of " +
                  std::to_string(cache_.length) + " exceeds " + limit_name_ + " " + std::to_string(limit_));
    kept_ = CandidateKeyValues();
    if (n == 0) return;
    guarded("prefix cache append", [&] {
      const ThreadScope threads(threads_);
      at::NoGradGuard no_grad;
      network_.append_prefix(to_aten(rows, options_), cache_);
    });
  }

  Tensor next(const Tensor& candidates) override {
    check_rows(candidates, "next");
    if (cache_.length >= limit_)
      throw Error(std::string(kWho) + ": prefix cache: the prefix already has all " + std::to_string(limit_) +
                  " positions (" + limit_name_ + " " + std::to_string(limit_) + "): no position is left for next()");
    return guarded("prefix cache next", [&] {
      const ThreadScope threads(threads_);
      at::NoGradGuard no_grad;
      kept_ = CandidateKeyValues();
      return to_lminv(network_.next_after_prefix(to_aten(candidates, options_), cache_, &kept_), spec_.dtype);
    });
  }

  // The candidate's keys and values as next() computed them, appended to each block's; they come from a product of
  // B rows where append() runs one, so they may differ from append()'s in the last bits.
  bool append_from_last_next(std::int64_t b) override {
    if (kept_.position < 0 || kept_.position != cache_.length) return false;
    const std::int64_t B = kept_.keys.empty() ? 0 : kept_.keys.front().size(0);
    if (b < 0 || b >= B)
      throw Error(std::string(kWho) + ": prefix cache: append_from_last_next(" + std::to_string(b) +
                  "): the last next() had " + std::to_string(B) + " candidates");
    guarded("prefix cache append", [&] {
      at::NoGradGuard no_grad;
      const std::size_t L = kept_.keys.size();
      std::vector<at::Tensor> keys(L), values(L);  // the cache's next state
      for (std::size_t l = 0; l < L; ++l) {
        const at::Tensor k = kept_.keys[l][b].unsqueeze(1), v = kept_.values[l][b].unsqueeze(1);  // [nkv, 1, hd]
        keys[l] = cache_.length > 0 ? at::cat({cache_.keys[l], k}, 1) : k.contiguous();
        values[l] = cache_.length > 0 ? at::cat({cache_.values[l], v}, 1) : v.contiguous();
      }
      cache_.keys = std::move(keys);
      cache_.values = std::move(values);
      cache_.length += 1;
      kept_ = CandidateKeyValues();
    });
    return true;
  }

 private:
  void check_rows(const Tensor& rows, const char* call) const {
    const bool embedding = spec_.input == InputSpace::embedding;
    const std::int64_t width = embedding ? spec_.n_embd : spec_.vocab_size;
    if (rows.rank() != 2 || rows.dim(1) != width)
      throw Error(std::string(kWho) + ": prefix cache: " + call + " takes rows [n, " + std::to_string(width) +
                  "] (input = " + input_space_name(spec_.input) + ", " + (embedding ? "n_embd " : "vocab_size ") +
                  std::to_string(width) + "), got " + shape_string(rows.shape()));
  }

  const ModelSpec& spec_;  // the model's, which outlives this cache
  const Network& network_;
  at::TensorOptions options_;
  ThreadSettings threads_;
  std::int64_t limit_;      // the longest prefix plus candidate
  const char* limit_name_;  // n_positions or seq_len
  KeyValueCache cache_;
  CandidateKeyValues kept_;  // the last next()'s, until an append or reset
};

// ---- the matmul probe ---------------------------------------------------------------------------------------------

// "matmul_probe": at::mm on the model's device with the model's thread settings, which is how the networks'
// matrix products run (through LibTorch's BLAS on the CPU).
class TorchMatmulProbe final : public MatmulProbe {
 public:
  TorchMatmulProbe(at::TensorOptions options, ThreadSettings threads) : options_(std::move(options)), threads_(threads) {}

  double matmul_seconds(DType dtype, std::int64_t m, std::int64_t n, std::int64_t k, int repeat) override {
    return guarded("matmul_probe", [&] {
      if (dtype != DType::f32 && dtype != DType::f64 && dtype != DType::bf16)
        throw Error(std::string(kWho) + ": matmul_probe: no matrix product in " + dtype_name(dtype));
      const ThreadScope threads(threads_);
      at::NoGradGuard no_grad;
      const at::TensorOptions o = options_.dtype(scalar_type(dtype));
      const at::Tensor a = at::randn({m, k}, o), b = at::randn({k, n}, o);
      at::Tensor c = large_product(a, b);
      const bool cuda = options_.device().is_cuda();
      double best = INFINITY;
      for (int r = 0; r < std::max(1, repeat); ++r) {
        if (cuda) torch::cuda::synchronize();
        const auto start = std::chrono::steady_clock::now();
        c = large_product(a, b);
        if (cuda) torch::cuda::synchronize();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      return best;
    });
  }

 private:
  at::TensorOptions options_;
  ThreadSettings threads_;
};


// ---- training -------------------------------------------------------------------------------------------------------

// The "trainer" capability of a decoder with every block and the LM head: the network's forward graph built on
// copies of the weights that require gradients (its own SharedWeights, outside the backend's cache: the WeightSet
// and the models sharing it are never touched), next-token cross-entropy, the gradient by autograd, global-norm
// clipping, and AdamW as torch.optim.AdamW computes it (single-tensor, no amsgrad): p *= 1 - lr wd (matrices only),
// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps).
class TorchTrainer final : public Trainer {
 public:
  TorchTrainer(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source, at::TensorOptions options,
               ThreadSettings threads)
      : spec_(spec), options_(std::move(options)), threads_(threads) {
    const ThreadScope scope(threads_);
    auto shared = std::make_shared<SharedWeights>(options_);
    std::vector<std::string> names;
    for (const TensorSpec& t : used_weights(spec)) names.push_back(t.name);
    if (std::find(names.begin(), names.end(), "wte.weight") == names.end()) names.push_back("wte.weight");
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
      Parameter p;
      p.name = name;
      p.value = to_aten(source->get(name), options_).requires_grad_(true);  // a copy
      p.exp_avg = at::zeros_like(p.value).detach();
      p.exp_avg_sq = at::zeros_like(p.value).detach();
      p.decay = p.value.dim() >= 2;
      shared->put(name, p.value);
      if (name == "wte.weight") wte_ = p.value;
      params_.push_back(std::move(p));
    }
    network_ = make_decoder_network(spec, source, std::move(shared));
  }

  void configure(const TrainSettings& settings) override { settings_ = settings; }

  TrainStepResult step(const std::vector<std::int64_t>& tokens, std::int64_t batch, double lr) override {
    return guarded("train step", [&] {
      const ThreadScope scope(threads_);
      at::AutoGradMode grad_mode(true);
      TrainStepResult r;
      const at::Tensor loss = batch_loss(tokens, batch);
      r.loss = loss.item<double>();
      if (!std::isfinite(r.loss))
        throw Error(std::string(kWho) + ": the training loss became " + std::to_string(r.loss) + " at step " +
                    std::to_string(steps_ + 1) + " (learning rate " + std::to_string(lr) +
                    "): training diverged; lower [train] lr or raise warmup");
      std::vector<at::Tensor> leaves;
      for (const Parameter& p : params_) leaves.push_back(p.value);
      std::vector<at::Tensor> grads = torch::autograd::grad({loss}, leaves, {}, false, false, /*allow_unused=*/true);
      at::NoGradGuard no_grad;
      double sum = 0;
      for (std::size_t i = 0; i < grads.size(); ++i) {
        if (!grads[i].defined()) grads[i] = at::zeros_like(params_[i].value);
        sum += grads[i].to(at::kDouble).pow(2).sum().item<double>();
      }
      r.grad_norm = std::sqrt(sum);
      if (settings_.grad_clip > 0 && r.grad_norm > settings_.grad_clip) {
        const double coef = settings_.grad_clip / (r.grad_norm + 1e-6);  // torch.nn.utils.clip_grad_norm_'s
        for (at::Tensor& g : grads) g.mul_(coef);
      }
      ++steps_;
      const double t = static_cast<double>(steps_);
      const double bc1 = 1 - std::pow(settings_.beta1, t), bc2 = 1 - std::pow(settings_.beta2, t);
      for (std::size_t i = 0; i < params_.size(); ++i) {
        Parameter& p = params_[i];
        const at::Tensor& g = grads[i];
        at::Tensor value = p.value.detach();  // the same storage, updated in place
        if (p.decay && settings_.weight_decay > 0) value.mul_(1 - lr * settings_.weight_decay);
        p.exp_avg.mul_(settings_.beta1).add_(g, 1 - settings_.beta1);
        p.exp_avg_sq.mul_(settings_.beta2).addcmul_(g, g, 1 - settings_.beta2);
        const at::Tensor denom = p.exp_avg_sq.sqrt().div_(std::sqrt(bc2)).add_(settings_.epsilon);
        value.addcdiv_(p.exp_avg, denom, -lr / bc1);
      }
      return r;
    });
  }

  double loss(const std::vector<std::int64_t>& tokens, std::int64_t batch) override {
    return guarded("train loss", [&] {
      const ThreadScope scope(threads_);
      at::NoGradGuard no_grad;
      return batch_loss(tokens, batch).item<double>();
    });
  }

  std::int64_t steps() const override { return steps_; }

  WeightSet weights() const override {
    WeightSet w;
    for (const Parameter& p : params_) w.set(p.name, to_lminv(p.value.detach(), spec_.dtype));
    return w;
  }

  WeightSet state() const override {
    WeightSet w;
    for (const Parameter& p : params_) {
      w.set("exp_avg/" + p.name, to_lminv(p.exp_avg, spec_.dtype));
      w.set("exp_avg_sq/" + p.name, to_lminv(p.exp_avg_sq, spec_.dtype));
    }
    Tensor step(DType::f64, {1});
    step.set(0, static_cast<double>(steps_));
    w.set("step", std::move(step));
    return w;
  }

  void load_state(const WeightSet& state) override {
    guarded("load the optimizer state", [&] {
      for (Parameter& p : params_)
        for (auto [key, target] : {std::pair<std::string, at::Tensor*>{"exp_avg/" + p.name, &p.exp_avg},
                                   std::pair<std::string, at::Tensor*>{"exp_avg_sq/" + p.name, &p.exp_avg_sq}}) {
          const Tensor& t = state.get(key);
          if (t.shape() != Shape(p.value.sizes().begin(), p.value.sizes().end()))
            throw Error(std::string(kWho) + ": optimizer state '" + key + "' has shape " + shape_string(t.shape()) +
                        ", the parameter " + shape_string(Shape(p.value.sizes().begin(), p.value.sizes().end())));
          *target = to_aten(t, options_);
        }
      const Tensor& step = state.get("step");
      if (step.numel() != 1 || !(step.get(0) >= 0) || step.get(0) != std::floor(step.get(0)))
        throw Error(std::string(kWho) + ": optimizer state 'step' must hold one whole number >= 0");
      steps_ = static_cast<std::int64_t>(step.get(0));
      return 0;
    });
  }

 private:
  struct Parameter {
    std::string name;
    at::Tensor value, exp_avg, exp_avg_sq;
    bool decay = false;
  };

  // Mean cross-entropy of the rows' next tokens: inputs are the first T ids of each row, targets the last T.
  at::Tensor batch_loss(const std::vector<std::int64_t>& tokens, std::int64_t batch) const {
    if (batch < 1 || tokens.size() % static_cast<std::size_t>(batch) != 0 || tokens.size() / batch < 2)
      throw Error(std::string(kWho) + ": a training batch of " + std::to_string(tokens.size()) +
                  " ids does not make " + std::to_string(batch) + " rows of at least 2");
    const std::int64_t width = static_cast<std::int64_t>(tokens.size()) / batch, T = width - 1;
    if (T > spec_.n_positions)
      throw Error(std::string(kWho) + ": training rows of " + std::to_string(T) + " positions exceed n_positions " +
                  std::to_string(spec_.n_positions));
    for (std::int64_t id : tokens)
      if (id < 0 || id >= spec_.vocab_size)
        throw Error(std::string(kWho) + ": token id " + std::to_string(id) + " outside the vocabulary (size " +
                    std::to_string(spec_.vocab_size) + ")");
    const at::Tensor ids = at::from_blob(const_cast<std::int64_t*>(tokens.data()), {batch, width},
                                         at::TensorOptions(at::kLong))
                               .to(options_.device(), at::kLong, false, /*copy=*/true);
    const at::Tensor inputs = ids.slice(1, 0, T), targets = ids.slice(1, 1, width);
    const at::Tensor logits = network_->forward(at::embedding(wte_, inputs));  // [B, T, V]
    return at::cross_entropy_loss(logits.reshape({batch * T, logits.size(-1)}), targets.reshape({batch * T}));
  }

  ModelSpec spec_;
  at::TensorOptions options_;
  ThreadSettings threads_;
  TrainSettings settings_;
  std::vector<Parameter> params_;
  at::Tensor wte_;
  std::unique_ptr<Network> network_;
  std::int64_t steps_ = 0;
};

// ---- the model ----------------------------------------------------------------------------------------------------

class TorchModel final : public Model {
 public:
  TorchModel(const ModelSpec& spec, std::unique_ptr<Network> network, at::TensorOptions options,
             ThreadSettings threads, std::shared_ptr<const WeightSet> source)
      : spec_(spec), network_(std::move(network)), options_(std::move(options)), threads_(threads),
        source_(std::move(source)) {}

  const ModelSpec& spec() const override { return spec_; }

  Tensor forward(const Tensor& input) override {
    check_input(input);
    return guarded("forward", [&] {
      const ThreadScope threads(threads_);
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
      const ThreadScope threads(threads_);
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
      const ThreadScope threads(threads_);
      at::AutoGradMode grad_mode(true);
      const at::Tensor x = to_aten(input, options_).requires_grad_(true);
      const at::Tensor output = network_->forward(x);
      remember(input, output);
      LossAndGrad result;
      at::Tensor dout;
      if (output.device().is_cpu() && (output.scalar_type() == at::kFloat || output.scalar_type() == at::kDouble)) {
        dout = cpu_metric_and_output_grad(output, target, metric, result.loss);
      } else {
        const at::Tensor loss = metric_and_output_grad(output, target, metric, dout);
        dout = dout.to(output.scalar_type());
        const at::Tensor loss_host = loss.to(at::kCPU).contiguous();
        result.loss.assign(loss_host.data_ptr<double>(), loss_host.data_ptr<double>() + loss_host.numel());
      }
      const at::Tensor grad = torch::autograd::grad({output}, {x}, {dout})[0];
      result.grad = to_lminv(grad, input.dtype());
      return result;
    });
  }

  // "prefix_cache": a TorchPrefixCache, made on the first request, when the network has one (decoder); else nullptr.
  void* capability(std::string_view name) override {
    if (name == kMatmulProbe) {
      if (!matmul_probe_) matmul_probe_ = std::make_unique<TorchMatmulProbe>(options_, threads_);
      return static_cast<MatmulProbe*>(matmul_probe_.get());
    }
    if (name == kTrainer) {
      // A decoder with every block and the LM head, on embeddings, its weights in the model's dtype.
      if (spec_.kind != ModelKind::decoder || spec_.head != Head::lm_head || spec_.blocks != spec_.n_layer ||
          spec_.input != InputSpace::embedding || spec_.weight_dtype != WeightDType::same || !spec_.layers.empty())
        return nullptr;
      if (!trainer_) trainer_ = std::make_unique<TorchTrainer>(spec_, source_, options_, threads_);
      return static_cast<Trainer*>(trainer_.get());
    }
    if (name != kPrefixCache || !network_->has_prefix_cache()) return nullptr;
    if (!prefix_cache_) prefix_cache_ = std::make_unique<TorchPrefixCache>(spec_, *network_, options_, threads_);
    return static_cast<PrefixCache*>(prefix_cache_.get());
  }

 private:
  std::int64_t width() const { return spec_.input == InputSpace::embedding ? spec_.n_embd : spec_.vocab_size; }

  // [B, T, d or V] with T = seq_len, or any T in 1 .. n_positions for the kinds that take any length.
  void check_input(const Tensor& input) const {
    const bool any = spec_.any_length();
    const bool length_ok =
        input.rank() == 3 && (any ? input.dim(1) >= 1 && input.dim(1) <= spec_.n_positions : input.dim(1) == spec_.seq_len);
    if (!length_ok || input.dim(2) != width())
      throw Error(std::string(kWho) + ": input has shape " + shape_string(input.shape()) + ", expected [B, " +
                  (any ? "T" : std::to_string(spec_.seq_len)) + ", " + std::to_string(width()) + "]" +
                  (any ? " with T in 1 .. n_positions = " + std::to_string(spec_.n_positions) : std::string()) +
                  " (" + kind_name(spec_.kind) + " model, family '" + spec_.family + "', input = " +
                  input_space_name(spec_.input) + ")");
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

  // On the CPU in f32 or f64: the losses of metric_and_output_grad (below) in `loss` and their output gradient in the
  // output's dtype, returned, in one pass over each item to sum and one to write the gradient, with the items split
  // among the threads. The arithmetic is metric_item's (lminv/model.hpp): each output element converted to f64, sums
  // in f64 in element order, the gradient rounded to the output's dtype at the end. ATen's element-wise version
  // (below, for the other devices and dtypes) makes six f64 temporaries of the output's size on one thread, which
  // at batch 32 with the lm_head (8 M outputs) cost about a tenth of the step.
  at::Tensor cpu_metric_and_output_grad(const at::Tensor& output, const Tensor& target, Metric metric,
                                        std::vector<double>& loss) {
    const std::int64_t B = output.size(0);
    check_target_shape(output, target);
    const at::Tensor t = device_target(target).contiguous();
    const at::Tensor o = output.detach().contiguous();
    const std::int64_t n = o.numel() / B;
    const bool broadcast = target.dim(0) == 1;
    at::Tensor dout = at::empty_like(o);
    loss.assign(static_cast<std::size_t>(B), 0.0);
    AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "metric", [&] {
      metric_rows(o.data_ptr<scalar_t>(), t.data_ptr<double>(), B, n, broadcast, metric, loss.data(),
                  dout.data_ptr<scalar_t>());
    });
    return dout;
  }

  template <class T>
  static void metric_rows(const T* o, const double* t, std::int64_t B, std::int64_t n, bool broadcast, Metric metric,
                          double* loss, T* g) {
    const int team = static_cast<int>(std::min<std::int64_t>(B, std::max(1, kernel_threads())));
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (std::int64_t b = 0; b < B; ++b) loss[b] = metric_row(o + b * n, t + (broadcast ? 0 : b * n), n, metric, g + b * n);
  }

  template <class T>
  static double metric_row(const T* o, const double* t, std::int64_t n, Metric metric, T* g) {
    double loss = 0;
    switch (metric) {
      case Metric::l1:
        for (std::int64_t i = 0; i < n; ++i) {
          const double d = static_cast<double>(o[i]) - t[i];
          loss += std::abs(d);
          g[i] = static_cast<T>(d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0));
        }
        break;
      case Metric::l2: {
        for (std::int64_t i = 0; i < n; ++i) {
          const double d = static_cast<double>(o[i]) - t[i];
          loss += d * d;
        }
        loss = std::sqrt(loss);
        for (std::int64_t i = 0; i < n; ++i)
          g[i] = static_cast<T>(loss > 0 ? (static_cast<double>(o[i]) - t[i]) / loss : 0.0);
        break;
      }
      case Metric::cosine: {
        double dot = 0, oo = 0, tt = 0;
        for (std::int64_t i = 0; i < n; ++i) {
          const double oi = static_cast<double>(o[i]);
          dot += oi * t[i];
          oo += oi * oi;
          tt += t[i] * t[i];
        }
        const double no = std::sqrt(oo), nt = std::sqrt(tt);
        if (no == 0 || nt == 0) {
          for (std::int64_t i = 0; i < n; ++i) g[i] = T(0);
          return 1.0;
        }
        const double cos = dot / (no * nt);
        for (std::int64_t i = 0; i < n; ++i)
          g[i] = static_cast<T>(-(t[i] / (no * nt) - cos * static_cast<double>(o[i]) / oo));
        loss = 1 - cos;
        break;
      }
    }
    return loss;
  }

  void check_target_shape(const at::Tensor& output, const Tensor& target) const {
    const std::int64_t B = output.size(0);
    const bool trailing_equal = target.rank() == output.dim() && target.rank() > 0 &&
                                std::equal(target.shape().begin() + 1, target.shape().end(), output.sizes().begin() + 1);
    if (!trailing_equal || (target.dim(0) != 1 && target.dim(0) != B))
      throw Error(std::string(kWho) + ": loss: target " + shape_string(target.shape()) + " does not match output " +
                  shape_string(Shape(output.sizes().begin(), output.sizes().end())));
  }

  // Per-item losses [B] (f64) of output [B, ...] against target [1 or B, ...], and in `dout` their gradient with
  // respect to the output (f64), exactly as lminv::detail::metric_item defines them:
  //   l1      sum |o - t|                gradient sign(o - t), 0 where o = t
  //   l2      ||o - t||_2                gradient (o - t) / ||o - t||, 0 when o = t
  //   cosine  1 - <o, t> / (|o| |t|)     gradient -(t / (|o| |t|) - cos o / |o|^2); loss 1, gradient 0 when |o| |t| = 0
  at::Tensor metric_and_output_grad(const at::Tensor& output, const Tensor& target, Metric metric, at::Tensor& dout) {
    const std::int64_t B = output.size(0);
    check_target_shape(output, target);
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
  ThreadSettings threads_;
  std::shared_ptr<const WeightSet> source_;  // what a trainer copies its parameters from
  // After network_, which it uses: destroyed before it.
  std::unique_ptr<PrefixCache> prefix_cache_;
  std::unique_ptr<MatmulProbe> matmul_probe_;
  std::unique_ptr<Trainer> trainer_;
  Tensor last_input_;        // the input of the last pass run with autograd ...
  at::Tensor last_output_;   // ... and its output (detached), for a forward on the same input
  Tensor target_host_;       // the last target ...
  at::Tensor target_device_;  // ... on the device, f64
};

}  // namespace

// ---- the backend --------------------------------------------------------------------------------------------------

const std::vector<ModelKind>& supported_kinds() {
  static const std::vector<ModelKind> kinds{ModelKind::decoder, ModelKind::fcnet, ModelKind::fcnet_noninvertible,
                                            ModelKind::transformer_mlp};
  return kinds;
}

const std::vector<std::string>& supported_features() {
  namespace f = feature;
  static const std::vector<std::string> features{
      f::layer_norm,   f::layer_norm_no_bias, f::rms_norm,          f::learned_positions, f::rotary,
      f::partial_rotary, f::grouped_kv,       f::head_dim,          f::gelu_tanh,         f::gelu_erf,
      f::swiglu,       f::parallel_residual,  f::untied_head,       f::extra_layers,      f::vocab_input,
      f::prefix_cache, f::int8_weights,       f::dropout};
  return features;
}

bool cuda_available() {
  return guarded("checking for CUDA", [] { return torch::cuda::is_available(); });
}

TorchBackend::TorchBackend() : weights_(std::make_shared<WeightCache>()) {}
TorchBackend::~TorchBackend() = default;

BackendInfo TorchBackend::info() const {
  BackendInfo info{supported_kinds(), supported_features(), {DType::f32, DType::f64, DType::bf16}, {"cpu"}};
  if (cuda_available()) info.devices.push_back("cuda");
  return info;
}

void TorchBackend::configure(const Options& options) {
  const std::int64_t threads = options.get_int("threads", 0);
  if (threads < 0) options.fail("threads", "expected 0 (all cores) or a positive number of threads");
  if (threads > 4096) options.fail("threads", "expected at most 4096 threads");
  const std::int64_t aten_threads = options.get_int("aten_threads", 0);
  if (aten_threads < 0) options.fail("aten_threads", "expected 0 (automatic) or a positive number of threads");
  if (aten_threads > 4096) options.fail("aten_threads", "expected at most 4096 threads");
  threads_ = {static_cast<int>(threads), static_cast<int>(aten_threads)};
}

std::unique_ptr<Model> TorchBackend::create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet> weights) {
  if (!weights) throw Error(std::string(kWho) + ": no weights given");
  const auto& kinds = supported_kinds();
  if (std::find(kinds.begin(), kinds.end(), spec.kind) == kinds.end())
    throw Error(std::string(kWho) + ": model kind #" + std::to_string(static_cast<int>(spec.kind)) +
                " is not supported (supported: decoder, fcnet, fcnet_noninvertible, transformer_mlp)");
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
  check_spec(spec, kWho);
  check_features(spec, supported_features(), kWho);
  check_weights(used_weights(spec), *weights, kWho);
  return guarded("create_model", [&]() -> std::unique_ptr<Model> {
    const ThreadScope threads(threads_);
    const at::TensorOptions options =
        at::TensorOptions().dtype(scalar_type(spec.dtype)).device(spec.device == "cuda" ? at::kCUDA : at::kCPU);
    std::shared_ptr<SharedWeights> shared = weights_->acquire(weights, options);
    std::unique_ptr<Network> network = spec.kind == ModelKind::decoder
                                           ? make_decoder_network(spec, weights, std::move(shared))
                                           : make_mlp_network(spec, weights, std::move(shared));
    ThreadSettings model_threads = threads_;
#ifdef LMINV_TORCH_DNNL_SGEMM
    // f32 on the CPU: the products go to oneDNN's sgemm (or the streaming kernels), on the OpenMP pool ATen uses.
    model_threads.blas_products = !(spec.device == "cpu" && spec.dtype == DType::f32);
#endif
    return std::make_unique<TorchModel>(spec, std::move(network), options, model_threads, weights);
  });
}

WeightCacheStats TorchBackend::weight_cache_stats() const { return weights_->stats(); }

// ---- diagnostics --------------------------------------------------------------------------------------------------

TorchRuntime torch_runtime() {
  return guarded("torch_runtime", [] {
    TorchRuntime r;
    r.version = TORCH_VERSION;
    r.build_config = at::show_config();
    r.parallel_info = at::get_parallel_info();
    r.cuda = torch::cuda::is_available();
    r.openblas_parallel = openblas_parallel();
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
