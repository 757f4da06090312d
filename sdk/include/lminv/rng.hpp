// lminv SDK: a seeded random generator whose streams are bit-identical on every IEEE-754 platform.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

// The normal sampler uses only +, -, *, / and sqrt, which IEEE-754 rounds exactly; fusing a multiply
// and an add would change the last bits on machines with FMA, so contraction is switched off here.
#if defined(__clang__)
#define LMINV_NO_FP_CONTRACT _Pragma("clang fp contract(off)")
#define LMINV_NO_FP_CONTRACT_ATTR
#elif defined(__GNUC__)
#define LMINV_NO_FP_CONTRACT
#define LMINV_NO_FP_CONTRACT_ATTR __attribute__((optimize("fp-contract=off")))
#else
#define LMINV_NO_FP_CONTRACT
#define LMINV_NO_FP_CONTRACT_ATTR
#endif

namespace lminv {

namespace detail {
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Natural logarithm from exact operations: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then
// log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to below 1 ulp.
LMINV_NO_FP_CONTRACT_ATTR inline double portable_log(double x) {
  LMINV_NO_FP_CONTRACT
  int e = 0;
  double m = std::frexp(x, &e);  // m in [0.5, 1), exact
  if (m < 0.70710678118654752440) {
    m *= 2.0;
    e -= 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double term = s;
  double sum = 0.0;
  for (int k = 1; k < 40; k += 2) {
    sum += term / k;
    term *= s2;
  }
  return 2.0 * sum + e * 0.69314718055994530942;
}
}  // namespace detail

// xoshiro256** seeded through splitmix64. `fork(name)` gives an independent stream per name, so
// adding a tensor or an option never shifts the numbers drawn for another.
class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) {
    std::uint64_t sm = seed;
    for (auto& word : s_) word = detail::splitmix64(sm);
  }

  Rng fork(std::string_view stream) const {
    std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the stream name
    for (unsigned char c : stream) h = (h ^ c) * 0x100000001b3ull;
    return Rng(s_[0] ^ (s_[1] * 31) ^ h);
  }

  std::uint64_t next_u64() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  // Uniform in [low, high).
  double uniform(double low, double high) { return low + (high - low) * uniform(); }

  // Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return n ? next_u64() % n : 0; }

  // Standard normal by Marsaglia's polar method.
  LMINV_NO_FP_CONTRACT_ATTR double normal() {
    LMINV_NO_FP_CONTRACT
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u = 0, v = 0, s = 0;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * detail::portable_log(s) / s);
    spare_ = v * f;
    has_spare_ = true;
    return u * f;
  }

  double normal(double mean, double std) { return mean + std * normal(); }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4] = {};
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace lminv
