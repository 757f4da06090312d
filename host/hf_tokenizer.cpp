// Hugging Face tokenizer.json, following the Rust `tokenizers` library step for step:
//   1. added tokens that are not normalized are cut out of the text (leftmost-longest, single_word, l/rstrip);
//   2. each remaining section is normalized, then the normalized added tokens are cut out of it;
//   3. each remaining part is pre-tokenized (Split regexes, ByteLevel, Metaspace, ...) into words;
//   4. the BPE model turns each word into ids (Word::merge_all of models/bpe/word.rs: lowest rank first, then
//      leftmost; ignore_merges, byte_fallback, unk and fuse_unk as BPE::merge_word does).
// Decoding runs the decoders of tokenizer.json over the token strings. What the post-processor or
// tokenizer_config.json adds around a sequence is only reported (special_prefix), never put into encode().
#include "hf_tokenizer.hpp"
#include "files.hpp"
#include "json_depth.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "lminv/error.hpp"

namespace lminv {
namespace {

using Json = nlohmann::json;

// ---- UTF-8 --------------------------------------------------------------------------------------------------------

// One code point read from UTF-8; a byte that does not start a well-formed sequence is a unit of its own.
struct Unit {
  char32_t cp;
  std::size_t size;
  bool valid;
};

Unit unit_at(std::string_view s, std::size_t i) {
  const auto lead = static_cast<unsigned char>(s[i]);
  const Unit invalid{lead, 1, false};
  if (lead < 0x80) return {lead, 1, true};
  std::size_t size = 0;
  char32_t cp = 0, smallest = 0;
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

// Unicode White_Space: Rust's char::is_whitespace and the regex crate's \s (lstrip, rstrip, Strip).
bool is_white_space(const Unit& u) {
  if (!u.valid) return false;
  const char32_t c = u.cp;
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Rust's char::is_numeric: the general categories Nd, Nl, No (the Digits pre-tokenizer).
bool is_numeric(const Unit& u) {
  if (!u.valid) return false;
  const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(u.cp));
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

// The regex crate's \w (single_word added tokens), by general category: letters, marks, Nd, Nl, Pc, ZWNJ/ZWJ.
bool is_word_char(const Unit& u) {
  if (!u.valid) return false;
  if (u.cp == 0x200C || u.cp == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(u.cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC: return true;
    default: return false;
  }
}

// The unit that ends at byte `end` (end > 0): the last well-formed code point or the single invalid byte there.
Unit unit_before(std::string_view s, std::size_t end) {
  for (std::size_t size = 1; size <= 4 && size <= end; ++size) {
    const Unit u = unit_at(s, end - size);
    if (u.valid && u.size == size) return u;
  }
  return {static_cast<unsigned char>(s[end - 1]), 1, false};
}

// NFC, NFD, NFKC or NFKD of the well-formed runs of s (utf8proc); invalid bytes stay where they are.
std::string unicode_normalize(std::string_view s, utf8proc_option_t options) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    std::size_t j = i;
    while (j < s.size()) {
      const Unit u = unit_at(s, j);
      if (!u.valid) break;
      j += u.size;
    }
    if (j > i) {
      utf8proc_uint8_t* mapped = nullptr;
      const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                              static_cast<utf8proc_ssize_t>(j - i), &mapped, options);
      if (n < 0) throw Error(std::string("Unicode normalization failed: ") + utf8proc_errmsg(n));
      out.append(reinterpret_cast<const char*>(mapped), static_cast<std::size_t>(n));
      std::free(mapped);
    }
    if (j < s.size()) out += s[j++];
    i = j;
  }
  return out;
}

// ---- GPT-2's bytes_to_unicode (the ByteLevel alphabet) ------------------------------------------------------------

struct ByteAlphabet {
  std::array<std::string, 256> char_of_byte;  // UTF-8 of the character standing for each byte
  std::array<int, 0x144> byte_of_char{};      // -1 where the character is not in the alphabet

  ByteAlphabet() {
    byte_of_char.fill(-1);
    char32_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t c = printable ? static_cast<char32_t>(b) : next_extra++;
      append_utf8(char_of_byte[b], c);
      byte_of_char[c] = b;
    }
  }

  std::string encode(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (const char b : bytes) out += char_of_byte[static_cast<unsigned char>(b)];
    return out;
  }

  // The bytes a token in byte-level form stands for; a token with a character outside the alphabet is its own
  // text (as the Rust ByteLevel decoder does).
  std::string decode(std::string_view token) const {
    std::string bytes;
    for (std::size_t i = 0; i < token.size();) {
      const Unit u = unit_at(token, i);
      if (!u.valid || u.cp >= byte_of_char.size() || byte_of_char[u.cp] < 0) return std::string(token);
      bytes += static_cast<char>(byte_of_char[u.cp]);
      i += u.size;
    }
    return bytes;
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// ---- Where a loading error is --------------------------------------------------------------------------------------

struct Source {
  std::string file;

  [[noreturn]] void fail(const std::string& path, const std::string& message) const {
    throw Error("tokenizer '" + file + "': " + (path.empty() ? "" : path + ": ") + message);
  }

  const Json& require(const Json& object, const std::string& path, const char* key) const {
    if (!object.is_object()) fail(path, "expected a JSON object, got " + object.dump().substr(0, 80));
    const auto it = object.find(key);
    if (it == object.end()) fail(path, std::string("missing \"") + key + "\"");
    return *it;
  }

  std::string string_at(const Json& object, const std::string& path, const char* key) const {
    const Json& value = require(object, path, key);
    if (!value.is_string()) fail(path + "." + key, "expected a string, got " + value.dump().substr(0, 80));
    return value.get<std::string>();
  }

  // An optional boolean (absent or null: the default).
  bool flag(const Json& object, const std::string& path, const char* key, bool fallback) const {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(path + "." + key, "expected true or false, got " + it->dump().substr(0, 80));
    return it->get<bool>();
  }

  std::string type_of(const Json& object, const std::string& path) const { return string_at(object, path, "type"); }

  [[noreturn]] void unsupported(const std::string& path, const std::string& type, const char* supported) const {
    fail(path + ".type", "\"" + type + "\" is not supported (lminv reads " + supported + ")");
  }
};

std::string read_text(const std::filesystem::path& path) {
  return read_regular_file(path, "the tokenizer file", max_bytes::kTokenizer);
}

Json parse_json(const std::filesystem::path& path) {
  try {
    return Json::parse(read_text(path), json_depth_limit("tokenizer '" + path.string() + "'"));
  } catch (const Json::exception& e) {
    throw Error("tokenizer '" + path.string() + "' is not valid JSON: " + e.what());
  }
}

// ---- Regexes: Oniguruma patterns through PCRE2 --------------------------------------------------------------------

// Oniguruma's \s: U+0009..U+000D, U+0085 and the separators. PCRE2's UCP \s adds U+180E.
constexpr const char* kOnigSpace = "\\t-\\r\\x{85}\\p{Z}";

// Rewrites what Oniguruma and PCRE2 read differently; refuses the constructs that have no simple PCRE2 form.
std::string onig_to_pcre2(const std::string& pattern, const Source& src, const std::string& path) {
  std::string out;
  bool in_class = false;
  std::size_t class_first = 0;  // index of the first character inside the current class (a ']' there is literal)
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 == pattern.size()) src.fail(path, "the regex ends with a backslash");
      const char e = pattern[++i];
      if (e == 's') {
        out += in_class ? std::string(kOnigSpace) : "[" + std::string(kOnigSpace) + "]";
      } else if (e == 'S') {
        if (in_class) src.fail(path, "\\S inside a character class is not supported: " + pattern);
        out += "[^" + std::string(kOnigSpace) + "]";
      } else if (e == 'h' || e == 'H') {
        src.fail(path, "\\h and \\H (hexadecimal digits in Oniguruma) are not supported: " + pattern);
      } else if (e == 'u') {
        const std::string hex = i + 4 < pattern.size() ? pattern.substr(i + 1, 4) : "";
        if (hex.size() != 4 ||
            !std::all_of(hex.begin(), hex.end(), [](char h) { return std::isxdigit(static_cast<unsigned char>(h)); })) {
          src.fail(path, "bad \\u escape: " + pattern);
        }
        out += "\\x{" + hex + "}";
        i += 4;
      } else {
        out += '\\';
        out += e;
      }
      continue;
    }
    if (in_class) {
      if (c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
        const std::size_t close = pattern.find(":]", i + 2);
        if (close == std::string::npos) src.fail(path, "unterminated POSIX class: " + pattern);
        out += pattern.substr(i, close + 2 - i);
        i = close + 1;
        continue;
      }
      if (c == '[') src.fail(path, "nested character classes are not supported: " + pattern);
      if (c == '&' && i + 1 < pattern.size() && pattern[i + 1] == '&') {
        src.fail(path, "character class intersection (&&) is not supported: " + pattern);
      }
      if (c == ']' && i != class_first) in_class = false;
      out += c;
      continue;
    }
    out += c;
    if (c == '[') {
      in_class = true;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      class_first = i + 1;
    }
  }
  return out;
}

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};

