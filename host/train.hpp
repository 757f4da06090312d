// `lminv train`: next-token training of a config's decoder on a text corpus, through a backend's "trainer"
// capability (lminv/trainer.hpp; the torch backend), with Hugging Face checkpoints along the way, a JSON Lines log,
// and resumption from the last checkpoint (docs/training.md).
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config.hpp"
#include "lminv/trainer.hpp"
#include "registry.hpp"
#include "tokenizer.hpp"

namespace lminv {

// The [train] section.
struct TrainConfig {
  // Text files, or folders of them (searched recursively, in name order). Default: Debian's license texts.
  std::vector<std::filesystem::path> corpus = {"/usr/share/common-licenses"};
  std::int64_t seq_len = 64;       // positions per training row (at most the model's n_positions)
  std::int64_t batch = 16;         // rows per step
  std::int64_t steps = 1000;
  double lr = 1e-3;                // peak learning rate, after a linear warm-up ...
  std::int64_t warmup = 100;       // ... of this many steps, then a cosine decay ...
  double min_lr = 1e-4;            // ... to this at the last step
  TrainSettings optimizer;         // beta1, beta2, epsilon, weight_decay, grad_clip
  double validation = 0.1;         // the share of documents held out (by document, seeded)
  std::int64_t eval_every = 100;   // validation loss every N steps (and at every checkpoint and the end)
  std::int64_t eval_batches = 4;   // batches of the validation stream each evaluation reads (fixed windows)
  std::int64_t checkpoint_every = 0;  // a checkpoint every N steps; 0: only at the end
  std::int64_t log_every = 10;     // a training-loss record every N steps
  std::uint64_t seed = 0;          // the split, the document order and every batch
  std::string fingerprint;         // of the config as it affects the result (resuming checks it)
};

TrainConfig parse_train(const RawConfig& raw);

// The corpus as token streams: documents are paragraphs (text between blank lines) of the corpus files, each
// followed by the tokenizer's end-of-text token when it has one; each held out for validation by a seeded draw on its
// file and index; each split's documents in a seeded order, concatenated.
struct Corpus {
  std::vector<std::int64_t> train, validation;
  std::size_t files = 0, skipped_files = 0, documents_train = 0, documents_validation = 0;
  std::uintmax_t bytes = 0;
  std::int64_t end_of_text = -1;  // -1: the tokenizer has none
};
Corpus build_corpus(const TrainConfig& config, const Tokenizer& tokenizer, std::int64_t vocab_size);

// The learning rate at step s (1-based): linear warm-up to lr over `warmup` steps, then cosine to min_lr at `steps`.
double learning_rate(const TrainConfig& config, std::int64_t step);

// The ids of step s's batch: `batch` windows of seq_len + 1 ids at offsets drawn from Rng(seed).fork("batch s"),
// row-major. The same for every run and resume.
std::vector<std::int64_t> train_batch(const TrainConfig& config, const std::vector<std::int64_t>& stream,
                                      std::int64_t step);

// The cross-entropy (nats per token) on the validation stream of a unigram model fitted on the training stream
// (add-one smoothing over the vocabulary): the baseline a trained model must beat.
double unigram_loss(const Corpus& corpus, std::int64_t vocab_size);

// Trains (or resumes the training in `experiment.output_dir`: from its last checkpoint, when that run's config has
// the same fingerprint; a different one is an error unless `force`, which starts over). Writes
// <dir>/checkpoint-<step>/ (Hugging Face folder + optimizer.safetensors + trainer_state.json, each made in a
// temporary folder and renamed) and <dir>/train.jsonl.
void run_train(const ExperimentConfig& experiment, const TrainConfig& config, const Registry& registry, bool force,
               std::ostream& out);

// The complete checkpoints (checkpoint-<step> folders with a trainer_state.json) of lminv train's output folder DIR,
// in step order; an Error naming DIR when it has none.
std::vector<std::filesystem::path> training_checkpoints(const std::filesystem::path& dir);

// What a checkpoint folder's trainer_state.json says (step, tokens_seen, losses), or null when it has none (a folder
// that lminv train did not write).
nlohmann::json training_state_of(const std::filesystem::path& folder);

}  // namespace lminv
