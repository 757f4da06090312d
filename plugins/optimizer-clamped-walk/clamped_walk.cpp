// Optimizer `clamped_walk`: see clamped_walk.hpp.
#include "clamped_walk.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "lminv/ops.hpp"

namespace lminv {

namespace {

double ratio_of(double input_distance, double output_distance) {
  return output_distance > 0 ? input_distance / output_distance : std::numeric_limits<double>::infinity();
}

}  // namespace

void ClampedWalk::configure(const Options& o) {
  Settings s;
  s.steps = o.get_int("steps", s.steps);
  if (s.steps <= 0) o.fail("steps", "must be positive");
  s.rand_eta = o.get_double("rand_eta", s.rand_eta);
  if (!(s.rand_eta > 0) || !std::isfinite(s.rand_eta)) o.fail("rand_eta", "must be a positive number");
  s.inner_steps = o.get_int("inner_steps", s.inner_steps);
  if (s.inner_steps < 0) o.fail("inner_steps", "must be >= 0");
  s.inner_lr = o.get_double("inner_lr", s.inner_lr);
  if (!(s.inner_lr > 0) || !std::isfinite(s.inner_lr)) o.fail("inner_lr", "must be a positive number");
  s.perturb_low = o.get_choice("perturb_side", "low", {"low", "high"}) == "low";
  s.metric = *parse_metric(o.get_choice("metric", "l1", {"l1", "l2", "cosine"}));
  s.control = o.get_bool("control", s.control);
  settings_ = s;
}

Result ClampedWalk::run(Problem& problem, Observer& observer) {
  const Settings& cfg = settings_;
  const Tensor& e = problem.true_input;
  if (e.rank() != 3 || e.dim(0) != 1)
    throw Error("clamped_walk: the true input has shape " + shape_string(e.shape()) + ", expected [1, T, C]");
  const std::int64_t T = e.dim(1), C = e.dim(2);
  if (C < 2)
    throw Error("clamped_walk: the input's width is " + std::to_string(C) +
                "; a clamp index in [1, width) needs a width of at least 2");

  Tensor a = e;                           // the walk
  Tensor c = cfg.control ? e : Tensor();  // the control: the same perturbations, no inner steps
  Rng clamp_rng = problem.rng.fork("clamped_walk/clamp");
  Rng noise_rng = problem.rng.fork("clamped_walk/noise");
  Tensor noise(DType::f64, e.shape());

  double loss = 0, l1 = 0, l2 = 0, in_l2 = 0, in_l1 = 0;
  double c_l1 = 0, c_l2 = 0, c_in_l2 = 0, c_in_l1 = 0;
  for (std::int64_t n = 1; n <= cfg.steps; ++n) {
    const std::int64_t i = 1 + static_cast<std::int64_t>(clamp_rng.below(static_cast<std::uint64_t>(C - 1)));
    fill_normal(noise, noise_rng, 0.0, 1.0);
    const std::int64_t side_begin = cfg.perturb_low ? 0 : i, side_end = cfg.perturb_low ? i : C;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = side_begin; k < side_end; ++k) {
        const std::int64_t at = t * C + k;
        a.set(at, a.get(at) + cfg.rand_eta * noise.get(at));
        if (cfg.control) c.set(at, c.get(at) + cfg.rand_eta * noise.get(at));
      }

    double inner_first = 0, inner_last = 0;
    for (std::int64_t inner = 0; inner < cfg.inner_steps; ++inner) {
      LossAndGrad lg = problem.model.loss_and_grad(a, problem.target, cfg.metric);
      if (inner == 0) inner_first = lg.loss[0];
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t k = side_begin; k < side_end; ++k) lg.grad.set(t * C + k, 0.0);  // the clamp
      add_scaled(a, -cfg.inner_lr, lg.grad);
    }

    // Score the walk (and its control) in one batched pass.
    const Tensor output = problem.model.forward(cfg.control ? Tensor::concat0({a, c}) : a);
    const std::vector<double> d1 = distances(output, problem.target, Metric::l1);
    const std::vector<double> d2 = distances(output, problem.target, Metric::l2);
    l1 = d1[0];
    l2 = d2[0];
    loss = cfg.metric == Metric::l1   ? l1
           : cfg.metric == Metric::l2 ? l2
                                      : distances(output.slice0(0, 1), problem.target, cfg.metric)[0];
    in_l2 = l2_distance(a, e);
    in_l1 = l1_distance(a, e);
    inner_last = loss;
    if (cfg.inner_steps == 0) inner_first = loss;

    Step step;
    step.index = n;
    step.total = cfg.steps;
    step.loss = {loss};
    step.input = &a;
    step.values["clamp_index"] = static_cast<double>(i);
    step.values["output_distance"] = l1;
    step.values["output_distance_l2"] = l2;
    step.values["input_distance"] = in_l2;
    step.values["input_distance_l1"] = in_l1;
    step.values["ratio"] = ratio_of(in_l2, l2);
    step.values["ratio_l1"] = ratio_of(in_l1, l1);
    step.values["inner_loss_first"] = inner_first;
    step.values["inner_loss_last"] = inner_last;
    if (cfg.control) {
      c_l1 = d1[1];
      c_l2 = d2[1];
      c_in_l2 = l2_distance(c, e);
      c_in_l1 = l1_distance(c, e);
      step.values["control_output_distance"] = c_l1;
      step.values["control_output_distance_l2"] = c_l2;
      step.values["control_input_distance"] = c_in_l2;
      step.values["control_ratio"] = ratio_of(c_in_l2, c_l2);
      step.values["control_ratio_l1"] = ratio_of(c_in_l1, c_l1);
    }
    observer.on_step(step);
  }

  Result result;
  result.input = std::move(a);
  result.loss = loss;
  result.steps = cfg.steps;
  result.last_step = true;  // the walk's end point, where the study measures it
  result.metric = cfg.metric;
  result.values["input_distance"] = in_l2;
  result.values["output_distance"] = l1;
  result.values["output_distance_l2"] = l2;
  result.values["ratio"] = ratio_of(in_l2, l2);
  result.values["output_per_input"] = in_l2 > 0 ? l2 / in_l2 : 0.0;
  result.values["input_distance_l1"] = in_l1;
  result.values["ratio_l1"] = ratio_of(in_l1, l1);  // the study's r, L1 / L1
  if (cfg.control) {
    result.values["control_input_distance"] = c_in_l2;
    result.values["control_output_distance"] = c_l1;
    result.values["control_output_distance_l2"] = c_l2;
    result.values["control_ratio"] = ratio_of(c_in_l2, c_l2);
    result.values["control_output_per_input"] = c_in_l2 > 0 ? c_l2 / c_in_l2 : 0.0;
    result.values["control_input_distance_l1"] = c_in_l1;
    result.values["control_ratio_l1"] = ratio_of(c_in_l1, c_l1);
  }
  return result;
}

}  // namespace lminv
