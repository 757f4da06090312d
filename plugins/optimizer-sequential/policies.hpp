// The ranked policies of the sequential search: `linearized` and `gradient` (search.hpp has vocabulary and random
// order).
#pragma once

#include <memory>

#include "search.hpp"

namespace lminv::sequential {

// `linearized`: rank every token v by the distance a first-order model of position t predicts for it,
//   score(v) = || F(e) + J (w_v - e) - y_t ||^2,
// with J the D x d Jacobian of the position-t map (prefix fixed) at a point e: the mean token embedding, or, after
// `relinearize_after` candidates failed under one ranking, the best candidate verified so far. J comes from finite
// differences over the d unit directions (d + 1 rows through the prefix cache, `jacobian_batch` per call). With
// `reuse_jacobian`, a position starts with the previous position's J (only F(e) is recomputed) and takes a fresh one
// when that ranking fails. With `scalar_ranking` (outputs as wide as the embeddings), a second ranking by the same
// model with J replaced by its scalar part (tr J / d) I is interleaved with the first: it needs no Jacobian of its
// own, so it stays right where a reused J has gone stale (the residual stream carries the input through every
// block). When this position's own J at the mean fails as well, the piecewise ranking takes the scalar ranking's
// place: the embeddings in `anchors` k-means clusters, each cluster's tokens scored by the first-order model at its
// centroid (trained embeddings are far from linear around the mean). Needs input = embedding.
struct LinearizedSettings {
  double fd_step = 0.01;           // finite-difference step, relative to the spread of the token embeddings
  bool reuse_jacobian = true;
  Index relinearize_after = 64;    // candidates of the J ranking verified before a new Jacobian
  Index max_jacobians = 4;         // per position; after them the last ranking is followed to the end
  Index jacobian_batch = 256;      // rows per backend call
  bool scalar_ranking = true;      // interleave the ranking by J ~ (tr J / d) I (when D = d)
  bool session_cache = true;       // keep the first positions' linearizations for the session's next prompts
  bool gradient_fallback = true;   // when a reused J's ranking fails: J_t^T r by a backward pass before a new J
  Index anchors = 16;              // when this position's own J at the mean fails too: J at each of this many
                                   // clusters' centroids, each ranking its cluster's tokens (1: off)
  void read(const Options& o);
};

// What a `linearized` policy keeps between the runs of one optimizer (a sweep's prompts): the statistics of the
// token embeddings, and the linearization at the first searched position (J, F(e) and the ranking's quadratic term),
// which depends on the model, its weights and the known prefix only, never on the target. Keyed by the weights
// object, the model's spec (all but seq_len), the prefix and the settings that change J.
class LinearizationCache;
std::shared_ptr<LinearizationCache> make_linearization_cache();

// `cache` may be null (nothing kept between runs).
std::unique_ptr<CandidateSource> make_linearized(const LinearizedSettings& settings,
                                                 std::shared_ptr<LinearizationCache> cache = nullptr);

// `gradient` (the paper's policy): a continuous proxy p at position t, started at the mean token embedding and
// descended with Adam for `proxy_steps` steps on ||F_t(p) - y_t|| / ||y_t|| (gradients by the backend's backward
// pass over the whole padded sequence); tokens ranked by ||w_v - p|| (embedding input) or by -p_v (vocab input).
//
// On trained weights the descended proxy often lands on a continuous input whose output is as close to y_t as the
// token's, far from every token's embedding (the map contracts the tokens training moved), and its nearest tokens
// are not the answer. So after `fallback_after` candidates fail under the proxy's ranking, a position continues with
// the `linearized` policy's rankings (its settings; input = embedding only; 0: never, the proxy's ranking to the
// end).
struct GradientSettings {
  Index proxy_steps = 50;
  double proxy_lr = 0.01;
  Index fallback_after = 64;
  void read(const Options& o);
};
std::unique_ptr<CandidateSource> make_gradient(const GradientSettings& settings, const LinearizedSettings& fallback,
                                               std::shared_ptr<LinearizationCache> cache = nullptr);

}  // namespace lminv::sequential
