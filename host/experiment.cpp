#include "experiment.hpp"

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <sstream>
#include <unistd.h>
#include <cmath>

#include "checkpoint.hpp"
#include "files.hpp"
#include "report.hpp"
#include "pinv_decoder.hpp"
#include "weights_init.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {

template <class T>
bool contains(const std::vector<T>& v, const T& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

template <class Items, class ToString>
std::string join(const Items& items, ToString to_string) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + std::string(to_string(i));
  return s;
}

// Refuses, before the model is made, what the backend says it cannot build.
void check_supported(const Backend& backend, const std::string& name, const ModelSpec& spec) {
  const BackendInfo info = backend.info();
  auto same = [](const std::string& s) { return s; };
  if (!contains(info.kinds, spec.kind))
    throw Error("backend '" + name + "' does not build " + kind_name(spec.kind) + " models (family '" + spec.family +
                "'; it builds " + join(info.kinds, kind_name) + ")");
  check_features(spec, info.features, "backend '" + name + "'");
  if (!contains(info.dtypes, spec.dtype))
    throw Error("backend '" + name + "' does not support dtype '" + dtype_name(spec.dtype) + "' (it supports " +
                join(info.dtypes, dtype_name) + ")");
  if (!contains(info.devices, spec.device))
    throw Error("backend '" + name + "' does not support device '" + spec.device + "' (it supports " +
                join(info.devices, same) + ")");
}

bool is_checkpoint(const ExperimentConfig& config) {
  return config.weights != "random";
}

// Random weights of sizes this machine cannot hold are refused before the allocation, naming the sizes (the product
// is taken in long double: no overflow however absurd the sizes).
void check_weights_fit(const ExperimentConfig& config, const ModelSpec& spec) {
  long double bytes = 0;
  for (const TensorSpec& t : weight_schema(spec)) {
    long double n = 1;
    for (std::int64_t d : t.shape) n *= static_cast<long double>(d);
    bytes += n * static_cast<long double>(dtype_size(spec.dtype));
  }
  const long double memory = static_cast<long double>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGESIZE);
  if (memory > 0 && bytes > memory) {
    std::ostringstream msg;
    msg << config.source << ": [model] n_layer = " << spec.n_layer << ", n_embd = " << spec.n_embd
        << ", n_inner = " << spec.inner() << ", vocab_size = " << spec.vocab_size << ", n_positions = "
        << spec.n_positions;
    if (spec.kind != ModelKind::decoder) msg << ", " << spec.seq_len << " tokens";
    msg << " in " << dtype_name(spec.dtype) << " make " << std::setprecision(3) << bytes / 1073741824.0L
        << " GiB of weights, more than this machine's " << memory / 1073741824.0L << " GiB of memory";
    throw Error(msg.str());
  }
}

// A NaN or an infinity in the weights makes every output NaN: refused before any run, naming the tensor. So are
// f64 weights beyond the range of the model's f32 or bf16 (they would become infinities in the backend).
void check_finite_weights(const WeightSet& weights, const std::string& origin, DType model_dtype) {
  for (const auto& [name, t] : weights.tensors()) {
    const std::int64_t at = first_non_finite(t);
    if (at >= 0)
      throw Error(origin + ": tensor '" + name + "' " + shape_string(t.shape()) + " holds " +
                  (std::isnan(t.get(at)) ? "NaN" : "an infinity") + " at element " + std::to_string(at) +
                  "; lminv does not run a model whose weights are not all finite");
    if (t.dtype() != DType::f64 || model_dtype == DType::f64) continue;
    const double most = 3.3895313892515355e38;  // FLT_MAX and bf16's largest finite value, both about 3.39e38
    const double* v = t.data<double>();
    for (std::int64_t i = 0; i < t.numel(); ++i)
      if (std::abs(v[i]) > most)
        throw Error(origin + ": tensor '" + name + "' " + shape_string(t.shape()) + " holds " + std::to_string(v[i]) +
                    " at element " + std::to_string(i) + ", beyond the range of " + dtype_name(model_dtype) +
                    " (the backend's dtype): it would become an infinity; use dtype = f64");
  }
}

}  // namespace

