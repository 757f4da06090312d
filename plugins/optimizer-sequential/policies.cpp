#include "policies.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <sstream>

#ifdef LMINV_HAVE_DNNL
#include <dnnl.h>
#endif
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMINV_RANK_F16 1  // the ranking pass reads a half-precision copy of the embeddings
#endif

namespace lminv::sequential {

namespace {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VectorF = Eigen::VectorXf;
using Embeddings = Eigen::Map<const RowMatrixF>;  // wte (V, d), the Verifier's floats

// The 64-bit sort key of token i with score x: x's bits made monotonic in the high half, i in the low half, so that
// ascending keys are ascending scores with ties by id (what a stable sort of 0 .. V-1 by score gives).
std::uint64_t sort_key(float x, std::size_t i) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint32_t>(i);
}

std::vector<Index> ascending(const std::vector<float>& score) {
  std::vector<std::uint64_t> keys(score.size());
  for (std::size_t i = 0; i < score.size(); ++i) keys[i] = sort_key(score[i], i);
  std::sort(keys.begin(), keys.end());
  std::vector<Index> order(score.size());
  for (std::size_t i = 0; i < keys.size(); ++i) order[i] = static_cast<Index>(keys[i] & 0xffffffffu);
  return order;
}

// The same order, sorted as far as it is read: a search reads the first few entries of a ranking at most positions,
// so the rest is only partitioned (std::nth_element) and sorted a segment at a time when reached. Keys are unique, so
// the order is the full sort's.
class LazyOrder {
 public:
  void assign(const std::vector<float>& score) {
    keys_.resize(score.size());
    for (std::size_t i = 0; i < score.size(); ++i) keys_[i] = sort_key(score[i], i);
    sorted_ = 0;
  }
  void clear() {
    keys_.clear();
    sorted_ = 0;
  }
  std::size_t size() const { return keys_.size(); }
  bool empty() const { return keys_.empty(); }
  // Entry i of the ascending order.
  Index operator[](std::size_t i) {
    while (i >= sorted_) extend();
    return static_cast<Index>(keys_[i] & 0xffffffffu);
  }

 private:
  void extend() {
    constexpr std::size_t kFirst = 256;
    const std::size_t end = std::min(keys_.size(), std::max(kFirst, 4 * sorted_));
    if (end < keys_.size()) std::nth_element(keys_.begin() + sorted_, keys_.begin() + end, keys_.end());
    std::sort(keys_.begin() + sorted_, keys_.begin() + end);
    sorted_ = end;
  }

  std::vector<std::uint64_t> keys_;
  std::size_t sorted_ = 0;  // keys_[0 .. sorted_) are in place; the rest are all larger
};

// Tokens sorted by score (ascending), with each token's place in that order.
struct Ranking {
  std::vector<Index> order, place;
  Index next = 0;  // first entry of `order` not handed out yet

  void sort(const std::vector<float>& score) {
    order = ascending(score);
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

struct Clusters;

// What the token embeddings give every linearization: their mean (the first point e), each row's squared norm (the
// scalar ranking) and their spread about the mean (the finite-difference step).
struct EmbeddingStats {
  VectorF mean;
  std::vector<float> sq_norm;
  double spread = 0;  // root mean square of (w - mean) over all V d entries
  // wte in IEEE half precision, where the CPU converts it in hardware (F16C): each position's ranking is one pass
  // over the embeddings, bound by memory bandwidth (154 MB for GPT-2 small in f32), and half the bytes take half the
  // time. A ranking only orders candidates, so its scores need not be exact.
  std::vector<std::uint16_t> half;
  // The piecewise linearization's groups, made on first use (for `clusters_k` groups).
  mutable std::shared_ptr<const Clusters> clusters;
  mutable Index clusters_k = 0;
};

#ifdef LMINV_RANK_F16
std::vector<std::uint16_t> to_half(const float* x, std::size_t n) {
  std::vector<std::uint16_t> h(n);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h.data() + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) h[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
  return h;
}

float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// <w, g> and (with a) <w, a> for one half-precision row w of d entries.
void dots_half(const std::uint16_t* w, const float* g, const float* a, Index d, float& wg, float& wa) {
  __m256 sg0 = _mm256_setzero_ps(), sg1 = _mm256_setzero_ps(), sa0 = _mm256_setzero_ps(), sa1 = _mm256_setzero_ps();
  Index j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 8)));
    sg0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(g + j), sg0);
    sg1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(g + j + 8), sg1);
    if (a) {
      sa0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a + j), sa0);
      sa1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(a + j + 8), sa1);
    }
  }
  wg = horizontal_sum(_mm256_add_ps(sg0, sg1));
  wa = a ? horizontal_sum(_mm256_add_ps(sa0, sa1)) : 0.0f;
  for (; j < d; ++j) {
    const float x = _cvtsh_ss(w[j]);
    wg += x * g[j];
    if (a) wa += x * a[j];
  }
}
#endif

