#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "lminv/error.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian; so must the host be");

namespace lminv {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

[[noreturn]] void bad(const fs::path& file, const std::string& what) { throw Error(file.string() + ": " + what); }

[[noreturn]] void sys_fail(const fs::path& file, const std::string& what) {
  throw Error(file.string() + ": " + what + ": " + std::strerror(errno));
}

struct StoredType {
  DType type;
  std::size_t size;  // bytes per stored element
};

std::optional<StoredType> readable_dtype(const std::string& name) {
  if (name == "F32") return StoredType{DType::f32, 4};
  if (name == "F64") return StoredType{DType::f64, 8};
  if (name == "BF16") return StoredType{DType::bf16, 2};
  if (name == "F16") return StoredType{DType::f32, 2};
  return std::nullopt;
}

const char* stored_name(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
  }
  return "?";
}

// IEEE half -> float, exact (every half is a float): subnormals, infinities and NaN payloads included.
float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // 0 or subnormal: mantissa * 2^-24, exact
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, or NaN with its payload
  } else {
    bits = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float value = 0;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

std::string quoted(const std::string& name) { return "'" + name + "'"; }

// A non-negative JSON integer, or nullopt.
std::optional<std::uint64_t> as_count(const json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  return std::nullopt;
}

}  // namespace

// ---- reading ---------------------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const fs::path& file) : path_(file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) sys_fail(file, "cannot open");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    sys_fail(file, "cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(file, "not a regular file");
  }
  const auto file_size = static_cast<std::uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    bad(file, "not a safetensors file: " + std::to_string(file_size) +
                  " bytes, shorter than the 8-byte header length that starts the format");
  }
  map_size_ = static_cast<std::size_t>(file_size);
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int saved = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    errno = saved;
    sys_fail(file, "cannot map");
  }
  try {
    const auto* base = static_cast<const std::byte*>(map_);
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, base, 8);
    if (header_size > file_size - 8)
      bad(file, "header length " + std::to_string(header_size) + " runs past the end of the file (" +
                    std::to_string(file_size) + " bytes)");
    data_ = base + 8 + header_size;
    const std::uint64_t data_size = file_size - 8 - header_size;
    const char* text = reinterpret_cast<const char*>(base + 8);

    // Parse, noting names that appear twice at the top level (a JSON object would silently keep the last).
    std::set<std::string> seen;
    std::vector<std::string> repeated;
    json header;
    try {
      header = json::parse(text, text + header_size, [&](int depth, json::parse_event_t event, json& parsed) {
        if (depth == 1 && event == json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second)
          repeated.push_back(parsed.get<std::string>());
        return true;
      });
    } catch (const json::exception& e) {
      bad(file, std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) bad(file, std::string("header is not a JSON object but a ") + header.type_name());
    if (!repeated.empty()) bad(file, "header names " + quoted(repeated.front()) + " twice");

    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) bad(file, "__metadata__ is not an object of strings");
        for (const auto& [key, text_value] : value.items()) {
          if (!text_value.is_string())
            bad(file, "__metadata__ value of " + quoted(key) + " is not a string but " + text_value.dump());
          metadata_[key] = text_value.get<std::string>();
        }
        continue;
      }
      const std::string where = "tensor " + quoted(name);
      if (!value.is_object()) bad(file, where + ": entry is not an object");
      if (!value.contains("dtype") || !value["dtype"].is_string()) bad(file, where + ": no dtype string");
      if (!value.contains("shape")) bad(file, where + ": no shape");
      if (!value.contains("data_offsets")) bad(file, where + ": no data_offsets");
      SafetensorsEntry entry;
      entry.dtype = value["dtype"].get<std::string>();
      const std::optional<StoredType> stored = readable_dtype(entry.dtype);
      if (!stored)
        bad(file, where + ": dtype " + quoted(entry.dtype) + " is not one lminv reads (F32, F64, BF16, F16)");
      entry.type = stored->type;

      const json& shape = value["shape"];
      if (!shape.is_array()) bad(file, where + ": shape " + shape.dump() + " is not a list of non-negative integers");
      std::uint64_t numel = 1;
      bool overflow = false;
      for (const json& d : shape) {
        const std::optional<std::uint64_t> n = as_count(d);
        if (!n || *n > static_cast<std::uint64_t>(INT64_MAX))
          bad(file, where + ": shape " + shape.dump() + " is not a list of non-negative integers");
        entry.shape.push_back(static_cast<std::int64_t>(*n));
        overflow = overflow || __builtin_mul_overflow(numel, *n, &numel);
      }
      std::uint64_t nbytes = 0;
      overflow = overflow || __builtin_mul_overflow(numel, stored->size, &nbytes);
      if (overflow) bad(file, where + ": shape " + shape.dump() + " is too large");

      const json& offsets = value["data_offsets"];
      const std::optional<std::uint64_t> begin =
          offsets.is_array() && offsets.size() == 2 ? as_count(offsets[0]) : std::nullopt;
      const std::optional<std::uint64_t> end =
          offsets.is_array() && offsets.size() == 2 ? as_count(offsets[1]) : std::nullopt;
      if (!begin || !end || *begin > *end)
        bad(file, where + ": data_offsets " + offsets.dump() +
                      " is not [begin, end] with non-negative integers begin <= end");
      if (*end > data_size)
        bad(file, where + ": data_offsets " + offsets.dump() + " run past the end of the data (" +
                      std::to_string(data_size) + " bytes)");
      if (*end - *begin != nbytes)
        bad(file, where + ": data_offsets " + offsets.dump() + " hold " + std::to_string(*end - *begin) +
                      " bytes, but shape " + shape.dump() + " of " + entry.dtype + " needs " + std::to_string(nbytes));
      entry.begin = *begin;
      entry.end = *end;
      entries_.emplace(name, std::move(entry));
    }

    // No two tensors may share bytes.
    std::vector<std::pair<const std::string*, const SafetensorsEntry*>> by_offset;
    for (const auto& [name, entry] : entries_)
      if (entry.end > entry.begin) by_offset.emplace_back(&name, &entry);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i].second->begin < by_offset[i - 1].second->end)
        bad(file, "tensors " + quoted(*by_offset[i - 1].first) + " and " + quoted(*by_offset[i].first) +
                      " overlap in the data (bytes [" + std::to_string(by_offset[i - 1].second->begin) + ", " +
                      std::to_string(by_offset[i - 1].second->end) + ") and [" +
                      std::to_string(by_offset[i].second->begin) + ", " + std::to_string(by_offset[i].second->end) +
                      "))");
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      data_(std::exchange(other.data_, nullptr)),
      entries_(std::move(other.entries_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

void SafetensorsFile::unmap() noexcept {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  data_ = nullptr;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) bad(path_, "no tensor named " + quoted(name));
  return it->second;
}

std::string_view SafetensorsFile::bytes(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  return {reinterpret_cast<const char*>(data_ + e.begin), static_cast<std::size_t>(e.end - e.begin)};
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  Tensor t(e.type, e.shape);
  const std::byte* src = data_ + e.begin;
  const std::size_t n = static_cast<std::size_t>(e.end - e.begin);
  if (n == 0) return t;
  // Sequential read-ahead for this range; the copy is the one pass over the file.
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<std::uintptr_t>(src) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(start), reinterpret_cast<std::uintptr_t>(src) + n - start, MADV_SEQUENTIAL);
  if (e.dtype == "F16") {
    float* out = t.data<float>();
    const std::size_t count = n / 2;
    for (std::size_t i = 0; i < count; ++i) {
      std::uint16_t h = 0;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = half_to_float(h);
    }
  } else {
    std::memcpy(t.raw(), src, n);
  }
  return t;
}

