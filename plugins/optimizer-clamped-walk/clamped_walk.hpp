// Optimizer `clamped_walk`: the seed study's clamped gradient walk.
//
// The walk starts at the true input e [1, T, C] (C = d for input = embedding, V for input = vocab) and, at every
// step n = 1 .. steps:
//   i ~ uniform in [1, C)                              the clamp index (stream "clamped_walk/clamp")
//   z ~ N(0, 1) [T, C]                                 a full noise tensor (stream "clamped_walk/noise")
//   a[t, k] += rand_eta z[t, k]   for every row t and every k on the perturbed side:
//                                 k < i (perturb_side = low) or k >= i (perturb_side = high)
//   inner_steps times: a -= inner_lr * (grad_a metric(O(a), O(e)) with the perturbed side's entries set to 0)
// so the descent repairs the output by moving only the other side; the perturbed side stays clamped.
//
// control = true walks a second input c beside a, with the same clamp indices and the same noise (the same
// streams, drawn once per step and applied to both) and no inner steps: what the perturbations alone do to the
// output. Both are scored in one batched forward pass per step.
//
// The observer gets, per step (see docs/configs.md): clamp_index (i), output_distance (L1 of O(a) - O(e)),
// output_distance_l2, input_distance (L2 of a - e), ratio (input_distance / output_distance_l2, inf while the
// output has not moved), inner_loss_first / inner_loss_last (the metric before the first and after the last inner
// step; = the loss after the perturbation when inner_steps = 0), and with control the same distances of c:
// control_output_distance, control_output_distance_l2, control_input_distance, control_ratio.
#pragma once

#include <cstdint>

#include "lminv/model.hpp"
#include "lminv/optimizer.hpp"
#include "lminv/options.hpp"

namespace lminv {

// Config keys: steps (100), rand_eta (0.01), inner_steps (1), inner_lr (0.01), perturb_side (low | high),
// metric (l1 | l2 | cosine: the inner loss and Result.loss), control (false).
// Result: input = the input after the last step; loss = its output distance in `metric`; values: input_distance,
// output_distance, output_distance_l2, ratio (input_distance / output_distance_l2), output_per_input (its
// inverse), and with control: control_input_distance, control_output_distance, control_output_distance_l2,
// control_ratio, control_output_per_input.
class ClampedWalk final : public Optimizer {
 public:
  void configure(const Options& options) override;
  Result run(Problem& problem, Observer& observer) override;

  // The configured keys (their defaults until configure succeeds; a failed configure changes nothing).
  struct Settings {
    std::int64_t steps = 100;
    double rand_eta = 0.01;
    std::int64_t inner_steps = 1;
    double inner_lr = 0.01;
    bool perturb_low = true;  // perturb_side = low
    Metric metric = Metric::l1;
    bool control = false;
  };
  const Settings& settings() const { return settings_; }

 private:
  Settings settings_;
};

}  // namespace lminv
