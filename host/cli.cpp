#include "cli.hpp"

#include <boost/program_options.hpp>
#include <iomanip>
#include <iostream>
#include <map>

#include "config.hpp"
#include "paths.hpp"
#include "registry.hpp"
#include "runner.hpp"
#include "tokenizer.hpp"

namespace lminv {

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace {

struct UsageError : Error {
  using Error::Error;
};

constexpr const char* kOverview =
    "lminv " LMINV_VERSION " - run language models backwards\n"
    "\n"
    "usage: lminv COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  run CONFIG [--set section.key=value ...]   run an inversion experiment\n"
    "  plugins                                    list the plugins found, and those refused\n"
    "  tokenize TEXT                              show GPT-2 token ids and pieces\n"
    "\n"
    "Every command takes --help, and --plugin-dir DIR (repeatable) to search more folders for plugins.\n";

po::options_description common_options() {
  po::options_description d("common options");
  d.add_options()("help,h", "show this help")(
      "plugin-dir", po::value<std::vector<std::string>>()->composing(), "also search DIR for plugins (repeatable)");
  return d;
}

po::variables_map parse(const std::vector<std::string>& args, const po::options_description& visible,
                        const po::positional_options_description& positional, const po::options_description& hidden) {
  po::options_description all;
  all.add(visible).add(hidden);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  return vm;
}

Registry make_registry(const po::variables_map& vm) {
  std::vector<fs::path> extra;
  if (vm.count("plugin-dir"))
    for (const std::string& d : vm["plugin-dir"].as<std::vector<std::string>>()) {
      if (!fs::is_directory(d)) throw Error("--plugin-dir '" + d + "': no such folder");
      extra.emplace_back(d);
    }
  return Registry(plugin_search_dirs(extra));
}

void warn_rejected(const Registry& registry, std::ostream& err) {
  for (const RejectedPlugin& r : registry.rejected())
    err << "lminv: warning: refused plugin " << r.file.string() << ": " << r.reason << "\n";
}

int cmd_run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  po::options_description visible("lminv run CONFIG [options]\n\nRuns the experiment described by CONFIG (an INI file; "
                                  "see docs/configs.md) and appends its record to <output.dir>/records.jsonl.\n\noptions");
  visible.add(common_options());
  visible.add_options()("set", po::value<std::vector<std::string>>()->composing(),
                        "override a config value: section.key=value (repeatable)");
  po::options_description hidden;
  hidden.add_options()("config", po::value<std::string>());
  po::positional_options_description positional;
  positional.add("config", 1);
  const po::variables_map vm = parse(args, visible, positional, hidden);
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("config")) throw UsageError("run: missing CONFIG (see lminv run --help)");
  const std::vector<std::string> overrides =
      vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  const ExperimentConfig config = parse_experiment(read_config(vm["config"].as<std::string>(), overrides));
  const Registry registry = make_registry(vm);
  warn_rejected(registry, err);
  run_experiment(config, registry, out);
  return 0;
}

std::string supports(const Registry& registry, const PluginInfo& info) {
  if (info.kind != PluginKind::backend) return info.summary;
  try {
    const BackendInfo b = registry.create_backend(info.name)->info();
    std::string s;
    for (const std::string& f : b.families) s += (s.empty() ? "" : ",") + f;
    s += "  dtypes ";
    for (std::size_t i = 0; i < b.dtypes.size(); ++i) s += (i ? "," : "") + std::string(dtype_name(b.dtypes[i]));
    s += "  devices ";
    for (std::size_t i = 0; i < b.devices.size(); ++i) s += (i ? "," : "") + b.devices[i];
    return s;
  } catch (const std::exception& e) {
    return std::string("(could not ask it: ") + e.what() + ")";
  }
}

int cmd_plugins(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible("lminv plugins [options]\n\nLists the plugins found in the search folders "
                                  "(kind, name, version, file, what it supports) and those refused, with why.\n\noptions");
  visible.add(common_options());
  const po::variables_map vm = parse(args, visible, {}, {});
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  const Registry registry = make_registry(vm);
  out << std::left << std::setw(10) << "KIND" << std::setw(18) << "NAME" << std::setw(10) << "VERSION" << "FILE\n";
  for (PluginKind kind : {PluginKind::backend, PluginKind::optimizer, PluginKind::decoder})
    for (const PluginInfo& p : registry.plugins()) {
      if (p.kind != kind) continue;
      out << std::setw(10) << plugin_kind_name(p.kind) << std::setw(18) << p.name << std::setw(10) << p.version
          << p.file.string() << "\n"
          << std::setw(38) << "" << supports(registry, p) << "\n";
    }
  if (!registry.rejected().empty()) {
    out << "\nrefused:\n";
    for (const RejectedPlugin& r : registry.rejected()) out << "  " << r.file.string() << ": " << r.reason << "\n";
  }
  out << "\nsearched:";
  for (const fs::path& d : registry.search_dirs()) out << " " << d.string();
  out << "\n";
  return 0;
}

int cmd_tokenize(const std::vector<std::string>& args, std::ostream& out, std::ostream&) {
  po::options_description visible("lminv tokenize TEXT [options]\n\nPrints the GPT-2 token ids of TEXT, then each "
                                  "token's id and piece.\n\noptions");
  visible.add_options()("help,h", "show this help")(
      "tokenizer", po::value<std::string>(),
      "folder with vocab.json + merges.txt or encoder.json + vocab.bpe (default: the embedded GPT-2 tables)");
  po::options_description hidden;
  hidden.add_options()("text", po::value<std::vector<std::string>>());
  po::positional_options_description positional;
  positional.add("text", -1);
  const po::variables_map vm = parse(args, visible, positional, hidden);
  if (vm.count("help")) {
    out << visible << "\n";
    return 0;
  }
  if (!vm.count("text")) throw UsageError("tokenize: missing TEXT (see lminv tokenize --help)");
  std::string text;
  for (const std::string& word : vm["text"].as<std::vector<std::string>>()) text += (text.empty() ? "" : " ") + word;
  const Tokenizer tokenizer =
      Tokenizer::from_folder(vm.count("tokenizer") ? fs::path(vm["tokenizer"].as<std::string>()) : default_tokenizer_dir());
  const std::vector<std::int64_t> ids = tokenizer.encode(text);
  for (std::size_t i = 0; i < ids.size(); ++i) out << (i ? " " : "") << ids[i];
  out << "\n";
  for (std::int64_t id : ids) {
    nlohmann::json piece = tokenizer.decode({id});
    out << std::setw(8) << std::right << id << "  " << piece.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
        << "\n";
  }
  return 0;
}

}  // namespace

int run_cli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    (args.empty() ? err : out) << kOverview;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version" || args[0] == "version") {
    out << "lminv " << LMINV_VERSION << " (plugin ABI " << kAbiVersion << ")\n";
    return 0;
  }
  const std::map<std::string, int (*)(const std::vector<std::string>&, std::ostream&, std::ostream&)> commands = {
      {"run", cmd_run}, {"plugins", cmd_plugins}, {"tokenize", cmd_tokenize}};
  auto command = commands.find(args[0]);
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (command == commands.end()) throw UsageError("unknown command '" + args[0] + "'");
    return command->second(rest, out, err);
  } catch (const UsageError& e) {
    err << "lminv: " << e.what() << "\n\n" << kOverview;
    return 2;
  } catch (const std::exception& e) {
    err << "lminv: error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace lminv
