// The torch backend's networks, as the reference backend computes them (plugins/backend-reference: decoder_model.cpp,
// decoder_layers.hpp, mlp_model.cpp), written as ATen graphs for autograd.
//
// The decoder (ModelKind::decoder; every transformer family is a setting of spec.arch, architecture.hpp), first k
// blocks, on the residual stream kept as rows [B T, d] so that every projection is one matrix product:
//   h_0   = x (+ wpe[0:T], learned positions),  x = input (input = embedding) or input @ wte (input = vocab)
//   sequential:  a = h + attn(n_1(h));  h' = a + mlp(n_2(a))       parallel:  h' = (h + attn(n_1(h))) + mlp(n_2(h))
//   attn(x) = c_proj(softmax(q k^T / sqrt(hd) + causal mask) v), [q | k | v] = x c_attn (+ b), q and k rotated
//             (rotary); query head j reads kv head j / (nh / nkv)
//   mlp(x)  = c_proj(act(x c_fc + b)), act gelu_tanh | gelu_erf, or silu(gate) * up on c_fc's [gate | up] (swiglu)
//   output  = [ main(h_k) | h_layers[0] | ... ] along the last dimension, [B, T, D_main + d len(layers)], main = h_k
//             (head none), ln_f(h_k) (ln_f), ln_f(h_k) W^T (lm_head; W = wte tied, lm_head.weight untied) or h_k W^T
//             (lm_head_no_ln_f)
// with L = max(k, max(layers)) blocks run, norms layer_norm (with or without bias) or rms_norm, biases where the
// architecture has them. T is the input's: any length 1 .. n_positions.
//
// Grouped-query attention without copying the kv heads: the g = nh / nkv query heads that share a kv head are
// stacked as g T rows of one matrix, which meets that head's keys and values in one product.
//
// The decoder is causal, so it also runs a few positions at a time against the keys (rotated at their absolute
// positions) and values of the positions before them (the prefix cache: append_prefix, next_after_prefix): each
// position's row of the attention scores is the same as in forward(), split into the part against the kept prefix
// and the part among the new positions.
//
// MLP kinds (nn.Linear weights [out, in], GELU in its exact erf form):
//   fcnet                [B, T d] -> Linear(T d, 4 T d) -> GELU -> Linear(4 T d, 4 T d)      output [B, 4 T d]
//   fcnet_noninvertible  the same with a last layer of T d outputs                          output [B, T d]
//   transformer_mlp      per token: Linear(d, inner) -> GELU -> Linear(inner, d)           output [B, T, d]
// after x = input or input @ wte (input = vocab). spec.blocks and spec.head are not used.
#include "torch_networks.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/bernoulli.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "int8_weights.hpp"
#include "skinny_matmul.hpp"

#ifdef LMINV_TORCH_DNNL_SGEMM
#include <omp.h>

#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <unordered_map>
#endif

namespace lminv::torch_backend {

namespace {
thread_local int current_kernel_threads = 0;
}  // namespace
int kernel_threads() { return current_kernel_threads; }
void set_kernel_threads(int threads) { current_kernel_threads = threads; }

c10::ScalarType scalar_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return at::kFloat;
    case DType::f64: return at::kDouble;
    case DType::bf16: return at::kBFloat16;  // the same 16 bits as lminv::bf16
  }
  throw Error(std::string(kWho) + ": unknown dtype");
}

at::Tensor to_aten(const Tensor& t, const at::TensorOptions& options) {
  if (t.nbytes() != static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype()))
    throw Error(std::string(kWho) + ": an empty tensor where values were expected");
  const at::Tensor view = at::from_blob(const_cast<void*>(t.raw()), t.shape(),
                                        at::TensorOptions().dtype(scalar_type(t.dtype())));
  return view.to(options, /*non_blocking=*/false, /*copy=*/true);
}

Tensor to_lminv(const at::Tensor& t, DType dtype) {
  const at::Tensor host = t.detach().to(at::kCPU, scalar_type(dtype)).contiguous();
  Tensor out(dtype, Shape(host.sizes().begin(), host.sizes().end()));
  if (out.nbytes()) std::memcpy(out.raw(), host.data_ptr(), out.nbytes());
  return out;
}

// ---- the shared weights -------------------------------------------------------------------------------------------

at::Tensor SharedWeights::get(const std::shared_ptr<const WeightSet>& source, const std::string& name) {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (auto it = tensors_.find(name); it != tensors_.end()) return it->second;
  const Tensor& t = source->get(name);
  at::Tensor converted;
  if (options_.device().is_cpu() && scalar_type(t.dtype()) == options_.dtype().toScalarType()) {
    // Already what the model computes in: a view of the WeightSet's bytes, whose storage keeps the WeightSet alive.
    std::shared_ptr<const WeightSet> keep = source;
    converted = at::from_blob(const_cast<void*>(t.raw()), t.shape(), [keep](void*) {},
                              at::TensorOptions().dtype(scalar_type(t.dtype())));
  } else {
    converted = to_aten(t, options_);
    copied_bytes_ += converted.nbytes();
  }
  tensors_.emplace(name, converted);
  return converted;
}

void SharedWeights::put(const std::string& name, at::Tensor tensor) {
  const std::lock_guard<std::mutex> lock(mutex_);
  tensors_[name] = std::move(tensor);
}

at::Tensor SharedWeights::derived(const std::string& key, const std::function<at::Tensor()>& make) {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (auto it = tensors_.find(key); it != tensors_.end()) return it->second;
  at::Tensor t = make();
  copied_bytes_ += t.nbytes();
  tensors_.emplace(key, t);
  return t;
}

WeightCacheStats SharedWeights::stats() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  WeightCacheStats s;
  s.sets = 1;
  s.tensors = tensors_.size();
  for (const auto& entry : tensors_) s.bytes += entry.second.nbytes();
  s.copied_bytes = copied_bytes_;
  return s;
}

