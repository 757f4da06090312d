// The walks: orthogonal_walk and clamped_walk on the reference backend's small MLP families.
//
// The walks start at the true input and move away from it; these tests check, independently of what the walks
// report about themselves where that is possible, that
//   orthogonal_walk  moves along unit null-space vectors of the input gradient (|G_s . v| at the f64 / f32 rounding
//                    level), by eta per row and step, keeping sum(O) (what it is orthogonal to) far better than a
//                    random walk of the same steps; direction = matrix moves each row along its own such vector;
//   clamped_walk     leaves the perturbed side to the noise alone, and its descent lowers the output change
//                    against its own control (the same perturbations with no inner steps), so its ratio is higher;
// and that both are deterministic and refuse bad options, naming the key.
#include <gtest/gtest.h>

#include <Eigen/Dense>
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "clamped_walk.hpp"
#include "lminv/ops.hpp"
#include "lminv/options.hpp"
#include "orthogonal_walk.hpp"
#include "reference_backend.hpp"
#include "registry.hpp"
#include "weights_init.hpp"

namespace lminv {
namespace {

class NullDecoder final : public Decoder {
 public:
  void configure(const Options&) override {}
  void prepare(const DecoderSetup&) override {}
  Decoded decode(const Tensor&) override { return {}; }
};

// Every step: its values and the input after it.
class Recorder final : public Observer {
 public:
  void on_step(const Step& step) override {
    indices.push_back(step.index);
    losses.push_back(step.loss.at(0));
    values.push_back(step.values);
    inputs.push_back(*step.input);
  }
  double value(std::size_t step, const std::string& name) const { return values.at(step).at(name); }
  std::vector<std::int64_t> indices;
  std::vector<double> losses;
  std::vector<std::map<std::string, double>> values;
  std::vector<Tensor> inputs;
};

// A small reference model, its true input e ~ N(0, 1) and target O(e).
struct Walker {
  Walker(const std::string& family, std::int64_t d, std::int64_t T, DType dtype = DType::f64,
         InputSpace input = InputSpace::embedding, std::int64_t V = 24) {
    spec.family = family;
    if (auto kind = parse_kind(spec.family)) spec.kind = *kind;
    spec.n_embd = d;
    spec.seq_len = T;
    spec.vocab_size = V;
    spec.input = input;
    spec.dtype = dtype;
    ModelSpec f64 = spec;
    f64.dtype = DType::f64;
    weights = std::make_shared<const WeightSet>(init_random_weights(f64, 7, 1));
    reference::ReferenceBackend backend;
    backend.configure(Options("backend", "test", {{"threads", "1"}}));
    model = backend.create_model(spec, weights);
    e = Tensor(dtype, input_shape(spec, 1));
    Rng rng(3);
    fill_normal(e, rng, 0.0, 1.0);
    target = model->forward(e);
  }

  Result run(Optimizer& optimizer, std::map<std::string, std::string> options, Observer& observer,
             std::uint64_t seed = 1) {
    optimizer.configure(Options("optimizer", "test.ini", std::move(options)));
    Problem problem{*model, target, e, {}, decoder, weights, Rng(seed), {}, 0};
    return optimizer.run(problem, observer);
  }

  std::int64_t T() const { return e.dim(1); }
  std::int64_t C() const { return e.dim(2); }

  // The input gradient of sum(O) at x, as a T x C matrix in f64.
  Eigen::MatrixXd gradient(const Tensor& x) {
    const Tensor target_shape = model->forward(x);
    Tensor ones(target_shape.dtype(), target_shape.shape());
    for (std::int64_t i = 0; i < ones.numel(); ++i) ones.set(i, 1.0);
    const Tensor g = model->backward(x, ones).to(DType::f64);
    return Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(g.data<double>(),
                                                                                                    T(), C());
  }

  double output_sum(const Tensor& x) {
    const Tensor o = model->forward(x);
    double s = 0;
    for (std::int64_t i = 0; i < o.numel(); ++i) s += o.get(i);
    return s;
  }