class Regex {
 public:
  Regex(const std::string& onig_pattern, const Source& src, const std::string& path) {
    const std::string pcre = onig_to_pcre2(onig_pattern, src, path);
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre.data()), pcre.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      src.fail(path, "the regex " + Json(onig_pattern).dump() + " does not compile (PCRE2, at offset " +
                         std::to_string(offset) + "): " + reinterpret_cast<const char*>(message));
    }
    code_.reset(code, CodeDeleter());
    jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }

  // The [start, end) of the matches, left to right, as Oniguruma's find_iter in the onig crate gives them: the
  // search resumes at the end of each match, and an empty match right at the previous match's end is skipped.
  std::vector<std::pair<std::size_t, std::size_t>> find_iter(std::string_view text) const {
    struct Resources {
      pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
      pcre2_match_context* context = pcre2_match_context_create(nullptr);
      pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
      Resources() { pcre2_jit_stack_assign(context, nullptr, stack); }
      ~Resources() {
        pcre2_jit_stack_free(stack);
        pcre2_match_context_free(context);
        pcre2_match_data_free(data);
      }
    };
    thread_local Resources resources;
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    std::size_t last_end = 0, last_match_end = 0;
    bool matched_before = false;
    while (last_end <= text.size()) {
      const int rc =
          jit_ ? pcre2_jit_match(code_.get(), subject, text.size(), last_end, 0, resources.data, resources.context)
               : pcre2_match(code_.get(), subject, text.size(), last_end, 0, resources.data, resources.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof message);
        throw Error(std::string("tokenizer regex match failed (PCRE2): ") + reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(resources.data);
      const std::size_t start = ovector[0], end = ovector[1];
      if (start == end && matched_before && last_match_end == end) {
        last_end += last_end < text.size() ? unit_at(text, last_end).size : 1;
        continue;
      }
      last_end = end;
      last_match_end = end;
      matched_before = true;
      matches.emplace_back(start, end);
    }
    return matches;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
  bool jit_ = false;
};

// A pattern of tokenizer.json: {"String": literal} or {"Regex": oniguruma}.
struct Pattern {
  std::string literal;
  std::shared_ptr<const Regex> regex;  // null for a literal

  static Pattern parse(const Json& json, const Source& src, const std::string& path) {
    Pattern p;
    if (json.is_object() && json.size() == 1 && json.contains("String") && json["String"].is_string()) {
      p.literal = json["String"].get<std::string>();
      if (p.literal.empty()) src.fail(path, "an empty String pattern is not supported");
    } else if (json.is_object() && json.size() == 1 && json.contains("Regex") && json["Regex"].is_string()) {
      p.regex = std::make_shared<const Regex>(json["Regex"].get<std::string>(), src, path + ".Regex");
    } else {
      src.fail(path, "expected {\"String\": ...} or {\"Regex\": ...}, got " + json.dump().substr(0, 120));
    }
    return p;
  }

  std::vector<std::pair<std::size_t, std::size_t>> find_iter(std::string_view text) const {
    if (regex) return regex->find_iter(text);
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    for (std::size_t at = text.find(literal); at != std::string_view::npos;
         at = text.find(literal, at + literal.size())) {
      matches.emplace_back(at, at + literal.size());
    }
    return matches;
  }
};

// ---- Splitting (NormalizedString::split of the Rust library) -------------------------------------------------------

struct Span {
  std::size_t start, end;
  bool is_match;
};

// The matches and the gaps between them, covering the whole text in order (Pattern::find_matches).
std::vector<Span> spans_of(std::string_view text, const std::vector<std::pair<std::size_t, std::size_t>>& matches) {
  std::vector<Span> spans;
  if (text.empty()) return {{0, 0, false}};
  std::size_t previous = 0;
  for (const auto& [start, end] : matches) {
    if (previous != start) spans.push_back({previous, start, false});
    spans.push_back({start, end, true});
    previous = end;
  }
  if (previous != text.size()) spans.push_back({previous, text.size(), false});
  return spans;
}

// Every code point for which `is_delimiter` holds is a match of its own (the Pattern for Fn(char) -> bool).
std::vector<Span> spans_of_chars(std::string_view text, const std::function<bool(const Unit&)>& is_delimiter) {
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  for (std::size_t i = 0; i < text.size();) {
    const Unit u = unit_at(text, i);
    if (is_delimiter(u)) matches.emplace_back(i, i + u.size);
    i += u.size;
  }
  return spans_of(text, matches);
}

enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// The non-empty pieces [start, end) the behaviour makes of the spans.
std::vector<std::pair<std::size_t, std::size_t>> split_spans(std::vector<Span> spans, Behavior behavior) {
  struct Out {
    std::size_t start, end;
    bool remove;
  };
  std::vector<Out> out;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::isolated:
      for (const Span& s : spans) out.push_back({s.start, s.end, false});
      break;
    case Behavior::removed:
      for (const Span& s : spans) out.push_back({s.start, s.end, s.is_match});
      break;
    case Behavior::contiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    case Behavior::merged_with_previous:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    case Behavior::merged_with_next:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty()) {
          out.back().start = it->start;
        } else {
          out.push_back({it->start, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  std::vector<std::pair<std::size_t, std::size_t>> pieces;
  for (const Out& o : out) {
    if (!o.remove && o.end > o.start) pieces.emplace_back(o.start, o.end);
  }
  return pieces;
}

Behavior parse_behavior(const Json& object, const Source& src, const std::string& path) {
  const std::string b = src.string_at(object, path, "behavior");
  if (b == "Removed") return Behavior::removed;
  if (b == "Isolated") return Behavior::isolated;
  if (b == "MergedWithPrevious") return Behavior::merged_with_previous;
  if (b == "MergedWithNext") return Behavior::merged_with_next;
  if (b == "Contiguous") return Behavior::contiguous;
  src.fail(path + ".behavior", "unknown split behavior \"" + b + "\"");
}

// A replacement character (Metaspace, Strip): exactly one code point.
char32_t one_char(const Json& object, const Source& src, const std::string& path, const char* key) {
  const std::string s = src.string_at(object, path, key);
  const Unit u = s.empty() ? Unit{0, 0, false} : unit_at(s, 0);
  if (!u.valid || u.size != s.size()) src.fail(path + "." + key, "expected a single character, got \"" + s + "\"");
  return u.cp;
}

std::string replace_all(std::string_view text, const Pattern& pattern, std::string_view content) {
  std::string out;
  for (const Span& s : spans_of(text, pattern.find_iter(text))) {
    if (s.is_match) {
      out += content;
    } else {
      out += text.substr(s.start, s.end - s.start);
    }
  }
  return out;
}

// ---- Normalizers ----------------------------------------------------------------------------------------------------

struct Normalizer {
  enum class Kind { unicode, prepend, replace, strip, lowercase } kind;
  utf8proc_option_t unicode_form{};  // unicode
  std::string text;                  // prepend: what; replace: the content
  Pattern pattern;                   // replace
  bool strip_left = false, strip_right = false;

  std::string apply(std::string s) const {
    switch (kind) {
      case Kind::unicode: return unicode_normalize(s, unicode_form);
      case Kind::prepend: return s.empty() ? s : text + s;
      case Kind::replace: return replace_all(s, pattern, text);
      case Kind::strip: {
        std::size_t begin = 0, end = s.size();
        if (strip_left) {
          while (begin < end && is_white_space(unit_at(s, begin))) begin += unit_at(s, begin).size;
        }
        if (strip_right) {
          while (end > begin && is_white_space(unit_before(s, end))) end -= unit_before(s, end).size;
        }
        return s.substr(begin, end - begin);
      }
      case Kind::lowercase: {
        std::string out;
        for (std::size_t i = 0; i < s.size();) {
          const Unit u = unit_at(s, i);
          if (!u.valid) {
            out += s[i];
          } else if (u.cp == 0x130) {  // the one unconditional multi-character lowercase mapping: İ -> i + U+0307
            out += "i\xCC\x87";
          } else {
            append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(u.cp))));
          }
          i += u.size;
        }
        return out;
      }
    }
    return s;
  }
};

