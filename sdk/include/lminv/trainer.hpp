// lminv SDK: the optional "trainer" capability: next-token training of a decoder's weights (lminv train).
//
// Model::capability(kTrainer) returns a Trainer* (owned by the model, alive as long as it) when the backend can
// train the model, nullptr otherwise. The model must be a decoder with head = lm_head, every block, input =
// embedding. The trainer starts from a copy of the model's weights (the WeightSet is never changed) and keeps its
// own parameters and AdamW state; the model's forward() is unaffected by training. Adding it broke no plugin: a
// backend that does not know the name returns nullptr.
#pragma once

#include <cstdint>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/weights.hpp"

namespace lminv {

inline constexpr const char* kTrainer = "trainer";

// AdamW with decoupled weight decay, computed as torch.optim.AdamW computes it; the decay applies to the weight
// matrices (tensors of two or more dimensions), not to biases and norm gains.
struct TrainSettings {
  double beta1 = 0.9, beta2 = 0.95, epsilon = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // the gradient's global L2 norm is scaled down to this when above it; 0: no clipping
};

struct TrainStepResult {
  double loss = 0;       // mean next-token cross-entropy (nats) of the batch, before the update
  double grad_norm = 0;  // the gradient's global L2 norm before clipping
};

class Trainer {
 public:
  virtual ~Trainer() = default;

  // Sets the optimizer's settings; called before the first step (and again after load_state, to the same values).
  virtual void configure(const TrainSettings& settings) = 0;

  // One AdamW step with learning rate `lr` on `batch` rows of `tokens` (row-major [batch, T + 1] ids, T <= the
  // model's n_positions): inputs are each row's first T ids, targets its last T.
  virtual TrainStepResult step(const std::vector<std::int64_t>& tokens, std::int64_t batch, double lr) = 0;

  // The mean next-token cross-entropy of `batch` rows laid out as for step(), without an update.
  virtual double loss(const std::vector<std::int64_t>& tokens, std::int64_t batch) = 0;

  // Steps taken (including those restored by load_state).
  virtual std::int64_t steps() const = 0;

  // The current parameters under their canonical names, in the model's dtype.
  virtual WeightSet weights() const = 0;

  // The optimizer's state: "exp_avg/<name>" and "exp_avg_sq/<name>" per parameter (the model's dtype) and "step"
  // ([1], f64). load_state(state()) on a trainer of the same weights continues bit for bit.
  virtual WeightSet state() const = 0;
  virtual void load_state(const WeightSet& state) = 0;
};

// The model's trainer, or nullptr when its backend offers none.
inline Trainer* trainer_of(Model& model) { return static_cast<Trainer*>(model.capability(kTrainer)); }

}  // namespace lminv
