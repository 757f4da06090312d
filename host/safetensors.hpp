// safetensors files (https://github.com/huggingface/safetensors): reading, validated, and writing, atomically.
//
// Format: an 8-byte little-endian u64 N, then N bytes of JSON header
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
// then the data buffer; offsets are relative to its start, data is little-endian and row-major.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"

namespace lminv {

// One tensor of a safetensors header.
struct SafetensorsEntry {
  std::string dtype;  // as stored: "F32", "F64", "BF16" or "F16"
  DType type;         // what read() gives: F32 -> f32, F64 -> f64, BF16 -> bf16, F16 -> f32 (exact widening)
  Shape shape;
  std::uint64_t begin = 0;  // byte offsets [begin, end) in the data buffer
  std::uint64_t end = 0;
};

// An open safetensors file, memory-mapped read-only (the header, bytes()) and read with pread (read()). The constructor validates the whole header and throws an
// lminv::Error naming the file and the problem:
//   shorter than 8 bytes; header length past the end of the file; header not valid JSON or not an object; a name
//   repeated; "__metadata__" not an object of strings; an entry without dtype/shape/data_offsets; a dtype lminv does
//   not read (it is named; lminv reads F32, F64, BF16, F16); a shape that is not a list of non-negative integers;
//   data_offsets not [begin, end] with begin <= end <= the data size; end - begin != numel * dtype size; two tensors'
//   bytes overlapping. Gaps between tensors are allowed (the reference writer leaves none).
// Nothing of the data is read until read(). The file must not be truncated while open (the mapping would fault).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& file);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // The entry; an Error naming the file and the tensor when there is none.
  const SafetensorsEntry& entry(const std::string& name) const;

  // The tensor's stored bytes (little-endian, in the stored dtype), valid while this object lives.
  std::string_view bytes(const std::string& name) const;
  // The tensor copied into an owning Tensor (F16 widened to f32). Safe to call from several threads at once.
  Tensor read(const std::string& name) const;
  // The tensors, in the order of `names`, read by `threads` threads (0: one per core, at most 8): a new Tensor's
  // first touch (the SDK zero-fills it) and the copy cost about as much as each other, and both scale with threads.
  std::vector<Tensor> read_many(const std::vector<std::string>& names, int threads = 0) const;

 private:
  void release() noexcept;

  std::filesystem::path path_;
  int fd_ = -1;
  void* map_ = nullptr;
  std::size_t map_size_ = 0;
  const std::byte* data_ = nullptr;  // start of the data buffer
  std::uint64_t data_offset_ = 0;    // its offset in the file
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Reads every tensor (memory-mapped file; values copied into owning Tensors). F32 -> f32, F64 -> f64, BF16 -> bf16,
// F16 -> f32 (exact widening; the SDK has no f16). Metadata returned if asked. A bad file is an Error (see
// SafetensorsFile) thrown before anything is returned.
WeightSet read_safetensors(const std::filesystem::path& file, std::map<std::string, std::string>* metadata = nullptr);

// Writes tensors through a temporary file in the same folder (FILE.tmp.<pid>.<n>), synced, then renamed into place:
// an existing FILE stays whole until the new one is complete, and a failure removes the temporary file. f32 -> F32,
// f64 -> F64, bf16 -> BF16. The layout is the reference implementation's (safetensors' Rust `serialize`): compact
// JSON header, "__metadata__" first (omitted when empty), then the tensors in data order; data ordered by descending
// dtype (F64, F32, BF16) and then by name, so every tensor is aligned to its element size; the header padded with
// spaces to a multiple of 8 bytes; no gaps. (With one dtype, as in any WeightSet lminv makes, that is name order.)
// The folder must exist. A tensor named "__metadata__" is an Error.
void write_safetensors(const std::filesystem::path& file, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The same, from tensors held elsewhere (no copies): for writing a WeightSet under other names.
void write_safetensors_views(const std::filesystem::path& file, const std::map<std::string, const Tensor*>& tensors,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace lminv
