// Hidden states captured by another program (lminv invert, lminv sweep --states): read from a file and checked before
// any search starts.
//
// Files read (the format is chosen by the extension; another extension is recognised by its first bytes):
//   .safetensors  tensors with an optional __metadata__ (what `lminv forward` writes: "input", "output" and the
//                 metadata blocks, head, prompt_ids, ...). Stored F32, F16, BF16 or F64 (host/safetensors.hpp).
//   .npy          one NumPy array, float16/32/64, either byte order, C or Fortran order (host/npy.hpp). No metadata.
//   .npz          a zip of .npy members (np.savez, np.savez_compressed); names are the member names less ".npy".
//                 No metadata.
// A states tensor is [T, D] or [1, T, D]: T positions of D features each (returned as [T, D]). Other ranks, a batch
// other than 1, T = 0, D = 0 and NaN or Inf entries (the first one's position t and feature j are named) are Errors.
//
// Metadata (safetensors only) read when present, each an Error naming the file and key when malformed:
//   "blocks"      a non-negative integer: the layer the states came from (lminv's model.blocks)
//   "head"        none, ln_f, lm_head or lm_head_no_ln_f (lminv's model.head)
//   "prompt_ids"  a JSON list of non-negative integers: the prompt that made them (for reports and tests only: the
//                 inversion never reads it)
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "lminv/tensor.hpp"

namespace lminv {

struct CapturedStates {
  std::filesystem::path file;
  std::string name;          // the tensor (safetensors) or array (npz member less .npy) read; "" for a .npy file;
                             // "NAME[i]" for prompt i of a stacked [N, T, D] tensor (read_states_set)
  std::string stored_dtype;  // as stored: "F32", "F16", "BF16" or "F64" (npy's f4, f2, f8 in the same words)
  double rounding = 0;       // relative rounding of the stored dtype: 2^-8 BF16, 2^-11 F16, 2^-24 F32, 2^-53 F64
  Tensor states;             // [T, D]: f64 for F64, else f32 (F16 and BF16 widened exactly: values unchanged)
  std::map<std::string, std::string> metadata;  // safetensors __metadata__ (the whole file's); empty for npy/npz
  std::optional<std::int64_t> blocks;           // metadata "blocks" when present
  std::optional<std::string> head;              // metadata "head" when present
  std::vector<std::int64_t> prompt_ids;  // metadata "prompt_ids" (or a set's per-entry ids) when present, else empty

  std::int64_t positions() const { return states.dim(0); }  // T
  std::int64_t width() const { return states.dim(1); }      // D
  // "FILE" or "FILE: tensor 'NAME'" (array for npz), for messages.
  std::string where() const;
};

// The relative rounding of a stored dtype ("F32", "F16", "BF16", "F64"): half a unit in the last place relative to
// the value, 2^-(mantissa bits + 1). An Error for another name.
double stored_rounding(const std::string& stored_dtype);

// One states tensor. `name` empty: the only tensor (array) in the file; else "output" when the file has one (what
// `lminv forward` writes beside "input"); else an Error listing the names. A name that is not there is an Error
// listing the names. For a .npy file `name` must be empty (the file holds one unnamed array).
CapturedStates read_states(const std::filesystem::path& file, const std::string& name = "");

// A set of captured states, one entry per prompt, for `lminv sweep --states FILE`. FILE is one of:
//   a .jsonl manifest: one JSON object a line (blank lines skipped), {"states": FILE, "name": NAME, "ids": [...],
//     "text": TEXT}: FILE relative to the manifest's folder (or absolute), the others optional, other keys an Error.
//     Each line is read as read_states(FILE, NAME); "ids" (the true ids) become the entry's prompt_ids (an Error if
//     the file's own prompt_ids metadata disagrees); "text" is for people and ignored;
//   a safetensors, .npz or .npy file whose chosen tensor (the only one, or "output") is rank 3 [N, T, D]: N entries
//     of T positions, named "NAME[i]"; metadata "prompt_ids" then a list of N lists (a flat list for N = 1, as
//     `lminv forward` writes it), when present;
//   a safetensors or .npz file of several tensors and no "output": one entry per tensor, each [T, D] or [1, T, D]
//     (T may differ), in natural name order ("2" before "10", "p9" before "p10"); metadata "NAME.prompt_ids", when
//     present, gives entry NAME's ids; a file-wide "prompt_ids" is then ignored.
//   a [T, D] tensor alone is a set of one.
// Every entry of one file shares its metadata, blocks and head. All entries must have the same D, and come from one
// layer: entries whose metadata names blocks or head (a manifest's safetensors files) must agree, and the entries
// without (npy, npz) are given the set's. Everything is read and checked (as read_states) before anything is
// returned; errors name the file, the entry and, for a manifest, the line.
std::vector<CapturedStates> read_states_set(const std::filesystem::path& file);

// Checks states against the model that will invert them: D must equal `width` (the model's output width at its
// layer) and T must be in 1 .. max_positions (the model's positions). `what_model` names the model in the message
// (e.g. "gpt2 (configs/x.ini) at block 6, head none"). An Error naming the file and tensor otherwise.
void check_states(const CapturedStates& s, std::int64_t width, std::int64_t max_positions,
                  const std::string& what_model);

}  // namespace lminv
