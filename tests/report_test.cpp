// lminv report (host/report_page.hpp): the page and its data files from the committed records of each kind
// (tests/data/report/, made by tests/tools/make-report-records.sh), its errors, and the pages run and sweep write.
// That the page renders is tests/report_browser_test.sh's job (headless Chromium).
#include <gtest/gtest.h>

#include "lminv_process.hpp"
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "lminv/error.hpp"
#include "report_page.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using lminv_test::Outcome;
using lminv_test::run_lminv;
using lminv_test::slurp;


void write(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  std::ofstream(file, std::ios::binary) << text;
}



// The JSON of the <script type="application/json" id="lminv-charts"> element.
json charts_of(const std::string& page) {
  const std::string open = "<script type=\"application/json\" id=\"lminv-charts\">";
  const std::size_t a = page.find(open);
  if (a == std::string::npos) return nullptr;
  const std::size_t b = page.find("</script>", a);
  return json::parse(page.substr(a + open.size(), b - a - open.size()));
}

// Splits one CSV line (quoted fields with "" for a quote).
std::vector<std::string> csv_fields(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted && c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
      out.back() += '"';
      ++i;
    } else if (c == '"') {
      quoted = !quoted;
    } else if (c == ',' && !quoted) {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

constexpr char kReportPrefix[] = "report";

class Report : public lminv_test::WithTempDir<kReportPrefix> {
 protected:

  lminv::ReportRequest request(std::vector<std::string> names) const {
    lminv::ReportRequest r;
    for (const std::string& n : names) r.inputs.push_back(data_ / n);
    r.out = dir_ / "report.html";
    r.assets = fs::path(LMINV_SOURCE_DATA_DIR) / "vega";
    return r;
  }

  const fs::path data_ = fs::path(LMINV_TEST_DATA_DIR) / "report";
};

}  // namespace

TEST_F(Report, EveryKindHasItsSectionChartsAndDataFiles) {
  std::ostringstream notes;
  const lminv::ReportResult r =
      lminv::write_report(request({"run.jsonl", "exact.jsonl", "sweep.jsonl", "compare.jsonl", "train.jsonl", "across.jsonl"}), notes);
  EXPECT_EQ(r.runs, 2u);
  EXPECT_EQ(r.exact, 2u);  // a sequential run and an lminv invert
  EXPECT_EQ(r.sweeps, 2u);  // sweep.jsonl, and across.jsonl (over training checkpoints)
  EXPECT_EQ(r.sweep_runs, 20u);
  EXPECT_EQ(r.compares, 1u);
  EXPECT_EQ(r.trainings, 1u);
  EXPECT_EQ(r.other, 0u);
  const std::string page = slurp(dir_ / "report.html");
  for (const char* section : {"id=\"runs\"", "id=\"exact\"", "id=\"sweeps\"", "id=\"compare\"", "id=\"training\""})
    EXPECT_NE(page.find(section), std::string::npos) << section;
  // The run's snapshots, with the prompt's tokens marked; the walk; the certificate table; the sweep's summary.
  for (const char* text : {"<td>a_10</td>", "class=\"tok ok\"", "Top-3 tokens per position", "Run 2: orthogonal_walk",
                           "Inverted states", "<th>best rejected</th>", "optimizer.policy=gradient model.blocks=2",
                           "Compare backend.name", "unigram baseline", "<h4>Across training</h4>"})
    EXPECT_NE(page.find(text), std::string::npos) << text;
  // Offline: everything inlined, and a policy that forbids fetching anything.
  EXPECT_NE(page.find("Content-Security-Policy\" content=\"default-src 'none'"), std::string::npos);
  EXPECT_EQ(page.find("src=\"http"), std::string::npos);
  EXPECT_EQ(page.find("<script src"), std::string::npos);
  EXPECT_NE(page.find("vegaEmbed"), std::string::npos);

  const json charts = charts_of(page);
  ASSERT_TRUE(charts.is_array());
  EXPECT_EQ(charts.size(), r.charts);
  std::set<std::string> kinds;
  for (const json& c : charts) {
    const std::string id = c["id"];
    kinds.insert(id.substr(id.find('-') + 1));
    const json& values = c["spec"]["data"]["values"];
    ASSERT_TRUE(values.is_array() && !values.empty()) << id;
    // The same rows beside the page: JSON, CSV (a header and one line per row), and the spec reading the JSON.
    const json rows = json::parse(slurp(r.data_dir / (id + ".json")));
    EXPECT_EQ(rows, values) << id;
    std::istringstream csv(slurp(r.data_dir / (id + ".csv")));
    std::string header;
    std::getline(csv, header);
    const std::vector<std::string> columns = csv_fields(header);
    std::size_t lines = 0;
    for (std::string line; std::getline(csv, line); ++lines)
      EXPECT_EQ(csv_fields(line).size(), columns.size()) << id << ": " << line;
    EXPECT_EQ(lines, rows.size()) << id;
    for (const auto& [key, value] : rows[0].items())
      EXPECT_NE(std::find(columns.begin(), columns.end(), key), columns.end()) << id << " " << key;
    const json spec = json::parse(slurp(r.data_dir / (id + ".vl.json")));
    EXPECT_EQ(spec["data"]["url"], id + ".json");
    EXPECT_TRUE(spec.contains("mark") || spec.contains("layer") || spec.contains("facet")) << id;  // something to draw
  }
  for (const char* kind : {"loss", "walk", "certificate", "candidates", "rates", "times", "time-histogram",
                           "candidates-by-position", "grid", "compare", "training-loss", "training-rates", "across-training"})
    EXPECT_TRUE(kinds.count(kind)) << kind;
}

