// The GPT-2 byte-level BPE tokenizer: prompt text <-> token ids, exact to OpenAI's encoder.py.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lminv {

// Encodes UTF-8 text to GPT-2 token ids and back.
//
// encode() reproduces OpenAI's reference (and the npm gpt-3-encoder) token for token: the text is split by the
// GPT-2 pre-tokenizer regex, each piece's bytes are mapped to "byte-unicode" characters, and BPE merges are applied
// lowest rank first. Special tokens such as <|endoftext|> are not recognised in the text; they encode as plain text.
//
// Invalid UTF-8 never fails: each byte that does not start a well-formed sequence is treated as a code point of
// its own that is neither a letter, a number nor whitespace (so it groups with punctuation), and it is encoded by
// its byte token. decode(encode(s)) == s holds for every byte string s.
//
// A Tokenizer is cheap to copy (copies share the tables) and safe to use from several threads at once.
class Tokenizer {
 public:
  // A folder holding vocab.json + merges.txt (Hugging Face) or encoder.json + vocab.bpe (OpenAI / npm gpt-3-encoder).
  static Tokenizer from_folder(const std::filesystem::path& dir);
  // The two files named explicitly. The vocab is a JSON object piece -> id; the merges file has an optional first
  // line starting with "#version", then one merge "a b" per line (empty lines are skipped).
  static Tokenizer from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges);

  std::vector<std::int64_t> encode(std::string_view utf8_text) const;
  // The raw bytes of the tokens joined; may be invalid UTF-8 when the ids split a character.
  std::string decode(const std::vector<std::int64_t>& ids) const;
  // The token's bytes as text (decode of one id).
  std::string piece(std::int64_t id) const;
  // One more than the largest id in the vocabulary (50257 for GPT-2).
  std::int64_t vocab_size() const;
  // The id of a vocabulary entry given in the files' byte-unicode form (e.g. "Ġsky"), or -1 if absent.
  std::int64_t id_of(std::string_view piece_in_byte_unicode_form) const;

 private:
  struct Impl;  // the tables and the per-word cache; defined in tokenizer.cpp
  explicit Tokenizer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// The embedded default: the folder with encoder.json + vocab.bpe. $LMINV_TOKENIZER_DIR if set, else the
// compile-time LMINV_SOURCE_DATA_DIR "/gpt2-tokenizer", else "data/gpt2-tokenizer". Does not check that it exists.
std::filesystem::path default_tokenizer_dir();

}  // namespace lminv
