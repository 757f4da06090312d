#include "pinv_decoder.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include <Eigen/Eigenvalues>

namespace lminv {
namespace pinv {

namespace {

using Index = Eigen::Index;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void warn(const std::string& message) { std::cerr << "lminv: pinv decoder: warning: " << message << std::endl; }

void check_weights(const Tensor& w) {
  if (w.rank() != 2) throw Error("pinv decoder: wte must be [V, d], got " + shape_string(w.shape()));
  if (w.dtype() != DType::f32 && w.dtype() != DType::f64)
    throw Error(std::string("pinv decoder: wte must be f32 or f64, got ") + dtype_name(w.dtype()));
}

// Rows [r0, r0 + n), columns [c0, c0 + m) of W as fp64, row-major [n, m]: a view of f64 weights, or f32 weights
// widened into `buffer`.
Eigen::Map<const RowMatrixD, 0, Eigen::OuterStride<>> columns_f64(const Tensor& w, Index r0, Index n, Index c0,
                                                                  Index m, RowMatrixD& buffer) {
  const Index d = w.dim(1);
  if (w.dtype() == DType::f64) return {w.data<double>() + r0 * d + c0, n, m, Eigen::OuterStride<>(d)};
  const Eigen::Map<const RowMatrixF, 0, Eigen::OuterStride<>> f(w.data<float>() + r0 * d + c0, n, m,
                                                                Eigen::OuterStride<>(d));
  buffer = f.cast<double>();
  return {buffer.data(), n, m, Eigen::OuterStride<>(m)};
}

// out[t * stride + r] = <w_r, y_t> for rows w_r of w [n, d] and rows y_t of yt [T, d], all fp64 and row-major.
// Register-blocked for 4 rows x 2 positions: each loaded element of w serves 2 positions and each element of y
// serves 4 rows, so the loop is bound by multiply-adds rather than loads. Eigen's GEMM, tried first, spends
// most of its time packing W for so few positions (about 2x slower at T = 6 to 20).
void dot_rows(const double* w, Index n, Index d, const double* yt, Index positions, double* out, Index stride) {
  Index r = 0;
  for (; r + 4 <= n; r += 4) {
    const double *w0 = w + r * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
    Index t = 0;
    for (; t + 2 <= positions; t += 2) {
      const double *y0 = yt + t * d, *y1 = y0 + d;
      double a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
#pragma omp simd reduction(+ : a00, a01, a10, a11, a20, a21, a30, a31)
      for (Index j = 0; j < d; ++j) {
        a00 += w0[j] * y0[j];
        a01 += w0[j] * y1[j];
        a10 += w1[j] * y0[j];
        a11 += w1[j] * y1[j];
        a20 += w2[j] * y0[j];
        a21 += w2[j] * y1[j];
        a30 += w3[j] * y0[j];
        a31 += w3[j] * y1[j];
      }
      double *o0 = out + t * stride + r, *o1 = o0 + stride;
      o0[0] = a00, o0[1] = a10, o0[2] = a20, o0[3] = a30;
      o1[0] = a01, o1[1] = a11, o1[2] = a21, o1[3] = a31;
    }
    for (; t < positions; ++t) {
      const double* y0 = yt + t * d;
      double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (Index j = 0; j < d; ++j) {
        a0 += w0[j] * y0[j];
        a1 += w1[j] * y0[j];
        a2 += w2[j] * y0[j];
        a3 += w3[j] * y0[j];
      }
      double* o = out + t * stride + r;
      o[0] = a0, o[1] = a1, o[2] = a2, o[3] = a3;
    }
  }
  for (; r < n; ++r)
    for (Index t = 0; t < positions; ++t) {
      const double *w0 = w + r * d, *y0 = yt + t * d;
      double a = 0;
#pragma omp simd reduction(+ : a)
      for (Index j = 0; j < d; ++j) a += w0[j] * y0[j];
      out[t * stride + r] = a;
    }
}

// Cache file layout (native byte order; a file from a machine of the other order fails the magic/version check).
constexpr char kMagic[8] = {'L', 'M', 'I', 'N', 'V', 'P', 'I', 'V'};
constexpr std::uint32_t kVersion = 1;
struct CacheHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;  // sizeof(CacheHeader): a layout change is caught even without a version bump
  std::int64_t d;
  std::int64_t vocab;
  std::uint64_t weights_hash;  // content_hash(wte)
  std::uint64_t payload_hash;  // content_hash of the d x d doubles as an f64 tensor: catches flipped bits
  std::int64_t rank;           // what the cutoff decided, so that a cached run reports the same numbers
  double lambda_max;
  double cutoff;
};
static_assert(sizeof(CacheHeader) == 72, "the cache header has no padding");

std::uint64_t payload_hash(const Eigen::MatrixXd& m) {
  Tensor t(DType::f64, {m.rows(), m.cols()});
  std::memcpy(t.raw(), m.data(), t.nbytes());
  return content_hash(t);
}

}  // namespace

Eigen::MatrixXd gram(const Tensor& w) {
  check_weights(w);
  const Index vocab = w.dim(0), d = w.dim(1);
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(d, d);
  // The lower triangle of G is cut into tiles, each one a task that sums its block G[i0:i0+m, j0:j0+nb] over all
  // rows of W, chunk by chunk, in one thread. So every entry is summed in the same order whatever the thread count
  // (repeated runs and the cache agree bit for bit), tasks write disjoint blocks, and only the lower triangle is
  // computed (SYRK's half of the work, plus half of each diagonal tile). f32 weights are widened to fp64 per chunk,
  // only the columns a tile needs: (m + nb) conversions per m x nb multiply-adds, about 1%. Inside the parallel
  // region Eigen's GEMM runs single-threaded. Sizes measured on GPT-2's 50257 x 768: tall tiles cost no more than
  // whole column panels on one core, and 17 tasks of similar size keep more cores busy than 8 panels would.
  constexpr Index kCols = 96;    // tile width
  constexpr Index kRows = 256;   // tile height
  constexpr Index kChunk = 512;  // rows of W per GEMM: widened chunks (<= 1.4 MiB) stay in L2/L3
  struct Tile {
    Index i0, j0, m, nb;
  };
  std::vector<Tile> tiles;
  for (Index j0 = 0; j0 < d; j0 += kCols)
    for (Index i0 = j0; i0 < d; i0 += kRows)
      tiles.push_back({i0, j0, std::min(kRows, d - i0), std::min(kCols, d - j0)});
  // Largest first, so that dynamic scheduling ends with small tasks.
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.m * a.nb > b.m * b.nb; });
  const auto count = static_cast<std::ptrdiff_t>(tiles.size());
