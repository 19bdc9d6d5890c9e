#!/usr/bin/env python3
"""A readable PyTorch reference of the engine's PSA-VLM (psa-vlm.md §2, §3; psa/model.cpp).

Used ONLY to make golden data (tests/data/psa_golden) and baseline timings (bench/results). The engine
and its tests never import torch. Written for plain torch (1.13 or newer): no transformers, no timm,
attention written out by hand; parameter names equal PsaVlm::state_dict() so weights load 1:1.

Modes
  --make-fixture DIR       small random model + batch of 2, run in float64 from float32 weights, stores
                           config.json, model.safetensors and io.safetensors (inputs, outputs, losses and
                           grad.<name> for every parameter: all-zero where a parameter is off the loss path).
  --bench [--out PATH]     one CPU training step (forward + backward + clip + AdamW) of the `tiny` preset,
                           Stage I (safety modules trainable) and Stage II (the whole LLM trainable), with
                           1 and 2 threads; median of --steps steps after 3 warm-up steps. "n threads" caps
                           the whole process: torch's pool and the BLAS's (OpenBLAS has its own threads,
                           set through openblas_set_num_threads). With n > 1 both torch n / BLAS n and
                           torch 1 / BLAS n are timed and the faster is the baseline (the least flattering
                           one for the engine); both are in the JSON.
  --bench-preset small     the same for the GPU preset on CUDA (skipped when CUDA is absent).
  --device cpu|cuda        where --bench runs (default: cuda for --bench-preset small, else cpu); e.g.
                           `--bench --bench-preset small --device cuda` is the H100 baseline of bench/gpu_check.sh.

Shapes: B batch, L text tokens, P patches, N_s safety tokens, D LLM width, Dv ViT width, C abstractor width.
"""
import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import struct
import sys
import time

# Debian's torch runs its GEMMs in OpenBLAS's own pthreads, not in torch's OpenMP pool. Spinning OpenMP workers
# then compete with OpenBLAS's threads for the same cores (measured: the 2-thread step 3x slower than 1 thread);
# idle workers that sleep avoid it. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS picks its kernels from cpuid or from OPENBLAS_CORETYPE. design.md's reference figures, and
# bench/gemm.cpp's OpenBLAS rows, use the SkylakeX kernels on AVX-512 machines; so does this baseline, the
# faster one for PyTorch (Zen 5, tiny Stage II step on one thread: 125 ms with SkylakeX, 178 ms with the
# Haswell kernels that a machine-wide OPENBLAS_CORETYPE=Haswell, as some environments set, would give).
# PSA_BENCH_OPENBLAS_CORETYPE picks another. Read by OpenBLAS when torch loads it, so set before the import.
def cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


if os.environ.get("PSA_BENCH_OPENBLAS_CORETYPE"):
    os.environ["OPENBLAS_CORETYPE"] = os.environ["PSA_BENCH_OPENBLAS_CORETYPE"]
elif cpu_has_avx512():
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Config, in the JSON layout of PsaConfig::to_json() (psa/model.cpp)