TEST_F(Report, TheLossChartMarksWhereTheLossCrossesTheControl) {
  std::ostringstream notes;
  lminv::write_report(request({"run.jsonl"}), notes);
  const json charts = charts_of(slurp(dir_ / "report.html"));
  const json run = json::parse(slurp(data_ / "run.jsonl").substr(0, slurp(data_ / "run.jsonl").find('\n')));
  const double m = run["control"]["metric"];
  const json& rows = charts[0]["spec"]["data"]["values"];
  ASSERT_EQ(charts[0]["id"], "c1-loss");
  // Every step of the 30-step descent, each with the control m, and exactly one crossing: the first step below m.
  ASSERT_EQ(rows.size(), 30u);
  int crossings = 0;
  bool below_before = false;
  for (const json& row : rows) {
    EXPECT_EQ(row["control_m"].get<double>(), m);
    const bool below = row["loss"].get<double>() < m;
    if (row["crossing"].get<bool>()) {
      ++crossings;
      EXPECT_TRUE(below);
      EXPECT_FALSE(below_before);
    }
    below_before = below_before || below;
  }
  EXPECT_EQ(crossings, 1);
}

TEST_F(Report, RefusesToReplaceAPageWithoutForce) {
  std::ostringstream notes;
  write(dir_ / "report.html", "old page");
  lminv::ReportRequest r = request({"compare.jsonl"});
  try {
    lminv::write_report(r, notes);
    FAIL() << "replaced an existing page";
  } catch (const lminv::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--force"), std::string::npos) << e.what();
  }
  EXPECT_EQ(slurp(dir_ / "report.html"), "old page");
  r.force = true;
  lminv::write_report(r, notes);
  EXPECT_NE(slurp(dir_ / "report.html").find("Compare backend.name"), std::string::npos);
}

