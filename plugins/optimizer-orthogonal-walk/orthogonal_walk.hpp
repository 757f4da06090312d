// Optimizer `orthogonal_walk`: the seed study's walk along right-singular vectors of the input gradient.
//
// The walk starts at the true input e and, at every step n = 1 .. steps, at the current input a [T, C]
// (C = d for input = embedding, V for input = vocab):
//   G   = d sum(O(a)) / da                    model.backward(a, ones like the output): a T x C matrix
//   G   = U S V^T                             SVD with the full V (C x C), in f64 or f32 (svd_dtype)
//   the columns j >= T of V are orthogonal to every row of G (G has rank <= T): null-space directions
//   direction = vector: a_t += eta v for every row t, v = V[:, j], j = T + index (fixed), C - 1 (index = last: the
//                       seed study's `torch.linalg.svd(gradient).Vh[-1]`, recomputed each step) or random in [T, C)
//   direction = matrix: a_t += eta R_t, R_t = V[:, j_t] for T distinct random j_t in [T, C)
// A column of V has an arbitrary sign; with sign = continue (the default) the walk takes the sign that continues the
// previous step's direction of the same row (v . v_prev >= 0), so a fixed index walks on instead of stepping back and
// forth; sign = svd takes the column as the SVD gave it (the study's code has no sign rule). Directions are
// renormalised to unit length in f64 (an f32 SVD gives columns of norm 1 +- 1e-7).
//
// To first order the move leaves sum(O) unchanged; how much the output itself moves is what the walk measures.
// The observer gets, per step (see docs/configs.md):
//   gradient_dot        max over rows s of G and directions v used this step of |G_s . v| (v unit): the raw
//                       orthogonality, G as the model computed it (in its dtype), the dot product in f64
//   orthogonality       the same as a cosine: max |G_s . v| / |G_s| (rows with G_s = 0 count 0)
//   gradient_norm       max over rows of |G_s|
//   direction_index     j of the step (direction = vector); -1 for direction = matrix
//   output_distance     L1 of O(a) - O(e) after the step; output_distance_l2 its L2; input_distance L2 of a - e,
//                       input_distance_l1 its L1
//   ratio               input_distance / output_distance_l2 (inf while the output has not moved); ratio_l1 the same
//                       in L1 (input_distance_l1 / output_distance)
//   output_per_input_l1 output_distance / input_distance_l1: the study's d_o / d_i (L1 / L1)
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/optimizer.hpp"
#include "lminv/options.hpp"
#include "lminv/tensor.hpp"

namespace lminv {
namespace orthogonal_walk {

// Widths up to this use Eigen's JacobiSVD with ComputeFullV (a C x C matrix); wider inputs (input = vocab with
// a real vocabulary) take the same columns from the QR factorisation JacobiSVD starts with, without forming V.
inline constexpr std::int64_t kFullSvdMaxWidth = 4096;

enum class NullSpaceMethod { full_svd, qr };

// Columns `columns` of the full V of the SVD G = U S V^T of G [rows, cols], computed in `dtype` (f64 or f32;
// G is rounded to it first), returned in f64 [cols, columns.size()] exactly as the SVD gave them (not
// renormalised). For a wide G (cols > rows) JacobiSVD factors G^T = Q R P^T with column-pivoting Householder QR
// and V = Q diag(V_R, I): the columns j >= rows of V are those of Q. NullSpaceMethod::qr computes Q e_j from the
// Householder reflectors (O(cols rows) per column, no cols x cols matrix); NullSpaceMethod::full_svd runs
// JacobiSVD(G, ComputeFullV). Both give the same vectors for j >= rows; columns j < rows need full_svd.
Eigen::MatrixXd right_singular_vectors(const Eigen::MatrixXd& g, const std::vector<std::int64_t>& columns, DType dtype,
                                       NullSpaceMethod method);

// The method the walk uses for an input of width `cols`.
inline NullSpaceMethod method_for_width(std::int64_t cols) {
  return cols <= kFullSvdMaxWidth ? NullSpaceMethod::full_svd : NullSpaceMethod::qr;
}

}  // namespace orthogonal_walk

// Config keys: steps (100), eta (0.01), svd_dtype (f64 | f32), direction (vector | matrix), index (-1: random
// each step; k >= 0: the fixed column T + k; last: the column C - 1; direction = vector only), sign (continue |
// svd), metric (l1 | l2 | cosine: Result.loss).
// Result: input = the input after the last step; loss = its output distance in `metric`; values: input_distance,
// input_distance_l1, output_distance, output_distance_l2, ratio (input_distance / output_distance_l2),
// output_per_input (its inverse), ratio_l1 and output_per_input_l1 (the same in L1 / L1), orthogonality_mean,
// orthogonality_max, gradient_dot_max.
class OrthogonalWalk final : public Optimizer {
 public:
  void configure(const Options& options) override;
  Result run(Problem& problem, Observer& observer) override;

  // The configured keys (their defaults until configure succeeds; a failed configure changes nothing).
  struct Settings {
    std::int64_t steps = 100;
    double eta = 0.01;
    DType svd_dtype = DType::f64;
    bool matrix = false;      // direction = matrix
    std::int64_t index = -1;  // -1: a random column each step
    bool last = false;        // index = last: the column C - 1
    bool keep_sign = true;    // sign = continue
    Metric metric = Metric::l1;
  };
  const Settings& settings() const { return settings_; }

 private:
  Settings settings_;
};

}  // namespace lminv
