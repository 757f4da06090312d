#include "train.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#include "checkpoint.hpp"
#include "experiment.hpp"
#include "files.hpp"
#include "json_depth.hpp"
#include "lminv/rng.hpp"
#include "lminv/schema.hpp"
#include "progress.hpp"
#include "report.hpp"
#include "report_page.hpp"
#include "safetensors.hpp"

namespace lminv {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::uintmax_t kCorpusFileLimit = std::uintmax_t{256} << 20;   // one corpus file
constexpr std::uintmax_t kCorpusLimit = std::uintmax_t{2} << 30;         // the corpus in all
constexpr std::uintmax_t kStateLimit = std::uintmax_t{1} << 20;          // trainer_state.json

std::vector<std::string> words_of(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

bool valid_utf8(const std::string& s) {
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const int n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : -1;
    if (n < 0 || i + static_cast<std::size_t>(n) >= s.size()) return false;
    for (int k = 1; k <= n; ++k)
      if ((static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]) >> 6) != 2) return false;
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

// The corpus files: each entry a file, or a folder searched recursively; regular files only, in name order.
std::vector<fs::path> corpus_files(const TrainConfig& config) {
  std::vector<fs::path> files;
  for (const fs::path& entry : config.corpus) {
    std::error_code ec;
    if (fs::is_directory(entry, ec)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(entry, fs::directory_options::skip_permission_denied, ec);
           it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (ec) break;
        // Not through links inside a folder (fortune's .u8 names link to the files themselves: read twice).
        if (it->is_symlink(ec)) continue;
        if (it->is_regular_file(ec)) found.push_back(it->path());
      }
      if (found.empty()) throw Error("[train] corpus: " + entry.string() + " is a folder without files");
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::exists(entry, ec)) {
      files.push_back(entry);
    } else {
      throw Error("[train] corpus: " + entry.string() + ": no such file or folder");
    }
  }
  return files;
}

// The documents of a corpus file. A WordNet data file (data.noun, data.verb, data.adj, data.adv of Debian's
// wordnet-base: one synset a line, "offset lex_filenum ss_type w_cnt word lex_id ... | gloss") gives one document
// per synset, "word, word: gloss"; its licence lines (starting with spaces) are left out. Any other file gives its
// paragraphs: runs of lines separated by blank lines or by a line "%" (the fortune files' separator).
std::vector<std::string> documents_of(const fs::path& file, const std::string& text) {
  std::vector<std::string> out;
  const std::string name = file.filename().string();
  const bool wordnet = name == "data.noun" || name == "data.verb" || name == "data.adj" || name == "data.adv";
  std::istringstream in(text);
  if (wordnet) {
    for (std::string line; std::getline(in, line);) {
      if (line.size() < 9 || line.find_first_not_of("0123456789") != 8 || line[8] != ' ') continue;
      std::istringstream fields(line);
      std::string offset, lex_file, type, count_hex;
      fields >> offset >> lex_file >> type >> count_hex;
      const std::size_t bar = line.find(" | ");
      if (bar == std::string::npos || count_hex.empty()) continue;
      const long count = std::strtol(count_hex.c_str(), nullptr, 16);
      std::string words;
      for (long w = 0; w < count && fields; ++w) {
        std::string word, lex_id;
        fields >> word >> lex_id;
        std::replace(word.begin(), word.end(), '_', ' ');
        words += (words.empty() ? "" : ", ") + word;
      }
      std::string gloss = line.substr(bar + 3);
      while (!gloss.empty() && (gloss.back() == ' ' || gloss.back() == '\r')) gloss.pop_back();
      if (!gloss.empty()) out.push_back(words.empty() ? gloss : words + ": " + gloss);
    }
    return out;
  }
  std::string current;
  for (std::string line; std::getline(in, line);) {
    if (line.find_first_not_of(" \t\r") == std::string::npos || line == "%" || line == "%\r") {
      if (!current.empty()) out.push_back(std::move(current));
      current.clear();
      continue;
    }
    current += (current.empty() ? "" : "\n") + line;
  }
  if (!current.empty()) out.push_back(std::move(current));
  return out;
}

