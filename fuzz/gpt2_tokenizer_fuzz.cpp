// GPT-2's tokenizer tables (host/tokenizer.cpp): the input is a vocabulary JSON and a merges file, cut at the line
// "--merges--". The first byte picks the file names (vocab.json + merges.txt, or encoder.json + vocab.bpe), read
// through Tokenizer::from_folder. A table that loads then encodes a fixed text and the merges text, and
// decode(encode(s)) == s must hold (tokenizer.hpp promises it for every byte string).
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "tokenizer.hpp"

namespace {

void round_trip(const lminv::Tokenizer& tok, std::string_view text) {
  const std::vector<std::int64_t> ids = tok.encode(text);
  for (std::int64_t id : ids)
    if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
  if (tok.decode(ids) != text) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const bool openai_names = data[0] & 1;
  const auto parts = lminv_fuzz::split(lminv_fuzz::as_view(data + 1, size - 1), "\n--merges--\n", 2);
  const auto dir = lminv_fuzz::scratch_dir("gpt2_tokenizer") / (openai_names ? "openai" : "hf");
  std::filesystem::create_directories(dir);
  const char* vocab = openai_names ? "encoder.json" : "vocab.json";
  const char* merges = openai_names ? "vocab.bpe" : "merges.txt";
  lminv_fuzz::write_file(dir / vocab, parts[0]);
  lminv_fuzz::write_file(dir / merges, parts.size() > 1 ? parts[1] : std::string_view());
  try {
    const lminv::Tokenizer tok = lminv::Tokenizer::from_folder(dir);
    round_trip(tok, "Hello world, it's 2026!  \t\n caf\xc3\xa9 \xff\xfe 12345 \xe2\x80\x99s");
    if (parts.size() > 1) round_trip(tok, parts[1]);
    (void)tok.id_of("\xc4\xa0the");
    for (std::int64_t id = 0; id < std::min<std::int64_t>(tok.vocab_size(), 64); ++id) {
      try {
        (void)tok.piece(id);  // gaps in the id range are Errors
      } catch (const lminv::Error&) {
      }
    }
  } catch (const lminv::Error&) {
  }
  return 0;
}
