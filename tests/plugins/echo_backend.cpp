// A small backend for host tests: the identity model (output = input), any family, f32 and f64.
// It lets the host's tests exercise configs, the registry and optimizers without a real model.
#include "lminv/plugin.hpp"

namespace {

using namespace lminv;

class EchoModel final : public Model {
 public:
  explicit EchoModel(ModelSpec spec) : spec_(std::move(spec)) {}
  const ModelSpec& spec() const override { return spec_; }
  Tensor forward(const Tensor& input) override { return input; }
  Tensor backward(const Tensor&, const Tensor& grad_output) override { return grad_output; }

 private:
  ModelSpec spec_;
};

class EchoBackend final : public Backend {
 public:
  BackendInfo info() const override {
    return {{ModelKind::fcnet, ModelKind::fcnet_noninvertible, ModelKind::transformer_mlp, ModelKind::decoder},
            {},
            {DType::f32, DType::f64},
            {"cpu"}};
  }
  void configure(const Options& options) override { (void)options.get_int("threads", 0); }
  std::unique_ptr<Model> create_model(const ModelSpec& spec, std::shared_ptr<const WeightSet>) override {
    return std::make_unique<EchoModel>(spec);
  }
};

}  // namespace

LMINV_PLUGIN(EchoBackend, "echo", "0.0.1", "identity model, for tests")
