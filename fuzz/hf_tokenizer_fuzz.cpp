// Hugging Face tokenizer.json (host/hf_tokenizer.cpp): the input is tokenizer.json, then optionally
// tokenizer_config.json and a text, each after a line "--part--". A tokenizer that loads encodes the text (or a fixed
// one), decodes the ids, and answers piece, id_of, special_prefix and bos_id.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "hf_tokenizer.hpp"
#include "lminv/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto parts = lminv_fuzz::split(lminv_fuzz::as_view(data, size), "\n--part--\n", 3);
  const auto dir = lminv_fuzz::scratch_dir("hf_tokenizer");
  const auto json_file = dir / "tokenizer.json", config_file = dir / "tokenizer_config.json";
  lminv_fuzz::write_file(json_file, parts[0]);
  std::error_code ec;
  if (parts.size() > 1)
    lminv_fuzz::write_file(config_file, parts[1]);
  else
    std::filesystem::remove(config_file, ec);
  const std::string_view text =
      parts.size() > 2 ? parts[2] : std::string_view(" Hello world, it's 2026!\n\tcaf\xc3\xa9 \xff 12345 <s></s>");
  try {
    const auto tok = lminv::HfTokenizer::load(json_file, config_file);
    const std::vector<std::int64_t> ids = tok->encode(text);
    for (std::int64_t id : ids)
      if (id < 0 || id >= tok->vocab_size()) __builtin_trap();  // encode() gives ids of the vocabulary only
    (void)tok->decode(ids);
    for (std::int64_t id : ids) (void)tok->piece(id);
    (void)tok->id_of("<s>");
    (void)tok->id_of(text);
    (void)tok->special_prefix();
    (void)tok->bos_id();
    (void)tok->kind();
  } catch (const lminv::Error&) {
  }
  return 0;
}
