// The tape. An op that produces a tensor from inputs needing gradients attaches a Node to its output holding
// the backward rule (a closure that captured what it needs). backward() walks the nodes in reverse
// topological order, runs each rule once and accumulates into the leaves' .grad.
#pragma once
#include <functional>
#include <vector>

#include "tensor/tensor.h"

namespace psa {

using Grads = std::vector<Tensor>;  // one per input, undefined = no gradient for that input
using BackwardFn = std::function<Grads(const Tensor& grad_out)>;

struct Node {
  const char* op = "";
  std::vector<Tensor> inputs;
  BackwardFn backward;
};

bool grad_enabled();

// Inference scope: no graph is recorded while one is alive.
class NoGrad {
 public:
  NoGrad();
  ~NoGrad();
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool previous_;
};

bool any_requires_grad(const std::vector<Tensor>& inputs);

// Makes `out` part of the graph when gradients are on and some input requires one. `op` must be a row of the
// op table (autograd/op_table.cpp): that is how every differentiable op is guaranteed a gradient test.
Tensor record(const char* op, Tensor out, std::vector<Tensor> inputs, BackwardFn backward);

// For ops without a backward: if a gradient could reach them, the graph gets a node that fails loudly.
Tensor record_nondifferentiable(const char* op, Tensor out, const std::vector<Tensor>& inputs);

struct OpRow {
  const char* name;
  const char* family;  // the file holding its forward and backward
};
const std::vector<OpRow>& op_table();
bool is_registered_op(const char* name);

}  // namespace psa
