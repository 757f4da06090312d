// Captured states (host/states.hpp) and the NumPy reader under them (host/npy.hpp): the fixtures NumPy and
// tests/tools/capture_states.py wrote (tests/data/states), and every malformed file, built here byte by byte.
#include "states.hpp"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lminv/error.hpp"
#include "npy.hpp"
#include "safetensors.hpp"

namespace lminv {
namespace {

namespace fs = std::filesystem;

const fs::path kData = fs::path(LMINV_TEST_DATA_DIR) / "states";

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lminv-states-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
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

// The fixtures' values: v[t, j] = (D t + j - 7) / 8 + offset (capture_states.py's fixture_values).
double fixture_value(std::int64_t t, std::int64_t j, std::int64_t D = 5, double offset = 0) {
  return static_cast<double>(D * t + j - 7) / 8 + offset;
}

void expect_fixture_values(const Tensor& t, std::int64_t T = 3, std::int64_t D = 5, double offset = 0) {
  ASSERT_EQ(t.shape(), (Shape{T, D}));
  for (std::int64_t i = 0; i < T; ++i)
    for (std::int64_t j = 0; j < D; ++j) EXPECT_EQ(t.get(i * D + j), fixture_value(i, j, D, offset)) << i << "," << j;
}

// A .npy image with exactly this header text (no padding added) and data.
std::string npy_bytes(const std::string& header, const std::string& data, int major = 1) {
  std::string s = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  const std::size_t n = header.size();
  if (major == 1) {
    s += static_cast<char>(n & 0xff);
    s += static_cast<char>((n >> 8) & 0xff);
  } else {
    for (int i = 0; i < 4; ++i) s += static_cast<char>((n >> (8 * i)) & 0xff);
  }
  return s + header + data;
}

std::string float_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::string f4_header(const std::string& shape) {
  return "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }\n";
}

// ---- a minimal stored zip, to put malformed .npy members inside a well-formed archive -----------------------------

std::uint32_t crc32(const std::string& bytes) {
  std::uint32_t crc = 0xffffffffu;
  for (unsigned char c : bytes) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void put16(std::string& s, std::uint32_t v) {
  s += static_cast<char>(v & 0xff);
  s += static_cast<char>((v >> 8) & 0xff);
}
void put32(std::string& s, std::uint32_t v) {
  put16(s, v & 0xffff);
  put16(s, v >> 16);
}

// A zip archive of stored (uncompressed) members, as zip's APPNOTE lays it out.
std::string stored_zip(const std::vector<std::pair<std::string, std::string>>& members) {
  std::string body, central;
  for (const auto& [name, data] : members) {
    const auto offset = static_cast<std::uint32_t>(body.size());
    const std::uint32_t crc = crc32(data);
    auto common = [&](std::string& s) {
      put16(s, 20);    // version needed
      put16(s, 0);     // flags
      put16(s, 0);     // stored
      put16(s, 0);     // time
      put16(s, 0x21);  // date 1980-01-01
      put32(s, crc);
      put32(s, static_cast<std::uint32_t>(data.size()));
      put32(s, static_cast<std::uint32_t>(data.size()));
      put16(s, static_cast<std::uint32_t>(name.size()));
      put16(s, 0);  // extra length
    };
    put32(body, 0x04034b50u);
    common(body);
    body += name + data;
    put32(central, 0x02014b50u);
    put16(central, 20);  // version made by
    common(central);
    put16(central, 0);  // comment length
    put16(central, 0);  // disk
    put16(central, 0);  // internal attributes
    put32(central, 0);  // external attributes
    put32(central, offset);
    central += name;
  }
  std::string end;
  put32(end, 0x06054b50u);
  put16(end, 0);
  put16(end, 0);
  put16(end, static_cast<std::uint32_t>(members.size()));
  put16(end, static_cast<std::uint32_t>(members.size()));
  put32(end, static_cast<std::uint32_t>(central.size()));
  put32(end, static_cast<std::uint32_t>(body.size()));
  put16(end, 0);
  return body + central + end;
}

// ---- .npy ---------------------------------------------------------------------------------------------------------

TEST(Npy, HeaderVersionsAndDtypes) {
  const NpyArray v1 = read_npy(kData / "v1-f4.npy");
  EXPECT_EQ(v1.major_version, 1);
  EXPECT_EQ(v1.descr, "<f4");
  EXPECT_EQ(v1.stored_dtype, "F32");
  EXPECT_EQ(v1.values.dtype(), DType::f32);
  expect_fixture_values(v1.values);

  const NpyArray v2 = read_npy(kData / "v2-f8.npy");
  EXPECT_EQ(v2.major_version, 2);
  EXPECT_EQ(v2.stored_dtype, "F64");
  EXPECT_EQ(v2.values.dtype(), DType::f64);
  expect_fixture_values(v2.values);

  const NpyArray v3 = read_npy(kData / "v3-f2.npy");
  EXPECT_EQ(v3.major_version, 3);
  EXPECT_EQ(v3.descr, "<f2");
  EXPECT_EQ(v3.stored_dtype, "F16");
  EXPECT_EQ(v3.values.dtype(), DType::f32);
  expect_fixture_values(v3.values);
}

TEST(Npy, BigEndian) {
  for (const char* name : {"be-f2.npy", "be-f4.npy", "be-f8.npy"}) {
    SCOPED_TRACE(name);
    const NpyArray a = read_npy(kData / name);
    EXPECT_EQ(a.descr[0], '>');
    expect_fixture_values(a.values);
  }
  EXPECT_EQ(read_npy(kData / "be-f8.npy").values.dtype(), DType::f64);
}

TEST(Npy, FortranOrderIsTransposedToRowMajor) {
  const NpyArray a = read_npy(kData / "fortran-f4.npy");
  EXPECT_TRUE(a.fortran_order);
  expect_fixture_values(a.values);
  // np.asfortranarray(np.arange(24).reshape(2, 3, 4)): row-major element k is k again.
  const NpyArray b = read_npy(kData / "fortran-3d-f8.npy");
  EXPECT_TRUE(b.fortran_order);
  ASSERT_EQ(b.values.shape(), (Shape{2, 3, 4}));
  for (std::int64_t k = 0; k < 24; ++k) EXPECT_EQ(b.values.get(k), static_cast<double>(k)) << k;
  // The raw bytes are in Fortran order: element (i, j) of a [2, 3] array at offset i + 2 j.
  const std::string header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
  const NpyArray c = parse_npy(npy_bytes(header, float_bytes({0, 3, 1, 4, 2, 5})), "mem");
  for (std::int64_t k = 0; k < 6; ++k) EXPECT_EQ(c.values.get(k), static_cast<double>(k)) << k;
}

TEST(Npy, HalfWideningIsExact) {
  const NpyArray a = read_npy(kData / "half-special.npy");
  ASSERT_EQ(a.values.shape(), (Shape{1, 4}));
  const float* v = a.values.data<float>();
  EXPECT_EQ(v[0], 65504.0f);
  EXPECT_EQ(v[1], 0x1p-24f);  // the smallest subnormal half
  EXPECT_EQ(v[2], 0.0f);
  EXPECT_TRUE(std::signbit(v[2]));
  EXPECT_EQ(v[3], 0.333251953125f);  // 1/3 rounded to half: 0x3555
}

TEST(Npy, HeaderLiteralForms) {
  // Python 2 long suffixes, extra spaces, double quotes, keys in another order, no trailing comma.
  const std::string header = "{ \"shape\" : (2L, 1L) , 'fortran_order':False,'descr':\"<f4\"}";
  const NpyArray a = parse_npy(npy_bytes(header, float_bytes({1.5f, -2})), "mem");
  ASSERT_EQ(a.values.shape(), (Shape{2, 1}));
  EXPECT_EQ(a.values.get(1), -2.0);
  // A scalar (shape ()) and an empty array.
  EXPECT_EQ(parse_npy(npy_bytes(f4_header("()"), float_bytes({7})), "mem").values.get(0), 7.0);
  EXPECT_EQ(parse_npy(npy_bytes(f4_header("(0, 5)"), ""), "mem").values.shape(), (Shape{0, 5}));
  // Native byte order '='.
  const std::string native = "{'descr': '=f4', 'fortran_order': False, 'shape': (1,), }";
  EXPECT_EQ(parse_npy(npy_bytes(native, float_bytes({3})), "mem").values.get(0), 3.0);
}

TEST(Npy, RefusesOtherDtypesNamingThem) {
  expect_error([] { read_npy(kData / "int.npy"); }, {(kData / "int.npy").string(), "'<i8'", "signed integers"});
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"<c8", "complex"},         {"|O", "Python objects"}, {"|b1", "booleans"},      {"<u2", "unsigned integers"},
      {"<U3", "unicode strings"}, {"<f16", "'<f16'"},       {"<M8[ns]", "datetimes"}, {"|f4", "byte order '|'"}};
  for (const auto& [descr, words] : cases) {
    SCOPED_TRACE(descr);
    const std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (1,), }";
    expect_error([&] { parse_npy(npy_bytes(header, std::string(16, '\0')), "img"); }, {"img: ", words});
  }
  const std::string structured = "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (1,), }";
  expect_error([&] { parse_npy(npy_bytes(structured, std::string(8, '\0')), "img"); }, {"structured dtype"});
}

