// psa bench-step: the end-to-end training-step benchmark of design.md's Performance table. One PsaVlm of a
// preset with random weights, one synthetic batch built like tools/psa_reference.py's --bench batch (so both
// sides time the same work), warm-up steps, then timed steps of forward + backward + clip + AdamW.
// --scaling sweeps batch size, text length and image patches and writes a Markdown table and a PNG chart.
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>

#if defined(__FMA__)
#include "bench/ceiling.h"
#endif
#include "nn/json.h"
#include "psa/image.h"
#include "psa/plot.h"
#include "psa/train.h"
#include "tensor/cuda/kernels.h"
#include "tensor/device.h"
#include "tensor/profile.h"
#include "tools/cli.h"

namespace psa {

static const char* kBenchStepUsage = R"(usage: psa bench-step [options]

Times training steps of PSA-VLM on a synthetic batch: forward, backward, global-norm clipping at 1.0 and
AdamW, the same step as `psa train` and as tools/psa_reference.py --bench (the PyTorch baseline).
Prints the median ms/step, merged tokens/s (text - 1 + safety tokens + patches per row), the peak RSS
and the thread count, and the model FLOP utilisation: the GEMM-class work of a step (matmul, attention,
patch_conv; tensor/profile.h) over its median time, against a peak measured in the same run (CPU: an FMA
loop on the same threads; CUDA: cuBLAS SGEMM at 8192²).

options:
  --preset tiny|small     model preset (default tiny)
  --stage base|1|2        which parameters train (default 1): base = ViT + projector + LLM; 1 = the safety
                          modules (the forward runs the head and the LLM with safety tokens); 2 = the whole LLM
                          (the PyTorch baseline's Stage II), or LoRA adapters with --lora
  --lora                  Stage II with LoRA (rank 16, alpha 16, dropout 0.05) instead of the full LLM
  --batch N               rows per batch (default 16 for tiny, 32 for small)
  --text-tokens N         text tokens per row, one of them the image token (default 32 tiny, 48 small)
  --threads N             OpenMP threads (default: OMP_NUM_THREADS or all cores)
  --steps N               timed steps (default 10; 5 per point with --scaling)
  --warmup N              untimed steps first (default 3; 2 per point with --scaling)
  --device cpu|cuda       where to run (default cpu)
  --seed N                weights and batch (default 0)
  --json                  one JSON object on stdout instead of text (not with --scaling)
  --profile               also time every kernel call during the timed steps and print a table: kernel
                          (forward, or backward when run by the backward pass), calls and ms per step, share
                          of the step; the remainder is time outside kernels (graph, allocation). On CUDA the
                          device is synchronised around every kernel, so the rows are device times and the
                          profiled steps are slower than the plain ones
  --scaling               step time against batch size (1, 2, 4, 8, 16, 32, at --text-tokens), against text
                          tokens (16, 32, 64, 128, at --batch) and against image patches (16, 36, 64, 100, 144:
                          the image side changed at the preset's patch size, at --batch and --text-tokens):
                          Markdown table on stdout and in
                          OUT/scaling_<host>.md, chart OUT/scaling_<host>.png
  --out-dir OUT           where --scaling writes (default bench/results))";

namespace {

struct StepSpec {
  std::string preset = "tiny", stage = "stage1";
  int64_t batch = 16, text = 32, steps = 10, warmup = 3, threads = 0;  // threads 0 = not set
  int64_t image_size = 0;                                                // 0: the preset's
  uint64_t seed = 0;
  bool lora = false;
  Device device = Device::cpu;
};

struct StepTiming {
  std::vector<double> ms;  // one per timed step
  double median_ms = 0, tokens_per_step = 0;
  double flops_per_step = 0;          // GEMM-class, counted over the timed steps (tensor/profile.h)
  double host_copies_per_step = 0;    // GPU: device-to-host copies, each a wait for the device (gpu::host_copies)
  double launches_per_step = 0;       // GPU: kernels, cuBLAS calls, copies and memsets (gpu::launches)
  std::vector<profile::Row> kernels;  // with --profile: summed over the timed steps
  // Memory peaks when the timed steps end: measured_peak runs afterwards, and its 8192² GEMMs (4 x 256 MiB on
  // the GPU, two 256 MiB results copied to the host) would otherwise be reported as the step's footprint.
  double peak_gpu_gib = 0, peak_gpu_reserved_gib = 0, peak_rss_mib = 0, peak_host_tensors_mib = 0;
  double tokens_per_s() const { return tokens_per_step / (median_ms / 1000); }
  double achieved_gflops() const { return flops_per_step / (median_ms * 1e-3) * 1e-9; }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;  // KiB on Linux
}

std::string host_name() {
  char buf[256] = {0};
  gethostname(buf, sizeof buf - 1);
  return buf[0] ? buf : "unknown";
}

std::vector<double> load_average() {
  double l[3] = {0, 0, 0};
  getloadavg(l, 3);
  return {l[0], l[1], l[2]};
}

void batch_to(PsaBatch& b, Device d) {
  for (Tensor* t : {&b.pixels, &b.ids, &b.labels, &b.level, &b.type}) *t = t->to(d);
}

// The model and optimizer of a spec, built once and reused by every point of a --scaling sweep (AdamW's state
// does not depend on the batch).
struct Trainer {
  std::shared_ptr<PsaVlm> model;
  std::vector<nn::ParamRef> params;
  std::unique_ptr<nn::AdamW> opt;
  bool safety = true;  // stages 1 and 2 run the head and the LLM with safety tokens, base the LLM alone
};

Trainer make_trainer(const StepSpec& s) {
  Trainer t;
  PsaConfig config = PsaConfig::from_preset(s.preset);
  if (s.image_size) config.vision.image_size = s.image_size;
  t.model = std::make_shared<PsaVlm>(config);
  t.model->initialize(s.seed);
  LoraSettings lora;
  if (s.lora) lora = {16, 16, 0.05, false};
  set_trainable(*t.model, s.stage, lora, s.seed);
  if (s.device != Device::cpu) t.model->to(s.device);
  t.model->train();
  t.params = nn::trainable(*t.model);
  t.opt = std::make_unique<nn::AdamW>(t.params, 1e-5);
  t.safety = s.stage != "base";
  return t;
}

// One training step. item() on the loss comes last: it copies to the host, which waits for a GPU to finish the
// whole step, so the wall-clock time is the step's on either device.
double train_step(Trainer& t, const PsaBatch& b) {
  t.opt->zero_grad();
  PsaOutput out = t.model->forward(b, t.safety, true, t.safety);
  out.loss.backward();
  nn::clip_grad_norm(t.params, 1.0);
  t.opt->update();
  return out.loss.item();
}

// A CUDA kernel profile waits for the device around every kernel (tensor/profile.h).
void wait_for_gpu() {
#ifdef PSA_CUDA
  cuda::synchronize();
#endif
}

StepTiming time_steps(Trainer& t, const StepSpec& s, int64_t batch, int64_t text, bool profile_kernels = false) {
  PsaBatch b = random_batch(t.model->config, batch, text, s.seed + 1);
  if (s.device != Device::cpu) batch_to(b, s.device);
  StepTiming r;
  r.tokens_per_step = double(batch * t.model->config.merged_length(text));
  double flops_at_warmup_end = 0;  // set when the first timed step starts
  int64_t copies_at_warmup_end = 0, launches_at_warmup_end = 0;
  for (int64_t i = 0; i < s.warmup + s.steps; ++i) {
    if (i == s.warmup) {
      flops_at_warmup_end = profile::flops();
      copies_at_warmup_end = gpu::host_copies();
      launches_at_warmup_end = gpu::launches();
    }
    if (profile_kernels && i == s.warmup) profile::start(s.device == Device::cuda ? wait_for_gpu : nullptr);
    auto t0 = std::chrono::steady_clock::now();
    double loss = train_step(t, b);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    PSA_CHECK(std::isfinite(loss), "bench-step: non-finite loss at step ", i);
    if (i >= s.warmup) r.ms.push_back(ms);
  }
  if (profile_kernels) r.kernels = profile::stop();
  r.median_ms = median(r.ms);
  r.flops_per_step = (profile::flops() - flops_at_warmup_end) / s.steps;
  r.host_copies_per_step = double(gpu::host_copies() - copies_at_warmup_end) / s.steps;
  r.launches_per_step = double(gpu::launches() - launches_at_warmup_end) / s.steps;
  r.peak_gpu_gib = gpu::peak_bytes() / 1073741824.0;
  r.peak_gpu_reserved_gib = gpu::peak_reserved_bytes() / 1073741824.0;
  r.peak_rss_mib = peak_rss_mib();
  r.peak_host_tensors_mib = host_tensor_peak_bytes() / 1048576.0;
  return r;
}

// The peak the step's GEMM-class work is held against, measured now: {GFLOP/s, what was measured}; 0 when this
// build cannot measure it.
std::pair<double, std::string> measured_peak(Device device) {
  if (device == Device::cuda) {
#if defined(PSA_CUDA_EMU)
    return {0, "no peak on the CPU emulator of CUDA"};  // its cuBLAS is a double loop: 8192³ would take hours
#elif defined(PSA_CUDA)
    const int64_t n = 8192;
    cuda::GemmTiming t = cuda::time_sgemm(cuda::GemmImpl::cublas, n, 3);
    return {2.0 * n * n * n / (t.ms * 1e-3) * 1e-9, cuda::tf32() ? "cuBLAS SGEMM 8192², TF32" : "cuBLAS SGEMM 8192², fp32"};
#endif
    return {0, "no CUDA in this build"};
  }
#if defined(__FMA__)
  int threads = omp_get_max_threads();
  return {bench::peak_fma_gflops(threads), str_cat("FMA loop, ", threads, threads == 1 ? " thread" : " threads")};
#else
  return {0, "no FMA peak for this CPU"};
#endif
}

// ---- single measurement -----------------------------------------------------------------------------------

json::Value timing_json(const StepSpec& s, const Trainer& t, const StepTiming& r, const std::pair<double, std::string>& peak) {
  json::Value j = json::Value::object();
  j.set("preset", s.preset);
  j.set("stage", s.stage);
  j.set("lora", s.lora);
  j.set("device", device_name(s.device));
  j.set("batch", s.batch);
  j.set("text_tokens", s.text);
  j.set("merged_tokens_per_row", t.model->config.merged_length(s.text));
  j.set("threads", s.threads ? json::Value(s.threads) : json::Value());
  j.set("max_threads", omp_get_max_threads());
  j.set("warmup", s.warmup);
  j.set("steps", s.steps);
  j.set("median_ms", r.median_ms);
  j.set("min_ms", *std::min_element(r.ms.begin(), r.ms.end()));
  j.set("max_ms", *std::max_element(r.ms.begin(), r.ms.end()));
  json::Value all = json::Value::array();
  for (double ms : r.ms) all.push(ms);
  j.set("all_ms", all);
  j.set("tokens_per_s", r.tokens_per_s());
  j.set("gflop_per_step", r.flops_per_step * 1e-9);
  j.set("achieved_gflops", r.achieved_gflops());
  j.set("peak_gflops", peak.first ? json::Value(peak.first) : json::Value());
  j.set("peak_measured", peak.second);
  j.set("mfu", peak.first ? json::Value(r.achieved_gflops() / peak.first) : json::Value());
  j.set("peak_rss_mib", r.peak_rss_mib);
  j.set("peak_host_tensors_mib", r.peak_host_tensors_mib);
  if (s.device == Device::cuda) {
    j.set("peak_gpu_gib", r.peak_gpu_gib);
    j.set("peak_gpu_reserved_gib", r.peak_gpu_reserved_gib);
    j.set("host_copies_per_step", r.host_copies_per_step);
    j.set("launches_per_step", r.launches_per_step);
  }
  int64_t trainable = 0;
  for (const auto& p : t.params) trainable += p.param.numel();
  j.set("trainable_parameters", trainable);
  j.set("host", host_name());
  json::Value load = json::Value::array();
  for (double l : load_average()) load.push(l);
  j.set("loadavg_at_end", load);
  return j;
}

void print_timing(const StepSpec& s, const StepTiming& r, const std::pair<double, std::string>& peak) {
  std::printf("bench-step %s %s%s on %s: batch %ld, %ld text tokens (%ld merged per row), median of %ld steps after %ld warm-up\n",
              s.preset.c_str(), s.stage.c_str(), s.lora ? " (LoRA)" : "", device_name(s.device), (long)s.batch,
              (long)s.text, (long)(r.tokens_per_step / s.batch), (long)s.steps, (long)s.warmup);
  std::printf("  %.1f ms/step (min %.1f, max %.1f), %.0f tokens/s, peak RSS %.0f MiB (tensors %.0f MiB)", r.median_ms,
              *std::min_element(r.ms.begin(), r.ms.end()), *std::max_element(r.ms.begin(), r.ms.end()),
              r.tokens_per_s(), r.peak_rss_mib, r.peak_host_tensors_mib);
  if (s.threads) std::printf(", %ld thread%s", (long)s.threads, s.threads == 1 ? "" : "s");
  if (s.device == Device::cuda)
    std::printf(", peak GPU %.2f GiB in tensors (%.2f GiB held with the cache)\n  per step: %.0f stream operations "
                "(kernels, cuBLAS calls, copies, memsets), %.0f device-to-host copies",
                r.peak_gpu_gib, r.peak_gpu_reserved_gib, r.launches_per_step, r.host_copies_per_step);
  std::printf("\n  %.2f GFLOP/step (matmul, attention, patch_conv), %.1f GFLOP/s", r.flops_per_step * 1e-9,
              r.achieved_gflops());
  if (peak.first)
    std::printf(" = %.1f%% of %.0f GFLOP/s (%s)", 100 * r.achieved_gflops() / peak.first, peak.first, peak.second.c_str());
  std::printf("\n");
}

// Per step: the kernels' share of the mean step (not the median: the rows are sums over all timed steps).
void print_profile(const StepTiming& r) {
  double step_ms = 0, kernels_ms = 0;
  for (double ms : r.ms) step_ms += ms;
  step_ms /= r.ms.size();
  std::printf("\nkernel profile, per step (mean of %zu steps: %.1f ms)\n", r.ms.size(), step_ms);
  std::printf("  %-36s %8s %9s %7s\n", "kernel", "calls", "ms", "share");
  for (const profile::Row& k : r.kernels) {
    double ms = 1000 * k.seconds / r.ms.size();
    kernels_ms += ms;
    std::printf("  %-36s %8.0f %9.2f %6.1f%%\n", k.kernel.c_str(), double(k.calls) / r.ms.size(), ms, 100 * ms / step_ms);
  }
  std::printf("  %-36s %8s %9.2f %6.1f%%\n", "outside kernels (graph, allocation)", "", step_ms - kernels_ms,
              100 * (step_ms - kernels_ms) / step_ms);
}

// ---- --scaling ------------------------------------------------------------------------------------------

struct Point {
  std::string series;
  int64_t batch, text, patches;
  StepTiming t;
};

std::string scaling_table(const StepSpec& s, const std::vector<Point>& pts) {
  std::string md = "| series | batch | text tokens | image patches | merged tokens/step | ms/step | us/token | tokens/s |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|\n";
  char line[256];
  for (const Point& p : pts) {
    std::snprintf(line, sizeof line, "| %s | %ld | %ld | %ld | %.0f | %.1f | %.1f | %.0f |\n", p.series.c_str(),
                  (long)p.batch, (long)p.text, (long)p.patches, p.t.tokens_per_step, p.t.median_ms,
                  1000 * p.t.median_ms / p.t.tokens_per_step, p.t.tokens_per_s());
    md += line;
  }
  return md;
}

// One chart over merged tokens per step, so the three sweeps share the x axis. The last series is the straight
// line through the origin and the default point (batch 16, 32 text tokens, 64 patches): where a sweep bends away
// from it, the step's cost stops being proportional to its tokens.
void scaling_chart(const std::string& path, const StepSpec& s, const std::vector<Point>& pts) {
  Series by_batch{"batch 1-32, L=" + std::to_string(s.text), {}, {}};
  Series by_text{"text 16-128, B=" + std::to_string(s.batch), {}, {}};
  Series by_patches{"patches 16-144, B=" + std::to_string(s.batch), {}, {}};
  const Point* ref = nullptr;
  for (const Point& p : pts) {
    Series& dst = p.series == "batch" ? by_batch : p.series == "text" ? by_text : by_patches;
    dst.x.push_back(p.t.tokens_per_step);
    dst.y.push_back(p.t.median_ms);
    if (p.series == "batch" && p.batch == s.batch) ref = &p;
  }
  std::vector<Series> series{by_batch, by_text, by_patches};
  if (ref) {
    double max_x = 0;
    for (const Point& p : pts) max_x = std::max(max_x, p.t.tokens_per_step);
    double per_token = ref->t.median_ms / ref->t.tokens_per_step;
    series.push_back({"linear via B=" + std::to_string(s.batch), {0, max_x}, {0, per_token * max_x}});
  }
  PlotOptions o;
  o.title = s.preset + " " + s.stage + " step time, threads: " + std::to_string(omp_get_max_threads()) + ", " + host_name();
  o.x_label = "merged tokens per step";
  o.y_label = "ms per training step (median)";
  plot_lines(path, series, o);
}

constexpr const char* kScalingHead = "# Step-time scaling, ";
constexpr int kScalingPoints = 15;  // 6 batch sizes, 4 text lengths, 5 image sides

// The sweep's two files replace only earlier ones of their kind: a table starting with kScalingHead, a chart
// marked by plot_lines. Anything else there (notes, a dataset's file behind a symbolic link) is refused.
void check_scaling_outputs(const std::string& base) {
  std::error_code ec;
  const std::string md = base + ".md", png = base + ".png";
  if (std::filesystem::exists(md, ec)) {
    std::ifstream in(md, std::ios::binary);
    std::string head(std::strlen(kScalingHead), '\0');
    in.read(head.data(), std::streamsize(head.size()));
    PSA_CHECK(in && head == kScalingHead, "--out-dir: ", md, " exists and is not a scaling table psa wrote "
              "(choose another --out-dir, or remove it)");
  }
  PSA_CHECK(!std::filesystem::exists(png, ec) || png_written_by(png, kPlotSoftware), "--out-dir: ", png,
            " exists and is not a chart psa wrote (choose another --out-dir, or remove it)");
}

int run_scaling(const StepSpec& s, const std::string& out_dir) {
  Trainer t = make_trainer(s);
  const nn::ClipConfig& vision = t.model->config.vision;
  const int64_t patches = vision.num_patches();
  std::vector<Point> pts;
  auto timed = [&](Point p) {  // one line per point: a sweep takes minutes
    pts.push_back(p);
    std::fprintf(stderr, "[scaling] %2zu/%d %-7s batch %2ld, text %3ld, patches %3ld: %.1f ms/step\n", pts.size(),
                 kScalingPoints, p.series.c_str(), (long)p.batch, (long)p.text, (long)p.patches, p.t.median_ms);
  };
  for (int64_t b : {1, 2, 4, 8, 16, 32}) timed({"batch", b, s.text, patches, time_steps(t, s, b, s.text)});
  for (int64_t l : {16, 32, 64, 128}) timed({"text", s.batch, l, patches, time_steps(t, s, s.batch, l)});
  // Patches: a model per image side (the position embeddings and the C-Abstractor's grid follow it).
  for (int64_t side : {4, 6, 8, 10, 12}) {
    StepSpec at = s;
    at.image_size = side * vision.patch;
    Trainer ti = make_trainer(at);
    timed({"patches", s.batch, s.text, side * side, time_steps(ti, at, s.batch, s.text)});
  }
  std::vector<double> load = load_average();
  char head[512];
  std::snprintf(head, sizeof head,
                "%s%s %s on %s (%s)\n\nthreads: %d, median of %ld steps after %ld warm-up per point, "
                "load average at the end %.2f %.2f %.2f, peak RSS %.0f MiB.\n\n",
                kScalingHead, s.preset.c_str(), s.stage.c_str(), host_name().c_str(), device_name(s.device), omp_get_max_threads(),
                (long)s.steps, (long)s.warmup, load[0], load[1], load[2], peak_rss_mib());
  std::string md = std::string(head) + scaling_table(s, pts);
  std::printf("%s", md.c_str());
  std::string base = out_dir + "/scaling_" + host_name();
  json::write_file(base + ".md", md);
  scaling_chart(base + ".png", s, pts);
  std::printf("\nwrote %s.md and %s.png\n", base.c_str(), base.c_str());
  return 0;
}

// ---- arguments ----------------------------------------------------------------------------------------------

StepSpec parse_spec(const cli::Args& a) {
  StepSpec s;
  s.preset = a.get("--preset", "tiny");
  PSA_CHECK(s.preset == "tiny" || s.preset == "small", "--preset: expected tiny or small, got '", s.preset, "'");
  std::string stage = a.get("--stage", "1");
  PSA_CHECK(stage == "base" || stage == "1" || stage == "2", "--stage: expected base, 1 or 2, got '", stage, "'");
  s.stage = stage == "base" ? "base" : "stage" + stage;
  s.lora = a.has("--lora");
  PSA_CHECK(!s.lora || s.stage == "stage2", "--lora applies to --stage 2 only");
  bool tiny = s.preset == "tiny";
  s.batch = a.get_int("--batch", tiny ? 16 : 32, 1, 4096);
  // At least BOS, the image token and an answer token; at most what fits max_position_embeddings (512) beside
  // the patches and safety tokens.
  s.text = a.get_int("--text-tokens", tiny ? 32 : 48, 3, 256);
  bool scaling = a.has("--scaling");
  PSA_CHECK(!scaling || !a.has("--json"), "bench-step --scaling: not with --json (it writes its own table)");
  s.steps = a.get_int("--steps", scaling ? 5 : 10, 1, 100000);
  s.warmup = a.get_int("--warmup", scaling ? 2 : 3, 0, 100000);
  s.threads = a.get_int("--threads", 0, 1, cli::kMaxThreads);
  s.seed = a.get_int("--seed", 0, 0);
  std::string dev = a.get("--device", "cpu");
  PSA_CHECK(dev == "cpu" || dev == "cuda", "--device: expected cpu or cuda, got '", dev, "'");
  s.device = dev == "cuda" ? Device::cuda : Device::cpu;
  return s;
}

}  // namespace

int cmd_bench_step(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv,
                  {kBenchStepUsage,
                   {"--preset", "--stage", "--batch", "--text-tokens", "--threads", "--steps", "--warmup", "--device",
                    "--seed", "--out-dir"},
                   {"--json", "--lora", "--scaling", "--profile"}},
                  &a))
    return 0;
  PSA_CHECK(a.positional.empty(), "bench-step: unexpected argument '", a.positional[0], "' (see --help)");
  StepSpec s = parse_spec(a);
  // Checked before any work: without a GPU (or a CUDA build) there is nothing to time.
  PSA_CHECK(s.device == Device::cpu || gpu::available(), "bench-step --device cuda: no usable GPU (",
            gpu::describe(), ")");
  if (s.device == Device::cpu) {
    PsaConfig sized = PsaConfig::from_preset(s.preset);
    sized.max_text_tokens = s.text;
    check_batch_fits_memory("--batch", sized, s.batch);
  }
  const bool profile_kernels = a.has("--profile");
  PSA_CHECK(!profile_kernels || (!a.has("--json") && !a.has("--scaling")),
            "bench-step --profile: not with --json or --scaling");
  PSA_CHECK(!a.has("--out-dir") || a.has("--scaling"), "bench-step --out-dir: only --scaling writes files");
  if (s.threads) omp_set_num_threads(int(s.threads));
  if (a.has("--scaling")) {
    const std::string out_dir = a.get_path("--out-dir", "bench/results");
    cli::check_output_dir("--out-dir", out_dir);  // before the sweep's minutes, not after
    for (const char* ext : {".md", ".png"})
      cli::check_output_file("--out-dir", out_dir + "/scaling_" + host_name() + ext);
    check_scaling_outputs(out_dir + "/scaling_" + host_name());
    return run_scaling(s, out_dir);
  }
  Trainer t = make_trainer(s);
  StepTiming r = time_steps(t, s, s.batch, s.text, profile_kernels);
  const std::pair<double, std::string> peak = measured_peak(s.device);
  if (a.has("--json")) std::printf("%s\n", json::dump(timing_json(s, t, r, peak), 2).c_str());
  else print_timing(s, r, peak);
  if (profile_kernels) print_profile(r);
  return 0;
}

