// `lminv report`: one self-contained HTML page with plots of runs, exact inversions, sweeps and comparisons, read
// from their JSON Lines records (docs/reports.md says what each plot means).
#pragma once

#include <cstddef>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

namespace lminv {

struct ReportRequest {
  // Records files (records.jsonl, sweep.jsonl, compare.jsonl, train.jsonl, ...) or folders (every *.jsonl file in them).
  std::vector<std::filesystem::path> inputs;
  std::filesystem::path out;  // the page; its plots' data go to <out without .html>-data/
  bool force = false;         // replace `out` (and its data folder) when they exist
  std::string title;          // empty: "lminv report"
  // The folder of vega.min.js, vega-lite.min.js and vega-embed.min.js; empty: default_report_assets_dir().
  std::filesystem::path assets;
  std::size_t max_runs = 20;  // runs and exact inversions shown one by one (the latest; all are in the tables)
};

struct ReportResult {
  std::size_t runs = 0, exact = 0, sweeps = 0, sweep_runs = 0, compares = 0, trainings = 0, other = 0, charts = 0;
  std::filesystem::path data_dir;
};

// Reads every record first (a line that is not JSON is an error naming the file and line; a last line without its
// newline, a record still being written, is left out with a note), then writes the page through a temporary file
// and a rename. Refuses to replace an existing page without `force`. Each plot's data is also written to the data
// folder as <plot>.csv and <plot>.json, with <plot>.vl.json, its Vega-Lite spec reading <plot>.json.
ReportResult write_report(const ReportRequest& request, std::ostream& out);

// The page a run or sweep writes at its end ([output] report): PAGE from the records file RECORDS, replaced if it
// exists; prints where it went.
void write_records_report(const std::filesystem::path& records, const std::filesystem::path& page, std::ostream& out);

// Whether a command should write its page: `setting` is [output] report (auto | true | false), `by_default` the
// command's default for auto. With true, missing assets are an error now (before the long work); with auto, a note
// on `out` and no page.
bool report_wanted(const std::string& setting, bool by_default, std::ostream& out);

// $LMINV_REPORT_ASSETS, else the source tree's data/vega (scripts/fetch-vega.sh fills it).
std::filesystem::path default_report_assets_dir();

}  // namespace lminv
