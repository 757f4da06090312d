// Experiment configs: INI parsing, --set overrides, and errors that name the file, key and value.
#include <gtest/gtest.h>

#include <Eigen/Dense>
#include <cmath>
#include <fstream>

#include "config.hpp"
#include "experiment.hpp"
#include "lminv/lminv.hpp"
#include "paths.hpp"
#include "tokenizer.hpp"

using namespace lminv;

namespace {

// The error message of `f`, or "" when it throws nothing.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

ExperimentConfig parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return parse_experiment(parse_config_text(text, "test.ini", overrides));
}

const char* kValid = R"(
# a comment
[model]
family = fcnet      ; the seed's FCNet
n_embd = 32
seed = 7
[backend]
name = reference
dtype = f32
threads = 1
[prompt]
text = The sky is blue.
[optimizer]
name = descent
steps = 60
lr = 0.5
[decoder]
name = pinv
[output]
dir = runs/test
snapshot_steps = 20, 40 60
)";

}  // namespace

TEST(Config, ReadsTheDesignKeys) {
  const ExperimentConfig c = parse(kValid);
  EXPECT_EQ(c.spec.family, "fcnet");
  EXPECT_EQ(c.spec.n_embd, 32);
  EXPECT_EQ(c.seed, 7u);
  EXPECT_EQ(c.spec.dtype, DType::f32);
  EXPECT_EQ(c.backend, "reference");
  EXPECT_EQ(c.prompt_text, "The sky is blue.");
  EXPECT_EQ(c.optimizer, "descent");
  EXPECT_EQ(c.optimizer_options.get_int("steps", 0), 60);
  EXPECT_EQ(c.backend_options.get_int("threads", 0), 1);
  EXPECT_EQ(c.snapshot_steps, (std::vector<std::int64_t>{20, 40, 60}));
  EXPECT_EQ(c.output_dir, "runs/test");
  EXPECT_FALSE(c.vocab_size_explicit);
}

TEST(Config, DefaultsFollowTheDesign) {
  const ExperimentConfig c = parse("[prompt]\ntext = hi\n");
  EXPECT_EQ(c.spec.family, "gpt2");
  EXPECT_EQ(c.spec.n_layer, 12);
  EXPECT_EQ(c.spec.n_embd, 768);
  EXPECT_EQ(c.spec.blocks, 1);
  EXPECT_EQ(c.spec.head, Head::lm_head);
  EXPECT_EQ(c.spec.input, InputSpace::embedding);
  EXPECT_EQ(c.spec.dtype, DType::f64);
  EXPECT_EQ(c.backend, "reference");
  EXPECT_EQ(c.optimizer, "descent");
  EXPECT_EQ(c.decoder, "pinv");
  EXPECT_EQ(c.weights, "random");
}

TEST(Config, SetOverridesAValueAndMayAddOne) {
  const ExperimentConfig c = parse(kValid, {"optimizer.steps=5", "model.blocks=0", "prompt.text=a = b"});
  EXPECT_EQ(c.optimizer_options.get_int("steps", 0), 5);
  EXPECT_EQ(c.spec.blocks, 0);
  EXPECT_EQ(c.prompt_text, "a = b");  // only the first '=' separates
}