TEST(Npy, MalformedImages) {
  const std::string good = npy_bytes(f4_header("(2, 2)"), float_bytes({1, 2, 3, 4}));
  ASSERT_EQ(parse_npy(good, "img").values.get(3), 4.0);
  auto fails = [](const std::string& bytes, std::initializer_list<std::string> parts) {
    expect_error([&] { parse_npy(bytes, "img"); }, parts);
  };
  fails("", {"img: truncated .npy"});
  fails("\x93NUM", {"truncated .npy"});
  fails("PK\x03\x04 not numpy at all", {"bad magic"});
  fails(good.substr(0, 9), {"truncated .npy", "length field"});
  fails(good.substr(0, 40), {"truncated .npy", "the header needs"});
  fails(good.substr(0, good.size() - 1), {"truncated .npy", "data shorter than the shape says", "needs 16"});
  fails(good + "xx", {"2 trailing bytes"});
  fails(npy_bytes(f4_header("(2, 2)"), float_bytes({1, 2, 3, 4}), 4), {"format version 4.0"});
  fails(npy_bytes("[1, 2]", ""), {"is not a dict"});
  fails(npy_bytes("{'descr': '<f4', 'shape': (1,)}", "xxxx"), {"no 'fortran_order'"});
  fails(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}", "xxxx"),
        {"unexpected key 'extra'"});
  fails(npy_bytes("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", "xxxx"),
        {"'descr' appears twice"});
  fails(npy_bytes("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}", "xxxx"), {"fortran_order 0"});
  fails(npy_bytes(f4_header("[2, 2]"), float_bytes({1, 2, 3, 4})), {"shape [2, 2] is not a tuple"});
  fails(npy_bytes(f4_header("(4)"), float_bytes({1, 2, 3, 4})), {"shape (4) is not a tuple"});
  fails(npy_bytes(f4_header("(2, -2)"), ""), {"negative dimension -2"});
  fails(npy_bytes(f4_header("(2, 2.0)"), ""), {"not an integer"});
  fails(npy_bytes(f4_header("(2, 'x')"), ""), {"not a tuple of integers"});
  fails(npy_bytes(f4_header("(99999999999999999999,)"), ""), {"does not fit 64 bits"});
  fails(npy_bytes(f4_header("(1099511627776, 1099511627776, 1099511627776)"), ""), {"too large", "overflows"});
  // 2^61 elements of 4 bytes: the element count fits, the byte size does not.
  fails(npy_bytes(f4_header("(2305843009213693952,)"), ""), {"overflows"});
  fails(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", "xxxx"), {"not a Python dict literal"});
  fails(npy_bytes("{'descr': '<f4 , 'fortran_order': False}", "xxxx"), {"not a Python dict literal"});
  fails(npy_bytes("{'descr': '<f4'} trailing", "xxxx"), {"after the header's dict"});
}

