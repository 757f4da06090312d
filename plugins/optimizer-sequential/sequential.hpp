// Optimizers `sequential` (a policy-ranked verified search, position by position) and `brute_force` (the same
// verifier over the vocabulary in order). See search.hpp for the search and policies.hpp for the policies.
#pragma once

#include <string>

#include "policies.hpp"
#include "search.hpp"

namespace lminv::sequential {

//   [optimizer]
//   name = sequential
//   policy = linearized        ; linearized | gradient | random
//   batch = 16                 ; candidates verified per backend call
//   epsilon = 0                ; first acceptance threshold (relative L2); 0: 1e-9 f64, 1e-4 f32, 5e-2 bf16
//   epsilon_growth = 10        ; when a whole pass verified nothing
//   epsilon_max = 0.1
//   cache = true               ; the backend's prefix cache, when it has one
//   fd_step, reuse_jacobian, relinearize_after, max_jacobians, jacobian_batch,  ; policy linearized
//   scalar_ranking, session_cache
//   proxy_steps, proxy_lr                                                       ; policy gradient
// One optimizer serves a whole session (a sweep's prompts): policy linearized keeps what does not depend on the
// prompt between its runs (LinearizationCache).
class SequentialOptimizer final : public Optimizer {
 public:
  void configure(const Options& options) override;
  Result run(Problem& problem, Observer& observer) override;

 private:
  std::string policy_ = "linearized";
  SearchOptions search_;
  LinearizedSettings linearized_;
  GradientSettings gradient_;
  std::shared_ptr<LinearizationCache> linearization_cache_ = make_linearization_cache();
};

//   [optimizer]
//   name = brute_force
//   batch = 256                ; candidates per backend call
//   scan = first               ; first: accept the first token within epsilon (vocabulary order); all: verify
//                              ; every token and take the closest (a complete certificate)
//   epsilon, epsilon_growth, epsilon_max, cache   ; as for sequential
class BruteForceOptimizer final : public Optimizer {
 public:
  BruteForceOptimizer() { search_.batch = 256; }  // configure() sets every field
  void configure(const Options& options) override;
  Result run(Problem& problem, Observer& observer) override;

 private:
  SearchOptions search_;
};

}  // namespace lminv::sequential
