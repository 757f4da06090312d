// The oneDNN backend as a plugin module: lib/lminv/plugins/lminv-plugin-onednn-backend.so (config name "onednn").
#include "lminv/plugin.hpp"

#include "onednn_backend.hpp"

LMINV_PLUGIN(
    lminv::onednn::OnednnBackend, "onednn", "0.1.0",
    "oneDNN 2.6 primitives on the CPU (f32): the decoder (every family), fcnet, fcnet_noninvertible, transformer_mlp")
