#include "report_page.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>

#include "files.hpp"
#include "json_depth.hpp"
#include "lminv/error.hpp"
#include "report.hpp"
#include "run_stats.hpp"

namespace lminv {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::uintmax_t kRecordsLimit = std::uintmax_t{1} << 30;  // 1 GiB of records per file
constexpr std::uintmax_t kAssetLimit = std::uintmax_t{16} << 20;

// ---- reading ------------------------------------------------------------------------------------------------------

struct Record {
  json value;
  std::string file;
  std::size_t line = 0;
};

std::vector<fs::path> records_files(const fs::path& input) {
  std::error_code ec;
  if (fs::is_directory(input, ec)) {
    std::vector<fs::path> files;
    for (const fs::directory_entry& entry : fs::directory_iterator(input))
      if (entry.path().extension() == ".jsonl" && entry.is_regular_file()) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    if (files.empty()) throw Error(input.string() + ": a folder without records (no *.jsonl file in it)");
    return files;
  }
  return {input};
}

std::vector<Record> read_records_file(const fs::path& file, std::ostream& notes) {
  const std::string content = read_regular_file(file, "records file", kRecordsLimit);
  std::vector<Record> records;
  std::size_t number = 0, start = 0;
  while (start < content.size()) {
    std::size_t end = content.find('\n', start);
    const bool whole = end != std::string::npos;
    if (!whole) end = content.size();
    const std::string line = content.substr(start, end - start);
    start = end + 1;
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = file.string() + ":" + std::to_string(number);
    try {
      json value = json::parse(line, json_depth_limit(where));
      if (!value.is_object()) throw Error(where + ": a record must be a JSON object");
      records.push_back({std::move(value), file.string(), number});
    } catch (const json::exception& e) {
      if (!whole) {  // a record still being appended (a run in progress): not an error
        notes << "  note: " << where << ": the last line is not finished; left out\n";
        continue;
      }
      throw Error(where + ": not a JSON record (" + e.what() + ")");
    }
  }
  return records;
}

// ---- small helpers ------------------------------------------------------------------------------------------------

std::string html(const std::string& text) {
  std::string s;
  s.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&': s += "&amp;"; break;
      case '<': s += "&lt;"; break;
      case '>': s += "&gt;"; break;
      case '"': s += "&quot;"; break;
      default: s += c;
    }
  }
  return s;
}

std::string str_at(const json& j, std::initializer_list<const char*> path, const std::string& fallback = "") {
  const json* p = &j;
  for (const char* k : path) {
    if (!p->is_object() || !p->contains(k)) return fallback;
    p = &(*p)[k];
  }
  if (p->is_string()) return p->get<std::string>();
  if (p->is_null()) return fallback;
  return p->dump();
}

const json* at(const json& j, std::initializer_list<const char*> path) {
  const json* p = &j;
  for (const char* k : path) {
    if (!p->is_object() || !p->contains(k)) return nullptr;
    p = &(*p)[k];
  }
  return p;
}

// True only for a boolean true at PATH (json's value() throws for a null or another type).
bool flag(const json& j, std::initializer_list<const char*> path) {
  const json* p = at(j, path);
  return p && p->is_boolean() && p->get<bool>();
}

std::vector<std::int64_t> ids_at(const json& j, std::initializer_list<const char*> path) {
  std::vector<std::int64_t> ids;
  if (const json* p = at(j, path); p && p->is_array())
    for (const json& v : *p) ids.push_back(v.is_number_integer() ? v.get<std::int64_t>() : -1);
  return ids;
}

std::vector<std::string> strings_at(const json& j, std::initializer_list<const char*> path) {
  std::vector<std::string> out;
  if (const json* p = at(j, path); p && p->is_array())
    for (const json& v : *p) out.push_back(v.is_string() ? v.get<std::string>() : v.dump());
  return out;
}

std::string number_text(double x, int digits = 4) {
  if (!std::isfinite(x)) return "–";
  std::ostringstream s;
  const double a = std::fabs(x);
  if (a != 0 && (a < 1e-3 || a >= 1e5)) s << std::scientific << std::setprecision(digits - 1) << x;
  else s << std::setprecision(digits) << x;
  return s.str();
}

std::string percent(double x) {
  if (!std::isfinite(x)) return "–";
  std::ostringstream s;
  s << std::fixed << std::setprecision(x < 1 && x > 0.999 ? 1 : 0) << 100 * x << "%";
  return s.str();
}

json finite_or_null(double x) { return std::isfinite(x) ? json(x) : json(nullptr); }

// A JSON text inside <script>: "</" would end the element early.
std::string script_safe(const std::string& text) {
  std::string s;
  s.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '<' && i + 1 < text.size() && text[i + 1] == '/') {
      s += "<\\/";
      ++i;
    } else {
      s += text[i];
    }
  }
  return s;
}

// Tokens as spans, each marked right or wrong against `truth` at the same position (no mark when truth is shorter).
std::string tokens_html(const std::vector<std::string>& pieces, const std::vector<std::int64_t>& ids,
                        const std::vector<std::int64_t>& truth) {
  std::string s = "<span class=\"tokens\">";
  const std::size_t n = std::max(pieces.size(), ids.size());
  for (std::size_t t = 0; t < n; ++t) {
    const std::string piece = t < pieces.size() ? pieces[t] : "#" + std::to_string(ids[t]);
    const char* cls = "tok";
    if (t < truth.size() && t < ids.size()) cls = ids[t] == truth[t] ? "tok ok" : "tok bad";
    s += "<span class=\"" + std::string(cls) + "\" title=\"" +
         (t < ids.size() ? "id " + std::to_string(ids[t]) : std::string("")) + "\">" + html(piece) + "</span>";
  }
  return s + "</span>";
}

// ---- the page ------------------------------------------------------------------------------------------------------

struct Chart {
  std::string id;
  json spec;  // Vega-Lite, without data
  json rows;  // its data: an array of flat objects
};

class Page {
 public:
  explicit Page(fs::path data_dir) : data_dir_(std::move(data_dir)) {}

  std::ostringstream body;
  std::vector<std::pair<std::string, std::string>> toc;  // anchor, title

  void section(const std::string& anchor, const std::string& title) {
    toc.emplace_back(anchor, title);
    body << "<h2 id=\"" << anchor << "\">" << html(title) << "</h2>\n";
  }

  // A chart with its caption; nothing (a note instead) when it has no data to draw.
  void chart(const std::string& name, const std::string& title, const std::string& caption, json spec, json rows) {
    if (!rows.is_array() || rows.empty()) {
      body << "<p class=\"note\">" << html(title) << ": nothing to plot.</p>\n";
      return;
    }
    const std::string id = "c" + std::to_string(charts.size() + 1) + "-" + name;
    spec["$schema"] = "https://vega.github.io/schema/vega-lite/v6.json";
    spec["title"] = title;
    if (!spec.contains("facet")) {  // a facet's size is its panels'
      if (!spec.contains("width")) spec["width"] = 640;
      if (!spec.contains("height")) spec["height"] = 240;
    }
    body << "<figure><div class=\"chart\" id=\"" << id << "\"></div><figcaption>" << caption
         << " <span class=\"files\">Data: <code>" << html(data_dir_.filename().string() + "/" + id)
         << ".csv</code>, <code>.json</code>; spec <code>.vl.json</code>.</span></figcaption></figure>\n";
    charts.push_back({id, std::move(spec), std::move(rows)});
  }

  std::vector<Chart> charts;

 private:
  fs::path data_dir_;
};

