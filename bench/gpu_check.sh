#!/usr/bin/env bash
# One-shot GPU check for an H100 session (issue #5). Budget: under 8 minutes in total; every part has its own
# timeout, capped by what is left of the total, so a hung part cannot eat the rest.
#   1. build with nvcc for CUDA_ARCH (default sm_90)
#   2. the CUDA test suites (op parity CPU vs CUDA, NaN/Inf parity, guard bytes, determinism, own SGEMM,
#      one training step of each stage, HF fixtures on CUDA); PSA_REQUIRE_GPU=1 makes a device the runtime
#      cannot use (say, a driver older than the toolkit) fail them instead of skipping them
#   3. SGEMM benchmark: own kernel vs cuBLAS at 4096² and 8192² (CUDA events, validated first)
#   4. psa bench-step --device cuda --preset small --stage 1 / 2 --batch 32 (Stage II also with PSA_ATTENTION=rows),
#      and a kernel profile of Stage II
#   5. PyTorch's same step (tools/psa_reference.py --bench --bench-preset small --device cuda) if torch imports
#   6. CUDA kernel micro-benchmarks (build/bench_kernels_cuda: every kernel family validated against the CPU,
#      then timed with CUDA events after an L2 flush; at most 90 s)
#   7. the f32 op parity under compute-sanitizer memcheck (out-of-bounds reads), with whatever time is left
# and prints compact tables. Raw outputs go to $RESULTS (default: $OUT when set, else bench/results/gpu).
# Usage: bench/gpu_check.sh            (JOBS, CUDA_ARCH, RESULTS, TOTAL_S may be set in the environment)
set -u
cd "$(dirname "$0")/.."
CUDA_ARCH=${CUDA_ARCH:-sm_90}
JOBS=${JOBS:-$(nproc)}
RESULTS=${RESULTS:-${OUT:-bench/results/gpu}}
TOTAL_S=${TOTAL_S:-450}  # 7.5 minutes for everything
mkdir -p "$RESULTS"
START=$(date +%s)
declare -A STATUS