TEST(Npy, FilesNamedInErrors) {
  TempDir dir;
  const std::string good = slurp(kData / "v1-f4.npy");
  spit(dir / "cut.npy", good.substr(0, good.size() - 3));
  expect_error([&] { read_npy(dir / "cut.npy"); }, {(dir / "cut.npy").string(), "data shorter than the shape says"});
  expect_error([&] { read_npy(dir / "missing.npy"); }, {(dir / "missing.npy").string(), "does not exist"});
}

// ---- .npz ---------------------------------------------------------------------------------------------------------

TEST(Npz, StoredAndCompressedWithSeveralMembers) {
  for (const char* name : {"savez-stored.npz", "savez-compressed.npz"}) {
    SCOPED_TRACE(name);
    const NpzFile npz(kData / name);
    EXPECT_EQ(npz.names(), (std::vector<std::string>{"states", "other", "batch"}));
    EXPECT_TRUE(npz.contains("states"));
    EXPECT_TRUE(npz.contains("states.npy"));
    EXPECT_FALSE(npz.contains("output"));
    expect_fixture_values(npz.read("states").values);
    const NpyArray other = npz.read("other.npy");
    EXPECT_EQ(other.stored_dtype, "F64");
    ASSERT_EQ(other.values.shape(), (Shape{2, 2}));
    EXPECT_EQ(other.values.get(0), 1.0);
    EXPECT_EQ(other.values.get(1), 0.0);
    EXPECT_EQ(other.values.get(3), 1.0);
    const NpyArray batch = npz.read("batch");
    EXPECT_EQ(batch.stored_dtype, "F16");
    ASSERT_EQ(batch.values.shape(), (Shape{1, 3, 5}));
    expect_fixture_values(batch.values.reshape({3, 5}));
    expect_error([&] { npz.read("output"); },
                 {(kData / name).string(), "no array 'output'", "'states', 'other', 'batch'"});
  }
  const auto all = read_npz(kData / "savez-compressed.npz");
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2].first, "batch");
}

