// Reductions over the middle dim of an [outer, n, inner] view (mirrors tensor/cpu/reduce.cpp).
// sum: f32 accumulates in double like the CPU. inner == 1 (rows): one block per row, a fixed-order tree over
// the block's per-thread partials; inner > 1: one thread per (o, j) output walking n in order (coalesced over
// j) when there are outputs enough to fill the GPU, otherwise (a bias gradient: [rows, N] -> [N]) the rows are
// cut into chunks, one thread per (chunk, output) and a second pass adds the chunks in order, so a few hundred
// columns still get thousands of threads and the result stays the same run to run. max/argmax: one thread per output, a sequential scan with the CPU's comparison (the first NaN, else the first maximum wins).
#include <algorithm>

#include "tensor/cuda/common.cuh"
#include "tensor/host_device.h"

namespace psa::cuda {
namespace {

template <typename T>
__global__ void sum_rows(const T* a, int64_t n, T* out) {
  __shared__ double scratch[kThreads];
  const T* row = a + (int64_t)blockIdx.x * n;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)row[i];
  double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = (T)total;
}

template <typename T>
__global__ void sum_columns(const T* a, int64_t outer, int64_t n, int64_t inner, T* out) {
  CUDA_LOOP(r, outer * inner) {
    int64_t o = r / inner, j = r % inner;
    const T* col = a + o * n * inner + j;
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += (double)col[i * inner];
    out[r] = (T)acc;
  }
}

// part[c, o·inner + j] = Σ_{i in chunk c} a[o, i, j], chunk c = rows [c·chunk_rows, (c+1)·chunk_rows).
template <typename T>
__global__ void sum_column_chunks(const T* a, int64_t outer, int64_t n, int64_t inner, int64_t chunk_rows,
                                  double* part) {
  const int64_t outputs = outer * inner, i0 = blockIdx.y * chunk_rows, i1 = min(n, i0 + chunk_rows);
  CUDA_LOOP(r, outputs) {
    int64_t o = r / inner, j = r % inner;
    const T* col = a + o * n * inner + j;
    double acc = 0;
    for (int64_t i = i0; i < i1; ++i) acc += (double)col[i * inner];
    part[blockIdx.y * outputs + r] = acc;
  }
}

// Enough (chunk, output) threads to fill an H100 (132 SMs × 2048), chunks of at least 16 rows.
constexpr int64_t kColumnSumThreads = 1 << 18, kMinChunkRows = 16, kMaxChunks = 4096;
int64_t column_sum_chunks(int64_t outputs, int64_t n) {
  int64_t want = (kColumnSumThreads + outputs - 1) / outputs, most = (n + kMinChunkRows - 1) / kMinChunkRows;
  return std::min({want, most, kMaxChunks});
}

template <typename T>
__global__ void max_columns(const T* a, int64_t outer, int64_t n, int64_t inner, T* out, int64_t* argmax) {
  CUDA_LOOP(r, outer * inner) {
    int64_t o = r / inner, j = r % inner;
    const T* col = a + o * n * inner + j;
    const int64_t best = column_argmax(col, n, inner);
    if (out) out[r] = col[best * inner];
    argmax[r] = best;
  }
}

template <typename T>
__global__ void max_backward_kernel(const T* g, const int64_t* argmax, int64_t n, int64_t inner, T* ga,
                                    int64_t total) {
  CUDA_LOOP(e, total) {
    int64_t j = e % inner, i = (e / inner) % n, o = e / (inner * n);
    int64_t r = o * inner + j;
    ga[e] = argmax[r] == i ? g[r] : T(0);
  }
}

}  // namespace

void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out) {
  if (outer * inner == 0) return;
  dispatch_float(a.dtype(), "cuda sum", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (inner == 1 && outer <= 0x7fffffff)
      sum_rows<T><<<(unsigned)outer, kThreads, 0, stream()>>>(a.data<T>(), n, out.data<T>());
    else if (int64_t chunks = column_sum_chunks(outer * inner, n); chunks > 1) {
      int64_t chunk_rows = (n + chunks - 1) / chunks;
      chunks = (n + chunk_rows - 1) / chunk_rows;
      Tensor part = Tensor::empty({chunks, outer * inner}, DType::f64, Device::cuda);
      sum_column_chunks<T><<<dim3(blocks_for(outer * inner), (unsigned)chunks), kThreads, 0, stream()>>>(
          a.data<T>(), outer, n, inner, chunk_rows, part.data<double>());
      cudaCheckLaunch();
      sum_chunks<T><<<blocks_for(outer * inner), kThreads, 0, stream()>>>(part.data<double>(), chunks, outer * inner,
                                                                          out.data<T>());
    } else {
      sum_columns<T><<<blocks_for(outer * inner), kThreads, 0, stream()>>>(a.data<T>(), outer, n, inner, out.data<T>());
    }
    cudaCheckLaunch();
  });
}

void max_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor& argmax) {
  if (outer * inner == 0) return;
  dispatch_all(a.dtype(), "cuda max", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    max_columns<T><<<blocks_for(outer * inner), kThreads, 0, stream()>>>(a.data<T>(), outer, n, inner,
                                                                         mut_or_null<T>(out), argmax.data<int64_t>());
    cudaCheckLaunch();
  });
}

void max_backward(const Tensor& gout, const Tensor& argmax, int64_t outer, int64_t n, int64_t inner, Tensor& ga) {
  int64_t total = outer * n * inner;
  if (total == 0) return;
  dispatch_float(ga.dtype(), "cuda max_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    max_backward_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(gout.data<T>(), argmax.data<int64_t>(), n,
                                                                         inner, ga.data<T>(), total);
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