WeightSet read_safetensors(const fs::path& file, std::map<std::string, std::string>* metadata) {
  const SafetensorsFile st(file);
  WeightSet weights;
  for (const auto& entry : st.entries()) weights.set(entry.first, st.read(entry.first));
  if (metadata) *metadata = st.metadata();
  return weights;
}

// ---- writing ---------------------------------------------------------------------------------------------------

namespace {

void write_all(int fd, const void* data, std::size_t size, const fs::path& file) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, std::min<std::size_t>(size, std::size_t{1} << 30));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      sys_fail(file, "cannot write");
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

std::atomic<unsigned> tmp_counter{0};

}  // namespace

void write_safetensors_views(const fs::path& file, const std::map<std::string, const Tensor*>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  // Data order: descending dtype size (F64, F32, BF16), then name.
  std::vector<std::pair<const std::string*, const Tensor*>> order;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") bad(file, "a tensor cannot be named '__metadata__' (the header's metadata key)");
    if (!tensor) bad(file, "tensor " + quoted(name) + " is null");
    order.emplace_back(&name, tensor);
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return dtype_size(a.second->dtype()) > dtype_size(b.second->dtype());
  });

  std::string header;
  try {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata.empty()) h["__metadata__"] = metadata;
    std::uint64_t offset = 0;
    for (const auto& [name, tensor] : order) {
      nlohmann::ordered_json entry;
      entry["dtype"] = stored_name(tensor->dtype());
      entry["shape"] = tensor->shape();
      entry["data_offsets"] = {offset, offset + tensor->nbytes()};
      offset += tensor->nbytes();
      h[*name] = std::move(entry);
    }
    header = h.dump();
  } catch (const nlohmann::json::exception& e) {
    bad(file, std::string("cannot write the header: ") + e.what());
  }
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::uint64_t header_size = header.size();

  fs::path tmp = file;
  tmp += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(tmp_counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) sys_fail(file, "cannot create the temporary file " + tmp.string());
  try {
    write_all(fd, &header_size, 8, tmp);
    write_all(fd, header.data(), header.size(), tmp);
    for (const auto& entry : order) write_all(fd, entry.second->raw(), entry.second->nbytes(), tmp);
    if (::fsync(fd) != 0) sys_fail(tmp, "cannot sync");
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const int saved = errno;
    ::unlink(tmp.c_str());
    errno = saved;
    sys_fail(tmp, "cannot close");
  }
  if (::rename(tmp.c_str(), file.c_str()) != 0) {
    const int saved = errno;
    ::unlink(tmp.c_str());
    errno = saved;
    sys_fail(file, "cannot replace with " + tmp.string());
  }
  // Make the rename durable too (best effort: some file systems refuse to sync a folder).
  const fs::path folder = file.has_parent_path() ? file.parent_path() : fs::path(".");
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void write_safetensors(const fs::path& file, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::map<std::string, const Tensor*> views;
  for (const auto& [name, tensor] : tensors) views.emplace(name, &tensor);
  write_safetensors_views(file, views, metadata);
}

}  // namespace lminv