def make_config(preset):
    """The engine's presets (design.md table) plus `golden`, the small fixture model."""
    if preset == "tiny":
        v = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 image_size=32, patch_size=4)
        t = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4)
        n_s, depth, max_pos = 8, 2, 512
    elif preset == "small":
        v = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
                 image_size=64, patch_size=8)
        t = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8)
        n_s, depth, max_pos = 16, 3, 512
    elif preset == "golden":
        # 16 patches; 3 ViT layers so that feature layer -2 (= after layer 2) differs from both ends;
        # GQA (4 heads over 2 kv heads); C = Dv + N_s = 36, so the SE squeeze widths are 8 and 9.
        v = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 image_size=16, patch_size=4)
        t = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
        n_s, depth, max_pos = 4, 1, 128
    else:
        raise SystemExit(f"unknown preset {preset!r} (known: tiny, small, golden)")
    vision = dict(model_type="clip_vision_model", **v, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    text = dict(model_type="llama", **t, head_dim=t["hidden_size"] // t["num_attention_heads"], rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=max_pos, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")
    return dict(model_type="psa_vlm", preset=preset, vision_config=vision, text_config=text,
                num_safety_tokens=n_s, abstractor_depth=depth, abstractor_mlp_depth=2, head_heads=8,
                vision_feature_layer=-2,
                image_token_index=96 if preset == "golden" else 3, pad_token_id=0,
                safety_loss_weight=10.0, head_query="position0", projector_hidden_act="gelu",
                max_text_tokens=96)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def activation(name):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: F.gelu(x)  # exact (erf)
    if name == "silu":
        return F.silu
    raise ValueError(name)


def attend(q, k, v, causal):
    """q [B,H,T,Dh], k/v [B,H,S,Dh] -> [B,H,T,Dh]; softmax(q kᵀ/√Dh) v, causal: s <= t (T == S)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1 + S - T)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def split_heads(x, heads):  # [B,T,H*Dh] -> [B,H,T,Dh]
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def merge_heads(x):  # [B,H,T,Dh] -> [B,T,H*Dh]
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)


# ----------------------------------------------------------------------------------------------------------
# CLIP vision tower (HF CLIPVisionModel names)


class ClipAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attend(q, k, v, causal=False)))


class ClipMlp(nn.Module):
    def __init__(self, d, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, hidden), nn.Linear(hidden, d), activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.self_attn = ClipAttention(d, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.mlp = ClipMlp(d, c["intermediate_size"], c["hidden_act"])
        self.layer_norm2 = nn.LayerNorm(d, eps=c["layer_norm_eps"])

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        self.patch_embedding = nn.Conv2d(c["num_channels"], d, p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding((c["image_size"] // p) ** 2 + 1, d)

    def forward(self, px):  # [B,3,S,S] -> [B,1+P,Dv]
        patches = self.patch_embedding(px).flatten(2).transpose(1, 2)  # row-major grid: token = h*g + w
        cls = self.class_embedding.view(1, 1, -1).expand(px.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class ClipEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(c) for _ in range(c["num_hidden_layers"]))


class ClipVisionModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = ClipEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])  # sic, CLIP's spelling
        self.encoder = ClipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])  # unused by LLaVA

    def features(self, px, feature_layer):
        """hidden_states[feature_layer] with CLS dropped: [B,P,Dv]. hidden_states[0] = after pre_layrnorm."""
        n = len(self.encoder.layers)
        idx = feature_layer + n + 1 if feature_layer < 0 else feature_layer
        x = self.pre_layrnorm(self.embeddings(px))
        for layer in self.encoder.layers[:idx]:
            x = layer(x)
        return x[:, 1:]


class VisionTower(nn.Module):  # only for the name prefix vision_tower.vision_model.
    def __init__(self, c):
        super().__init__()
        self.vision_model = ClipVisionModel(c)


class MlpProjector(nn.Module):  # multi_modal_projector.linear_{1,2}
    def __init__(self, d_in, d_out, act):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out), activation(act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------------
# Llama (HF LlamaForCausalLM names)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, dh, theta, dtype, device):
    """cos/sin [T,Dh]: angle t·theta^(-2i/Dh), repeated over both halves (rotate-half, HF Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], -1)


class LlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.heads, self.kv_heads, self.dh = (c["hidden_size"], c["num_attention_heads"],
                                                 c["num_key_value_heads"], c["head_dim"])
        self.q_proj = nn.Linear(d, self.heads * self.dh, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(self.heads * self.dh, d, bias=False)

    def forward(self, x, cos, sin):
        q, k, v = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(x), self.kv_heads), \
            split_heads(self.v_proj(x), self.kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads  # query head h reads kv head h // group (HF repeat_kv)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return self.o_proj(merge_heads(attend(q, k, v, causal=True)))


class LlamaMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMlp(c["hidden_size"], c["intermediate_size"])
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class LlamaForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)  # untied

    def forward(self, embeds):
        """inputs_embeds [B,T,D] at positions 0..T-1, no padding mask (right padding cannot leak under causal
        attention) -> logits [B,T,V]."""
        cos, sin = rope_tables(embeds.shape[1], self.c["head_dim"], self.c["rope_theta"], embeds.dtype, embeds.device)
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def causal_lm_loss(logits, labels):
    """logits[:, t] predicts labels[:, t+1]; labels -100 ignored; mean over counted tokens of the batch."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------
# C-Abstractor (HoneyBee; timm RegStage blocks, NCHW here; the engine does the same math channels-last)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of NCHW at every spatial location (timm LayerNorm2d, `.bn` in names)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNorm(nn.Module):
    """timm ConvNormAct: conv (no bias) -> LayerNorm2d -> optional SiLU."""

    def __init__(self, c_in, c_out, kernel, act, eps, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNorm2d(c_out, eps=eps)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.silu(y) if self.act else y


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)  # 1×1 convs with bias

    def forward(self, x):
        g = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(g)


class RegBottleneck(nn.Module):
    def __init__(self, c_in, c, se_ratio=0.25, eps=1e-5):
        super().__init__()
        # timm computes int(round(c_in * se_ratio)) with Python's round-half-even; the engine uses llround
        # (half away from zero). They differ only when c_in * 0.25 ends in .5 (c_in ≡ 2 mod 4); we follow
        # the engine, whose weight shapes the fixture must fit.
        squeeze = int(math.floor(c_in * se_ratio + 0.5))
        self.conv1 = ConvNorm(c_in, c, 1, True, eps)
        self.conv2 = ConvNorm(c, c, 3, True, eps, groups=c)  # depthwise 3×3, padding 1
        self.se = SqueezeExcite(c, squeeze)
        self.conv3 = ConvNorm(c, c, 1, False, eps)
        self.downsample = ConvNorm(c_in, c, 1, False, eps) if c_in != c else None

    def forward(self, x):
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + (self.downsample(x) if self.downsample is not None else x))


class RegStage(nn.Module):
    def __init__(self, depth, c_in, c):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", RegBottleneck(c_in if i == 0 else c, c))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class CAbstractor(nn.Module):
    def __init__(self, d_in, c, d_out, depth, mlp_depth, num_queries):
        super().__init__()
        q = math.isqrt(num_queries)
        self.net = nn.Sequential(RegStage(depth, d_in, c), nn.AdaptiveAvgPool2d((q, q)), RegStage(depth, c, c))
        layers = [nn.Linear(c, d_out)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(d_out, d_out)]
        self.readout = nn.Sequential(*layers)  # readout.0, readout.2, ...

    def forward(self, x):  # [B,P,Dv] -> [B,Q,D]
        B, P, Dv = x.shape
        g = math.isqrt(P)
        h = x.transpose(1, 2).reshape(B, Dv, g, g)  # token index = h*g + w
        h = self.net(h)
        return self.readout(h.flatten(2).transpose(1, 2))


class SafeProjector(nn.Module):  # only for the name prefix safe_mm_projector.proj.
    def __init__(self, *args):
        super().__init__()
        self.proj = CAbstractor(*args)


class SafePart(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.safety_head = nn.Linear(d, 4)  # level
        self.other_head = nn.Linear(d, 7)   # type


# ----------------------------------------------------------------------------------------------------------
# PSA-VLM


class PsaVlm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        vc, tc, n_s = cfg["vision_config"], cfg["text_config"], cfg["num_safety_tokens"]
        D, Dv, P = tc["hidden_size"], vc["hidden_size"], (vc["image_size"] // vc["patch_size"]) ** 2
        self.vision_tower = VisionTower(vc)
        self.multi_modal_projector = MlpProjector(Dv, D, cfg["projector_hidden_act"])
        self.language_model = LlamaForCausalLM(tc)
        self.safety_query_tokens = nn.Parameter(torch.zeros(1, n_s, D))    # s(1): keys of the head
        self.safety_query_tokens_2 = nn.Parameter(torch.zeros(1, n_s, D))  # s(2): into the LLM
        # width = Dv + N_s and queries = patches, as the reference sets them (psa-vlm.md §2.1)
        self.safe_mm_projector = SafeProjector(Dv, Dv + n_s, D, cfg["abstractor_depth"], cfg["abstractor_mlp_depth"], P)
        self.safe_part = SafePart(D, cfg["head_heads"])

    def head_query(self, text, batch):
        """[B,Lq,D] query rows. position0 keeps ALL positions like the reference (only row 0 is read), the
        engine computes row 0 alone; both are exact since query rows attend independently."""
        mode = self.cfg["head_query"]
        if mode == "position0":
            return text
        if mode == "first_text":  # the question's first token
            rows = torch.arange(text.shape[0], device=text.device)
            return text[rows, torch.tensor(batch["question_start"], device=text.device)][:, None]
        w = torch.zeros(text.shape[:2], dtype=text.dtype, device=text.device)
        for r, n in enumerate(batch["prompt_len"]):
            w[r, :n] = 1.0 / n
        return (text * w[..., None]).sum(1, keepdim=True)  # mean_prompt

    def forward(self, batch, classify=True, lm=True, safety_tokens=True):
        ids, out = batch["input_ids"], {}
        B = ids.shape[0]
        text = self.language_model.model.embed_tokens(ids)                          # [B,L,D]
        features = self.vision_tower.vision_model.features(batch["pixel_values"], self.cfg["vision_feature_layer"])
        losses = []
        if classify:
            h_s = self.safe_mm_projector.proj(features)                              # [B,P,D]
            keys = torch.cat([self.safety_query_tokens.expand(B, -1, -1), h_s], 1)  # [B,N_s+P,D]
            z, _ = self.safe_part.cross_attention(self.head_query(text, batch), keys, keys,
                                                  need_weights=False)
            z = z[:, 0]                                                               # [B,D]
            out["level_logits"], out["type_logits"] = self.safe_part.safety_head(z), self.safe_part.other_head(z)
            if "level" in batch:
                out["loss_level"] = F.cross_entropy(out["level_logits"], batch["level"])
                out["loss_type"] = F.cross_entropy(out["type_logits"], batch["type"])
                losses.append(self.cfg["safety_loss_weight"] * (out["loss_level"] + out["loss_type"]))
        if lm:
            h_i = self.multi_modal_projector(features)                               # [B,P,D]
            inserts = torch.cat([self.safety_query_tokens_2.expand(B, -1, -1), h_i], 1) if safety_tokens else h_i
            merged, labels = splice(text, ids, batch["labels"], inserts, self.cfg["image_token_index"])
            out["merged_labels"] = labels
            out["lm_logits"] = self.language_model(merged)
            out["loss_lm"] = causal_lm_loss(out["lm_logits"], labels)
            losses.append(out["loss_lm"])
        if losses:
            out["loss"] = sum(losses[1:], losses[0])
        return out


def splice(text, ids, labels, inserts, image_token):
    """Replaces the single image token of each row by `inserts` rows (labels -100 there)."""
    rows, row_labels = [], []
    for r in range(ids.shape[0]):
        where = (ids[r] == image_token).nonzero().flatten().tolist()
        assert len(where) == 1, f"row {r} has {len(where)} image tokens, expected exactly one"
        j = where[0]
        rows.append(torch.cat([text[r, :j], inserts[r], text[r, j + 1:]], 0))
        ignore = torch.full((inserts.shape[1],), -100, dtype=labels.dtype, device=labels.device)
        row_labels.append(torch.cat([labels[r, :j], ignore, labels[r, j + 1:]], 0))
    return torch.stack(rows), torch.stack(row_labels)


def init_weights(model, gen, perturb_norms):
    """N(0, 0.02) for every weight and bias, xavier-uniform for the MHA in-projection (the spec's
    recommendation, the engine's Init). Norm weights 1 and biases 0, or 1 + N(0, 0.1) / N(0, 0.1) when
    perturb_norms, so that the fixture pins their gradients down too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(s in name for s in ("layer_norm", "layrnorm", "layernorm", ".bn.", "norm.weight"))
            if name.endswith("in_proj_weight"):
                a = math.sqrt(6.0 / (p.shape[0] // 3 + p.shape[1]))
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * a - a)
            elif is_norm and name.endswith("weight"):
                p.copy_(1 + (0.1 * torch.randn(p.shape, generator=gen) if perturb_norms else 0))
            elif is_norm and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) if perturb_norms else torch.zeros(p.shape))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------------------------
# safetensors writer (no safetensors package needed)

_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)  # header padded to a multiple of 8, as Hugging Face writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode())
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------------------------------------
# --make-fixture


