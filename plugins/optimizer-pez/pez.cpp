// Optimizer `pez`: see pez.hpp.
#include "pez.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "lminv/ops.hpp"

namespace lminv {
namespace pez {

namespace {

std::string str(std::int64_t v) {
  return std::to_string(v);
}

// Below this many multiply-adds a pass runs on one thread: an OpenMP team costs more than it saves on a small
// vocabulary (and much more on a loaded machine, where its threads wait for cores).
constexpr std::int64_t kParallelWork = std::int64_t{1} << 20;

// dots[t, v] = <w_v, x_t> for the rows w_v of w [V, d] (f32 or f64) and points x [T, d], all in fp64. Rows go four
// at a time (widened to fp64 once) past every point while they are in L1: one pass over w, however many points, and
// each point's values loaded once for four rows. Each dot product is summed by one thread in one fixed order, so the
// result does not depend on the thread count.
template <class W>
void dot_products(const W* w, std::int64_t vocab, std::int64_t d, const double* x, std::int64_t positions,
                  double* dots) {
  constexpr std::int64_t kRows = 4;
  const std::int64_t groups = (vocab + kRows - 1) / kRows;
#pragma omp parallel if (vocab * d * positions >= kParallelWork)
  {
    std::vector<double> rows(static_cast<std::size_t>(kRows * d));
#pragma omp for schedule(static, 16)
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::int64_t v0 = g * kRows, n = std::min(kRows, vocab - v0);
      for (std::int64_t i = 0; i < kRows; ++i)
        for (std::int64_t j = 0; j < d; ++j) rows[i * d + j] = i < n ? static_cast<double>(w[(v0 + i) * d + j]) : 0.0;
      const double *r0 = rows.data(), *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
      for (std::int64_t t = 0; t < positions; ++t) {
        const double* xt = x + t * d;
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (std::int64_t j = 0; j < d; ++j) {
          a0 += r0[j] * xt[j];
          a1 += r1[j] * xt[j];
          a2 += r2[j] * xt[j];
          a3 += r3[j] * xt[j];
        }
        const double a[kRows] = {a0, a1, a2, a3};
        for (std::int64_t i = 0; i < n; ++i) dots[t * vocab + v0 + i] = a[i];
      }
    }
  }
}

}  // namespace

NearestTokens::NearestTokens(const Tensor& wte, Projection projection) : projection_(projection) {
  if (wte.rank() != 2 || wte.dim(0) < 1 || wte.dim(1) < 1)
    throw Error("pez: wte.weight must be [V, d], got " + shape_string(wte.shape()));
  if (wte.dtype() == DType::bf16) {
    widened_ = wte.to(DType::f32);  // bf16 is exact in f32
    wte_ = &widened_;
  } else {
    wte_ = &wte;
  }
  vocab_ = wte.dim(0);
  dim_ = wte.dim(1);
  norms_.assign(static_cast<std::size_t>(vocab_), 0.0);
  const std::int64_t vocab = vocab_, d = dim_;
  double* norms = norms_.data();
  auto norm_rows = [&](const auto* rows) {
#pragma omp parallel for schedule(static) if (vocab * d >= kParallelWork)
    for (std::int64_t v = 0; v < vocab; ++v) {
      double s = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        const double x = static_cast<double>(rows[v * d + j]);
        s += x * x;
      }
      norms[v] = std::sqrt(s);
    }
  };
  if (wte_->dtype() == DType::f64)
    norm_rows(wte_->data<double>());
  else
    norm_rows(wte_->data<float>());
}

std::vector<std::int64_t> NearestTokens::nearest(const std::vector<double>& points) const {
  const std::int64_t n = static_cast<std::int64_t>(points.size());
  if (n % dim_ != 0) throw Error("pez: " + str(n) + " values are not rows of d = " + str(dim_));
  const std::int64_t positions = n / dim_;
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(points[i]))
      throw Error("pez: the continuous prompt has a non-finite value at position " + str(i / dim_) + " (a " +
                  "non-finite model gradient, or an lr too large for the update)");
  std::vector<double> dots(static_cast<std::size_t>(positions * vocab_));  // [T, V]
  if (wte_->dtype() == DType::f64)
    dot_products(wte_->data<double>(), vocab_, dim_, points.data(), positions, dots.data());
  else
    dot_products(wte_->data<float>(), vocab_, dim_, points.data(), positions, dots.data());
  std::vector<std::int64_t> ids(static_cast<std::size_t>(positions));
  for (std::int64_t t = 0; t < positions; ++t) {
    const double* dot = dots.data() + t * vocab_;
    std::int64_t best = 0;
    if (projection_ == Projection::l2) {
      // Lowest |w_v|^2 - 2 <x, w_v>; strict < keeps the lower id on ties.
      double best_score = std::numeric_limits<double>::infinity();
      for (std::int64_t v = 0; v < vocab_; ++v) {
        const double score = norms_[v] * norms_[v] - 2.0 * dot[v];
        if (score < best_score) {
          best_score = score;
          best = v;
        }
      }
    } else {
      double xx = 0;
      for (std::int64_t j = 0; j < dim_; ++j) xx += points[t * dim_ + j] * points[t * dim_ + j];
      const double xn = std::sqrt(xx);
      double best_score = -std::numeric_limits<double>::infinity();
      for (std::int64_t v = 0; v < vocab_; ++v) {
        const double denominator = xn * norms_[v];
        const double score = denominator > 0 ? dot[v] / denominator : 0.0;
        if (score > best_score) {
          best_score = score;
          best = v;
        }
      }
    }
    ids[t] = best;
  }
  return ids;
}

