#include "prompts.hpp"
#include "files.hpp"
#include "json_depth.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>
#include <string_view>
#include <unordered_set>

#include "lminv/error.hpp"
#include "lminv/rng.hpp"
#include "report.hpp"

namespace lminv {

namespace fs = std::filesystem;

namespace {

// ASCII whitespace only: the locale must not change where a sentence ends.
bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), is_space);
}

std::string where(const fs::path& file, std::int64_t line) {
  return file.string() + ":" + std::to_string(line) + ": ";
}

// The ids of a JSON line's "ids", checked.
std::vector<std::int64_t> ids_of(const nlohmann::json& ids, const std::string& at, std::int64_t vocab_size) {
  if (!ids.is_array()) throw Error(at + "\"ids\" must be an array of integer token ids, not " + ids.dump());
  std::vector<std::int64_t> out;
  out.reserve(ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    const nlohmann::json& id = ids[k];
    if (!id.is_number_integer())
      throw Error(at + "\"ids\"[" + std::to_string(k) + "] = " + id.dump() + " is not an integer token id");
    const bool too_big = id.is_number_unsigned() && id.get<std::uint64_t>() >= static_cast<std::uint64_t>(vocab_size);
    const std::int64_t value = too_big ? vocab_size : id.get<std::int64_t>();
    if (too_big || value < 0)
      throw Error(at + "\"ids\"[" + std::to_string(k) + "] = " + id.dump() + " is outside the vocabulary [0, " +
                  std::to_string(vocab_size) + ")");
    out.push_back(value);
  }
  return out;
}

void check_text_ids(const std::vector<std::int64_t>& ids, const std::string& at, std::int64_t vocab_size) {
  const auto outside = std::find_if(ids.begin(), ids.end(), [vocab_size](std::int64_t id) { return id >= vocab_size; });
  if (outside != ids.end())
    throw Error(at + "the text has token id " + std::to_string(*outside) + ", outside the vocabulary [0, " +
                std::to_string(vocab_size) + ")");
}

PromptEntry parse_json_line(const std::string& line, const std::string& at, const Tokenizer& tokenizer,
                            std::int64_t vocab_size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line, json_depth_limit(at.substr(0, at.size() - 2)));
  } catch (const nlohmann::json::exception& e) {
    throw Error(at + "invalid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(at + "invalid JSON: a line starting with '{' must hold one JSON object");
  const bool has_ids = j.contains("ids"), has_text = j.contains("text");
  if (!has_ids && !has_text) throw Error(at + "the JSON object has neither \"ids\" nor \"text\"");
  PromptEntry entry;
  if (has_text) {
    if (!j["text"].is_string()) throw Error(at + "\"text\" must be a string, not " + j["text"].dump());
    entry.text = j["text"].get<std::string>();
  }
  if (has_ids) {
    entry.ids = ids_of(j["ids"], at, vocab_size);
    if (entry.ids.empty()) throw Error(at + "empty prompt: \"ids\" is []");
    if (!has_text) entry.text = tokenizer.decode(entry.ids);
    entry.kind = "ids";
  } else {
    entry.ids = tokenizer.encode(entry.text);
    entry.from_text = true;
    if (entry.ids.empty()) throw Error(at + "empty prompt: \"text\" has no tokens");
    check_text_ids(entry.ids, at, vocab_size);
    entry.kind = "text";
  }
  if (j.contains("kind")) {
    if (!j["kind"].is_string()) throw Error(at + "\"kind\" must be a string, not " + j["kind"].dump());
    entry.kind = j["kind"].get<std::string>();
  }
  return entry;
}

// ---- make_prompts --------------------------------------------------------------------------------------------------

struct CorpusFile {
  fs::path path;
  std::string name;  // the file name, for "source"
};

std::vector<CorpusFile> corpus_files(const std::vector<fs::path>& corpus) {
  std::vector<CorpusFile> files;
  for (const fs::path& p : corpus) {
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      // Regular files only: a symlink in the folder (Debian's GPL -> GPL-3) would repeat another file.
      std::vector<fs::path> in_folder;
      for (const fs::directory_entry& e : fs::directory_iterator(p))
        if (e.is_regular_file() && !e.is_symlink()) in_folder.push_back(e.path());
      std::sort(in_folder.begin(), in_folder.end(),
                [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });
      if (in_folder.empty()) throw Error("corpus folder " + p.string() + ": no regular files in it");
      std::transform(in_folder.begin(), in_folder.end(), std::back_inserter(files), [](const fs::path& f) {
        return CorpusFile{f, f.filename().string()};
      });
    } else if (fs::is_regular_file(p, ec)) {
      files.push_back({p, p.filename().string()});
    } else {
      throw Error("corpus " + p.string() + ": no such file or folder");
    }
  }
  return files;
}

