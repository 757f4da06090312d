#include "search.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

namespace lminv::sequential {

namespace {

using Clock = std::chrono::steady_clock;


class VocabOrder final : public CandidateSource {
 public:
  void begin(Verifier&) override { next_ = 0; }
  std::vector<Index> next(Verifier& v, Index n) override {
    std::vector<Index> ids;
    for (; next_ < v.vocab() && static_cast<Index>(ids.size()) < n; ++next_)
      if (!v.verified(next_)) ids.push_back(next_);
    return ids;
  }
  Index rank_of(Index id) const override { return id; }

 private:
  Index next_ = 0;
};

class RandomOrder final : public CandidateSource {
 public:
  explicit RandomOrder(Rng rng) : rng_(rng) {}
  void begin(Verifier& v) override {  // a fresh permutation per position (Fisher-Yates)
    order_.resize(static_cast<std::size_t>(v.vocab()));
    std::iota(order_.begin(), order_.end(), Index{0});
    for (Index i = v.vocab() - 1; i > 0; --i) std::swap(order_[i], order_[rng_.below(static_cast<std::uint64_t>(i + 1))]);
    rank_.assign(order_.size(), 0);
    for (std::size_t r = 0; r < order_.size(); ++r) rank_[order_[r]] = static_cast<Index>(r);
    next_ = 0;
  }
  std::vector<Index> next(Verifier& v, Index n) override {
    std::vector<Index> ids;
    for (; next_ < v.vocab() && static_cast<Index>(ids.size()) < n; ++next_)
      if (!v.verified(order_[next_])) ids.push_back(order_[next_]);
    return ids;
  }
  Index rank_of(Index id) const override { return rank_.empty() ? -1 : rank_[id]; }