# run_part NAME CAP_SECONDS LOGFILE COMMAND...: runs with timeout min(CAP, time left), stdout to LOGFILE and
# stderr to LOGFILE.stderr, and records PASS/FAIL/TIMEOUT.
run_part() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((TOTAL_S - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    STATUS[$name]="SKIPPED (no time left)"
    echo "== $name: SKIPPED, ${left}s left"
    return 1
  fi
  echo "== $name (timeout ${limit}s)"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$log" 2>"$log.stderr"
  local rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 25 "$log" "$log.stderr"
  if [ $rc -eq 0 ]; then STATUS[$name]="PASS (${dt}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS[$name]="TIMEOUT (${limit}s)"
  else STATUS[$name]="FAIL rc=$rc (${dt}s)"; fi
  echo "== $name: ${STATUS[$name]}"
  [ $rc -eq 0 ]
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$RESULTS/gpu.txt"

make --no-print-directory check-deps || echo "== some headers are missing (above): parts that need them will fail"
# psa first: the benchmarks need only it, so a machine without GoogleTest still gets its numbers.
run_part build 150 "$RESULTS/build.log" make -j"$JOBS" CUDA_ARCH="$CUDA_ARCH" build/psa
BUILT=$?
if [ $BUILT -eq 0 ]; then
  run_part build_tests 90 "$RESULTS/build_tests.log" make -j"$JOBS" CUDA_ARCH="$CUDA_ARCH" build/psa_tests &&
    run_part tests 120 "$RESULTS/tests.log" env OMP_WAIT_POLICY=passive PSA_REQUIRE_GPU=1 ./build/psa_tests --gtest_brief=1 \
      --gtest_filter='Cuda*' --gtest_output=json:"$RESULTS/tests.json"
  run_part sgemm 75 "$RESULTS/sgemm.log" ./build/psa bench-gemm --sizes 4096,8192 --reps 10 --json
  cp "$RESULTS/sgemm.log" "$RESULTS/sgemm.json" 2>/dev/null
  for s in 1 2; do
    run_part "step_stage$s" 60 "$RESULTS/step_stage$s.json" ./build/psa bench-step --device cuda --preset small \
      --stage $s --batch 32 --steps 10 --warmup 3 --json
  done
  # The same Stage II step with the earlier "rows" attention kernels (kernels.h AttentionKernel): which design
  # the step should keep.
  run_part step_rows 45 "$RESULTS/step_stage2_rows.json" env PSA_ATTENTION=rows ./build/psa bench-step --device cuda \
    --preset small --stage 2 --batch 32 --steps 10 --warmup 3 --json
fi

if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  run_part torch 90 "$RESULTS/torch.log" python3 tools/psa_reference.py --bench --bench-preset small --device cuda \
    --steps 10 --warmup 3 --out "$RESULTS/torch_small_cuda.json"
else
  STATUS[torch]="SKIPPED (no torch with CUDA)"
fi

# Where the Stage II step's time goes on the GPU (device synchronised around every kernel); after PyTorch's
# step, which the headline ratio needs more.
if [ $BUILT -eq 0 ]; then
  run_part profile 45 "$RESULTS/profile_stage2.txt" ./build/psa bench-step --device cuda --preset small --stage 2 \
    --batch 32 --steps 3 --warmup 2 --profile && head -n 28 "$RESULTS/profile_stage2.txt"
fi

# CUDA kernel micro-benchmarks: a short min_time (each iteration also pays an untimed L2 flush and an event
# sync; at 0.01 the 110 benchmarks x 3 repetitions took 33 s on an H100, 0.05 would take minutes). The binary's own
# --budget_s stops it 15 s before the part's timeout: the remaining benchmarks skip and the JSON stays complete.
CUDA_BENCH_MIN_TIME=${CUDA_BENCH_MIN_TIME:-0.01}
rm -f "$RESULTS/kernels_cuda.json"
if [ $BUILT -eq 0 ] &&
  run_part build_bench 60 "$RESULTS/build_bench.log" make -j"$JOBS" CUDA_ARCH="$CUDA_ARCH" build/bench_kernels_cuda; then
  left=$((TOTAL_S - ($(date +%s) - START)))
  cap=$((left < 90 ? left : 90))
  run_part cuda_kernels 90 "$RESULTS/cuda_kernels.log" ./build/bench_kernels_cuda --budget_s=$((cap > 20 ? cap - 15 : 5)) \
    --benchmark_min_time="$CUDA_BENCH_MIN_TIME" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
    --benchmark_out="$RESULTS/kernels_cuda.json" --benchmark_out_format=json
fi

# Out-of-bounds reads (guard bytes only catch writes): the f32 op parity under compute-sanitizer, if time is left.
# PSA_CUDA_GUARD_BYTES=0: exact-size allocations, so a read just past a tensor's end is outside every allocation
# (memcheck's test) instead of inside the test's own guard bytes.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ $BUILT -eq 0 ] && [ -x build/psa_tests ] && [ -n "$SAN" ]; then
  run_part memcheck 60 "$RESULTS/memcheck.log" env PSA_REQUIRE_GPU=1 PSA_CUDA_GUARD_BYTES=0 \
    "$SAN" --tool memcheck --error-exitcode 9 ./build/psa_tests \
    --gtest_brief=1 --gtest_filter='CudaParity.EveryOpMatchesCpuInF32'
fi

# ---- table
python3 - "$RESULTS" <<'PY' || echo "(python3 missing or failed: see the logs in $RESULTS)"
import json, os, sys
r = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(r, name)) as f:
            return json.load(f)
    except Exception:
        return None
print("\n| what | ours | reference | ratio |\n|---|---|---|---|")
g = load("sgemm.json")
if g:
    rows = {(x["n"], x["impl"]): x for x in g["results"]}
    for n in sorted({x["n"] for x in g["results"]}):
        cub = rows.get((n, "cublas"))
        for own in (x for x in g["results"] if x["n"] == n and x["impl"].startswith("own")):
            if cub:
                print(f"| SGEMM {n}² fp32 {own['impl']} (TFLOP/s, err {own['max_err']:.1e}) | {own['tflops']:.1f} "
                      f"| cuBLAS {cub['tflops']:.1f} | {own['tflops'] / cub['tflops']:.2f}x |")
t = load("torch_small_cuda.json")
for s in (1, 2):
    j = load(f"step_stage{s}.json")
    if not j:
        continue
    ours = j["median_ms"]
    ref = t[f"stage{s}_ms"] if t else None
    peak = j.get("peak_gpu_gib") or 0.0
    held = j.get("peak_gpu_reserved_gib")
    tpeak = t["runs"][-1].get(f"stage{s}_peak_gib") if t else None
    theld = t["runs"][-1].get(f"stage{s}_reserved_gib") if t else None
    mfu = j.get("mfu")
    launches, copies = j.get("launches_per_step"), j.get("host_copies_per_step")
    print(f"| small step Stage {'I' * s} (ms, peak GiB ours {peak:.2f}" + (f" / torch {tpeak}" if tpeak else "") +
          (f"; held with the cache ours {held:.2f}" + (f" / torch {theld}" if theld else "") if held is not None else "") +
          (f", MFU {100 * mfu:.1f}% of cuBLAS 8192²" if mfu else "") +
          (f", {launches:.0f} stream operations and {copies:.0f} device-to-host copies a step" if launches is not None else "") + ") "
          f"| {ours:.1f} | " + (f"torch eager {ref}" if ref else "-") + " | " + (f"{ours / ref:.2f}x" if ref else "-") + " |")
rows = load("step_stage2_rows.json")
if rows:
    tiles = load("step_stage2.json")
    print(f"| small step Stage II, attention kernels 'rows' instead of 'tiles' (ms) | {rows['median_ms']:.1f} | "
          + (f"tiles {tiles['median_ms']:.1f} | {rows['median_ms'] / tiles['median_ms']:.2f}x |" if tiles else "- | - |"))
k = load("kernels_cuda.json")
if k is None:
    if os.path.exists(os.path.join(r, "cuda_kernels.log")):
        print("\nCUDA kernels: no complete kernels_cuda.json (see cuda_kernels.log)")
elif k.get("benchmarks"):
    c = k.get("context", {})
    print(f"\nCUDA kernels, median of 3 (ceilings: D2D copy {float(c.get('ceiling_copy_gbps', 0)):.0f} GB/s, "
          f"cuBLAS SGEMM 8192² {float(c.get('ceiling_sgemm_gflops', 0)):.0f} GFLOP/s)\n"
          "| kernel/size/dims | median µs | GB/s | GFLOP/s | % ceiling |\n|---|---:|---:|---:|---:|")
    rows, errors = {}, {}  # name -> the median aggregate (or the single run without repetitions) / error
    for b in k["benchmarks"]:
        name = b.get("run_name", b["name"]).removesuffix("/manual_time")
        if b.get("error_occurred"):
            errors[name] = b.get("error_message", "error")
        elif b.get("aggregate_name") == "median" or (b.get("run_type") == "iteration" and name not in rows):
            rows[name] = b
    for name, b in rows.items():
        gf = b.get("GFLOP/s")
        print(f"| {name} | {b['real_time']:.2f} | {b.get('GB/s', 0):.1f} | " + (f"{gf:.0f}" if gf else "") +
              f" | {b.get('pct_ceiling', 0):.1f} |")
    budget = sum("time budget" in msg for msg in errors.values())
    for name, msg in errors.items():
        if "time budget" not in msg:
            print(f"| {name} | SKIPPED: {msg} | | | |")
    if budget:
        print(f"({budget} benchmarks not run: time budget spent)")
PY

echo
echo "== summary ($(( $(date +%s) - START ))s of ${TOTAL_S}s)"
for k in build build_tests tests sgemm step_stage1 step_stage2 step_rows torch build_bench cuda_kernels memcheck; do printf '  %-12s %s\n' "$k" "${STATUS[$k]:-not run}"; done
grep -E '^\[  FAILED  \]' "$RESULTS/tests.log" 2>/dev/null | head -40
grep -E "op '.*' trial" "$RESULTS/tests.log" 2>/dev/null | head -60