#pragma omp parallel
  {
    RowMatrixD row_buffer, col_buffer;
#pragma omp for schedule(dynamic, 1)
    for (std::ptrdiff_t k = 0; k < count; ++k) {
      const Tile t = tiles[static_cast<std::size_t>(k)];
      Eigen::MatrixXd acc = Eigen::MatrixXd::Zero(t.m, t.nb);
      for (Index r0 = 0; r0 < vocab; r0 += kChunk) {
        const Index n = std::min(kChunk, vocab - r0);
        const auto rows = columns_f64(w, r0, n, t.i0, t.m, row_buffer);  // [n, m]
        const auto cols = columns_f64(w, r0, n, t.j0, t.nb, col_buffer);  // [n, nb]
        acc.noalias() += rows.transpose() * cols;
      }
      g.block(t.i0, t.j0, t.m, t.nb) = acc;
    }
  }
  for (Index j = 0; j < d; ++j)  // mirror the lower triangle: G is exactly symmetric
    for (Index i = 0; i < j; ++i) g(i, j) = g(j, i);
  return g;
}

Eigen::MatrixXd gram_pseudo_inverse(const Eigen::MatrixXd& gram, std::int64_t rows, GramPinvInfo* info) {
  const Index d = gram.rows();
  if (gram.cols() != d) throw Error("pinv decoder: the Gram matrix is not square");
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram, Eigen::ComputeEigenvectors);  // reads the lower half
  if (solver.info() != Eigen::Success) throw Error("pinv decoder: the eigendecomposition of wte^T wte failed");
  const Eigen::VectorXd& lambda = solver.eigenvalues();  // ascending
  const double lambda_max = d > 0 ? std::max(lambda(d - 1), 0.0) : 0.0;
  const double cutoff =
      lambda_max * static_cast<double>(std::max<std::int64_t>(rows, d)) * std::numeric_limits<double>::epsilon();
  Index rank = 0;
  while (rank < d && lambda(d - 1 - rank) > cutoff) ++rank;
  // G^+ = B B^T with B = Q_r diag(lambda_r^-1/2): computed as a rank update of the lower triangle and mirrored,
  // so G^+ is exactly symmetric like G.
  const Eigen::MatrixXd b =
      solver.eigenvectors().rightCols(rank) * lambda.tail(rank).cwiseSqrt().cwiseInverse().asDiagonal();
  Eigen::MatrixXd g_pinv = Eigen::MatrixXd::Zero(d, d);
  g_pinv.selfadjointView<Eigen::Lower>().rankUpdate(b);
  for (Index j = 0; j < d; ++j)
    for (Index i = 0; i < j; ++i) g_pinv(i, j) = g_pinv(j, i);
  if (info) {
    info->rank = rank;
    info->lambda_max = lambda_max;
    info->cutoff = cutoff;
  }
  return g_pinv;
}

