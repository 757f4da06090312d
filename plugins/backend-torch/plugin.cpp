// The torch backend as a plugin module: lib/lminv/plugins/lminv-plugin-torch.so.
#include "lminv/plugin.hpp"

#include "torch_backend.hpp"

LMINV_PLUGIN(lminv::torch_backend::TorchBackend, "torch", "0.1.0",
             "LibTorch backend (autograd): f32, f64, bf16 on cpu, and cuda where LibTorch has it")
