// config.json of every family (host/checkpoint.cpp load_checkpoint, host/families/*): the input is config.json, put
// in a folder beside a small valid model.safetensors of the family it names (the family golden checkpoints), so that
// a config the adapter accepts goes on to the checks of config.json against the tensors and, when they agree, to a
// whole load.
#include <cstdint>
#include <map>
#include <string>

#include "checkpoint.hpp"
#include "fuzz_common.hpp"
#include "lminv/error.hpp"

namespace {

namespace fs = std::filesystem;

// One folder per family, each with its model.safetensors (a copy of a golden checkpoint's).
const std::map<std::string, fs::path>& folders() {
  static const std::map<std::string, fs::path> out = [] {
    const fs::path src = lminv_fuzz::source_dir() / "tests/data";
    const std::map<std::string, fs::path> models = {
        {"gpt2", src / "gpt2-golden/checkpoint-f32"},       {"llama", src / "family-golden/llama"},
        {"mistral", src / "family-golden/mistral-bf16"},    {"qwen2", src / "family-golden/qwen2"},
        {"gpt_neox", src / "family-golden/gpt_neox-f16"},
    };
    std::map<std::string, fs::path> dirs;
    for (const auto& [family, model] : models) {
      const fs::path dir = lminv_fuzz::scratch_dir("checkpoint") / family;
      fs::create_directories(dir);
      fs::copy_file(model / "model.safetensors", dir / "model.safetensors", fs::copy_options::overwrite_existing);
      dirs[family] = dir;
    }
    return dirs;
  }();
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view config = lminv_fuzz::as_view(data, size);
  // The folder of the first family the text names (gpt_neox before gpt2: the longer name first); gpt2 by default.
  fs::path dir = folders().at("gpt2");
  std::size_t best = std::string_view::npos;
  for (const char* family : {"gpt_neox", "llama", "mistral", "qwen2", "gpt2"}) {
    const std::size_t at = config.find(std::string("\"") + family + "\"");
    if (at < best) best = at, dir = folders().at(family);
  }
  lminv_fuzz::write_file(dir / "config.json", config);
  try {
    const lminv::Checkpoint c = lminv::load_checkpoint(dir);
    (void)c;
  } catch (const lminv::Error&) {
  }
  return 0;
}