void project_rows(const Tensor& w, const Eigen::MatrixXd& y, double* out) {
  check_weights(w);
  const Index vocab = w.dim(0), d = w.dim(1), positions = y.cols();
  if (y.rows() != d) throw Error("pinv decoder: project_rows: y has " + std::to_string(y.rows()) + " rows, not d");
  const RowMatrixD yt = y.transpose();  // [T, d]: each position's vector contiguous
  // Row blocks of W are independent tasks, and each score is one dot product whose summation order depends only
  // on its row's place in its block: the result does not depend on the thread count. For a handful of positions
  // this reads W once and is bound by memory bandwidth; widened f32 blocks (96 KiB at d = 768) stay in L2.
  constexpr Index kBlock = 16;
  const Index blocks = (vocab + kBlock - 1) / kBlock;
#pragma omp parallel
  {
    RowMatrixD buffer;
#pragma omp for schedule(static)
    for (Index b = 0; b < blocks; ++b) {
      const Index r0 = b * kBlock, n = std::min(kBlock, vocab - r0);
      const auto rows = columns_f64(w, r0, n, 0, d, buffer);  // contiguous: outer stride d
      dot_rows(rows.data(), n, d, yt.data(), positions, out + r0, vocab);
    }
  }
}

void pinv_vocab_rows(const Tensor& w, const Eigen::MatrixXd& et, double* out) {
  const Eigen::MatrixXd g_pinv = gram_pseudo_inverse(gram(w), w.dim(0));
  project_rows(w, g_pinv * et, out);
}

Decoded masked_top_k_rows(const double* scores, std::int64_t rows, std::int64_t cols, std::int64_t k,
                          const std::vector<std::uint8_t>& mask) {
  if (static_cast<std::int64_t>(mask.size()) != cols)
    throw Error("pinv decoder: the mask has " + std::to_string(mask.size()) + " entries for " + std::to_string(cols) +
                " scores");
  std::vector<double> masked(scores, scores + rows * cols);
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t v = 0; v < cols; ++v) masked[t * cols + v] *= mask[v] ? 1.0 : 0.0;
  return top_k_rows(masked.data(), rows, cols, k);
}

