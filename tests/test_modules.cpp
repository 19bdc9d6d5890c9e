// Modules as wholes: finite-difference gradients of tiny instances in f64 (every parameter and the input), the
// Module bookkeeping (HF names, freeze by prefix, name-based initialisation, load errors), LoRA, and generation
// (memorisation, KV cache against full recomputation, top-k / top-p sampling).
#include <gtest/gtest.h>

#include "test_util.h"

#include <cmath>
#include <set>

#include "autograd/gradcheck.h"
#include "nn/c_abstractor.h"
#include "nn/clip.h"
#include "nn/llama.h"
#include "nn/llava.h"
#include "nn/optim.h"

namespace psa::nn {
namespace {

using psa::test::error_of;

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

using psa::test::max_abs_diff;

// Overwrites every parameter with N(0, std²): initialize() leaves norms at 1 / 0 and biases at 0, which would hide
// wrong gradients of those parameters behind trivial values.
void randomize(Module& m, uint64_t seed, double std = 0.5) {
  uint64_t k = 0;
  for (auto& [name, t] : m.named_parameters())
    Tensor(t).contiguous_copy_from(randn(t.shape(), seed * 1000 + k++, t.dtype(), std));
}

// Gradcheck of a module in f64. The module's own parameter tensors are appended to the checked inputs: the
// handles share storage with the module, so gradcheck's perturbations reach the forward pass and the analytic
// gradients land in their .grad. `f` sees only the leading `inputs`.
void expect_module_gradcheck(Module& m, std::vector<Tensor> inputs,
                             const std::function<Tensor(const std::vector<Tensor>&)>& f, uint64_t seed = 1) {
  m.to(DType::f64);
  randomize(m, seed);
  std::string legend;
  for (size_t i = 0; i < inputs.size(); ++i) legend += str_cat(i, "=input ");
  for (auto& [name, t] : m.named_parameters()) {
    legend += str_cat(inputs.size(), "=", name, " ");
    inputs.push_back(t);
  }
  for (Tensor& x : inputs) ASSERT_EQ(x.dtype(), DType::f64);
  GradcheckResult r = gradcheck(f, inputs);
  EXPECT_TRUE(r.ok) << r.report << "\n  (" << legend << ")";
}

Tensor input64(const Shape& s, uint64_t seed) { return randn(s, seed, DType::f64).requires_grad_(); }

// cos/sin [T, D] of HF Llama's rotary embedding (rotate-half: the angle table repeated over both halves).
std::pair<Tensor, Tensor> rope_tables(int64_t T, int64_t D, double theta = 10000.0) {
  std::vector<double> c(T * D), s(T * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D / 2; ++i) {
      double a = t / std::pow(theta, 2.0 * i / D);
      c[t * D + i] = c[t * D + i + D / 2] = std::cos(a);
      s[t * D + i] = s[t * D + i + D / 2] = std::sin(a);
    }
  return {Tensor::from(c, {T, D}, DType::f64), Tensor::from(s, {T, D}, DType::f64)};
}

LlamaConfig tiny_llama(int64_t layers = 2, int64_t kv_heads = 1) {
  LlamaConfig c;
  c.vocab = 16, c.hidden = 8, c.intermediate = 12, c.layers = layers, c.heads = 2, c.kv_heads = kv_heads;
  c.max_positions = 64;
  return c;
}

// ---------------------------------------------------------------- gradients of whole modules (f64)

TEST(Modules, GradcheckLinear) {
  Linear m(5, 3);
  expect_module_gradcheck(m, {input64({2, 4, 5}, 11)}, [&](const std::vector<Tensor>& in) { return m.forward(in[0]); });
  Linear no_bias(5, 3, false);
  EXPECT_FALSE(no_bias.bias.defined());
  expect_module_gradcheck(no_bias, {input64({3, 5}, 12)},
                          [&](const std::vector<Tensor>& in) { return no_bias.forward(in[0]); });
}

TEST(Modules, GradcheckLayerNormAndRMSNorm) {
  LayerNorm ln(6);
  expect_module_gradcheck(ln, {input64({3, 6}, 13)}, [&](const std::vector<Tensor>& in) { return ln.forward(in[0]); });
  RMSNorm rms(6);
  expect_module_gradcheck(rms, {input64({2, 3, 6}, 14)}, [&](const std::vector<Tensor>& in) { return rms.forward(in[0]); });
}

TEST(Modules, GradcheckClipLayer) {
  ClipConfig c;
  c.hidden = 8, c.heads = 2, c.intermediate = 16, c.act = "quick_gelu";
  ClipLayer m(c);
  expect_module_gradcheck(m, {input64({1, 5, 8}, 15)}, [&](const std::vector<Tensor>& in) { return m.forward(in[0]); });
}

TEST(Modules, GradcheckLlamaLayerWithRopeAndGroupedHeads) {
  LlamaConfig c = tiny_llama(1, 1);  // 2 query heads share 1 key/value head
  LlamaLayer m(c);
  auto [cos, sin] = rope_tables(5, c.dim_head());
  expect_module_gradcheck(m, {input64({1, 5, 8}, 16)}, [&](const std::vector<Tensor>& in) {
    return m.forward(in[0], cos, sin, nullptr, 0);
  });
}

CAbstractorConfig tiny_abstractor() {
  CAbstractorConfig c;
  c.encoder_hidden = 4, c.hidden = 6, c.output_hidden = 5, c.depth = 1, c.mlp_depth = 2;
  c.num_input_tokens = 16, c.num_queries = 4;
  return c;
}

TEST(Modules, GradcheckRegBottleneckWithAndWithoutDownsample) {
  CAbstractorConfig c = tiny_abstractor();
  RegBottleneck widen(4, 6, c);  // C_in != C_out: the residual goes through the 1×1 downsample
  ASSERT_TRUE(widen.downsample);
  expect_module_gradcheck(widen, {input64({2, 3, 3, 4}, 17)},
                          [&](const std::vector<Tensor>& in) { return widen.forward(in[0]); });
  RegBottleneck same(6, 6, c);  // identity residual
  ASSERT_FALSE(same.downsample);
  expect_module_gradcheck(same, {input64({1, 3, 3, 6}, 18)},
                          [&](const std::vector<Tensor>& in) { return same.forward(in[0]); });
}

TEST(Modules, GradcheckCAbstractorPoolingFourByFourToTwoByTwo) {
  CAbstractor m(tiny_abstractor());
  Tensor x = input64({2, 16, 4}, 19);
  expect_module_gradcheck(m, {x}, [&](const std::vector<Tensor>& in) { return m.forward(in[0]); });
  EXPECT_EQ(m.forward(x).shape(), (Shape{2, 4, 5}));
}

TEST(Modules, GradcheckMultiheadAttention) {
  MultiheadAttention m(8, 2);
  expect_module_gradcheck(m, {input64({2, 3, 8}, 20), input64({2, 5, 8}, 21)},
                          [&](const std::vector<Tensor>& in) { return m.forward(in[0], in[1]); });
}

// ---------------------------------------------------------------- Module bookkeeping

// psa-vlm.md §8.14: the reference's safety modules at LLaVA-7B widths (D_v = 1024, D = 4096, N_s = 64, a 24×24
// grid), counted from the modules themselves: any extra or missing tensor (a bias, a norm) changes the total.
TEST(Modules, SafetyModulesHaveTheReferenceParameterCounts) {
  auto count = [](const Module& m) {
    int64_t n = 0;
    for (const auto& [name, p] : m.named_parameters()) n += p.numel();
    return n;
  };
  CAbstractorConfig ac;
  ac.encoder_hidden = 1024, ac.hidden = 1024 + 64, ac.output_hidden = 4096, ac.depth = 3, ac.mlp_depth = 2;
  ac.num_input_tokens = ac.num_queries = 24 * 24;
  EXPECT_EQ(count(CAbstractor(ac)), 40115920);
  EXPECT_EQ(count(MultiheadAttention(4096, 8)) + count(Linear(4096, 4)) + count(Linear(4096, 7)), 67170315);
}

TEST(Modules, NamedParametersUseHuggingFaceNames) {
  auto names_of = [](const Module& m) {
    std::set<std::string> s;
    for (auto& [n, t] : m.named_parameters()) s.insert(n);
    return s;
  };
  LlamaForCausalLM lm(tiny_llama(2, 1));
  std::set<std::string> l = names_of(lm);
  for (const char* n : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                        "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(l.count(n)) << n;
  EXPECT_EQ(l.size(), 2 + 2 * 9 + 1u);
  EXPECT_EQ(lm.parameter("model.layers.0.self_attn.k_proj.weight").shape(), (Shape{4, 8}));  // 1 kv head of 4

  ClipConfig cc;
  cc.hidden = 8, cc.heads = 2, cc.intermediate = 16, cc.layers = 1, cc.image_size = 8, cc.patch = 4;
  std::set<std::string> c = names_of(ClipVision(cc));
  for (const char* n : {"embeddings.patch_embedding.weight", "embeddings.class_embedding",
                        "embeddings.position_embedding.weight", "pre_layrnorm.weight",
                        "encoder.layers.0.self_attn.k_proj.bias", "encoder.layers.0.mlp.fc1.weight",
                        "encoder.layers.0.layer_norm2.bias", "post_layernorm.weight"})
    EXPECT_TRUE(c.count(n)) << n;

  std::set<std::string> a = names_of(CAbstractor(tiny_abstractor()));
  for (const char* n : {"net.0.b1.se.fc1.weight", "net.0.b1.se.fc2.bias", "net.0.b1.conv1.conv.weight",
                        "net.0.b1.conv2.conv.weight", "net.0.b1.conv2.bn.weight", "net.0.b1.conv3.bn.bias",
                        "net.0.b1.downsample.conv.weight", "net.2.b1.conv1.bn.weight", "readout.0.weight",
                        "readout.2.bias"})
    EXPECT_TRUE(a.count(n)) << n;
  EXPECT_FALSE(a.count("net.2.b1.downsample.conv.weight"));  // 6 -> 6 needs none

  std::set<std::string> h = names_of(MultiheadAttention(8, 2));
  EXPECT_EQ(h, (std::set<std::string>{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}));
}

TEST(Modules, FreezeAndUnfreezeTouchExactlyTheMatchingNames) {
  LlamaForCausalLM lm(tiny_llama());
  lm.freeze();
  for (auto& [n, t] : lm.named_parameters()) EXPECT_FALSE(t.requires_grad()) << n;
  EXPECT_EQ(lm.num_parameters(true), 0);

  const std::string on = "model.layers.1.", off = "model.layers.1.mlp.";
  lm.unfreeze(on);
  lm.freeze(off);
  int64_t expect_trainable = 0, matched = 0;
  for (auto& [n, t] : lm.named_parameters()) {
    bool want = starts_with(n, on) && !starts_with(n, off);
    EXPECT_EQ(t.requires_grad(), want) << n;
    if (want) expect_trainable += t.numel(), ++matched;
  }
  EXPECT_EQ(matched, 6);  // q, k, v, o and the two norms of layer 1
  EXPECT_EQ(lm.num_parameters(true), expect_trainable);

  // Frozen parameters receive no gradient at all; the trainable ones do.
  lm.initialize(3);
  Tensor ids = Tensor::from(std::vector<int64_t>{1, 2, 3, 4}, {1, 4}, DType::i64);
  LlamaForCausalLM::causal_lm_loss(lm.logits(ids), ids).backward();
  for (auto& [n, t] : lm.named_parameters()) EXPECT_EQ(t.grad().defined(), t.requires_grad()) << n;

  lm.unfreeze();
  EXPECT_EQ(lm.num_parameters(true), lm.num_parameters());
}

TEST(Modules, LmLossOnLabelledRowsEqualsTheFullLogitsLoss) {
  LlamaForCausalLM lm(tiny_llama());
  lm.initialize(5);
  lm.freeze();
  // Row 0 has labels on its last three tokens, row 1 on one, and in the second case none at all.
  std::vector<int64_t> some = {-100, -100, 3, 4, 5, -100, -100, -100, -100, 7}, none(10, -100);
  for (const auto& lab : {some, none}) {
    Tensor labels = Tensor::from(lab, {2, 5}, DType::i64);
    auto loss_and_grads = [&](bool from_hidden) {
      Tensor h = randn({2, 5, 8}, 21, DType::f32).requires_grad_();
      Tensor w = lm.lm_head->weight;
      w.requires_grad_().zero_grad();
      Tensor loss = from_hidden ? lm.causal_lm_loss_from_hidden(h, labels)
                                : LlamaForCausalLM::causal_lm_loss(lm.head(h), labels);
      loss.backward();
      Tensor gw = w.grad();
      w.requires_grad_(false).zero_grad();
      return std::vector<Tensor>{loss, h.grad(), gw};
    };
    std::vector<Tensor> full = loss_and_grads(false), picked = loss_and_grads(true);
    const char* what[] = {"loss", "hidden gradient", "lm_head gradient"};
    for (int i = 0; i < 3; ++i) {
      std::vector<float> a = full[i].vec<float>(), b = picked[i].vec<float>();
      ASSERT_EQ(a.size(), b.size()) << what[i];
      for (size_t k = 0; k < a.size(); ++k)
        if (std::isnan(a[k])) EXPECT_TRUE(std::isnan(b[k])) << what[i] << " [" << k << "]";
        else EXPECT_NEAR(a[k], b[k], 1e-6 * (1 + std::fabs(a[k]))) << what[i] << " [" << k << "]";
    }
  }
}

// tie_word_embeddings: one matrix embeds the ids and projects the logits, so its gradient is the sum of both
// uses: the untied model's embedding gradient plus its lm_head gradient, from the same weights.
TEST(Modules, TiedEmbeddingsSumTheGradientsOfBothUses) {
  LlamaConfig c = tiny_llama();
  c.tie_embeddings = true;
  LlamaForCausalLM tied(c);
  tied.initialize(5);
  ASSERT_EQ(tied.lm_head, nullptr);
  c.tie_embeddings = false;
  LlamaForCausalLM untied(c);
  std::map<std::string, Tensor> sd = tied.state_dict();
  sd["lm_head.weight"] = sd.at("model.embed_tokens.weight").clone();
  untied.load_state_dict(sd);
  Tensor ids = Tensor::from(std::vector<int64_t>{1, 4, 4, 9, 15, 0, 2, 7, 7, 3}, {2, 5}, DType::i64);
  Tensor labels = Tensor::from(std::vector<int64_t>{-100, 4, 4, 9, 15, -100, -100, 7, 7, 3}, {2, 5}, DType::i64);
  auto loss_of = [&](const LlamaForCausalLM& m) {
    return LlamaForCausalLM::causal_lm_loss(m.forward(m.embed(ids)).logits, labels);
  };
  Tensor lt = loss_of(tied), lu = loss_of(untied);
  lt.backward();
  lu.backward();
  EXPECT_NEAR(lt.item(), lu.item(), 1e-6);
  std::vector<float> g = tied.embed_tokens->weight.grad().vec<float>();
  std::vector<float> ge = untied.embed_tokens->weight.grad().vec<float>(), gh = untied.lm_head->weight.grad().vec<float>();
  ASSERT_EQ(g.size(), ge.size());
  double worst = 0, head_norm = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    worst = std::max(worst, (double)std::fabs(g[i] - (ge[i] + gh[i])));
    head_norm += gh[i] * gh[i];
  }
  EXPECT_GT(head_norm, 1e-6) << "the lm_head use must contribute";
  EXPECT_LE(worst, 1e-6);
}

// The splice against a position-by-position reference (text row, or the next image feature of that row), its
// gradients by finite differences, and its errors: a run of image tokens must match the features exactly.
TEST(Modules, SpliceEmbeddingsPlacesFeaturesWhereTheImageTokensAre) {
  const int64_t tok = 9, B = 2, L = 5, C = 3;
  // per_token: row 0 has its image run in the middle, row 1 at the start; both consume N = 2 features.
  Tensor ids = Tensor::from(std::vector<int64_t>{1, tok, tok, 2, 3, tok, tok, 4, 5, 6}, {B, L}, DType::i64);
  Tensor text = input64({B, L, C}, 31), feats = input64({B, 2, C}, 32);
  Tensor out = splice_embeddings(text, ids, tok, feats, true);
  ASSERT_EQ(out.shape(), (Shape{B, L, C}));
  std::vector<double> o = out.vec<double>(), t = text.vec<double>(), f = feats.vec<double>();
  std::vector<int64_t> id = ids.vec<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t used = 0;
    for (int64_t p = 0; p < L; ++p) {
      bool image = id[b * L + p] == tok;
      for (int64_t c = 0; c < C; ++c)
        EXPECT_EQ(o[(b * L + p) * C + c], image ? f[(b * 2 + used) * C + c] : t[(b * L + p) * C + c])
            << "row " << b << " position " << p;
      used += image;
    }
  }
  // One placeholder standing for all N features (PSA-VLM's <image>): rows grow by N - 1.
  Tensor one = Tensor::from(std::vector<int64_t>{1, tok, 2, tok, 3, 4}, {B, 3}, DType::i64);
  Tensor t3 = input64({B, 3, C}, 33), f4 = input64({B, 4, C}, 34);
  EXPECT_EQ(splice_embeddings(t3, one, tok, f4, false).shape(), (Shape{B, 6, C}));
  GradcheckResult r = gradcheck(
      [&](const std::vector<Tensor>& in) { return splice_embeddings(in[0], one, tok, in[1], false); }, {t3, f4});
  EXPECT_TRUE(r.ok) << r.report;

