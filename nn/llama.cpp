#include "nn/llama.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "nn/clip.h"  // kMinEps, kMaxEps: the norm epsilon bounds every config shares
#include "tensor/rng.h"

namespace psa::nn {

// The RoPE base, from the old (rope_theta) or the new (rope_parameters.rope_theta) layout. Only the default
// rotary embedding is implemented: a scaled one (linear, dynamic, yarn, llama3) would run and give other numbers.
static void read_rope(const json::Value& v, LlamaConfig* c) {
  constexpr double kMaxTheta = 1e12;  // far above any real model (Llama 3: 5e5)
  const json::Value* rp = v.find("rope_parameters");
  const json::Value* scaling = v.find("rope_scaling");
  if (rp && !rp->is_null()) {
    json::with_key("rope_parameters", [&] {
      c->rope_theta = rp->number_in_or("rope_theta", c->rope_theta, 1, kMaxTheta);
      const std::string type = rp->string_or("rope_type", "default");
      PSA_CHECK(type == "default", "json: key 'rope_type': '", type, "' is not supported (only 'default')");
      return 0;
    });
  } else {
    c->rope_theta = v.number_in_or("rope_theta", c->rope_theta, 1, kMaxTheta);
  }
  PSA_CHECK(!scaling || scaling->is_null(), "json: key 'rope_scaling': ", json::dump(*scaling),
            " is not supported (only the default rotary embedding)");
}

LlamaConfig LlamaConfig::from_json(const json::Value& v) {
  LlamaConfig c;
  // Ranges far above any real Llama; they only stop absurd values before anything is allocated.
  c.vocab = v.int_in("vocab_size", 1, 1 << 22);
  c.hidden = v.int_in("hidden_size", 1, 1 << 16);
  c.intermediate = v.int_in("intermediate_size", 1, 1 << 20);
  c.layers = v.int_in("num_hidden_layers", 1, 1024);
  c.heads = v.int_in("num_attention_heads", 1, c.hidden);
  c.kv_heads = v.int_in_or("num_key_value_heads", c.heads, 1, c.heads);
  // head_dim may differ from hidden / heads (HF allows it); 0 is not "unset" (null or a missing key is).
  c.head_dim = v.int_in_or("head_dim", 0, 1, 1 << 12);
  c.eps = v.number_in_or("rms_norm_eps", c.eps, kMinEps, kMaxEps);
  c.max_positions = v.int_in_or("max_position_embeddings", c.max_positions, 1, int64_t(1) << 24);
  read_rope(v, &c);
  c.tie_embeddings = v.bool_or("tie_word_embeddings", c.tie_embeddings);
  c.attention_bias = v.bool_or("attention_bias", c.attention_bias);
  c.mlp_bias = v.bool_or("mlp_bias", c.mlp_bias);
  c.bos_id = v.int_in_or("bos_token_id", c.bos_id, 0, c.vocab - 1);
  if (const json::Value* e = v.find("eos_token_id"); e && !e->is_null() && !e->is_array())
    c.eos_id = v.int_in("eos_token_id", 0, c.vocab - 1);
  // The MLP is SwiGLU with SiLU, whatever the config says: another activation would run and give other numbers.
  const std::string act = v.string_or("hidden_act", "silu");
  PSA_CHECK(act == "silu" || act == "swish", "json: key 'hidden_act': '", act,
            "' is not supported (the Llama MLP here is SwiGLU with silu)");
  PSA_CHECK(c.heads % c.kv_heads == 0, "llama config: ", c.heads, " heads not divisible by ", c.kv_heads,
            " key/value heads");
  PSA_CHECK(c.head_dim || c.hidden % c.heads == 0, "llama config: hidden_size ", c.hidden, " not divisible by ",
            c.heads, " heads");
  // Rotate-half RoPE pairs dimension i with i + D/2.
  PSA_CHECK(c.dim_head() % 2 == 0, "llama config: head dimension ", c.dim_head(), " is odd (RoPE needs it even)");
  return c;
}

json::Value LlamaConfig::to_json() const {
  json::Value v = json::Value::object();
  v.set("model_type", "llama");
  v.set("vocab_size", vocab);
  v.set("hidden_size", hidden);
  v.set("intermediate_size", intermediate);
  v.set("num_hidden_layers", layers);
  v.set("num_attention_heads", heads);
  v.set("num_key_value_heads", kv_heads);
  v.set("head_dim", dim_head());
  v.set("rms_norm_eps", eps);
  v.set("rope_theta", rope_theta);
  v.set("max_position_embeddings", max_positions);
  v.set("tie_word_embeddings", tie_embeddings);
  v.set("attention_bias", attention_bias);
  v.set("mlp_bias", mlp_bias);
  v.set("bos_token_id", bos_id);
  v.set("eos_token_id", eos_id);
  v.set("hidden_act", "silu");
  return v;
}

LlamaAttention::LlamaAttention(const LlamaConfig& c) : heads(c.heads), kv_heads(c.kv_heads), head_dim(c.dim_head()) {
  q_proj = register_module("q_proj", std::make_shared<Linear>(c.hidden, heads * head_dim, c.attention_bias));
  k_proj = register_module("k_proj", std::make_shared<Linear>(c.hidden, kv_heads * head_dim, c.attention_bias));
  v_proj = register_module("v_proj", std::make_shared<Linear>(c.hidden, kv_heads * head_dim, c.attention_bias));
  o_proj = register_module("o_proj", std::make_shared<Linear>(heads * head_dim, c.hidden, c.attention_bias));
}

Tensor LlamaAttention::forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache,
                               int64_t layer) const {
  int64_t B = x.size(0), T = x.size(1);
  auto split = [&](const Tensor& t, int64_t h) { return reshape(t, {B, T, h, head_dim}); };  // [B, T, h, D]
  Tensor q = rope(split(q_proj->forward(x), heads), cos, sin);
  Tensor k = rope(split(k_proj->forward(x), kv_heads), cos, sin);
  Tensor v = split(v_proj->forward(x), kv_heads);
  if (cache) {
    if ((int64_t)cache->k.size() <= layer) {
      cache->k.resize(layer + 1);
      cache->v.resize(layer + 1);
    }
    if (cache->k[layer].defined()) {
      k = concat({cache->k[layer], k}, 1);
      v = concat({cache->v[layer], v}, 1);
    }
    cache->k[layer] = k;
    cache->v[layer] = v;
  }
  return o_proj->forward(reshape(attention(q, k, v, true), {B, T, heads * head_dim}));
}