EmbeddingStats embedding_stats(const float* wte, Index V, Index d) {
  EmbeddingStats s;
  std::vector<double> mean(static_cast<std::size_t>(d), 0.0);
  for (Index id = 0; id < V; ++id)
    for (Index j = 0; j < d; ++j) mean[j] += wte[id * d + j];
  s.mean.resize(d);
  for (Index j = 0; j < d; ++j) s.mean[j] = static_cast<float>(mean[j] / static_cast<double>(V));
  s.sq_norm.resize(static_cast<std::size_t>(V));
  double spread = 0;
  for (Index id = 0; id < V; ++id) {
    double sq = 0;
    for (Index j = 0; j < d; ++j) {
      const double x = wte[id * d + j], c = x - s.mean[j];
      sq += x * x;
      spread += c * c;
    }
    s.sq_norm[id] = static_cast<float>(sq);
  }
  s.spread = std::sqrt(spread / static_cast<double>(V * d));
#ifdef LMINV_RANK_F16
  s.half = to_half(wte, static_cast<std::size_t>(V * d));
#endif
  return s;
}

// One linearization of the position-t map: F(w) ~ F(e) + J (w - e), and the quadratic term of the J ranking,
// quadratic[v] = ||K (w_v - e)||^2 with K^T K = J^T J. `scale` = tr J / d (J square), the scalar ranking's J ~ scale I;
// 0 when J is not square.
struct Linearization {
  VectorF e, f_e;
  RowMatrixF J;  // (D, d)
  std::vector<float> quadratic;
  float scale = 0;
};

// ||K (w_v - e)||^2 for every token: one V x d x D' product (D' = min(D, d)), in chunks of rows. Through oneDNN's
// sgemm where it is built in (multithreaded, and faster than Eigen's product here: 0.37 s against 0.53 s for GPT-2
// small's V = 50257, d = D = 768 on 2 cores), else Eigen's.
std::vector<float> quadratic_term(const float* wte, Index V, const RowMatrixF& J, const VectorF& e) {
  const Index D = J.rows(), d = J.cols();
  RowMatrixF chol;
  if (D > d) {  // K = U with U^T U = J^T J (d x d): the same norms from a d-wide product
    Eigen::MatrixXd M = (J.transpose() * J).cast<double>();
    M.diagonal().array() += 1e-12 * std::max(M.trace(), 1e-300);
    Eigen::LLT<Eigen::MatrixXd> llt(M);
    chol = Eigen::MatrixXd(llt.matrixU()).cast<float>();
  }
  const RowMatrixF& K = D > d ? chol : J;  // (D', d)
  const Index Dk = K.rows();
  const VectorF Ke = K * e;
  std::vector<float> q(static_cast<std::size_t>(V));
  constexpr Index kChunk = 4096;
  RowMatrixF P(std::min(kChunk, V), Dk);
  for (Index c0 = 0; c0 < V; c0 += kChunk) {
    const Index n = std::min(kChunk, V - c0);
#ifdef LMINV_HAVE_DNNL
    // Row-major P (n, D') = W[c0 .. c0 + n) (n, d) x K^T.
    const dnnl_status_t status = dnnl_sgemm('N', 'T', n, Dk, d, 1.0f, wte + c0 * d, d, K.data(), d, 0.0f, P.data(), Dk);
    if (status != dnnl_success)
      throw Error("policy linearized: oneDNN's sgemm failed (dnnl_status_t " + std::to_string(status) + ")");
#else
    P.topRows(n).noalias() = Embeddings(wte + c0 * d, n, d) * K.transpose();
#endif
    for (Index i = 0; i < n; ++i) q[c0 + i] = (P.row(i) - Ke.transpose()).squaredNorm();
  }
  return q;
}

// P (n, m) = A (n, d) B^T for row-major A and B (m, d): oneDNN's sgemm where it is built in, else Eigen's.
RowMatrixF times_transposed(const float* a, Index n, const RowMatrixF& b) {
  const Index d = b.cols(), m = b.rows();
  RowMatrixF p(n, m);
#ifdef LMINV_HAVE_DNNL
  const dnnl_status_t status = dnnl_sgemm('N', 'T', n, m, d, 1.0f, a, d, b.data(), d, 0.0f, p.data(), m);
  if (status != dnnl_success)
    throw Error("policy linearized: oneDNN's sgemm failed (dnnl_status_t " + std::to_string(status) + ")");
#else
  p.noalias() = Embeddings(a, n, d) * b.transpose();
#endif
  return p;
}

// The token embeddings in K groups, for the piecewise linearization: k-means (10 Lloyd iterations) seeded with the
// mean embedding and then, one at a time, the row farthest from every seed so far. The seeding gives the rows far
// from the bulk their own groups: in a trained model those are the tokens training moved most (the frequent ones),
// and they are exactly where a single linearization at the mean extrapolates worst.
struct Clusters {
  std::vector<VectorF> anchors;  // K centroids
  std::vector<Index> members;    // token ids, grouped by cluster (ascending within one)
  std::vector<Index> offsets;    // cluster k's members: members[offsets[k] .. offsets[k + 1])
  RowMatrixF rows;               // wte's rows in the order of `members`
};

