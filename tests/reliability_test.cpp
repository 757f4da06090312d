// Bad input, faults and concurrent use, end to end (docs/reliability.md): each case runs the lminv program as a user
// would and checks that it stops early with an error naming the file, key or value, that it neither crashes nor
// hangs (every command runs under `timeout`), and that records already written stay whole.
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace fs = std::filesystem;

namespace {

struct Outcome {
  int status = -1;     // exit status; 124 when `timeout` had to stop it (a hang), -1 when killed by a signal
  std::string output;  // stdout and stderr together
};

// Runs `[PREFIX] lminv ARGS` in a shell with stderr folded into stdout, stopped after 120 s.
Outcome run_lminv(const std::string& args, const std::string& prefix = "") {
  const std::string command = prefix + " timeout 120 " + std::string(LMINV_BINARY) + " " + args + " 2>&1";
  Outcome o;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return o;
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), pipe)) o.output.append(buf.data(), n);
  const int raw = ::pclose(pipe);
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return o;
}

std::string slurp(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool has(const Outcome& o, const std::string& part) { return o.output.find(part) != std::string::npos; }

const std::string kData = LMINV_TEST_DATA_DIR;

class Reliability : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lminv-reliability-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "-" +
            std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string isolated() const {
    return " --set output.dir=" + (dir_ / "out").string() + " --set output.cache_dir=" + (dir_ / "cache").string();
  }
  fs::path records() const { return dir_ / "out" / "records.jsonl"; }

  // A saved copy of the small GPT-2 (f64, 2 blocks) whose tensors a test may then spoil.
  fs::path saved_gpt2() {
    const fs::path folder = dir_ / "gpt2";
    const Outcome o = run_lminv("init " + kData + "/tiny-gpt2-sequential.ini --out " + folder.string());
    EXPECT_EQ(o.status, 0) << o.output;
    return folder;
  }

  // Overwrites elements [first, first + count) of tensor NAME (F64) in FOLDER/model.safetensors with VALUE.
  static void poke(const fs::path& folder, const std::string& name, double value, std::int64_t first = 0,
                   std::int64_t count = 1) {
    poke_each(folder, name, [value](std::int64_t) { return value; }, first, count);
  }
  // The same with value(i) for element i; count -1: to the end of the tensor.
  static void poke_each(const fs::path& folder, const std::string& name, const std::function<double(std::int64_t)>& value,
                        std::int64_t first = 0, std::int64_t count = 1) {
    const fs::path file = folder / "model.safetensors";
    std::uint64_t data_offset = 0, begin = 0, end = 0;
    {
      const lminv::SafetensorsFile st(file);
      // The file holds Hugging Face's names ("transformer.h.0..."): the entry whose name ends in NAME.
      std::string stored;
      for (const auto& [n, entry] : st.entries())
        if (n.size() >= name.size() && n.compare(n.size() - name.size(), name.size(), name) == 0) stored = n;
      ASSERT_FALSE(stored.empty()) << name;
      const lminv::SafetensorsEntry& e = st.entry(stored);
      ASSERT_EQ(e.dtype, "F64");
      begin = e.begin;
      end = e.end;
      std::ifstream in(file, std::ios::binary);
      in.read(reinterpret_cast<char*>(&data_offset), 8);  // little-endian header length
      data_offset += 8;
    }
    if (count < 0) count = static_cast<std::int64_t>((end - begin) / 8) - first;
    std::fstream io(file, std::ios::binary | std::ios::in | std::ios::out);
    io.seekp(static_cast<std::streamoff>(data_offset + begin + 8 * static_cast<std::uint64_t>(first)));
    for (std::int64_t i = 0; i < count; ++i) {
      const double v = value(first + i);
      io.write(reinterpret_cast<const char*>(&v), 8);
    }
  }

  fs::path dir_;
};

}  // namespace

// ---- NaN, infinities and divergence --------------------------------------------------------------------------------