void parse_normalizer(const Json& json, const Source& src, const std::string& path, std::vector<Normalizer>& out) {
  if (json.is_null()) return;
  const std::string type = src.type_of(json, path);
  Normalizer n{};
  const auto unicode = [&](utf8proc_option_t form) {
    n.kind = Normalizer::Kind::unicode;
    n.unicode_form = static_cast<utf8proc_option_t>(UTF8PROC_STABLE | form);
  };
  if (type == "Sequence") {
    const Json& list = src.require(json, path, "normalizers");
    if (!list.is_array()) src.fail(path + ".normalizers", "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i) {
      parse_normalizer(list[i], src, path + ".normalizers[" + std::to_string(i) + "]", out);
    }
    return;
  } else if (type == "NFC") {
    unicode(UTF8PROC_COMPOSE);
  } else if (type == "NFD") {
    unicode(UTF8PROC_DECOMPOSE);
  } else if (type == "NFKC") {
    unicode(static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
  } else if (type == "NFKD") {
    unicode(static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  } else if (type == "Prepend") {
    n.kind = Normalizer::Kind::prepend;
    n.text = src.string_at(json, path, "prepend");
  } else if (type == "Replace") {
    n.kind = Normalizer::Kind::replace;
    n.pattern = Pattern::parse(src.require(json, path, "pattern"), src, path + ".pattern");
    n.text = src.string_at(json, path, "content");
  } else if (type == "Strip") {
    n.kind = Normalizer::Kind::strip;
    n.strip_left = src.flag(json, path, "strip_left", true);
    n.strip_right = src.flag(json, path, "strip_right", true);
  } else if (type == "Lowercase") {
    n.kind = Normalizer::Kind::lowercase;
  } else {
    src.unsupported(path, type, "the normalizers NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip, Lowercase, Sequence");
  }
  out.push_back(std::move(n));
}

// ---- Pre-tokenizers -------------------------------------------------------------------------------------------------

constexpr const char* kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Piece {
  std::string text;
  bool at_origin;  // starts at byte 0 of the text given to encode() (Metaspace's prepend_scheme "first")
};

struct PreTokenizer {
  enum class Kind { byte_level, split, metaspace, digits } kind;
  bool add_prefix_space = false, use_regex = true;  // byte_level
  std::shared_ptr<const Regex> gpt2;                // byte_level with use_regex
  Pattern pattern;                                  // split
  Behavior behavior = Behavior::isolated;           // split
  bool invert = false;                              // split
  std::string replacement;                          // metaspace (UTF-8 of one character)
  enum class Prepend { always, first, never } prepend = Prepend::always;
  bool split_on_replacement = true;  // metaspace
  bool individual_digits = false;    // digits

  void apply(std::vector<Piece>& pieces) const {
    std::vector<Piece> out;
    const auto emit = [&out](const Piece& from, std::size_t start, std::size_t end) {
      out.push_back({from.text.substr(start, end - start), from.at_origin && start == 0});
    };
    for (Piece& p : pieces) {
      switch (kind) {
        case Kind::byte_level: {
          if (add_prefix_space && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, " ");
          std::vector<std::pair<std::size_t, std::size_t>> parts;
          if (use_regex) {
            parts = split_spans(spans_of(p.text, gpt2->find_iter(p.text)), Behavior::isolated);
          } else if (!p.text.empty()) {
            parts.emplace_back(0, p.text.size());
          }
          for (const auto& [start, end] : parts) {
            out.push_back({byte_alphabet().encode(std::string_view(p.text).substr(start, end - start)),
                           p.at_origin && start == 0});
          }
          break;
        }
        case Kind::split: {
          std::vector<Span> spans = spans_of(p.text, pattern.find_iter(p.text));
          if (invert) {
            for (Span& s : spans) s.is_match = !s.is_match;
          }
          for (const auto& [start, end] : split_spans(std::move(spans), behavior)) emit(p, start, end);
          break;
        }
        case Kind::metaspace: {
          std::string text;
          for (const char c : p.text) {
            if (c == ' ') {
              text += replacement;
            } else {
              text += c;
            }
          }
          const bool starts = text.compare(0, replacement.size(), replacement) == 0;
          if (!starts && (prepend == Prepend::always || (prepend == Prepend::first && p.at_origin))) {
            text.insert(0, replacement);
          }
          const Piece replaced{std::move(text), p.at_origin};
          if (!split_on_replacement) {
            if (!replaced.text.empty()) out.push_back(replaced);
            break;
          }
          const char32_t r = unit_at(replacement, 0).cp;
          const auto spans = spans_of_chars(replaced.text, [r](const Unit& u) { return u.valid && u.cp == r; });
          for (const auto& [start, end] : split_spans(spans, Behavior::merged_with_next)) emit(replaced, start, end);
          break;
        }
        case Kind::digits: {
          const auto spans = spans_of_chars(p.text, is_numeric);
          for (const auto& [start, end] :
               split_spans(spans, individual_digits ? Behavior::isolated : Behavior::contiguous)) {
            emit(p, start, end);
          }
          break;
        }
      }
    }
    pieces = std::move(out);
  }
};

void parse_pre_tokenizer(const Json& json, const Source& src, const std::string& path, std::vector<PreTokenizer>& out) {
  if (json.is_null()) return;
  const std::string type = src.type_of(json, path);
  PreTokenizer p{};
  if (type == "Sequence") {
    const Json& list = src.require(json, path, "pretokenizers");
    if (!list.is_array()) src.fail(path + ".pretokenizers", "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i) {
      parse_pre_tokenizer(list[i], src, path + ".pretokenizers[" + std::to_string(i) + "]", out);
    }
    return;
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::byte_level;
    p.add_prefix_space = src.flag(json, path, "add_prefix_space", true);
    p.use_regex = src.flag(json, path, "use_regex", true);
    if (p.use_regex) p.gpt2 = std::make_shared<const Regex>(kGpt2Regex, src, path);
  } else if (type == "Split") {
    p.kind = PreTokenizer::Kind::split;
    p.pattern = Pattern::parse(src.require(json, path, "pattern"), src, path + ".pattern");
    p.behavior = parse_behavior(json, src, path);
    p.invert = src.flag(json, path, "invert", false);
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::Kind::metaspace;
    append_utf8(p.replacement, one_char(json, src, path, "replacement"));
    std::string scheme = "always";
    if (json.contains("prepend_scheme") && !json["prepend_scheme"].is_null()) {
      scheme = src.string_at(json, path, "prepend_scheme");
    }
    // Files written before prepend_scheme existed say add_prefix_space; false means "never" (metaspace.rs).
    if (!src.flag(json, path, "add_prefix_space", true)) {
      if (scheme != "never" && json.contains("prepend_scheme") && !json["prepend_scheme"].is_null()) {
        src.fail(path, "add_prefix_space false does not match prepend_scheme \"" + scheme + "\"");
      }
      scheme = "never";
    }
    if (scheme == "always") {
      p.prepend = PreTokenizer::Prepend::always;
    } else if (scheme == "first") {
      p.prepend = PreTokenizer::Prepend::first;
    } else if (scheme == "never") {
      p.prepend = PreTokenizer::Prepend::never;
    } else {
      src.fail(path + ".prepend_scheme", "unknown prepend_scheme \"" + scheme + "\" (first, always or never)");
    }
    p.split_on_replacement = src.flag(json, path, "split", true);
  } else if (type == "Digits") {
    p.kind = PreTokenizer::Kind::digits;
    p.individual_digits = src.flag(json, path, "individual_digits", false);
  } else {
    src.unsupported(path, type, "the pre-tokenizers ByteLevel, Split, Metaspace, Digits, Sequence");
  }
  out.push_back(std::move(p));
}

// ---- Decoders -------------------------------------------------------------------------------------------------------

struct Token {
  std::string text;
  bool added;  // an added token: the ByteLevel decoder keeps its content as it is
};

struct Decoder {
  enum class Kind { byte_level, replace, byte_fallback, fuse, strip, metaspace } kind;
  Pattern pattern;          // replace
  std::string content;      // replace
  char32_t strip_char = 0;  // strip
  std::size_t strip_start = 0, strip_stop = 0;
  char32_t replacement = 0;  // metaspace
  bool prepend_never = false;

  // piece: decoding one token on its own, for piece(): no Strip, and Metaspace treats it as a later token.
  void apply(std::vector<Token>& tokens, bool piece) const {
    switch (kind) {
      case Kind::byte_level: {
        std::string bytes;
        for (const Token& t : tokens) bytes += t.added ? t.text : byte_alphabet().decode(t.text);
        tokens = {{std::move(bytes), false}};
        break;
      }
      case Kind::replace:
        for (Token& t : tokens) t.text = replace_all(t.text, pattern, content);
        break;
      case Kind::byte_fallback: {
        std::vector<Token> out;
        std::string run;  // bytes of consecutive <0xNN> tokens
        bool in_run = false;
        for (Token& t : tokens) {
          const std::string& s = t.text;
          const bool is_byte = s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>' &&
                               std::isxdigit(static_cast<unsigned char>(s[3])) &&
                               std::isxdigit(static_cast<unsigned char>(s[4]));
          if (is_byte) {
            run += static_cast<char>(std::stoi(s.substr(3, 2), nullptr, 16));
            in_run = true;
            continue;
          }
          if (in_run) {
            out.push_back({std::move(run), false});
            run.clear();
            in_run = false;
          }
          out.push_back(std::move(t));
        }
        if (in_run) out.push_back({std::move(run), false});
        tokens = std::move(out);
        break;
      }
      case Kind::fuse: {
        std::string all;
        for (const Token& t : tokens) all += t.text;
        tokens = {{std::move(all), false}};
        break;
      }
      case Kind::strip:
        if (piece) break;
        for (Token& t : tokens) {
          std::vector<Unit> units;
          for (std::size_t i = 0; i < t.text.size(); i += units.back().size) units.push_back(unit_at(t.text, i));
          const auto is_strip = [&](const Unit& u) { return u.valid && u.cp == strip_char; };
          std::size_t begin = 0, end = units.size();
          for (std::size_t i = 0; i < strip_start && i < units.size() && is_strip(units[i]); ++i) begin = i + 1;
          for (std::size_t i = 0; i < strip_stop && i < units.size() && is_strip(units[units.size() - 1 - i]); ++i) {
            end = units.size() - 1 - i;
          }
          std::size_t byte_begin = 0, byte_end = 0;  // the bytes of units [begin, max(begin, end))
          for (std::size_t i = 0; i < std::max(begin, end); ++i) (i < begin ? byte_begin : byte_end) += units[i].size;
          byte_end += byte_begin;
          t.text = t.text.substr(byte_begin, byte_end - byte_begin);
        }
        break;
      case Kind::metaspace:
        for (std::size_t k = 0; k < tokens.size(); ++k) {
          const bool drop = !piece && k == 0 && !prepend_never;  // metaspace.rs: the first token loses them all
          std::string out;
          const std::string& s = tokens[k].text;
          for (std::size_t i = 0; i < s.size();) {
            const Unit u = unit_at(s, i);
            if (u.valid && u.cp == replacement) {
              if (!drop) out += ' ';
            } else {
              out.append(s, i, u.size);
            }
            i += u.size;
          }
          tokens[k].text = std::move(out);
        }
        break;
    }
  }
};

void parse_decoder(const Json& json, const Source& src, const std::string& path, std::vector<Decoder>& out) {
  if (json.is_null()) return;
  const std::string type = src.type_of(json, path);
  Decoder d{};
  if (type == "Sequence") {
    const Json& list = src.require(json, path, "decoders");
    if (!list.is_array()) src.fail(path + ".decoders", "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i) {
      parse_decoder(list[i], src, path + ".decoders[" + std::to_string(i) + "]", out);
    }
    return;
  } else if (type == "ByteLevel") {
    d.kind = Decoder::Kind::byte_level;
  } else if (type == "Replace") {
    d.kind = Decoder::Kind::replace;
    d.pattern = Pattern::parse(src.require(json, path, "pattern"), src, path + ".pattern");
    d.content = src.string_at(json, path, "content");
  } else if (type == "ByteFallback") {
    d.kind = Decoder::Kind::byte_fallback;
  } else if (type == "Fuse") {
    d.kind = Decoder::Kind::fuse;
  } else if (type == "Strip") {
    d.kind = Decoder::Kind::strip;
    d.strip_char = one_char(json, src, path, "content");
    for (const char* key : {"start", "stop"}) {
      const Json& v = src.require(json, path, key);
      if (!v.is_number_unsigned()) src.fail(path + "." + key, "expected a non-negative integer");
      (std::string(key) == "start" ? d.strip_start : d.strip_stop) = v.get<std::size_t>();
    }
  } else if (type == "Metaspace") {
    d.kind = Decoder::Kind::metaspace;
    d.replacement = one_char(json, src, path, "replacement");
    std::string scheme = "always";
    if (json.contains("prepend_scheme") && !json["prepend_scheme"].is_null()) {
      scheme = src.string_at(json, path, "prepend_scheme");
    }
    if (!src.flag(json, path, "add_prefix_space", true)) scheme = "never";
    d.prepend_never = scheme == "never";
  } else {
    src.unsupported(path, type, "the decoders ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence");
  }
  out.push_back(std::move(d));
}

std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
}

}  // namespace

