// lminv invert end to end: states written by lminv forward (or made here) inverted without the prompt, the
// certificate and its verdicts, known prefixes, states from another backend and dtype, bad states files, and sweeps
// over a set of captured states.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace fs = std::filesystem;
using lminv::Tensor;

namespace {

struct Outcome {
  int status = -1;
  std::string output;  // stdout and stderr together
};

Outcome run_lminv(const std::string& args) {
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

bool has_torch() { return fs::exists(fs::path(LMINV_BUILD_PLUGIN_DIR) / "lminv-plugin-torch.so"); }

class Invert : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lminv-invert-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "-" +
            std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string isolated() const {
    return " --set output.dir=" + (dir_ / "out").string() + " --set output.cache_dir=" + (dir_ / "cache").string();
  }
  fs::path records() const { return dir_ / "out" / "records.jsonl"; }

  // `lminv forward CONFIG` with `sets` into FILE; the prompt ids it used.
  std::vector<std::int64_t> forward(const fs::path& file, const std::string& sets = "") {
    const Outcome o = run_lminv("forward " + tiny_ + " --force --out " + file.string() + isolated() + sets);
    EXPECT_EQ(o.status, 0) << o.output;
    std::map<std::string, std::string> metadata;
    lminv::read_safetensors(file, &metadata);
    return nlohmann::json::parse(metadata.at("prompt_ids")).get<std::vector<std::int64_t>>();
  }

  // Inverts FILE; the record appended.
  nlohmann::json invert(const fs::path& file, const std::string& sets = "", Outcome* shown = nullptr) {
    const Outcome o = run_lminv("invert " + tiny_ + " --states " + file.string() + isolated() + sets);
    if (shown) *shown = o;
    EXPECT_EQ(o.status, 0) << o.output;
    const std::vector<nlohmann::json> r = read_records(records());
    return r.empty() ? nlohmann::json() : r.back();
  }

  fs::path dir_;
  const std::string tiny_ = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-sequential.ini";
};

// Every searched position unique, with its best rival farther than the accepted token.
void expect_unique(const nlohmann::json& record) {
  ASSERT_TRUE(record.contains("certificate")) << record.dump();
  EXPECT_EQ(record["verdict"], "unique") << record["certificate"].dump();
  for (const nlohmann::json& p : record["certificate"]["positions"]) {
    if (p["verdict"] == "known") continue;
    EXPECT_EQ(p["verdict"], "unique") << p.dump();
    ASSERT_TRUE(p["best_rejected"].is_number()) << p.dump();
    EXPECT_GT(p["best_rejected"].get<double>(), p["distance"].get<double>()) << p.dump();
    EXPECT_TRUE(p["margin_ratio"].is_null() || p["margin_ratio"].get<double>() > 3) << p.dump();
  }
}

}  // namespace

