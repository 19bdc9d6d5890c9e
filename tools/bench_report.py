#!/usr/bin/env python3
"""Merges the raw outputs of `make bench` into one report (standard library only).

Reads RAW/ (written by `make bench`):
  <bench>.json             Google Benchmark --benchmark_out files (gemm.json, kernels.json, kernels_cuda.json:
                           the "CUDA kernels" table, left out when it has no entries, i.e. no GPU)
  step_<stage>_t<T>_r<R>.json  `psa bench-step --json` (stage base|1|2, T threads, round R)
  torch_t<T>_r<R>.json     tools/psa_reference.py --bench --threads T (absent when PyTorch was skipped)
  uptime_start.txt, uptime_end.txt
Writes OUT/<host>.json (everything, merged), OUT/<host>.md (the ratio tables) and OUT/<host>.csv (one row per
measurement, for plotting elsewhere).

Ratios are ours/baseline as design.md states its targets: SGEMM throughput ours/OpenBLAS (>= 0.8 wanted),
training-step time ours/PyTorch (<= 0.5 wanted); kernels report % of the machine's measured ceiling.
"""
import argparse
import csv
import glob
import json
import os
import platform
import re
import time



def load_json(path):
    with open(path) as f:
        return json.load(f)


def median_rows(bench_json):
    """name -> the median aggregate of a Google Benchmark run (or its single run, or its error)."""
    rows = {}
    for b in bench_json.get("benchmarks", []):
        # UseRealTime() / UseManualTime() append these to the name
        name = b.get("run_name", b["name"]).removesuffix("/real_time").removesuffix("/manual_time")
        if b.get("error_occurred"):
            rows[name] = {"error": b.get("error_message", "error")}
        elif b.get("run_type") == "aggregate" and b.get("aggregate_name") == "median":
            rows[name] = b
        elif b.get("run_type") == "iteration" and name not in rows:
            rows[name] = b
    return rows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


# ---- SGEMM vs OpenBLAS --------------------------------------------------------------------------------


def gemm_table(gemm):
    """One row per shape and thread count that bench_gemm ran (squares, then the model's real shapes)."""
    out = []
    for name, ours in gemm.items():
        if not name.startswith("sgemm_ours/"):
            continue
        form, dims, threads = name.split("/")[1:4]
        blas = gemm.get(name.replace("sgemm_ours/", "sgemm_openblas/"), {})
        o, b = ours.get("GFLOP"), blas.get("GFLOP")  # a rate counter: GFLOP per second
        out.append({"form": form, "size": dims, "threads": int(threads.split("=")[1]), "ours_gflops": o,
                    "openblas_gflops": b, "ratio": o / b if o and b else None, "note": blas.get("error", "")})
    return out


# ---- training step vs PyTorch ---------------------------------------------------------------------------
# Rounds alternate ours and PyTorch (see the Makefile): each round's ratio compares runs minutes apart at most,
# and the median over rounds discards a round that a burst of other jobs distorted.


def step_runs(raw):
    """(stage flag, threads) -> {round: psa bench-step JSON}."""
    runs = {}
    for path in glob.glob(os.path.join(raw, "step_*_t*_r*.json")):
        m = re.match(r"step_(\w+)_t(\d+)_r(\d+)\.json", os.path.basename(path))
        runs.setdefault((m.group(1), int(m.group(2))), {})[int(m.group(3))] = load_json(path)
    return runs


