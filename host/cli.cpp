#include "cli.hpp"

#include <boost/program_options.hpp>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <omp.h>
#include <optional>
#include <sstream>

#include "bench.hpp"
#include "checkpoint.hpp"
#include "compare.hpp"
#include "config.hpp"
#include "experiment.hpp"
#include "files.hpp"
#include "families/family.hpp"
#include "invert.hpp"
#include "paths.hpp"
#include "progress.hpp"
#include "prompts.hpp"
#include "registry.hpp"
#include "report.hpp"
#include "report_page.hpp"
#include "runner.hpp"
#include "mpi.hpp"
#include "scale_out.hpp"
#include "sweep.hpp"
#include "train.hpp"
#include "safetensors.hpp"
#include "tokenizer.hpp"

namespace lminv {

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace {

// "gpt2, llama, ..." for the families with Hugging Face checkpoints.
std::string checkpoint_families() {
  std::string out;
  for (const std::string& n : family_names())
    if (family(n).has_checkpoints()) out += (out.empty() ? "" : ", ") + n;
  return out;
}

struct UsageError : Error {
  using Error::Error;
};

// An output the command would replace: refused unless --force, before any work (the old file or folder stays).
void refuse_overwrite(const fs::path& out, bool force, const char* command) {
  std::error_code ec;
  if (force || !fs::exists(out, ec)) return;
  if (fs::is_directory(out, ec)) {
    if (fs::is_empty(out, ec)) return;
    throw Error(std::string(command) + ": --out " + out.string() +
                " is a folder that is not empty; lminv would replace what is there (add --force to do so)");
  }
  throw Error(std::string(command) + ": --out " + out.string() + " exists; add --force to replace it");
}

constexpr const char* kOverview =
    "lminv " LMINV_VERSION
    " - run language models backwards\n"
    "\n"
    "usage: lminv COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  run CONFIG [--set section.key=value ...]   run an inversion experiment\n"
    "  invert CONFIG --states FILE                recover the prompt behind captured hidden states, certified\n"
    "  forward CONFIG --out FILE.safetensors      write the config's model output (and input gradient)\n"
    "  init CONFIG --out DIR                      save the config's model as a Hugging Face GPT-2 folder\n"
    "  compare CONFIG --across section.key=A,B,.. run one experiment per value and compare them\n"
    "  bench                                      time an inversion step per backend against this machine\n"
    "  plugins                                    list the plugins found, and those refused\n"
    "  tokenize TEXT                              show GPT-2 token ids and pieces\n"
    "  prompts --out FILE                         write a prompt set: corpus sentences + random token ids\n"
    "  sweep CONFIG... --prompts FILE [--grid ..] run configs on every prompt (x every grid point), resumable\n"
    "  sweep CONFIG... --states FILE              invert every entry of a set of captured states, resumable\n"
    "  report INPUT... --out FILE.html            one offline HTML page with plots of runs, sweeps, comparisons\n"
    "  train CONFIG                               train the config's decoder on a text corpus (torch), resumable\n"
    "\n"
    "Every command takes --help, and --plugin-dir DIR (repeatable) to search more folders for plugins.\n";

po::options_description common_options() {
  po::options_description d("common options");
  d.add_options()("help,h", "show this help")("plugin-dir", po::value<std::vector<std::string>>()->composing(),
                                              "also search DIR for plugins (repeatable)");
  return d;
}

po::variables_map parse(const std::vector<std::string>& args, const po::options_description& visible,
                        const po::positional_options_description& positional, const po::options_description& hidden) {
  po::options_description all;
  all.add(visible).add(hidden);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  return vm;
}

Registry make_registry(const po::variables_map& vm) {
  std::vector<fs::path> extra;
  if (vm.count("plugin-dir"))
    for (const std::string& d : vm["plugin-dir"].as<std::vector<std::string>>()) {
      if (!fs::is_directory(d)) throw Error("--plugin-dir '" + d + "': no such folder");
      extra.emplace_back(d);
    }
  return Registry(plugin_search_dirs(extra));
}

void warn_rejected(const Registry& registry, std::ostream& err) {
  for (const RejectedPlugin& r : registry.rejected())
    err << "lminv: warning: refused plugin " << r.file.string() << ": " << r.reason << "\n";
}

// The positional CONFIG with its --set overrides, parsed and checked.
// The --set overrides, with --quiet as output.progress=off after them (it wins).
std::vector<std::string> overrides_of(const po::variables_map& vm) {
  std::vector<std::string> overrides =
      vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (vm.count("quiet")) overrides.push_back("output.progress=off");
  return overrides;
}

ExperimentConfig config_from(const po::variables_map& vm, const char* command) {
  if (!vm.count("config"))
    throw UsageError(std::string(command) + ": missing CONFIG (see lminv " + command + " --help)");
  return parse_experiment(read_config(vm["config"].as<std::string>(), overrides_of(vm)));
}

po::options_description config_options() {
  po::options_description d;
  d.add_options()("set", po::value<std::vector<std::string>>()->composing(),
                  "override a config value: section.key=value (repeatable)")(
      "quiet,q", "no progress line (the same as --set output.progress=off)");
  return d;
}

po::options_description config_positional(po::positional_options_description& positional) {
  po::options_description hidden;
  hidden.add_options()("config", po::value<std::string>());
  positional.add("config", 1);
  return hidden;
}

int cmd_run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv run CONFIG [options]\n\nRuns the experiment described by CONFIG (an INI file; "
      "see docs/configs.md) and appends its record to <output.dir>/records.jsonl.\n\noptions");
  visible.add(common_options()).add(config_options());
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  const ExperimentConfig config = config_from(vm, "run");
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_experiment(config, registry, out);
  return 0;
}

int cmd_invert(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv invert CONFIG --states FILE [options]\n\nRecovers the prompt behind hidden states captured by another "
      "program: FILE is a safetensors (.safetensors), NumPy (.npy) or NumPy zip (.npz) file holding a [T, D] or "
      "[1, T, D] tensor, the output of CONFIG's model at its layer (model.blocks and model.head: from the file's "
      "metadata when it has them, as lminv forward writes them, else from CONFIG; --set wins over both). The search "
      "(CONFIG's sequential or brute_force optimizer; sequential when CONFIG names none) fixes the known prefix (BOS "
      "and [prompt] prefix), recovers every other position and certifies each: accepted distance, epsilon, the best "
      "rival's distance and their ratio, and a verdict (unique, ambiguous with its rivals listed, not found). Prints "
      "the certificate table and appends one JSON record to <output.dir>/records.jsonl (or --records FILE). See "
      "docs/exact-inversion.md.\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("states", po::value<std::string>(), "the states file")(
      "tensor", po::value<std::string>(), "the tensor (array) in FILE; default: the only one, else \"output\"")(
      "records", po::value<std::string>(), "the JSON Lines file to append the record to");
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("config")) throw UsageError("invert: missing CONFIG (see lminv invert --help)");
  if (!vm.count("states")) throw UsageError("invert: missing --states FILE");
  InvertRequest request;
  request.config_file = vm["config"].as<std::string>();
  request.states = vm["states"].as<std::string>();
  if (vm.count("tensor")) request.tensor = vm["tensor"].as<std::string>();
  request.overrides = overrides_of(vm);
  if (vm.count("records")) request.records = vm["records"].as<std::string>();
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_invert(request, registry, out);
  return 0;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int cmd_forward(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv forward CONFIG --out FILE.safetensors [options]\n\nRuns the config's model on its prompt and writes "
      "'input' (the true input), 'output' and, with --grad, 'input_grad' (the input gradient of the metric against "
      "a zero target) to FILE, with the prompt ids and the loss in its metadata. Prints the times of the forward pass "
      "and of the forward + backward pass.\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("out", po::value<std::string>(), "the safetensors file to write")(
      "force", "replace FILE when it exists")(
      "grad", po::value<std::string>(), "also the input gradient of METRIC (l1 | l2 | cosine) against a zero target")(
      "repeat", po::value<int>()->default_value(1), "time each pass N times; prints the best and the mean");
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("out")) throw UsageError("forward: missing --out FILE.safetensors");
  refuse_overwrite(vm["out"].as<std::string>(), vm.count("force") != 0, "forward");
  const int repeat = vm["repeat"].as<int>();
  if (repeat < 1) throw UsageError("forward: --repeat must be at least 1");
  std::optional<Metric> metric;
  if (vm.count("grad")) {
    metric = parse_metric(vm["grad"].as<std::string>());
    if (!metric) throw UsageError("forward: --grad '" + vm["grad"].as<std::string>() + "': expected l1, l2 or cosine");
  }
  const ExperimentConfig config = config_from(vm, "forward");
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  Experiment e = build_experiment(config, make_backend(config, registry));

  // Times of `repeat` calls of f: best and mean.
  auto timed = [repeat](auto&& f) {
    double best = INFINITY, total = 0;
    for (int i = 0; i < repeat; ++i) {
      const auto start = std::chrono::steady_clock::now();
      f();
      const double s = seconds_since(start);
      best = std::min(best, s);
      total += s;
    }
    return std::pair{best, total / repeat};
  };
  Tensor output;
  const auto [forward_best, forward_mean] = timed([&] { output = e.model->forward(e.true_input); });
  std::map<std::string, Tensor> tensors{{"input", e.true_input}, {"output", output}};
  std::map<std::string, std::string> metadata{{"prompt_ids", nlohmann::json(e.prompt_ids).dump()},
                                              {"model", e.spec.family},
                                              {"blocks", std::to_string(e.spec.blocks)},
                                              {"head", head_name(e.spec.head)},
                                              {"input_space", input_space_name(e.spec.input)},
                                              {"dtype", dtype_name(e.spec.dtype)},
                                              {"weight_dtype", weight_dtype_name(e.spec.weight_dtype)},
                                              {"backend", config.backend},
                                              {"config", config.source}};

  out << "lminv forward " << config.source << "\n"
      << "  prompt    " << nlohmann::json(e.prompt_text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
      << "  (" << e.spec.seq_len << " tokens)\n"
      << "  output    " << shape_string(output.shape()) << " " << dtype_name(output.dtype()) << "\n"
      << std::setprecision(4) << "  forward             best " << forward_best << " s, mean " << forward_mean
      << " s over " << repeat << "\n";
  if (metric) {
    const Tensor zero_target(output.dtype(), output.shape());
    LossAndGrad lg;
    const auto [grad_best, grad_mean] = timed([&] { lg = e.model->loss_and_grad(e.true_input, zero_target, *metric); });
    tensors["input_grad"] = lg.grad;
    metadata["grad_metric"] = metric_name(*metric);
    metadata["loss"] = nlohmann::json(lg.loss[0]).dump();
    out << "  forward + backward  best " << grad_best << " s, mean " << grad_mean << " s over " << repeat << "  ("
        << metric_name(*metric) << " loss " << lg.loss[0] << ")\n";
  }
  for (const auto& [name, t] : tensors)
    if (const std::int64_t at = first_non_finite(t); at >= 0)
      throw Error("forward: '" + name + "' " + shape_string(t.shape()) + " holds " +
                  (std::isnan(t.get(at)) ? "NaN" : "an infinity") + " at element " + std::to_string(at) +
                  " (past the range of " + dtype_name(e.spec.dtype) + "); " + vm["out"].as<std::string>() +
                  " was not written");
  write_safetensors(vm["out"].as<std::string>(), tensors, metadata);
  out << "  wrote     " << vm["out"].as<std::string>() << "\n";
  return 0;
}

