#include "policies.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <numeric>

namespace lminv::sequential {

namespace {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VectorF = Eigen::VectorXf;

// Tokens sorted by score (ascending), with each token's place in that order.
struct Ranking {
  std::vector<Index> order, place;
  Index next = 0;  // first entry of `order` not handed out yet

  void sort(const std::vector<float>& score) {
    order.resize(score.size());
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return score[a] < score[b]; });
    place.assign(order.size(), 0);
    for (std::size_t r = 0; r < order.size(); ++r) place[order[r]] = static_cast<Index>(r);
    next = 0;
  }

  std::vector<Index> take(const Verifier& v, Index n) {
    std::vector<Index> ids;
    const Index size = static_cast<Index>(order.size());
    for (; next < size && static_cast<Index>(ids.size()) < n; ++next)
      if (!v.verified(order[next])) ids.push_back(order[next]);
    return ids;
  }
};

// ---- linearized ---------------------------------------------------------------------------------------------------

class Linearized final : public CandidateSource {
 public:
  explicit Linearized(const LinearizedSettings& s) : s_(s) {}

  void begin(Verifier& v) override {
    if (v.spec().input != InputSpace::embedding)
      throw Error("policy 'linearized' needs [model] input = embedding (use policy gradient or random)");
    if (W_.size() == 0) prepare(v);
    jacobians_here_ = 0;
    since_rank_ = 0;
    if (s_.reuse_jacobian && J_.size() > 0) {
      // The previous position's J and point e: only F(e) changes with the prefix.
      const Tensor out = v.outputs(point_rows(v, e_), 1);
      f_e_ = row_of(out, 0, v.out_width());
      rank(v, /*new_jacobian=*/false);
    } else {
      linearize(v, e0_);
    }
  }

  std::vector<Index> next(Verifier& v, Index n) override {
    if (since_rank_ >= s_.relinearize_after && jacobians_here_ < s_.max_jacobians) {
      if (jacobians_here_ == 0) {
        linearize(v, e0_);  // the reused J failed: a fresh one at the mean embedding
      } else {
        Index best = -1;  // the closest token verified so far
        for (Index id = 0; id < v.vocab(); ++id)
          if (v.verified(id) && (best < 0 || v.distance(id) < v.distance(best))) best = id;
        linearize(v, W_.row(best).transpose());
      }
    }
    std::vector<Index> ids = ranking_.take(v, n);
    since_rank_ += static_cast<Index>(ids.size());
    return ids;
  }

  Index rank_of(Index id) const override { return ranking_.place.empty() ? -1 : ranking_.place[id]; }

  std::map<std::string, double> totals() const override {
    return {{"jacobians", static_cast<double>(jacobians_)}, {"fd_step", h_}};
  }

 private:
  void prepare(Verifier& v) {
    const Index V = v.vocab(), d = v.spec().n_embd;
    W_ = Eigen::Map<const RowMatrixF>(v.wte_f32(), V, d);
    e0_ = W_.colwise().mean().transpose();
    // Step h: fd_step times the spread of the embeddings about their mean (root mean square over all entries).
    const double spread = std::sqrt((W_.rowwise() - e0_.transpose()).cast<double>().squaredNorm() /
                                    static_cast<double>(V * d));
    h_ = s_.fd_step * (spread > 0 ? spread : 1.0);
  }

  // One input row [1, d] at point e, in the model's dtype.
  static Tensor point_rows(const Verifier& v, const VectorF& e) {
    Tensor row(v.spec().dtype, {1, e.size()});
    for (Index j = 0; j < e.size(); ++j) row.set(j, e[j]);
    return row;
  }

  static VectorF row_of(const Tensor& out, Index r, Index D) {
    VectorF f(D);
    for (Index j = 0; j < D; ++j) f[j] = static_cast<float>(out.get(r * D + j));
    return f;
  }

