// What the oneDNN backend's models share: the engine and stream, thread control, oneDNN errors as lminv::Error,
// buffers, a list of primitives with their arguments, and the weights as oneDNN memory.
//
// Built on oneDNN 2.6's C++ API (X::desc -> X::primitive_desc -> primitive, executed with an argument map on a
// stream), CPU engine, f32.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"

namespace lminv::onednn {

using Index = std::int64_t;
using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

inline const char* const kWho = "onednn backend";

// Runs `f`, turning a dnnl::error into an lminv::Error that says what was being done.
template <class F>
auto guarded(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    throw Error(std::string(kWho) + ": oneDNN failed while " + what + ": " + e.what() + " (dnnl_status_t " +
                std::to_string(static_cast<int>(e.status)) + ")");
  }
}

// Makes one primitive, naming it in the error when oneDNN cannot (a shape or layout its kernels do not take).
template <class F>
auto make(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    throw Error(std::string(kWho) + ": oneDNN could not make the " + what + " primitive: " + e.what() +
                " (dnnl_status_t " + std::to_string(static_cast<int>(e.status)) + ")");
  }
}

// oneDNN's CPU engine here runs on OpenMP and takes its team size from omp_get_max_threads() when a primitive is
// created and when it runs. This sets the calling thread's team size for the scope of one call (threads > 0) and
// restores it afterwards, so the host's own OpenMP code is not affected; threads = 0 leaves it alone (all cores, or
// OMP_NUM_THREADS).
class ThreadScope {
 public:
  explicit ThreadScope(int threads) : saved_(omp_get_max_threads()), active_(threads > 0 && threads != saved_) {
    if (active_) omp_set_num_threads(threads);
  }
  ~ThreadScope() {
    if (active_) omp_set_num_threads(saved_);
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int saved_;
  bool active_;
};

// The engine and stream of one model.
struct Context {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  int threads = 0;
};

// Dense row-major f32 dims.
inline memory::desc plain(const memory::dims& dims) {
  static const Tag tags[] = {Tag::undef, Tag::a, Tag::ab, Tag::abc, Tag::abcd};
  return memory::desc(dims, Dt::f32, tags[dims.size()]);
}
// f32 dims with explicit strides (in elements).
inline memory::desc strided(const memory::dims& dims, const memory::dims& strides) {
  return memory::desc(dims, Dt::f32, strides);
}
// True for a plain strided layout (no blocking): what the gemm-based matmul uses.
inline bool is_plain_layout(const memory::desc& md) {
  return md.data.format_kind == dnnl_blocked && md.data.format_desc.blocking.inner_nblks == 0;
}

// An f32 buffer owned by a plan (a zero-filled, 64-byte aligned Tensor) and oneDNN memory views into it.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(Index n) : tensor_(DType::f32, {n}) {}
  float* data() { return tensor_.numel() ? tensor_.data<float>() : nullptr; }
  Index size() const { return tensor_.numel(); }
  // `md` over this buffer from element `offset` on.
  memory view(const Context& ctx, const memory::desc& md, Index offset = 0) {
    return memory(md, ctx.engine, data() + offset);
  }

 private:
  Tensor tensor_;
};

// `b` holding n floats (allocated on first use: buffers only some calls need).
inline float* ensure(Buffer& b, Index n) {
  if (b.size() != n) b = Buffer(n);
  return b.data();
}

// One primitive with its arguments. Plans are lists of steps built once per batch size. A `single` step is too small
// to be worth an OpenMP team: it was made, and runs, with one thread, which saves a fork and join (a few microseconds
// on a quiet machine, a scheduler time slice on a busy one) for each of the many small steps of a batch of one.
struct Step {
  dnnl::primitive primitive;
  std::unordered_map<int, memory> args;
  bool single = false;
};

// Below this many elements (or multiply-adds, for a matmul) a step runs on one thread.
inline constexpr Index kSmallWork = Index{1} << 16;

// Runs the steps in order on the stream (the CPU stream executes synchronously, in the calling thread).
inline void run_steps(Context& ctx, const std::vector<Step>& steps) {
  struct Team {  // the caller's team size, restored however the loop ends
    int size = omp_get_max_threads(), current = size;
    void set(int n) {
      if (n != current) omp_set_num_threads(current = n);
    }
    ~Team() { set(size); }
  } team;
  for (const Step& s : steps) {
    team.set(s.single ? 1 : team.size);
    s.primitive.execute(ctx.stream, s.args);
  }
  ctx.stream.wait();
}

// Makes a primitive with one thread when `single` (so that it is sized for the team it will run with).
template <class F>
auto made_with(bool single, F&& f) -> decltype(f()) {
  ThreadScope scope(single ? 1 : 0);
  return f();
}

// A memory object whose data handle is set at every call (the caller's input, output or gradient).
inline memory external(const Context& ctx, const memory::desc& md) {
  return memory(md, ctx.engine, DNNL_MEMORY_NONE);
}
inline void bind(memory& m, const void* data) {
  m.set_data_handle(const_cast<void*>(data));
}

