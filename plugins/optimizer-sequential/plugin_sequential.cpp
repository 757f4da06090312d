// The sequential optimizer as a plugin module: the class lives in lminv_sequential_core.
#include "lminv/plugin.hpp"
#include "sequential.hpp"

LMINV_PLUGIN(lminv::sequential::SequentialOptimizer, "sequential", "0.1.0",
             "exact recovery position by position: ranked candidates verified against the observed state")
