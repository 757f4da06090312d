// Prompt sets: the prompt file reader (plain text, JSON Lines, both; errors naming file and line) and make_prompts
// (deterministic per seed, the random share, the length of every prompt, atomic writes), and the shipped sets.
#include "prompts.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "lminv/error.hpp"

using namespace lminv;
namespace fs = std::filesystem;

namespace {

const Tokenizer& gpt2() {
  static const Tokenizer tokenizer = Tokenizer::from_folder(fs::path(LMINV_SOURCE_DATA_DIR) / "gpt2-tokenizer");
  return tokenizer;
}
constexpr std::int64_t kVocab = 50257;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A fresh temporary folder, removed with its content.
class TempDir {
 public:
  TempDir() : path_(fs::temp_directory_path() / ("lminv-prompts-test-" + std::to_string(std::random_device()()))) {
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path write(const std::string& name, const std::string& content) const {
    std::ofstream(path_ / name, std::ios::binary) << content;
    return path_ / name;
  }

 private:
  fs::path path_;
};

class PromptFile : public ::testing::Test {
 protected:
  std::vector<PromptEntry> read(const std::string& content) {
    return read_prompt_file(dir_.write("prompts.txt", content), gpt2(), kVocab);
  }
  std::string error(const std::string& content) {
    return error_of([&] { read(content); });
  }
  std::string file() const { return (dir_.path() / "prompts.txt").string(); }
  TempDir dir_;
};

}  // namespace

TEST_F(PromptFile, ReadsPlainTextLines) {
  const auto entries = read("The sky is blue.\n\n# a comment\nHello world\n");
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].text, "The sky is blue.");
  EXPECT_EQ(entries[0].ids, gpt2().encode("The sky is blue."));
  EXPECT_EQ(entries[0].kind, "text");
  EXPECT_EQ(entries[0].line, 1);
  EXPECT_EQ(entries[1].ids, (std::vector<std::int64_t>{15496, 995}));
  EXPECT_EQ(entries[1].line, 4);
}

TEST_F(PromptFile, KeepsLeadingSpacesAndDropsCarriageReturns) {
  const auto entries = read(" Hello\r\nworld\r\n");
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].ids, gpt2().encode(" Hello"));
  EXPECT_EQ(entries[1].text, "world");
}

TEST_F(PromptFile, ReadsJsonLines) {
  const auto entries = read(
      R"({"ids": [464, 6766, 318, 4171, 13], "kind": "sentence", "id": 0}
{"text": "Hello world"}
{"ids": [50255, 50256], "text": "shown only"}
)");
  ASSERT_EQ(entries.size(), 3u);
  EXPECT_EQ(entries[0].ids, (std::vector<std::int64_t>{464, 6766, 318, 4171, 13}));
  EXPECT_EQ(entries[0].text, "The sky is blue.");  // decoded for display
  EXPECT_EQ(entries[0].kind, "sentence");
  EXPECT_EQ(entries[1].ids, (std::vector<std::int64_t>{15496, 995}));
  EXPECT_EQ(entries[1].kind, "text");
  EXPECT_EQ(entries[2].ids, (std::vector<std::int64_t>{50255, 50256}));  // ids win over text
  EXPECT_EQ(entries[2].text, "shown only");
  EXPECT_EQ(entries[2].kind, "ids");
  EXPECT_EQ(entries[2].line, 3);
}

TEST_F(PromptFile, ReadsMixedFiles) {
  const auto entries = read("# mixed\nThe sky\n{\"ids\": [7, 7, 7]}\n   \nblue\n");
  ASSERT_EQ(entries.size(), 3u);
  EXPECT_EQ(entries[0].line, 2);
  EXPECT_EQ(entries[1].ids, (std::vector<std::int64_t>{7, 7, 7}));
  EXPECT_EQ(entries[1].line, 3);
  EXPECT_EQ(entries[2].line, 5);
}

TEST_F(PromptFile, ErrorsNameTheFileAndLine) {
  const std::string at = file() + ":3: ";
  const std::string head = "# header\nok\n";
  struct Case {
    std::string line, message;
  };
  for (const Case& c :
       {Case{"{\"ids\": [1, 2", "invalid JSON"}, Case{"{not json}", "invalid JSON"},
        Case{"{\"ids\": [1, 2.5]}", "\"ids\"[1] = 2.5 is not an integer"},
        Case{"{\"ids\": [1, \"2\"]}", "is not an integer"}, Case{"{\"ids\": 5}", "must be an array"},
        Case{"{\"ids\": [50257]}", "\"ids\"[0] = 50257 is outside the vocabulary [0, 50257)"},
        Case{"{\"ids\": [-1]}", "is outside the vocabulary"},
        Case{"{\"ids\": [18446744073709551615]}", "is outside the vocabulary"}, Case{"{\"ids\": []}", "empty prompt"},
        Case{"{\"text\": \"\"}", "empty prompt"}, Case{"{\"kind\": \"x\"}", "neither \"ids\" nor \"text\""},
        Case{"{\"text\": 3}", "\"text\" must be a string"},
        Case{"{\"ids\": [1], \"kind\": 2}", "\"kind\" must be a string"}}) {
    const std::string e = error(head + c.line + "\nlast line\n");
    EXPECT_EQ(e.rfind(at, 0), 0u) << c.line << " -> " << e;
    EXPECT_NE(e.find(c.message), std::string::npos) << c.line << " -> " << e;
  }
}

