// The certificate of a token search (optimizers sequential and brute_force): per position, how the accepted token
// was verified against the target and whether any rival came as close, with a verdict a user can act on.
//
// Verdicts, per position:
//   known      a token of the known prefix (BOS, [prompt] prefix): checked against its row, not searched;
//   unique     the accepted token is within epsilon and no other verified token lies within the tolerance
//              (max(epsilon, unique_ratio x its distance)): the margin is wide;
//   ambiguous  other verified tokens lie within the tolerance: they are listed (ties), and the search went on with
//              the closest;
//   not found  no token came within epsilon_max: the closest was taken, unverified.
// The prompt's verdict: not found if any position is, else ambiguous if any is, else unique.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "lminv/optimizer.hpp"
#include "tokenizer.hpp"

namespace lminv {

enum class Verdict { known, unique, ambiguous, not_found };
const char* verdict_name(Verdict v);  // "known", "unique", "ambiguous", "not found"

struct PositionCertificate {
  std::int64_t position = 0;
  std::int64_t id = -1;           // the accepted token
  double distance = 0;            // its relative L2 distance to the target row
  double epsilon = 0;             // the threshold it was held to (NaN for known tokens)
  double best_rejected = 0;       // the closest other verified token's distance (NaN when none was verified)
  double margin_ratio = 0;        // best_rejected / distance (inf when distance is 0; NaN when no rival)
  double tolerance = 0;           // rivals within it are ties
  std::int64_t candidates = 0;    // tokens verified at this position
  std::int64_t tie_count = 0;     // rivals within the tolerance (ties lists the closest of them)
  bool relaxed = false;           // accepted under an epsilon raised above its dtype floor (other rounding)
  std::vector<Candidate> ties;
  Verdict verdict = Verdict::unique;
};

struct Certificate {
  std::vector<PositionCertificate> positions;
  Verdict verdict = Verdict::unique;
  double observed_level = 0;    // the largest accepted distance (how far this computation is from the target's)
  double epsilon_floor = 0;     // the threshold's floor (dtype, or the target's stored rounding)
  std::int64_t relaxed = 0, ambiguous = 0, not_found = 0, known = 0;
};

// The certificate of a token search's Result, or nullopt when the Result carries none (other methods).
std::optional<Certificate> certificate_of(const Result& result);

// As a record's "certificate": per position id, piece, distance, epsilon, best_rejected, margin_ratio, tolerance,
// candidates, relaxed, verdict and ties (id, piece, distance); then the prompt's verdict and counts. Infinite or
// undefined numbers are null.
nlohmann::json certificate_json(const Certificate& c, const Tokenizer& tokenizer);

// The table people read: one line per position, then the verdict.
void print_certificate(std::ostream& out, const Certificate& c, const Tokenizer& tokenizer);

}  // namespace lminv
