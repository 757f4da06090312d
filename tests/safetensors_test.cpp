// safetensors: round trips, the writer's exact layout, F16 widening, every malformed file, atomic replacement.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "lminv/error.hpp"
#include "lminv/rng.hpp"
#include "safetensors.hpp"

namespace lminv {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lminv-safetensors-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

std::string slurp(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void spit(const fs::path& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string u64le(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

template <class T>
std::string raw_bytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// A file with exactly this header text (no padding added) and data.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return u64le(header.size()) + header + data;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);  // an empty tensor may have no storage
}

Tensor random_tensor(DType dtype, Shape shape, std::uint64_t seed) {
  Tensor t(dtype, std::move(shape));
  Rng rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, rng.normal());
  return t;
}

// The call throws an lminv::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& call, std::initializer_list<std::string> parts) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one mentioning " << *parts.begin();
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
  }
}

std::vector<std::string> folder_listing(const fs::path& folder) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(folder)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// ---- round trips -----------------------------------------------------------------------------------------------

TEST(Safetensors, RoundTripIsBitIdentical) {
  TempDir dir;
  std::map<std::string, Tensor> tensors;
  tensors["a.f32"] = random_tensor(DType::f32, {3, 4}, 1);
  tensors["b.f64"] = random_tensor(DType::f64, {5}, 2);
  tensors["c.bf16"] = random_tensor(DType::bf16, {2, 3, 2}, 3);
  tensors["scalar"] = Tensor::from<float>({}, {42.5f});
  tensors["empty"] = Tensor(DType::f32, {0, 3});
  // Special values survive bit for bit.
  std::vector<float> special = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, -3.4028235e38f};
  std::uint32_t payload_nan = 0x7fc12345u;
  float payload = 0;
  std::memcpy(&payload, &payload_nan, 4);
  special.push_back(payload);
  tensors["special"] = Tensor::from<float>({8}, special);
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "grüße \"quoted\""}};

  const fs::path file = dir / "model.safetensors";
  write_safetensors(file, tensors, metadata);
  std::map<std::string, std::string> read_metadata;
  const WeightSet back = read_safetensors(file, &read_metadata);
  EXPECT_EQ(read_metadata, metadata);
  ASSERT_EQ(back.tensors().size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    ASSERT_TRUE(back.contains(name)) << name;
    EXPECT_TRUE(same_bytes(back.get(name), tensor)) << name;
  }
  // No temporary file is left behind.
  EXPECT_EQ(folder_listing(dir.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(Safetensors, ReadWithoutMetadataAndOverwrite) {
  TempDir dir;
  const fs::path file = dir / "x.safetensors";
  write_safetensors(file, {{"w", random_tensor(DType::f32, {4}, 7)}});
  std::map<std::string, std::string> metadata{{"stale", "value"}};
  read_safetensors(file, &metadata);
  EXPECT_TRUE(metadata.empty());
  // Writing again replaces the file.
  const Tensor other = random_tensor(DType::f64, {2, 2}, 8);
  write_safetensors(file, {{"v", other}});
  const WeightSet back = read_safetensors(file);
  EXPECT_EQ(back.names(), std::vector<std::string>{"v"});
  EXPECT_TRUE(same_bytes(back.get("v"), other));
  EXPECT_EQ(folder_listing(dir.path()), std::vector<std::string>{"x.safetensors"});
}

// ---- the writer's layout, pinned against the reference implementation's own tests ------------------------------

TEST(Safetensors, WriterMatchesReferenceLayout) {
  TempDir dir;
  const std::string floats = raw_bytes(std::vector<float>{0, 1, 2, 3, 4, 5});
  {
    // 64 header bytes: already a multiple of 8, no padding.
    write_safetensors(dir / "a", {{"attn.0", Tensor::from<float>({1, 2, 3}, {0, 1, 2, 3, 4, 5})}});
    const std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
    ASSERT_EQ(header.size(), 64u);
    EXPECT_EQ(slurp(dir / "a"), u64le(64) + header + floats);
  }
  {
    // 65 bytes of JSON padded with 7 spaces to 72.
    write_safetensors(dir / "b", {{"attn0", Tensor::from<float>({1, 1, 2, 3}, {0, 1, 2, 3, 4, 5})}});
    const std::string header = R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})";
    ASSERT_EQ(header.size(), 65u);
    EXPECT_EQ(slurp(dir / "b"), u64le(72) + header + std::string(7, ' ') + floats);
  }
  {
    write_safetensors(dir / "c", {});
    EXPECT_EQ(slurp(dir / "c"), u64le(8) + "{}" + std::string(6, ' '));
  }
  {
    write_safetensors(dir / "d", {}, {{"framework", "pt"}});
    EXPECT_EQ(slurp(dir / "d"), u64le(40) + R"({"__metadata__":{"framework":"pt"}})" + std::string(5, ' '));
  }
}