Tensor NearestTokens::embed(const std::vector<std::int64_t>& ids, DType dtype) const {
  const std::int64_t positions = static_cast<std::int64_t>(ids.size());
  Tensor out(dtype, {1, positions, dim_});
  for (std::int64_t t = 0; t < positions; ++t) {
    const std::int64_t v = ids[t];
    if (v < 0 || v >= vocab_) throw Error("pez: token id " + str(v) + " is outside [0, " + str(vocab_) + ")");
    for (std::int64_t j = 0; j < dim_; ++j) out.set(t * dim_ + j, wte_->get(v * dim_ + j));
  }
  return out;
}

std::vector<double> NearestTokens::row(std::int64_t v) const {
  if (v < 0 || v >= vocab_) throw Error("pez: token id " + str(v) + " is outside [0, " + str(vocab_) + ")");
  std::vector<double> out(static_cast<std::size_t>(dim_));
  for (std::int64_t j = 0; j < dim_; ++j) out[j] = wte_->get(v * dim_ + j);
  return out;
}

}  // namespace pez

namespace {

std::string str(std::int64_t v) {
  return std::to_string(v);
}

// The elements of t as doubles.
std::vector<double> as_doubles(const Tensor& t) {
  const Tensor d = t.to(DType::f64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

// The continuous start P_0 [T, d], row-major fp64.
std::vector<double> initial_prompt(const std::string& init, const pez::NearestTokens& tokens, const Tensor& wte,
                                   std::int64_t positions, Rng& rng) {
  const std::int64_t V = tokens.vocab_size(), d = tokens.dim();
  std::vector<double> p(static_cast<std::size_t>(positions * d));
  if (init == "random_tokens") {
    for (std::int64_t t = 0; t < positions; ++t) {
      const std::vector<double> w = tokens.row(static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(V))));
      std::copy(w.begin(), w.end(), p.begin() + t * d);
    }
    return p;
  }
  if (init == "mean") {
    std::vector<double> sum(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t v = 0; v < V; ++v)
      for (std::int64_t j = 0; j < d; ++j) sum[j] += wte.get(v * d + j);
    for (std::int64_t t = 0; t < positions; ++t)
      for (std::int64_t j = 0; j < d; ++j) p[t * d + j] = sum[j] / static_cast<double>(V);
    return p;
  }
  // noise: N(mu, sigma) on the scale of wte's elements.
  const std::int64_t n = wte.numel();
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) sum += wte.get(i);
  const double mu = sum / static_cast<double>(n);
  double squares = 0;
  for (std::int64_t i = 0; i < n; ++i) squares += (wte.get(i) - mu) * (wte.get(i) - mu);
  const double sigma = std::sqrt(squares / static_cast<double>(n));
  std::generate(p.begin(), p.end(), [&rng, mu, sigma] { return rng.normal(mu, sigma); });
  return p;
}

}  // namespace

void Pez::configure(const Options& o) {
  Settings s;
  auto finite = [&o](const std::string& key, double value) {
    if (!std::isfinite(value)) o.fail(key, "must be a finite number");
    return value;
  };
  s.steps = o.get_int("steps", s.steps);
  if (s.steps <= 0) o.fail("steps", "must be positive");
  s.lr = finite("lr", o.get_double("lr", s.lr));
  if (!(s.lr > 0)) o.fail("lr", "must be positive");
  s.weight_decay = finite("weight_decay", o.get_double("weight_decay", s.weight_decay));
  if (!(s.weight_decay >= 0)) o.fail("weight_decay", "must be >= 0");
  s.adam = o.get_choice("update", "adam", {"adam", "sgd"}) == "adam";
  s.beta1 = o.get_double("beta1", s.beta1);
  if (!(s.beta1 >= 0 && s.beta1 < 1)) o.fail("beta1", "must be in [0, 1)");
  s.beta2 = o.get_double("beta2", s.beta2);
  if (!(s.beta2 >= 0 && s.beta2 < 1)) o.fail("beta2", "must be in [0, 1)");
  s.eps = finite("eps", o.get_double("eps", s.eps));
  if (!(s.eps > 0)) o.fail("eps", "must be positive");
  s.projection =
      o.get_choice("projection", "cosine", {"cosine", "l2"}) == "l2" ? pez::Projection::l2 : pez::Projection::cosine;
  s.init = o.get_choice("init", s.init, {"random_tokens", "mean", "noise"});
  s.metric = *parse_metric(o.get_choice("metric", "l2", {"l1", "l2", "cosine"}));
  s.tolerance = finite("tolerance", o.get_double("tolerance", s.tolerance));
  if (!(s.tolerance >= 0)) o.fail("tolerance", "must be >= 0");
  settings_ = std::move(s);
}

