#include "runner.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <map>
#include <optional>
#include <ostream>
#include <sstream>

#include "experiment.hpp"
#include "lminv/ops.hpp"
#include "paths.hpp"
#include "progress.hpp"
#include "certificate.hpp"
#include "report.hpp"
#include "report_page.hpp"

namespace lminv {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Each token's text on its own (the report highlights tokens; the ids alone would need the tokenizer).
nlohmann::json pieces_of(const Tokenizer& tokenizer, const std::vector<std::int64_t>& ids) {
  nlohmann::json pieces = nlohmann::json::array();
  for (std::int64_t id : ids) pieces.push_back(display_text(tokenizer, {id}));
  return pieces;
}

std::string quoted(const std::string& text) {
  nlohmann::json j = text;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Prints the decoded attempt at the chosen steps and a progress line with an ETA on a terminal.
class HostObserver final : public Observer {
 public:
  HostObserver(std::ostream& out, Decoder& decoder, const Tokenizer& tokenizer, std::vector<std::int64_t> snapshots,
               ProgressMode progress, const char* unit = "step")
      : out_(out), decoder_(decoder), tokenizer_(tokenizer), snapshots_(std::move(snapshots)),
        progress_(progress, unit, 0) {}

  void on_step(const Step& step) override {
    last_loss_ = step.loss.empty() ? NAN : step.loss[best_item(step)];
    steps_ = step.index;
    if (diverged_at_ == 0)
      for (std::size_t b = 0; b < step.loss.size(); ++b)
        if (!std::isfinite(step.loss[b])) {
          diverged_at_ = step.index;
          diverged_item_ = static_cast<std::int64_t>(b);
          diverged_loss_ = step.loss[b];
          break;
        }
    if (std::find(snapshots_.begin(), snapshots_.end(), step.index) != snapshots_.end()) snapshot(step);
    keep_curve(step);
    double lowest = INFINITY;  // of every start
    for (double l : step.loss)
      if (std::isfinite(l)) lowest = std::min(lowest, l);
    lowest_.emplace_back(step.index, lowest);
    progress_.set_total(step.total);
    std::ostringstream detail;
    detail << "loss " << std::scientific << std::setprecision(4) << last_loss_;
    progress_.update(step.index, detail.str());
  }

  void finish() { progress_.clear(); }

  nlohmann::json trajectory() const { return trajectory_; }
  // The loss (of the best start) and the method's per-step values over the steps, thinned to at most kCurvePoints
  // points: every `stride`-th step, the first and the last always kept. For plots (lminv report); the snapshots in
  // trajectory() are the exact record of chosen steps.
  nlohmann::json curve() const {
    nlohmann::json values = nlohmann::json::object();
    for (const auto& [name, series] : curve_values_) values[name] = series;
    return {{"stride", stride_}, {"step", curve_steps_}, {"loss", curve_loss_}, {"values", values}};
  }
  std::int64_t steps() const { return steps_; }
  // The first step at which some start's loss was below `level` (0: none was). With level = the control m in the
  // metric L1, the iterations until the study's inequality (4) held.
  std::int64_t first_step_below(double level) const {
    for (const auto& [index, loss] : lowest_)
      if (loss < level) return index;
    return 0;
  }
  // The first step whose loss (of any start) was NaN or infinite, 0 if none: the optimization diverged there.
  std::int64_t diverged_at() const { return diverged_at_; }
  std::int64_t diverged_item() const { return diverged_item_; }
  double diverged_loss() const { return diverged_loss_; }

 private:
  // With several starts in a batch, the one with the lowest finite loss this step is shown (the first if none is).
  static std::int64_t best_item(const Step& step) {
    std::int64_t best = 0;
    for (std::size_t b = 0; b < step.loss.size(); ++b)
      if (std::isfinite(step.loss[b]) && !(std::isfinite(step.loss[best]) && step.loss[best] <= step.loss[b]))
        best = static_cast<std::int64_t>(b);
    return best;
  }

  static constexpr std::size_t kCurvePoints = 512;
  std::vector<std::pair<std::int64_t, double>> lowest_;  // per step: its index and the lowest finite loss

  void keep_curve(const Step& step) {
    const bool last = step.total > 0 && step.index == step.total;
    if (!(step.index == 1 || step.index % stride_ == 0 || last)) return;
    if (!curve_steps_.empty() && curve_steps_.back() == step.index) return;
    curve_steps_.push_back(step.index);
    curve_loss_.push_back(last_loss_);
    for (auto& [name, series] : curve_values_) {  // a value a step lacks is NaN there (null in the record)
      const auto it = step.values.find(name);
      series.push_back(it == step.values.end() ? NAN : it->second);
    }
    for (const auto& [name, value] : step.values)
      if (!curve_values_.count(name)) {
        std::vector<double>& series = curve_values_[name];
        series.assign(curve_steps_.size() - 1, NAN);
        series.push_back(value);
      }
    if (curve_steps_.size() < kCurvePoints) return;
    // Full: keep the first point and every point on the doubled stride.
    stride_ *= 2;
    std::vector<std::size_t> keep;
    for (std::size_t i = 0; i < curve_steps_.size(); ++i)
      if (i == 0 || curve_steps_[i] % stride_ == 0 || (last && i + 1 == curve_steps_.size())) keep.push_back(i);
    auto thin = [&](auto& v) {
      for (std::size_t j = 0; j < keep.size(); ++j) v[j] = v[keep[j]];
      v.resize(keep.size());
    };
    thin(curve_steps_);
    thin(curve_loss_);
    for (auto& [name, series] : curve_values_) thin(series);
  }

  void snapshot(const Step& step) {
    const std::int64_t b = best_item(step);
    const double loss = step.loss.empty() ? NAN : step.loss[static_cast<std::size_t>(b)];
    // A method may report a step without its inputs (the SDK allows a null input): the loss alone is kept.
    if (!step.input || step.input->rank() != 3 || b >= step.input->dim(0)) {
      trajectory_.push_back({{"step", step.index}, {"loss", loss}, {"item", b}});
      return;
    }
    Tensor item = step.input->slice0(b, b + 1);
    item = std::move(item).reshape({item.dim(1), item.dim(2)});
    const Decoded d = decoder_.decode(item);
    const std::vector<std::int64_t> ids = d.best();
    const std::string text = display_text(tokenizer_, ids);
    progress_.clear();
    out_ << "  a_" << step.index << "  loss " << std::scientific << std::setprecision(4) << loss
         << std::defaultfloat << "  " << quoted(text) << "\n"
         << std::flush;
    nlohmann::json entry = {{"step", step.index}, {"loss", loss}, {"item", b}, {"ids", ids}, {"text", text},
                            {"pieces", pieces_of(tokenizer_, ids)}};
    if (d.k > 1) {  // the decoder's top-k per position, best first
      nlohmann::json topk = nlohmann::json::array(), topk_pieces = nlohmann::json::array();
      for (std::int64_t t = 0; t < d.positions; ++t) {
        const std::vector<std::int64_t> row(d.ids.begin() + t * d.k, d.ids.begin() + (t + 1) * d.k);
        topk.push_back(row);
        topk_pieces.push_back(pieces_of(tokenizer_, row));
      }
      entry["topk"] = topk;
      entry["topk_pieces"] = topk_pieces;
    }
    for (const auto& [name, value] : step.values) entry["values"][name] = value;
    trajectory_.push_back(std::move(entry));
  }

  std::ostream& out_;
  Decoder& decoder_;
  const Tokenizer& tokenizer_;
  std::vector<std::int64_t> snapshots_;
  Progress progress_;
  double last_loss_ = NAN;
  std::int64_t stride_ = 1;
  std::vector<std::int64_t> curve_steps_;
  std::vector<double> curve_loss_;
  std::map<std::string, std::vector<double>> curve_values_;
  std::int64_t steps_ = 0;
  std::int64_t diverged_at_ = 0, diverged_item_ = 0;
  double diverged_loss_ = NAN;
  nlohmann::json trajectory_ = nlohmann::json::array();
};

nlohmann::json spec_json(const ModelSpec& s) {
  nlohmann::json j = {{"family", s.family},        {"n_layer", s.n_layer},
          {"n_embd", s.n_embd},        {"n_head", s.n_head},
          {"n_inner", s.inner()},      {"vocab_size", s.vocab_size},
          {"seq_len", s.seq_len},      {"blocks", s.blocks},
          {"head", head_name(s.head)}, {"input", input_space_name(s.input)},
          {"layers", s.layers},        {"dtype", dtype_name(s.dtype)},
          {"device", s.device},        {"kind", kind_name(s.kind)}};
  if (s.kind == ModelKind::decoder) {
    j["weight_dtype"] = weight_dtype_name(s.weight_dtype);
    j["dropout"] = s.dropout;
    const Architecture& a = s.arch;
    j["arch"] = {{"norm", norm_name(a.norm)},
                 {"norm_bias", a.norm_bias},
                 {"norm_eps", a.norm_eps},
                 {"positions", positions_name(a.positions)},
                 {"rope_theta", a.rope_theta},
                 {"rotary_dim", s.rotary_dim()},
                 {"n_kv_head", s.kv_heads()},
                 {"head_dim", s.head_size()},
                 {"qkv_bias", a.qkv_bias},
                 {"attn_out_bias", a.attn_out_bias},
                 {"mlp", mlp_name(a.mlp)},
                 {"mlp_bias", a.mlp_bias},
                 {"residual", residual_name(a.residual)},
                 {"tied_head", a.tied_head}};
  }
  return j;
}

struct NextToken {
  std::int64_t original = -1, recovered = -1;
};

// The spec of the model next-token agreement is measured on: `full` is every block, ln_f and the LM head; `truncated`
// is the experiment's own blocks and head when that head ends in the LM head, else the same blocks followed by the
// LM head without ln_f (the seed study's AbbreviatedGPT, which it also reads its next tokens from).
ModelSpec next_token_spec(const ModelSpec& spec, const std::string& which) {
  ModelSpec s = spec;
  if (which == "full") {
    s.blocks = s.n_layer;
    s.head = Head::lm_head;
  } else if (!head_has_lm_head(s.head)) {
    s.head = Head::lm_head_no_ln_f;
  }
  s.input = InputSpace::embedding;
  s.layers.clear();
  return s;
}

// The most likely token after the last position, for the original prompt and for the recovered one, of the model
// `which` names (next_token_spec). Decoders only: the MLP families have no language-model head.
// `cache` keeps that model, for the next prompt of a session (it takes every length).
std::optional<NextToken> next_token_agreement(Backend& backend, const Experiment& e, const std::string& which,
                                              const std::vector<std::int64_t>& recovered,
                                              std::unique_ptr<Model>& cache) {
  if (e.spec.kind != ModelKind::decoder) return std::nullopt;
  const ModelSpec full = next_token_spec(e.spec, which);
  if (!cache) cache = backend.create_model(full, e.weights);
  Model* model = cache.get();
  auto argmax_last = [&](const std::vector<std::int64_t>& ids) {
    const Tensor logits = model->forward(true_input_for(ids, full, *e.weights));  // (1, T, V)
    const std::int64_t V = logits.dim(-1), last = (logits.dim(1) - 1) * V;
    std::int64_t best = 0;
    for (std::int64_t v = 0; v < V; ++v) {
      if (!std::isfinite(logits.get(last + v))) return std::int64_t{-1};  // no argmax of NaN: no answer
      if (logits.get(last + v) > logits.get(last + best)) best = v;
    }
    return best;
  };
  const NextToken next{argmax_last(e.prompt_ids), argmax_last(recovered)};
  if (next.original < 0 || next.recovered < 0) return std::nullopt;  // the full model overflows: nothing to compare
  return next;
}

}  // namespace

RunSummary run_experiment(const ExperimentConfig& config, const Registry& registry, std::ostream& out) {
  // The records file first: a folder that cannot be made or a file that cannot take records fails before the run.
  RecordsFile records(fs::path(config.output_dir) / "records.jsonl", &out);
  const bool report = report_wanted(config.report, /*by_default=*/false, out);
  ExperimentSession session(config, registry);
  const std::vector<std::int64_t> ids = config_prompt_ids(config, session.tokenizer());
  RunSummary summary = session.run(ids, out, /*quiet=*/false, &records);
  if (report) write_records_report(records.path(), fs::path(config.output_dir) / "report.html", out);
  return summary;
}

ExperimentSession::ExperimentSession(const ExperimentConfig& config, const Registry& registry) : config_(config) {
  // Plugins first: an unknown name or a bad option fails before anything expensive.
  backend_ = make_backend(config, registry);
  optimizer_ = registry.create_optimizer(config.optimizer);
  optimizer_->configure(config.optimizer_options);
  check_all_read(config.optimizer_options);
  decoder_ = registry.create_decoder(config.decoder);
  decoder_->configure(config.decoder_options);
  check_all_read(config.decoder_options);
  factory_ = std::make_unique<ExperimentFactory>(config, backend_);
}

ExperimentSession::~ExperimentSession() = default;

const Tokenizer& ExperimentSession::tokenizer() const { return factory_->tokenizer(); }
std::int64_t ExperimentSession::vocab_size() const { return factory_->vocab_size(); }

RunSummary ExperimentSession::run(const std::vector<std::int64_t>& ids, std::ostream& shown, bool quiet,
                                  RecordsFile* records, const nlohmann::json& extra) {
  const auto run_start = Clock::now();
  const ExperimentConfig& config = config_;
  Backend* backend = backend_.get();
  Optimizer* optimizer = optimizer_.get();
  Decoder* decoder = decoder_.get();
  std::ostringstream silent;
  std::ostream& out = quiet ? silent : shown;

  auto t0 = Clock::now();
  Experiment e = factory_->build(ids);
  const Tokenizer& tokenizer = e.tokenizer;
  const ModelSpec& spec = e.spec;
  const std::shared_ptr<const WeightSet>& weights = e.weights;
  const std::shared_ptr<Model>& model = e.model;
  const Tensor& true_input = e.true_input;
  const std::string& prompt_text = e.prompt_text;
  const double init_seconds = e.weights_seconds;
  RunSummary summary;
  summary.prompt_ids = e.prompt_ids;

  out << "lminv run " << config.source << "\n"
      << "  prompt    " << quoted(prompt_text) << "  (" << spec.seq_len << " tokens)\n"
      << "  model     " << spec.family << "  d=" << spec.n_embd;
  if (spec.kind == ModelKind::decoder)
    out << "  blocks=" << spec.blocks << "/" << spec.n_layer << "  head=" << head_name(spec.head);
  out << "  input=" << input_space_name(spec.input) << "  weights=" << config.weights;
  if (config.weights == "random") out << " (seed " << config.seed << ")";
  out << "\n  plugins   backend=" << config.backend << " (" << dtype_name(spec.dtype)
      << (spec.weight_dtype == WeightDType::int8 ? ", int8 block weights" : "") << ", " << spec.device
      << (spec.dropout > 0 ? ", dropout " + nlohmann::json(spec.dropout).dump() : std::string())
      << ")  optimizer=" << config.optimizer << "  decoder=" << config.decoder << "\n"
      << std::flush;

  if (!decoder_prepared_) {  // once: the weights are the same for every prompt of the session
    // On a terminal a note while it works (a pseudo-inverse of a large vocabulary takes a while the first time);
    // in a log, a line afterwards when it was long.
    const ProgressMode mode = progress_mode(config.progress, quiet);
    Progress phase(mode == ProgressMode::terminal ? mode : ProgressMode::off, "decoder", 0);
    phase.note("preparing decoder " + config.decoder + " (a pseudo-inverse is computed once, then cached)");
    t0 = Clock::now();
    DecoderSetup setup;
    setup.spec = spec;
    setup.weights = weights;
    setup.cache_dir = (config.cache_dir.empty() ? default_cache_dir() : fs::path(config.cache_dir)).string();
    const Tokenizer* session_tokenizer = &factory_->tokenizer();
    setup.tokenize = [session_tokenizer](const std::string& text) { return session_tokenizer->encode(text); };
    decoder->prepare(setup);
    prepare_seconds_ = seconds_since(t0);
    decoder_prepared_ = true;
    phase.clear();
    if (mode == ProgressMode::lines && prepare_seconds_ > 5)
      std::fprintf(stderr, "  decoder %s prepared in %s\n", config.decoder.c_str(), duration_text(prepare_seconds_).c_str());
  }
  const double prepare_seconds = prepare_seconds_;

  const Tensor target = model->forward(true_input);
  if (const std::int64_t at = first_non_finite(target); at >= 0)
    throw Error(config.source + ": the model's output for the prompt holds " +
                (std::isnan(target.get(at)) ? "NaN" : "an infinity") + " at position " +
                std::to_string(at / target.dim(-1)) + " (element " + std::to_string(at % target.dim(-1)) +
                "): the model overflows in " + dtype_name(spec.dtype) + "; there is nothing finite to invert");

  Problem problem{*model, target, true_input, summary.prompt_ids, *decoder, weights, Rng(config.seed).fork("problem"), {}, 0};
  const std::size_t known = known_prefix_length(config, tokenizer, summary.prompt_ids);
  problem.known_prefix.assign(summary.prompt_ids.begin(), summary.prompt_ids.begin() + static_cast<std::ptrdiff_t>(known));
  HostObserver observer(out, *decoder, tokenizer, config.snapshot_steps, progress_mode(config.progress, quiet));
  t0 = Clock::now();
  Result result = optimizer->run(problem, observer);
  const double optimize_seconds = seconds_since(t0);
  observer.finish();

  // Measurements of the final input.
  Tensor found = result.input;
  const Tensor output = model->forward(found);
  const double out_l1 = distances(output, target, Metric::l1)[0];
  const double out_metric = distances(output, target, result.metric)[0];
  const double out_l2 = distances(output, target, Metric::l2)[0];
  const double in_l2 = l2_distance(found, true_input);
  const double in_l1 = l1_distance(found, true_input);

  // The seed's control m: how far the output moves when the true input is shifted by N(0, sigma).
  Tensor shifted = true_input;
  Tensor noise(true_input.dtype(), true_input.shape());
  Rng control_rng = Rng(config.seed).fork("control");
  fill_normal(noise, control_rng, 0.0, config.control_sigma);
  add_scaled(shifted, 1.0, noise);
  const Tensor shifted_output = model->forward(shifted);
  const double m_l1 = distances(shifted_output, target, Metric::l1)[0];
  const double m_metric = distances(shifted_output, target, result.metric)[0];

  // Methods that search over tokens report them; the others end in a continuous input the decoder reads.
  const bool tokens_from_optimizer = !result.ids.empty();
  if (tokens_from_optimizer) {
    if (result.ids.size() != summary.prompt_ids.size())
      throw Error("optimizer '" + config.optimizer + "' returned " + std::to_string(result.ids.size()) +
                  " tokens for a prompt of " + std::to_string(summary.prompt_ids.size()));
    summary.decoded_ids = result.ids;
  } else {
    const std::int64_t width = found.dim(2);
    summary.decoded_ids = decoder->decode(std::move(found).reshape({spec.seq_len, width})).best();
  }
  summary.decoded_text = display_text(tokenizer, summary.decoded_ids);
  std::int64_t correct = 0;
  for (std::size_t t = 0; t < summary.prompt_ids.size(); ++t)
    correct += summary.decoded_ids[t] == summary.prompt_ids[t];
  summary.token_accuracy = static_cast<double>(correct) / static_cast<double>(summary.prompt_ids.size());
  summary.exact_match = correct == static_cast<std::int64_t>(summary.prompt_ids.size());
  summary.final_loss = result.loss;

  // Is the decoded prompt itself an inverse? Its output distance, re-embedded.
  const Tensor decoded_output = model->forward(true_input_for(summary.decoded_ids, spec, *weights, e.vocab));
  const double decoded_l1 = distances(decoded_output, target, Metric::l1)[0];

  // Does the recovered prompt make the full model predict the same next token as the original?
  const std::optional<NextToken> next =
      next_token_agreement(*backend, e, config.next_token, summary.decoded_ids, next_model_);

  const double steps_per_second = observer.steps() / std::max(optimize_seconds, 1e-9);
  out << "  result    " << quoted(summary.decoded_text) << "\n"
      << "  recovered " << (summary.exact_match ? "yes, exactly" : "no") << "  (token accuracy " << std::setprecision(3)
      << summary.token_accuracy * 100 << "%)\n"
      << std::scientific << std::setprecision(4) << "  loss      " << result.loss << " (" << metric_name(result.metric)
      << (result.last_step ? ", at the last of " : ", best of ") << result.steps << " steps)\n"
      << "  output distance  L1 " << out_l1 << "   control m (sigma " << std::defaultfloat << config.control_sigma
      << std::scientific << ") L1 " << m_l1 << (out_l1 < m_l1 ? "   below m" : "   NOT below m") << "\n"
      << "  input distance   L2 " << in_l2 << "   ratio r = input/output (L2) "
      << (out_l2 > 0 ? in_l2 / out_l2 : INFINITY) << "\n"
      << "  input distance   L1 " << in_l1 << "   ratio r = input/output (L1) "
      << (out_l1 > 0 ? in_l1 / out_l1 : INFINITY) << "\n";
  if (next)
    out << "  next token " << (config.next_token == "full" ? "" : "(truncated model) ")
        << quoted(display_text(tokenizer, {next->original})) << " for the prompt, "
        << quoted(display_text(tokenizer, {next->recovered})) << " for the result"
        << (next->original == next->recovered ? " (agree)" : " (differ)") << "\n";
  const std::optional<Certificate> certificate = certificate_of(result);
  if (certificate) print_certificate(out, *certificate, tokenizer);
  const bool diverged = observer.diverged_at() > 0 || !std::isfinite(result.loss);
  if (diverged) {
    out << "  DIVERGED  ";
    if (observer.diverged_at() > 0)
      out << "the loss became " << observer.diverged_loss() << " at step " << observer.diverged_at()
          << (observer.steps() > 0 && observer.diverged_item() > 0 ? " (start " + std::to_string(observer.diverged_item()) + ")" : "");
    else
      out << "the final loss is " << result.loss;
    out << ": the optimization left the finite numbers (a step size too large for " << dtype_name(spec.dtype)
        << "?); the result is not an inversion\n";
  }
  out << std::defaultfloat << std::setprecision(3) << "  time      " << seconds_since(run_start) << " s ("
      << steps_per_second << " steps/s; weights " << init_seconds << " s, decoder " << prepare_seconds << " s)\n";

  nlohmann::json sections = nlohmann::json::object();
  for (const auto& [name, keys] : config.raw_sections) sections[name] = keys;
  nlohmann::json values = nlohmann::json::object();
  for (const auto& [k, v] : result.values) values[k] = v;
  nlohmann::json series = nlohmann::json::object();
  for (const auto& [k, v] : result.series) series[k] = v;
  summary.record = {
      {"lminv_version", LMINV_VERSION},
      {"time", utc_timestamp()},
      {"config_file", config.source},
      {"config", sections},
      {"prompt", {{"text", prompt_text}, {"ids", summary.prompt_ids}, {"pieces", pieces_of(tokenizer, summary.prompt_ids)}}},
      {"model", spec_json(spec)},
      {"weights", {{"source", config.weights}, {"seed", config.seed}}},
      {"backend", config.backend},
      {"optimizer", config.optimizer},
      {"decoder", config.decoder},
      {"metric", metric_name(result.metric)},
      {"steps", result.steps},
      {"result_step", result.last_step ? "last" : "best"},
      {"final_loss", result.loss},
      {"output_distance", {{"l1", out_l1}, {"l2", out_l2}, {"metric", out_metric}}},
      {"control", {{"sigma", config.control_sigma}, {"l1", m_l1}, {"metric", m_metric}}},
      {"inequality_4", out_l1 < m_l1},
      // The first step at which a start's loss fell below the control m in the optimizer's metric: with L1, the
      // iterations until (4) held (null: it never did during the steps).
      {"steps_to_control", observer.first_step_below(m_metric) > 0 ? nlohmann::json(observer.first_step_below(m_metric))
                                                                    : nlohmann::json(nullptr)},
      {"input_distance_l2", in_l2},
      {"ratio_input_output_l2", out_l2 > 0 ? nlohmann::json(in_l2 / out_l2) : nlohmann::json(nullptr)},
      {"input_distance_l1", in_l1},
      {"ratio_input_output_l1", out_l1 > 0 ? nlohmann::json(in_l1 / out_l1) : nlohmann::json(nullptr)},
      {"decoded",
       {{"ids", summary.decoded_ids},
        {"text", summary.decoded_text},
        {"pieces", pieces_of(tokenizer, summary.decoded_ids)},
        {"by", tokens_from_optimizer ? "optimizer" : "decoder"},
        {"output_distance_l1", decoded_l1}}},
      {"exact_match", summary.exact_match},
      {"next_token", next ? nlohmann::json{{"original", next->original},
                                           {"recovered", next->recovered},
                                           {"agree", next->original == next->recovered},
                                           {"model", config.next_token},
                                           {"blocks", next_token_spec(spec, config.next_token).blocks},
                                           {"head", head_name(next_token_spec(spec, config.next_token).head)}}
                          : nlohmann::json(nullptr)},
      {"token_accuracy", summary.token_accuracy},
      {"trajectory", observer.trajectory()},
      {"curve", tokens_from_optimizer ? nlohmann::json(nullptr) : observer.curve()},
      {"values", values},
      {"series", series},
      {"certificate", certificate ? certificate_json(*certificate, tokenizer) : nlohmann::json(nullptr)},
      {"known_prefix", problem.known_prefix},
      {"time_s",
       {{"total", seconds_since(run_start)},
        {"weights", init_seconds},
        {"prepare", prepare_seconds},
        {"optimize", optimize_seconds}}},
      {"steps_per_s", steps_per_second},
      {"diverged", diverged ? nlohmann::json{{"step", observer.diverged_at() > 0 ? nlohmann::json(observer.diverged_at())
                                                                                : nlohmann::json(nullptr)},
                                             {"item", observer.diverged_item()}}
                            : nlohmann::json(nullptr)},
  };
  for (const auto& [key, value] : extra.items()) summary.record[key] = value;
  if (records) {
    records->append(summary.record);
    out << "  record    " << records->path().string() << "\n";
  }
  return summary;
}

std::int64_t ExperimentSession::output_width() {
  // One zero token through the model: whatever the head and the extra layers make of a row.
  Experiment e = factory_->build_unknown(1);
  const Tensor out = e.model->forward(Tensor(e.spec.dtype, input_shape(e.spec, 1)));
  return out.dim(-1);
}

std::int64_t ExperimentSession::max_positions() { return factory_->build_unknown(1).spec.n_positions; }

RunSummary ExperimentSession::invert(const CapturedTarget& captured, std::ostream& shown, bool quiet,
                                     RecordsFile* records, const nlohmann::json& extra) {
  const auto run_start = Clock::now();
  const ExperimentConfig& config = config_;
  std::ostringstream silent;
  std::ostream& out = quiet ? silent : shown;
  if (captured.states.rank() != 2) throw Error(captured.source + ": states must be [T, D]");
  const std::int64_t T = captured.states.dim(0), D = captured.states.dim(1);

  Experiment e = factory_->build_unknown(T);
  const Tokenizer& tokenizer = e.tokenizer;
  const ModelSpec& spec = e.spec;
  const std::vector<std::int64_t> known = prefix_for_text(config, tokenizer);
  for (std::int64_t id : known)
    if (id < 0 || id >= spec.vocab_size)
      throw Error(config.source + ": [prompt] prefix token " + std::to_string(id) + " is outside the vocabulary (size " +
                  std::to_string(spec.vocab_size) + ")");
  if (static_cast<std::int64_t>(known.size()) > T)
    throw Error(captured.source + ": " + std::to_string(T) + " positions, fewer than the known prefix's " +
                std::to_string(known.size()) + " tokens (BOS and [prompt] prefix)");
  Tensor target = captured.states.to(spec.dtype).reshape({1, T, D});

  out << "lminv invert " << config.source << "\n"
      << "  states    " << captured.source << "  [" << T << ", " << D << "] " << captured.stored_dtype << "\n"
      << "  model     " << spec.family << "  d=" << spec.n_embd;
  if (spec.kind == ModelKind::decoder)
    out << "  blocks=" << spec.blocks << "/" << spec.n_layer << "  head=" << head_name(spec.head);
  out << "  weights=" << config.weights;
  if (config.weights == "random") out << " (seed " << config.seed << ")";
  out << "\n  search    " << config.optimizer << " on " << config.backend << " (" << dtype_name(spec.dtype) << ", "
      << spec.device << ")";
  if (!known.empty()) out << "  known prefix " << quoted(display_text(tokenizer, known)) << " (" << known.size() << ")";
  out << "\n" << std::flush;

  Problem problem{*e.model, target, Tensor(), captured.true_ids, *decoder_, e.weights, Rng(config.seed).fork("problem"),
                  known, captured.rounding};
  HostObserver observer(out, *decoder_, tokenizer, {}, progress_mode(config.progress, quiet), "position");
  auto t0 = Clock::now();
  Result result = optimizer_->run(problem, observer);
  const double optimize_seconds = seconds_since(t0);
  observer.finish();
  if (result.ids.size() != static_cast<std::size_t>(T))
    throw Error("optimizer '" + config.optimizer + "' returned " + std::to_string(result.ids.size()) +
                " tokens for states of " + std::to_string(T) + " positions; lminv invert needs a token search "
                "(sequential or brute_force)");
  const std::optional<Certificate> certificate = certificate_of(result);
  if (!certificate)
    throw Error("optimizer '" + config.optimizer + "' gave no certificate; lminv invert needs sequential or brute_force");

  RunSummary summary;
  summary.prompt_ids = captured.true_ids;
  summary.decoded_ids = result.ids;
  summary.decoded_text = display_text(tokenizer, result.ids);
  summary.final_loss = result.loss;
  const bool truth = captured.true_ids.size() == result.ids.size();
  if (truth) {
    std::int64_t correct = 0;
    for (std::size_t t = 0; t < result.ids.size(); ++t) correct += result.ids[t] == captured.true_ids[t];
    summary.token_accuracy = static_cast<double>(correct) / static_cast<double>(T);
    summary.exact_match = correct == T;
  }

  // The recovered prompt run forward: its distance to the states, as a whole.
  const Tensor recovered_output = e.model->forward(true_input_for(result.ids, spec, *e.weights, e.vocab));
  const double l2 = distances(recovered_output, target, Metric::l2)[0];
  double target_norm = 0;
  for (std::int64_t i = 0; i < target.numel(); ++i) target_norm += target.get(i) * target.get(i);
  const double relative = l2 / std::max(std::sqrt(target_norm), 1e-300);
  // What the whole model predicts after the recovered prompt (decoders).
  std::optional<std::int64_t> next;
  if (spec.kind == ModelKind::decoder) {
    e.prompt_ids = result.ids;  // next_token_agreement's "original" is then the recovered prompt too
    next = next_token_agreement(*backend_, e, config_.next_token, result.ids, next_model_)->recovered;
  }

  out << "  result    " << quoted(summary.decoded_text) << "  (" << T << " tokens)\n";
  print_certificate(out, *certificate, tokenizer);
  if (truth)
    out << "  truth     the file's prompt ids: " << (summary.exact_match ? "recovered exactly" : "NOT recovered")
        << " (token accuracy " << std::setprecision(3) << summary.token_accuracy * 100 << "%)\n";
  out << std::scientific << std::setprecision(4) << "  output distance  relative L2 " << relative
      << " (the recovered prompt's states against the file's)\n"
      << std::defaultfloat;
  if (next) out << "  next token " << quoted(display_text(tokenizer, {*next})) << " after the recovered prompt\n";
  out << std::setprecision(3) << "  time      " << seconds_since(run_start) << " s (search " << optimize_seconds
      << " s)\n";

  nlohmann::json sections = nlohmann::json::object();
  for (const auto& [name, keys] : config.raw_sections) sections[name] = keys;
  nlohmann::json values = nlohmann::json::object();
  for (const auto& [k, v] : result.values) values[k] = v;
  nlohmann::json series = nlohmann::json::object();
  for (const auto& [k, v] : result.series) series[k] = v;
  summary.record = {
      {"lminv_version", LMINV_VERSION},
      {"command", "invert"},
      {"time", utc_timestamp()},
      {"config_file", config.source},
      {"config", sections},
      {"states",
       {{"source", captured.source}, {"shape", {T, D}}, {"stored_dtype", captured.stored_dtype},
        {"rounding", captured.rounding}}},
      {"prompt", truth ? nlohmann::json{{"ids", captured.true_ids}, {"text", display_text(tokenizer, captured.true_ids)},
                                        {"pieces", pieces_of(tokenizer, captured.true_ids)}}
                       : nlohmann::json(nullptr)},
      {"known_prefix", known},
      {"model", spec_json(spec)},
      {"weights", {{"source", config.weights}, {"seed", config.seed}}},
      {"backend", config.backend},
      {"optimizer", config.optimizer},
      {"metric", "l2"},
      {"steps", result.steps},
      {"final_loss", result.loss},
      {"output_distance", {{"l2", l2}, {"relative_l2", relative}}},
      {"decoded", {{"ids", result.ids}, {"text", summary.decoded_text}, {"pieces", pieces_of(tokenizer, result.ids)},
                   {"by", "optimizer"}}},
      {"verdict", verdict_name(certificate->verdict)},
      {"certificate", certificate_json(*certificate, tokenizer)},
      {"exact_match", truth ? nlohmann::json(summary.exact_match) : nlohmann::json(nullptr)},
      {"token_accuracy", truth ? nlohmann::json(summary.token_accuracy) : nlohmann::json(nullptr)},
      {"next_token", next ? nlohmann::json{{"recovered", *next}} : nlohmann::json(nullptr)},
      {"values", values},
      {"series", series},
      {"time_s", {{"total", seconds_since(run_start)}, {"optimize", optimize_seconds}}},
  };
  for (const auto& [key, value] : extra.items()) summary.record[key] = value;
  if (records) {
    records->append(summary.record);
    out << "  record    " << records->path().string() << "\n";
  }
  return summary;
}

}  // namespace lminv