// ---- The tokenizer -----------------------------------------------------------------------------------------------

struct HfTokenizer::Impl {
  struct AddedToken {
    std::int32_t id;
    std::string content;
    bool single_word, lstrip, rstrip, normalized, special;
  };
  // Leftmost-longest matching of a set of added tokens (a byte trie; the sets are small).
  struct Matcher {
    struct Node {
      std::unordered_map<unsigned char, std::int32_t> next;
      std::int32_t token = -1;  // index into added
    };
    std::vector<Node> nodes{1};
    bool empty() const { return nodes.size() == 1; }
    void add(std::string_view s, std::int32_t token) {
      std::int32_t at = 0;
      for (const char c : s) {
        const auto it = nodes[at].next.find(static_cast<unsigned char>(c));
        if (it != nodes[at].next.end()) {
          at = it->second;
        } else {
          nodes.emplace_back();
          const auto fresh = static_cast<std::int32_t>(nodes.size() - 1);
          nodes[at].next.emplace(static_cast<unsigned char>(c), fresh);
          at = fresh;
        }
      }
      nodes[at].token = token;
    }
    // The longest token starting at `pos`: (end, index), or index -1.
    std::pair<std::size_t, std::int32_t> longest(std::string_view text, std::size_t pos) const {
      std::pair<std::size_t, std::int32_t> best{pos, -1};
      std::int32_t at = 0;
      for (std::size_t i = pos; i < text.size(); ++i) {
        const auto it = nodes[at].next.find(static_cast<unsigned char>(text[i]));
        if (it == nodes[at].next.end()) break;
        at = it->second;
        if (nodes[at].token >= 0) best = {i + 1, nodes[at].token};
      }
      return best;
    }
  };
  struct Segment {
    std::size_t start, end;
    std::int32_t token;  // index into added, or -1 for text
  };
  struct Merge {
    std::uint32_t rank;
    std::int32_t result;
  };

