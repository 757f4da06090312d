// Optimizer `orthogonal_walk`: see orthogonal_walk.hpp.
#include "orthogonal_walk.hpp"

#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "lminv/ops.hpp"

namespace lminv {
namespace orthogonal_walk {

namespace {

template <class S>
Eigen::MatrixXd vectors_in(const Eigen::MatrixXd& g, const std::vector<std::int64_t>& columns, NullSpaceMethod method) {
  using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  const Eigen::Index rows = g.rows(), cols = g.cols();
  for (std::int64_t j : columns)
    if (j < 0 || j >= cols)
      throw Error("orthogonal_walk: right-singular vector " + std::to_string(j) + " of a " + std::to_string(rows) +
                  " x " + std::to_string(cols) + " gradient does not exist");
  const Matrix gs = g.template cast<S>();
  Eigen::MatrixXd out(cols, static_cast<Eigen::Index>(columns.size()));
  if (method == NullSpaceMethod::full_svd) {
    Eigen::JacobiSVD<Matrix> svd(gs, Eigen::ComputeFullV);
    for (std::size_t k = 0; k < columns.size(); ++k)
      out.col(static_cast<Eigen::Index>(k)) = svd.matrixV().col(columns[k]).template cast<double>();
    return out;
  }
  for (std::int64_t j : columns)
    if (j < rows)
      throw Error("orthogonal_walk: right-singular vector " + std::to_string(j) + " < " + std::to_string(rows) +
                  " needs the full SVD, not the QR route (only null-space columns j >= rows come from Q)");
  // JacobiSVD's own first stage for a wide matrix: G^T P = Q R; V = Q diag(V_R, I).
  const Matrix gt = gs.transpose();
  Eigen::ColPivHouseholderQR<Matrix> qr(gt);
  for (std::size_t k = 0; k < columns.size(); ++k) {
    const Vector unit = Vector::Unit(cols, columns[k]);
    const Vector q = qr.householderQ() * unit;
    out.col(static_cast<Eigen::Index>(k)) = q.template cast<double>();
  }
  return out;
}

std::string str(std::int64_t v) {
  return std::to_string(v);
}

}  // namespace

Eigen::MatrixXd right_singular_vectors(const Eigen::MatrixXd& g, const std::vector<std::int64_t>& columns, DType dtype,
                                       NullSpaceMethod method) {
  switch (dtype) {
    case DType::f64: return vectors_in<double>(g, columns, method);
    case DType::f32: return vectors_in<float>(g, columns, method);
    default: throw Error(std::string("orthogonal_walk: no SVD in ") + dtype_name(dtype) + " (f64 or f32)");
  }
}

}  // namespace orthogonal_walk

void OrthogonalWalk::configure(const Options& o) {
  Settings s;
  s.steps = o.get_int("steps", s.steps);
  if (s.steps <= 0) o.fail("steps", "must be positive");
  s.eta = o.get_double("eta", s.eta);
  if (!(s.eta > 0) || !std::isfinite(s.eta)) o.fail("eta", "must be a positive number");
  s.svd_dtype = *parse_dtype(o.get_choice("svd_dtype", "f64", {"f64", "f32"}));
  s.matrix = o.get_choice("direction", "vector", {"vector", "matrix"}) == "matrix";
  s.last = o.get_string("index", "") == "last";
  if (!s.last) s.index = o.get_int("index", s.index);
  if (s.index < -1)
    o.fail("index", "must be >= 0 (the column T + index of V), last (the column C - 1) or -1 (a random column each "
                    "step)");
  if (s.matrix && (s.index != -1 || s.last))
    o.fail("index", "applies to direction = vector only (direction = matrix draws T random columns each step)");
  s.keep_sign = o.get_choice("sign", "continue", {"continue", "svd"}) == "continue";
  s.metric = *parse_metric(o.get_choice("metric", "l1", {"l1", "l2", "cosine"}));
  settings_ = s;
}

Result OrthogonalWalk::run(Problem& problem, Observer& observer) {
  using orthogonal_walk::str;
  const Settings& cfg = settings_;
  const Tensor& e = problem.true_input;
  if (e.rank() != 3 || e.dim(0) != 1)
    throw Error("orthogonal_walk: the true input has shape " + shape_string(e.shape()) + ", expected [1, T, C]");
  const std::int64_t T = e.dim(1), C = e.dim(2);
  const std::int64_t null_dim = C - T;  // columns T .. C-1 of V
  if (!cfg.matrix && null_dim < 1)
    throw Error("orthogonal_walk: the input gradient is " + str(T) + " x " + str(C) +
                "; V has no column j >= T = " + str(T) + " (a null-space direction needs the width C > T)");
  if (cfg.matrix && null_dim < T)
    throw Error("orthogonal_walk: direction = matrix needs T = " + str(T) + " distinct null-space columns j >= T of " +
                "V, but a " + str(T) + " x " + str(C) + " gradient leaves " + str(std::max<std::int64_t>(null_dim, 0)) +
                " (the width C must be >= 2 T)");
  if (cfg.index >= null_dim)
    throw Error("orthogonal_walk: index = " + str(cfg.index) + " is outside the null space: the column T + index = " +
                str(T + cfg.index) + " of V must be < C = " + str(C) + ", so index < " + str(null_dim));

  const orthogonal_walk::NullSpaceMethod method = orthogonal_walk::method_for_width(C);
  Tensor a = e;
  Tensor ones(problem.target.dtype(), problem.target.shape());
  for (std::int64_t i = 0; i < ones.numel(); ++i) ones.set(i, 1.0);
  Rng rng = problem.rng.fork("orthogonal_walk/direction");

  const Eigen::Index n_dirs = cfg.matrix ? T : 1;
  Eigen::MatrixXd previous = Eigen::MatrixXd::Zero(C, n_dirs);
  std::vector<std::int64_t> pool(static_cast<std::size_t>(std::max<std::int64_t>(null_dim, 0)));
  double orth_sum = 0, orth_max = 0, dot_max = 0;
  double loss = 0, l1 = 0, l2 = 0, in_l2 = 0, in_l1 = 0;

  for (std::int64_t n = 1; n <= cfg.steps; ++n) {
    const Tensor g = problem.model.backward(a, ones).to(DType::f64);  // [1, T, C]
    const Eigen::MatrixXd gm = Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
        g.data<double>(), T, C);

    std::vector<std::int64_t> columns;
    if (!cfg.matrix) {
      const std::int64_t j = cfg.last        ? C - 1
                             : cfg.index >= 0 ? T + cfg.index
                                              : T + static_cast<std::int64_t>(rng.below(null_dim));
      columns.push_back(j);
    } else {  // T distinct columns: a partial Fisher-Yates shuffle of T .. C-1
      std::iota(pool.begin(), pool.end(), T);
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int64_t k = t + static_cast<std::int64_t>(rng.below(null_dim - t));
        std::swap(pool[t], pool[k]);
        columns.push_back(pool[t]);
      }
    }
    Eigen::MatrixXd dirs = orthogonal_walk::right_singular_vectors(gm, columns, cfg.svd_dtype, method);
    for (Eigen::Index k = 0; k < n_dirs; ++k) {
      dirs.col(k).normalize();
      if (cfg.keep_sign && dirs.col(k).dot(previous.col(k)) < 0) dirs.col(k) *= -1.0;
    }
    previous = dirs;