int cmd_init(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible(
      "lminv init CONFIG --out DIR [options]\n\nSaves the config's model (its seeded random weights, or "
      "the checkpoint it names) as a Hugging Face folder of its family: model.safetensors, config.json, and the "
      "tokenizer's files (tokenizer.json, or vocab.json and merges.txt).\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("out", po::value<std::string>(), "the folder to write (new or empty)")(
      "force", "write into DIR even when it holds files (those of the same names are replaced)");
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("out")) throw UsageError("init: missing --out DIR");
  refuse_overwrite(vm["out"].as<std::string>(), vm.count("force") != 0, "init");
  const ExperimentConfig config = config_from(vm, "init");
  if (!family(config.spec.family).has_checkpoints())
    throw Error(config.source + ": [model] family = " + config.spec.family +
                ": lminv init writes Hugging Face folders of decoder families (" + checkpoint_families() + ")");
  const fs::path dir = vm["out"].as<std::string>();
  const fs::path tokenizer_dir = tokenizer_folder(config);
  const Tokenizer tokenizer = Tokenizer::from_folder(tokenizer_dir);
  ModelSpec spec = config.spec;
  spec.seq_len = 1;
  if (!config.vocab_size_explicit) spec.vocab_size = tokenizer.vocab_size();
  const auto start = std::chrono::steady_clock::now();
  Progress phase(progress_mode(config.progress), "init", 0);  // large models take a while: say what is going on
  phase.note("making the weights (" + config.weights + ")");
  const std::shared_ptr<const WeightSet> weights = make_weights(config, spec);
  phase.note("writing " + (dir / "model.safetensors").string() + " (" + byte_size(weights->nbytes()) + ")");
  save_checkpoint(dir, spec, *weights);
  phase.clear();
  copy_tokenizer_files(tokenizer_dir, dir);  // the tokenizer goes with the model
  out << "lminv init " << config.source << "\n  wrote " << dir.string() << ": " << spec.family
      << " n_layer=" << spec.n_layer
      << " n_embd=" << spec.n_embd << " n_head=" << spec.n_head << " vocab_size=" << spec.vocab_size << " ("
      << weights->nbytes() / 1e6 << " MB, " << dtype_name(spec.dtype) << ") in " << std::setprecision(3)
      << seconds_since(start) << " s\n";
  return 0;
}

