// Prompt text <-> token ids: GPT-2's byte-level BPE (exact to OpenAI's encoder.py), or a Hugging Face tokenizer.json
// (hf_tokenizer.hpp: Llama 2/3, Mistral, Qwen2/3, GPT-NeoX, ...).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
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
// A folder with a tokenizer.json is read as Hugging Face's tokenizers library reads it instead (see hf_tokenizer.hpp
// for what is supported): encode() gives the text's own ids (added and special tokens written in the text are
// recognised, nothing is put around it); special_prefix() says what a model run puts before them.
//
// A Tokenizer is cheap to copy (copies share the tables) and safe to use from several threads at once.
class Tokenizer {
 public:
  // A folder holding tokenizer.json (+ tokenizer_config.json if there is one), else vocab.json + merges.txt
  // (Hugging Face) or encoder.json + vocab.bpe (OpenAI / npm gpt-3-encoder).
  static Tokenizer from_folder(const std::filesystem::path& dir);
  // The two files named explicitly. The vocab is a JSON object piece -> id; the merges file has an optional first
  // line starting with "#version", then one merge "a b" per line (empty lines are skipped).
  static Tokenizer from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges);

  std::vector<std::int64_t> encode(std::string_view utf8_text) const;
  // The raw bytes of the tokens joined; may be invalid UTF-8 when the ids split a character.
  std::string decode(const std::vector<std::int64_t>& ids) const;
  // The token's bytes as text (decode of one id).
  std::string piece(std::int64_t id) const;
  // One more than the largest id in the vocabulary, added tokens included (50257 for GPT-2).
  std::int64_t vocab_size() const;
  // The id of a vocabulary entry given in the files' form (e.g. "Ġsky", "▁sky", "<s>"), or -1 if absent.
  std::int64_t id_of(std::string_view piece_in_byte_unicode_form) const;
  // The ids a model run puts before the prompt's: {} for GPT-2's tables; for tokenizer.json add_bos_token of
  // tokenizer_config.json when it is given ({bos} or {}), else what the post-processor's template puts there.
  std::vector<std::int64_t> special_prefix() const;
  // The BOS token named by tokenizer_config.json's bos_token; none for GPT-2's tables.
  std::optional<std::int64_t> bos_id() const;
  // "gpt2-bpe" (GPT-2's tables), "hf-bpe-bytelevel", "hf-bpe-sentencepiece" or "hf-bpe" (tokenizer.json).
  std::string kind() const;

 private:
  struct Impl;  // the tables and the per-word cache, or the tokenizer.json one; defined in tokenizer.cpp
  explicit Tokenizer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// The embedded default: the folder with encoder.json + vocab.bpe. $LMINV_TOKENIZER_DIR if set, else the
// compile-time LMINV_SOURCE_DATA_DIR "/gpt2-tokenizer", else "data/gpt2-tokenizer". Does not check that it exists.
std::filesystem::path default_tokenizer_dir();

}  // namespace lminv