    // How orthogonal the directions are to the gradient rows they were computed from.
    const Eigen::MatrixXd dots = gm * dirs;  // [T, n_dirs]
    double gradient_dot = 0, orthogonality = 0, gradient_norm = 0;
    for (Eigen::Index s = 0; s < T; ++s) {
      const double norm = gm.row(s).norm();
      gradient_norm = std::max(gradient_norm, norm);
      for (Eigen::Index k = 0; k < n_dirs; ++k) {
        const double d = std::abs(dots(s, k));
        gradient_dot = std::max(gradient_dot, d);
        if (norm > 0) orthogonality = std::max(orthogonality, d / norm);
      }
    }
    orth_sum += orthogonality;
    orth_max = std::max(orth_max, orthogonality);
    dot_max = std::max(dot_max, gradient_dot);

    // The move: row t by eta times its direction.
    for (std::int64_t t = 0; t < T; ++t) {
      const Eigen::Index k = cfg.matrix ? t : 0;
      for (std::int64_t c = 0; c < C; ++c) a.set(t * C + c, a.get(t * C + c) + cfg.eta * dirs(c, k));
    }

    const Tensor output = problem.model.forward(a);
    l1 = distances(output, problem.target, Metric::l1)[0];
    l2 = distances(output, problem.target, Metric::l2)[0];
    loss = cfg.metric == Metric::l1   ? l1
           : cfg.metric == Metric::l2 ? l2
                                      : distances(output, problem.target, cfg.metric)[0];
    in_l2 = l2_distance(a, e);
    in_l1 = l1_distance(a, e);

    Step step;
    step.index = n;
    step.total = cfg.steps;
    step.loss = {loss};
    step.input = &a;
    step.values["gradient_dot"] = gradient_dot;
    step.values["orthogonality"] = orthogonality;
    step.values["gradient_norm"] = gradient_norm;
    step.values["direction_index"] = cfg.matrix ? -1.0 : static_cast<double>(columns[0]);
    step.values["output_distance"] = l1;
    step.values["output_distance_l2"] = l2;
    step.values["input_distance"] = in_l2;
    step.values["input_distance_l1"] = in_l1;
    step.values["ratio"] = l2 > 0 ? in_l2 / l2 : std::numeric_limits<double>::infinity();
    step.values["ratio_l1"] = l1 > 0 ? in_l1 / l1 : std::numeric_limits<double>::infinity();
    step.values["output_per_input_l1"] = in_l1 > 0 ? l1 / in_l1 : 0.0;
    observer.on_step(step);
  }

  Result result;
  result.input = std::move(a);
  result.loss = loss;
  result.steps = cfg.steps;
  result.last_step = true;  // the walk's end point
  result.metric = cfg.metric;
  result.values["input_distance"] = in_l2;
  result.values["output_distance"] = l1;
  result.values["output_distance_l2"] = l2;
  result.values["ratio"] = l2 > 0 ? in_l2 / l2 : std::numeric_limits<double>::infinity();
  result.values["output_per_input"] = in_l2 > 0 ? l2 / in_l2 : 0.0;
  result.values["input_distance_l1"] = in_l1;
  result.values["ratio_l1"] = l1 > 0 ? in_l1 / l1 : std::numeric_limits<double>::infinity();
  result.values["output_per_input_l1"] = in_l1 > 0 ? l1 / in_l1 : 0.0;
  result.values["orthogonality_mean"] = orth_sum / static_cast<double>(cfg.steps);
  result.values["orthogonality_max"] = orth_max;
  result.values["gradient_dot_max"] = dot_max;
  return result;
}

}  // namespace lminv
