// The orthogonal_walk optimizer as a plugin module: the class lives in lminv_orthogonal_walk_core.
#include "lminv/plugin.hpp"

#include "orthogonal_walk.hpp"

using lminv::OrthogonalWalk;

LMINV_PLUGIN(OrthogonalWalk, "orthogonal_walk", "0.1.0",
             "walk from the true input along null-space right-singular vectors of the input gradient (seed study)")