  ModelSpec spec;
  std::shared_ptr<const WeightSet> weights;
  std::unique_ptr<Model> model;
  Tensor e, target;
  NullDecoder decoder;
};

// x as a T x C matrix in f64.
Eigen::MatrixXd as_matrix(const Tensor& x) {
  const Tensor f = x.to(DType::f64);
  return Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(f.data<double>(),
                                                                                                  x.dim(1), x.dim(2));
}

// The move of step n (0-based) divided by eta: row t is the direction row t of the input moved along.
Eigen::MatrixXd step_directions(const Recorder& rec, const Tensor& start, std::size_t n, double eta) {
  const Tensor& before = n == 0 ? start : rec.inputs[n - 1];
  return (as_matrix(rec.inputs[n]) - as_matrix(before)) / eta;
}

Eigen::VectorXd random_unit(std::int64_t n, std::uint64_t seed) {
  Rng rng(seed);
  Eigen::VectorXd v(n);
  for (std::int64_t k = 0; k < n; ++k) v(k) = rng.normal();
  return v.normalized();
}

// x with every row moved by `by` (a vector of the row's width).
Tensor moved(const Tensor& x, const Eigen::VectorXd& by) {
  Tensor out = x;
  const std::int64_t T = x.dim(1), C = x.dim(2);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < C; ++c) out.set(t * C + c, out.get(t * C + c) + by(c));
  return out;
}

void expect_error_naming(Optimizer& optimizer, const std::string& key, const std::string& value,
                         const std::string& expect) {
  try {
    optimizer.configure(Options("optimizer", "test.ini", {{key, value}}));
    ADD_FAILURE() << key << " = " << value << " accepted";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("[optimizer] " + key + " = '" + value + "'"), std::string::npos) << what;
    EXPECT_NE(what.find(expect), std::string::npos) << what;
    EXPECT_NE(what.find("test.ini"), std::string::npos) << what;
  }
}

// ---- orthogonal_walk ------------------------------------------------------------------------------------------

// f64 model, f64 SVD: every direction is orthogonal to every gradient row to rounding, both as the walk reports it
// and as recomputed here from the moves it made and the model's own gradient at the input before each move.
TEST(OrthogonalWalk, F64KeepsTheGradientDotBelow1e12AtEveryStep) {
  for (auto [family, d, T] : std::vector<std::tuple<std::string, int, int>>{
           {"transformer_mlp", 10, 3}, {"transformer_mlp", 50, 5}, {"fcnet", 10, 3}}) {
    SCOPED_TRACE(family + " d=" + std::to_string(d) + " T=" + std::to_string(T));
    Walker s(family, d, T);
    Recorder rec;
    OrthogonalWalk walk;
    s.run(walk, {{"steps", "30"}, {"eta", "0.01"}}, rec);
    ASSERT_EQ(rec.inputs.size(), 30u);
    std::set<double> indices;
    for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
      EXPECT_LT(rec.value(n, "gradient_dot"), 1e-12) << "step " << n + 1;
      EXPECT_LT(rec.value(n, "orthogonality"), 1e-12) << "step " << n + 1;
      const double j = rec.value(n, "direction_index");
      EXPECT_GE(j, T);
      EXPECT_LT(j, d);
      indices.insert(j);

      const Eigen::MatrixXd g = s.gradient(n == 0 ? s.e : rec.inputs[n - 1]);
      EXPECT_NEAR(rec.value(n, "gradient_norm"), g.rowwise().norm().maxCoeff(), 1e-12);
      ASSERT_GT(g.rowwise().norm().minCoeff(), 0.1);  // a real gradient, so the dot products below mean something
      const Eigen::MatrixXd dirs = step_directions(rec, s.e, n, 0.01);
      const Eigen::VectorXd v = dirs.row(0).transpose();
      EXPECT_NEAR(v.norm(), 1.0, 1e-12);
      for (int t = 1; t < T; ++t) EXPECT_LT((dirs.row(t) - dirs.row(0)).cwiseAbs().maxCoeff(), 1e-12);
      // Recomputed from the moves (the difference of two inputs costs ~1e-14 here; measured 1e-14 .. 3e-14).
      EXPECT_LT((g * v).cwiseAbs().maxCoeff(), 1e-12) << "step " << n + 1;
      // A generic direction is nowhere near orthogonal to the gradient.
      EXPECT_GT((g * random_unit(d, 100 + n)).cwiseAbs().maxCoeff(), 1e-4);
    }
    EXPECT_GT(indices.size(), 1u) << "index = -1 draws a column each step";
  }
}

// The recorded gradient_dot is the SVD's precision: ~1e-7 with an f32 SVD (of an f32 or an f64 gradient), ~1e-16
// with an f64 SVD, also of an f32 model's gradient (orthogonality is measured against G as the model computed it).
TEST(OrthogonalWalk, F32KeepsTheGradientDotBelow1e5AndSvdDtypeDecidesThePrecision) {
  for (auto [d, T] : std::vector<std::tuple<int, int>>{{10, 3}, {50, 5}}) {
    for (auto [model_dtype, svd_dtype] : std::vector<std::tuple<DType, DType>>{
             {DType::f32, DType::f32}, {DType::f64, DType::f32}, {DType::f32, DType::f64}}) {
      SCOPED_TRACE("d=" + std::to_string(d) + " model " + dtype_name(model_dtype) + " svd " + dtype_name(svd_dtype));
      Walker s("transformer_mlp", d, T, model_dtype);
      Recorder rec;
      OrthogonalWalk walk;
      const Result r = s.run(walk, {{"steps", "30"}, {"svd_dtype", dtype_name(svd_dtype)}}, rec);
      EXPECT_EQ(r.input.dtype(), model_dtype);
      double worst = 0;
      for (std::size_t n = 0; n < rec.values.size(); ++n) {
        EXPECT_LT(rec.value(n, "gradient_dot"), svd_dtype == DType::f32 ? 1e-5 : 1e-12) << "step " << n + 1;
        worst = std::max(worst, rec.value(n, "gradient_dot"));
      }
      EXPECT_EQ(r.values.at("gradient_dot_max"), worst);
      if (svd_dtype == DType::f32) {
        EXPECT_GT(worst, 1e-12) << "an f32 SVD cannot be this exact: was it f64?";
      }
    }
  }
}

