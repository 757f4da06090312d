// The pez optimizer as a plugin module: the class lives in lminv_pez_core.
#include "lminv/plugin.hpp"

#include "pez.hpp"

using lminv::Pez;

LMINV_PLUGIN(Pez, "pez", "0.1.0",
             "PEZ (Wen et al. 2023): a continuous prompt updated by the gradient at its nearest-token projection")
