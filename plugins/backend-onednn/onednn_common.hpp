// What the oneDNN backend's models share: the engine and stream, thread control, oneDNN errors as lminv::Error,
// buffers, a list of steps (oneDNN primitives with their arguments, or hand-written loops), and the weights as oneDNN
// memory.
//
// Built on oneDNN 2.6's C++ API (X::desc -> X::primitive_desc -> primitive, executed with an argument map on a
// stream), CPU engine, f32.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "int8_weights.hpp"
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

// The CPU engine, one for the process: memory made on it (the weights' copies) serves every model.
inline const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The engine and stream of one model.
struct Context {
  dnnl::engine engine = cpu_engine();
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

// One primitive with its arguments, or (when `loop` is set) a hand-written loop over the plan's buffers. Plans are
// lists of steps built once per input shape. A `single` step is too small to be worth an OpenMP team: it was made,
// and runs, with one thread, which saves a fork and join (a few microseconds on a quiet machine, a scheduler time
// slice on a busy one) for each of the many small steps of a batch of one.
struct Step {
  Step() = default;
  Step(dnnl::primitive p, std::unordered_map<int, memory> a, bool one_thread = false)
      : primitive(std::move(p)), args(std::move(a)), single(one_thread) {}
  // A hand-written loop.
  Step(std::function<void()> f, bool one_thread) : single(one_thread), loop(std::move(f)) {}

  dnnl::primitive primitive;
  std::unordered_map<int, memory> args;
  bool single = false;
  std::function<void()> loop;
  std::function<void()> prepare;  // run first when set: an int8 weight dequantised into the memory the step reads
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
    if (s.prepare) s.prepare();
    if (s.loop)
      s.loop();
    else
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

// A weight matrix as matmul weights: `stored` reads the tensor's bytes as they are (in either orientation: the
// gemm-based matmul takes both, so the transposed use of a weight, as in the backward pass, needs no copy); `fast` is
// a copy reordered once into the blocked layout oneDNN prefers for it where it has one, else the same as `stored`.
//
// An int8 weight (ModelSpec::weight_dtype = int8) keeps its integers and scales in `q`; `fast` and `stored` then view
// a model's f32 scratch buffer, into which dequantise() writes the weight before each step that reads it (the step's
// prepare). The scratch holds one weight at a time, so an int8 model's f32 copy of its block weights is one matrix.
struct Matrix {
  memory fast, stored;
  std::shared_ptr<const int8::Matrix> q;  // int8 weights only
  bool blocked() const { return fast.get(true) != stored.get(true); }

  // The stored [K_stored, N_stored] row-major values into the scratch `stored` views (in either orientation the
  // buffer holds the weight as the tensor stores it).
  void dequantise() const {
    float* dst = static_cast<float*>(stored.get_data_handle());
    const Index in = q->in, out = q->out;
    const std::int8_t* src = q->q.data();
    const float* s = scales->data();
#pragma omp parallel for schedule(static) if (in * out >= kSmallWork)
    for (Index i = 0; i < in; ++i)
      for (Index o = 0; o < out; ++o) dst[i * out + o] = static_cast<float>(src[i * out + o]) * s[o];
  }
  std::shared_ptr<const std::vector<float>> scales;  // q's scales rounded to f32, as every backend rounds them
};

// The weights as f32 oneDNN memory. Tensors already in f32 are used in place (the store keeps the WeightSet); others
// are converted once. Every matrix and its blocked copy are made once, whatever the shapes of the inputs, and shared
// by the models made on the same WeightSet (OnednnBackend keeps one store per WeightSet while models use it). Not
// safe to call from two threads at once (the backend calls it while it builds a model, under its lock).
class WeightStore {
 public:
  explicit WeightStore(std::shared_ptr<const WeightSet> weights) : weights_(std::move(weights)) {}

  const std::shared_ptr<const WeightSet>& weights() const { return weights_; }

  // The f32 values of `name`, which must have `shape`.
  const float* data(const std::string& name, const Shape& shape) {
    const Tensor& t = tensor(name, shape);
    if (t.dtype() == DType::f32) return t.data<float>();
    auto it = converted_.find(name);
    if (it == converted_.end()) it = converted_.emplace(name, t.to(DType::f32)).first;  // map: no later move
    return it->second.data<float>();
  }

