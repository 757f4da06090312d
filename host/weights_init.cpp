#include "weights_init.hpp"

#include "families/family.hpp"
#include "lminv/schema.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "lminv/error.hpp"

namespace lminv {

namespace {

enum class Distribution { normal, uniform };

// Rounds a generated double to the tensor's dtype (bf16 through float, like Tensor::set).
inline void store(double& out, double value) {
  out = value;
}
inline void store(float& out, double value) {
  out = static_cast<float>(value);
}
inline void store(bf16& out, double value) {
  out = bf16::from_float(static_cast<float>(value));
}

// The standard normals rng.normal() would give, n of them from a fresh generator, computed a batch of pairs at a time:
// the same draws in the same order (u, then v, a pair rejected when s = u^2 + v^2 is not in (0, 1)), and for each
// accepted pair the same operations as Rng::normal and detail::portable_log, in the same order, so the same bits.
// Only the order of independent work changes: each step runs over the whole batch, in loops the compiler vectorises,
// where one sample's logarithm is a chain of dependent operations (most of the time of GPT-2 small's 124M values).
// Divisions, additions, multiplications and square roots are exactly rounded whether done in a vector lane or alone;
// nothing is fused into an FMA here. frexp is done on the bits: s >= 2^-104 (u and v are multiples of 2^-52) is a
// normal number. weights_test checks the values against Rng::normal's.
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void standard_normals(double* out, std::int64_t n, Rng& rng) {
  LMINV_NO_FP_CONTRACT
  constexpr int kPairs = 256;
  alignas(64) double u[kPairs + 1], v[kPairs + 1], s[kPairs + 1], m[kPairs], e[kPairs], x[kPairs], x2[kPairs],
      term[kPairs], sum[kPairs], f[kPairs];
  alignas(64) std::uint64_t bits[kPairs], exponent_bits[kPairs];
  std::int64_t i = 0;
  while (i < n) {
    const int pairs = static_cast<int>(std::min<std::int64_t>(kPairs, (n - i + 1) / 2));
    for (int p = 0; p < pairs;) {  // a rejected pair is overwritten by the next one
      const double a = 2.0 * rng.uniform() - 1.0;
      const double b = 2.0 * rng.uniform() - 1.0;
      const double r = a * a + b * b;
      u[p] = a;
      v[p] = b;
      s[p] = r;
      p += (r < 1.0) & (r != 0.0);
    }
    // portable_log(s): s = m 2^e with m in [0.5, 1) (frexp, on the bits), then m in [sqrt(1/2), sqrt(2)).
    std::memcpy(bits, s, sizeof(double) * static_cast<std::size_t>(pairs));
    for (int p = 0; p < pairs; ++p) {
      exponent_bits[p] = std::uint64_t{0x4330000000000000} | ((bits[p] >> 52) & 0x7ff);  // 2^52 + biased exponent
      bits[p] = (bits[p] & ~(std::uint64_t{0x7ff} << 52)) | (std::uint64_t{0x3fe} << 52);
    }
    std::memcpy(m, bits, sizeof(double) * static_cast<std::size_t>(pairs));
    std::memcpy(e, exponent_bits, sizeof(double) * static_cast<std::size_t>(pairs));
    for (int p = 0; p < pairs; ++p) {
      const double exponent = (e[p] - 4503599627370496.0) - 1022.0;  // exact: small integers
      const bool low = m[p] < 0.70710678118654752440;
      const double mm = low ? m[p] * 2.0 : m[p];
      e[p] = low ? exponent - 1.0 : exponent;
      x[p] = (mm - 1.0) / (mm + 1.0);
      x2[p] = x[p] * x[p];
      term[p] = x[p];
      sum[p] = 0.0;
    }
    for (int k = 1; k < 40; k += 2) {
      const double kd = k;
      for (int p = 0; p < pairs; ++p) {
        sum[p] += term[p] / kd;
        term[p] *= x2[p];
      }
    }
    for (int p = 0; p < pairs; ++p) {
      const double log_s = 2.0 * sum[p] + e[p] * 0.69314718055994530942;
      f[p] = -2.0 * log_s / s[p];
    }
    for (int p = 0; p < pairs; ++p) {
      const double root = std::sqrt(f[p]);
      out[i++] = u[p] * root;
      if (i < n) out[i++] = v[p] * root;
    }
  }
}

// One chunk of a tensor: out[i] = value_i rounded to T, value_i drawn in double from `rng`.
//
// Bit-identity across platforms: the generator uses only exactly rounded operations, and contraction of a multiply and
// an add into an FMA is switched off here and in standard_normals (the values of Rng::normal, computed in batches).
// The uniform value is (2u - 1) * bound:
// 2u - 1 is exact for u = k 2^-53, so the value is rounded once, fused or not. noinline keeps the OpenMP-outlined loop
// body, compiled with the default flags, from absorbing this function.
template <class T>
LMINV_NO_FP_CONTRACT_ATTR __attribute__((noinline)) void fill_chunk(T* out, std::int64_t n, Rng rng,
                                                                    Distribution distribution, double scale) {
  LMINV_NO_FP_CONTRACT
  if (distribution == Distribution::normal) {  // scale * rng.normal(), n times
    constexpr std::int64_t kBlock = 4096;
    double normals[kBlock];
    for (std::int64_t begin = 0; begin < n; begin += kBlock) {
      const std::int64_t count = std::min(kBlock, n - begin);
      standard_normals(normals, count, rng);  // kBlock is even: only the last block may leave a spare unused
      for (std::int64_t i = 0; i < count; ++i) store(out[begin + i], scale * normals[i]);
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) store(out[i], (2.0 * rng.uniform() - 1.0) * scale);
  }
}

int thread_count(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

Tensor random_tensor(const Rng& root, const std::string& name, DType dtype, const Shape& shape,
                     Distribution distribution, double scale, int threads) {
  Tensor tensor(dtype, shape);
  const std::int64_t numel = tensor.numel();
  const std::int64_t chunks = (numel + kInitChunkSize - 1) / kInitChunkSize;
  const Rng stream = root.fork(name);
  // Chunks are independent streams, so the result is the same whichever thread fills which chunk.
#pragma omp parallel for schedule(dynamic, 4) num_threads(thread_count(threads)) if (chunks > 1)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const Rng rng = stream.fork("chunk " + std::to_string(c));
    const std::int64_t begin = c * kInitChunkSize;
    const std::int64_t n = std::min(kInitChunkSize, numel - begin);
    switch (dtype) {
      case DType::f64: fill_chunk(tensor.data<double>() + begin, n, rng, distribution, scale); break;
      case DType::f32: fill_chunk(tensor.data<float>() + begin, n, rng, distribution, scale); break;
      case DType::bf16: fill_chunk(tensor.data<bf16>() + begin, n, rng, distribution, scale); break;
    }
  }
  return tensor;
}

// torch.nn.Linear(in, out)'s default initialisation: weight [out, in] and bias [out], both uniform in
// +-1/sqrt(in) (kaiming_uniform with a = sqrt(5) reduces to that bound for the weight).
void add_linear(WeightSet& weights, const Rng& root, const std::string& name, std::int64_t in, std::int64_t out,
                DType dtype, int threads) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weights.set(name + ".weight", random_uniform(root, name + ".weight", dtype, {out, in}, bound, threads));
  weights.set(name + ".bias", random_uniform(root, name + ".bias", dtype, {out}, bound, threads));
}

// Every element `value` (LayerNorm weights and biases, the other biases: no random stream).
Tensor constant(DType dtype, const Shape& shape, double value) {
  Tensor tensor(dtype, shape);
  if (value != 0.0)
    for (std::int64_t i = 0; i < tensor.numel(); ++i) tensor.set(i, value);
  return tensor;
}

void require_positive(const ModelSpec& spec, const char* what, std::int64_t value) {
  if (value <= 0)
    throw Error("random weights for family '" + spec.family + "': " + what + " must be positive, got " +
                std::to_string(value));
}

// A decoder's weights as its family's Hugging Face _init_weights makes them: every 2-D weight normal with the
// family's standard deviation (FamilyAdapter::init_std: 0.02, GPT-2's residual projections 0.02 / sqrt(2 n_layer)),
// norm weights 1, biases 0. Always all n_layer blocks, so a model of the first k blocks sees the same weights whatever
// k is. Each tensor has its own stream (forked by its canonical name), so the bytes do not depend on the order.
void add_decoder(WeightSet& weights, const ModelSpec& spec, const Rng& root, int threads) {
  require_positive(spec, "n_positions", spec.n_positions);
  require_positive(spec, "the MLP width (n_inner, or 4 n_embd)", spec.inner());
  if (spec.n_layer < 0)
    throw Error("random weights for family '" + spec.family + "': n_layer must not be negative, got " +
                std::to_string(spec.n_layer));
  ModelSpec checked = spec;
  checked.blocks = 0;
  checked.layers.clear();
  checked.seq_len = 0;
  check_spec(checked, "random weights");
  const FamilyAdapter& fam = family(spec.family);
  for (const TensorSpec& t : weight_schema(spec)) {
    if (t.name == "wte.weight") continue;  // made by the caller, as for every family
    const bool bias = t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0;
    if (t.shape.size() == 2) weights.set(t.name, random_normal(root, t.name, spec.dtype, t.shape, fam.init_std(spec, t.name), threads));
    else weights.set(t.name, constant(spec.dtype, t.shape, bias ? 0.0 : 1.0));
  }
}

}  // namespace