void shuffle(std::vector<std::size_t>& v, Rng rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.next_u64() % i]);
}

std::string checkpoint_name(std::int64_t step) {
  std::ostringstream s;
  s << "checkpoint-" << std::setw(7) << std::setfill('0') << step;
  return s.str();
}

// The complete checkpoints in `dir` (a trainer_state.json in them), by step.
std::map<std::int64_t, fs::path> checkpoints_in(const fs::path& dir) {
  std::map<std::int64_t, fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("checkpoint-", 0) != 0 || !e.is_directory(ec)) continue;
    const std::string digits = name.substr(11);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 12) continue;
    if (fs::is_regular_file(e.path() / "trainer_state.json", ec)) out[std::stoll(digits)] = e.path();
  }
  return out;
}

std::string number(double x, int digits = 4) {
  std::ostringstream s;
  s << std::setprecision(digits) << x;
  return s.str();
}

}  // namespace

std::vector<fs::path> training_checkpoints(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error("--checkpoints " + dir.string() + ": not a folder");
  std::vector<fs::path> out;
  for (const auto& [step, folder] : checkpoints_in(dir)) out.push_back(folder);
  if (out.empty())
    throw Error("--checkpoints " + dir.string() + ": no checkpoint-<step> folder with a trainer_state.json (is it "
                "lminv train's output folder?)");
  return out;
}

json training_state_of(const fs::path& folder) {
  std::error_code ec;
  const fs::path file = folder / "trainer_state.json";
  if (!fs::is_regular_file(file, ec)) return nullptr;
  const json state = json::parse(read_regular_file(file, "trainer state", kStateLimit), json_depth_limit(file.string()));
  json out = json::object();
  for (const char* key : {"step", "tokens_seen", "train_loss", "validation_loss"})
    if (state.contains(key) && state[key].is_number()) out[key] = state[key];
  return out;
}

TrainConfig parse_train(const RawConfig& raw) {
  const Options t = raw.section("train");
  TrainConfig c;
  if (t.has("corpus")) {
    c.corpus.clear();
    for (const std::string& w : words_of(t.get_string("corpus", ""))) c.corpus.emplace_back(w);
    if (c.corpus.empty()) t.fail("corpus", "names no file or folder");
  }
  auto positive = [&](const char* key, std::int64_t fallback, std::int64_t max) {
    const std::int64_t v = t.get_int(key, fallback);
    if (v < 1 || v > max) t.fail(key, "must be in 1 .. " + std::to_string(max));
    return v;
  };
  auto at_least_zero = [&](const char* key, std::int64_t fallback) {
    const std::int64_t v = t.get_int(key, fallback);
    if (v < 0) t.fail(key, "must be >= 0");
    return v;
  };
  c.seq_len = positive("seq_len", c.seq_len, kMaxPositions);
  c.batch = positive("batch", c.batch, 1 << 16);
  c.steps = positive("steps", c.steps, std::int64_t{1} << 40);
  c.lr = t.get_double("lr", c.lr);
  if (!(c.lr > 0 && c.lr < 10)) t.fail("lr", "must be in (0, 10)");
  c.min_lr = t.get_double("min_lr", std::min(c.min_lr, c.lr));
  if (!(c.min_lr >= 0 && c.min_lr <= c.lr)) t.fail("min_lr", "must be in [0, lr]");
  c.warmup = at_least_zero("warmup", std::min(c.warmup, c.steps / 10));
  if (c.warmup > c.steps) t.fail("warmup", "must not exceed steps (" + std::to_string(c.steps) + ")");
  c.optimizer.beta1 = t.get_double("beta1", c.optimizer.beta1);
  if (!(c.optimizer.beta1 >= 0 && c.optimizer.beta1 < 1)) t.fail("beta1", "must be in [0, 1)");
  c.optimizer.beta2 = t.get_double("beta2", c.optimizer.beta2);
  if (!(c.optimizer.beta2 >= 0 && c.optimizer.beta2 < 1)) t.fail("beta2", "must be in [0, 1)");
  c.optimizer.epsilon = t.get_double("epsilon", c.optimizer.epsilon);
  if (!(c.optimizer.epsilon > 0 && c.optimizer.epsilon < 1)) t.fail("epsilon", "must be in (0, 1)");
  c.optimizer.weight_decay = t.get_double("weight_decay", c.optimizer.weight_decay);
  if (!(c.optimizer.weight_decay >= 0 && c.optimizer.weight_decay < 1)) t.fail("weight_decay", "must be in [0, 1)");
  c.optimizer.grad_clip = t.get_double("grad_clip", c.optimizer.grad_clip);
  if (!(c.optimizer.grad_clip >= 0 && std::isfinite(c.optimizer.grad_clip))) t.fail("grad_clip", "must be >= 0");
  c.validation = t.get_double("validation", c.validation);
  if (!(c.validation > 0 && c.validation < 1)) t.fail("validation", "must be in (0, 1)");
  c.eval_every = at_least_zero("eval_every", c.eval_every);
  c.eval_batches = positive("eval_batches", c.eval_batches, 1 << 16);
  c.checkpoint_every = at_least_zero("checkpoint_every", c.checkpoint_every);
  c.log_every = positive("log_every", c.log_every, std::int64_t{1} << 40);
  const std::int64_t seed = t.get_int("seed", 0);
  if (seed < 0) t.fail("seed", "must be >= 0");
  c.seed = static_cast<std::uint64_t>(seed);
  check_all_read(t);
  // What the result depends on: every section but [prompt] and [output].
  json j = json::object();
  for (const auto& [section, keys] : raw.sections)
    if (section != "prompt" && section != "output") j[section] = keys;
  // Not what only decides how often the run is measured and saved.
  if (j.contains("train"))
    for (const char* key : {"eval_every", "eval_batches", "checkpoint_every", "log_every"}) j["train"].erase(key);
  c.fingerprint = fnv1a_hex(j.dump(-1, ' ', false, json::error_handler_t::replace));  // a config may hold bytes that are not UTF-8
  return c;
}

