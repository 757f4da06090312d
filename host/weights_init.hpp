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
//   gpt2                  Hugging Face's GPT-2 names without the "transformer." prefix, Conv1D weights [in, out]:
//                          wpe.weight [n_positions, d]                                ~ N(0, 0.02^2)
//                          for every block i < n_layer (always all of them, whatever spec.blocks is):
//                            h.i.ln_1.weight [d] = 1, h.i.ln_1.bias [d] = 0, and the same for h.i.ln_2
//                            h.i.attn.c_attn.weight [d, 3d] ~ N(0, 0.02^2),  h.i.attn.c_attn.bias [3d] = 0
//                            h.i.attn.c_proj.weight [d, d]  ~ N(0, s^2),     h.i.attn.c_proj.bias [d] = 0
//                            h.i.mlp.c_fc.weight [d, inner] ~ N(0, 0.02^2),  h.i.mlp.c_fc.bias [inner] = 0
//                            h.i.mlp.c_proj.weight [inner, d] ~ N(0, s^2),   h.i.mlp.c_proj.bias [d] = 0
//                          ln_f.weight [d] = 1, ln_f.bias [d] = 0;  s = 0.02 / sqrt(2 n_layer)
//                        as GPT2PreTrainedModel._init_weights; lm_head is tied to wte (no tensor of its own).
//                        Constant tensors draw nothing; the random ones use the streams below like every family.
// The MLP families' linear layers are "<name>.weight" [out, in] and "<name>.bias" [out], uniform in
// [-1/sqrt(in), 1/sqrt(in)) like torch's nn.Linear default. Any other family is an Error naming it.
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