  std::string kind;
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<Decoder> decoders;

  // The BPE model.
  std::unordered_map<std::string, std::int32_t> vocab;
  std::vector<std::string> token_of_id;  // the model's tokens; added tokens are in added
  std::vector<bool> model_has_id;
  std::unordered_map<std::uint64_t, Merge> merges;
  std::string unk_token;  // empty: none
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string subword_prefix, word_suffix;
  std::array<std::int32_t, 256> byte_tokens{};  // <0xNN>, -1 where absent

  std::vector<AddedToken> added;
  std::unordered_map<std::int32_t, std::int32_t> added_of_id;   // id -> index into added
  std::unordered_map<std::string, std::int32_t> added_of_text;  // content -> index into added
  Matcher raw_matcher, normalized_matcher;

  std::int64_t vocab_size = 0;
  std::vector<std::int64_t> prefix;
  std::optional<std::int64_t> bos;

  static constexpr std::size_t kCacheLimit = 1 << 16, kCacheWordLimit = 256;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache;

  std::vector<Segment> split_added(std::string_view text, const Matcher& matcher) const;
  void tokenize_word(std::string_view word, std::vector<std::int64_t>& out) const;
  std::vector<std::int32_t> merge_word(std::string_view word) const;
  Token token(std::int64_t id) const;
  std::string run_decoders(std::vector<Token> tokens, bool piece) const;
};