Decoded top_k_rows(const double* scores, std::int64_t rows, std::int64_t cols, std::int64_t k,
                   const std::vector<std::uint8_t>& allowed) {
  if (k < 1) throw Error("pinv decoder: top-k needs k >= 1, got " + std::to_string(k));
  if (!allowed.empty() && static_cast<std::int64_t>(allowed.size()) != cols)
    throw Error("pinv decoder: the allowed mask has " + std::to_string(allowed.size()) + " entries for " +
                std::to_string(cols) + " scores");
  std::vector<std::int64_t> candidates;
  for (std::int64_t v = 0; v < cols; ++v)
    if (allowed.empty() || allowed[v]) candidates.push_back(v);
  if (static_cast<std::int64_t>(candidates.size()) < k)
    throw Error("pinv decoder: top-" + std::to_string(k) + " of " + std::to_string(candidates.size()) +
                " candidate tokens");

  Decoded out;
  out.positions = rows;
  out.k = k;
  out.ids.resize(static_cast<std::size_t>(rows * k));
  out.scores.resize(static_cast<std::size_t>(rows * k));
  std::vector<std::int64_t> order;
  for (std::int64_t t = 0; t < rows; ++t) {
    const double* row = scores + t * cols;
    // A strict total order: higher score first, NaN last, equal scores by lower id. So the result is the same
    // whatever the sort does with equal keys.
    auto better = [row](std::int64_t a, std::int64_t b) {
      const double sa = row[a], sb = row[b];
      const bool na = std::isnan(sa), nb = std::isnan(sb);
      if (na != nb) return nb;
      if (!na && sa != sb) return sa > sb;
      return a < b;
    };
    order = candidates;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
    for (std::int64_t r = 0; r < k; ++r) {
      out.ids[t * k + r] = order[r];
      out.scores[t * k + r] = row[order[r]];
    }
  }
  return out;
}

std::vector<std::int64_t> read_ids_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("pinv decoder: cannot read the ids file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  std::vector<std::int64_t> ids;
  std::string word;
  auto take = [&]() {
    if (word.empty()) return;
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(word.c_str(), &end, 10);
    if (*end != '\0' || errno == ERANGE || v < 0)
      throw Error("pinv decoder: ids file '" + path + "': '" + word + "' is not a token id (an integer >= 0)");
    ids.push_back(v);
    word.clear();
  };
  for (char c : text.str()) {
    if (c == ',' || std::isspace(static_cast<unsigned char>(c)))
      take();
    else
      word += c;
  }
  take();
  if (ids.empty()) throw Error("pinv decoder: ids file '" + path + "' holds no ids");
  return ids;
}

std::vector<std::uint8_t> allowed_mask(const std::vector<std::int64_t>& ids, std::int64_t vocab,
                                       const std::string& what) {
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(vocab), 0);
  for (std::int64_t id : ids) {
    if (id < 0 || id >= vocab)
      throw Error(what + ": token id " + std::to_string(id) + " is outside [0, " + std::to_string(vocab) + ")");
    mask[id] = 1;
  }
  return mask;
}

std::string cache_file_name(const Tensor& w) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(content_hash(w)));
  return "pinv-" + std::string(hex) + "-" + std::to_string(w.rank() == 2 ? w.dim(1) : 0) + ".bin";
}

std::optional<Eigen::MatrixXd> read_cache(const std::string& path, const Tensor& w, GramPinvInfo* info) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::nullopt;
  auto ignore = [&](const std::string& why) -> std::optional<Eigen::MatrixXd> {
    warn("ignoring the cache file '" + path + "' (" + why + "); computing the pseudo-inverse again");
    return std::nullopt;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) return ignore("it cannot be opened");
  CacheHeader h{};
  if (!in.read(reinterpret_cast<char*>(&h), sizeof h)) return ignore("it is shorter than its header");
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return ignore("it is not a pinv cache file");
  if (h.version != kVersion || h.header_bytes != sizeof h)
    return ignore("version " + std::to_string(h.version) + ", expected " + std::to_string(kVersion));
  const std::int64_t vocab = w.dim(0), d = w.dim(1);
  if (h.d != d || h.vocab != vocab || h.weights_hash != content_hash(w))
    return ignore("it was made for other weights");
  const auto expected = static_cast<std::uintmax_t>(sizeof h + static_cast<std::size_t>(d * d) * sizeof(double));
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec || size != expected)
    return ignore("size " + std::to_string(size) + " bytes, expected " + std::to_string(expected));
  Eigen::MatrixXd g_pinv(d, d);
  if (!in.read(reinterpret_cast<char*>(g_pinv.data()), static_cast<std::streamsize>(d * d * sizeof(double))))
    return ignore("it could not be read to the end");
  if (payload_hash(g_pinv) != h.payload_hash) return ignore("its checksum does not match");
  if (info) {
    info->rank = h.rank;
    info->lambda_max = h.lambda_max;
    info->cutoff = h.cutoff;
  }
  return g_pinv;
}

