#include "autograd/autograd.h"

#include <string>
#include <unordered_map>
#include <unordered_set>

#include "autograd/ops.h"
#include "tensor/dispatch.h"
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

namespace {

std::vector<Edge> edges_to(const std::vector<Tensor>& inputs) {
  std::vector<Edge> edges(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || !t.requires_grad()) continue;
    edges[i].shape = t.shape();
    if (t.impl()->grad_fn) edges[i].producer = t.impl()->grad_fn;
    else edges[i].leaf = t.impl_ptr();
  }
  return edges;
}

}  // namespace

Tensor record(const char* op, Tensor out, const std::vector<Tensor>& inputs, BackwardFn backward,
              const std::vector<Tensor>& saved) {
  if (!g_grad_enabled || !any_requires_grad(inputs)) return out;
  PSA_CHECK(is_registered_op(op), "internal: op '", op, "' is not in the op table");
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = edges_to(inputs);
  node->backward = std::move(backward);
  for (const Tensor& t : saved)
    if (t.defined()) node->saved.push_back({t.impl()->storage, t.impl()->storage->version, t.shape()});
  out.impl()->grad_fn = std::move(node);
  out.impl()->requires_grad = true;
  return out;
}

Tensor record_nondifferentiable(const char* op, Tensor out, const std::vector<Tensor>& inputs) {
  if (!g_grad_enabled || !any_requires_grad(inputs)) return out;
  auto node = std::make_shared<Node>();
  node->op = op;
  node->inputs = edges_to(inputs);
  std::string name = op;
  node->backward = [name](const Tensor&) -> Grads {
    fail(name, ": has no backward, but a gradient reached it (detach its input or wrap the call in NoGrad)");
  };
  out.impl()->grad_fn = std::move(node);
  out.impl()->requires_grad = true;
  return out;
}

namespace {

// Reverse topological order of the nodes that lead to `root`, by iterative DFS (deep graphs must not overflow
// the stack). The list holds the nodes, so that a node dropped by its consumer stays until it has run.
std::vector<std::shared_ptr<Node>> topo_order(const std::shared_ptr<Node>& root) {
  std::vector<std::shared_ptr<Node>> order;
  std::unordered_set<Node*> seen{root.get()};
  std::vector<std::pair<std::shared_ptr<Node>, size_t>> stack{{root, 0}};
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const std::shared_ptr<Node>& in = node->inputs[next++].producer;
      if (in && seen.insert(in.get()).second) stack.push_back({in, 0});
      continue;
    }
    order.push_back(node);
    stack.pop_back();
  }
  return {order.rbegin(), order.rend()};
}

// acc += g. In place when nothing else holds acc's memory (not another entry: add's backward hands the same g to
// both inputs; nor the gradients a node just returned), which spares an allocation, a write to memory not in the
// cache, and one gradient of peak memory; the sum has the same bits either way.
void add_into(Tensor& acc, const Tensor& g) {
  const bool sole = acc.impl_ptr().use_count() == 1 && acc.impl()->storage.use_count() == 1;
  if (sole && acc.shape() == g.shape() && acc.dtype() == g.dtype() && acc.device() == g.device())
    PSA_KERNEL(acc.device(), binary)(cpu::BinaryOp::add, acc, g, acc);
  else
    acc = add(acc, g);
}

template <typename Key>
void accumulate(std::unordered_map<Key*, Tensor>& grads, Key* k, const Tensor& g) {
  auto it = grads.find(k);
  if (it == grads.end()) grads.emplace(k, g);
  else add_into(it->second, g);
}

void check_saved_versions(const Node& node) {
  for (const SavedVersion& s : node.saved) {
    const std::shared_ptr<const Storage> st = s.storage.lock();
    PSA_CHECK(!st || st->version == s.version, "backward(): ", node.op, ": a tensor ", shape_str(s.shape),
              " its backward saved was written in place after the forward pass (by an optimizer step, a weight "
              "load or a copy into it); run the forward pass again after the write");
  }
}

