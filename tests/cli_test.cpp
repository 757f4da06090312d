// The lminv program end to end: commands, exit codes, error messages, records, and the quickstart.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

struct Outcome {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// Runs `lminv ARGS` in a shell with stderr folded into stdout.
Outcome lminv(const std::string& args) {
  const std::string command = std::string(LMINV_BINARY) + " " + args + " 2>&1";
  Outcome o;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return o;
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), pipe)) o.output.append(buf.data(), n);
  const int raw = ::pclose(pipe);
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return o;
}

std::vector<nlohmann::json> read_records(const fs::path& file) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lminv-cli-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "-" +
            std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Options that keep a run's files inside this test's folder.
  std::string isolated() const {
    return " --set output.dir=" + (dir_ / "out").string() + " --set output.cache_dir=" + (dir_ / "cache").string();
  }
  fs::path records() const { return dir_ / "out" / "records.jsonl"; }

  fs::path dir_;
  const std::string tiny_ = std::string(LMINV_TEST_DATA_DIR) + "/tiny-fcnet.ini";
};

}  // namespace

TEST_F(Cli, PluginsListsTheBuiltInsWithVersionsAndFiles) {
  const Outcome o = lminv("plugins");
  ASSERT_EQ(o.status, 0) << o.output;
  for (const char* line : {"backend   reference         0.1.0", "optimizer descent           0.1.0",
                           "decoder   pinv              0.1.0"})
    EXPECT_NE(o.output.find(line), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("lminv-plugin-reference.so"), std::string::npos);
  EXPECT_NE(o.output.find("dtypes f64,f32"), std::string::npos) << o.output;  // what the backend supports
}

TEST_F(Cli, TokenizePrintsIdsAndPieces) {
  const Outcome o = lminv("tokenize The sky is blue.");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_EQ(o.output.substr(0, o.output.find('\n')), "464 6766 318 4171 13");
  EXPECT_NE(o.output.find("6766  \" sky\""), std::string::npos) << o.output;
}

// lminv bench's tables keep their columns whatever lines come before a row: a skipped backend's line (printed
// left-aligned) left the final table's numbers left-aligned and run together ("10.0394" for B 1, 0.0394 s).
TEST_F(Cli, BenchTablesKeepTheirColumnsAfterASkippedBackend) {
  const Outcome o = lminv("bench --backends nosuch,reference --dtypes f32 --models 1block --batches 1 --cache-batches "
                          "none --repeat 1 -q");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("nosuch"), std::string::npos) << o.output;
  std::istringstream lines(o.output);
  std::string line;
  std::size_t header_end = std::string::npos;
  int rows = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("backend    dtype", 0) == 0) header_end = line.find("s/call") + 6;
    if (line.rfind("reference  f32", 0) != 0 || header_end == std::string::npos) continue;
    ++rows;
    // "reference  f32       1block              1     0.0044 ...": the batch, then the seconds ending under "s/call".
    ASSERT_GE(line.size(), header_end) << line;
    EXPECT_NE(line[header_end - 1], ' ') << "seconds not under s/call:\n" << line;
    EXPECT_EQ(line[header_end], ' ') << line;
    EXPECT_NE(line.find("     1 "), std::string::npos) << "the batch stands apart: " << line;
  }
  EXPECT_EQ(rows, 2) << "the cell, and again against the best limits of the run:\n" << o.output;
}

TEST_F(Cli, EveryCommandHasHelp) {
  for (const char* command : {"run", "plugins", "tokenize", "sweep", "prompts"}) {
    const Outcome o = lminv(std::string(command) + " --help");
    EXPECT_EQ(o.status, 0) << command;
    EXPECT_NE(o.output.find(std::string("lminv ") + command), std::string::npos) << o.output;
  }
  EXPECT_EQ(lminv("frobnicate").status, 2);
  EXPECT_EQ(lminv("").status, 2);
}