int cmd_compare(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv compare CONFIG --across section.key=A,B,... [options]\n\nRuns CONFIG once per value of the key (any "
      "key: backend.name=reference,torch,onednn or backend.dtype=f32,f64) and prints one table: against the first "
      "value, the max absolute and normalised difference of the model's output and input gradient on the prompt, "
      "then each run's final loss, decoded text and time. The rows are appended to <output.dir>/compare.jsonl "
      "(or --table FILE).\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("across", po::value<std::string>(), "section.key=value1,value2,... (the first is the baseline)")(
      "table", po::value<std::string>(), "the JSON Lines file for the table");
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("config")) throw UsageError("compare: missing CONFIG (see lminv compare --help)");
  if (!vm.count("across")) throw UsageError("compare: missing --across section.key=A,B,...");
  CompareRequest request;
  request.config_file = vm["config"].as<std::string>();
  request.overrides = overrides_of(vm);
  if (vm.count("table")) request.table_file = vm["table"].as<std::string>();
  parse_across(vm["across"].as<std::string>(), request);
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_compare(request, registry, out);
  return 0;
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string word; std::getline(in, word, ',');)
    if (!word.empty()) out.push_back(word);
  return out;
}

int cmd_bench(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  BenchRequest r;
  po::options_description visible(
      "lminv bench [options]\n\nTimes one inversion step (forward + loss + input gradient) of GPT-2 small (or another family's shape) on each "
      "backend, dtype, model and batch size, and measures this machine's copy bandwidth and f32 GEMM rate in the "
      "same run, to give each step's share of its roofline. See bench/RESULTS.md.\n\noptions");
  visible.add(common_options());
  visible.add_options()("backends", po::value<std::string>()->default_value("reference,torch,onednn"), "backends")(
      "dtypes", po::value<std::string>()->default_value("f32,f64"),
      "dtypes; f32-int8, f64-int8: with int8 block weights (the memory bound counts their bytes)")(
      "batches", po::value<std::string>()->default_value("1,8,32"), "batch sizes (independent starts)")(
      "models", po::value<std::string>()->default_value("1block,12blocks,12blocks-lmhead"),
      "models: 1block, 12blocks, 12blocks-lmhead (GPT-2 of --n-layer blocks), pythia-160m, tinyllama-1.1b, gpt2-xl (random "
      "weights of those shapes, every block; -lmhead: with the head)")(
      "tokens", po::value<std::int64_t>()->default_value(5), "prompt length T")(
      "repeat", po::value<int>()->default_value(3),
      "timed steps per cell (best counts), after warm-up steps for a quarter of a second (1 to 10)")(
      "n-layer", po::value<std::int64_t>()->default_value(12), "blocks of the model (12: GPT-2 small)")(
      "cache-batches", po::value<std::string>()->default_value("16,769"),
      "candidates per prefix-cache call (exact inversion's verifier); 'none' skips those cells")(
      "cache-prefix", po::value<std::int64_t>()->default_value(19), "prefix length for the prefix-cache cells")(
      "out", po::value<std::string>(), "append the results as JSON Lines to FILE")(
      "progress", po::value<std::string>()->default_value("auto"),
      "progress line over the cells on stderr: auto, on, lines, off")("quiet,q", "no progress line");
  const po::variables_map vm = parse(args, visible, {}, {});
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  r.backends = split_commas(vm["backends"].as<std::string>());
  r.dtypes = split_commas(vm["dtypes"].as<std::string>());
  r.models = split_commas(vm["models"].as<std::string>());
  r.batches.clear();
  for (const std::string& b : split_commas(vm["batches"].as<std::string>())) {
    char* end = nullptr;
    const long long v = std::strtoll(b.c_str(), &end, 10);
    if (*end || v < 1) throw UsageError("bench: --batches: '" + b + "' is not a positive integer");
    r.batches.push_back(v);
  }
  r.cache_batches.clear();
  if (vm["cache-batches"].as<std::string>() != "none")
    for (const std::string& b : split_commas(vm["cache-batches"].as<std::string>())) {
      char* end = nullptr;
      const long long v = std::strtoll(b.c_str(), &end, 10);
      if (*end || v < 1) throw UsageError("bench: --cache-batches: '" + b + "' is not a positive integer");
      r.cache_batches.push_back(v);
    }
  r.cache_prefix = vm["cache-prefix"].as<std::int64_t>();
  if (r.cache_prefix < 0 || r.cache_prefix + 1 > 1024) throw UsageError("bench: --cache-prefix must be in 0 .. 1023");
  r.tokens = vm["tokens"].as<std::int64_t>();
  r.repeat = vm["repeat"].as<int>();
  r.n_layer = vm["n-layer"].as<std::int64_t>();
  if (r.tokens < 1 || r.repeat < 1 || r.n_layer < 1) throw UsageError("bench: --tokens, --repeat, --n-layer must be >= 1");
  if (vm.count("out")) r.out_file = vm["out"].as<std::string>();
  r.progress = vm.count("quiet") ? "off" : vm["progress"].as<std::string>();
  if (r.progress != "auto" && r.progress != "on" && r.progress != "lines" && r.progress != "off")
    throw UsageError("bench: --progress '" + r.progress + "': expected auto, on, lines or off");
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_bench(r, registry, out);
  return 0;
}