fs::path tokenizer_folder(const ExperimentConfig& config) {
  if (!config.tokenizer_dir.empty()) return config.tokenizer_dir;
  if (is_checkpoint(config)) {
    const fs::path folder = config.weights;
    if (fs::exists(folder / "tokenizer.json")) return folder;
    if (fs::exists(folder / "vocab.json") && fs::exists(folder / "merges.txt")) return folder;
  }
  return default_tokenizer_dir();
}

void copy_tokenizer_files(const fs::path& tokenizer_dir, const fs::path& dir) {
  std::vector<std::pair<std::string, std::string>> files;
  if (fs::exists(tokenizer_dir / "tokenizer.json")) {
    files.push_back({"tokenizer.json", "tokenizer.json"});
    if (fs::exists(tokenizer_dir / "tokenizer_config.json"))
      files.push_back({"tokenizer_config.json", "tokenizer_config.json"});
  } else {
    const bool hf_names = fs::exists(tokenizer_dir / "vocab.json");
    files.push_back({hf_names ? "vocab.json" : "encoder.json", "vocab.json"});
    files.push_back({hf_names ? "merges.txt" : "vocab.bpe", "merges.txt"});
  }
  for (const auto& [from, to] : files)
    write_file_atomically(dir / to, read_regular_file(tokenizer_dir / from, "the tokenizer file", max_bytes::kTokenizer));
}

std::shared_ptr<const WeightSet> make_weights(const ExperimentConfig& config, ModelSpec& spec) {
  if (!is_checkpoint(config)) {
    check_weights_fit(config, spec);
    auto weights = std::make_shared<const WeightSet>(init_random_weights(spec, config.seed));
    check_finite_weights(*weights, config.source + ": the random weights of [model]", spec.dtype);
    return weights;
  }

  Checkpoint checkpoint = load_checkpoint(config.weights);
  const ModelSpec& c = checkpoint.spec;
  if (config.family_explicit && spec.family != c.family)
    throw Error(config.source + ": [model] family = " + spec.family + ", but the checkpoint " + config.weights +
                " is a " + c.family + " model (its config.json's model_type); remove the key or give a " +
                spec.family + " folder");
  spec.family = c.family;
  spec.kind = c.kind;
  spec.arch = c.arch;
  if (config.no_positions) spec.arch.positions = Positions::none;  // the seed study's InputGPT adds no wpe
  spec.n_layer = c.n_layer;
  spec.n_embd = c.n_embd;
  spec.n_head = c.n_head;
  spec.n_inner = c.n_inner;
  spec.vocab_size = c.vocab_size;
  spec.n_positions = c.n_positions;
  if (spec.blocks > spec.n_layer)
    throw Error(config.source + ": [model] blocks = " + std::to_string(spec.blocks) + ": the checkpoint " +
                config.weights + " has " + std::to_string(spec.n_layer) + " blocks");
  for (std::int64_t l : spec.layers)
    if (l > spec.n_layer)
      throw Error(config.source + ": [model] layers: " + std::to_string(l) + " is past the checkpoint's " +
                  std::to_string(spec.n_layer) + " blocks");
  check_finite_weights(checkpoint.weights, config.weights, spec.dtype);
  return std::make_shared<const WeightSet>(std::move(checkpoint.weights));
}

std::shared_ptr<Backend> make_backend(const ExperimentConfig& config, const Registry& registry) {
  std::shared_ptr<Backend> backend = registry.create_backend(config.backend);
  backend->configure(config.backend_options);
  check_all_read(config.backend_options);
  return backend;
}

Experiment build_experiment(const ExperimentConfig& config, std::shared_ptr<Backend> backend) {
  ExperimentFactory factory(config, std::move(backend));
  return factory.build(config_prompt_ids(config, factory.tokenizer()));
}