 private:
  Rng rng_;
  std::vector<Index> order_, rank_;
  Index next_ = 0;
};

}  // namespace

std::unique_ptr<CandidateSource> make_vocab_order() { return std::make_unique<VocabOrder>(); }
std::unique_ptr<CandidateSource> make_random_order(Rng rng) { return std::make_unique<RandomOrder>(rng); }

void SearchOptions::read(const Options& o) {
  batch = o.get_int("batch", batch);
  if (batch < 1) o.fail("batch", "must be at least 1");
  epsilon = o.get_double("epsilon", epsilon);
  if (!(epsilon >= 0) || !std::isfinite(epsilon)) o.fail("epsilon", "must be a finite number >= 0 (0: by dtype)");
  epsilon_growth = o.get_double("epsilon_growth", epsilon_growth);
  if (!(epsilon_growth > 1) || !std::isfinite(epsilon_growth)) o.fail("epsilon_growth", "must be a number > 1");
  epsilon_max = o.get_double("epsilon_max", epsilon_max);
  if (!(epsilon_max > 0) || !std::isfinite(epsilon_max)) o.fail("epsilon_max", "must be a positive number");
  if (epsilon > epsilon_max) o.fail("epsilon", "must not exceed epsilon_max (" + std::to_string(epsilon_max) + ")");
  use_cache = o.get_bool("cache", use_cache);
  relax = o.get_bool("relax", relax);
  relax_after = o.get_int("relax_after", relax_after);
  if (relax_after < 1) o.fail("relax_after", "must be at least 1");
  relax_after_exact = o.get_int("relax_after_exact", relax_after_exact);
  if (relax_after_exact < 1) o.fail("relax_after_exact", "must be at least 1");
  unique_ratio = o.get_double("unique_ratio", unique_ratio);
  if (!(unique_ratio > 1) || !std::isfinite(unique_ratio)) o.fail("unique_ratio", "must be a number > 1");
  level_factor = o.get_double("level_factor", level_factor);
  if (!(level_factor >= 1) || !std::isfinite(level_factor)) o.fail("level_factor", "must be a number >= 1");
  certify_next = o.get_int("certify_next", certify_next);
  if (certify_next < 0) o.fail("certify_next", "must be >= 0");
  max_candidates = o.get_int("max_candidates", max_candidates);
  if (max_candidates < 0) o.fail("max_candidates", "must be >= 0 (0: the whole vocabulary)");
}

double default_epsilon(DType dtype) {
  switch (dtype) {
    case DType::f64: return 1e-9;
    case DType::f32: return 1e-4;
    case DType::bf16: return 5e-2;
  }
  return 1e-4;
}

// ---- Verifier -----------------------------------------------------------------------------------------------------

Verifier::Verifier(Problem& problem, const SearchOptions& options) : problem_(problem), spec_(problem.model.spec()) {
  if (!spec_.causal())
    throw Error(std::string("needs a causal model (a decoder or transformer_mlp): the output at position t must not "
                            "depend on later positions; a ") +
                kind_name(spec_.kind) + " model (family '" + spec_.family + "') is not");
  const Tensor& target = problem.target;
  if (target.rank() != 3 || target.dim(0) != 1)
    throw Error("needs a target [1, T, D], got " + shape_string(target.shape()));
  T_ = target.dim(1);
  D_ = target.dim(2);
  V_ = spec_.vocab_size;
  width_ = spec_.input == InputSpace::embedding ? spec_.n_embd : V_;
  if (T_ != spec_.seq_len)
    throw Error("the target has " + std::to_string(T_) + " positions, the model " + std::to_string(spec_.seq_len));
  for (Index i = 0; i < target.numel(); ++i)
    if (!std::isfinite(target.get(i)))
      throw Error("the target holds " + std::string(std::isnan(target.get(i)) ? "NaN" : "an infinity") +
                  " at position " + std::to_string(i / D_) + ", element " + std::to_string(i % D_) +
                  ": a search cannot match it (NaN or Inf in the weights or the states?)");
  if (spec_.input == InputSpace::embedding) {
    if (!problem.weights || !problem.weights->contains("wte.weight"))
      throw Error("needs the token embeddings (weight 'wte.weight' [V, d]) to make candidate inputs");
    wte_ = &problem.weights->get("wte.weight", {V_, spec_.n_embd});
    if (wte_->dtype() == spec_.dtype) {
      wte_model_ = wte_;
    } else {
      wte_converted_ = wte_->to(spec_.dtype);
      wte_model_ = &wte_converted_;
    }
  }
  if (options.use_cache) cache_ = prefix_cache_of(problem.model);
  backend_cache_ = cache_ != nullptr;
  if (!cache_) {
    fallback_ = std::make_unique<FullForwardPrefix>(problem.model);
    cache_ = fallback_.get();
  }
  cache_->reset();
  distance_.assign(static_cast<std::size_t>(V_), -1.0);
}

const float* Verifier::wte_f32() const {
  if (!wte_) throw Error("the token embeddings are needed for ranking, and this model's input is not embedding");
  if (wte_->dtype() == DType::f32) return wte_->data<float>();
  if (wte_f32_.empty()) {
    wte_f32_.resize(static_cast<std::size_t>(wte_->numel()));
    for (Index i = 0; i < wte_->numel(); ++i) wte_f32_[i] = static_cast<float>(wte_->get(i));
  }
  return wte_f32_.data();
}

Tensor Verifier::rows(const std::vector<Index>& ids) const {
  const Index n = static_cast<Index>(ids.size());
  Tensor out(spec_.dtype, {n, width_});
  if (spec_.input == InputSpace::vocab) {
    for (Index i = 0; i < n; ++i) out.set(i * width_ + ids[i], 1.0);
    return out;
  }
  const std::size_t row = static_cast<std::size_t>(width_) * dtype_size(spec_.dtype);
  for (Index i = 0; i < n; ++i)
    std::memcpy(static_cast<unsigned char*>(out.raw()) + static_cast<std::size_t>(i) * row,
                static_cast<const unsigned char*>(wte_model_->raw()) + static_cast<std::size_t>(ids[i]) * row, row);
  return out;
}

Tensor Verifier::outputs(const Tensor& input_rows, Index chunk) {
  last_verified_.clear();
  const Index n = input_rows.dim(0);
  if (n <= chunk) return cache_->next(input_rows);
  std::vector<Tensor> parts;
  for (Index begin = 0; begin < n; begin += chunk)
    parts.push_back(cache_->next(input_rows.slice0(begin, std::min(n, begin + chunk))));
  return Tensor::concat0(parts);
}

void Verifier::begin_position(Index t) {
  t_ = t;
  y_.assign(static_cast<std::size_t>(D_), 0.0);
  double sq = 0;
  for (Index j = 0; j < D_; ++j) {
    y_[j] = problem_.target.get(t * D_ + j);
    sq += y_[j] * y_[j];
  }
  y_norm_ = std::sqrt(sq);
  std::fill(distance_.begin(), distance_.end(), -1.0);
  verified_count_ = 0;
}

double Verifier::relative_distance(const Tensor& rows, Index r) const {
  double sq = 0;
  const Index base = r * D_;
  switch (rows.dtype()) {
    case DType::f32: {
      const float* o = rows.data<float>() + base;
      for (Index j = 0; j < D_; ++j) sq += (o[j] - y_[j]) * (o[j] - y_[j]);
      break;
    }
    case DType::f64: {
      const double* o = rows.data<double>() + base;
      for (Index j = 0; j < D_; ++j) sq += (o[j] - y_[j]) * (o[j] - y_[j]);
      break;
    }
    default:
      for (Index j = 0; j < D_; ++j) sq += (rows.get(base + j) - y_[j]) * (rows.get(base + j) - y_[j]);
  }
  return std::sqrt(sq) / (y_norm_ > 0 ? y_norm_ : 1.0);
}

Tensor Verifier::outputs_after(const Tensor& prefix_rows, const Tensor& input_rows, Index chunk) {
  last_verified_.clear();
  cache_->reset();
  cache_->append(prefix_rows);
  const Tensor out = outputs(input_rows, chunk);
  cache_->reset();
  if (!prefix_.empty()) cache_->append(rows(prefix_));
  return out;
}

std::vector<double> Verifier::verify(const std::vector<Index>& ids) {
  last_verified_.clear();
  const Tensor out = cache_->next(rows(ids));
  last_verified_ = ids;
  std::vector<double> d(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    d[i] = relative_distance(out, static_cast<Index>(i));
    // NaN never compares, so it would never verify nor be rejected: the search would run through the vocabulary.
    if (!std::isfinite(d[i]))
      throw Error("the model's output for token " + std::to_string(ids[i]) + " at position " + std::to_string(t_) +
                  " is not finite (NaN or Inf): the model overflows in " + dtype_name(spec_.dtype) +
                  " or its weights hold NaN/Inf");
    if (distance_[ids[i]] < 0) ++verified_count_;
    distance_[ids[i]] = d[i];
  }
  return d;
}

void Verifier::accept(Index id) {
  // A candidate of the last verify() call: the cache appends it from that call's keys and values when it can.
  const auto at = std::find(last_verified_.begin(), last_verified_.end(), id);
  const bool kept = at != last_verified_.end() && cache_->append_from_last_next(at - last_verified_.begin());
  if (!kept) cache_->append(rows({id}));
  last_verified_.clear();
  certifying_ = false;
  prefix_.push_back(id);
}

// ---- the search ---------------------------------------------------------------------------------------------------

Result run_search(Problem& problem, Observer& observer, const SearchOptions& options, CandidateSource& source,
                  const std::string& who) {
  Verifier v(problem, options);
  const Index T = v.seq_len(), V = v.vocab();
  const Index known = static_cast<Index>(problem.known_prefix.size());
  if (known > T)
    throw Error(who + ": the known prefix has " + std::to_string(known) + " tokens, the target only " +
                std::to_string(T) + " positions");
  for (Index id : problem.known_prefix)
    if (id < 0 || id >= V)
      throw Error(who + ": known prefix token " + std::to_string(id) + " is outside the vocabulary (size " +
                  std::to_string(V) + ")");
  // The threshold's floor: the model dtype's, or twice the rounding of the target as it was captured.
  const double eps_floor = options.epsilon > 0
                               ? options.epsilon
                               : std::max(default_epsilon(v.spec().dtype), 2 * problem.target_rounding);
  std::map<std::string, std::vector<double>> series;
  auto record = [&](const char* name, double value) { series[name].push_back(value); };
  Tensor found(v.spec().dtype, {1, T, v.width()});
  Index candidates_total = 0, unverified = 0, relaxed_count = 0, ambiguous = 0;
  double worst_margin = std::numeric_limits<double>::infinity(), largest_eps = 0, total_distance = 0;
  double level = 0;  // the largest distance accepted so far: how closely this model reproduces the target
  Index matched = 0;  // positions (known prefix included) accepted within eps_floor
  std::vector<std::vector<Candidate>> ties;

  auto keep_row = [&](Index t, Index id) {
    const Tensor row = v.rows({id});
    std::memcpy(static_cast<unsigned char*>(found.raw()) + static_cast<std::size_t>(t) * row.nbytes(), row.raw(),
                row.nbytes());
  };
  auto closest_verified = [&](Index except) {
    Index best = -1;
    for (Index id = 0; id < V; ++id)
      if (id != except && v.verified(id) && (best < 0 || v.distance(id) < v.distance(best))) best = id;
    return best;
  };

  // The known prefix: each token checked against its row of the target (a wrong prefix, or states captured
  // without it, must not silently steer the search), then fixed.
  for (Index t = 0; t < known; ++t) {
    const auto start = Clock::now();
    const Index id = problem.known_prefix[t];
    v.begin_position(t);
    const double dist = v.verify({id})[0];
    if (!(dist <= options.epsilon_max))
      throw Error(who + ": the known prefix does not match the target at position " + std::to_string(t) +
                  ": token " + std::to_string(id) + " is at relative distance " + std::to_string(dist) +
                  " (epsilon_max " + std::to_string(options.epsilon_max) +
                  "); were the states made with this prefix (BOS, [prompt] prefix)?");
    level = std::max(level, dist);
    if (dist <= eps_floor) ++matched;
    v.accept(id);
    keep_row(t, id);
    record("distance", dist);
    record("epsilon", NAN);
    record("best_rejected", NAN);
    record("margin", NAN);
    record("tolerance", NAN);
    record("ties", 0);
    record("candidates", 1);
    record("verified", 1);
    record("relaxed", 0);
    record("known", 1);
    record("rank", -1);
    record("true_rank", -1);
    record("seconds", std::chrono::duration<double>(Clock::now() - start).count());
    ties.emplace_back();
    total_distance += dist;
  }

  for (Index t = known; t < T; ++t) {
    const auto start = Clock::now();
    v.begin_position(t);
    source.begin(v);
    double eps = options.relax ? std::max(eps_floor, options.level_factor * level) : eps_floor;
    eps = std::min(eps, options.epsilon_max);
    Index accepted = -1;
    Index after_accepted = 0;  // candidates of the accepting batch that the policy ranked after the accepted one
    bool clear_winner = false;
    for (;;) {
      const std::vector<Index> ids = source.next(v, options.batch);
      if (ids.empty()) break;  // every token verified
      const std::vector<double> d = v.verify(ids);
      if (!options.stop_at_first) continue;
      std::size_t at = 0;
      for (std::size_t i = 0; i < ids.size(); ++i)
        if (d[i] <= eps && (accepted < 0 || d[i] < v.distance(accepted))) {
          accepted = ids[i];
          at = i;
        }
      if (accepted >= 0) {
        after_accepted = static_cast<Index>(ids.size() - 1 - at);
        break;
      }
      // While every position so far matched within the floor, the target is this computation's own: a miss here
      // is the ranking's, not a sign of states made elsewhere, so a clear winner above epsilon waits longer (on
      // trained weights a wrong token can stand 4x clear of the other 63 candidates while the right one is 0 away).
      const bool own_target = matched > 0 && level <= eps_floor;
      const Index relax_at = own_target ? std::max(options.relax_after, options.relax_after_exact) : options.relax_after;
      if (options.relax && v.verified_count() >= relax_at) {
        // A clear winner above epsilon: the target was made by another computation (or dtype) than this one.
        const Index best = closest_verified(-1), second = closest_verified(best);
        if (best >= 0 && v.distance(best) <= options.epsilon_max &&
            (second < 0 || v.distance(best) * options.unique_ratio <= v.distance(second))) {
          accepted = best;
          clear_winner = true;
          eps = std::max(eps, v.distance(best));
          break;
        }
      }
      if (options.max_candidates > 0 && v.verified_count() >= options.max_candidates) break;
    }
    if (accepted < 0) {  // a whole pass (or max_candidates): the closest token, epsilon grown until it passes
      accepted = closest_verified(-1);
      if (accepted < 0) throw Error(who + ": no candidate was verified at position " + std::to_string(t));
      while (v.distance(accepted) > eps && eps * options.epsilon_growth <= options.epsilon_max)
        eps *= options.epsilon_growth;
      if (v.distance(accepted) > eps && v.distance(accepted) <= options.epsilon_max) eps = options.epsilon_max;
    }
    // The certificate also covers the candidates the policy ranks right after the accepted one.
    if (options.stop_at_first && !clear_winner && after_accepted < options.certify_next) {
      v.begin_certificate();  // the policy hands out what it has ranked, without a new Jacobian
      const std::vector<Index> more = source.next(v, options.certify_next - after_accepted);
      if (!more.empty()) v.verify(more);
    }
    const double dist = v.distance(accepted);
    const bool ok = dist <= eps;
    if (ok) level = std::max(level, dist);
    if (ok && dist <= eps_floor) ++matched;
    const double tolerance = std::max(eps, options.unique_ratio * dist);
    double best_rejected = std::numeric_limits<double>::infinity();
    std::vector<Candidate> rivals;
    for (Index id = 0; id < V; ++id) {
      if (id == accepted || !v.verified(id)) continue;
      best_rejected = std::min(best_rejected, v.distance(id));
      if (v.distance(id) <= tolerance) rivals.push_back({id, v.distance(id)});
    }
    std::sort(rivals.begin(), rivals.end(), [](const Candidate& a, const Candidate& b) {
      return a.distance < b.distance || (a.distance == b.distance && a.id < b.id);
    });
    const Index tie_count = static_cast<Index>(rivals.size());
    if (static_cast<Index>(rivals.size()) > options.max_ties) rivals.resize(static_cast<std::size_t>(options.max_ties));
    const bool relaxed = ok && eps > eps_floor;
    const Index rank = source.rank_of(accepted);
    const Index true_rank =
        t < static_cast<Index>(problem.true_ids.size()) ? source.rank_of(problem.true_ids[t]) : Index{-1};
    const Index candidates = v.verified_count();
    v.accept(accepted);

    record("distance", dist);
    record("epsilon", eps);
    record("best_rejected", std::isfinite(best_rejected) ? best_rejected : NAN);
    record("margin", std::isfinite(best_rejected) ? best_rejected - dist : NAN);
    record("tolerance", tolerance);
    record("ties", static_cast<double>(tie_count));
    record("candidates", static_cast<double>(candidates));
    record("verified", ok ? 1.0 : 0.0);
    record("relaxed", relaxed ? 1.0 : 0.0);
    record("known", 0);
    record("rank", static_cast<double>(rank));
    record("true_rank", static_cast<double>(true_rank));
    record("seconds", std::chrono::duration<double>(Clock::now() - start).count());
    ties.push_back(std::move(rivals));
    candidates_total += candidates;
    unverified += ok ? 0 : 1;
    relaxed_count += relaxed ? 1 : 0;
    ambiguous += tie_count > 0 ? 1 : 0;
    if (std::isfinite(best_rejected)) worst_margin = std::min(worst_margin, best_rejected - dist);
    largest_eps = std::max(largest_eps, eps);
    total_distance += dist;

    keep_row(t, accepted);
    Step step;
    step.index = t + 1;
    step.total = T;
    step.loss = {dist};
    step.input = &found;
    step.values = {{"candidates", static_cast<double>(candidates)}, {"epsilon", eps}};
    observer.on_step(step);
  }

  Result result;
  result.input = found;
  result.ids = v.prefix();
  result.metric = Metric::l2;
  result.loss = total_distance / static_cast<double>(T);  // mean relative L2 distance of the accepted rows
  result.steps = T - known;
  result.series = std::move(series);
  result.ties = std::move(ties);
  result.values = source.totals();
  const double searched = static_cast<double>(std::max<Index>(1, T - known));
  result.values["candidates_verified"] = static_cast<double>(candidates_total);
  result.values["candidates_per_position"] = static_cast<double>(candidates_total) / searched;
  result.values["unverified_positions"] = static_cast<double>(unverified);
  result.values["relaxed_positions"] = static_cast<double>(relaxed_count);
  result.values["ambiguous_positions"] = static_cast<double>(ambiguous);
  result.values["known_positions"] = static_cast<double>(known);
  result.values["min_margin"] = std::isfinite(worst_margin) ? worst_margin : NAN;
  result.values["max_epsilon"] = largest_eps;
  result.values["epsilon_floor"] = eps_floor;
  result.values["observed_level"] = level;
  result.values["target_rounding"] = problem.target_rounding;
  result.values["backend_prefix_cache"] = v.backend_cache() ? 1.0 : 0.0;
  return result;
}

}  // namespace lminv::sequential