Clusters cluster_embeddings(const float* wte, Index V, Index d, Index K, const VectorF& mean) {
  const Embeddings W(wte, V, d);
  K = std::max<Index>(1, std::min(K, V));
  std::vector<VectorF> C{mean};
  Eigen::VectorXf nearest = (W.rowwise() - mean.transpose()).rowwise().squaredNorm();
  while (static_cast<Index>(C.size()) < K) {
    Index far = 0;
    nearest.maxCoeff(&far);
    C.emplace_back(W.row(far).transpose());
    nearest = nearest.cwiseMin((W.rowwise() - C.back().transpose()).rowwise().squaredNorm());
  }
  std::vector<Index> assign(static_cast<std::size_t>(V), 0);
  auto assign_all = [&] {
    RowMatrixF centers(K, d);
    for (Index k = 0; k < K; ++k) centers.row(k) = C[k].transpose();
    const Eigen::VectorXf c_sq = centers.rowwise().squaredNorm();
    constexpr Index kChunk = 4096;
    for (Index c0 = 0; c0 < V; c0 += kChunk) {
      const Index n = std::min(kChunk, V - c0);
      const RowMatrixF dots = times_transposed(wte + c0 * d, n, centers);  // (n, K)
      for (Index i = 0; i < n; ++i) {
        Index best = 0;
        (c_sq.transpose() - 2.0f * dots.row(i)).minCoeff(&best);
        assign[c0 + i] = best;
      }
    }
  };
  for (int iteration = 0; iteration < 10; ++iteration) {
    assign_all();
    std::vector<Eigen::VectorXd> sum(static_cast<std::size_t>(K), Eigen::VectorXd::Zero(d));
    std::vector<Index> count(static_cast<std::size_t>(K), 0);
    for (Index id = 0; id < V; ++id) {
      sum[assign[id]] += W.row(id).transpose().cast<double>();
      ++count[assign[id]];
    }
    for (Index k = 0; k < K; ++k)
      if (count[k]) C[k] = (sum[k] / static_cast<double>(count[k])).cast<float>();  // an empty one keeps its place
  }
  assign_all();
  Clusters c;
  c.anchors = std::move(C);
  c.offsets.assign(static_cast<std::size_t>(K + 1), 0);
  for (Index id = 0; id < V; ++id) ++c.offsets[assign[id] + 1];
  for (Index k = 0; k < K; ++k) c.offsets[k + 1] += c.offsets[k];
  c.members.resize(static_cast<std::size_t>(V));
  std::vector<Index> fill(c.offsets.begin(), c.offsets.end() - 1);
  for (Index id = 0; id < V; ++id) c.members[fill[assign[id]]++] = id;
  c.rows.resize(V, d);
  for (Index i = 0; i < V; ++i) c.rows.row(i) = W.row(c.members[i]);
  return c;
}

std::string spec_key(const ModelSpec& s) {
  // Everything that changes the map from an input row to the output, except seq_len (a causal model's output at t
  // does not depend on it). Doubles in hexadecimal: exact.
  std::ostringstream k;
  const Architecture& a = s.arch;
  k << std::hexfloat << s.family << ' ' << kind_name(s.kind) << ' ' << norm_name(a.norm) << a.norm_bias << ' '
    << a.norm_eps << ' ' << static_cast<int>(a.positions) << ' ' << a.rope_theta << ' ' << a.rotary_fraction << ' '
    << a.n_kv_head << ' ' << a.head_dim << ' ' << a.qkv_bias << a.attn_out_bias << static_cast<int>(a.mlp)
    << a.mlp_bias << static_cast<int>(a.residual) << a.tied_head << ' ' << s.n_layer << ' ' << s.n_embd << ' '
    << s.n_head << ' ' << s.n_inner << ' ' << s.vocab_size << ' ' << s.n_positions << ' ' << s.blocks << ' '
    << head_name(s.head) << ' ' << input_space_name(s.input) << ' ' << dtype_name(s.dtype) << ' ' << s.device
    << " layers";
  for (std::int64_t l : s.layers) k << ' ' << l;
  return k.str();
}

}  // namespace

// ---- the session's cache ------------------------------------------------------------------------------------------

// Valid for one weights object (held weakly: a new object at a freed one's address is not taken for it). A model on
// another backend with the same weights and spec would find the same entries; its J differs from theirs only by the
// backends' rounding, and a ranking only orders candidates (every one is still verified), so that is harmless. A
// session has one backend anyway.
class LinearizationCache {
 public:
  // The embeddings' statistics for these weights; forgets everything kept for other weights.
  std::shared_ptr<const EmbeddingStats> stats(const std::shared_ptr<const WeightSet>& weights, const float* wte,
                                              Index V, Index d) {
    const bool same = weights && weights.get() == address_ && !weights_.expired() &&
                      !weights_.owner_before(weights) && !weights.owner_before(weights_);
    if (!same || !stats_ || stats_->mean.size() != d || static_cast<Index>(stats_->sq_norm.size()) != V) {
      entries_.clear();
      runs_.clear();
      weights_ = weights;
      address_ = weights.get();
      stats_ = std::make_shared<const EmbeddingStats>(embedding_stats(wte, V, d));
    }
    return stats_;
  }

  std::shared_ptr<const Linearization> find(const std::string& key) const {
    for (const auto& [k, lin] : entries_)
      if (k == key) return lin;
    return nullptr;
  }

