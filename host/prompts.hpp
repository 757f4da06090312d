// Prompt sets for dataset runs: the prompt file format (read_prompt_file) and `lminv prompts` (make_prompts), which
// draws a set of sentences from a text corpus plus random token sequences. See docs/datasets.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

#include "tokenizer.hpp"

namespace lminv {

// One prompt of a prompt file.
struct PromptEntry {
  std::string text;               // the prompt's text; for an ids-only entry, the tokenizer's decode (for display)
  std::vector<std::int64_t> ids;  // token ids, never empty
  bool from_text = false;         // ids made by the tokenizer from text (they get the text prefix)
  std::string kind;               // "kind" of a JSON line; else "text" (tokenized text) or "ids" (ids given)
  std::int64_t line = 0;          // 1-based line number in the file
};

// Reads a prompt file: one prompt per line.
//   - A line starting with '{' is a JSON object: "ids" (array of integer token ids; wins when "text" is also there)
//     and/or "text" (tokenized with `tokenizer`), optional "kind" (a string); other keys are ignored.
//   - A line starting with '#', or holding only whitespace, is skipped.
//   - Any other line is plain text, tokenized as it is (leading spaces count; a trailing '\r' is dropped).
// Text prompts (plain lines, JSON "text" without "ids") get `text_prefix` first (the tokenizer's BOS and the known
// [prompt] prefix, as a run's), ids prompts get `ids_prefix` (the known prefix alone).
// Every id must lie in [0, vocab_size). Errors name the file and the line: invalid JSON, ids not integers, an id out of
// range, a prompt with no tokens, neither ids nor text; and the file when it cannot be read or holds no prompt.
std::vector<PromptEntry> read_prompt_file(const std::filesystem::path& file, const Tokenizer& tokenizer,
                                          std::int64_t vocab_size,
                                          const std::vector<std::int64_t>& text_prefix = {},
                                          const std::vector<std::int64_t>& ids_prefix = {});

// What `lminv prompts` makes.
struct MakePromptsRequest {
  std::vector<std::filesystem::path> corpus;  // text files, or folders (their regular files, by name); empty: default
  std::int64_t count = 100;                   // prompts in all
  std::int64_t tokens = 20;                   // ids per prompt
  double random_fraction = 0.1;               // share of random token sequences, in [0, 1]
  std::uint64_t seed = 0;
  std::filesystem::path out;  // the JSON Lines file to write
};

// The default corpus: the license texts of Debian's base-files package, present on every Debian system.
std::filesystem::path default_prompt_corpus();

// Makes a prompt set and writes it to request.out (JSON Lines, replaced atomically), with one summary line on `log`.
//
// Sentences: each corpus file is split into paragraphs at blank lines; whitespace runs in a paragraph collapse to one
// space; a sentence ends at '.', '!' or '?' (followed by any closing quotes or brackets) followed by whitespace or the
// end of the paragraph, except after a few abbreviations ("e.g.", "i.e.", "Inc.", ...). Sentences with at least
// `tokens` tokens are candidates; a sentence seen before (the same text in an earlier file) is not a new candidate.
//
// round(count * (1 - random_fraction)) candidates are picked without replacement and cut to their first `tokens`
// tokens; the rest are `tokens` ids drawn uniformly from [0, vocab_size). The entries are shuffled together. The
// draws use lminv::Rng(seed) streams "sentences", "random" and "shuffle", so a seed gives the same file on every
// machine with the same corpus and tokenizer.
void make_prompts(const MakePromptsRequest& request, const Tokenizer& tokenizer, std::ostream& log);

}  // namespace lminv