TEST(Npz, TruncatedArchives) {
  TempDir dir;
  for (const char* name : {"savez-stored.npz", "savez-compressed.npz"}) {
    const std::string bytes = slurp(kData / name);
    for (std::size_t keep : {bytes.size() - 10, bytes.size() / 2, std::size_t{3}, std::size_t{0}}) {
      SCOPED_TRACE(std::string(name) + " cut to " + std::to_string(keep));
      spit(dir / "cut.npz", bytes.substr(0, keep));
      expect_error([&] { NpzFile npz(dir / "cut.npz"); }, {(dir / "cut.npz").string(), "not a readable .npz"});
    }
  }
}

TEST(Npz, CrcMismatchAndDamagedStreams) {
  TempDir dir;
  // Stored: flip a byte of the first member's data (after its 128-byte .npy header): the data still decodes, and only
  // the CRC-32 can tell.
  std::string stored = slurp(kData / "savez-stored.npz");
  const std::size_t npy = stored.find("\x93NUMPY");
  ASSERT_NE(npy, std::string::npos);
  stored[npy + 128 + 5] ^= 0x40;
  spit(dir / "crc.npz", stored);
  const NpzFile npz(dir / "crc.npz");
  expect_error([&] { npz.read("states"); }, {(dir / "crc.npz").string(), "member 'states.npy'", "CRC"});
  EXPECT_NO_THROW(npz.read("other"));  // the other members are whole

  // Deflated: damage the middle of the first member's compressed stream.
  std::string compressed = slurp(kData / "savez-compressed.npz");
  const std::size_t name = compressed.find("states.npy");
  ASSERT_NE(name, std::string::npos);
  for (std::size_t k = 0; k < 8; ++k) compressed[name + 10 + 20 + 30 + k] ^= 0x5a;
  spit(dir / "inflate.npz", compressed);
  const NpzFile damaged(dir / "inflate.npz");
  expect_error([&] { damaged.read("states"); }, {(dir / "inflate.npz").string(), "member 'states.npy'"});
}

TEST(Npz, MalformedMembersAreNamed) {
  TempDir dir;
  const std::string good = npy_bytes(f4_header("(2, 2)"), float_bytes({1, 2, 3, 4}));
  spit(dir / "a.npz", stored_zip({{"ok.npy", good},
                                  {"short.npy", good.substr(0, good.size() - 4)},
                                  {"magic.npy", "not an npy"},
                                  {"int.npy", slurp(kData / "int.npy")},
                                  {"huge.npy", npy_bytes(f4_header("(1048576, 1048576)"), "")},
                                  {"overflow.npy", npy_bytes(f4_header("(1099511627776, 1099511627776)"), "")}}));
  const NpzFile npz(dir / "a.npz");
  EXPECT_EQ(npz.read("ok").values.get(2), 3.0);
  const std::string file = (dir / "a.npz").string();
  expect_error([&] { npz.read("short"); }, {file, "member 'short.npy'", "data shorter than the shape says"});
  expect_error([&] { npz.read("magic"); }, {file, "member 'magic.npy'", "bad magic"});
  expect_error([&] { npz.read("int"); }, {file, "member 'int.npy'", "'<i8'"});
  // 4 TiB announced, none there: refused from the zip directory's size, before anything is allocated.
  expect_error([&] { npz.read("huge"); }, {file, "member 'huge.npy'", "data shorter than the shape says"});
  expect_error([&] { npz.read("overflow"); }, {file, "member 'overflow.npy'", "overflows 64 bits"});
  expect_error([&] { npz.read("nope"); },
               {file, "no array 'nope'", "'ok', 'short', 'magic', 'int', 'huge', 'overflow'"});
}

// ---- read_states ----------------------------------------------------------------------------------------------------

