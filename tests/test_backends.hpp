// The backend plugins a test loads by name: those built here, as CMake's lminv_test_backends() passes them in
// LMINV_TEST_BACKENDS ("reference;torch;onednn", the optional ones only where their libraries were found).
#pragma once

#include <string>
#include <vector>

namespace lminv::test {

inline std::vector<std::string> backends_under_test() {
#ifdef LMINV_TEST_BACKENDS
  const std::string list = LMINV_TEST_BACKENDS;
#else
  const std::string list = "reference";
#endif
  std::vector<std::string> names;
  std::string word;
  for (char c : list + ";") {
    if (c == ';') {
      if (!word.empty()) names.push_back(word);
      word.clear();
    } else {
      word += c;
    }
  }
  return names;
}

}  // namespace lminv::test
