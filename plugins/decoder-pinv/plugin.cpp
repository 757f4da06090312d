// The pinv decoder as a plugin module: the class lives in lminv_pinv_core, this file only exports it.
#include "lminv/plugin.hpp"
#include "pinv_decoder.hpp"

using lminv::PseudoInverseDecoder;

LMINV_PLUGIN(PseudoInverseDecoder, "pinv", "0.1.0", "argmax / top-k of input x pinv(wte), optional allowed vocabulary")