TEST(States, SafetensorsDtypes) {
  const std::vector<std::tuple<std::string, std::string, double, DType>> cases = {
      {"f32.safetensors", "F32", 0x1p-24, DType::f32},
      {"f16.safetensors", "F16", 0x1p-11, DType::f32},
      {"bf16.safetensors", "BF16", 0x1p-8, DType::f32},
      {"f64.safetensors", "F64", 0x1p-53, DType::f64}};
  for (const auto& [file, stored, rounding, dtype] : cases) {
    SCOPED_TRACE(file);
    const CapturedStates s = read_states(kData / file);  // f32.safetensors also holds "input": "output" is chosen
    EXPECT_EQ(s.file, kData / file);
    EXPECT_EQ(s.name, "output");
    EXPECT_EQ(s.stored_dtype, stored);
    EXPECT_EQ(s.rounding, rounding);
    EXPECT_EQ(s.states.dtype(), dtype);
    expect_fixture_values(s.states);
    EXPECT_EQ(s.blocks, std::optional<std::int64_t>(2));
    EXPECT_EQ(s.head, std::optional<std::string>("none"));
    EXPECT_EQ(s.prompt_ids, (std::vector<std::int64_t>{464, 6766, 318}));
    EXPECT_EQ(s.metadata.at("model"), "gpt2");
    EXPECT_EQ(s.positions(), 3);
    EXPECT_EQ(s.width(), 5);
  }
  const CapturedStates batch = read_states(kData / "batch-f32.safetensors");
  expect_fixture_values(batch.states);
  EXPECT_EQ(stored_rounding("F16"), 0x1p-11);
  expect_error([] { stored_rounding("I8"); }, {"'I8'"});
}

TEST(States, NumPyFiles) {
  const CapturedStates a = read_states(kData / "v1-f4.npy");
  EXPECT_EQ(a.name, "");
  EXPECT_EQ(a.stored_dtype, "F32");
  EXPECT_TRUE(a.metadata.empty());
  EXPECT_FALSE(a.blocks);
  EXPECT_TRUE(a.prompt_ids.empty());
  expect_fixture_values(a.states);
  const CapturedStates f2 = read_states(kData / "v3-f2.npy");
  EXPECT_EQ(f2.stored_dtype, "F16");
  EXPECT_EQ(f2.rounding, 0x1p-11);
  expect_fixture_values(read_states(kData / "batch-f4.npy").states);
  expect_fixture_values(read_states(kData / "fortran-f4.npy").states);
  expect_fixture_values(read_states(kData / "be-f8.npy").states);
  expect_error([] { read_states(kData / "v1-f4.npy", "output"); }, {"v1-f4.npy", "one unnamed array"});
  expect_error([] { read_states(kData / "int.npy"); }, {"int.npy", "'<i8'"});
  expect_error([] { read_states(kData / "stack-f4.npy"); }, {"stack-f4.npy", "[2, 3, 5]", "holds 2 prompts"});

  const CapturedStates z = read_states(kData / "one-member.npz");
  EXPECT_EQ(z.name, "states");
  EXPECT_EQ(z.stored_dtype, "F64");
  expect_fixture_values(z.states);
  const CapturedStates b = read_states(kData / "savez-stored.npz", "batch");
  EXPECT_EQ(b.stored_dtype, "F16");
  expect_fixture_values(b.states);
  expect_error([] { read_states(kData / "savez-stored.npz"); },
               {"savez-stored.npz", "several arrays", "'states', 'other', 'batch'", "none is called 'output'"});
  expect_error([] { read_states(kData / "savez-stored.npz", "output"); },
               {"savez-stored.npz", "no array 'output'", "'states', 'other', 'batch'"});
}

TEST(States, FormatFromTheFirstBytesUnderAnotherExtension) {
  TempDir dir;
  fs::copy_file(kData / "v2-f8.npy", dir / "a.states");
  fs::copy_file(kData / "one-member.npz", dir / "b.bin");
  fs::copy_file(kData / "f64.safetensors", dir / "c");
  expect_fixture_values(read_states(dir / "a.states").states);
  EXPECT_EQ(read_states(dir / "b.bin").name, "states");
  EXPECT_EQ(read_states(dir / "c").stored_dtype, "F64");
  expect_error([&] { read_states(dir / "none.safetensors"); }, {(dir / "none.safetensors").string(), "does not exist"});
}