// direction = vector with a fixed index: each step moves every row by eta (|v| = 1); the null-space column barely
// turns from step to step, so the walk is nearly straight and the input distance grows as eta * steps * sqrt(T).
// What it keeps is what it is orthogonal to, sum(O): far better than a straight walk of the same length along a
// random direction. (The output itself moves about as much as along the random direction: see the report.)
TEST(OrthogonalWalk, InputMovesEtaPerRowAndStepWhileSumOfOutputStays) {
  for (auto [family, d, T] : std::vector<std::tuple<std::string, int, int>>{
           {"transformer_mlp", 10, 3}, {"transformer_mlp", 50, 5}, {"fcnet", 10, 3}}) {
    SCOPED_TRACE(family + " d=" + std::to_string(d) + " T=" + std::to_string(T));
    const int steps = 50;
    const double eta = 0.01, straight = eta * steps * std::sqrt(T);
    Walker s(family, d, T);
    Recorder rec;
    OrthogonalWalk walk;
    const Result r = s.run(walk, {{"steps", std::to_string(steps)}, {"eta", "0.01"}, {"index", "0"}}, rec);
    for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
      EXPECT_EQ(rec.value(n, "direction_index"), T);
      const Tensor& before = n == 0 ? s.e : rec.inputs[n - 1];
      EXPECT_NEAR(l2_distance(rec.inputs[n], before), eta * std::sqrt(T), 1e-12);
      // The step's values are what they say.
      const Tensor out = s.model->forward(rec.inputs[n]);
      EXPECT_NEAR(rec.value(n, "input_distance"), l2_distance(rec.inputs[n], s.e), 1e-14);
      EXPECT_NEAR(rec.value(n, "output_distance"), distances(out, s.target, Metric::l1)[0], 1e-12);
      EXPECT_NEAR(rec.value(n, "output_distance_l2"), distances(out, s.target, Metric::l2)[0], 1e-12);
      EXPECT_NEAR(rec.value(n, "ratio"), rec.value(n, "input_distance") / rec.value(n, "output_distance_l2"), 1e-9);
      EXPECT_EQ(rec.losses[n], rec.value(n, "output_distance"));  // metric = l1
    }
    const double walked = r.values.at("input_distance");
    EXPECT_LE(walked, straight * (1 + 1e-12));
    EXPECT_GT(walked, 0.9 * straight);
    EXPECT_EQ(r.loss, r.values.at("output_distance"));
    EXPECT_EQ(l1_distance(r.input, rec.inputs.back()), 0.0);
    EXPECT_NEAR(r.values.at("ratio"), walked / r.values.at("output_distance_l2"), 1e-12);
    EXPECT_NEAR(r.values.at("output_per_input"), r.values.at("output_distance_l2") / walked, 1e-12);

    // The control: a straight walk of the same length along a random direction.
    const Tensor control = moved(s.e, random_unit(d, 5) * (walked / std::sqrt(T)));
    EXPECT_NEAR(l2_distance(control, s.e), walked, 1e-12);
    const double kept = std::abs(s.output_sum(r.input) - s.output_sum(s.e));
    const double control_kept = std::abs(s.output_sum(control) - s.output_sum(s.e));
    EXPECT_LT(kept, 0.01 * control_kept) << "walk " << kept << ", random " << control_kept;
  }
}

