// psa infer: one image and one question through a checkpoint, with dynamic safety control.
#include <cstdio>
#include <filesystem>

#include "nn/json.h"
#include "psa/infer.h"
#include "psa/records.h"
#include "tools/cli.h"

namespace psa {

static const char* kInferUsage = R"(usage: psa infer --ckpt DIR --image FILE --prompt TEXT [options]

Answers one question about one image with a PSA-VLM checkpoint (psa-vlm.md section 5, dynamic safety control):
  1. the safety head classifies the image with the plain prompt; level and type are independent argmaxes;
  2. the policy maps (level, type) to an action: none (level 0 or type clean), hint (a Safe Hint sentence is
     added to the user turn) or refuse (a fixed refusal is printed and nothing is generated);
  3. the LLM answers (greedy by default, KV cache, stops at </s>).
A "base" checkpoint has an untrained head and an LLM trained without safety tokens: its prediction is shown
for reference only and control is always off.

required:
  --ckpt DIR            checkpoint folder (model.safetensors, config.json, tokenizer.json; `psa train` writes them)
  --image FILE          a PNG, JPEG or BMP, up to 16384 px a side and 64 Mi pixels; "a.png<split>b.png"
                        pastes a pair side by side
  --prompt TEXT         the user's question ("<image>" tags are removed: the template places the image); must
                        be valid UTF-8 without the other special tokens' texts (<s>, </s>, <pad>, <unk>),
                        not empty (after removing the tags and surrounding whitespace), and
                        fit the model's max_position_embeddings with the image and any hint

options:
  --policy NAME|FILE    safety policy: short (default; the table the synthetic data was generated with),
                        reference (the paper's hint sentences) or a policy JSON file
  --no-control          skip steps 1-2's effect: no hint, no refusal (the prediction is still shown)
  --max-new-tokens N    answer length limit, 1..65536 (default 32)
  --temperature T       0 = greedy (default); > 0 samples
  --top-k K             keep the K most likely tokens when sampling (0 = off, default)
  --top-p P             nucleus sampling mass in (0, 1] (1 = off, default)
  --seed N              sampling seed, >= 0 (default 0)
  --explain OUT.png     also write the safety head's attention over the image as a red heat map (256 px,
                        PNG; the name must end in .png and differ from the input image)
  --json                print one JSON object instead of text

Exit status: 0 on success, 2 on bad arguments, unreadable inputs or a model whose outputs are NaN/Inf (one
line on stderr).)";

// Every numeric option is checked before the checkpoint is loaded; the stop id is added once it is.
static nn::SamplingOptions sampling_from(const cli::Args& a) {
  nn::SamplingOptions o;
  o.max_new_tokens = a.get_int("--max-new-tokens", 32, 1, 1 << 16);  // answers stop at the positions anyway
  o.temperature = a.get_double("--temperature", 0, 0);
  o.top_k = a.get_int("--top-k", 0, 0, 1 << 24);  // past any vocabulary: the same as off
  o.top_p = a.get_double("--top-p", 1.0, 0, 1);
  PSA_CHECK(o.top_p > 0, "--top-p: expected a value in (0, 1], got ", o.top_p);
  o.seed = static_cast<uint64_t>(a.get_int("--seed", 0, 0));
  return o;
}

// The question must be text the tokenizer and the JSON output can carry, and not empty: an empty question
// is outside what the model was trained on, and what it would answer is noise.
static std::string question_from(const cli::Args& a) {
  const std::string q = a.get("--prompt");
  PSA_CHECK(json::is_valid_utf8(q), "--prompt: not valid UTF-8 text");
  const std::string special = special_token_in(q);
  PSA_CHECK(special.empty(), "--prompt: contains the special token ", special, " (it would be encoded as that "
            "token, not as text: an end of sequence or padding in the middle of the question)");
  PSA_CHECK(!is_blank(clean_question(q)), "--prompt: empty question (only white space or <image> tags); ask "
            "something, e.g. --prompt 'What is in the image?'");
  return q;
}

// What a heat map's PNG says in its Software chunk: an existing file is replaced only if it says so.
constexpr const char* kExplainSoftware = "psa infer --explain";

// The heat map is written atomically as PNG: refused when it would replace the input image or any existing file
// but an earlier heat map, when its name says another format, or when check_output_file refuses it (in a
// checkpoint folder, an unwritable folder), all before the model is loaded.
static std::string explain_path(const cli::Args& a) {
  const std::string path = a.get_path("--explain", "");
  PSA_CHECK(cli::lower_extension(path) == ".png", "--explain ", path, ": the heat map is a PNG file, name it .png");
  for (const std::string& part : split_image_field(a.get("--image")))
    PSA_CHECK(!cli::same_path(path, part), "--explain ", path, ": the same file as the input image ", part,
              " (it would be overwritten; choose another path)");
  // An existing file may be a dataset's image (with or without its dataset.json), a run's plot or anyone's
  // picture: only a heat map written here is replaced.
  std::error_code ec;
  PSA_CHECK(!std::filesystem::is_regular_file(path, ec) || png_written_by(path, kExplainSoftware), "--explain ", path,
            ": exists and is not a heat map psa wrote (it would be replaced; choose another path or remove it)");
  cli::check_output_file("--explain", path);
  return path;
}