  // J and F at e by forward differences: rows e, e + h u_0, ..., e + h u_{d-1}.
  void linearize(Verifier& v, const VectorF& e) {
    const Index d = e.size(), D = v.out_width();
    Tensor rows(v.spec().dtype, {d + 1, d});
    for (Index r = 0; r <= d; ++r)
      for (Index j = 0; j < d; ++j) rows.set(r * d + j, e[j] + (r == j + 1 ? h_ : 0.0));
    const Tensor out = v.outputs(rows, s_.jacobian_batch);
    f_e_ = row_of(out, 0, D);
    // Differences in double from the backend's values (rows e + h u_i carry the step's rounding in the model's dtype:
    // the actual step is (e + h) - e as stored).
    std::vector<double> step(static_cast<std::size_t>(d));
    for (Index i = 0; i < d; ++i) step[i] = rows.get((i + 1) * d + i) - rows.get(i);
    J_.resize(D, d);
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < D; ++j)
        J_(j, i) = static_cast<float>((out.get((i + 1) * D + j) - out.get(j)) / step[i]);
    e_ = e;
    ++jacobians_;
    ++jacobians_here_;
    rank(v, /*new_jacobian=*/true);
  }

  // Scores of every token under the current J, e and F(e): ||K (w_v - e)||^2 + 2 <w_v - e, J^T r> (+ ||r||^2, the
  // same for all), with K^T K = J^T J (K = J when D <= d, else the Cholesky factor of J^T J).
  void rank(Verifier& v, bool new_jacobian) {
    const Index V = v.vocab(), d = e_.size(), D = v.out_width();
    if (new_jacobian) {
      RowMatrixF K;
      if (D <= d) {
        K = J_;
      } else {
        Eigen::MatrixXd M = (J_.transpose() * J_).cast<double>();
        M.diagonal().array() += 1e-12 * std::max(M.trace(), 1e-300);
        Eigen::LLT<Eigen::MatrixXd> llt(M);
        K = Eigen::MatrixXd(llt.matrixU()).cast<float>();
      }
      const RowMatrixF Kt = K.transpose();  // (d, D')
      const VectorF Ke = K * e_;
      quadratic_.resize(static_cast<std::size_t>(V));
      constexpr Index kChunk = 4096;
      for (Index c0 = 0; c0 < V; c0 += kChunk) {
        const Index n = std::min(kChunk, V - c0);
        RowMatrixF P = W_.middleRows(c0, n) * Kt;  // (n, D')
        P.rowwise() -= Ke.transpose();
        const VectorF q = P.rowwise().squaredNorm();
        for (Index i = 0; i < n; ++i) quadratic_[c0 + i] = q[i];
      }
    }
    VectorF r(D);
    const std::vector<double>& y = v.target_row();
    for (Index j = 0; j < D; ++j) r[j] = static_cast<float>(f_e_[j] - y[j]);
    const VectorF g = J_.transpose() * r;  // (d)
    const VectorF lin = W_ * g;            // <w_v, g>
    const float eg = e_.dot(g);
    std::vector<float> score(static_cast<std::size_t>(V));
    for (Index id = 0; id < V; ++id) score[id] = quadratic_[id] + 2.0f * (lin[id] - eg);
    ranking_.sort(score);
    since_rank_ = 0;
  }

  LinearizedSettings s_;
  RowMatrixF W_;                // wte (V, d)
  VectorF e0_;                  // mean token embedding
  double h_ = 0;                // finite-difference step
  RowMatrixF J_;                // (D, d) at e_
  VectorF e_, f_e_;             // the point and F(e) at this position
  std::vector<float> quadratic_;
  Ranking ranking_;
  Index since_rank_ = 0, jacobians_here_ = 0, jacobians_ = 0;
};

// ---- gradient -----------------------------------------------------------------------------------------------------

class Gradient final : public CandidateSource {
 public:
  explicit Gradient(const GradientSettings& s) : s_(s) {}