std::string csv_of(const json& rows) {
  std::vector<std::string> columns;
  std::set<std::string> seen;
  for (const json& row : rows)
    for (const auto& [k, v] : row.items())
      if (seen.insert(k).second) columns.push_back(k);
  auto cell = [](const json& v) -> std::string {
    if (v.is_null()) return "";
    if (v.is_number() || v.is_boolean()) return v.dump();
    const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
    std::string q = "\"";
    for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  };
  std::string out;
  for (std::size_t i = 0; i < columns.size(); ++i) out += (i ? "," : "") + cell(json(columns[i]));
  out += "\n";
  for (const json& row : rows) {
    for (std::size_t i = 0; i < columns.size(); ++i)
      out += (i ? "," : "") + (row.contains(columns[i]) ? cell(row[columns[i]]) : std::string());
    out += "\n";
  }
  return out;
}

std::string dump(const json& j, int indent = -1) {
  return j.dump(indent, ' ', false, json::error_handler_t::replace);
}

// ---- specs ---------------------------------------------------------------------------------------------------------

json q(const std::string& field, const std::string& title, bool log = false) {
  json e = {{"field", field}, {"type", "quantitative"}, {"title", title}};
  if (log) e["scale"] = {{"type", "log"}};
  return e;
}
json n(const std::string& field, const std::string& title) {
  return {{"field", field}, {"type", "nominal"}, {"title", title}};
}
// A colour legend below the chart, with room for long labels.
json colour(const std::string& field, const std::string& title = "") {
  return {{"field", field}, {"type", "nominal"}, {"title", title},
          {"legend", {{"orient", "bottom"}, {"labelLimit", 480}, {"columns", 2}}}};
}
json tooltip(std::initializer_list<const char*> fields) {
  json t = json::array();
  for (const char* f : fields) t.push_back({{"field", f}});
  return t;
}

// ---- runs ----------------------------------------------------------------------------------------------------------

std::string run_title(const json& r) {
  std::string t = str_at(r, {"optimizer"}, "?") + " on " + str_at(r, {"model", "family"}, "?");
  if (str_at(r, {"model", "kind"}) == "decoder")
    t += " " + str_at(r, {"model", "blocks"}) + "/" + str_at(r, {"model", "n_layer"}) + " blocks, " +
         str_at(r, {"model", "head"});
  t += ", " + str_at(r, {"backend"}) + " " + str_at(r, {"model", "dtype"});
  return t;
}

void key_value_table(std::ostream& o, const std::vector<std::pair<std::string, std::string>>& rows) {
  o << "<table class=\"kv\">";
  for (const auto& [k, v] : rows) o << "<tr><th>" << html(k) << "</th><td>" << v << "</td></tr>";
  o << "</table>\n";
}

void run_detail(Page& page, const Record& rec, std::size_t index) {
  const json& r = rec.value;
  std::ostream& o = page.body;
  const std::vector<std::int64_t> truth = ids_at(r, {"prompt", "ids"});
  o << "<section class=\"run\"><h3>Run " << index << ": " << html(run_title(r)) << "</h3>\n";
  o << "<p class=\"where\">" << html(rec.file) << ":" << rec.line << ", " << html(str_at(r, {"time"}))
    << ", config <code>" << html(str_at(r, {"config_file"})) << "</code></p>\n";
  const double m = number_at(r, {"control", "metric"});
  const double m_l1 = number_at(r, {"control", "l1"});
  const std::string metric = str_at(r, {"metric"}, "?");
  key_value_table(
      o, {{"prompt", tokens_html(strings_at(r, {"prompt", "pieces"}), truth, {})},
          {"recovered", tokens_html(strings_at(r, {"decoded", "pieces"}), ids_at(r, {"decoded", "ids"}), truth) +
                            (flag(r, {"exact_match"}) ? " <b class=\"yes\">exact</b>" : " <b class=\"no\">not exact</b>") +
                            " (token accuracy " + percent(number_at(r, {"token_accuracy"})) + ")"},
          {"final loss (" + metric + ")", number_text(number_at(r, {"final_loss"})) + " after " +
                                              str_at(r, {"steps"}) + " steps (" + str_at(r, {"result_step"}, "best") +
                                              ")"},
          {"output distance L1", number_text(number_at(r, {"output_distance", "l1"})) + " against the control m = " +
                                     number_text(m_l1) + " (sigma " + str_at(r, {"control", "sigma"}) + "): " +
                                     (flag(r, {"inequality_4"}) ? "inequality (4) holds" : "inequality (4) fails")},
          {"input distance", "L2 " + number_text(number_at(r, {"input_distance_l2"})) + ", L1 " +
                                 number_text(number_at(r, {"input_distance_l1"}))},
          {"ratio r = input / output", "L2 " + number_text(number_at(r, {"ratio_input_output_l2"})) + ", L1 " +
                                           number_text(number_at(r, {"ratio_input_output_l1"}))},
          {"next token", r.contains("next_token") && r["next_token"].is_object()
                             ? std::string(flag(r, {"next_token", "agree"}) ? "agrees" : "differs") + " (" +
                                   html(str_at(r, {"next_token", "model"})) + " model)"
                             : "–"},
          {"time", number_text(number_at(r, {"time_s", "total"}), 3) + " s (" +
                       number_text(number_at(r, {"steps_per_s"}), 3) + " steps/s)"}});

  // The loss over steps, from the curve (every step, thinned) or, in older records, the snapshots.
  // The crossing: the first step on the other side of m than the first step (a descent falls below m, a walk,
  // which starts at the true input, rises above it).
  json rows = json::array();
  bool crossed = false;
  int start_side = 0;  // -1 below m, +1 at or above, 0 not known yet
  auto add = [&](double step, double loss) {
    const int side = !(std::isfinite(m) && std::isfinite(loss)) ? 0 : loss < m ? -1 : 1;
    if (start_side == 0) start_side = side;
    const bool crossing = side != 0 && side != start_side && !crossed;
    rows.push_back({{"step", step}, {"loss", finite_or_null(loss)}, {"control_m", finite_or_null(m)},
                    {"crossing", crossing}});
    crossed = crossed || crossing;
  };
  const json* curve = at(r, {"curve"});
  const json* steps = curve ? at(*curve, {"step"}) : nullptr;
  const json* losses = curve ? at(*curve, {"loss"}) : nullptr;
  const json* values = curve ? at(*curve, {"values"}) : nullptr;
  if (!(steps && losses && steps->is_array() && losses->is_array() && steps->size() == losses->size()))
    steps = losses = nullptr;
  if (steps) {
    for (std::size_t i = 0; i < steps->size(); ++i)
      add((*steps)[i].is_number() ? (*steps)[i].get<double>() : NAN,
          (*losses)[i].is_number() ? (*losses)[i].get<double>() : NAN);
  } else if (const json* traj = at(r, {"trajectory"}); traj && traj->is_array()) {
    for (const json& s : *traj) add(number_at(s, {"step"}), number_at(s, {"loss"}));
  }
  json loss_spec = {
      {"transform", {{{"filter", "isValid(datum.loss) && datum.loss > 0"}}}},
      {"layer",
       {{{"mark", {{"type", "line"}, {"point", rows.size() <= 60}}},
         {"encoding", {{"x", q("step", "step")}, {"y", q("loss", "loss (" + metric + ")", true)},
                       {"tooltip", tooltip({"step", "loss"})}}}},
        {{"mark", {{"type", "line"}, {"color", "#d62728"}, {"strokeDash", {6, 4}}}},
         {"encoding", {{"x", q("step", "step")}, {"y", q("control_m", "", true)}}}},
        {{"transform", {{{"filter", "datum.crossing"}}}},
         {"mark", {{"type", "point"}, {"filled", true}, {"size", 90}, {"color", "#d62728"}, {"shape", "diamond"}}},
         {"encoding", {{"x", q("step", "step")}, {"y", q("loss", "", true)}, {"tooltip", tooltip({"step", "loss"})}}}}}}};
  if (!std::isfinite(m)) loss_spec["layer"].erase(1);
  page.chart("loss", "Loss over steps",
             "The loss in the run's metric (" + html(metric) + ", log axis) at each step; the dashed red line is the "
             "control m, the output distance when the true input is shifted by noise of sigma " +
                 html(str_at(r, {"control", "sigma"})) +
                 " in the same metric; the diamond marks the first step on the other side of m than the first (for a "
                 "descent, where the loss falls below m: inequality (4) when the metric is L1; for a walk, where it "
                 "leaves m's neighbourhood).",
             loss_spec, rows);

  // Walks: d_o/d_i and r over steps.
  if (steps && values && values->is_object() && values->contains("ratio")) {
    json wrows = json::array();
    auto value = [&](const char* name, std::size_t i) {
      const json* v = at(*values, {name});
      return v && v->is_array() && i < v->size() && (*v)[i].is_number() ? (*v)[i].get<double>() : NAN;
    };
    for (std::size_t i = 0; i < steps->size(); ++i) {
      const double step = (*steps)[i].is_number() ? (*steps)[i].get<double>() : NAN;
      const double d_o = value("output_distance_l2", i), d_i = value("input_distance", i);
      const std::pair<const char*, double> points[] = {
          {"d_o/d_i (L2)", d_i > 0 ? d_o / d_i : NAN},
          {"r = d_i/d_o (L2)", value("ratio", i)},
          {"control r (L2)", value("control_ratio", i)}};
      for (const auto& [name, v] : points)
        if (std::isfinite(v) && v > 0) wrows.push_back({{"step", step}, {"quantity", name}, {"value", v}});
    }
    page.chart("walk", "Output and input distances along the walk",
               "d_o/d_i is the output distance per unit of input distance from the walk's start (L2), r its inverse; "
               "the control r is the same ratio for the random-direction control when the walk has one.",
               {{"mark", {{"type", "line"}, {"point", false}}},
                {"encoding",
                 {{"x", q("step", "step")}, {"y", q("value", "ratio", true)}, {"color", colour("quantity")},
                  {"tooltip", tooltip({"step", "quantity", "value"})}}}},
               wrows);
  }

  // The decoded snapshots (a_20 ... a_60) and the top-k lists.
  if (const json* traj = at(r, {"trajectory"}); traj && traj->is_array() && !traj->empty()) {
    o << "<h4>Decoded over steps</h4>\n<table class=\"snapshots\"><tr><th>step</th><th>loss</th><th>decoded "
         "(green: the prompt's token at that position)</th></tr>\n";
    const json* last_topk = nullptr;
    for (const json& s : *traj) {
      o << "<tr><td>a_" << html(str_at(s, {"step"})) << "</td><td>" << number_text(number_at(s, {"loss"})) << "</td><td>"
        << (s.contains("ids") ? tokens_html(strings_at(s, {"pieces"}), ids_at(s, {"ids"}), truth) : "–")
        << "</td></tr>\n";
      if (s.contains("topk") && s["topk"].is_array()) last_topk = &s;
    }
    o << "</table>\n";
    if (last_topk) {
      const json& s = *last_topk;
      o << "<h4>Top-" << (s["topk"].empty() || !s["topk"][0].is_array() ? 0 : s["topk"][0].size()) << " tokens per position at step "
        << html(str_at(s, {"step"})) << "</h4>\n<table class=\"topk\"><tr><th>position</th><th>prompt</th><th>candidates, "
        "best first (green: the prompt's token)</th></tr>\n";
      const std::vector<std::string> prompt_pieces = strings_at(r, {"prompt", "pieces"});
      for (std::size_t t = 0; t < s["topk"].size(); ++t) {
        std::vector<std::int64_t> ids;
        if (s["topk"][t].is_array())
          for (const json& v : s["topk"][t]) ids.push_back(v.is_number_integer() ? v.get<std::int64_t>() : -1);
        std::vector<std::string> pieces;
        if (s.contains("topk_pieces") && s["topk_pieces"].is_array() && t < s["topk_pieces"].size() &&
            s["topk_pieces"][t].is_array())
          for (const json& v : s["topk_pieces"][t]) pieces.push_back(v.is_string() ? v.get<std::string>() : "?");
        const std::vector<std::int64_t> same(ids.size(), t < truth.size() ? truth[t] : -2);
        o << "<tr><td>" << t << "</td><td>"
          << html(t < prompt_pieces.size() ? prompt_pieces[t] : (t < truth.size() ? std::to_string(truth[t]) : ""))
          << "</td><td>" << tokens_html(pieces, ids, same) << "</td></tr>\n";
      }
      o << "</table>\n";
    }
  }
  o << "</section>\n";
}

