// Data movement: permutation, block copies for concat/slice, row gathers for embeddings. These move bytes,
// so they are written once over element size rather than per dtype.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"

namespace psa::cpu {

void permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out) {
  const Shape& s = a.shape();
  int64_t rank = s.size(), es = dtype_size(a.dtype());
  std::vector<int64_t> in_stride(rank, 1);
  for (int64_t d = rank - 2; d >= 0; --d) in_stride[d] = in_stride[d + 1] * s[d + 1];
  // Walk the output in order, one row (last output dim) at a time; the source offset follows the permuted
  // input strides. Each thread takes a contiguous range of rows and steps the row's multi-index like an
  // odometer: a division per dim per row costs more than copying a 32-float row (head splits).
  const Shape& os = out.shape();
  int64_t inner = rank ? os[rank - 1] : 1, n = out.numel(), outer = inner ? n / inner : 0;
  int64_t inner_stride = rank ? in_stride[perm[rank - 1]] : 1;
  const char* src = static_cast<const char*>(a.raw());
  char* dst = static_cast<char*>(out.raw());
  auto copy_row = [&](int64_t r, int64_t off) {
    char* o = dst + r * inner * es;
    if (inner_stride == 1) {  // the last dim stays last: one contiguous row
      std::memcpy(o, src + off * es, inner * es);
    } else if (es == 4) {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(src) + off;
      uint32_t* q = reinterpret_cast<uint32_t*>(o);
      for (int64_t i = 0; i < inner; ++i) q[i] = p[i * inner_stride];
    } else {
      const uint64_t* p = reinterpret_cast<const uint64_t*>(src) + off;
      uint64_t* q = reinterpret_cast<uint64_t*>(o);
      for (int64_t i = 0; i < inner; ++i) q[i] = p[i * inner_stride];
    }
  };
  auto copy_rows = [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> idx(std::max<int64_t>(rank - 1, 0));  // multi-index of row r over output dims < rank-1
    int64_t off = 0, rem = r0;
    for (int64_t d = rank - 2; d >= 0; --d) {
      idx[d] = rem % os[d];
      rem /= os[d];
      off += idx[d] * in_stride[perm[d]];
    }
    for (int64_t r = r0; r < r1; ++r) {
      copy_row(r, off);
      for (int64_t d = rank - 2; d >= 0; --d) {  // next row: carry through the dims like an odometer
        off += in_stride[perm[d]];
        if (++idx[d] < os[d]) break;
        off -= idx[d] * in_stride[perm[d]];
        idx[d] = 0;
      }
    }
  };
  if (!use_threads(n, 1 << 16)) return copy_rows(0, outer);  // see parallel_for (kernel_util.h)
#pragma omp parallel
  {
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    copy_rows(outer * t / nt, outer * (t + 1) / nt);
  }
}

void copy_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, Tensor& out, int64_t n_out, int64_t at) {
  int64_t es = dtype_size(a.dtype()), row = n_a * inner * es;
  const char* src = static_cast<const char*>(a.raw());
  char* dst = static_cast<char*>(out.raw());
  for (int64_t o = 0; o < outer; ++o) std::memcpy(dst + (o * n_out + at) * inner * es, src + o * row, row);
}

void extract_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, int64_t at, int64_t n_out,
                   Tensor& out) {
  int64_t es = dtype_size(a.dtype()), row = n_out * inner * es;
  const char* src = static_cast<const char*>(a.raw());
  char* dst = static_cast<char*>(out.raw());
  for (int64_t o = 0; o < outer; ++o) std::memcpy(dst + o * row, src + (o * n_a + at) * inner * es, row);
}

template <typename I>
static void gather(const char* src, char* dst, int64_t outer, int64_t n, int64_t inner, const I* idx,
                   int64_t m, int64_t es, const char* op) {
  for (int64_t k = 0; k < m; ++k)
    PSA_CHECK(idx[k] >= 0 && idx[k] < n, op, ": index ", idx[k], " out of range [0, ", n, ")");
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t k = 0; k < m; ++k)
      std::memcpy(dst + (o * m + k) * inner * es, src + (o * n + idx[k]) * inner * es, inner * es);
}

void index_select(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& out) {
  const char* src = static_cast<const char*>(a.raw());
  char* dst = static_cast<char*>(out.raw());
  int64_t es = dtype_size(a.dtype()), m = index.numel();
  if (index.dtype() == DType::i64) gather(src, dst, outer, n, inner, index.data<int64_t>(), m, es, "index_select");
  else gather(src, dst, outer, n, inner, index.data<int32_t>(), m, es, "index_select");
}

void index_add(const Tensor& g, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& ga) {
  dispatch_float(g.dtype(), "index_add", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pg = g.data<T>();
    T* po = ga.data<T>();
    int64_t m = index.numel();
    std::fill(po, po + outer * n * inner, T(0));
    auto row = [&](int64_t k) {
      return index.dtype() == DType::i64 ? index.data<int64_t>()[k] : (int64_t)index.data<int32_t>()[k];
    };
    // Rows are accumulated in index order on one thread: repeated ids make this a scatter with conflicts.
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < m; ++k) {
        T* dst = po + (o * n + row(k)) * inner;
        const T* src = pg + (o * m + k) * inner;
        for (int64_t j = 0; j < inner; ++j) dst[j] += src[j];
      }
  });
}

}  // namespace psa::cpu