// A first gradient becomes the leaf's .grad as it is, unless something else holds it (the caller's seed, another
// leaf's gradient: add hands one g to both inputs): then a copy, so that scaling one .grad in place (clipping)
// or an optimizer's write cannot change the other, as torch's AccumulateGrad copies.
void add_to_leaf(TensorImpl* leaf, const Tensor& g, bool shared) {
  if (leaf->grad) leaf->grad = add(Tensor(leaf->grad), g).impl_ptr();
  else leaf->grad = shared ? g.clone().impl_ptr() : g.impl_ptr();
}

// Whether anything but the one reference the caller holds shares g (its impl or its memory).
bool held_elsewhere(const Tensor& g) { return g.impl_ptr().use_count() > 1 || g.impl()->storage.use_count() > 1; }

}  // namespace

void Tensor::backward(const Tensor& grad_output) const {
  PSA_CHECK(requires_grad(), "backward() on a tensor that does not require grad");
  Tensor seed = grad_output;
  // The backward kernels run on this tensor's device: a seed from the other one would reach them as a pointer
  // into the wrong memory (an illegal address on a GPU; the CPU emulator of CUDA cannot tell the two apart).
  PSA_CHECK(!seed.defined() || seed.device() == device(), "backward(): gradient on ", device_name(seed.device()),
            " for a tensor on ", device_name(device()));
  // The rules read the seed as a tensor of this one's shape and dtype: another would be read past its end.
  PSA_CHECK(!seed.defined() || (seed.shape() == shape() && seed.dtype() == dtype()), "backward(): gradient ",
            seed.defined() ? shape_str(seed.shape()) : "", " ", seed.defined() ? dtype_name(seed.dtype()) : "",
            " for a tensor ", shape_str(shape()), " ", dtype_name(dtype()));
  if (!seed.defined()) {
    PSA_CHECK(numel() == 1, "backward() without a gradient needs a scalar, got shape ", shape_str(shape()));
    seed = Tensor::ones(shape(), dtype(), device());
  }
  NoGrad no_grad;  // backward rules are computed with ops, but never recorded
  profile::BackwardScope in_backward;
  if (!impl()->grad_fn) {  // backward() on a leaf
    add_to_leaf(impl(), seed, held_elsewhere(seed));
    return;
  }
  std::unordered_map<Node*, Tensor> grads{{impl()->grad_fn.get(), seed}};
  std::unordered_map<TensorImpl*, Tensor> leaf_grads;
  std::vector<std::shared_ptr<TensorImpl>> leaves;  // in the order they were first reached
  for (std::shared_ptr<Node>& held : topo_order(impl()->grad_fn)) {
    std::shared_ptr<Node> node = std::move(held);  // dropped at the end of this iteration: consumers are done
    auto it = grads.find(node.get());
    if (it == grads.end()) continue;
    Tensor g = it->second;
    grads.erase(it);
    PSA_CHECK(node->backward, "backward(): the graph through ", node->op, " was already used by an earlier "
              "backward() (a graph is used once; run the forward pass again)");
    check_saved_versions(*node);
    Grads in_grads = node->backward(g);
    PSA_CHECK(in_grads.size() == node->inputs.size(), "internal: ", node->op, " backward returned ",
              in_grads.size(), " gradients for ", node->inputs.size(), " inputs");
    for (size_t i = 0; i < in_grads.size(); ++i) {
      const Edge& in = node->inputs[i];
      if (!in.defined() || !in_grads[i].defined()) continue;
      PSA_CHECK(in_grads[i].shape() == in.shape, "internal: ", node->op, " backward gave ",
                shape_str(in_grads[i].shape()), " for input ", i, " of shape ", shape_str(in.shape));
      if (in.producer) {
        accumulate(grads, in.producer.get(), in_grads[i]);
      } else {
        if (!leaf_grads.count(in.leaf.get())) leaves.push_back(in.leaf);
        accumulate(leaf_grads, in.leaf.get(), in_grads[i]);
      }
    }
    // Free what the node saved as soon as it has run: the graph is used once.
    node->backward = nullptr;
    node->inputs.clear();
  }
  for (const std::shared_ptr<TensorImpl>& leaf : leaves) {
    const Tensor& g = leaf_grads.at(leaf.get());  // the map holds the one reference
    add_to_leaf(leaf.get(), g, held_elsewhere(g));
  }
}

}  // namespace psa