  void keep(const std::string& key, std::shared_ptr<const Linearization> lin) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const auto& e) { return e.first == key; }),
                   entries_.end());
    entries_.emplace_back(key, std::move(lin));
    // The positions of a prompt or two of a hundred tokens (2.6 MB each for GPT-2 small, 17 MB for d = 2048).
    constexpr std::size_t kEntries = 32;
    if (entries_.size() > kEntries) entries_.erase(entries_.begin());
  }

  // Counts a run that starts at the linearization `key`: how many did before.
  Index begin_run(const std::string& key) { return runs_[key]++; }

 private:
  std::weak_ptr<const WeightSet> weights_;
  const WeightSet* address_ = nullptr;
  std::shared_ptr<const EmbeddingStats> stats_;
  std::vector<std::pair<std::string, std::shared_ptr<const Linearization>>> entries_;  // oldest first
  std::map<std::string, Index> runs_;
};

std::shared_ptr<LinearizationCache> make_linearization_cache() { return std::make_shared<LinearizationCache>(); }

namespace {

// ---- linearized ---------------------------------------------------------------------------------------------------

class Linearized final : public CandidateSource {
 public:
  Linearized(const LinearizedSettings& s, std::shared_ptr<LinearizationCache> cache)
      : s_(s), cache_(s.session_cache ? std::move(cache) : nullptr) {}

  void begin(Verifier& v) override {
    if (v.spec().input != InputSpace::embedding)
      throw Error("policy 'linearized' needs [model] input = embedding (use policy gradient or random)");
    if (!wte_) prepare(v);
    jacobians_here_ = 0;
    since_rank_ = 0;
    gradient_here_ = false;
    const bool pieces_before = pieces_here_;  // the previous position needed the piecewise ranking
    pieces_here_ = pieces_fresh_ = false;
    if (!lin_) {
      // The first searched position: its linearization depends on the model and the prefix only (empty, or the
      // known prefix), the same for every prompt of a session.
      first_ = v.position();
      std::ostringstream key;
      key << spec_key(v.spec()) << " out " << v.out_width() << " cache " << v.backend_cache() << std::hexfloat
          << " fd_step " << s_.fd_step << " batch " << s_.jacobian_batch << " prefix";
      for (Index id : v.prefix()) key << ' ' << id;
      key_ = key.str();
      lin_from_ = 0;
      if (cache_) {
        runs_before_ = cache_->begin_run(key_);
        if (std::shared_ptr<const Linearization> lin = cache_->find(key_)) {
          lin_ = std::move(lin);
          f_e_ = lin_->f_e;
          ++cached_jacobians_;
          jacobians_here_ = 1;  // this position's fresh J at the mean, as if just computed
          rank(v);
          return;
        }
      }
      linearize(v, stats_->mean);
      if (cache_) cache_->keep(key_, lin_);
      return;
    }
    if (s_.reuse_jacobian) {
      if (cache_) generic(v);
      // The previous position's J and point e: only F(e) changes with the prefix.
      const Tensor out = v.outputs(point_rows(v, lin_->e), 1);
      f_e_ = row_of(out, 0, v.out_width());
      rank(v);
      // On weights where one J is not enough (the previous position needed the groups), the groups' earlier
      // Jacobians start this position beside it at once: only their F(a_k) are recomputed (`anchors` rows).
      if (pieces_before && !pieces_.empty()) rank_pieces(v, /*fresh=*/false);
    } else {
      linearize(v, stats_->mean);
    }
  }

  std::vector<Index> next(Verifier& v, Index n) override {
    if (v.certifying()) return take(v, n);  // the next ones of the current order, not a better order
    if (since_rank_ >= s_.relinearize_after && s_.gradient_fallback && jacobians_here_ == 0 && !gradient_here_) {
      // The reused J failed: first its linear term made exact for this position, J_t^T r by one backward pass.
      gradient_here_ = true;
      const VectorF g = gradient_at(v);
      rank(v, &g);
    } else if (since_rank_ >= s_.relinearize_after && jacobians_here_ >= 1 && s_.anchors > 1 && !pieces_fresh_) {
      // This position's own J at the mean failed too: J at every cluster's anchor (below), ranked beside it.
      rank_pieces(v, /*fresh=*/true);
    } else if (since_rank_ >= s_.relinearize_after && jacobians_here_ < s_.max_jacobians) {
      if (jacobians_here_ == 0) {
        linearize(v, stats_->mean);  // the reused J failed: a fresh one at the mean embedding
      } else {
        Index best = -1;  // the closest token verified so far (none when every distance so far was NaN)
        for (Index id = 0; id < v.vocab(); ++id)
          if (v.verified(id) && (best < 0 || v.distance(id) < v.distance(best))) best = id;
        if (best < 0) linearize(v, stats_->mean);
        else linearize(v, embeddings().row(best).transpose());
      }
    }
    return take(v, n);
  }

