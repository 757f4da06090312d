#include "bench.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#include "lminv/matmul_probe.hpp"
#include "lminv/ops.hpp"
#include "lminv/prefix_cache.hpp"
#include "families/family.hpp"
#include "int8_weights.hpp"
#include "lminv/schema.hpp"
#include "report.hpp"
#include "progress.hpp"
#include "roofline.hpp"
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

// Best time of `repeat` calls of f after warm-up calls: at least one, and more while they have taken under a quarter of
// a second (at most 10). A cheap step needs several to reach its steady state: GPT-2 small + lm_head at batch 1
// (0.03 s a step) came out 25-40 % slower as the best of 3 after one warm-up than as the best of 20 or the best of 3
// after these warm-ups (bench/RESULTS.md; fresh pages and the allocator's first sizes are the likely cause, not
// measured); a long inversion loop runs at the steady rate.
template <class F>
double best_time(int repeat, F&& f) {
  const auto warm_up = Clock::now();
  for (int i = 0; i < 10 && (i == 0 || seconds_since(warm_up) < 0.25); ++i) f();
  double best = INFINITY;
  for (int i = 0; i < repeat; ++i) {
    const auto start = Clock::now();
    f();
    best = std::min(best, seconds_since(start));
  }
  return best;
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
  for (const char* shape : {"pythia-160m", "tinyllama-1.1b", "gpt2-xl"}) {
    const std::string s = shape;
    if (name == s) return {name, s, -1, Head::none};
    if (name == s + "-lmhead") return {name, s, -1, Head::lm_head};
  }
  throw Error("bench: unknown model '" + name +
              "' (1block | 12blocks | 12blocks-lmhead | pythia-160m[-lmhead] | tinyllama-1.1b[-lmhead] | "
              "gpt2-xl[-lmhead])");
}

// The benchmarked model of a shape (random weights, T tokens): GPT-2 small's sizes unless the request says otherwise,
// or the published sizes of gpt2-xl, Pythia-160M and TinyLlama-1.1B with their families' architectures.
ModelSpec bench_spec(const BenchRequest& r, const std::string& shape, DType dtype, std::int64_t T) {
  ModelSpec spec;
  if (shape == "gpt2") {
    spec.family = "gpt2";
    family(spec.family).set_architecture(spec);
    spec.n_layer = r.n_layer;
    spec.n_embd = r.n_embd;
    spec.n_head = r.n_head;
    spec.vocab_size = r.vocab;
  } else if (shape == "gpt2-xl") {  // gpt2-xl's config.json: the seed study's largest model
    spec.family = "gpt2";
    family(spec.family).set_architecture(spec);
    spec.n_layer = 48;
    spec.n_embd = 1600;
    spec.n_head = 25;
    spec.vocab_size = 50257;
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
    // wte is multiplied by only as a tied lm_head (an input in vocabulary space is not counted).
    if (t.name == "wte.weight" && (s.head != Head::lm_head || !s.arch.tied_head)) continue;
    n += static_cast<double>(t.shape[0]) * static_cast<double>(t.shape[1]);
  }
  return n;
}


// The bytes of the weights a step multiplies by (those parameters_used counts), as the model holds them: int8 block
// matrices at one byte an element plus a scale per column in the model's dtype, everything else in the dtype.
double weight_bytes(const ModelSpec& s) {
  const double size = static_cast<double>(dtype_size(s.dtype));
  double n = 0;
  for (const TensorSpec& t : used_weights(s)) {
    if (t.shape.size() != 2 || t.name == "wpe.weight") continue;
    if (t.name == "wte.weight" && (s.head != Head::lm_head || !s.arch.tied_head)) continue;
    const double elements = static_cast<double>(t.shape[0]) * static_cast<double>(t.shape[1]);
    if (s.weight_dtype == WeightDType::int8 && int8::quantised(t.name))
      n += elements + static_cast<double>(t.shape[1]) * size;
    else
      n += elements * size;
  }
  return n;
}