// Primitive builders.
inline dnnl::matmul matmul(const std::string& what, const Context& ctx, const memory::desc& src,
                           const memory::desc& weights, const memory::desc* bias, const memory::desc& dst,
                           const dnnl::primitive_attr& attr = dnnl::primitive_attr()) {
  return make(what, [&] {
    const dnnl::matmul::desc d =
        bias ? dnnl::matmul::desc(src, weights, *bias, dst) : dnnl::matmul::desc(src, weights, dst);
    return dnnl::matmul(dnnl::matmul::primitive_desc(d, attr, ctx.engine));
  });
}
// Attributes: dst = scale * (src @ weights) (+ bias) (+ src1 for an added tensor of dst's shape).
inline dnnl::primitive_attr matmul_attr(float scale, const memory::desc* added) {
  dnnl::primitive_attr attr;
  if (scale != 1.0f) attr.set_output_scales(0, {scale});
  if (added) {
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_add, *added);
    attr.set_post_ops(ops);
  }
  return attr;
}
inline constexpr int kPostOpSrc1 = DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1;

inline dnnl::binary add(const Context& ctx, const memory::desc& md) {
  return dnnl::binary(
      dnnl::binary::primitive_desc(dnnl::binary::desc(dnnl::algorithm::binary_add, md, md, md), ctx.engine));
}

// The weights as f32 oneDNN memory. Tensors already in f32 are used in place (the model keeps the WeightSet); others
// are converted once. A matrix is given to matmul in the layout oneDNN prefers for it: the stored bytes as they are
// when that is a plain layout (the gemm-based matmul reads either orientation, so the transposed use of a weight, as
// in the backward pass, needs no copy), else a copy reordered once into the preferred (blocked) layout.
class WeightStore {
 public:
  WeightStore(std::shared_ptr<const WeightSet> weights, Context& ctx, std::string what)
      : weights_(std::move(weights)), ctx_(ctx), what_(std::move(what)) {}

  // The f32 values of `name`, which must have `shape`.
  const float* data(const std::string& name, const Shape& shape) {
    if (!weights_->contains(name))
      throw Error(std::string(kWho) + ": " + what_ + " needs weight '" + name + "' " + shape_string(shape) +
                  ", which the weights lack");
    const Tensor& t = weights_->get(name);
    if (t.shape() != shape)
      throw Error(std::string(kWho) + ": weight '" + name + "' has shape " + shape_string(t.shape()) + ", expected " +
                  shape_string(shape) + " (" + what_ + ")");
    if (t.dtype() == DType::f32) return t.data<float>();
    auto it = converted_.find(name);
    if (it == converted_.end()) it = converted_.emplace(name, t.to(DType::f32)).first;  // map: no later move
    return it->second.data<float>();
  }

  // A vector of n values as memory of the given dims (e.g. {n} for LayerNorm, {1, n} for a matmul bias).
  memory vector(const std::string& name, Index n, const memory::dims& dims) {
    return memory(plain(dims), ctx_.engine, const_cast<float*>(data(name, {n})));
  }

  // The weights of a matmul, logical shape [K, N], from the tensor `name` stored row-major as `stored`:
  // [K, N] (transposed = false) or [N, K] (transposed = true). m_hint: a typical row count of the source.
  memory matrix(const std::string& name, const Shape& stored, bool transposed, Index m_hint) {
    const auto key = std::make_pair(name, transposed);
    auto it = matrices_.find(key);
    if (it != matrices_.end()) return it->second;
    const float* values = data(name, stored);
    const Index K = transposed ? stored[1] : stored[0], N = transposed ? stored[0] : stored[1];
    const memory::desc as_stored(memory::dims{K, N}, Dt::f32, transposed ? Tag::ba : Tag::ab);
    const memory::desc any(memory::dims{K, N}, Dt::f32, Tag::any);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(plain({m_hint, K}), any, plain({m_hint, N})), ctx_.engine);
    const memory::desc preferred = pd.weights_desc();
    memory mem;
    if (preferred == as_stored || is_plain_layout(preferred) || !takes_blocked(preferred, K, N, 32 * m_hint)) {
      mem = memory(as_stored, ctx_.engine, const_cast<float*>(values));
    } else {
      memory source(as_stored, ctx_.engine, const_cast<float*>(values));
      mem = memory(preferred, ctx_.engine);
      dnnl::reorder(source, mem).execute(ctx_.stream, source, mem);
      ctx_.stream.wait();
    }
    matrices_.emplace(key, mem);
    return mem;
  }

 private:
  // Whether a matmul with `rows` source rows takes weights in the blocked layout `md` with a kernel of its own (plans
  // for large batches use the layout chosen for a batch of one; oneDNN's reference kernel would be far slower than the
  // gemm on the stored bytes).
  bool takes_blocked(const memory::desc& md, Index K, Index N, Index rows) const {
    try {
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(plain({rows, K}), md, plain({rows, N})), ctx_.engine);
      return std::string(pd.impl_info_str()).rfind("ref", 0) != 0;
    } catch (const dnnl::error&) {
      return false;
    }
  }

  std::shared_ptr<const WeightSet> weights_;
  Context& ctx_;
  std::string what_;
  std::map<std::string, Tensor> converted_;
  std::map<std::pair<std::string, bool>, memory> matrices_;
};

// ---- loss ---------------------------------------------------------------------------------------------------------

// lminv::metric_and_grad (model.hpp) on an f32 output of B items of n values each, computed the same way (fp64
// accumulation, the same formulas, the gradient rounded to f32) but on raw pointers: the SDK's version goes through
// Tensor::get/set per element, which costs as much as a layer at GPT-2's vocabulary size. The target is one item
// (broadcast) or B items; its f32 or f64 values are read as they are (bf16 widened to f32, exactly).
std::vector<double> metric_and_grad_f32(const float* output, Index B, Index n, const Tensor& target, Metric metric,
                                        float* grad, int threads);

}  // namespace lminv::onednn
