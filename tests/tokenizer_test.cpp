// The GPT-2 tokenizer against the reference encoder (fixture from tools/gen_tokenizer_cases.js), round trips on
// arbitrary bytes, both file layouts, and the errors a user sees for broken tables.
#include "tokenizer.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lminv/error.hpp"

namespace fs = std::filesystem;
using lminv::Tokenizer;
using Ids = std::vector<std::int64_t>;

namespace {

const fs::path kTableDir = fs::path(LMINV_SOURCE_DATA_DIR) / "gpt2-tokenizer";

// Loading takes tens of milliseconds; one instance serves the read-only tests.
const Tokenizer& gpt2() {
  static const Tokenizer tokenizer = Tokenizer::from_folder(kTableDir);
  return tokenizer;
}

struct Case {
  std::string text;
  Ids ids;
};

std::vector<Case> fixture_cases() {
  std::ifstream in(fs::path(LMINV_TEST_DATA_DIR) / "tokenizer_cases.jsonl");
  std::vector<Case> cases;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const auto json = nlohmann::json::parse(line);
    cases.push_back({json.at("text").get<std::string>(), json.at("ids").get<Ids>()});
  }
  return cases;
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write(const fs::path& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// A fresh folder under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::random_device entropy;
    path_ = fs::temp_directory_path() / ("lminv-tokenizer-test-" + std::to_string(entropy()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// The message of the lminv::Error that f throws; fails the test if it throws nothing or something else.
template <typename F>
std::string error_message(F f) {
  try {
    f();
  } catch (const lminv::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-lminv exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

}  // namespace

TEST(Tokenizer, KnownIdsForTheSkyIsBlue) {
  EXPECT_EQ(gpt2().encode("The sky is blue."), (Ids{464, 6766, 318, 4171, 13}));
  EXPECT_EQ(gpt2().decode({464, 6766, 318, 4171, 13}), "The sky is blue.");
  EXPECT_EQ(gpt2().vocab_size(), 50257);
  EXPECT_EQ(gpt2().id_of("Ġsky"), 6766);
  EXPECT_EQ(gpt2().id_of("<|endoftext|>"), 50256);
  EXPECT_EQ(gpt2().id_of("no such piece"), -1);
  EXPECT_EQ(gpt2().piece(6766), " sky");
  EXPECT_EQ(gpt2().piece(198), "\n");
}

TEST(Tokenizer, MatchesTheReferenceEncoderOnTheFixture) {
  const std::vector<Case> cases = fixture_cases();
  ASSERT_GE(cases.size(), 40u) << "tests/data/tokenizer_cases.jsonl is missing or short";
  for (const Case& c : cases) {
    EXPECT_EQ(gpt2().encode(c.text), c.ids) << "text: " << c.text;
    EXPECT_EQ(gpt2().decode(c.ids), c.text);
  }
}

TEST(Tokenizer, PreTokenizerSplitsLikeTheRegex) {
  // Each id sequence here is one word per regex match; spelled as pieces, the splits are visible.
  const auto pieces = [](const std::string& text) {
    std::vector<std::string> out;
    for (const std::int64_t id : gpt2().encode(text)) out.push_back(gpt2().piece(id));
    return out;
  };
  using Pieces = std::vector<std::string>;
  EXPECT_EQ(pieces("a  b"), (Pieces{"a", " ", " b"}));          // \s+(?!\S) leaves the last space to the word
  EXPECT_EQ(pieces("a\n\nb"), (Pieces{"a", "\n", "\n", "b"}));  // ... also when it is not U+0020
  EXPECT_EQ(pieces("a\n\n"), (Pieces{"a", "\n\n"}));            // a trailing run stays whole
  EXPECT_EQ(pieces("don't"), (Pieces{"don", "'t"}));
  EXPECT_EQ(pieces("DON'T"), (Pieces{"DON", "'", "T"}));  // contractions are case-sensitive
  EXPECT_EQ(pieces("a 123"), (Pieces{"a", " 123"}));
}

// GPT-2's own tables hide some of the regex's word boundaries (no GPT-2 token joins "\t" and a letter), so a tiny
// hand-made vocabulary, whose merges would join across each boundary if the scanner let them, makes them visible.
class HandMadeTables : public ::testing::Test {
 protected:
  void SetUp() override {
    // The 256 byte tokens, as bytes_to_unicode writes them, then the merged pieces.
    nlohmann::json vocab = nlohmann::json::object();
    std::int64_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      vocab[utf8(printable ? b : next_extra++)] = b;
    }
    // Ranks in file order; "aa a" ranks before "a a", which creates "aa" (allowed: the loader only needs the
    // pieces in the vocabulary).
    const std::vector<std::pair<std::string, std::string>> merges = {
        {"aa", "a"}, {"a", "a"}, {"ĉ", "a"}, {"a", "1"}, {"Ġ", "Ġ"}, {"Ġ", "b"}, {"'", "s"},
        {"'", "S"},  {"1", "."}, {"Ġ", "1"}, {"ĉ", "ĉ"}, {"b", "c"}, {"c", "d"}, {"b", "c"}};
    std::string merges_text = "#version: 0.2\n";
    for (const auto& [left, right] : merges) {
      if (!vocab.contains(left + right)) {
        const std::size_t id = vocab.size();
        vocab[left + right] = id;
      }
      merges_text += left + " " + right + "\n";
    }
    write(dir_.path() / "vocab.json", vocab.dump());
    write(dir_.path() / "merges.txt", merges_text);
    tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_folder(dir_.path()));
  }
  static std::string utf8(std::int64_t cp) {  // code points below U+0800 are enough here
    return cp < 0x80 ? std::string(1, static_cast<char>(cp))
                     : std::string{static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
  }
  // The pieces of encode(text), in byte-unicode form ("Ġb"), looked up back by id.
  std::vector<std::string> pieces(const std::string& text) const {
    std::vector<std::string> out;
    for (const std::int64_t id : tokenizer_->encode(text)) {
      const std::string bytes = tokenizer_->piece(id);
      std::string entry;
      for (const char c : bytes) entry += c == ' ' ? "Ġ" : c == '\t' ? "ĉ" : std::string(1, c);
      EXPECT_EQ(tokenizer_->id_of(entry), id) << "piece " << entry;
      out.push_back(entry);
    }
    return out;
  }
  TempDir dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(HandMadeTables, WordBoundariesFollowTheRegex) {
  using Pieces = std::vector<std::string>;
  EXPECT_EQ(pieces("x\ta"), (Pieces{"x", "ĉ", "a"}));   // only U+0020 may lead a word
  EXPECT_EQ(pieces("\t\tb"), (Pieces{"ĉ", "ĉ", "b"}));  // \s+(?!\S) leaves the last tab alone
  EXPECT_EQ(pieces("b\t\t"), (Pieces{"b", "ĉĉ"}));      // ... but not at the end of the text
  EXPECT_EQ(pieces("a   b"), (Pieces{"a", "ĠĠ", "Ġb"}));
  EXPECT_EQ(pieces("a1"), (Pieces{"a", "1"}));                // letters and numbers are separate words
  EXPECT_EQ(pieces("1.5 1"), (Pieces{"1", ".", "5", "Ġ1"}));  // numbers and punctuation too
  EXPECT_EQ(pieces("it's IT'S"), (Pieces{"i", "t", "'s", "Ġ", "I", "T", "'", "S"}));  // case-sensitive 's
}

TEST_F(HandMadeTables, EachRoundMergesEveryOccurrenceOfTheBestPair) {
  // encoder.py merges all "a a" in one sweep before it looks at the ranks again, so "aaaa" ends as "aa" "aa" even
  // though "aa a" ranks better; merging one pair at a time would give "aaa" "a".
  EXPECT_EQ(pieces("aaaa"), (std::vector<std::string>{"aa", "aa"}));
  EXPECT_EQ(pieces("aaa"), (std::vector<std::string>{"aaa"}));  // "aa" "a", then "aa a" in the next round
}

TEST_F(HandMadeTables, APairListedTwiceKeepsItsLastRank) {
  // As dict(zip(merges, range(len(merges)))) in encoder.py: "b c" ranks after "c d", so "bcd" is "b" "cd".
  EXPECT_EQ(pieces("bcd"), (std::vector<std::string>{"b", "cd"}));
}

TEST(Tokenizer, EmojiAndCjk) {
  // Ids from the reference encoder (gpt-3-encoder 1.1.4).
  EXPECT_EQ(gpt2().encode("🤖"), (Ids{8582, 97, 244}));
  EXPECT_EQ(gpt2().encode("日本語"), (Ids{33768, 98, 17312, 105, 45739, 252}));
  for (const std::string text : {"I ❤️ 🤖 and 👨‍👩‍👧", "日本語のテキスト", "中文测试", "😀😀😀"}) {
    const Ids ids = gpt2().encode(text);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(gpt2().decode(ids), text);
  }
  // A single token may hold part of a character: decoding it alone gives the raw bytes.
  EXPECT_EQ(gpt2().piece(8582), "\xF0\x9F");
}

TEST(Tokenizer, RoundTripsArbitraryBytes) {
  std::mt19937 rng(20240611);
  // Mostly text-like bytes, with invalid UTF-8 (stray continuations, truncated sequences, 0xC0, 0xFF) mixed in.
  const std::string alphabet =
      std::string("abcXYZ019 '\n\t.,!") + "\xC3\xA9\xE6\x97\xA5\xF0\x9F\xA4\x96\x80\xBF\xC0\xFF\xED\xA0";
  for (int trial = 0; trial < 400; ++trial) {
    std::string text(std::uniform_int_distribution<int>(0, 64)(rng), '\0');
    for (char& c : text) {
      c = trial % 2 == 0 ? static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng))
                         : alphabet[std::uniform_int_distribution<std::size_t>(0, alphabet.size() - 1)(rng)];
    }
    const Ids ids = gpt2().encode(text);
    ASSERT_EQ(gpt2().decode(ids), text) << "trial " << trial;
    for (const std::int64_t id : ids) ASSERT_TRUE(id >= 0 && id < gpt2().vocab_size());
  }
}

TEST(Tokenizer, InvalidUtf8BytesAreOtherCharacters) {
  // A truncated "…" (E2 80 A6): the two bytes are invalid alone, so they form one run of "other" and BPE merges
  // them like the start of any E2 80 xx punctuation; the letters around stay words of their own.
  EXPECT_EQ(gpt2().encode("x\xE2\x80y"), (Ids{gpt2().id_of("x"), gpt2().id_of("âĢ"), gpt2().id_of("y")}));
  EXPECT_EQ(gpt2().encode(" \xE2\x80"), (Ids{gpt2().id_of("ĠâĢ")}));         // and a space leads them like punctuation
  EXPECT_EQ(gpt2().encode(std::string("\0", 1)), (Ids{gpt2().id_of("Ā")}));  // byte 0 is written U+0100
}

TEST(Tokenizer, LongWordsRoundTrip) {
  // One regex match of 20 kB (its time is printed, not asserted: a quadratic BPE would show here, and in ctest's
  // timeout if it were much worse).
  std::string text;
  for (int i = 0; i < 20000; ++i) text += "abcdefghij"[(i * 7 + i / 3) % 10];
  const auto start = std::chrono::steady_clock::now();
  const Ids ids = gpt2().encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(gpt2().decode(ids), text);
  std::cout << "encode of one 20 kB word: " << seconds << " s\n";
}

TEST(Tokenizer, ConcurrentEncodingAgrees) {
  const std::vector<Case> cases = fixture_cases();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (const Case& c : cases) mismatches[t] += gpt2().encode(c.text) != c.ids;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(Tokenizer, HuggingFaceLayoutGivesTheSameTokens) {
  TempDir dir;
  write(dir.path() / "vocab.json", read(kTableDir / "encoder.json"));
  write(dir.path() / "merges.txt", read(kTableDir / "vocab.bpe"));
  const Tokenizer hf = Tokenizer::from_folder(dir.path());
  const Tokenizer explicit_files = Tokenizer::from_files(kTableDir / "encoder.json", kTableDir / "vocab.bpe");
  EXPECT_EQ(hf.vocab_size(), gpt2().vocab_size());
  for (const Case& c : fixture_cases()) {
    EXPECT_EQ(hf.encode(c.text), c.ids) << c.text;
    EXPECT_EQ(explicit_files.encode(c.text), c.ids) << c.text;
  }
  EXPECT_EQ(hf.decode({464, 6766, 318, 4171, 13}), "The sky is blue.");
}

TEST(Tokenizer, MergesWithoutVersionLineAndWithCrlf) {
  TempDir dir;
  std::string merges = read(kTableDir / "vocab.bpe");
  merges = merges.substr(merges.find('\n') + 1);  // drop "#version: 0.2"
  std::string crlf;
  for (char c : merges) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
  write(dir.path() / "merges.txt", crlf);
  const Tokenizer t = Tokenizer::from_files(kTableDir / "encoder.json", dir.path() / "merges.txt");
  EXPECT_EQ(t.encode("The sky is blue."), (Ids{464, 6766, 318, 4171, 13}));
}

TEST(Tokenizer, DefaultDirectoryAndItsOverride) {
  ASSERT_EQ(unsetenv("LMINV_TOKENIZER_DIR"), 0);
  EXPECT_EQ(lminv::default_tokenizer_dir().filename(), "gpt2-tokenizer");
  ASSERT_EQ(setenv("LMINV_TOKENIZER_DIR", "/somewhere/else", 1), 0);
  EXPECT_EQ(lminv::default_tokenizer_dir(), fs::path("/somewhere/else"));
  ASSERT_EQ(unsetenv("LMINV_TOKENIZER_DIR"), 0);
}

TEST(TokenizerErrors, MissingFilesNameThePath) {
  TempDir dir;
  const fs::path missing = dir.path() / "nope.json";
  EXPECT_NE(error_message([&] { Tokenizer::from_files(missing, kTableDir / "vocab.bpe"); }).find(missing.string()),
            std::string::npos);
  const fs::path missing_merges = dir.path() / "nope.bpe";
  EXPECT_NE(error_message([&] {
              Tokenizer::from_files(kTableDir / "encoder.json", missing_merges);
            }).find(missing_merges.string()),
            std::string::npos);
  EXPECT_NE(error_message([&] { Tokenizer::from_folder(dir.path()); }).find(dir.path().string()), std::string::npos);
}

TEST(TokenizerErrors, BadJsonNamesTheFile) {
  TempDir dir;
  const fs::path vocab = dir.path() / "vocab.json";
  write(vocab, "{\"a\": 0, \"b\": ");
  const std::string message = error_message([&] { Tokenizer::from_files(vocab, kTableDir / "vocab.bpe"); });
  EXPECT_NE(message.find(vocab.string()), std::string::npos) << message;
  EXPECT_NE(message.find("JSON"), std::string::npos) << message;

  write(vocab, "{\"a\": \"zero\"}");
  EXPECT_NE(error_message([&] { Tokenizer::from_files(vocab, kTableDir / "vocab.bpe"); }).find(vocab.string()),
            std::string::npos);
  write(vocab, "[1, 2, 3]");
  EXPECT_NE(error_message([&] { Tokenizer::from_files(vocab, kTableDir / "vocab.bpe"); }).find(vocab.string()),
            std::string::npos);
}

TEST(TokenizerErrors, MalformedMergesLineNamesFileAndLine) {
  TempDir dir;
  const fs::path merges = dir.path() / "merges.txt";
  write(merges, "#version: 0.2\nĠ t\nĠ a\nthree pieces here\n");
  const std::string message = error_message([&] { Tokenizer::from_files(kTableDir / "encoder.json", merges); });
  EXPECT_NE(message.find(merges.string()), std::string::npos) << message;
  EXPECT_NE(message.find("line 4"), std::string::npos) << message;

  write(merges, "Ġ t\nonepiece\n");
  EXPECT_NE(error_message([&] { Tokenizer::from_files(kTableDir / "encoder.json", merges); }).find("line 2"),
            std::string::npos);
}

TEST(TokenizerErrors, MergeOutsideTheVocabulary) {
  TempDir dir;
  const fs::path merges = dir.path() / "merges.txt";
  write(merges, "#version: 0.2\nĠ t\nq z\n");  // "qz" is not a GPT-2 token
  const std::string message = error_message([&] { Tokenizer::from_files(kTableDir / "encoder.json", merges); });
  EXPECT_NE(message.find(merges.string()), std::string::npos) << message;
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("\"qz\""), std::string::npos) << message;
}

TEST(TokenizerErrors, DecodeRejectsUnknownIds) {
  for (const std::int64_t id : {std::int64_t{-1}, std::int64_t{50257}, std::int64_t{1} << 40}) {
    const std::string message = error_message([&] { gpt2().decode({464, id}); });
    EXPECT_NE(message.find(std::to_string(id)), std::string::npos) << message;
  }
  EXPECT_NE(error_message([&] { gpt2().piece(99999); }).find("99999"), std::string::npos);
}
