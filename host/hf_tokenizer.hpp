// Hugging Face tokenizer.json: BPE tokenizers run the way Hugging Face's `tokenizers` library (Rust) runs them.
//
// Supported, because decoder-only language models use it (Llama 2 and 3, Mistral, TinyLlama, Qwen2 and 3,
// GPT-NeoX / Pythia, SmolLM):
//   model          BPE: vocab, merges as "a b" strings or [a, b] pairs, unk_token, fuse_unk, byte_fallback,
//                  ignore_merges, continuing_subword_prefix, end_of_word_suffix (dropout must be null or 0)
//   normalizer     NFC, NFD, NFKC, NFKD (utf8proc), Prepend, Replace (String or Regex), Strip, Lowercase, Sequence
//   pre_tokenizer  ByteLevel (add_prefix_space, use_regex: GPT-2's regex), Split (String or Regex pattern, the five
//                  behaviours, invert), Metaspace (replacement, prepend_scheme first/always/never or the older
//                  add_prefix_space, split), Digits, Sequence
//   decoder        ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence
//   post_processor TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence: only what they put
//                  before the text (special_prefix)
//   added_tokens   matched in the text before normalization (normalized: false) or after it (normalized: true),
//                  leftmost-longest, with single_word, lstrip and rstrip; special ones too (as HF does by default)
// Anything else (a WordPiece, Unigram or WordLevel model; an unknown normalizer, pre-tokenizer, decoder or
// post-processor type) is an lminv::Error at load time naming the file and the JSON path of the offending part.
//
// Regexes are Oniguruma's (the Rust library's regex engine) compiled with PCRE2 (UTF, UCP, JIT): \s and \S are
// rewritten to Oniguruma's class (U+0009..U+000D, U+0085, Zs, Zl, Zp), which PCRE2's UCP \s is not quite.
// Invalid UTF-8 in the text never fails: an invalid byte is a unit of its own that no regex class matches, that
// normalizers leave alone, and that BPE encodes by its byte (byte-level or byte_fallback models) or as unk.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lminv {

class HfTokenizer {
 public:
  // tokenizer_config may be absent (add_bos_token and bos_token then come from tokenizer.json alone).
  static std::shared_ptr<const HfTokenizer> load(const std::filesystem::path& tokenizer_json,
                                                 const std::filesystem::path& tokenizer_config);
  ~HfTokenizer();
  HfTokenizer(const HfTokenizer&) = delete;
  HfTokenizer& operator=(const HfTokenizer&) = delete;

  // The text's own ids: added and special tokens written in the text are recognised, nothing is put around it.
  std::vector<std::int64_t> encode(std::string_view utf8_text) const;
  // The decoder of tokenizer.json over the tokens (special ones included, no clean-up of spaces). Bytes that
  // byte-fallback or byte-level tokens leave as invalid UTF-8 stay as they are (HF would write U+FFFD).
  std::string decode(const std::vector<std::int64_t>& ids) const;
  // One token as text: its bytes (byte-level), its text with the metaspace as a space and <0xNN> as the byte
  // (SentencePiece style; without the decoder's stripping of a leading space), or an added token's content.
  std::string piece(std::int64_t id) const;
  std::int64_t vocab_size() const;  // one more than the largest id, added tokens included
  // The id of a token as tokenizer.json writes it ("Ġsky", "▁sky", "<s>"), added tokens first; -1 if none.
  std::int64_t id_of(std::string_view token) const;
  // What a model run puts before the text's ids: add_bos_token of tokenizer_config.json when it says (true:
  // {bos}, false: {}), else the special tokens that tokenizer.json's post-processor puts before the sequence.
  const std::vector<std::int64_t>& special_prefix() const;
  std::optional<std::int64_t> bos_id() const;  // bos_token of tokenizer_config.json, where it names a token
  const std::string& kind() const;             // "hf-bpe-bytelevel", "hf-bpe-sentencepiece" or "hf-bpe"

  struct Impl;  // public only so that hf_tokenizer.cpp's helpers can name its parts

 private:
  explicit HfTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lminv