TEST(Safetensors, WriterOrdersDataByDtypeThenNameAndAligns) {
  TempDir dir;
  const Tensor a = Tensor::from<bf16>({3}, {bf16::from_float(1), bf16::from_float(2), bf16::from_float(3)});
  const Tensor a2 = Tensor::from<float>({1}, {7});
  const Tensor b = Tensor::from<float>({2}, {8, 9});
  const Tensor c = Tensor::from<double>({1}, {10});
  write_safetensors(dir / "f", {{"a", a}, {"a2", a2}, {"b", b}, {"c", c}}, {{"format", "pt"}});
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("c":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
      R"("a2":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},)"
      R"("a":{"dtype":"BF16","shape":[3],"data_offsets":[20,26]}})";
  const std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  const std::string data = raw_bytes(std::vector<double>{10}) + raw_bytes(std::vector<float>{7, 8, 9}) +
                           std::string(static_cast<const char*>(a.raw()), a.nbytes());
  EXPECT_EQ(slurp(dir / "f"), u64le(padded.size()) + padded + data);

  // Every tensor starts at a file offset that is a multiple of its element size.
  const SafetensorsFile st(dir / "f");
  for (const auto& [name, entry] : st.entries())
    EXPECT_EQ((8 + padded.size() + entry.begin) % (entry.dtype == "F64" ? 8 : entry.dtype == "F32" ? 4 : 2), 0u)
        << name;
}

// ---- F16 ---------------------------------------------------------------------------------------------------------

TEST(Safetensors, ReadsF16AsExactF32) {
  TempDir dir;
  struct Case {
    std::uint16_t half;
    std::uint32_t float_bits;
  };
  auto bits = [](float f) {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, 4);
    return u;
  };
  const std::vector<Case> cases = {
      {0x0000, bits(0.0f)},
      {0x8000, bits(-0.0f)},
      {0x0001, bits(std::ldexp(1.0f, -24))},          // smallest subnormal
      {0x8001, bits(-std::ldexp(1.0f, -24))},
      {0x0200, bits(std::ldexp(1.0f, -15))},          // a subnormal with one bit
      {0x03ff, bits(1023.0f * std::ldexp(1.0f, -24))},  // largest subnormal
      {0x0400, bits(std::ldexp(1.0f, -14))},          // smallest normal
      {0x3c00, bits(1.0f)},
      {0xc000, bits(-2.0f)},
      {0x3555, bits(0.333251953125f)},
      {0x3c01, bits(1.0f + std::ldexp(1.0f, -10))},
      {0x7bff, bits(65504.0f)},  // largest finite
      {0x7c00, bits(INFINITY)},
      {0xfc00, bits(-INFINITY)},
      {0x7e00, 0x7fc00000u},  // quiet NaN
      {0x7c01, 0x7f802000u},  // NaN with a payload, kept
      {0xfe01, 0xffc02000u},
  };
  std::vector<std::uint16_t> halves;
  for (const Case& c : cases) halves.push_back(c.half);
  const std::string header = R"({"h":{"dtype":"F16","shape":[)" + std::to_string(halves.size()) +
                             R"(],"data_offsets":[0,)" + std::to_string(2 * halves.size()) + "]}}";
  spit(dir / "f16", safetensors_bytes(header, raw_bytes(halves)));

  const WeightSet w = read_safetensors(dir / "f16");
  const Tensor& t = w.get("h");
  ASSERT_EQ(t.dtype(), DType::f32);
  ASSERT_EQ(t.shape(), (Shape{static_cast<std::int64_t>(cases.size())}));
  for (std::size_t i = 0; i < cases.size(); ++i) {
    std::uint32_t got = 0;
    std::memcpy(&got, &t.data<float>()[i], 4);
    EXPECT_EQ(got, cases[i].float_bits) << "half 0x" << std::hex << cases[i].half;
  }
  EXPECT_TRUE(std::isnan(t.data<float>()[14]));
  EXPECT_EQ(SafetensorsFile(dir / "f16").entry("h").dtype, "F16");
}