  void begin(Verifier& v) override {
    const ModelSpec& spec = v.spec();
    const Index T = v.seq_len(), t = v.position(), w = v.width(), D = v.out_width(), V = v.vocab();
    const bool embedding = spec.input == InputSpace::embedding;

    // The whole sequence: the prefix's rows, the proxy at t, zeros after it (position t never sees them).
    Tensor input(spec.dtype, {1, T, w});
    const Tensor prefix = v.rows(v.prefix());
    std::memcpy(input.raw(), prefix.raw(), prefix.nbytes());
    std::vector<double> p(static_cast<std::size_t>(w));
    if (embedding) {
      const float* wte = v.wte_f32();
      for (Index id = 0; id < V; ++id)
        for (Index j = 0; j < w; ++j) p[j] += wte[id * w + j];
      for (double& x : p) x /= static_cast<double>(V);
    } else {
      std::fill(p.begin(), p.end(), 1.0 / static_cast<double>(V));
    }
    std::vector<double> m(p.size()), s2(p.size());
    const std::vector<double>& y = v.target_row();
    double y_norm = 0;
    for (double x : y) y_norm += x * x;
    y_norm = std::max(std::sqrt(y_norm), 1e-300);
    Tensor grad_out(spec.dtype, v.target().shape());
    for (Index step = 1; step <= s_.proxy_steps; ++step) {
      for (Index j = 0; j < w; ++j) input.set(t * w + j, p[j]);
      const Tensor out = v.model().forward(input);
      double dist = 0;
      for (Index j = 0; j < D; ++j) dist += (out.get(t * D + j) - y[j]) * (out.get(t * D + j) - y[j]);
      dist = std::sqrt(dist);
      if (dist == 0) break;
      for (Index j = 0; j < D; ++j) grad_out.set(t * D + j, (out.get(t * D + j) - y[j]) / (dist * y_norm));
      const Tensor g = v.model().backward(input, grad_out);
      constexpr double b1 = 0.9, b2 = 0.999, tiny = 1e-8;
      for (Index j = 0; j < w; ++j) {
        const double gj = g.get(t * w + j);
        m[j] = b1 * m[j] + (1 - b1) * gj;
        s2[j] = b2 * s2[j] + (1 - b2) * gj * gj;
        const double mh = m[j] / (1 - std::pow(b1, static_cast<double>(step)));
        const double vh = s2[j] / (1 - std::pow(b2, static_cast<double>(step)));
        p[j] -= s_.proxy_lr * mh / (std::sqrt(vh) + tiny);
      }
    }

    std::vector<float> score(static_cast<std::size_t>(V));
    if (embedding) {  // ||w_v - p||^2
      const float* wte = v.wte_f32();
      for (Index id = 0; id < V; ++id) {
        double sq = 0;
        for (Index j = 0; j < w; ++j) sq += (wte[id * w + j] - p[j]) * (wte[id * w + j] - p[j]);
        score[id] = static_cast<float>(sq);
      }
    } else {
      for (Index id = 0; id < V; ++id) score[id] = static_cast<float>(-p[id]);
    }
    ranking_.sort(score);
  }

  std::vector<Index> next(Verifier& v, Index n) override { return ranking_.take(v, n); }
  Index rank_of(Index id) const override { return ranking_.place.empty() ? -1 : ranking_.place[id]; }

 private:
  GradientSettings s_;
  Ranking ranking_;
};

}  // namespace

void LinearizedSettings::read(const Options& o) {
  fd_step = o.get_double("fd_step", fd_step);
  if (!(fd_step > 0) || !std::isfinite(fd_step)) o.fail("fd_step", "must be a positive number");
  reuse_jacobian = o.get_bool("reuse_jacobian", reuse_jacobian);
  relinearize_after = o.get_int("relinearize_after", relinearize_after);
  if (relinearize_after < 1) o.fail("relinearize_after", "must be at least 1");
  max_jacobians = o.get_int("max_jacobians", max_jacobians);
  if (max_jacobians < 1) o.fail("max_jacobians", "must be at least 1");
  jacobian_batch = o.get_int("jacobian_batch", jacobian_batch);
  if (jacobian_batch < 1) o.fail("jacobian_batch", "must be at least 1");
}

void GradientSettings::read(const Options& o) {
  proxy_steps = o.get_int("proxy_steps", proxy_steps);
  if (proxy_steps < 0) o.fail("proxy_steps", "must be >= 0");
  proxy_lr = o.get_double("proxy_lr", proxy_lr);
  if (!(proxy_lr > 0) || !std::isfinite(proxy_lr)) o.fail("proxy_lr", "must be a positive number");
}

std::unique_ptr<CandidateSource> make_linearized(const LinearizedSettings& s) { return std::make_unique<Linearized>(s); }
std::unique_ptr<CandidateSource> make_gradient(const GradientSettings& s) { return std::make_unique<Gradient>(s); }

}  // namespace lminv::sequential
