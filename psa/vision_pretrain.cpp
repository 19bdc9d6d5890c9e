#include "psa/vision_pretrain.h"

#include "psa/image.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>

namespace psa {
namespace {

constexpr int64_t kCells = 9;  // the generator's 3x3 grid, row-major: top left ... bottom right
constexpr int64_t kMaxCount = 3;
const std::vector<std::string> kCellNames = {"top left", "top",         "top right", "left",        "center",
                                             "right",    "bottom left", "bottom",    "bottom right"};

bool labelled(const Example& e) { return e.record.meta.is_object() && e.record.meta.contains("objects"); }

// Class lists of the targets; index 0 of shapes and colours means "empty cell".
struct SceneVocab {
  std::vector<std::string> motifs, shapes{"(empty)"}, colours{"(empty)"};
  explicit SceneVocab(const SceneWords& w) : motifs(w.motifs) {
    shapes.insert(shapes.end(), w.shapes.begin(), w.shapes.end());
    colours.insert(colours.end(), w.colours.begin(), w.colours.end());
  }
};

int64_t index_of(const std::vector<std::string>& v, const std::string& s) {
  auto it = std::find(v.begin(), v.end(), s);
  return it == v.end() ? -100 : it - v.begin();
}

// Targets of one example, -100 where a target does not apply (cross_entropy skips it), in the order
// [motif, prominence, object count, shape of cell 0..8, colour of cell 0..8, motif under patch 0..P-1].
// The per-patch motif targets are the dense signal: every patch the motif covers says which motif it is part
// of, which teaches the patch tokens what they show far faster than one label per image.
struct TargetLayout {
  int64_t patches, grid, patch;
  int64_t size() const { return 3 + 2 * kCells + patches; }
  static constexpr int64_t shapes = 3, colours = 3 + kCells, motif_patches = 3 + 2 * kCells;
};

std::vector<int64_t> scene_targets(const Example& e, const SceneVocab& v, const TargetLayout& lay) {
  const json::Value& meta = e.record.meta;
  const std::vector<json::Value>& objs = meta.array_at("objects");
  std::vector<int64_t> t(lay.size(), 0);
  const std::string motif = meta.string_or("motif", "none");
  t[0] = index_of(v.motifs, motif);
  t[1] = meta.int_or("prominence", -100);
  t[2] = std::min<int64_t>(objs.size(), kMaxCount);
  for (const json::Value& o : objs) {
    int64_t cell = index_of(kCellNames, o.string_at("position"));
    if (cell < 0) continue;
    t[lay.shapes + cell] = index_of(v.shapes, o.string_at("shape"));
    t[lay.colours + cell] = index_of(v.colours, o.string_at("color"));
  }
  const int64_t none = index_of(v.motifs, "none");
  const json::Value* box = meta.find("motif_box");
  const bool has_box = box && box->size() == 4;
  const double bx = has_box ? box->at(0).as_number() : 0, by = has_box ? box->at(1).as_number() : 0;
  const double bw = has_box ? box->at(2).as_number() : 0, bh = has_box ? box->at(3).as_number() : 0;
  // The box is upright, drawn turned by motif_degrees about its centre: a patch centre is turned back.
  const double a = meta.number_or("motif_degrees", 0) * 3.14159265358979323846 / 180, sa = std::sin(a), ca = std::cos(a);
  const double mx = bx + bw / 2, my = by + bh / 2;
  for (int64_t p = 0; p < lay.patches; ++p) {
    const double cx = (p % lay.grid + 0.5) * lay.patch - mx, cy = (p / lay.grid + 0.5) * lay.patch - my;
    const double ux = mx + ca * cx + sa * cy, uy = my - sa * cx + ca * cy;
    const bool inside = has_box && ux >= bx && ux < bx + bw && uy >= by && uy < by + bh;
    t[lay.motif_patches + p] = inside ? t[0] : none;
  }
  return t;
}

// Temporary classifiers, discarded after pretraining. Scene targets read the mean of the patch features;
// cell targets read the mean of the patches whose centre lies in the cell, so that what the ViT learns about
// a place stays at that place (the projector and the C-Abstractor read patches, not a pooled vector).
class SceneHeads : public nn::Module {
 public:
  SceneHeads(int64_t width, const SceneVocab& v) {
    norm = register_module("norm", std::make_shared<nn::LayerNorm>(width));
    motif = register_module("motif", std::make_shared<nn::Linear>(width, (int64_t)v.motifs.size()));
    patch_motif = register_module("patch_motif", std::make_shared<nn::Linear>(width, (int64_t)v.motifs.size()));
    prominence = register_module("prominence", std::make_shared<nn::Linear>(width, 3));
    count = register_module("count", std::make_shared<nn::Linear>(width, kMaxCount + 1));
    shape = register_module("shape", std::make_shared<nn::Linear>(width, (int64_t)v.shapes.size()));
    colour = register_module("colour", std::make_shared<nn::Linear>(width, (int64_t)v.colours.size()));
  }
  std::shared_ptr<nn::LayerNorm> norm;
  std::shared_ptr<nn::Linear> motif, patch_motif, prominence, count, shape, colour;
};

// [P, 9] averaging weights of the patch grid over the 3x3 cells (patch centres decide the cell).
Tensor cell_pooling(int64_t grid) {
  std::vector<float> w(grid * grid * kCells, 0.f);
  std::vector<int64_t> per_cell(kCells, 0);
  auto cell_of = [&](int64_t p) { return ((p / grid) * 2 + 1) * 3 / (2 * grid) * 3 + ((p % grid) * 2 + 1) * 3 / (2 * grid); };
  for (int64_t p = 0; p < grid * grid; ++p) ++per_cell[cell_of(p)];
  for (int64_t p = 0; p < grid * grid; ++p) w[p * kCells + cell_of(p)] = 1.f / per_cell[cell_of(p)];
  return Tensor::from(w, {grid * grid, kCells});
}

struct SceneBatch {
  Tensor pixels, targets;  // [B, 3, S, S], [B, TargetLayout::size()]
};

SceneBatch scene_batch(const std::vector<const Example*>& rows, int64_t image_size, const SceneVocab& v,
                       const TargetLayout& lay) {
  const int64_t B = rows.size(), n = 3 * image_size * image_size, k = lay.size();
  std::vector<float> px(B * n);
  std::vector<int64_t> t(B * k);
  for (int64_t r = 0; r < B; ++r) {
    std::copy(rows[r]->pixels.begin(), rows[r]->pixels.end(), px.begin() + r * n);
    std::vector<int64_t> tr = scene_targets(*rows[r], v, lay);
    std::copy(tr.begin(), tr.end(), t.begin() + r * k);
  }
  return {Tensor::from(px, {B, 3, image_size, image_size}), Tensor::from(t, {B, k}, DType::i64)};
}

struct SceneLogits {
  Tensor motif, prominence, count, shape, colour, patch_motif;  // [B, *], [B, 9, *], [B, P, *]
};

SceneLogits scene_logits(const PsaVlm& m, const SceneHeads& h, const Tensor& pixels, const Tensor& pool) {
  Tensor f = h.norm->forward(m.vision->features(pixels, m.config.feature_layer));  // [B, P, C]
  Tensor pooled = mean(f, 1);                                                     // [B, C]
  Tensor cells = permute(matmul(f, pool, true), {0, 2, 1});                       // [B, 9, C]
  return {h.motif->forward(pooled), h.prominence->forward(pooled), h.count->forward(pooled), h.shape->forward(cells),
          h.colour->forward(cells),    h.patch_motif->forward(f)};
}

Tensor column(const Tensor& targets, int64_t from, int64_t n) { return reshape(slice(targets, 1, from, from + n), {-1}); }

Tensor scene_loss(const SceneLogits& l, const Tensor& t, const TargetLayout& lay) {
  auto flat = [](const Tensor& x) { return reshape(x, {-1, x.size(-1)}); };
  Tensor loss = cross_entropy(l.motif, column(t, 0, 1));
  loss = add(loss, cross_entropy(l.prominence, column(t, 1, 1)));
  loss = add(loss, cross_entropy(l.count, column(t, 2, 1)));
  loss = add(loss, cross_entropy(flat(l.shape), column(t, lay.shapes, kCells)));
  loss = add(loss, cross_entropy(flat(l.colour), column(t, lay.colours, kCells)));
  return add(loss, cross_entropy(flat(l.patch_motif), column(t, lay.motif_patches, lay.patches)));
}

// Share of applicable targets predicted right, per target family.
json::Value score(const PsaVlm& m, const SceneHeads& h, const Dataset& d, const SceneVocab& v, const TargetLayout& lay,
                  const Tensor& pool) {
  NoGrad ng;
  std::vector<const Example*> rows;
  for (const Example& e : d.examples)
    if (labelled(e)) rows.push_back(&e);
  const char* names[] = {"motif", "prominence", "count", "cell_shape", "cell_colour", "patch_motif"};
  const int64_t first[] = {0, 1, 2, lay.shapes, lay.colours, lay.motif_patches};
  const int64_t width[] = {1, 1, 1, kCells, kCells, lay.patches};
  int64_t right[6] = {}, total[6] = {};
  std::vector<int64_t> motif_right(v.motifs.size()), motif_total(v.motifs.size());
  for (size_t at = 0; at < rows.size(); at += 128) {
    std::vector<const Example*> chunk(rows.begin() + at, rows.begin() + std::min(rows.size(), at + 128));
    SceneBatch b = scene_batch(chunk, d.image_size, v, lay);
    SceneLogits l = scene_logits(m, h, b.pixels, pool);
    const std::vector<int64_t> t = b.targets.vec<int64_t>();
    const Tensor logits[] = {l.motif, l.prominence, l.count, l.shape, l.colour, l.patch_motif};
    for (int fam = 0; fam < 6; ++fam) {
      const std::vector<int64_t> pred = argmax(logits[fam], -1).vec<int64_t>();  // [B * width]
      for (size_t r = 0; r < chunk.size(); ++r)
        for (int64_t k = 0; k < width[fam]; ++k) {
          const int64_t want = t[r * lay.size() + first[fam] + k];
          if (want == -100) continue;
          ++total[fam];
          right[fam] += pred[r * width[fam] + k] == want;
          if (fam == 0) ++motif_total[want], motif_right[want] += pred[r] == want;
        }
    }
  }
  json::Value out = json::Value::object();
  auto share = [](int64_t a, int64_t b) { return b ? std::round(1000.0 * a / b) / 1000 : 0.0; };
  for (int i = 0; i < 6; ++i) out.set(names[i], share(right[i], total[i]));
  // Per motif: the look-alikes (stripes vs flag, blank card vs ID card) are where the safety head's
  // clean-vs-risky errors start.
  json::Value recall = json::Value::object();
  for (size_t c = 0; c < v.motifs.size(); ++c)
    if (motif_total[c]) recall.set(v.motifs[c], share(motif_right[c], motif_total[c]));
  out.set("motif_recall", std::move(recall));
  return out;
}

}  // namespace

SceneSource synthetic_scenes(const SynthConfig& cfg, int64_t image_size) {
  SceneSource src;
  src.words = scene_words(cfg);  // checks the config, before any parallel region
  src.draw = [cfg, image_size](int64_t first, int64_t n) {
    std::vector<Example> out(n);
    FirstError err;
    // Scenes are pure functions of their index, so drawing them in parallel keeps runs identical.
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; ++i)
      err.run([&] {
        SceneSample s = vision_scene(cfg, first + i);
        out[i].pixels = preprocess(s.image, image_size);
        out[i].record.meta = std::move(s.meta);
      });
    err.rethrow();
    return out;
  };
  return src;
}

