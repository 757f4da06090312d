// NumPy files: .npy arrays (format versions 1.0, 2.0 and 3.0) and .npz archives of them (np.savez and
// np.savez_compressed: a zip of "NAME.npy" members, stored or deflated, zip64 records as NumPy always writes them).
//
// .npy: the magic "\x93NUMPY", a major and a minor version byte, the header length (u16 little-endian for 1.0, u32 for
// 2.0 and 3.0), then the header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (T, D), }
// (latin-1 for 1.0 and 2.0, UTF-8 for 3.0; NumPy pads it with spaces and a newline), then the data, numel * itemsize
// bytes, in C order or, with fortran_order True, in Fortran order.
//
// Only floating-point arrays are read: descr '<f2', '<f4', '<f8' and their big-endian ('>') and native ('=') forms.
// f2 is widened to f32 exactly (the SDK has no f16) and f4 stays f32, f8 stays f64; big-endian data is swapped and
// Fortran-order data transposed, so every returned Tensor is row-major in the host's order. Integer, boolean,
// complex, string, object, datetime and structured dtypes are refused with an Error naming the dtype.
//
// The zip container of .npz is read by libzip (Debian libzip-dev), which checks the archive's consistency when it is
// opened and every member's CRC-32 when it is read to its end. The .npy header parser is this file's own: no Debian
// or npm package reads .npy from C++.
//
// Every malformed input is an lminv::Error naming the file (and for .npz the member) and what is wrong: bad magic or
// version, truncated header or data, header not a dict of exactly 'descr', 'fortran_order' and 'shape', shape not a
// tuple of non-negative integers, an element count or byte size that overflows 64 bits, data shorter or longer than
// the shape says, a CRC mismatch or other zip damage, a member that is not there (the message lists the names).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/tensor.hpp"

namespace lminv {

// One array read from a .npy file or an .npz member.
struct NpyArray {
  std::string descr;           // as in the header: "<f4", ">f8", "<f2", ...
  std::string stored_dtype;    // the same in safetensors' words: "F16", "F32" or "F64"
  bool fortran_order = false;  // as stored; `values` is row-major either way
  int major_version = 1;       // the format version of the header: 1, 2 or 3
  int minor_version = 0;
  Tensor values;  // the array's shape, row-major: f32 for f2 and f4, f64 for f8
};

// The parsed header of a .npy image: what the data must look like.
struct NpyHeader {
  std::string descr;
  std::string stored_dtype;
  bool fortran_order = false;
  int major_version = 1;
  int minor_version = 0;
  Shape shape;
  std::size_t item_size = 0;  // bytes per stored element: 2, 4 or 8
  bool big_endian = false;
  std::uint64_t data_offset = 0;  // where the data starts: magic, version, length field and header
  std::uint64_t data_bytes = 0;   // numel * item_size, checked for overflow
};

// The number of leading bytes of a .npy image that hold its header, read from the first `prefix` bytes (at least the
// 12 that carry the magic, the version and the header length; fewer is an Error if the image is no longer).
// `where` names the image in errors ("FILE" or "FILE: member 'x.npy'").
std::uint64_t npy_header_size(std::string_view prefix, const std::string& where);

// Parses the header at the start of `bytes`, which holds at least npy_header_size(bytes) bytes.
NpyHeader parse_npy_header(std::string_view bytes, const std::string& where);

// Decodes the data of an image whose header is `header`: `data` must be exactly header.data_bytes long (shorter is
// "truncated", longer "trailing bytes", both Errors).
Tensor decode_npy_data(const NpyHeader& header, std::string_view data, const std::string& where);

// A whole .npy image held in memory.
NpyArray parse_npy(std::string_view bytes, const std::string& where);

// A .npy file.
NpyArray read_npy(const std::filesystem::path& file);

// The file's first bytes say it is a .npy image ("\x93NUMPY") or a zip archive ("PK\x03\x04", "PK\x05\x06" for an
// empty one). Unreadable or short files say neither.
bool looks_like_npy(const std::filesystem::path& file);
bool looks_like_zip(const std::filesystem::path& file);

// An open .npz archive. The constructor opens it read-only with libzip's consistency checks and lists its members;
// nothing of the data is read until read().
class NpzFile {
 public:
  explicit NpzFile(const std::filesystem::path& file);
  ~NpzFile();
  NpzFile(NpzFile&& other) noexcept;
  NpzFile& operator=(NpzFile&& other) noexcept;
  NpzFile(const NpzFile&) = delete;
  NpzFile& operator=(const NpzFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // The arrays' names in archive order, as np.load's keys: member names with ".npy" removed (a member of another
  // name keeps it whole; folders are skipped).
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const;
  // The array NAME (a name from names(), or its member name with ".npy"), decoded and CRC-checked; an Error naming
  // the file and member when it is damaged, and listing the names when there is no such array.
  NpyArray read(const std::string& name) const;

 private:
  void release() noexcept;

  std::filesystem::path path_;
  void* zip_ = nullptr;  // zip_t*, kept out of this header
  std::vector<std::string> names_;
  std::vector<std::string> members_;    // the zip member name of each entry of names_
  std::vector<std::uint64_t> indices_;  // and its index in the archive
};

// Every array of an .npz file, in archive order (names as NpzFile::names()).
std::vector<std::pair<std::string, NpyArray>> read_npz(const std::filesystem::path& file);

}  // namespace lminv
