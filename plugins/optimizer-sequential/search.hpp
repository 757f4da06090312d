// Exact prompt recovery by a verified search, one position at a time (optimizers `sequential` and `brute_force`).
//
// In a causal model the output at position t depends on the inputs at positions 0 .. t only. With the prefix
// 0 .. t-1 already recovered, position t is a search over the V tokens: a candidate is verified by running it after
// the prefix (one backend call per batch of candidates, through the backend's prefix cache when it has one) and
// accepted when its output row is within epsilon of the observed row y_t, in relative L2 distance
//   dist(v) = ||F_t(prefix, v) - y_t||_2 / ||y_t||_2.
// epsilon starts small (by dtype, or the `epsilon` option) and grows by `epsilon_growth` only when a whole pass over
// the vocabulary verified nothing. Each accepted token is recorded with its distance, the epsilon it passed and the
// distance of the best rejected candidate: their margin certifies that no verified candidate came as close.
//
// The order in which candidates are tried is the policy (a CandidateSource): that is where the speed is.
// Nikolaou et al., "Language Models are Injective and Hence Invertible" (2025), rank candidates by the distance of
// their embeddings to a continuous proxy descended on the distance at position t (`gradient`), and compare against
// random order and brute force (vocabulary order).
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lminv/lminv.hpp"
#include "lminv/prefix_cache.hpp"

namespace lminv::sequential {

using Index = std::int64_t;

// Options shared by every policy.
struct SearchOptions {
  Index batch = 16;             // candidates verified per backend call
  double epsilon = 0;           // first acceptance threshold; 0: from the dtypes and the observed level (below)
  double epsilon_growth = 10;   // factor, when a whole pass verified nothing
  double epsilon_max = 0.3;     // beyond it a position is reported unverified (its best candidate is still taken)
  bool use_cache = true;        // the backend's prefix cache when it has one; else whole sequences (same results)
  bool stop_at_first = true;    // accept the first candidate within epsilon; false: verify every token first
  // Tolerance to other implementations' rounding (states captured elsewhere):
  bool relax = true;            // accept a clear winner above epsilon (see below) and let epsilon follow the level
  Index relax_after = 64;       // candidates verified at a position before a clear winner above epsilon is taken
  Index relax_after_exact = 4096;  // the same while every position so far matched within the dtype's epsilon
  double unique_ratio = 3;      // a rival within unique_ratio x the accepted distance is a tie (and no clear winner)
  double level_factor = 2;      // epsilon >= level_factor x the largest accepted distance so far (with relax)
  // The certificate: candidates verified after the accepted one, in the policy's order (rivals the policy ranks
  // next to it, e.g. tokens with near-identical embeddings, are verified rather than assumed away).
  Index certify_next = 8;
  Index max_candidates = 0;     // per position; 0: the whole vocabulary (a complete search)
  Index max_ties = 16;          // rivals listed per position (all are counted)

  // Reads batch, epsilon, epsilon_growth, epsilon_max, cache, relax, relax_after, relax_after_exact, unique_ratio,
  // level_factor, certify_next, max_candidates.
  void read(const Options& o);
};

// The first threshold for a model dtype: a few hundred times the rounding a backend's cached path and its whole
// forward pass may disagree by.
double default_epsilon(DType dtype);

// The search's view of the problem and of the position under way.
class Verifier {
 public:
  Verifier(Problem& problem, const SearchOptions& options);

  const ModelSpec& spec() const { return spec_; }
  Index vocab() const { return V_; }
  Index width() const { return width_; }         // of an input row: d (embedding) or V (vocab)
  Index out_width() const { return D_; }         // of an output row
  Index position() const { return t_; }          // the position searched; the prefix holds 0 .. t-1
  const std::vector<Index>& prefix() const { return prefix_; }
  PrefixCache& cache() { return *cache_; }
  bool backend_cache() const { return backend_cache_; }
  Model& model() { return problem_.model; }
  Problem& problem() { return problem_; }
  const std::vector<double>& target_row() const { return y_; }  // y_t
  const Tensor& target() const { return problem_.target; }      // [1, T, D]
  Index seq_len() const { return T_; }

  // Token embeddings wte [V, d] as floats, row-major (for ranking): the weights' own bytes when they are f32 (no
  // copy), else a converted copy made on first use. Valid for the Verifier's life.
  const float* wte_f32() const;
  Tensor rows(const std::vector<Index>& ids) const;  // candidate input rows [n, width] in the model's dtype

