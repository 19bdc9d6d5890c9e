#include "psa/checkpoint.h"

#include <signal.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "nn/checkpoint.h"
#include "nn/safetensors.h"

namespace psa {
namespace fs = std::filesystem;

static json::Value lora_json(const LoraSettings& l) {
  json::Value v = json::Value::object();
  v.set("rank", l.rank);
  v.set("alpha", l.alpha);
  v.set("dropout", l.dropout);
  v.set("include_lm_head", l.include_lm_head);
  return v;
}

int64_t lora_max_rank(const PsaConfig& c) { return c.text.hidden; }

// Bytes of a file, or "" when there is none (an unreadable one reads as different, so it is replaced).
static std::string bytes_or_empty(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return "";
  try {
    return json::read_file(p.string());
  } catch (const Error&) {
    return "";
  }
}

static void rename_into(const fs::path& from, const fs::path& to) {
  PSA_CHECK(::rename(from.c_str(), to.c_str()) == 0, to.string(), ": cannot rename ", from.string(), " over it: ",
            std::strerror(errno));
}

// Three files cannot be replaced at once, so the order decides what a crash between the renames leaves.
// model.safetensors goes last: it is what makes a folder a checkpoint (the loader, --resume and eval look for
// it), and it carries the config and the xxHash64 of its tokenizer.json in its own metadata. So a crash before
// its rename leaves the old model with its config (the loader builds nothing from config.json, which is there
// for people and Hugging Face style tools, and only warns that it differs) and either its own tokenizer.json
// (when the new one is byte-identical, the usual case: every stage of a run has the run's tokenizer, and an
// identical file is not replaced) or a new one that the loader refuses by the hash, naming the folder: never a
// silently mixed model. Writing every file into the staging folder first means that a failed write (a full
// disk, a non-finite LoRA number) leaves the folder exactly as it was.
void save_checkpoint(const std::string& dir, const PsaVlm& model, const Tokenizer& tok, const std::string& stage,
                     const LoraSettings& lora) {
  const std::string config = json::dump(model.config.to_json(), 2), lora_text = json::dump(lora_json(lora));
  fs::create_directories(dir);
  const fs::path staging = fs::path(dir) / str_cat(".checkpoint.tmp.", ::getpid(), ".0");
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::create_directories(staging);
  try {
    const fs::path d(dir);
    tok.save((staging / "tokenizer.json").string());
    const std::string tok_text = json::read_file((staging / "tokenizer.json").string());
    json::write_file((staging / "config.json").string(), config + "\n");
    nn::write_tensors((staging / "model.safetensors").string(), model.state_dict(),
                      {{"format", "pt"}, {"config", config}, {"stage", stage}, {"lora", lora_text},
                       {"tokenizer_xxh64", st::xxh64_hex(tok_text.data(), tok_text.size())}});
    rename_into(staging / "config.json", d / "config.json");
    if (bytes_or_empty(d / "tokenizer.json") != tok_text) rename_into(staging / "tokenizer.json", d / "tokenizer.json");
    rename_into(staging / "model.safetensors", d / "model.safetensors");
    json::sync_dir_of((d / "model.safetensors").string());  // the renames reach the disk
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  fs::remove_all(staging, ec);
}

// A lower bound on the parameters `c` builds (the large matrices only). A config is read from the same file as
// the weights, so one that asks for far more than the file holds is hostile or corrupt: refusing it here stops
// a few bytes of JSON from allocating gigabytes before the strict load would have refused it anyway.
double min_params(const PsaConfig& c) {
  const nn::ClipConfig& v = c.vision;
  const nn::LlamaConfig& t = c.text;
  const double h = v.hidden, H = t.hidden, hd = t.dim_head(), a = v.hidden + c.num_safety_tokens;
  double n = v.layers * (4 * h * h + 2 * h * v.intermediate) + double(v.channels) * v.patch * v.patch * h;
  n += double(t.vocab) * H + t.layers * (2 * H * t.heads * hd + 2 * H * t.kv_heads * hd + 3 * H * t.intermediate);
  n += 2.0 * c.abstractor_depth * a * a + 4 * H * H;  // C-Abstractor bottlenecks, cross-attention
  return n;
}

// Metadata JSON -> value; errors name the file and the entry ("m.safetensors: metadata 'config': ...").
template <typename F>
static auto from_metadata(const std::string& file, const std::string& key, const std::string& text, F&& f) {
  try {
    return f(json::parse(text, "json"));
  } catch (const Error& e) {
    fail(file, ": metadata '", key, "': ", e.what());
  }
}

// config.json is for people and Hugging Face style tools; the model is built from the config in its own metadata.
// One that says something else (edited by hand, unreadable, or the new one beside the old model after a crash
// between save_checkpoint's renames) gets a warning, so that an edit is not believed to have taken effect.
static void warn_unless_config_json_matches(const std::string& dir, const std::string& stored) {
  const fs::path path = fs::path(dir) / "config.json";
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  bool same = false;
  if (fs::is_regular_file(path, ec)) {
    try {
      same = json::dump(json::parse_file(path.string())) == json::dump(json::parse(stored));
    } catch (const Error&) {
    }
  }
  if (!same)
    std::fprintf(stderr, "warning: %s is not the model's config (edited, unreadable, or left by an interrupted "
                 "save); the config stored in model.safetensors is used\n", path.c_str());
}

Checkpoint load_checkpoint(const std::string& dir) {
  fs::path model_path = fs::path(dir) / "model.safetensors";
  PSA_CHECK(!fs::is_regular_file(dir), dir, ": a file; give the checkpoint folder that holds it (`psa train` writes them)");
  PSA_CHECK(fs::exists(model_path), dir, ": no model.safetensors (is this a checkpoint folder? `psa train` writes them)");
  std::map<std::string, std::string> meta;
  nn::StateDict sd = nn::read_tensors(model_path.string(), &meta);
  PSA_CHECK(meta.count("config"), model_path.string(), ": no 'config' in the metadata");
  Checkpoint c;
  c.dir = dir;
  c.stage = meta.count("stage") ? meta["stage"] : "unknown";
  const std::string file = model_path.string();
  PsaConfig cfg = from_metadata(file, "config", meta["config"], [](const json::Value& v) { return PsaConfig::from_json(v); });
  double elements = 0;
  for (const auto& [name, t] : sd) elements += t.numel();
  PSA_CHECK(min_params(cfg) <= 2 * elements + (1 << 20), file, ": metadata 'config' describes a model of at least ",
            int64_t(min_params(cfg)), " parameters but the file holds ", int64_t(elements), " values");
  if (meta.count("lora"))
    c.lora = from_metadata(file, "lora", meta["lora"], [&](const json::Value& l) {
      LoraSettings s;
      s.rank = l.int_in("rank", 0, lora_max_rank(cfg));
      s.alpha = l.number_at("alpha");
      s.dropout = l.number_at("dropout");
      PSA_CHECK(s.dropout >= 0 && s.dropout < 1, "json: key 'dropout': ", s.dropout, " out of range [0, 1)");
      PSA_CHECK(s.rank == 0 || (s.alpha > 0 && s.alpha <= kMaxLoraAlpha), "json: key 'alpha': ", s.alpha,
                " out of range (0, ", kMaxLoraAlpha, "]");
      s.include_lm_head = l.bool_at("include_lm_head");
      return s;
    });
  nn::require_hashes(file, meta);  // after the metadata's own checks, which say more about a hostile file
  c.model = std::make_shared<PsaVlm>(cfg);
  if (c.lora.rank > 0) c.model->add_lora(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.include_lm_head);
  c.model->load_state_dict(sd, true, model_path.string());
  const std::string tok_path = (fs::path(dir) / "tokenizer.json").string();
  c.tokenizer = std::make_shared<Tokenizer>(Tokenizer::load(tok_path));
  PSA_CHECK(c.tokenizer->vocab_size() <= cfg.text.vocab, dir, ": tokenizer.json has ", c.tokenizer->vocab_size(),
            " tokens but the model's vocabulary (embedding rows) is ", cfg.text.vocab);
  const Tokenizer& t = *c.tokenizer;
  PSA_CHECK(cfg.image_token == t.image_id() && cfg.pad_id == t.pad_id() && cfg.text.bos_id == t.bos_id() &&
                cfg.text.eos_id == t.eos_id(),
            file, ": metadata 'config' has <image> ", cfg.image_token, ", <pad> ", cfg.pad_id, ", <s> ",
            cfg.text.bos_id, ", </s> ", cfg.text.eos_id, " but ", tok_path, " has ", t.image_id(), ", ", t.pad_id(),
            ", ", t.bos_id(), ", ", t.eos_id(), ": a mixed or edited checkpoint folder");
  // A smaller vocabulary is legitimate (BPE training stops when no pair is left), so only the hash recorded by
  // save_checkpoint can tell a swapped or half-replaced tokenizer.json (older checkpoints have none).
  if (meta.count("tokenizer_xxh64")) {
    const std::string text = json::read_file(tok_path), hash = st::xxh64_hex(text.data(), text.size());
    PSA_CHECK(hash == meta["tokenizer_xxh64"], dir, ": tokenizer.json (xxh64 ", hash,
              ") is not the tokenizer the model was saved with (", meta["tokenizer_xxh64"],
              "): a mixed or edited checkpoint folder");
  }
  warn_unless_config_json_matches(dir, meta["config"]);
  return c;
}

std::shared_ptr<PsaVlm> merged_model(const Checkpoint& c) {
  PSA_CHECK(c.lora.rank > 0, c.dir, ": stage ", c.stage, " has no LoRA adapters: nothing to merge");
  c.model->merge_lora();
  std::map<std::string, Tensor> weights = c.model->state_dict();
  for (auto it = weights.begin(); it != weights.end();)
    it = it->first.find(".lora_") != std::string::npos ? weights.erase(it) : std::next(it);
  auto plain = std::make_shared<PsaVlm>(c.model->config);
  plain->load_state_dict(weights, true, c.dir + " (merged)");
  return plain;
}

// ".<name>.tmp.<pid>.<n>" (json::create_temp_beside's and save_checkpoint's names): the pid, else 0.
static long temp_owner(const std::string& file) {
  const size_t tag = file.rfind(".tmp.");
  if (file.size() < 2 || file[0] != '.' || tag == std::string::npos || tag == 0) return 0;
  const char* p = file.c_str() + tag + 5;
  char* end = nullptr;
  errno = 0;
  const long pid = std::strtol(p, &end, 10);
  if (end == p || *end != '.' || errno != 0 || pid <= 0 || !std::isdigit((unsigned char)*p)) return 0;
  const char* q = end + 1;
  std::strtoul(q, &end, 10);
  return end != q && *end == 0 && std::isdigit((unsigned char)*q) ? pid : 0;
}

int remove_stale_temps(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return 0;
  std::vector<fs::path> stale;  // collected first: no removal while the directory is being read
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const long pid = temp_owner(name);
    // kill(pid, 0) fails with ESRCH only when no such process exists: a live writer's file stays.
    if (pid && (pid == ::getpid() || (::kill(pid, 0) != 0 && errno == ESRCH))) stale.push_back(e.path());
  }
  int removed = 0;
  for (const fs::path& p : stale) removed += fs::remove_all(p, ec) > 0 && !ec;
  return removed;
}

}  // namespace psa