LlamaLayer::LlamaLayer(const LlamaConfig& c) {
  self_attn = register_module("self_attn", std::make_shared<LlamaAttention>(c));
  gate_proj = register_module("mlp.gate_proj", std::make_shared<Linear>(c.hidden, c.intermediate, c.mlp_bias));
  up_proj = register_module("mlp.up_proj", std::make_shared<Linear>(c.hidden, c.intermediate, c.mlp_bias));
  down_proj = register_module("mlp.down_proj", std::make_shared<Linear>(c.intermediate, c.hidden, c.mlp_bias));
  input_layernorm = register_module("input_layernorm", std::make_shared<RMSNorm>(c.hidden, c.eps));
  post_attention_layernorm = register_module("post_attention_layernorm", std::make_shared<RMSNorm>(c.hidden, c.eps));
}

Tensor LlamaLayer::forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache, int64_t layer) const {
  Tensor h = add(x, self_attn->forward(input_layernorm->forward(x), cos, sin, cache, layer));
  Tensor n = post_attention_layernorm->forward(h);
  return add(h, down_proj->forward(swiglu(gate_proj->forward(n), up_proj->forward(n))));
}

LlamaForCausalLM::LlamaForCausalLM(const LlamaConfig& c) : config(c) {
  embed_tokens = register_module("model.embed_tokens", std::make_shared<Embedding>(c.vocab, c.hidden));
  for (int64_t i = 0; i < c.layers; ++i)
    layers.push_back(register_module("model.layers." + std::to_string(i), std::make_shared<LlamaLayer>(c)));
  norm = register_module("model.norm", std::make_shared<RMSNorm>(c.hidden, c.eps));
  if (!c.tie_embeddings) lm_head = register_module("lm_head", std::make_shared<Linear>(c.hidden, c.vocab, false));
}