TEST(Safetensors, EveryHalfWidensExactly) {
  // All 65536 halves: the widened float rounds back to the same half (checked through the value's exact parts).
  TempDir dir;
  std::vector<std::uint16_t> halves(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) halves[i] = static_cast<std::uint16_t>(i);
  spit(dir / "all", safetensors_bytes(R"({"h":{"dtype":"F16","shape":[65536],"data_offsets":[0,131072]}})",
                                      raw_bytes(halves)));
  const Tensor t = read_safetensors(dir / "all").get("h");
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const float f = t.data<float>()[i];
    const bool negative = (i & 0x8000u) != 0;
    const std::uint32_t e = (i >> 10) & 0x1f, m = i & 0x3ff;
    if (e == 0x1f) {
      ASSERT_TRUE(m ? std::isnan(f) : std::isinf(f)) << i;
    } else {
      const double expected = (e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), int(e) - 25));
      ASSERT_EQ(double(f), negative ? -expected : expected) << i;
    }
    ASSERT_EQ(std::signbit(f), negative) << i;
  }
}

// ---- malformed files -----------------------------------------------------------------------------------------

struct BadCase {
  std::string what;
  std::string bytes;
  std::vector<std::string> message;  // besides the file's path
};

std::string one_tensor(const std::string& entry, std::size_t data_bytes) {
  return safetensors_bytes(R"({"x":)" + entry + "}", std::string(data_bytes, '\x01'));
}

TEST(Safetensors, MalformedFilesAreErrorsNamingFileAndProblem) {
  TempDir dir;
  const std::vector<BadCase> cases = {
      {"empty", "", {"0 bytes", "shorter than the 8-byte header length"}},
      {"short", "abcde", {"5 bytes", "shorter than the 8-byte"}},
      {"length past end", u64le(1000) + "{}", {"header length 1000 runs past the end of the file (10 bytes)"}},
      {"huge length", u64le(~std::uint64_t{0}) + "{}", {"runs past the end of the file"}},
      {"not json", safetensors_bytes("{not json", ""), {"header is not valid JSON"}},
      {"truncated json", safetensors_bytes(R"({"x":{"dtype":"F32")", ""), {"header is not valid JSON"}},
      {"not an object", safetensors_bytes("[1, 2]", ""), {"header is a JSON array, not an object"}},
      {"repeated name",
       safetensors_bytes(R"({"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                         R"("x":{"dtype":"F32","shape":[],"data_offsets":[4,8]}})",
                         std::string(8, '\0')),
       {"header names 'x' twice"}},
      {"entry not object", one_tensor("[1]", 0), {"tensor 'x'", "entry is not an object"}},
      {"no dtype", one_tensor(R"({"shape":[1],"data_offsets":[0,4]})", 4), {"tensor 'x'", "no dtype"}},
      {"unknown dtype", one_tensor(R"({"dtype":"I64","shape":[1],"data_offsets":[0,8]})", 8),
       {"tensor 'x'", "dtype 'I64'", "F32, F64, BF16, F16"}},
      {"made-up dtype", one_tensor(R"({"dtype":"Q4_K","shape":[1],"data_offsets":[0,8]})", 8), {"dtype 'Q4_K'"}},
      {"no shape", one_tensor(R"({"dtype":"F32","data_offsets":[0,4]})", 4), {"tensor 'x'", "no shape"}},
      {"negative dim", one_tensor(R"({"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]})", 4),
       {"tensor 'x'", "shape [2,-1] is not a list of non-negative integers"}},
      {"fractional dim", one_tensor(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,4]})", 4),
       {"shape [2.5] is not a list"}},
      {"shape not list", one_tensor(R"({"dtype":"F32","shape":3,"data_offsets":[0,12]})", 12),
       {"shape 3 is not a list"}},
      {"string dim", one_tensor(R"({"dtype":"F32","shape":["3"],"data_offsets":[0,12]})", 12),
       {"is not a list of non-negative integers"}},
      {"overflowing shape",
       one_tensor(R"({"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]})", 4),
       {"tensor 'x'", "is too large"}},
      {"no offsets", one_tensor(R"({"dtype":"F32","shape":[1]})", 4), {"tensor 'x'", "no data_offsets"}},
      {"begin after end", one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[8,4]})", 8),
       {"tensor 'x'", "data_offsets [8,4] is not [begin, end]"}},
      {"one offset", one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[4]})", 8),
       {"data_offsets [4] is not [begin, end]"}},
      {"negative offset", one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})", 8),
       {"data_offsets [-4,0] is not [begin, end]"}},
      {"offsets past data", one_tensor(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 6),
       {"tensor 'x'", "data_offsets [0,8] run past the end of the data (6 bytes)"}},
      {"size mismatch", one_tensor(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})", 12),
       {"tensor 'x'", "hold 8 bytes, but shape [3] of F32 needs 12"}},
      {"overlap",
       safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, '\0')),
       {"tensors 'a' and 'b' overlap", "[0, 8) and [4, 12)"}},
      {"metadata not object", safetensors_bytes(R"({"__metadata__":[1]})", ""), {"__metadata__ is not an object"}},
      {"metadata value not string", safetensors_bytes(R"({"__metadata__":{"n":3}})", ""),
       {"__metadata__ value of 'n' is not a string but 3"}},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    const fs::path file = dir / "bad.safetensors";
    spit(file, c.bytes);
    try {
      std::map<std::string, std::string> metadata{{"untouched", "yes"}};
      read_safetensors(file, &metadata);
      ADD_FAILURE() << "read without error";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(file.string() + ": ", 0), 0u) << message;
      for (const std::string& part : c.message) EXPECT_NE(message.find(part), std::string::npos) << message;
    }
  }
}

