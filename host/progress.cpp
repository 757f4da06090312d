#include "progress.hpp"

#include <unistd.h>

#include <cmath>
#include <sstream>
#include <iomanip>

namespace lminv {

ProgressMode progress_mode(const std::string& setting, bool quiet) {
  if (quiet || setting == "off") return ProgressMode::off;
  if (setting == "on") return ProgressMode::terminal;
  if (setting == "lines") return ProgressMode::lines;
  return ::isatty(::fileno(stderr)) ? ProgressMode::terminal : ProgressMode::lines;
}

std::string duration_text(double seconds) {
  std::ostringstream s;
  if (!std::isfinite(seconds)) return "?";
  if (seconds < 120) s << static_cast<long long>(std::lround(seconds)) << " s";
  else if (seconds < 7200) s << std::fixed << std::setprecision(1) << seconds / 60 << " min";
  else s << std::fixed << std::setprecision(1) << seconds / 3600 << " h";
  return s.str();
}

Progress::Progress(ProgressMode mode, std::string label, std::int64_t total, double line_seconds, std::FILE* stream)
    : mode_(mode), label_(std::move(label)), total_(total), line_seconds_(line_seconds), stream_(stream) {}

Progress::~Progress() { clear(); }

std::string Progress::line(std::int64_t done, const std::string& detail) const {
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  const double rate = done / std::max(elapsed, 1e-9);
  std::ostringstream s;
  s << "  " << label_ << " " << done;
  if (total_ > 0) s << "/" << total_;
  if (!detail.empty()) s << "  " << detail;
  s << "  " << std::setprecision(3) << rate << " " << label_ << "s/s";
  if (total_ > 0 && done > 0) s << "  ETA " << duration_text((total_ - done) / std::max(rate, 1e-12));
  s << "  (" << duration_text(elapsed) << ")";
  return s.str();
}

void Progress::update(std::int64_t done, const std::string& detail) {
  if (mode_ == ProgressMode::off) return;
  const auto now = Clock::now();
  const double since = std::chrono::duration<double>(now - last_).count();
  if (mode_ == ProgressMode::terminal) {
    // Redrawn at most 5 times a second, and at the last unit.
    if (drawn_ && since < 0.2 && done != total_) return;
    std::fprintf(stream_, "\r\033[K%s", line(done, detail).c_str());
    std::fflush(stream_);
    drawn_ = true;
  } else {
    if (since < line_seconds_) return;
    std::fprintf(stream_, "%s\n", line(done, detail).c_str());
    std::fflush(stream_);
  }
  last_ = now;
}

void Progress::note(const std::string& text) {
  if (mode_ == ProgressMode::off) return;
  if (mode_ == ProgressMode::terminal) {
    std::fprintf(stream_, "\r\033[K  %s", text.c_str());
    drawn_ = true;
  } else {
    std::fprintf(stream_, "  %s\n", text.c_str());
  }
  std::fflush(stream_);
}

void Progress::clear() {
  if (mode_ == ProgressMode::terminal && drawn_) {
    std::fprintf(stream_, "\r\033[K");
    std::fflush(stream_);
    drawn_ = false;
  }
}

}  // namespace lminv
