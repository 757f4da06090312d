// Progress of long work on stderr: on a terminal one line redrawn in place (rate, ETA), elsewhere (a CI log, a file)
// a plain line every few seconds, never a carriage return; nothing when turned off ([output] progress = off, --quiet).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace lminv {

enum class ProgressMode { off, terminal, lines };

// `setting` is [output] progress: auto (terminal on a terminal, else lines), on (the terminal line even when stderr
// is not a terminal), lines, off. `quiet` (--quiet) wins over all.
ProgressMode progress_mode(const std::string& setting, bool quiet = false);

class Progress {
 public:
  // LABEL names the work ("step", "run", "cell"); TOTAL is the number of units (0: unknown, no ETA).
  Progress(ProgressMode mode, std::string label, std::int64_t total, double line_seconds = 10.0,
           std::FILE* stream = stderr);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // DONE units so far; DETAIL is shown after the rate (a loss, a name).
  void update(std::int64_t done, const std::string& detail = "");
  void set_total(std::int64_t total) { total_ = total; }
  // A phase of work without units ("writing model.safetensors (6.2 GB)"): shown at once in both modes.
  void note(const std::string& text);
  // Erases the terminal line (before other output, and at the end).
  void clear();

  ProgressMode mode() const { return mode_; }

 private:
  std::string line(std::int64_t done, const std::string& detail) const;

  using Clock = std::chrono::steady_clock;
  ProgressMode mode_;
  std::string label_;
  std::int64_t total_;
  double line_seconds_;
  std::FILE* stream_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_ = start_;
  bool drawn_ = false;
};

// "42 s", "3.5 min", "2.1 h".
std::string duration_text(double seconds);

}  // namespace lminv