TEST(Safetensors, NothingIsReturnedFromABadFile) {
  TempDir dir;
  // The first tensor is fine, the second is not: the read fails as a whole and the metadata is left alone.
  spit(dir / "f", safetensors_bytes(R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                    R"("b":{"dtype":"I8","shape":[1],"data_offsets":[4,5]}})",
                                    std::string(5, '\0')));
  std::map<std::string, std::string> metadata{{"untouched", "yes"}};
  EXPECT_THROW(read_safetensors(dir / "f", &metadata), Error);
  EXPECT_EQ(metadata, (std::map<std::string, std::string>{{"untouched", "yes"}}));
  EXPECT_THROW(SafetensorsFile(dir / "f"), Error);
}

TEST(Safetensors, MissingFileIsAnErrorNamingIt) {
  TempDir dir;
  expect_error([&] { read_safetensors(dir / "nope.safetensors"); },
               {(dir / "nope.safetensors").string(), "cannot open", "No such file"});
  expect_error([&] { read_safetensors(dir.path()); }, {dir.path().string(), "not a regular file"});
}

TEST(Safetensors, HolesBetweenTensorsAreAllowed) {
  TempDir dir;
  std::string data = raw_bytes(std::vector<float>{1, 2}) + std::string(4, '\x7f') + raw_bytes(std::vector<float>{3});
  spit(dir / "f", safetensors_bytes(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
                                    R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                    R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                    data));
  const WeightSet w = read_safetensors(dir / "f");
  EXPECT_TRUE(same_bytes(w.get("a"), Tensor::from<float>({2}, {1, 2})));
  EXPECT_TRUE(same_bytes(w.get("b"), Tensor::from<float>({1}, {3})));
  EXPECT_EQ(w.get("z").shape(), (Shape{0}));
}

TEST(Safetensors, FileViewGivesEntriesAndStoredBytes) {
  TempDir dir;
  const Tensor t = random_tensor(DType::bf16, {2, 5}, 4);
  write_safetensors(dir / "f", {{"t", t}}, {{"a", "b"}});
  SafetensorsFile st(dir / "f");
  EXPECT_EQ(st.path(), dir / "f");
  ASSERT_TRUE(st.contains("t"));
  EXPECT_FALSE(st.contains("u"));
  EXPECT_EQ(st.entry("t").dtype, "BF16");
  EXPECT_EQ(st.entry("t").type, DType::bf16);
  EXPECT_EQ(st.entry("t").shape, (Shape{2, 5}));
  EXPECT_EQ(st.bytes("t"), std::string(static_cast<const char*>(t.raw()), t.nbytes()));
  EXPECT_EQ(st.metadata().at("a"), "b");
  expect_error([&] { st.entry("u"); }, {(dir / "f").string(), "no tensor named 'u'"});
  // Moving keeps the mapping valid.
  SafetensorsFile moved = std::move(st);
  EXPECT_TRUE(same_bytes(moved.read("t"), t));
}

