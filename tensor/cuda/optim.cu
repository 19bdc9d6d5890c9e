// Fused optimizer kernels (mirrors tensor/cpu/optim.cpp): AdamW and SGD read each parameter, gradient and state
// once and write them once, one thread per element, arithmetic in the tensor's own type with the scalars folded
// in double on the host. The global norm: sum_squares is deterministic, with a fixed grid of blocks per tensor that
// each reduce a fixed slice by a tree into a double partial, all tensors' partials copied back at once and added in
// order on the host.
// Multi-tensor launches: AdamW, the norm and the clipping scale touch every parameter once a step, and a model has
// hundreds of them (69 in tiny's Stage I), each a launch of its own otherwise. One launch per dtype takes a table
// of jobs (pointers, length, scalars) uploaded with it; each job owns a fixed range of the launch's blocks, so
// every element gets exactly the arithmetic of a per-tensor launch and the results are bit-identical to it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

constexpr int64_t kMaxBlocksPerJob = 1024;  // a job's threads then stride through it: enough to fill an H100

// One tensor of a multi-tensor launch: blocks [first_block, first_block + blocks) of the grid work on it.
struct Job {
  void* x[4];  // AdamW: p, g, m, v; scale and norm: x[0]
  int64_t n, first_block, blocks;
  double scalar[8];  // AdamW: decay, b1, b2, 1-b1, 1-b2, step_size, sqrt(bc2), eps; scale: the factor
};

// Jobs are in block order: the last one whose first block is at or before this block.
__device__ const Job& job_of_block(const Job* jobs, int n_jobs) {
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_block <= (int64_t)blockIdx.x) lo = mid;
    else hi = mid - 1;
  }
  return jobs[lo];
}

// The job's length and stride in registers (read once from the table, not at every iteration).
#define JOB_LOOP(i, job)                                                                         \
  for (int64_t i = ((int64_t)blockIdx.x - job.first_block) * blockDim.x + threadIdx.x, n_ = job.n, \
               stride_ = job.blocks * blockDim.x;                                                \
       i < n_; i += stride_)

template <typename T>
__global__ void adamw_kernel(const Job* jobs, int n_jobs) {
  const Job& j = job_of_block(jobs, n_jobs);
  T* p = static_cast<T*>(j.x[0]);
  const T* g = static_cast<const T*>(j.x[1]);
  T *m = static_cast<T*>(j.x[2]), *v = static_cast<T*>(j.x[3]);
  const T decay = T(j.scalar[0]), b1 = T(j.scalar[1]), b2 = T(j.scalar[2]), a1 = T(j.scalar[3]), a2 = T(j.scalar[4]);
  const T step_size = T(j.scalar[5]), sqrt_bc2 = T(j.scalar[6]), eps = T(j.scalar[7]);
  JOB_LOOP(i, j) {
    const T gi = g[i];
    const T mi = b1 * m[i] + a1 * gi;
    const T vi = b2 * v[i] + a2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (d_sqrt(vi) / sqrt_bc2 + eps);
  }
}

template <typename T>
__global__ void scale_kernel(const Job* jobs, int n_jobs) {
  const Job& j = job_of_block(jobs, n_jobs);
  T* x = static_cast<T*>(j.x[0]);
  const T k = T(j.scalar[0]);
  JOB_LOOP(i, j) x[i] *= k;
}

// A table of plain structs as device memory (8-byte words, so any struct of pointers, int64 and double fits).
template <typename Entry>
Tensor upload_table(const std::vector<Entry>& entries) {
  static_assert(sizeof(Entry) % 8 == 0, "table entries are whole 8-byte words");
  Tensor host = Tensor::empty({(int64_t)(entries.size() * sizeof(Entry) / 8)}, DType::f64);
  std::memcpy(host.raw(), entries.data(), entries.size() * sizeof(Entry));
  return host.to(Device::cuda);
}

