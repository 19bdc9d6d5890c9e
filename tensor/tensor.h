// Tensor: a shared, row-major contiguous buffer with a shape and an element offset.
// Views (reshape, leading-dim slices) share the buffer; every other op makes a new contiguous tensor.
// Keeping tensors always contiguous is what lets every kernel be a flat loop.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor/error.h"

namespace psa {

enum class DType : uint8_t { f32, f64, i32, i64 };
enum class Device : uint8_t { cpu, cuda };
using Shape = std::vector<int64_t>;

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);
bool is_float(DType t);
int64_t shape_numel(const Shape& s);

// Owns one allocation. CPU buffers are 64-byte aligned so that vector loads never split a cache line.
struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device = Device::cpu;
  // Integer tensors uploaded from the host (ids, labels, index maps) keep their host bytes: reading them back
  // for bounds checks and label bookkeeping then costs no copy and no wait for the device. Such tensors are never
  // written in place on the device (contiguous_copy_from drops the copy).
  std::shared_ptr<const Storage> host_copy;
  // In-place writes since allocation (contiguous_copy_from, optimizer steps, gradient clipping): a backward rule
  // whose saved tensor changed after the forward pass refuses to run instead of using the new values.
  uint64_t version = 0;
  static std::shared_ptr<Storage> allocate(size_t nbytes, Device device);
  ~Storage();
};

// The most host memory held by tensors at once since the process started (the host side of gpu::peak_bytes:
// `psa bench-step` reports both; the resident set size also counts freed memory malloc keeps).
size_t host_tensor_peak_bytes();

struct Node;

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  DType dtype = DType::f32;
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // accumulated by backward()
  std::shared_ptr<Node> grad_fn;     // the op that made this tensor, when it needs a gradient
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor arange(int64_t n, DType dtype = DType::i64, Device device = Device::cpu);
  // Host data of any arithmetic type is converted to `dtype`.
  template <typename T>
  static Tensor from(const std::vector<T>& values, const Shape& shape, DType dtype = DType::f32);
  static Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl()->shape; }
  int64_t dim() const { return (int64_t)shape().size(); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(shape()); }
  DType dtype() const { return impl()->dtype; }
  Device device() const { return impl()->storage->device; }
  size_t nbytes() const { return numel() * dtype_size(dtype()); }

  template <typename T>
  T* data() const;  // checks that T matches dtype
  void* raw() const;

  bool requires_grad() const { return impl()->requires_grad; }
  Tensor& requires_grad_(bool on = true);
  Tensor grad() const { return Tensor(impl()->grad); }
  void set_grad(const Tensor& g) { impl()->grad = g.impl_; }
  void zero_grad() { impl()->grad.reset(); }
  bool is_leaf() const { return impl()->grad_fn == nullptr; }

  Tensor detach() const;  // same buffer, outside the graph
  Tensor clone() const;   // a copy, outside the graph
  // Copies outside the graph (the tensor itself when nothing changes): no op casts inside a differentiable
  // computation, so neither records a backward. to(dtype) converts on the host (weights and tables, not hot paths).
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  Tensor contiguous_copy_from(const Tensor& src);  // in-place overwrite, shapes and dtypes must match
  void bump_version() const { ++impl()->storage->version; }  // after any other in-place write (Storage::version)

  double item() const;
  std::vector<double> to_vector() const;  // any dtype, any device, as doubles (tests and reports)
  template <typename T>
  std::vector<T> vec() const;  // exact dtype T, copied to the host

  void backward(const Tensor& grad_output = Tensor()) const;

  TensorImpl* impl() const {
    PSA_CHECK(impl_, "use of an undefined tensor");
    return impl_.get();
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

template <typename T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }

template <typename T>
T* Tensor::data() const {
  PSA_CHECK(dtype() == dtype_of<T>(), "data<", dtype_name(dtype_of<T>()), ">() on a ", dtype_name(dtype()),
            " tensor");
  return static_cast<T*>(impl()->storage->data) + impl()->offset;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of a floating dtype. A function rather than a macro so that the
// body may hold #pragma omp lines. Bodies start with: using scalar_t = typename decltype(tag_)::type;
template <typename F>
auto dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f64: return f(TypeTag<double>{});
    default: break;
  }
  fail(op, ": expects a floating tensor, got ", dtype_name(dtype));
}

template <typename F>
auto dispatch_all(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f64: return f(TypeTag<double>{});
    case DType::i32: return f(TypeTag<int32_t>{});
    case DType::i64: return f(TypeTag<int64_t>{});
  }
  fail(op, ": bad dtype");
}

}  // namespace psa