std::shared_ptr<SharedWeights> WeightCache::acquire(const std::shared_ptr<const WeightSet>& weights,
                                                    const at::TensorOptions& options) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::ScalarType dtype = options.dtype().toScalarType();
  const at::Device device = options.device();
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.shared.expired(); }),
                 entries_.end());
  for (const Entry& e : entries_) {
    // Same control block (owner order neither way) and same object: the same WeightSet.
    const bool same_set = !e.source.owner_before(weights) && !weights.owner_before(e.source) &&
                          e.address == weights.get();
    if (same_set && e.dtype == dtype && e.device == device)
      if (std::shared_ptr<SharedWeights> shared = e.shared.lock()) return shared;
  }
  auto shared = std::make_shared<SharedWeights>(options);
  entries_.push_back({weights, weights.get(), dtype, device, shared});
  return shared;
}

WeightCacheStats WeightCache::stats() const {
  std::vector<std::shared_ptr<SharedWeights>> live;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_)
      if (auto s = e.shared.lock()) live.push_back(std::move(s));
  }
  WeightCacheStats total;
  for (const auto& s : live) {
    const WeightCacheStats one = s->stats();
    total.sets += one.sets;
    total.tensors += one.tensors;
    total.bytes += one.bytes;
    total.copied_bytes += one.copied_bytes;
  }
  return total;
}

// Networks without a prefix cache: TorchModel offers none (has_prefix_cache() is false), so these are not reached.
void Network::append_prefix(const at::Tensor& /*rows*/, KeyValueCache& /*cache*/) const {
  throw Error(std::string(kWho) + ": this model has no prefix cache");
}
at::Tensor Network::next_after_prefix(const at::Tensor& /*candidates*/, const KeyValueCache& /*cache*/,
                                     CandidateKeyValues* /*kept*/) const {
  throw Error(std::string(kWho) + ": this model has no prefix cache");
}

namespace {

// A product with few rows (kernels::kSkinnyRows) through the streaming kernels of plugins/common/skinny_matmul.hpp,
// as an autograd node: OpenBLAS 0.3.21 packs the whole weight for a GEMM even when it has five rows, which made a
// batch-1 step of GPT-2 small read its weights at a third of the machine's bandwidth (bench/RESULTS.md). The weight
// layout decides which kernel runs the product and which its transpose (the input gradient); weights and biases
// never need gradients here (inversion differentiates with respect to the input only).
enum class Layout { in_out, out_in };

struct SkinnyAffine : public torch::autograd::Function<SkinnyAffine> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, std::int64_t layout) {
    ctx->save_for_backward({weight});
    ctx->saved_data["layout"] = layout;
    const at::Tensor xc = x.contiguous();
    const std::int64_t M = xc.size(0);
    const bool in_out = static_cast<Layout>(layout) == Layout::in_out;
    const std::int64_t N = in_out ? weight.size(1) : weight.size(0), K = xc.size(1);
    at::Tensor y = at::empty({M, N}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "skinny_affine", [&] {
      const scalar_t* b = bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr;  // empty: no bias
      if (in_out)
        kernels::times(y.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, M, K, N,
                       kernel_threads());
      else
        kernels::times_transposed(y.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, M,
                                  N, K, kernel_threads());
    });
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor weight = ctx->get_saved_variables()[0];
    const bool in_out = static_cast<Layout>(ctx->saved_data["layout"].toInt()) == Layout::in_out;
    const at::Tensor dy = grads[0].contiguous();
    const std::int64_t M = dy.size(0);
    const std::int64_t K = in_out ? weight.size(0) : weight.size(1), N = dy.size(1);  // dx [M, K]
    at::Tensor dx = at::empty({M, K}, dy.options());
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "skinny_affine_backward", [&] {
      if (in_out)  // dx = dy W^T, W [K, N]
        kernels::times_transposed(dx.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                  static_cast<const scalar_t*>(nullptr), M, K, N, kernel_threads());
      else  // dx = dy W, W [N, K]
        kernels::times(dx.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       static_cast<const scalar_t*>(nullptr), M, N, K, kernel_threads());
    });
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

#ifdef LMINV_TORCH_DNNL_SGEMM
// oneDNN's matmul primitive for C [M, N] = A [M, K] B^T (+ bias) with B stored [N, K], made once per shape and kept
// (a handful: a model's products have few shapes). For that layout the primitive ran at 350-380 GFLOP/s where
// dnnl_sgemm('T') packed B at 180-350 (2 cores, AVX-512; [160, 3072] x [3072, 768]^T: 206 against 380).
class TransposedProducts {
 public:
  void run(float* c, const float* a, const float* b, const float* bias, std::int64_t M, std::int64_t N,
           std::int64_t K) {
    using dnnl::memory;
    const std::shared_ptr<const Entry> found = entry(M, N, K, bias != nullptr);
    const Entry& e = *found;
    memory am(e.a, engine_, const_cast<float*>(a)), bm(e.b, engine_, const_cast<float*>(b)), cm(e.c, engine_, c);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
    if (bias) args.emplace(DNNL_ARG_BIAS, memory(e.bias, engine_, const_cast<float*>(bias)));
    dnnl::stream stream(engine_);
    e.product.execute(stream, args);
    stream.wait();
  }

 private:
  struct Entry {
    dnnl::memory::desc a, b, bias, c;
    dnnl::matmul product;
  };

  // Shared, so that a caller keeps its entry while another thread starts the cache over.
  std::shared_ptr<const Entry> entry(std::int64_t M, std::int64_t N, std::int64_t K, bool with_bias) {
    using dnnl::memory;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto key = std::make_tuple(M, N, K, with_bias);
    if (auto found = entries_.find(key); found != entries_.end()) return found->second;
    if (entries_.size() >= kKept) entries_.clear();  // shapes beyond a model's few: start over rather than grow
    auto made = std::make_shared<Entry>();
    Entry& e = *made;
    e.a = memory::desc({M, K}, memory::data_type::f32, memory::format_tag::ab);
    e.b = memory::desc({K, N}, memory::data_type::f32, memory::format_tag::ba);  // B^T [K, N] is B [N, K] stored
    e.c = memory::desc({M, N}, memory::data_type::f32, memory::format_tag::ab);
    if (with_bias) e.bias = memory::desc({1, N}, memory::data_type::f32, memory::format_tag::ab);
    const dnnl::matmul::desc d = with_bias ? dnnl::matmul::desc(e.a, e.b, e.bias, e.c) : dnnl::matmul::desc(e.a, e.b, e.c);
    e.product = dnnl::matmul(dnnl::matmul::primitive_desc(d, engine_));
    entries_.emplace(key, made);
    return made;
  }