Corpus build_corpus(const TrainConfig& config, const Tokenizer& tokenizer, std::int64_t vocab_size) {
  Corpus corpus;
  for (const char* eos : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>"})
    if (const std::int64_t id = tokenizer.id_of(eos); id >= 0 && id < vocab_size) {
      corpus.end_of_text = id;
      break;
    }
  struct Document {
    std::vector<std::int64_t> ids;
  };
  std::vector<Document> train, validation;
  const Rng split = Rng(config.seed).fork("validation split");
  for (const fs::path& file : corpus_files(config)) {
    std::string text = read_regular_file(file, "[train] corpus file", kCorpusFileLimit);
    // Binary files (a NUL byte) and text that is not UTF-8 are left out, and counted.
    if (text.find('\0') != std::string::npos || !valid_utf8(text)) {
      ++corpus.skipped_files;
      continue;
    }
    ++corpus.files;
    corpus.bytes += text.size();
    if (corpus.bytes > kCorpusLimit)
      throw Error("[train] corpus: more than " + byte_size(kCorpusLimit) + " of text (at " + file.string() + ")");
    const std::vector<std::string> paragraphs = documents_of(file, text);
    for (std::size_t i = 0; i < paragraphs.size(); ++i) {
      Document d;
      d.ids = tokenizer.encode(paragraphs[i]);
      for (std::int64_t id : d.ids)
        if (id < 0 || id >= vocab_size)
          throw Error(file.string() + ": token id " + std::to_string(id) + " outside the model's vocabulary (size " +
                      std::to_string(vocab_size) + ")");
      if (corpus.end_of_text >= 0) d.ids.push_back(corpus.end_of_text);
      const bool held_out = split.fork(file.string() + "#" + std::to_string(i)).uniform() < config.validation;
      (held_out ? validation : train).push_back(std::move(d));
    }
  }
  if (corpus.files == 0)
    throw Error("[train] corpus: no text file among the " + std::to_string(corpus.skipped_files) +
                " files named (binary or not UTF-8)");
  auto concatenate = [&](std::vector<Document>& docs, const char* stream, std::vector<std::int64_t>& out) {
    std::vector<std::size_t> order(docs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    shuffle(order, Rng(config.seed).fork(stream));
    for (std::size_t i : order) out.insert(out.end(), docs[i].ids.begin(), docs[i].ids.end());
  };
  concatenate(train, "train order", corpus.train);
  concatenate(validation, "validation order", corpus.validation);
  corpus.documents_train = train.size();
  corpus.documents_validation = validation.size();
  const std::size_t window = static_cast<std::size_t>(config.seq_len) + 1;
  if (corpus.train.size() < window || corpus.validation.size() < window)
    throw Error("[train] corpus: " + std::to_string(corpus.train.size()) + " training and " +
                std::to_string(corpus.validation.size()) + " validation tokens (" + std::to_string(train.size()) +
                " and " + std::to_string(validation.size()) + " documents): each split needs at least seq_len + 1 = " +
                std::to_string(window) + "; give more text or lower seq_len");
  return corpus;
}

double learning_rate(const TrainConfig& c, std::int64_t step) {
  if (c.warmup > 0 && step <= c.warmup) return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup);
  const double span = static_cast<double>(std::max<std::int64_t>(1, c.steps - c.warmup));
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup) / span);
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + std::cos(M_PI * progress));
}