// direction = matrix: row t moves along its own column of V; the T directions are orthonormal and all of them are
// orthogonal to every gradient row.
TEST(OrthogonalWalk, MatrixDirectionMovesRowsAlongOrthonormalNullSpaceVectors) {
  for (auto [family, d, T] : std::vector<std::tuple<std::string, int, int>>{
           {"transformer_mlp", 12, 3}, {"transformer_mlp", 50, 5}, {"fcnet", 10, 4}}) {
    SCOPED_TRACE(family + " d=" + std::to_string(d) + " T=" + std::to_string(T));
    Walker s(family, d, T);
    Recorder rec;
    OrthogonalWalk walk;
    const Result r = s.run(walk, {{"steps", "10"}, {"direction", "matrix"}, {"eta", "0.05"}}, rec);
    for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
      EXPECT_EQ(rec.value(n, "direction_index"), -1);
      EXPECT_LT(rec.value(n, "gradient_dot"), 1e-12);
      const Eigen::MatrixXd g = s.gradient(n == 0 ? s.e : rec.inputs[n - 1]);
      const Eigen::MatrixXd dirs = step_directions(rec, s.e, n, 0.05);  // [T, d]
      const Eigen::MatrixXd gram = dirs * dirs.transpose();
      EXPECT_LT((gram - Eigen::MatrixXd::Identity(T, T)).cwiseAbs().maxCoeff(), 1e-12) << "step " << n + 1;
      EXPECT_LT((g * dirs.transpose()).cwiseAbs().maxCoeff(), 1e-12) << "step " << n + 1;
    }
    EXPECT_NEAR(r.values.at("input_distance"), l2_distance(r.input, s.e), 1e-14);
  }
  // T distinct null-space columns need C - T >= T.
  Walker s("transformer_mlp", 5, 3);
  Recorder rec;
  OrthogonalWalk walk;
  try {
    s.run(walk, {{"direction", "matrix"}}, rec);
    ADD_FAILURE() << "a 3 x 5 gradient has no 3 null-space columns";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("direction = matrix"), std::string::npos) << e.what();
  }
}

// input = vocab: the same walk in [T, V].
TEST(OrthogonalWalk, WalksInVocabSpace) {
  Walker s("transformer_mlp", 8, 3, DType::f64, InputSpace::vocab, 24);
  Recorder rec;
  OrthogonalWalk walk;
  const Result r = s.run(walk, {{"steps", "10"}}, rec);
  EXPECT_EQ(r.input.shape(), (Shape{1, 3, 24}));
  for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
    const Eigen::MatrixXd g = s.gradient(n == 0 ? s.e : rec.inputs[n - 1]);
    const Eigen::VectorXd v = step_directions(rec, s.e, n, 0.01).row(0).transpose();
    EXPECT_NEAR(v.norm(), 1.0, 1e-12);
    EXPECT_LT((g * v).cwiseAbs().maxCoeff(), 1e-12);
  }
}

// Wider than kFullSvdMaxWidth: the walk takes the QR route, with the same guarantees.
TEST(OrthogonalWalk, WalksAVocabularyWiderThanTheFullSvdLimit) {
  const std::int64_t V = orthogonal_walk::kFullSvdMaxWidth + 100;
  Walker s("transformer_mlp", 8, 3, DType::f64, InputSpace::vocab, V);
  Recorder rec;
  OrthogonalWalk walk;
  s.run(walk, {{"steps", "3"}, {"direction", "matrix"}}, rec);
  for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
    EXPECT_LT(rec.value(n, "gradient_dot"), 1e-12);
    const Eigen::MatrixXd g = s.gradient(n == 0 ? s.e : rec.inputs[n - 1]);
    const Eigen::MatrixXd dirs = step_directions(rec, s.e, n, 0.01);
    EXPECT_LT((dirs * dirs.transpose() - Eigen::MatrixXd::Identity(3, 3)).cwiseAbs().maxCoeff(), 1e-12);
    EXPECT_LT((g * dirs.transpose()).cwiseAbs().maxCoeff(), 1e-12);
  }
}

// Wide inputs (vocab space) take V's null-space columns from JacobiSVD's own QR stage without forming V: the same
// vectors as the full SVD.
TEST(OrthogonalWalk, QrRouteGivesTheFullSvdsNullSpaceColumns) {
  using namespace orthogonal_walk;
  Rng rng(9);
  Eigen::MatrixXd g(4, 30);
  for (Eigen::Index i = 0; i < g.size(); ++i) g.data()[i] = rng.normal();
  std::vector<std::int64_t> columns;
  for (std::int64_t j = 4; j < 30; ++j) columns.push_back(j);
  for (DType dtype : {DType::f64, DType::f32}) {
    const Eigen::MatrixXd svd = right_singular_vectors(g, columns, dtype, NullSpaceMethod::full_svd);
    const Eigen::MatrixXd qr = right_singular_vectors(g, columns, dtype, NullSpaceMethod::qr);
    const double tol = dtype == DType::f64 ? 1e-13 : 1e-6;
    EXPECT_LT((svd - qr).cwiseAbs().maxCoeff(), tol) << dtype_name(dtype);
    EXPECT_LT((g * qr).cwiseAbs().maxCoeff(), dtype == DType::f64 ? 1e-13 : 1e-5) << dtype_name(dtype);
    EXPECT_LT((qr.transpose() * qr - Eigen::MatrixXd::Identity(26, 26)).cwiseAbs().maxCoeff(), tol);
  }
  EXPECT_THROW(right_singular_vectors(g, {2}, DType::f64, NullSpaceMethod::qr), Error);
  EXPECT_THROW(right_singular_vectors(g, {30}, DType::f64, NullSpaceMethod::full_svd), Error);
  EXPECT_EQ(method_for_width(768), NullSpaceMethod::full_svd);
  EXPECT_EQ(method_for_width(50257), NullSpaceMethod::qr);
}

