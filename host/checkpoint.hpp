// Hugging Face GPT-2 checkpoint folders: config.json + model.safetensors, read into lminv's canonical names and
// written back the way transformers' GPT2LMHeadModel.save_pretrained writes them.
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include "lminv/model.hpp"
#include "lminv/weights.hpp"

namespace lminv {

struct Checkpoint {
  ModelSpec spec;     // family "gpt2" and the sizes of config.json; every other field keeps ModelSpec's default
  WeightSet weights;  // canonical names (gpt2_weight_shapes), dtypes as stored (F16 widened to f32)
  std::filesystem::path folder;
};

// The canonical GPT-2 tensors and their shapes for spec's sizes (d = n_embd, V = vocab_size, P = n_positions,
// inner = spec.inner()): Hugging Face's names without the "transformer." prefix, Conv1D weights [in, out] as stored:
//   wte.weight [V, d]   wpe.weight [P, d]   ln_f.weight, ln_f.bias [d]
//   h.{i}.ln_1.weight, h.{i}.ln_1.bias [d]           h.{i}.ln_2.weight, h.{i}.ln_2.bias [d]
//   h.{i}.attn.c_attn.weight [d, 3d], .bias [3d]      h.{i}.attn.c_proj.weight [d, d], .bias [d]
//   h.{i}.mlp.c_fc.weight [d, inner], .bias [inner]   h.{i}.mlp.c_proj.weight [inner, d], .bias [d]
// for i in [0, n_layer). lm_head.weight is not among them: it is tied to wte.weight.
std::map<std::string, Shape> gpt2_weight_shapes(const ModelSpec& spec);

// Loads a Hugging Face GPT-2 folder: config.json and model.safetensors (or, as transformers writes large models,
// model.safetensors.index.json and its shards). Tokenizer files (vocab.json, merges.txt) may be there; they are not
// read here. pytorch_model.bin is not supported (the error says so when it is there instead).
//   config.json: n_layer, n_embd, n_head, n_inner (null -> 0), vocab_size, n_positions, layer_norm_epsilon; a field
//   that is absent takes GPT2Config's default (as transformers does). Settings lminv's gpt2 does not compute are
//   errors naming the field: model_type other than "gpt2", activation_function other than gelu_new (or its twin
//   gelu_pytorch_tanh), scale_attn_weights false, scale_attn_by_inverse_layer_idx true.
//   Tensors: names with or without the "transformer." prefix; the h.{i}.attn.bias / h.{i}.attn.masked_bias buffers
//   (the causal mask older checkpoints store) are ignored; lm_head.weight, when present, must equal wte.weight
//   (lminv assumes tied embeddings; with tie_word_embeddings false it must be present and equal).
// Every problem is an lminv::Error naming the file and what is wrong: a missing file; config.json not valid JSON or a
// field of the wrong type; config.json disagreeing with the tensors (n_embd vs wte's width, vocab_size vs wte's rows,
// n_positions vs wpe's rows, n_layer vs the blocks present, n_inner vs c_fc's width); a missing tensor, one of the
// wrong shape (its shape and the expected one), unknown extra tensors (named). The header is checked before any data
// is copied; each tensor's bytes are then copied once from the mapped file into its Tensor.
Checkpoint load_gpt2_checkpoint(const std::filesystem::path& folder);

// Writes FOLDER/model.safetensors and FOLDER/config.json (creating FOLDER), each through a temporary file renamed into
// place. model.safetensors holds the tensors under the names GPT2LMHeadModel.save_pretrained gives them
// ("transformer." + canonical name), with metadata {"format": "pt"} (transformers refuses a file without it), and
// without lm_head.weight: transformers drops tied duplicates when it saves safetensors and re-ties lm_head to
// transformer.wte.weight when it loads. config.json is GPT2Config's JSON: model_type "gpt2", architectures
// ["GPT2LMHeadModel"], the sizes, activation_function "gelu_new", layer_norm_epsilon, tie_word_embeddings true,
// torch_dtype from wte.weight, bos/eos_token_id vocab_size - 1 (GPT-2's <|endoftext|> is its last token), and
// GPT2Config's defaults for the rest (dropouts, summary_*). The weights must be exactly gpt2_weight_shapes(spec)
// (an Error names the missing, extra or misshaped tensor before anything is written); spec.family must be "gpt2".
void save_gpt2_checkpoint(const std::filesystem::path& folder, const ModelSpec& spec, const WeightSet& weights);

}  // namespace lminv
