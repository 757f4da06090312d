// lminv train (host/train.hpp, the torch backend's "trainer" capability): the schedule, the data, and end to end on
// the tiny GPT-2 of tests/data/tiny-gpt2-train.ini: the loss falls, one seed gives bit-identical checkpoints, a
// killed run resumes to the same weights, the checkpoints load in every backend, bad configs are clear errors.
#include <gtest/gtest.h>

#include "lminv_process.hpp"
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <map>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>

#include "config.hpp"
#include "lminv/error.hpp"
#include "tokenizer.hpp"
#include "train.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using lminv_test::Outcome;
using lminv_test::run_lminv;
using lminv_test::slurp;




std::vector<json> records_of(const fs::path& file) {
  std::vector<json> out;
  std::istringstream in(slurp(file));
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

constexpr char kTrainPrefix[] = "train";

class Train : public lminv_test::WithTempDir<kTrainPrefix> {
 protected:

  // `lminv train` of the tiny config into dir_/NAME, with more --set options.
  Outcome train(const std::string& name, const std::string& extra = "") const {
    return run_lminv("train " + config_ + " --set output.dir=" + (dir_ / name).string() + extra);
  }

  const std::string config_ = std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2-train.ini";
};

lminv::TrainConfig tiny_train(const std::string& extra_ini = "") {
  return lminv::parse_train(lminv::parse_config_text("[train]\nseq_len = 8\nbatch = 3\nsteps = 100\nwarmup = 10\n"
                                                     "lr = 0.01\nmin_lr = 0.001\n" + extra_ini,
                                                     "test.ini"));
}

}  // namespace

TEST(TrainSchedule, WarmsUpLinearlyThenDecaysByCosineToMinLr) {
  const lminv::TrainConfig c = tiny_train();
  EXPECT_DOUBLE_EQ(lminv::learning_rate(c, 1), 0.001);
  EXPECT_DOUBLE_EQ(lminv::learning_rate(c, 5), 0.005);
  EXPECT_DOUBLE_EQ(lminv::learning_rate(c, 10), 0.01);
  EXPECT_NEAR(lminv::learning_rate(c, 55), 0.001 + 0.5 * 0.009, 1e-15);  // half way: cos(pi / 2) = 0
  EXPECT_NEAR(lminv::learning_rate(c, 100), 0.001, 1e-15);
  for (std::int64_t s = 11; s < 100; ++s) EXPECT_LT(lminv::learning_rate(c, s + 1), lminv::learning_rate(c, s));
}

TEST(TrainData, BatchesAreWindowsOfTheStreamFixedByTheSeedAndStep) {
  lminv::TrainConfig c = tiny_train();
  std::vector<std::int64_t> stream(1000);
  for (std::size_t i = 0; i < stream.size(); ++i) stream[i] = static_cast<std::int64_t>(i);
  const std::vector<std::int64_t> a = lminv::train_batch(c, stream, 7);
  ASSERT_EQ(a.size(), 3u * 9u);
  for (std::size_t r = 0; r < 3; ++r)
    for (std::size_t k = 1; k < 9; ++k) EXPECT_EQ(a[r * 9 + k], a[r * 9] + static_cast<std::int64_t>(k));
  EXPECT_EQ(lminv::train_batch(c, stream, 7), a);
  EXPECT_NE(lminv::train_batch(c, stream, 8), a);
  c.seed = 1;
  EXPECT_NE(lminv::train_batch(c, stream, 7), a);
}