TEST_F(PromptFile, ChecksTextTokensAgainstASmallerVocabulary) {
  const fs::path f = dir_.write("small.txt", "Hello world\n");
  const std::string e = error_of([&] { read_prompt_file(f, gpt2(), 1000); });
  EXPECT_NE(e.find(f.string() + ":1: the text has token id 15496"), std::string::npos) << e;
}

TEST_F(PromptFile, MissingOrEmptyFilesAreErrors) {
  const fs::path missing = dir_.path() / "missing.txt";
  EXPECT_NE(error_of([&] { read_prompt_file(missing, gpt2(), kVocab); })
                .find(missing.string() + ": the prompt file does not exist"),
            std::string::npos);
  EXPECT_NE(error("").find(file() + ": no prompts"), std::string::npos);
  EXPECT_NE(error("# only a comment\n\n  \n").find(file() + ": no prompts"), std::string::npos);
}

namespace {

// A corpus of 60 numbered sentences of at least 8 tokens over two files and a few too short ones.
class MakePrompts : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string a, b;
    for (int i = 0; i < 30; ++i) {
      a += "Sentence number " + std::to_string(i) + " of the first file is long enough to keep.\n";
      b += "The second file says " + std::to_string(i) + " things,\nacross two lines!  Short one. ";
    }
    fs::create_directories(dir_.path() / "corpus");
    dir_.write("corpus/a.txt", a);
    dir_.write("corpus/b.txt", b);
  }
  MakePromptsRequest request(std::uint64_t seed, const std::string& out = "out.jsonl") const {
    MakePromptsRequest r;
    r.corpus = {dir_.path() / "corpus"};
    r.count = 20;
    r.tokens = 6;
    r.random_fraction = 0.25;
    r.seed = seed;
    r.out = dir_.path() / out;
    return r;
  }
  std::vector<nlohmann::json> make(const MakePromptsRequest& r) {
    std::ostringstream log;
    make_prompts(r, gpt2(), log);
    last_log_ = log.str();
    std::vector<nlohmann::json> lines;
    std::istringstream in(read_text(r.out));
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    return lines;
  }
  TempDir dir_;
  std::string last_log_;
};

}  // namespace

TEST_F(MakePrompts, IsDeterministicForASeedAndDiffersForAnother) {
  make(request(1, "a.jsonl"));
  make(request(1, "b.jsonl"));
  make(request(2, "c.jsonl"));
  const std::string a = read_text(dir_.path() / "a.jsonl");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(a, read_text(dir_.path() / "b.jsonl"));
  EXPECT_NE(a, read_text(dir_.path() / "c.jsonl"));
}

TEST_F(MakePrompts, WritesTheRandomShareAndTokensPerPrompt) {
  const auto lines = make(request(0));
  ASSERT_EQ(lines.size(), 20u);
  int random = 0;
  std::set<std::vector<std::int64_t>> sentences;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const nlohmann::json& l = lines[i];
    EXPECT_EQ(l["id"], i);
    const auto ids = l["ids"].get<std::vector<std::int64_t>>();
    EXPECT_EQ(ids.size(), 6u) << l;
    for (std::int64_t id : ids) EXPECT_TRUE(id >= 0 && id < kVocab);
    EXPECT_EQ(l["text"], gpt2().decode(ids));
    if (l["kind"] == "random") {
      ++random;
      EXPECT_NE(l["source"].get<std::string>().find("random"), std::string::npos);
    } else {
      ASSERT_EQ(l["kind"], "sentence");
      // A sentence starts a corpus sentence: its first tokens are those of the sentence the source names.
      const std::string source = l["source"];
      EXPECT_TRUE(source.rfind("a.txt (sentence ", 0) == 0 || source.rfind("b.txt (sentence ", 0) == 0) << source;
      EXPECT_TRUE(sentences.insert(ids).second) << "picked twice: " << l;  // without replacement
    }
  }
  EXPECT_EQ(random, 5);  // round(20 * 0.25)
  EXPECT_NE(last_log_.find("20 prompts of 6 tokens, 15 sentences"), std::string::npos) << last_log_;
}