TEST_F(Report, BadInputIsNamedAndNothingIsWritten) {
  std::ostringstream notes;
  auto error_of = [&](const lminv::ReportRequest& r) {
    try {
      lminv::write_report(r, notes);
    } catch (const lminv::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  lminv::ReportRequest r = request({});
  // A broken line in the middle names the file and the line.
  write(dir_ / "bad.jsonl", slurp(data_ / "compare.jsonl") + "{\"key\": oops}\n" + "{}\n");
  r.inputs = {dir_ / "bad.jsonl"};
  EXPECT_NE(error_of(r).find("bad.jsonl:4: not a JSON record"), std::string::npos) << error_of(r);
  write(dir_ / "array.jsonl", "[1, 2]\n");
  r.inputs = {dir_ / "array.jsonl"};
  EXPECT_NE(error_of(r).find("array.jsonl:1: a record must be a JSON object"), std::string::npos) << error_of(r);
  r.inputs = {dir_ / "missing.jsonl"};
  EXPECT_NE(error_of(r).find("missing.jsonl"), std::string::npos) << error_of(r);
  fs::create_directories(dir_ / "empty");
  r.inputs = {dir_ / "empty"};
  EXPECT_NE(error_of(r).find("no *.jsonl file in it"), std::string::npos) << error_of(r);
  // Without the plotting library: the file, and the script that fetches it.
  r = request({"compare.jsonl"});
  r.assets = dir_ / "no-assets";
  EXPECT_NE(error_of(r).find("vega.min.js: missing; `lminv report` inlines Vega from there: run bash "
                             "scripts/fetch-vega.sh"),
            std::string::npos)
      << error_of(r);
  EXPECT_FALSE(fs::exists(dir_ / "report.html"));
  EXPECT_FALSE(fs::exists(dir_ / "report-data"));
}

TEST_F(Report, AnUnfinishedLastLineIsLeftOutWithANote) {
  const std::string records = slurp(data_ / "compare.jsonl");
  write(dir_ / "in" / "compare.jsonl", records + "{\"key\": \"backend.na");  // a record being appended
  lminv::ReportRequest r = request({});
  r.inputs = {dir_ / "in"};  // a folder: its *.jsonl files
  std::ostringstream notes;
  const lminv::ReportResult result = lminv::write_report(r, notes);
  EXPECT_EQ(result.compares, 1u);
  EXPECT_NE(notes.str().find("compare.jsonl:4: the last line is not finished; left out"), std::string::npos)
      << notes.str();
}

TEST_F(Report, RecordsOfOtherKindsAreCountedNotShown) {
  write(dir_ / "other.jsonl", "{\"cell\": 1}\n{\"bench\": true}\n");
  lminv::ReportRequest r = request({});
  r.inputs = {dir_ / "other.jsonl"};
  std::ostringstream notes;
  const lminv::ReportResult result = lminv::write_report(r, notes);
  EXPECT_EQ(result.other, 2u);
  EXPECT_EQ(result.charts, 0u);
  EXPECT_NE(slurp(dir_ / "report.html").find("2 records of other kinds not shown"), std::string::npos);
}

// The command, and the pages run and sweep write themselves ([output] report).
TEST_F(Report, CommandRunAndSweepWriteTheirPages) {
  const std::string data = LMINV_TEST_DATA_DIR;
  const std::string isolated = " --set output.cache_dir=" + (dir_ / "cache").string();
  Outcome o = run_lminv("report " + (data_ / "sweep.jsonl").string() + " --out " + (dir_ / "page.html").string());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("1 sweeps (12 runs)"), std::string::npos) << o.output;
  o = run_lminv("report " + (data_ / "sweep.jsonl").string() + " --out " + (dir_ / "page.html").string());
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_NE(o.output.find("exists; give --force"), std::string::npos) << o.output;
  o = run_lminv("report --out " + (dir_ / "x.html").string());
  EXPECT_EQ(o.status, 2) << o.output;

  // run: off unless asked for.
  o = run_lminv("run " + data + "/tiny-fcnet.ini --set output.dir=" + (dir_ / "run").string() + isolated);
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_FALSE(fs::exists(dir_ / "run" / "report.html"));
  o = run_lminv("run " + data + "/tiny-fcnet.ini --set output.dir=" + (dir_ / "run").string() + isolated +
            " --set output.report=true");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_NE(o.output.find("report    " + (dir_ / "run" / "report.html").string()), std::string::npos) << o.output;
  EXPECT_EQ(charts_of(slurp(dir_ / "run" / "report.html")).size(), 2u);  // both runs' loss charts
  // sweep: on unless turned off.
  const std::string sweep = "sweep " + data + "/tiny-gpt2-sequential.ini --prompts " + data +
                            "/prompts-tiny.txt --limit 2" + isolated + " --records ";
  o = run_lminv(sweep + (dir_ / "s1" / "sweep.jsonl").string());
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_TRUE(fs::exists(dir_ / "s1" / "sweep-report.html")) << o.output;
  EXPECT_TRUE(fs::exists(dir_ / "s1" / "sweep-report-data"));
  o = run_lminv(sweep + (dir_ / "s2" / "sweep.jsonl").string() + " --set output.report=false");
  ASSERT_EQ(o.status, 0) << o.output;
  EXPECT_FALSE(fs::exists(dir_ / "s2" / "sweep-report.html"));
  o = run_lminv(sweep + (dir_ / "s3" / "sweep.jsonl").string() + " --set output.report=maybe");
  EXPECT_EQ(o.status, 1) << o.output;
  EXPECT_NE(o.output.find("report"), std::string::npos) << o.output;
}

// The record's curve: every step while there are few, thinned on a doubling stride after, first and last kept.
TEST_F(Report, TheRecordsCurveIsThinnedButKeepsTheEnds) {
  const std::string data = LMINV_TEST_DATA_DIR;
  const Outcome o = run_lminv("run " + data + "/tiny-fcnet.ini --set optimizer.steps=1100 --set model.n_embd=32 --set output.dir=" +
                          (dir_ / "run").string() + " --set output.cache_dir=" + (dir_ / "cache").string());
  ASSERT_EQ(o.status, 0) << o.output;
  const json record = json::parse(slurp(dir_ / "run" / "records.jsonl"));
  const json& curve = record["curve"];
  const json& steps = curve["step"];
  ASSERT_TRUE(steps.is_array());
  EXPECT_LE(steps.size(), 512u);
  EXPECT_GE(steps.size(), 256u);
  EXPECT_EQ(steps.front(), 1);
  EXPECT_EQ(steps.back(), 1100);
  EXPECT_EQ(curve["loss"].size(), steps.size());
  const std::int64_t stride = curve["stride"];
  EXPECT_EQ(stride, 4);  // 1100 steps: 1 -> 2 at 512 points (step 512), -> 4 at 512 again (step 1022)
  for (std::size_t i = 1; i + 1 < steps.size(); ++i) {
    EXPECT_LT(steps[i - 1].get<std::int64_t>(), steps[i].get<std::int64_t>());
    EXPECT_EQ(steps[i].get<std::int64_t>() % stride, 0) << i;
  }
  // The curve's loss is the loss of the steps it keeps: the best, at its step, equals the final loss (descent).
  double best = INFINITY;
  for (const json& l : curve["loss"]) best = std::min(best, l.get<double>());
  EXPECT_LE(record["final_loss"].get<double>(), best * (1 + 1e-12));
}