std::string supports(const Registry& registry, const PluginInfo& info) {
  if (info.kind != PluginKind::backend) return info.summary;
  try {
    const BackendInfo b = registry.create_backend(info.name)->info();
    std::string s;
    for (ModelKind k : b.kinds) s += (s.empty() ? "" : ",") + std::string(kind_name(k));
    // The decoder features it lacks are what a user needs to know; the full list is long.
    std::string lacks;
    for (const char* f : {feature::layer_norm, feature::layer_norm_no_bias, feature::rms_norm,
                          feature::learned_positions, feature::rotary, feature::partial_rotary, feature::grouped_kv,
                          feature::head_dim, feature::gelu_tanh, feature::gelu_erf, feature::swiglu,
                          feature::parallel_residual, feature::untied_head, feature::extra_layers,
                          feature::vocab_input, feature::prefix_cache})
      if (std::find(b.features.begin(), b.features.end(), f) == b.features.end())
        lacks += (lacks.empty() ? "" : ",") + std::string(f);
    s += lacks.empty() ? "  all features" : "  lacks " + lacks;
    s += "  dtypes ";
    for (std::size_t i = 0; i < b.dtypes.size(); ++i) s += (i ? "," : "") + std::string(dtype_name(b.dtypes[i]));
    s += "  devices ";
    for (std::size_t i = 0; i < b.devices.size(); ++i) s += (i ? "," : "") + b.devices[i];
    return s;
  } catch (const std::exception& e) {
    return std::string("(could not ask it: ") + e.what() + ")";
  }
}

