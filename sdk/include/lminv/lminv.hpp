// lminv SDK: everything a plugin needs, in one include.
#pragma once

#include "lminv/backend.hpp"
#include "lminv/decoder.hpp"
#include "lminv/error.hpp"
#include "lminv/model.hpp"
#include "lminv/ops.hpp"
#include "lminv/optimizer.hpp"
#include "lminv/options.hpp"
#include "lminv/plugin.hpp"
#include "lminv/prefix_cache.hpp"
#include "lminv/rng.hpp"
#include "lminv/tensor.hpp"
#include "lminv/weights.hpp"
