// The shapes the kernel benchmarks run at, shared by bench/kernels.cpp (CPU) and bench/kernels_cuda.cpp (GPU) so
// that their tables line up: each kernel family at the real shapes of the tiny and small presets and at a square
// size. Token rows: tiny 16 x 103 = 1648 merged tokens (32 text - 1 + 8 safety + 64 patches), small 32 x 127 =
// 4064; ViT rows: 65 tokens (CLS + 64 patches) per image; the projector runs on the 64 patch tokens of each image.
// Grids are the C-Abstractor's 8 x 8 over ViT width + N_s.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace psa::bench {

struct Size {
  std::string name;              // tiny, small, square, ...
  std::vector<int64_t> dims;     // what the family's case factory reads
  std::string dims_label = "";  // "": the dims joined by 'x'
};
using Sizes = std::vector<Size>;

namespace shapes {
inline const Sizes logits = {{"tiny", {1648, 512}}, {"small", {4064, 4096}}, {"square", {2048, 2048}}};
inline const Sizes vit_rows = {{"tiny", {1040, 64}}, {"small", {2080, 256}}, {"square", {2048, 2048}}};
inline const Sizes llm_rows = {{"tiny", {1648, 128}}, {"small", {4064, 512}}, {"square", {2048, 2048}}};
inline const Sizes mlp_rows = {{"tiny", {1648, 352}}, {"small", {4064, 1408}}, {"square", {2048, 2048}}};
inline const Sizes projector = {{"tiny", {1024, 128}}, {"small", {2048, 512}}, {"square", {2048, 2048}}};
inline const Sizes heads = {{"tiny", {16, 4, 103, 32}}, {"small", {32, 8, 127, 64}}, {"square", {1, 8, 512, 64}}};
// The ViT's self-attention (not causal): CLS + 64 patches, heads of width / heads.
inline const Sizes vit_heads = {{"tiny", {16, 4, 65, 16}}, {"small", {32, 8, 65, 32}}, {"square", {8, 12, 197, 64}}};
inline const Sizes vocab = {{"tiny", {512, 128, 512}}, {"small", {4096, 512, 1536}}, {"square", {8192, 1024, 8192}}};
inline const Sizes images = {
    {"tiny", {16, 3, 32, 64, 4}}, {"small", {32, 3, 64, 256, 8}}, {"square", {8, 3, 224, 768, 16}}};
inline const Sizes grids = {{"tiny", {16, 8, 8, 72}}, {"small", {32, 8, 8, 272}}, {"square", {8, 32, 32, 256}}};
inline const Sizes pools = {
    {"tiny", {16, 8, 8, 72, 8}}, {"small", {32, 8, 8, 272, 8}}, {"square", {8, 32, 32, 256, 8}}};
}  // namespace shapes

}  // namespace psa::bench
