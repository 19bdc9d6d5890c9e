// psa data: writes the synthetic safety dataset; psa tokenizer train: a BPE tokenizer for a dataset.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "psa/data.h"
#include "psa/synth.h"
#include "psa/tokenizer.h"
#include "tools/cli.h"

namespace psa {

static const char* kDataUsage = R"(usage: psa data [--preset tiny|small] [--out DIR] [--seed N] [--scale X]

Generates the synthetic safety dataset (shared/spec dataset.md) deterministically from the seed:
DIR/images/*.png, DIR/base_train.jsonl (base-VLM data: compliant descriptions of risky images and
hint-following samples), DIR/train.jsonl (safety data for Stages I and II), DIR/val.jsonl, DIR/test.jsonl
and DIR/dataset.json (config and counts). Records use the PSA-VLM reference format, so the same loader
trains on real data. --scale X multiplies every record count (at least one record where the preset has any),
e.g. 0.01 for a dataset of a few dozen records for smoke tests. DIR must be missing or empty; dataset.json is
written last, so its presence marks a complete dataset. --seed: 0 to 2^53. Defaults: --preset tiny
--out data/tiny --seed 1.)";

// Scales one count, keeping non-empty kinds non-empty so a small dataset still has every kind of record.
static int scaled(int n, double f) { return n == 0 ? 0 : std::max(1, static_cast<int>(n * f)); }

static void scale_sizes(SplitSizes& s, double f) {
  s.clean = scaled(s.clean, f), s.risky = scaled(s.risky, f);
  s.hard_negative = scaled(s.hard_negative, f), s.typographic = scaled(s.typographic, f);
}

int cmd_data(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kDataUsage, {"--preset", "--out", "--seed", "--scale"}, {}}, &a)) return 0;
  PSA_CHECK(a.positional.empty(), "data: unexpected argument '", a.positional[0], "' (see --help)");
  SynthConfig cfg = synth_preset(a.get("--preset", "tiny"));
  // dataset.json stores the seed as a JSON number, exact up to 2^53 (psa train reads it back for the scenes).
  cfg.seed = a.get_int("--seed", 1, 0, int64_t(1) << 53);
  const double scale = a.get_double("--scale", 1, 0, 1);
  PSA_CHECK(scale > 0, "--scale: expected a number in (0, 1], got ", scale);
  for (SplitSizes* s : {&cfg.train, &cfg.val, &cfg.test}) scale_sizes(*s, scale);
  cfg.base_extra_clean = scaled(cfg.base_extra_clean, scale);
  const std::string out = a.get_path("--out", "data/" + cfg.preset);
  // Not inside a checkpoint folder or a run a live psa train holds (as every other command's outputs).
  cli::check_output_location("--out", (std::filesystem::path(out) / "dataset.json").string());
  check_synth_config(cfg);  // before the folder is made
  auto t0 = std::chrono::steady_clock::now();
  // One writer: two runs into one --out used to pass the emptiness check together and interleave their images.
  const json::Value info = cli::fill_new_folder("--out", out, "psa data writes only into a missing or empty folder", [&] {
    return generate_dataset(cfg, out, [](int64_t done, int64_t total) { cli::print_progress("data", done, total, "images"); });
  });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s in %.1f s: %s\n", out.c_str(), s, json::dump(info.at("counts")).c_str());
  return 0;
}

static const char* kTokUsage = R"(usage: psa tokenizer train --data DIR [--vocab 512] [--out FILE]

Trains a byte-level BPE tokenizer (GPT-2 byte map and pre-tokenisation; specials <pad> <s> </s> <image>
<unk>) on every question and answer of DIR/base_train.jsonl and DIR/train.jsonl, with the prompt template.
--vocab: 261 (the specials and the 256 bytes) to 1048576. --out: a .json file, not an input (default
DIR/tokenizer.json), written atomically.)";

// The five specials and the 256 bytes are always tokens; far past 2^20 merges the model's embedding alone is
// gigabytes, and no caption corpus has that many distinct pairs.
constexpr int64_t kMinVocab = 5 + 256, kMaxVocab = int64_t(1) << 20;

int cmd_tokenizer(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kTokUsage, {"--data", "--vocab", "--out"}, {}}, &a)) return 0;
  PSA_CHECK(a.positional.size() == 1 && a.positional[0] == "train", "tokenizer: expected 'train' (see --help)");
  PSA_CHECK(a.has("--data"), "tokenizer train: --data DIR is required");
  const std::string dir = a.get_path("--data", "");
  // Checked before reading the data: as an int, 2^32 + 300 would train a 300-token vocabulary.
  const int vocab = static_cast<int>(a.get_int("--vocab", 512, kMinVocab, kMaxVocab));
  const std::string out = a.get_path("--out", (std::filesystem::path(dir) / "tokenizer.json").string());
  PSA_CHECK(cli::lower_extension(out) == ".json", "--out ", out, ": expected a .json file (the tokenizer)");
  const std::vector<std::string> inputs = {(std::filesystem::path(dir) / "base_train.jsonl").string(),
                                           (std::filesystem::path(dir) / "train.jsonl").string()};
  for (const std::string& in : inputs)
    PSA_CHECK(!cli::same_path(out, in), "--out ", out, ": the same file as the input ", in, " (choose another path)");
  // Before check_output_file, which creates the output's folder: a mistyped --data left an empty one behind.
  PSA_CHECK(std::any_of(inputs.begin(), inputs.end(), [](const std::string& in) { return std::filesystem::exists(in); }),
            dir, ": no base_train.jsonl or train.jsonl (is --data a dataset folder? `psa data` writes one)");
  cli::check_output_file("--out", out);
  // Replacing a file is for a tokenizer only: not a dataset.json or a records file that happens to end in .json.
  if (std::filesystem::exists(out)) {
    try {
      Tokenizer::load(out);
    } catch (const Error&) {
      fail("--out ", out, ": exists and is not a tokenizer file (it would be replaced; choose another path)");
    }
  }
  std::vector<Record> recs;
  int64_t skipped = 0;
  for (const std::string& in : inputs) {
    if (!std::filesystem::exists(in)) continue;
    LoadReport rep;
    std::vector<Record> r = load_records(in, &rep, false);
    recs.insert(recs.end(), r.begin(), r.end());
    skipped += rep.skipped;
  }
  PSA_CHECK(!recs.empty(), dir, ": no base_train.jsonl or train.jsonl records");
  Tokenizer tok = Tokenizer::train(corpus_of(recs), vocab);
  tok.save(out);  // atomic (temp file, fsync, rename)
  std::printf("wrote %s: %d tokens from %zu records (%ld bad records skipped)\n", out.c_str(), tok.vocab_size(),
              recs.size(), (long)skipped);
  return 0;
}

}  // namespace psa