// AddedVocabulary::find_matches: leftmost-longest matches; a single_word token must not touch a word character;
// lstrip and rstrip take the whitespace next to the token into its match.
std::vector<HfTokenizer::Impl::Segment> HfTokenizer::Impl::split_added(std::string_view text,
                                                                       const Matcher& matcher) const {
  std::vector<Segment> segments;
  if (matcher.empty()) {
    if (!text.empty()) segments.push_back({0, text.size(), -1});
    return segments;
  }
  std::size_t done = 0;  // the end of the previous token's match
  for (std::size_t pos = 0; pos < text.size();) {
    const auto [match_end, index] = matcher.longest(text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    std::size_t start = pos, stop = match_end;
    pos = match_end;
    const AddedToken& t = added[index];
    if (t.single_word) {
      const bool left_ok = start == 0 || !is_word_char(unit_before(text, start));
      const bool right_ok = stop == text.size() || !is_word_char(unit_at(text, stop));
      if (!left_ok || !right_ok) continue;
    }
    if (t.lstrip) {
      std::size_t s = start;
      while (s > 0 && is_white_space(unit_before(text, s))) s -= unit_before(text, s).size;
      start = std::max(s, done);
    }
    if (t.rstrip) {
      while (stop < text.size() && is_white_space(unit_at(text, stop))) stop += unit_at(text, stop).size;
      pos = stop;
    }
    if (done < start) segments.push_back({done, start, -1});
    segments.push_back({start, stop, index});
    done = stop;
  }
  if (done < text.size()) segments.push_back({done, text.size(), -1});
  return segments;
}

// BPE::merge_word followed by Word::merge_all.
std::vector<std::int32_t> HfTokenizer::Impl::merge_word(std::string_view word) const {
  struct Symbol {
    std::int32_t id;
    std::int32_t prev, next;
    bool removed;
  };
  std::vector<Symbol> symbols;
  const auto add = [&symbols](std::int32_t id) {
    const auto n = static_cast<std::int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, false});
  };
  std::int32_t unk = -1;  // a pending unk symbol, or -1 (fuse_unk joins the next unknown characters into it)
  for (std::size_t i = 0; i < word.size();) {
    const Unit u = unit_at(word, i);
    const bool first = i == 0, last = i + u.size == word.size();
    std::string s(word.substr(i, u.size));
    i += u.size;
    if (!first) s = subword_prefix + s;
    if (last) s += word_suffix;
    if (const auto it = vocab.find(s); it != vocab.end()) {
      if (unk >= 0) add(unk);
      unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback &&
        std::all_of(s.begin(), s.end(), [this](char b) { return byte_tokens[static_cast<unsigned char>(b)] >= 0; })) {
      for (const char b : s) add(byte_tokens[static_cast<unsigned char>(b)]);
      continue;
    }
    if (unk_token.empty()) continue;  // no unk: the Rust library drops the character
    const auto it = vocab.find(unk_token);
    if (it == vocab.end()) throw Error("tokenizer: unk_token \"" + unk_token + "\" is not in the vocabulary");
    if (unk >= 0 && !fuse_unk) add(unk);
    unk = it->second;
  }
  if (unk >= 0) add(unk);

  struct Candidate {
    std::uint32_t rank;
    std::int32_t pos;
    std::int32_t result;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push = [&](std::int32_t left) {
    const std::int32_t right = symbols[left].next;
    const auto it = merges.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges.end()) queue.push({it->second.rank, left, it->second.result});
  };
  for (std::int32_t i = 0; i + 1 < static_cast<std::int32_t>(symbols.size()); ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.removed || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    // A queued pair is stale unless the pair now there still merges into the same token (word.rs's check).
    const auto it = merges.find(pair_key(left.id, right.id));
    if (it == merges.end() || it->second.result != top.result) continue;
    left.id = top.result;
    right.removed = true;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) push(left.prev);
    if (left.next >= 0) push(top.pos);
  }
  std::vector<std::int32_t> ids;
  for (const Symbol& s : symbols) {
    if (!s.removed) ids.push_back(s.id);
  }
  return ids;
}