TEST(OrthogonalWalk, SameSeedSameWalkOtherSeedOther) {
  for (const char* direction : {"vector", "matrix"}) {
    Walker s("transformer_mlp", 12, 3);
    Recorder a, b, c;
    OrthogonalWalk walk;
    const std::map<std::string, std::string> options = {{"steps", "8"}, {"direction", direction}};
    const Result ra = s.run(walk, options, a, 5);
    const Result rb = s.run(walk, options, b, 5);
    const Result rc = s.run(walk, options, c, 6);
    EXPECT_EQ(l1_distance(ra.input, rb.input), 0.0) << direction;
    EXPECT_EQ(a.values, b.values) << direction;
    EXPECT_GT(l1_distance(ra.input, rc.input), 0.0) << direction;
  }
}

// index = last, sign = svd: the seed study's walk, `torch.linalg.svd(gradient).Vh[-1]` at every step with no sign
// rule. Every step moves each row along the last column of V of the gradient at the input before the step, as an
// SVD computed here gives it, sign included; that column is orthogonal to every gradient row to 1e-15 (a cosine, in
// f64). With sign = continue the same column is flipped where it turned back, so the walk drifts on.
TEST(OrthogonalWalk, LastColumnIsTheStudysVhMinusOneOrthogonalTo1e15) {
  for (auto [family, d, T] : std::vector<std::tuple<std::string, int, int>>{
           {"transformer_mlp", 10, 3}, {"transformer_mlp", 50, 5}, {"fcnet", 10, 3}}) {
    SCOPED_TRACE(family + " d=" + std::to_string(d) + " T=" + std::to_string(T));
    Walker s(family, d, T);
    Recorder rec;
    OrthogonalWalk walk;
    const double eta = 0.01;
    s.run(walk, {{"steps", "20"}, {"eta", "0.01"}, {"index", "last"}, {"sign", "svd"}}, rec);
    ASSERT_EQ(rec.inputs.size(), 20u);
    for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
      EXPECT_EQ(rec.value(n, "direction_index"), d - 1) << "step " << n + 1;
      EXPECT_LE(rec.value(n, "orthogonality"), 1e-15) << "step " << n + 1;
      const Eigen::MatrixXd g = s.gradient(n == 0 ? s.e : rec.inputs[n - 1]);
      Eigen::JacobiSVD<Eigen::MatrixXd> svd(g, Eigen::ComputeFullV);
      const Eigen::VectorXd v = svd.matrixV().col(d - 1).normalized();
      for (int t = 0; t < T; ++t)
        EXPECT_LE(std::abs(g.row(t).dot(v)) / g.row(t).norm(), 1e-15) << "step " << n + 1 << " row " << t;
      const Eigen::MatrixXd dirs = step_directions(rec, s.e, n, eta);
      for (int t = 0; t < T; ++t)
        EXPECT_LT((dirs.row(t).transpose() - v).cwiseAbs().maxCoeff(), 1e-10) << "step " << n + 1 << " row " << t;
    }
  }
}

// The study's ratios are L1 / L1: d_o / d_i = |O(e) - O(e_N)|_1 / |e - e_N|_1 and r its inverse. The walk reports
// them beside the L2 ones, each as the distances recomputed here give it.
TEST(OrthogonalWalk, ReportsTheL1RatiosOfTheStudy) {
  Walker s("transformer_mlp", 50, 5);
  Recorder rec;
  OrthogonalWalk walk;
  const Result r = s.run(walk, {{"steps", "10"}, {"index", "last"}}, rec);
  for (std::size_t n = 0; n < rec.inputs.size(); ++n) {
    const double in_l1 = l1_distance(rec.inputs[n], s.e);
    const double out_l1 = distances(s.model->forward(rec.inputs[n]), s.target, Metric::l1)[0];
    EXPECT_NEAR(rec.value(n, "input_distance_l1"), in_l1, 1e-13 * in_l1);
    EXPECT_NEAR(rec.value(n, "ratio_l1"), in_l1 / out_l1, 1e-10 * in_l1 / out_l1);
    EXPECT_NEAR(rec.value(n, "output_per_input_l1"), out_l1 / in_l1, 1e-10 * out_l1 / in_l1);
  }
  const double in_l1 = l1_distance(r.input, s.e), out_l1 = distances(s.model->forward(r.input), s.target, Metric::l1)[0];
  EXPECT_NEAR(r.values.at("input_distance_l1"), in_l1, 1e-13 * in_l1);
  EXPECT_NEAR(r.values.at("output_per_input_l1"), out_l1 / in_l1, 1e-10 * out_l1 / in_l1);
  EXPECT_NEAR(r.values.at("ratio_l1"), in_l1 / out_l1, 1e-10 * in_l1 / out_l1);
  // Not the L2 figures under another name: a walk's input change is spread differently from its output change.
  EXPECT_GT(std::abs(r.values.at("output_per_input_l1") - r.values.at("output_per_input")),
            1e-3 * r.values.at("output_per_input"));
}

