#include "sequential.hpp"

namespace lminv::sequential {

void SequentialOptimizer::configure(const Options& o) {
  // Read into fresh settings: a configure that fails leaves the previous settings, and defaults never carry over.
  const std::string policy = o.get_choice("policy", "linearized", {"linearized", "gradient", "random"});
  SearchOptions search;
  search.read(o);
  // Every policy's keys are read, so that a config may keep them while trying another policy.
  LinearizedSettings linearized;
  linearized.read(o);
  GradientSettings gradient;
  gradient.read(o);
  policy_ = policy;
  search_ = search;
  linearized_ = linearized;
  gradient_ = gradient;
}

Result SequentialOptimizer::run(Problem& problem, Observer& observer) {
  std::unique_ptr<CandidateSource> source;
  if (policy_ == "linearized") source = make_linearized(linearized_, linearization_cache_);
  else if (policy_ == "gradient") source = make_gradient(gradient_, linearized_, linearization_cache_);
  else source = make_random_order(problem.rng.fork("sequential/random"));
  try {
    return run_search(problem, observer, search_, *source, "sequential");
  } catch (const Error& e) {
    throw Error(std::string("sequential (policy ") + policy_ + "): " + e.what());
  }
}

void BruteForceOptimizer::configure(const Options& o) {
  SearchOptions search;
  search.batch = 256;
  search.certify_next = 0;  // vocabulary order: the next ids are no closer rivals than any others
  search.read(o);
  search.stop_at_first = o.get_choice("scan", "first", {"first", "all"}) == "first";
  search_ = search;
}

Result BruteForceOptimizer::run(Problem& problem, Observer& observer) {
  std::unique_ptr<CandidateSource> source = make_vocab_order();
  try {
    return run_search(problem, observer, search_, *source, "brute_force");
  } catch (const Error& e) {
    throw Error(std::string("brute_force: ") + e.what());
  }
}

}  // namespace lminv::sequential
