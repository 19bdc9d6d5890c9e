// psa audit: which weights differ between two checkpoints, per module group (the stage invariants).
#include <cstdio>

#include "nn/checkpoint.h"
#include "psa/eval.h"
#include "tools/cli.h"

namespace psa {

static const char* kAuditUsage = R"(usage: psa audit CKPT_A CKPT_B [--json]

Compares two checkpoints tensor by tensor: the xxHash64 of each tensor's raw bytes (the stored hashes are
verified on load; a differing dtype or shape also counts as changed), grouped by module:
  vision_tower, multi_modal_projector, language_model (base weights), lora (names containing lora_),
  safety_query_tokens, safety_query_tokens_2, safe_mm_projector, safe_part.
This checks each stage's training contract: Stage I changes only the safety tokens, the safety projector
and safe_part; Stage II with LoRA adds and changes only lora tensors.
CKPT_A and CKPT_B are checkpoint folders (or model.safetensors files).

options:
  --json    print the comparison as one JSON object (groups, counts and every changed/added/removed name)

Exit status: 0 when both load (whatever differs), 2 on bad arguments or unreadable files.)";

// Name lists are printed only when short enough to read; --json always has them.
constexpr size_t kMaxListed = 20;

static void print_names(const char* what, const json::Value& names) {
  if (names.size() == 0) return;
  if (names.size() > kMaxListed) {
    std::printf("%zu %s tensors (--json lists them)\n", names.size(), what);
    return;
  }
  std::printf("%s tensors:\n", what);
  for (const json::Value& n : names.as_array()) std::printf("  %s\n", n.as_string().c_str());
}

static void print_row(const json::Value& g, const std::string& name) {
  std::printf("%-24s %8ld %8ld %10ld %6ld %8ld\n", name.c_str(), (long)g.int_at("tensors"), (long)g.int_at("changed"),
              (long)g.int_at("unchanged"), (long)g.int_at("added"), (long)g.int_at("removed"));
}

static void print_audit(const json::Value& r) {
  std::printf("A: %s (stage %s)\nB: %s (stage %s)\n\n", r.string_at("a").c_str(), r.string_at("stage_a").c_str(),
              r.string_at("b").c_str(), r.string_at("stage_b").c_str());
  std::printf("%-24s %8s %8s %10s %6s %8s\n", "group", "tensors", "changed", "unchanged", "added", "removed");
  for (const json::Value& g : r.array_at("groups")) print_row(g, g.string_at("group"));
  print_row(r, "total");
  std::printf("\n");
  print_names("changed", r.at("changed_tensors"));
  print_names("added", r.at("added_tensors"));
  print_names("removed", r.at("removed_tensors"));
}

int cmd_audit(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kAuditUsage, {}, {"--json"}}, &a)) return 0;
  PSA_CHECK(a.positional.size() == 2, "audit: expected two checkpoints, got ", a.positional.size(), " (see --help)");
  for (const std::string& p : a.positional) PSA_CHECK(!p.empty(), "audit: empty checkpoint path");
  const json::Value r = nn::naming_fs_errors([&] { return audit_checkpoints(a.positional[0], a.positional[1]); });
  if (a.has("--json")) std::printf("%s\n", json::dump(r).c_str());
  else print_audit(r);
  return 0;
}

}  // namespace psa