  // The place of `id` in the order next() hands tokens out from the current rankings (both interleaved, each token
  // once), counted from their start.
  Index rank_of(Index id) const override {
    if (orders_[0].empty()) return -1;
    if (rankings() == 1) {
      for (std::size_t i = 0; i < orders_[0].size(); ++i)
        if (orders_[0][i] == id) return static_cast<Index>(i);
      return -1;
    }
    const std::uint32_t stamp = ++stamp_;
    std::size_t at[2] = {0, 0};
    for (Index r = 0;;) {
      bool progress = false;
      for (int s = 0; s < 2; ++s) {
        LazyOrder& o = orders_[s];
        while (at[s] < o.size() && seen_[o[at[s]]] == stamp) ++at[s];
        if (at[s] == o.size()) continue;
        const Index t = o[at[s]++];
        if (t == id) return r;
        seen_[t] = stamp;
        ++r;
        progress = true;
      }
      if (!progress) return -1;
    }
  }

  std::map<std::string, double> totals() const override {
    return {{"jacobians", static_cast<double>(jacobians_)},
            {"anchor_jacobians", static_cast<double>(anchor_jacobians_)},
            {"jacobians_cached", static_cast<double>(cached_jacobians_)},
            {"gradients", static_cast<double>(gradients_)},
            {"fd_step", h_}};
  }

 private:
  Embeddings embeddings() const { return Embeddings(wte_, V_, d_); }

  void prepare(Verifier& v) {
    V_ = v.vocab();
    d_ = v.spec().n_embd;
    wte_ = v.wte_f32();
    stats_ = cache_ ? cache_->stats(v.problem().weights, wte_, V_, d_)
                    : std::make_shared<const EmbeddingStats>(embedding_stats(wte_, V_, d_));
    // Step h: fd_step times the spread of the embeddings about their mean.
    h_ = s_.fd_step * (stats_->spread > 0 ? stats_->spread : 1.0);
    seen_.assign(static_cast<std::size_t>(V_), 0);
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

  // The generic linearizations: at position first + k, the J taken there after the mean embedding in place of each
  // of the k tokens before it (the known prefix stays), the same for every prompt and kept in the session's cache.
  // Kept for k = 1, 2, 3, 4, 6, 8, 12, 16, 24, ..., each serving from its position to the next one's: k = 1 from
  // the first prompt on, the others from the session's second prompt on, one more per prompt (a prompt alone does
  // better with the previous position's J and its gradient fallback than with a J per bucket). The first
  // position's own J, with nothing before it to attend to, ranks poorly from the second position on; generic ones
  // ranked the prompt's token first at 143 of 144 positions of 8 prompts on GPT-2 small's block 12 (measured).
  static Index generic_offset(Index k) {  // the largest of 1, 2, 3, 4, 6, 8, 12, ... not above k >= 1
    Index b = 1;
    for (Index p = 2; p <= k; p *= 2) {
      b = p;
      if (p + p / 2 <= k) b = p + p / 2;
    }
    return b;
  }

  void generic(Verifier& v) {
    const Index k = generic_offset(v.position() - first_);
    if (k <= lin_from_) return;  // the current J was taken at or after k (a fresh one of this prompt's)
    const std::string key = key_ + " generic " + std::to_string(k);
    std::shared_ptr<const Linearization> lin = cache_->find(key);
    if (lin) {
      ++cached_jacobians_;
    } else {
      // k = 1 at once; the others from the second prompt on, one more per prompt (the earliest position first),
      // so that no prompt pays for many and a short session does not pay for positions it hardly needs.
      if (k > 1 && (runs_before_ == 0 || generic_taken_)) return;
      generic_taken_ = k > 1;
      std::vector<Index> before(v.prefix().begin(), v.prefix().begin() + first_);
      const Tensor known = v.rows(before);
      Tensor context(v.spec().dtype, {first_ + k, d_});
      for (Index i = 0; i < first_ * d_; ++i) context.set(i, known.get(i));
      for (Index r = first_; r < first_ + k; ++r)
        for (Index j = 0; j < d_; ++j) context.set(r * d_ + j, stats_->mean[j]);
      lin = differences(v, stats_->mean, &context);
      ++jacobians_;
      cache_->keep(key, lin);
    }
    lin_ = std::move(lin);
    lin_from_ = k;
  }

  // J and F at e by forward differences: rows e, e + h u_0, ..., e + h u_{d-1}, after the prefix (or `context`).
  RowMatrixF jacobian(Verifier& v, const VectorF& e, VectorF& f_e, const Tensor* context = nullptr) {
    const Index d = e.size(), D = v.out_width();
    Tensor rows(v.spec().dtype, {d + 1, d});
    for (Index r = 0; r <= d; ++r)
      for (Index j = 0; j < d; ++j) rows.set(r * d + j, e[j] + (r == j + 1 ? h_ : 0.0));
    const Tensor out =
        context ? v.outputs_after(*context, rows, s_.jacobian_batch) : v.outputs(rows, s_.jacobian_batch);
    f_e = row_of(out, 0, D);
    // Differences in double from the backend's values (rows e + h u_i carry the step's rounding in the model's dtype:
    // the actual step is (e + h) - e as stored).
    std::vector<double> step(static_cast<std::size_t>(d));
    for (Index i = 0; i < d; ++i) step[i] = rows.get((i + 1) * d + i) - rows.get(i);
    RowMatrixF J(D, d);
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < D; ++j) J(j, i) = static_cast<float>((out.get((i + 1) * D + j) - out.get(j)) / step[i]);
    return J;
  }