// A --dtypes entry: a dtype, or a dtype with int8 block weights ("f32-int8").
std::pair<DType, WeightDType> parse_bench_dtype(const std::string& text) {
  const std::size_t dash = text.find('-');
  const std::optional<DType> dtype = parse_dtype(text.substr(0, dash));
  if (!dtype || (dash != std::string::npos && text.substr(dash + 1) != "int8"))
    throw Error("bench: unknown dtype '" + text + "' (expected f32, f64, bf16, or one of them with -int8)");
  return {*dtype, dash == std::string::npos ? WeightDType::same : WeightDType::int8};
}

// ---- the machine --------------------------------------------------------------------------------------------------

constexpr std::int64_t kGemmSize = 2048;  // m = n = k of the host's oneDNN sgemm probe
struct ProbeShape {
  std::int64_t m, n, k;
};
constexpr ProbeShape kProbeShapes[] = {{2048, 2048, 2048}, {512, 3072, 768}};  // the backends' probes

struct GemmRate {
  std::string library;  // "oneDNN sgemm (host)" or the backend's name
  std::string backend;  // empty for the host's own probe
  DType dtype;
  double flop_per_s;
};

struct Machine {
  int threads = 1;
  double read = 0;  // bytes/s
  double copy = 0;  // bytes moved/s
  std::vector<GemmRate> gemm;

  // The fastest product in dtype measured in this run (0 when none was).
  double best_gemm(DType dtype) const {
    double best = 0;
    for (const GemmRate& g : gemm)
      if (g.dtype == dtype) best = std::max(best, g.flop_per_s);
    return best;
  }
  // The backend's own rate in dtype (0 when it has no probe for it).
  double backend_gemm(const std::string& backend, DType dtype) const {
    for (const GemmRate& g : gemm)
      if (g.backend == backend && g.dtype == dtype) return g.flop_per_s;
    return 0;
  }
};

// A model small enough to make at once, only to reach the backend's matmul probe with its default settings.
ModelSpec probe_spec(DType dtype) {
  ModelSpec spec;
  spec.family = "gpt2";
  family(spec.family).set_architecture(spec);
  spec.n_layer = spec.blocks = 1;
  spec.n_embd = 64;
  spec.n_head = 2;
  spec.vocab_size = 64;
  spec.n_positions = 8;
  spec.seq_len = 4;
  spec.head = Head::none;
  spec.dtype = dtype;
  return spec;
}