std::vector<std::int64_t> train_batch(const TrainConfig& c, const std::vector<std::int64_t>& stream,
                                      std::int64_t step) {
  const std::size_t window = static_cast<std::size_t>(c.seq_len) + 1;
  const std::uint64_t starts = stream.size() - window + 1;
  Rng rng = Rng(c.seed).fork("batch " + std::to_string(step));
  std::vector<std::int64_t> out;
  out.reserve(window * static_cast<std::size_t>(c.batch));
  for (std::int64_t b = 0; b < c.batch; ++b) {
    const std::size_t at = static_cast<std::size_t>(rng.next_u64() % starts);
    out.insert(out.end(), stream.begin() + static_cast<std::ptrdiff_t>(at),
               stream.begin() + static_cast<std::ptrdiff_t>(at + window));
  }
  return out;
}

double unigram_loss(const Corpus& corpus, std::int64_t vocab_size) {
  std::vector<double> counts(static_cast<std::size_t>(vocab_size), 1.0);  // add-one
  for (std::int64_t id : corpus.train) counts[static_cast<std::size_t>(id)] += 1;
  const double total = static_cast<double>(corpus.train.size()) + static_cast<double>(vocab_size);
  double loss = 0;
  // The targets of the validation stream (every token after the first), as the model is scored.
  for (std::size_t i = 1; i < corpus.validation.size(); ++i)
    loss -= std::log(counts[static_cast<std::size_t>(corpus.validation[i])] / total);
  return loss / static_cast<double>(corpus.validation.size() - 1);
}

