// What every command that builds a config's model shares: tokenizer, prompt, spec, weights, backend, model.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config.hpp"
#include "registry.hpp"
#include "tokenizer.hpp"

namespace lminv {

// How token ids become a vocabulary-space input ([model] vocab_encoding, vocab_scale): scale x one-hot, or
// scale x W^+ E(a_t) (pinv).
struct VocabEncoding {
  bool pinv = false;
  double scale = 1.0;
};
VocabEncoding vocab_encoding_of(const ExperimentConfig& config);

// The config's model, built, with the prompt it is run on.
struct Experiment {
  Tokenizer tokenizer;
  std::vector<std::int64_t> prompt_ids;
  std::string prompt_text;  // for people: ids the tokenizer does not know show as <id>
  ModelSpec spec;           // seq_len = prompt length; sizes from the checkpoint's config.json when there is one
  std::shared_ptr<const WeightSet> weights;
  std::shared_ptr<Backend> backend;
  std::shared_ptr<Model> model;  // keeps the backend (and its plugin) alive
  Tensor true_input;             // [1, T, d] token embeddings, or [1, T, V] (one-hot or pinv, see `vocab`)
  double weights_seconds = 0;    // time to initialise or load the weights
  VocabEncoding vocab;           // input = vocab: how ids become the true input
};

// The tokenizer folder of a config: [tokenizer] path, else the checkpoint folder when it holds
// tokenizer.json or vocab.json + merges.txt, else the embedded default.
std::filesystem::path tokenizer_folder(const ExperimentConfig& config);

// Copies a tokenizer folder's files into a model folder under Hugging Face's names: tokenizer.json (+
// tokenizer_config.json), or vocab.json + merges.txt (GPT-2's encoder.json + vocab.bpe have the same formats).
void copy_tokenizer_files(const std::filesystem::path& tokenizer_dir, const std::filesystem::path& model_dir);

// The model's spec and weights: seeded random ones, or a Hugging Face checkpoint (config.json wins
// over the size keys of [model]). `spec.seq_len` must be set.
std::shared_ptr<const WeightSet> make_weights(const ExperimentConfig& config, ModelSpec& spec);

// Backend made and configured (its keys checked), then the spec checked against what it supports.
std::shared_ptr<Backend> make_backend(const ExperimentConfig& config, const Registry& registry);

// Tokenizer, prompt, weights and model of `config`, on `backend` (made with make_backend).
Experiment build_experiment(const ExperimentConfig& config, std::shared_ptr<Backend> backend);

// What build_experiment makes, for many prompts: the tokenizer once, the weights once (once per prompt length for
// fcnet, whose weights depend on it), and one model (per prompt length for fcnet; shown to each prompt as a
// LengthView of its length for the kinds that take any length).
class ExperimentFactory {
 public:
  ExperimentFactory(const ExperimentConfig& config, std::shared_ptr<Backend> backend);

  const Tokenizer& tokenizer() const { return tokenizer_; }
  std::int64_t vocab_size() const { return spec_.vocab_size; }  // before a checkpoint is read: the config's
  // The experiment for prompt ids (checked against the vocabulary and the model's positions).
  Experiment build(const std::vector<std::int64_t>& ids);
  // The model for an unknown prompt of T positions (lminv invert): everything build() gives but the prompt (its
  // ids empty, true_input empty).
  Experiment build_unknown(std::int64_t T);

 private:
  ExperimentConfig config_;
  std::shared_ptr<Backend> backend_;
  Tokenizer tokenizer_;
  ModelSpec spec_;  // seq_len unset
  std::map<std::int64_t, std::pair<ModelSpec, std::shared_ptr<const WeightSet>>> weights_;  // by weights_key
  std::map<std::int64_t, std::shared_ptr<Model>> models_;  // by weights_key: one for the kinds of any length
  std::map<std::int64_t, double> weights_seconds_;
};

// The true input for token ids: their token-embedding rows [1, T, d], or for input = vocab [1, T, V] rows of
// vocab.scale x one-hot or vocab.scale x W^+ E(a_t) (row t = wte (wte^T wte)^+ wte[id_t], in fp64).
Tensor true_input_for(const std::vector<std::int64_t>& ids, const ModelSpec& spec, const WeightSet& weights,
                      const VocabEncoding& vocab = {});

// The ids a text prompt runs as: the tokenizer's special prefix (a BOS token where its tokenizer_config.json or
// post-processor adds one) unless [prompt] bos says otherwise, then the [prompt] prefix's ids, then the text's own.
std::vector<std::int64_t> prefix_for_text(const ExperimentConfig& config, const Tokenizer& tokenizer);
// The [prompt] prefix (or prefix_ids) alone, without the special prefix: what an ids prompt is preceded by.
std::vector<std::int64_t> prefix_for_ids(const ExperimentConfig& config, const Tokenizer& tokenizer);
std::vector<std::int64_t> text_prompt_ids(const ExperimentConfig& config, const Tokenizer& tokenizer,
                                          const std::string& text);
// The config's prompt: [prompt] ids after prefix_for_ids, or its text through text_prompt_ids. An Error when the
// config has no prompt.
std::vector<std::int64_t> config_prompt_ids(const ExperimentConfig& config, const Tokenizer& tokenizer);
// How many leading tokens of `ids` are the config's known prefix: prefix_for_text's when ids start with it, else
// prefix_for_ids' when they start with that, else 0.
std::size_t known_prefix_length(const ExperimentConfig& config, const Tokenizer& tokenizer,
                                const std::vector<std::int64_t>& ids);

// Text of ids for people to read; ids the tokenizer does not know are shown as <id>.
std::string display_text(const Tokenizer& tokenizer, const std::vector<std::int64_t>& ids);

}  // namespace lminv