TEST(Safetensors, ReadManyInThreadsEqualsOneByOne) {
  TempDir dir;
  std::map<std::string, Tensor> tensors;
  for (int i = 0; i < 23; ++i)
    tensors["t" + std::to_string(i)] = random_tensor(i % 3 ? DType::f32 : DType::f64, {i + 1, 3 * i % 7 + 1}, i);
  write_safetensors(dir / "f", tensors);
  const SafetensorsFile st(dir / "f");
  const std::vector<std::string> names = {"t5", "t0", "t22", "t13", "t5"};
  for (int threads : {0, 1, 3, 16}) {
    const std::vector<Tensor> got = st.read_many(names, threads);
    ASSERT_EQ(got.size(), names.size());
    for (std::size_t i = 0; i < names.size(); ++i) EXPECT_TRUE(same_bytes(got[i], tensors.at(names[i]))) << threads;
  }
  EXPECT_TRUE(st.read_many({}).empty());
  expect_error([&] { st.read_many({"t1", "nope"}); }, {(dir / "f").string(), "no tensor named 'nope'"});
}

TEST(Safetensors, FileShrunkAfterOpeningIsAnError) {
  TempDir dir;
  write_safetensors(dir / "f", {{"a", random_tensor(DType::f32, {1000}, 1)}, {"b", random_tensor(DType::f32, {10}, 2)}});
  const SafetensorsFile st(dir / "f");
  fs::resize_file(dir / "f", fs::file_size(dir / "f") - 2000);
  expect_error([&] { st.read("a"); }, {(dir / "f").string(), "cannot read tensor 'a'"});
}

// ---- failed writes ---------------------------------------------------------------------------------------------

TEST(Safetensors, FailedWriteLeavesTheExistingFileWhole) {
  TempDir dir;
  const fs::path file = dir / "model.safetensors";
  write_safetensors(file, {{"old", random_tensor(DType::f32, {16}, 5)}});
  const std::string before = slurp(file);

  // 1. A tensor named like the metadata key: refused before anything is written.
  expect_error([&] { write_safetensors(file, {{"__metadata__", Tensor(DType::f32, {1})}}); },
               {file.string(), "__metadata__"});
  EXPECT_EQ(slurp(file), before);

  // 2. The disk "fills up" half-way: a file-size limit makes the write fail with EFBIG.
  struct rlimit old_limit {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct sigaction ignore {}, old_action {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &old_action), 0);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    write_safetensors(file, {{"big", random_tensor(DType::f64, {4096}, 6)}});
  } catch (const Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::sigaction(SIGXFSZ, &old_action, nullptr);
  EXPECT_NE(message.find("cannot write"), std::string::npos) << message;
  EXPECT_NE(message.find(file.string() + ".tmp."), std::string::npos) << message;
  EXPECT_EQ(slurp(file), before);
  EXPECT_EQ(folder_listing(dir.path()), std::vector<std::string>{"model.safetensors"});

  // 3. A folder that cannot exist (its parent is a file).
  expect_error([&] { write_safetensors(file / "inside", {{"x", Tensor(DType::f32, {1})}}); },
               {(file / "inside").string(), "cannot create the temporary file"});
  EXPECT_EQ(slurp(file), before);

  // 4. The target is a folder: the rename fails, the temporary file is removed.
  fs::create_directories(dir / "folder" / "child");
  expect_error([&] { write_safetensors(dir / "folder", {{"x", Tensor(DType::f32, {1})}}); },
               {(dir / "folder").string(), "cannot replace"});
  EXPECT_EQ(folder_listing(dir.path()), (std::vector<std::string>{"folder", "model.safetensors"}));
  EXPECT_EQ(slurp(file), before);
}

}  // namespace
}  // namespace lminv
