// psa inspect: what a checkpoint folder or a safetensors file holds, read and verified, without running it.
#include <cstdio>
#include <filesystem>
#include <map>

#include "nn/checkpoint.h"
#include "nn/safetensors.h"
#include "psa/checkpoint.h"
#include "psa/eval.h"
#include "psa/policy.h"
#include "psa/records.h"
#include "tools/cli.h"

namespace psa {

static const char* kInspectUsage = R"(usage: psa inspect PATH [--json]

PATH is a checkpoint folder (what psa train writes: model.safetensors, config.json, tokenizer.json), one
.safetensors file (a training state, a Hugging Face weight file) or a .jsonl records file (psa data's splits,
or real data for psa train --data). Everything is read as the loaders read it: every tensor's stored xxHash64
is verified, and a checkpoint's config and tokenizer are checked against its weights, so a file that inspects
cleanly also loads; a records file is parsed and every image header checked, as training does.

checkpoint folder: stage, preset, LoRA settings, tokenizer, the model's dimensions, parameters per module
                   group (the groups of psa audit) and the size of each file
safetensors file:  the metadata keys and every tensor's name, dtype and shape (the first 40; --json lists all)
records file:      records per safety level and type, and every skipped line with its reason (exit status 2
                   when any line is skipped: the list, then one line with the count)

options:
  --json    one JSON object instead of text

Exit status: 0 when PATH reads cleanly, 2 on bad arguments or a file that does not load (one line).)";

namespace fs = std::filesystem;

constexpr size_t kMaxListedTensors = 40;

static json::Value shape_json(const std::vector<int64_t>& shape) {
  json::Value v = json::Value::array();
  for (int64_t d : shape) v.push(d);
  return v;
}

static json::Value inspect_file(const std::string& path) {
  const st::File f = st::File::open(path, true);
  json::Value tensors = json::Value::array();
  int64_t values = 0;
  for (const st::TensorView& t : f.tensors()) {
    json::Value e = json::Value::object();
    e.set("name", t.name);
    e.set("dtype", st::dtype_name(t.dtype));
    e.set("shape", shape_json(t.shape));
    tensors.push(std::move(e));
    values += t.numel();
  }
  json::Value keys = json::Value::array();
  int64_t hashes = 0;  // files of other writers (Hugging Face) have none: nothing was verified
  for (const auto& [k, v] : f.metadata()) {
    if (k.rfind("xxh64.", 0) != 0) keys.push(k);
    else ++hashes;
  }
  json::Value out = json::Value::object();
  out.set("file", path);
  out.set("bytes", static_cast<int64_t>(fs::file_size(path)));
  out.set("tensor_count", static_cast<int64_t>(f.tensors().size()));
  out.set("values", values);
  out.set("metadata_keys", std::move(keys));
  out.set("hashes_verified", hashes);
  out.set("tensors", std::move(tensors));
  return out;
}

static void print_file(const json::Value& r) {
  std::printf("%s: %ld tensors, %ld values, %ld bytes\nmetadata:", r.string_at("file").c_str(),
              (long)r.int_at("tensor_count"), (long)r.int_at("values"), (long)r.int_at("bytes"));
  for (const json::Value& k : r.array_at("metadata_keys")) std::printf(" %s", cli::printable(k.as_string()).c_str());
  std::printf("%s\nhashes verified: %ld%s\n", r.array_at("metadata_keys").empty() ? " (none)" : "",
              (long)r.int_at("hashes_verified"), r.int_at("hashes_verified") ? "" : " (the file stores none)");
  const auto& tensors = r.array_at("tensors");
  for (size_t i = 0; i < tensors.size() && i < kMaxListedTensors; ++i) {
    std::printf("  %-60s %-5s %s\n", cli::printable(tensors[i].string_at("name")).c_str(), tensors[i].string_at("dtype").c_str(),
                json::dump(tensors[i].at("shape")).c_str());
  }
  if (tensors.size() > kMaxListedTensors)
    std::printf("  ... %zu more (--json lists them)\n", tensors.size() - kMaxListedTensors);
}

static json::Value inspect_records(const std::string& path) {
  LoadReport rep;
  const std::vector<Record> records = load_records(path, &rep, true);
  int64_t levels[4] = {}, types[7] = {};
  for (const Record& r : records) {
    ++levels[r.safe_level];
    ++types[r.safe_type];
  }
  json::Value by_level = json::Value::object(), by_type = json::Value::object(), skipped = json::Value::array();
  for (int l = 0; l < 4; ++l) by_level.set(std::to_string(l), levels[l]);
  for (int t = 0; t < 7; ++t) by_type.set(type_name(t), types[t]);
  for (const std::string& m : rep.messages) skipped.push(m);
  json::Value out = json::Value::object();
  out.set("records_file", path);
  out.set("records", rep.loaded);
  out.set("skipped", rep.skipped);
  out.set("lines", rep.lines);  // non-blank
  out.set("by_level", std::move(by_level));
  out.set("by_type", std::move(by_type));
  out.set("skipped_lines", std::move(skipped));
  return out;
}

static void print_records(const json::Value& r) {
  std::printf("%s: %ld records, %ld lines skipped\nby level:", r.string_at("records_file").c_str(),
              (long)r.int_at("records"), (long)r.int_at("skipped"));
  for (const auto& [k, n] : r.at("by_level").as_object()) std::printf(" %s: %ld", k.c_str(), (long)n.as_int());
  std::printf("\nby type:");
  for (const auto& [k, n] : r.at("by_type").as_object()) std::printf(" %s: %ld", k.c_str(), (long)n.as_int());
  std::printf("\n");
  for (const json::Value& m : r.array_at("skipped_lines")) std::printf("skipped %s\n", cli::printable(m.as_string()).c_str());
}