int cmd_plugins(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible(
      "lminv plugins [options]\n\nLists the plugins found in the search folders "
      "(kind, name, version, file, what it supports) and those refused, with why.\n\noptions");
  visible.add(common_options());
  const po::variables_map vm = parse(args, visible, {}, {});
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  const Registry registry = make_registry(vm);
  out << std::left << std::setw(10) << "KIND" << std::setw(18) << "NAME" << std::setw(10) << "VERSION"
      << "FILE\n";
  for (PluginKind kind : {PluginKind::backend, PluginKind::optimizer, PluginKind::decoder})
    for (const PluginInfo& p : registry.plugins()) {
      if (p.kind != kind) continue;
      out << std::setw(10) << plugin_kind_name(p.kind) << std::setw(18) << p.name << std::setw(10) << p.version
          << p.file.string() << "\n"
          << std::setw(38) << "" << supports(registry, p) << "\n";
    }
  if (!registry.rejected().empty()) {
    out << "\nrefused:\n";
    for (const RejectedPlugin& r : registry.rejected()) out << "  " << r.file.string() << ": " << r.reason << "\n";
  }
  out << "\nsearched:";
  for (const fs::path& d : registry.search_dirs()) out << " " << d.string();
  out << "\n";
  return 0;
}

int cmd_tokenize(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible(
      "lminv tokenize TEXT [options]\n\nPrints the token ids of TEXT, its own without BOS or other special tokens "
      "around them (with a tokenizer.json, special tokens written in TEXT are recognised), then each token's id and "
      "piece.\n\noptions");
  visible.add_options()("help,h", "show this help")(
      "tokenizer", po::value<std::string>(),
      "folder with tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe (default: the embedded GPT-2 "
      "tables)")("with-special",
                 "print the ids a run puts in: the tokenizer's special prefix (BOS, where its "
                 "tokenizer_config.json or post-processor adds one), then TEXT's ids");
  po::options_description hidden;
  hidden.add_options()("text", po::value<std::vector<std::string>>());
  po::positional_options_description positional;
  positional.add("text", -1);
  const po::variables_map vm = parse(args, visible, positional, hidden);
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("text")) throw UsageError("tokenize: missing TEXT (see lminv tokenize --help)");
  std::string text;
  for (const std::string& word : vm["text"].as<std::vector<std::string>>()) text += (text.empty() ? "" : " ") + word;
  const Tokenizer tokenizer = Tokenizer::from_folder(vm.count("tokenizer") ? fs::path(vm["tokenizer"].as<std::string>())
                                                                           : default_tokenizer_dir());
  std::vector<std::int64_t> ids = vm.count("with-special") ? tokenizer.special_prefix() : std::vector<std::int64_t>{};
  const std::vector<std::int64_t> own = tokenizer.encode(text);
  ids.insert(ids.end(), own.begin(), own.end());
  for (std::size_t i = 0; i < ids.size(); ++i) out << (i ? " " : "") << ids[i];
  out << "\n";
  for (std::int64_t id : ids) {
    nlohmann::json piece = tokenizer.piece(id);
    out << std::setw(8) << std::right << id << "  "
        << piece.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  return 0;
}

