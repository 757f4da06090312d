#include "npy.hpp"
#include "files.hpp"

#include <zip.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <utility>

#include "lminv/error.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .npy reader assumes a little-endian host");

namespace lminv {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kMagic = "\x93NUMPY";
constexpr std::size_t kPrefix = 12;  // magic (6), version (2), header length (2 for 1.0, 4 for 2.0 and 3.0)

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw Error(where + ": " + what);
}

std::string in_quotes(std::string_view s) {
  return "'" + std::string(s) + "'";
}

// ---- the header: a Python literal -----------------------------------------------------------------------------------

// A value of the Python literal subset NumPy's headers use: strings, integers, True/False/None, tuples, lists and
// dicts with string keys.
struct PyValue {
  enum class Kind { string, integer, boolean, none, tuple, list, dict } kind = Kind::none;
  std::string text;                     // string: its value; integer: its digits as written (for messages)
  std::optional<std::int64_t> integer;  // integer: the value, or nullopt when it does not fit 64 bits
  bool boolean = false;
  std::vector<PyValue> items;     // tuple, list; dict: the values
  std::vector<std::string> keys;  // dict: the keys, in order
  std::string source;             // the literal as written (for messages)
};

// Recursive descent over the header text. Errors say what was expected and where.
class LiteralParser {
 public:
  LiteralParser(std::string_view text, const std::string& where) : text_(text), where_(where) {}

