// Seeded random weights, made once on the host so that every backend sees the same bytes.
#pragma once

#include <cstdint>
#include <string>

#include "lminv/model.hpp"
#include "lminv/rng.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// Seeded random weights for `spec` (its family, sizes and seq_len), bit-identical across runs, thread counts and
// IEEE-754 platforms. Every tensor draws from its own stream Rng(seed).fork(name), so adding or resizing one tensor
// never shifts the values of another. Values are generated in double, then rounded to spec.dtype.
//   all families          wte.weight [vocab_size, n_embd] ~ N(0, 0.02^2)             (GPT-2's initialisation)
//   fcnet                 fc1 [4D, D], fc2 [4D, 4D]  with D = seq_len * n_embd
//   fcnet_noninvertible   fc1 [4D, D], fc2 [D, 4D]
//   transformer_mlp       fc1 [inner, d], fc2 [d, inner]                              (inner = spec.inner())
//   decoders (spec.kind)  every tensor of weight_schema(spec) (sdk/include/lminv/schema.hpp), all n_layer blocks
//                        whatever spec.blocks is, as the family's Hugging Face _init_weights makes them: 2-D weights
//                        ~ N(0, s^2) with s = FamilyAdapter::init_std (0.02; GPT-2's c_proj weights 0.02 / sqrt(2
//                        n_layer)), norm weights 1, biases 0. A tied head has no tensor of its own.
//                        Constant tensors draw nothing; the random ones use the streams below like every family.
// The MLP families' linear layers are "<name>.weight" [out, in] and "<name>.bias" [out], uniform in
// [-1/sqrt(in), 1/sqrt(in)) like torch's nn.Linear default. An unknown decoder family is an Error naming it.
// threads: 0 = all cores; the values do not depend on it.
WeightSet init_random_weights(const ModelSpec& spec, std::uint64_t seed, int threads = 0);

// The building blocks, for families that add their own tensors. Both split the tensor into chunks of
// kInitChunkSize elements, chunk c drawing from root.fork(name).fork("chunk <c>"), so chunks fill in parallel and
// the values depend on (root, name, shape) alone.
inline constexpr std::int64_t kInitChunkSize = std::int64_t{1} << 16;

// std * N(0, 1) in every element.
Tensor random_normal(const Rng& root, const std::string& name, DType dtype, const Shape& shape, double std,
                     int threads = 0);

// Uniform in [-bound, bound) in every element.
Tensor random_uniform(const Rng& root, const std::string& name, DType dtype, const Shape& shape, double bound,
                      int threads = 0);

}  // namespace lminv