TEST_F(Reliability, NanWeightsAreRefusedBeforeAnyRunNamingTheTensor) {
  const fs::path folder = saved_gpt2();
  poke(folder, "h.1.mlp.c_fc.weight", std::numeric_limits<double>::quiet_NaN(), 17);
  const std::string weights = " --set model.weights=" + folder.string();
  // The search that segfaulted on NaN distances, a descent that printed "loss nan", and forward that wrote NaN.
  for (const std::string& command :
       {"run " + kData + "/tiny-gpt2-sequential.ini", "run " + kData + "/tiny-gpt2.ini",
        "forward " + kData + "/tiny-gpt2.ini --out " + (dir_ / "f.safetensors").string()}) {
    SCOPED_TRACE(command);
    const Outcome o = run_lminv(command + weights + isolated());
    EXPECT_EQ(o.status, 1) << o.output;
    EXPECT_TRUE(has(o, "tensor 'h.1.mlp.c_fc.weight'")) << o.output;
    EXPECT_TRUE(has(o, "NaN at element 17")) << o.output;
    EXPECT_FALSE(has(o, "result")) << o.output;
  }
  EXPECT_FALSE(fs::exists(records()));
  EXPECT_FALSE(fs::exists(dir_ / "f.safetensors"));
}

TEST_F(Reliability, WeightsBeyondTheModelsDtypeAreRefused) {
  // Finite f64 weights of 1e300 would become infinities in an f32 model.
  const fs::path folder = saved_gpt2();
  poke(folder, "wte.weight", 1e300, 100, 1);
  const Outcome o = run_lminv("run " + kData + "/tiny-gpt2-sequential.ini --set model.weights=" + folder.string() +
                              " --set backend.dtype=f32" + isolated());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, "tensor 'wte.weight'")) << o.output;
  EXPECT_TRUE(has(o, "at element 100, beyond the range of f32")) << o.output;
}