void run_train(const ExperimentConfig& experiment, const TrainConfig& config, const Registry& registry, bool force,
               std::ostream& out) {
  const auto start = Clock::now();
  const fs::path dir = experiment.output_dir;
  const fs::path log_file = dir / "train.jsonl";

  // Everything that can be wrong is checked before the corpus is read: the spec, the backend and its trainer.
  ModelSpec spec = experiment.spec;
  if (spec.kind != ModelKind::decoder)
    throw Error(experiment.source + ": [model] family = " + spec.family + ": lminv train trains decoders");
  if (spec.dropout > 0)
    throw Error(experiment.source + ": [model] dropout = " + std::to_string(spec.dropout) +
                ": lminv train runs without dropout (its resumed runs would not repeat the masks); set it to 0");
  if (spec.weight_dtype != WeightDType::same)
    throw Error(experiment.source + ": [backend] weight_dtype = int8: lminv train trains in the model's dtype");
  spec.blocks = spec.n_layer;
  spec.head = Head::lm_head;
  spec.input = InputSpace::embedding;
  spec.layers.clear();
  spec.seq_len = config.seq_len;
  const fs::path tokenizer_dir = tokenizer_folder(experiment);
  const Tokenizer tokenizer = Tokenizer::from_folder(tokenizer_dir);
  if (!experiment.vocab_size_explicit) spec.vocab_size = tokenizer.vocab_size();
  std::shared_ptr<Backend> backend = make_backend(experiment, registry);

  // Resume: the last checkpoint of a run of this config, or a fresh start (refused over another config's run).
  const std::map<std::int64_t, fs::path> checkpoints = checkpoints_in(dir);
  std::int64_t resumed_at = 0;
  fs::path resume_from;
  if (!checkpoints.empty()) {
    const auto& [step, folder] = *checkpoints.rbegin();
    const json state = json::parse(read_regular_file(folder / "trainer_state.json", "trainer state", kStateLimit),
                                   json_depth_limit((folder / "trainer_state.json").string()));
    const std::string print = state.value("fingerprint", std::string());
    if (print != config.fingerprint && !force)
      throw Error(dir.string() + " holds a training run of another config (" + folder.filename().string() +
                  ", fingerprint " + print + ", this config's " + config.fingerprint +
                  "); give another [output] dir, or --force to start over there");
    if (print == config.fingerprint) {
      resumed_at = step;
      resume_from = folder;
    }
  }
  if (resumed_at >= config.steps) {
    out << "lminv train " << experiment.source << "\n  already trained: " << resume_from.string() << " is step "
        << resumed_at << " of " << config.steps << "\n";
    return;
  }

  // The weights: the checkpoint's, or the config's (random or a folder).
  std::shared_ptr<const WeightSet> weights;
  if (!resume_from.empty()) {
    Checkpoint c = load_checkpoint(resume_from);
    weights = std::make_shared<const WeightSet>(std::move(c.weights));
  } else {
    weights = make_weights(experiment, spec);
    spec.blocks = spec.n_layer;  // a checkpoint's config.json may have set the sizes
  }
  if (config.seq_len > spec.n_positions)
    throw Error(experiment.source + ": [train] seq_len " + std::to_string(config.seq_len) +
                " exceeds the model's n_positions " + std::to_string(spec.n_positions));
  const std::shared_ptr<Model> model = backend->create_model(spec, weights);
  Trainer* trainer = trainer_of(*model);
  if (!trainer)
    throw Error("backend '" + experiment.backend + "' cannot train this model (no \"trainer\" capability); lminv "
                "train needs [backend] name = torch");
  trainer->configure(config.optimizer);
  if (!resume_from.empty()) {
    trainer->load_state(read_safetensors(resume_from / "optimizer.safetensors"));
    if (trainer->steps() != resumed_at)
      throw Error((resume_from / "optimizer.safetensors").string() + ": its step is " +
                  std::to_string(trainer->steps()) + ", the checkpoint's " + std::to_string(resumed_at));
  }

  const bool report = report_wanted(experiment.report, /*by_default=*/true, out);
  const Corpus corpus = build_corpus(config, tokenizer, spec.vocab_size);
  const double unigram = unigram_loss(corpus, spec.vocab_size);

  // Only now, with everything read and checked, the folder changes. A fresh start over another config's run
  // (--force) removes its checkpoints, so that none is taken for this run's; a fresh start's log starts empty.
  if (resume_from.empty())
    for (const auto& [step, folder] : checkpoints) fs::remove_all(folder);
  fs::create_directories(dir);
  if (resume_from.empty() && fs::exists(log_file)) fs::remove(log_file);
  std::int64_t parameters = 0;
  for (const TensorSpec& t : weight_schema(spec)) parameters += shape_numel(t.shape);
  const std::int64_t tokens_per_step = config.batch * config.seq_len;

  // The log: a fresh one, or the resumed run's cut back to the checkpoint's step (later records were lost work).
  RecordsFile* log = nullptr;
  std::unique_ptr<RecordsFile> log_holder;
  if (!resume_from.empty() && fs::exists(log_file)) {
    std::istringstream in(read_regular_file(log_file, "training log", std::uintmax_t{1} << 32));
    std::string kept;
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      json r;
      try {
        r = json::parse(line, json_depth_limit(log_file.string()));
      } catch (const json::exception&) {
        continue;  // a line cut short by the interrupt
      }
      if (r.value("step", std::int64_t{0}) <= resumed_at) kept += line + "\n";
    }
    write_file_atomically(log_file, kept);
  }
  log_holder = std::make_unique<RecordsFile>(log_file, &out);
  log = log_holder.get();

  out << "lminv train " << experiment.source << "\n"
      << "  model     " << spec.family << "  d=" << spec.n_embd << "  layers=" << spec.n_layer << "  heads="
      << spec.n_head << "  vocab=" << spec.vocab_size << "  positions=" << spec.n_positions << "  ("
      << number(static_cast<double>(parameters) / 1e6, 3) << " M parameters, " << dtype_name(spec.dtype) << ", "
      << experiment.backend << ")\n"
      << "  corpus    " << corpus.files << " files (" << byte_size(corpus.bytes) << ")";
  if (corpus.skipped_files) out << ", " << corpus.skipped_files << " binary or non-UTF-8 files left out";
  out << "\n            train " << corpus.train.size() << " tokens (" << corpus.documents_train
      << " documents), validation " << corpus.validation.size() << " tokens (" << corpus.documents_validation
      << " documents); unigram baseline " << number(unigram) << " nats/token\n"
      << "  schedule  " << config.steps << " steps of " << config.batch << " x " << config.seq_len << " tokens, lr "
      << config.lr << " (warm-up " << config.warmup << ", cosine to " << config.min_lr << ")\n"
      << "  output    " << dir.string() << (resume_from.empty() ? "" : "  (resuming after step " + std::to_string(resumed_at) + ")")
      << "\n" << std::flush;
  if (resume_from.empty())
    log->append({{"kind", "start"},
                 {"step", 0},
                 {"time", utc_timestamp()},
                 {"lminv_version", LMINV_VERSION},
                 {"config_file", experiment.source},
                 {"fingerprint", config.fingerprint},
                 {"parameters", parameters},
                 {"corpus",
                  {{"files", corpus.files},
                   {"skipped_files", corpus.skipped_files},
                   {"bytes", corpus.bytes},
                   {"train_tokens", corpus.train.size()},
                   {"validation_tokens", corpus.validation.size()},
                   {"train_documents", corpus.documents_train},
                   {"validation_documents", corpus.documents_validation},
                   {"end_of_text", corpus.end_of_text}}},
                 {"unigram_validation_loss", unigram},
                 {"tokens_per_step", tokens_per_step}});
  else
    log->append({{"kind", "resume"}, {"step", resumed_at}, {"time", utc_timestamp()}});

  // The validation loss: the same eval_batches x batch windows every time, spread evenly over the stream.
  const std::size_t window = static_cast<std::size_t>(config.seq_len) + 1;
  auto validation_loss = [&] {
    const std::int64_t n = config.eval_batches * config.batch;
    const std::size_t last = corpus.validation.size() - window;
    double sum = 0;
    for (std::int64_t b = 0; b < config.eval_batches; ++b) {
      std::vector<std::int64_t> tokens;
      for (std::int64_t r = 0; r < config.batch; ++r) {
        const std::int64_t i = b * config.batch + r;
        const std::size_t at = n > 1 ? static_cast<std::size_t>(static_cast<double>(last) * static_cast<double>(i) /
                                                                 static_cast<double>(n - 1))
                                     : 0;
        tokens.insert(tokens.end(), corpus.validation.begin() + static_cast<std::ptrdiff_t>(at),
                      corpus.validation.begin() + static_cast<std::ptrdiff_t>(at + window));
      }
      sum += trainer->loss(tokens, config.batch);
    }
    return sum / static_cast<double>(config.eval_batches);
  };

  auto save = [&](std::int64_t step, double train_loss, double val_loss) {
    const fs::path final_dir = dir / checkpoint_name(step);
    const fs::path tmp = dir / ("." + checkpoint_name(step) + ".tmp");
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    const WeightSet now = trainer->weights();
    save_checkpoint(tmp, spec, now);
    copy_tokenizer_files(tokenizer_dir, tmp);
    const WeightSet state = trainer->state();
    write_safetensors(tmp / "optimizer.safetensors", state.tensors());
    write_file_atomically(tmp / "trainer_state.json",
                          json{{"step", step},
                               {"fingerprint", config.fingerprint},
                               {"config_file", experiment.source},
                               {"tokens_seen", step * tokens_per_step},
                               {"train_loss", train_loss},
                               {"validation_loss", val_loss},
                               {"lminv_version", LMINV_VERSION},
                               {"time", utc_timestamp()}}
                                  .dump(2) +
                              "\n");
    fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    return final_dir;
  };

  // With checkpoints along the way, the first is the starting weights (step 0): the across-training sweep then
  // measures the untrained model of the same run beside its trained ones.
  if (resume_from.empty() && config.checkpoint_every > 0) {
    const double val0 = validation_loss();
    log->append({{"kind", "validation"}, {"step", 0}, {"loss", val0}, {"tokens_seen", 0}});
    const fs::path saved = save(0, NAN, val0);
    out << "  step 0/" << config.steps << "  validation " << number(val0) << "\n  saved     " << saved.string()
        << "\n" << std::flush;
  }

  Progress progress(progress_mode(experiment.progress), "step", config.steps);
  double window_loss = 0;
  std::int64_t window_steps = 0;
  double last_loss = NAN, last_val = NAN;
  const auto loop_start = Clock::now();
  for (std::int64_t step = resumed_at + 1; step <= config.steps; ++step) {
    const double lr = learning_rate(config, step);
    const TrainStepResult r = trainer->step(train_batch(config, corpus.train, step), config.batch, lr);
    last_loss = r.loss;
    window_loss += r.loss;
    ++window_steps;
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (step % config.log_every == 0 || step == config.steps) {
      log->append({{"kind", "train"},
                   {"step", step},
                   {"loss", window_loss / static_cast<double>(window_steps)},
                   {"last_loss", r.loss},
                   {"lr", lr},
                   {"grad_norm", r.grad_norm},
                   {"tokens_seen", step * tokens_per_step},
                   {"seconds", seconds}});
      window_loss = 0;
      window_steps = 0;
    }
    const bool checkpoint = (config.checkpoint_every > 0 && step % config.checkpoint_every == 0) || step == config.steps;
    if ((config.eval_every > 0 && step % config.eval_every == 0) || checkpoint) {
      last_val = validation_loss();
      log->append({{"kind", "validation"}, {"step", step}, {"loss", last_val}, {"tokens_seen", step * tokens_per_step}});
      progress.clear();
      out << "  step " << step << "/" << config.steps << "  train " << number(r.loss) << "  validation "
          << number(last_val) << "  lr " << number(lr, 3) << "  (" << duration_text(seconds) << ")\n" << std::flush;
    }
    if (checkpoint) {
      const fs::path saved = save(step, r.loss, last_val);
      progress.clear();
      out << "  saved     " << saved.string() << "\n" << std::flush;
    }
    const double rate = static_cast<double>((step - resumed_at) * tokens_per_step) /
                        std::max(1e-9, std::chrono::duration<double>(Clock::now() - loop_start).count());
    progress.update(step, "loss " + number(r.loss) + "  " + number(rate, 3) + " tokens/s");
  }
  progress.clear();
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  log->append({{"kind", "end"},
               {"step", config.steps},
               {"train_loss", last_loss},
               {"validation_loss", last_val},
               {"unigram_validation_loss", unigram},
               {"seconds", total}});
  out << "  done      " << config.steps << " steps, " << config.steps * tokens_per_step << " tokens seen; validation "
      << number(last_val) << " nats/token against the unigram baseline's " << number(unigram) << " ("
      << duration_text(total) << ")\n";
  log_holder.reset();
  if (report) write_records_report(log_file, dir / "report.html", out);
}

}  // namespace lminv