Tensor LlamaForCausalLM::embed(const Tensor& ids) const { return embed_tokens->forward(ids); }

// cos/sin [T, D] for positions start..start+T-1, computed in double: inv_freq_i = theta^(-2i/D), the angle table
// repeated over both halves (HF's cat(freqs, freqs)).
std::pair<Tensor, Tensor> LlamaForCausalLM::rope_tables(int64_t start, int64_t T, DType dtype) const {
  int64_t D = config.dim_head();
  Tensor c = Tensor::empty({T, D}, DType::f64), s = Tensor::empty({T, D}, DType::f64);
  double* pc = c.data<double>();
  double* ps = s.data<double>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D / 2; ++i) {
      double inv_freq = 1.0 / std::pow(config.rope_theta, (2.0 * i) / D), a = (start + t) * inv_freq;
      pc[t * D + i] = pc[t * D + i + D / 2] = std::cos(a);
      ps[t * D + i] = ps[t * D + i + D / 2] = std::sin(a);
    }
  return {c.to(dtype), s.to(dtype)};
}

Tensor LlamaForCausalLM::final_hidden(const Tensor& x0, KVCache* cache, std::vector<Tensor>* hidden_states) const {
  PSA_CHECK(x0.dim() == 3 && x0.size(2) == config.hidden, "llama: inputs_embeds ", shape_str(x0.shape()),
            ", expected [B, T, ", config.hidden, "]");
  int64_t start = cache ? cache->length() : 0, T = x0.size(1);
  PSA_CHECK(start + T <= config.max_positions, "llama: sequence of ", start + T, " tokens exceeds max_position_embeddings ",
            config.max_positions);
  auto [cos, sin] = rope_tables(start, T, x0.dtype());
  cos = cos.to(x0.device());
  sin = sin.to(x0.device());
  Tensor x = x0;
  if (hidden_states) hidden_states->push_back(x);
  for (size_t i = 0; i < layers.size(); ++i) {
    x = layers[i]->forward(x, cos, sin, cache, i);
    if (hidden_states) hidden_states->push_back(x);
  }
  x = norm->forward(x);
  if (hidden_states) hidden_states->back() = x;
  return x;
}

Tensor LlamaForCausalLM::head(const Tensor& hidden) const {
  return lm_head ? lm_head->forward(hidden) : linear(hidden, embed_tokens->weight);
}

LlamaForCausalLM::Output LlamaForCausalLM::forward(const Tensor& x0, KVCache* cache, bool keep_hidden) const {
  Output out;
  out.logits = head(final_hidden(x0, cache, keep_hidden ? &out.hidden_states : nullptr));
  return out;
}

namespace {

// Position t predicts label t + 1: the labels shifted left, a row's last position predicting nothing (-100).
std::vector<int64_t> next_token_targets(const Tensor& labels) {
  Tensor host = labels.to(Device::cpu);
  const int64_t* lab = host.data<int64_t>();
  int64_t B = labels.size(0), T = labels.size(1);
  std::vector<int64_t> next(B * T, -100);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) next[b * T + t] = lab[b * T + t + 1];
  return next;
}

void check_lm_loss_shapes(const char* what, const Tensor& x, const Tensor& labels) {
  PSA_CHECK(x.dim() == 3 && labels.dim() == 2 && x.size(0) == labels.size(0) && x.size(1) == labels.size(1),
            "causal_lm_loss: ", what, " ", shape_str(x.shape()), " and labels ", shape_str(labels.shape()));
}

}  // namespace