  static constexpr std::size_t kKept = 64;
  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  std::mutex mutex_;
  std::map<std::tuple<std::int64_t, std::int64_t, std::int64_t, bool>, std::shared_ptr<const Entry>> entries_;
};

// C [M, N] = A op(B) (+ bias [N] on every row) in f32 by oneDNN, row-major: A [M, K], B stored [K, N] (trans_b 'N':
// dnnl_sgemm) or [N, K] ('T': TransposedProducts). oneDNN picks its kernels from the CPU it runs on, where the
// OpenBLAS that LibTorch calls is held to the core type the environment names (OPENBLAS_CORETYPE=Haswell on AVX-512
// EPYCs: half their rate, bench/RESULTS.md). It runs on the OpenMP team of kernel_threads(), the caller's setting
// restored after.
void dnnl_product(float* c, const float* a, const float* b, char trans_b, const float* bias, std::int64_t M,
                  std::int64_t N, std::int64_t K) {
  static TransposedProducts transposed;
  const int before = omp_get_max_threads();
  const int threads = kernel_threads() > 0 ? kernel_threads() : before;
  if (threads != before) omp_set_num_threads(threads);
  struct Restore {
    int threads, before;
    ~Restore() {
      if (threads != before) omp_set_num_threads(before);
    }
  } restore{threads, before};
  if (trans_b == 'T') {
    try {
      transposed.run(c, a, b, bias, M, N, K);
    } catch (const dnnl::error& e) {
      throw Error(std::string(kWho) + ": oneDNN matmul failed (" + e.what() + ") for [" + std::to_string(M) + ", " +
                  std::to_string(K) + "] x [" + std::to_string(N) + ", " + std::to_string(K) + "]^T");
    }
    return;
  }
  float beta = 0.0f;
  if (bias) {
    for (std::int64_t m = 0; m < M; ++m) std::memcpy(c + m * N, bias, static_cast<std::size_t>(N) * sizeof(float));
    beta = 1.0f;
  }
  const dnnl_status_t status = dnnl_sgemm('N', 'N', M, N, K, 1.0f, a, K, b, N, beta, c, N);
  if (status != dnnl_success)
    throw Error(std::string(kWho) + ": oneDNN sgemm failed (status " + std::to_string(static_cast<int>(status)) +
                ") for [" + std::to_string(M) + ", " + std::to_string(K) + "] x [" + std::to_string(K) + ", " +
                std::to_string(N) + "]");
}

// The products with more rows than kSkinnyRows on the CPU in f32, by dnnl_product, as an autograd node like
// SkinnyAffine: y = x W (+ b) for W [in, out], x W^T (+ b) for W [out, in]; the input gradient dy W^T or dy W.
struct DnnlAffine : public torch::autograd::Function<DnnlAffine> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, std::int64_t layout) {
    ctx->save_for_backward({weight});
    ctx->saved_data["layout"] = layout;
    const at::Tensor xc = x.contiguous();
    const bool in_out = static_cast<Layout>(layout) == Layout::in_out;
    const std::int64_t M = xc.size(0), K = xc.size(1), N = in_out ? weight.size(1) : weight.size(0);
    at::Tensor y = at::empty({M, N}, xc.options());
    dnnl_product(y.data_ptr<float>(), xc.data_ptr<float>(), weight.data_ptr<float>(), in_out ? 'N' : 'T',
                 bias.numel() > 0 ? bias.data_ptr<float>() : nullptr, M, N, K);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor weight = ctx->get_saved_variables()[0];
    const bool in_out = static_cast<Layout>(ctx->saved_data["layout"].toInt()) == Layout::in_out;
    const at::Tensor dy = grads[0].contiguous();
    const std::int64_t M = dy.size(0), N = dy.size(1), K = in_out ? weight.size(0) : weight.size(1);  // dx [M, K]
    at::Tensor dx = at::empty({M, K}, dy.options());
    // in_out: dx = dy W^T with W [K, N]; out_in: dx = dy W with W [N, K].
    dnnl_product(dx.data_ptr<float>(), dy.data_ptr<float>(), weight.data_ptr<float>(), in_out ? 'T' : 'N', nullptr,
                 M, K, N);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
#endif

// The most rows of x for the streaming kernels. In f32 with oneDNN taking the rest, 8: oneDNN's sgemm and matmul
// were faster from 9 rows on (GPT-2 small + lm_head, T = 5, batch 2: 10 rows, 0.075 s per step through the kernels
// against 0.068 s at batch 4 through oneDNN, bench/RESULTS.md); otherwise kSkinnyRows, where LibTorch's BLAS takes
// the rest.
std::int64_t skinny_rows(const at::Tensor& x) {
#ifdef LMINV_TORCH_DNNL_SGEMM
  if (x.scalar_type() == at::kFloat) return std::min<std::int64_t>(8, kernels::kSkinnyRows);
#endif
  (void)x;
  return kernels::kSkinnyRows;
}

// Whether a product of x with this weight may go through the backend's own kernels (SkinnyAffine, DnnlAffine):
// on the CPU, f32 or f64, dense operands, and a weight that needs no gradient (a trainer's goes through ATen,
// since these differentiate the input only).
bool own_kernels(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return x.device().is_cpu() && !weight.requires_grad() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && weight.scalar_type() == x.scalar_type() &&
         weight.is_contiguous() && (!bias.defined() || bias.is_contiguous());
}

// x [rows, in] times a weight, plus bias (when defined): x W + b for a weight stored [in, out] (Conv1D, the
// canonical decoder layout, wte for a vocabulary-space input), x W^T + b for one stored [out, in] (nn.Linear, the
// lm_head). Up to skinny_rows(x) rows on the CPU in f32 or f64, the streaming kernels (SkinnyAffine); more rows in
// f32 on the CPU, oneDNN (DnnlAffine, where the build has it); otherwise the GEMM of LibTorch's BLAS.
at::Tensor affine(const at::Tensor& x, const at::Tensor& weight, Layout layout, const at::Tensor& bias = {}) {
  const bool own = own_kernels(x, weight, bias);
  // (An undefined tensor cannot cross Function::apply: no bias goes as an empty one.)
  if (own && x.size(0) <= skinny_rows(x))
    return SkinnyAffine::apply(x, weight, bias.defined() ? bias : at::empty({0}, x.options()),
                               static_cast<std::int64_t>(layout));
#ifdef LMINV_TORCH_DNNL_SGEMM
  if (own && x.scalar_type() == at::kFloat)
    return DnnlAffine::apply(x, weight, bias.defined() ? bias : at::empty({0}, x.options()),
                             static_cast<std::int64_t>(layout));
#endif
  const at::Tensor w = layout == Layout::in_out ? weight : weight.t();  // [in, out]
  return bias.defined() ? at::addmm(bias, x, w) : at::mm(x, w);
}

}  // namespace