TEST_F(Cli, RunRecoversTheTinyFcnetPromptAndAppendsWholeRecords) {
  const Outcome first = lminv("run " + tiny_ + isolated());
  ASSERT_EQ(first.status, 0) << first.output;
  EXPECT_NE(first.output.find("recovered yes, exactly"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("a_30"), std::string::npos) << first.output;  // a snapshot step
  std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["decoded"]["text"], "The sky is blue.");
  EXPECT_EQ(r[0]["prompt"]["ids"], (std::vector<int>{464, 6766, 318, 4171, 13}));
  EXPECT_TRUE(r[0]["exact_match"].get<bool>());
  EXPECT_EQ(r[0]["trajectory"].size(), 3u);
  EXPECT_GT(r[0]["control"]["l1"].get<double>(), 0.0);

  // A second run appends; the first record stays as it was.
  const std::string before = r[0].dump();
  ASSERT_EQ(lminv("run " + tiny_ + isolated() + " --set optimizer.steps=2").status, 0);
  r = read_records(records());
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].dump(), before);
  EXPECT_EQ(r[1]["steps"], 2);
}

TEST_F(Cli, BadConfigsNameTheFileKeyAndValue) {
  struct Case {
    std::string args, expect;
    bool names_config = true;  // errors about the config's own values name its file
  };
  for (const Case& c : std::vector<Case>{
           {"run /no/such.ini", "/no/such.ini: the config file does not exist", false},
           {"run " + tiny_ + " --set model.n_embd=wide", "[model] n_embd = 'wide': 'wide' is not an integer"},
           {"run " + tiny_ + " --set optimizer.stpes=3", "unknown key in [optimizer]: stpes = '3'"},
           {"run " + tiny_ + " --set decoder.top_k=0", "[decoder] top_k = '0'"},
           {"run " + tiny_ + " --set backend.threads=-2", "[backend] threads = '-2'"},
           {"run " + tiny_ + " --set prompt.text= --set prompt.ids=1,99999999", "token id 99999999 is outside"},
           {"run " + tiny_ + " --set backend.name=nope", "no backend plugin named 'nope'; available: ", false},
           {"run " + tiny_ + " --set backend.dtype=bf16", "does not support dtype 'bf16'", false},
       }) {
    const Outcome o = lminv(c.args + isolated());
    EXPECT_EQ(o.status, 1) << c.args << "\n" << o.output;
    EXPECT_NE(o.output.find(c.expect), std::string::npos) << c.args << "\n" << o.output;
    if (c.names_config) {
      EXPECT_NE(o.output.find("tiny-fcnet.ini"), std::string::npos) << o.output;
    }
    EXPECT_FALSE(fs::exists(records())) << "a failed run must not write a record";
  }
}

TEST_F(Cli, Int8WeightsAreRecordedAndDropoutWithoutABackendForItIsRefused) {
  const std::string gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const Outcome ok = lminv("run " + gpt2 + " --set backend.weight_dtype=int8 --set optimizer.steps=3" + isolated());
  ASSERT_EQ(ok.status, 0) << ok.output;
  EXPECT_NE(ok.output.find("int8 block weights"), std::string::npos) << ok.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["model"]["weight_dtype"], "int8");
  EXPECT_EQ(r[0]["model"]["dropout"], 0.0);
  fs::remove_all(dir_ / "out");
  // The reference computes no dropout (it is deterministic): refused by name before any work, nothing written.
  const Outcome refused = lminv("run " + gpt2 + " --set model.dropout=0.1" + isolated());
  EXPECT_EQ(refused.status, 1) << refused.output;
  EXPECT_NE(refused.output.find("needs feature 'dropout'"), std::string::npos) << refused.output;
  EXPECT_FALSE(fs::exists(records()));
}

TEST_F(Cli, QuickstartRecoversThePromptExactly) {
  const Outcome o = lminv("run " + std::string(LMINV_SOURCE_DIR) + "/configs/quickstart.ini" + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("result    \"This is a prompt sentence.\""), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("recovered yes, exactly"), std::string::npos) << o.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_TRUE(r[0]["exact_match"].get<bool>());
  EXPECT_EQ(r[0]["model"]["n_embd"], 768);
  // The iterations until the loss fell below the control m: the curve (every step kept, 60 < 512) crosses there.
  ASSERT_TRUE(r[0]["steps_to_control"].is_number()) << r[0].dump();
  const std::int64_t crossed = r[0]["steps_to_control"];
  const double m = r[0]["control"]["metric"];
  const nlohmann::json& loss = r[0]["curve"]["loss"];
  ASSERT_EQ(r[0]["curve"]["step"][crossed - 1], crossed);
  EXPECT_LT(loss[crossed - 1].get<double>(), m);
  ASSERT_GT(crossed, 1);
  EXPECT_GE(loss[crossed - 2].get<double>(), m);
}