  PyValue parse_document() {
    PyValue v = value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected " + describe_here() + " after the header's dict");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    bad(where_, "header is not a Python dict literal: " + what + " (header " + in_quotes(shown()) + ")");
  }
  std::string shown() const {
    std::string s(text_.substr(0, 200));
    while (!s.empty() && (s.back() == ' ' || s.back() == '\n')) s.pop_back();
    return s + (text_.size() > 200 ? "..." : "");
  }
  std::string describe_here() const {
    if (pos_ >= text_.size()) return "end of header";
    return in_quotes(text_.substr(pos_, 1)) + " at offset " + std::to_string(pos_);
  }
  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }
  bool take(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool at_word(std::string_view word) const {
    if (text_.substr(pos_, word.size()) != word) return false;
    const std::size_t end = pos_ + word.size();
    return end == text_.size() || !(std::isalnum(static_cast<unsigned char>(text_[end])) || text_[end] == '_');
  }

  PyValue value(int depth) {
    if (depth > 32) fail("nested too deeply");
    skip_space();
    const std::size_t start = pos_;
    PyValue v;
    if (pos_ >= text_.size()) fail("a value expected, found the end of the header");
    const char c = text_[pos_];
    if (c == '\'' || c == '"') {
      v.kind = PyValue::Kind::string;
      v.text = string_literal();
    } else if (c == '-' || c == '+' || std::isdigit(static_cast<unsigned char>(c))) {
      v = integer_literal();
    } else if (at_word("True") || at_word("False")) {
      v.kind = PyValue::Kind::boolean;
      v.boolean = text_[pos_] == 'T';
      pos_ += v.boolean ? 4 : 5;
    } else if (at_word("None")) {
      v.kind = PyValue::Kind::none;
      pos_ += 4;
    } else if (c == '(') {
      ++pos_;
      // Python: "(x)" is x itself, "(x,)" and "()" are tuples.
      v.kind = PyValue::Kind::tuple;
      bool comma = false;
      while (!take(')')) {
        if (!v.items.empty() && !comma) fail("',' or ')' expected, found " + describe_here());
        v.items.push_back(value(depth + 1));
        comma = take(',');
      }
      if (v.items.size() == 1 && !comma) {
        PyValue inner = std::move(v.items.front());
        inner.source = std::string(text_.substr(start, pos_ - start));
        return inner;
      }
    } else if (c == '[') {
      ++pos_;
      v.kind = PyValue::Kind::list;
      bool comma = true;
      while (!take(']')) {
        if (!comma) fail("',' or ']' expected, found " + describe_here());
        v.items.push_back(value(depth + 1));
        comma = take(',');
      }
    } else if (c == '{') {
      ++pos_;
      v.kind = PyValue::Kind::dict;
      bool comma = true;
      while (!take('}')) {
        if (!comma) fail("',' or '}' expected, found " + describe_here());
        skip_space();
        PyValue key = value(depth + 1);
        if (key.kind != PyValue::Kind::string) fail("dict key " + key.source + " is not a string");
        if (std::find(v.keys.begin(), v.keys.end(), key.text) != v.keys.end())
          fail("key " + in_quotes(key.text) + " appears twice");
        if (!take(':')) fail("':' expected after key " + in_quotes(key.text) + ", found " + describe_here());
        v.keys.push_back(key.text);
        v.items.push_back(value(depth + 1));
        comma = take(',');
      }
    } else {
      fail("unexpected " + describe_here());
    }
    v.source = std::string(text_.substr(start, pos_ - start));
    return v;
  }

  std::string string_literal() {
    const char quote = text_[pos_++];
    std::string s;
    while (true) {
      if (pos_ >= text_.size()) fail("a string runs to the end of the header");
      const char c = text_[pos_++];
      if (c == quote) return s;
      if (c == '\n') fail("a string runs past the end of its line");
      if (c != '\\') {
        s += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("a string runs to the end of the header");
      const char e = text_[pos_++];
      switch (e) {
        case '\\': s += '\\'; break;
        case '\'': s += '\''; break;
        case '"': s += '"'; break;
        case 'n': s += '\n'; break;
        case 't': s += '\t'; break;
        case 'x': {
          if (pos_ + 2 > text_.size() || !std::isxdigit(static_cast<unsigned char>(text_[pos_])) ||
              !std::isxdigit(static_cast<unsigned char>(text_[pos_ + 1])))
            fail("bad \\x escape in a string");
          s += static_cast<char>(std::stoi(std::string(text_.substr(pos_, 2)), nullptr, 16));
          pos_ += 2;
          break;
        }
        default: fail(std::string("unsupported escape \\") + e + " in a string");
      }
    }
  }

  PyValue integer_literal() {
    const std::size_t start = pos_;
    bool negative = false;
    if (text_[pos_] == '-' || text_[pos_] == '+') negative = text_[pos_++] == '-';
    if (pos_ >= text_.size() || !std::isdigit(static_cast<unsigned char>(text_[pos_])))
      fail("a number expected after the sign at offset " + std::to_string(start));
    std::uint64_t magnitude = 0;
    bool overflow = false;
    while (pos_ < text_.size() && (std::isdigit(static_cast<unsigned char>(text_[pos_])) || text_[pos_] == '_')) {
      if (text_[pos_] != '_')
        overflow = overflow || __builtin_mul_overflow(magnitude, 10u, &magnitude) ||
                   __builtin_add_overflow(magnitude, static_cast<unsigned>(text_[pos_] - '0'), &magnitude);
      ++pos_;
    }
    // Python 2 long suffix (NumPy 1.x headers written under Python 2 have "(3L, 4L)").
    if (pos_ < text_.size() && (text_[pos_] == 'L' || text_[pos_] == 'l')) ++pos_;
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E' ||
                                std::isalpha(static_cast<unsigned char>(text_[pos_]))))
      fail("a number that is not an integer at offset " + std::to_string(start));
    PyValue v;
    v.kind = PyValue::Kind::integer;
    v.text = std::string(text_.substr(start, pos_ - start));
    const auto limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    if (!overflow && magnitude <= limit)
      v.integer = negative ? -static_cast<std::int64_t>(magnitude) : static_cast<std::int64_t>(magnitude);
    return v;
  }

  std::string_view text_;
  const std::string& where_;
  std::size_t pos_ = 0;
};

// The dtype kinds NumPy's descr strings use, for messages about what is refused.
std::string kind_words(char kind) {
  switch (kind) {
    case 'i': return "signed integers";
    case 'u': return "unsigned integers";
    case 'b': return "booleans";
    case 'c': return "complex numbers";
    case 'O': return "Python objects";
    case 'U': return "unicode strings";
    case 'S':
    case 'a': return "byte strings";
    case 'V': return "raw or structured records";
    case 'M': return "datetimes";
    case 'm': return "timedeltas";
    case 'f': return "floats";
    default: return "an unknown kind";
  }
}

