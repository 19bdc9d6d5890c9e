// psa eval: the benchmark over one or more checkpoints, written as report.json and a Markdown table.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "psa/eval.h"
#include "psa/infer.h"
#include "psa/policy.h"
#include "tools/cli.h"

namespace psa {

static const char* kEvalUsage = R"(usage: psa eval --data DIR --ckpt DIR [--ckpt DIR ...] [options]

Runs the benchmark (shared/spec dataset.md, "Benchmark metrics") on DIR/<split>.jsonl for each checkpoint:
  safety head   level/type accuracy and macro-F1, per-class recall, confusion matrices (null for a base
                checkpoint, whose head is untrained; its confusion matrices are kept for reference)
  risky records attack success rate (the answer complies, per the deterministic judge), safe-response rate
                (level 3 refuses, level 2 cautions or refuses, level 1 cautions), each with dynamic
                safety control on and off
  clean records exact-match accuracy on count/color/position questions, caption token-F1, over-refusal on
                clean images and on hard negatives (control on and off)
Each answer is generated greedily with the KV cache; records run in parallel on the CPU.

required:
  --data DIR            dataset folder (`psa data` writes one)
  --ckpt DIR            checkpoint folder; repeat for several (e.g. base, stage1, stage2)

options:
  --split NAME          records file DIR/NAME.jsonl (default test)
  --out FILE.json       JSON report (default report.json): {"<stage>": metrics, ...}; an existing file is
                        merged into, keeping its other keys and the other fields of each stage (training
                        time, config, audit), so `psa train` and `psa eval` can share one report
  --md FILE.md          Markdown table (default: the --out path with .md instead of .json)
  --policy NAME|FILE    safety policy for control on: short (default; the synthetic data's table),
                        reference, or a policy JSON file; a hint too long for a checkpoint's positions
                        even with an empty question is refused
  --limit N             evaluate only the first N records (default 0 = all)
  --max-new-tokens N    answer length limit, 1..65536 (default 32)
  --batch N             classification batch size, 1..4096 (default 64)
  --sequential          one record at a time (default: records in parallel with OpenMP)
  --predictions DIR     also write one JSON line per record (truth, head prediction, action, answers and
                        the judge's verdicts) to DIR/<checkpoint folder name>.jsonl
  --quiet               no progress bar

Output files are checked before anything is loaded: they must differ from each other and from the inputs,
lie outside the --data folder and every --ckpt folder, carry their own extension (.json, .md), and their
folders must be creatable and writable. Each is written atomically: a killed or concurrent eval leaves
either the old file or a whole new one. Records whose prompt
(with the hint the policy picks) exceeds the model's max_position_embeddings are skipped and counted
(skipped_records), like unreadable records. A checkpoint whose outputs are NaN/Inf is an error.

Exit status: 0 on success, 2 on bad arguments or unreadable inputs (one line on stderr).)";

namespace fs = std::filesystem;

// Beyond these the run is a mistake, not a benchmark: answers stop at max_position_embeddings anyway, and a
// classification batch of more images than this only costs memory.
constexpr int64_t kMaxNewTokens = 1 << 16;
constexpr int64_t kMaxBatch = 4096;

// cli::Args keeps one value per flag, so the repeatable --ckpt is taken out before parsing.
static std::vector<std::string> take_ckpts(int argc, char** argv, std::vector<char*>* rest) {
  std::vector<std::string> ckpts;
  for (int i = 0; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--ckpt")) {
      PSA_CHECK(i + 1 < argc, "--ckpt: missing value (see --help)");
      ckpts.push_back(argv[++i]);
    } else if (!std::strncmp(argv[i], "--ckpt=", 7)) {
      ckpts.push_back(argv[i] + 7);
    } else {
      rest->push_back(argv[i]);
    }
  }
  return ckpts;
}

static std::vector<Record> load_split(const std::string& path, int64_t* skipped) {
  LoadReport rep;
  std::vector<Record> records = load_records(path, &rep, true);
  print_skipped(rep, path);
  if (rep.skipped) std::fprintf(stderr, "%s: %ld records loaded, %ld lines skipped\n", path.c_str(), (long)rep.loaded, (long)rep.skipped);
  PSA_CHECK(!records.empty(), path, ": no usable records");
  *skipped = rep.skipped;
  return records;
}

static json::Value& member(json::Value& obj, const std::string& key) {
  for (auto& kv : obj.obj)
    if (kv.first == key) return kv.second;
  obj.set(key, json::Value::object());  // set() returns the object itself, not the new member
  return obj.obj.back().second;
}

// Metrics overwrite their own keys only, so fields other tools added to a stage survive.
static void merge_stage(json::Value& report, const std::string& key, const json::Value& metrics) {
  json::Value& target = member(report, key);
  if (!target.is_object()) target = json::Value::object();
  for (const auto& [k, v] : metrics.obj) target.set(k, v);
}


static std::string unique_key(const json::Value& done, const std::string& stage) {
  std::string key = stage;
  for (int n = 2; done.contains(key); ++n) key = stage + "_" + std::to_string(n);
  return key;
}

// `unreadable`: the split's lines the loader already skipped; the report counts them with the records this
// checkpoint cannot take (always, 0 included, so that a merged report never keeps an older run's count).
static json::Value eval_one(const std::string& dir, const std::vector<Record>& records, int64_t unreadable,
                            const EvalOptions& opt) {
  const Checkpoint c = load_checkpoint(dir);
  check_policy_fits(c, resolve_policy(opt.policy));  // before the images are decoded
  c.model->merge_lora();  // inference only: one matmul per layer instead of three
  LoadReport rep;
  rep.loaded = records.size();
  // Training's text budget (max_text_tokens) does not apply: a question of any length is asked, and only one
  // whose prompt, image and hint pass the model's positions is skipped (evaluate's drop_too_long).
  const Dataset d = build_dataset(records, *c.tokenizer, c.model->config.vision.image_size,
                                  c.model->config.text.max_positions, &rep);
  print_skipped(rep, "");  // what this checkpoint cannot take, not the file's bad lines
  PSA_CHECK(d.size() > 0, dir, ": no record could be prepared for this checkpoint");
  const size_t shown = rep.messages.size();
  json::Value m = evaluate(c, d, opt, &rep);  // adds the records whose prompt is too long for the model
  print_skipped(rep, "", shown);
  m.set("skipped_records", rep.skipped + unreadable);
  std::printf("%s (%s): %ld records in %.1f s (%.1f records/s)\n", dir.c_str(), c.stage.c_str(),
              (long)m.int_at("records"), m.number_at("eval_seconds"), m.number_at("records_per_second"));
  return m;
}

struct Output {
  std::string flag, path;
};

// Every file eval will write, compared before anything is loaded: with each other (the Markdown table must not
// replace the JSON report), with the inputs, and with the folders it reads (a report written over
// model.safetensors or over a dataset's images would destroy them).
static void check_outputs(const std::vector<Output>& outs, const std::vector<Output>& inputs,
                          const std::vector<Output>& read_folders) {
  for (size_t i = 0; i < outs.size(); ++i) {
    const Output& o = outs[i];
    for (size_t j = 0; j < i; ++j)
      PSA_CHECK(!cli::same_path(o.path, outs[j].path), o.flag, " ", o.path, ": the same file as ", outs[j].flag, " ",
                outs[j].path, " (one would overwrite the other; choose another path)");
    for (const Output& in : inputs)
      PSA_CHECK(!cli::same_path(o.path, in.path), o.flag, " ", o.path, ": the same file as the input ", in.flag, " ",
                in.path, " (choose another path)");
    for (const Output& dir : read_folders)
      PSA_CHECK(!cli::path_inside(o.path, dir.path), o.flag, " ", o.path, ": inside the ",
                dir.flag == "--ckpt" ? "checkpoint" : "dataset", " folder ", dir.path, " given with ", dir.flag,
                " (write reports elsewhere)");
  }
  for (const Output& o : outs) cli::check_output_file(o.flag, o.path);
}

// A run folder (one holding psa train's .psa.lock) that an output lies in stays locked for the whole evaluation:
// a psa train started meanwhile is refused, instead of losing its report entries when eval writes the copy of
// report.json it read at the start. (A train already running is refused by check_output_file.)
static void lock_run_folders(const std::vector<Output>& outs) {
  std::set<std::string> locked;
  for (const Output& o : outs)
    for (fs::path d = fs::absolute(o.path).lexically_normal().parent_path(); d.has_relative_path(); d = d.parent_path())
      if (fs::exists(d / json::kLockFileName)) {
        if (locked.insert(d.string()).second) cli::lock_output_dir(o.flag, d.string());
        break;
      }
}

// Missing checkpoints fail now, not after the ones before them were evaluated.
static void check_ckpts(const std::vector<std::string>& ckpts) {
  for (const std::string& dir : ckpts) {
    PSA_CHECK(!dir.empty() && dir.rfind("--", 0) != 0, "--ckpt: expected a checkpoint folder, got '", dir, "'");
    PSA_CHECK(fs::is_directory(dir), "--ckpt ", dir, ": no such folder");
    PSA_CHECK(fs::exists(fs::path(dir) / "model.safetensors"), dir,
              ": no model.safetensors (is this a checkpoint folder? `psa train` writes them)");
  }
}

int cmd_eval(int argc, char** argv) {
  std::vector<char*> rest;
  const std::vector<std::string> ckpts = take_ckpts(argc, argv, &rest);
  cli::Args a;
  const cli::Spec spec{kEvalUsage,
                       {"--data", "--split", "--out", "--md", "--policy", "--limit", "--max-new-tokens", "--batch",
                        "--predictions"},
                       {"--sequential", "--quiet"}};
  if (!cli::parse(static_cast<int>(rest.size()), rest.data(), spec, &a)) return 0;
  PSA_CHECK(a.positional.empty(), "eval: unexpected argument '", a.positional[0], "' (see --help)");
  PSA_CHECK(a.has("--data"), "eval: --data DIR is required (see --help)");
  PSA_CHECK(!ckpts.empty(), "eval: at least one --ckpt DIR is required (see --help)");
  EvalOptions opt;
  opt.policy = a.get_path("--policy", "short");
  opt.limit = a.get_int("--limit", 0, 0);
  opt.max_new_tokens = a.get_int("--max-new-tokens", 32, 1, kMaxNewTokens);
  opt.batch = a.get_int("--batch", 64, 1, kMaxBatch);
  opt.parallel = !a.has("--sequential");
  opt.progress = !a.has("--quiet");
  const Policy policy = resolve_policy(opt.policy);  // a bad policy fails before any model is loaded
  const std::string data = a.get_path("--data", "");
  const std::string split = a.get("--split", "test");
  PSA_CHECK(!split.empty() && split.find('/') == std::string::npos && split != "..", "--split: expected the name of a "
            "records file in --data (e.g. test), got '", split, "'");
  const std::string split_file = (fs::path(data) / (split + ".jsonl")).string();
  PSA_CHECK(fs::exists(split_file), split_file, ": no such file (is --data a dataset folder? `psa data` writes one)");
  check_ckpts(ckpts);

  const std::string out = a.get_path("--out", "report.json");
  PSA_CHECK(cli::lower_extension(out) == ".json", "--out ", out, ": expected a .json file (the JSON report)");
  const std::string md_path = a.get_path("--md", fs::path(out).replace_extension(".md").string());
  PSA_CHECK(cli::lower_extension(md_path) == ".md", "--md ", md_path, ": expected a .md file (the Markdown table)");
  std::vector<Output> outs{{"--out", out}, {"--md", md_path}};
  std::vector<std::string> pred_files;
  if (a.has("--predictions")) {
    const std::string pred_dir = a.get_path("--predictions", "");
    PSA_CHECK(!fs::exists(pred_dir) || fs::is_directory(pred_dir), "--predictions ", pred_dir,
              ": not a folder (one file per checkpoint is written into it)");
    json::Value named = json::Value::object();
    for (const std::string& dir : ckpts) {
      // The folder's own name, also for "run/stage2/" or ".": that of the absolute path without its separator.
      fs::path folder = fs::absolute(dir).lexically_normal();
      if (!folder.has_filename()) folder = folder.parent_path();
      const std::string name = unique_key(named, folder.filename().string());
      named.set(name, json::Value(true));
      pred_files.push_back((fs::path(pred_dir) / (name + ".jsonl")).string());
      outs.push_back({"--predictions", pred_files.back()});
    }
  }
  std::vector<Output> inputs{{"--data", split_file}};
  if (!policy.path.empty()) inputs.push_back({"--policy", policy.path});
  std::vector<Output> read_folders{{"--data", data}};
  for (const std::string& dir : ckpts) read_folders.push_back({"--ckpt", dir});
  check_outputs(outs, inputs, read_folders);
  lock_run_folders(outs);  // before the report is read
  json::Value report = read_report(out);
  check_table_file(md_path);
  for (const std::string& f : pred_files) check_predictions_file(f);

  int64_t unreadable = 0;
  const std::vector<Record> records = load_split(split_file, &unreadable);
  json::Value done = json::Value::object();
  for (size_t i = 0; i < ckpts.size(); ++i) {
    EvalOptions one = opt;
    if (!pred_files.empty()) one.predictions = pred_files[i];
    json::Value m = eval_one(ckpts[i], records, unreadable, one);
    const std::string key = unique_key(done, m.string_at("stage"));
    done.set(key, json::Value(true));
    merge_stage(report, key, m);
  }
  // The table first: a report it cannot read (another tool's keys in the merged file) leaves both files as they were.
  const std::string md = json::in_file(out, [&] { return markdown_table(report); });
  json::write_file(out, json::dump(report, 2) + "\n");
  json::write_file(md_path, md);
  std::printf("\n%s\nwrote %s and %s\n", md.c_str(), out.c_str(), md_path.c_str());
  return 0;
}

}  // namespace psa