TEST_F(Cli, InitWritesAHuggingFaceFolderThatRunsLikeTheRandomModel) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const fs::path folder = dir_ / "tiny-gpt2-hf";
  const Outcome init = lminv("init " + tiny_gpt2 + " --out " + folder.string());
  ASSERT_EQ(init.status, 0) << init.output;
  for (const char* file : {"model.safetensors", "config.json", "vocab.json", "merges.txt"})
    EXPECT_TRUE(fs::exists(folder / file)) << file;
  const nlohmann::json config = nlohmann::json::parse(std::ifstream(folder / "config.json"));
  EXPECT_EQ(config["model_type"], "gpt2");
  EXPECT_EQ(config["n_layer"], 2);
  EXPECT_EQ(config["n_embd"], 64);

  // The same experiment from the random weights and from the saved checkpoint gives the same numbers.
  // The checkpoint's config.json wins over [model]'s sizes (n_embd = 768 here is ignored).
  ASSERT_EQ(lminv("run " + tiny_gpt2 + isolated()).status, 0);
  const Outcome from_folder =
      lminv("run " + tiny_gpt2 + isolated() + " --set model.weights=" + folder.string() + " --set model.n_embd=768");
  ASSERT_EQ(from_folder.status, 0) << from_folder.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[1]["weights"]["source"], folder.string());
  EXPECT_EQ(r[1]["model"]["n_embd"], 64);
  EXPECT_EQ(r[0]["final_loss"], r[1]["final_loss"]);
  EXPECT_EQ(r[0]["decoded"]["ids"], r[1]["decoded"]["ids"]);
  EXPECT_EQ(r[0]["control"]["l1"], r[1]["control"]["l1"]);
  EXPECT_FALSE(r[0]["next_token"].is_null());  // GPT-2 runs report next-token agreement
}

TEST_F(Cli, ForwardWritesOutputAndInputGradient) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const fs::path file = dir_ / "forward.safetensors";
  const Outcome o = lminv("forward " + tiny_gpt2 + " --out " + file.string() + " --grad l2 --repeat 2");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("forward + backward  best"), std::string::npos) << o.output;
  // The safetensors header names the three tensors with their shapes: [1, T, d] in, [1, T, d] out (head ln_f).
  std::ifstream in(file, std::ios::binary);
  std::uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, ' ');
  in.read(header.data(), static_cast<std::streamsize>(n));
  const nlohmann::json h = nlohmann::json::parse(header);
  EXPECT_EQ(h["input"]["shape"], (std::vector<int>{1, 5, 64}));
  EXPECT_EQ(h["output"]["shape"], (std::vector<int>{1, 5, 64}));
  EXPECT_EQ(h["input_grad"]["shape"], (std::vector<int>{1, 5, 64}));
  EXPECT_EQ(h["input"]["dtype"], "F64");
  EXPECT_EQ(h["__metadata__"]["prompt_ids"], "[464,6766,318,4171,13]");
  EXPECT_EQ(h["__metadata__"]["grad_metric"], "l2");
}

// The argmax over the last position of tensor `name` [1, T, V] (F64) of a safetensors file `lminv forward` wrote.
std::int64_t last_position_argmax(const fs::path& file, const std::string& name) {
  std::ifstream in(file, std::ios::binary);
  std::uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, ' ');
  in.read(header.data(), static_cast<std::streamsize>(n));
  const nlohmann::json h = nlohmann::json::parse(header);
  EXPECT_EQ(h[name]["dtype"], "F64");
  const std::vector<std::int64_t> shape = h[name]["shape"];
  const std::int64_t T = shape.at(1), V = shape.at(2);
  const std::uint64_t begin = h[name]["data_offsets"][0];
  std::vector<double> last(static_cast<std::size_t>(V));
  in.seekg(static_cast<std::streamoff>(8 + n + begin + (T - 1) * V * 8));
  in.read(reinterpret_cast<char*>(last.data()), V * 8);
  return std::max_element(last.begin(), last.end()) - last.begin();
}