Tensor random_normal(const Rng& root, const std::string& name, DType dtype, const Shape& shape, double std,
                     int threads) {
  return random_tensor(root, name, dtype, shape, Distribution::normal, std, threads);
}

Tensor random_uniform(const Rng& root, const std::string& name, DType dtype, const Shape& shape, double bound,
                      int threads) {
  return random_tensor(root, name, dtype, shape, Distribution::uniform, bound, threads);
}

WeightSet init_random_weights(const ModelSpec& spec, std::uint64_t seed, int threads) {
  const ModelKind kind = spec.kind;
  require_positive(spec, "n_embd", spec.n_embd);
  require_positive(spec, "vocab_size", spec.vocab_size);

  const Rng root(seed);
  const std::int64_t d = spec.n_embd;
  WeightSet weights;
  weights.set("wte.weight", random_normal(root, "wte.weight", spec.dtype, {spec.vocab_size, d}, 0.02, threads));
  if (kind == ModelKind::decoder) {
    add_decoder(weights, spec, root, threads);
  } else if (kind == ModelKind::fcnet || kind == ModelKind::fcnet_noninvertible) {
    if (spec.seq_len <= 0)
      throw Error("random weights for family '" + spec.family +
                  "': seq_len (the prompt's token count) must be positive, got " + std::to_string(spec.seq_len) +
                  "; the layer sizes depend on it");
    const std::int64_t D = spec.seq_len * d;
    add_linear(weights, root, "fc1", D, 4 * D, spec.dtype, threads);
    add_linear(weights, root, "fc2", 4 * D, kind == ModelKind::fcnet ? 4 * D : D, spec.dtype, threads);
  } else {
    require_positive(spec, "the MLP width (n_inner, or 4 n_embd)", spec.inner());
    add_linear(weights, root, "fc1", d, spec.inner(), spec.dtype, threads);
    add_linear(weights, root, "fc2", spec.inner(), d, spec.dtype, threads);
  }
  return weights;
}

}  // namespace lminv