TEST_F(Reliability, AModelThatOverflowsIsReportedAndItsOutputNotWritten) {
  // A Llama's own lm_head of +-3e38: finite in f32, but its dot products with the final hidden states are not.
  const std::string config = kData + "/tiny-llama-sequential.ini";
  const fs::path folder = dir_ / "llama";
  ASSERT_EQ(run_lminv("init " + config + " --out " + folder.string()).status, 0);
  poke_each(folder, "lm_head.weight", [](std::int64_t i) { return i % 2 ? 3e38 : -3e38; }, 0, -1);
  const std::string sets = " --set model.weights=" + folder.string() + " --set backend.dtype=f32" +
                           " --set model.head=lm_head" + isolated();
  const Outcome run = run_lminv("run " + config + sets);
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_TRUE(has(run, "the model's output for the prompt holds")) << run.output;
  EXPECT_TRUE(has(run, "overflows in f32")) << run.output;
  EXPECT_FALSE(has(run, "result")) << run.output;
  const fs::path out = dir_ / "f.safetensors";
  const Outcome fwd = run_lminv("forward " + config + " --out " + out.string() + sets);
  EXPECT_EQ(fwd.status, 1) << fwd.output;
  EXPECT_TRUE(has(fwd, "forward: 'output' [1, ")) << fwd.output;
  EXPECT_TRUE(has(fwd, "was not written")) << fwd.output;
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(Reliability, ADivergingDescentIsReportedInTheOutputAndTheRecord) {
  const Outcome o = run_lminv("run " + kData + "/tiny-fcnet.ini --set backend.dtype=f32 --set optimizer.lr=1e38" +
                          " --set optimizer.lr_final=1e38" + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_TRUE(has(o, "DIVERGED  the loss became")) << o.output;
  const nlohmann::json r = nlohmann::json::parse(slurp(records()));
  ASSERT_TRUE(r["diverged"].is_object()) << r.dump();
  EXPECT_GE(r["diverged"]["step"].get<std::int64_t>(), 1);
  // A run that stays finite says so too.
  const Outcome fine = run_lminv("run " + kData + "/tiny-fcnet.ini" + isolated());
  ASSERT_EQ(fine.status, 0) << fine.output;
  EXPECT_FALSE(has(fine, "DIVERGED")) << fine.output;
}

TEST_F(Reliability, AWalkReportsItsLastStepNotABestOne) {
  const fs::path config = dir_ / "walk.ini";
  std::ofstream(config) << "[model]\nfamily = gpt2\nn_layer = 2\nn_embd = 64\nn_head = 4\nn_positions = 32\n"
                           "blocks = 2\nhead = none\n[backend]\nname = reference\ndtype = f64\n"
                           "[prompt]\ntext = The sky is blue.\n[optimizer]\nname = clamped_walk\nsteps = 3\n"
                           "rand_eta = 0.01\ninner_steps = 1\ninner_lr = 0.01\n[decoder]\nname = pinv\n"
                           "[output]\nprogress = off\n";
  const Outcome o = run_lminv("run " + config.string() + isolated());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_TRUE(has(o, "at the last of 3 steps)")) << o.output;
  EXPECT_EQ(nlohmann::json::parse(slurp(records()))["result_step"], "last");
}

// ---- sizes ---------------------------------------------------------------------------------------------------------

TEST_F(Reliability, AbsurdSizesAreErrorsNamingTheKey) {
  for (const std::string set : {"vocab_size=4611686018427387904", "n_embd=1000000000000", "n_layer=1000000000",
                                 "n_positions=1000000000000", "n_inner=1000000000000", "head_dim=1000000000"}) {
    SCOPED_TRACE(set);
    const Outcome o = run_lminv("run " + kData + "/tiny-gpt2.ini --set model." + set + isolated());
    EXPECT_EQ(o.status, 1) << o.output;
    EXPECT_TRUE(has(o, set.substr(0, set.find('=')))) << o.output;
    EXPECT_TRUE(has(o, "beyond lminv's limit")) << o.output;
  }
  // Each size within its limit, together too large for this machine: refused before the allocation, with the sizes.
  const Outcome o = run_lminv("run " + kData + "/tiny-gpt2.ini --set model.n_embd=131072 --set model.n_head=4" +
                          " --set model.n_layer=4096 --set model.blocks=1" + isolated());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, "n_embd = 131072")) << o.output;
  EXPECT_TRUE(has(o, "more than this machine's")) << o.output;
}

TEST_F(Reliability, ATokenizerIdFarPastAnyVocabularyIsRefused) {
  const fs::path folder = dir_ / "tok";
  fs::create_directories(folder);
  std::ofstream(folder / "vocab.json") << "{\"a\": 0, \"b\": 50000000}";
  std::ofstream(folder / "merges.txt") << "#version: 0.2\n";
  const Outcome o = run_lminv("tokenize --tokenizer " + folder.string() + " ab");
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, "vocab.json")) << o.output;
  EXPECT_TRUE(has(o, "not an integer in [0, 16777215]: 50000000")) << o.output;
}

// ---- files that are not regular files ------------------------------------------------------------------------------