void write_cache(const std::string& path, const Tensor& w, const Eigen::MatrixXd& g_pinv, const GramPinvInfo& info) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path target(path);
  if (target.has_parent_path()) {
    fs::create_directories(target.parent_path(), ec);
    if (ec) {
      warn("cannot create the cache folder '" + target.parent_path().string() + "': " + ec.message());
      return;
    }
  }
  CacheHeader h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  h.header_bytes = sizeof h;
  h.d = w.dim(1);
  h.vocab = w.dim(0);
  h.weights_hash = content_hash(w);
  h.payload_hash = payload_hash(g_pinv);
  h.rank = info.rank;
  h.lambda_max = info.lambda_max;
  h.cutoff = info.cutoff;
  // A unique temporary name in the same folder (rename is atomic only within one file system): concurrent
  // runs each write their own and the last rename wins with a complete file.
  std::random_device random;
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, ".tmp%08x%08x", random(), random());
  const fs::path temporary = path + suffix;
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&h), sizeof h);
    out.write(reinterpret_cast<const char*>(g_pinv.data()),
              static_cast<std::streamsize>(g_pinv.size() * sizeof(double)));
    out.close();
    if (!out) {
      fs::remove(temporary, ec);
      warn("cannot write the cache file '" + temporary.string() + "'");
      return;
    }
  }
  fs::rename(temporary, target, ec);
  if (ec) {
    warn("cannot rename '" + temporary.string() + "' to '" + path + "': " + ec.message());
    fs::remove(temporary, ec);
  }
}

}  // namespace pinv

// ---- the decoder ----------------------------------------------------------------------------------------------

void PseudoInverseDecoder::configure(const Options& options) {
  options_ = options;
  top_k_ = options.get_int("top_k", 1);
  if (top_k_ < 1) options.fail("top_k", "must be at least 1");
  has_allowed_text_ = options.has("allowed");
  allowed_text_ = options.get_string("allowed", "");
  allowed_ids_path_ = options.get_string("allowed_ids", "");
  if (options.has("allowed_ids")) {
    if (allowed_ids_path_.empty()) options.fail("allowed_ids", "expected the path of a file of token ids");
    // Read now so that a missing or malformed file fails before anything expensive; ids are checked against
    // the vocabulary in prepare(), when its size is known.
    try {
      allowed_file_ids_ = pinv::read_ids_file(allowed_ids_path_);
    } catch (const Error& e) {
      options.fail("allowed_ids", e.what());
    }
  }
  mask_ = options.get_choice("restrict", "allowed", {"allowed", "mask"}) == "mask";
  if (mask_ && !options.has("allowed") && !options.has("allowed_ids"))
    options.fail("restrict", "mask needs `allowed` or `allowed_ids`: the tokens the mask keeps");
  cache_ = options.get_bool("cache", true);
}