Result Pez::run(Problem& problem, Observer& observer) {
  const Settings& s = settings_;
  const ModelSpec& spec = problem.model.spec();
  if (spec.input != InputSpace::embedding)
    throw Error(std::string("pez: [model] input = ") + input_space_name(spec.input) +
                " is not supported: pez optimises token embeddings (input = embedding)");
  if (!problem.weights || !problem.weights->contains("wte.weight"))
    throw Error("pez: the weights have no 'wte.weight', the token embedding [V, d] that pez projects onto");
  const std::int64_t V = spec.vocab_size, d = spec.n_embd, T = spec.seq_len;
  if (T < 1) throw Error("pez: the model's seq_len is " + str(T) + ", nothing to optimise");
  const Tensor& wte_given = problem.weights->get("wte.weight", {V, d});
  const pez::NearestTokens tokens(wte_given, s.projection);
  const DType dtype = spec.dtype;

  Rng init_rng = problem.rng.fork("pez/init");
  std::vector<double> p = initial_prompt(s.init, tokens, wte_given, T, init_rng);
  const std::size_t n_elements = p.size();
  std::vector<double> m, v;  // Adam's moments
  if (s.adam) {
    m.assign(n_elements, 0.0);
    v.assign(n_elements, 0.0);
  }

  Result result;
  result.metric = s.metric;
  result.loss = std::numeric_limits<double>::infinity();
  std::int64_t best_step = 0, evaluations = 0, steps_run = 0;
  const std::int64_t stride = (s.steps + kMaxSeries - 1) / kMaxSeries;
  std::vector<double>& loss_series = result.series["loss"];

  std::vector<std::int64_t> ids, previous_ids;
  Tensor projected;
  LossAndGrad lg;
  std::vector<double> grad;
  for (std::int64_t n = 1; n <= s.steps; ++n) {
    ids = tokens.nearest(p);
    const bool evaluate = ids != previous_ids;
    std::int64_t changes = T;
    if (!previous_ids.empty()) {
      changes = 0;
      for (std::int64_t t = 0; t < T; ++t) changes += ids[t] != previous_ids[t];
    }
    if (evaluate) {
      projected = tokens.embed(ids, dtype);  // [1, T, d]
      lg = problem.model.loss_and_grad(projected, problem.target, s.metric);
      if (lg.loss.size() != 1 || lg.grad.numel() != projected.numel())
        throw Error("pez: the model returned " + str(static_cast<std::int64_t>(lg.loss.size())) +
                    " losses and a gradient " + shape_string(lg.grad.shape()) + " for an input " +
                    shape_string(projected.shape()));
      grad = as_doubles(lg.grad);
      ++evaluations;
    }
    const double loss = lg.loss[0];
    // The first step counts whatever its loss; after it NaN is never better, and any number is better than NaN.
    if (result.ids.empty() || loss < result.loss || (std::isnan(result.loss) && !std::isnan(loss))) {
      result.loss = loss;
      result.ids = ids;
      result.input = projected;
      best_step = n;
    }
    steps_run = n;
    if ((n - 1) % stride == 0) loss_series.push_back(loss);

    Step step;
    step.index = n;
    step.total = s.steps;
    step.loss = {loss};
    step.input = &projected;
    step.values["best_loss"] = result.loss;
    step.values["token_changes"] = static_cast<double>(changes);
    step.values["evaluated"] = evaluate ? 1.0 : 0.0;
    observer.on_step(step);
    if (loss <= s.tolerance) break;

    // The gradient at the projection moves the continuous prompt: AdamW (or SGD) with decoupled weight decay.
    const double decay = 1.0 - s.lr * s.weight_decay;
    if (s.adam) {
      const double c1 = 1.0 - std::pow(s.beta1, static_cast<double>(n));
      const double c2 = 1.0 - std::pow(s.beta2, static_cast<double>(n));
      for (std::size_t i = 0; i < n_elements; ++i) {
        const double g = grad[i];
        m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g;
        v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
        p[i] = p[i] * decay - s.lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + s.eps);
      }
    } else {
      for (std::size_t i = 0; i < n_elements; ++i) p[i] = p[i] * decay - s.lr * grad[i];
    }
    previous_ids = ids;
  }

  result.steps = steps_run;
  result.values["best_step"] = static_cast<double>(best_step);
  result.values["steps_run"] = static_cast<double>(steps_run);
  result.values["model_evaluations"] = static_cast<double>(evaluations);
  result.values["series_stride"] = static_cast<double>(stride);
  return result;
}

}  // namespace lminv