at::Tensor large_product(const at::Tensor& a, const at::Tensor& b) {
#ifdef LMINV_TORCH_DNNL_SGEMM
  if (a.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor c = at::empty({a.size(0), b.size(1)}, ac.options());
    dnnl_product(c.data_ptr<float>(), ac.data_ptr<float>(), bc.data_ptr<float>(), 'N', nullptr, a.size(0), b.size(1),
                 a.size(1));
    return c;
  }
#endif
  return at::mm(a, b);
}

namespace {

// ---- int8 block weights -------------------------------------------------------------------------------------------

// A decoder block's linear weight, [in, out]: in the model's dtype (`w`), or as int8 (ModelSpec::weight_dtype,
// plugins/common/int8_weights.hpp): its integers q [in, out] (at::kChar) and one scale per output column [out] in
// the model's dtype, both on the model's device.
struct BlockWeight {
  at::Tensor w;
  at::Tensor q, scale;
};

// q s in the model's dtype: one rounding per element, as every backend dequantises.
// One thread: the product that follows runs on OpenBLAS's threads, which spin for a while after each call, and an
// OpenMP team beside them made a batch-8 gpt2-xl step slower (5.9 s against 3.8 s, bench/RESULTS.md).
template <class T>
void dequantise_into(T* dst, const std::int8_t* src, const T* s, std::int64_t in, std::int64_t out) {
  for (std::int64_t i = 0; i < in; ++i)
    for (std::int64_t o = 0; o < out; ++o) dst[i * out + o] = static_cast<T>(src[i * out + o]) * s[o];
}

// The CPU result is a view of this thread's buffer (grown to the largest weight, kept between calls: a fresh
// allocation of tens of MB per product costs more in page faults than the dequantisation), valid until the thread's
// next call; each caller uses it for one product and drops it.
at::Tensor dequantised(const at::Tensor& q, const at::Tensor& scale) {
  if (!q.device().is_cpu() || scale.scalar_type() == at::kBFloat16) return q.to(scale.scalar_type()).mul_(scale);
  thread_local at::Tensor buffers[2];  // f32, f64
  at::Tensor& buffer = buffers[scale.scalar_type() == at::kDouble ? 1 : 0];
  if (!buffer.defined() || buffer.numel() < q.numel()) buffer = at::empty({q.numel()}, scale.options());
  at::Tensor w = buffer.narrow(0, 0, q.numel()).view(q.sizes());
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "int8_dequantise", [&] {
    dequantise_into(w.data_ptr<scalar_t>(), q.data_ptr<std::int8_t>(), scale.data_ptr<scalar_t>(), q.size(0),
                    q.size(1));
  });
  return w;
}

// Whether the streaming int8 kernels take x [rows, in] (plugins/common/skinny_matmul.hpp: few rows, on the CPU, f32
// or f64): they dequantise each element in registers, reading the integers once.
// Up to kSkinnyRows (16) in every dtype, although plain f32 weights leave the streaming kernels at 8 rows: from 9
// rows the alternative here is dequantising the whole matrix before oneDNN's product, which made int8 steps at batch 2
// and 3 (10 and 15 rows) take 0.104-0.115 s against 0.061-0.083 s through these kernels (GPT-2 small + lm_head,
// bench/RESULTS.md). Between 9 and 16 rows an int8 model's products are then summed in another order than its
// dequantised twin's (oneDNN's), equal to f32 rounding, not bit for bit.
bool skinny_int8(const at::Tensor& x, const at::Tensor& scale) {
  return x.size(0) <= kernels::kSkinnyRows && x.device().is_cpu() && x.scalar_type() == scale.scalar_type() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// x W + b with W an int8 weight [in, out]. Few rows: the int8 kernels, forward and for the input gradient
// dx = dy W^T; more rows: W dequantised into a temporary for the product (and again for the gradient), so the model
// holds no dequantised block weight between products. Both give the product of the dequantised matrix.
struct Int8Affine : public torch::autograd::Function<Int8Affine> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& q,
                            const at::Tensor& scale, const at::Tensor& bias) {
    ctx->save_for_backward({q, scale});
    if (!skinny_int8(x, scale))
      return affine(x, dequantised(q, scale), Layout::in_out, bias.numel() > 0 ? bias : at::Tensor());
    const at::Tensor xc = x.contiguous();
    const std::int64_t M = xc.size(0), K = q.size(0), N = q.size(1);
    at::Tensor y = at::empty({M, N}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "int8_affine", [&] {
      const scalar_t* b = bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr;
      kernels::times_int8(y.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), q.data_ptr<std::int8_t>(),
                          scale.data_ptr<scalar_t>(), b, M, K, N, kernel_threads());
    });
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &scale = saved[1];
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx;
    if (!skinny_int8(dy, scale)) {
      dx = affine(dy, dequantised(q, scale), Layout::out_in);  // W read as [out, in]: dy W^T
    } else {
      const std::int64_t M = dy.size(0), K = q.size(0), N = q.size(1);  // dx [M, K] = dy [M, N] W^T, W [K, N]
      dx = at::empty({M, K}, dy.options());
      AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "int8_affine_backward", [&] {
        kernels::times_transposed_int8(dx.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), q.data_ptr<std::int8_t>(),
                                       scale.data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), M, K, N,
                                       kernel_threads());
      });
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x W + b for a block weight in either form.
at::Tensor affine(const at::Tensor& x, const BlockWeight& w, const at::Tensor& bias) {
  if (!w.q.defined()) return affine(x, w.w, Layout::in_out, bias);
  return Int8Affine::apply(x, w.q, w.scale, bias.defined() ? bias : at::empty({0}, x.options()));
}