  // A vector of n values as memory of the given dims (e.g. {n} for LayerNorm, {1, n} for a matmul bias).
  memory vector(const std::string& name, Index n, const memory::dims& dims) {
    return memory(plain(dims), cpu_engine(), const_cast<float*>(data(name, {n})));
  }

  // The weights of a matmul, logical shape [K, N], from the tensor `name` stored row-major as `stored`:
  // [K, N] (transposed = false) or [N, K] (transposed = true). m_hint: a typical row count of the source, for which
  // oneDNN chooses its preferred layout; the blocked copy is made only where a kernel of its own takes it at that
  // row count and at 32 times it (else the stored bytes serve every shape).
  Matrix matrix(const std::string& name, const Shape& stored, bool transposed, Index m_hint) {
    const auto key = std::make_pair(name, transposed);
    auto it = matrices_.find(key);
    if (it != matrices_.end()) return it->second;
    const float* values = data(name, stored);
    const Index K = transposed ? stored[1] : stored[0], N = transposed ? stored[0] : stored[1];
    const memory::desc as_stored(memory::dims{K, N}, Dt::f32, transposed ? Tag::ba : Tag::ab);
    const memory::desc any(memory::dims{K, N}, Dt::f32, Tag::any);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(plain({m_hint, K}), any, plain({m_hint, N})),
                                          cpu_engine());
    const memory::desc preferred = pd.weights_desc();
    Matrix m;
    m.stored = memory(as_stored, cpu_engine(), const_cast<float*>(values));
    if (preferred == as_stored || is_plain_layout(preferred) || !own_kernel(preferred, K, N, m_hint) ||
        !own_kernel(preferred, K, N, 32 * m_hint)) {
      m.fast = m.stored;
    } else {
      m.fast = memory(preferred, cpu_engine());
      dnnl::stream stream(cpu_engine());
      dnnl::reorder(m.stored, m.fast).execute(stream, m.stored, m.fast);
      stream.wait();
    }
    matrices_.emplace(key, m);
    return m;
  }

  // `m` (a matrix() of a weight stored [K, N], not transposed) with `fast` a copy made once into rows of N + kPad
  // floats, keyed by the weight's name. oneDNN 2.6's gemm reads a weight whose row stride is a multiple of 4 KiB
  // (GPT-2's mlp.c_fc: 3072 floats) at half its rate or less for few source rows (16: 6.5 against 12.5 GB/s, 256: 60
  // against 160 GFLOP/s, measured here on AVX2 for [*, 768] x [768, 3072]); the padded rows avoid the cache-set
  // conflicts, and no shape measured was slower with them. It costs a copy of the weight: made only for the prefix
  // cache, whose small batches are the search's hot path. Safe to call from several threads (a cache is made on first
  // request, outside the backend's lock).
  Matrix padded(const std::string& name, const Matrix& m) {
    if (m.q) return m;  // an int8 weight is dequantised into its model's scratch: there is no f32 copy to pad
    const std::lock_guard<std::mutex> lock(padded_mutex_);
    auto it = padded_.find(name);
    if (it != padded_.end()) return it->second.first;
    const memory::desc md = m.stored.get_desc();
    if (md != memory::desc(md.dims(), Dt::f32, Tag::ab))
      throw Error(std::string(kWho) + ": weight '" + name + "' is not stored [K, N] row-major, as padded() needs");
    const Index K = md.dims()[0], N = md.dims()[1], row = N + kPad;
    const auto* values = static_cast<const float*>(m.stored.get_data_handle());
    Tensor copy(DType::f32, {K, row});
    for (Index k = 0; k < K; ++k)
      std::memcpy(copy.data<float>() + k * row, values + k * N, static_cast<std::size_t>(N) * sizeof(float));
    Matrix out;
    out.stored = m.stored;
    out.fast = memory(strided({K, N}, {row, 1}), cpu_engine(), copy.data<float>());
    padded_.emplace(name, std::make_pair(out, std::move(copy)));  // a map: the copy's bytes do not move
    return out;
  }
  static constexpr Index kPad = 16;  // floats: one cache line