// ---- bench-gemm --------------------------------------------------------------------------------------------

static const char* kBenchGemmUsage = R"(usage: psa bench-gemm [--sizes 4096,8192] [--reps N] [--tf32] [--json]

Times square fp32 GEMMs C = A·B on the GPU with CUDA events: each variant of the hand-written tiled SGEMM
(tensor/cuda/sgemm.cu; own-k8 and own-k16: K tiles of 8 or 16; PSA_GEMM=own-k16 selects one for training)
against cuBLAS. Each implementation is validated against cuBLAS fp32 first (max |C - C_cublas| / max
|C_cublas|). --tf32 lets the cuBLAS row use TF32 tensor cores (the own kernel is always fp32). Prints ms and
TFLOP/s per size and each variant's own/cuBLAS ratio.)";

int cmd_bench_gemm(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kBenchGemmUsage, {"--sizes", "--reps"}, {"--tf32", "--json"}}, &a)) return 0;
  PSA_CHECK(a.positional.empty(), "bench-gemm: unexpected argument '", a.positional[0], "' (see --help)");
  std::vector<int64_t> sizes;
  std::string list = a.get("--sizes", "4096,8192");
  for (size_t at = 0; at <= list.size();) {
    size_t comma = std::min(list.find(',', at), list.size());
    cli::Args one;
    one.flags["--sizes"] = list.substr(at, comma - at);
    sizes.push_back(one.get_int("--sizes", 0, 1, 32768));  // three n x n f32 matrices: 12 GiB at the top
    at = comma + 1;
  }
  const int reps = (int)a.get_int("--reps", 10, 1, 1000);
  // Arguments first: a typo is reported as such, also on a machine without a GPU.
  PSA_CHECK(gpu::available(), "bench-gemm: no usable GPU (", gpu::describe(), ")");