def fixture_batch(cfg, gen):
    """Batch of 2, different prompt lengths, right-padded with pad_token_id, one image token per row at
    different positions, position 0 = BOS; labels -100 on prompt and padding, the answer ids elsewhere."""
    vc, tc = cfg["vision_config"], cfg["text_config"]
    img, pad, bos, eos = cfg["image_token_index"], cfg["pad_token_id"], tc["bos_token_id"], tc["eos_token_id"]
    layouts = [(7, 1, 5), (5, 3, 3)]  # (prompt tokens incl. BOS and image, image position, answer tokens)
    L = max(p + a for p, _, a in layouts)
    ids = torch.full((2, L), pad, dtype=torch.int64)
    labels = torch.full((2, L), -100, dtype=torch.int64)
    prompt_len = []
    for r, (p, j, a) in enumerate(layouts):
        words = torch.randint(4, img, (p + a,), generator=gen)  # ordinary ids: not pad/BOS/EOS/<image>
        words[0], words[j], words[p + a - 1] = bos, img, eos
        ids[r, :p + a] = words
        labels[r, p:p + a] = words[p:]
        prompt_len.append(p)
    S = vc["image_size"]
    return {
        "pixel_values": torch.randn(2, 3, S, S, generator=gen),
        "input_ids": ids,
        "labels": labels,
        "level": torch.tensor([1, 3], dtype=torch.int64),
        "type": torch.tensor([5, 2], dtype=torch.int64),
        "prompt_len": prompt_len,
        "question_start": [j + 1 for _, j, _ in layouts],
    }