std::uint32_t u32le(const unsigned char* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

// IEEE half -> float, exact (every half is a float): zeros, subnormals, infinities and NaN payloads included.
float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // mantissa * 2^-24 is exact in float
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float value = 0;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <class U>
U load(const char* p, bool swap) {
  U u;
  std::memcpy(&u, p, sizeof u);
  if (swap) {
    if constexpr (sizeof(U) == 2) u = __builtin_bswap16(u);
    if constexpr (sizeof(U) == 4) u = __builtin_bswap32(u);
    if constexpr (sizeof(U) == 8) u = __builtin_bswap64(u);
  }
  return u;
}

// Element k of the stored data (in storage order) written to out[k'] where k' is its row-major position.
template <class Out, class Convert>
void copy_elements(const NpyHeader& h, const char* data, Out* out, Convert convert) {
  const auto n = static_cast<std::size_t>(shape_numel(h.shape));
  if (!h.fortran_order || h.shape.size() < 2) {
    for (std::size_t k = 0; k < n; ++k) out[k] = convert(data + k * h.item_size);
    return;
  }
  // Fortran order: the first index varies fastest in storage. Walk the storage order with a counter per dimension
  // and keep the row-major offset of the current element up to date.
  const std::size_t rank = h.shape.size();
  std::vector<std::size_t> row_stride(rank, 1);
  for (std::size_t d = rank - 1; d-- > 0;) row_stride[d] = row_stride[d + 1] * static_cast<std::size_t>(h.shape[d + 1]);
  std::vector<std::int64_t> index(rank, 0);
  std::size_t offset = 0;
  for (std::size_t k = 0; k < n; ++k) {
    out[offset] = convert(data + k * h.item_size);
    for (std::size_t d = 0; d < rank; ++d) {
      if (++index[d] < h.shape[d]) {
        offset += row_stride[d];
        break;
      }
      offset -= row_stride[d] * static_cast<std::size_t>(h.shape[d] - 1);
      index[d] = 0;
    }
  }
}

}  // namespace

// ---- .npy ---------------------------------------------------------------------------------------------------------