// ---- exact inversions ----------------------------------------------------------------------------------------------

void exact_detail(Page& page, const Record& rec, std::size_t index) {
  const json& r = rec.value;
  std::ostream& o = page.body;
  const json& cert = r["certificate"];
  const std::vector<std::int64_t> truth = ids_at(r, {"prompt", "ids"});
  const bool invert = str_at(r, {"command"}) == "invert";
  o << "<section class=\"exact\"><h3>" << (invert ? "Inverted states " : "Exact inversion ") << index << ": "
    << html(run_title(r)) << "</h3>\n";
  o << "<p class=\"where\">" << html(rec.file) << ":" << rec.line << ", " << html(str_at(r, {"time"}))
    << (invert ? ", states <code>" + html(str_at(r, {"states", "source"})) + "</code>" : std::string()) << "</p>\n";
  std::vector<std::pair<std::string, std::string>> kv;
  if (!truth.empty()) kv.push_back({"prompt", tokens_html(strings_at(r, {"prompt", "pieces"}), truth, {})});
  std::string recovered = tokens_html(strings_at(r, {"decoded", "pieces"}), ids_at(r, {"decoded", "ids"}), truth);
  if (r.contains("exact_match") && r["exact_match"].is_boolean())
    recovered += r["exact_match"].get<bool>() ? " <b class=\"yes\">exact</b>" : " <b class=\"no\">not exact</b>";
  kv.push_back({"recovered", recovered});
  const std::string verdict = str_at(cert, {"verdict"}, "?");
  kv.push_back({"verdict", "<b class=\"" + std::string(verdict == "unique" ? "yes" : "no") + "\">" + html(verdict) +
                               "</b> (known " + str_at(cert, {"counts", "known"}) + ", ambiguous " +
                               str_at(cert, {"counts", "ambiguous"}) + ", not found " +
                               str_at(cert, {"counts", "not_found"}) + ", relaxed epsilon " +
                               str_at(cert, {"counts", "relaxed"}) + ")"});
  kv.push_back({"candidates per position", number_text(number_at(r, {"values", "candidates_per_position"}), 3)});
  kv.push_back({"time", number_text(number_at(r, {"time_s", "optimize"}), 3) + " s (search)"});
  key_value_table(o, kv);

  const json* positions = at(cert, {"positions"});
  json crows = json::array(), rrows = json::array();
  std::size_t exact_zeros = 0;  // accepted distances of exactly 0: not on a log axis
  const json* true_rank = at(r, {"series", "true_rank"});
  if (positions && positions->is_array()) {
    for (const json& p : *positions) {
      const double pos = number_at(p, {"position"});
      const std::string token = str_at(p, {"text"});
      const std::pair<const char*, const char*> quantities[] = {
          {"accepted distance", "distance"}, {"epsilon", "epsilon"}, {"best rejected", "best_rejected"}};
      for (const auto& [name, key] : quantities) {
        const double v = number_at(p, {key});
        if (std::isfinite(v) && v > 0)
          crows.push_back({{"position", pos}, {"token", token}, {"quantity", name}, {"value", v}});
        else if (v == 0 && std::string(key) == "distance")
          ++exact_zeros;
      }
      const double c = number_at(p, {"candidates"});
      if (std::isfinite(c) && c > 0)
        rrows.push_back({{"position", pos}, {"token", token}, {"quantity", "candidates verified"}, {"value", c}});
      const std::size_t t = static_cast<std::size_t>(std::max(0.0, pos));
      if (true_rank && true_rank->is_array() && t < true_rank->size() && (*true_rank)[t].is_number() &&
          (*true_rank)[t].get<double>() >= 0)
        rrows.push_back({{"position", pos},
                         {"token", token},
                         {"quantity", "policy's rank of the prompt's token (1 = first)"},
                         {"value", (*true_rank)[t].get<double>() + 1}});
    }
  }
  const json lines = {{"mark", {{"type", "line"}, {"point", true}}},
                      {"encoding",
                       {{"x", {{"field", "position"}, {"type", "quantitative"}, {"title", "position"},
                               {"axis", {{"tickMinStep", 1}}}}},
                        {"y", q("value", "relative L2 distance", true)},
                        {"color", colour("quantity")},
                        {"tooltip", tooltip({"position", "token", "quantity", "value"})}}}};
  page.chart("certificate", "Certificate per position",
             "Per position, the relative L2 distance of the accepted token's row to the target's, the threshold "
             "epsilon it had to pass, and the closest verified token that was rejected (log axis). The gap between "
             "the accepted distance and the best rejected one is the certificate's margin." +
                 (exact_zeros ? " At " + std::to_string(exact_zeros) + " position" + (exact_zeros > 1 ? "s" : "") +
                                    " the accepted distance is exactly 0 (the same computation as the target's) and "
                                    "is not drawn on the log axis."
                              : std::string()),
             lines, crows);
  json rank_spec = lines;
  rank_spec["encoding"]["y"] = q("value", "count / rank", true);
  page.chart("candidates", "Candidates verified per position",
             "How many tokens were run through the model at each position before one was accepted (and certified), "
             "and, where the prompt is known, where the candidate policy ranked the prompt's token (1 = first; log "
             "axis).",
             rank_spec, rrows);

  if (positions && positions->is_array()) {
    o << "<table class=\"cert\"><tr><th>pos</th><th>token</th><th>distance</th><th>epsilon</th><th>best rejected</th>"
         "<th>margin ratio</th><th>candidates</th><th>verdict</th></tr>\n";
    for (const json& p : *positions) {
      const std::size_t t = static_cast<std::size_t>(std::max(0.0, number_at(p, {"position"}, 0)));
      const std::int64_t id = p.contains("id") && p["id"].is_number_integer() ? p["id"].get<std::int64_t>() : -1;
      const char* cls = t < truth.size() ? (truth[t] == id ? "tok ok" : "tok bad") : "tok";
      std::string ties;
      if (p.contains("ties") && p["ties"].is_array())
        for (const json& tie : p["ties"]) ties += (ties.empty() ? " rivals: " : ", ") + html(str_at(tie, {"text"}));
      o << "<tr><td>" << t << "</td><td><span class=\"" << cls << "\">" << html(str_at(p, {"text"}))
        << "</span></td><td>" << number_text(number_at(p, {"distance"})) << "</td><td>"
        << number_text(number_at(p, {"epsilon"})) << "</td><td>" << number_text(number_at(p, {"best_rejected"}))
        << "</td><td>" << number_text(number_at(p, {"margin_ratio"})) << "</td><td>" << str_at(p, {"candidates"})
        << "</td><td>" << html(str_at(p, {"verdict"})) << ties << "</td></tr>\n";
    }
    o << "</table>\n";
  }
  o << "</section>\n";
}

