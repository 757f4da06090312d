// lminv SDK: decoders turn a continuous model input back into tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lminv/model.hpp"
#include "lminv/options.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// The k best tokens of each of T positions, best first.
struct Decoded {
  std::int64_t positions = 0;
  std::int64_t k = 0;
  std::vector<std::int64_t> ids;  // [T, k]
  std::vector<double> scores;     // [T, k], higher is better

  std::int64_t id(std::int64_t t, std::int64_t rank = 0) const { return ids[t * k + rank]; }
  double score(std::int64_t t, std::int64_t rank = 0) const { return scores[t * k + rank]; }
  std::vector<std::int64_t> best() const {
    std::vector<std::int64_t> out;
    for (std::int64_t t = 0; t < positions; ++t) out.push_back(id(t));
    return out;
  }
};

// What a decoder is given once, before it decodes anything.
struct DecoderSetup {
  ModelSpec spec;                           // tells the input space (embedding or vocab) and sizes
  std::shared_ptr<const WeightSet> weights;  // wte.weight [V, d] among them
  std::string cache_dir;                    // where expensive, weight-keyed results may be kept
  // Tokenizes text with the run's tokenizer (for options such as an allowed vocabulary given as text).
  std::function<std::vector<std::int64_t>(const std::string&)> tokenize;
};

class Decoder {
 public:
  virtual ~Decoder() = default;

  // Reads the [decoder] section's keys (all but name). Called first, so bad options fail early.
  virtual void configure(const Options& options) = 0;

  // Loads or computes what decoding needs (a pseudo-inverse, say).
  virtual void prepare(const DecoderSetup& setup) = 0;

  // One input [T, d] (embedding space) or [T, V] (vocab space) -> the configured top-k per position.
  virtual Decoded decode(const Tensor& input) = 0;
};

}  // namespace lminv
