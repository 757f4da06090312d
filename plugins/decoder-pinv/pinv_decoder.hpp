// The `pinv` decoder: tokens from a continuous model input as argmax / top-k of input x pinv(wte).
//
// For an input row x (a point in embedding space, [d]) the score of token v is (x pinv(W))_v, W = wte [V, d].
// With pinv(W) = (W^T W)^+ W^T this is (W G^+ x^T)_v, G = W^T W: the decoder keeps only the d x d matrix G^+
// (computed once in fp64, cached on disk by the weights' hash) and the weights it was given, so a decode costs
// V x d x T multiply-adds and no V x d matrix is ever stored.
//
// The pieces are exposed for tests and for other decoders (a `nearest` decoder reuses top_k_rows and the
// allowed-vocabulary helpers).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <Eigen/Dense>

#include "lminv/decoder.hpp"
#include "lminv/options.hpp"
#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"

namespace lminv {
namespace pinv {

// W^T W in fp64 for W = wte [V, d] (f32 or f64), the full symmetric d x d matrix. Multi-threaded with OpenMP;
// the result does not depend on the thread count (every entry is summed in one fixed order). For GPT-2's
// 50257 x 768: about 1.5 s of CPU time (one 2-core AMD EPYC build machine), 1.5 x 10^10 multiply-adds.
Eigen::MatrixXd gram(const Tensor& w);

// What the rank-revealing cutoff decided, and where the time went.
struct GramPinvInfo {
  std::int64_t rank = 0;      // eigenvalues kept
  double lambda_max = 0;      // largest eigenvalue of G
  double cutoff = 0;          // eigenvalues <= cutoff were treated as zero
  double gram_seconds = 0;    // W^T W (0 when read from the cache)
  double eigen_seconds = 0;   // eigendecomposition and G^+ (0 when read from the cache)
  bool from_cache = false;
  std::string cache_path;     // the cache file used or written ("" without caching)
};

// G^+ of a symmetric positive semi-definite G = W^T W, W with `rows` rows, by eigendecomposition
// G = Q diag(lambda) Q^T: G^+ = Q diag(1 / lambda_i if lambda_i > cutoff else 0) Q^T with
//   cutoff = lambda_max * max(rows, d) * machine epsilon.
// Why this cutoff: forming G squares W's singular values (lambda = sigma^2), and the computed G carries
// rounding errors of about lambda_max * n * eps, so an eigenvalue below that is indistinguishable from zero.
// This is the usual pinv tolerance applied to the eigenvalues of G; it keeps singular values of W above
// sigma_max * sqrt(max(V, d) * eps) (about 3e-6 sigma_max for GPT-2's wte) and drops exact or numerical
// rank deficiency (duplicate or dependent columns of W). Reads only the lower triangle of `gram`.
Eigen::MatrixXd gram_pseudo_inverse(const Eigen::MatrixXd& gram, std::int64_t rows, GramPinvInfo* info = nullptr);

// out[t, v] = (W y_t)_v for the columns y_t of y [d, T]: the scores of T positions, written [T, V] row-major.
// W f32 is widened to fp64 block by block, so the products are fp64 without a V x d fp64 copy of W.
void project_rows(const Tensor& w, const Eigen::MatrixXd& y, double* out);

// The minimum-norm vocabulary vectors that W maps to the columns e_t of et [d, T]: out[t, :] = W G^+ e_t, [T, V]
// row-major (a_t = W^+ e_t in the seed study's notation, with W^+ = (W^T W)^+ W^T the pseudo-inverse of wte^T).
// Computes G = W^T W and G^+ (gram, gram_pseudo_inverse): seconds for GPT-2's wte.
void pinv_vocab_rows(const Tensor& w, const Eigen::MatrixXd& et, double* out);

// Top-k of each row of scores [rows, cols] (row-major), best first, restricted to the columns whose
// `allowed` entry is non-zero when `allowed` is non-empty (its size is then cols). Ties go to the lower id;
// NaN ranks below every number. Throws if fewer than k columns are allowed.
Decoded top_k_rows(const double* scores, std::int64_t rows, std::int64_t cols, std::int64_t k,
                   const std::vector<std::uint8_t>& allowed = {});

// The seed study's masked_decode: top-k of each row of scores * mask over all cols (disallowed scores become 0, or
// NaN where the score is not finite, as in a product). `mask` has cols entries.
Decoded masked_top_k_rows(const double* scores, std::int64_t rows, std::int64_t cols, std::int64_t k,
                          const std::vector<std::uint8_t>& mask);

// Token ids in a text file, separated by whitespace or commas. Throws Error naming the file and the bad word
// (not an integer, negative) or an empty file.
std::vector<std::int64_t> read_ids_file(const std::string& path);

// A mask of V entries, 1 at each id; `what` names where the ids came from in the error thrown for an id
// outside [0, V).
std::vector<std::uint8_t> allowed_mask(const std::vector<std::int64_t>& ids, std::int64_t vocab,
                                       const std::string& what);

// "pinv-<16 hex digits of content_hash(w)>-<d>.bin", the cache file's name for these weights.
std::string cache_file_name(const Tensor& w);

// The cache file: a 72-byte header (magic "LMINVPIV", format version, header size, d, V, content_hash(w), a
// checksum of the payload, and the rank, lambda_max and cutoff of GramPinvInfo), then G^+ as d * d doubles,
// all in native byte order.
//
// Reads a cached G^+ for w, and the header's rank, lambda_max and cutoff into `info` when given; nullopt when
// the file is missing. A file that cannot be read or whose contents disagree with w (magic, version, d, V, hash,
// size, payload checksum) is ignored with a warning on stderr, and nullopt is returned: the caller recomputes.
std::optional<Eigen::MatrixXd> read_cache(const std::string& path, const Tensor& w, GramPinvInfo* info = nullptr);

// Writes G^+ to a temporary file in the same folder and renames it into place, so that no reader ever sees
// a half-written cache. Creates the folder if needed. Failing to write is a warning, not an error: the cache
// only saves time.
void write_cache(const std::string& path, const Tensor& w, const Eigen::MatrixXd& gram_pinv,
                 const GramPinvInfo& info);

}  // namespace pinv

// The decoder. Options ([decoder] section):
//   top_k = 1          positions report their k best tokens (>= 1, <= V and <= the allowed count)
//   allowed = TEXT     only the tokens of TEXT (tokenized with the run's tokenizer) may be chosen
//   allowed_ids = PATH only the ids in the file (whitespace or comma separated) may be chosen;
//                      with `allowed` too, the union of both is allowed. A relative path is taken from the
//                      working directory.
//   restrict = allowed how `allowed` / `allowed_ids` apply: `allowed` ranks the allowed tokens only; `mask` is the
//                      seed study's masked_decode: every score is multiplied by a 0/1 mask (1 for the allowed
//                      tokens) and the ranking is over the whole vocabulary, so a disallowed token (score 0) wins
//                      wherever the allowed tokens all score below 0 (ties to the lower id, as torch.argmax)
//   cache = true       keep G^+ in DecoderSetup::cache_dir (no caching when that is empty)
class PseudoInverseDecoder : public Decoder {
 public:
  void configure(const Options& options) override;
  void prepare(const DecoderSetup& setup) override;
  // input [T, d] (embedding) or [T, V] (vocab); a leading batch dimension of 1 is accepted too.
  Decoded decode(const Tensor& input) override;

