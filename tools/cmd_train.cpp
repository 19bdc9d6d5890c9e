// psa train: base VLM -> Stage I -> Stage II on a dataset folder, one checkpoint per stage.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "psa/eval.h"
#include "psa/plot.h"
#include "psa/synth.h"
#include "psa/train.h"
#include "psa/vision_pretrain.h"
#include "tensor/device.h"
#include "tools/cli.h"

namespace psa {
namespace fs = std::filesystem;
int cmd_eval(int argc, char** argv);

static const char* kTrainUsage = R"(usage: psa train [options]

Trains PSA-VLM in the paper's stages on a dataset folder (generated with `psa data` when missing):
  base    LLaVA-style training of ViT + projector + LLM on DIR/base_train.jsonl (the vulnerable base VLM)
  1       Stage I: safety tokens, C-Abstractor safety projector, cross-attention head and the two classifiers
          on DIR/train.jsonl (all risky records + clean ones in the reference 3000:11200 ratio, hard
          negatives first);
          L = L_LLM + lambda (L_level + L_type), lambda = 10; everything else frozen
  2       Stage II: LoRA on every LLM linear (or --full-ft), safety modules frozen, all of DIR/train.jsonl
Before base, the ViT learns the generator's scene vocabulary (motifs, shapes, colours, places) from the
records' "meta" (the stand-in for CLIP pretraining; --steps-vision 0 skips it, records without meta are ignored).
Each stage writes OUT/<stage>/ (model.safetensors, config.json, tokenizer.json), a JSONL log
OUT/<stage>/log.jsonl, and an audit against the previous stage; OUT/loss_curves.png plots every loss.
With --eval (default for --stage all) the benchmark runs on DIR/test.jsonl into OUT/report.json and
OUT/report.md, with every record's prediction and answers in OUT/predictions/<stage>.jsonl.

options:
  --preset tiny|small      model and data preset (default tiny)
  --data DIR               dataset folder (default data/<preset>)
  --out DIR                run folder (default runs/<preset>)
  --stage all|base|1|2     which stages (default all); later stages start from OUT/<previous stage>
  --seed N                 initialisation, shuffling and LoRA-dropout seed (default 42)
  --batch N                batch size (default 16)
  --steps-vision N         vision pretraining steps before base (default 5000 tiny, 1200 small)
  --batch-vision N         scenes per vision pretraining step (default 32 tiny, 64 small)
  --steps-base N --steps-1 N --steps-2 N     optimiser steps per stage
  --lr-base X --lr-1 X --lr-2 X              peak learning rates (AdamW, warmup then linear decay)
  --warmup N               warmup steps (default 5% of the stage's steps)
  --vision-lr-scale X      base stage: the ViT's learning rate as a fraction of --lr-base (default 0.1), so
                           that the LLM loss tunes the pretrained ViT rather than overwriting what it learnt
  --lora-rank N --lora-alpha X --lora-dropout X   Stage II adapters (defaults 16, 16, 0.05)
  --lora-lm-head           also adapt lm_head (the reference code does, by accident)
  --full-ft                Stage II fine-tunes the whole LLM instead of LoRA
  --eval / --no-eval       run the benchmark at the end
  --eval-limit N           evaluate on the first N test records only (0 = all)
  --save-every N           write the training state OUT/<stage>/train_state.safetensors every N steps
                           (default 100; it is also written at the end of each stage)
  --resume                 continue a killed run in OUT: each stage restarts from its training state (weights,
                           optimizer, data position, losses) and ends bit-identical to an uninterrupted run;
                           a stage without one starts from scratch; use the same options as the killed run
  --max-bad-steps K        a non-finite loss or gradient skips the step; K in a row stop the run (default 5)
  --device cpu|cuda        where the stages train (default cpu): model, batches and AdamW on that device
                           (the vision pretraining before base stays on the CPU)
  --quiet                  no progress bars)";

namespace {

struct Plan {
  std::string preset, data, out;
  uint64_t seed;
  int64_t batch;
};

Dataset load_split(const std::string& file, const Tokenizer& tok, const PsaConfig& cfg) {
  LoadReport rep;
  std::vector<Record> recs = load_records(file, &rep);
  Dataset d = build_dataset(recs, tok, cfg.vision.image_size, cfg.max_text_tokens, &rep);
  for (size_t i = 0; i < rep.messages.size() && i < 10; ++i) std::fprintf(stderr, "skipped: %s\n", rep.messages[i].c_str());
  std::printf("%s: %ld records loaded, %ld skipped\n", file.c_str(), (long)d.size(), (long)rep.skipped);
  return d;
}

Tokenizer tokenizer_for(const Plan& p, int64_t vocab) {
  fs::path path = fs::path(p.out) / "tokenizer.json";
  if (fs::exists(path)) return Tokenizer::load(path.string());
  std::vector<Record> recs;
  for (const char* f : {"base_train.jsonl", "train.jsonl"}) {
    std::vector<Record> r = load_records((fs::path(p.data) / f).string(), nullptr, false);
    recs.insert(recs.end(), r.begin(), r.end());
  }
  Tokenizer tok = Tokenizer::train(corpus_of(recs), vocab);
  fs::create_directories(p.out);
  tok.save(path.string());
  return tok;
}

struct Defaults {
  int64_t steps;
  double lr;
};

Defaults stage_defaults(const std::string& preset, const std::string& stage) {
  bool tiny = preset == "tiny";
  // Tiny defaults fit `make train` in about a quarter of an hour on 2 cores (README has the measured time).
  if (stage == "base") return {tiny ? 1000 : 3000, tiny ? 2e-3 : 6e-4};
  if (stage == "stage1") return {tiny ? 800 : 1200, tiny ? 3e-3 : 1e-3};
  return {tiny ? 500 : 800, tiny ? 2e-3 : 1e-3};
}

void record_stage(json::Value& report, const std::string& stage, const StageResult& r, const json::Value& audit) {
  json::Value s = report.find(stage) ? report.at(stage) : json::Value::object();
  s.set("train_seconds", r.seconds);
  s.set("tokens_per_second", r.tokens_per_second);
  s.set("steps", r.steps);
  s.set("first_loss", r.loss.empty() ? 0.0 : r.loss.front());
  s.set("last_loss", r.loss.empty() ? 0.0 : r.loss.back());
  if (!audit.is_null()) s.set("audit", audit);
  report.set(stage, s);
}

// The CLIP stand-in (psa/vision_pretrain.h) on scenes of the dataset's own generator config, scored on the
// validation split. Data that the generator did not make (no dataset.json) has no scene stream: skipped.
void pretrain_vision_tower(PsaVlm& model, const Plan& p, const cli::Args& a, const Tokenizer& tok, const PsaConfig& cfg,
                           json::Value& report, std::vector<Series>& curves) {
  VisionPretrainOptions o;
  // More, smaller steps: on 2048 unseen scenes 4000 x 32 told flags from plain stripes in 74% of cases
  // against 60% for 2000 x 64, in the same time (4000 x 64 reached 89%, at twice the time).
  o.steps = a.get_int("--steps-vision", p.preset == "tiny" ? 5000 : 1200);
  o.batch = a.get_int("--batch-vision", p.preset == "tiny" ? 32 : 64);
  PSA_CHECK(o.batch > 0, "--batch-vision: expected > 0, got ", o.batch);
  const fs::path info = fs::path(p.data) / "dataset.json";
  if (o.steps <= 0) return;
  if (!fs::exists(info)) {
    std::printf("[vision] %s has no dataset.json (not generated): no scene stream, vision pretraining skipped\n", p.data.c_str());
    return;
  }
  SynthConfig sc = synth_preset(p.preset);
  const json::Value gen = json::parse_file(info.string()).at("config");
  sc.seed = gen.at("seed").as_int();
  sc.image_size = gen.at("image_size").as_int();
  o.seed = p.seed;
  o.progress = !a.has("--quiet");
  o.log_path = (fs::path(p.out) / "base" / "vision_log.jsonl").string();
  fs::path val = fs::path(p.data) / "val.jsonl";
  Dataset heldout;
  if (fs::exists(val)) heldout = load_split(val.string(), tok, cfg);
  VisionPretrainResult r = pretrain_vision(model, synthetic_scenes(sc, cfg.vision.image_size), heldout.size() ? &heldout : nullptr, o);
  std::printf("[vision] %ld steps in %.1f s on %ld generated scenes; held-out accuracy %s; on unseen scenes %s\n",
              (long)r.steps, r.seconds, (long)r.examples, json::dump(r.heldout).c_str(), json::dump(r.stream_heldout).c_str());
  json::Value j = json::Value::object();
  j.set("steps", r.steps);
  j.set("train_seconds", r.seconds);
  j.set("heldout_accuracy", r.heldout);
  j.set("unseen_scene_accuracy", r.stream_heldout);
  report.set("vision_pretrain", j);
  curves.push_back({"vision pretraining loss", {}, r.loss});
}

}  // namespace

int cmd_train(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv,
                  {kTrainUsage,
                   {"--preset", "--data", "--out", "--stage", "--seed", "--batch", "--steps-vision", "--batch-vision", "--steps-base", "--steps-1", "--steps-2",
                    "--lr-base", "--lr-1", "--lr-2", "--warmup", "--vision-lr-scale", "--lora-rank", "--lora-alpha", "--lora-dropout", "--eval-limit",
                    "--save-every", "--max-bad-steps", "--device"},
                   {"--lora-lm-head", "--full-ft", "--eval", "--no-eval", "--quiet", "--resume"}},
                  &a))
    return 0;
  PSA_CHECK(a.positional.empty(), "train: unexpected argument '", a.positional[0], "' (see --help)");
  Plan p;
  p.preset = a.get("--preset", "tiny");
  PsaConfig cfg = PsaConfig::from_preset(p.preset);
  p.data = a.get("--data", "data/" + p.preset);
  p.out = a.get("--out", "runs/" + p.preset);
  p.seed = a.get_int("--seed", 42);
  p.batch = a.get_int("--batch", 16);
  std::string which = a.get("--stage", "all");
  std::string dev = a.get("--device", "cpu");
  PSA_CHECK(dev == "cpu" || dev == "cuda", "--device: expected cpu or cuda, got '", dev, "'");
  Device device = dev == "cuda" ? Device::cuda : Device::cpu;
  PSA_CHECK(device == Device::cpu || gpu::available(), "train --device cuda: no usable GPU (", gpu::describe(), ")");
  PSA_CHECK(which == "all" || which == "base" || which == "1" || which == "2", "--stage: expected all, base, 1 or 2, got '", which, "'");
  if (!fs::exists(fs::path(p.data) / "train.jsonl")) {
    // Only a missing or empty folder is filled with the synthetic data: never write into someone's data folder.
    PSA_CHECK(!fs::exists(p.data) || fs::is_empty(p.data), p.data, ": no train.jsonl (generate one with `psa data --out ",
              p.data, "`)");
    std::printf("generating the %s dataset into %s\n", p.preset.c_str(), p.data.c_str());
    generate_dataset(synth_preset(p.preset), p.data);
  }
  Tokenizer tok = tokenizer_for(p, cfg.text.vocab);
  cfg.image_token = tok.image_id();
  cfg.pad_id = tok.pad_id();
  cfg.text.bos_id = tok.bos_id();
  cfg.text.eos_id = tok.eos_id();
  LoraSettings lora;
  if (!a.has("--full-ft")) {
    lora.rank = a.get_int("--lora-rank", 16);
    lora.alpha = a.get_double("--lora-alpha", 16);
    lora.dropout = a.get_double("--lora-dropout", 0.05);
    lora.include_lm_head = a.has("--lora-lm-head");
  }
  json::Value report = json::Value::object();
  fs::path report_path = fs::path(p.out) / "report.json";
  if (fs::exists(report_path)) report = json::parse_file(report_path.string());
  report.set("config", cfg.to_json());
  std::vector<Series> curves;
  std::shared_ptr<PsaVlm> model;
  std::string prev;
  const std::vector<std::pair<std::string, std::string>> stages = {{"base", "base"}, {"1", "stage1"}, {"2", "stage2"}};
  for (const auto& [flag, stage] : stages) {
    fs::path dir = fs::path(p.out) / stage;
    if (which != "all" && which != flag) {
      prev = stage;
      continue;
    }
    if (!model) {
      if (stage == "base") {
        model = std::make_shared<PsaVlm>(cfg);
        model->initialize(p.seed);
      } else {
        fs::path from = fs::path(p.out) / prev;
        Checkpoint c = load_checkpoint(from.string());
        model = c.model;
      }
    }
    Defaults d = stage_defaults(p.preset, stage);
    StageOptions o;
    o.stage = stage;
    o.steps = a.get_int(stage == "base" ? "--steps-base" : stage == "stage1" ? "--steps-1" : "--steps-2", d.steps);
    o.lr = a.get_double(stage == "base" ? "--lr-base" : stage == "stage1" ? "--lr-1" : "--lr-2", d.lr);
    o.warmup = a.get_int("--warmup", std::max<int64_t>(1, o.steps / 20));
    o.vision_lr_scale = a.get_double("--vision-lr-scale", 0.1);
    PSA_CHECK(o.vision_lr_scale >= 0, "--vision-lr-scale: expected >= 0, got ", o.vision_lr_scale);
    o.batch = p.batch;
    o.seed = p.seed;
    o.lora = lora;
    o.progress = !a.has("--quiet");
    o.max_bad_steps = a.get_int("--max-bad-steps", 5);
    PSA_CHECK(o.max_bad_steps >= 1, "--max-bad-steps: expected at least 1, got ", o.max_bad_steps);
    o.device = device;
    fs::create_directories(dir);
    o.log_path = (dir / "log.jsonl").string();
    o.state_path = (dir / "train_state.safetensors").string();
    o.state_every = a.get_int("--save-every", 100);
    PSA_CHECK(o.state_every >= 0, "--save-every: expected N >= 0, got ", o.state_every);
    if (a.has("--resume") && fs::exists(o.state_path)) {
      o.resume_from = o.state_path;
      std::printf("[%s] resuming from %s\n", stage.c_str(), o.state_path.c_str());
    }
    Dataset data = load_split((fs::path(p.data) / (stage == "base" ? "base_train.jsonl" : "train.jsonl")).string(), tok, cfg);
    // A resumed base stage takes every weight from its state: pretraining again would only be overwritten.
    if (stage == "base" && o.resume_from.empty()) pretrain_vision_tower(*model, p, a, tok, cfg, report, curves);
    StageResult r = train_stage(*model, data, o);
    std::printf("[%s] %ld steps (%ld skipped) in %.1f s (%.0f tokens/s), loss %.4f -> %.4f\n", stage.c_str(),
                (long)r.steps, (long)r.skipped, r.seconds, r.tokens_per_second, r.loss.empty() ? NAN : r.loss.front(),
                r.loss.empty() ? NAN : r.loss.back());
    save_checkpoint(dir.string(), *model, tok, stage, stage == "stage2" ? lora : LoraSettings{});
    json::Value audit;
    if (!prev.empty() && fs::exists(fs::path(p.out) / prev / "model.safetensors")) {
      audit = audit_checkpoints((fs::path(p.out) / prev).string(), dir.string());
      std::printf("[%s] audit against %s:\n", stage.c_str(), prev.c_str());
      for (const json::Value& g : audit.at("groups").as_array())
        std::printf("  %-24s %3ld tensors: %3ld changed, %3ld unchanged, %3ld added\n", g.at("group").as_string().c_str(),
                    (long)g.at("tensors").as_int(), (long)g.at("changed").as_int(), (long)g.at("unchanged").as_int(),
                    (long)g.at("added").as_int());
    }
    record_stage(report, stage, r, audit);
    curves.push_back({stage + " loss", {}, r.loss});
    if (!r.loss_level.empty()) curves.push_back({stage + " level CE", {}, r.loss_level});
    if (!r.loss_type.empty()) curves.push_back({stage + " type CE", {}, r.loss_type});
    json::write_file(report_path.string(), json::dump(report, 2) + "\n");
    prev = stage;
  }
  if (!curves.empty()) {
    PlotOptions po{"PSA-VLM training losses (" + p.preset + ")", "step", "loss", true, 900, 500, 10};
    plot_lines((fs::path(p.out) / "loss_curves.png").string(), curves, po);
  }
  bool eval = a.has("--eval") || (which == "all" && !a.has("--no-eval"));
  if (eval) {
    std::vector<std::string> ckpts;
    for (const auto& [flag, stage] : stages)
      if (fs::exists(fs::path(p.out) / stage / "model.safetensors")) ckpts.push_back((fs::path(p.out) / stage).string());
    std::vector<std::string> args = {"--data", p.data, "--out", report_path.string(), "--md",
                                     (fs::path(p.out) / "report.md").string(), "--limit", a.get("--eval-limit", "0"),
                                     "--predictions", (fs::path(p.out) / "predictions").string()};
    if (a.has("--quiet")) args.push_back("--quiet");
    for (const std::string& c : ckpts) {
      args.push_back("--ckpt");
      args.push_back(c);
    }
    std::vector<char*> argv2;
    for (std::string& s : args) argv2.push_back(s.data());
    return cmd_eval((int)argv2.size(), argv2.data());
  }
  return 0;
}

}  // namespace psa
