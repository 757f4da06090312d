// Experiment configs (host/config.cpp): the input is an INI file, then optionally a line "--set--" and one --set
// override per line. read_config + parse_experiment, then the spec check a run makes before it builds a model, and
// the [train] section as lminv train reads it (parse_train).
#include <cstdint>
#include <string>

#include "config.hpp"
#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "lminv/schema.hpp"
#include "train.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto parts = lminv_fuzz::split(lminv_fuzz::as_view(data, size), "\n--set--\n", 2);
  const auto file = lminv_fuzz::scratch_dir("config") / "config.ini";
  lminv_fuzz::write_file(file, parts[0]);
  std::vector<std::string> overrides;
  if (parts.size() > 1)
    for (std::string_view rest = parts[1]; !rest.empty();) {
      const std::size_t nl = rest.find('\n');
      overrides.emplace_back(rest.substr(0, nl));
      rest.remove_prefix(nl == std::string_view::npos ? rest.size() : nl + 1);
    }
  try {
    const lminv::RawConfig raw = lminv::read_config(file, overrides);
    const lminv::ExperimentConfig c = lminv::parse_experiment(raw);
    lminv::ModelSpec spec = c.spec;
    spec.seq_len = std::max<std::int64_t>(1, std::min<std::int64_t>(spec.n_positions, 8));
    lminv::check_spec(spec, c.source);
    (void)lminv::parse_config_text(std::string(parts[0]), "inline", overrides);  // the same text without the file
  } catch (const lminv::Error&) {
  }
  try {
    const lminv::TrainConfig t = lminv::parse_train(lminv::read_config(file, overrides));
    // The schedule at its ends and the middle must be finite numbers within [0, lr].
    for (std::int64_t step : {std::int64_t{1}, t.warmup, t.steps / 2, t.steps}) {
      const double lr = lminv::learning_rate(t, std::max<std::int64_t>(1, step));
      if (!(lr >= 0 && lr <= t.lr * (1 + 1e-12))) __builtin_trap();
    }
  } catch (const lminv::Error&) {
  }
  return 0;
}
