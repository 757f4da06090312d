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
#include <exception>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "json_depth.hpp"
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

std::string in_quotes(const std::string& name) { return "'" + name + "'"; }

// A non-negative JSON integer, or nullopt.
std::optional<std::uint64_t> as_count(const json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  return std::nullopt;
}

}  // namespace

// ---- reading ---------------------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const fs::path& file) : path_(file) {
  fd_ = ::open(file.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // a FIFO would block; refused below
  if (fd_ < 0) sys_fail(file, "cannot open");
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) sys_fail(file, "cannot stat");
    if (!S_ISREG(st.st_mode)) bad(file, "not a regular file");
    const auto file_size = static_cast<std::uint64_t>(st.st_size);
    if (file_size < 8)
      bad(file, "not a safetensors file: " + std::to_string(file_size) +
                    " bytes, shorter than the 8-byte header length that starts the format");
    map_ = ::mmap(nullptr, static_cast<std::size_t>(file_size), PROT_READ, MAP_PRIVATE, fd_, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      sys_fail(file, "cannot map");
    }
    map_size_ = static_cast<std::size_t>(file_size);
    const auto* base = static_cast<const std::byte*>(map_);
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, base, 8);
    if (header_size > file_size - 8)
      bad(file, "header length " + std::to_string(header_size) + " runs past the end of the file (" +
                    std::to_string(file_size) + " bytes)");
    data_ = base + 8 + header_size;
    data_offset_ = 8 + header_size;
    const std::uint64_t data_size = file_size - 8 - header_size;
    const char* text = reinterpret_cast<const char*>(base + 8);

    // Parse, noting names that appear twice at the top level (a JSON object would silently keep the last).
    std::set<std::string> seen;
    std::vector<std::string> repeated;
    json header;
    try {
      header = json::parse(text, text + header_size, [&](int depth, json::parse_event_t event, json& parsed) {
        if (depth > kMaxJsonDepth)  // dump() in the messages below recurses per level (json_depth.hpp)
          bad(file, "header is JSON nested more than " + std::to_string(kMaxJsonDepth) + " levels deep");
        if (depth == 1 && event == json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second)
          repeated.push_back(parsed.get<std::string>());
        return true;
      });
    } catch (const json::exception& e) {
      bad(file, std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) bad(file, std::string("header is a JSON ") + header.type_name() + ", not an object");
    if (!repeated.empty()) bad(file, "header names " + in_quotes(repeated.front()) + " twice");

    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) bad(file, "__metadata__ is not an object of strings");
        for (const auto& [key, text_value] : value.items()) {
          if (!text_value.is_string())
            bad(file, "__metadata__ value of " + in_quotes(key) + " is not a string but " + text_value.dump());
          metadata_[key] = text_value.get<std::string>();
        }
        continue;
      }
      const std::string where = "tensor " + in_quotes(name);
      if (!value.is_object()) bad(file, where + ": entry is not an object");
      if (!value.contains("dtype") || !value["dtype"].is_string()) bad(file, where + ": no dtype string");
      if (!value.contains("shape")) bad(file, where + ": no shape");
      if (!value.contains("data_offsets")) bad(file, where + ": no data_offsets");
      SafetensorsEntry entry;
      entry.dtype = value["dtype"].get<std::string>();
      const std::optional<StoredType> stored = readable_dtype(entry.dtype);
      if (!stored)
        bad(file, where + ": dtype " + in_quotes(entry.dtype) + " is not one lminv reads (F32, F64, BF16, F16)");
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
      const bool pair = offsets.is_array() && offsets.size() == 2;
      const std::optional<std::uint64_t> first = pair ? as_count(offsets[0]) : std::nullopt;
      const std::optional<std::uint64_t> second = pair ? as_count(offsets[1]) : std::nullopt;
      if (!first || !second || *first > *second)
        bad(file, where + ": data_offsets " + offsets.dump() +
                      " is not [begin, end] with non-negative integers begin <= end");
      entry.begin = *first;
      entry.end = *second;
      if (entry.end > data_size)
        bad(file, where + ": data_offsets " + offsets.dump() + " run past the end of the data (" +
                      std::to_string(data_size) + " bytes)");
      if (entry.end - entry.begin != nbytes)
        bad(file, where + ": data_offsets " + offsets.dump() + " hold " + std::to_string(entry.end - entry.begin) +
                      " bytes, but shape " + shape.dump() + " of " + entry.dtype + " needs " + std::to_string(nbytes));
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
        bad(file, "tensors " + in_quotes(*by_offset[i - 1].first) + " and " + in_quotes(*by_offset[i].first) +
                      " overlap in the data (bytes [" + std::to_string(by_offset[i - 1].second->begin) + ", " +
                      std::to_string(by_offset[i - 1].second->end) + ") and [" +
                      std::to_string(by_offset[i].second->begin) + ", " + std::to_string(by_offset[i].second->end) +
                      "))");
  } catch (...) {
    release();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { release(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      data_(std::exchange(other.data_, nullptr)),
      data_offset_(other.data_offset_),
      entries_(std::move(other.entries_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    data_offset_ = other.data_offset_;
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

void SafetensorsFile::release() noexcept {
  if (map_) ::munmap(map_, map_size_);
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  map_ = nullptr;
  map_size_ = 0;
  data_ = nullptr;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) bad(path_, "no tensor named " + in_quotes(name));
  return it->second;
}

std::string_view SafetensorsFile::bytes(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  return {reinterpret_cast<const char*>(data_ + e.begin), static_cast<std::size_t>(e.end - e.begin)};
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  Tensor t(e.type, e.shape);
  const std::size_t n = static_cast<std::size_t>(e.end - e.begin);
  if (e.dtype == "F16") {
    const std::byte* src = data_ + e.begin;
    float* out = t.data<float>();
    for (std::size_t i = 0; i < n / 2; ++i) {
      std::uint16_t h = 0;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = half_to_float(h);
    }
    return t;
  }
  // pread copies straight from the page cache: faster than faulting the mapping in page by page.
  auto* dst = static_cast<char*>(t.raw());
  std::size_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd_, dst + done, std::min<std::size_t>(n - done, std::size_t{1} << 30),
                                static_cast<off_t>(data_offset_ + e.begin + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      if (got == 0) errno = EIO;  // the file shrank since it was opened
      sys_fail(path_, "cannot read tensor " + in_quotes(name));
    }
    done += static_cast<std::size_t>(got);
  }
  return t;
}

std::vector<Tensor> SafetensorsFile::read_many(const std::vector<std::string>& names, int threads) const {
  for (const std::string& name : names) entry(name);  // every name known before any work
  std::vector<Tensor> out(names.size());
  // Largest first, so that the threads finish together.
  std::vector<std::size_t> order(names.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const SafetensorsEntry &x = entries_.at(names[a]), &y = entries_.at(names[b]);
    return x.end - x.begin > y.end - y.begin;
  });
  std::size_t workers = threads > 0 ? static_cast<std::size_t>(threads)
                                    : std::min<std::size_t>(8, std::max(1u, std::thread::hardware_concurrency()));
  workers = std::min(workers, names.size());
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (std::size_t k; !failed && (k = next++) < order.size();) {
      try {
        out[order[k]] = read(names[order[k]]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  if (workers <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (std::size_t i = 1; i < workers; ++i) pool.emplace_back(work);
    work();
    for (std::thread& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
  return out;
}

WeightSet read_safetensors(const fs::path& file, std::map<std::string, std::string>* metadata) {
  const SafetensorsFile st(file);
  std::vector<std::string> names;
  for (const auto& entry : st.entries()) names.push_back(entry.first);
  std::vector<Tensor> tensors = st.read_many(names);
  WeightSet weights;
  for (std::size_t i = 0; i < names.size(); ++i) weights.set(names[i], std::move(tensors[i]));
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
    if (!tensor) bad(file, "tensor " + in_quotes(name) + " is null");
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
