// Data movement (mirrors tensor/cpu/shape.cpp): permutation, block copies for concat/slice, row gathers for
// embeddings and their deterministic scatter-add. These move bytes, so they work on 4- or 8-byte words.
// permute / index_select: one thread per output word. copy_block / extract_block: one strided 2-D memcpy (or a
// memcpy per row when a pitch passes the device's limit, see copy_rows).
// index_add: no atomics: the host builds, for every destination row, the list of source rows in index order
// (CSR), and one thread per destination element adds its sources in that order, exactly as the CPU loop does.
#include <algorithm>
#include <vector>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

template <typename W>
__global__ void permute_kernel(const W* src, W* dst, Dims out, Dims in_stride_of_out, int64_t n) {
  CUDA_LOOP(i, n) {
    int64_t rem = i, off = 0;
    for (int d = out.rank - 1; d >= 0; --d) {
      int64_t idx = rem % out.size[d];
      rem /= out.size[d];
      off += idx * in_stride_of_out.stride[d];
    }
    dst[i] = src[off];
  }
}

template <typename W, typename I>
__global__ void gather_rows(const W* src, W* dst, int64_t outer, int64_t n, int64_t inner, const I* idx, int64_t m) {
  CUDA_LOOP(e, outer * m * inner) {
    int64_t j = e % inner, k = (e / inner) % m, o = e / (inner * m);
    dst[e] = src[(o * n + (int64_t)idx[k]) * inner + j];
  }
}

template <typename T>
__global__ void scatter_add_rows(const T* g, T* ga, int64_t outer, int64_t n, int64_t inner, int64_t m,
                                 const int64_t* row_start, const int64_t* sources) {
  CUDA_LOOP(e, outer * n * inner) {
    int64_t j = e % inner, r = (e / inner) % n, o = e / (inner * n);
    T acc = T(0);
    for (int64_t s = row_start[r]; s < row_start[r + 1]; ++s) acc += g[(o * m + sources[s]) * inner + j];
    ga[e] = acc;
  }
}

std::vector<int64_t> host_indices(const Tensor& index) {
  Tensor h = index.to(Device::cpu);
  std::vector<int64_t> v(h.numel());
  for (int64_t k = 0; k < h.numel(); ++k)
    v[k] = h.dtype() == DType::i64 ? h.data<int64_t>()[k] : (int64_t)h.data<int32_t>()[k];
  return v;
}

template <typename W>
void launch_permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out) {
  const Shape& s = a.shape();
  int rank = (int)s.size();
  PSA_CHECK(rank <= kMaxDims, "cuda permute: rank ", rank, " > ", kMaxDims);
  std::vector<int64_t> in_stride(rank, 1);
  for (int d = rank - 2; d >= 0; --d) in_stride[d] = in_stride[d + 1] * s[d + 1];
  Dims od{}, st{};
  od.rank = st.rank = rank;
  for (int d = 0; d < rank; ++d) {
    od.size[d] = out.shape()[d];
    st.stride[d] = in_stride[perm[d]];
  }
  int64_t n = out.numel();
  permute_kernel<W>
      <<<blocks_for(n), kThreads, 0, stream()>>>(static_cast<const W*>(a.raw()), static_cast<W*>(out.raw()), od, st, n);
  cudaCheckLaunch();
}

// `rows` rows of `width` bytes, pitch apart, on the current stream. cudaMemcpy2D refuses a pitch above
// cudaDevAttrMaxPitch (2^31 - 1 bytes on current GPUs), which a block of a tensor over 2 GiB reaches: one
// contiguous copy when the rows touch (a single row, or both pitches equal to the width), else one copy per row,
// at most a few dozen then (a pitch over 2 GiB leaves room for that many rows in the device's memory).
void copy_rows(char* dst, size_t dpitch, const char* src, size_t spitch, size_t width, int64_t rows) {
  if (rows <= 0 || width == 0) return;
  if (rows == 1 || (dpitch == width && spitch == width)) {
    gpu::copy_on_device(dst, src, width * rows);
    return;
  }
  int max_pitch = 0;
  cudaCheck(cudaDeviceGetAttribute(&max_pitch, cudaDevAttrMaxPitch, 0));
  if (std::max(dpitch, spitch) <= (size_t)max_pitch) {
    cudaCheck(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDeviceToDevice, stream()));
    count_launch();
    return;
  }
  for (int64_t r = 0; r < rows; ++r) gpu::copy_on_device(dst + r * dpitch, src + r * spitch, width);
}

}  // namespace

void permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out) {
  if (out.numel() == 0) return;
  if (dtype_size(a.dtype()) == 4) launch_permute<uint32_t>(a, perm, out);
  else launch_permute<uint64_t>(a, perm, out);
}

void copy_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, Tensor& out, int64_t n_out, int64_t at) {
  size_t es = dtype_size(a.dtype()), row = n_a * inner * es;
  copy_rows(static_cast<char*>(out.raw()) + at * inner * es, n_out * inner * es, static_cast<const char*>(a.raw()),
            row, row, outer);
}

void extract_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, int64_t at, int64_t n_out,
                   Tensor& out) {
  size_t es = dtype_size(a.dtype()), row = n_out * inner * es;
  copy_rows(static_cast<char*>(out.raw()), row, static_cast<const char*>(a.raw()) + at * inner * es, n_a * inner * es,
            row, outer);
}

void index_select(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& out) {
  // Bounds are checked on the host (a copy of the ids, small) so that a bad id is an error, not a fault.
  for (int64_t k : host_indices(index))
    PSA_CHECK(k >= 0 && k < n, "index_select: index ", k, " out of range [0, ", n, ")");
  int64_t m = index.numel(), total = outer * m * inner;
  if (total == 0) return;
  auto launch = [&](auto word) {
    using W = decltype(word);
    const W* src = static_cast<const W*>(a.raw());
    W* dst = static_cast<W*>(out.raw());
    if (index.dtype() == DType::i64)
      gather_rows<W, int64_t>
          <<<blocks_for(total), kThreads, 0, stream()>>>(src, dst, outer, n, inner, index.data<int64_t>(), m);
    else
      gather_rows<W, int32_t>
          <<<blocks_for(total), kThreads, 0, stream()>>>(src, dst, outer, n, inner, index.data<int32_t>(), m);
    cudaCheckLaunch();
  };
  if (dtype_size(a.dtype()) == 4) launch(uint32_t{});
  else launch(uint64_t{});
}

void index_add(const Tensor& g, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& ga) {
  std::vector<int64_t> idx = host_indices(index);
  int64_t m = (int64_t)idx.size();
  std::vector<int64_t> row_start(n + 1, 0), sources(m);
  for (int64_t k : idx) {
    PSA_CHECK(k >= 0 && k < n, "index_add: index ", k, " out of range [0, ", n, ")");
    ++row_start[k + 1];
  }
  for (int64_t r = 0; r < n; ++r) row_start[r + 1] += row_start[r];
  std::vector<int64_t> fill(row_start.begin(), row_start.end() - 1);
  for (int64_t k = 0; k < m; ++k) sources[fill[idx[k]]++] = k;  // ascending k within a row: the CPU's order
  int64_t total = outer * n * inner;
  if (total == 0) return;
  Tensor starts = Tensor::from(row_start, {n + 1}, DType::i64).to(Device::cuda);
  Tensor srcs = Tensor::from(sources.empty() ? std::vector<int64_t>{0} : sources,
                             {std::max<int64_t>(m, 1)}, DType::i64).to(Device::cuda);
  dispatch_float(g.dtype(), "cuda index_add", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    scatter_add_rows<T><<<blocks_for(total), kThreads, 0, stream()>>>(g.data<T>(), ga.data<T>(), outer, n, inner, m,
                                                                      starts.data<int64_t>(), srcs.data<int64_t>());
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