// ---- the decoder --------------------------------------------------------------------------------------------------

class DecoderNetwork final : public Network {
 public:
  DecoderNetwork(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
                 std::shared_ptr<SharedWeights> weights)
      : weights_(std::move(weights)),
        arch_(spec.arch),
        d_(spec.n_embd),
        nh_(spec.n_head),
        nkv_(spec.kv_heads()),
        g_(spec.n_head / spec.kv_heads()),
        hd_(spec.head_size()),
        rotary_(spec.rotary_dim()),
        inner_(spec.inner()),
        k_(spec.blocks),
        head_(spec.head),
        vocab_input_(spec.input == InputSpace::vocab),
        layers_(spec.layers),
        scale_(std::sqrt(static_cast<double>(spec.head_size()))),
        dropout_(spec.dropout),
        options_(weights_->options()) {
    auto load = [&](const std::string& name) { return weights_->get(source, name); };
    // A block weight, quantised once per weight set, dtype and device when the model is int8 (the SharedWeights
    // are per dtype and device; the f32 or f64 tensor itself is then not copied).
    const bool int8 = spec.weight_dtype == WeightDType::int8;
    auto load_block_weight = [&](const std::string& name) {
      BlockWeight w;
      if (!int8) {
        w.w = load(name);
        return w;
      }
      std::optional<int8::Matrix> m;
      auto quantised = [&]() -> const int8::Matrix& {
        if (!m) m = int8::quantise(source->get(name), name);
        return *m;
      };
      w.q = weights_->derived(name + " int8", [&] {
        const int8::Matrix& mm = quantised();
        return at::from_blob(const_cast<std::int8_t*>(mm.q.data()), {mm.in, mm.out}, at::TensorOptions(at::kChar))
            .to(options_.device(), at::kChar, /*non_blocking=*/false, /*copy=*/true);
      });
      w.scale = weights_->derived(name + " int8 scale", [&] {
        const int8::Matrix& mm = quantised();
        return at::from_blob(const_cast<double*>(mm.scale.data()), {mm.out}, at::TensorOptions(at::kDouble))
            .to(options_, /*non_blocking=*/false, /*copy=*/true);
      });
      return w;
    };
    if (dropout_ > 0) generator_ = at::detail::createCPUGenerator(spec.dropout_seed);
    const bool lm_head = head_has_lm_head(head_);
    if (vocab_input_ || (lm_head && arch_.tied_head)) wte_ = load("wte.weight");
    if (lm_head) lm_head_ = arch_.tied_head ? wte_ : load("lm_head.weight");
    if (arch_.positions == Positions::learned) wpe_ = load("wpe.weight");
    else if (arch_.positions == Positions::rotary) rotary_tables(spec);
    const std::int64_t L = spec.blocks_run();
    const bool norm_bias = arch_.norm == Norm::layer_norm && arch_.norm_bias;
    auto load_norm = [&](const std::string& name) {
      return NormParams{load(name + ".weight"), norm_bias ? load(name + ".bias") : at::Tensor()};
    };
    for (std::int64_t l = 0; l < L; ++l) {
      const std::string h = "h." + std::to_string(l) + ".";
      Block b;
      b.ln_1 = load_norm(h + "ln_1");
      b.attn_weight = load_block_weight(h + "attn.c_attn.weight");
      if (arch_.qkv_bias) b.attn_bias = load(h + "attn.c_attn.bias");
      b.attn_proj_weight = load_block_weight(h + "attn.c_proj.weight");
      if (arch_.attn_out_bias) b.attn_proj_bias = load(h + "attn.c_proj.bias");
      b.ln_2 = load_norm(h + "ln_2");
      b.fc_weight = load_block_weight(h + "mlp.c_fc.weight");
      b.mlp_proj_weight = load_block_weight(h + "mlp.c_proj.weight");
      if (arch_.mlp_bias) {
        b.fc_bias = load(h + "mlp.c_fc.bias");
        b.mlp_proj_bias = load(h + "mlp.c_proj.bias");
      }
      blocks_.push_back(std::move(b));
    }
    if (head_has_ln_f(head_)) ln_f_ = load_norm("ln_f");
  }

  at::Tensor forward(const at::Tensor& x) const override {
    const Step step = make_step(x.size(0), x.size(1), 0);
    std::vector<at::Tensor> stream;  // h_0 .. h_L, [B T, d] each
    stream.reserve(blocks_.size() + 1);
    stream.push_back(embed(x, step));
    for (const Block& b : blocks_) stream.push_back(block(stream.back(), b, step, {}, {}));
    return output(stream, step);
  }

  // Not with dropout: a cached prefix would keep one draw of the masks.
  bool has_prefix_cache() const override { return dropout_ == 0; }