// [output] next_token: `full` reads the next token from every block + ln_f + lm_head; `truncated` from the
// experiment's own blocks, with the study's lm_head without ln_f when its head (here ln_f) has no LM head. Each is
// the argmax that `lminv forward` gives for that model on the prompt.
TEST_F(Cli, NextTokenComesFromTheFullOrTheTruncatedModel) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const std::string one_block = " --set model.blocks=1 --set optimizer.steps=2";
  ASSERT_EQ(lminv("run " + tiny_gpt2 + isolated() + one_block).status, 0);
  const Outcome o = lminv("run " + tiny_gpt2 + isolated() + one_block + " --set output.next_token=truncated");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("next token (truncated model)"), std::string::npos) << o.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0]["next_token"]["model"], "full");
  EXPECT_EQ(r[0]["next_token"]["blocks"], 2);
  EXPECT_EQ(r[0]["next_token"]["head"], "lm_head");
  EXPECT_EQ(r[1]["next_token"]["model"], "truncated");
  EXPECT_EQ(r[1]["next_token"]["blocks"], 1);
  EXPECT_EQ(r[1]["next_token"]["head"], "lm_head_no_ln_f");
  // The L1 input distance and ratio beside the L2 ones (the study's ratios are L1 / L1): L2 <= L1 <= sqrt(n) L2
  // over the n = 5 x 64 input elements, and r = input / output distance in each.
  const double in_l1 = r[0]["input_distance_l1"], in_l2 = r[0]["input_distance_l2"];
  EXPECT_GT(in_l1, in_l2);
  EXPECT_LE(in_l1, std::sqrt(5.0 * 64) * in_l2);
  EXPECT_DOUBLE_EQ(r[0]["ratio_input_output_l1"].get<double>(), in_l1 / r[0]["output_distance"]["l1"].get<double>());
  EXPECT_DOUBLE_EQ(r[0]["ratio_input_output_l2"].get<double>(), in_l2 / r[0]["output_distance"]["l2"].get<double>());

  const fs::path full = dir_ / "full.safetensors", truncated = dir_ / "truncated.safetensors";
  ASSERT_EQ(lminv("forward " + tiny_gpt2 + " --out " + full.string() + " --set model.head=lm_head").status, 0);
  ASSERT_EQ(lminv("forward " + tiny_gpt2 + " --out " + truncated.string() +
                  " --set model.blocks=1 --set model.head=lm_head_no_ln_f")
                .status,
            0);
  EXPECT_EQ(r[0]["next_token"]["original"].get<std::int64_t>(), last_position_argmax(full, "output"));
  EXPECT_EQ(r[1]["next_token"]["original"].get<std::int64_t>(), last_position_argmax(truncated, "output"));
}

// [model] positions = none is the experiment's choice (the seed study's InputGPT adds no wpe), so it holds for a
// checkpoint too, whose config.json decides the architecture otherwise: the run differs from the checkpoint's own.
TEST_F(Cli, NoPositionsAppliesToACheckpoint) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const fs::path folder = dir_ / "tiny-gpt2-hf";
  ASSERT_EQ(lminv("init " + tiny_gpt2 + " --out " + folder.string()).status, 0);
  const std::string run = "run " + tiny_gpt2 + isolated() + " --set model.weights=" + folder.string() +
                          " --set optimizer.steps=2";
  ASSERT_EQ(lminv(run).status, 0);
  const Outcome o = lminv(run + " --set model.positions=none");
  ASSERT_EQ(o.status, 0) << o.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0]["model"]["arch"]["positions"], "learned");
  EXPECT_EQ(r[1]["model"]["arch"]["positions"], "none");
  EXPECT_NE(r[0]["control"]["l1"], r[1]["control"]["l1"]);
}

TEST_F(Cli, BadCheckpointFolderIsNamed) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const Outcome o = lminv("run " + tiny_gpt2 + isolated() + " --set model.weights=/no/such/checkpoint");
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_NE(o.output.find("/no/such/checkpoint"), std::string::npos) << o.output;
  const Outcome mlp = lminv("run " + tiny_ + isolated() + " --set model.weights=/some/folder");
  EXPECT_EQ(mlp.status, 1);
  EXPECT_NE(mlp.output.find("family fcnet has no Hugging Face checkpoints"), std::string::npos) << mlp.output;
}