#ifdef PSA_CUDA
  cuda::set_tf32(a.has("--tf32"));
  json::Value rows = json::Value::array();
  if (!a.has("--json")) std::printf("%-7s %-13s %10s %10s %12s\n", "n", "impl", "ms", "TFLOP/s", "max err");
  const cuda::OwnTile tile_before = cuda::own_tile();
  for (int64_t n : sizes) {
    double flops = 2.0 * n * n * n;
    double cublas_ms = 0;
    // cuBLAS first (the ratio's reference, no tile), then every variant of the own kernel.
    std::vector<std::optional<cuda::OwnTile>> impls = {std::nullopt};
    for (cuda::OwnTile tile : cuda::kOwnTiles) impls.push_back(tile);
    for (const std::optional<cuda::OwnTile>& tile : impls) {
      bool own = tile.has_value();
      std::string name = own ? str_cat("own-", cuda::own_tile_name(*tile)) : cuda::tf32() ? "cublas-tf32" : "cublas";
      if (own) cuda::set_own_tile(*tile);
      cuda::GemmTiming t = cuda::time_sgemm(own ? cuda::GemmImpl::own : cuda::GemmImpl::cublas, n, reps);
      if (!own) cublas_ms = t.ms;
      double tflops = flops / (t.ms * 1e-3) / 1e12;
      json::Value r = json::Value::object();
      r.set("n", n);
      r.set("impl", name);
      r.set("ms", t.ms);
      r.set("tflops", tflops);
      r.set("max_err", t.max_err);
      if (own) r.set("vs_cublas", cublas_ms / t.ms);
      rows.push(r);
      if (!a.has("--json"))
        std::printf("%-7ld %-13s %10.3f %10.2f %12.2e%s\n", (long)n, name.c_str(), t.ms, tflops, t.max_err,
                    own ? str_cat("   (", cublas_ms / t.ms, "x cuBLAS)").c_str() : "");
    }
  }
  cuda::set_own_tile(tile_before);
  if (a.has("--json")) {
    json::Value j = json::Value::object();
    j.set("device", gpu::describe());
    j.set("reps", (int64_t)reps);
    j.set("results", rows);
    std::printf("%s\n", json::dump(j, 2).c_str());
  }
  return 0;
#else
  (void)reps;  // read above so that a bad value is refused on every build
  fail("bench-gemm: this build has no CUDA");
#endif
}

}  // namespace psa