static json::Value inspect_checkpoint(const std::string& dir) {
  const Checkpoint c = load_checkpoint(dir);
  const PsaConfig& cfg = c.model->config;
  std::map<std::string, int64_t> groups;
  for (const auto& [name, t] : c.model->state_dict()) groups[audit_group(name)] += t.numel();
  json::Value params = json::Value::object();
  for (const auto& [g, n] : groups) params.set(g, n);
  std::map<std::string, int64_t> sizes;  // by name: the directory's own order is arbitrary
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename().string()[0] != '.')
      sizes[e.path().filename().string()] = static_cast<int64_t>(e.file_size());
  json::Value files = json::Value::object();
  for (const auto& [name, bytes] : sizes) files.set(name, bytes);
  json::Value lora = json::Value::object();
  lora.set("rank", c.lora.rank);
  if (c.lora.rank) {
    lora.set("alpha", c.lora.alpha);
    lora.set("dropout", c.lora.dropout);
    lora.set("include_lm_head", c.lora.include_lm_head);
  }
  json::Value out = json::Value::object();
  out.set("checkpoint", dir);
  out.set("stage", c.stage);
  out.set("preset", cfg.preset);
  out.set("lora", std::move(lora));
  out.set("tokenizer_vocab", static_cast<int64_t>(c.tokenizer->vocab_size()));
  out.set("parameters", c.model->num_parameters());
  out.set("parameters_by_group", std::move(params));
  out.set("files", std::move(files));
  out.set("config", cfg.to_json());
  return out;
}

static void print_checkpoint(const json::Value& r) {
  const json::Value& cfg = r.at("config");
  const json::Value &v = cfg.at("vision_config"), &t = cfg.at("text_config"), &lora = r.at("lora");
  std::printf("%s: stage %s, preset %s, %ld parameters\n", r.string_at("checkpoint").c_str(),
              r.string_at("stage").c_str(), r.string_at("preset").c_str(), (long)r.int_at("parameters"));
  std::printf("vision:    %ldx%ld px, patch %ld, width %ld, %ld layers, %ld heads\n", (long)v.int_at("image_size"),
              (long)v.int_at("image_size"), (long)v.int_at("patch_size"), (long)v.int_at("hidden_size"),
              (long)v.int_at("num_hidden_layers"), (long)v.int_at("num_attention_heads"));
  std::printf("language:  vocab %ld, width %ld, %ld layers, %ld heads (%ld key/value), %ld positions\n",
              (long)t.int_at("vocab_size"), (long)t.int_at("hidden_size"), (long)t.int_at("num_hidden_layers"),
              (long)t.int_at("num_attention_heads"), (long)t.int_at("num_key_value_heads"),
              (long)t.int_at("max_position_embeddings"));
  std::printf("safety:    %ld safety tokens, C-Abstractor depth %ld, head query %s, %ld head heads\n",
              (long)cfg.int_at("num_safety_tokens"), (long)cfg.int_at("abstractor_depth"),
              cfg.string_at("head_query").c_str(), (long)cfg.int_at("head_heads"));
  if (lora.int_at("rank"))
    std::printf("LoRA:      rank %ld, alpha %g, dropout %g, lm_head %s\n", (long)lora.int_at("rank"),
                lora.number_at("alpha"), lora.number_at("dropout"), lora.bool_at("include_lm_head") ? "yes" : "no");
  else
    std::printf("LoRA:      none\n");
  std::printf("tokenizer: %ld tokens\nparameters by group:\n", (long)r.int_at("tokenizer_vocab"));
  for (const auto& [g, n] : r.at("parameters_by_group").as_object())
    std::printf("  %-24s %10ld\n", g.c_str(), (long)n.as_int());
  std::printf("files:\n");
  for (const auto& [f, n] : r.at("files").as_object()) std::printf("  %-24s %10ld bytes\n", f.c_str(), (long)n.as_int());
}

int cmd_inspect(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv, {kInspectUsage, {}, {"--json"}}, &a)) return 0;
  PSA_CHECK(a.positional.size() == 1, "inspect: expected one path, got ", a.positional.size(), " (see --help)");
  const std::string path = a.positional[0];
  PSA_CHECK(!path.empty(), "inspect: empty path");
  PSA_CHECK(fs::exists(path), path, ": no such file or folder");
  const bool folder = fs::is_directory(path);
  const std::string ext = cli::lower_extension(path);
  PSA_CHECK(folder || ext == ".safetensors" || ext == ".jsonl", path,
            ": expected a checkpoint folder, a .safetensors file or a .jsonl records file");
  const json::Value r = nn::naming_fs_errors([&] {
    return folder ? inspect_checkpoint(path) : ext == ".jsonl" ? inspect_records(path) : inspect_file(path);
  });
  if (a.has("--json")) std::printf("%s\n", json::dump(r, 2).c_str());
  else if (folder) print_checkpoint(r);
  else if (ext == ".jsonl") print_records(r);
  else print_file(r);
  if (ext == ".jsonl" && r.int_at("skipped")) {
    std::fflush(stdout);
    fail(path, ": ", r.int_at("skipped"), " of ", r.int_at("lines"), " non-blank lines skipped (listed above)");
  }
  return 0;
}

}  // namespace psa
