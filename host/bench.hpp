// `lminv bench`: the time of one inversion step per backend, dtype, model and batch size, against this
// machine's limits measured in the same run.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "registry.hpp"

namespace lminv {

struct BenchRequest {
  std::vector<std::string> backends = {"reference", "torch", "onednn"};  // those not installed are skipped
  std::vector<std::string> dtypes = {"f32", "f64"};
  std::vector<std::int64_t> batches = {1, 8, 32};
  std::vector<std::string> models = {"1block", "12blocks", "12blocks-lmhead"};
  std::int64_t tokens = 5;
  int repeat = 3;           // timed steps per cell (after one warm-up); the best counts
  std::string out_file;     // JSON Lines, one record per cell plus one for the machine
  // The prefix cache (exact inversion's verifier): next() for B candidates after a prefix of cache_prefix tokens,
  // on the backends that have the capability; batches of 16 verify, d + 1 = 769 rows take a Jacobian. Empty: skipped.
  std::vector<std::int64_t> cache_batches = {16, 769};
  std::int64_t cache_prefix = 19;
  std::int64_t n_embd = 768, n_head = 12, n_layer = 12, vocab = 50257;  // GPT-2 small
  std::string progress = "auto";  // the progress line over the cells on stderr: auto | on | lines | off (--quiet)
};

// Measures the machine (copy bandwidth, f32 GEMM rate through oneDNN when lminv was built with it),
// then each cell, printing a table as it goes; then the prefix-cache cells.
void run_bench(const BenchRequest& request, const Registry& registry, std::ostream& out);

}  // namespace lminv