TEST_F(MakePrompts, SplitsSentencesAtTheDocumentedRule) {
  // Only the second file, whose sentences span lines and end with '!' or '.'; "Short one." is too short.
  MakePromptsRequest r = request(3);
  r.corpus = {dir_.path() / "corpus" / "b.txt"};
  r.random_fraction = 0;
  r.count = 30;
  for (const nlohmann::json& l : make(r)) {
    const std::string text = l["text"];
    EXPECT_EQ(text.rfind("The second file says ", 0), 0u) << text;
    EXPECT_EQ(text.find('\n'), std::string::npos) << text;  // whitespace collapsed
  }
  r.count = 31;  // only 30 distinct candidates
  const std::string e = error_of([&] { make(r); });
  EXPECT_NE(e.find((dir_.path() / "corpus" / "b.txt").string() + ": 30 distinct sentences of at least 6 tokens"),
            std::string::npos)
      << e;
}

TEST_F(MakePrompts, AllRandomAndAllSentences) {
  MakePromptsRequest r = request(0);
  r.random_fraction = 1;
  r.corpus = {dir_.path() / "no-such-corpus"};  // not read when no sentence is needed
  for (const nlohmann::json& l : make(r)) EXPECT_EQ(l["kind"], "random");
  r = request(0);
  r.random_fraction = 0;
  for (const nlohmann::json& l : make(r)) EXPECT_EQ(l["kind"], "sentence");
}

TEST_F(MakePrompts, ReadsBackWithTheSameIds) {
  const MakePromptsRequest r = request(5);
  const auto lines = make(r);
  const auto entries = read_prompt_file(r.out, gpt2(), kVocab);
  ASSERT_EQ(entries.size(), lines.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    EXPECT_EQ(entries[i].ids, lines[i]["ids"].get<std::vector<std::int64_t>>());
    EXPECT_EQ(entries[i].kind, lines[i]["kind"]);
  }
}

TEST_F(MakePrompts, ErrorsLeaveNoPartialFile) {
  const fs::path out = dir_.path() / "out.jsonl";
  MakePromptsRequest r = request(0);
  r.corpus = {dir_.path() / "missing.txt"};
  const std::string e = error_of([&] { make(r); });
  EXPECT_NE(e.find("corpus " + (dir_.path() / "missing.txt").string() + ": no such file"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(out));

  // An existing file stays whole when a later run fails.
  make(request(0));
  const std::string before = read_text(out);
  r = request(0);
  r.count = 1000;
  EXPECT_NE(error_of([&] { make(r); }).find("distinct sentences"), std::string::npos);
  EXPECT_EQ(read_text(out), before);
  for (const fs::directory_entry& f : fs::directory_iterator(dir_.path()))
    EXPECT_EQ(f.path().filename().string().find(".tmp."), std::string::npos) << f.path();
}

TEST_F(MakePrompts, RefusesBadRequests) {
  MakePromptsRequest r = request(0);
  r.random_fraction = 1.5;
  EXPECT_NE(error_of([&] { make(r); }).find("random fraction"), std::string::npos);
  r = request(0);
  r.tokens = 0;
  EXPECT_NE(error_of([&] { make(r); }).find("tokens"), std::string::npos);
  r = request(0);
  r.count = 0;
  EXPECT_NE(error_of([&] { make(r); }).find("count"), std::string::npos);
}

TEST_F(MakePrompts, FolderSkipsSymlinksAndReadsFilesByName) {
  fs::create_symlink(dir_.path() / "corpus" / "b.txt", dir_.path() / "corpus" / "0-link.txt");
  MakePromptsRequest r = request(0);
  r.random_fraction = 0;
  r.count = 60;  // every candidate: a.txt's 30 and b.txt's 30
  for (const nlohmann::json& l : make(r)) EXPECT_EQ(l["source"].get<std::string>().find("0-link"), std::string::npos);
}

// The shipped sets: the 20-token set of docs/datasets.md, and the tiny one the tests of other commands use.
TEST(ShippedPrompts, TwentyTokenSet) {
  const fs::path file = fs::path(LMINV_TEST_DATA_DIR) / "prompts-20.txt";
  const auto entries = read_prompt_file(file, gpt2(), kVocab);
  ASSERT_EQ(entries.size(), 100u);
  int random = 0;
  std::istringstream in(read_text(file));
  std::string line;
  for (const PromptEntry& e : entries) {
    ASSERT_TRUE(std::getline(in, line));
    const nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(e.ids.size(), 20u) << e.line;
    EXPECT_EQ(e.ids, j["ids"].get<std::vector<std::int64_t>>());
    random += e.kind == "random";
  }
  EXPECT_EQ(random, 10);
}

TEST(ShippedPrompts, TinySet) {
  const auto entries = read_prompt_file(fs::path(LMINV_TEST_DATA_DIR) / "prompts-tiny.txt", gpt2(), kVocab);
  ASSERT_EQ(entries.size(), 6u);
  for (const PromptEntry& e : entries) EXPECT_EQ(e.ids.size(), 4u) << "line " << e.line << ": " << e.text;
}
