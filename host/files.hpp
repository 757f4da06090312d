// Reading the files a user names (configs, prompt sets, tokenizer tables, config.json, records, states): only regular
// files, each kind with a size limit, so that a folder, a FIFO or a device such as /dev/zero is refused at once with
// the file's name instead of being read without end.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace lminv {

// The most lminv reads of each kind of file. Generous for real inputs (Llama 3's tokenizer.json is 9 MB, a
// config.json a few KB); small enough that a wrong file fails at once instead of filling memory.
namespace max_bytes {
constexpr std::uintmax_t kConfig = std::uintmax_t{1} << 20;            // an INI config: 1 MiB
constexpr std::uintmax_t kJsonConfig = std::uintmax_t{16} << 20;       // config.json, tokenizer_config.json: 16 MiB
constexpr std::uintmax_t kTokenizer = std::uintmax_t{512} << 20;       // tokenizer.json, vocab/merges tables: 512 MiB
constexpr std::uintmax_t kPrompts = std::uintmax_t{1} << 30;           // a prompt file or corpus text: 1 GiB
constexpr std::uintmax_t kRecords = std::uintmax_t{16} << 30;          // a records file read to resume: 16 GiB
constexpr std::uintmax_t kStates = std::uintmax_t{64} << 30;           // a captured states file: 64 GiB
}  // namespace max_bytes

// Throws an lminv::Error "FILE: WHAT ..." unless FILE is a regular file (symbolic links followed) of at most
// `limit` bytes: it does not exist, is a folder / FIFO / device / socket (named), or is too large (its size and the
// limit are given).
void require_regular_file(const std::filesystem::path& file, const std::string& what, std::uintmax_t limit);

// FILE's bytes, checked as require_regular_file does on the open descriptor (no race with a file swapped in between),
// read without blocking on a FIFO. Errors name the file and what it is for (`what`, e.g. "the config file").
std::string read_regular_file(const std::filesystem::path& file, const std::string& what, std::uintmax_t limit);

// "1.5 GB", "12 KiB"-style sizes for messages.
std::string byte_size(std::uintmax_t bytes);

}  // namespace lminv