ExperimentFactory::ExperimentFactory(const ExperimentConfig& config, std::shared_ptr<Backend> backend)
    : config_(config),
      backend_(std::move(backend)),
      tokenizer_(Tokenizer::from_folder(tokenizer_folder(config))),
      spec_(config.spec) {
  if (!config.vocab_size_explicit) spec_.vocab_size = tokenizer_.vocab_size();
  spec_.seq_len = 1;  // checked per prompt
  // A checkpoint's architecture is known once its config.json is read (build() checks again then).
  check_supported(*backend_, config.backend, spec_);
}

Experiment ExperimentFactory::build(const std::vector<std::int64_t>& ids) {
  if (ids.empty()) throw Error(config_.source + ": [prompt] has no tokens");
  Experiment e = build_unknown(static_cast<std::int64_t>(ids.size()));
  for (std::int64_t id : ids)
    if (id < 0 || id >= e.spec.vocab_size)
      throw Error(config_.source + ": [prompt] token id " + std::to_string(id) + " is outside the vocabulary (size " +
                  std::to_string(e.spec.vocab_size) + ")");
  e.prompt_ids = ids;
  e.prompt_text = display_text(tokenizer_, ids);
  e.true_input = true_input_for(ids, e.spec, *e.weights, e.vocab);
  return e;
}

Experiment ExperimentFactory::build_unknown(std::int64_t T) {
  if (T < 1) throw Error(config_.source + ": a prompt needs at least one position");
  // A decoder's and the per-token MLP's weights do not depend on the prompt's length; fcnet's do.
  const bool per_length = !spec_.any_length();
  const std::int64_t key = per_length ? T : 0;
  auto found = weights_.find(key);
  if (found == weights_.end()) {
    ModelSpec spec = spec_;
    spec.seq_len = T;
    const auto start = std::chrono::steady_clock::now();
    std::shared_ptr<const WeightSet> weights = make_weights(config_, spec);
    weights_seconds_[key] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (is_checkpoint(config_)) check_supported(*backend_, config_.backend, spec);
    found = weights_.emplace(key, std::make_pair(spec, std::move(weights))).first;
  }
  ModelSpec spec = found->second.first;
  spec.seq_len = T;
  const std::shared_ptr<const WeightSet>& weights = found->second.second;
  if (spec.seq_len > spec.n_positions && spec.kind == ModelKind::decoder)
    throw Error(config_.source + ": the prompt has " + std::to_string(spec.seq_len) + " tokens, more than the model's " +
                std::to_string(spec.n_positions) + " positions");
  // One model for every length where the network takes any (weights held once), one per length otherwise.
  std::shared_ptr<Model>& model = models_[key];
  if (!model) model = keep_alive(backend_->create_model(spec, weights), backend_);
  std::shared_ptr<Model> sized = per_length ? model : std::make_shared<LengthView>(model, T);

  Experiment e{tokenizer_, {}, "", spec, weights, backend_, sized, {}, 0};
  e.vocab = vocab_encoding_of(config_);
  e.weights_seconds = weights_seconds_[key];
  return e;
}

std::vector<std::int64_t> prefix_for_ids(const ExperimentConfig& config, const Tokenizer& tokenizer) {
  if (!config.prefix_ids.empty()) return config.prefix_ids;
  if (!config.prefix_text.empty()) return tokenizer.encode(config.prefix_text);
  return {};
}

std::vector<std::int64_t> prefix_for_text(const ExperimentConfig& config, const Tokenizer& tokenizer) {
  std::vector<std::int64_t> ids;
  if (config.bos == "yes") {
    const std::optional<std::int64_t> bos = tokenizer.bos_id();
    if (!bos)
      throw Error(config.source + ": [prompt] bos = yes, but the tokenizer (" + tokenizer.kind() +
                  ") has no BOS token");
    ids.push_back(*bos);
  } else if (config.bos == "auto") {
    ids = tokenizer.special_prefix();
  }
  const std::vector<std::int64_t> own = prefix_for_ids(config, tokenizer);
  ids.insert(ids.end(), own.begin(), own.end());
  return ids;
}