Machine measure_machine(const BenchRequest& r, const Registry& registry, std::ostream& out, const char* when) {
  Machine m;
  m.threads = roofline::all_threads();
  m.read = roofline::read_bandwidth(m.threads, std::size_t{1} << 30, 5);
  m.copy = roofline::copy_bandwidth(m.threads, std::size_t{1} << 29, 3);
  out << "machine, measured " << when << " with " << m.threads << " threads:\n"
      << "  read  " << std::fixed << std::setprecision(1) << m.read / 1e9
      << " GB/s (each thread sums its share of 1 GiB it wrote first; best of 5): the memory bound\n"
      << "  copy  " << m.copy / 1e9 << " GB/s moved (read + written, memcpy of 512 MiB shares; best of 3)\n"
      << std::flush;
#ifdef LMINV_HAVE_DNNL
  {
    const dnnl_dim_t n = kGemmSize;
    std::vector<float> a(n * n, 1.0f), b(n * n, 0.5f), c(n * n, 0.0f);
    const double s = best_time(3, [&] {
      dnnl_sgemm('N', 'N', n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    });
    m.gemm.push_back({"oneDNN sgemm (host)", "", DType::f32, 2.0 * n * n * n / s});
  }
#endif
  // Each backend's own product in each requested dtype it has, through a small model's probe.
  for (const std::string& backend_name : r.backends) {
    if (!registry.find(PluginKind::backend, backend_name)) continue;
    std::shared_ptr<Backend> backend = registry.create_backend(backend_name);
    backend->configure(Options("backend", "lminv bench", {}));
    const BackendInfo info = backend->info();
    if (info.dtypes.empty() || !supports(info, probe_spec(info.dtypes.front()))) continue;
    const ModelSpec spec = probe_spec(info.dtypes.front());
    auto model = keep_alive(backend->create_model(spec, std::make_shared<const WeightSet>(init_random_weights(spec, 0))),
                            backend);
    MatmulProbe* probe = matmul_probe_of(*model);
    if (!probe) continue;
    std::vector<DType> probed;
    for (const std::string& dtype_text : r.dtypes) {
      const std::optional<DType> dtype = parse_bench_dtype(dtype_text).first;  // f32-int8: f32's rate
      if (std::find(info.dtypes.begin(), info.dtypes.end(), *dtype) == info.dtypes.end()) continue;
      if (std::find(probed.begin(), probed.end(), *dtype) != probed.end()) continue;
      probed.push_back(*dtype);
      // The faster of a square product and one of a step's shapes (512 rows through an MLP weight of GPT-2
      // small): some libraries run the second faster, and a bound must take the faster.
      double best = 0;
      for (const auto& [mm, nn, kk] : kProbeShapes) {
        const double s = probe->matmul_seconds(*dtype, mm, nn, kk, std::clamp(r.repeat, 3, 5));  // 3 to 5: enough for a best-of, cheap at --repeat 40
        best = std::max(best, 2.0 * static_cast<double>(mm) * static_cast<double>(nn) * static_cast<double>(kk) / s);
      }
      m.gemm.push_back({backend_name, backend_name, *dtype, best});
    }
  }
  out << "  GEMM  (GFLOP/s; the faster of 2048^3 and 512 x 768 x 3072):";
  if (m.gemm.empty()) out << " not measured (no oneDNN in the host, no backend with a matmul probe)";
  for (const GemmRate& g : m.gemm)
    out << "  " << g.library << " " << dtype_name(g.dtype) << " " << std::setprecision(0) << g.flop_per_s / 1e9;
  out << "\n        the compute bound of a dtype is its fastest rate here\n\n" << std::flush;
  return m;
}

// The fastest of two measurements of each limit: a probe that ran while the machine was busy gives too low a limit,
// hence too lenient a bound, never too strict a one.
Machine best_of(const Machine& a, const Machine& b) {
  Machine m = a;
  m.read = std::max(a.read, b.read);
  m.copy = std::max(a.copy, b.copy);
  for (GemmRate& g : m.gemm)
    for (const GemmRate& h : b.gemm)
      if (h.library == g.library && h.dtype == g.dtype) g.flop_per_s = std::max(g.flop_per_s, h.flop_per_s);
  return m;
}

void write_machine(RecordsFile& file, const Machine& m, const char* which) {
  nlohmann::json rates = nlohmann::json::array();
  for (const GemmRate& g : m.gemm)
    rates.push_back({{"library", g.library}, {"backend", g.backend}, {"dtype", dtype_name(g.dtype)},
                     {"shapes", g.backend.empty() ? "2048^3" : "2048^3, 512x768x3072"}, {"flop_per_s", g.flop_per_s}});
  file.append({{"kind", "machine"},
                                {"measured", which},
                                {"time", utc_timestamp()},
                                {"threads", m.threads},
                                {"read_bytes_per_s", m.read},
                                {"copy_bytes_moved_per_s", m.copy},
                                {"gemm", rates}});
}

// ---- cells --------------------------------------------------------------------------------------------------------

// What a cell measured, set against the machine.
struct Cell {
  double seconds = 0;
  double flops = 0;
  double bytes = 0;  // weights read
  roofline::Bound bound;
  double own_gemm = 0;  // the backend's GEMM rate in the cell's dtype (0: no probe)
  double peak = -1;     // peak resident bytes during the cell
};

Cell make_cell(const Machine& m, const std::string& backend, DType dtype, double seconds, double flops, double bytes,
               double peak) {
  Cell c;
  c.seconds = seconds;
  c.flops = flops;
  c.bytes = bytes;
  c.bound = roofline::bound(bytes, flops, m.read, m.best_gemm(dtype));
  c.own_gemm = m.backend_gemm(backend, dtype);
  c.peak = peak;
  return c;
}

// The columns every cell table shares, after its own: GFLOP/s, % of the backend's GEMM rate, the bound, what
// limits it, the time over the bound, the peak resident memory.
void print_cell(std::ostream& out, const Cell& c, bool& below_bound) {
  const double rate = c.flops / c.seconds;
  // Its own alignment and notation: what was printed before (the machine's lines, a progress line) may have left
  // the stream left-aligned.
  out << std::right << std::fixed << std::setw(11) << std::setprecision(4) << c.seconds << std::setw(9)
      << std::setprecision(1) << rate / 1e9;
  if (c.own_gemm > 0)
    out << std::setw(8) << std::setprecision(0) << 100.0 * rate / c.own_gemm;
  else
    out << std::setw(8) << "-";
  const double x = c.seconds / c.bound.seconds();
  out << std::setw(10) << std::setprecision(4) << c.bound.seconds() << std::setw(8) << c.bound.limiter()
      << std::setw(8) << std::setprecision(2) << x << (x < 1 ? "!" : " ") << std::setw(8) << std::setprecision(0)
      << (c.peak > 0 ? c.peak / (1024.0 * 1024.0) : NAN) << "\n"
      << std::flush;
  if (x < 1) below_bound = true;
}

// A measured cell, kept so that the end of the run can set it against the best limits of the run.
struct Row {
  int table = 0;       // 0: steps, 1: prefix cache
  std::string label;   // the table's first columns, printed
  std::string backend;
  DType dtype = DType::f32;
  double seconds = 0, flops = 0, bytes = 0, peak = -1;
  nlohmann::json record;  // the JSON Lines record's own keys
};

nlohmann::json cell_json(const Cell& c) {
  return {{"seconds", c.seconds},
          {"flops", c.flops},
          {"weight_bytes_read", c.bytes},
          {"memory_bound_s", c.bound.memory_s},
          {"compute_bound_s", c.bound.compute_s},
          {"bound_s", c.bound.seconds()},
          {"limiter", c.bound.limiter()},
          {"times_bound", c.seconds / c.bound.seconds()},
          {"backend_gemm_flop_per_s", c.own_gemm},
          {"share_of_backend_gemm", c.own_gemm > 0 ? c.flops / c.seconds / c.own_gemm : 0.0},
          {"peak_resident_bytes", c.peak}};
}

const char* kCellColumns = "     s/call  GFLOP/s  % GEMM     bound  limit  x bound  peak MiB\n";

// Resets the peak resident size so that the next reading is the cell's own; the first failure is reported once.
void cell_peak_start(bool& peak_reset_failed) {
  if (!roofline::reset_peak_resident()) peak_reset_failed = true;
}

// The prefix cache's next(): B candidate tokens after a prefix of r.cache_prefix tokens, forward only, for every
// backend whose decoder models offer the capability (f32, head none).
void bench_prefix_cache(const BenchRequest& r, const Registry& registry, const Machine& machine, std::ostream& out,
                        bool& below_bound, bool& peak_reset_failed, std::vector<Row>& rows) {
  out << "\nprefix cache: next() for B candidates after " << r.cache_prefix << " tokens (f32, head none)\n"
      << std::left << std::setw(11) << "backend" << std::setw(17) << "model" << std::right << std::setw(6) << "B"
      << kCellColumns;
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
      cell_peak_start(peak_reset_failed);
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
        cell_peak_start(peak_reset_failed);
        const double seconds = best_time(r.repeat, [&] { (void)cache->next(candidates); });
        // Each candidate multiplies every used weight once (attention over the prefix is not counted); the
        // weights are read once per call.
        const double params = parameters_used(spec);
        const Cell c = make_cell(machine, backend_name, DType::f32, seconds, 2.0 * params * static_cast<double>(batch),
                                 params * 4.0, roofline::peak_resident_bytes());
        std::ostringstream label;
        label << std::left << std::setw(11) << backend_name << std::setw(17) << model_name << std::right
              << std::setw(6) << batch;
        out << label.str();
        print_cell(out, c, below_bound);
        rows.push_back({1, label.str(), backend_name, DType::f32, seconds, c.flops, c.bytes, c.peak,
                        {{"kind", "prefix_cache"}, {"backend", backend_name}, {"model", model_name},
                         {"batch", batch}, {"prefix", r.cache_prefix}, {"seconds_per_call", seconds}}});
      }
    }
  }
  out << "GFLOP/s counts 2 x (parameters used) x B per call (one token per candidate); the memory bound reads the "
         "weights once.\n";
}

}  // namespace

