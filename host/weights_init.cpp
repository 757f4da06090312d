#include "weights_init.hpp"

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

// Hugging Face's GPT2PreTrainedModel._init_weights: Conv1D weights and both embeddings N(0, 0.02^2), the two
// residual projections ("c_proj.weight") N(0, (0.02 / sqrt(2 n_layer))^2), biases 0, LayerNorm weight 1 and bias 0.
// Always all n_layer blocks, so a model of the first k blocks sees the same weights whatever k is.
void add_gpt2(WeightSet& weights, const ModelSpec& spec, const Rng& root, int threads) {
  require_positive(spec, "n_positions", spec.n_positions);
  require_positive(spec, "the MLP width (n_inner, or 4 n_embd)", spec.inner());
  if (spec.n_layer < 0)
    throw Error("random weights for family 'gpt2': n_layer must not be negative, got " + std::to_string(spec.n_layer));
  const std::int64_t d = spec.n_embd, inner = spec.inner();
  const double std = 0.02, proj_std = 0.02 / std::sqrt(2.0 * static_cast<double>(spec.n_layer));
  const DType dtype = spec.dtype;
  auto normal = [&](const std::string& name, const Shape& shape, double s) {
    weights.set(name, random_normal(root, name, dtype, shape, s, threads));
  };
  auto layer_norm = [&](const std::string& name) {
    weights.set(name + ".weight", constant(dtype, {d}, 1.0));
    weights.set(name + ".bias", constant(dtype, {d}, 0.0));
  };
  normal("wpe.weight", {spec.n_positions, d}, std);
  for (std::int64_t i = 0; i < spec.n_layer; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    layer_norm(h + "ln_1");
    normal(h + "attn.c_attn.weight", {d, 3 * d}, std);  // Conv1D: [in, out]
    weights.set(h + "attn.c_attn.bias", constant(dtype, {3 * d}, 0.0));
    normal(h + "attn.c_proj.weight", {d, d}, proj_std);
    weights.set(h + "attn.c_proj.bias", constant(dtype, {d}, 0.0));
    layer_norm(h + "ln_2");
    normal(h + "mlp.c_fc.weight", {d, inner}, std);
    weights.set(h + "mlp.c_fc.bias", constant(dtype, {inner}, 0.0));
    normal(h + "mlp.c_proj.weight", {inner, d}, proj_std);
    weights.set(h + "mlp.c_proj.bias", constant(dtype, {d}, 0.0));
  }
  layer_norm("ln_f");
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
  const bool fcnet = spec.family == "fcnet" || spec.family == "fcnet_noninvertible";
  const bool gpt2 = spec.family == "gpt2";
  if (!fcnet && !gpt2 && spec.family != "transformer_mlp")
    throw Error("random weights: no initialisation for family '" + spec.family +
                "' (supported: gpt2, fcnet, fcnet_noninvertible, transformer_mlp)");
  require_positive(spec, "n_embd", spec.n_embd);
  require_positive(spec, "vocab_size", spec.vocab_size);

  const Rng root(seed);
  const std::int64_t d = spec.n_embd;
  WeightSet weights;
  weights.set("wte.weight", random_normal(root, "wte.weight", spec.dtype, {spec.vocab_size, d}, 0.02, threads));
  if (gpt2) {
    add_gpt2(weights, spec, root, threads);
  } else if (fcnet) {
    if (spec.seq_len <= 0)
      throw Error("random weights for family '" + spec.family +
                  "': seq_len (the prompt's token count) must be positive, got " + std::to_string(spec.seq_len) +
                  "; the layer sizes depend on it");
    const std::int64_t D = spec.seq_len * d;
    add_linear(weights, root, "fc1", D, 4 * D, spec.dtype, threads);
    add_linear(weights, root, "fc2", 4 * D, spec.family == "fcnet" ? 4 * D : D, spec.dtype, threads);
  } else {
    require_positive(spec, "the MLP width (n_inner, or 4 n_embd)", spec.inner());
    add_linear(weights, root, "fc1", d, spec.inner(), spec.dtype, threads);
    add_linear(weights, root, "fc2", spec.inner(), d, spec.dtype, threads);
  }
  return weights;
}

}  // namespace lminv
