// Experiment configs (host/config.cpp): the input is an INI file, then optionally a line "--set--" and one --set
// override per line. read_config + parse_experiment, then the spec check a run makes before it builds a model.
#include <cstdint>
#include <string>

#include "config.hpp"
#include "fuzz_common.hpp"
#include "lminv/error.hpp"
#include "lminv/schema.hpp"

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
  return 0;
}
