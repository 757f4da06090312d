// The clamped_walk optimizer as a plugin module: the class lives in lminv_clamped_walk_core.
#include "lminv/plugin.hpp"

#include "clamped_walk.hpp"

using lminv::ClampedWalk;

LMINV_PLUGIN(ClampedWalk, "clamped_walk", "0.1.0",
             "walk from the true input: noise on one side of a random clamp index, descent on the other (seed study)")