def make_fixture(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = make_config("golden")
    model = PsaVlm(cfg)  # float32 weights
    init_weights(model, gen, perturb_norms=True)
    batch = fixture_batch(cfg, gen)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    model = model.double()  # compute in float64 from the exact float32 weights
    model.train()
    run = dict(batch, pixel_values=batch["pixel_values"].double())
    out = model(run, classify=True, lm=True, safety_tokens=True)
    out["loss"].backward()

    io = {k: batch[k] for k in ("pixel_values", "input_ids", "labels", "level", "type")}
    for k in ("level_logits", "type_logits", "lm_logits"):
        io[k] = out[k].detach().float()
    io["merged_labels"] = out["merged_labels"]
    for k in ("loss_level", "loss_type", "loss_lm", "loss"):
        io[k] = out[k].detach().float().reshape(1)
    for n, p in model.named_parameters():  # every parameter; zero where off the loss path
        io["grad." + n] = (p.grad if p.grad is not None else torch.zeros_like(p)).float()

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    save_safetensors(os.path.join(out_dir, "model.safetensors"), weights)
    save_safetensors(os.path.join(out_dir, "io.safetensors"), io)
    off_path = [n for n, p in model.named_parameters() if p.grad is None]
    print(f"wrote {out_dir}: {len(weights)} parameters ({sum(w.numel() for w in weights.values())} values), "
          f"loss {out['loss'].item():.6f} (lm {out['loss_lm'].item():.6f}, level {out['loss_level'].item():.6f}, "
          f"type {out['loss_type'].item():.6f}), merged length {out['lm_logits'].shape[1]}")
    print("off the loss path (zero gradients):", ", ".join(off_path))


# ----------------------------------------------------------------------------------------------------------
# --bench

BENCH = {"tiny": dict(batch=16, text=32), "small": dict(batch=32, text=48)}


def bench_batch(cfg, B, L, gen, device):
    """Random prompt+answer rows of L tokens, image token at position 1, the last third is the answer."""
    vc, tc = cfg["vision_config"], cfg["text_config"]
    ids = torch.randint(4, tc["vocab_size"], (B, L), generator=gen)
    ids[ids == cfg["image_token_index"]] = 4
    ids[:, 0], ids[:, 1] = tc["bos_token_id"], cfg["image_token_index"]
    labels = ids.clone()
    labels[:, : L - L // 3] = -100
    S = vc["image_size"]
    return {"pixel_values": torch.randn(B, 3, S, S, generator=gen).to(device), "input_ids": ids.to(device),
            "labels": labels.to(device), "level": torch.randint(0, 4, (B,), generator=gen).to(device),
            "type": torch.randint(0, 7, (B,), generator=gen).to(device), "prompt_len": [L - L // 3] * B,
            "question_start": [2] * B}


def stage_params(model, stage):
    """Stage I: safety tokens, safety projector, safe_part. Stage II: the whole LLM (design.md baseline)."""
    prefixes = ("safety_query_tokens", "safe_mm_projector.", "safe_part.") if stage == 1 else ("language_model.",)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    return params


def time_steps(model, batch, params, steps, warmup, device):
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(batch, classify=True, lm=True, safety_tokens=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def blas_thread_setters():
    """openblas_set_num_threads of every OpenBLAS the process has loaded (none: torch uses MKL or its own)."""
    setters = []
    for path in loaded_blas_libraries():
        try:
            setters.append(ctypes.CDLL(path).openblas_set_num_threads)
        except (OSError, AttributeError):
            pass
    return setters


def loaded_blas_libraries():
    return sorted({line.split()[-1] for line in open("/proc/self/maps") if "blas" in line and ".so" in line})


def check_fast_blas():
    """Refuses a baseline on netlib's reference BLAS: Debian's python3-torch takes whatever libblas.so.3 the
    alternatives system points at, and with only libblas3 installed its GEMMs run ~15x slower (tiny Stage II
    step 2.8 s instead of 0.13 s), which would make every ratio against it meaningless. The libblas.so.3 that
    torch loaded must be OpenBLAS's (it exports openblas_set_num_threads) or MKL."""
    libs = loaded_blas_libraries()
    blas = [path for path in libs if os.path.basename(path).startswith("libblas.so")]
    def is_fast(path):
        try:
            return "mkl" in path or hasattr(ctypes.CDLL(path), "openblas_set_num_threads")
        except OSError:
            return False
    if all(is_fast(path) for path in blas):
        return
    sys.exit("psa_reference.py --bench: torch's BLAS is " + ", ".join(blas) + ", not OpenBLAS or MKL (netlib's "
             "reference BLAS is ~15x slower): no baseline. Install libopenblas0-pthread (`make deps-bench`).")


def set_threads(torch_threads, blas_threads, setters):
    torch.set_num_threads(torch_threads)
    for f in setters:
        f(ctypes.c_int(blas_threads))


def bench(preset, out_path, steps, warmup, thread_counts, device_name=None):
    device = torch.device(device_name or ("cuda" if preset == "small" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--bench-preset {preset}: CUDA is not available with torch {torch.__version__}; skipped")
        return
    cfg = make_config(preset)
    gen = torch.Generator().manual_seed(0)
    model = PsaVlm(cfg)
    init_weights(model, gen, perturb_norms=False)
    model.to(device).train()
    batch = bench_batch(cfg, BENCH[preset]["batch"], BENCH[preset]["text"], gen, device)
    runs, load_start = [], list(os.getloadavg())
    setters = blas_thread_setters() if device.type == "cpu" else []
    if device.type == "cpu":
        check_fast_blas()
    for n in thread_counts if device.type == "cpu" else [torch.get_num_threads()]:
        run = {"threads": n, "blas_threads_controlled": bool(setters), "configs": []}
        splits = [(n, n)] + ([(1, n)] if n > 1 and setters else [])
        for torch_threads, blas_threads in splits:
            if device.type == "cpu":
                set_threads(torch_threads, blas_threads, setters)
            config = {"torch_threads": torch_threads, "blas_threads": blas_threads}
            for stage in (1, 2):
                params = stage_params(model, stage)
                if device.type == "cuda":
                    # Each stage's peaks on their own, as bench-step measures them (one process a stage): the
                    # previous stage's gradients and cached blocks go first.
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t = time_steps(model, batch, params, steps, warmup, device)
                config[f"stage{stage}_ms"] = round(statistics.median(t), 2)
                config[f"stage{stage}_min_ms"] = round(min(t), 2)
                config[f"stage{stage}_all_ms"] = [round(x, 2) for x in t]
                config[f"stage{stage}_trainable"] = sum(p.numel() for p in params)
                if device.type == "cuda":
                    config[f"stage{stage}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
                    config[f"stage{stage}_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)
            run["configs"].append(config)
        for stage in (1, 2):  # the baseline: the faster split of the n threads, per stage
            best = min(run["configs"], key=lambda c: c[f"stage{stage}_ms"])
            for key, value in best.items():
                if key.startswith(f"stage{stage}_"):
                    run[key] = value
            run[f"stage{stage}_split"] = f"torch {best['torch_threads']} / BLAS {best['blas_threads']}"
        print(f"{preset} {device.type} threads {n}: Stage I {run['stage1_ms']} ms ({run['stage1_split']}), "
              f"Stage II {run['stage2_ms']} ms ({run['stage2_split']}) (median of {steps})")
        runs.append(run)
    last = runs[-1]
    result = {
        "torch_version": torch.__version__,
        "blas_libraries": loaded_blas_libraries(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "preset": preset,
        "batch": BENCH[preset]["batch"],
        "text_tokens": BENCH[preset]["text"],
        "dtype": "float32",
        "step": "forward(classify, lm, safety tokens) + backward + clip_grad_norm 1.0 + AdamW (lr 1e-5, wd 0)",
        "warmup": warmup,
        "steps": steps,
        "statistic": "median",
        "threads": last["threads"],
        "stage1_ms": last["stage1_ms"],
        "stage2_ms": last["stage2_ms"],
        "runs": runs,
        "loadavg_at_start": load_start,
        "loadavg_at_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("wrote", out_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-fixture", metavar="DIR")
    ap.add_argument("--bench", action="store_true", help="CPU timings of the tiny preset")
    ap.add_argument("--bench-preset", choices=["tiny", "small"], help="tiny (CPU) or small (CUDA)")
    ap.add_argument("--out", help="bench JSON (default bench/results/torch_<preset>_<device>.json)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="CPU thread counts, comma-separated")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda for the small preset, else cpu")
    a = ap.parse_args()
    if a.make_fixture:
        make_fixture(a.make_fixture)
    if a.bench or a.bench_preset:
        preset = a.bench_preset or "tiny"
        dev = a.device or ("cuda" if preset == "small" else "cpu")
        out = a.out or f"bench/results/torch_{preset}_{dev}.json"
        bench(preset, out, a.steps, a.warmup, [int(n) for n in a.threads.split(",")], dev)
    if not (a.make_fixture or a.bench or a.bench_preset):
        ap.print_help()


if __name__ == "__main__":
    main()