TEST(States, BadTensors) {
  TempDir dir;
  auto file_with = [&](const std::string& name, Tensor t, std::map<std::string, std::string> metadata = {}) {
    const fs::path file = dir / (name + ".safetensors");
    write_safetensors(file, {{"output", std::move(t)}}, metadata);
    return file;
  };
  auto zeros = [](Shape shape) { return Tensor(DType::f32, std::move(shape)); };
  const fs::path rank1 = file_with("rank1", zeros({5}));
  expect_error([&] { read_states(rank1); },
               {rank1.string(), "tensor 'output'", "[5]", "rank 1", "[T, D] or [1, T, D]"});
  const fs::path rank4 = file_with("rank4", zeros({1, 1, 3, 5}));
  expect_error([&] { read_states(rank4); }, {rank4.string(), "rank 4"});
  const fs::path batch2 = file_with("batch2", zeros({2, 3, 5}));
  expect_error([&] { read_states(batch2); }, {batch2.string(), "holds 2 prompts", "lminv sweep --states"});
  const fs::path empty = file_with("empty", zeros({0, 5}));
  expect_error([&] { read_states(empty); }, {empty.string(), "no positions (T = 0)"});
  const fs::path narrow = file_with("narrow", zeros({3, 0}));
  expect_error([&] { read_states(narrow); }, {narrow.string(), "no features (D = 0)"});

  Tensor nan = zeros({3, 5});
  nan.set(1 * 5 + 3, NAN);
  nan.set(2 * 5 + 0, INFINITY);
  const fs::path nan_file = file_with("nan", nan);
  expect_error([&] { read_states(nan_file); }, {nan_file.string(), "position t = 1, feature j = 3", "NaN"});
  Tensor inf(DType::f64, {2, 4});
  inf.set(7, -INFINITY);
  const fs::path inf_file = file_with("inf", inf);
  expect_error([&] { read_states(inf_file); }, {inf_file.string(), "t = 1, feature j = 3", "-Inf"});
  Tensor bf(DType::bf16, {2, 2});
  bf.set(2, INFINITY);
  const fs::path bf_file = file_with("bf", bf);
  expect_error([&] { read_states(bf_file); }, {bf_file.string(), "t = 1, feature j = 0", "+Inf"});
  // NaN in a .npy array too.
  spit(dir / "nan.npy", npy_bytes(f4_header("(1, 2)"), float_bytes({0, NAN})));
  expect_error([&] { read_states(dir / "nan.npy"); }, {(dir / "nan.npy").string(), "t = 0, feature j = 1", "NaN"});
  // A rank-0 array.
  spit(dir / "scalar.npy", npy_bytes(f4_header("()"), float_bytes({1})));
  expect_error([&] { read_states(dir / "scalar.npy"); }, {"scalar.npy", "rank 0"});
}

TEST(States, NamesChosenOrListed) {
  TempDir dir;
  const fs::path two = dir / "two.safetensors";
  write_safetensors(two, {{"a", Tensor(DType::f32, {2, 3})}, {"b", Tensor(DType::f32, {2, 3})}});
  expect_error([&] { read_states(two); }, {two.string(), "several tensors", "'a', 'b'"});
  EXPECT_EQ(read_states(two, "b").name, "b");
  expect_error([&] { read_states(kData / "f32.safetensors", "hidden"); },
               {"f32.safetensors", "no tensor 'hidden'", "'input', 'output'"});
  // The "input" tensor [3, 7] can be chosen by name.
  EXPECT_EQ(read_states(kData / "f32.safetensors", "input").width(), 7);
  const fs::path none = dir / "none.safetensors";
  write_safetensors(none, {}, {{"blocks", "1"}});
  expect_error([&] { read_states(none); }, {none.string(), "holds no tensors"});
}

TEST(States, TruncatedFiles) {
  TempDir dir;
  const std::string st = slurp(kData / "f32.safetensors");
  for (std::size_t keep : {st.size() - 1, std::size_t{100}, std::size_t{4}}) {
    SCOPED_TRACE(keep);
    spit(dir / "cut.safetensors", st.substr(0, keep));
    expect_error([&] { read_states(dir / "cut.safetensors"); }, {(dir / "cut.safetensors").string()});
  }
  const std::string npy = slurp(kData / "v2-f8.npy");
  spit(dir / "cut.npy", npy.substr(0, npy.size() - 8));
  expect_error([&] { read_states(dir / "cut.npy"); }, {(dir / "cut.npy").string(), "data shorter than the shape says"});
  const std::string npz = slurp(kData / "one-member.npz");
  spit(dir / "cut.npz", npz.substr(0, npz.size() - 40));
  expect_error([&] { read_states(dir / "cut.npz"); }, {(dir / "cut.npz").string(), "not a readable .npz"});
}