  // Output rows of arbitrary input rows [n, width] at this position (chunked by `chunk` rows per backend call).
  Tensor outputs(const Tensor& input_rows, Index chunk);
  // The same at position p after other rows [p, width] in place of the prefix (a policy's look at a generic
  // context); the cache holds the prefix again afterwards.
  Tensor outputs_after(const Tensor& prefix_rows, const Tensor& input_rows, Index chunk);

  // Starts position t (the prefix holds the tokens accepted so far).
  void begin_position(Index t);
  // Verifies ids (not verified before at this position): their distances, also kept.
  std::vector<double> verify(const std::vector<Index>& ids);
  bool verified(Index id) const { return distance_[id] >= 0; }
  double distance(Index id) const { return distance_[id]; }
  Index verified_count() const { return verified_count_; }
  // Relative L2 distance of an output row (D values, any dtype) to y_t.
  double relative_distance(const Tensor& rows, Index r) const;
  // Accepts id at position t and appends it to the prefix.
  void accept(Index id);
  // Says that a candidate is accepted at this position and the candidates still asked for are its certificate's:
  // a policy need not look for better ones (no new linearization). Until accept().
  void begin_certificate() { certifying_ = true; }
  bool certifying() const { return certifying_; }

 private:
  Problem& problem_;
  ModelSpec spec_;
  Index T_ = 0, V_ = 0, width_ = 0, D_ = 0, t_ = 0;
  std::unique_ptr<FullForwardPrefix> fallback_;
  PrefixCache* cache_ = nullptr;
  bool backend_cache_ = false;
  std::vector<Index> prefix_;
  std::vector<double> y_;
  double y_norm_ = 0;
  std::vector<double> distance_;  // per token at this position; -1 = not verified
  Index verified_count_ = 0;
  std::vector<Index> last_verified_;  // the ids of the cache's last next(), when verify() made it (for accept)
  bool certifying_ = false;           // begin_certificate() .. accept()
  const Tensor* wte_ = nullptr;          // [V, d] in the weights (embedding input)
  Tensor wte_converted_;                 // wte in the model's dtype, when the weights hold another
  const Tensor* wte_model_ = nullptr;    // wte_ or wte_converted_: candidate rows are copied from it
  mutable std::vector<float> wte_f32_;   // made on first use when the weights are not f32
};

// A policy: the order in which a position's candidates are verified.
class CandidateSource {
 public:
  virtual ~CandidateSource() = default;
  // A new position: the verifier's prefix holds the tokens accepted before it.
  virtual void begin(Verifier& v) = 0;
  // Up to n tokens not yet verified at this position, best first; empty when every token has been verified.
  virtual std::vector<Index> next(Verifier& v, Index n) = 0;
  // Where the policy ranked token `id` at this position (0 = first), for reports; -1 when it keeps no ranking.
  virtual Index rank_of(Index /*id*/) const { return -1; }
  // Figures for the result (Jacobians computed, ...), added up over the positions.
  virtual std::map<std::string, double> totals() const { return {}; }
};

// Tokens in vocabulary order (brute force) or in a random order (the paper's random baseline).
std::unique_ptr<CandidateSource> make_vocab_order();
std::unique_ptr<CandidateSource> make_random_order(Rng rng);

// The search over every position: the Result's ids are the accepted tokens, its input their rows; series per
// position: distance, epsilon, best_rejected, margin, tolerance, ties (rivals within the tolerance, listed in
// Result::ties), candidates, verified (1/0: within epsilon), relaxed (1/0: epsilon above its dtype floor), known
// (1/0: a Problem::known_prefix token, checked, not searched), seconds, and rank (the policy's rank of the accepted
// token) and true_rank (of the prompt's token, for reports) where the policy ranks.
//
// epsilon at a position (with epsilon = 0) is the largest of: the model dtype's threshold (default_epsilon), twice
// the target's own rounding (Problem::target_rounding: states stored in bf16 or f16 cannot come closer), and, with
// relax, level_factor x the observed level (the largest distance accepted so far, known prefix included: how far
// this implementation's states lie from the target's for the right tokens). With relax, once relax_after candidates
// are verified without one within epsilon (relax_after_exact while every position so far, known prefix included,
// matched within the dtype's epsilon: the target is then this computation's own and a miss is the ranking's), the
// closest is accepted when every other verified candidate lies at least unique_ratio times farther (a clear winner;
// epsilon becomes its distance); otherwise the search goes on through
// the whole vocabulary (or max_candidates), as without relax.
Result run_search(Problem& problem, Observer& observer, const SearchOptions& options, CandidateSource& source,
                  const std::string& who);

}  // namespace lminv::sequential