def torch_runs(raw):
    """(stage flag '1'|'2', threads) -> {round: ms}, from tools/psa_reference.py --bench outputs."""
    runs = {}
    for path in glob.glob(os.path.join(raw, "torch_t*_r*.json")):
        rnd = int(re.search(r"_r(\d+)\.json", path).group(1))
        for run in load_json(path).get("runs", []):
            for flag in ("1", "2"):
                runs.setdefault((flag, run["threads"]), {})[rnd] = run[f"stage{flag}_ms"]
    return runs


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def step_table(ours, theirs):
    order = {"base": 0, "1": 1, "2": 2}
    out = []
    for key in sorted(ours, key=lambda k: (order.get(k[0], 9), k[1])):
        rounds, base = ours[key], theirs.get(key, {})
        ratios = [rounds[r]["median_ms"] / base[r] for r in rounds if r in base]
        any_run = next(iter(rounds.values()))
        out.append({"stage": any_run["stage"], "threads": key[1], "rounds": len(rounds),
                    "batch": any_run["batch"], "text_tokens": any_run["text_tokens"],
                    "ours_ms": median([j["median_ms"] for j in rounds.values()]),
                    "torch_ms": median(list(base.values())),
                    "ratio": median(ratios), "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                    # each side's least disturbed round: contention only ever adds time
                    "best_ratio": min(j["median_ms"] for j in rounds.values()) / min(base.values()) if base else None,
                    "tokens_per_s": median([j["tokens_per_s"] for j in rounds.values()]),
                    # model FLOP utilisation (psa bench-step: GEMM-class work / median time / measured peak)
                    "mfu": median([j["mfu"] for j in rounds.values() if j.get("mfu") is not None]),
                    "peak_rss_mib": max(j["peak_rss_mib"] for j in rounds.values())})
    return out


# ---- kernels ------------------------------------------------------------------------------------------


def measured(row, b):
    """The row of one Google Benchmark aggregate: its error, or its time, rates and ceiling."""
    if "error" in b:
        row["error"] = b["error"]
    else:
        row.update({"us": b.get("real_time"), "gbps": b.get("GB/s"), "gflops": b.get("GFLOP/s"),
                    "pct_ceiling": b.get("pct_ceiling"), "ceiling": b.get("ceiling"), "vs": b.get("label", "")})
    return row


def kernel_table(kernels):
    out = []
    for name, b in kernels.items():
        parts = name.split("/")
        out.append(measured({"kernel": parts[0], "size": parts[1], "dims": parts[2],
                             "threads": int(parts[3].split("=")[1])}, b))
    return out


def cuda_kernel_table(kernels):
    """bench_kernels_cuda rows (kernel/size/dims, no thread count); empty when it was skipped (no GPU)."""
    out = []
    for name, b in kernels.items():
        kernel, size, dims = (name.split("/") + ["", ""])[:3]
        out.append(measured({"kernel": kernel, "size": size, "dims": dims}, b))
    return out


def cuda_kernels_markdown(rows, context):
    if not rows:
        return []
    L = ["", f"## CUDA kernels (median of 3, CUDA events, L2 flushed before each call): {context.get('gpu', 'GPU')}", "",
         "GB/s counts the minimal traffic; GEMMs, attention and patch_conv are held against cuBLAS SGEMM 8192² fp32 "
         f"({fmt(_num(context.get('ceiling_sgemm_gflops')), 0)} GFLOP/s), the rest against a device-to-device copy "
         f"({fmt(_num(context.get('ceiling_copy_gbps')), 0)} GB/s, read + write), both measured in the same process "
         "(bench/ceiling_cuda.h). Every kernel was checked against the CPU kernel first.", "",
         "| kernel | size | dims | µs | GB/s | GFLOP/s | % of ceiling | roof |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['kernel']} | {r['size']} | {r['dims']} | SKIPPED: {r['error']} | | | | |")
            continue
        L.append(f"| {r['kernel']} | {r['size']} | {r['dims']} | {fmt(r['us'], 2)} | {fmt(r['gbps'])} "
                 f"| {fmt(r['gflops'])} | {fmt(r['pct_ceiling'])} | {r['vs'][3:]} |")
    return L


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# ---- output -------------------------------------------------------------------------------------------


