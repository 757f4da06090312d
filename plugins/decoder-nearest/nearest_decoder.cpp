#include "nearest_decoder.hpp"

#include <algorithm>
#include <cmath>

#include <Eigen/Dense>

#include "pinv_decoder.hpp"

namespace lminv {

namespace {

// The pinv helpers' messages start with "pinv decoder: "; this decoder's errors should not.
std::string without_pinv_prefix(const std::string& message) {
  const std::string prefix = "pinv decoder: ";
  return message.compare(0, prefix.size(), prefix) == 0 ? message.substr(prefix.size()) : message;
}

}  // namespace

void NearestDecoder::configure(const Options& options) {
  options_ = options;
  distance_ = options.get_choice("metric", "l2", {"l2", "cosine"}) == "cosine" ? Distance::cosine : Distance::l2;
  top_k_ = options.get_int("top_k", 1);
  if (top_k_ < 1) options.fail("top_k", "must be at least 1");
  has_allowed_text_ = options.has("allowed");
  allowed_text_ = options.get_string("allowed", "");
  allowed_ids_path_ = options.get_string("allowed_ids", "");
  allowed_file_ids_.clear();
  if (options.has("allowed_ids")) {
    if (allowed_ids_path_.empty()) options.fail("allowed_ids", "expected the path of a file of token ids");
    try {
      allowed_file_ids_ = pinv::read_ids_file(allowed_ids_path_);
    } catch (const Error& e) {
      options.fail("allowed_ids", without_pinv_prefix(e.what()));
    }
  }
}

void NearestDecoder::prepare(const DecoderSetup& setup) {
  prepared_ = false;
  space_ = setup.spec.input;
  vocab_ = setup.spec.vocab_size;
  dim_ = setup.spec.n_embd;
  weights_ = setup.weights;
  wte_ = nullptr;
  wte_widened_ = Tensor();
  row_norms_.clear();
  allowed_.clear();

  if (top_k_ > vocab_) options_.fail("top_k", "exceeds the vocabulary size " + std::to_string(vocab_));
  if (has_allowed_text_ || !allowed_file_ids_.empty()) {
    std::vector<std::int64_t> ids;
    if (has_allowed_text_) {
      if (!setup.tokenize) options_.fail("allowed", "the nearest decoder was given no tokenizer");
      ids = setup.tokenize(allowed_text_);
      if (ids.empty()) options_.fail("allowed", "the text has no tokens");
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
    allowed_ = pinv::allowed_mask(ids, vocab_, "nearest decoder: allowed");
    const auto count = std::count(allowed_.begin(), allowed_.end(), std::uint8_t{1});
    if (top_k_ > count) options_.fail("top_k", "exceeds the " + std::to_string(count) + " allowed tokens");
  }

  if (space_ == InputSpace::embedding) {
    if (!weights_) throw Error("nearest decoder: no weights given");
    const Tensor& wte = weights_->get("wte.weight", {vocab_, dim_});
    if (wte.dtype() == DType::bf16) {
      wte_widened_ = wte.to(DType::f32);  // bf16 is exact in f32
      wte_ = &wte_widened_;
    } else {
      wte_ = &wte;
    }
    row_norms_.assign(static_cast<std::size_t>(vocab_), 0.0);
    const Tensor& w = *wte_;
    const std::int64_t vocab = vocab_, d = dim_;
    double* norms = row_norms_.data();
    auto norm_rows = [&](auto* rows) {
#pragma omp parallel for schedule(static)
      for (std::int64_t v = 0; v < vocab; ++v) {
        double s = 0;
        for (std::int64_t j = 0; j < d; ++j) {
          const double x = static_cast<double>(rows[v * d + j]);
          s += x * x;
        }
        norms[v] = std::sqrt(s);
      }
    };
    if (w.dtype() == DType::f64)
      norm_rows(w.data<double>());
    else
      norm_rows(w.data<float>());
  }
  prepared_ = true;
}

Tensor NearestDecoder::as_matrix(const Tensor& input, std::int64_t cols, const char* what) const {
  const bool ok = (input.rank() == 2 && input.dim(1) == cols) ||
                  (input.rank() == 3 && input.dim(0) == 1 && input.dim(2) == cols);
  if (!ok)
    throw Error("nearest decoder: input " + shape_string(input.shape()) + " is not [T, " + what + " = " +
                std::to_string(cols) + "]");
  Tensor m = input.to(DType::f64);
  return input.rank() == 2 ? m : std::move(m).reshape({input.dim(1), cols});
}

std::vector<double> NearestDecoder::scores(const Tensor& input) const { return scores(input, nullptr); }

std::vector<double> NearestDecoder::scores(const Tensor& input, std::vector<double>* squared_norms) const {
  if (!prepared_ || space_ != InputSpace::embedding)
    throw Error("nearest decoder: scores needs prepare() with input = embedding");
  const Tensor x = as_matrix(input, dim_, "d");
  const std::int64_t positions = x.dim(0);
  // Row-major x [T, d] is column-major x^T [d, T].
  const Eigen::Map<const Eigen::MatrixXd> xt(x.data<double>(), dim_, positions);
  std::vector<double> out(static_cast<std::size_t>(positions * vocab_));
  pinv::project_rows(*wte_, xt, out.data());  // out[t, v] = <w_v, x_t>
  for (std::int64_t t = 0; t < positions; ++t) {
    const double xx = xt.col(t).squaredNorm();
    const double xn = std::sqrt(xx);
    double* row = out.data() + t * vocab_;
    if (distance_ == Distance::l2 && squared_norms) {
      // For ranking: |x - w|^2 - |x|^2 = |w|^2 - 2 <w, x>, without the |x|^2 that is the same for every token. For a
      // large x, |x|^2 would swamp the differences between tokens in double and every token would tie.
      squared_norms->push_back(xx);
      for (std::int64_t v = 0; v < vocab_; ++v) row[v] = 2.0 * row[v] - row_norms_[v] * row_norms_[v];
    } else if (distance_ == Distance::l2) {
      for (std::int64_t v = 0; v < vocab_; ++v) {
        const double wn = row_norms_[v];
        row[v] = -std::sqrt(std::max(0.0, xx - 2.0 * row[v] + wn * wn));
      }
    } else {
      for (std::int64_t v = 0; v < vocab_; ++v) {
        const double denominator = xn * row_norms_[v];
        row[v] = denominator > 0 ? row[v] / denominator : 0.0;
      }
    }
  }
  return out;
}

Decoded NearestDecoder::decode(const Tensor& input) {
  if (!prepared_) throw Error("nearest decoder: decode() before prepare()");
  if (space_ == InputSpace::vocab) {
    const Tensor x = as_matrix(input, vocab_, "V");
    return pinv::top_k_rows(x.data<double>(), x.dim(0), vocab_, top_k_, allowed_);
  }
  if (distance_ == Distance::cosine) {
    const std::vector<double> s = scores(input);
    return pinv::top_k_rows(s.data(), static_cast<std::int64_t>(s.size()) / vocab_, vocab_, top_k_, allowed_);
  }
  // Ranked by |w|^2 - 2 <w, x> (precise for any |x|), reported as minus the distance.
  std::vector<double> xx;
  const std::vector<double> keys = scores(input, &xx);
  Decoded d = pinv::top_k_rows(keys.data(), static_cast<std::int64_t>(keys.size()) / vocab_, vocab_, top_k_, allowed_);
  for (std::int64_t t = 0; t < d.positions; ++t)
    for (std::int64_t r = 0; r < d.k; ++r) {
      double& s = d.scores[static_cast<std::size_t>(t * d.k + r)];
      s = -std::sqrt(std::max(0.0, xx[static_cast<std::size_t>(t)] - s));
    }
  return d;
}

}  // namespace lminv