TEST_F(Invert, RecoversThePromptOfForwardStatesInF64AndF32) {
  for (const char* dtype : {"f64", "f32"}) {
    SCOPED_TRACE(dtype);
    fs::remove_all(dir_ / "out");
    const fs::path states = dir_ / (std::string("states-") + dtype + ".safetensors");
    const std::string sets = std::string(" --set backend.dtype=") + dtype;
    const std::vector<std::int64_t> ids = forward(states, sets);
    Outcome shown;
    const nlohmann::json r = invert(states, sets, &shown);
    EXPECT_EQ(r["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids);
    EXPECT_EQ(r["exact_match"], true);  // the file's prompt_ids, compared after the search
    expect_unique(r);
    EXPECT_EQ(r["command"], "invert");
    EXPECT_NE(shown.output.find("verdict   unique"), std::string::npos) << shown.output;
    EXPECT_NE(shown.output.find("certificate"), std::string::npos) << shown.output;
  }
}

TEST_F(Invert, RepeatedTokensAndASinglePosition) {
  const std::vector<std::vector<std::int64_t>> prompts = {{11, 11, 11, 11}, {464}};
  for (const std::vector<std::int64_t>& ids : prompts) {
    SCOPED_TRACE(ids.size());
    fs::remove_all(dir_ / "out");
    // The tiny config with [prompt] ids instead of its text.
    std::string body;
    {
      std::ifstream in(tiny_);
      for (std::string line; std::getline(in, line);) {
        if (line.rfind("text =", 0) == 0) continue;
        body += line + "\n";
        if (line == "[prompt]") {
          body += "ids =";
          for (std::int64_t id : ids) body += " " + std::to_string(id);
          body += "\n";
        }
      }
    }
    const fs::path config = dir_ / "tiny-ids.ini";
    std::ofstream(config) << body;
    const fs::path states = dir_ / "states.safetensors";
    const Outcome f = run_lminv("forward " + config.string() + " --force --out " + states.string() + isolated());
    ASSERT_EQ(f.status, 0) << f.output;
    const Outcome inv = run_lminv("invert " + config.string() + " --states " + states.string() + isolated());
    ASSERT_EQ(inv.status, 0) << inv.output;
    const nlohmann::json r = read_records(records()).back();
    EXPECT_EQ(r["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids);
    expect_unique(r);
  }
}

TEST_F(Invert, AKnownPrefixIsFixedCheckedAndNotSearched) {
  const fs::path states = dir_ / "states.safetensors";
  const std::vector<std::int64_t> ids = forward(states, " --set prompt.prefix=Question:");
  const std::vector<std::int64_t> prefix = {24361, 25};  // "Question", ":" in GPT-2's vocabulary
  ASSERT_GE(ids.size(), 3u);
  ASSERT_EQ(std::vector<std::int64_t>(ids.begin(), ids.begin() + 2), prefix);
  const nlohmann::json r = invert(states, " --set prompt.prefix=Question:");
  EXPECT_EQ(r["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids);
  EXPECT_EQ(r["known_prefix"].get<std::vector<std::int64_t>>(), prefix);
  const nlohmann::json& positions = r["certificate"]["positions"];
  EXPECT_EQ(positions[0]["verdict"], "known");
  EXPECT_EQ(positions[1]["verdict"], "known");
  EXPECT_EQ(positions[0]["candidates"], 1);
  expect_unique(r);

  // A prefix the states were not made with is refused at its first wrong position, before the search.
  fs::remove_all(dir_ / "out");
  const Outcome wrong = run_lminv("invert " + tiny_ + " --states " + states.string() + isolated() +
                              " --set prompt.prefix=Answer:");
  EXPECT_EQ(wrong.status, 1) << wrong.output;
  EXPECT_NE(wrong.output.find("the known prefix does not match the target at position 0"), std::string::npos)
      << wrong.output;
  EXPECT_FALSE(fs::exists(records()));
}

TEST_F(Invert, StatesOfAnotherBackendInBf16AreRecoveredUnderARelaxedEpsilon) {
  if (!has_torch()) GTEST_SKIP() << "the torch backend is not built here (LibTorch not found)";
  const fs::path states = dir_ / "states-bf16.safetensors";
  const std::vector<std::int64_t> ids = forward(states, " --set backend.name=torch --set backend.dtype=bf16");
  {
    const lminv::SafetensorsFile f(states);
    ASSERT_EQ(f.entry("output").dtype, "BF16");
  }
  const nlohmann::json r = invert(states, " --set backend.name=reference --set backend.dtype=f32");
  EXPECT_EQ(r["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids);
  expect_unique(r);
  EXPECT_EQ(r["states"]["stored_dtype"], "BF16");
  // bf16 states lie far above f32's own threshold (1e-4): the threshold followed their rounding, and says so.
  EXPECT_GT(r["values"]["epsilon_floor"].get<double>(), 1e-3);
  EXPECT_GT(r["certificate"]["observed_level"].get<double>(), 1e-4);
}

// States of every family computed by PyTorch, not by lminv (tests/tools/capture_states.py --family-fixtures: its
// GPT-2 model on tests/data/gpt2-golden, make_family_golden.py's Hugging Face-semantics model on
// tests/data/family-golden's folders; float32, and bfloat16 for Llama), inverted by the reference backend in f64
// without the prompt: each recovered exactly and certified unique.
TEST_F(Invert, StatesOfEveryFamilyFromTheIndependentPyTorchModelAreRecovered) {
  const fs::path data = LMINV_TEST_DATA_DIR;
  const std::vector<std::int64_t> ids = {5, 17, 17, 42, 3, 47, 1, 33};  // capture_states.py FAMILY_FIXTURE_IDS
  for (const char* name : {"gpt2-float32", "llama-float32", "llama-bfloat16", "mistral-float32", "qwen2-float32",
                           "gpt_neox-float32"}) {
    SCOPED_TRACE(name);
    const std::string family = std::string(name).substr(0, std::string(name).find('-'));
    const fs::path folder = family == "gpt2" ? data / "gpt2-golden" / "checkpoint-f64" : data / "family-golden" / family;
    const fs::path config = dir_ / (family + ".ini");
    std::ofstream(config) << "[model]\nfamily = " << family << "\nweights = " << folder.string()
                          << "\nhead = none\ninput = embedding\n\n[backend]\nname = reference\ndtype = f64\n\n"
                             "[optimizer]\nname = sequential\npolicy = linearized\n\n[decoder]\nname = nearest\n\n"
                             "[output]\nprogress = off\n";
    fs::remove_all(dir_ / "out");
    const Outcome o = run_lminv("invert " + config.string() + " --states " +
                                (data / "states" / "families" / (std::string(name) + ".safetensors")).string() +
                                isolated());
    ASSERT_EQ(o.status, 0) << o.output;
    const std::vector<nlohmann::json> r = read_records(records());
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0]["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids);
    EXPECT_EQ(r[0]["exact_match"], true);
    expect_unique(r[0]);
    // Another computation: above the f64 floor, at float32's or bfloat16's rounding, and marked relaxed.
    const double level = r[0]["certificate"]["observed_level"].get<double>();
    const double above = std::string(name).find("bfloat16") != std::string::npos ? 1e-4 : 1e-8;
    EXPECT_GT(level, above) << o.output;
    EXPECT_LT(level, 0.05) << o.output;
  }
}

TEST_F(Invert, TwoTokensWithTheSameEmbeddingAreReportedAmbiguous) {
  // A checkpoint in which token 4171 (" blue") has the embedding of token 2266 (" red").
  const fs::path folder = dir_ / "model";
  Outcome init = run_lminv("init " + tiny_ + " --out " + folder.string() + isolated());
  ASSERT_EQ(init.status, 0) << init.output;
  std::map<std::string, std::string> metadata;
  lminv::WeightSet stored = lminv::read_safetensors(folder / "model.safetensors", &metadata);
  std::map<std::string, Tensor> tensors = stored.tensors();
  std::string wte;
  for (const auto& [name, t] : tensors)
    if (name.find("wte") != std::string::npos) wte = name;
  ASSERT_FALSE(wte.empty());
  Tensor& w = tensors[wte];
  const std::int64_t d = w.dim(1);
  for (std::int64_t j = 0; j < d; ++j) w.set(4171 * d + j, w.get(2266 * d + j));
  lminv::write_safetensors(folder / "model.safetensors", tensors, metadata);

  const fs::path states = dir_ / "states.safetensors";
  const std::string sets = " --set model.weights=" + folder.string();
  const std::vector<std::int64_t> ids = forward(states, sets);  // "The sky is blue."
  ASSERT_EQ(ids[3], 4171);
  Outcome shown;
  const nlohmann::json r = invert(states, sets, &shown);
  EXPECT_EQ(r["verdict"], "ambiguous") << r["certificate"].dump();
  const nlohmann::json& p = r["certificate"]["positions"][3];
  EXPECT_EQ(p["verdict"], "ambiguous");
  std::vector<std::int64_t> both = {p["id"].get<std::int64_t>()};
  for (const nlohmann::json& tie : p["ties"]) both.push_back(tie["id"]);
  std::sort(both.begin(), both.end());
  EXPECT_EQ(both, (std::vector<std::int64_t>{2266, 4171})) << p.dump();
  EXPECT_NE(shown.output.find("verdict   ambiguous"), std::string::npos) << shown.output;
  // The other positions stay unique.
  for (int t : {0, 1, 2, 4}) EXPECT_EQ(r["certificate"]["positions"][t]["verdict"], "unique") << t;
}

TEST_F(Invert, BadStatesAreRefusedBeforeAnySearch) {
  const fs::path good = dir_ / "good.safetensors";
  forward(good);
  const lminv::WeightSet w = lminv::read_safetensors(good);
  const Tensor& out = w.get("output");  // [1, T, 64]
  const std::int64_t T = out.dim(1);
  auto write = [&](const std::string& name, const Tensor& t) {
    const fs::path file = dir_ / name;
    lminv::write_safetensors(file, {{"output", t}});
    return file;
  };
  Tensor narrow(lminv::DType::f32, {T, 32});
  Tensor nan = out;
  nan.set(70, std::numeric_limits<double>::quiet_NaN());  // position 1, feature 6
  Tensor longer(lminv::DType::f32, {40, 64});  // the tiny model has 32 positions
  for (std::int64_t i = 0; i < longer.numel(); ++i) longer.set(i, 0.5);
  Tensor rank4(lminv::DType::f32, {1, 1, T, 64});
  const std::vector<std::pair<fs::path, std::string>> cases = {
      {write("narrow.safetensors", narrow), "32"},
      {write("nan.safetensors", nan), "NaN"},
      {write("long.safetensors", longer), "40"},
      {write("rank4.safetensors", rank4), "rank"},
  };
  for (const auto& [file, word] : cases) {
    SCOPED_TRACE(file.string());
    const Outcome o = run_lminv("invert " + tiny_ + " --states " + file.string() + isolated());
    EXPECT_EQ(o.status, 1) << o.output;
    EXPECT_NE(o.output.find(file.string()), std::string::npos) << o.output;
    EXPECT_NE(o.output.find(word), std::string::npos) << o.output;
    EXPECT_FALSE(fs::exists(records()));
  }
  const Outcome missing = run_lminv("invert " + tiny_ + " --states " + good.string() + " --tensor nope" + isolated());
  EXPECT_EQ(missing.status, 1) << missing.output;
  EXPECT_NE(missing.output.find("nope"), std::string::npos) << missing.output;
  EXPECT_NE(missing.output.find("output"), std::string::npos) << missing.output;  // the names it has
  const Outcome descent = run_lminv("invert " + tiny_ + " --states " + good.string() + " --set optimizer.name=descent" +
                                isolated());
  EXPECT_EQ(descent.status, 1) << descent.output;
  EXPECT_NE(descent.output.find("token search"), std::string::npos) << descent.output;
}

TEST_F(Invert, SweepInvertsEverySetEntryAndResumes) {
  std::vector<std::vector<std::int64_t>> ids;
  std::ofstream manifest(dir_ / "set.jsonl");
  for (const char* text : {"The sky is blue.", "Grass is green", "A"}) {
    const fs::path file = dir_ / ("s" + std::to_string(ids.size()) + ".safetensors");
    ids.push_back(forward(file, std::string(" --set prompt.text='") + text + "'"));
    manifest << nlohmann::json{{"states", file.filename().string()}}.dump() << "\n";
  }
  manifest.close();
  const std::string command =
      "sweep " + tiny_ + " --states " + (dir_ / "set.jsonl").string() + " --records " + (dir_ / "r.jsonl").string() +
      isolated();
  const Outcome o = run_lminv(command);
  ASSERT_EQ(o.status, 0) << o.output;
  const std::vector<nlohmann::json> r = read_records(dir_ / "r.jsonl");
  ASSERT_EQ(r.size(), 3u);
  for (std::size_t i = 0; i < r.size(); ++i) {
    EXPECT_EQ(r[i]["decoded"]["ids"].get<std::vector<std::int64_t>>(), ids[i]);
    EXPECT_EQ(r[i]["verdict"], "unique");
  }
  EXPECT_NE(o.output.find("100%"), std::string::npos) << o.output;
  const Outcome again = run_lminv(command);
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_NE(again.output.find("3 of 3 runs already recorded"), std::string::npos) << again.output;
  EXPECT_EQ(read_records(dir_ / "r.jsonl").size(), 3u);
}

TEST_F(Invert, RunOfATokenSearchPrintsAndRecordsItsCertificate) {
  const Outcome o = run_lminv("run " + tiny_ + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("verdict   unique"), std::string::npos) << o.output;
  const nlohmann::json r = read_records(records()).back();
  expect_unique(r["certificate"].is_object() ? nlohmann::json{{"certificate", r["certificate"]},
                                                              {"verdict", r["certificate"]["verdict"]}}
                                             : r);
}
