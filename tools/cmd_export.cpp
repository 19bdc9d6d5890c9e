// psa export --merge-lora: a Stage II checkpoint with its LoRA adapters folded into the weights, as a plain one.
#include <cstdio>
#include <filesystem>

#include "psa/checkpoint.h"
#include "tools/cli.h"

namespace psa {

static const char* kExportUsage = R"(usage: psa export --merge-lora CKPT --out DIR

Writes CKPT (a checkpoint folder with LoRA adapters, e.g. runs/tiny/stage2) to DIR as a checkpoint without
them: every adapted linear layer's weight becomes W + (alpha/r)·B·A (PEFT's merge_and_unload) and the
lora_A / lora_B tensors are dropped, so the file holds the reference parameter names only and loads in
tools that know nothing of LoRA. Its answers are those of CKPT: eval and infer merge the same way.
Safety modules, tokenizer and stage are copied unchanged.

required:
  --merge-lora   fold the adapters in (the only export there is)
  --out DIR      a new or empty folder outside CKPT (three files, written as psa train writes them)

Exit status: 0 on success, 2 on bad arguments, an unreadable checkpoint or one without adapters.)";

namespace fs = std::filesystem;

int cmd_export(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kExportUsage, {"--out"}, {"--merge-lora"}}, &a)) return 0;
  PSA_CHECK(a.positional.size() == 1, "export: expected one checkpoint folder, got ", a.positional.size(),
            " (see --help)");
  PSA_CHECK(a.has("--merge-lora"), "export: --merge-lora is required (it is the only export; see --help)");
  PSA_CHECK(a.has("--out"), "export: --out DIR is required (see --help)");
  const std::string ckpt = a.positional[0], out = a.get_path("--out", "");
  PSA_CHECK(!ckpt.empty(), "export: empty checkpoint path");
  PSA_CHECK(!cli::path_inside(out, ckpt) && !cli::path_inside(ckpt, out), "--out ", out,
            ": overlaps the checkpoint folder ", ckpt, " (write the merged copy elsewhere)");
  std::error_code ec;
  // A killed export's staging folder and lock are no content (only temps of dead processes are removed).
  if (fs::is_directory(out, ec)) remove_stale_temps(out);
  PSA_CHECK(!fs::exists(out, ec) || !fs::is_directory(out, ec) || json::holds_only_lock(out), "--out ", out,
            ": not empty (choose a new folder; an export never replaces files)");
  cli::check_output_location("--out", (fs::path(out) / "model.safetensors").string());
  // Loaded and merged before the folder is made: a checkpoint without adapters leaves nothing behind.
  const Checkpoint c = load_checkpoint(ckpt);
  const std::shared_ptr<PsaVlm> merged = merged_model(c);
  // One writer: two exports into one --out both passed the check above, and one replaced the other's files.
  cli::fill_new_folder("--out", out, "choose a new folder; an export never replaces files", [&] {
    save_checkpoint(out, *merged, *c.tokenizer, c.stage, LoraSettings{});
    return 0;
  });
  std::printf("merged the rank-%ld LoRA adapters (alpha %g) of %s into %s: %ld parameters, stage %s\n",
              (long)c.lora.rank, c.lora.alpha, ckpt.c_str(), out.c_str(), (long)merged->num_parameters(),
              c.stage.c_str());
  return 0;
}

}  // namespace psa
