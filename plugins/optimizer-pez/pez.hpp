// Optimizer `pez`: "Hard Prompts made EaZy" (Wen et al., 2023), a baseline for exact prompt inversion.
//
// PEZ keeps a continuous prompt P [T, d] and optimises it through its projection onto the token embeddings:
//   ids_n = proj(P_n)            the nearest row of wte [V, d] to each row of P_n (projection = cosine | l2)
//   P'_n  = wte[ids_n]           a hard prompt: real token embeddings
//   loss_n, g_n = metric(O(P'_n), target) and its gradient with respect to P'_n (not P_n)
//   P_{n+1} = update(P_n, g_n)   the gradient at the projection moves the continuous prompt (update = adam | sgd)
// AdamW as torch.optim.AdamW (the paper's optimiser): P <- P (1 - lr weight_decay), then
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,  P <- P - lr (m / c1) / (sqrt(v / c2) + eps)
// with c1 = 1 - beta1^n, c2 = 1 - beta2^n; sgd is P <- P (1 - lr weight_decay) - lr g.
//
// The start P_0 (init): random_tokens = wte rows of T tokens drawn uniformly from problem.rng.fork("pez/init")
// (the paper's start); mean = every row the mean of wte's rows; noise = every element drawn from N(mu, sigma), mu
// and sigma the mean and standard deviation of wte's elements, from problem.rng.fork("pez/init").
//
// Every step is scored at its projection, so the loss reported is that of a real token prompt. The best projected
// prompt (lowest loss, the earliest on ties) is the result; the run stops after `steps` steps or at the first step
// whose projected loss is <= tolerance (0: the tokens reproduce the target exactly). A step whose ids are those of
// the step before reuses that step's loss and gradient (the model is deterministic), so runs that stay on one hard
// prompt for a while cost only the projection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/optimizer.hpp"
#include "lminv/options.hpp"
#include "lminv/tensor.hpp"

namespace lminv {
namespace pez {

enum class Projection { l2, cosine };

// The rows of a token-embedding matrix wte [V, d] nearest to given points. For a point x [d] and row w_v:
//   l2:      the smallest ||x - w_v||_2, ranked by |w_v|^2 - 2 <x, w_v> (|x|^2 is the same for every v)
//   cosine:  the largest <x, w_v> / (|x| |w_v|) (0 when either vector is zero)
// Ties go to the lower id. The row norms are computed once here; a projection of T points is one pass over wte of
// V x d x T multiply-adds in fp64 (f32 rows widened as they are read), threaded with OpenMP over blocks of rows
// (one thread below about 10^6 multiply-adds); each dot product has one fixed summation order, so the ids do not
// depend on the thread count.
class NearestTokens {
 public:
  // wte [V, d] in f32 or f64 (bf16 is widened to f32, exactly). The object keeps a pointer to `wte`: it must outlive
  // the object.
  NearestTokens(const Tensor& wte, Projection projection);

  // The nearest token of each row of points [T, d] (row-major fp64, T = points.size() / d). Throws Error for a
  // non-finite point.
  std::vector<std::int64_t> nearest(const std::vector<double>& points) const;

  // Rows ids of wte, [1, T, d] in `dtype` (rounded to it as a cast would).
  Tensor embed(const std::vector<std::int64_t>& ids, DType dtype) const;

  // Row v of wte in fp64.
  std::vector<double> row(std::int64_t v) const;

  std::int64_t vocab_size() const { return vocab_; }
  std::int64_t dim() const { return dim_; }
  Projection projection() const { return projection_; }
  const std::vector<double>& row_norms() const { return norms_; }

 private:
  const Tensor* wte_ = nullptr;  // f32 or f64
  Tensor widened_;               // bf16 weights widened to f32 (empty otherwise)
  std::int64_t vocab_ = 0, dim_ = 0;
  Projection projection_ = Projection::cosine;
  std::vector<double> norms_;  // |w_v|, fp64
};

}  // namespace pez

// Config keys ([optimizer]):
//   steps = 1000            steps at most
//   lr = 0.1                learning rate (> 0)
//   weight_decay = 0.1      decoupled weight decay (>= 0), as AdamW's
//   update = adam           adam | sgd
//   beta1 = 0.9, beta2 = 0.999, eps = 1e-8     Adam's
//   projection = cosine     cosine | l2: how the nearest token is chosen
//   init = random_tokens    random_tokens | mean | noise
//   metric = l2             l1 | l2 | cosine: the loss
//   tolerance = 0           stop at the first projected loss <= tolerance (>= 0)
// Needs input = embedding and the weight wte.weight [V, d].
// Each step reaches the observer with the projected prompt as its input and its loss, and values best_loss (lowest
// so far), token_changes (positions whose token differs from the step before; T at step 1) and evaluated (1 when the
// model was run, 0 when the ids were those of the step before).
// Result: input = the best projected prompt [1, T, d] in the model's dtype (exactly wte rows of ids, rounded to
// that dtype); ids = its tokens; loss; steps = steps run; values: best_step, steps_run, model_evaluations,
// series_stride; series: loss = the projected loss of steps 1, 1 + s, 1 + 2 s, ... (s = series_stride, 1 up to
// kMaxSeries steps), at most kMaxSeries values.
class Pez final : public Optimizer {
 public:
  static constexpr std::int64_t kMaxSeries = 1000;

  void configure(const Options& options) override;
  Result run(Problem& problem, Observer& observer) override;

  // The configured keys (their defaults until configure succeeds; a failed configure changes nothing).
  struct Settings {
    std::int64_t steps = 1000;
    double lr = 0.1;
    double weight_decay = 0.1;
    bool adam = true;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    pez::Projection projection = pez::Projection::cosine;
    std::string init = "random_tokens";
    Metric metric = Metric::l2;
    double tolerance = 0;
  };
  const Settings& settings() const { return settings_; }

 private:
  Settings settings_;
};

}  // namespace lminv
