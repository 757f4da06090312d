// The brute_force optimizer as a plugin module: the class lives in lminv_sequential_core.
#include "lminv/plugin.hpp"
#include "sequential.hpp"

LMINV_PLUGIN(lminv::sequential::BruteForceOptimizer, "brute_force", "0.1.0",
             "exact recovery position by position: every token verified in vocabulary order")