// Gives each job its block range and uploads the table; empty tensors get no job. Returns the grid size.
int64_t upload_jobs(std::vector<Job>& jobs, Tensor& table) {
  std::vector<Job> kept;
  int64_t blocks = 0;
  for (Job j : jobs) {
    if (j.n == 0) continue;
    j.first_block = blocks;
    j.blocks = std::min<int64_t>(blocks_for(j.n), kMaxBlocksPerJob);
    blocks += j.blocks;
    kept.push_back(j);
  }
  jobs = kept;
  if (jobs.empty()) return 0;
  table = upload_table(jobs);
  return blocks;
}

// The multi-tensor kernels are instantiated for f32 and f64 only; another dtype must not be skipped silently.
void require_float(DType d, const char* op) {
  PSA_CHECK(d == DType::f32 || d == DType::f64, op, ": a ", dtype_name(d), " tensor (f32/f64 only)");
}

// The jobs of a launch run side by side, so two that write overlapping memory would race (the CPU applies them
// in turn): the ranges they write (x[s] for each slot s in `written`: AdamW's p, m, v) must be disjoint.
void require_disjoint(const std::vector<std::pair<DType, Job>>& all, const std::vector<int>& written, const char* op) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const auto& [d, j] : all)
    for (int s : written)
      if (j.n > 0) ranges.push_back({(uintptr_t)j.x[s], (uintptr_t)j.x[s] + j.n * dtype_size(d)});
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    PSA_CHECK(ranges[i].first >= ranges[i - 1].second, op, ": two of its tensors share ",
              std::min(ranges[i - 1].second, ranges[i].second) - ranges[i].first,
              " bytes of memory; one launch would update both at once");
}

// Launches kernel<T> over the jobs of dtype `dt` among `all` (one launch per dtype present); `written` as above.
template <typename Launch>
void for_each_dtype(const std::vector<std::pair<DType, Job>>& all, const std::vector<int>& written, const char* op,
                    Launch launch) {
  for (const auto& [d, j] : all) require_float(d, op);
  require_disjoint(all, written, op);
  for (DType dt : {DType::f32, DType::f64}) {
    std::vector<Job> jobs;
    for (const auto& [d, j] : all)
      if (d == dt) jobs.push_back(j);
    Tensor table;
    const int64_t blocks = upload_jobs(jobs, table);
    if (blocks == 0) continue;
    PSA_CHECK(blocks <= 0x7fffffffLL, "multi-tensor launch: ", blocks, " blocks");
    launch(dt, (unsigned)blocks, static_cast<const Job*>(table.raw()), (int)jobs.size());
  }
}

template <typename T>
__global__ void sgd_kernel(T* p, const T* g, T* buf, int64_t n, T lr, T wd, T mu, T keep, bool use_wd, bool nesterov,
                           bool first) {
  CUDA_LOOP(i, n) {
    T d = use_wd ? g[i] + wd * p[i] : g[i];
    if (buf) {
      const T b = first ? d : mu * buf[i] + keep * d;
      buf[i] = b;
      d = nesterov ? d + mu * b : b;
    }
    p[i] -= lr * d;
  }
}

constexpr int kNormBlocks = 256;

// Tensor blockIdx.y of the table; its blocks write partial[slot * kNormBlocks + blockIdx.x].
struct NormJob {
  const void* x;
  int64_t n, slot;
};

template <typename T>
__global__ void sum_squares_kernel(const NormJob* jobs, double* partials) {
  const NormJob& j = jobs[blockIdx.y];
  const T* x = static_cast<const T*>(j.x);
  const int64_t n = j.n;
  double* partial = partials + j.slot * kNormBlocks;
  __shared__ double scratch[kThreads];
  int64_t per_block = (n + gridDim.x - 1) / gridDim.x;
  int64_t begin = (int64_t)blockIdx.x * per_block, end = min(n, begin + per_block);
  double s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += (double)x[i] * (double)x[i];
  double total = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

}  // namespace

