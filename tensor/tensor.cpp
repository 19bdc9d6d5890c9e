#include "tensor/tensor.h"

#include <malloc.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "tensor/device.h"
#include "tensor/dispatch.h"

namespace psa {

void no_cuda_kernel(const char* name) {
  fail(name, ": a CUDA tensor in a build without CUDA kernels (rebuild with nvcc present and CUDA!=0)");
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
  }
  return 0;
}
const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}
const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }
bool is_float(DType t) { return t == DType::f32 || t == DType::f64; }

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    PSA_CHECK(d >= 0, "negative dimension in shape ", shape_str(s));
    PSA_CHECK(d == 0 || n <= INT64_MAX / d, "shape ", shape_str(s), " overflows int64");
    n *= d;
  }
  return n;
}

// glibc serves blocks above 128 KiB with mmap and gives freed heap tops back to the kernel, so the outputs
// of a training step's ops (0.1-4 MiB each, the same sizes every step) would land on fresh pages every time:
// page faults and kernel zeroing took ~30% of a tiny CPU step. Keeping them in the heap lets the next step
// reuse the pages; the peak footprint is the same.
static void keep_freed_host_memory() {
#if defined(M_MMAP_THRESHOLD) && defined(M_TRIM_THRESHOLD)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's upper limit; larger blocks still come from mmap
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

namespace {
std::atomic<size_t> g_host_live{0}, g_host_peak{0};

size_t host_block_size(size_t nbytes) { return nbytes ? (nbytes + 63) / 64 * 64 : 64; }  // aligned_alloc's rule
}  // namespace

size_t host_tensor_peak_bytes() { return g_host_peak; }

std::shared_ptr<Storage> Storage::allocate(size_t nbytes, Device device) {
  static const bool tuned = (keep_freed_host_memory(), true);
  (void)tuned;
  auto s = std::make_shared<Storage>();
  s->nbytes = nbytes;
  s->device = device;
  if (device == Device::cuda) {
    s->data = gpu::alloc(nbytes);
  } else {
    const size_t block = host_block_size(nbytes);  // aligned_alloc wants a multiple of the alignment
    s->data = std::aligned_alloc(64, block);
    PSA_CHECK(s->data, "out of host memory allocating ", nbytes, " bytes");
    const size_t live = g_host_live += block;
    for (size_t peak = g_host_peak; live > peak && !g_host_peak.compare_exchange_weak(peak, live);) {
    }
  }
  return s;
}

Storage::~Storage() {
  if (device == Device::cuda) {
    gpu::free(data, nbytes);
  } else {
    std::free(data);
    g_host_live -= host_block_size(nbytes);
  }
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  const int64_t n = shape_numel(shape);
  PSA_CHECK((uint64_t)n <= (uint64_t)PTRDIFF_MAX / dtype_size(dtype), "shape ", shape_str(shape), " of ",
            dtype_name(dtype), ": ", n, " elements overflow a byte size");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = Storage::allocate(n * dtype_size(dtype), device);
  impl->shape = shape;
  impl->dtype = dtype;
  return Tensor(impl);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (device == Device::cuda) gpu::memset_zero(t.raw(), t.nbytes());
  else std::memset(t.raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, Device::cpu);
  dispatch_all(dtype, "full", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    scalar_t* p = t.data<scalar_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = (scalar_t)value;
  });
  return device == Device::cpu ? t : t.to(device);
}

Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor Tensor::scalar(double value, DType dtype, Device device) { return full({}, value, dtype, device); }

Tensor Tensor::arange(int64_t n, DType dtype, Device device) {
  Tensor t = empty({n}, dtype, Device::cpu);
  dispatch_all(dtype, "arange", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    scalar_t* p = t.data<scalar_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = (scalar_t)i;
  });
  return device == Device::cpu ? t : t.to(device);
}