void HfTokenizer::Impl::tokenize_word(std::string_view word, std::vector<std::int64_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    if (const auto it = vocab.find(std::string(word)); it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheWordLimit;
  std::string key;
  if (cacheable) {
    key.assign(word);
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (const auto it = cache.find(key); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::int32_t> ids = merge_word(word);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kCacheLimit) cache.clear();
    cache.emplace(std::move(key), std::move(ids));
  }
}

Token HfTokenizer::Impl::token(std::int64_t id) const {
  if (id >= 0 && id <= INT32_MAX) {
    if (const auto it = added_of_id.find(static_cast<std::int32_t>(id)); it != added_of_id.end()) {
      return {added[it->second].content, true};
    }
    if (id < static_cast<std::int64_t>(model_has_id.size()) && model_has_id[id]) return {token_of_id[id], false};
  }
  throw Error("token id " + std::to_string(id) + " is not in the tokenizer's vocabulary (ids 0.." +
              std::to_string(vocab_size - 1) + ")");
}

std::string HfTokenizer::Impl::run_decoders(std::vector<Token> tokens, bool piece) const {
  std::string text;
  if (decoders.empty()) {  // tokenizer.rs: without a decoder the tokens are joined by spaces
    for (std::size_t i = 0; i < tokens.size(); ++i) text += (i ? " " : "") + tokens[i].text;
    return text;
  }
  for (const Decoder& d : decoders) d.apply(tokens, piece);
  for (const Token& t : tokens) text += t.text;
  return text;
}

// ---- Loading ------------------------------------------------------------------------------------------------------

std::shared_ptr<const HfTokenizer> HfTokenizer::load(const std::filesystem::path& tokenizer_json,
                                                     const std::filesystem::path& tokenizer_config) {
  const Source src{tokenizer_json.string()};
  const Json root = parse_json(tokenizer_json);
  if (!root.is_object()) src.fail("", "expected a JSON object at the top");
  auto impl = std::make_unique<Impl>();

  // The model.
  const Json& model = src.require(root, "", "model");
  std::string model_type;
  if (model.is_object() && model.contains("type")) {
    model_type = src.type_of(model, "model");
  } else if (model.is_object() && model.contains("merges")) {
    model_type = "BPE";  // files of early versions leave the type out
  } else {
    model_type = model.is_object() && model.contains("vocab") && model["vocab"].is_array() ? "Unigram" : "unknown";
  }
  if (model_type != "BPE") {
    src.fail("model.type", "\"" + model_type + "\" is not supported (lminv reads BPE models only)");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      !(model["dropout"].is_number() && model["dropout"].get<double>() == 0.0)) {
    src.fail("model.dropout", "BPE dropout " + model["dropout"].dump() + " is not supported (only null or 0)");
  }
  const Json& vocab = src.require(model, "model", "vocab");
  if (!vocab.is_object() || vocab.empty()) src.fail("model.vocab", "expected a non-empty object of token -> id");
  std::int64_t max_id = -1;
  impl->vocab.reserve(vocab.size());
  for (const auto& [token, value] : vocab.items()) {
    // Tables are indexed by id: an id far past any real vocabulary (2^24 and up) is refused, not allocated for.
    if (!value.is_number_integer() || value.get<std::int64_t>() < 0 || value.get<std::int64_t>() >= (1 << 24)) {
      src.fail("model.vocab", "the id of " + Json(token).dump() + " is not an integer in [0, 16777215]");
    }
    impl->vocab.emplace(token, static_cast<std::int32_t>(value.get<std::int64_t>()));
    max_id = std::max(max_id, value.get<std::int64_t>());
  }
  impl->token_of_id.assign(static_cast<std::size_t>(max_id) + 1, std::string());
  impl->model_has_id.assign(static_cast<std::size_t>(max_id) + 1, false);
  for (const auto& [token, id] : impl->vocab) {
    if (impl->model_has_id[id]) src.fail("model.vocab", "id " + std::to_string(id) + " is given to two tokens");
    impl->model_has_id[id] = true;
    impl->token_of_id[id] = token;
  }
  const auto optional_string = [&](const char* key) -> std::string {
    if (!model.contains(key) || model[key].is_null()) return "";
    return src.string_at(model, "model", key);
  };
  impl->unk_token = optional_string("unk_token");
  impl->subword_prefix = optional_string("continuing_subword_prefix");
  impl->word_suffix = optional_string("end_of_word_suffix");
  impl->fuse_unk = src.flag(model, "model", "fuse_unk", false);
  impl->byte_fallback = src.flag(model, "model", "byte_fallback", false);
  impl->ignore_merges = src.flag(model, "model", "ignore_merges", false);
  impl->byte_tokens.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    if (const auto it = impl->vocab.find(name); it != impl->vocab.end()) impl->byte_tokens[b] = it->second;
  }

  // Merges: "a b" (split at the one space) or ["a", "b"]; the rank is the position; a pair given twice keeps the
  // last (the Rust library collects them into a map).
  const Json& merges = src.require(model, "model", "merges");
  if (!merges.is_array()) src.fail("model.merges", "expected an array");
  impl->merges.reserve(merges.size());
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const Json& m = merges[rank];
    const std::string where = "model.merges[" + std::to_string(rank) + "]";
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const std::size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        src.fail(where, "expected two tokens separated by one space, got " + m.dump());
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      src.fail(where, "expected \"a b\" or [\"a\", \"b\"], got " + m.dump().substr(0, 80));
    }
    if (right.compare(0, impl->subword_prefix.size(), impl->subword_prefix) != 0) {
      src.fail(where, "the right token " + Json(right).dump() + " lacks the continuing_subword_prefix");
    }
    const std::string merged = left + right.substr(impl->subword_prefix.size());
    std::int32_t ids[3];
    const std::string* parts[3] = {&left, &right, &merged};
    for (int k = 0; k < 3; ++k) {
      const auto it = impl->vocab.find(*parts[k]);
      if (it == impl->vocab.end()) src.fail(where, "the token " + Json(*parts[k]).dump() + " is not in model.vocab");
      ids[k] = it->second;
    }
    impl->merges[pair_key(ids[0], ids[1])] = Impl::Merge{static_cast<std::uint32_t>(rank), ids[2]};
  }

  // Added tokens.
  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
    const Json& list = root["added_tokens"];
    if (!list.is_array()) src.fail("added_tokens", "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      const Json& t = list[i];
      const Json& id = src.require(t, where, "id");
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= (1 << 24)) {
        src.fail(where + ".id", "expected an integer in [0, 16777215]");
      }
      Impl::AddedToken a{static_cast<std::int32_t>(id.get<std::int64_t>()),
                         src.string_at(t, where, "content"),
                         src.flag(t, where, "single_word", false),
                         src.flag(t, where, "lstrip", false),
                         src.flag(t, where, "rstrip", false),
                         false,
                         src.flag(t, where, "special", false)};
      a.normalized = src.flag(t, where, "normalized", !a.special);
      if (a.content.empty()) continue;  // the Rust library ignores empty added tokens
      const auto index = static_cast<std::int32_t>(impl->added.size());
      impl->added_of_id[a.id] = index;
      impl->added_of_text[a.content] = index;
      impl->added.push_back(std::move(a));
    }
  }

  // The pipeline.
  if (root.contains("normalizer")) parse_normalizer(root["normalizer"], src, "normalizer", impl->normalizers);
  if (root.contains("pre_tokenizer")) {
    parse_pre_tokenizer(root["pre_tokenizer"], src, "pre_tokenizer", impl->pre_tokenizers);
  }
  if (root.contains("decoder")) parse_decoder(root["decoder"], src, "decoder", impl->decoders);

  // Normalized added tokens are matched after normalization, in their normalized form.
  for (std::size_t i = 0; i < impl->added.size(); ++i) {
    const Impl::AddedToken& a = impl->added[i];
    if (!a.normalized) {
      impl->raw_matcher.add(a.content, static_cast<std::int32_t>(i));
    } else {
      std::string form = a.content;
      for (const Normalizer& n : impl->normalizers) form = n.apply(std::move(form));
      if (!form.empty()) impl->normalized_matcher.add(form, static_cast<std::int32_t>(i));
    }
  }

  for (const auto& a : impl->added) max_id = std::max<std::int64_t>(max_id, a.id);
  impl->vocab_size = max_id + 1;

  const auto id_of_token = [&](const std::string& token) -> std::optional<std::int64_t> {
    if (const auto it = impl->added_of_text.find(token); it != impl->added_of_text.end()) {
      return impl->added[it->second].id;
    }
    if (const auto it = impl->vocab.find(token); it != impl->vocab.end()) return it->second;
    return std::nullopt;
  };

  // The post-processor: what it puts before sequence A.
  std::vector<std::int64_t> template_prefix;
  std::function<void(const Json&, const std::string&)> post = [&](const Json& p, const std::string& path) {
    if (p.is_null()) return;
    const std::string type = src.type_of(p, path);
    if (type == "Sequence") {
      const Json& list = src.require(p, path, "processors");
      if (!list.is_array()) src.fail(path + ".processors", "expected an array");
      for (std::size_t i = 0; i < list.size(); ++i) post(list[i], path + ".processors[" + std::to_string(i) + "]");
    } else if (type == "TemplateProcessing") {
      const Json& single = src.require(p, path, "single");
      if (!single.is_array()) src.fail(path + ".single", "expected an array of template pieces");
      const Json& specials = p.contains("special_tokens") ? p["special_tokens"] : Json::object();
      for (std::size_t i = 0; i < single.size(); ++i) {
        const std::string where = path + ".single[" + std::to_string(i) + "]";
        if (single[i].contains("Sequence")) break;
        const std::string name = src.string_at(src.require(single[i], where, "SpecialToken"), where, "id");
        const auto it = specials.find(name);
        if (it == specials.end() || !it->contains("ids") || !(*it)["ids"].is_array()) {
          src.fail(where, "the special token " + Json(name).dump() + " has no ids in " + path + ".special_tokens");
        }
        for (const Json& id : (*it)["ids"]) {
          if (!id.is_number_integer()) src.fail(path + ".special_tokens", "ids must be integers");
          template_prefix.push_back(id.get<std::int64_t>());
        }
      }
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
      const Json& cls = src.require(p, path, "cls");
      if (!cls.is_array() || cls.size() != 2 || !cls[1].is_number_integer()) {
        src.fail(path + ".cls", "expected [token, id]");
      }
      template_prefix.push_back(cls[1].get<std::int64_t>());
    } else if (type != "ByteLevel") {
      src.unsupported(path, type,
                      "the post-processors TemplateProcessing, ByteLevel, RobertaProcessing, "
                      "BertProcessing, Sequence");
    }
  };
  if (root.contains("post_processor")) post(root["post_processor"], "post_processor");

  // tokenizer_config.json: bos_token, and add_bos_token overriding the template (as transformers'
  // update_post_processor does).
  std::optional<bool> add_bos;
  std::error_code ec;
  if (!tokenizer_config.empty() && std::filesystem::exists(tokenizer_config, ec)) {
    const Source config_src{tokenizer_config.string()};
    const Json config = parse_json(tokenizer_config);
    if (!config.is_object()) config_src.fail("", "expected a JSON object at the top");
    if (config.contains("add_bos_token") && !config["add_bos_token"].is_null()) {
      add_bos = config_src.flag(config, "", "add_bos_token", false);
    }
    if (config.contains("bos_token") && !config["bos_token"].is_null()) {
      const Json& b = config["bos_token"];
      std::string name;
      if (b.is_string()) {
        name = b.get<std::string>();
      } else if (b.is_object() && b.contains("content") && b["content"].is_string()) {
        name = b["content"].get<std::string>();
      } else {
        config_src.fail("bos_token", "expected a string or {\"content\": ...}, got " + b.dump().substr(0, 80));
      }
      impl->bos = id_of_token(name);
      if (!impl->bos && add_bos.value_or(false)) {
        config_src.fail("bos_token",
                        "add_bos_token is true but " + Json(name).dump() + " is not a token of '" + src.file + "'");
      }
    }
  }
  if (add_bos) {
    if (*add_bos && !impl->bos) {
      throw Error("tokenizer '" + tokenizer_config.string() + "': add_bos_token is true but there is no bos_token");
    }
    impl->prefix = *add_bos ? std::vector<std::int64_t>{*impl->bos} : std::vector<std::int64_t>{};
  } else {
    impl->prefix = template_prefix;
  }

  const bool byte_level = std::any_of(impl->pre_tokenizers.begin(), impl->pre_tokenizers.end(),
                                      [](const PreTokenizer& p) { return p.kind == PreTokenizer::Kind::byte_level; }) ||
                          std::any_of(impl->decoders.begin(), impl->decoders.end(),
                                      [](const Decoder& d) { return d.kind == Decoder::Kind::byte_level; });
  const bool sentencepiece =
      impl->byte_fallback ||
      std::any_of(impl->pre_tokenizers.begin(), impl->pre_tokenizers.end(),
                  [](const PreTokenizer& p) { return p.kind == PreTokenizer::Kind::metaspace; }) ||
      std::any_of(impl->decoders.begin(), impl->decoders.end(), [](const Decoder& d) {
        return d.kind == Decoder::Kind::metaspace || d.kind == Decoder::Kind::byte_fallback;
      });
  impl->kind = byte_level ? "hf-bpe-bytelevel" : sentencepiece ? "hf-bpe-sentencepiece" : "hf-bpe";
  return std::shared_ptr<const HfTokenizer>(new HfTokenizer(std::move(impl)));
}

