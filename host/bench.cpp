#include "bench.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>

#include "lminv/ops.hpp"
#include "lminv/prefix_cache.hpp"
#include "families/family.hpp"
#include "lminv/schema.hpp"
#include "report.hpp"
#include "weights_init.hpp"

#ifdef LMINV_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

namespace lminv {

namespace {

using Clock = std::chrono::steady_clock;

// Whether the backend builds spec (kind and every feature it needs).
bool supports(const BackendInfo& info, const ModelSpec& spec) {
  if (std::find(info.kinds.begin(), info.kinds.end(), spec.kind) == info.kinds.end()) return false;
  for (const std::string& f : required_features(spec))
    if (std::find(info.features.begin(), info.features.end(), f) == info.features.end()) return false;
  return true;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Best time of `repeat` calls of f after one warm-up call.
template <class F>
double best_time(int repeat, F&& f) {
  f();
  double best = INFINITY;
  for (int i = 0; i < repeat; ++i) {
    const auto start = Clock::now();
    f();
    best = std::min(best, seconds_since(start));
  }
  return best;
}

// Bytes copied per second by memcpy of a buffer far larger than the caches (each byte read once, written once).
double copy_bandwidth() {
  const std::size_t n = std::size_t{1} << 29;  // 512 MiB
  std::vector<char> a(n, 1), b(n, 0);
  const double s = best_time(3, [&] { std::memcpy(b.data(), a.data(), n); });
  return static_cast<double>(n) / s;
}

// f32 GEMM rate (FLOP/s) through oneDNN's sgemm, square matrices of 2048.
double gemm_rate() {
#ifdef LMINV_HAVE_DNNL
  const dnnl_dim_t n = 2048;
  std::vector<float> a(n * n, 1.0f), b(n * n, 0.5f), c(n * n, 0.0f);
  const double s = best_time(3, [&] {
    dnnl_sgemm('N', 'N', n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  });
  return 2.0 * n * n * n / s;
#else
  return 0;
#endif
}

struct ModelCase {
  std::string name;
  std::string shape;  // "gpt2" (the request's sizes), "pythia-160m", "tinyllama-1.1b"
  std::int64_t blocks;  // -1: every block
  Head head;
};

// "1block", "12blocks", "12blocks-lmhead": GPT-2 of the request's sizes; "<shape>" and "<shape>-lmhead" for the
// other families' shapes, every block.
ModelCase model_case(const std::string& name, const BenchRequest& r) {
  if (name == "1block") return {name, "gpt2", 1, Head::none};
  if (name == "12blocks") return {name, "gpt2", r.n_layer, Head::none};
  if (name == "12blocks-lmhead") return {name, "gpt2", r.n_layer, Head::lm_head};
  for (const char* shape : {"pythia-160m", "tinyllama-1.1b"}) {
    const std::string s = shape;
    if (name == s) return {name, s, -1, Head::none};
    if (name == s + "-lmhead") return {name, s, -1, Head::lm_head};
  }
  throw Error("bench: unknown model '" + name +
              "' (1block | 12blocks | 12blocks-lmhead | pythia-160m[-lmhead] | tinyllama-1.1b[-lmhead])");
}

// The benchmarked model of a shape (random weights, T tokens): GPT-2 small's sizes unless the request says otherwise,
// or the published sizes of Pythia-160M and TinyLlama-1.1B with their families' architectures.
ModelSpec bench_spec(const BenchRequest& r, const std::string& shape, DType dtype, std::int64_t T) {
  ModelSpec spec;
  if (shape == "gpt2") {
    spec.family = "gpt2";
    family(spec.family).set_architecture(spec);
    spec.n_layer = r.n_layer;
    spec.n_embd = r.n_embd;
    spec.n_head = r.n_head;
    spec.vocab_size = r.vocab;
  } else if (shape == "pythia-160m") {  // EleutherAI/pythia-160m's config.json
    spec.family = "gpt_neox";
    family(spec.family).set_architecture(spec);
    spec.n_layer = 12;
    spec.n_embd = 768;
    spec.n_head = 12;
    spec.n_inner = 3072;
    spec.vocab_size = 50304;
    spec.n_positions = 2048;
    spec.arch.rotary_fraction = 0.25;
  } else if (shape == "tinyllama-1.1b") {  // TinyLlama-1.1B's config.json
    spec.family = "llama";
    family(spec.family).set_architecture(spec);
    spec.n_layer = 22;
    spec.n_embd = 2048;
    spec.n_head = 32;
    spec.arch.n_kv_head = 4;
    spec.n_inner = 5632;
    spec.vocab_size = 32000;
    spec.n_positions = 2048;
    spec.arch.norm_eps = 1e-5;
  } else {
    throw Error("bench: unknown shape '" + shape + "'");
  }
  spec.seq_len = T;
  spec.dtype = dtype;
  return spec;
}

// Parameters a step multiplies by: the matrices of every block used, and the lm_head when there is one.
double parameters_used(const ModelSpec& s) {
  double n = 0;
  for (const TensorSpec& t : used_weights(s)) {
    if (t.shape.size() != 2 || t.name == "wpe.weight") continue;
    if (t.name == "wte.weight" && s.head != Head::lm_head) continue;  // an input in vocabulary space is not counted
    n += static_cast<double>(t.shape[0]) * static_cast<double>(t.shape[1]);
  }
  return n;
}

// The prefix cache's next(): B candidate tokens after a prefix of r.cache_prefix tokens, forward only, for every
// backend whose GPT-2 models offer the capability (f32, head none).
void bench_prefix_cache(const BenchRequest& r, const Registry& registry, double gemm, std::ostream& out) {
  out << "\nprefix cache: next() for B candidates after " << r.cache_prefix << " tokens (f32, head none)\n"
      << std::left << std::setw(11) << "backend" << std::setw(17) << "model" << std::right << std::setw(6) << "B"
      << std::setw(11) << "s/call" << std::setw(13) << "tokens/s" << std::setw(10) << "GFLOP/s" << std::setw(9)
      << "% GEMM" << "\n";
  std::map<std::string, std::shared_ptr<const WeightSet>> weights_by_shape;
  for (const std::string& backend_name : r.backends) {
    if (!registry.find(PluginKind::backend, backend_name)) continue;
    std::shared_ptr<Backend> backend = registry.create_backend(backend_name);
    backend->configure(Options("backend", "lminv bench", {}));
    const BackendInfo info = backend->info();
    if (std::find(info.dtypes.begin(), info.dtypes.end(), DType::f32) == info.dtypes.end()) continue;
    for (const std::string& model_name : r.models) {
      const ModelCase mc = model_case(model_name, r);
      if (mc.head != Head::none) continue;
      ModelSpec spec = bench_spec(r, mc.shape, DType::f32, r.cache_prefix + 1);
      spec.head = Head::none;
      spec.blocks = mc.blocks < 0 ? spec.n_layer : mc.blocks;
      if (!supports(info, spec)) continue;
      std::shared_ptr<const WeightSet>& weights = weights_by_shape[mc.shape];
      if (!weights) weights = std::make_shared<const WeightSet>(init_random_weights(spec, 0));
      auto model = keep_alive(backend->create_model(spec, weights), backend);
      PrefixCache* cache = prefix_cache_of(*model);
      if (!cache) {
        out << std::left << std::setw(11) << backend_name << std::setw(17) << model_name << "no prefix cache\n";
        break;
      }
      Rng rng(1);
      Tensor prefix(DType::f32, {r.cache_prefix, spec.n_embd});
      fill_normal(prefix, rng, 0.0, 0.02);
      cache->reset();
      cache->append(prefix);
      for (std::int64_t batch : r.cache_batches) {
        Tensor candidates(DType::f32, {batch, spec.n_embd});
        fill_normal(candidates, rng, 0.0, 0.02);
        const double seconds = best_time(r.repeat, [&] { (void)cache->next(candidates); });
        // Each candidate multiplies every used weight once (attention over the prefix is not counted).
        const double flops = 2.0 * parameters_used(spec) * static_cast<double>(batch);
        out << std::left << std::setw(11) << backend_name << std::setw(17) << model_name << std::right << std::setw(6)
            << batch << std::setw(11) << std::setprecision(4) << seconds << std::setw(13) << std::setprecision(0)
            << static_cast<double>(batch) / seconds << std::setw(10) << std::setprecision(1) << flops / seconds / 1e9
            << std::setw(9) << (gemm > 0 ? 100.0 * flops / seconds / gemm : NAN) << "\n"
            << std::flush;
        if (!r.out_file.empty())
          append_json_line(r.out_file, {{"kind", "prefix_cache"},
                                        {"backend", backend_name},
                                        {"model", model_name},
                                        {"batch", batch},
                                        {"prefix", r.cache_prefix},
                                        {"seconds_per_call", seconds},
                                        {"flops_per_call", flops},
                                        {"share_of_gemm_rate", gemm > 0 ? flops / seconds / gemm : 0.0}});
      }
    }
  }
  out << "GFLOP/s counts 2 x (parameters used) x B per call (one token per candidate).\n";
}

}  // namespace

void run_bench(const BenchRequest& r, const Registry& registry, std::ostream& out) {
  out << "lminv bench: GPT-2 (d " << r.n_embd << ", " << r.n_layer << " blocks, V " << r.vocab << "), " << r.tokens
      << " tokens, one step = loss_and_grad (l2), best of " << r.repeat << "\n"
      << std::flush;
  const double copy = copy_bandwidth();
  const double gemm = gemm_rate();
  out << "machine: copy " << std::fixed << std::setprecision(1) << copy / 1e9 << " GB/s (memcpy of 512 MiB), f32 GEMM "
      << (gemm > 0 ? std::to_string(static_cast<int>(gemm / 1e9)) + " GFLOP/s (oneDNN sgemm 2048^3)"
                   : std::string("not measured (lminv built without oneDNN)"))
      << "\n\n";
  const nlohmann::json machine = {{"kind", "machine"}, {"time", utc_timestamp()}, {"copy_bytes_per_s", copy},
                                  {"gemm_f32_flop_per_s", gemm}};
  if (!r.out_file.empty()) append_json_line(r.out_file, machine);

  out << std::left << std::setw(11) << "backend" << std::setw(6) << "dtype" << std::setw(17) << "model" << std::right
      << std::setw(4) << "B" << std::setw(11) << "s/step" << std::setw(10) << "GFLOP/s" << std::setw(9) << "% GEMM"
      << std::setw(11) << "bw bound" << std::setw(10) << "x bound" << "\n";

  for (const std::string& dtype_text : r.dtypes) {
    const std::optional<DType> dtype = parse_dtype(dtype_text);
    if (!dtype) throw Error("bench: unknown dtype '" + dtype_text + "'");
    std::map<std::string, std::shared_ptr<const WeightSet>> weights_by_shape;  // made once per shape and dtype
    for (const std::string& backend_name : r.backends) {
      if (!registry.find(PluginKind::backend, backend_name)) {
        out << std::left << std::setw(11) << backend_name << "not installed: skipped\n";
        continue;
      }
      std::shared_ptr<Backend> backend = registry.create_backend(backend_name);
      backend->configure(Options("backend", "lminv bench", {}));
      const BackendInfo info = backend->info();
      if (std::find(info.dtypes.begin(), info.dtypes.end(), *dtype) == info.dtypes.end()) {
        out << std::left << std::setw(11) << backend_name << std::setw(6) << dtype_text << "not supported: skipped\n";
        continue;
      }
      for (const std::string& model_name : r.models) {
        const ModelCase mc = model_case(model_name, r);
        ModelSpec spec = bench_spec(r, mc.shape, *dtype, r.tokens);
        spec.blocks = mc.blocks < 0 ? spec.n_layer : mc.blocks;
        spec.head = mc.head;
        if (!supports(info, spec)) {
          out << std::left << std::setw(11) << backend_name << std::setw(6) << dtype_text << std::setw(17)
              << model_name << "not supported: skipped\n";
          continue;
        }
        std::shared_ptr<const WeightSet>& weights = weights_by_shape[mc.shape];
        if (!weights) weights = std::make_shared<const WeightSet>(init_random_weights(spec, 0));
        auto model = keep_alive(backend->create_model(spec, weights), backend);
        for (std::int64_t batch : r.batches) {
          Tensor input(spec.dtype, input_shape(spec, batch));
          Rng rng(batch);
          fill_normal(input, rng, 0.0, 0.02);
          const Tensor target = model->forward(input.slice0(0, 1));
          const double seconds = best_time(r.repeat, [&] { (void)model->loss_and_grad(input, target, Metric::l2); });
          // Forward and input-gradient backward each multiply every used weight with B T vectors.
          const double flops = 4.0 * parameters_used(spec) * static_cast<double>(r.tokens * batch);
          const double weight_bytes = 2.0 * parameters_used(spec) * static_cast<double>(dtype_size(spec.dtype));
          const double bw_bound = weight_bytes / copy;
          out << std::left << std::setw(11) << backend_name << std::setw(6) << dtype_text << std::setw(17) << model_name
              << std::right << std::setw(4) << batch << std::setw(11) << std::setprecision(4) << seconds
              << std::setw(10) << std::setprecision(1) << flops / seconds / 1e9 << std::setw(9)
              << (gemm > 0 ? 100.0 * flops / seconds / gemm : NAN) << std::setw(11) << std::setprecision(4)
              << bw_bound << std::setw(10) << std::setprecision(2) << seconds / bw_bound << "\n"
              << std::flush;
          if (!r.out_file.empty())
            append_json_line(r.out_file, {{"kind", "step"},
                                          {"backend", backend_name},
                                          {"dtype", dtype_text},
                                          {"model", model_name},
                                          {"batch", batch},
                                          {"tokens", r.tokens},
                                          {"seconds_per_step", seconds},
                                          {"flops_per_step", flops},
                                          {"weight_bytes_per_step", weight_bytes},
                                          {"bandwidth_bound_s", bw_bound},
                                          {"times_bandwidth_bound", seconds / bw_bound},
                                          {"share_of_gemm_rate", gemm > 0 ? flops / seconds / gemm : 0.0}});
        }
      }
    }
  }
  out << "\nGFLOP/s counts 4 x (parameters used) x B x T per step (forward + input-gradient backward); "
         "bw bound = the weights read twice at the copy rate; x bound = s/step over it.\n";
  if (!r.cache_batches.empty()) bench_prefix_cache(r, registry, gemm, out);
}

}  // namespace lminv
