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
  Tensor target;      // [1, ...]: the model's output for the true input, or states captured elsewhere
  // [1, T, d or V]: walks start here; descent may blend it into its start. Empty when the prompt is unknown
  // (lminv invert: the target came from a states file); a method that needs it then refuses with an Error.
  Tensor true_input;
  std::vector<std::int64_t> true_ids;  // the prompt's tokens (for reports; never a shortcut to the answer); may be empty
  Decoder& decoder;
  std::shared_ptr<const WeightSet> weights;
  Rng rng;  // seeded from the config: the run is reproducible
  // Tokens known to stand at positions 0 .. n-1 (a BOS token, a system prompt): the token searches (sequential,
  // brute_force) fix them, check them against the target and search from position n; other methods ignore it.
  std::vector<std::int64_t> known_prefix;
  // The relative rounding of the target's values as they were captured: 2^-8 (bf16), 2^-11 (f16), 2^-24 (f32),
  // 2^-53 (f64). 0 when the host computed the target with this very model (the usual study setting).
  double target_rounding = 0;
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

// A token and its distance to the target at one position (the token searches' certificate).
struct Candidate {
  std::int64_t id = -1;
  double distance = 0;
};

struct Result {
  Tensor input;           // [1, T, d or V]: the best input found
  double loss = 0;        // its loss in the optimizer's metric
  std::int64_t steps = 0;
  // Whether `input` is the last step's (a walk's end point) rather than the best of all steps (descent).
  bool last_step = false;
  Metric metric = Metric::l1;
  std::map<std::string, double> values;  // method-specific summary figures
  // Methods that search over tokens directly (sequential, brute_force) give the tokens they found; the host then
  // reports them as they are instead of decoding `input`. Empty for methods that end in a continuous input.
  std::vector<std::int64_t> ids;
  // Method-specific measurements per position or per round (a certificate margin per position, say).
  std::map<std::string, std::vector<double>> series;
  // Token searches: per position, the verified tokens other than the accepted one whose distance fell within the
  // position's tolerance (series "tolerance"), closest first: the rivals that make the position ambiguous.
  std::vector<std::vector<Candidate>> ties;
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