TEST(TrainData, TheCorpusSplitsByDocumentAndTheUnigramBaselineIsItsCrossEntropy) {
  const fs::path dir = fs::temp_directory_path() / ("lminv-train-corpus-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::string text;
  for (int i = 0; i < 200; ++i) text += "Paragraph number " + std::to_string(i) + " says something.\nA second line.\n\n";
  std::ofstream(dir / "a.txt") << text;
  std::ofstream(dir / "binary.bin") << std::string("\0\1\2", 3);
  const lminv::Tokenizer tokenizer = lminv::Tokenizer::from_folder(lminv::default_tokenizer_dir());
  const lminv::TrainConfig c = tiny_train("corpus = " + dir.string() + "\n");
  const lminv::Corpus corpus = lminv::build_corpus(c, tokenizer, tokenizer.vocab_size());
  EXPECT_EQ(corpus.files, 1u);
  EXPECT_EQ(corpus.skipped_files, 1u);
  EXPECT_EQ(corpus.documents_train + corpus.documents_validation, 200u);
  EXPECT_GT(corpus.documents_validation, 5u);  // about a tenth
  EXPECT_LT(corpus.documents_validation, 40u);
  EXPECT_EQ(corpus.end_of_text, 50256);
  // Every document ends in <|endoftext|>: as many as documents in each stream.
  EXPECT_EQ(static_cast<std::size_t>(std::count(corpus.train.begin(), corpus.train.end(), 50256)),
            corpus.documents_train);
  EXPECT_EQ(static_cast<std::size_t>(std::count(corpus.validation.begin(), corpus.validation.end(), 50256)),
            corpus.documents_validation);
  // The same seed, the same streams; another seed, another split.
  EXPECT_EQ(lminv::build_corpus(c, tokenizer, tokenizer.vocab_size()).validation, corpus.validation);
  lminv::TrainConfig other = c;
  other.seed = 3;
  EXPECT_NE(lminv::build_corpus(other, tokenizer, tokenizer.vocab_size()).validation, corpus.validation);
  // The unigram baseline, recomputed here: add-one counts of the training stream, scored on the validation targets.
  std::map<std::int64_t, double> counts;
  for (std::int64_t id : corpus.train) counts[id] += 1;
  const double total = static_cast<double>(corpus.train.size() + 50257);
  double expected = 0;
  for (std::size_t i = 1; i < corpus.validation.size(); ++i) expected -= std::log((counts[corpus.validation[i]] + 1) / total);
  expected /= static_cast<double>(corpus.validation.size() - 1);
  EXPECT_NEAR(lminv::unigram_loss(corpus, 50257), expected, 1e-9);
  fs::remove_all(dir);
}

TEST(TrainConfig, BadKeysAreNamed) {
  auto error_of = [](const std::string& ini) {
    try {
      tiny_train(ini);
    } catch (const lminv::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("seq_lenn = 3\n").find("seq_lenn"), std::string::npos);
  EXPECT_NE(error_of("batch = 0\n").find("[train] batch"), std::string::npos);
  EXPECT_NE(error_of("min_lr = 0.1\n").find("[train] min_lr"), std::string::npos);
  EXPECT_NE(error_of("validation = 1\n").find("[train] validation"), std::string::npos);
  EXPECT_NE(error_of("corpus =  \n").find("[train] corpus"), std::string::npos);
}

TEST_F(Train, TheLossFallsAndOneSeedGivesBitIdenticalCheckpoints) {
  Outcome o = train("a");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("saved     " + (dir_ / "a" / "checkpoint-0000040").string()), std::string::npos) << o.output;
  const std::vector<json> log = records_of(dir_ / "a" / "train.jsonl");
  ASSERT_FALSE(log.empty());
  EXPECT_EQ(log.front()["kind"], "start");
  std::vector<double> train_loss, validation;
  for (const json& r : log) {
    if (r["kind"] == "train") train_loss.push_back(r["loss"]);
    if (r["kind"] == "validation") validation.push_back(r["loss"]);
  }
  ASSERT_EQ(train_loss.size(), 8u);  // every 5 steps
  ASSERT_EQ(validation.size(), 3u);  // steps 0 (the starting weights' checkpoint), 20 and 40
  // From about ln 50257 = 10.8 nats to below 8 within 40 steps.
  EXPECT_GT(train_loss.front(), 10.0);
  EXPECT_LT(train_loss.back(), 8.0);
  EXPECT_LT(validation.back(), validation.front());
  EXPECT_EQ(log.back()["kind"], "end");
  EXPECT_TRUE(fs::exists(dir_ / "a" / "report.html")) << o.output;  // [output] report = auto: on for train

  o = train("b");
  ASSERT_EQ(o.status, 0) << o.output;
  for (const char* file : {"model.safetensors", "optimizer.safetensors", "config.json"})
    EXPECT_EQ(slurp(dir_ / "a" / "checkpoint-0000040" / file), slurp(dir_ / "b" / "checkpoint-0000040" / file)) << file;
  // Again in the same folder: nothing to do.
  o = train("a");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("already trained"), std::string::npos) << o.output;
  // The first checkpoint is the starting weights: the config's model as lminv init writes it.
  o = run_lminv("init " + config_ + " --out " + (dir_ / "init").string());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_EQ(slurp(dir_ / "a" / "checkpoint-0000000" / "model.safetensors"), slurp(dir_ / "init" / "model.safetensors"));
}