int cmd_sweep(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv sweep CONFIG [CONFIG ...] --prompts FILE [--grid section.key=A,B,...] [options]\n\nRuns each CONFIG "
      "on every prompt of FILE (one a line, or JSON Lines with \"ids\" or \"text\": see docs/datasets.md) at every "
      "point of the grid (the product of the --grid dimensions); several configs compare methods in one command. Each run appends one JSON record to <output.dir>/sweep.jsonl (or "
      "--records FILE) as it finishes; running the same command again skips the runs already recorded, so an "
      "interrupted sweep resumes where it stopped. At the end: per grid point the exact-match rate, token accuracy, "
      "inversion time per prompt (mean, median, max) and candidates verified per position, printed and written next "
      "to the records (-summary.md, -summary.json).\n\nOn many processes (docs/scale-out.md): `mpirun -n N lminv "
      "sweep ...` hands the runs out to N ranks, rank 0 writing the one records file; --shard I/N runs one of N "
      "disjoint parts (for job arrays, no MPI), and --merge gathers the shards' records into the sweep's file."
      "\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("prompts", po::value<std::string>(), "the prompt file")(
      "states", po::value<std::string>(),
      "instead of prompts: captured states, one entry per prompt (a .jsonl manifest, a [N, T, D] tensor, or a "
      "safetensors/.npz file of [T, D] tensors); each run is an lminv invert")(
      "grid", po::value<std::vector<std::string>>()->composing(), "section.key=value1,value2,... (repeatable)")(
      "checkpoints", po::value<std::string>(),
      "a grid over the checkpoints of lminv train's output folder DIR (model.weights = each checkpoint-<step>, in step "
      "order; each record gets its training step): invertibility across training")(
      "records", po::value<std::string>(), "the JSON Lines file of the runs (default <output.dir>/sweep.jsonl)")(
      "limit", po::value<std::int64_t>()->default_value(0), "only the first N prompts (0: all)")(
      "shard", po::value<std::string>(),
      "I/N: only the runs r with r mod N = I (I from 0), into <records>.shard-I-of-N.jsonl; for a job array")(
      "merge", "run nothing: append the records of every <records>.shard-*-of-*.jsonl to the records file (each "
      "run once; records of another sweep are refused), then print the summary");
  po::positional_options_description positional;
  po::options_description hidden;
  hidden.add_options()("configs", po::value<std::vector<std::string>>());
  positional.add("configs", -1);
  const po::variables_map vm = parse(args, visible, positional, hidden);
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("configs")) throw UsageError("sweep: missing CONFIG (see lminv sweep --help)");
  if (vm.count("prompts") == vm.count("states")) throw UsageError("sweep: give one of --prompts FILE or --states FILE");
  SweepRequest request;
  request.config_files = vm["configs"].as<std::vector<std::string>>();
  if (vm.count("prompts")) request.prompts = vm["prompts"].as<std::string>();
  if (vm.count("states")) request.states = vm["states"].as<std::string>();
  request.overrides = overrides_of(vm);
  if (vm.count("grid"))
    for (const std::string& g : vm["grid"].as<std::vector<std::string>>()) request.grid.push_back(parse_grid(g));
  if (vm.count("checkpoints")) {
    std::vector<std::string> folders;
    for (const fs::path& f : training_checkpoints(vm["checkpoints"].as<std::string>())) folders.push_back(f.string());
    for (const auto& [key, values] : request.grid)
      if (key == "model.weights") throw UsageError("sweep: --checkpoints and --grid model.weights=... together");
    request.grid.push_back({"model.weights", folders});
  }
  if (vm.count("records")) request.records = vm["records"].as<std::string>();
  request.limit = vm["limit"].as<std::int64_t>();
  if (request.limit < 0) throw UsageError("sweep: --limit must be >= 0");
  if (vm.count("shard")) request.shard = parse_shard(vm["shard"].as<std::string>());
  request.merge = vm.count("merge") > 0;
  if (request.shard && request.merge) throw UsageError("sweep: --shard and --merge together (merge after the shards)");

  // Under an MPI launcher: join the job first, and place this rank (its cores, its GPU) before any plugin loads
  // (CUDA reads CUDA_VISIBLE_DEVICES when the torch plugin first asks for devices).
  const std::unique_ptr<MpiWorld> world = MpiWorld::join_if_launched();
  if (!world) {
    const Registry registry = make_registry(vm);
    warn_rejected(registry, err);
    run_sweep(request, registry, out);
    return 0;
  }
  // From here on a failure on any rank ends every rank with its message (no rank is left waiting).
  try {
    if (world->size() > 1 && (request.shard || request.merge))
      throw UsageError(std::string("sweep: --") + (request.shard ? "shard" : "merge") +
                       " is for sweeps without MPI (job arrays); under mpirun the ranks share the runs themselves");
    const Placement placement = place_rank(world->local_rank(), world->local_size(), affinity_cpus(), online_cpus(),
                                           visible_gpus());
    if (placement.gpu) ::setenv("CUDA_VISIBLE_DEVICES", placement.gpu->c_str(), 1);
    // A backend's "all cores" (threads = 0) is OpenMP's team size: the rank's share, unless OMP_NUM_THREADS says.
    int threads = placement.threads;
    if (const char* omp = std::getenv("OMP_NUM_THREADS"); omp && std::atoi(omp) > 0) threads = std::atoi(omp);
    omp_set_num_threads(threads);
    Placement shown = placement;
    shown.threads = threads;
    request.world = world.get();
    request.placement = shown.describe();
    const Registry registry = make_registry(vm);
    std::ostringstream silent;
    if (world->rank() == 0) warn_rejected(registry, err);
    run_sweep(request, registry, world->rank() == 0 ? out : silent);
  } catch (const SetupFailed& failed) {
    if (world->rank() == 0) err << setup_errors_text(failed.errors) << std::flush;
    return 1;
  } catch (const std::exception& e) {
    // Before the ranks agreed that their set-up went well, every rank gets there (MpiWorld::agree); after, a rank
    // that fails cannot wait for the others, and the job ends.
    if (world->agreed()) world->abort(e.what());
    const std::vector<std::string> errors = world->agree(e.what());
    if (world->rank() == 0) err << setup_errors_text(errors) << std::flush;
    return 1;
  }
  return 0;
}

