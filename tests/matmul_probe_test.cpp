// The "matmul_probe" capability (lminv/matmul_probe.hpp) of every backend plugin built here, loaded by name through
// the registry: where a backend offers it, it times a product in each dtype it lists that it multiplies in (a
// finite, positive time) and names any other dtype in an Error. What the time is, tests never judge.
#include "lminv/matmul_probe.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "lminv/lminv.hpp"
#include "registry.hpp"
#include "test_backends.hpp"
#include "weights_init.hpp"

using namespace lminv;

namespace {

const Registry& registry() {
  static const Registry r({LMINV_BUILD_PLUGIN_DIR});
  return r;
}

ModelSpec small_decoder(DType dtype) {
  ModelSpec spec;
  spec.family = "gpt2";
  spec.kind = ModelKind::decoder;
  spec.n_layer = spec.blocks = 1;
  spec.n_embd = 16;
  spec.n_head = 2;
  spec.vocab_size = 11;
  spec.n_positions = 4;
  spec.seq_len = 3;
  spec.head = Head::none;
  spec.dtype = dtype;
  return spec;
}

class MatmulProbe_ : public ::testing::TestWithParam<std::string> {};

TEST_P(MatmulProbe_, TimesProductsInTheBackendsDtypes) {
  std::shared_ptr<Backend> backend = registry().create_backend(GetParam());
  backend->configure(Options("backend", "matmul_probe_test", {{"threads", "1"}}));
  const BackendInfo info = backend->info();
  ASSERT_FALSE(info.dtypes.empty());
  const ModelSpec spec = small_decoder(info.dtypes.front());
  auto model = backend->create_model(spec, std::make_shared<const WeightSet>(init_random_weights(spec, 1)));
  MatmulProbe* probe = matmul_probe_of(*model);
  if (!probe) GTEST_SKIP() << GetParam() << " offers no matmul_probe";
  int timed = 0;
  for (DType dtype : {DType::f64, DType::f32, DType::bf16}) {
    const bool listed = std::find(info.dtypes.begin(), info.dtypes.end(), dtype) != info.dtypes.end();
    try {
      const double s = probe->matmul_seconds(dtype, 33, 17, 65, 2);  // odd sizes: tails of every loop
      EXPECT_TRUE(std::isfinite(s) && s > 0) << GetParam() << " " << dtype_name(dtype) << ": " << s;
      EXPECT_TRUE(listed) << GetParam() << " times products in " << dtype_name(dtype) << ", which it does not list";
      ++timed;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(dtype_name(dtype)), std::string::npos) << e.what();
    }
  }
  EXPECT_GE(timed, 1) << GetParam() << " offers a probe that times nothing";
}

INSTANTIATE_TEST_SUITE_P(Backends, MatmulProbe_, ::testing::ValuesIn(lminv::test::backends_under_test()),
                         [](const auto& info) { return info.param; });

}  // namespace