TEST(Config, UnknownKeyInAHostSectionNamesFileSectionKeyAndValue) {
  const std::string msg = error_of([] { parse("[model]\nfamliy = fcnet\n[prompt]\ntext = x\n"); });
  EXPECT_NE(msg.find("test.ini"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[model]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("famliy = 'fcnet'"), std::string::npos) << msg;
}

TEST(Config, UnknownSectionIsAnError) {
  const std::string msg = error_of([] { parse("[modle]\nfamily = fcnet\n"); });
  EXPECT_NE(msg.find("unknown section [modle]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test.ini"), std::string::npos) << msg;
}

TEST(Config, MalformedValuesNameTheKeyAndValue) {
  struct Case {
    std::string text, expect;
  };
  for (const Case& c : std::vector<Case>{
           {"[model]\nn_embd = big\n[prompt]\ntext=x\n", "[model] n_embd = 'big': 'big' is not an integer"},
           {"[model]\nn_embd = -3\n[prompt]\ntext=x\n", "[model] n_embd = '-3': must be positive"},
           {"[model]\nfamily = gpt3\n[prompt]\ntext=x\n", "[model] family = 'gpt3': expected one of"},
           {"[model]\nblocks = 13\n[prompt]\ntext=x\n", "[model] blocks = '13': must be in 0..n_layer"},
           {"[backend]\ndtype = f16\n[prompt]\ntext=x\n", "[backend] dtype = 'f16': expected one of f32 | f64 | bf16"},
           {"[output]\ncontrol_sigma = x\n[prompt]\ntext=x\n", "[output] control_sigma = 'x': 'x' is not a number"},
           {"[prompt]\nids = 1 two 3\n", "[prompt] ids = '1 two 3': 'two' is not an integer"},
           {"[prompt]\ntext = a\nids = 1\n", "give one of text or ids, not both"},
           {"[prompt]\ntext = a\nprefix = b\nprefix_ids = 1\n", "give one of prefix or prefix_ids"},
           {"[model]\nvocab_encoding = pinv\n[prompt]\ntext=x\n",
            "[model] vocab_encoding = 'pinv': applies to input = vocab only"},
           {"[model]\ninput = vocab\nvocab_encoding = svd\n[prompt]\ntext=x\n",
            "[model] vocab_encoding = 'svd': expected one of onehot | pinv"},
           {"[model]\ninput = vocab\nvocab_scale = 0\n[prompt]\ntext=x\n",
            "[model] vocab_scale = '0': must be a positive number"},
           {"[model]\nhead = lm_head_ln_f\n[prompt]\ntext=x\n",
            "[model] head = 'lm_head_ln_f': expected one of none | ln_f | lm_head | lm_head_no_ln_f"},
           {"[model]\npositions = sinusoidal\n[prompt]\ntext=x\n",
            "[model] positions = 'sinusoidal': expected one of learned | rotary | none"},
           {"[output]\nnext_token = half\n[prompt]\ntext=x\n",
            "[output] next_token = 'half': expected one of full | truncated"},
           {"[backend]\nweight_dtype = int4\n[prompt]\ntext=x\n",
            "[backend] weight_dtype = 'int4': expected one of same | int8"},
           {"[model]\nfamily = fcnet\n[backend]\nweight_dtype = int8\n[prompt]\ntext=x\n",
            "[backend] weight_dtype = 'int8': int8 applies to decoder families (their block weights), not fcnet"},
           {"[model]\ndropout = 1\n[prompt]\ntext=x\n", "[model] dropout = '1': must be in [0, 1)"},
           {"[model]\ndropout = -0.1\n[prompt]\ntext=x\n", "[model] dropout = '-0.1': must be in [0, 1)"},
           {"[model]\nfamily = transformer_mlp\ndropout = 0.1\n[prompt]\ntext=x\n",
            "[model] dropout = '0.1': applies to decoder families, not transformer_mlp"},
       }) {
    const std::string msg = error_of([&] { parse(c.text); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "config:\n" << c.text << "message: " << msg;
    EXPECT_NE(msg.find("test.ini"), std::string::npos) << msg;
  }
}

TEST(Config, WeightDtypeAndDropoutReachTheSpec) {
  const ExperimentConfig plain = parse("[prompt]\ntext = x\n");
  EXPECT_EQ(plain.spec.weight_dtype, WeightDType::same);
  EXPECT_EQ(plain.spec.dropout, 0.0);
  const ExperimentConfig c =
      parse("[model]\nseed = 9\ndropout = 0.1\n[backend]\nname = torch\nweight_dtype = int8\n[prompt]\ntext = x\n");
  EXPECT_EQ(c.spec.weight_dtype, WeightDType::int8);
  EXPECT_EQ(c.spec.dropout, 0.1);
  EXPECT_EQ(c.spec.dropout_seed, 9u);
  const std::vector<std::string> features = required_features(c.spec);
  EXPECT_NE(std::find(features.begin(), features.end(), feature::int8_weights), features.end());
  EXPECT_NE(std::find(features.begin(), features.end(), feature::dropout), features.end());
}

TEST(Config, APromptIsOptionalUntilACommandNeedsOne) {
  // lminv invert reads configs without a prompt; run and forward ask for one through config_prompt_ids.
  const ExperimentConfig c = parse("[model]\nfamily = gpt2\n[prompt]\nprefix = System:\n");
  EXPECT_TRUE(c.prompt_text.empty());
  EXPECT_TRUE(c.prompt_ids.empty());
  EXPECT_EQ(c.prefix_text, "System:");
  const Tokenizer tokenizer = Tokenizer::from_folder(default_tokenizer_dir());
  const std::string msg = error_of([&] { config_prompt_ids(c, tokenizer); });
  EXPECT_NE(msg.find("[prompt] has neither text nor ids"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test.ini"), std::string::npos) << msg;
}

TEST(Config, TheKnownPrefixPrecedesThePromptAndIsCounted) {
  const Tokenizer tokenizer = Tokenizer::from_folder(default_tokenizer_dir());
  const ExperimentConfig text = parse("[prompt]\ntext = The sky\nprefix = Question:\n");
  const std::vector<std::int64_t> ids = config_prompt_ids(text, tokenizer);
  EXPECT_EQ(ids, (std::vector<std::int64_t>{24361, 25, 464, 6766}));
  EXPECT_EQ(known_prefix_length(text, tokenizer, ids), 2u);
  EXPECT_EQ(known_prefix_length(text, tokenizer, {464, 6766}), 0u);  // a prompt without it: nothing is known
  const ExperimentConfig given = parse("[prompt]\nids = 7 8\nprefix_ids = 5\n");
  EXPECT_EQ(config_prompt_ids(given, tokenizer), (std::vector<std::int64_t>{5, 7, 8}));
  EXPECT_EQ(known_prefix_length(given, tokenizer, {5, 7, 8}), 1u);
}

TEST(Config, SyntaxErrorsNameTheFile) {
  EXPECT_NE(error_of([] { parse("[prompt]\nthis line has no equals sign\n"); }).find("test.ini"), std::string::npos);
  EXPECT_NE(error_of([] { parse("key = outside\n"); }).find("outside a [section]"), std::string::npos);
  EXPECT_NE(error_of([] { parse("[prompt]\ntext = a\ntext = b\n"); }).find("given twice"), std::string::npos);
  EXPECT_NE(error_of([] { parse(kValid, {"optimizer.steps"}); }).find("expected section.key=value"), std::string::npos);
  EXPECT_NE(error_of([] { parse(kValid, {"nosection=1"}); }).find("outside a [section]"), std::string::npos);
  // A line naming Boost's own placeholder made its message grow without end (fuzz/config_fuzz).
  EXPECT_NE(error_of([] { parse("[prompt]\n%invalid_line% x\n"); }).find("invalid line '%invalid_line% x'"),
            std::string::npos);
}

TEST(Config, PluginSectionKeysAreLeftForThePluginAndCheckedAfterwards) {
  const ExperimentConfig c = parse(kValid, {"optimizer.stepz=3"});
  (void)c.optimizer_options.get_int("steps", 0);
  (void)c.optimizer_options.get_double("lr", 0);
  const std::string msg = error_of([&] { check_all_read(c.optimizer_options); });
  EXPECT_NE(msg.find("unknown key in [optimizer]: stepz = '3'"), std::string::npos) << msg;
}

TEST(Config, MissingFileIsNamed) {
  const std::string msg = error_of([] { read_config("/no/such/config.ini"); });
  EXPECT_NE(msg.find("/no/such/config.ini"), std::string::npos) << msg;
}

TEST(Config, ReadsAFileWithCommentsOfBothKinds) {
  const std::filesystem::path file = std::filesystem::temp_directory_path() / "lminv-config-test.ini";
  std::ofstream(file) << "; leading comment\n[prompt]\ntext = hello world   # trailing\n";
  const ExperimentConfig c = parse_experiment(read_config(file));
  EXPECT_EQ(c.prompt_text, "hello world");
  EXPECT_EQ(c.source, file.string());
  std::filesystem::remove(file);
}

TEST(ConfigFamilies, EachFamilySetsItsArchitecture) {
  const ExperimentConfig llama = parse("[model]\nfamily = llama\nn_kv_head = 4\n[prompt]\ntext=x\n");
  EXPECT_EQ(llama.spec.family, "llama");
  EXPECT_EQ(llama.spec.kind, ModelKind::decoder);
  EXPECT_EQ(llama.spec.arch.norm, Norm::rms_norm);
  EXPECT_EQ(llama.spec.arch.positions, Positions::rotary);
  EXPECT_EQ(llama.spec.arch.mlp, Mlp::swiglu);
  EXPECT_EQ(llama.spec.kv_heads(), 4);
  EXPECT_FALSE(llama.spec.arch.tied_head);
  const ExperimentConfig neox = parse("[model]\nfamily = gpt_neox\n[prompt]\ntext=x\n");
  EXPECT_EQ(neox.spec.arch.residual, Residual::parallel);
  EXPECT_EQ(neox.spec.arch.rotary_fraction, 0.25);
  const ExperimentConfig fc = parse("[model]\nfamily = fcnet\n[prompt]\ntext=x\n");
  EXPECT_EQ(fc.spec.kind, ModelKind::fcnet);
  EXPECT_TRUE(parse("[model]\nfamily = qwen2\n[prompt]\ntext=x\n").spec.arch.qkv_bias);
  EXPECT_TRUE(parse("[model]\nfamily = llama\n[prompt]\ntext=x\n").family_explicit);
  EXPECT_FALSE(parse("[prompt]\ntext=x\n").family_explicit);
}

TEST(ConfigFamilies, ArchitectureKeysOverrideSingleFields) {
  const ExperimentConfig c = parse(
      "[model]\nfamily = gpt2\nnorm = rms_norm\nnorm_bias = false\npositions = rotary\nrotary_fraction = 0.5\n"
      "mlp = swiglu\nresidual = parallel\ntied_head = false\nhead_dim = 32\nqkv_bias = false\nrope_theta = 500000\n"
      "norm_eps = 1e-6\n[prompt]\ntext=x\n");
  const Architecture& a = c.spec.arch;
  EXPECT_EQ(a.norm, Norm::rms_norm);
  EXPECT_FALSE(a.norm_bias);
  EXPECT_EQ(a.positions, Positions::rotary);
  EXPECT_EQ(a.rotary_fraction, 0.5);
  EXPECT_EQ(a.mlp, Mlp::swiglu);
  EXPECT_EQ(a.residual, Residual::parallel);
  EXPECT_FALSE(a.tied_head);
  EXPECT_EQ(a.head_dim, 32);
  EXPECT_FALSE(a.qkv_bias);
  EXPECT_EQ(a.rope_theta, 500000.0);
  EXPECT_EQ(a.norm_eps, 1e-6);
  EXPECT_EQ(parse("[model]\nlayer_norm_epsilon = 1e-3\n[prompt]\ntext=x\n").spec.arch.norm_eps, 1e-3);
}

TEST(ConfigFamilies, BadFamilyKeysNameTheKey) {
  struct Case {
    std::string text, expect;
  };
  for (const Case& c : std::vector<Case>{
           {"[model]\nfamily = llama\nn_kv_head = 5\n[prompt]\ntext=x\n", "[model] n_kv_head = '5': must divide n_head"},
           {"[model]\nnorm = batch\n[prompt]\ntext=x\n", "[model] norm = 'batch': expected one of layer_norm | rms_norm"},
           {"[model]\nfamily = llama\nnorm_bias = true\n[prompt]\ntext=x\n", "[model] norm_bias = 'true': rms_norm"},
           {"[model]\nrotary_fraction = 2\n[prompt]\ntext=x\n", "[model] rotary_fraction = '2': must be in (0, 1]"},
           {"[model]\nfamily = fcnet\nmlp = swiglu\n[prompt]\ntext=x\n", "[model] mlp = 'swiglu': applies to decoder"},
           {"[model]\nfamily = fcnet\nweights = /some/folder\n[prompt]\ntext=x\n",
            "[model] weights = '/some/folder': family fcnet has no Hugging Face checkpoints"},
           {"[model]\nfamily = bert\n[prompt]\ntext=x\n", "expected one of gpt2 | llama | mistral | qwen2 | gpt_neox"},
       }) {
    const std::string msg = error_of([&] { parse(c.text); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "config:\n" << c.text << "message: " << msg;
  }
  // With a checkpoint, blocks is checked once its config.json is read (it may have more than 12 layers).
  EXPECT_EQ(parse("[model]\nweights = /some/folder\nblocks = 20\n[prompt]\ntext=x\n").spec.blocks, 20);
}

// The seed study's direct representation targets: vocab_scale x one-hot, or vocab_scale x W^+ E(a_t), whose rows
// wte maps back to the tokens' embeddings (times the scale) and which is the minimum-norm such vector.
TEST(Experiment, VocabSpaceTrueInputIsScaledOneHotOrThePseudoInverseOfTheEmbedding) {
  ModelSpec spec;
  spec.kind = ModelKind::decoder;
  spec.vocab_size = 30;
  spec.n_embd = 6;
  spec.seq_len = 3;
  spec.input = InputSpace::vocab;
  spec.dtype = DType::f64;
  WeightSet weights;
  Tensor wte(DType::f64, {30, 6});
  Rng rng(9);
  fill_normal(wte, rng, 0.0, 0.02);
  weights.set("wte.weight", wte);
  const std::vector<std::int64_t> ids = {4, 29, 4};

  const Tensor ten = true_input_for(ids, spec, weights, {false, 10.0});
  for (std::int64_t t = 0; t < 3; ++t)
    for (std::int64_t v = 0; v < 30; ++v) EXPECT_EQ(ten.get(t * 30 + v), v == ids[t] ? 10.0 : 0.0);
  EXPECT_EQ(true_input_for(ids, spec, weights).get(29 + 30), 1.0);  // the default: 1 x one-hot

  const Tensor a = true_input_for(ids, spec, weights, {true, 2.0});
  Eigen::MatrixXd w(30, 6), x(3, 30);
  for (std::int64_t i = 0; i < 30 * 6; ++i) w(i / 6, i % 6) = wte.get(i);
  for (std::int64_t i = 0; i < 3 * 30; ++i) x(i / 30, i % 30) = a.get(i);
  const Eigen::MatrixXd mapped = x * w;  // [3, 6]: should be 2 x the embeddings
  for (std::int64_t t = 0; t < 3; ++t)
    for (std::int64_t j = 0; j < 6; ++j) EXPECT_NEAR(mapped(t, j), 2.0 * w(ids[t], j), 1e-13);
  // Minimum norm: x_t lies in the row space of wte^T (the span of wte's columns), so it equals its projection.
  const Eigen::MatrixXd projector = w * (w.transpose() * w).inverse() * w.transpose();  // [30, 30]
  EXPECT_LT((projector * x.transpose() - x.transpose()).cwiseAbs().maxCoeff(), 1e-10);
  // And it is not the one-hot: the token's own entry is its leverage w G^-1 w^T (times 2), in (0, 2) and about
  // 2 d / V on average.
  EXPECT_GT(x(0, 4), 0.0);
  EXPECT_LT(x(0, 4), 2.0);
}
