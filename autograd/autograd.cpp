#include "autograd/autograd.h"

#include <string>
#include <unordered_map>
#include <unordered_set>

#include "autograd/ops.h"
#include "tensor/profile.h"

namespace psa {

namespace {
thread_local bool g_grad_enabled = true;
}

bool grad_enabled() { return g_grad_enabled; }
NoGrad::NoGrad() : previous_(g_grad_enabled) { g_grad_enabled = false; }
NoGrad::~NoGrad() { g_grad_enabled = previous_; }

bool any_requires_grad(const std::vector<Tensor>& inputs) {
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

bool is_registered_op(const char* name) {
  static const std::unordered_set<std::string> names = [] {
    std::unordered_set<std::string> s;
    for (const OpRow& r : op_table()) s.insert(r.name);
    return s;
  }();
  return names.count(name) > 0;
}

Tensor record(const char* op, Tensor out, std::vector<Tensor> inputs, BackwardFn backward) {
  if (!g_grad_enabled || !any_requires_grad(inputs)) return out;
  PSA_CHECK(is_registered_op(op), "internal: op '", op, "' is not in the op table");
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = std::move(inputs);
  node->backward = std::move(backward);
  out.impl()->grad_fn = std::move(node);
  out.impl()->requires_grad = true;
  return out;
}

Tensor record_nondifferentiable(const char* op, Tensor out, const std::vector<Tensor>& inputs) {
  if (!g_grad_enabled || !any_requires_grad(inputs)) return out;
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = inputs;
  std::string name = op;
  node->backward = [name](const Tensor&) -> Grads {
    fail(name, ": has no backward, but a gradient reached it (detach its input or wrap the call in NoGrad)");
  };
  out.impl()->grad_fn = std::move(node);
  out.impl()->requires_grad = true;
  return out;
}

namespace {

// Reverse topological order of the tensors that need a gradient, by iterative DFS (deep graphs must not
// overflow the stack).
// Holds a reference to each tensor so that freeing a node's inputs cannot free a tensor still to be visited.
std::vector<std::shared_ptr<TensorImpl>> topo_order(const std::shared_ptr<TensorImpl>& root) {
  std::vector<std::shared_ptr<TensorImpl>> order;
  std::unordered_set<TensorImpl*> seen{root.get()};
  std::vector<std::pair<std::shared_ptr<TensorImpl>, size_t>> stack{{root, 0}};
  while (!stack.empty()) {
    auto& [t, next] = stack.back();
    Node* node = t->grad_fn.get();
    if (node && next < node->inputs.size()) {
      const Tensor& in = node->inputs[next++];
      if (in.defined() && in.requires_grad() && seen.insert(in.impl()).second) stack.push_back({in.impl_ptr(), 0});
      continue;
    }
    order.push_back(t);
    stack.pop_back();
  }
  return {order.rbegin(), order.rend()};
}

void accumulate(std::unordered_map<TensorImpl*, Tensor>& grads, TensorImpl* t, const Tensor& g) {
  auto it = grads.find(t);
  if (it == grads.end()) grads.emplace(t, g);
  else it->second = add(it->second, g);
}

}  // namespace

void Tensor::backward(const Tensor& grad_output) const {
  PSA_CHECK(requires_grad(), "backward() on a tensor that does not require grad");
  Tensor seed = grad_output;
  if (!seed.defined()) {
    PSA_CHECK(numel() == 1, "backward() without a gradient needs a scalar, got shape ", shape_str(shape()));
    seed = Tensor::ones(shape(), dtype(), device());
  }
  NoGrad no_grad;  // backward rules are computed with ops, but never recorded
  profile::BackwardScope in_backward;
  std::unordered_map<TensorImpl*, Tensor> grads;
  grads.emplace(impl(), seed);
  std::vector<std::shared_ptr<TensorImpl>> order = topo_order(impl_ptr());
  for (std::shared_ptr<TensorImpl>& held : order) {
    std::shared_ptr<TensorImpl> t = std::move(held);  // dropped at the end of this iteration: consumers are done
    auto it = grads.find(t.get());
    if (it == grads.end()) continue;
    Tensor g = it->second;
    grads.erase(it);
    if (!t->grad_fn) {  // a leaf: accumulate into .grad
      t->grad = t->grad ? add(Tensor(t->grad), g).impl_ptr() : g.impl_ptr();
      continue;
    }
    std::shared_ptr<Node> node = t->grad_fn;
    Grads in_grads = node->backward(g);
    PSA_CHECK(in_grads.size() == node->inputs.size(), "internal: ", node->op, " backward returned ",
              in_grads.size(), " gradients for ", node->inputs.size(), " inputs");
    for (size_t i = 0; i < in_grads.size(); ++i) {
      const Tensor& in = node->inputs[i];
      if (!in.defined() || !in.requires_grad() || !in_grads[i].defined()) continue;
      PSA_CHECK(in_grads[i].shape() == in.shape(), "internal: ", node->op, " backward gave ",
                shape_str(in_grads[i].shape()), " for input ", i, " of shape ", shape_str(in.shape()));
      accumulate(grads, in.impl(), in_grads[i]);
    }
    // Free what the node saved as soon as it has run: the graph is used once.
    node->backward = nullptr;
    node->inputs.clear();
    t->grad_fn.reset();
  }
}

}  // namespace psa
