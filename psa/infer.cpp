#include "psa/infer.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "nn/json.h"
#include "psa/data.h"

namespace psa {

bool has_safety_tokens(const Checkpoint& c) { return c.stage != "base"; }

std::string clean_question(const std::string& question) {
  static const std::string tag = "<image>";
  std::string q = question;
  for (size_t p; (p = q.find(tag)) != std::string::npos;) q.erase(p, tag.size());
  return trim(q);
}

static Device model_device(const Checkpoint& c) { return c.model->lm->embed_tokens->weight.device(); }

static void check_pixels(const Checkpoint& c, const std::vector<float>& px) {
  const int64_t S = c.model->config.vision.image_size;
  PSA_CHECK((int64_t)px.size() == 3 * S * S, "infer: image has ", px.size(), " values, expected 3x", S, "x", S,
            " (preprocess at the model's image size)");
}

static Tensor pixel_tensor(const Checkpoint& c, const std::vector<const std::vector<float>*>& pixels) {
  const int64_t S = c.model->config.vision.image_size, B = pixels.size();
  std::vector<float> all;
  all.reserve(B * 3 * S * S);
  for (const auto* p : pixels) {
    check_pixels(c, *p);
    all.insert(all.end(), p->begin(), p->end());
  }
  return Tensor::from(all, {B, 3, S, S}, DType::f32).to(model_device(c));
}

// Plain prompts (no hint), right-padded: the head never attends over text, so padding cannot change it.
static PsaBatch prompt_batch(const Checkpoint& c, const std::vector<const std::vector<float>*>& pixels,
                             const std::vector<std::string>& questions) {
  PSA_CHECK(pixels.size() == questions.size(), "classify_images: ", pixels.size(), " images but ",
            questions.size(), " questions");
  std::vector<std::vector<int32_t>> rows;
  size_t L = 0;
  for (const std::string& q : questions) {
    rows.push_back(prompt_tokens(*c.tokenizer, clean_question(q), ""));
    L = std::max(L, rows.back().size());
  }
  const int64_t B = rows.size();
  std::vector<int64_t> ids(B * L, c.model->config.pad_id);
  PsaBatch b;
  for (int64_t r = 0; r < B; ++r) {
    std::copy(rows[r].begin(), rows[r].end(), ids.begin() + r * L);
    b.prompt_len.push_back(rows[r].size());
    b.question_start.push_back(question_start(*c.tokenizer, rows[r]));
  }
  b.ids = Tensor::from(ids, {B, (int64_t)L}, DType::i64).to(model_device(c));
  b.pixels = pixel_tensor(c, pixels);
  return b;
}

static std::vector<double> softmax_row(const std::vector<double>& logits, size_t row, size_t n) {
  std::vector<double> p(logits.begin() + row * n, logits.begin() + (row + 1) * n);
  const double m = *std::max_element(p.begin(), p.end());
  double total = 0;
  for (double& v : p) total += v = std::exp(v - m);
  for (double& v : p) v /= total;
  return p;
}

static int argmax_of(const std::vector<double>& p) { return std::max_element(p.begin(), p.end()) - p.begin(); }

// NaN logits would otherwise surface as "p=nan", an argmax of 0 and a JSON writer error far from the cause.
static void check_finite(const Checkpoint& c, const std::vector<double>& v) {
  for (double x : v)
    PSA_CHECK(std::isfinite(x), c.dir, ": the model's outputs are not finite (NaN/Inf weights in the checkpoint? "
              "a run trained with too high a learning rate ends like this)");
}

std::vector<HeadPrediction> classify_images(const Checkpoint& c, const std::vector<const std::vector<float>*>& pixels,
                                            const std::vector<std::string>& questions) {
  if (pixels.empty()) return {};
  NoGrad ng;
  PsaOutput o = c.model->forward(prompt_batch(c, pixels, questions), true, false, false);
  const std::vector<double> lv = o.level_logits.to_vector(), ty = o.type_logits.to_vector();
  check_finite(c, lv);
  check_finite(c, ty);
  std::vector<HeadPrediction> out(pixels.size());
  for (size_t r = 0; r < out.size(); ++r) {
    out[r].level_probs = softmax_row(lv, r, kNumLevels);
    out[r].type_probs = softmax_row(ty, r, kNumTypes);
    out[r].level = argmax_of(out[r].level_probs);  // independent argmaxes, as the reference (§5 step 2)
    out[r].type = argmax_of(out[r].type_probs);
  }
  return out;
}

// A random or under-trained model may emit ids past the tokenizer's vocabulary (the model's table is
// larger); they carry no text, so they are dropped instead of failing the decode.
static std::string decode_answer(const Tokenizer& tok, const std::vector<int64_t>& ids) {
  std::vector<int32_t> known;
  for (int64_t id : ids)
    if (id >= 0 && id < tok.vocab_size()) known.push_back(static_cast<int32_t>(id));
  // Byte-level BPE can stop inside a character, and an untrained model emits arbitrary bytes: answers go into
  // JSON reports, so each invalid byte becomes U+FFFD.
  return trim(json::valid_utf8(tok.decode(known)));
}

int64_t prompt_positions(const Checkpoint& c, const std::string& question, const std::string& hint) {
  const PsaConfig& cfg = c.model->config;
  const int64_t text = prompt_tokens(*c.tokenizer, clean_question(question), hint).size();
  return text - 1 + cfg.vision.num_patches() + (has_safety_tokens(c) ? cfg.num_safety_tokens : 0);
}

std::string prompt_too_long(const Checkpoint& c, const std::string& question, const std::string& hint,
                            const std::string& source) {
  const int64_t need = prompt_positions(c, question, hint), limit = c.model->config.text.max_positions;
  if (need <= limit) return "";
  return source + ": the prompt needs " + std::to_string(need) + " positions (template, question" +
         (hint.empty() ? "" : ", hint") + ", image and safety tokens), more than the checkpoint " + c.dir +
         "'s max_position_embeddings " + std::to_string(limit);
}

void check_policy_fits(const Checkpoint& c, const Policy& policy) {
  if (!has_safety_tokens(c)) return;  // a base checkpoint never gets a hint
  for (int l = 1; l <= 3; ++l)
    for (int t = 0; t < kRiskTypes; ++t) {
      const PolicyEntry& e = policy.entry(l, t);
      if (e.action != "hint") continue;
      const std::string why = prompt_too_long(c, "", e.hint, policy_label(policy) + ": level " + std::to_string(l) +
                                              " " + type_name(t) + " hint (even with an empty question)");
      PSA_CHECK(why.empty(), why);
    }
}

// Names what made the prompt long: the hint the policy picked for this prediction, or the question alone.
static std::string hint_source(const Policy& policy, const HeadPrediction& head, const std::string& hint) {
  if (hint.empty()) return "the question";
  return "the question with the " + policy_label(policy) + "'s level " + std::to_string(head.level) + " " +
         type_name(head.type) + " hint";
}

InferResult respond(const Checkpoint& c, const std::vector<float>& pixels, const std::string& question,
                    const HeadPrediction& head, const Policy& policy, const nn::SamplingOptions& opt, bool control) {
  InferResult r;
  r.level = head.level, r.type = head.type;
  r.level_probs = head.level_probs, r.type_probs = head.type_probs;
  // Without a trained head (base) the prediction is noise, so control is off there.
  Decision d{"none", ""};
  if (control && has_safety_tokens(c)) d = decide(policy, head.level, head.type);
  r.action = d.action;
  r.hint = d.hint;
  if (d.action == "refuse") {
    r.answer = d.hint;
    return r;
  }
  const std::string q = clean_question(question), hint = d.action == "hint" ? d.hint : "";
  r.prompt = build_prompt(q, hint);
  const std::string why = prompt_too_long(c, q, hint, hint_source(policy, head, hint));
  PSA_CHECK(why.empty(), why);
  const std::vector<int32_t> ids32 = prompt_tokens(*c.tokenizer, q, hint);
  const std::vector<int64_t> ids(ids32.begin(), ids32.end());
  nn::SamplingOptions o = opt;
  if (o.stop_ids.empty()) o.stop_ids.push_back(c.tokenizer->eos_id());
  NoGrad ng;
  Tensor id_t = Tensor::from(ids, {1, (int64_t)ids.size()}, DType::i64).to(model_device(c));
  Tensor emb = c.model->prompt_embeddings(pixel_tensor(c, {&pixels}), id_t, has_safety_tokens(c));
  r.answer_ids = nn::generate(*c.model->lm, emb, o);
  r.answer = decode_answer(*c.tokenizer, r.answer_ids);
  return r;
}

InferResult infer(const Checkpoint& c, const std::vector<float>& pixels, const std::string& question,
                  const Policy& policy, const nn::SamplingOptions& opt, bool control) {
  if (c.model->training()) c.model->eval();  // LoRA dropout must be off; only written when needed
  HeadPrediction head = classify_images(c, {&pixels}, {question}).at(0);
  return respond(c, pixels, question, head, policy, opt, control);
}

// ---- explanations ----

// The model's view of the image at display size: short side resized, centre crop (as preprocess()).
// Only the centre survives the crop, so a very long image (its resized long side past kMaxImageSide) is first cut
// to a central window that resizes within the limit; this is a picture for people, not the model's input.
static Image central_window(const Image& img, int size) {
  const bool wide = img.w >= img.h;
  const int short_side = wide ? img.h : img.w, long_side = wide ? img.w : img.h;
  const int64_t keep = std::max<int64_t>(short_side, int64_t(short_side) * kMaxImageSide / size);
  if (keep >= long_side) return img;
  const int w = wide ? int(keep) : img.w, h = wide ? img.h : int(keep);
  const int left = (img.w - w) / 2, top = (img.h - h) / 2;
  Image out(w, h);
  for (int y = 0; y < h; ++y) std::copy_n(img.at(left, top + y), size_t(w) * 3, out.at(0, y));
  return out;
}

static Image display_crop(const Image& full, int size) {
  const Image img = central_window(full, size);
  const bool wide = img.w >= img.h;
  const int short_side = wide ? img.h : img.w, long_side = wide ? img.w : img.h;
  const int new_long = std::max(size, static_cast<int>(static_cast<int64_t>(size) * long_side / short_side));
  const Image r = wide ? resize_bicubic(img, new_long, size) : resize_bicubic(img, size, new_long);
  const int left = (r.w - size) / 2, top = (r.h - size) / 2;
  Image out(size, size);
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) std::copy_n(r.at(left + x, top + y), 3, out.at(x, y));
  return out;
}