std::vector<std::int64_t> text_prompt_ids(const ExperimentConfig& config, const Tokenizer& tokenizer,
                                          const std::string& text) {
  std::vector<std::int64_t> ids = prefix_for_text(config, tokenizer);
  const std::vector<std::int64_t> own = tokenizer.encode(text);
  ids.insert(ids.end(), own.begin(), own.end());
  return ids;
}

std::vector<std::int64_t> config_prompt_ids(const ExperimentConfig& config, const Tokenizer& tokenizer) {
  if (config.prompt_text.empty() && config.prompt_ids.empty())
    throw Error(config.source + ": [prompt] has neither text nor ids (for states without a prompt, use lminv invert)");
  if (!config.prompt_text.empty()) return text_prompt_ids(config, tokenizer, config.prompt_text);
  std::vector<std::int64_t> ids = prefix_for_ids(config, tokenizer);
  ids.insert(ids.end(), config.prompt_ids.begin(), config.prompt_ids.end());
  return ids;
}

std::size_t known_prefix_length(const ExperimentConfig& config, const Tokenizer& tokenizer,
                                const std::vector<std::int64_t>& ids) {
  auto starts_with = [&](const std::vector<std::int64_t>& p) {
    return p.size() <= ids.size() && std::equal(p.begin(), p.end(), ids.begin());
  };
  const std::vector<std::int64_t> text = prefix_for_text(config, tokenizer);
  if (!text.empty() && starts_with(text)) return text.size();
  const std::vector<std::int64_t> own = prefix_for_ids(config, tokenizer);
  return starts_with(own) ? own.size() : 0;
}

VocabEncoding vocab_encoding_of(const ExperimentConfig& config) {
  return {config.vocab_encoding == "pinv", config.vocab_scale};
}

Tensor true_input_for(const std::vector<std::int64_t>& ids, const ModelSpec& spec, const WeightSet& weights,
                      const VocabEncoding& vocab) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = spec.vocab_size, d = spec.n_embd;
  Tensor input(spec.dtype, input_shape(spec, 1));
  if (spec.input == InputSpace::vocab) {
    if (!vocab.pinv) {
      for (std::int64_t t = 0; t < T; ++t) input.set(t * V + ids[t], vocab.scale);
      return input;
    }
    const Tensor& wte_given = weights.get("wte.weight", {V, d});
    const Tensor widened = wte_given.dtype() == DType::bf16 ? wte_given.to(DType::f32) : Tensor();
    const Tensor& wte = widened.empty() ? wte_given : widened;
    Eigen::MatrixXd et(d, T);  // the tokens' embeddings as columns
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < d; ++j) et(j, t) = wte.get(ids[t] * d + j);
    std::vector<double> rows(static_cast<std::size_t>(T * V));
    pinv::pinv_vocab_rows(wte, et, rows.data());
    for (std::int64_t i = 0; i < T * V; ++i) input.set(i, vocab.scale * rows[i]);
    return input;
  }
  const Tensor& wte = weights.get("wte.weight", {spec.vocab_size, spec.n_embd});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < spec.n_embd; ++j) input.set(t * spec.n_embd + j, wte.get(ids[t] * spec.n_embd + j));
  return input;
}

std::string display_text(const Tokenizer& tokenizer, const std::vector<std::int64_t>& ids) {
  std::string text;
  std::vector<std::int64_t> run;
  for (std::int64_t id : ids) {
    if (id >= 0 && id < tokenizer.vocab_size()) {
      run.push_back(id);
      continue;
    }
    text += tokenizer.decode(run) + "<" + std::to_string(id) + ">";
    run.clear();
  }
  return text + tokenizer.decode(run);
}

}  // namespace lminv