// A fixed column is a drift, a random column each step a random walk: after N steps of eta the fixed walk has gone
// nearly eta N per row, the random one about eta sqrt(N) (the audit's explanation of why lminv's old walks, with a
// random column, never left the prompt).
TEST(OrthogonalWalk, AFixedColumnDriftsWhereRandomColumnsWander) {
  Walker s("transformer_mlp", 50, 5);
  const int steps = 100;
  const double eta = 0.01;
  Recorder fixed_rec, random_rec;
  OrthogonalWalk fixed, random;
  const Result f = s.run(fixed, {{"steps", std::to_string(steps)}, {"index", "last"}}, fixed_rec);
  const Result w = s.run(random, {{"steps", std::to_string(steps)}}, random_rec);
  const double per_row_fixed = f.values.at("input_distance") / std::sqrt(5.0);
  const double per_row_random = w.values.at("input_distance") / std::sqrt(5.0);
  EXPECT_GT(per_row_fixed, 0.8 * eta * steps);
  EXPECT_LT(per_row_random, 3 * eta * std::sqrt(static_cast<double>(steps)));
}

TEST(OrthogonalWalk, IndexOutsideTheNullSpaceIsAnErrorNamingIt) {
  Walker s("transformer_mlp", 10, 3);  // columns 3 .. 9 of V: index 0 .. 6
  Recorder rec;
  OrthogonalWalk walk;
  EXPECT_NO_THROW(s.run(walk, {{"steps", "1"}, {"index", "6"}}, rec));
  EXPECT_EQ(rec.value(0, "direction_index"), 9);
  try {
    s.run(walk, {{"steps", "1"}, {"index", "7"}}, rec);
    ADD_FAILURE() << "index 7 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index = 7"), std::string::npos) << e.what();
  }
}

TEST(OrthogonalWalk, BadOptionsNameTheKey) {
  OrthogonalWalk walk;
  expect_error_naming(walk, "steps", "-1", "must be positive");
  expect_error_naming(walk, "steps", "0", "must be positive");
  expect_error_naming(walk, "steps", "ten", "is not an integer");
  expect_error_naming(walk, "eta", "0", "must be a positive number");
  expect_error_naming(walk, "eta", "-0.01", "must be a positive number");
  expect_error_naming(walk, "svd_dtype", "f16", "expected one of f64 | f32");
  expect_error_naming(walk, "direction", "diagonal", "expected one of vector | matrix");
  expect_error_naming(walk, "index", "-2", "must be >= 0");
  expect_error_naming(walk, "index", "first", "is not an integer");
  expect_error_naming(walk, "sign", "flip", "expected one of continue | svd");
  expect_error_naming(walk, "metric", "l3", "expected one of l1 | l2 | cosine");
  // A failed configure changes nothing: the last good one stands.
  walk.configure(Options("optimizer", "test.ini", {{"steps", "7"}, {"direction", "matrix"}}));
  expect_error_naming(walk, "eta", "0", "must be a positive number");
  EXPECT_EQ(walk.settings().steps, 7);
  EXPECT_TRUE(walk.settings().matrix);
  try {
    walk.configure(Options("optimizer", "test.ini", {{"direction", "matrix"}, {"index", "1"}}));
    ADD_FAILURE() << "index with direction = matrix accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[optimizer] index = '1': applies to direction = vector only"),
              std::string::npos)
        << e.what();
  }
}

// ---- clamped_walk ---------------------------------------------------------------------------------------------

