// The `nearest` decoder: tokens from a continuous model input as the token embeddings nearest to each position.
//
// For an input row x (a point in embedding space, [d]) the score of token v, row w_v of wte [V, d], is
//   l2:      -||x - w_v||_2 = -sqrt(|x|^2 - 2 <x, w_v> + |w_v|^2)   (clamped at 0 before the root)
//   cosine:  <x, w_v> / (|x| |w_v|)                                  (0 when either vector is zero)
// and each position reports the k best tokens, best first, ties to the lower id. The row norms are computed once in
// prepare(); a decode is one pass of V x d x T multiply-adds over wte in fp64 (the pinv decoder's projection kernel),
// without any V x d copy. Vocabulary-space inputs [T, V] are scores already: they are decoded by argmax / top-k.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lminv/decoder.hpp"
#include "lminv/options.hpp"
#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// Options ([decoder] section):
//   metric = l2        l2 | cosine
//   top_k = 1          positions report their k best tokens (>= 1, <= V and <= the allowed count; checked in
//                      prepare(), naming the key)
//   allowed = TEXT     only the tokens of TEXT (tokenized with the run's tokenizer) may be chosen
//   allowed_ids = PATH only the ids in the file (whitespace or comma separated) may be chosen; with `allowed` too,
//                      the union of both
class NearestDecoder : public Decoder {
 public:
  enum class Distance { l2, cosine };

  void configure(const Options& options) override;
  void prepare(const DecoderSetup& setup) override;
  // input [T, d] (embedding) or [T, V] (vocab); a leading batch dimension of 1 is accepted too.
  Decoded decode(const Tensor& input) override;

  // Scores [T, V] (row-major) of an embedding-space input [T, d]. Needs prepare() with spec.input = embedding.
  std::vector<double> scores(const Tensor& input) const;

  Distance distance() const { return distance_; }

 private:
  // With `squared_norms` (l2 only): the ranking keys 2 <w, x> - |w|^2 instead, and each row's |x|^2 appended.
  std::vector<double> scores(const Tensor& input, std::vector<double>* squared_norms) const;

 public:
  std::int64_t top_k() const { return top_k_; }
  const std::vector<std::uint8_t>& allowed() const { return allowed_; }
  const std::vector<double>& row_norms() const { return row_norms_; }

 private:
  Tensor as_matrix(const Tensor& input, std::int64_t cols, const char* what) const;

  // configure()
  Options options_;  // kept so that errors found at prepare() name the key as Options::fail does
  Distance distance_ = Distance::l2;
  std::int64_t top_k_ = 1;
  bool has_allowed_text_ = false;
  std::string allowed_text_;
  std::string allowed_ids_path_;
  std::vector<std::int64_t> allowed_file_ids_;

  // prepare()
  bool prepared_ = false;
  InputSpace space_ = InputSpace::embedding;
  std::int64_t vocab_ = 0, dim_ = 0;
  std::shared_ptr<const WeightSet> weights_;  // keeps `wte_` alive
  const Tensor* wte_ = nullptr;               // [V, d], f32 or f64
  Tensor wte_widened_;                        // bf16 weights widened to f32 (empty otherwise)
  std::vector<double> row_norms_;             // |w_v|, fp64
  std::vector<std::uint8_t> allowed_;         // [V] mask, empty = everything allowed
};

}  // namespace lminv
