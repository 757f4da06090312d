// An optimizer that claims the name of the built-in `descent`: the second one found must be refused.
#include "lminv/plugin.hpp"

namespace {
class DescentTwin final : public lminv::Optimizer {
 public:
  void configure(const lminv::Options&) override {}
  lminv::Result run(lminv::Problem&, lminv::Observer&) override { throw lminv::Error("descent-twin: never run"); }
};
}  // namespace

LMINV_PLUGIN(DescentTwin, "descent", "0.0.1", "a twin of the built-in descent, to be refused")