// Head-averaged attention on the patches, min-max normalised to [0, 1], row-major g x g.
static std::vector<double> patch_attention(const Checkpoint& c, const std::vector<float>& pixels,
                                           const std::string& question) {
  PsaBatch b = prompt_batch(c, {&pixels}, {question});
  const std::vector<double> w = c.model->head_attention(b).to_vector();  // [1, H, 1, N_s + P]
  const int64_t Ns = c.model->config.num_safety_tokens, P = c.model->config.vision.num_patches();
  const int64_t H = w.size() / (Ns + P);
  std::vector<double> heat(P, 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t p = 0; p < P; ++p) heat[p] += w[h * (Ns + P) + Ns + p] / H;  // safety-token keys dropped
  const auto [lo, hi] = std::minmax_element(heat.begin(), heat.end());
  const double min = *lo, range = *hi - *lo;
  for (double& v : heat) v = range > 0 ? (v - min) / range : 0.0;
  return heat;
}

// Bilinear sample of a g x g grid at display pixel centres (align_corners = false).
static double sample_grid(const std::vector<double>& g, int n, double x, double y) {
  x = std::clamp(x, 0.0, n - 1.0), y = std::clamp(y, 0.0, n - 1.0);
  const int x0 = static_cast<int>(x), y0 = static_cast<int>(y);
  const int x1 = std::min(x0 + 1, n - 1), y1 = std::min(y0 + 1, n - 1);
  const double fx = x - x0, fy = y - y0;
  const double top = g[y0 * n + x0] * (1 - fx) + g[y0 * n + x1] * fx;
  const double bot = g[y1 * n + x0] * (1 - fx) + g[y1 * n + x1] * fx;
  return top * (1 - fy) + bot * fy;
}

Image explain_heatmap(const Checkpoint& c, const std::vector<float>& pixels, const Image& original,
                      const std::string& question, int display) {
  PSA_CHECK(display >= 8 && display <= 4096, "explain: display size ", display, " out of 8..4096");
  PSA_CHECK(original.w > 0 && original.h > 0, "explain: empty image");
  if (c.model->training()) c.model->eval();
  const std::vector<double> heat = patch_attention(c, pixels, question);
  const int g = static_cast<int>(c.model->config.vision.grid());
  Image out = display_crop(original, display);
  const double scale = static_cast<double>(g) / display, kMaxAlpha = 0.65;
  for (int y = 0; y < display; ++y)
    for (int x = 0; x < display; ++x) {
      const double a = kMaxAlpha * sample_grid(heat, g, (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5);
      uint8_t* px = out.at(x, y);
      px[0] = static_cast<uint8_t>(std::lround(px[0] * (1 - a) + 255 * a));
      px[1] = static_cast<uint8_t>(std::lround(px[1] * (1 - a)));
      px[2] = static_cast<uint8_t>(std::lround(px[2] * (1 - a)));
    }
  return out;
}

}  // namespace psa