TEST_F(Cli, CompareAcrossDtypesPrintsAndRecordsTheDifferences) {
  const std::string tiny_gpt2 = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini";
  const Outcome o = lminv("compare " + tiny_gpt2 + isolated() + " --set optimizer.steps=3 --across backend.dtype=f64,f32");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("across backend.dtype (differences against f64)"), std::string::npos) << o.output;
  std::vector<nlohmann::json> rows = read_records(dir_ / "out" / "compare.jsonl");
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0]["value"], "f64");
  EXPECT_EQ(rows[0]["output_max_abs"], 0.0);  // the baseline against itself
  EXPECT_EQ(rows[1]["value"], "f32");
  const double out_norm = rows[1]["output_normalised"], grad_norm = rows[1]["grad_normalised"];
  EXPECT_GT(out_norm, 0.0);  // f32 rounds differently ...
  EXPECT_LT(out_norm, 1e-5);  // ... by about its precision
  EXPECT_GT(grad_norm, 0.0);
  EXPECT_LT(grad_norm, 1e-5);
  EXPECT_EQ(read_records(records()).size(), 2u);  // each value's run left its record too

  const Outcome bad = lminv("compare " + tiny_gpt2 + isolated() + " --across backend.dtype");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("--across 'backend.dtype': expected section.key=value1,value2"), std::string::npos)
      << bad.output;
}

namespace {

std::vector<std::string> lines_of(const fs::path& file) {
  std::vector<std::string> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// Every record of a sweep file has its own run key; returns them.
std::set<std::string> sweep_keys(const fs::path& file) {
  std::set<std::string> keys;
  for (const nlohmann::json& r : read_records(file)) {
    EXPECT_TRUE(keys.insert(r["sweep"]["key"].get<std::string>()).second) << "run recorded twice: " << r["sweep"]["key"];
    EXPECT_TRUE(r["exact_match"].get<bool>()) << r["sweep"]["key"];
    EXPECT_EQ(r["decoded"]["by"], "optimizer");
  }
  return keys;
}

}  // namespace

TEST_F(Cli, SequentialRunRecoversThePromptAndRecordsItsCertificate) {
  const Outcome o = lminv("run " + std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini" + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("recovered yes, exactly"), std::string::npos) << o.output;
  const std::vector<nlohmann::json> r = read_records(records());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["decoded"]["by"], "optimizer");
  ASSERT_EQ(r[0]["series"]["margin"].size(), 5u);
  for (const auto& m : r[0]["series"]["margin"]) EXPECT_GT(m.get<double>(), 0);
  EXPECT_EQ(r[0]["values"]["unverified_positions"], 0.0);
}

// A sweep over 3 prompts x 2 grid points, then the same sweep over all 6 prompts: the first 6 runs are not redone and
// their records stay as they were.
TEST_F(Cli, SweepRunsPromptsTimesGridAndResumes) {
  const std::string base = "sweep " + std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini --prompts " +
                           std::string(LMINV_TEST_DATA_DIR) + "/prompts-tiny.txt --grid model.blocks=1,2" + isolated();
  const fs::path file = dir_ / "out" / "sweep.jsonl";
  const Outcome first = lminv(base + " --limit 3");
  ASSERT_EQ(first.status, 0) << first.output;
  EXPECT_NE(first.output.find("[6/6]"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("model.blocks=2                   3    100%    100.0%"), std::string::npos)
      << first.output;
  const std::vector<std::string> before = lines_of(file);
  ASSERT_EQ(before.size(), 6u);
  EXPECT_EQ(sweep_keys(file).size(), 6u);

  const Outcome second = lminv(base);
  ASSERT_EQ(second.status, 0) << second.output;
  EXPECT_NE(second.output.find("resuming: 6 of 12 runs already recorded"), std::string::npos) << second.output;
  EXPECT_NE(second.output.find("[6/6]"), std::string::npos) << second.output;  // 6 left to run, not 12
  const std::vector<std::string> after = lines_of(file);
  ASSERT_EQ(after.size(), 12u);
  EXPECT_TRUE(std::equal(before.begin(), before.end(), after.begin()));
  EXPECT_EQ(sweep_keys(file).size(), 12u);
  EXPECT_TRUE(fs::exists(dir_ / "out" / "sweep-summary.md"));
  const nlohmann::json summary = nlohmann::json::parse(std::ifstream(dir_ / "out" / "sweep-summary.json"));
  ASSERT_EQ(summary["table"].size(), 2u);
  EXPECT_EQ(summary["table"][0]["runs"], 6);
  EXPECT_EQ(summary["table"][0]["exact_match_rate"], 1.0);

  // Nothing left: a third call runs nothing and prints the same table.
  const Outcome third = lminv(base);
  ASSERT_EQ(third.status, 0) << third.output;
  EXPECT_EQ(third.output.find("[1/"), std::string::npos) << third.output;
  EXPECT_EQ(lines_of(file).size(), 12u);
}

// The process killed by SIGKILL in the middle of writing its 4th record (the test hook LMINV_TEST_KILL_IN_RECORD
// writes half the line, then kills the process: the same point on every machine), then the same command again: the
// cut line is dropped, every run ends up recorded exactly once, and the 3 records written before the kill are kept.
TEST_F(Cli, InterruptedSweepLosesAndRepeatsNothing) {
  const std::string args = "sweep " + std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini --prompts " +
                           std::string(LMINV_TEST_DATA_DIR) +
                           "/prompts-tiny.txt --limit 3 --grid optimizer.policy=linearized,random" + isolated();
  const std::string killed =
      "LMINV_TEST_KILL_IN_RECORD=4 " + std::string(LMINV_BINARY) + " " + args + " > /dev/null 2>&1";
  const int status = std::system(killed.c_str());
  EXPECT_TRUE(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGKILL)) << status;
  const fs::path file = dir_ / "out" / "sweep.jsonl";
  std::ifstream raw(file, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(raw)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(bytes.empty());
  ASSERT_NE(bytes.back(), '\n') << "the 4th record was not cut";
  std::vector<std::string> before = lines_of(file);
  ASSERT_EQ(before.size(), 4u);  // 3 whole records and half of the 4th
  before.pop_back();
  for (const std::string& line : before) EXPECT_TRUE(nlohmann::json::accept(line));

  const Outcome resumed = lminv(args);
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("its last line was cut short"), std::string::npos) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming: 3 of 6"), std::string::npos) << resumed.output;
  const std::vector<std::string> after = lines_of(file);
  ASSERT_EQ(after.size(), 6u) << resumed.output;
  EXPECT_TRUE(std::equal(before.begin(), before.end(), after.begin()));
  EXPECT_EQ(sweep_keys(file).size(), 6u);
}

TEST_F(Cli, SweepErrorsNameTheProblem) {
  const std::string config = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini";
  Outcome o = lminv("sweep " + config + " --prompts " + (dir_ / "missing.txt").string() + isolated());
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("missing.txt"), std::string::npos) << o.output;
  o = lminv("sweep " + config + " --prompts " + std::string(LMINV_TEST_DATA_DIR) +
            "/prompts-tiny.txt --grid model.blocks" + isolated());
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("--grid 'model.blocks'"), std::string::npos) << o.output;
  o = lminv("sweep " + config + " --prompts " + std::string(LMINV_TEST_DATA_DIR) +
            "/prompts-tiny.txt --grid model.nonsense=1" + isolated());
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("nonsense"), std::string::npos) << o.output;
  o = lminv("sweep " + config + isolated());
  EXPECT_EQ(o.status, 2);
}

