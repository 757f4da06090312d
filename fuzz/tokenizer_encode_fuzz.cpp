// Encoding fuzzed text with the real tokenizers lminv ships (host/tokenizer.cpp, host/hf_tokenizer.cpp): GPT-2's
// tables (data/gpt2-tokenizer) and the tokenizer.json of Llama 2, Llama 3 and Qwen3 (data/tokenizers/). The first
// byte picks the tokenizer, the rest is the text. Every id must be in the vocabulary, decode must not fail, and for
// GPT-2's tables decode(encode(s)) == s (tokenizer.hpp promises it for every byte string).
#include <cstdint>
#include <memory>
#include <string>

#include "fuzz_common.hpp"
#include "hf_tokenizer.hpp"
#include "lminv/error.hpp"
#include "tokenizer.hpp"

namespace {

struct Tokenizers {
  lminv::Tokenizer gpt2 = lminv::Tokenizer::from_folder(lminv_fuzz::source_dir() / "data/gpt2-tokenizer");
  std::vector<std::shared_ptr<const lminv::HfTokenizer>> hf;
  Tokenizers() {
    for (const char* name : {"llama2", "llama3", "qwen3"}) {
      const auto dir = lminv_fuzz::source_dir() / "data/tokenizers" / name;
      hf.push_back(lminv::HfTokenizer::load(dir / "tokenizer.json", dir / "tokenizer_config.json"));
    }
  }
};

const Tokenizers* loaded = nullptr;

}  // namespace

// Loading the tables takes seconds under ASan: done once before the first input, outside the per-input timeout.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const Tokenizers tokenizers;
  loaded = &tokenizers;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Tokenizers& tokenizers = *loaded;
  if (size < 1) return 0;
  const std::string_view text = lminv_fuzz::as_view(data + 1, size - 1);
  const unsigned which = data[0] % 4;
  if (which == 0) {
    const lminv::Tokenizer& tok = tokenizers.gpt2;
    const std::vector<std::int64_t> ids = tok.encode(text);
    for (std::int64_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
    if (tok.decode(ids) != text) __builtin_trap();
    return 0;
  }
  const lminv::HfTokenizer& tok = *tokenizers.hf[which - 1];
  const std::vector<std::int64_t> ids = tok.encode(text);  // no Error either: every text encodes
  for (std::int64_t id : ids)
    if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
  (void)tok.decode(ids);
  return 0;
}