  std::shared_ptr<const Linearization> differences(Verifier& v, const VectorF& e, const Tensor* context = nullptr) {
    auto lin = std::make_shared<Linearization>();
    lin->e = e;
    lin->J = jacobian(v, e, lin->f_e, context);
    lin->quadratic = quadratic_term(wte_, V_, lin->J, lin->e);
    lin->scale = lin->J.rows() == lin->J.cols() ? lin->J.trace() / static_cast<float>(lin->J.cols()) : 0.0f;
    return lin;
  }

  // A fresh linearization at e for this position, and the rankings from it.
  void linearize(Verifier& v, const VectorF& e) {
    lin_ = differences(v, e);
    lin_from_ = v.position() - first_;
    f_e_ = lin_->f_e;
    ++jacobians_;
    ++jacobians_here_;
    rank(v);
  }

  // 2 when the scalar ranking runs beside the J ranking.
  int rankings() const {
    return pieces_here_ || (s_.scalar_ranking && lin_ && lin_->scale > 0 && std::isfinite(lin_->scale)) ? 2 : 1;
  }

  // The rankings of every token at this position, from the current linearization and F(e), r = F(e) - y_t:
  //   J ranking       ||F(e) + J (w_v - e) - y_t||^2 = ||K (w_v - e)||^2 + 2 <w_v - e, J^T r> + ||r||^2
  //   scalar ranking  ||F(e) + c (w_v - e) - y_t||^2 = c^2 ||w_v - a||^2 with a = e - r / c, c = tr J / d
  // (terms equal for all tokens dropped): one product of the embeddings with the two vectors J^T r and a.
  //
  // With `gradient`, J^T r is that vector (J_t^T r of this position's own J, where lin_ holds an earlier one).
  void rank(Verifier& v, const VectorF* gradient = nullptr) {
    const Index V = V_, d = d_;
    const Linearization& lin = *lin_;
    const VectorF r = residual(v);
    const bool scalar = rankings() == 2 && !pieces_here_;
    const VectorF g = gradient ? *gradient : VectorF(lin.J.transpose() * r);
    const VectorF a = scalar ? VectorF(lin.e - r / lin.scale) : VectorF::Zero(d);
    const float eg = lin.e.dot(g);
    // Both products in one pass over the embeddings (memory-bound; see EmbeddingStats::half).
    std::vector<float> score(static_cast<std::size_t>(V)), score2(scalar ? static_cast<std::size_t>(V) : 0);
#ifdef LMINV_RANK_F16
    const std::uint16_t* half = stats_->half.data();
    for (Index id = 0; id < V; ++id) {
      float wg, wa;
      dots_half(half + id * d, g.data(), scalar ? a.data() : nullptr, d, wg, wa);
      score[id] = lin.quadratic[id] + 2.0f * (wg - eg);
      if (scalar) score2[id] = stats_->sq_norm[id] - 2.0f * wa;
    }
#else
    const Embeddings W = embeddings();
    for (Index id = 0; id < V; ++id) {
      score[id] = lin.quadratic[id] + 2.0f * (W.row(id).dot(g.transpose()) - eg);
      if (scalar) score2[id] = stats_->sq_norm[id] - 2.0f * W.row(id).dot(a.transpose());
    }
#endif
    orders_[0].assign(score);
    next_[0] = 0;
    if (!pieces_here_) {  // the piecewise ranking, once made at this position, stays beside each new J ranking
      if (scalar) orders_[1].assign(score2);
      else orders_[1].clear();
      next_[1] = 0;
    }
    since_rank_ = 0;
  }