def markdown(report):
    L = [f"# Benchmarks on {report['host']} ({report['cpu']})", "",
         f"{report['date']}. Load: `{report['uptime_start']}` at the start, `{report['uptime_end']}` at the end "
         f"({report['cpu_count']} CPUs; a load above that means other jobs shared the cores and every absolute "
         "number below is pessimistic; ratios are measured in the same run).", ""]
    L += ["## SGEMM, ours vs OpenBLAS (GFLOP/s, median of 3; target ours/OpenBLAS >= 0.8)", "",
          "M x N x K; NN = x·W, NT = dY·Wᵀ (input gradient), TN = xᵀ·dY (weight gradient); the non-square shapes "
          "are the tiny training step's (M = 16 rows x 103 tokens = 1648) and the small one's (M = 32 x 127 = 4064), "
          "and B x M x N x K rows the tiny step's attention's per-head products.", "",
          "| form | M x N x K | threads | ours | OpenBLAS | ours/OpenBLAS |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["gemm"]:
        L.append(f"| {r['form']} | {r['size']} | {r['threads']} | {fmt(r['ours_gflops'])} "
                 f"| {fmt(r['openblas_gflops'])} | {fmt(r['ratio'], 2)} |")
    tj = report.get("torch")
    base = (f"PyTorch {tj['torch_version']}" if tj else "PyTorch: not measured (" + report["torch_note"] + ")")
    if tj and tj.get("blas_libraries"):
        blas = [b for b in tj["blas_libraries"] if "lapack" not in b]
        base += (" on " + ", ".join("/".join(b.split("/")[-2:]) for b in blas)
                 + (f" (OPENBLAS_CORETYPE={tj['openblas_coretype']})" if tj.get("openblas_coretype") else ""))
    L += ["", f"## Training step, tiny preset, batch 16, ours vs {base}", "",
          "ms/step: median over rounds of each run's median step; ours/PyTorch: median of the per-round ratios "
          "(range in brackets); best/best: each side's fastest round (other jobs only ever add time). Target "
          "ours/PyTorch <= 0.5. Stage II is the full-LLM fine-tune on both sides (design.md's baseline); base has "
          "no PyTorch baseline. Threads cap the whole process on both sides: PyTorch's pool and its BLAS's "
          "(Debian's torch runs GEMMs in OpenBLAS's own threads, capped with openblas_set_num_threads; "
          "OMP_WAIT_POLICY=PASSIVE); at 2 threads the faster of torch 2 / BLAS 2 and torch 1 / BLAS 2 is the "
          "baseline. MFU: our step's GEMM-class FLOPs (matmul, attention, patch_conv) per second over the "
          "FMA peak measured on the same threads.", "",
          "| stage | threads | rounds | ours ms | PyTorch ms | ours/PyTorch | best/best | tokens/s | MFU | peak RSS MiB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["step"]:
        spread = f" [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]" if r["ratio"] is not None else ""
        L.append(f"| {r['stage']} | {r['threads']} | {r['rounds']} | {fmt(r['ours_ms'])} | {fmt(r['torch_ms'])} "
                 f"| {fmt(r['ratio'], 2)}{spread} | {fmt(r['best_ratio'], 2)} | {fmt(r['tokens_per_s'], 0)} "
                 f"| {fmt(r['mfu'] and 100 * r['mfu'], 0)}{'%' if r['mfu'] else ''} | {fmt(r['peak_rss_mib'], 0)} |")
    L += ["", "## Kernels (median of 3): achieved vs the machine's ceiling", "",
          "GB/s counts the minimal traffic (inputs read once, outputs written once); attention and patch_conv are "
          "held against the FMA peak (their GFLOP/s), the rest against a copy of the same footprint (bench/ceiling.h).",
          "", "| kernel | size | dims | 1T µs | 1T GB/s | 1T GFLOP/s | 1T % | 2T µs | 2T % | roof |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    by_key = {}
    for r in report["kernels"]:
        by_key.setdefault((r["kernel"], r["size"], r["dims"]), {})[r["threads"]] = r
    for (kernel, size, dims), t in by_key.items():
        one, two = t.get(1, {}), t.get(2, {})
        err = one.get("error") or two.get("error")
        if err:
            L.append(f"| {kernel} | {size} | {dims} | SKIPPED: {err} | | | | | | |")
            continue
        L.append(f"| {kernel} | {size} | {dims} | {fmt(one.get('us'))} | {fmt(one.get('gbps'))} | {fmt(one.get('gflops'))} "
                 f"| {fmt(one.get('pct_ceiling'), 0)} | {fmt(two.get('us'))} | {fmt(two.get('pct_ceiling'), 0)} "
                 f"| {one.get('vs', '')[3:]} |")
    L += ["", "Ceilings measured in the same process, best of several trials (1 thread / 2 threads):", "",
          "| roof | 1T | 2T |", "|---|---:|---:|"]
    for roof, t in report["ceilings"]:
        L.append(f"| {roof} | {fmt(t.get(1))} | {fmt(t.get(2))} |")
    L += cuda_kernels_markdown(report["cuda_kernels"], report["cuda_context"])
    if report["profiles"]:
        L += ["", "## Where a training step's time goes (one thread, `psa bench-step --profile`)", "",
              "Every kernel call timed during the timed steps; \"(backward)\" marks calls made by the backward pass. "
              "matmul is the SGEMM above; attention includes its own GEMMs and softmax.", ""]
        for name, text in report["profiles"]:
            L += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(L) + "\n"


def ceilings(kernels):
    """[(roof, {threads: value})], the FMA peak first, then the copies by footprint, as the kernels saw them."""
    out = {}
    for r in kernels:
        if r.get("ceiling"):
            roof = "FMA peak, GFLOP/s" if "FMA" in r["vs"] else r["vs"][3:] + ", GB/s"
            out.setdefault(roof, {})[r["threads"]] = r["ceiling"]

    def order(roof):
        m = re.search(r"(\d+) (KiB|MiB)", roof)
        return 0 if not m else int(m.group(1)) * (1 if m.group(2) == "KiB" else 1024)
    return sorted(out.items(), key=lambda kv: order(kv[0]))


def write_csv(path, report):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "size", "threads", "value", "unit", "baseline", "ratio"])
        for r in report["gemm"]:
            w.writerow(["sgemm", r["form"], r["size"], r["threads"], r["ours_gflops"], "GFLOP/s", r["openblas_gflops"], r["ratio"]])
        for r in report["step"]:
            w.writerow(["step", r["stage"], "tiny", r["threads"], r["ours_ms"], "ms", r["torch_ms"], r["ratio"]])
        for r in report["kernels"]:
            if "error" not in r:
                w.writerow(["kernel", r["kernel"], f"{r['size']} {r['dims']}", r["threads"], r["gbps"], "GB/s",
                            r["ceiling"], (r["pct_ceiling"] or 0) / 100])
        for r in report["cuda_kernels"]:
            if "error" not in r:
                flops = r["gflops"] is not None and "SGEMM" in r["vs"]
                w.writerow(["cuda_kernel", r["kernel"], f"{r['size']} {r['dims']}", "", r["gflops"] if flops else r["gbps"],
                            "GFLOP/s" if flops else "GB/s", r["ceiling"], (r["pct_ceiling"] or 0) / 100])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="folder with the raw outputs of one `make bench`")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--host", default=platform.node())
    a = ap.parse_args()
    benches = {os.path.splitext(os.path.basename(p))[0]: median_rows(load_json(p))
               for p in glob.glob(os.path.join(a.raw, "*.json"))
               if not os.path.basename(p).startswith(("step_", "torch_"))}  # the Google Benchmark files
    torch_files = sorted(glob.glob(os.path.join(a.raw, "torch_t*_r*.json")))
    torch_json = load_json(torch_files[0]) if torch_files else None
    kernels = kernel_table(benches.get("kernels", {}))
    cuda_path = os.path.join(a.raw, "kernels_cuda.json")  # an empty "benchmarks" list when there was no GPU
    cuda_context = load_json(cuda_path).get("context", {}) if os.path.exists(cuda_path) else {}
    report = {
        "host": a.host, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "uptime_start": read_text(os.path.join(a.raw, "uptime_start.txt")),
        "uptime_end": read_text(os.path.join(a.raw, "uptime_end.txt")),
        "gemm": gemm_table(benches.get("gemm", {})),
        "step": step_table(step_runs(a.raw), torch_runs(a.raw)),
        "torch": torch_json,
        "torch_note": "" if torch_json else "skipped: see the `make bench` log",
        "kernels": kernels,
        "ceilings": ceilings(kernels),
        "cuda_kernels": cuda_kernel_table(benches.get("kernels_cuda", {})),
        "cuda_context": cuda_context,
        "profiles": [(f"Stage {'I' * int(p[-5])}", read_text(p))
                     for p in sorted(glob.glob(os.path.join(a.raw, "profile_stage*.txt")))],
    }
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.host)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(markdown(report))
    write_csv(base + ".csv", report)
    print(f"wrote {base}.json, {base}.md, {base}.csv")


if __name__ == "__main__":
    main()
