// Prompt files (host/prompts.cpp read_prompt_file): the input is the file, read with GPT-2's tokenizer. The first
// byte picks the vocabulary size the ids are checked against and whether text prompts get a BOS-like prefix.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "prompts.hpp"
#include "tokenizer.hpp"

namespace {
const lminv::Tokenizer* gpt2 = nullptr;
}  // namespace

// GPT-2's tables, loaded before the first input (outside the per-input timeout).
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const lminv::Tokenizer tok = lminv::Tokenizer::from_folder(lminv_fuzz::source_dir() / "data/gpt2-tokenizer");
  gpt2 = &tok;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const lminv::Tokenizer& tok = *gpt2;
  if (size < 1) return 0;
  static const std::int64_t kVocab[] = {50257, 1000, 1, 0};
  const std::int64_t vocab = kVocab[data[0] & 3];
  using Ids = std::vector<std::int64_t>;
  const Ids text_prefix = (data[0] & 4) ? Ids{0} : Ids{};
  const Ids ids_prefix = (data[0] & 8) ? Ids{0, 0} : Ids{};
  const auto file = lminv_fuzz::scratch_dir("prompts") / "prompts.jsonl";
  lminv_fuzz::write_file(file, lminv_fuzz::as_view(data + 1, size - 1));
  try {
    const std::vector<lminv::PromptEntry> prompts = lminv::read_prompt_file(file, tok, vocab, text_prefix, ids_prefix);
    if (prompts.empty()) __builtin_trap();  // "holds no prompt" is an Error
    for (const lminv::PromptEntry& p : prompts) {
      if (p.ids.empty() || p.line < 1) __builtin_trap();
      for (std::int64_t id : p.ids)
        if (id < 0 || id >= vocab) __builtin_trap();
    }
  } catch (const lminv::Error&) {
  }
  return 0;
}