std::string read_whole(const fs::path& file) {
  return read_regular_file(file, "the corpus file", max_bytes::kPrompts);
}

// Paragraphs (split at blank lines), each with its whitespace runs collapsed to one space and trimmed.
std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (is_blank(line)) {
      if (!current.empty()) out.push_back(std::move(current));
      current.clear();
      continue;
    }
    for (char c : line) {
      if (is_space(c)) {
        if (!current.empty() && current.back() != ' ') current += ' ';
      } else {
        current += c;
      }
    }
    if (!current.empty() && current.back() != ' ') current += ' ';
  }
  if (!current.empty()) out.push_back(std::move(current));
  for (std::string& p : out)
    if (!p.empty() && p.back() == ' ') p.pop_back();
  return out;
}

// A '.' after one of these does not end a sentence (compared in lower case).
bool is_abbreviation(std::string word) {
  while (!word.empty() && (word.front() == '(' || word.front() == '"' || word.front() == '\'')) word.erase(0, 1);
  std::transform(word.begin(), word.end(), word.begin(),
                 [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; });
  static const char* const kAbbreviations[] = {"e.g.", "i.e.", "inc.", "cf.", "vs.", "mr.", "mrs.", "dr."};
  return std::find(std::begin(kAbbreviations), std::end(kAbbreviations), word) != std::end(kAbbreviations);
}

// The sentences of one collapsed paragraph: each ends at '.', '!' or '?', then any closing quotes or brackets, then a
// space or the paragraph's end; the paragraph's end also ends its last sentence.
std::vector<std::string> sentences(const std::string& p) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] != '.' && p[i] != '!' && p[i] != '?') continue;
    std::size_t end = i + 1;
    while (end < p.size() && std::string_view("\"')]}").find(p[end]) != std::string_view::npos) ++end;
    if (end < p.size() && p[end] != ' ') continue;
    if (p[i] == '.') {
      const std::size_t word_start = p.rfind(' ', i);
      const std::size_t from = word_start == std::string::npos || word_start < start ? start : word_start + 1;
      if (is_abbreviation(p.substr(from, i + 1 - from))) continue;
    }
    out.push_back(p.substr(start, end - start));
    start = end + 1;
    i = end;
  }
  if (start < p.size()) out.push_back(p.substr(start));
  return out;
}

struct Sentence {
  std::string source;  // "GPL-3 (sentence 12)"
  std::vector<std::int64_t> ids;
};

}  // namespace

std::vector<PromptEntry> read_prompt_file(const fs::path& file, const Tokenizer& tokenizer, std::int64_t vocab_size,
                                          const std::vector<std::int64_t>& text_prefix,
                                          const std::vector<std::int64_t>& ids_prefix) {
  if (vocab_size <= 0)
    throw Error(file.string() + ": vocabulary size " + std::to_string(vocab_size) + " is not positive");
  std::istringstream in(read_regular_file(file, "the prompt file", max_bytes::kPrompts));
  std::vector<PromptEntry> entries;
  std::int64_t number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (is_blank(line) || line[0] == '#') continue;
    const std::string at = where(file, number);
    PromptEntry entry;
    if (line[0] == '{') {
      entry = parse_json_line(line, at, tokenizer, vocab_size);
    } else {
      entry.text = line;
      entry.ids = tokenizer.encode(line);
      entry.from_text = true;
      if (entry.ids.empty()) throw Error(at + "empty prompt: the line has no tokens");
      check_text_ids(entry.ids, at, vocab_size);
      entry.kind = "text";
    }
    const std::vector<std::int64_t>& prefix = entry.from_text ? text_prefix : ids_prefix;
    entry.ids.insert(entry.ids.begin(), prefix.begin(), prefix.end());
    entry.line = number;
    entries.push_back(std::move(entry));
  }
  if (in.bad()) throw Error(file.string() + ": cannot read the prompt file");
  if (entries.empty()) throw Error(file.string() + ": no prompts in the file (every line is blank or a comment)");
  return entries;
}

fs::path default_prompt_corpus() {
  return "/usr/share/common-licenses";
}

