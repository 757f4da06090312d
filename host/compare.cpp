#include "compare.hpp"

#include <chrono>
#include <cmath>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#include "experiment.hpp"
#include "lminv/ops.hpp"
#include "report.hpp"
#include "runner.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {

struct Probe {
  Tensor output;      // model(e)
  Tensor input_grad;  // backward(e, G)
};

struct Difference {
  double max_abs = 0;
  double normalised = 0;  // max |a - b| / max |baseline|
};

Difference difference(const Tensor& baseline, const Tensor& other) {
  if (baseline.numel() != other.numel())
    throw Error("compare: shapes differ: " + shape_string(baseline.shape()) + " and " + shape_string(other.shape()));
  Difference d;
  double scale = 0;
  for (std::int64_t i = 0; i < baseline.numel(); ++i) {
    d.max_abs = std::max(d.max_abs, std::abs(baseline.get(i) - other.get(i)));
    scale = std::max(scale, std::abs(baseline.get(i)));
  }
  d.normalised = scale > 0 ? d.max_abs / scale : d.max_abs;
  return d;
}

Probe probe(const Experiment& e) {
  Probe p;
  p.output = e.model->forward(e.true_input);
  // G: the same seeded N(0, 1) vector for every value, made in f64 and rounded to the output's dtype.
  Tensor g(DType::f64, p.output.shape());
  Rng rng = Rng(0).fork("compare/grad_output");
  fill_normal(g, rng, 0.0, 1.0);
  p.input_grad = e.model->backward(e.true_input, g.to(p.output.dtype()));
  return p;
}

}  // namespace

void parse_across(const std::string& text, CompareRequest& request) {
  const std::size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || text.find('.') > eq)
    throw Error("--across '" + text + "': expected section.key=value1,value2,...");
  request.key = text.substr(0, eq);
  request.values.clear();
  std::stringstream values(text.substr(eq + 1));
  for (std::string v; std::getline(values, v, ',');)
    if (!v.empty()) request.values.push_back(v);
  if (request.values.size() < 2) throw Error("--across '" + text + "': give at least two values to compare");
}

void run_compare(const CompareRequest& request, const Registry& registry, std::ostream& out) {
  struct Row {
    std::string value;
    Difference output, grad;
    double final_loss = 0;
    std::string decoded;
    bool exact = false;
    double seconds = 0;
  };
  std::vector<Row> rows;
  Probe baseline;
  // The table's file is opened (checked, locked) before the first run: a file that cannot take it fails now.
  fs::path table = request.table_file;
  if (table.empty()) {
    std::vector<std::string> overrides = request.overrides;
    overrides.push_back(request.key + "=" + request.values.front());
    table = fs::path(parse_experiment(read_config(request.config_file, overrides)).output_dir) / "compare.jsonl";
  }
  RecordsFile table_file(table, &out);

  for (const std::string& value : request.values) {
    std::vector<std::string> overrides = request.overrides;
    overrides.push_back(request.key + "=" + value);
    const ExperimentConfig config = parse_experiment(read_config(request.config_file, overrides));

    out << "== " << request.key << " = " << value << "\n" << std::flush;
    Row row{value, {}, {}, 0, {}, false, 0};
    {
      const Experiment e = build_experiment(config, make_backend(config, registry));
      Probe p = probe(e);
      if (rows.empty()) baseline = std::move(p);
      else {
        row.output = difference(baseline.output, p.output);
        row.grad = difference(baseline.input_grad, p.input_grad);
      }
    }  // the probe's model and weights are freed before the run makes its own
    const auto start = std::chrono::steady_clock::now();
    const RunSummary s = run_experiment(config, registry, out);
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    row.final_loss = s.final_loss;
    row.decoded = s.decoded_text;
    row.exact = s.exact_match;
    rows.push_back(row);
  }

  out << "\nlminv compare " << request.config_file << " across " << request.key << " (differences against "
      << request.values.front() << ")\n"
      << std::left << std::setw(14) << request.key.substr(request.key.find('.') + 1) << std::right << std::setw(12)
      << "out max|d|" << std::setw(12) << "out norm" << std::setw(12) << "grad max|d|" << std::setw(12) << "grad norm"
      << std::setw(13) << "final loss" << std::setw(9) << "time s" << "  decoded\n";
  for (const Row& r : rows) {
    const nlohmann::json text = r.decoded;
    out << std::left << std::setw(14) << r.value << std::right << std::scientific << std::setprecision(3)
        << std::setw(12) << r.output.max_abs << std::setw(12) << r.output.normalised << std::setw(12) << r.grad.max_abs
        << std::setw(12) << r.grad.normalised << std::setw(13) << r.final_loss << std::fixed << std::setprecision(2)
        << std::setw(9) << r.seconds << "  " << text.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
        << (r.exact ? " (exact)" : "") << std::defaultfloat << "\n";
    table_file.append({{"time", utc_timestamp()},
                             {"config_file", request.config_file},
                             {"key", request.key},
                             {"value", r.value},
                             {"baseline", request.values.front()},
                             {"output_max_abs", r.output.max_abs},
                             {"output_normalised", r.output.normalised},
                             {"grad_max_abs", r.grad.max_abs},
                             {"grad_normalised", r.grad.normalised},
                             {"final_loss", r.final_loss},
                             {"decoded", r.decoded},
                             {"exact_match", r.exact},
                             {"seconds", r.seconds}});
  }
  out << "table: " << table.string() << "\n";
}

}  // namespace lminv
