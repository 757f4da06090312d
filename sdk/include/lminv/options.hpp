// lminv SDK: typed, checked access to one config section.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "lminv/error.hpp"

namespace lminv {

// The keys of one config section ([optimizer], [decoder], [backend] ...) as the user wrote them.
// A plugin reads every key it knows while it is configured; the host then reports any key nobody
// read as unknown. A malformed value is an error naming the file, section, key and value.
class Options {
 public:
  Options() = default;
  Options(std::string section, std::string source, std::map<std::string, std::string> values)
      : section_(std::move(section)), source_(std::move(source)), values_(std::move(values)) {}

  const std::string& section() const { return section_; }
  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& values() const { return values_; }

  bool has(const std::string& key) const {
    read_.insert(key);
    return values_.count(key) != 0;
  }

  std::string get_string(const std::string& key, const std::string& fallback) const {
    read_.insert(key);
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second;
  }

  double get_double(const std::string& key, double fallback) const {
    const std::string* v = find(key);
    return v ? parse_double(key, *v) : fallback;
  }

  std::int64_t get_int(const std::string& key, std::int64_t fallback) const {
    const std::string* v = find(key);
    return v ? parse_int(key, *v) : fallback;
  }

  bool get_bool(const std::string& key, bool fallback) const {
    const std::string* v = find(key);
    if (!v) return fallback;
    if (*v == "true" || *v == "yes" || *v == "on" || *v == "1") return true;
    if (*v == "false" || *v == "no" || *v == "off" || *v == "0") return false;
    fail(key, "expected true or false");
  }

  // One of a fixed set of words.
  std::string get_choice(const std::string& key, const std::string& fallback,
                         std::initializer_list<std::string_view> choices) const {
    const std::string value = get_string(key, fallback);
    for (std::string_view c : choices)
      if (value == c) return value;
    std::string list;
    for (std::string_view c : choices) list += (list.empty() ? "" : " | ") + std::string(c);
    fail(key, "expected one of " + list);
  }

  // A list separated by spaces or commas: "20 40 60" or "20,40,60".
  std::vector<double> get_doubles(const std::string& key, const std::vector<double>& fallback) const {
    const std::string* v = find(key);
    if (!v) return fallback;
    std::vector<double> out;
    for (const std::string& word : split_list(*v)) out.push_back(parse_double(key, word, *v));
    return out;
  }
  std::vector<std::int64_t> get_ints(const std::string& key, const std::vector<std::int64_t>& fallback) const {
    const std::string* v = find(key);
    if (!v) return fallback;
    std::vector<std::int64_t> out;
    for (const std::string& word : split_list(*v)) out.push_back(parse_int(key, word, *v));
    return out;
  }

  // Keys present in the section that nothing has asked for.
  std::vector<std::string> unread_keys() const {
    std::vector<std::string> out;
    for (const auto& [key, value] : values_)
      if (!read_.count(key)) out.push_back(key);
    return out;
  }

  // Throws an Error that names where the value came from: "FILE: [section] key = 'value': why".
  [[noreturn]] void fail(const std::string& key, const std::string& why) const {
    auto it = values_.find(key);
    std::string msg = source_.empty() ? std::string() : source_ + ": ";
    msg += "[" + section_ + "] " + key;
    if (it != values_.end()) msg += " = '" + it->second + "'";
    throw Error(msg + ": " + why);
  }

  static std::vector<std::string> split_list(const std::string& text) {
    std::vector<std::string> out;
    std::string word;
    for (char c : text) {
      if (c == ',' || c == ' ' || c == '\t') {
        if (!word.empty()) out.push_back(word);
        word.clear();
      } else {
        word += c;
      }
    }
    if (!word.empty()) out.push_back(word);
    return out;
  }

 private:
  const std::string* find(const std::string& key) const {
    read_.insert(key);
    auto it = values_.find(key);
    return it == values_.end() ? nullptr : &it->second;
  }

  double parse_double(const std::string& key, const std::string& word, const std::string& = {}) const {
    errno = 0;
    char* end = nullptr;
    const double v = std::strtod(word.c_str(), &end);
    if (word.empty() || *end != '\0' || errno == ERANGE) fail(key, "'" + word + "' is not a number");
    return v;
  }
  std::int64_t parse_int(const std::string& key, const std::string& word, const std::string& = {}) const {
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(word.c_str(), &end, 10);
    if (word.empty() || *end != '\0' || errno == ERANGE) fail(key, "'" + word + "' is not an integer");
    return v;
  }

  std::string section_;
  std::string source_;
  std::map<std::string, std::string> values_;
  mutable std::set<std::string> read_;
};

}  // namespace lminv
