// The roofline arithmetic of `lminv bench` (host/roofline.hpp) on synthetic cases, and the machine probes' sanity
// (finite, positive figures; not their speed, which tests never judge).
#include "roofline.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "lminv/error.hpp"

namespace lminv::roofline {
namespace {

TEST(Roofline, MemoryBoundWhenBytesOutweighFlops) {
  // GPT-2 small, 12 blocks and the lm_head, f32, batch 1, T = 5: 123.5 M parameters read twice (989 MB) and
  // 4 x 123.5 M x 5 FLOPs, on a machine reading 36 GB/s and multiplying at 377 GFLOP/s.
  const double params = 123.5e6;
  const Bound b = bound(2 * params * 4, 4 * params * 5, 36e9, 377e9);
  EXPECT_NEAR(b.memory_s, 2 * params * 4 / 36e9, 1e-15);
  EXPECT_NEAR(b.compute_s, 4 * params * 5 / 377e9, 1e-15);
  EXPECT_DOUBLE_EQ(b.seconds(), b.memory_s);
  EXPECT_STREQ(b.limiter(), "memory");
  EXPECT_NEAR(b.seconds(), 0.02744, 1e-5);  // 27 ms, as issue #12 works it out
}

TEST(Roofline, ComputeBoundAtLargeBatches) {
  const double params = 123.5e6;
  const Bound b = bound(2 * params * 4, 4 * params * 5 * 32, 36e9, 377e9);  // batch 32
  EXPECT_STREQ(b.limiter(), "compute");
  EXPECT_DOUBLE_EQ(b.seconds(), b.compute_s);
  EXPECT_NEAR(b.compute_s, 4 * params * 160 / 377e9, 1e-15);
  EXPECT_GT(b.compute_s, b.memory_s);
}

TEST(Roofline, WithoutAGemmRateOnlyMemoryCounts) {
  const Bound b = bound(1e9, 1e15, 1e10, 0);
  EXPECT_DOUBLE_EQ(b.compute_s, 0);
  EXPECT_DOUBLE_EQ(b.seconds(), 0.1);
}

TEST(Roofline, ATimeAtTheBoundIsOneTimesIt) {
  // The bench reports s / bound; a step taking exactly max(memory, compute) is at 1x, and the bound of the
  // sum of two steps is at most the sum of their bounds.
  const Bound a = bound(4e8, 2e9, 2e10, 1e11), b = bound(1e8, 4e10, 2e10, 1e11);
  EXPECT_DOUBLE_EQ(0.02 / a.seconds(), 1.0);
  const Bound both = bound(5e8, 4.2e10, 2e10, 1e11);
  EXPECT_LE(both.seconds(), a.seconds() + b.seconds());
}

TEST(Roofline, BadArgumentsAreErrors) {
  EXPECT_THROW(bound(-1, 0, 1e9, 1e9), Error);
  EXPECT_THROW(bound(1, NAN, 1e9, 1e9), Error);
  EXPECT_THROW(bound(1, 1, 0, 1e9), Error);
  EXPECT_THROW(bound(1, 1, INFINITY, 1e9), Error);
  EXPECT_THROW(read_bandwidth(-1, 1 << 20, 1), Error);
  EXPECT_THROW(read_bandwidth(1, 4, 1), Error);
}

TEST(Roofline, ProbesGiveFinitePositiveRates) {
  const double read = read_bandwidth(0, std::size_t{1} << 22, 2), copy = copy_bandwidth(2, std::size_t{1} << 22, 2);
  EXPECT_TRUE(std::isfinite(read) && read > 0);
  EXPECT_TRUE(std::isfinite(copy) && copy > 0);
  EXPECT_GE(all_threads(), 1);
}

TEST(Roofline, PeakResidentMemoryFollowsAnAllocation) {
  if (peak_resident_bytes() < 0) GTEST_SKIP() << "this kernel reports no VmHWM";
  if (!reset_peak_resident()) GTEST_SKIP() << "this kernel does not reset the peak (/proc/self/clear_refs)";
  const double before = peak_resident_bytes();
  {
    std::vector<char> touched(std::size_t{64} << 20, 1);  // 64 MiB written
    EXPECT_GE(peak_resident_bytes(), before + 60.0 * (1 << 20));
  }
  ASSERT_TRUE(reset_peak_resident());
  EXPECT_LT(peak_resident_bytes(), before + 32.0 * (1 << 20));  // the reset forgets the freed 64 MiB
}

}  // namespace
}  // namespace lminv::roofline