// A checkpoint folder in place of random weights (what a trained GPT-2 would be): the same sweep command, unchanged
// but for model.weights, recovers the same prompts.
TEST_F(Cli, SweepRunsOnACheckpointFolder) {
  const std::string config = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini";
  const fs::path folder = dir_ / "checkpoint";
  ASSERT_EQ(lminv("init " + config + " --out " + folder.string()).status, 0);
  const Outcome o = lminv("sweep " + config + " --prompts " + std::string(LMINV_TEST_DATA_DIR) +
                          "/prompts-tiny.txt --limit 3 --set model.weights=" + folder.string() + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("(config)                         3    100%    100.0%"), std::string::npos) << o.output;
  for (const nlohmann::json& r : read_records(dir_ / "out" / "sweep.jsonl"))
    EXPECT_EQ(r["weights"]["source"], folder.string());
}

// Several configs in one sweep: a comparison of methods is one command, one table row per config.
TEST_F(Cli, SweepComparesSeveralConfigs) {
  const std::string data = std::string(LMINV_TEST_DATA_DIR);
  const Outcome o = lminv("sweep " + data + "/tiny-gpt2-sequential.ini " + data + "/tiny-gpt2-pez.ini --prompts " +
                          data + "/prompts-tiny.txt --limit 2" + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("tiny-gpt2-sequential             2"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("tiny-gpt2-pez                    2"), std::string::npos) << o.output;
  std::set<std::string> optimizers;
  for (const nlohmann::json& r : read_records(dir_ / "out" / "sweep.jsonl")) optimizers.insert(r["optimizer"]);
  EXPECT_EQ(optimizers, (std::set<std::string>{"pez", "sequential"}));
}

// Every decoder family end to end on a small random model: run (exact inversion by the sequential search), init
// (a Hugging Face folder of the family), run again from that folder (the same record), forward, and a sweep over
// prompts of several lengths (one model for all of them).
TEST_F(Cli, EveryFamilyRunsInitsAndSweeps) {
  for (const char* family : {"llama", "mistral", "qwen2", "gpt_neox"}) {
    SCOPED_TRACE(family);
    const std::string config = std::string(LMINV_TEST_DATA_DIR) + "/tiny-" + family + "-sequential.ini";
    const fs::path folder = dir_ / (std::string(family) + "-hf");
    fs::remove_all(dir_ / "out");
    const Outcome run = lminv("run " + config + isolated());
    ASSERT_EQ(run.status, 0) << run.output;
    EXPECT_NE(run.output.find("recovered yes, exactly"), std::string::npos) << run.output;

    const Outcome init = lminv("init " + config + " --out " + folder.string());
    ASSERT_EQ(init.status, 0) << init.output;
    const nlohmann::json hf = nlohmann::json::parse(std::ifstream(folder / "config.json"));
    EXPECT_EQ(hf["model_type"], family);
    const Outcome again = lminv("run " + config + isolated() + " --set model.weights=" + folder.string());
    ASSERT_EQ(again.status, 0) << again.output;
    const std::vector<nlohmann::json> r = read_records(records());
    ASSERT_EQ(r.size(), 2u);
    EXPECT_EQ(r[1]["model"]["family"], family);
    EXPECT_EQ(r[0]["decoded"]["ids"], r[1]["decoded"]["ids"]);
    EXPECT_EQ(r[0]["output_distance"], r[1]["output_distance"]);
    EXPECT_FALSE(r[0]["next_token"].is_null());  // the family's own head
    EXPECT_EQ(r[0]["next_token"], r[1]["next_token"]);

    const fs::path file = dir_ / (std::string(family) + "-forward.safetensors");
    const Outcome fwd = lminv("forward " + config + " --out " + file.string() + " --grad l2");
    EXPECT_EQ(fwd.status, 0) << fwd.output;

    // A family given that differs from the folder's model_type is refused, naming both.
    const Outcome wrong = lminv("run " + config + isolated() + " --set model.weights=" + folder.string() +
                                " --set model.family=gpt2 --set model.n_kv_head=0");
    EXPECT_EQ(wrong.status, 1) << wrong.output;
  }
  // blocks past a checkpoint's layer count is refused once its config.json is read.
  const std::string llama = std::string(LMINV_TEST_DATA_DIR) + "/tiny-llama-sequential.ini";
  const Outcome past = lminv("run " + llama + isolated() + " --set model.weights=" + (dir_ / "llama-hf").string() +
                             " --set model.blocks=3");
  EXPECT_EQ(past.status, 1) << past.output;
  EXPECT_NE(past.output.find("blocks = 3: the checkpoint"), std::string::npos) << past.output;
}

TEST_F(Cli, SweepOverManyLengthsOnOneModel) {
  const std::string config = std::string(LMINV_TEST_DATA_DIR) + "/tiny-llama-sequential.ini";
  const fs::path prompts = dir_ / "prompts.txt";
  std::ofstream(prompts) << "The sky\nThe sky is blue today.\n{\"ids\": [5, 6, 7, 8, 9, 10, 11, 12, 13]}\n";
  const fs::path out = dir_ / "sweep.jsonl";
  const Outcome o = lminv("sweep " + config + " --prompts " + prompts.string() + " --records " + out.string() + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  const std::vector<nlohmann::json> r = read_records(out);
  ASSERT_EQ(r.size(), 3u);
  for (const nlohmann::json& rec : r) EXPECT_TRUE(rec["exact_match"].get<bool>()) << rec.dump();
}
