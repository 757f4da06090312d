// The SDK's Tensor at its edges: a default Tensor holds nothing, scalars do not join, absurd shapes are errors, and
// first_non_finite finds NaN and infinities in every dtype.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "lminv/tensor.hpp"

using lminv::DType;
using lminv::Tensor;

TEST(Tensor, ADefaultTensorHasNoElementsAndAScalarHasOne) {
  const Tensor none;
  EXPECT_EQ(none.numel(), 0);
  EXPECT_EQ(none.nbytes(), 0u);
  const Tensor scalar(DType::f64, {});
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 8u);
  EXPECT_EQ(Tensor(DType::f32, {0, 5}).numel(), 0);
}

TEST(Tensor, ScalarsDoNotJoinAlongAFirstDimension) {
  const std::vector<Tensor> parts = {Tensor(DType::f32, {}), Tensor(DType::f32, {})};
  EXPECT_THROW((void)Tensor::concat0(parts), lminv::Error);
  EXPECT_THROW((void)Tensor(DType::f32, {}).slice0(0, 1), lminv::Error);
}

TEST(Tensor, ShapesWhoseSizeOverflowsAreErrorsNotAllocations) {
  for (const lminv::Shape& shape : {lminv::Shape{std::int64_t{1} << 62, 4}, lminv::Shape{4611686018427387904, 768},
                                    lminv::Shape{std::int64_t{1} << 31, std::int64_t{1} << 31, 4},
                                    lminv::Shape{std::numeric_limits<std::int64_t>::max()}}) {
    try {
      Tensor t(DType::f32, shape);
      ADD_FAILURE() << "made " << lminv::shape_string(shape);
    } catch (const lminv::Error& e) {
      EXPECT_NE(std::string(e.what()).find("too many elements"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW((void)Tensor(DType::f32, {2, 3}).reshape({std::int64_t{1} << 62, 8}), lminv::Error);
}

TEST(Tensor, FirstNonFiniteFindsNanAndInfinitiesInEveryDtype) {
  for (DType dtype : {DType::f32, DType::f64, DType::bf16}) {
    SCOPED_TRACE(lminv::dtype_name(dtype));
    Tensor t(dtype, {3, 1000});  // more than one scan block
    for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, 1e30 * std::sin(static_cast<double>(i)));
    EXPECT_EQ(lminv::first_non_finite(t), -1);
    t.set(2500, INFINITY);
    EXPECT_EQ(lminv::first_non_finite(t), 2500);
    t.set(1700, -INFINITY);
    EXPECT_EQ(lminv::first_non_finite(t), 1700);
    t.set(3, NAN);
    EXPECT_EQ(lminv::first_non_finite(t), 3);
    // The largest finite values are finite.
    Tensor big(dtype, {2});
    big.set(0, dtype == DType::f64 ? std::numeric_limits<double>::max() : 3.0e38);
    big.set(1, dtype == DType::f64 ? -std::numeric_limits<double>::max() : -3.0e38);
    EXPECT_EQ(lminv::first_non_finite(big), -1);
  }
  EXPECT_EQ(lminv::first_non_finite(Tensor()), -1);
}