// The seed study's observation: the inner descent lowers the output change against the same perturbations with no
// inner steps (the control), so the walk's ratio r = input / output distance is higher. The control is the same
// walk as a separate run with inner_steps = 0 (the same streams), to the last bit.
TEST(ClampedWalk, DescentLowersTheOutputChangeAgainstItsControl) {
  for (auto [family, d, T] : std::vector<std::tuple<std::string, int, int>>{
           {"transformer_mlp", 10, 3}, {"transformer_mlp", 50, 5}, {"fcnet", 10, 3}}) {
    SCOPED_TRACE(family + " d=" + std::to_string(d) + " T=" + std::to_string(T));
    Walker s(family, d, T);
    Recorder rec, alone;
    ClampedWalk walk;
    const Result r = s.run(walk, {{"steps", "40"}, {"inner_steps", "50"}, {"control", "true"}}, rec);
    const double out = r.values.at("output_distance"), control_out = r.values.at("control_output_distance");
    EXPECT_LT(out, 0.75 * control_out);
    EXPECT_GT(r.values.at("ratio"), r.values.at("control_ratio"));
    EXPECT_GT(r.values.at("input_distance"), 0.0);
    EXPECT_NEAR(r.values.at("ratio"), r.values.at("input_distance") / r.values.at("output_distance_l2"), 1e-9);
    EXPECT_EQ(r.loss, out);
    // L1 descent at a fixed rate can overshoot on a step (fcnet does), not on the whole.
    double first = 0, last = 0;
    for (std::size_t n = 0; n < rec.values.size(); ++n) {
      first += rec.value(n, "inner_loss_first");
      last += rec.value(n, "inner_loss_last");
      EXPECT_EQ(rec.value(n, "output_distance"), distances(s.model->forward(rec.inputs[n]), s.target, Metric::l1)[0]);
      EXPECT_EQ(rec.value(n, "input_distance"), l2_distance(rec.inputs[n], s.e));
    }
    EXPECT_LT(last, first);

    const Result control = s.run(walk, {{"steps", "40"}, {"inner_steps", "0"}}, alone);
    EXPECT_EQ(control.values.at("output_distance"), control_out);
    EXPECT_EQ(control.values.at("output_distance_l2"), r.values.at("control_output_distance_l2"));
    EXPECT_EQ(control.values.at("input_distance"), r.values.at("control_input_distance"));
    EXPECT_EQ(control.values.at("ratio"), r.values.at("control_ratio"));
    EXPECT_EQ(control.values.count("control_ratio"), 0u);
    for (std::size_t n = 0; n < rec.values.size(); ++n)
      EXPECT_EQ(rec.value(n, "clamp_index"), alone.value(n, "clamp_index"));
  }
}

// The perturbed side gets the noise and nothing else: compared with the same walk without inner steps (which adds
// the same noise), it is identical after one step, and each later step moves it by the same amount; the other side
// is where the descent works (and without inner steps it is never touched).
TEST(ClampedWalk, InnerStepsLeaveThePerturbedSideClamped) {
  for (const char* side : {"low", "high"}) {
    SCOPED_TRACE(side);
    const int d = 10, T = 3;
    Walker s("transformer_mlp", d, T);
    for (const char* steps : {"1", "6"}) {
      Recorder walked, noise_only;
      ClampedWalk walk;
      s.run(walk, {{"steps", steps}, {"inner_steps", "50"}, {"perturb_side", side}}, walked);
      s.run(walk, {{"steps", steps}, {"inner_steps", "0"}, {"perturb_side", side}}, noise_only);
      for (std::size_t n = 0; n < walked.inputs.size(); ++n) {
        const int i = static_cast<int>(walked.value(n, "clamp_index"));
        ASSERT_EQ(i, noise_only.value(n, "clamp_index"));
        ASSERT_GE(i, 1);
        ASSERT_LT(i, d);
        const Eigen::MatrixXd a0 = as_matrix(n == 0 ? s.e : walked.inputs[n - 1]), a1 = as_matrix(walked.inputs[n]);
        const Eigen::MatrixXd c0 = as_matrix(n == 0 ? s.e : noise_only.inputs[n - 1]),
                              c1 = as_matrix(noise_only.inputs[n]);
        const bool low = std::string(side) == "low";
        const int begin = low ? 0 : i, width = low ? i : d - i;
        const int other_begin = low ? i : 0, other_width = d - width;
        // The perturbed side: noise alone, the same noise in both walks.
        const Eigen::MatrixXd moved_walked = (a1 - a0).middleCols(begin, width);
        const Eigen::MatrixXd moved_noise = (c1 - c0).middleCols(begin, width);
        EXPECT_LT((moved_walked - moved_noise).cwiseAbs().maxCoeff(), 1e-15) << "step " << n + 1;
        if (n == 0) {
          EXPECT_EQ((a1 - c1).middleCols(begin, width).cwiseAbs().maxCoeff(), 0.0);
        }
        EXPECT_GT(moved_noise.cwiseAbs().maxCoeff(), 1e-4);  // the noise is there (rand_eta 0.01)
        // The other side: untouched by the noise, moved by the descent.
        EXPECT_EQ((c1 - c0).middleCols(other_begin, other_width).cwiseAbs().maxCoeff(), 0.0) << "step " << n + 1;
        EXPECT_GT((a1 - a0).middleCols(other_begin, other_width).cwiseAbs().maxCoeff(), 1e-6) << "step " << n + 1;
      }
    }
  }
}

TEST(ClampedWalk, WalksInVocabSpace) {
  Walker s("transformer_mlp", 8, 3, DType::f64, InputSpace::vocab, 24);
  Recorder rec;
  ClampedWalk walk;
  const Result r = s.run(walk, {{"steps", "10"}, {"inner_steps", "20"}, {"control", "true"}}, rec);
  EXPECT_EQ(r.input.shape(), (Shape{1, 3, 24}));
  for (std::size_t n = 0; n < rec.values.size(); ++n) EXPECT_LT(rec.value(n, "clamp_index"), 24);
  EXPECT_LT(r.values.at("output_distance"), r.values.at("control_output_distance"));
}

