// The oneDNN backend's "matmul_probe" (lminv/matmul_probe.hpp): C = A B as one oneDNN matmul primitive on plain
// row-major f32 source, the weights reordered into oneDNN's preferred layout as the backend keeps its own (its
// fast path), made and run with the model's threads.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "lminv/matmul_probe.hpp"
#include "onednn_common.hpp"

namespace lminv::onednn {

class OnednnMatmulProbe final : public MatmulProbe {
 public:
  explicit OnednnMatmulProbe(int threads) : threads_(threads) {}

  double matmul_seconds(DType dtype, std::int64_t m, std::int64_t n, std::int64_t k, int repeat) override {
    if (dtype != DType::f32) throw Error(std::string(kWho) + ": matmul_probe: no matrix product in " + dtype_name(dtype));
    ThreadScope scope(threads_);
    Context ctx;
    ctx.threads = threads_;
    std::vector<float> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n)), c(static_cast<std::size_t>(m * n));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.001f * static_cast<float>(i % 997);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = 0.002f * static_cast<float>(i % 991);
    // B in the layout oneDNN prefers for it (reordered before timing), as the backend keeps its weights.
    const memory::desc ad = plain({m, k}), bd = plain({k, n}), cd = plain({m, n});
    const memory::desc any(memory::dims{k, n}, memory::data_type::f32, memory::format_tag::any);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(ad, any, cd), ctx.engine);
    const dnnl::matmul mm(pd);
    const memory::desc preferred = pd.weights_desc();
    const memory am(ad, ctx.engine, a.data()), cm(cd, ctx.engine, c.data());
    memory b_plain(bd, ctx.engine, b.data());
    memory bm(preferred, ctx.engine);
    dnnl::reorder(b_plain, bm).execute(ctx.stream, b_plain, bm);
    const std::unordered_map<int, memory> args{{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
    mm.execute(ctx.stream, args);
    ctx.stream.wait();
    double best = INFINITY;
    for (int r = 0; r < std::max(1, repeat); ++r) {
      const auto start = std::chrono::steady_clock::now();
      mm.execute(ctx.stream, args);
      ctx.stream.wait();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  }

 private:
  int threads_;
};

}  // namespace lminv::onednn
