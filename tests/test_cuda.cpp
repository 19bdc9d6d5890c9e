// CUDA checks: every op of the op table CPU vs CUDA on identical inputs (forward and backward, f32 and f64,
// NaN/Inf parity, guard bytes around every CUDA allocation), determinism of the reductions that feed training,
// the hand-written SGEMM against cuBLAS, and one full training step of each PSA stage CPU vs CUDA.
// Without a GPU (or in a CPU-only build) every test skips with a visible message; the CUDA sources are still
// compiled and linked whenever nvcc exists. Failures name the op, the trial, the dtype and what differed, so
// one GPU run pinpoints every wrong kernel.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <set>

#include "nn/conform.h"
#include "nn/optim.h"
#include "op_harness.h"
#include "test_util.h"
#include "psa/train.h"
#include "tensor/device.h"
#include "tensor/dispatch.h"
#include "tensor/tensor.h"

#ifdef PSA_CUDA_EMU
#include <cuda_runtime.h>
#endif

namespace psa {
namespace {

// PSA_REQUIRE_GPU=1 (bench/gpu_check.sh) turns the skip into a failure: on the GPU machine a device the runtime
// cannot use (a driver older than the toolkit the build used, no device visible) must not pass as "all skipped".
#define SKIP_WITHOUT_GPU()                                                                      \
  if (!gpu::available()) {                                                                      \
    if (std::getenv("PSA_REQUIRE_GPU")) FAIL() << "PSA_REQUIRE_GPU is set: " << gpu::describe(); \
    GTEST_SKIP() << "CUDA tests skipped: " << gpu::describe();                                  \
  }

TEST(Cuda, HostDeviceRoundTripIsExact) {
  SKIP_WITHOUT_GPU();
  Tensor h = Tensor::from(std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 7.0f}, {5});
  Tensor back = h.to(Device::cuda).to(Device::cpu);
  EXPECT_EQ(back.vec<float>(), h.vec<float>());
  EXPECT_GT(gpu::peak_bytes(), 0u);
  EXPECT_GE(gpu::peak_reserved_bytes(), gpu::peak_bytes());  // cached blocks stay held
  // Seeded creation gives the host's values on the device.
  const Tensor n = randn({3, 5}, 7, DType::f32, 0.5, Device::cuda), u = rand_uniform({4}, 7, -1, 2, DType::f64, Device::cuda);
  EXPECT_EQ(n.device(), Device::cuda);
  EXPECT_EQ(n.vec<float>(), randn({3, 5}, 7, DType::f32, 0.5).vec<float>());
  EXPECT_EQ(u.vec<double>(), rand_uniform({4}, 7, -1, 2, DType::f64).vec<double>());
}

// Integer uploads keep their host bytes: reading them back (ids, labels, index maps) copies nothing from the
// device, nor does a view of them; the host original may change afterwards. What the device made (a slice, a
// float tensor) is read from the device, and an overwrite on the device drops the host bytes.
TEST(Cuda, IntegerUploadsAreReadBackWithoutADeviceCopy) {
  SKIP_WITHOUT_GPU();
  std::vector<int64_t> ids{5, 1, 4, 1, 5, 9, 2, 6};
  Tensor host = Tensor::from(ids, {2, 4}, DType::i64);
  Tensor dev = host.to(Device::cuda);
  host.data<int64_t>()[0] = 99;  // the device tensor keeps what was uploaded
  const int64_t copies = gpu::host_copies();
  EXPECT_EQ(dev.vec<int64_t>(), ids);
  EXPECT_EQ(reshape(dev, {8}).to(Device::cpu).vec<int64_t>(), ids);
  EXPECT_EQ(gpu::host_copies(), copies) << "an uploaded integer tensor was copied back from the device";
  EXPECT_EQ(slice(dev, 0, 1, 2).vec<int64_t>(), (std::vector<int64_t>{5, 9, 2, 6}));
  EXPECT_EQ(Tensor::from(std::vector<float>{1, 2}, {2}).to(Device::cuda).vec<float>(), (std::vector<float>{1, 2}));
  EXPECT_EQ(gpu::host_copies(), copies + 2) << "tensors made or updated on the device must be read from it";
  dev.contiguous_copy_from(Tensor::from(std::vector<int64_t>{0, 0, 0, 0, 7, 7, 7, 7}, {2, 4}, DType::i64));
  EXPECT_EQ(dev.vec<int64_t>(), (std::vector<int64_t>{0, 0, 0, 0, 7, 7, 7, 7}));
  EXPECT_EQ(gpu::host_copies(), copies + 3);
}

// ---- helpers ------------------------------------------------------------------------------------------------

using test::Inputs;
using test::OpCase;

// GEMM-class ops accumulate long dot products in a different order on each device.
bool gemm_class(const std::string& op) { return op == "matmul" || op == "attention" || op == "patch_conv"; }

double tolerance(const std::string& op, DType dt) {
  if (dt == DType::f64) return gemm_class(op) ? 1e-10 : 1e-12;
  return gemm_class(op) ? 5e-4 : 1e-5;
}

// 0 finite, 1 NaN, 2 +Inf, 3 -Inf.
int value_class(double v) { return std::isnan(v) ? 1 : std::isinf(v) ? (v > 0 ? 2 : 3) : 0; }

// Compares two tensors: same shape, same NaN/Inf positions (or, with finite_only, the same finite/non-finite
// positions), normalised error max |cuda - cpu| / (1 + |cpu|) over finite pairs within tol, and so is
// ||cuda - cpu|| / ||cpu|| (test_util.h: the first alone misses a wrong scale of small values). "" when they agree.
std::string compare(const Tensor& cpu, const Tensor& gpu, double tol, bool finite_only = false) {
  if (cpu.defined() != gpu.defined())
    return std::string("defined on ") + (cpu.defined() ? "cpu" : "cuda") + " only";
  if (!cpu.defined()) return "";
  if (gpu.device() != Device::cuda) return "CUDA result is on the cpu";
  if (cpu.shape() != gpu.shape()) return "shape " + shape_str(gpu.shape()) + " vs cpu " + shape_str(cpu.shape());
  if (cpu.dtype() != gpu.dtype()) return std::string("dtype ") + dtype_name(gpu.dtype()) + " vs " + dtype_name(cpu.dtype());
  std::vector<double> c = cpu.to_vector(), g = gpu.to_vector();
  double worst = 0;
  int64_t worst_at = -1, class_mismatch = -1;
  for (size_t i = 0; i < c.size(); ++i) {
    int cc = value_class(c[i]), gc = value_class(g[i]);
    if (finite_only ? (cc == 0) != (gc == 0) : cc != gc) {
      if (class_mismatch < 0) class_mismatch = (int64_t)i;
      continue;
    }
    if (cc != 0) continue;
    double e = std::fabs(g[i] - c[i]) / (1 + std::fabs(c[i]));
    if (e > worst) worst = e, worst_at = (int64_t)i;
  }
  if (class_mismatch >= 0)
    return str_cat("NaN/Inf parity broken at element ", class_mismatch, ": cuda ", g[class_mismatch], " vs cpu ",
                   c[class_mismatch]);
  if (worst > tol)
    return str_cat("normalised error ", worst, " > ", tol, " at element ", worst_at, ": cuda ", g[worst_at], " vs cpu ",
                   c[worst_at]);
  const double rel = test::relative_norm_error(g, c);
  if (rel > tol) return str_cat("relative norm error ||cuda - cpu|| / ||cpu|| ", rel, " > ", tol);
  return "";
}

Inputs make_inputs(const OpCase& c, size_t trial, DType dtype) {
  const auto& shapes = c.shapes[trial];
  Inputs in64 = c.make_inputs ? c.make_inputs(shapes, 1000 + trial, DType::f64)
                              : test::randn_inputs(shapes, 1000 + trial, DType::f64);
  if (dtype == DType::f64) return in64;
  Inputs out;
  for (const Tensor& x : in64) out.push_back(is_float(x.dtype()) ? x.to(dtype) : x);
  return out;
}

bool differentiable(const OpCase& c, size_t i, const Tensor& x) {
  return is_float(x.dtype()) && (c.differentiable.empty() || c.differentiable[i]);
}

// Runs the op on copies of `in` placed on `device`, with gradients for the differentiable inputs; then, if the
// output needs one, backward with `gout`. Returns {output, grad of input 0, grad of input 1, ...}.
std::vector<Tensor> run_op(const OpCase& c, const Inputs& in, Device device, const Tensor& gout_host, bool backward) {
  Inputs x;
  for (size_t i = 0; i < in.size(); ++i) {
    Tensor t = in[i].to(device);
    if (device == Device::cpu) t = t.clone();
    if (backward && differentiable(c, i, t)) t.requires_grad_();
    x.push_back(t);
  }
  std::vector<Tensor> r{c.run(x)};
  if (backward && r[0].requires_grad() && r[0].numel() > 0) {
    r[0].backward(gout_host.to(device));
    for (const Tensor& t : x) r.push_back(t.requires_grad() ? t.grad() : Tensor());
  }
  return r;
}

// After a kernel fault (illegal address, ...) every later CUDA call fails with the same sticky error.
bool device_usable() {
  try {
    gpu::check_guards();
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// Every case of every op-table row (tests/cases_*.cpp), CPU vs CUDA. Returns one line per disagreement.
std::vector<std::string> op_parity(DType dtype, const std::set<std::string>& only = {}) {
  std::vector<std::string> failures;
  for (const OpCase& c : test::op_cases()) {
    if (!only.empty() && !only.count(c.op)) continue;
    for (size_t t = 0; t < c.shapes.size(); ++t) {
      std::string where = str_cat("op '", c.op, "' trial ", t, " ", dtype_name(dtype), ": ");
      Inputs in = make_inputs(c, t, dtype);
      try {
        std::vector<Tensor> ref = run_op(c, in, Device::cpu, Tensor(), false);
        Tensor gout = randn(ref[0].shape(), 77 + t, dtype);
        ref = run_op(c, in, Device::cpu, gout, true);
        std::vector<Tensor> got = run_op(c, in, Device::cuda, gout, true);
        double tol = tolerance(c.op, dtype);
        std::string e = compare(ref[0], got[0], tol);
        if (!e.empty()) failures.push_back(where + "forward: " + e);
        if (ref.size() != got.size()) {
          failures.push_back(where + "backward ran on one device only");
          continue;
        }
        for (size_t i = 1; i < ref.size(); ++i) {
          e = compare(ref[i], got[i], tol);
          if (!e.empty()) failures.push_back(str_cat(where, "gradient of input ", i - 1, ": ", e));
        }
        // Synchronises, so an asynchronous kernel fault is charged to this op rather than to a later one.
        for (const std::string& g : gpu::check_guards()) failures.push_back(where + "guard bytes: " + g);
      } catch (const std::exception& ex) {
        failures.push_back(where + "threw: " + ex.what());
        if (!device_usable()) {
          failures.push_back(where + "the CUDA context is unusable after this op (a kernel fault): stopping here");
          return failures;
        }
      }
    }
  }
  return failures;
}

// Guard mode for the duration of a test: every CUDA allocation gets guard bytes and a NaN-filled body.
struct GuardScope {
  GuardScope() { gpu::set_guard_mode(true); }
  ~GuardScope() { gpu::set_guard_mode(false); }
};

void report(const std::vector<std::string>& failures) {
  for (const std::string& f : failures) ADD_FAILURE() << f;
}

// ---- op parity ----------------------------------------------------------------------------------------------

TEST(CudaParity, EveryTableRowHasACase) {
  // The parity walk covers exactly tests/test_ops.cpp's cases, so no op can be missed on CUDA either.
  std::set<std::string> covered;
  for (const OpCase& c : test::op_cases()) covered.insert(c.op);
  for (const OpRow& row : op_table()) EXPECT_TRUE(covered.count(row.name)) << "op '" << row.name << "' has no case";
}

TEST(CudaParity, EveryOpMatchesCpuInF32) {
  SKIP_WITHOUT_GPU();
  GuardScope guard;
  report(op_parity(DType::f32));
}

TEST(CudaParity, EveryOpMatchesCpuInF64) {
  SKIP_WITHOUT_GPU();
  GuardScope guard;
  report(op_parity(DType::f64));
}

// The default run above uses the "tiles" attention kernels; the earlier "rows" design stays checked until a GPU
// run ranks the two (kernels.h).
TEST(CudaParity, AttentionRowsKernelsMatchCpu) {
  SKIP_WITHOUT_GPU();
#ifdef PSA_CUDA  // a CPU-only build (CUDA=0) has no cuda:: kernels to link; the skip above is what it shows
  GuardScope guard;
  const cuda::AttentionKernel before = cuda::attention_kernel();
  cuda::set_attention_kernel(cuda::AttentionKernel::rows);
  std::vector<std::string> failures = op_parity(DType::f32, {"attention"});
  for (const std::string& f : op_parity(DType::f64, {"attention"})) failures.push_back(f);
  cuda::set_attention_kernel(before);
  report(failures);
#endif
}

// Op case `c` (trial 0, f32) with a NaN first and an Inf last in input `poisoned`: the forward on both devices
// must fail alike or give NaN/Inf in the same places. "" when they agree.
// Attention's keys and values get the Inf at the end of key 0 instead: a key that a row cannot see under the
// causal mask still meets a zero probability in a blocked product (0·Inf = NaN), and which rows' products include
// it depends on the blocking (the CPU's row chunks, the GPU's 32-key tiles, as in torch's blocked kernels).
std::string nan_inf_parity(const OpCase& c, size_t poisoned) {
  Inputs in = make_inputs(c, 0, DType::f32);
  if (!is_float(in[poisoned].dtype()) || in[poisoned].numel() == 0) return "";
  std::vector<float> v = in[poisoned].vec<float>();
  v[0] = NAN;
  const bool keys = c.op == "attention" && (poisoned == 1 || poisoned == 2);
  const size_t inf_at = keys ? (size_t)(in[poisoned].size(2) * in[poisoned].size(3)) - 1 : v.size() - 1;
  if (v.size() > 2) v[inf_at] = INFINITY;
  in[poisoned] = Tensor::from(v, in[poisoned].shape());
  const std::string where = str_cat("op '", c.op, "' with NaN/Inf in input ", poisoned, " ", shape_str(in[poisoned].shape()),
                                    " of ", in.size(), ": ");
  Tensor cpu_out, gpu_out;
  std::string cpu_err, gpu_err;
  try { cpu_out = run_op(c, in, Device::cpu, Tensor(), false)[0]; } catch (const std::exception& e) { cpu_err = e.what(); }
  try {
    gpu_out = run_op(c, in, Device::cuda, Tensor(), false)[0];
    gpu::check_guards();  // synchronises: a kernel fault is charged to this op
  } catch (const std::exception& e) {
    gpu_err = e.what();
    if (!device_usable()) return where + "kernel fault, CUDA context unusable: " + gpu_err;
  }
  if (cpu_err.empty() != gpu_err.empty()) return where + "cpu error '" + cpu_err + "', cuda error '" + gpu_err + "'";
  if (!cpu_err.empty()) return "";
  // Long dot products (GEMMs, attention) may turn Inf into NaN in a different order: finite-ness must match.
  const std::string e = compare(cpu_out, gpu_out, 1e30, gemm_class(c.op));
  return e.empty() ? "" : where + e;
}

// Each float input in turn (weights, keys and masks as well as the data).
TEST(CudaParity, NanAndInfPropagateLikeCpu) {
  SKIP_WITHOUT_GPU();
  std::vector<std::string> failures;
  for (const OpCase& c : test::op_cases()) {
    for (size_t i = 0; i < make_inputs(c, 0, DType::f32).size(); ++i) {
      const std::string f = nan_inf_parity(c, i);
      if (!f.empty()) failures.push_back(f);
      if (!device_usable()) break;
    }
    if (!device_usable()) break;
  }
  report(failures);
}

TEST(CudaParity, TrainingReductionsAreBitwiseReproducible) {
  SKIP_WITHOUT_GPU();
  // Big enough for many blocks and row chunks: any atomic or timing-dependent order would show.
  auto grads = [](const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Shape>& shapes) {
    std::vector<Tensor> x;
    for (size_t i = 0; i < shapes.size(); ++i) x.push_back(randn(shapes[i], 90 + i).to(Device::cuda).requires_grad_());
    Tensor y = f(x);
    sum(mul(y, y)).backward();
    std::vector<std::vector<float>> out{y.vec<float>()};
    for (const Tensor& t : x) out.push_back(t.grad().vec<float>());
    return out;
  };
  struct Case {
    const char* name;
    std::function<Tensor(const std::vector<Tensor>&)> f;
    std::vector<Shape> shapes;
  };
  std::vector<Case> cases = {
      {"layer_norm", [](const std::vector<Tensor>& x) { return layer_norm(x[0], x[1], x[2], 1e-5); },
       {{4133, 96}, {96}, {96}}},
      {"rms_norm", [](const std::vector<Tensor>& x) { return rms_norm(x[0], x[1], 1e-6); }, {{4133, 96}, {96}}},
      {"attention", [](const std::vector<Tensor>& x) { return attention(x[0], x[1], x[2], true); },
       {{3, 131, 4, 32}, {3, 131, 2, 32}, {3, 131, 2, 32}}},
      {"sum", [](const std::vector<Tensor>& x) { return sum(x[0], 0); }, {{20001, 7}}},
      {"bias_act", [](const std::vector<Tensor>& x) { return bias_act(x[0], x[1], "quick_gelu"); }, {{4133, 96}, {96}}},
      {"patch_conv", [](const std::vector<Tensor>& x) { return patch_conv(x[0], x[1], x[2]); },
       {{5, 3, 32, 32}, {16, 3, 4, 4}, {16}}},
      {"depthwise_conv3x3", [](const std::vector<Tensor>& x) { return depthwise_conv3x3(x[0], x[1]); },
       {{4, 9, 9, 24}, {24, 1, 3, 3}}},
      {"embedding", [](const std::vector<Tensor>& x) {
         return embedding(x[0], Tensor::from(std::vector<int64_t>{3, 1, 3, 3, 0, 7, 3}, {7}, DType::i64).to(Device::cuda));
       }, {{8, 33}}},
  };
  for (const Case& c : cases) {
    auto a = grads(c.f, c.shapes), b = grads(c.f, c.shapes);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << c.name << ": result " << i << " differs run to run";
  }
  Tensor logits = randn({300, 1000}, 5).to(Device::cuda).requires_grad_();
  std::vector<int64_t> t(300);
  for (int64_t i = 0; i < 300; ++i) t[i] = (i * 37) % 1000;
  Tensor targets = Tensor::from(t, {300}, DType::i64).to(Device::cuda);
  double l1 = cross_entropy(logits, targets).item(), l2 = cross_entropy(logits, targets).item();
  EXPECT_EQ(l1, l2) << "cross_entropy loss differs run to run";
  Tensor g = randn({1 << 20}, 6).to(Device::cuda);
  const std::vector<Tensor> gs{g};
  EXPECT_EQ(PSA_KERNEL(Device::cuda, sum_squares)(gs), PSA_KERNEL(Device::cuda, sum_squares)(gs));
}

TEST(CudaParity, OptimizerKernelsMatchCpu) {
  SKIP_WITHOUT_GPU();
#ifdef PSA_CUDA
  GuardScope guard;
  Shape s{1001, 3};
  Tensor p = randn(s, 1), g = randn(s, 2), m = randn(s, 3, DType::f32, 0.1), v = mul(m, m);
  std::vector<Tensor> host{p.clone(), g, m.clone(), v.clone()}, dev{p.to(Device::cuda), g.to(Device::cuda),
                                                                    m.to(Device::cuda), v.to(Device::cuda)};
  cpu::AdamWCoeffs c{1e-3, 0.9, 0.999, 1e-8, 0.01, 3};
  cpu::adamw_steps({{&host[0], &host[2], &host[3], &host[1], c}});
  cuda::adamw_steps({{&dev[0], &dev[2], &dev[3], &dev[1], c}});
  const char* names[] = {"adamw p", "adamw g", "adamw m", "adamw v"};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(compare(host[i], dev[i], 1e-6), "") << names[i];
  // SGD: the first step (buffer = gradient), a Nesterov step on that buffer, a plain momentum step, and one
  // without momentum or weight decay (no buffer).
  Tensor b_host = Tensor::zeros(s), b_dev = Tensor::zeros(s, DType::f32, Device::cuda);
  for (cpu::SgdCoeffs sc : {cpu::SgdCoeffs{0.1, 0.9, 0.1, 0.01, false, true}, cpu::SgdCoeffs{0.1, 0.9, 0.1, 0.01, true, false},
                            cpu::SgdCoeffs{0.1, 0.9, 0.1, 0.01, false, false}, cpu::SgdCoeffs{0.1, 0.0, 0.0, 0.0, false, false}}) {
    const std::string what = str_cat("sgd (momentum ", sc.momentum, ", nesterov ", sc.nesterov, ", first ", sc.first_step, ")");
    cpu::sgd_step(host[0], host[1], b_host, sc);
    PSA_KERNEL(Device::cuda, sgd_step)(dev[0], dev[1], b_dev, sc);
    EXPECT_EQ(compare(host[0], dev[0], 1e-6), "") << what << " p";
    EXPECT_EQ(compare(b_host, b_dev, 1e-6), "") << what << " momentum buffer";
  }
  // Several tensors in one call, an empty one among them; the sum in the CPU kernel's order.
  Tensor empty_host = Tensor::zeros({0}), empty_dev = empty_host.to(Device::cuda);
  const double want = cpu::sum_squares({host[1], empty_host, host[2]});
  EXPECT_NEAR(PSA_KERNEL(Device::cuda, sum_squares)(std::vector<Tensor>{dev[1], empty_dev, dev[2]}), want, 1e-9 * want);
  EXPECT_EQ(PSA_KERNEL(Device::cuda, sum_squares)(std::vector<Tensor>{}), 0.0);
  cuda::scale_in_place({dev[1]}, 0.25);
  cpu::scale_in_place({host[1]}, 0.25);
  EXPECT_EQ(compare(host[1], dev[1], 0), "") << "scale_in_place";
  // One buffer twice in one launch would be updated by two sets of blocks at once: refused, naming the op.
  try {
    cuda::scale_in_place({dev[1], dev[1]}, 2.0);
    ADD_FAILURE() << "scale_in_place accepted one buffer twice";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cuda scale_in_place: two of its tensors share"), std::string::npos) << e.what();
  }
  // One launch for many tensors: sizes past one job's block cap, a tiny one, an empty one, an f64 one (a launch
  // of its own), each with its own learning rate; every result as the CPU's, per tensor.
  std::vector<Shape> shapes{{300000}, {5}, {0}, {7, 9}, {2049}};
  std::vector<std::vector<Tensor>> hs, ds;
  std::vector<cpu::AdamWSlot> host_slots, dev_slots;
  hs.reserve(shapes.size());
  ds.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    const DType dt = i == 3 ? DType::f64 : DType::f32;
    Tensor pi = randn(shapes[i], 10 + i, dt), gi = randn(shapes[i], 20 + i, dt), mi = randn(shapes[i], 30 + i, dt, 0.1);
    hs.push_back({pi.clone(), gi, mi.clone(), mul(mi, mi)});
    ds.push_back({pi.to(Device::cuda), gi.to(Device::cuda), mi.to(Device::cuda), mul(mi, mi).to(Device::cuda)});
    const cpu::AdamWCoeffs ci{1e-3 * (i + 1), 0.9, 0.999, 1e-8, 0.01, 3};
    host_slots.push_back({&hs[i][0], &hs[i][2], &hs[i][3], &hs[i][1], ci});
    dev_slots.push_back({&ds[i][0], &ds[i][2], &ds[i][3], &ds[i][1], ci});
  }
  cpu::adamw_steps(host_slots);
  cuda::adamw_steps(dev_slots);
  std::vector<Tensor> hg, dg;
  for (size_t i = 0; i < shapes.size(); ++i) {
    for (int k : {0, 2, 3}) EXPECT_EQ(compare(hs[i][k], ds[i][k], 1e-6), "") << "adamw tensor " << i << " part " << k;
    hg.push_back(hs[i][1]);
    dg.push_back(ds[i][1]);
  }
  cpu::scale_in_place(hg, -0.5);
  cuda::scale_in_place(dg, -0.5);
  for (size_t i = 0; i < shapes.size(); ++i) EXPECT_EQ(compare(hg[i], dg[i], 0), "") << "scale tensor " << i;
  const double want_all = cpu::sum_squares(hg);
  EXPECT_NEAR(cuda::sum_squares(dg), want_all, 1e-9 * want_all);
  std::vector<float> bad = g.vec<float>();
  bad[777] = INFINITY;
  const std::vector<Tensor> with_inf{dev[2], Tensor::from(bad, s).to(Device::cuda)};
  EXPECT_TRUE(std::isinf(PSA_KERNEL(Device::cuda, sum_squares)(with_inf)));
  for (const std::string& e : gpu::check_guards()) ADD_FAILURE() << "optimizer kernels: guard bytes: " << e;
#endif
}

// ---- GEMM ---------------------------------------------------------------------------------------------------

#ifdef PSA_CUDA
TEST(CudaGemm, OwnSgemmMatchesCublasOnEveryLayoutAndEdge) {
  SKIP_WITHOUT_GPU();
  GuardScope guard;
  struct Size {
    int64_t M, N, K, pad;  // pad > 0 makes every leading dim longer than needed
  };
  // The float4 path needs every leading dim a multiple of 4: {132, 260, 20} and {4, 4, 4} take it with edge
  // tiles in M and N, a partial last K tile and K < BK; {100, 136, 44, 4} with padded leading dims. Long K over
  // few output tiles takes split-K: {40, 72, 3001} (slices with a partial last one), {64, 132, 2048, 4} (float4).
  const cuda::OwnTile tile_before = cuda::own_tile();
  for (cuda::OwnTile tile : cuda::kOwnTiles) {
    cuda::set_own_tile(tile);
    for (Size sz : std::vector<Size>{{1, 1, 1, 0}, {17, 33, 9, 0}, {128, 128, 8, 0}, {130, 67, 259, 0},
                                     {256, 512, 64, 0}, {97, 131, 45, 3}, {300, 200, 100, 1}, {132, 260, 20, 0},
                                     {4, 4, 4, 0}, {100, 136, 44, 4}, {40, 72, 3001, 0}, {64, 132, 2048, 4}}) {
      for (int layout = 0; layout < 4; ++layout) {
        bool ta = layout & 1, tb = layout & 2;
        for (float beta : {0.0f, 0.5f}) {
          int64_t lda = (ta ? sz.M : sz.K) + sz.pad, ldb = (tb ? sz.K : sz.N) + sz.pad, ldc = sz.N + sz.pad;
          int64_t rows_a = ta ? sz.K : sz.M, rows_b = tb ? sz.N : sz.K;
          Tensor a = randn({rows_a * lda}, 11).to(Device::cuda), b = randn({rows_b * ldb}, 12).to(Device::cuda);
          Tensor c0 = randn({sz.M * ldc}, 13);
          Tensor want = c0.to(Device::cuda), got = c0.to(Device::cuda);
          cuda::sgemm(cuda::GemmImpl::cublas, ta, tb, sz.M, sz.N, sz.K, 1.5f, a.data<float>(), lda, 0,
                      b.data<float>(), ldb, 0, beta, want.data<float>(), ldc, 0, 1);
          cuda::sgemm(cuda::GemmImpl::own, ta, tb, sz.M, sz.N, sz.K, 1.5f, a.data<float>(), lda, 0, b.data<float>(),
                      ldb, 0, beta, got.data<float>(), ldc, 0, 1);
          // fp32 rounding grows like sqrt(K), and the normalised error is per element (large near zero crossings).
          // Both sides round in fp32 on a GPU (the emulator's stand-in for cuBLAS is exact), so their errors add:
          // at K = 3001 the own kernel's split-K order against one sequential fp32 sum differs by up to 1.3e-4.
          // A wrong index or a lost tile is off by O(1), far above either tolerance.
          double tol = 1e-4 * std::max(1.0, std::sqrt(sz.K / 512.0));  // 1e-4 up to K = 512
          EXPECT_EQ(compare(want.to(Device::cpu), got, tol), "")
              << "own sgemm " << cuda::own_tile_name(tile) << " M=" << sz.M << " N=" << sz.N << " K=" << sz.K
              << " pad=" << sz.pad << " ta=" << ta << " tb=" << tb << " beta=" << beta;
        }
      }
    }
  }
  cuda::set_own_tile(tile_before);
  for (const std::string& e : gpu::check_guards()) ADD_FAILURE() << "own sgemm: guard bytes: " << e;
}

// K = 0: C = beta·C, and beta = 0 writes zeros over whatever C held (NaN here), on both GEMM paths and in f64,
// with a padded ldc and a batch of 2 (the padding is left alone).
TEST(CudaGemm, EmptyProductsScaleC) {
  SKIP_WITHOUT_GPU();
  const int64_t M = 3, N = 5, ldc = 7, sc = M * ldc + 2, batch = 2;
  for (double beta : {0.0, 0.5})
    for (int path = 0; path < 3; ++path) {
      std::vector<double> c0(batch * sc);
      for (size_t i = 0; i < c0.size(); ++i) c0[i] = beta == 0 ? NAN : (double)i;
      Tensor c = Tensor::from(c0, {batch * sc}, path == 2 ? DType::f64 : DType::f32).to(Device::cuda);
      Tensor a = Tensor::zeros({1}, c.dtype(), Device::cuda), b = Tensor::zeros({1}, c.dtype(), Device::cuda);
      if (path == 2)
        cuda::dgemm(false, false, M, N, 0, 1.0, a.data<double>(), 1, 0, b.data<double>(), N, 0, beta,
                    c.data<double>(), ldc, sc, batch);
      else
        cuda::sgemm(path == 0 ? cuda::GemmImpl::cublas : cuda::GemmImpl::own, false, false, M, N, 0, 1.0f,
                    a.data<float>(), 1, 0, b.data<float>(), N, 0, (float)beta, c.data<float>(), ldc, sc, batch);
      const std::vector<double> got = c.to_vector();
      for (int64_t i = 0; i < batch * sc; ++i) {
        const bool inside = i % sc < M * ldc && i % sc % ldc < N;
        const double want = !inside ? c0[i] : beta == 0 ? 0.0 : beta * c0[i];
        if (std::isnan(want) ? !std::isnan(got[i]) : got[i] != want)
          ADD_FAILURE() << "K = 0, path " << path << ", beta " << beta << ": element " << i << " is " << got[i]
                        << ", want " << want;
      }
    }
}

TEST(CudaGemm, MatmulOpsMatchCpuWithTheOwnKernel) {
  SKIP_WITHOUT_GPU();
  GuardScope guard;
  cuda::GemmImpl before = cuda::gemm_impl();
  cuda::set_gemm(cuda::GemmImpl::own);
  std::vector<std::string> failures = op_parity(DType::f32, {"matmul", "patch_conv"});
  cuda::set_gemm(before);
  report(failures);
}

TEST(CudaGemm, BenchmarkHelperValidates) {
  SKIP_WITHOUT_GPU();
  const cuda::OwnTile tile_before = cuda::own_tile();
  for (cuda::OwnTile tile : cuda::kOwnTiles) {
    cuda::set_own_tile(tile);
    cuda::GemmTiming t = cuda::time_sgemm(cuda::GemmImpl::own, 256, 2);
    EXPECT_GT(t.ms, 0);
    EXPECT_LT(t.max_err, 1e-5) << cuda::own_tile_name(tile);
  }
  cuda::set_own_tile(tile_before);
  cuda::GemmTiming t = cuda::time_sgemm(cuda::GemmImpl::cublas, 256, 2);
  EXPECT_GT(t.ms, 0);
  EXPECT_LT(t.max_err, 1e-5);
}
#endif

// ---- block copies past the device's pitch limit (the CPU emulator only: it can lower the limit) ------------

#ifdef PSA_CUDA_EMU
// concat and slice (forward and backward) copy blocks with cudaMemcpy2D, whose pitch is capped by the device
// (2^31 - 1 bytes: a block of a tensor over 2 GiB); with the limit lowered to 64 bytes these small tensors take
// the same paths: one plain copy when the rows touch, one copy per row when a pitch is past the limit.
TEST(CudaShape, BlocksWithPitchesPastTheDeviceLimitStillCopy) {
  SKIP_WITHOUT_GPU();
  struct Restore {
    size_t old = cuda_emu::set_max_pitch(64);
    ~Restore() { cuda_emu::set_max_pitch(old); }
  } restore;
  Tensor a = randn({3, 20}, 31), b = randn({3, 12}, 32), c = randn({5, 40}, 33);  // pitches 80, 48, 160 bytes
  auto run = [&](Device dev) {
    Tensor x = a.to(dev).requires_grad_();
    Tensor rows = concat({x, b.to(dev)}, 1);           // 3 rows: 80 and 48 into 128-byte rows
    Tensor whole = concat({c.to(dev), c.to(dev)}, 0);  // outer 1: one contiguous copy each
    Tensor part = slice(x, 1, 4, 17);                  // 52 of 80 bytes a row
    sum(mul(part, part)).backward();                   // the slice's backward writes the block into zeros
    return std::vector<Tensor>{rows, whole, part, x.grad()};
  };
  std::vector<Tensor> cpu = run(Device::cpu), gpu = run(Device::cuda);
  const char* names[] = {"concat dim 1", "concat dim 0", "slice", "slice backward"};
  for (size_t i = 0; i < cpu.size(); ++i) EXPECT_EQ(compare(cpu[i], gpu[i], 0.0), "") << names[i];
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}
#endif

// ---- streams and events ------------------------------------------------------------------------------------

// softmax(gelu(a·b) + a): launches, cuBLAS, a memset-free chain whose every step reads the previous one.
Tensor stream_chain(const Tensor& a, const Tensor& b) { return softmax(add(gelu(matmul(a, b)), a)); }

TEST(CudaStream, WithoutAGpuStreamsFailWithAClearMessage) {
  if (gpu::available()) GTEST_SKIP() << "a GPU is present: the no-GPU message is not reachable";
  try {
    gpu::Stream s;
    FAIL() << "a Stream was created without a GPU";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}

TEST(CudaStream, SideStreamsGiveTheDefaultStreamsResults) {
  SKIP_WITHOUT_GPU();
  Tensor a_host = randn({256, 256}, 11), b_host = randn({256, 256}, 12);
  Tensor want = stream_chain(a_host.to(Device::cuda), b_host.to(Device::cuda)).to(Device::cpu);
  gpu::Stream s1, s2;
  gpu::Event made;
  Tensor a, b, mid;
  {
    gpu::StreamGuard on(s1);
    a = a_host.to(Device::cuda), b = b_host.to(Device::cuda);
    mid = matmul(a, b);
    made.record();
  }
  Tensor got;
  {
    gpu::StreamGuard on(s2);
    s2.wait(made);  // without it s2 could read mid before s1 wrote it
    got = softmax(add(gelu(mid), a));
    got = got.to(Device::cpu);  // the copy to the host synchronises s2
  }
  s1.synchronize();
  // cuBLAS may pick another GEMM algorithm while several streams are active: GEMM tolerance, not bitwise.
  EXPECT_EQ(compare(want, got.to(Device::cuda), tolerance("matmul", DType::f32)), "")
      << "the same ops on two streams differ from one stream";
  EXPECT_EQ(gpu::current_stream(), nullptr) << "StreamGuard did not restore the default stream";
}

TEST(CudaStream, AllocatorReusesABlockOnlyOnItsOwnStream) {
  SKIP_WITHOUT_GPU();
  const size_t n = 3 << 20;  // a size no other test leaves in the cache
  void* p_default = gpu::alloc(n);
  gpu::free(p_default, n);
  void* p_side = nullptr;
  {
    gpu::Stream s;
    gpu::StreamGuard on(s);
    p_side = gpu::alloc(n);
    EXPECT_NE(p_side, p_default) << "a block freed on the default stream went to another stream";
    gpu::free(p_side, n);
    void* again = gpu::alloc(n);
    EXPECT_EQ(again, p_side) << "a stream does not reuse its own freed block";
    gpu::free(again, n);
  }
  // The side stream is gone: after its work ran, its cached block belongs to the default stream.
  void* x = gpu::alloc(n);
  void* y = gpu::alloc(n);
  std::set<void*> got{x, y};
  EXPECT_EQ(got, (std::set<void*>{p_default, p_side})) << "blocks of a destroyed stream were not adopted";
  gpu::free(x, n);
  gpu::free(y, n);
}

TEST(CudaStream, EventsTimeWorkOnTheDeviceClock) {
  SKIP_WITHOUT_GPU();
  Tensor a = randn({1024, 1024}, 13).to(Device::cuda);
  gpu::Event start, stop;
  start.record();
  Tensor c;
  for (int i = 0; i < 4; ++i) c = matmul(a, a, false, true);
  stop.record();
  stop.synchronize();
  EXPECT_TRUE(stop.done());
  float ms = stop.ms_since(start);
  EXPECT_GT(ms, 0.0f);
  EXPECT_LT(ms, 10000.0f);
  gpu::Event never;
  EXPECT_THROW(never.synchronize(), std::exception) << "waiting on an event never recorded should fail clearly";
}

// argmax has no op-table row (no backward), and its kernel path without values runs only here; rounded values
// make ties common, where both devices must pick the first maximum.
TEST(CudaParity, ArgmaxMatchesCpuWithTies) {
  SKIP_WITHOUT_GPU();
  std::vector<float> q = randn({3, 50, 40}, 5).vec<float>();
  for (float& v : q) v = std::round(v);
  Tensor x = Tensor::from(q, {3, 50, 40});
  for (int64_t d = 0; d < 3; ++d) {
    Tensor got = argmax(x.to(Device::cuda), d);
    EXPECT_EQ(got.device(), Device::cuda);
    EXPECT_EQ(got.vec<int64_t>(), argmax(x, d).vec<int64_t>()) << "dim " << d;
  }
}

// ---- a whole training step ----------------------------------------------------------------------------------

struct StepResult {
  double loss = 0, norm = 0;
  std::map<std::string, Tensor> grads, before, after;  // grads before clipping; params around the update
};

StepResult train_step(const std::string& stage, Device device, double lr) {
  PsaConfig cfg = PsaConfig::from_preset("tiny");
  PsaVlm m(cfg);
  m.initialize(3);
  LoraSettings lora{8, 16, 0.05, false};
  set_trainable(m, stage, lora, 3);
  if (device != Device::cpu) m.to(device);
  m.train();
  for (auto& l : m.lm->linears()) l->dropout_offset = 1;
  std::vector<nn::ParamRef> params = nn::trainable(m);
  nn::AdamW opt(params, lr, {0.9, 0.999, 1e-8, 0.01});
  PsaBatch b = random_batch(cfg, 4, 24, 9);
  for (Tensor* t : {&b.pixels, &b.ids, &b.labels, &b.level, &b.type}) *t = t->to(device);
  bool safety = stage != "base";
  PsaOutput out = m.forward(b, safety, true, safety);
  opt.zero_grad();
  out.loss.backward();
  StepResult r;
  r.loss = out.loss.item();
  for (const nn::ParamRef& p : params)
    if (p.param.grad().defined()) r.grads[p.name] = p.param.grad().clone();
  r.norm = nn::clip_grad_norm(params, 1.0);
  for (const nn::ParamRef& p : params) r.before[p.name] = p.param.clone();
  opt.update();
  for (const nn::ParamRef& p : params) r.after[p.name] = p.param.clone();
  return r;
}

TEST(CudaTrain, OneTinyStepOfEachStageMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const double lr = 1e-5;
  for (const char* stage : {"base", "stage1", "stage2"}) {
    SCOPED_TRACE(stage);
    StepResult c = train_step(stage, Device::cpu, lr), g = train_step(stage, Device::cuda, lr);
    EXPECT_NEAR(g.loss, c.loss, 1e-4 * (1 + std::fabs(c.loss))) << stage << ": loss";
    EXPECT_NEAR(g.norm, c.norm, 1e-3 * (1 + c.norm)) << stage << ": gradient norm";
    ASSERT_EQ(c.grads.size(), g.grads.size()) << stage << ": parameters with a gradient";
    for (auto& [name, cg] : c.grads) {
      ASSERT_TRUE(g.grads.count(name)) << stage << ": no CUDA gradient for " << name;
      Tensor gg = g.grads.at(name);
      EXPECT_EQ(gg.device(), Device::cuda) << name;
      std::vector<double> a = cg.to_vector(), b = gg.to_vector();
      double scale = 1e-6, err = 0;
      for (double v : a) scale = std::max(scale, std::fabs(v));
      for (size_t i = 0; i < a.size(); ++i) err = std::max(err, abs_error(a[i], b[i]));
      EXPECT_LE(err / scale, 2e-3) << stage << ": gradient of " << name << " (max abs err " << err << ", scale " << scale << ")";
    }
    // AdamW's first step moves each parameter by about lr·g/|g|: the updates (after - before) are compared, to
    // a twentieth of lr plus the rounding of the subtraction, wherever the gradient is clearly non-zero (there the
    // CUDA update must also have moved the parameter); a gradient near rounding may flip sign (2·lr apart).
    for (auto& [name, cb] : c.before) {
      std::vector<double> b0 = cb.to_vector(), c1 = c.after.at(name).to_vector(), g0 = g.before.at(name).to_vector(),
                          g1 = g.after.at(name).to_vector();
      std::vector<double> grad = c.grads.count(name) ? c.grads.at(name).to_vector() : std::vector<double>(b0.size(), 0);
      double scale = 0;
      for (double v : grad) scale = std::max(scale, std::fabs(v));
      int64_t bad = 0, still = 0;
      for (size_t i = 0; i < b0.size(); ++i) {
        const double dc = c1[i] - b0[i], dg = g1[i] - g0[i], rounding = 4e-7 * (std::fabs(b0[i]) + std::fabs(c1[i]));
        const bool clear = std::fabs(grad[i]) > std::max(1e-3 * scale, 1e-6);
        if (abs_error(dg, dc) > (clear ? 0.05 : 2.05) * lr + rounding) ++bad;
        if (clear && dg == 0) ++still;
      }
      EXPECT_EQ(g0, b0) << stage << ": " << name << " did not start from the same weights";
      EXPECT_EQ(bad, 0) << stage << ": update of " << name << " differs from the CPU's";
      EXPECT_EQ(still, 0) << stage << ": " << name << " did not move on the GPU where its gradient is non-zero";
    }
  }
}

// `psa conform --device cuda`: the Hugging Face / timm / torch fixtures through the CUDA kernels.
TEST(CudaConform, FixturesMatchOnCuda) {
  SKIP_WITHOUT_GPU();
  for (const char* kind : {"clip_vision", "llama", "llava", "c_abstractor", "mha"}) {
    nn::ConformReport r = nn::conform(std::string("tests/data/hf/") + kind, Device::cuda, 1e-4);
    EXPECT_GT(r.entries.size(), 5u) << kind;
    for (const nn::ConformEntry& e : r.entries) EXPECT_TRUE(e.ok) << kind << ": " << e.name << " relative error " << e.rel_err;
  }
}

}  // namespace
}  // namespace psa
