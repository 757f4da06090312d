// The seed study's MLP families: no Hugging Face checkpoints, seeded nn.Linear-style weights (weights_init.cpp).
#include "family.hpp"
#include "lminv/error.hpp"

namespace lminv {
namespace {

class MlpFamily final : public FamilyAdapter {
 public:
  explicit MlpFamily(ModelKind kind) : kind_(kind) {}
  std::string name() const override { return kind_name(kind_); }
  ModelKind kind() const override { return kind_; }
  bool has_checkpoints() const override { return false; }
  void set_architecture(ModelSpec& s) const override { s.kind = kind_; }
  void read_config(const ConfigFields& f, ModelSpec&) const override {
    f.fail("family '" + name() + "' has no Hugging Face checkpoints");
  }
  nlohmann::json write_config(const ModelSpec&, DType) const override {
    throw Error("family '" + name() + "' has no Hugging Face checkpoints");
  }
  std::vector<TensorRule> tensor_rules(const ModelSpec&) const override { return {}; }

 private:
  ModelKind kind_;
};

}  // namespace

const FamilyAdapter& fcnet_family() {
  static const MlpFamily f(ModelKind::fcnet);
  return f;
}
const FamilyAdapter& fcnet_noninvertible_family() {
  static const MlpFamily f(ModelKind::fcnet_noninvertible);
  return f;
}
const FamilyAdapter& transformer_mlp_family() {
  static const MlpFamily f(ModelKind::transformer_mlp);
  return f;
}

}  // namespace lminv
