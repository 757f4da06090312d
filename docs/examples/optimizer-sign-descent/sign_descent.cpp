// An example optimizer plugin: sign gradient descent on the model input.
//
//   a_{n+1} = a_n - lr_n * sign(grad_a metric(O(a_n), target))
//
// Every coordinate moves by the same amount each step, whatever the gradient's scale: a method that
// copes with the very uneven gradients of deep models. It uses nothing but the lminv SDK.
#include <limits>

#include "lminv/lminv.hpp"

namespace {

class SignDescent final : public lminv::Optimizer {
 public:
  // Read every key here: the host reports any key of [optimizer] that no one read as unknown.
  void configure(const lminv::Options& options) override {
    steps_ = options.get_int("steps", 100);
    if (steps_ <= 0) options.fail("steps", "must be positive");
    lr_ = options.get_double("lr", 0.01);
    if (!(lr_ > 0)) options.fail("lr", "must be positive");
    lr_final_ = options.get_double("lr_final", lr_ / 10);
    metric_ = *lminv::parse_metric(options.get_choice("metric", "l1", {"l1", "l2", "cosine"}));
  }

  lminv::Result run(lminv::Problem& problem, lminv::Observer& observer) override {
    lminv::Tensor input(problem.true_input.dtype(), problem.true_input.shape());  // (1, T, d)
    lminv::Rng rng = problem.rng.fork("sign-descent/init");
    lminv::fill_normal(input, rng, 0.5, 0.05);

    lminv::Result best;
    best.metric = metric_;
    best.loss = std::numeric_limits<double>::infinity();
    for (std::int64_t n = 1; n <= steps_; ++n) {
      lminv::LossAndGrad lg = problem.model.loss_and_grad(input, problem.target, metric_);
      if (lg.loss[0] < best.loss) {
        best.loss = lg.loss[0];
        best.input = input;
      }
      lminv::Step step;
      step.index = n;
      step.total = steps_;
      step.loss = lg.loss;
      step.input = &input;
      observer.on_step(step);

      const double lr = lr_ + (lr_final_ - lr_) * static_cast<double>(n - 1) / static_cast<double>(steps_);
      for (std::int64_t i = 0; i < input.numel(); ++i) {
        const double g = lg.grad.get(i);
        input.set(i, input.get(i) - lr * ((g > 0) - (g < 0)));
      }
    }
    best.steps = steps_;
    return best;
  }

 private:
  std::int64_t steps_ = 100;
  double lr_ = 0.01;
  double lr_final_ = 0.001;
  lminv::Metric metric_ = lminv::Metric::l1;
};

}  // namespace

LMINV_PLUGIN(SignDescent, "sign_descent", "1.0.0", "example out-of-tree plugin: sign gradient descent on the input")
