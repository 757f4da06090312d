// Hugging Face checkpoint folders: config.json + model.safetensors, read into lminv's canonical names through the
// family's adapter and written back the way the family's save_pretrained writes them.
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include "lminv/model.hpp"
#include "lminv/weights.hpp"

namespace lminv {

struct Checkpoint {
  ModelSpec spec;     // family (config.json's model_type), kind, architecture and sizes; other fields keep defaults
  WeightSet weights;  // canonical names (sdk/include/lminv/schema.hpp), dtypes as stored (F16 widened to f32)
  std::filesystem::path folder;
};

// Loads a Hugging Face folder of any family lminv has an adapter for (host/families/: gpt2, llama, mistral, qwen2,
// gpt_neox): config.json, whose model_type picks the adapter and whose fields set the sizes and architecture, and
// model.safetensors (or model.safetensors.index.json and its shards). Tokenizer files may be there; they are not read
// here. pytorch_model.bin is not supported (the error says so when it is there instead).
//   config.json: a field that is absent takes the Hugging Face config class's default; settings lminv does not
//   compute are errors naming the field (e.g. GPT-2's activation_function other than gelu_new, a rope_scaling).
//   Tensors: the names Hugging Face saves (with or without the base model's prefix, "transformer.", "model.",
//   "gpt_neox."); buffers (causal masks, rotary inv_freq) are skipped; with a tied head a stored lm_head must equal
//   the token embedding; untied, it must be there.
// Every problem is an lminv::Error naming the file and what is wrong: a missing file; config.json not valid JSON or a
// field of the wrong type; an unknown model_type (the families are listed); config.json disagreeing with the tensors
// (the field and the tensor are named); a missing tensor, one of the wrong shape (its shape and the expected one),
// unknown extra tensors (named). The headers are checked before any data is copied; each tensor is then read once and
// converted to its canonical layout.
Checkpoint load_checkpoint(const std::filesystem::path& folder);

// Whether FOLDER looks like a model folder (config.json there).
bool is_model_folder(const std::filesystem::path& folder);

// Writes FOLDER/model.safetensors and FOLDER/config.json (creating FOLDER), each through a temporary file renamed into
// place, as the family's save_pretrained writes them: Hugging Face's names and layouts, metadata {"format": "pt"}
// (transformers refuses a file without it), no lm_head when it is tied (transformers drops tied duplicates when it
// saves safetensors and re-ties them when it loads), and the family's config.json (torch_dtype from wte.weight).
// The weights must be exactly weight_schema(spec) (an Error names the missing, extra or misshaped tensor before
// anything is written); spec.family must have checkpoints.
void save_checkpoint(const std::filesystem::path& folder, const ModelSpec& spec, const WeightSet& weights);

}  // namespace lminv