  Tensor two_runs = Tensor::from(std::vector<int64_t>{tok, 1, tok, tok, 2, 3}, {B, 3}, DType::i64);
  EXPECT_NE(error_of([&] { splice_embeddings(t3, two_runs, tok, f4, false); }).find("more image tokens"),
            std::string::npos);
  Tensor missing = Tensor::from(std::vector<int64_t>{1, tok, 2, 5, 3, 4}, {B, 3}, DType::i64);
  EXPECT_NE(error_of([&] { splice_embeddings(t3, missing, tok, f4, false); }).find("image tokens for 0 of 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { splice_embeddings(t3, one, tok, input64({1, 4, C}, 36), false); }).find("do not fit"),
            std::string::npos);
}

TEST(Modules, InitializeIsDeterministicAndNameBased) {
  LlamaForCausalLM one(tiny_llama(1)), two(tiny_llama(2));
  one.initialize(42);
  two.initialize(42);
  // Same name, same values, whatever else the model holds (the final norm and lm_head come after a different
  // number of layers in registration order).
  for (auto& [n, t] : one.named_parameters()) EXPECT_EQ(max_abs_diff(t, two.parameter(n)), 0.0) << n;

  Tensor w = one.parameter("model.layers.0.self_attn.q_proj.weight");
  std::vector<double> before = w.to_vector();
  one.initialize(42);
  EXPECT_EQ(w.to_vector(), before);
  one.initialize(43);
  EXPECT_GT(max_abs_diff(w, Tensor::from(before, w.shape())), 1e-3);
  // Distinct names get distinct values under one seed, and the Init kinds apply (norm weights are ones).
  EXPECT_GT(max_abs_diff(w, one.parameter("model.layers.0.self_attn.o_proj.weight")), 1e-3);
  for (double v : one.parameter("model.norm.weight").to_vector()) EXPECT_EQ(v, 1.0);
}

TEST(Modules, LoadStateDictErrorsNameTheSourceAndTheTensor) {
  LlamaForCausalLM src(tiny_llama()), dst(tiny_llama());
  src.initialize(5);
  std::map<std::string, Tensor> good;
  for (auto& [n, t] : src.named_parameters()) good[n] = t.clone();

  auto missing = good;
  missing.erase("model.norm.weight");
  std::string e = error_of([&] { dst.load_state_dict(missing, true, "ckpt/a.safetensors"); });
  EXPECT_NE(e.find("ckpt/a.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
  EXPECT_NE(e.find("'model.norm.weight'"), std::string::npos) << e;

  auto unexpected = good;
  unexpected["model.layers.7.mlp.up_proj.weight"] = Tensor::zeros({12, 8});
  e = error_of([&] { dst.load_state_dict(unexpected, true, "ckpt/b.safetensors"); });
  EXPECT_NE(e.find("ckpt/b.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("unexpected"), std::string::npos) << e;
  EXPECT_NE(e.find("'model.layers.7.mlp.up_proj.weight'"), std::string::npos) << e;

  auto wrong_shape = good;
  wrong_shape["lm_head.weight"] = Tensor::zeros({16, 9});
  e = error_of([&] { dst.load_state_dict(wrong_shape, true, "ckpt/c.safetensors"); });
  EXPECT_NE(e.find("ckpt/c.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("'lm_head.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("[16,9]"), std::string::npos) << e;
  EXPECT_NE(e.find("[16,8]"), std::string::npos) << e;

  // Not strict: missing and unexpected keys are tolerated and the rest is loaded.
  dst.load_state_dict(missing, false);
  dst.load_state_dict(unexpected, false);
  EXPECT_EQ(max_abs_diff(dst.parameter("lm_head.weight"), good["lm_head.weight"]), 0.0);
  // A good state dict loads without error, values copied (not aliased).
  LlamaForCausalLM dst2(tiny_llama());
  dst2.load_state_dict(good);
  for (auto& [n, t] : dst2.named_parameters()) EXPECT_EQ(max_abs_diff(t, good[n]), 0.0) << n;
  EXPECT_NE(dst2.parameter("lm_head.weight").impl(), good["lm_head.weight"].impl());
}

// ---------------------------------------------------------------- LoRA

// Linear 6 -> 4 with a rank-2 adapter (alpha 8: scale 4, so a wrong scale shows).
std::unique_ptr<Linear> lora_linear(double dropout = 0.0, double alpha = 8.0) {
  auto m = std::make_unique<Linear>(6, 4);
  m->add_lora(2, alpha, dropout);
  m->initialize(1);
  return m;
}

TEST(Lora, FreshAdapterLeavesTheBaseOutput) {
  Linear base(6, 4);
  base.initialize(1);
  auto m = lora_linear();
  Tensor x = randn({3, 6}, 2);
  EXPECT_EQ(max_abs_diff(m->weight, base.weight), 0.0);  // same names, same initial values
  EXPECT_GT(max_abs_diff(m->lora_A, Tensor::zeros({2, 6})), 1e-3);
  EXPECT_EQ(max_abs_diff(m->lora_B, Tensor::zeros({4, 2})), 0.0);
  EXPECT_EQ(max_abs_diff(m->forward(x), base.forward(x)), 0.0);
  EXPECT_EQ(m->lora_A.shape(), (Shape{2, 6}));
  EXPECT_EQ(m->lora_B.shape(), (Shape{4, 2}));
  std::set<std::string> names;
  for (auto& [n, t] : m->named_parameters()) names.insert(n);
  EXPECT_EQ(names, (std::set<std::string>{"weight", "bias", "lora_A.weight", "lora_B.weight"}));
}

// alpha 8 (scale 4) and alpha 2 (scale 1, where the forward skips the multiply).
TEST(Lora, MergeEqualsUnmergedAndUnmergeRestoresTheWeight) {
  for (double alpha : {8.0, 2.0}) {
    SCOPED_TRACE("alpha " + std::to_string(alpha));
    auto m = lora_linear(0.0, alpha);
    Tensor(m->lora_B).contiguous_copy_from(randn({4, 2}, 3, DType::f32, 0.5));
    Tensor x = randn({3, 6}, 4), w0 = m->weight.clone();
    NoGrad ng;
    Tensor base = linear(x, w0, m->bias), unmerged = m->forward(x);
    EXPECT_GT(max_abs_diff(unmerged, base), 1e-2);  // the adapter matters now

    m->merge_lora();
    EXPECT_TRUE(m->lora_merged);
    EXPECT_LT(max_abs_diff(m->forward(x), unmerged), 1e-5);
    Tensor delta = mul_scalar(matmul(m->lora_B, m->lora_A), alpha / 2);
    EXPECT_LT(max_abs_diff(sub(m->weight, w0), delta), 1e-6);  // W += (alpha/r)·B·A

    m->unmerge_lora();
    EXPECT_FALSE(m->lora_merged);
    EXPECT_LT(max_abs_diff(m->weight, w0), 1e-6);
    EXPECT_LT(max_abs_diff(m->forward(x), unmerged), 1e-5);
    EXPECT_NE(error_of([&] { m->unmerge_lora(); }), "");  // nothing merged any more
  }
}

TEST(Lora, GradientsReachOnlyTheAdapterWhenTheBaseIsFrozen) {
  auto m = lora_linear();
  Tensor(m->lora_B).contiguous_copy_from(randn({4, 2}, 5, DType::f32, 0.5));  // with B = 0, dA would be 0
  m->freeze("weight");
  m->freeze("bias");
  EXPECT_TRUE(m->lora_A.requires_grad());
  Tensor y = m->forward(randn({3, 6}, 6));
  sum(mul(y, y)).backward();
  EXPECT_FALSE(m->weight.grad().defined());
  EXPECT_FALSE(m->bias.grad().defined());
  ASSERT_TRUE(m->lora_A.grad().defined());
  ASSERT_TRUE(m->lora_B.grad().defined());
  EXPECT_GT(max_abs_diff(m->lora_A.grad(), Tensor::zeros({2, 6})), 1e-4);
  EXPECT_GT(max_abs_diff(m->lora_B.grad(), Tensor::zeros({4, 2})), 1e-4);
}

// Dropout acts on the adapter's input only while training: eval() and the merged weight must give the
// dropout-free answer, or evaluation would depend on the step a mask came from.
TEST(Lora, DropoutActsInTrainingOnly) {
  auto m = lora_linear(0.5), plain = lora_linear(0.0);
  Tensor b = randn({4, 2}, 3, DType::f32, 0.5);
  Tensor(m->lora_B).contiguous_copy_from(b);
  Tensor(plain->lora_B).contiguous_copy_from(b);
  Tensor x = randn({3, 6}, 4);
  NoGrad ng;
  ASSERT_TRUE(m->training());
  Tensor trained = m->forward(x);
  m->dropout_offset = 1;  // the next step draws another mask
  EXPECT_GT(max_abs_diff(m->forward(x), trained), 1e-3);

  m->eval();
  Tensor evaluated = m->forward(x);
  EXPECT_GT(max_abs_diff(trained, evaluated), 1e-3);
  EXPECT_EQ(max_abs_diff(evaluated, plain->forward(x)), 0.0);
  m->merge_lora();
  EXPECT_LT(max_abs_diff(m->forward(x), evaluated), 1e-5);
}

TEST(Lora, GradcheckInF64) {
  auto m = lora_linear(0.0);
  expect_module_gradcheck(*m, {input64({2, 3, 6}, 7)}, [&](const std::vector<Tensor>& in) { return m->forward(in[0]); });
}

// ---------------------------------------------------------------- generation

LlamaConfig gen_config(int64_t kv_heads) {
  LlamaConfig c;
  c.vocab = 32, c.hidden = 32, c.intermediate = 64, c.layers = 2, c.heads = 4, c.kv_heads = kv_heads;
  c.max_positions = 64;
  return c;
}

Tensor ids_tensor(const std::vector<int64_t>& ids) { return Tensor::from(ids, {1, (int64_t)ids.size()}, DType::i64); }

std::vector<float> last_logits(const Tensor& logits) {
  int64_t T = logits.size(1), V = logits.size(2);
  return reshape(slice(logits, 1, T - 1, T), {V}).to(DType::f32).vec<float>();
}

// What generate() must equal: no cache, the whole sequence recomputed for every new token.
std::vector<int64_t> generate_by_recomputing(const LlamaForCausalLM& lm, std::vector<int64_t> ids,
                                             const SamplingOptions& opt) {
  NoGrad ng;
  std::vector<int64_t> out;
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    int64_t next = sample_token(last_logits(lm.logits(ids_tensor(ids))), opt, step);
    out.push_back(next);
    ids.push_back(next);
  }
  return out;
}

TEST(Generate, MemorisesASequenceAndReproducesItGreedily) {
  const std::vector<int64_t> seq = {1, 7, 19, 4, 28, 11, 3, 25, 16, 9, 30, 5};
  LlamaForCausalLM lm(gen_config(2));
  lm.initialize(0);
  AdamW opt(trainable(lm), 1e-2);
  Tensor ids = ids_tensor(seq);
  // About 20 AdamW steps suffice today; the budget leaves room without hiding an optimizer that stalls.
  const int kMaxSteps = 150;
  double loss = 1e9;
  int steps = 0;
  for (; steps < kMaxSteps && loss >= 0.05; ++steps) {
    Tensor l = LlamaForCausalLM::causal_lm_loss(lm.logits(ids), ids);
    loss = l.item();
    l.backward();
    opt.update();
    opt.zero_grad();
  }
  ASSERT_LT(loss, 0.05) << "after " << steps << " steps";

  NoGrad ng;
  Tensor prompt = lm.embed(ids_tensor({seq.begin(), seq.begin() + 3}));
  SamplingOptions greedy;
  greedy.max_new_tokens = 9;
  EXPECT_EQ(generate(lm, prompt, greedy), std::vector<int64_t>(seq.begin() + 3, seq.end()));
  // A stop token ends generation and is not returned.
  greedy.stop_ids = {seq[6]};
  EXPECT_EQ(generate(lm, prompt, greedy), std::vector<int64_t>(seq.begin() + 3, seq.begin() + 6));
}

TEST(Generate, KvCacheEqualsFullRecomputation) {
  const std::vector<int64_t> prompt = {3, 14, 15, 9};
  for (int64_t kv_heads : {4, 2}) {  // multi-head, then grouped-query (2 query heads per kv head)
    SCOPED_TRACE(str_cat("kv_heads ", kv_heads));
    LlamaForCausalLM lm(gen_config(kv_heads));
    randomize(lm, 10 + kv_heads, 0.3);  // larger than initialize(): distinct logits, position-dependent attention
    NoGrad ng;

    // Logits of the cached step-by-step forward against the whole sequence at once.
    std::vector<int64_t> seq = {3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3};
    Tensor full = lm.logits(ids_tensor(seq));
    KVCache cache;
    lm.forward(lm.embed(ids_tensor({seq.begin(), seq.begin() + 4})), &cache);
    for (size_t t = 4; t < seq.size(); ++t) {
      Tensor step = lm.forward(lm.embed(ids_tensor({seq[t]})), &cache).logits;
      EXPECT_LT(max_abs_diff(step, slice(full, 1, t, t + 1)), 1e-5) << "position " << t;
    }
    EXPECT_EQ(cache.length(), (int64_t)seq.size());

    SamplingOptions greedy;
    greedy.max_new_tokens = 10;
    SamplingOptions sampled = greedy;
    sampled.temperature = 0.7, sampled.top_k = 5, sampled.seed = 1234;
    Tensor embeds = lm.embed(ids_tensor(prompt));
    std::vector<int64_t> g = generate(lm, embeds, greedy), s = generate(lm, embeds, sampled);
    EXPECT_EQ(g, generate_by_recomputing(lm, prompt, greedy));
    EXPECT_EQ(s, generate_by_recomputing(lm, prompt, sampled));
    EXPECT_EQ(g.size(), 10u);
    EXPECT_NE(s, g);  // sampling really sampled
  }
}

TEST(Generate, NonFiniteLogitsAreAnErrorNotAnAnswer) {
  LlamaForCausalLM lm(gen_config(4));
  randomize(lm, 3, 0.3);
  Tensor w = lm.norm->weight;  // the final norm: every logit of every position becomes NaN
  w.data<float>()[0] = NAN;
  SamplingOptions greedy;
  greedy.max_new_tokens = 3;
  std::string e = error_of([&] { generate(lm, lm.embed(ids_tensor({3, 14})), greedy); });
  EXPECT_NE(e.find("generate: the language model's logits are not finite at step 0"), std::string::npos) << e;
}

TEST(Generate, SampleTokenRespectsTopK) {
  std::vector<float> logits(12);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(3.0 * i);  // no ties
  std::vector<size_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  const std::set<int64_t> top3 = {(int64_t)order[0], (int64_t)order[1], (int64_t)order[2]};

  SamplingOptions o;
  o.temperature = 2.0, o.top_k = 3;  // a high temperature makes the excluded tokens likely without top-k
  std::set<int64_t> seen;
  for (uint64_t seed = 0; seed < 300; ++seed) {
    o.seed = seed;
    int64_t t = sample_token(logits, o, seed % 7);
    EXPECT_TRUE(top3.count(t)) << "seed " << seed << " picked " << t;
    seen.insert(t);
  }
  EXPECT_EQ(seen, top3);  // and all three of them do get picked

  o.temperature = 0;  // greedy ignores top-k and the seed
  EXPECT_EQ(sample_token(logits, o, 0), (int64_t)order[0]);
}

TEST(Generate, SampleTokenRespectsTopP) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1. top_p 0.7: the smallest prefix reaching 0.7 is
  // {0, 1}, renormalised to 0.625 / 0.375.
  std::vector<float> logits = {std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
  SamplingOptions o;
  o.temperature = 1.0, o.top_p = 0.7;
  int counts[4] = {0, 0, 0, 0};
  const int n = 2000;
  for (int i = 0; i < n; ++i) {
    o.seed = i;
    ++counts[sample_token(logits, o, 0)];
  }
  EXPECT_EQ(counts[0] + counts[2], 0);
  EXPECT_NEAR(counts[1] / double(n), 0.625, 0.05);
  EXPECT_NEAR(counts[3] / double(n), 0.375, 0.05);

  o.top_p = 0.45;  // the top token alone reaches it
  for (int i = 0; i < 50; ++i) {
    o.seed = i;
    EXPECT_EQ(sample_token(logits, o, 3), 1);
  }
  o.top_p = 1.0;  // off: the least likely token appears too
  std::set<int64_t> seen;
  for (int i = 0; i < 400; ++i) {
    o.seed = i;
    seen.insert(sample_token(logits, o, 0));
  }
  EXPECT_EQ(seen.size(), 4u);
}

}  // namespace
}  // namespace psa::nn
