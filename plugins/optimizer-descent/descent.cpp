// Optimizer `descent`: gradient descent on the model input, the seed study's equations 2 (embedding space) and 5
// (vocabulary space).
//
//   a_0     = noise ~ N(init_mean, init_std)            (init = noise)
//           = s * noise + t * X                          (init = blend)
//   a_{n+1} = a_n - lr_n * grad_a metric(O(a_n), O(e))                           (optimiser = sgd)
//           = a_n - lr_n * m_hat / (sqrt(v_hat) + eps)                            (optimiser = adam)
// with lr_n falling linearly from lr (first step) to lr_final (last step), and Adam's moments
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,  m_hat = m / (1 - beta1^n), v_hat = v / (1 - beta2^n).
//
// X is the true input e [1, T, d] for embedding-space inputs. For vocabulary-space inputs [1, T, V] (the model
// multiplies its input by wte [V, d]) X is chosen by `vocab_start`:
//   onehot   onehot_scale * e (e is the prompt's one-hot vectors)
//   pinv     onehot_scale * (e wte) pinv(wte) = onehot_scale * wte (wte^T wte)^+ (e wte)^T, the minimum-norm
//            vocabulary vectors that map to the true token embeddings
//
// `restarts` = B independent starts run together: one [B, T, d or V] batch per backend call. Start b draws its
// noise from problem.rng.fork("descent/init/<restart_offset + b>") and every update is element-wise, so a start
// follows the same trajectory alone (restarts = 1, restart_offset = b) as in a batch, given a backend whose batched
// results equal its one-by-one results (the reference backend's do, bit for bit). The best input seen by any start
// (lowest loss) is returned, so a step that overshoots late in the run cannot spoil the result.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "lminv/lminv.hpp"
#include "pinv_decoder.hpp"