  // The piecewise linearization at this position: the tokens in `anchors` clusters (cluster_embeddings), each
  // cluster's tokens scored by the first-order model at its own centroid a_k,
  //   ||F(a_k) + J_k (w_v - a_k) - y_t||^2 = ||J_k (w_v - a_k)||^2 + 2 <w_v - a_k, J_k^T r_k> + ||r_k||^2,
  // r_k = F(a_k) - y_t, all in one order, interleaved with the J ranking. One J at the mean models the tokens near
  // the mean well; on trained weights the tokens far from it (the ones training moved: the frequent ones, which real
  // text is made of) are mapped far less than it predicts (layer norms and trained blocks contract them), so a
  // single J ranks exactly them last. K more Jacobians (K (d + 1) rows) fix that: see docs/exact-inversion.md.
  // `fresh`: new J_k at this position; else the latest ones, with only F(a_k) recomputed (K rows).
  void rank_pieces(Verifier& v, bool fresh) {
    if (!stats_->clusters || stats_->clusters_k != s_.anchors) {
      stats_->clusters = std::make_shared<const Clusters>(cluster_embeddings(wte_, V_, d_, s_.anchors, stats_->mean));
      stats_->clusters_k = s_.anchors;
    }
    const Clusters& c = *stats_->clusters;
    const Index K = static_cast<Index>(c.anchors.size()), D = v.out_width(), d = d_;
    if (fresh || static_cast<Index>(pieces_.size()) != K) {
      pieces_.assign(static_cast<std::size_t>(K), Piece{});
      for (Index k = 0; k < K; ++k) {
        const Index from = c.offsets[k], n = c.offsets[k + 1] - from;
        if (n == 0) continue;
        Piece& p = pieces_[k];
        p.J = jacobian(v, c.anchors[k], p.f_a);
        p.quadratic = quadratic_term(c.rows.data() + from * d, n, p.J, c.anchors[k]);
        ++anchor_jacobians_;
      }
      pieces_fresh_ = true;
    } else {  // the earlier Jacobians; F(a_k) at this position, one call for all
      Tensor rows(v.spec().dtype, {K, d});
      for (Index k = 0; k < K; ++k)
        for (Index j = 0; j < d; ++j) rows.set(k * d + j, c.anchors[k][j]);
      const Tensor out = v.outputs(rows, s_.jacobian_batch);
      for (Index k = 0; k < K; ++k) pieces_[k].f_a = row_of(out, k, D);
    }
    const std::vector<double>& y = v.target_row();
    std::vector<float> score(static_cast<std::size_t>(V_));
    for (Index k = 0; k < K; ++k) {
      const Index from = c.offsets[k], n = c.offsets[k + 1] - from;
      if (n == 0) continue;
      const Piece& p = pieces_[k];
      VectorF r(D);
      for (Index j = 0; j < D; ++j) r[j] = static_cast<float>(p.f_a[j] - y[j]);
      const VectorF g = p.J.transpose() * r;
      const float constant = r.squaredNorm() - 2.0f * c.anchors[k].dot(g);
      const RowMatrixF wg = times_transposed(c.rows.data() + from * d, n, RowMatrixF(g.transpose()));  // (n, 1)
      for (Index i = 0; i < n; ++i) score[c.members[from + i]] = p.quadratic[i] + 2.0f * wg(i, 0) + constant;
    }
    orders_[1].assign(score);
    next_[1] = 0;
    pieces_here_ = true;
    since_rank_ = 0;
  }

  // r = F(e) - y_t.
  VectorF residual(const Verifier& v) const {
    const Index D = v.out_width();
    VectorF r(D);
    const std::vector<double>& y = v.target_row();
    for (Index j = 0; j < D; ++j) r[j] = static_cast<float>(f_e_[j] - y[j]);
    return r;
  }

  // J_t^T r at e, this position's own, from one backward pass over positions 0 .. t (the prefix's rows, then e; a
  // causal model needs nothing after t) with r as the output gradient at t: the gradient of ||F_t(x) - y_t||^2 / 2
  // at x = e. A few forward passes' worth of work where a fresh J takes d + 1 rows.
  VectorF gradient_at(Verifier& v) {
    const Index t = v.position(), d = d_, D = v.out_width();
    const VectorF& e = lin_->e;
    Tensor input(v.spec().dtype, {1, t + 1, d});
    const Tensor prefix = v.rows(v.prefix());
    if (prefix.nbytes()) std::memcpy(input.raw(), prefix.raw(), prefix.nbytes());  // at t = 0 it has no storage
    for (Index j = 0; j < d; ++j) input.set(t * d + j, e[j]);
    const VectorF r = residual(v);
    Tensor grad_output(v.model().spec().dtype, {1, t + 1, D});
    for (Index j = 0; j < D; ++j) grad_output.set(t * D + j, r[j]);
    const Tensor g = v.model().backward(input, grad_output);
    VectorF out(d);
    for (Index j = 0; j < d; ++j) out[j] = static_cast<float>(g.get(t * d + j));
    ++gradients_;
    return out;
  }

  // Up to n tokens not verified yet, alternately from the J ranking and the scalar ranking (each token once).
  std::vector<Index> take(const Verifier& v, Index n) {
    std::vector<Index> ids;
    const int count = rankings();
    const std::uint32_t stamp = ++stamp_;
    for (bool progress = true; progress && static_cast<Index>(ids.size()) < n;) {
      progress = false;
      for (int s = 0; s < count && static_cast<Index>(ids.size()) < n; ++s) {
        LazyOrder& o = orders_[s];
        std::size_t& at = next_[s];
        while (at < o.size() && (v.verified(o[at]) || seen_[o[at]] == stamp)) ++at;
        if (at == o.size()) continue;
        const Index id = o[at++];
        seen_[id] = stamp;
        ids.push_back(id);
        ++since_rank_;
        progress = true;
      }
    }
    return ids;
  }