VisionPretrainResult pretrain_vision(PsaVlm& m, const SceneSource& source, const Dataset* heldout,
                                     const VisionPretrainOptions& o) {
  VisionPretrainResult r;
  const SceneVocab vocab(source.words);
  const int64_t grid = m.config.vision.image_size / m.config.vision.patch;
  const TargetLayout lay{grid * grid, grid, m.config.vision.patch};

  SceneHeads heads(m.config.vision.hidden, vocab);
  heads.initialize(o.seed ^ 0x5CE7Eull);
  m.freeze();
  m.unfreeze(kVisionPrefix);
  m.train();
  std::vector<nn::ParamRef> params = nn::trainable(m), head_params = nn::trainable(heads);
  params.insert(params.end(), head_params.begin(), head_params.end());
  nn::AdamW opt(params, o.lr, {0.9, 0.999, 1e-8, 0.0});
  nn::Schedule sched{nn::Schedule::linear, o.lr, o.warmup, o.steps};
  const Tensor pool = cell_pooling(grid);

  std::ofstream log;
  if (!o.log_path.empty()) log.open(o.log_path, std::ios::trunc);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < o.steps; ++step) {
    const std::vector<Example> drawn = source.draw(step * o.batch, o.batch);
    std::vector<const Example*> rows;
    for (const Example& e : drawn) rows.push_back(&e);
    SceneBatch b = scene_batch(rows, m.config.vision.image_size, vocab, lay);
    opt.set_lr(nn::lr_at(sched, step));
    opt.zero_grad();
    Tensor loss = scene_loss(scene_logits(m, heads, b.pixels, pool), b.targets, lay);
    loss.backward();
    const double value = loss.item();
    const double norm = nn::clip_grad_norm(params, o.clip);  // non-finite when a gradient is
    PSA_CHECK(std::isfinite(value) && std::isfinite(norm), "vision pretraining: non-finite loss at step ", step + 1);
    opt.update();
    r.loss.push_back(value);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (log.is_open()) {
      json::Value j = json::Value::object();
      j.set("stage", "vision");
      j.set("step", step + 1);
      j.set("loss", value);
      j.set("lr", opt.lr());
      j.set("seconds", secs);
      log << json::dump(j) << "\n";
      log.flush();
    }
    if (o.progress && ((step + 1) % std::max<int64_t>(1, o.steps / 10) == 0 || step + 1 == o.steps))
      std::fprintf(stderr, "[vision] %5ld/%ld  loss %.4f  %.1f s\n", (long)step + 1, (long)o.steps, value, secs);
  }
  r.steps = o.steps;
  r.examples = o.steps * o.batch;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m.eval();
  if (heldout) r.heldout = score(m, heads, *heldout, vocab, lay, pool);
  // Scenes far past any index training drew: the stream's own held-out set, large enough (2048) to give
  // each look-alike a per-motif recall worth reading.
  Dataset fresh;
  fresh.image_size = m.config.vision.image_size;
  fresh.examples = source.draw(int64_t(1) << 40, 2048);
  r.stream_heldout = score(m, heads, fresh, vocab, lay, pool);
  return r;
}

}  // namespace psa