// The first step whose loss fell below the control m (inequality (4) when the metric is L1): the record's
// steps_to_control where it has one (exact), else from its curve; NaN when it never did, when the first step is already below (a walk), or without a curve. The curve is thinned past
// 512 steps: the step is then the first kept one below m, at most `stride` - 1 steps late.
double first_step_below_control(const json& r) {
  if (const json* exact = at(r, {"steps_to_control"}); exact && exact->is_number())
    return exact->get<double>() > 1 ? exact->get<double>() : NAN;  // below at the first step: a walk, no crossing
  const double m = number_at(r, {"control", "metric"});
  const json* steps = at(r, {"curve", "step"});
  const json* losses = at(r, {"curve", "loss"});
  if (!std::isfinite(m) || !steps || !losses || !steps->is_array() || !losses->is_array()) return NAN;
  for (std::size_t i = 0; i < steps->size() && i < losses->size(); ++i) {
    if (!(*losses)[i].is_number() || !(*steps)[i].is_number()) continue;
    if ((*losses)[i].get<double>() < m) return i == 0 ? NAN : (*steps)[i].get<double>();
  }
  return NAN;
}

// ---- sweeps --------------------------------------------------------------------------------------------------------

void sweep_section(Page& page, const std::string& file, const std::vector<const Record*>& records) {
  std::ostream& o = page.body;
  // Grid points in the order they first appear.
  std::vector<std::string> labels;
  std::map<std::string, std::vector<const json*>> by_point;
  std::map<std::string, json> grid_of;
  for (const Record* rec : records) {
    const std::string label = str_at(rec->value, {"sweep", "grid_label"}, "(config)");
    if (!by_point.count(label)) {
      labels.push_back(label);
      const json* grid = at(rec->value, {"sweep", "grid"});
      grid_of[label] = grid ? *grid : json::object();
    }
    by_point[label].push_back(&rec->value);
  }
  const json& first = records.front()->value;
  o << "<section class=\"sweep\"><h3>Sweep " << html(file) << "</h3>\n<p class=\"where\">" << records.size()
    << " runs; prompts <code>" << html(str_at(first, {"sweep", "prompts_file"})) << "</code>; configs";
  std::set<std::string> configs;
  for (const Record* rec : records) configs.insert(str_at(rec->value, {"sweep", "config_file"}));
  for (const std::string& c : configs) o << " <code>" << html(c) << "</code>";
  o << "</p>\n";

  o << "<table class=\"summary\"><tr><th>grid point</th><th>runs</th><th>exact match</th><th>token accuracy</th>"
       "<th>certified unique</th><th>time/prompt mean (s)</th><th>median (s)</th><th>max (s)</th>"
       "<th>candidates/position</th></tr>\n";
  json rates = json::array(), heat = json::array();
  for (const std::string& label : labels) {
    const RunsSummary s = summarize_runs(by_point[label]);
    o << "<tr><td>" << html(label) << "</td><td>" << s.runs << "</td><td>" << percent(s.exact_match_rate)
      << "</td><td>" << percent(s.token_accuracy) << "</td><td>" << percent(s.unique_rate) << "</td><td>"
      << number_text(s.time_per_prompt.mean, 3) << "</td><td>" << number_text(s.time_per_prompt.median, 3)
      << "</td><td>" << number_text(s.time_per_prompt.max, 3) << "</td><td>"
      << number_text(s.candidates_per_position.mean, 3) << "</td></tr>\n";
    if (std::isfinite(s.exact_match_rate))
      rates.push_back({{"grid point", label}, {"measure", "exact match"}, {"rate", s.exact_match_rate}});
    if (std::isfinite(s.unique_rate))
      rates.push_back({{"grid point", label}, {"measure", "certified unique"}, {"rate", s.unique_rate}});
    const json& grid = grid_of[label];
    if (grid.is_object() && grid.size() == 2) {
      auto it = grid.begin();
      json cell = {{"x", it.value()}, {"x_key", it.key()}};
      ++it;
      cell["y"] = it.value();
      cell["y_key"] = it.key();
      cell["exact_match_rate"] = finite_or_null(s.exact_match_rate);
      cell["time_mean_s"] = finite_or_null(s.time_per_prompt.mean);
      heat.push_back(cell);
    }
  }
  o << "</table>\n";

  const double height = std::max<double>(60, 28.0 * static_cast<double>(labels.size()));
  page.chart("rates", "Exact match and certified unique per grid point",
             "The share of runs that recovered the prompt exactly (of those whose prompt is known) and the share "
             "whose certificate says unique (token searches).",
             {{"height", height},
              {"mark", "bar"},
              {"encoding",
               {{"y", n("grid point", "")},
                {"yOffset", {{"field", "measure"}}},
                {"x", {{"field", "rate"}, {"type", "quantitative"}, {"title", "share of runs"},
                       {"scale", {{"domain", {0, 1}}}}, {"axis", {{"format", "%"}}}}},
                {"color", colour("measure")},
                {"tooltip", tooltip({"grid point", "measure", "rate"})}}}},
             rates);

  json times = json::array(), positions = json::array();
  std::map<std::pair<std::string, std::int64_t>, std::pair<double, std::size_t>> per_position;
  for (const Record* rec : records) {
    const json& r = rec->value;
    const std::string label = str_at(r, {"sweep", "grid_label"}, "(config)");
    const double t = number_at(r, {"time_s", "optimize"});
    std::string outcome = "no prompt to compare";
    if (r.contains("exact_match") && r["exact_match"].is_boolean())
      outcome = r["exact_match"].get<bool>() ? "exact" : "not exact";
    if (std::isfinite(t) && t > 0)
      times.push_back({{"grid point", label},
                       {"prompt", number_at(r, {"sweep", "prompt_index"})},
                       {"kind", str_at(r, {"sweep", "prompt_kind"})},
                       {"outcome", outcome},
                       {"time_s", t}});
    if (const json* c = at(r, {"series", "candidates"}); c && c->is_array())
      for (std::size_t i = 0; i < c->size(); ++i)
        if ((*c)[i].is_number()) {
          auto& [sum, count] = per_position[{label, static_cast<std::int64_t>(i)}];
          sum += (*c)[i].get<double>();
          ++count;
        }
  }
  for (const auto& [key, value] : per_position)
    positions.push_back({{"grid point", key.first}, {"position", key.second},
                         {"candidates", value.first / static_cast<double>(value.second)}, {"runs", value.second}});
  page.chart("times", "Time per prompt",
             "The inversion's time for each prompt (time_s.optimize, log axis), one tick per run.",
             {{"height", height},
              {"mark", {{"type", "tick"}, {"thickness", 2}}},
              {"encoding",
               {{"y", n("grid point", "")}, {"x", q("time_s", "seconds", true)}, {"color", colour("outcome")},
                {"tooltip", tooltip({"grid point", "prompt", "kind", "outcome", "time_s"})}}}},
             times);
  page.chart("time-histogram", "Distribution of the time per prompt",
             "How many runs took how long (20 bins over the seconds), stacked by grid point.",
             {{"mark", "bar"},
              {"encoding",
               {{"x", {{"field", "time_s"}, {"type", "quantitative"}, {"bin", {{"maxbins", 20}}},
                       {"title", "seconds"}}},
                {"y", {{"aggregate", "count"}, {"type", "quantitative"}, {"title", "runs"}}},
                {"color", colour("grid point")}}}},
             times);
  page.chart("candidates-by-position", "Candidates verified against position",
             "The mean number of tokens verified at each position over the runs of each grid point (token searches; "
             "log axis): where in the prompt the search needed many candidates.",
             {{"mark", {{"type", "line"}, {"point", true}}},
              {"encoding",
               {{"x", {{"field", "position"}, {"type", "quantitative"}, {"title", "position"},
                       {"axis", {{"tickMinStep", 1}}}}},
                {"y", q("candidates", "candidates (mean)", true)},
                {"color", colour("grid point")},
                {"tooltip", tooltip({"grid point", "position", "candidates", "runs"})}}}},
             positions);
  // Across training: the grid points whose weights lminv train saved (sweep --checkpoints), by training step.
  std::map<std::pair<std::string, double>, std::vector<const json*>> by_step;
  for (const Record* rec : records) {
    const double step = number_at(rec->value, {"sweep", "training", "step"});
    if (std::isfinite(step)) by_step[{str_at(rec->value, {"sweep", "config_file"}), step}].push_back(&rec->value);
  }
  if (!by_step.empty()) {
    json rows = json::array();
    o << "<h4>Across training</h4>\n<table class=\"summary\"><tr><th>config</th><th>training step</th><th>runs</th>"
         "<th>exact match</th><th>certified unique</th><th>candidates/position</th><th>time/prompt mean (s)</th>"
         "<th>steps to inequality (4)</th></tr>\n";
    for (const auto& [key, runs] : by_step) {
      const RunsSummary s = summarize_runs(runs);
      std::vector<double> crossings;
      for (const json* r : runs) crossings.push_back(first_step_below_control(*r));
      const Stats c = stats_of(crossings);
      const std::string config = fs::path(key.first).stem().string();
      o << "<tr><td>" << html(config) << "</td><td>" << key.second << "</td><td>" << s.runs << "</td><td>"
        << percent(s.exact_match_rate) << "</td><td>" << percent(s.unique_rate) << "</td><td>"
        << number_text(s.candidates_per_position.mean, 4) << "</td><td>" << number_text(s.time_per_prompt.mean, 3)
        << "</td><td>" << number_text(c.mean, 4) << "</td></tr>\n";
      const std::pair<const char*, double> measures[] = {{"exact match (share)", s.exact_match_rate},
                                                         {"certified unique (share)", s.unique_rate},
                                                         {"candidates per position", s.candidates_per_position.mean},
                                                         {"time per prompt (s)", s.time_per_prompt.mean},
                                                         {"steps to inequality (4)", c.mean}};
      for (const auto& [name, v] : measures)
        if (std::isfinite(v))
          rows.push_back({{"config", config}, {"training step", key.second}, {"measure", name}, {"value", v}});
    }
    o << "</table>\n";
    page.chart("across-training", "Invertibility across training",
               "Each measure of the sweep per checkpoint of a training run (lminv sweep --checkpoints), against the "
               "checkpoint's training step: the exact-match and certified-unique shares, candidates verified per "
               "position and time per prompt (token searches), and the mean first step at which a descent's loss fell "
               "below the control m (runs with a curve that crossed). One panel per measure, each with its own axis.",
               {{"facet", {{"row", {{"field", "measure"}, {"type", "nominal"}, {"title", ""}}}}},
                {"spec",
                 {{"width", 560},
                  {"height", 120},
                  {"mark", {{"type", "line"}, {"point", true}}},
                  {"encoding",
                   {{"x", q("training step", "training step")},
                    {"y", {{"field", "value"}, {"type", "quantitative"}, {"title", ""}, {"scale", {{"zero", false}}}}},
                    {"color", colour("config")},
                    {"tooltip", tooltip({"config", "training step", "measure", "value"})}}}}},
                {"resolve", {{"scale", {{"y", "independent"}}}}}},
               rows);
  }
  if (!heat.empty() && heat.size() == labels.size()) {
    const std::string xk = heat[0]["x_key"], yk = heat[0]["y_key"];
    bool same = true;
    for (const json& c : heat) same = same && c["x_key"] == xk && c["y_key"] == yk;
    if (same) {
      json rect = {{"mark", "rect"},
                   {"encoding",
                    {{"x", n("x", xk)},
                     {"y", n("y", yk)},
                     {"color", {{"field", "exact_match_rate"}, {"type", "quantitative"}, {"title", "exact match"},
                                {"scale", {{"domain", {0, 1}}, {"scheme", "viridis"}}}}},
                     {"tooltip", tooltip({"x", "y", "exact_match_rate", "time_mean_s"})}}}};
      json text = {{"mark", {{"type", "text"}, {"color", "white"}}},
                   {"encoding",
                    {{"x", n("x", xk)}, {"y", n("y", yk)},
                     {"text", {{"field", "exact_match_rate"}, {"type", "quantitative"}, {"format", ".0%"}}}}}};
      page.chart("grid", "Exact match over the grid",
                 "The exact-match rate at each point of the two-key grid " + html(xk) + " x " + html(yk) + ".",
                 {{"layer", {rect, text}}, {"width", 80 * 6}}, heat);
    }
  }
  o << "</section>\n";
}

