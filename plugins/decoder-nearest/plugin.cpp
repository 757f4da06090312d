// The nearest decoder as a plugin module: the class lives in lminv_nearest_core, this file only exports it.
#include "lminv/plugin.hpp"
#include "nearest_decoder.hpp"

using lminv::NearestDecoder;

LMINV_PLUGIN(NearestDecoder, "nearest", "0.1.0", "nearest token embedding by L2 or cosine, top-k, optional allowed vocabulary")
