// Optimizer `descent`: gradient descent on the model input, the seed study's equation 2.
//
//   a_0     = noise ~ N(init_mean, init_std)            (init = noise)
//           = s * noise + t * e                          (init = blend; e the true input)
//   a_{n+1} = a_n - lr_n * grad_a metric(O(a_n), O(e))
// with lr_n falling linearly from lr (first step) to lr_final (last step). The best input seen is
// returned, so a step that overshoots late in the run cannot spoil the result.
#include <limits>

#include "lminv/lminv.hpp"

namespace {

using namespace lminv;

class DescentOptimizer final : public Optimizer {
 public:
  void configure(const Options& o) override {
    steps_ = o.get_int("steps", steps_);
    if (steps_ <= 0) o.fail("steps", "must be positive");
    lr_ = o.get_double("lr", lr_);
    if (!(lr_ > 0)) o.fail("lr", "must be positive");
    lr_final_ = o.get_double("lr_final", lr_);
    if (!(lr_final_ >= 0)) o.fail("lr_final", "must be >= 0");
    metric_ = *parse_metric(o.get_choice("metric", "l1", {"l1", "l2", "cosine"}));
    init_ = o.get_choice("init", "noise", {"noise", "blend"});
    init_mean_ = o.get_double("init_mean", init_mean_);
    init_std_ = o.get_double("init_std", init_std_);
    if (!(init_std_ >= 0)) o.fail("init_std", "must be >= 0");
    blend_s_ = o.get_double("blend_s", blend_s_);
    blend_t_ = o.get_double("blend_t", blend_t_);
  }

  Result run(Problem& problem, Observer& observer) override {
    Tensor input(problem.true_input.dtype(), problem.true_input.shape());  // (1, T, d or V)
    Rng rng = problem.rng.fork("descent/init");
    fill_normal(input, rng, init_mean_, init_std_);
    if (init_ == "blend") {
      scale(input, blend_s_);
      add_scaled(input, blend_t_, problem.true_input);
    }

    Result best;
    best.metric = metric_;
    best.loss = std::numeric_limits<double>::infinity();
    for (std::int64_t n = 1; n <= steps_; ++n) {
      LossAndGrad lg = problem.model.loss_and_grad(input, problem.target, metric_);
      if (lg.loss[0] < best.loss) {
        best.loss = lg.loss[0];
        best.input = input;
      }
      Step step;
      step.index = n;
      step.total = steps_;
      step.loss = lg.loss;
      step.input = &input;
      step.values["lr"] = learning_rate(n);
      observer.on_step(step);
      add_scaled(input, -learning_rate(n), lg.grad);
    }
    // The input after the last update has not been scored yet.
    const double last = distances(problem.model.forward(input), problem.target, metric_)[0];
    if (last < best.loss) {
      best.loss = last;
      best.input = input;
    }
    best.steps = steps_;
    return best;
  }

 private:
  double learning_rate(std::int64_t n) const {
    if (steps_ == 1) return lr_;
    return lr_ + (lr_final_ - lr_) * static_cast<double>(n - 1) / static_cast<double>(steps_ - 1);
  }

  std::int64_t steps_ = 100;
  double lr_ = 0.1;
  double lr_final_ = 0.1;
  Metric metric_ = Metric::l1;
  std::string init_ = "noise";
  double init_mean_ = 0.5;
  double init_std_ = 0.05;
  double blend_s_ = 1.0;
  double blend_t_ = 1.0;
};

}  // namespace

LMINV_PLUGIN(DescentOptimizer, "descent", "0.1.0",
             "gradient descent on the input (seed eq. 2): noise or blended start, linear lr decay, l1/l2/cosine")