TEST(States, BadMetadata) {
  TempDir dir;
  auto with = [&](std::map<std::string, std::string> metadata) {
    const fs::path file = dir / "m.safetensors";
    write_safetensors(file, {{"output", Tensor(DType::f32, {3, 5})}}, metadata);
    return file;
  };
  expect_error([&] { read_states(with({{"blocks", "two"}})); }, {"m.safetensors", "'blocks' = 'two'"});
  expect_error([&] { read_states(with({{"blocks", "-1"}})); }, {"'blocks' = '-1'"});
  expect_error([&] { read_states(with({{"head", "top"}})); }, {"'head' = 'top'", "none, ln_f, lm_head or lm_head_no_ln_f"});
  expect_error([&] { read_states(with({{"prompt_ids", "[1, -2, 3]"}})); }, {"prompt_ids", "-2"});
  expect_error([&] { read_states(with({{"prompt_ids", "[1, 2"}})); }, {"prompt_ids", "not valid JSON"});
  expect_error([&] { read_states(with({{"prompt_ids", "{\"a\": 1}"}})); }, {"prompt_ids", "not a list"});
  expect_error([&] { read_states(with({{"prompt_ids", "[1, 2]"}})); }, {"has 2 ids", "3 positions"});
  EXPECT_EQ(read_states(with({{"prompt_ids", "[[1, 2, 3]]"}})).prompt_ids, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(read_states(with({{"blocks", "0"}, {"head", "lm_head"}})).blocks, std::optional<std::int64_t>(0));
}

// ---- read_states_set ------------------------------------------------------------------------------------------------

TEST(StatesSet, StackedTensor) {
  const auto set = read_states_set(kData / "set-stacked.safetensors");
  ASSERT_EQ(set.size(), 2u);
  EXPECT_EQ(set[0].name, "output[0]");
  EXPECT_EQ(set[1].name, "output[1]");
  expect_fixture_values(set[0].states);
  expect_fixture_values(set[1].states, 3, 5, 1);
  EXPECT_EQ(set[0].prompt_ids, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(set[1].prompt_ids, (std::vector<std::int64_t>{4, 5, 6}));
  EXPECT_EQ(set[1].blocks, std::optional<std::int64_t>(1));
  const auto npy = read_states_set(kData / "stack-f4.npy");
  ASSERT_EQ(npy.size(), 2u);
  expect_fixture_values(npy[1].states, 3, 5, 1);
  // One prompt (the forward-like file, and [1, T, D]) is a set of one.
  const auto one = read_states_set(kData / "f32.safetensors");
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].name, "output");
  EXPECT_EQ(one[0].prompt_ids, (std::vector<std::int64_t>{464, 6766, 318}));
  const auto batch = read_states_set(kData / "batch-f32.safetensors");
  ASSERT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch[0].prompt_ids, (std::vector<std::int64_t>{464, 6766, 318}));
}

TEST(StatesSet, NamedTensorsInNaturalOrder) {
  const auto set = read_states_set(kData / "set-named.safetensors");
  ASSERT_EQ(set.size(), 3u);
  const std::vector<std::string> names = {set[0].name, set[1].name, set[2].name};
  EXPECT_EQ(names, (std::vector<std::string>{"1", "2", "10"}));
  expect_fixture_values(set[0].states, 1, 5, 1);
  expect_fixture_values(set[1].states, 2, 5, 2);
  expect_fixture_values(set[2].states, 3, 5, 10);
  EXPECT_EQ(set[2].prompt_ids, (std::vector<std::int64_t>{7, 8, 9}));
  EXPECT_EQ(set[0].prompt_ids, (std::vector<std::int64_t>{4}));
  EXPECT_EQ(set[0].stored_dtype, "F64");

  const auto npz = read_states_set(kData / "set-members.npz");
  ASSERT_EQ(npz.size(), 3u);
  EXPECT_EQ(npz[0].name, "p1");
  EXPECT_EQ(npz[1].name, "p2");
  EXPECT_EQ(npz[2].name, "p10");
  expect_fixture_values(npz[2].states, 3, 5, 10);
}