Tensor LlamaForCausalLM::causal_lm_loss(const Tensor& logits, const Tensor& labels) {
  check_lm_loss_shapes("logits", logits, labels);
  int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  // The targets are shifted rather than the logits sliced, so the [B, T, V] logits are read in place rather
  // than copied, and their gradient is written in place rather than scattered into a zero tensor. The extra
  // rows are ignored and add exactly 0 to the loss.
  Tensor target = Tensor::from(next_token_targets(labels), {B * T}, DType::i64).to(logits.device());
  return cross_entropy(reshape(logits, {B * T, V}), target, -100);
}

Tensor LlamaForCausalLM::causal_lm_loss_from_hidden(const Tensor& hidden, const Tensor& labels) const {
  check_lm_loss_shapes("hidden states", hidden, labels);
  int64_t B = hidden.size(0), T = hidden.size(1), C = hidden.size(2);
  std::vector<int64_t> next = next_token_targets(labels), rows, targets;
  for (int64_t r = 0; r < B * T; ++r)
    if (next[r] != -100) rows.push_back(r), targets.push_back(next[r]);
  if (rows.empty()) rows.push_back(0), targets.push_back(-100);  // no label at all: the same 0/0 as the full loss
  int64_t n = rows.size();
  Tensor picked = index_select(reshape(hidden, {B * T, C}), 0, Tensor::from(rows, {n}, DType::i64).to(hidden.device()));
  return cross_entropy(head(picked), Tensor::from(targets, {n}, DType::i64).to(hidden.device()), -100);
}

std::vector<Linear*> LlamaForCausalLM::linears() {
  std::vector<Linear*> out;
  for (auto& l : layers)
    for (Linear* p : {l->self_attn->q_proj.get(), l->self_attn->k_proj.get(), l->self_attn->v_proj.get(),
                      l->self_attn->o_proj.get(), l->gate_proj.get(), l->up_proj.get(), l->down_proj.get()})
      out.push_back(p);
  if (lm_head) out.push_back(lm_head.get());
  return out;
}

int64_t sample_token(const std::vector<float>& logits, const SamplingOptions& opt, uint64_t step) {
  int64_t V = logits.size();
  if (opt.temperature <= 0) return std::max_element(logits.begin(), logits.end()) - logits.begin();
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  int64_t keep = opt.top_k > 0 ? std::min(opt.top_k, V) : V;
  std::vector<double> p(keep);
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / opt.temperature);
  double cum = 0;  // top-p: the smallest prefix whose mass reaches top_p
  int64_t n = 0;
  while (n < keep) {
    cum += p[n++] / total;
    if (cum >= opt.top_p) break;
  }
  double mass = 0;
  for (int64_t i = 0; i < n; ++i) mass += p[i];
  double r = philox_uniform(opt.seed, 7, step) * mass;
  for (int64_t i = 0; i < n; ++i) {
    r -= p[i];
    if (r < 0) return order[i];
  }
  return order[n - 1];
}

std::vector<int64_t> generate(const LlamaForCausalLM& lm, const Tensor& prompt_embeds, const SamplingOptions& opt) {
  NoGrad no_grad;
  KVCache cache;
  std::vector<int64_t> out;
  Tensor logits = lm.forward(prompt_embeds, &cache).logits;
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    int64_t T = logits.size(1), V = logits.size(2);
    std::vector<float> last = reshape(slice(logits, 1, T - 1, T), {V}).to(DType::f32).vec<float>();
    // NaN logits would pick token 0 (or any) silently: an answer of garbage from broken weights.
    PSA_CHECK(std::all_of(last.begin(), last.end(), [](float x) { return std::isfinite(x); }),
              "generate: the language model's logits are not finite at step ", step,
              " (NaN/Inf weights in the checkpoint?)");
    int64_t next = sample_token(last, opt, step);
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), next) != opt.stop_ids.end()) break;
    out.push_back(next);
    if (cache.length() >= lm.config.max_positions) break;
    Tensor id = Tensor::from(std::vector<int64_t>{next}, {1, 1}, DType::i64).to(prompt_embeds.device());
    logits = lm.forward(lm.embed(id).to(prompt_embeds.dtype()), &cache).logits;
  }
  return out;
}

}  // namespace psa::nn
