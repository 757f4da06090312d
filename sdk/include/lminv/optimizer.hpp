// lminv SDK: optimizers, the inversion methods.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lminv/decoder.hpp"
#include "lminv/model.hpp"
#include "lminv/options.hpp"
#include "lminv/rng.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// One inversion problem: find inputs whose output matches `target`.
struct Problem {
  Model& model;
  Tensor target;      // [1, ...]: the model's output for the true input
  Tensor true_input;  // [1, T, d or V]: walks start here; descent may blend it into its start
  std::vector<std::int64_t> true_ids;  // the prompt's tokens (for reports; never a shortcut to the answer)
  Decoder& decoder;
  std::shared_ptr<const WeightSet> weights;
  Rng rng;  // seeded from the config: the run is reproducible
};

// One step as the host sees it.
struct Step {
  std::int64_t index = 0;  // 1-based
  std::int64_t total = 0;  // planned steps (0 if unknown)
  std::vector<double> loss;  // per batch item
  const Tensor* input = nullptr;  // current inputs [B, T, d or V]
  std::map<std::string, double> values;  // method-specific measurements (orthogonality, distances ...)
};

class Observer {
 public:
  virtual ~Observer() = default;
  // Called after every step, in order.
  virtual void on_step(const Step& step) = 0;
};

struct Result {
  Tensor input;           // [1, T, d or V]: the best input found
  double loss = 0;        // its loss in the optimizer's metric
  std::int64_t steps = 0;
  Metric metric = Metric::l1;
  std::map<std::string, double> values;  // method-specific summary figures
  // Methods that search over tokens directly (sequential, brute_force) give the tokens they found; the host then
  // reports them as they are instead of decoding `input`. Empty for methods that end in a continuous input.
  std::vector<std::int64_t> ids;
  // Method-specific measurements per position or per round (a certificate margin per position, say).
  std::map<std::string, std::vector<double>> series;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // Reads the [optimizer] section's keys (all but name). Called before anything expensive, so that
  // a bad option fails at once.
  virtual void configure(const Options& options) = 0;

  virtual Result run(Problem& problem, Observer& observer) = 0;
};

}  // namespace lminv