namespace {

using namespace lminv;

// x[i] <- f(i, x[i]) with x read and written in its own dtype, the arithmetic in double.
template <class F>
void update_elements(Tensor& x, F&& f) {
  const std::int64_t n = x.numel();
  switch (x.dtype()) {
    case DType::f32: {
      float* p = x.data<float>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(f(i, static_cast<double>(p[i])));
      break;
    }
    case DType::f64: {
      double* p = x.data<double>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = f(i, p[i]);
      break;
    }
    case DType::bf16: {
      bf16* p = x.data<bf16>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = bf16::from_float(static_cast<float>(f(i, p[i].to_float())));
      break;
    }
  }
}

// The elements of t as doubles.
std::vector<double> as_doubles(const Tensor& t) {
  const Tensor d = t.to(DType::f64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

class DescentOptimizer final : public Optimizer {
 public:
  void configure(const Options& o) override {
    auto finite = [&o](const std::string& key, double value) {
      if (!std::isfinite(value)) o.fail(key, "must be a finite number");
      return value;
    };
    steps_ = o.get_int("steps", 100);
    if (steps_ <= 0) o.fail("steps", "must be positive");
    lr_ = o.get_double("lr", 0.1);
    if (!(lr_ > 0)) o.fail("lr", "must be positive");
    finite("lr", lr_);
    lr_final_ = o.get_double("lr_final", lr_);
    if (!(lr_final_ >= 0)) o.fail("lr_final", "must be >= 0");
    finite("lr_final", lr_final_);
    metric_ = *parse_metric(o.get_choice("metric", "l1", {"l1", "l2", "cosine"}));
    init_ = o.get_choice("init", "noise", {"noise", "blend"});
    init_mean_ = finite("init_mean", o.get_double("init_mean", 0.5));
    init_std_ = o.get_double("init_std", 0.05);
    if (!(init_std_ >= 0)) o.fail("init_std", "must be >= 0");
    finite("init_std", init_std_);
    blend_s_ = finite("blend_s", o.get_double("blend_s", 1.0));
    blend_t_ = finite("blend_t", o.get_double("blend_t", 1.0));

    adam_ = o.get_choice("optimiser", "sgd", {"sgd", "adam"}) == "adam";
    beta1_ = o.get_double("beta1", 0.9);
    if (!(beta1_ >= 0 && beta1_ < 1)) o.fail("beta1", "must be in [0, 1)");
    beta2_ = o.get_double("beta2", 0.999);
    if (!(beta2_ >= 0 && beta2_ < 1)) o.fail("beta2", "must be in [0, 1)");
    eps_ = o.get_double("eps", 1e-8);
    if (!(eps_ > 0)) o.fail("eps", "must be positive");
    finite("eps", eps_);

    restarts_ = o.get_int("restarts", 1);
    if (restarts_ < 1) o.fail("restarts", "must be at least 1");
    restart_offset_ = o.get_int("restart_offset", 0);
    if (restart_offset_ < 0) o.fail("restart_offset", "must be >= 0");

    vocab_pinv_ = o.get_choice("vocab_start", "onehot", {"onehot", "pinv"}) == "pinv";
    onehot_scale_ = finite("onehot_scale", o.get_double("onehot_scale", 1.0));
  }

  Result run(Problem& problem, Observer& observer) override {
    const Tensor& truth = problem.true_input;
    if (truth.rank() != 3 || truth.dim(0) != 1)
      throw Error("descent: the true input must be [1, T, d or V], got " + shape_string(truth.shape()));
    const std::int64_t B = restarts_, T = truth.dim(1), W = truth.dim(2);
    const Tensor x_blend = init_ == "blend" ? blend_target(problem) : Tensor();

    // The B starts, each from its own stream.
    Tensor input(truth.dtype(), {B, T, W});
    for (std::int64_t b = 0; b < B; ++b) {
      Tensor start(truth.dtype(), truth.shape());
      Rng rng = problem.rng.fork("descent/init/" + std::to_string(restart_offset_ + b));
      fill_normal(start, rng, init_mean_, init_std_);
      if (init_ == "blend") {
        scale(start, blend_s_);
        add_scaled(start, blend_t_, x_blend);
      }
      std::memcpy(static_cast<char*>(input.raw()) + b * start.nbytes(), start.raw(), start.nbytes());
    }

    // The best input of each start and the loss it had.
    std::vector<double> item_loss(static_cast<std::size_t>(B), std::numeric_limits<double>::infinity());
    std::vector<Tensor> item_input(static_cast<std::size_t>(B));
    double best_so_far = std::numeric_limits<double>::infinity();
    auto keep_best = [&](const std::vector<double>& losses) {
      for (std::int64_t b = 0; b < B; ++b) {
        if (losses[b] < item_loss[b]) {
          item_loss[b] = losses[b];
          item_input[b] = input.slice0(b, b + 1);
        }
        if (losses[b] < best_so_far) best_so_far = losses[b];
      }
    };

    std::vector<double> m, v;  // Adam's moments, one per element of the batch
    if (adam_) {
      m.assign(static_cast<std::size_t>(input.numel()), 0.0);
      v.assign(static_cast<std::size_t>(input.numel()), 0.0);
    }

    for (std::int64_t n = 1; n <= steps_; ++n) {
      LossAndGrad lg = problem.model.loss_and_grad(input, problem.target, metric_);
      if (static_cast<std::int64_t>(lg.loss.size()) != B || lg.grad.numel() != input.numel())
        throw Error("descent: the model returned " + std::to_string(lg.loss.size()) + " losses and a gradient " +
                    shape_string(lg.grad.shape()) + " for an input " + shape_string(input.shape()));
      keep_best(lg.loss);
      const double lr = learning_rate(n);
      Step step;
      step.index = n;
      step.total = steps_;
      step.loss = lg.loss;
      step.input = &input;
      step.values["lr"] = lr;
      step.values["best_loss"] = best_so_far;
      observer.on_step(step);
      update(input, lg.grad, n, lr, m, v);
    }
    // The inputs after the last update have not been scored yet.
    std::vector<double> last = distances(problem.model.forward(input), problem.target, metric_);
    if (static_cast<std::int64_t>(last.size()) != B)
      throw Error("descent: the model returned " + std::to_string(last.size()) + " outputs for " +
                  std::to_string(B) + " inputs");
    keep_best(last);

    // The best start; ties to the lower index. A start whose losses were all NaN keeps its last input.
    std::int64_t best = -1;
    for (std::int64_t b = 0; b < B; ++b) {
      if (item_input[b].empty()) {
        item_input[b] = input.slice0(b, b + 1);
        item_loss[b] = last[b];
      }
      if (best < 0 || item_loss[b] < item_loss[best] || (std::isnan(item_loss[best]) && !std::isnan(item_loss[b])))
        best = b;
    }
    Result result;
    result.input = std::move(item_input[best]);
    result.loss = item_loss[best];
    result.steps = steps_;
    result.metric = metric_;
    result.values["best_restart"] = static_cast<double>(restart_offset_ + best);
    return result;
  }

 private:
  double learning_rate(std::int64_t n) const {
    if (steps_ == 1) return lr_;
    return lr_ + (lr_final_ - lr_) * static_cast<double>(n - 1) / static_cast<double>(steps_ - 1);
  }

  void update(Tensor& input, const Tensor& grad_in, std::int64_t n, double lr, std::vector<double>& m,
              std::vector<double>& v) const {
    const Tensor grad = grad_in.dtype() == input.dtype() ? Tensor() : grad_in.to(input.dtype());
    const Tensor& g = grad.empty() ? grad_in : grad;
    if (!adam_) {
      add_scaled(input, -lr, g);
      return;
    }
    const std::vector<double> gd = as_doubles(g);
    const double c1 = 1.0 - std::pow(beta1_, static_cast<double>(n));
    const double c2 = 1.0 - std::pow(beta2_, static_cast<double>(n));
    update_elements(input, [&](std::int64_t i, double x) {
      const double gi = gd[i];
      m[i] = beta1_ * m[i] + (1.0 - beta1_) * gi;
      v[i] = beta2_ * v[i] + (1.0 - beta2_) * gi * gi;
      return x - lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + eps_);
    });
  }

  // X of `init = blend`, [1, T, d or V] in the true input's dtype.
  Tensor blend_target(const Problem& problem) const {
    const Tensor& truth = problem.true_input;
    const ModelSpec& spec = problem.model.spec();
    if (spec.input != InputSpace::vocab) return truth;
    const std::int64_t T = truth.dim(1), V = spec.vocab_size, d = spec.n_embd;
    if (truth.dim(2) != V)
      throw Error("descent: a vocab-space true input must be [1, T, V = " + std::to_string(V) + "], got " +
                  shape_string(truth.shape()));
    Tensor x(truth.dtype(), truth.shape());
    if (!vocab_pinv_) {
      for (std::int64_t i = 0; i < x.numel(); ++i) x.set(i, onehot_scale_ * truth.get(i));
      return x;
    }
    if (!problem.weights) throw Error("descent: vocab_start = pinv needs the weights (wte.weight), none given");
    const Tensor& wte_given = problem.weights->get("wte.weight", {V, d});
    const Tensor wte = wte_given.dtype() == DType::bf16 ? wte_given.to(DType::f32) : Tensor();
    const Tensor& w = wte.empty() ? wte_given : wte;
    // e = truth wte, [T, d], in fp64: stored column-major as e^T [d, T] for the solve.
    Eigen::MatrixXd et = Eigen::MatrixXd::Zero(d, T);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t u = 0; u < V; ++u) {
        const double a = truth.get(t * V + u);
        if (a == 0) continue;
        for (std::int64_t j = 0; j < d; ++j) et(j, t) += a * w.get(u * d + j);
      }
    std::vector<double> rows(static_cast<std::size_t>(T * V));
    pinv::pinv_vocab_rows(w, et, rows.data());  // [T, V]: wte (G^+ e^T), position by position
    for (std::int64_t i = 0; i < x.numel(); ++i) x.set(i, onehot_scale_ * rows[i]);
    return x;
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
  bool adam_ = false;
  double beta1_ = 0.9;
  double beta2_ = 0.999;
  double eps_ = 1e-8;
  std::int64_t restarts_ = 1;
  std::int64_t restart_offset_ = 0;
  bool vocab_pinv_ = false;
  double onehot_scale_ = 1.0;
};

}  // namespace

LMINV_PLUGIN(DescentOptimizer, "descent", "0.1.0",
             "gradient descent on the input (seed eq. 2, 5): sgd/adam, batched restarts, noise/blend/vocab starts")