TEST_F(Reliability, DevicesFoldersAndFifosAreRefusedAtOnce) {
  const std::string config = kData + "/tiny-gpt2-sequential.ini";
  const fs::path fifo = dir_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  struct Case {
    std::string args, expected;
  };
  const std::vector<Case> cases = {
      {"run /dev/zero", "/dev/zero: the config file must be a regular file, and this is a character device"},
      {"run " + dir_.string(), "the config file must be a regular file, and this is a folder"},
      {"run " + fifo.string(), "the config file must be a regular file, and this is a FIFO"},
      {"sweep " + config + " --prompts /dev/zero", "/dev/zero: the prompt file must be a regular file"},
      {"sweep " + config + " --prompts " + kData + "/prompts-tiny.txt --records /dev/full",
       "/dev/full: records go to a regular file, and this is a character device"},
      {"sweep " + config + " --states /dev/zero", "/dev/zero: the states file must be a regular file"},
      {"invert " + config + " --states " + fifo.string(), "the states file must be a regular file, and this is a FIFO"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const Outcome o = run_lminv(c.args + isolated());
    EXPECT_EQ(o.status, 1) << o.output;  // not 124: nothing was read without end
    EXPECT_TRUE(has(o, c.expected)) << o.output;
  }
  const fs::path tokenizer = dir_ / "tokenizer";
  fs::create_directories(tokenizer / "tokenizer.json");
  const Outcome o = run_lminv("tokenize --tokenizer " + tokenizer.string() + " hi");
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, "tokenizer.json: the tokenizer file must be a regular file, and this is a folder")) << o.output;
}

// ---- outputs checked before the work, records whole ----------------------------------------------------------------

TEST_F(Reliability, AnOutputFolderThatCannotBeMadeFailsBeforeTheRun) {
  std::ofstream(dir_ / "a-file") << "in the way\n";
  const std::string sets = " --set output.dir=" + (dir_ / "a-file" / "out").string();
  for (const std::string& command : {"run " + kData + "/tiny-fcnet.ini",
                                     "sweep " + kData + "/tiny-gpt2-sequential.ini --prompts " + kData +
                                         "/prompts-tiny.txt --limit 1"}) {
    SCOPED_TRACE(command);
    const Outcome o = run_lminv(command + sets);
    EXPECT_EQ(o.status, 1) << o.output;
    EXPECT_TRUE(has(o, (dir_ / "a-file" / "out").string() + ": cannot create the folder")) << o.output;
    EXPECT_FALSE(has(o, "result")) << o.output;  // no run was made and lost
    EXPECT_FALSE(has(o, "[1/")) << o.output;
  }
}

TEST_F(Reliability, AFullDiskLeavesTheRecordsAsTheyWereAndTheNextRunAppendsCleanly) {
  const std::string run = "run " + kData + "/tiny-fcnet.ini" + isolated();
  ASSERT_EQ(run_lminv(run).status, 0);
  const std::string before = slurp(records());
  ASSERT_FALSE(before.empty());
  // A file size limit just above the records file: the next record fits in part only (lminv ignores SIGXFSZ, so
  // the write fails with EFBIG as on a full disk).
  const std::size_t blocks = before.size() / 1024 + 1;
  const Outcome full = run_lminv(run, "ulimit -f " + std::to_string(blocks) + ";");
  EXPECT_EQ(full.status, 1) << full.output;
  EXPECT_TRUE(has(full, "cannot append a whole record (File too large); the file is as it was before this record"))
      << full.output;
  EXPECT_EQ(slurp(records()), before);
  const Outcome next = run_lminv(run);
  ASSERT_EQ(next.status, 0) << next.output;
  std::ifstream in(records());
  int lines = 0;
  for (std::string line; std::getline(in, line); ++lines) EXPECT_TRUE(nlohmann::json::accept(line)) << line;
  EXPECT_EQ(lines, 2);
}

TEST_F(Reliability, ALastLineLeftUnfinishedIsCutOffBeforeTheNextRecord) {
  const std::string run = "run " + kData + "/tiny-fcnet.ini" + isolated();
  ASSERT_EQ(run_lminv(run).status, 0);
  { std::ofstream(records(), std::ios::app) << "{\"lminv_version\": \"0.1.0\", \"ti"; }  // a crash mid-write
  const Outcome o = run_lminv(run);
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_TRUE(has(o, "its last line was cut short (30 bytes")) << o.output;
  std::ifstream in(records());
  int lines = 0;
  for (std::string line; std::getline(in, line); ++lines) EXPECT_TRUE(nlohmann::json::accept(line)) << line;
  EXPECT_EQ(lines, 2);
}