  LinearizedSettings s_;
  std::shared_ptr<LinearizationCache> cache_;  // null without session_cache
  const float* wte_ = nullptr;                 // the Verifier's (V, d) floats, for this run
  Index V_ = 0, d_ = 0;
  std::shared_ptr<const EmbeddingStats> stats_;  // the cache's, or this run's own
  double h_ = 0;                               // finite-difference step
  Index first_ = 0;                            // the first searched position (after the known prefix)
  std::string key_;                            // its cache key
  Index runs_before_ = 0;                      // the session's runs from the same first position before this one
  Index lin_from_ = 0;                         // lin_ was taken at position first_ + lin_from_ (generic or not)
  bool generic_taken_ = false;                 // this run has computed a generic J past the second position
  std::shared_ptr<const Linearization> lin_;   // the current J, e, quadratic term (shared with the cache)
  VectorF f_e_;                                // F(e) at this position
  mutable LazyOrder orders_[2];                // the J ranking, the scalar ranking (empty when off)
  std::size_t next_[2] = {0, 0};               // first entry of each not handed out yet
  mutable std::vector<std::uint32_t> seen_;    // per token: the stamp of the last take (or rank_of) that met it
  mutable std::uint32_t stamp_ = 0;
  Index since_rank_ = 0, jacobians_here_ = 0, jacobians_ = 0, cached_jacobians_ = 0, gradients_ = 0;
  bool gradient_here_ = false;  // this position's ranking has had its exact gradient
  bool pieces_here_ = false;    // orders_[1] holds the piecewise ranking at this position
  bool pieces_fresh_ = false;   // ... from Jacobians taken at this position
  struct Piece {
    RowMatrixF J;                // (D, d) at the group's centroid
    VectorF f_a;                 // F(a_k) at the current position
    std::vector<float> quadratic;  // ||J (w_v - a_k)||^2 for the group's tokens, in Clusters::members order
  };
  std::vector<Piece> pieces_;    // the groups' latest Jacobians (empty before the first piecewise ranking)
  Index anchor_jacobians_ = 0;
};

// ---- gradient -----------------------------------------------------------------------------------------------------

class Gradient final : public CandidateSource {
 public:
  Gradient(const GradientSettings& s, std::unique_ptr<CandidateSource> fallback)
      : s_(s), fallback_(std::move(fallback)) {}

  std::vector<Index> next(Verifier& v, Index n) override {
    if (!falling_back_ && fallback_ && taken_ >= s_.fallback_after && !v.certifying() &&
        v.spec().input == InputSpace::embedding) {
      fallback_->begin(v);  // the linearized rankings from here on at this position
      falling_back_ = true;
      ++fallbacks_;
    }
    if (falling_back_) return fallback_->next(v, n);
    std::vector<Index> ids = ranking_.take(v, n);
    taken_ += static_cast<Index>(ids.size());
    return ids;
  }

  Index rank_of(Index id) const override {
    if (falling_back_) return -1;  // two orders in turn: no single place
    return ranking_.place.empty() ? -1 : ranking_.place[id];
  }

  std::map<std::string, double> totals() const override {
    std::map<std::string, double> t = fallback_ ? fallback_->totals() : std::map<std::string, double>{};
    t["fallbacks"] = static_cast<double>(fallbacks_);
    return t;
  }

  void begin(Verifier& v) override {
    falling_back_ = false;
    taken_ = 0;
    const ModelSpec& spec = v.spec();
    const Index T = v.seq_len(), t = v.position(), w = v.width(), D = v.out_width(), V = v.vocab();
    const bool embedding = spec.input == InputSpace::embedding;

    // The whole sequence: the prefix's rows, the proxy at t, zeros after it (position t never sees them).
    Tensor input(spec.dtype, {1, T, w});
    const Tensor prefix = v.rows(v.prefix());
    if (prefix.nbytes()) std::memcpy(input.raw(), prefix.raw(), prefix.nbytes());  // at t = 0 it has no storage
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

 private:
  GradientSettings s_;
  Ranking ranking_;
  std::unique_ptr<CandidateSource> fallback_;  // linearized, or null (fallback_after = 0)
  bool falling_back_ = false;                  // at this position
  Index taken_ = 0, fallbacks_ = 0;
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
  scalar_ranking = o.get_bool("scalar_ranking", scalar_ranking);
  session_cache = o.get_bool("session_cache", session_cache);
  gradient_fallback = o.get_bool("gradient_fallback", gradient_fallback);
  anchors = o.get_int("anchors", anchors);
  if (anchors < 1) o.fail("anchors", "must be at least 1 (1: no piecewise linearization)");
}

void GradientSettings::read(const Options& o) {
  proxy_steps = o.get_int("proxy_steps", proxy_steps);
  if (proxy_steps < 0) o.fail("proxy_steps", "must be >= 0");
  proxy_lr = o.get_double("proxy_lr", proxy_lr);
  if (!(proxy_lr > 0) || !std::isfinite(proxy_lr)) o.fail("proxy_lr", "must be a positive number");
  fallback_after = o.get_int("fallback_after", fallback_after);
  if (fallback_after < 0) o.fail("fallback_after", "must be >= 0 (0: never fall back to the linearized rankings)");
}

std::unique_ptr<CandidateSource> make_linearized(const LinearizedSettings& s,
                                                 std::shared_ptr<LinearizationCache> cache) {
  return std::make_unique<Linearized>(s, std::move(cache));
}
std::unique_ptr<CandidateSource> make_gradient(const GradientSettings& s, const LinearizedSettings& fallback,
                                               std::shared_ptr<LinearizationCache> cache) {
  return std::make_unique<Gradient>(
      s, s.fallback_after > 0 ? std::make_unique<Linearized>(fallback, std::move(cache)) : nullptr);
}

}  // namespace lminv::sequential