TEST_F(Train, AKilledRunResumesToTheSameWeights) {
  Outcome o = train("whole");
  ASSERT_EQ(o.status, 0) << o.output;
  // Killed (SIGKILL) as soon as its first checkpoint is there, then run again: it resumes from that checkpoint.
  const fs::path out = dir_ / "killed";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const std::string dir_option = "output.dir=" + out.string();
    const std::string every = "train.checkpoint_every=10";
    ::execl(LMINV_BINARY, LMINV_BINARY, "train", config_.c_str(), "--set", dir_option.c_str(), "--set", every.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (!fs::exists(out / "checkpoint-0000010") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(fs::exists(out / "checkpoint-0000010"));
  o = run_lminv("train " + config_ + " --set output.dir=" + out.string() + " --set train.checkpoint_every=10");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("(resuming after step "), std::string::npos) << o.output;
  EXPECT_EQ(slurp(out / "checkpoint-0000040" / "model.safetensors"),
            slurp(dir_ / "whole" / "checkpoint-0000040" / "model.safetensors"));
  EXPECT_EQ(slurp(out / "checkpoint-0000040" / "optimizer.safetensors"),
            slurp(dir_ / "whole" / "checkpoint-0000040" / "optimizer.safetensors"));
  // The log: one start, one resume, every train record's step once, in order.
  std::int64_t starts = 0, resumes = 0, last = 0;
  for (const json& r : records_of(out / "train.jsonl")) {
    starts += r["kind"] == "start";
    resumes += r["kind"] == "resume";
    if (r["kind"] == "train") {
      EXPECT_GT(r["step"].get<std::int64_t>(), last);
      last = r["step"];
    }
  }
  EXPECT_EQ(starts, 1);
  EXPECT_GE(resumes, 1);
  EXPECT_EQ(last, 40);
}

TEST_F(Train, CheckpointsLoadInEveryBackend) {
  Outcome o = train("a", " --set train.steps=10 --set train.warmup=2");
  ASSERT_EQ(o.status, 0) << o.output;
  const fs::path ckpt = dir_ / "a" / "checkpoint-0000010";
  for (const char* file : {"config.json", "model.safetensors", "vocab.json", "merges.txt", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(ckpt / file)) << file;
  std::string first;
  for (const char* backend : {"reference", "torch", "onednn"}) {
    o = run_lminv("forward " + std::string(LMINV_TEST_DATA_DIR) + "/tiny-gpt2.ini --set model.weights=" + ckpt.string() +
                  " --set backend.name=" + backend + " --set backend.dtype=f32 --out " +
                  (dir_ / (std::string(backend) + ".safetensors")).string());
    if (o.output.find("not installed") != std::string::npos || o.output.find("no plugin") != std::string::npos) continue;
    ASSERT_EQ(o.status, 0) << backend << ": " << o.output;
  }
  EXPECT_TRUE(fs::exists(dir_ / "reference.safetensors"));
  EXPECT_TRUE(fs::exists(dir_ / "torch.safetensors"));
}

TEST_F(Train, BadConfigsAreClearErrorsBeforeTraining) {
  Outcome o = train("x", " --set train.corpus=/no/such/corpus");
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("[train] corpus: /no/such/corpus: no such file or folder"), std::string::npos) << o.output;
  std::ofstream(dir_ / "empty.txt") << "\n\n";
  o = train("x", " --set train.corpus=" + (dir_ / "empty.txt").string());
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("each split needs at least seq_len + 1"), std::string::npos) << o.output;
  o = train("x", " --set train.seq_len=65");
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("[train] seq_len 65 exceeds the model's n_positions 64"), std::string::npos) << o.output;
  o = train("x", " --set backend.name=reference");
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("cannot train this model"), std::string::npos) << o.output;
  EXPECT_FALSE(fs::exists(dir_ / "x" / "checkpoint-0000040"));
  // Another config's run in the folder: refused, then replaced with --force.
  o = train("y", " --set train.steps=4 --set train.warmup=1");
  ASSERT_EQ(o.status, 0) << o.output;
  o = train("y", " --set train.steps=4 --set train.warmup=1 --set train.lr=0.001");
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.output.find("holds a training run of another config"), std::string::npos) << o.output;
  o = train("y", " --set train.steps=4 --set train.warmup=1 --set train.lr=0.001 --force");
  ASSERT_EQ(o.status, 0) << o.output;
}

