// The tape. An op that produces a tensor from inputs needing gradients attaches a Node to its output holding
// the backward rule (a closure that captured what it needs). backward() walks the nodes in reverse
// topological order, runs each rule once and accumulates into the leaves' .grad.
// A node points at the nodes that made its inputs, not at the input tensors: an activation that no rule
// captured is freed as soon as the forward pass drops it, so the memory held until backward is what the rules
// saved (as in PyTorch), not every intermediate on the way to the loss.
#pragma once
#include <functional>
#include <vector>

#include "tensor/tensor.h"

namespace psa {

using Grads = std::vector<Tensor>;  // one per input, undefined = no gradient for that input
using BackwardFn = std::function<Grads(const Tensor& grad_out)>;

// Where the gradient of one input goes: the node that produced it, or the input itself when it is a leaf
// (a parameter, or a tensor made with requires_grad). Undefined for inputs that need no gradient.
struct Edge {
  std::shared_ptr<Node> producer;
  std::shared_ptr<TensorImpl> leaf;
  Shape shape;  // the input's: a rule's gradient must have it
  bool defined() const { return producer || leaf; }
};

// A tensor a backward rule captured, as it was when the rule was recorded (Storage::version). Weak: the rule's
// capture is what keeps the memory alive.
struct SavedVersion {
  std::weak_ptr<const Storage> storage;
  uint64_t version = 0;
  Shape shape;
};

struct Node {
  const char* op = "";
  std::vector<Edge> inputs;  // one per input of the op
  BackwardFn backward;       // null once it has run: a graph is used once
  std::vector<SavedVersion> saved;
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
// `saved`: the tensors `backward` captured (undefined ones are skipped); backward() fails, naming the op, if one
// was written in place since (torch's "modified by an inplace operation").
Tensor record(const char* op, Tensor out, const std::vector<Tensor>& inputs, BackwardFn backward,
              const std::vector<Tensor>& saved = {});

// For ops without a backward: if a gradient could reach them, the graph gets a node that fails loudly.
Tensor record_nondifferentiable(const char* op, Tensor out, const std::vector<Tensor>& inputs);

struct OpRow {
  const char* name;
  const char* family;  // the file holding its forward and backward
};
const std::vector<OpRow>& op_table();
bool is_registered_op(const char* name);

}  // namespace psa
