// Vision pretraining (the CLIP stand-in): scenes drawn by index, only the vision tower changes, the loss falls.
#include <gtest/gtest.h>

#include <algorithm>

#include "nn/safetensors.h"
#include "psa/synth.h"
#include "psa/vision_pretrain.h"

namespace psa {
namespace {
SynthConfig world() {
  SynthConfig sc = synth_preset("tiny");
  sc.seed = 5;
  return sc;
}

PsaConfig two_layer_config() {
  PsaConfig c = PsaConfig::from_preset("tiny");
  c.vision.layers = 2;
  c.text.layers = 1;
  return c;
}

TEST(VisionPretrain, ScenesArePureFunctionsOfTheirIndex) {
  SceneSource src = synthetic_scenes(world(), 32);
  std::vector<Example> a = src.draw(10, 4), b = src.draw(12, 2);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a[2].pixels, b[0].pixels);
  EXPECT_EQ(a[3].record.meta, b[1].record.meta);
  EXPECT_NE(a[0].pixels, a[1].pixels);
  EXPECT_EQ(a[0].pixels.size(), 3u * 32 * 32);
  for (const Example& e : a) {
    const std::string motif = e.record.meta.string_at("motif");
    EXPECT_NE(std::find(src.words.motifs.begin(), src.words.motifs.end(), motif), src.words.motifs.end()) << motif;
    EXPECT_EQ(motif != "none", e.record.meta.contains("motif_box")) << motif;
  }
}

TEST(VisionPretrain, LowersItsLossAndChangesOnlyTheVisionTower) {
  PsaVlm m(two_layer_config());
  m.initialize(3);
  std::map<std::string, std::string> before;
  for (auto& [n, t] : m.named_parameters()) before[n] = st::xxh64_hex(t.raw(), t.nbytes());
  SceneSource src = synthetic_scenes(world(), 32);
  Dataset heldout;
  heldout.examples = src.draw(1000000, 64);
  VisionPretrainOptions o;
  o.steps = 40;
  o.batch = 16;
  o.warmup = 4;
  o.progress = false;
  VisionPretrainResult r = pretrain_vision(m, src, &heldout, o);
  ASSERT_EQ(r.loss.size(), 40u);
  EXPECT_EQ(r.examples, 40 * 16);
  double first = (r.loss[0] + r.loss[1] + r.loss[2]) / 3, last = (r.loss[37] + r.loss[38] + r.loss[39]) / 3;
  EXPECT_LT(last, 0.8 * first);
  for (const char* k : {"motif", "prominence", "count", "cell_shape", "cell_colour", "patch_motif"}) {
    ASSERT_TRUE(r.heldout.contains(k)) << k;
    EXPECT_GE(r.heldout.at(k).as_number(), 0.0);
    EXPECT_LE(r.heldout.at(k).as_number(), 1.0);
  }
  // Most patches show no motif: even this short run must get those right.
  EXPECT_GT(r.heldout.at("patch_motif").as_number(), 0.5);
  // The layers after the feature layer (and the post-norm) get no gradient, so "changed" implies "vision".
  int64_t changed_vision = 0;
  for (auto& [n, t] : m.named_parameters()) {
    bool changed = before[n] != st::xxh64_hex(t.raw(), t.nbytes()), vision = n.rfind(kVisionPrefix, 0) == 0;
    EXPECT_TRUE(!changed || vision) << n;
    changed_vision += changed;
  }
  EXPECT_GE(changed_vision, 8);
}

}  // namespace
}  // namespace psa