// ---- compare -------------------------------------------------------------------------------------------------------

void compare_section(Page& page, const std::vector<const Record*>& rows) {
  std::ostream& o = page.body;
  const json& first = rows.front()->value;
  o << "<section class=\"compare\"><h3>Compare " << html(str_at(first, {"key"})) << " in <code>"
    << html(str_at(first, {"config_file"})) << "</code> against " << html(str_at(first, {"baseline"})) << "</h3>\n";
  o << "<p class=\"where\">" << html(rows.front()->file) << ":" << rows.front()->line << ", "
    << html(str_at(first, {"time"})) << "</p>\n<table class=\"summary\"><tr><th>value</th><th>output max |a-b|</th>"
    "<th>output normalised</th><th>gradient max |a-b|</th><th>gradient normalised</th><th>final loss</th>"
    "<th>decoded</th><th>exact</th><th>seconds</th></tr>\n";
  json bars = json::array();
  for (const Record* rec : rows) {
    const json& r = rec->value;
    const std::string value = str_at(r, {"value"});
    o << "<tr><td>" << html(value) << "</td><td>" << number_text(number_at(r, {"output_max_abs"})) << "</td><td>"
      << number_text(number_at(r, {"output_normalised"})) << "</td><td>" << number_text(number_at(r, {"grad_max_abs"}))
      << "</td><td>" << number_text(number_at(r, {"grad_normalised"})) << "</td><td>"
      << number_text(number_at(r, {"final_loss"})) << "</td><td>" << html(str_at(r, {"decoded"})) << "</td><td>"
      << (flag(r, {"exact_match"}) ? "yes" : "no") << "</td><td>" << number_text(number_at(r, {"seconds"}), 3)
      << "</td></tr>\n";
    if (value == str_at(r, {"baseline"})) continue;
    const std::pair<const char*, const char*> quantities[] = {{"output", "output_normalised"},
                                                              {"input gradient", "grad_normalised"}};
    for (const auto& [name, key] : quantities) {
      const double v = number_at(r, {key});
      if (std::isfinite(v) && v > 0) bars.push_back({{"value", value}, {"quantity", name}, {"difference", v}});
    }
  }
  o << "</table>\n";
  if (bars.empty()) {
    o << "<p class=\"note\">Every value's output and gradient equal the baseline's exactly: nothing to plot.</p>\n";
  } else {
    // Bars on a log axis start from a floor below the smallest difference (a log axis has no zero).
    double smallest = INFINITY;
    for (const json& b : bars) smallest = std::min(smallest, b["difference"].get<double>());
    const double floor = std::pow(10.0, std::floor(std::log10(smallest)));
    for (json& b : bars) b["floor"] = floor;
    page.chart("compare", "Differences from " + str_at(first, {"baseline"}),
               "max |a - b| / max |a| of the model's output and of its input gradient (a vector-Jacobian product with "
               "one fixed random vector) against the baseline, per value (log axis; the bars start at a power of ten below the "
               "smallest difference).",
               {{"height", std::max<double>(60, 36.0 * static_cast<double>(rows.size()))},
                {"mark", "bar"},
                {"encoding",
                 {{"y", n("value", str_at(first, {"key"}))},
                  {"yOffset", {{"field", "quantity"}}},
                  {"x", {{"field", "difference"}, {"type", "quantitative"}, {"title", "normalised difference"},
                         {"scale", {{"type", "log"}, {"domainMin", floor}}}}},
                  {"x2", {{"field", "floor"}}},
                  {"color", colour("quantity")},
                  {"tooltip", tooltip({"value", "quantity", "difference"})}}}},
               bars);
  }
  o << "</section>\n";
}