int cmd_train(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible(
      "lminv train CONFIG [options]\n\nTrains CONFIG's decoder ([model]: random weights of its seed, or a checkpoint "
      "folder to go on from) on next-token cross-entropy with AdamW, a linear warm-up and a cosine decay, on the text "
      "of [train] corpus (default: /usr/share/common-licenses), held-out documents for validation. Writes "
      "<output.dir>/checkpoint-<step>/ (a Hugging Face folder with the tokenizer, the optimizer state and "
      "trainer_state.json) every [train] checkpoint_every steps and at the end, and <output.dir>/train.jsonl (training "
      "and validation loss). Run it again to resume an interrupted run from its last checkpoint. Needs [backend] name "
      "= torch. See docs/training.md.\n\noptions");
  visible.add(common_options()).add(config_options());
  visible.add_options()("force", "start over in an output folder that holds another config's run (its checkpoints "
                                 "are removed)");
  po::positional_options_description positional;
  const po::variables_map vm = parse(args, visible, positional, config_positional(positional));
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("config")) throw UsageError("train: missing CONFIG (see lminv train --help)");
  const RawConfig raw = read_config(vm["config"].as<std::string>(), overrides_of(vm));
  const ExperimentConfig config = parse_experiment(raw);
  const TrainConfig train = parse_train(raw);
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_train(config, train, registry, vm.count("force") != 0, out);
  return 0;
}

int cmd_report(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible(
      "lminv report INPUT... --out FILE.html [options]\n\nWrites one self-contained HTML page (every script and style "
      "inlined: it opens offline) with plots of the records in INPUT: records files (records.jsonl of run and invert, "
      "sweep.jsonl, compare.jsonl) or folders (every *.jsonl file in them). Runs: loss over steps against the control "
      "m, the decoded snapshots, top-k lists, distances and r; exact inversions: the certificate per position; sweeps: "
      "the summary table, rates, times and candidates per position; comparisons: differences per value. Each plot's "
      "data goes beside the page, to <FILE without .html>-data/ (CSV, JSON and the Vega-Lite spec). See "
      "docs/reports.md.\n\noptions");
  visible.add_options()("help,h", "show this help")("out", po::value<std::string>(), "the page to write")(
      "force", "replace the page (and its data folder's files) when it exists")(
      "title", po::value<std::string>(), "the page's title (default: lminv report)")(
      "max-runs", po::value<std::int64_t>()->default_value(20), "runs and exact inversions shown one by one (the "
      "latest; every run is in the tables)");
  po::options_description hidden;
  hidden.add_options()("input", po::value<std::vector<std::string>>(), "records files or folders");
  po::positional_options_description positional;
  positional.add("input", -1);
  const po::variables_map vm = parse(args, visible, positional, hidden);
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("input")) throw UsageError("report: give at least one records file or folder");
  if (!vm.count("out")) throw UsageError("report: missing --out FILE.html");
  ReportRequest request;
  for (const std::string& input : vm["input"].as<std::vector<std::string>>()) request.inputs.emplace_back(input);
  request.out = vm["out"].as<std::string>();
  request.force = vm.count("force") != 0;
  if (vm.count("title")) request.title = vm["title"].as<std::string>();
  const std::int64_t max_runs = vm["max-runs"].as<std::int64_t>();
  if (max_runs < 0) throw UsageError("report: --max-runs must be >= 0");
  request.max_runs = static_cast<std::size_t>(max_runs);
  const ReportResult r = write_report(request, out);
  out << "lminv report: " << request.out.string() << "\n  " << r.runs << " runs, " << r.exact << " exact inversions, "
      << r.sweeps << " sweeps (" << r.sweep_runs << " runs), " << r.compares << " comparisons, " << r.trainings
      << " training runs";
  if (r.other) out << ", " << r.other << " records of other kinds (not shown)";
  out << "\n  " << r.charts << " plots; their data in " << r.data_dir.string() << "\n";
  return 0;
}