  void append_prefix(const at::Tensor& rows, KeyValueCache& cache) const override {
    const std::int64_t n = rows.size(0), t = cache.length;
    const Step step = make_step(1, n, t);
    std::vector<at::Tensor> keys(blocks_.size()), values(blocks_.size());  // the cache's next state
    at::Tensor h = embed(rows.unsqueeze(0), step);                          // [n, d]
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      at::Tensor new_keys, new_values;  // [nkv, n, hd]
      // The last block's output at the prefix is not needed: only later blocks read h at earlier positions.
      const bool rest = l + 1 < blocks_.size();
      at::Tensor next = block(h, blocks_[l], step, prefix_part(cache.keys, t, l), prefix_part(cache.values, t, l),
                              &new_keys, &new_values, rest);
      keys[l] = t > 0 ? at::cat({cache.keys[l], new_keys}, 1) : new_keys.contiguous();
      values[l] = t > 0 ? at::cat({cache.values[l], new_values}, 1) : new_values.contiguous();
      if (rest) h = std::move(next);
    }
    // Nothing below throws: the cache changes whole or not at all.
    cache.keys = std::move(keys);
    cache.values = std::move(values);
    cache.length = t + n;
  }

  at::Tensor next_after_prefix(const at::Tensor& candidates, const KeyValueCache& cache,
                               CandidateKeyValues* kept) const override {
    const std::int64_t t = cache.length;
    const Step step = make_step(candidates.size(0), 1, t);
    std::vector<at::Tensor> stream;  // h_0 .. h_L at position t, [B, d]
    stream.reserve(blocks_.size() + 1);
    stream.push_back(embed(candidates.unsqueeze(1), step));
    std::vector<at::Tensor> keys(kept ? blocks_.size() : 0), values(keys.size());
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      at::Tensor* k = kept ? &keys[l] : nullptr;
      at::Tensor* v = kept ? &values[l] : nullptr;
      stream.push_back(block(stream.back(), blocks_[l], step, prefix_part(cache.keys, t, l),
                             prefix_part(cache.values, t, l), nullptr, nullptr, true, k, v));
    }
    at::Tensor out = output(stream, step).select(1, 0);  // [B, D]
    if (kept) {
      kept->position = t;
      kept->keys = std::move(keys);
      kept->values = std::move(values);
    }
    return out;
  }

 private:
  struct NormParams {
    at::Tensor weight, bias;  // [d]; bias undefined for rms_norm and layer_norm without bias
  };
  struct Block {
    NormParams ln_1, ln_2;
    BlockWeight attn_weight;                      // [d, (nh + 2 nkv) hd]
    at::Tensor attn_bias;                         // [(nh + 2 nkv) hd] or undefined
    BlockWeight attn_proj_weight;                 // [nh hd, d]
    at::Tensor attn_proj_bias;                    // [d] or undefined
    BlockWeight fc_weight;                        // [d, FC]; FC = inner, 2 inner for swiglu
    at::Tensor fc_bias;                           // [FC] or undefined
    BlockWeight mlp_proj_weight;                  // [inner, d]
    at::Tensor mlp_proj_bias;                     // [d] or undefined
  };

  // One call's positions: B sequences of n new positions starting at position `start`; the causal mask among the
  // new positions for the g n query rows of a kv head (true above the diagonal; undefined when n is 1).
  struct Step {
    std::int64_t B, n, start;
    at::Tensor mask;  // [g n, n] bool
  };

  Step make_step(std::int64_t B, std::int64_t n, std::int64_t start) const {
    Step s{B, n, start, {}};
    if (n > 1) {
      s.mask = at::ones({n, n}, options_.dtype(at::kBool)).triu(1);
      if (g_ > 1) s.mask = s.mask.repeat({g_, 1});
    }
    return s;
  }

  // cos and sin of the rotary angles, [n_positions, r / 2] each (the two halves of a head's rotated features use
  // the same angle), in the model's dtype on its device, shared by the models on these weights. As the reference
  // makes them: inv_freq[i] = theta^(-2i / r) in double, rounded once; the angles t inv_freq[i] and their cos and
  // sin in the model's dtype, or in f32 for bf16 (bf16 cannot hold positions above 256; Hugging Face also computes
  // them in f32), then rounded.
  void rotary_tables(const ModelSpec& spec) {
    const std::int64_t P = spec.n_positions, half = rotary_ / 2;
    const bool f64 = options_.dtype().toScalarType() == at::kDouble;
    char key[160];
    std::snprintf(key, sizeof key, "rotary %s theta=%a r=%lld P=%lld", f64 ? "f64" : "f32", arch_.rope_theta,
                  static_cast<long long>(rotary_), static_cast<long long>(P));
    auto table = [&](bool sine) {
      return weights_->derived(std::string(key) + (sine ? " sin" : " cos"), [&] {
        return f64 ? angles<double>(spec, P, half, sine) : angles<float>(spec, P, half, sine);
      });
    };
    cos_ = table(false);
    sin_ = table(true);
  }

  template <class Real>
  at::Tensor angles(const ModelSpec& spec, std::int64_t P, std::int64_t half, bool sine) const {
    std::vector<Real> inv_freq(static_cast<std::size_t>(half));
    for (std::int64_t i = 0; i < half; ++i)
      inv_freq[i] = static_cast<Real>(
          std::pow(spec.arch.rope_theta, -static_cast<double>(2 * i) / static_cast<double>(rotary_)));
    std::vector<Real> values(static_cast<std::size_t>(P * half));
    for (std::int64_t t = 0; t < P; ++t)
      for (std::int64_t i = 0; i < half; ++i) {
        const Real angle = static_cast<Real>(t) * inv_freq[i];
        values[t * half + i] = sine ? std::sin(angle) : std::cos(angle);
      }
    return to_aten(Tensor::from<Real>({P, half}, values), options_);
  }

  at::Tensor norm(const at::Tensor& x, const NormParams& p) const {
    if (arch_.norm == Norm::layer_norm)
      return at::layer_norm(x, {d_}, p.weight, p.bias, arch_.norm_eps, /*cudnn_enable=*/true);
    // rms_norm as Hugging Face's Llama computes it in the model's dtype: x rsqrt(mean(x^2) + eps) w.
    return x.mul(x.mul(x).mean(-1, /*keepdim=*/true).add(arch_.norm_eps).rsqrt()).mul(p.weight);
  }

  // h_0 for x [B, n, d or V] at positions step.start ..: [B n, d].
  at::Tensor embed(const at::Tensor& x, const Step& step) const {
    const at::Tensor rows = x.reshape({step.B * step.n, x.size(2)});
    const at::Tensor e = vocab_input_ ? affine(rows, wte_, Layout::in_out) : rows;
    if (!wpe_.defined()) return drop(e);
    return drop(e.view({step.B, step.n, d_}).add(wpe_.narrow(0, step.start, step.n)).view({step.B * step.n, d_}));
  }

  // The output from the residual stream h_0 .. h_L ([B n, d] each): [ main(h_k) | h_layers[0] | ... ], [B, n, D].
  at::Tensor output(const std::vector<at::Tensor>& stream, const Step& step) const {
    const at::Tensor& h_k = stream[static_cast<std::size_t>(k_)];
    at::Tensor main = h_k;
    if (head_has_ln_f(head_)) main = norm(h_k, ln_f_);
    if (head_has_lm_head(head_)) main = affine(main, lm_head_, Layout::out_in);  // (ln_f(h_k) or h_k) W^T, W [V, d]
    if (!layers_.empty()) {
      std::vector<at::Tensor> parts{main};
      for (std::int64_t l : layers_) parts.push_back(stream[static_cast<std::size_t>(l)]);
      main = at::cat(parts, -1);
    }
    return main.reshape({step.B, step.n, main.size(1)});
  }

  // Rotates the first r features of every head of qk [B, n, H, hd] at positions step.start .. (rotate_half layout:
  // feature i pairs with i + r/2): out_i = x_i cos - x_{i+r/2} sin, out_{i+r/2} = x_{i+r/2} cos + x_i sin.
  at::Tensor rotate(const at::Tensor& qk, const Step& step) const {
    const std::int64_t half = rotary_ / 2;
    const at::Tensor c = cos_.narrow(0, step.start, step.n).view({1, step.n, 1, half});
    const at::Tensor s = sin_.narrow(0, step.start, step.n).view({1, step.n, 1, half});
    const at::Tensor x1 = qk.narrow(-1, 0, half), x2 = qk.narrow(-1, half, half);
    std::vector<at::Tensor> parts{x1.mul(c).sub(x2.mul(s)), x2.mul(c).add(x1.mul(s))};
    if (rotary_ < hd_) parts.push_back(qk.narrow(-1, rotary_, hd_ - rotary_));
    return at::cat(parts, -1);
  }

  // Attention of the step's new positions: q [B, n, nh, hd], k and v [B, n, nkv, hd] (rotated), against the
  // prefix's keys and values shared by the B sequences (prefix_keys, prefix_values [nkv, t, hd]; undefined when t is
  // 0) and, causally, among themselves -> [B n, nh hd] (heads merged). Per kv head, its g query heads' rows are one
  // matrix [g n, hd]; against the prefix, all B sequences' rows are one matrix [B g n, hd].
  static constexpr std::int64_t kFewPositions = 8;

  at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_keys,
                       const at::Tensor& prefix_values, const Step& step) const {
    const std::int64_t B = step.B, n = step.n, t = prefix_keys.defined() ? prefix_keys.size(1) : 0;
    const std::int64_t rows = g_ * n;
    const at::Tensor queries = q.reshape({B, n, nkv_, g_, hd_}).permute({0, 2, 3, 1, 4}).reshape({B, nkv_, rows, hd_});
    const at::Tensor keys = k.permute({0, 2, 1, 3}), vals = v.permute({0, 2, 1, 3});  // [B, nkv, n, hd]
    // Among n <= kFewPositions positions the two products within the sequences are element-wise products and sums:
    // as matmuls they are B nkv products of a few rows each, which ATen runs one BLAS call at a time (at batch 32,
    // T = 5 and 12 blocks, tens of thousands of calls per step).
    const bool few = n <= kFewPositions;
    at::Tensor scores = (few ? queries.unsqueeze(-2).mul(keys.unsqueeze(-3)).sum(-1)
                             : at::matmul(queries, keys.transpose(-2, -1)))
                            .div(scale_);  // [B, nkv, g n, n]
    if (step.mask.defined()) scores = scores.masked_fill(step.mask, -std::numeric_limits<double>::infinity());
    if (t > 0) {
      const at::Tensor all_rows = queries.permute({1, 0, 2, 3}).reshape({nkv_, B * rows, hd_});
      const at::Tensor prefix_scores = at::bmm(all_rows, prefix_keys.transpose(1, 2))  // [nkv, B g n, t]
                                           .div(scale_)
                                           .view({nkv_, B, rows, t})
                                           .permute({1, 0, 2, 3});  // [B, nkv, g n, t]
      scores = at::cat({prefix_scores, scores}, -1);                // [B, nkv, g n, t + n]
    }
    const at::Tensor att = drop(at::softmax(scores, -1));  // subtracts each row's maximum first: stable
    const at::Tensor own = t > 0 ? att.narrow(-1, t, n) : att;  // [B, nkv, g n, n]
    at::Tensor out = few ? own.unsqueeze(-1).mul(vals.unsqueeze(-3)).sum(-2) : at::matmul(own, vals);  // [B, nkv, g n, hd]
    if (t > 0) {
      const at::Tensor weights = att.narrow(-1, 0, t).permute({1, 0, 2, 3}).reshape({nkv_, B * rows, t});
      out = out.add(at::bmm(weights, prefix_values).view({nkv_, B, rows, hd_}).permute({1, 0, 2, 3}));
    }
    // Query head j = c g + i of row (c, i, position): back to [B n, nh hd].
    return out.reshape({B, nkv_, g_, n, hd_}).permute({0, 3, 1, 2, 4}).reshape({B * n, nh_ * hd_});
  }

  at::Tensor mlp(const at::Tensor& x, const Block& b) const {
    const at::Tensor fc = affine(x, b.fc_weight, b.fc_bias);
    at::Tensor act;
    switch (arch_.mlp) {
      case Mlp::gelu_tanh: act = at::gelu(fc, "tanh"); break;
      case Mlp::gelu_erf: act = at::gelu(fc); break;
      case Mlp::swiglu: act = at::silu(fc.narrow(1, 0, inner_)).mul(fc.narrow(1, inner_, inner_)); break;
    }
    return drop(affine(act, b.mlp_proj_weight, b.mlp_proj_bias));
  }

  // One block on h [B n, d] at the step's positions, after the prefix's keys and values (undefined: none). When
  // given, new_keys and new_values receive the new positions' [nkv, n, hd] (of sequence 0: the prefix's own when B is
  // 1), and all_keys and all_values every sequence's [B, nkv, hd] (n = 1: the candidates'). Without `rest`, only the
  // attention runs (its keys and values are all that is wanted) and h is returned.
  at::Tensor block(const at::Tensor& h, const Block& b, const Step& step, const at::Tensor& prefix_keys,
                   const at::Tensor& prefix_values, at::Tensor* new_keys = nullptr, at::Tensor* new_values = nullptr,
                   bool rest = true, at::Tensor* all_keys = nullptr, at::Tensor* all_values = nullptr) const {
    const std::int64_t B = step.B, n = step.n;
    const at::Tensor qkv = affine(norm(h, b.ln_1), b.attn_weight, b.attn_bias);
    at::Tensor qk = qkv.narrow(1, 0, (nh_ + nkv_) * hd_).view({B, n, nh_ + nkv_, hd_});  // q and k rotate together
    if (rotary_ > 0) qk = rotate(qk, step);
    const at::Tensor q = qk.narrow(2, 0, nh_), k = qk.narrow(2, nh_, nkv_);
    const at::Tensor v = qkv.narrow(1, (nh_ + nkv_) * hd_, nkv_ * hd_).view({B, n, nkv_, hd_});
    if (new_keys) *new_keys = k[0].transpose(0, 1);  // [nkv, n, hd]
    if (new_values) *new_values = v[0].transpose(0, 1);
    if (all_keys) *all_keys = k.select(1, 0);  // [B, nkv, hd]
    if (all_values) *all_values = v.select(1, 0);
    if (!rest) return h;
    const at::Tensor att = attention(q, k, v, prefix_keys, prefix_values, step);
    const at::Tensor a = h.add(drop(affine(att, b.attn_proj_weight, b.attn_proj_bias)));
    return a.add(mlp(norm(arch_.residual == Residual::sequential ? a : h, b.ln_2), b));
  }

  // x with dropout (spec.dropout > 0): each element kept with probability 1 - p and scaled by 1 / (1 - p), a fresh
  // mask from the model's generator at every call (drawn on the CPU, so that a seed gives the same masks on every
  // device).
  at::Tensor drop(const at::Tensor& x) const {
    if (dropout_ == 0) return x;
    at::Tensor keep = at::empty(x.sizes(), at::TensorOptions(at::kFloat)).bernoulli_(1.0 - dropout_, generator_);
    return x.mul(keep.to(x.options())).div(1.0 - dropout_);
  }

  // The prefix's keys or values of block l: [nkv, t, hd], undefined while the prefix is empty.
  static at::Tensor prefix_part(const std::vector<at::Tensor>& parts, std::int64_t t, std::size_t l) {
    return t > 0 ? parts[l] : at::Tensor();
  }

  std::shared_ptr<SharedWeights> weights_;  // owns (or keeps alive) every weight tensor below
  Architecture arch_;
  std::int64_t d_, nh_, nkv_, g_, hd_, rotary_, inner_, k_;
  Head head_;
  bool vocab_input_;
  std::vector<std::int64_t> layers_;
  double scale_;  // sqrt(hd)
  double dropout_;
  mutable at::Generator generator_;  // dropout's masks (a model is used by one thread at a time)
  at::TensorOptions options_;
  at::Tensor wte_;      // [V, d], input = vocab or a tied lm_head
  at::Tensor lm_head_;  // [V, d]: wte or lm_head.weight, heads lm_head and lm_head_no_ln_f
  at::Tensor wpe_;      // [P, d], learned positions
  at::Tensor cos_, sin_;  // [P, r / 2], rotary
  std::vector<Block> blocks_;
  NormParams ln_f_;  // unless the head is none
};