// ---- training ------------------------------------------------------------------------------------------------------

bool is_training_record(const json& r) {
  if (!r.contains("kind") || !r["kind"].is_string() || !r.contains("step")) return false;
  const std::string k = r["kind"];
  return k == "start" || k == "train" || k == "validation" || k == "resume" || k == "end";
}

void training_section(Page& page, const std::string& file, const std::vector<const Record*>& records) {
  std::ostream& o = page.body;
  const json* start = nullptr;
  const json* end = nullptr;
  json losses = json::array(), rates = json::array();
  std::size_t resumes = 0;
  double unigram = NAN;
  for (const Record* rec : records) {
    const json& r = rec->value;
    const std::string kind = r["kind"];
    const double step = number_at(r, {"step"});
    if (kind == "start") start = &r;
    if (kind == "end") end = &r;
    if (kind == "resume") ++resumes;
    if (kind == "train") {
      const double loss = number_at(r, {"loss"});
      if (std::isfinite(loss)) losses.push_back({{"step", step}, {"split", "train"}, {"loss", loss}});
      const double lr = number_at(r, {"lr"}), norm = number_at(r, {"grad_norm"});
      if (std::isfinite(lr)) rates.push_back({{"step", step}, {"quantity", "learning rate"}, {"value", lr}});
      if (std::isfinite(norm) && norm > 0)
        rates.push_back({{"step", step}, {"quantity", "gradient norm (before clipping)"}, {"value", norm}});
    }
    if (kind == "validation") {
      const double loss = number_at(r, {"loss"});
      if (std::isfinite(loss)) losses.push_back({{"step", step}, {"split", "validation"}, {"loss", loss}});
    }
  }
  if (start) unigram = number_at(*start, {"unigram_validation_loss"});
  o << "<section class=\"training\"><h3>Training " << html(file) << "</h3>\n";
  std::vector<std::pair<std::string, std::string>> kv;
  if (start) {
    kv.push_back({"config", "<code>" + html(str_at(*start, {"config_file"})) + "</code> (fingerprint " +
                                html(str_at(*start, {"fingerprint"})) + ")"});
    kv.push_back({"parameters", number_text(number_at(*start, {"parameters"}), 4)});
    kv.push_back({"corpus", str_at(*start, {"corpus", "files"}) + " files, " +
                                str_at(*start, {"corpus", "train_tokens"}) + " training and " +
                                str_at(*start, {"corpus", "validation_tokens"}) + " validation tokens (" +
                                str_at(*start, {"corpus", "train_documents"}) + " and " +
                                str_at(*start, {"corpus", "validation_documents"}) + " documents)"});
    kv.push_back({"unigram baseline", number_text(unigram) + " nats/token on the validation split"});
  }
  if (end) {
    kv.push_back({"final", "train " + number_text(number_at(*end, {"train_loss"})) + ", validation " +
                               number_text(number_at(*end, {"validation_loss"})) + " nats/token after " +
                               str_at(*end, {"step"}) + " steps (" + number_text(number_at(*end, {"seconds"}), 3) +
                               " s)"});
  } else {
    kv.push_back({"final", "not finished (no end record)"});
  }
  if (resumes) kv.push_back({"resumed", std::to_string(resumes) + " time" + (resumes > 1 ? "s" : "")});
  key_value_table(o, kv);
  json loss_spec = {{"layer",
                     {{{"mark", {{"type", "line"}, {"point", losses.size() <= 80}}},
                       {"encoding", {{"x", q("step", "step")},
                                     {"y", {{"field", "loss"}, {"type", "quantitative"},
                                            {"title", "cross-entropy (nats/token)"}, {"scale", {{"zero", false}}}}},
                                     {"color", colour("split")}, {"tooltip", tooltip({"step", "split", "loss"})}}}}}}};
  if (std::isfinite(unigram)) {
    for (json& row : losses) row["unigram"] = unigram;
    loss_spec["layer"].push_back({{"mark", {{"type", "rule"}, {"color", "#888"}, {"strokeDash", {6, 4}}}},
                                  {"encoding", {{"y", {{"aggregate", "max"}, {"field", "unigram"},
                                                       {"type", "quantitative"}}}}}});
  }
  page.chart("training-loss", "Training and validation loss",
             "The mean next-token cross-entropy of the training batches since the previous record, and the loss on "
             "the fixed validation windows; the dashed grey line is the unigram baseline on the validation split, "
             "which a trained model must fall below.",
             loss_spec, losses);
  page.chart("training-rates", "Learning rate and gradient norm",
             "The learning rate of each logged step (warm-up, then cosine decay) and the gradient's global L2 norm "
             "before clipping (log axis).",
             {{"mark", "line"},
              {"encoding",
               {{"x", q("step", "step")}, {"y", q("value", "value", true)}, {"color", colour("quantity")},
                {"tooltip", tooltip({"step", "quantity", "value"})}}}},
             rates);
  o << "</section>\n";
}

