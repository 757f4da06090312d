#include "certificate.hpp"

#include <cmath>
#include <iomanip>
#include <ostream>
#include <sstream>

#include "experiment.hpp"

namespace lminv {

namespace {

double at(const Result& r, const char* name, std::size_t i, double fallback = NAN) {
  auto it = r.series.find(name);
  return it != r.series.end() && i < it->second.size() ? it->second[i] : fallback;
}

nlohmann::json number(double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); }

std::string piece(const Tokenizer& tokenizer, std::int64_t id) {
  return nlohmann::json(display_text(tokenizer, {id})).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string sci(double x) {
  if (std::isnan(x)) return "-";
  if (std::isinf(x)) return "inf";
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << x;
  return s.str();
}

}  // namespace

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::known: return "known";
    case Verdict::unique: return "unique";
    case Verdict::ambiguous: return "ambiguous";
    case Verdict::not_found: return "not found";
  }
  return "?";
}

std::optional<Certificate> certificate_of(const Result& result) {
  if (result.ids.empty() || !result.series.count("distance") || !result.series.count("tolerance")) return std::nullopt;
  Certificate c;
  bool any_ambiguous = false, any_missing = false;
  for (std::size_t t = 0; t < result.ids.size(); ++t) {
    PositionCertificate p;
    p.position = static_cast<std::int64_t>(t);
    p.id = result.ids[t];
    p.distance = at(result, "distance", t);
    p.epsilon = at(result, "epsilon", t);
    p.best_rejected = at(result, "best_rejected", t);
    p.margin_ratio = std::isnan(p.best_rejected) ? NAN
                     : p.distance > 0         ? p.best_rejected / p.distance
                                              : INFINITY;
    p.tolerance = at(result, "tolerance", t);
    p.candidates = static_cast<std::int64_t>(at(result, "candidates", t, 0));
    p.tie_count = static_cast<std::int64_t>(at(result, "ties", t, 0));
    p.relaxed = at(result, "relaxed", t, 0) != 0;
    if (t < result.ties.size()) p.ties = result.ties[t];
    if (at(result, "known", t, 0) != 0) {
      p.verdict = Verdict::known;
      ++c.known;
    } else if (at(result, "verified", t, 0) == 0) {
      p.verdict = Verdict::not_found;
      any_missing = true;
      ++c.not_found;
    } else if (p.tie_count > 0) {
      p.verdict = Verdict::ambiguous;
      any_ambiguous = true;
      ++c.ambiguous;
    } else {
      p.verdict = Verdict::unique;
    }
    c.relaxed += p.relaxed ? 1 : 0;
    c.positions.push_back(std::move(p));
  }
  c.verdict = any_missing ? Verdict::not_found : any_ambiguous ? Verdict::ambiguous : Verdict::unique;
  auto value = [&](const char* k) {
    auto it = result.values.find(k);
    return it == result.values.end() ? NAN : it->second;
  };
  c.observed_level = value("observed_level");
  c.epsilon_floor = value("epsilon_floor");
  return c;
}

nlohmann::json certificate_json(const Certificate& c, const Tokenizer& tokenizer) {
  nlohmann::json positions = nlohmann::json::array();
  for (const PositionCertificate& p : c.positions) {
    nlohmann::json ties = nlohmann::json::array();
    for (const Candidate& r : p.ties)
      ties.push_back({{"id", r.id}, {"text", display_text(tokenizer, {r.id})}, {"distance", number(r.distance)}});
    positions.push_back({{"position", p.position},
                         {"id", p.id},
                         {"text", display_text(tokenizer, {p.id})},
                         {"distance", number(p.distance)},
                         {"epsilon", number(p.epsilon)},
                         {"best_rejected", number(p.best_rejected)},
                         {"margin_ratio", number(p.margin_ratio)},
                         {"tolerance", number(p.tolerance)},
                         {"candidates", p.candidates},
                         {"relaxed", p.relaxed},
                         {"verdict", verdict_name(p.verdict)},
                         {"tie_count", p.tie_count},
                         {"ties", ties}});
  }
  return {{"verdict", verdict_name(c.verdict)},
          {"positions", positions},
          {"observed_level", number(c.observed_level)},
          {"epsilon_floor", number(c.epsilon_floor)},
          {"counts",
           {{"known", c.known}, {"relaxed", c.relaxed}, {"ambiguous", c.ambiguous}, {"not_found", c.not_found}}}};
}

void print_certificate(std::ostream& out, const Certificate& c, const Tokenizer& tokenizer) {
  out << "  certificate (relative L2 distances to the target's rows)\n"
      << "  " << std::right << std::setw(4) << "pos" << std::setw(8) << "id" << "  " << std::left << std::setw(16)
      << "token" << std::right << std::setw(10) << "distance" << std::setw(10) << "epsilon" << std::setw(11)
      << "best rival" << std::setw(10) << "ratio" << std::setw(8) << "cands" << "  verdict\n";
  for (const PositionCertificate& p : c.positions) {
    std::string token = piece(tokenizer, p.id);
    if (token.size() > 15) token = token.substr(0, 14) + "~";
    out << "  " << std::right << std::setw(4) << p.position << std::setw(8) << p.id << "  " << std::left
        << std::setw(16) << token << std::right << std::setw(10) << sci(p.distance) << std::setw(10) << sci(p.epsilon)
        << std::setw(11) << sci(p.best_rejected) << std::setw(10) << sci(p.margin_ratio) << std::setw(8)
        << p.candidates << "  " << verdict_name(p.verdict) << (p.relaxed ? " (relaxed epsilon)" : "");
    if (!p.ties.empty()) {
      out << ": also";
      for (const Candidate& r : p.ties) out << " " << r.id << " " << piece(tokenizer, r.id) << " (" << sci(r.distance) << ")";
      if (p.tie_count > static_cast<std::int64_t>(p.ties.size()))
        out << " and " << p.tie_count - static_cast<std::int64_t>(p.ties.size()) << " more";
    }
    out << "\n";
  }
  out << "  verdict   " << verdict_name(c.verdict) << "  (" << c.positions.size() - static_cast<std::size_t>(c.known)
      << " positions searched";
  if (c.known) out << ", " << c.known << " known";
  if (c.relaxed) out << ", " << c.relaxed << " under a relaxed epsilon";
  if (c.ambiguous) out << ", " << c.ambiguous << " ambiguous";
  if (c.not_found) out << ", " << c.not_found << " not found";
  out << "; observed level " << sci(c.observed_level) << ", epsilon floor " << sci(c.epsilon_floor) << ")\n";
}

}  // namespace lminv