template <typename T>
Tensor Tensor::from(const std::vector<T>& values, const Shape& shape, DType dtype) {
  PSA_CHECK((int64_t)values.size() == shape_numel(shape), "Tensor::from: ", values.size(), " values for shape ",
            shape_str(shape));
  Tensor t = empty(shape, dtype);
  dispatch_all(dtype, "Tensor::from", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    scalar_t* p = t.data<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = (scalar_t)values[i];
  });
  return t;
}
template Tensor Tensor::from(const std::vector<float>&, const Shape&, DType);
template Tensor Tensor::from(const std::vector<double>&, const Shape&, DType);
template Tensor Tensor::from(const std::vector<int32_t>&, const Shape&, DType);
template Tensor Tensor::from(const std::vector<int64_t>&, const Shape&, DType);

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  int64_t i = d < 0 ? d + n : d;
  PSA_CHECK(i >= 0 && i < n, "size(", d, ") of a tensor of shape ", shape_str(shape()));
  return shape()[i];
}

void* Tensor::raw() const {
  return static_cast<char*>(impl()->storage->data) + impl()->offset * dtype_size(dtype());
}

Tensor& Tensor::requires_grad_(bool on) {
  PSA_CHECK(!on || is_float(dtype()), "requires_grad on a ", dtype_name(dtype()), " tensor");
  impl()->requires_grad = on;
  return *this;
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = impl_->storage;
  impl->offset = impl_->offset;
  impl->shape = impl_->shape;
  impl->dtype = impl_->dtype;
  return Tensor(impl);
}

static void copy_bytes(void* dst, Device dd, const void* src, Device sd, size_t n) {
  if (n == 0) return;
  if (dd == Device::cpu && sd == Device::cpu) std::memcpy(dst, src, n);
  else if (dd == Device::cuda && sd == Device::cpu) gpu::copy_to_device(dst, src, n);
  else if (dd == Device::cpu && sd == Device::cuda) gpu::copy_to_host(dst, src, n);
  else gpu::copy_on_device(dst, src, n);
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape(), dtype(), device());
  copy_bytes(t.raw(), device(), raw(), device(), nbytes());
  return t;
}

Tensor Tensor::contiguous_copy_from(const Tensor& src) {
  PSA_CHECK(src.shape() == shape() && src.dtype() == dtype(), "copy_from: ", shape_str(src.shape()), " ",
            dtype_name(src.dtype()), " into ", shape_str(shape()), " ", dtype_name(dtype()));
  copy_bytes(raw(), device(), src.raw(), src.device(), nbytes());
  impl()->storage->host_copy.reset();
  bump_version();
  return *this;
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  Tensor t = empty(shape(), dtype(), d);
  const std::shared_ptr<const Storage>& host = impl()->storage->host_copy;
  if (d == Device::cpu && host) {
    std::memcpy(t.raw(), static_cast<const char*>(host->data) + impl()->offset * dtype_size(dtype()), nbytes());
    return t;
  }
  copy_bytes(t.raw(), d, raw(), device(), nbytes());
  constexpr size_t kMaxHostCopy = size_t(1) << 24;  // bytes; index tensors are far smaller
  if (device() == Device::cpu && !is_float(dtype()) && nbytes() <= kMaxHostCopy) {
    auto copy = Storage::allocate(nbytes(), Device::cpu);
    std::memcpy(copy->data, raw(), nbytes());
    t.impl()->storage->host_copy = std::move(copy);
  }
  return t;
}

Tensor Tensor::to(DType dt) const {
  if (dt == dtype()) return *this;
  Tensor src = to(Device::cpu);
  Tensor t = empty(shape(), dt);
  dispatch_all(dtype(), "to(dtype)", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using in_t = scalar_t;
    const in_t* a = src.data<in_t>();
    dispatch_all(dt, "to(dtype)", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
      scalar_t* b = t.data<scalar_t>();
      for (int64_t i = 0, n = numel(); i < n; ++i) b[i] = (scalar_t)a[i];
    });
  });
  return t.to(device());
}

template <typename T>
std::vector<T> Tensor::vec() const {
  Tensor h = to(Device::cpu);
  const T* p = h.data<T>();
  return std::vector<T>(p, p + numel());
}
template std::vector<float> Tensor::vec() const;
template std::vector<double> Tensor::vec() const;
template std::vector<int32_t> Tensor::vec() const;
template std::vector<int64_t> Tensor::vec() const;

// To the host first: to(dtype) converts on the host and would copy the result back to the device.
std::vector<double> Tensor::to_vector() const { return to(Device::cpu).to(DType::f64).vec<double>(); }

double Tensor::item() const {
  PSA_CHECK(numel() == 1, "item() on a tensor of shape ", shape_str(shape()));
  return to_vector()[0];
}

}  // namespace psa
