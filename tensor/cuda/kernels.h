// CUDA kernels: the same interface as tensor/cpu/kernels.h, in namespace psa::cuda, implemented in
// tensor/cuda/<family>.cu. Every function takes contiguous device tensors already checked by the op in
// autograd/, writes the outputs the caller allocated, and checks its launches (cudaCheck). Deterministic:
// no reduction that feeds training uses atomics; sums run in a fixed-order tree or loop. (cuBLAS promises bitwise
// reproducible results only while one stream runs its calls; the training step uses one.)
// This header needs no CUDA headers, so the C++ side (autograd/, nn/) includes it in every build; the
// definitions exist only in CUDA builds (tensor/dispatch.h never references them otherwise).
#pragma once
#include "tensor/cpu/kernels.h"

namespace psa::cuda {

using cpu::AdamWCoeffs;
using cpu::AdamWSlot;
using cpu::BinaryOp;
using cpu::kBiasSumChunk;
using cpu::patch_dims;
using cpu::PatchDims;
using cpu::SgdCoeffs;
using cpu::UnaryOp;

// elementwise.cu
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);
void unary(UnaryOp op, const Tensor& x, double param, Tensor& out);
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx);
void swiglu(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& gout, Tensor& g_gate, Tensor& g_up);
void bias_act(UnaryOp act, const Tensor& x, const Tensor& bias, Tensor& out);
void bias_act_backward(UnaryOp act, const Tensor& x, const Tensor& bias, const Tensor& gout, Tensor& gx, Tensor& gbias);
void broadcast_to(const Tensor& a, Tensor& out);

// reduce.cu
void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out);
void max_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor& argmax);
void max_backward(const Tensor& gout, const Tensor& argmax, int64_t outer, int64_t n, int64_t inner, Tensor& ga);

// shape.cu
void permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out);
void copy_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, Tensor& out, int64_t n_out, int64_t at);
void extract_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, int64_t at, int64_t n_out, Tensor& out);
void index_select(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& out);
void index_add(const Tensor& g, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& ga);

// matmul.cu: cuBLAS (f32, f64). TF32 tensor cores only when enabled (set_tf32(true) or PSA_TF32=1).
void matmul(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K,
            int64_t stride_a, int64_t stride_b, Tensor& out, float beta = 0);

// optim.cu
void adamw_steps(const std::vector<AdamWSlot>& slots);
void sgd_step(Tensor& p, const Tensor& g, Tensor& buf, const SgdCoeffs& c);
// Fixed-order block partials in double for every tensor, copied to the host in one transfer (one wait for the
// device per call, not one per tensor) and summed there in order.
double sum_squares(const std::vector<Tensor>& xs);
void scale_in_place(const std::vector<Tensor>& xs, double s);

// nn.cu
void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& out, Tensor& mean, Tensor& rstd);
void layer_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                         Tensor& gx, Tensor& gw, Tensor& gb);
void rms_norm(const Tensor& x, const Tensor& w, double eps, Tensor& out, Tensor& rstd);
void rms_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& gx, Tensor& gw);
void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& out);
void softmax_backward(const Tensor& gout, const Tensor& y, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& gx);
void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t count, Tensor& loss,
                   Tensor& lse);
void cross_entropy_backward(const Tensor& gout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            int64_t ignore_index, int64_t count, Tensor& glogits);
uint32_t dropout_threshold(double p);
void dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, Tensor& out);

// attention.cu. rope as on the CPU. attention is flash-style and so differs from the CPU interface in what it
// saves: instead of the probabilities [B, H, T, S] it keeps the row log-sum-exp `lse` [B, H, T] (-inf for a
// fully masked row), and its backward recomputes the probabilities tile by tile from q, k, lse, the mask and
// the causal flag; it also needs the forward output (for rowsum(dO∘O)). Head dim D <= 128.
void rope(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out);
void rope_backward(const Tensor& gout, const Tensor& cos, const Tensor& sin, Tensor& gx);
void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
               Tensor& out, Tensor& lse);
void attention_backward(const Tensor& gout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& mask, bool causal, double scale, Tensor& gq, Tensor& gk,
                        Tensor& gv);
constexpr int64_t kMaxAttentionHeadDim = 128;
// Two designs of the attention kernels, both checked by the parity suite: `tiles` (the default: every product a
// register-tiled small GEMM between shared tiles) and `rows` (the earlier one: a warp owns 4 rows, a lane one key of
// the tile). PSA_ATTENTION=rows|tiles (read once) or set_attention_kernel; bench_kernels_cuda times both, and the
// one a GPU run ranks second is to be removed.
enum class AttentionKernel { tiles, rows };
inline constexpr AttentionKernel kAttentionKernels[] = {AttentionKernel::tiles, AttentionKernel::rows};
void set_attention_kernel(AttentionKernel k);
AttentionKernel attention_kernel();
const char* attention_kernel_name(AttentionKernel k);  // "tiles", "rows"

// conv.cu
void patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out);
void patch_conv_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw, Tensor& gbias);
void depthwise_conv3x3(const Tensor& x, const Tensor& w, Tensor& out);
void depthwise_conv3x3_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw);
void adaptive_avg_pool2d(const Tensor& x, Tensor& out);
void adaptive_avg_pool2d_backward(const Tensor& gout, Tensor& gx);

// ---- GEMM selection (matmul.cu, sgemm.cu). cuBLAS is the default; the hand-written tiled SGEMM of sgemm.cu
// is chosen with set_gemm(GemmImpl::own) or PSA_GEMM=own in the environment (read once). f64 always uses cuBLAS.
enum class GemmImpl { cublas, own };
void set_gemm(GemmImpl impl);
GemmImpl gemm_impl();
void set_tf32(bool on);  // cuBLAS f32 GEMMs on TF32 tensor cores (off by default: parity tests need fp32)
bool tf32();
// Row-major C = alpha·op(A)·op(B) + beta·C on device pointers, `batch` problems strided by sa, sb, sc.
void sgemm(GemmImpl impl, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta, float* C, int64_t ldc,
           int64_t sc, int64_t batch = 1);
void dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
           int64_t sa, const double* B, int64_t ldb, int64_t sb, double beta, double* C, int64_t ldc, int64_t sc,
           int64_t batch = 1);
// The hand-written kernel's variants (sgemm.cu): K tiles of 8 or 16. Chosen with set_own_tile or PSA_GEMM=own-k16
// (own-k8; plain own is k8); `psa bench-gemm` times each against cuBLAS.
enum class OwnTile { k8, k16 };
inline constexpr OwnTile kOwnTiles[] = {OwnTile::k8, OwnTile::k16};
void set_own_tile(OwnTile t);
OwnTile own_tile();
const char* own_tile_name(OwnTile t);  // "k8", "k16"
// The hand-written kernel alone (sgemm.cu), one problem, with the chosen variant.
void own_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// bench: times `reps` square f32 GEMMs of size n with CUDA events after a warm-up and a validation against
// cuBLAS; returns ms per GEMM and the max normalised error of the chosen implementation vs cuBLAS.
struct GemmTiming {
  double ms = 0, max_err = 0;
};
GemmTiming time_sgemm(GemmImpl impl, int64_t n, int reps);
void synchronize();

}  // namespace psa::cuda
