// The differentiable op table: one row per op that records a backward rule. tests/test_ops.cpp walks this
// table and fails when a row has no forward test against the f64 reference or no finite-difference check.
#include "autograd/autograd.h"

namespace psa {

const std::vector<OpRow>& op_table() {
  static const std::vector<OpRow> rows = {
      {"add", "elementwise"},        {"sub", "elementwise"},          {"mul", "elementwise"},
      {"div", "elementwise"},        {"add_scalar", "elementwise"},   {"mul_scalar", "elementwise"},
      {"neg", "elementwise"},        {"exp", "elementwise"},          {"log", "elementwise"},
      {"sqrt", "elementwise"},       {"rsqrt", "elementwise"},        {"pow_scalar", "elementwise"},
      {"tanh", "elementwise"},       {"sigmoid", "elementwise"},      {"relu", "elementwise"},
      {"gelu", "elementwise"},       {"quick_gelu", "elementwise"},   {"silu", "elementwise"},
      {"swiglu", "elementwise"},       {"bias_act", "elementwise"},
      {"sum", "reduce"},             {"max", "reduce"},               {"matmul", "matmul"},
      {"reshape", "shape"},          {"permute", "shape"},            {"concat", "shape"},
      {"slice", "shape"},            {"expand", "shape"},             {"index_select", "shape"},
      {"layer_norm", "nn"},          {"rms_norm", "nn"},              {"softmax", "nn"},
      {"log_softmax", "nn"},         {"cross_entropy", "nn"},         {"dropout", "nn"},
      {"rope", "attention"},         {"attention", "attention"},      {"patch_conv", "conv"},
      {"depthwise_conv3x3", "conv"}, {"adaptive_avg_pool2d", "conv"},
  };
  return rows;
}

}  // namespace psa