TEST(ClampedWalk, SameSeedSameWalkOtherSeedOther) {
  Walker s("fcnet", 6, 3);
  Recorder a, b, c;
  ClampedWalk walk;
  const std::map<std::string, std::string> options = {{"steps", "5"}, {"inner_steps", "3"}, {"control", "true"}};
  const Result ra = s.run(walk, options, a, 5);
  const Result rb = s.run(walk, options, b, 5);
  const Result rc = s.run(walk, options, c, 6);
  EXPECT_EQ(l1_distance(ra.input, rb.input), 0.0);
  EXPECT_EQ(a.values, b.values);
  EXPECT_GT(l1_distance(ra.input, rc.input), 0.0);
}

TEST(ClampedWalk, ResultLossIsTheConfiguredMetric) {
  Walker s("transformer_mlp", 6, 2);
  Recorder rec;
  ClampedWalk walk;
  const Result r = s.run(walk, {{"steps", "3"}, {"metric", "l2"}}, rec);
  EXPECT_EQ(r.metric, Metric::l2);
  EXPECT_EQ(r.loss, r.values.at("output_distance_l2"));
  EXPECT_NE(r.loss, r.values.at("output_distance"));
  const Result cos = s.run(walk, {{"steps", "3"}, {"metric", "cosine"}}, rec);
  EXPECT_EQ(cos.loss, distances(s.model->forward(cos.input), s.target, Metric::cosine)[0]);
}

TEST(ClampedWalk, BadOptionsNameTheKey) {
  ClampedWalk walk;
  expect_error_naming(walk, "steps", "-1", "must be positive");
  expect_error_naming(walk, "rand_eta", "0", "must be a positive number");
  expect_error_naming(walk, "inner_steps", "-1", "must be >= 0");
  expect_error_naming(walk, "inner_lr", "-1", "must be a positive number");
  expect_error_naming(walk, "perturb_side", "middle", "expected one of low | high");
  expect_error_naming(walk, "metric", "l3", "expected one of l1 | l2 | cosine");
  expect_error_naming(walk, "control", "maybe", "expected true or false");
  walk.configure(Options("optimizer", "test.ini", {{"inner_steps", "9"}, {"control", "on"}}));
  expect_error_naming(walk, "inner_steps", "-1", "must be >= 0");
  EXPECT_EQ(walk.settings().inner_steps, 9);
  EXPECT_TRUE(walk.settings().control);
}

// ---- the plugins ----------------------------------------------------------------------------------------------

// Loaded through the registry, the plugins are the classes above: the same walk to the last bit, and every key
// they document is read (the host reports unread keys as unknown).
TEST(WalkPlugins, LoadThroughTheRegistryAndReadEveryKey) {
  Registry registry({LMINV_BUILD_PLUGIN_DIR});
  Walker s("transformer_mlp", 12, 3);
  const std::vector<std::tuple<std::string, std::map<std::string, std::string>>> cases = {{"orthogonal_walk",
                                                                                           {{"steps", "4"},
                                                                                            {"eta", "0.02"},
                                                                                            {"svd_dtype", "f64"},
                                                                                            {"direction", "vector"},
                                                                                            {"index", "1"},
                                                                                            {"metric", "l2"}}},
                                                                                          {"clamped_walk",
                                                                                           {{"steps", "4"},
                                                                                            {"rand_eta", "0.02"},
                                                                                            {"inner_steps", "2"},
                                                                                            {"inner_lr", "0.005"},
                                                                                            {"perturb_side", "high"},
                                                                                            {"metric", "l2"},
                                                                                            {"control", "true"}}}};
  for (const auto& [name, options] : cases) {
    SCOPED_TRACE(name);
    ASSERT_NE(registry.find(PluginKind::optimizer, name), nullptr);
    auto plugin = registry.create_optimizer(name);
    const Options read("optimizer", "test.ini", options);
    plugin->configure(read);
    EXPECT_TRUE(read.unread_keys().empty());
    Problem problem{*s.model, s.target, s.e, {}, s.decoder, s.weights, Rng(3), {}, 0};
    Recorder from_plugin, from_class;
    const Result a = plugin->run(problem, from_plugin);
    std::unique_ptr<Optimizer> direct;
    if (name == "orthogonal_walk")
      direct = std::make_unique<OrthogonalWalk>();
    else
      direct = std::make_unique<ClampedWalk>();
    const Result b = s.run(*direct, options, from_class, 3);
    EXPECT_EQ(l1_distance(a.input, b.input), 0.0);
    EXPECT_EQ(a.values, b.values);
    EXPECT_EQ(a.steps, 4);
    EXPECT_EQ(a.metric, Metric::l2);
  }
}

}  // namespace
}  // namespace lminv
