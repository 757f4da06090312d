// lminv SDK: the optional "prefix_cache" capability of causal models, and the fallback that runs without it.
//
// In a causal model (every decoder, transformer_mlp) the output at position t depends on the inputs at positions 0 .. t only.
// A search that fixes a prefix and tries many inputs at position t needs the prefix's contribution once, not once
// per candidate: a backend keeps, per block, the prefix's attention keys and values, and runs each candidate as one
// token against them. Model::capability(kPrefixCache) returns a PrefixCache* (owned by the model, alive as long as
// it) when the backend offers it for this model, nullptr otherwise; FullForwardPrefix gives the same answers from
// Model::forward alone, at T times the cost.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "lminv/tensor.hpp"

namespace lminv {

inline constexpr const char* kPrefixCache = "prefix_cache";

class PrefixCache {
 public:
  virtual ~PrefixCache() = default;

  // Forgets the prefix: length() becomes 0.
  virtual void reset() = 0;

  // Positions kept.
  virtual std::int64_t length() const = 0;

  // Appends n positions, rows [n, d or V] in the model's input space (any dtype; converted to the model's), to the
  // prefix. length() + n must stay within the model's longest sequence: spec().n_positions for the kinds that take
  // any length (ModelSpec::any_length), spec().seq_len otherwise.
  virtual void append(const Tensor& rows) = 0;

  // The model's output at position length() for each of B candidate inputs [B, d or V]: [B, D], row b equal to
  // forward(prefix followed by candidate b)[t = length()] (D = the output's last dimension), computed as forward()
  // computes it up to rounding. The prefix is unchanged. length() must be below that longest sequence.
  virtual Tensor next(const Tensor& candidates) = 0;

  // Appends candidate b of the last next() call to the prefix from what that call computed (its keys and values):
  // the same prefix as append(that candidate's row) up to rounding, without another pass through the model. A search
  // that accepts a candidate it has just run saves one call per position. Returns false, changing nothing, when the
  // cache has nothing kept from a next() at the current length (no next() since the last append or reset, or a
  // backend without this extension: the default); the caller then appends the row. b outside the last next()'s
  // candidates is an Error.
  virtual bool append_from_last_next(std::int64_t /*b*/) { return false; }
};

// The model's prefix cache, or nullptr when its backend offers none.
inline PrefixCache* prefix_cache_of(Model& model) { return static_cast<PrefixCache*>(model.capability(kPrefixCache)); }

// A PrefixCache from Model::forward alone: each candidate runs as a whole sequence of seq_len positions (the prefix,
// the candidate, zeros after it: a causal model's output at t never sees them) and row t of the output is kept.
// Gives what a backend's cache gives, for any causal model, at seq_len times the cost; tests compare the two.
class FullForwardPrefix final : public PrefixCache {
 public:
  explicit FullForwardPrefix(Model& model) : model_(model) {
    const ModelSpec& s = model.spec();
    width_ = s.input == InputSpace::embedding ? s.n_embd : s.vocab_size;
    prefix_ = Tensor(s.dtype, {s.seq_len, width_});
  }

  void reset() override {
    length_ = 0;
    has_last_ = false;
  }
  std::int64_t length() const override { return length_; }

  void append(const Tensor& rows) override {
    has_last_ = false;
    check_rows(rows, "append");
    const std::int64_t n = rows.dim(0);
    if (length_ + n > model_.spec().seq_len)
      throw Error("prefix cache: appending " + std::to_string(n) + " positions to " + std::to_string(length_) +
                  " exceeds seq_len " + std::to_string(model_.spec().seq_len));
    for (std::int64_t i = 0; i < n * width_; ++i) prefix_.set(length_ * width_ + i, rows.get(i));
    length_ += n;
  }

  Tensor next(const Tensor& candidates) override {
    check_rows(candidates, "next");
    const ModelSpec& s = model_.spec();
    if (length_ >= s.seq_len)
      throw Error("prefix cache: the prefix already has all " + std::to_string(s.seq_len) + " positions");
    const std::int64_t B = candidates.dim(0), T = s.seq_len, t = length_;
    Tensor input(s.dtype, {B, T, width_});
    const std::size_t row_bytes = static_cast<std::size_t>(width_) * dtype_size(s.dtype);
    const Tensor cand = candidates.dtype() == s.dtype ? candidates : candidates.to(s.dtype);
    for (std::int64_t b = 0; b < B; ++b) {
      auto* item = static_cast<unsigned char*>(input.raw()) + static_cast<std::size_t>(b * T) * row_bytes;
      std::memcpy(item, prefix_.raw(), static_cast<std::size_t>(t) * row_bytes);
      std::memcpy(item + static_cast<std::size_t>(t) * row_bytes,
                  static_cast<const unsigned char*>(cand.raw()) + static_cast<std::size_t>(b) * row_bytes, row_bytes);
    }
    const Tensor output = model_.forward(input);  // [B, T, D]
    last_ = cand;  // a candidate's row is all that appending it needs here
    has_last_ = true;
    const std::int64_t D = output.dim(-1);
    Tensor rows(output.dtype(), {B, D});
    const std::size_t out_row = static_cast<std::size_t>(D) * dtype_size(output.dtype());
    for (std::int64_t b = 0; b < B; ++b)
      std::memcpy(static_cast<unsigned char*>(rows.raw()) + static_cast<std::size_t>(b) * out_row,
                  static_cast<const unsigned char*>(output.raw()) + static_cast<std::size_t>(b * T + t) * out_row,
                  out_row);
    return rows;
  }

  bool append_from_last_next(std::int64_t b) override {
    if (!has_last_) return false;
    if (b < 0 || b >= last_.dim(0))
      throw Error("prefix cache: append_from_last_next(" + std::to_string(b) + "): the last next() had " +
                  std::to_string(last_.dim(0)) + " candidates");
    const Tensor row = last_.slice0(b, b + 1);
    append(row);  // forgets it
    return true;
  }

 private:
  void check_rows(const Tensor& rows, const char* what) const {
    if (rows.rank() != 2 || rows.dim(1) != width_)
      throw Error(std::string("prefix cache: ") + what + " takes rows [n, " + std::to_string(width_) + "], got " +
                  shape_string(rows.shape()));
  }

  Model& model_;
  std::int64_t width_ = 0;
  std::int64_t length_ = 0;
  Tensor prefix_;  // [seq_len, width]
  Tensor last_;    // the last next()'s candidates in the model's dtype ...
  bool has_last_ = false;  // ... until an append or reset
};

}  // namespace lminv