// ---- MLP kinds ----------------------------------------------------------------------------------------------------

class MlpNetwork final : public Network {
 public:
  MlpNetwork(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
             std::shared_ptr<SharedWeights> weights)
      : weights_(std::move(weights)),
        per_token_(spec.kind == ModelKind::transformer_mlp),
        vocab_input_(spec.input == InputSpace::vocab) {
    auto load = [&](const std::string& name) { return weights_->get(source, name); };
    fc1_weight_ = load("fc1.weight");
    fc1_bias_ = load("fc1.bias");
    fc2_weight_ = load("fc2.weight");
    fc2_bias_ = load("fc2.bias");
    if (vocab_input_) wte_ = load("wte.weight");
  }

  at::Tensor forward(const at::Tensor& x) const override {
    const std::int64_t B = x.size(0), T = x.size(1);
    at::Tensor e = x.reshape({B * T, x.size(2)});
    if (vocab_input_) e = affine(e, wte_, Layout::in_out);  // [B T, d]
    if (!per_token_) e = e.reshape({B, -1});                 // [B, T d]
    const at::Tensor hidden = at::gelu(affine(e, fc1_weight_, Layout::out_in, fc1_bias_));
    const at::Tensor out = affine(hidden, fc2_weight_, Layout::out_in, fc2_bias_);
    return per_token_ ? out.view({B, T, out.size(1)}) : out;
  }

 private:
  std::shared_ptr<SharedWeights> weights_;
  bool per_token_, vocab_input_;
  at::Tensor fc1_weight_, fc1_bias_, fc2_weight_, fc2_bias_;  // nn.Linear: [out, in], [out]
  at::Tensor wte_;                                            // [V, d], input = vocab only
};

}  // namespace

std::unique_ptr<Network> make_decoder_network(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
                                              std::shared_ptr<SharedWeights> weights) {
  return std::make_unique<DecoderNetwork>(spec, source, std::move(weights));
}

std::unique_ptr<Network> make_mlp_network(const ModelSpec& spec, const std::shared_ptr<const WeightSet>& source,
                                          std::shared_ptr<SharedWeights> weights) {
  return std::make_unique<MlpNetwork>(spec, source, std::move(weights));
}

}  // namespace lminv::torch_backend