void run_bench(const BenchRequest& r, const Registry& registry, std::ostream& out) {
  // --out is opened (checked, locked) before anything is measured.
  std::optional<RecordsFile> records;
  if (!r.out_file.empty()) records.emplace(r.out_file, &out);
  out << "lminv bench: 1block, 12blocks[-lmhead] = GPT-2 (d " << r.n_embd << ", " << r.n_layer << " blocks, V "
      << r.vocab << "), the other models their published shapes; " << r.tokens
      << " tokens, one step = loss_and_grad (l2), best of " << r.repeat
      << " after warm-up calls (at least 1, more for a quarter of a second)\n"
      << std::flush;
  const Machine machine = measure_machine(r, registry, out, "first");
  bool below_bound = false, peak_reset_failed = false;
  std::vector<Row> rows;

  out << std::left << std::setw(11) << "backend" << std::setw(10) << "dtype" << std::setw(17) << "model" << std::right
      << std::setw(4) << "B" << kCellColumns;

  // Progress over the step cells (skipped ones count as done).
  const std::int64_t per_model = static_cast<std::int64_t>(r.batches.size());
  Progress progress(progress_mode(r.progress), "cell",
                    static_cast<std::int64_t>(r.dtypes.size() * r.backends.size() * r.models.size()) * per_model);
  std::int64_t cells = 0;
  for (const std::string& dtype_text : r.dtypes) {
    const auto [dtype_value, weight_dtype] = parse_bench_dtype(dtype_text);
    const std::optional<DType> dtype = dtype_value;
    std::map<std::string, std::shared_ptr<const WeightSet>> weights_by_shape;  // made once per shape and dtype
    for (const std::string& backend_name : r.backends) {
      if (!registry.find(PluginKind::backend, backend_name)) {
        progress.clear();
        out << std::left << std::setw(11) << backend_name << "not installed: skipped\n";
        cells += per_model * static_cast<std::int64_t>(r.models.size());
        continue;
      }
      std::shared_ptr<Backend> backend = registry.create_backend(backend_name);
      backend->configure(Options("backend", "lminv bench", {}));
      const BackendInfo info = backend->info();
      if (std::find(info.dtypes.begin(), info.dtypes.end(), *dtype) == info.dtypes.end()) {
        progress.clear();
        out << std::left << std::setw(11) << backend_name << std::setw(10) << dtype_text << "not supported: skipped\n";
        cells += per_model * static_cast<std::int64_t>(r.models.size());
        continue;
      }
      for (const std::string& model_name : r.models) {
        const ModelCase mc = model_case(model_name, r);
        ModelSpec spec = bench_spec(r, mc.shape, *dtype, r.tokens);
        spec.blocks = mc.blocks < 0 ? spec.n_layer : mc.blocks;
        spec.head = mc.head;
        spec.weight_dtype = weight_dtype;
        if (!supports(info, spec)) {
          progress.clear();
          out << std::left << std::setw(11) << backend_name << std::setw(10) << dtype_text << std::setw(17)
              << model_name << "not supported: skipped\n";
          cells += per_model;
          continue;
        }
        std::shared_ptr<const WeightSet>& weights = weights_by_shape[mc.shape];
        if (!weights) {
          progress.note("random weights for " + mc.shape + " (" + dtype_text + ")");
          weights = std::make_shared<const WeightSet>(init_random_weights(spec, 0));
        }
        cell_peak_start(peak_reset_failed);
        auto model = keep_alive(backend->create_model(spec, weights), backend);
        for (std::int64_t batch : r.batches) {
          Tensor input(spec.dtype, input_shape(spec, batch));
          Rng rng(batch);
          fill_normal(input, rng, 0.0, 0.02);
          const Tensor target = model->forward(input.slice0(0, 1));
          if (batch != r.batches.front()) cell_peak_start(peak_reset_failed);
          const double seconds = best_time(r.repeat, [&] { (void)model->loss_and_grad(input, target, Metric::l2); });
          // Forward and input-gradient backward each multiply every used weight with B T vectors, and each reads
          // every used weight once.
          const double params = parameters_used(spec);
          const Cell c = make_cell(machine, backend_name, *dtype, seconds,
                                   4.0 * params * static_cast<double>(r.tokens * batch),
                                   2.0 * weight_bytes(spec),
                                   roofline::peak_resident_bytes());
          std::ostringstream label;
          label << std::left << std::setw(11) << backend_name << std::setw(10) << dtype_text << std::setw(17)
                << model_name << std::right << std::setw(4) << batch;
          progress.clear();
          out << label.str();
          print_cell(out, c, below_bound);
          progress.update(++cells, backend_name + " " + dtype_text + " " + model_name + " B " + std::to_string(batch));
          rows.push_back({0, label.str(), backend_name, *dtype, seconds, c.flops, c.bytes, c.peak,
                          {{"kind", "step"}, {"backend", backend_name}, {"dtype", dtype_text}, {"model", model_name},
                           {"batch", batch}, {"tokens", r.tokens}, {"seconds_per_step", seconds},
                           {"flops_per_step", c.flops}}});
        }
      }
    }
  }
  out << "\nGFLOP/s counts 4 x (parameters used) x B x T per step (forward + input-gradient backward); % GEMM is of the "
         "backend's own GEMM rate in that dtype;\nbound = max(weights read twice / read bandwidth, FLOPs / the "
         "dtype's fastest GEMM rate), limit = the larger term; x bound = s/step over the bound.\n";
  if (!r.cache_batches.empty()) bench_prefix_cache(r, registry, machine, out, below_bound, peak_reset_failed, rows);

  // The limits again, after the cells: the bounds are set from the faster of the two measurements of each.
  out << "\n";
  const Machine again = measure_machine(r, registry, out, "again, after the cells,");
  const Machine best = best_of(machine, again);
  out << "every cell against the best limits of the run (read " << std::setprecision(1) << best.read / 1e9
      << " GB/s; GEMM GFLOP/s:";
  for (const GemmRate& g : best.gemm)
    out << " " << g.library << " " << dtype_name(g.dtype) << " " << std::setprecision(0) << g.flop_per_s / 1e9;
  out << "):\n";
  below_bound = false;
  for (int table = 0; table < 2; ++table) {
    bool header = false;
    for (const Row& row : rows) {
      if (row.table != table) continue;
      if (!header) {
        out << (table == 0 ? std::string("\nsteps\n") + "backend    dtype     model               B"
                           : std::string("\nprefix cache\n") + "backend    model                 B")
            << kCellColumns;
        header = true;
      }
      const Cell c = make_cell(best, row.backend, row.dtype, row.seconds, row.flops, row.bytes, row.peak);
      out << row.label;
      print_cell(out, c, below_bound);
      if (!r.out_file.empty()) {
        nlohmann::json j = row.record;
        j.update(cell_json(c));
        records->append(j);
      }
    }
  }
  if (!r.out_file.empty()) {
    write_machine(*records, machine, "first");
    write_machine(*records, again, "again");
    write_machine(*records, best, "best");
  }
  out << "peak MiB: the process's peak resident memory during the cell (the model, the shared random weights, the "
         "work space)"
      << (peak_reset_failed ? "; this kernel does not reset the peak, so it is the process's since it started" : "")
      << ".\n";
  if (below_bound)
    out << "! below its bound: a limit of this machine was measured too low (a noisy probe?); rerun on a quiet "
           "machine.\n";
}

}  // namespace lminv