static json::Value probs_json(const std::vector<double>& p, const char* (*name)(int)) {
  json::Value v = json::Value::object();
  for (size_t i = 0; i < p.size(); ++i) v.set(name(static_cast<int>(i)), p[i]);
  return v;
}

static json::Value result_json(const Checkpoint& c, const cli::Args& a, const InferResult& r) {
  json::Value v = json::Value::object();
  v.set("checkpoint", c.dir);
  v.set("stage", c.stage);
  v.set("image", a.get("--image"));
  v.set("question", a.get("--prompt"));
  v.set("control", !a.has("--no-control") && has_safety_tokens(c));
  v.set("level", r.level);
  v.set("level_name", level_name(r.level));
  v.set("type", r.type);
  v.set("type_name", type_name(r.type));
  v.set("level_probs", probs_json(r.level_probs, level_name));
  v.set("type_probs", probs_json(r.type_probs, type_name));
  v.set("action", r.action);
  v.set("hint", r.hint);
  v.set("prompt", r.prompt);
  v.set("answer", r.answer);
  json::Value ids = json::Value::array();
  for (int64_t id : r.answer_ids) ids.push(id);
  v.set("answer_ids", std::move(ids));
  if (a.has("--explain")) v.set("explain", a.get("--explain"));
  return v;
}

static void print_probs(const char* what, const std::vector<double>& p, const char* (*name)(int)) {
  std::printf("  %s:", what);
  for (size_t i = 0; i < p.size(); ++i) std::printf(" %s %.3f", name(static_cast<int>(i)), p[i]);
  std::printf("\n");
}

static void print_text(const Checkpoint& c, const InferResult& r, bool control) {
  std::printf("checkpoint: %s (stage %s)\n", c.dir.c_str(), c.stage.c_str());
  std::printf("concept:    level %d %s (p=%.3f), type %d %s (p=%.3f)%s\n", r.level, level_name(r.level),
              r.level_probs[r.level], r.type, type_name(r.type), r.type_probs[r.type],
              has_safety_tokens(c) ? "" : "  [base: untrained head, shown for reference]");
  print_probs("level", r.level_probs, level_name);
  print_probs("type ", r.type_probs, type_name);
  if (!control) std::printf("action:     none (control off)\n");
  else if (r.action == "hint") std::printf("action:     hint: %s\n", r.hint.c_str());
  else if (r.action == "refuse") std::printf("action:     refuse (nothing generated)\n");
  else std::printf("action:     none\n");
  std::printf("answer:     %s\n", r.answer.c_str());
}

int cmd_infer(int argc, char** argv) {
  cli::Args a;
  const cli::Spec spec{kInferUsage,
                       {"--ckpt", "--image", "--prompt", "--policy", "--temperature", "--top-k", "--top-p", "--seed",
                        "--max-new-tokens", "--explain"},
                       {"--no-control", "--json"}};
  if (!cli::parse(argc, argv, spec, &a)) return 0;
  PSA_CHECK(a.positional.empty(), "infer: unexpected argument '", a.positional[0], "' (see --help)");
  for (const char* f : {"--ckpt", "--image", "--prompt"}) PSA_CHECK(a.has(f), "infer: ", f, " is required (see --help)");
  // Everything that can be checked without the model first: a mistake costs no checkpoint load.
  nn::SamplingOptions so = sampling_from(a);
  const std::string question = question_from(a);
  const std::string image = a.get_path("--image", "");
  const std::string explain = a.has("--explain") ? explain_path(a) : "";
  const Policy policy = resolve_policy(a.get_path("--policy", "short"));
  const bool control = !a.has("--no-control");

  const Checkpoint c = load_checkpoint(a.get_path("--ckpt", ""));
  // After the checkpoint: with both bad, the checkpoint is the error reported (tests/test_hostile.cpp).
  const Image original = load_record_pixels(image, "");
  c.model->merge_lora();  // inference only: one matmul per layer instead of three
  so.stop_ids = {c.tokenizer->eos_id()};
  if (control) check_policy_fits(c, policy);
  const std::string too_long = prompt_too_long(c, question, "", "--prompt");
  PSA_CHECK(too_long.empty(), too_long);
  const int size = static_cast<int>(c.model->config.vision.image_size);
  const std::vector<float> pixels = preprocess_named(original, size, image);
  const InferResult r = infer(c, pixels, question, policy, so, control);
  if (!explain.empty()) json::write_file(explain, encode_png(explain_heatmap(c, pixels, original, question), kExplainSoftware));
  if (a.has("--json")) std::printf("%s\n", json::dump(result_json(c, a, r)).c_str());
  else print_text(c, r, control && has_safety_tokens(c));
  if (!explain.empty() && !a.has("--json")) std::printf("explain:    wrote %s\n", explain.c_str());
  return 0;
}

}  // namespace psa