void PseudoInverseDecoder::prepare(const DecoderSetup& setup) {
  prepared_ = false;
  space_ = setup.spec.input;
  vocab_ = setup.spec.vocab_size;
  dim_ = setup.spec.n_embd;
  weights_ = setup.weights;
  wte_ = nullptr;
  wte_widened_ = Tensor();
  gram_pinv_ = Eigen::MatrixXd();
  info_ = pinv::GramPinvInfo();
  allowed_.clear();

  // Everything cheap is checked before the pseudo-inverse, so a bad option fails at once.
  if (top_k_ > vocab_)
    options_.fail("top_k", "exceeds the vocabulary size " + std::to_string(vocab_));
  if (has_allowed_text_ || !allowed_file_ids_.empty()) {
    std::vector<std::int64_t> ids;
    if (has_allowed_text_) {
      if (!setup.tokenize) options_.fail("allowed", "the pinv decoder was given no tokenizer");
      ids = setup.tokenize(allowed_text_);
      if (ids.empty()) options_.fail("allowed", "the text has no tokens");
      // The tokenizer's ids are checked too: a tokenizer for another vocabulary is caught here.
      try {
        pinv::allowed_mask(ids, vocab_, "the tokenized text");
      } catch (const Error& e) {
        options_.fail("allowed", e.what());
      }
    }
    try {
      pinv::allowed_mask(allowed_file_ids_, vocab_, "file '" + allowed_ids_path_ + "'");
    } catch (const Error& e) {
      options_.fail("allowed_ids", e.what());
    }
    ids.insert(ids.end(), allowed_file_ids_.begin(), allowed_file_ids_.end());
    allowed_ = pinv::allowed_mask(ids, vocab_, "pinv decoder: allowed");
    const auto count = std::count(allowed_.begin(), allowed_.end(), std::uint8_t{1});
    if (top_k_ > count && !mask_)
      options_.fail("top_k", "exceeds the " + std::to_string(count) + " allowed tokens");
  }

  if (space_ == InputSpace::embedding) {
    if (!weights_) throw Error("pinv decoder: no weights given");
    const Tensor& wte = weights_->get("wte.weight", {vocab_, dim_});
    if (wte.dtype() == DType::bf16) {
      wte_widened_ = wte.to(DType::f32);  // bf16 is exact in f32; the cache stays keyed by the original bytes
      wte_ = &wte_widened_;
    } else {
      wte_ = &wte;
    }

    const bool caching = cache_ && !setup.cache_dir.empty();
    if (caching) {
      info_.cache_path = (std::filesystem::path(setup.cache_dir) / pinv::cache_file_name(wte)).string();
      if (auto cached = pinv::read_cache(info_.cache_path, wte, &info_)) {
        gram_pinv_ = std::move(*cached);
        info_.from_cache = true;
      }
    }
    if (!info_.from_cache) {
      auto start = std::chrono::steady_clock::now();
      const Eigen::MatrixXd g = pinv::gram(*wte_);
      info_.gram_seconds = pinv::seconds_since(start);
      start = std::chrono::steady_clock::now();
      gram_pinv_ = pinv::gram_pseudo_inverse(g, vocab_, &info_);
      info_.eigen_seconds = pinv::seconds_since(start);
      if (caching) pinv::write_cache(info_.cache_path, wte, gram_pinv_, info_);
    }
  }
  prepared_ = true;
}

Tensor PseudoInverseDecoder::as_matrix(const Tensor& input, std::int64_t cols, const char* what) const {
  const bool ok = (input.rank() == 2 && input.dim(1) == cols) ||
                  (input.rank() == 3 && input.dim(0) == 1 && input.dim(2) == cols);
  if (!ok)
    throw Error("pinv decoder: input " + shape_string(input.shape()) + " is not [T, " + what + " = " +
                std::to_string(cols) + "]");
  Tensor m = input.to(DType::f64);
  return input.rank() == 2 ? m : std::move(m).reshape({input.dim(1), cols});
}

std::vector<double> PseudoInverseDecoder::pinv_scores(const Tensor& input) const {
  if (!prepared_ || space_ != InputSpace::embedding)
    throw Error("pinv decoder: pinv_scores needs prepare() with input = embedding");
  const Tensor x = as_matrix(input, dim_, "d");
  const std::int64_t positions = x.dim(0);
  // Row-major x [T, d] is column-major x^T [d, T]: y = G^+ x^T.
  const Eigen::Map<const Eigen::MatrixXd> xt(x.data<double>(), dim_, positions);
  const Eigen::MatrixXd y = gram_pinv_ * xt;
  std::vector<double> scores(static_cast<std::size_t>(positions * vocab_));
  pinv::project_rows(*wte_, y, scores.data());
  return scores;
}

Decoded PseudoInverseDecoder::decode(const Tensor& input) {
  if (!prepared_) throw Error("pinv decoder: decode() before prepare()");
  if (space_ == InputSpace::vocab) {
    // Vocab-space inputs already are scores over the vocabulary.
    const Tensor x = as_matrix(input, vocab_, "V");
    if (mask_) return pinv::masked_top_k_rows(x.data<double>(), x.dim(0), vocab_, top_k_, allowed_);
    return pinv::top_k_rows(x.data<double>(), x.dim(0), vocab_, top_k_, allowed_);
  }
  const std::vector<double> scores = pinv_scores(input);
  const std::int64_t positions = static_cast<std::int64_t>(scores.size()) / vocab_;
  if (mask_) return pinv::masked_top_k_rows(scores.data(), positions, vocab_, top_k_, allowed_);
  return pinv::top_k_rows(scores.data(), positions, vocab_, top_k_, allowed_);
}

}  // namespace lminv