HfTokenizer::HfTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HfTokenizer::~HfTokenizer() = default;

// ---- Encoding and decoding ----------------------------------------------------------------------------------------

std::vector<std::int64_t> HfTokenizer::encode(std::string_view text) const {
  const Impl& m = *impl_;
  std::vector<std::int64_t> ids;
  ids.reserve(text.size() / 3 + 1);
  for (const Impl::Segment& section : m.split_added(text, m.raw_matcher)) {
    if (section.token >= 0) {
      ids.push_back(m.added[section.token].id);
      continue;
    }
    std::string normalized(text.substr(section.start, section.end - section.start));
    for (const Normalizer& n : m.normalizers) normalized = n.apply(std::move(normalized));
    for (const Impl::Segment& part : m.split_added(normalized, m.normalized_matcher)) {
      if (part.token >= 0) {
        ids.push_back(m.added[part.token].id);
        continue;
      }
      std::vector<Piece> pieces{
          {normalized.substr(part.start, part.end - part.start), section.start == 0 && part.start == 0}};
      for (const PreTokenizer& p : m.pre_tokenizers) p.apply(pieces);
      for (const Piece& piece : pieces) m.tokenize_word(piece.text, ids);
    }
  }
  return ids;
}

std::string HfTokenizer::decode(const std::vector<std::int64_t>& ids) const {
  std::vector<Token> tokens;
  tokens.reserve(ids.size());
  for (const std::int64_t id : ids) tokens.push_back(impl_->token(id));
  return impl_->run_decoders(std::move(tokens), false);
}

std::string HfTokenizer::piece(std::int64_t id) const {
  return impl_->run_decoders({impl_->token(id)}, true);
}

std::int64_t HfTokenizer::vocab_size() const {
  return impl_->vocab_size;
}

std::int64_t HfTokenizer::id_of(std::string_view token) const {
  const std::string key(token);
  if (const auto it = impl_->added_of_text.find(key); it != impl_->added_of_text.end()) {
    return impl_->added[it->second].id;
  }
  const auto it = impl_->vocab.find(key);
  return it == impl_->vocab.end() ? -1 : it->second;
}

const std::vector<std::int64_t>& HfTokenizer::special_prefix() const {
  return impl_->prefix;
}

std::optional<std::int64_t> HfTokenizer::bos_id() const {
  return impl_->bos;
}

const std::string& HfTokenizer::kind() const {
  return impl_->kind;
}

}  // namespace lminv
