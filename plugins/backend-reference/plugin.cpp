// The reference backend as a plugin module: lib/lminv/plugins/lminv-plugin-reference.so.
#include "lminv/plugin.hpp"

#include "reference_backend.hpp"

LMINV_PLUGIN(lminv::reference::ReferenceBackend, "reference", "0.1.0",
             "hand-written reference backend (f64, f32 on the CPU): the numerical ground truth")