void make_prompts(const MakePromptsRequest& request, const Tokenizer& tokenizer, std::ostream& log) {
  if (request.out.empty()) throw Error("prompts: no output file");
  if (request.count < 1) throw Error("prompts: count " + std::to_string(request.count) + " must be at least 1");
  if (request.tokens < 1) throw Error("prompts: tokens " + std::to_string(request.tokens) + " must be at least 1");
  if (!(request.random_fraction >= 0 && request.random_fraction <= 1))
    throw Error("prompts: random fraction " + std::to_string(request.random_fraction) + " must lie in [0, 1]");
  const std::int64_t vocab_size = tokenizer.vocab_size();
  const std::vector<fs::path> corpus =
      request.corpus.empty() ? std::vector<fs::path>{default_prompt_corpus()} : request.corpus;
  const auto n_sentences =
      static_cast<std::int64_t>(std::llround(static_cast<double>(request.count) * (1.0 - request.random_fraction)));
  const std::int64_t n_random = request.count - n_sentences;
  const auto tokens = static_cast<std::size_t>(request.tokens);

  // Candidates: every distinct sentence with enough tokens, in corpus order.
  std::vector<Sentence> candidates;
  const std::vector<CorpusFile> files = n_sentences > 0 ? corpus_files(corpus) : std::vector<CorpusFile>{};
  std::unordered_set<std::string> seen;
  for (const CorpusFile& f : files) {
    std::int64_t index = 0;
    for (const std::string& p : paragraphs(read_whole(f.path)))
      for (const std::string& s : sentences(p)) {
        ++index;
        if (s.size() < tokens || !seen.insert(s).second) continue;  // a token is at least one byte
        std::vector<std::int64_t> ids = tokenizer.encode(s);
        if (ids.size() < tokens) continue;
        ids.resize(tokens);
        candidates.push_back({f.name + " (sentence " + std::to_string(index) + ")", std::move(ids)});
      }
  }
  if (static_cast<std::int64_t>(candidates.size()) < n_sentences) {
    std::string names;
    for (const fs::path& p : corpus) names += (names.empty() ? "" : ", ") + p.string();
    throw Error("corpus " + names + ": " + std::to_string(candidates.size()) + " distinct sentences of at least " +
                std::to_string(request.tokens) + " tokens, but " + std::to_string(n_sentences) +
                " are needed (lower --count, --tokens or raise --random-fraction)");
  }

  const Rng rng(request.seed);
  struct Entry {
    std::string kind, source;
    std::vector<std::int64_t> ids;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<std::size_t>(request.count));
  // Without replacement: a partial Fisher-Yates shuffle of the candidates' positions.
  Rng pick = rng.fork("sentences");
  std::vector<std::size_t> order(candidates.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (std::size_t i = 0; i < static_cast<std::size_t>(n_sentences); ++i) {
    std::swap(order[i], order[i + pick.below(order.size() - i)]);
    const Sentence& s = candidates[order[i]];
    entries.push_back({"sentence", s.source, s.ids});
  }
  Rng random = rng.fork("random");
  for (std::int64_t r = 0; r < n_random; ++r) {
    Entry e{"random", "uniform random ids in [0, " + std::to_string(vocab_size) + ")", {}};
    for (std::size_t t = 0; t < tokens; ++t)
      e.ids.push_back(static_cast<std::int64_t>(random.below(static_cast<std::uint64_t>(vocab_size))));
    entries.push_back(std::move(e));
  }
  Rng shuffle = rng.fork("shuffle");
  for (std::size_t i = entries.size(); i > 1; --i) std::swap(entries[i - 1], entries[shuffle.below(i)]);

  std::string content;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    nlohmann::ordered_json line;
    line["id"] = i;
    line["kind"] = entries[i].kind;
    line["text"] = tokenizer.decode(entries[i].ids);
    line["ids"] = entries[i].ids;
    line["source"] = entries[i].source;
    // A cut or random sequence can split a UTF-8 character: the text is for display, the ids are the prompt.
    content += line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
  }
  write_file_atomically(request.out, content);
  log << "lminv prompts: wrote " << request.out.string() << ": " << entries.size() << " prompts of " << request.tokens
      << " tokens, " << n_sentences << " sentences (of " << candidates.size() << " candidates in " << files.size()
      << " files) + " << n_random << " random, seed " << request.seed << "\n";
}

}  // namespace lminv