// Invertibility across training, the documented workflow: lminv sweep --checkpoints over a training run's folder.
TEST_F(Train, SweepAcrossTheCheckpointsOfATrainingRun) {
  Outcome o = train("run", " --set train.steps=20 --set train.checkpoint_every=10 --set output.report=false");
  ASSERT_EQ(o.status, 0) << o.output;
  const std::string data = LMINV_TEST_DATA_DIR;
  const fs::path records = dir_ / "across" / "sweep.jsonl";
  o = run_lminv("sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + data + "/prompts-tiny.txt --limit 1 " +
                "--checkpoints " + (dir_ / "run").string() + " --records " + records.string());
  ASSERT_EQ(o.status, 0) << o.output;
  const std::vector<json> runs = records_of(records);
  ASSERT_EQ(runs.size(), 3u);  // checkpoints 0 (the starting weights), 10 and 20, in step order
  EXPECT_EQ(runs[0]["sweep"]["training"]["step"], 0);
  EXPECT_EQ(runs[1]["sweep"]["training"]["step"], 10);
  EXPECT_EQ(runs[2]["sweep"]["training"]["step"], 20);
  EXPECT_EQ(runs[2]["sweep"]["grid"]["model.weights"], (dir_ / "run" / "checkpoint-0000020").string());
  EXPECT_EQ(runs[2]["sweep"]["training"]["tokens_seen"], 20 * 8 * 32);
  // The page the sweep wrote has the across-training table.
  EXPECT_NE(slurp(dir_ / "across" / "sweep-report.html").find("<h4>Across training</h4>"), std::string::npos);
  // Not a training folder: a clear error.
  o = run_lminv("sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + data + "/prompts-tiny.txt --checkpoints " +
                dir_.string());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_NE(o.output.find("no checkpoint-<step> folder with a trainer_state.json"), std::string::npos) << o.output;
}

// Exact inversion on trained weights (issue #15, item 5). After 40 steps the tokens training moved (the frequent ones:
// " the", ",", " a", " is", ...) lie far out from the bulk of the embeddings, and the map contracts them: a single
// first-order model at the mean embedding predicts them worst of all and ranked them among the last of 50,257 (12,601
// candidates per position on the 6 prompts, measured with `anchors = 1`); the gradient policy's proxy lands on a
// non-token preimage near the mean (16,724 with `fallback_after = 0`). The piecewise linearization (a J at each of
// 16 k-means anchors) ranks them near the top, and the gradient policy falls back to it.
TEST_F(Train, ExactInversionOnTrainedWeightsNeedsFewCandidates) {
  Outcome o = train("t", " --set output.report=false");
  ASSERT_EQ(o.status, 0) << o.output;
  const std::string data = LMINV_TEST_DATA_DIR;
  for (const std::string policy : {"linearized", "gradient"}) {
    const fs::path records = dir_ / "exact" / (policy + ".jsonl");
    o = run_lminv("sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + data + "/prompts-tiny.txt --set model.weights=" +
                  (dir_ / "t" / "checkpoint-0000040").string() + " --records " + records.string() +
                  " --set output.report=false --set optimizer.policy=" + policy);
    ASSERT_EQ(o.status, 0) << o.output;
    const std::vector<json> runs = records_of(records);
    ASSERT_EQ(runs.size(), 6u);
    double candidates = 0, positions = 0, anchor_jacobians = 0, fallbacks = 0;
    for (const json& r : runs) {
      EXPECT_EQ(r["certificate"]["verdict"], "unique") << r.dump();
      for (const json& p : r["certificate"]["positions"]) {
        candidates += p["candidates"].get<double>();
        ++positions;
      }
      anchor_jacobians += r["values"].value("anchor_jacobians", 0.0);
      fallbacks += r["values"].value("fallbacks", 0.0);
    }
    EXPECT_LT(candidates / positions, 1000.0) << policy;  // 60.8 and 67.5 measured; 12,601 and 16,724 before
    EXPECT_GT(anchor_jacobians, 0.0) << policy;           // the piecewise ranking did the work
    if (policy == "gradient") EXPECT_GT(fallbacks, 0.0);
  }
}