  // Scores [T, V] of an embedding-space input [T, d]: row t is x_t pinv(wte). Needs prepare() with
  // spec.input = embedding.
  std::vector<double> pinv_scores(const Tensor& input) const;

  const Eigen::MatrixXd& gram_pinv() const { return gram_pinv_; }
  const pinv::GramPinvInfo& info() const { return info_; }
  std::int64_t vocab_size() const { return vocab_; }
  std::int64_t top_k() const { return top_k_; }
  const std::vector<std::uint8_t>& allowed() const { return allowed_; }

 private:
  // The input as [T, cols] (a leading batch dimension of 1 dropped), or an Error naming the expected shape.
  Tensor as_matrix(const Tensor& input, std::int64_t cols, const char* what) const;

  // configure()
  Options options_;  // kept so that errors found at prepare() name the key as Options::fail does
  std::int64_t top_k_ = 1;
  bool mask_ = false;  // restrict = mask
  bool has_allowed_text_ = false;
  std::string allowed_text_;
  std::string allowed_ids_path_;
  std::vector<std::int64_t> allowed_file_ids_;
  bool cache_ = true;

  // prepare()
  bool prepared_ = false;
  InputSpace space_ = InputSpace::embedding;
  std::int64_t vocab_ = 0, dim_ = 0;
  std::shared_ptr<const WeightSet> weights_;  // keeps `wte_` alive
  const Tensor* wte_ = nullptr;               // [V, d], f32 or f64
  Tensor wte_widened_;                        // bf16 weights widened to f32 (empty otherwise)
  Eigen::MatrixXd gram_pinv_;                 // G^+ [d, d]
  pinv::GramPinvInfo info_;
  std::vector<std::uint8_t> allowed_;  // [V] mask, empty = everything allowed
};

}  // namespace lminv