TEST(StatesSet, Manifest) {
  const auto set = read_states_set(kData / "set.jsonl");
  ASSERT_EQ(set.size(), 3u);
  EXPECT_EQ(set[0].file, kData / "v1-f4.npy");
  EXPECT_EQ(set[0].prompt_ids, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(set[1].prompt_ids, (std::vector<std::int64_t>{464, 6766, 318}));
  EXPECT_EQ(set[2].name, "batch");
  EXPECT_EQ(set[2].stored_dtype, "F16");
  for (const CapturedStates& s : set) expect_fixture_values(s.states);
  // The safetensors entry names its layer; the NumPy entries take it.
  for (const CapturedStates& s : set) {
    EXPECT_EQ(s.blocks, std::optional<std::int64_t>(2));
    EXPECT_EQ(s.head, std::optional<std::string>("none"));
  }
  EXPECT_TRUE(set[0].metadata.empty());
}

TEST(StatesSet, BadSets) {
  TempDir dir;
  auto manifest = [&](const std::string& text) {
    spit(dir / "m.jsonl", text);
    return dir / "m.jsonl";
  };
  fs::copy_file(kData / "f32.safetensors", dir / "f32.safetensors");
  const std::string m = (dir / "m.jsonl").string();
  expect_error([&] { read_states_set(manifest("")); }, {m, "no entries"});
  expect_error([&] { read_states_set(manifest("{\"states\": \"f32.safetensors\"}\n[1]\n")); },
               {m + ":2", "JSON object"});
  expect_error([&] { read_states_set(manifest("{\"state\": \"f32.safetensors\"}\n")); },
               {m + ":1", "unknown key 'state'"});
  expect_error([&] { read_states_set(manifest("{\"name\": \"output\"}\n")); }, {m + ":1", "no \"states\""});
  expect_error([&] { read_states_set(manifest("{\"states\": \"gone.npy\"}\n")); }, {m + ":1", "gone.npy", "does not exist"});
  expect_error([&] { read_states_set(manifest("{\"states\": \"f32.safetensors\", \"ids\": [1, 2, 3]}\n")); },
               {m + ":1", "disagree", "[464,6766,318]"});
  expect_error([&] { read_states_set(manifest("{\"states\": \"f32.safetensors\", \"name\": \"x\"}\n")); },
               {m + ":1", "no tensor 'x'"});
  fs::copy_file(kData / "v1-f4.npy", dir / "v.npy");
  expect_error([&] { read_states_set(manifest("{\"states\": \"v.npy\", \"ids\": [1, 2]}\n")); },
               {m + ":1", "has 2 ids", "3 positions"});
  expect_error([&] { read_states_set(manifest("{\"states\": \"v.npy\", \"ids\": [1, \"a\", 2]}\n")); },
               {m + ":1", "not a token id"});

  // A manifest's entries come from one model and layer: the same D, and no disagreeing blocks or head.
  const fs::path wide = dir / "wide.safetensors";
  write_safetensors(wide, {{"output", Tensor(DType::f32, {3, 6})}}, {{"blocks", "2"}});
  expect_error(
      [&] { read_states_set(manifest("{\"states\": \"f32.safetensors\"}\n{\"states\": \"wide.safetensors\"}\n")); },
      {"wide.safetensors", "6 features wide", "same D"});
  const fs::path other_layer = dir / "layer.safetensors";
  write_safetensors(other_layer, {{"output", Tensor(DType::f32, {3, 5})}}, {{"blocks", "1"}});
  expect_error(
      [&] { read_states_set(manifest("{\"states\": \"f32.safetensors\"}\n{\"states\": \"layer.safetensors\"}\n")); },
      {"layer.safetensors", "'blocks' 1", "same layer"});

  // Stacked with the wrong number of id lists.
  const fs::path stacked = dir / "stacked.safetensors";
  write_safetensors(stacked, {{"output", Tensor(DType::f32, {2, 3, 5})}}, {{"prompt_ids", "[[1, 2, 3]]"}});
  expect_error([&] { read_states_set(stacked); }, {stacked.string(), "not a list of 2 lists"});
  // Entries of different widths; a bad entry among good ones.
  const fs::path widths = dir / "widths.safetensors";
  write_safetensors(widths, {{"a", Tensor(DType::f32, {2, 5})}, {"b", Tensor(DType::f32, {2, 6})}});
  expect_error([&] { read_states_set(widths); }, {widths.string(), "'b'", "same D"});
  Tensor bad(DType::f32, {2, 5});
  bad.set(9, NAN);
  const fs::path nan = dir / "nan.safetensors";
  write_safetensors(nan, {{"a", Tensor(DType::f32, {2, 5})}, {"b", bad}});
  expect_error([&] { read_states_set(nan); }, {nan.string(), "tensor 'b'", "t = 1, feature j = 4", "NaN"});
  Tensor stack_nan(DType::f32, {2, 2, 3});
  stack_nan.set(10, INFINITY);
  write_safetensors(stacked, {{"output", stack_nan}});
  expect_error([&] { read_states_set(stacked); }, {"tensor 'output[1]'", "t = 1, feature j = 1", "+Inf"});
}

// ---- check_states ---------------------------------------------------------------------------------------------------

TEST(CheckStates, WidthAndPositions) {
  const CapturedStates s = read_states(kData / "f32.safetensors");
  EXPECT_NO_THROW(check_states(s, 5, 3, "m"));
  EXPECT_NO_THROW(check_states(s, 5, 1024, "m"));
  expect_error([&] { check_states(s, 64, 32, "gpt2 (tiny.ini) at block 2"); },
               {"f32.safetensors", "tensor 'output'", "D = 5", "gpt2 (tiny.ini) at block 2", "width 64"});
  expect_error([&] { check_states(s, 5, 2, "gpt2 (tiny.ini)"); },
               {"f32.safetensors", "T = 3 positions", "more than the 2", "gpt2 (tiny.ini)"});
}

}  // namespace
}  // namespace lminv