void adamw_steps(const std::vector<AdamWSlot>& slots) {
  std::vector<std::pair<DType, Job>> all;
  for (const AdamWSlot& s : slots) {
    const AdamWCoeffs& c = s.c;
    Job j{{s.p->raw(), s.g->raw(), s.m->raw(), s.v->raw()}, s.p->numel(), 0, 0,
          {1 - c.lr * c.weight_decay, c.beta1, c.beta2, 1 - c.beta1, 1 - c.beta2,
           c.lr / (1 - std::pow(c.beta1, (double)c.step)), std::sqrt(1 - std::pow(c.beta2, (double)c.step)), c.eps}};
    all.push_back({s.p->dtype(), j});
  }
  for_each_dtype(all, {0, 2, 3}, "cuda adamw", [](DType dt, unsigned blocks, const Job* jobs, int n) {
    dispatch_float(dt, "cuda adamw", [&](auto tag_) {
      using T = typename decltype(tag_)::type;
      adamw_kernel<T><<<blocks, kThreads, 0, stream()>>>(jobs, n);
      cudaCheckLaunch();
    });
  });
}

void sgd_step(Tensor& p, const Tensor& g, Tensor& buf, const SgdCoeffs& c) {
  int64_t n = p.numel();
  if (n == 0) return;
  dispatch_float(p.dtype(), "cuda sgd", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    T* pb = c.momentum != 0 ? buf.data<T>() : nullptr;
    sgd_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(p.data<T>(), g.data<T>(), pb, n, T(c.lr), T(c.weight_decay),
                                                            T(c.momentum), T(1 - c.dampening), c.weight_decay != 0,
                                                            c.nesterov, c.first_step);
    cudaCheckLaunch();
  });
}

double sum_squares(const std::vector<Tensor>& xs) {
  if (xs.empty()) return 0;
  // Tensor i's blocks write partial[i][0, kNormBlocks); an empty tensor leaves its zeros.
  Tensor partial = Tensor::zeros({(int64_t)xs.size() * kNormBlocks}, DType::f64, Device::cuda);
  for (const Tensor& x : xs) require_float(x.dtype(), "cuda sum_squares");
  for (DType dt : {DType::f32, DType::f64}) {
    std::vector<NormJob> jobs;
    for (size_t i = 0; i < xs.size(); ++i)
      if (xs[i].dtype() == dt && xs[i].numel() > 0) jobs.push_back({xs[i].raw(), xs[i].numel(), (int64_t)i});
    for (size_t from = 0; from < jobs.size(); from += 65535) {  // gridDim.y's limit
      const std::vector<NormJob> part(jobs.begin() + from, jobs.begin() + std::min(jobs.size(), from + 65535));
      Tensor table = upload_table(part);
      dispatch_float(dt, "cuda sum_squares", [&](auto tag_) {
        using T = typename decltype(tag_)::type;
        sum_squares_kernel<T><<<dim3(kNormBlocks, (unsigned)part.size()), kThreads, 0, stream()>>>(
            static_cast<const NormJob*>(table.raw()), partial.data<double>());
        cudaCheckLaunch();
      });
    }
  }
  const std::vector<double> host = partial.vec<double>();
  double total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    double tensor_total = 0;  // per tensor first, as the CPU kernel adds them
    for (int b = 0; b < kNormBlocks; ++b) tensor_total += host[i * kNormBlocks + b];
    total += tensor_total;
  }
  return total;
}

void scale_in_place(const std::vector<Tensor>& xs, double s) {
  std::vector<std::pair<DType, Job>> all;
  for (const Tensor& x : xs) all.push_back({x.dtype(), Job{{x.raw()}, x.numel(), 0, 0, {s}}});
  for_each_dtype(all, {0}, "cuda scale_in_place", [](DType dt, unsigned blocks, const Job* jobs, int n) {
    dispatch_float(dt, "cuda scale_in_place", [&](auto tag_) {
      using T = typename decltype(tag_)::type;
      scale_kernel<T><<<blocks, kThreads, 0, stream()>>>(jobs, n);
      cudaCheckLaunch();
    });
  });
}

}  // namespace psa::cuda