  // The int8 form of weight `name` (stored [K, N] as `stored`, or read transposed) as a Matrix viewing `scratch`, a
  // buffer of at least K N floats owned by the model (int8_weights.hpp fixes the rounding). The integers are made
  // once per weight and shared by the models on this store.
  Matrix int8_matrix(const std::string& name, const Shape& stored, bool transposed, float* scratch) {
    auto it = int8_.find(name);
    if (it == int8_.end()) {
      it = int8_.emplace(name, std::make_shared<const int8::Matrix>(int8::quantise(tensor(name, stored), name))).first;
    }
    const Index K = transposed ? stored[1] : stored[0], N = transposed ? stored[0] : stored[1];
    Matrix m;
    m.q = it->second;
    m.scales = std::make_shared<const std::vector<float>>(m.q->scale.begin(), m.q->scale.end());
    m.stored = memory(memory::desc(memory::dims{K, N}, Dt::f32, transposed ? Tag::ba : Tag::ab), cpu_engine(), scratch);
    m.fast = m.stored;
    return m;
  }
  // The bytes of the int8 weights made so far (integers and f32 scales).
  std::size_t int8_bytes() const {
    std::size_t n = 0;
    for (const auto& [name, m] : int8_) n += m->bytes();
    return n;
  }

 private:
  // The tensor `name`, which must exist and have `shape`.
  const Tensor& tensor(const std::string& name, const Shape& shape) const {
    if (!weights_->contains(name))
      throw Error(std::string(kWho) + ": the model needs weight '" + name + "' " + shape_string(shape) +
                  ", which the weights lack");
    const Tensor& t = weights_->get(name);
    if (t.shape() != shape)
      throw Error(std::string(kWho) + ": weight '" + name + "' has shape " + shape_string(t.shape()) + ", expected " +
                  shape_string(shape));
    return t;
  }

  // Whether a matmul with `rows` source rows takes weights in the layout `md` with a kernel of its own (oneDNN's
  // reference kernel would be far slower than the gemm on the stored bytes).
  bool own_kernel(const memory::desc& md, Index K, Index N, Index rows) const {
    try {
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(plain({rows, K}), md, plain({rows, N})), cpu_engine());
      return std::string(pd.impl_info_str()).rfind("ref", 0) != 0;
    } catch (const dnnl::error&) {
      return false;
    }
  }

  std::shared_ptr<const WeightSet> weights_;
  std::map<std::string, Tensor> converted_;
  std::map<std::pair<std::string, bool>, Matrix> matrices_;
  std::map<std::string, std::shared_ptr<const int8::Matrix>> int8_;
  std::mutex padded_mutex_;
  std::map<std::string, std::pair<Matrix, Tensor>> padded_;  // the Matrix and the copy it views
};

// A matmul on weight matrices of one shape (`like`: one of them; every block's copy of a weight has the same
// layouts): on their `fast` copies unless, for these source rows, oneDNN would run those on its reference kernel, then
// on the stored bytes. `stored` says which was chosen (pick() gives that memory of each matrix).
struct WeightMatmul {
  dnnl::matmul primitive;
  bool stored = false;
  const memory& pick(const Matrix& m) const { return stored ? m.stored : m.fast; }
};
inline WeightMatmul weight_matmul(const std::string& what, const Context& ctx, const memory::desc& src,
                                  const Matrix& like, const memory::desc* bias, const memory::desc& dst,
                                  const dnnl::primitive_attr& attr = dnnl::primitive_attr()) {
  if (like.blocked()) {
    dnnl::matmul mm = matmul(what, ctx, src, like.fast.get_desc(), bias, dst, attr);
    const char* impl = nullptr;
    dnnl_primitive_desc_query(mm.get_primitive_desc(), dnnl_query_impl_info_str, 0, &impl);
    if (!impl || std::string(impl).rfind("ref", 0) != 0) return {mm, false};
  }
  return {matmul(what, ctx, src, like.stored.get_desc(), bias, dst, attr), true};
}

// ---- loss ---------------------------------------------------------------------------------------------------------

// lminv::metric_and_grad (model.hpp) on an f32 output of B items of n values each, computed the same way (fp64
// accumulation, the same formulas, the gradient rounded to f32) but on raw pointers: the SDK's version goes through
// Tensor::get/set per element, which costs as much as a layer at GPT-2's vocabulary size. The target is one item
// (broadcast) or B items; its f32 or f64 values are read as they are (bf16 widened to f32, exactly).
std::vector<double> metric_and_grad_f32(const float* output, Index B, Index n, const Tensor& target, Metric metric,
                                        float* grad, int threads);

}  // namespace lminv::onednn
