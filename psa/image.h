// RGB images for the data pipeline: decode (stb_image), pair pasting, PIL-style bicubic resize,
// CLIP preprocessing to CHW floats, and PNG output for the synthetic generator.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace psa {

// 8-bit RGB, row-major, 3 bytes per pixel: rgb.size() == w * h * 3.
struct Image {
  int w = 0, h = 0;
  std::vector<uint8_t> rgb;

  Image() = default;
  Image(int width, int height, uint8_t fill = 0);
  uint8_t* at(int x, int y) { return &rgb[(static_cast<size_t>(y) * w + x) * 3]; }
  const uint8_t* at(int x, int y) const { return &rgb[(static_cast<size_t>(y) * w + x) * 3]; }
};

// Larger sides are refused before any pixel buffer is allocated (a hostile header could ask for GBs).
constexpr int kMaxImageSide = 16384;
// And more pixels in all: 64 Mi pixels (8192 x 8192) hold every camera and phone photo (<= 50 MP) and 8K
// frames (33 MP) while capping one decode at ~200 MB of RGB plus stb's working copy (~0.6 GB peak). At the
// side limit alone a 4 MB PNG of 16384 x 16384 decoded into 2.3 GB for 18 s, and datasets decode in parallel.
constexpr int kMaxImagePixelsSide = 8192;
constexpr int64_t kMaxImagePixels = int64_t(kMaxImagePixelsSide) * kMaxImagePixelsSide;

// Same constants as CLIPImageProcessor (openai/clip-vit-*).
constexpr float kClipMean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
constexpr float kClipStd[3] = {0.26862954f, 0.26130258f, 0.27577711f};

// PNG, JPEG or BMP (recognised by their magic bytes; stb_image's other decoders are left out as attack
// surface), forced to 3 channels. The file is read once; JPEG Huffman tables are checked before stb_image sees
// them (2.27 overflows on some); a top-down BMP (negative height) is fine; a PNG or BMP palette index past the
// palette reads black (2.27 does not check it; see STB_FLAGS in the Makefile). Errors: "path: cannot decode image:
// <reason>", "path: image too large: WxH (limit 16384 per side)", "path: image too large: WxH = N pixels
// (limit 67108864 = 8192x8192)".
Image load_image(const std::string& path);
// Header-only check with the same errors as load_image (used to validate datasets without decoding).
void check_image(const std::string& path);

// PNG bytes in memory (for an atomic write with json::write_file). With a `software` name, a tEXt chunk
// "Software" carrying it follows the header (PNG spec 11.3.4): how a later run knows a file is one it wrote.
std::string encode_png(const Image& img, const std::string& software = "");
// Whether the file is a PNG whose tEXt "Software" chunk (before its image data) is `software`.
bool png_written_by(const std::string& path, const std::string& software);
// Direct (not atomic) write, for the many images of a generated dataset; errors name the path and errno.
void save_png(const std::string& path, const Image& img);

// The reference's horizontal concatenation for "a<split>b" pairs: black canvas, a at x=0, b at x=wa, all
// top-aligned (pasted once, whatever the number of parts).
Image paste_side_by_side(const std::vector<Image>& parts);
// A record's image field holds at most this many "<split>" parts.
constexpr int kMaxImageParts = 64;

// PIL's BICUBIC (a = -0.5) with its antialias: when shrinking, the kernel support widens by the scale
// factor. Horizontal pass first, rounded to 8 bits in between, as PIL does.
Image resize_bicubic(const Image& img, int w, int h);

// CLIPImageProcessor: shortest edge -> size (bicubic), centre crop size x size, /255, (x - mean) / std.
// Returns [3, size, size] floats, channel-major.
std::vector<float> preprocess(const Image& img, int size);

// "a.png" or "a.png<split>b.png"; relative parts are resolved against base_dir (the JSONL file's folder).
std::vector<std::string> split_image_field(const std::string& field);
std::string resolve_image_path(const std::string& path, const std::string& base_dir);
// Decodes every part of the field and pastes pairs side by side (left to right).
Image load_record_pixels(const std::string& field, const std::string& base_dir);
// preprocess() that first refuses an image whose long side would pass kMaxImageSide at `size` px on its short
// side (an extreme aspect ratio), with an error naming `name` (the file or record field).
std::vector<float> preprocess_named(const Image& img, int size, const std::string& name);
std::vector<float> load_record_image(const std::string& field, const std::string& base_dir, int size);

}  // namespace psa