std::string read_asset(const fs::path& dir, const std::string& name) {
  const fs::path file = dir / name;
  std::error_code ec;
  if (!fs::exists(file, ec))
    throw Error(file.string() + ": missing; `lminv report` inlines Vega from there: run bash scripts/fetch-vega.sh "
                "(or set LMINV_REPORT_ASSETS to a folder holding vega.min.js, vega-lite.min.js, vega-embed.min.js)");
  std::string text = read_regular_file(file, "script", kAssetLimit);
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower.find("</script") != std::string::npos)
    throw Error(file.string() + ": holds \"</script\", which cannot be inlined into a page");
  return text;
}

const char* kStyle = R"(
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 24px 48px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ccc; margin-top: 40px; } h3 { margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0 16px; } th, td { padding: 3px 8px; border-bottom: 1px solid #eee;
  text-align: left; vertical-align: top; } th { background: #f6f6f6; }
table.kv th { width: 190px; } figure { margin: 12px 0 20px; } figcaption { color: #555; max-width: 820px; }
.files { color: #888; font-size: 12px; } code { font-size: 12px; background: #f4f4f4; padding: 0 3px; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.tok { background: #eef; margin-right: 2px; padding: 0 2px; border-radius: 2px; white-space: pre; }
.tok.ok { background: #c8f0c8; } .tok.bad { background: #f6d0d0; }
.yes { color: #176917; } .no { color: #a11; } .where { color: #666; font-size: 12px; } .note { color: #666; }
nav ul { columns: 2; } #lminv-status { display: none; }
)";

// Renders every chart, then writes what happened into #lminv-status (the browser test reads it): the charts drawn
// (an SVG with at least one mark), the ones that failed, and every error or warning the page logged.
const char* kRender = R"(
(function () {
  var status = {charts: 0, rendered: [], failed: [], errors: window.lminvErrors, warnings: window.lminvWarnings};
  var charts = JSON.parse(document.getElementById('lminv-charts').textContent);
  status.charts = charts.length;
  var done = charts.map(function (c) {
    return vegaEmbed('#' + c.id, c.spec, {renderer: 'svg', actions: {export: true, source: false, compiled: false,
                                                                     editor: false}})
      .then(function () {
        var svg = document.querySelector('#' + c.id + ' svg');
        var marks = svg ? svg.querySelectorAll('g.role-mark > *').length : 0;
        var width = svg ? parseFloat(svg.getAttribute('width')) : 0;
        if (svg && marks > 0 && width > 0) status.rendered.push(c.id);
        else status.failed.push(c.id + ': no marks drawn');
      })
      .catch(function (e) { status.failed.push(c.id + ': ' + e); });
  });
  Promise.all(done).then(function () {
    document.getElementById('lminv-status').textContent = JSON.stringify(status);
    document.documentElement.setAttribute('data-lminv', 'rendered');
  });
})();
)";

const char* kCapture = R"(
window.lminvErrors = []; window.lminvWarnings = [];
window.addEventListener('error', function (e) { lminvErrors.push(String(e.message || e)); });
window.addEventListener('unhandledrejection', function (e) { lminvErrors.push('unhandled rejection: ' + e.reason); });
document.addEventListener('securitypolicyviolation', function (e) {
  lminvErrors.push('blocked by the page policy: ' + e.blockedURI); });
(function () {
  var error = console.error.bind(console), warn = console.warn.bind(console);
  console.error = function () { lminvErrors.push([].slice.call(arguments).join(' ')); error.apply(null, arguments); };
  console.warn = function () { lminvWarnings.push([].slice.call(arguments).join(' ')); warn.apply(null, arguments); };
})();
)";

}  // namespace

void write_records_report(const fs::path& records, const fs::path& page, std::ostream& out) {
  ReportRequest request;
  request.inputs = {records};
  request.out = page;
  request.force = true;
  const ReportResult r = write_report(request, out);
  out << "  report    " << page.string() << " (" << r.charts << " plots; data in " << r.data_dir.string() << ")\n";
}

bool report_wanted(const std::string& setting, bool by_default, std::ostream& out) {
  if (setting == "false" || (setting == "auto" && !by_default)) return false;
  const fs::path assets = default_report_assets_dir();
  std::error_code ec;
  for (const char* name : {"vega.min.js", "vega-lite.min.js", "vega-embed.min.js"})
    if (!fs::is_regular_file(assets / name, ec)) {
      const std::string why = (assets / name).string() + " is missing (bash scripts/fetch-vega.sh fetches it)";
      if (setting == "true") throw Error("[output] report = true: " + why);
      out << "  note: no report page: " << why << "\n";
      return false;
    }
  return true;
}

fs::path default_report_assets_dir() {
  if (const char* dir = std::getenv("LMINV_REPORT_ASSETS"); dir && *dir) return dir;
#ifdef LMINV_SOURCE_DATA_DIR
  return fs::path(LMINV_SOURCE_DATA_DIR) / "vega";
#else
  return "data/vega";
#endif
}

ReportResult write_report(const ReportRequest& request, std::ostream& out) {
  if (request.inputs.empty()) throw Error("report: give at least one records file or folder");
  if (request.out.empty()) throw Error("report: missing --out FILE");
  std::error_code ec;
  if (fs::exists(request.out, ec) && !request.force)
    throw Error(request.out.string() + ": exists; give --force to replace it");
  if (fs::is_directory(request.out, ec)) throw Error(request.out.string() + ": is a folder, not a page to write");
  const fs::path assets = request.assets.empty() ? default_report_assets_dir() : request.assets;
  // Everything is read and checked before anything is written.
  const std::string scripts[] = {read_asset(assets, "vega.min.js"), read_asset(assets, "vega-lite.min.js"),
                                 read_asset(assets, "vega-embed.min.js")};
  std::string versions;
  if (fs::exists(assets / "VERSIONS", ec)) {
    std::istringstream in(read_regular_file(assets / "VERSIONS", "versions file", 4096));
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) versions += (versions.empty() ? "" : ", ") + line;
  }

  std::vector<Record> all;
  std::vector<std::string> sources;
  for (const fs::path& input : request.inputs)
    for (const fs::path& file : records_files(input)) {
      std::vector<Record> records = read_records_file(file, out);
      sources.push_back(file.string() + " (" + std::to_string(records.size()) + ")");
      for (Record& r : records) all.push_back(std::move(r));
    }

  // What each record is.
  std::vector<const Record*> runs, exact, compares;
  std::vector<std::string> sweep_files;
  std::map<std::string, std::vector<const Record*>> sweeps, trainings;
  std::vector<std::string> training_files;
  ReportResult result;
  for (const Record& rec : all) {
    const json& r = rec.value;
    if (is_training_record(r)) {
      if (!trainings.count(rec.file)) training_files.push_back(rec.file);
      trainings[rec.file].push_back(&rec);
    } else if (r.contains("output_max_abs") && r.contains("baseline") && r.contains("key")) {
      compares.push_back(&rec);
    } else if (r.contains("sweep") && r["sweep"].is_object()) {
      if (!sweeps.count(rec.file)) sweep_files.push_back(rec.file);
      sweeps[rec.file].push_back(&rec);
      ++result.sweep_runs;
    } else if (r.contains("certificate") && r["certificate"].is_object()) {
      exact.push_back(&rec);
    } else if (r.contains("final_loss") && r.contains("prompt")) {
      runs.push_back(&rec);
    } else {
      ++result.other;
    }
  }
  result.runs = runs.size();
  result.exact = exact.size();
  result.sweeps = sweeps.size();
  result.trainings = trainings.size();

  std::string stem = request.out.string();
  if (request.out.extension() == ".html") stem.resize(stem.size() - 5);
  result.data_dir = stem + "-data";
  Page page(result.data_dir);

  auto shown = [&](const std::vector<const Record*>& list) {
    const std::size_t n = std::min(list.size(), request.max_runs);
    return std::vector<const Record*>(list.end() - static_cast<std::ptrdiff_t>(n), list.end());
  };
  if (!runs.empty()) {
    page.section("runs", "Runs");
    std::ostream& o = page.body;
    o << "<table class=\"summary\"><tr><th>#</th><th>time</th><th>method</th><th>prompt</th><th>recovered</th>"
         "<th>final loss</th><th>ineq. (4)</th><th>r (L1)</th></tr>\n";
    for (std::size_t i = 0; i < runs.size(); ++i) {
      const json& r = runs[i]->value;
      o << "<tr><td>" << i + 1 << "</td><td>" << html(str_at(r, {"time"})) << "</td><td>" << html(run_title(r))
        << "</td><td>" << html(str_at(r, {"prompt", "text"})) << "</td><td>"
        << tokens_html(strings_at(r, {"decoded", "pieces"}), ids_at(r, {"decoded", "ids"}), ids_at(r, {"prompt", "ids"}))
        << "</td><td>" << number_text(number_at(r, {"final_loss"})) << "</td><td>"
        << (flag(r, {"inequality_4"}) ? "holds" : "fails") << "</td><td>"
        << number_text(number_at(r, {"ratio_input_output_l1"})) << "</td></tr>\n";
    }
    o << "</table>\n";
    if (runs.size() > request.max_runs)
      o << "<p class=\"note\">The latest " << request.max_runs << " of " << runs.size() << " runs in detail.</p>\n";
    std::size_t index = runs.size() - std::min(runs.size(), request.max_runs);
    for (const Record* rec : shown(runs)) run_detail(page, *rec, ++index);
  }
  if (!exact.empty()) {
    page.section("exact", "Exact inversions");
    if (exact.size() > request.max_runs)
      page.body << "<p class=\"note\">The latest " << request.max_runs << " of " << exact.size() << ".</p>\n";
    std::size_t index = exact.size() - std::min(exact.size(), request.max_runs);
    for (const Record* rec : shown(exact)) exact_detail(page, *rec, ++index);
  }
  if (!sweeps.empty()) {
    page.section("sweeps", "Sweeps");
    for (const std::string& file : sweep_files) sweep_section(page, file, sweeps[file]);
  }
  if (!compares.empty()) {
    page.section("compare", "Comparisons");
    // One table per invocation: consecutive rows of the same file, config, key and baseline.
    std::vector<const Record*> group;
    auto same = [](const Record* a, const Record* b) {
      return a->file == b->file && str_at(a->value, {"config_file"}) == str_at(b->value, {"config_file"}) &&
             str_at(a->value, {"key"}) == str_at(b->value, {"key"}) &&
             str_at(a->value, {"baseline"}) == str_at(b->value, {"baseline"}) &&
             str_at(b->value, {"value"}) != str_at(b->value, {"baseline"});
    };
    for (const Record* rec : compares) {
      if (!group.empty() && !same(group.back(), rec)) {
        compare_section(page, group);
        ++result.compares;
        group.clear();
      }
      group.push_back(rec);
    }
    if (!group.empty()) {
      compare_section(page, group);
      ++result.compares;
    }
  }
  if (!trainings.empty()) {
    page.section("training", "Training");
    for (const std::string& file : training_files) training_section(page, file, trainings[file]);
  }
  if (all.size() == result.other) page.body << "<p class=\"note\">No run, sweep, comparison or training records.</p>\n";
  result.charts = page.charts.size();

  // The page: everything inlined, and a policy that forbids the page any network access.
  const std::string title = request.title.empty() ? "lminv report" : request.title;
  std::ostringstream doc;
  doc << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
      << "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline' "
         "'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:\">\n"
      << "<title>" << html(title) << "</title>\n<style>" << kStyle << "</style>\n<script>" << kCapture
      << "</script>\n<!-- " << html(versions) << " (BSD-3-Clause, University of Washington Interactive Data Lab) -->\n";
  for (const std::string& s : scripts) doc << "<script>" << s << "</script>\n";
  doc << "</head><body>\n<h1>" << html(title) << "</h1>\n<p class=\"where\">Written " << utc_timestamp()
      << " by lminv " << LMINV_VERSION << " from " << all.size() << " records:";
  for (const std::string& s : sources) doc << " <code>" << html(s) << "</code>";
  doc << ". " << result.runs << " runs, " << result.exact << " exact inversions, " << result.sweeps << " sweeps ("
      << result.sweep_runs << " runs), " << result.compares << " comparisons, " << result.trainings
      << " training runs";
  if (result.other) doc << "; " << result.other << " records of other kinds not shown";
  doc << ". Each plot's data is in <code>" << html(result.data_dir.filename().string()) << "/</code>.</p>\n";
  if (!page.toc.empty()) {
    doc << "<nav><ul>";
    for (const auto& [anchor, name] : page.toc) doc << "<li><a href=\"#" << anchor << "\">" << html(name) << "</a></li>";
    doc << "</ul></nav>\n";
  }
  doc << page.body.str();
  json charts = json::array();
  for (const Chart& c : page.charts) {
    json spec = c.spec;
    spec["data"] = {{"values", c.rows}};
    charts.push_back({{"id", c.id}, {"spec", spec}});
  }
  doc << "<script type=\"application/json\" id=\"lminv-charts\">" << script_safe(dump(charts)) << "</script>\n"
      << "<pre id=\"lminv-status\"></pre>\n<script>" << kRender << "</script>\n</body></html>\n";

  // The data files first, then the page (atomically): a page on disk always has its data beside it.
  fs::create_directories(result.data_dir, ec);
  if (ec) throw Error(result.data_dir.string() + ": cannot make the data folder (" + ec.message() + ")");
  for (const Chart& c : page.charts) {
    const fs::path base = result.data_dir / c.id;
    write_file_atomically(base.string() + ".csv", csv_of(c.rows));
    write_file_atomically(base.string() + ".json", dump(c.rows, 1) + "\n");
    json spec = c.spec;
    spec["data"] = {{"url", c.id + ".json"}};
    write_file_atomically(base.string() + ".vl.json", dump(spec, 2) + "\n");
  }
  if (request.out.has_parent_path()) fs::create_directories(request.out.parent_path(), ec);
  write_file_atomically(request.out, doc.str());
  return result;
}

}  // namespace lminv