TEST_F(Reliability, ASecondWriterOfOneRecordsFileIsRefused) {
  const fs::path file = dir_ / "sweep.jsonl";
  const int fd = ::open(file.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);  // as a running sweep holds it
  const std::string sweep = "sweep " + kData + "/tiny-gpt2-sequential.ini --prompts " + kData +
                            "/prompts-tiny.txt --limit 1 --records " + file.string() + isolated();
  const Outcome locked = run_lminv(sweep);
  EXPECT_EQ(locked.status, 1) << locked.output;
  EXPECT_TRUE(has(locked, file.string() + ": another lminv process is writing records to this file")) << locked.output;
  ::close(fd);  // the other writer is done
  const Outcome free = run_lminv(sweep);
  EXPECT_EQ(free.status, 0) << free.output;
}

// A resumed sweep reads every record back, and records are dumped again: a line nested past the JSON depth limit
// is refused naming the file and line, before any run (it was read without the limit every other file has).
TEST_F(Reliability, ADeeplyNestedRecordIsRefusedWhenASweepResumes) {
  const fs::path file = dir_ / "sweep.jsonl";
  { std::ofstream(file) << "{\"a\": " << std::string(100000, '[') << std::string(100000, ']') << "}\n"; }
  const std::string sweep = "sweep " + kData + "/tiny-gpt2-sequential.ini --prompts " + kData +
                            "/prompts-tiny.txt --limit 1 --records " + file.string() + isolated();
  const Outcome o = run_lminv(sweep);
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, file.string() + ":1: JSON nested more than 64 levels deep")) << o.output;
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line.size(), 200007u);  // the file is as it was
}

TEST_F(Reliability, OutputsAreNotReplacedWithoutForce) {
  const std::string config = kData + "/tiny-gpt2.ini";
  const fs::path folder = dir_ / "model";
  fs::create_directories(folder);
  std::ofstream(folder / "notes.txt") << "mine\n";
  Outcome o = run_lminv("init " + config + " --out " + folder.string());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_TRUE(has(o, "is a folder that is not empty")) << o.output;
  EXPECT_FALSE(fs::exists(folder / "model.safetensors"));
  o = run_lminv("init " + config + " --out " + folder.string() + " --force");
  EXPECT_EQ(o.status, 0) << o.output;
  EXPECT_TRUE(fs::exists(folder / "model.safetensors"));
  EXPECT_EQ(slurp(folder / "notes.txt"), "mine\n");

  const fs::path file = dir_ / "states.safetensors";
  std::ofstream(file) << "precious";
  for (const std::string& command : {"forward " + config + " --out " + file.string() + isolated(),
                                     "prompts --count 2 --out " + file.string()}) {
    SCOPED_TRACE(command);
    o = run_lminv(command);
    EXPECT_EQ(o.status, 1) << o.output;
    EXPECT_TRUE(has(o, "exists; add --force to replace it")) << o.output;
    EXPECT_EQ(slurp(file), "precious");
  }
  EXPECT_EQ(run_lminv("forward " + config + " --out " + file.string() + " --force" + isolated()).status, 0);
  EXPECT_NE(slurp(file), "precious");
}

// ---- plugins -------------------------------------------------------------------------------------------------------

TEST_F(Reliability, APluginWhoseEntryThrowsIsRefusedByNameAndTheRestWork) {
  const std::string bad = " --plugin-dir " + std::string(LMINV_TEST_PLUGIN_DIR) + "/bad3";
  const Outcome list = run_lminv("plugins" + bad);
  ASSERT_EQ(list.status, 0) << list.output;
  EXPECT_TRUE(has(list, "lminv-plugin-bad-descriptor-3.so: its lminv_plugin entry threw")) << list.output;
  const Outcome run = run_lminv("run " + kData + "/tiny-fcnet.ini" + bad + isolated());
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_TRUE(has(run, "warning: refused plugin")) << run.output;
}