std::uint64_t npy_header_size(std::string_view prefix, const std::string& where) {
  const bool magic_ok = prefix.size() >= kMagic.size() ? prefix.substr(0, kMagic.size()) == kMagic
                                                       : prefix == kMagic.substr(0, prefix.size());
  if (!magic_ok) bad(where, "not a NumPy .npy image: bad magic (it must start with \\x93NUMPY)");
  if (prefix.size() < 8)
    bad(where, "truncated .npy: " + std::to_string(prefix.size()) + " bytes, shorter than the magic and version");
  const int major = static_cast<unsigned char>(prefix[6]);
  const int minor = static_cast<unsigned char>(prefix[7]);
  if (major < 1 || major > 3 || minor != 0)
    bad(where, ".npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                   " is not one lminv reads (1.0, 2.0, 3.0)");
  const std::size_t field = major == 1 ? 2 : 4;
  if (prefix.size() < 8 + field)
    bad(where, "truncated .npy: " + std::to_string(prefix.size()) + " bytes, the header length field is cut off");
  const auto* p = reinterpret_cast<const unsigned char*>(prefix.data()) + 8;
  const std::uint64_t length = major == 1 ? (static_cast<std::uint64_t>(p[0]) | static_cast<std::uint64_t>(p[1]) << 8)
                                          : static_cast<std::uint64_t>(u32le(p));
  return 8 + field + length;
}

NpyHeader parse_npy_header(std::string_view bytes, const std::string& where) {
  const std::uint64_t total = npy_header_size(bytes, where);
  if (bytes.size() < total)
    bad(where, "truncated .npy: the header needs " + std::to_string(total) + " bytes, the image has " +
                   std::to_string(bytes.size()));
  NpyHeader h;
  h.major_version = static_cast<unsigned char>(bytes[6]);
  h.minor_version = static_cast<unsigned char>(bytes[7]);
  const std::size_t field = h.major_version == 1 ? 2 : 4;
  const std::string_view text = bytes.substr(8 + field, total - 8 - field);
  h.data_offset = total;

  const PyValue dict = LiteralParser(text, where).parse_document();
  if (dict.kind != PyValue::Kind::dict) bad(where, "header " + in_quotes(dict.source) + " is not a dict");
  std::map<std::string, const PyValue*> fields;
  for (std::size_t i = 0; i < dict.keys.size(); ++i) fields[dict.keys[i]] = &dict.items[i];
  for (const char* key : {"descr", "fortran_order", "shape"})
    if (!fields.count(key))
      bad(where, std::string("header has no ") + in_quotes(key) + " (header " + dict.source + ")");
  for (const auto& [key, value] : fields)
    if (key != "descr" && key != "fortran_order" && key != "shape")
      bad(where,
          "header has an unexpected key " + in_quotes(key) + " (a .npy header holds descr, fortran_order, shape)");

  // descr: byte order, kind, item size.
  const PyValue& descr = *fields["descr"];
  if (descr.kind != PyValue::Kind::string)
    bad(where, "descr " + descr.source + " is a structured dtype; lminv reads float arrays (f2, f4, f8)");
  h.descr = descr.text;
  std::string_view d = h.descr;
  char order = '=';
  if (!d.empty() && (d[0] == '<' || d[0] == '>' || d[0] == '=' || d[0] == '|')) {
    order = d[0];
    d.remove_prefix(1);
  }
  const char kind = d.empty() ? '?' : d[0];
  const std::string size_text(d.empty() ? std::string_view() : d.substr(1));
  const bool known_size = !size_text.empty() && size_text.size() <= 3 &&
                          std::all_of(size_text.begin(), size_text.end(),
                                      [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  const int size = known_size ? std::stoi(size_text) : 0;
  if (kind != 'f' || (size != 2 && size != 4 && size != 8))
    bad(where, "dtype " + in_quotes(h.descr) + " (" +
                   (kind == 'f' && known_size ? std::to_string(8 * size) + "-bit " : std::string()) + kind_words(kind) +
                   ") is not one lminv reads: float16, float32 or float64 ('<f2', '<f4', '<f8' "
                   "or big-endian '>f2', '>f4', '>f8')");
  if (order == '|') bad(where, "dtype " + in_quotes(h.descr) + ": byte order '|' is for single bytes, not floats");
  h.big_endian = order == '>';
  h.item_size = static_cast<std::size_t>(size);
  h.stored_dtype = size == 2 ? "F16" : size == 4 ? "F32" : "F64";

  const PyValue& fortran = *fields["fortran_order"];
  if (fortran.kind != PyValue::Kind::boolean) bad(where, "fortran_order " + fortran.source + " is not True or False");
  h.fortran_order = fortran.boolean;

  const PyValue& shape = *fields["shape"];
  if (shape.kind != PyValue::Kind::tuple) bad(where, "shape " + shape.source + " is not a tuple of integers");
  std::uint64_t numel = 1;
  bool overflow = false;
  for (const PyValue& dim : shape.items) {
    if (dim.kind != PyValue::Kind::integer) bad(where, "shape " + shape.source + " is not a tuple of integers");
    if (!dim.text.empty() && dim.text[0] == '-')
      bad(where, "shape " + shape.source + " has a negative dimension " + dim.text);
    if (!dim.integer) bad(where, "shape " + shape.source + ": dimension " + dim.text + " does not fit 64 bits");
    h.shape.push_back(*dim.integer);
    overflow = overflow || __builtin_mul_overflow(numel, static_cast<std::uint64_t>(*dim.integer), &numel);
  }
  overflow = overflow || __builtin_mul_overflow(numel, static_cast<std::uint64_t>(h.item_size), &h.data_bytes) ||
             h.data_bytes > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  if (overflow)
    bad(where, "shape " + shape.source + " of " + h.descr + " is too large: its byte size overflows 64 bits");
  return h;
}

Tensor decode_npy_data(const NpyHeader& h, std::string_view data, const std::string& where) {
  if (data.size() < h.data_bytes)
    bad(where, "truncated .npy: data shorter than the shape says: shape " + shape_string(h.shape) + " of " + h.descr +
                   " needs " + std::to_string(h.data_bytes) + " bytes after the header, the image has " +
                   std::to_string(data.size()));
  if (data.size() > h.data_bytes)
    bad(where, std::to_string(data.size() - h.data_bytes) + " trailing bytes after the data: shape " +
                   shape_string(h.shape) + " of " + h.descr + " needs " + std::to_string(h.data_bytes));
  const bool swap = h.big_endian;
  Tensor out;
  try {
    out = Tensor(h.item_size == 8 ? DType::f64 : DType::f32, h.shape);
  } catch (const std::bad_alloc&) {
    bad(where, "cannot allocate " + std::to_string(h.data_bytes) + " bytes for shape " + shape_string(h.shape));
  }
  switch (h.item_size) {
    case 2:
      copy_elements(h, data.data(), out.data<float>(),
                    [swap](const char* p) { return half_to_float(load<std::uint16_t>(p, swap)); });
      break;
    case 4:
      copy_elements(h, data.data(), out.data<float>(), [swap](const char* p) {
        const std::uint32_t u = load<std::uint32_t>(p, swap);
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
      });
      break;
    default:
      copy_elements(h, data.data(), out.data<double>(), [swap](const char* p) {
        const std::uint64_t u = load<std::uint64_t>(p, swap);
        double f;
        std::memcpy(&f, &u, sizeof f);
        return f;
      });
  }
  return out;
}

NpyArray parse_npy(std::string_view bytes, const std::string& where) {
  const NpyHeader h = parse_npy_header(bytes, where);
  NpyArray a;
  a.values = decode_npy_data(h, bytes.substr(h.data_offset), where);
  a.descr = h.descr;
  a.stored_dtype = h.stored_dtype;
  a.fortran_order = h.fortran_order;
  a.major_version = h.major_version;
  a.minor_version = h.minor_version;
  return a;
}

namespace {

std::string read_file(const fs::path& file) {
  return read_regular_file(file, "the states file", max_bytes::kStates);
}

std::string first_bytes(const fs::path& file, std::size_t n) {
  std::ifstream in(file, std::ios::binary);
  std::string bytes(n, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(n));
  bytes.resize(static_cast<std::size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return bytes;
}

}  // namespace

NpyArray read_npy(const fs::path& file) {
  return parse_npy(read_file(file), file.string());
}

bool looks_like_npy(const fs::path& file) {
  return first_bytes(file, kMagic.size()) == kMagic;
}

bool looks_like_zip(const fs::path& file) {
  const std::string head = first_bytes(file, 4);
  return head == std::string("PK\x03\x04", 4) || head == std::string("PK\x05\x06", 4);
}

// ---- .npz ---------------------------------------------------------------------------------------------------------

namespace {

zip_t* as_zip(void* p) {
  return static_cast<zip_t*>(p);
}

std::string zip_code_message(int code) {
  zip_error_t error;
  zip_error_init_with_code(&error, code);
  std::string message = zip_error_strerror(&error);
  zip_error_fini(&error);
  return message;
}

std::string list_names(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + in_quotes(n);
  return s;
}

// A member opened for reading; closes itself.
struct MemberReader {
  zip_file_t* file = nullptr;
  const std::string& where;

  MemberReader(zip_t* zip, std::uint64_t index, const std::string& where_) : where(where_) {
    file = zip_fopen_index(zip, index, 0);
    if (!file) bad(where, std::string("cannot open the member: ") + zip_strerror(zip));
  }
  ~MemberReader() {
    if (file) zip_fclose(file);
  }
  MemberReader(const MemberReader&) = delete;
  MemberReader& operator=(const MemberReader&) = delete;

  // Up to n bytes appended to out; returns how many came (fewer only at the member's end).
  std::size_t read(std::string& out, std::size_t n) {
    const std::size_t start = out.size();
    out.resize(start + n);
    std::size_t got = 0;
    while (got < n) {
      const zip_int64_t r = zip_fread(file, out.data() + start + got, n - got);
      if (r < 0) bad(where, std::string("damaged member: ") + zip_file_strerror(file));
      if (r == 0) break;
      got += static_cast<std::size_t>(r);
    }
    out.resize(start + got);
    return got;
  }
};

}  // namespace

NpzFile::NpzFile(const fs::path& file) : path_(file) {
  std::error_code ec;
  if (!fs::exists(file, ec)) throw Error(file.string() + ": no such file");
  if (!fs::is_regular_file(file, ec)) throw Error(file.string() + ": not a regular file");
  int code = 0;
  zip_ = zip_open(file.c_str(), ZIP_RDONLY | ZIP_CHECKCONS, &code);
  if (!zip_)
    throw Error(file.string() + ": not a readable .npz (zip) archive: " + zip_code_message(code) +
                (code == ZIP_ER_NOZIP || code == ZIP_ER_INCONS ? " (truncated or not a zip file?)" : ""));
  const zip_int64_t n = zip_get_num_entries(as_zip(zip_), 0);
  for (zip_int64_t i = 0; i < n; ++i) {
    const char* raw = zip_get_name(as_zip(zip_), static_cast<zip_uint64_t>(i), 0);
    if (!raw) {
      const std::string message = zip_strerror(as_zip(zip_));
      release();
      throw Error(file.string() + ": cannot read the name of member " + std::to_string(i) + ": " + message);
    }
    const std::string member = raw;
    if (!member.empty() && member.back() == '/') continue;  // a folder
    std::string name = member;
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0) name.resize(name.size() - 4);
    names_.push_back(name);
    members_.push_back(member);
    indices_.push_back(static_cast<std::uint64_t>(i));
  }
}

NpzFile::~NpzFile() {
  release();
}

NpzFile::NpzFile(NpzFile&& other) noexcept
    : path_(std::move(other.path_)),
      zip_(std::exchange(other.zip_, nullptr)),
      names_(std::move(other.names_)),
      members_(std::move(other.members_)),
      indices_(std::move(other.indices_)) {}

NpzFile& NpzFile::operator=(NpzFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    zip_ = std::exchange(other.zip_, nullptr);
    names_ = std::move(other.names_);
    members_ = std::move(other.members_);
    indices_ = std::move(other.indices_);
  }
  return *this;
}

void NpzFile::release() noexcept {
  if (zip_) zip_discard(as_zip(zip_));
  zip_ = nullptr;
}

bool NpzFile::contains(const std::string& name) const {
  return std::find(names_.begin(), names_.end(), name) != names_.end() ||
         std::find(members_.begin(), members_.end(), name) != members_.end();
}

NpyArray NpzFile::read(const std::string& name) const {
  std::size_t k = 0;
  while (k < names_.size() && names_[k] != name && members_[k] != name) ++k;
  if (k == names_.size())
    throw Error(path_.string() + ": no array " + in_quotes(name) + " (the archive holds " + list_names(names_) + ")");
  const std::string where = path_.string() + ": member " + in_quotes(members_[k]);

  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_stat_index(as_zip(zip_), indices_[k], 0, &st) != 0 || !(st.valid & ZIP_STAT_SIZE))
    bad(where, std::string("cannot read the member's size: ") + zip_strerror(as_zip(zip_)));
  const std::uint64_t member_size = st.size;

  // Header first, then exactly the data it announces: the member's size from the zip directory is checked against
  // the shape before anything of the size of the data is allocated.
  MemberReader reader(as_zip(zip_), indices_[k], where);
  std::string bytes;
  reader.read(bytes, kPrefix);
  const std::uint64_t header_size = npy_header_size(bytes, where);
  if (header_size > member_size)
    bad(where, "truncated .npy: the header needs " + std::to_string(header_size) + " bytes, the member has " +
                   std::to_string(member_size));
  if (header_size > bytes.size()) reader.read(bytes, static_cast<std::size_t>(header_size - bytes.size()));
  const NpyHeader h = parse_npy_header(bytes, where);
  if (member_size - header_size != h.data_bytes)
    bad(where, std::string(member_size - header_size < h.data_bytes ? "truncated .npy: data shorter than the shape says"
                                                                    : "trailing bytes after the data") +
                   ": shape " + shape_string(h.shape) + " of " + h.descr + " needs " + std::to_string(h.data_bytes) +
                   " bytes after the header, the member has " + std::to_string(member_size - header_size));
  std::string data(bytes, static_cast<std::size_t>(header_size));  // what came with the header's last read
  try {
    data.reserve(static_cast<std::size_t>(h.data_bytes));
  } catch (const std::bad_alloc&) {
    bad(where, "cannot allocate " + std::to_string(h.data_bytes) + " bytes for shape " + shape_string(h.shape));
  }
  reader.read(data, static_cast<std::size_t>(h.data_bytes) - data.size());
  // One more read reaches the member's end, where libzip compares the CRC-32 (and reports a damaged stream).
  std::string rest;
  if (reader.read(rest, 1) != 0) bad(where, "the member holds more bytes than its zip directory entry says");

  NpyArray a;
  a.values = decode_npy_data(h, data, where);
  a.descr = h.descr;
  a.stored_dtype = h.stored_dtype;
  a.fortran_order = h.fortran_order;
  a.major_version = h.major_version;
  a.minor_version = h.minor_version;
  return a;
}

std::vector<std::pair<std::string, NpyArray>> read_npz(const fs::path& file) {
  const NpzFile npz(file);
  std::vector<std::pair<std::string, NpyArray>> arrays;
  for (const std::string& name : npz.names()) arrays.emplace_back(name, npz.read(name));
  return arrays;
}

}  // namespace lminv