int cmd_prompts(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible(
      "lminv prompts --out FILE [options]\n\nWrites a prompt set for dataset runs as JSON Lines (see "
      "docs/datasets.md): sentences drawn from a text corpus, cut to their first --tokens tokens, and random token "
      "sequences, shuffled together; the same seed, corpus and tokenizer give the same file. The default corpus is "
      "/usr/share/common-licenses, the license texts of Debian's base-files package (on every Debian system).\n\n"
      "options");
  visible.add_options()("help,h", "show this help")("out", po::value<std::string>(), "the JSON Lines file to write")(
      "force", "replace FILE when it exists")(
      "corpus", po::value<std::vector<std::string>>()->composing(),
      "a text file, or a folder of them (repeatable; default /usr/share/common-licenses)")(
      "count", po::value<std::int64_t>()->default_value(100), "prompts in all")(
      "tokens", po::value<std::int64_t>()->default_value(20), "token ids per prompt")(
      "random-fraction", po::value<double>()->default_value(0.1, "0.1"), "share of random token sequences, in [0, 1]")(
      "seed", po::value<std::string>()->default_value("0"), "seed of the draws (0 .. 2^64 - 1)")(
      "tokenizer", po::value<std::string>(), "tokenizer folder (default: the embedded GPT-2 tables)");
  const po::variables_map vm = parse(args, visible, {}, {});
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("out")) throw UsageError("prompts: missing --out FILE");
  refuse_overwrite(vm["out"].as<std::string>(), vm.count("force") != 0, "prompts");
  MakePromptsRequest r;
  r.out = vm["out"].as<std::string>();
  if (vm.count("corpus"))
    for (const std::string& c : vm["corpus"].as<std::vector<std::string>>()) r.corpus.emplace_back(c);
  r.count = vm["count"].as<std::int64_t>();
  r.tokens = vm["tokens"].as<std::int64_t>();
  r.random_fraction = vm["random-fraction"].as<double>();
  const std::string seed = vm["seed"].as<std::string>();
  char* end = nullptr;
  errno = 0;
  r.seed = std::strtoull(seed.c_str(), &end, 10);
  if (seed.empty() || !std::isdigit(static_cast<unsigned char>(seed[0])) || *end || errno == ERANGE)
    throw UsageError("prompts: --seed '" + seed + "' is not an integer in [0, 2^64)");
  if (r.count < 1 || r.tokens < 1) throw UsageError("prompts: --count and --tokens must be at least 1");
  if (!(r.random_fraction >= 0 && r.random_fraction <= 1))
    throw UsageError("prompts: --random-fraction must lie in [0, 1]");
  const Tokenizer tokenizer = Tokenizer::from_folder(vm.count("tokenizer") ? fs::path(vm["tokenizer"].as<std::string>())
                                                                           : default_tokenizer_dir());
  make_prompts(r, tokenizer, out);
  return 0;
}

}  // namespace

int run_cli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    (args.empty() ? err : out) << kOverview;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version" || args[0] == "version") {
    out << "lminv " << LMINV_VERSION << " (plugin ABI " << kAbiVersion << ")\n";
    return 0;
  }
  const std::map<std::string, int (*)(const std::vector<std::string>&, std::ostream&, std::ostream&)> commands = {
      {"run", cmd_run},
      {"invert", cmd_invert},
      {"forward", cmd_forward},
      {"init", cmd_init},
      {"compare", cmd_compare},
      {"bench", cmd_bench},
      {"plugins", cmd_plugins},
      {"tokenize", cmd_tokenize},
      {"prompts", cmd_prompts},
      {"report", cmd_report},
      {"train", cmd_train},
      {"sweep", cmd_sweep}};
  auto command = commands.find(args[0]);
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (command == commands.end()) throw UsageError("unknown command '" + args[0] + "'");
    return command->second(rest, out, err);
  } catch (const UsageError& e) {
    err << "lminv: " << e.what() << "\n\n" << kOverview;
    return 2;
  } catch (const std::bad_alloc&) {
    err << "lminv: error: out of memory (a size in the config, the checkpoint or an input file is too large for "
           "this machine)\n";
    return 1;
  } catch (const std::exception& e) {
    err << "lminv: error: " << e.what() << "\n";
    return 1;
  } catch (...) {
    err << "lminv: error: an exception that is not a std::exception (thrown by a plugin?)\n";
    return 1;
  }
}

}  // namespace lminv
