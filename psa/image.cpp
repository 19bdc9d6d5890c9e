#include "psa/image.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "nn/json.h"
#include "tensor/error.h"

// The one translation unit that holds the stb implementations (synth.cpp uses stb_truetype's).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wall"
#pragma GCC diagnostic ignored "-Wextra"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
// Only the decoders datasets use: every other stb_image decoder is attack surface for hostile files and
// nothing else (the 2.27 GIF, PSD, PIC, HDR, TGA and PNM readers are the least hardened).
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_TRUETYPE_IMPLEMENTATION
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#include <stb/stb_truetype.h>
#pragma GCC diagnostic pop

namespace psa {

Image::Image(int width, int height, uint8_t fill) : w(width), h(height) {
  PSA_CHECK(width >= 0 && height >= 0, "Image: negative size ", width, "x", height);
  rgb.assign(static_cast<size_t>(width) * height * 3, fill);
}

namespace {

// The whole file, once: header check and decode must see the same bytes. Regular files only (see json.h).
// Errors keep the image contract: "path: cannot decode image: cannot open: <reason>".
std::string read_bytes(const std::string& path) {
  try {
    return json::read_file(path);
  } catch (const Error& e) {
    const std::string msg = e.what();
    fail(path, ": cannot decode image: ", msg.rfind(path + ": ", 0) == 0 ? msg.substr(path.size() + 2) : msg);
  }
}

bool starts_with(const std::string& s, const char* magic, size_t n) { return s.size() >= n && s.compare(0, n, magic, n) == 0; }

size_t be16(const std::string& s, size_t at) { return size_t(uint8_t(s[at])) << 8 | uint8_t(s[at + 1]); }

// One JPEG DHT segment [at, end): stb_image 2.27 trusts each table's 16 code counts and writes up to their sum
// into a 257-byte array, so a sum above 256 (or a table running past the segment) is refused here first.
void check_dht(const std::string& path, const std::string& s, size_t at, size_t end) {
  while (at < end) {
    PSA_CHECK(at + 17 <= end, path, ": cannot decode image: truncated JPEG Huffman table at byte ", at);
    size_t n = 0;
    for (size_t i = 1; i <= 16; ++i) n += uint8_t(s[at + i]);
    PSA_CHECK(n <= 256, path, ": cannot decode image: JPEG Huffman table at byte ", at, " has ", n,
              " codes (at most 256)");
    at += 17 + n;
  }
  PSA_CHECK(at == end, path, ": cannot decode image: JPEG Huffman table runs past its segment");
}

// Walks the JPEG marker segments (skipping entropy-coded data, where progressive files put more tables) and
// checks every Huffman table before stb_image reads any of them.
void check_jpeg(const std::string& path, const std::string& s) {
  size_t at = 2;  // after SOI
  while (at + 4 <= s.size()) {
    if (uint8_t(s[at]) != 0xFF) {  // entropy-coded data: skip to the next real marker
      ++at;
      continue;
    }
    const uint8_t m = uint8_t(s[at + 1]);
    if (m == 0xFF || m == 0x00 || (m >= 0xD0 && m <= 0xD7) || m == 0x01) {  // fill, stuffed byte, RSTn, TEM
      at += m == 0xFF ? 1 : 2;
      continue;
    }
    if (m == 0xD9) return;  // EOI
    const size_t len = be16(s, at + 2);
    PSA_CHECK(len >= 2 && at + 2 + len <= s.size(), path, ": cannot decode image: JPEG segment at byte ", at,
              " runs past the end of the file");
    if (m == 0xC4) check_dht(path, s, at + 4, at + 2 + len);
    at += 2 + len;
  }
}

// stb_image leaves the reason empty on some truncated files.
std::string stb_reason() {
  const char* r = stbi_failure_reason();
  return r && *r ? r : "corrupt or truncated data";
}

const stbi_uc* bytes_of(const std::string& s) { return reinterpret_cast<const stbi_uc*>(s.data()); }

void check_size(const std::string& path, int64_t w, int64_t h) {
  PSA_CHECK(w > 0 && h > 0, path, ": cannot decode image: empty image");
  PSA_CHECK(w <= kMaxImageSide && h <= kMaxImageSide, path, ": image too large: ", w, "x", h, " (limit ",
            kMaxImageSide, " per side)");
  PSA_CHECK(w * h <= kMaxImagePixels, path, ": image too large: ", w, "x", h, " = ", w * h, " pixels (limit ",
            kMaxImagePixels, " = ", kMaxImagePixelsSide, "x", kMaxImagePixelsSide, ")");
}

uint32_t be32(const std::string& s, size_t at) { return uint32_t(be16(s, at)) << 16 | be16(s, at + 2); }

uint32_t le32(const std::string& s, size_t at) {
  return uint32_t(uint8_t(s[at])) | uint32_t(uint8_t(s[at + 1])) << 8 | uint32_t(uint8_t(s[at + 2])) << 16 |
         uint32_t(uint8_t(s[at + 3])) << 24;
}

// An uncompressed BMP's pixel rows must all be in the file: stb_image 2.27 reads missing rows as zeros (a file
// cut after its header decoded as a black image of the size the header claims). Header layouts: the 12-byte
// OS/2 one (16-bit sizes) and the 40+ byte Windows ones; RLE and other compressions are left to stb_image.
void check_bmp(const std::string& path, const std::string& s) {
  PSA_CHECK(s.size() >= 26, path, ": cannot decode image: truncated BMP header");
  const uint32_t header = le32(s, 14);
  const bool os2 = header == 12;
  PSA_CHECK(os2 || (header >= 40 && s.size() >= 34), path, ": cannot decode image: truncated or unknown BMP header");
  const int64_t w = os2 ? int64_t(le32(s, 18) & 0xFFFF) : int64_t(int32_t(le32(s, 18)));
  const int64_t h = os2 ? int64_t(int16_t(le32(s, 20) & 0xFFFF)) : int64_t(int32_t(le32(s, 22)));
  const uint32_t bits = os2 ? le32(s, 22) & 0xFFFF : le32(s, 28) & 0xFFFF, compression = os2 ? 0 : le32(s, 30);
  if (compression != 0 && compression != 3) return;  // BI_RGB, BI_BITFIELDS: rows of fixed size
  const int64_t rows = h < 0 ? -h : h;  // negative: stored top-down
  check_size(path, w, rows);
  const uint64_t row_bytes = (uint64_t(w) * bits + 31) / 32 * 4, need = uint64_t(le32(s, 10)) + row_bytes * rows;
  PSA_CHECK(need <= s.size(), path, ": cannot decode image: truncated BMP (", s.size(), " bytes, its ", w, "x", rows,
            " pixels need ", need, ")");
}

// CRC-32 (ISO 3309, the zlib polynomial, as PNG chunks use) of bytes [at, at + n).
uint32_t crc32_of(const std::string& bytes, size_t at = 0, size_t n = std::string::npos) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
      t[i] = c;
    }
    return t;
  }();
  n = std::min(n, bytes.size() - at);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = at; i < at + n; ++i) c = table[(c ^ (unsigned char)bytes[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// 'IDAT', or its bytes as \xNN where one is not a letter (a damaged type must not reach the terminal raw).
std::string chunk_name(const std::string& type) {
  std::string out = "'";
  for (unsigned char c : type) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "\\x%02X", c);
    out += std::isalpha(c) ? std::string(1, char(c)) : std::string(hex);
  }
  return out + "'";
}

// stb_image checks no CRC: a flipped bit in the pixel data decoded to other pixels without a word. The critical
// chunks (IHDR, PLTE, IDAT, IEND: an upper-case first letter) must match theirs, as libpng insists; a damaged
// ancillary one (text, colour metadata) is left to the decoder, which skips it.
void check_png(const std::string& path, const std::string& s) {
  for (size_t at = 8;;) {
    PSA_CHECK(at + 12 <= s.size(), path, ": cannot decode image: truncated PNG (", s.size(), " bytes, no IEND chunk)");
    const uint32_t len = be32(s, at);
    PSA_CHECK(len <= s.size() - at - 12, path, ": cannot decode image: truncated PNG (chunk at byte ", at, " of ",
              len, " bytes runs past the end of the ", s.size(), "-byte file)");
    const std::string type = s.substr(at + 4, 4);
    if (std::isupper((unsigned char)type[0]))
      PSA_CHECK(crc32_of(s, at + 4, len + 4) == be32(s, at + 8 + len), path, ": cannot decode image: PNG chunk ",
                chunk_name(type), " at byte ", at, " fails its CRC (the file is damaged)");
    if (type == "IEND") return;
    at += 12 + size_t(len);
  }
}

// Format sniffing by magic bytes (the extension says nothing about a hostile file) + format-specific checks.
void check_format(const std::string& path, const std::string& bytes) {
  if (starts_with(bytes, "\x89PNG\r\n\x1a\n", 8)) return;  // check_png, after the size from its header
  if (starts_with(bytes, "BM", 2)) return check_bmp(path, bytes);
  if (starts_with(bytes, "\xFF\xD8", 2)) return check_jpeg(path, bytes);
  fail(path, ": cannot decode image: not a PNG, JPEG or BMP file");
}

// Checks format, header and size limits on bytes already read (so the decoder sees the same bytes).
void check_header(const std::string& path, const std::string& bytes, int* w, int* h) {
  check_format(path, bytes);
  PSA_CHECK(bytes.size() <= size_t(INT32_MAX), path, ": cannot decode image: file larger than 2 GiB");
  // stb_image refuses a PNG past 2^30 bytes of pixels as "unknown image type": the IHDR's size is read here
  // first, so the reason given is the size.
  if (starts_with(bytes, "\x89PNG\r\n\x1a\n", 8) && bytes.size() >= 24 && bytes.compare(12, 4, "IHDR") == 0 &&
      be32(bytes, 16) > 0 && be32(bytes, 20) > 0)
    check_size(path, be32(bytes, 16), be32(bytes, 20));
  if (starts_with(bytes, "\x89PNG\r\n\x1a\n", 8)) check_png(path, bytes);
  int comp = 0;
  if (!stbi_info_from_memory(bytes_of(bytes), int(bytes.size()), w, h, &comp))
    fail(path, ": cannot decode image: ", stb_reason());
  // A negative BMP height means rows stored top-down (valid); stb's info reports it raw, its decoder uses abs().
  if (starts_with(bytes, "BM", 2) && *h < 0 && *h != INT32_MIN) *h = -*h;
  check_size(path, *w, *h);
}

}  // namespace

void check_image(const std::string& path) {
  int w = 0, h = 0;
  check_header(path, read_bytes(path), &w, &h);
}

Image load_image(const std::string& path) {
  const std::string bytes = read_bytes(path);
  int w = 0, h = 0, comp = 0;
  check_header(path, bytes, &w, &h);
  const int header_w = w, header_h = h;
  uint8_t* data = stbi_load_from_memory(bytes_of(bytes), int(bytes.size()), &w, &h, &comp, 3);
  if (!data) fail(path, ": cannot decode image: ", stb_reason());
  // If a decoder disagrees with its own header reader, trust neither size rather than copy w * h * 3 bytes out
  // of a buffer of another size.
  if (w != header_w || h != header_h) {
    stbi_image_free(data);
    fail(path, ": cannot decode image: size ", w, "x", h, " differs from the header's ", header_w, "x", header_h);
  }
  Image img;
  img.w = w;
  img.h = h;
  img.rgb.assign(data, data + static_cast<size_t>(w) * h * 3);
  stbi_image_free(data);
  return img;
}

namespace {

// PNG chunks: length (big-endian), type, data, CRC-32 (ISO 3309, the zlib polynomial) of type and data.
constexpr size_t kPngSignature = 8, kIhdrChunk = 8 + 13 + 4;
constexpr char kSoftwareKey[] = "Software";

std::string big_endian32(uint32_t v) {
  return {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
}

}  // namespace

std::string encode_png(const Image& img, const std::string& software) {
  PSA_CHECK(img.w > 0 && img.h > 0 && img.rgb.size() == static_cast<size_t>(img.w) * img.h * 3,
            "encode_png: bad image ", img.w, "x", img.h, " with ", img.rgb.size(), " bytes");
  std::string out;
  auto append = [](void* ctx, void* data, int n) {
    static_cast<std::string*>(ctx)->append(static_cast<char*>(data), n);
  };
  PSA_CHECK(stbi_write_png_to_func(append, &out, img.w, img.h, 3, img.rgb.data(), img.w * 3), "encode_png: ",
            img.w, "x", img.h, ": the PNG encoder failed");
  if (software.empty()) return out;
  const std::string body = std::string("tEXt") + kSoftwareKey + '\0' + software;
  const std::string chunk = big_endian32((uint32_t)body.size() - 4) + body + big_endian32(crc32_of(body));
  return out.insert(kPngSignature + kIhdrChunk, chunk);
}

bool png_written_by(const std::string& path, const std::string& software) {
  std::ifstream in(path, std::ios::binary);
  std::string head(4096, '\0');  // the chunk follows the header: the first few hundred bytes hold it
  in.read(head.data(), std::streamsize(head.size()));
  head.resize((size_t)in.gcount());
  if (head.compare(0, kPngSignature, "\x89PNG\r\n\x1a\n") != 0) return false;
  for (size_t at = kPngSignature; at + 12 <= head.size();) {
    const uint32_t len = be32(head, at);
    const std::string type = head.substr(at + 4, 4);
    if (type == "IDAT" || len > head.size() - at - 12) return false;
    if (type == "tEXt" && head.substr(at + 8, len) == std::string(kSoftwareKey) + '\0' + software) return true;
    at += 12 + len;
  }
  return false;
}

void save_png(const std::string& path, const Image& img) {
  const std::string bytes = encode_png(img);
  FILE* f = std::fopen(path.c_str(), "wb");
  PSA_CHECK(f, path, ": cannot write png: ", std::strerror(errno));
  const bool written = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int write_err = errno;
  // A small file is only buffered by fwrite: a full disk shows first in fclose's flush, with its own errno.
  const bool closed = std::fclose(f) == 0;
  PSA_CHECK(written && closed, path, ": cannot write png: ", std::strerror(written ? errno : write_err));
}

Image paste_side_by_side(const std::vector<Image>& parts) {
  int w = 0, h = 0;
  for (const Image& p : parts) w += p.w, h = std::max(h, p.h);
  Image out(w, h, 0);
  int left = 0;
  for (const Image& p : parts) {
    for (int y = 0; y < p.h; ++y) std::copy(p.at(0, y), p.at(0, y) + p.w * 3, out.at(left, y));
    left += p.w;
  }
  return out;
}

// ---- PIL-exact bicubic resampling (Pillow src/libImaging/Resample.c) ----

static double bicubic_filter(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow accumulates 8-bit pixels with 22-bit fixed-point weights; copying that makes us bit-exact.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Taps {
  int first = 0;
  std::vector<int32_t> weights;
};

static std::vector<Taps> resample_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  std::vector<Taps> taps(out_size);
  for (int o = 0; o < out_size; ++o) {
    const double center = (o + 0.5) * scale;
    int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
    std::vector<double> k(hi - lo);
    double total = 0;
    for (int i = lo; i < hi; ++i) total += k[i - lo] = bicubic_filter((i - center + 0.5) / filterscale);
    taps[o].first = lo;
    for (double w : k) {
      double v = (total != 0.0 ? w / total : w) * (1 << kPrecisionBits);
      taps[o].weights.push_back(static_cast<int32_t>(v < 0 ? v - 0.5 : v + 0.5));
    }
  }
  return taps;
}

static uint8_t clip8(int64_t acc) {
  acc >>= kPrecisionBits;
  return static_cast<uint8_t>(std::clamp<int64_t>(acc, 0, 255));
}

static Image resample_horizontal(const Image& in, int w) {
  Image out(w, in.h);
  auto taps = resample_taps(in.w, w);
  for (int y = 0; y < in.h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) {
        int64_t acc = int64_t(1) << (kPrecisionBits - 1);
        for (size_t i = 0; i < taps[x].weights.size(); ++i)
          acc += int64_t(in.at(taps[x].first + int(i), y)[c]) * taps[x].weights[i];
        out.at(x, y)[c] = clip8(acc);
      }
  return out;
}

static Image resample_vertical(const Image& in, int h) {
  Image out(in.w, h);
  auto taps = resample_taps(in.h, h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < in.w; ++x)
      for (int c = 0; c < 3; ++c) {
        int64_t acc = int64_t(1) << (kPrecisionBits - 1);
        for (size_t i = 0; i < taps[y].weights.size(); ++i)
          acc += int64_t(in.at(x, taps[y].first + int(i))[c]) * taps[y].weights[i];
        out.at(x, y)[c] = clip8(acc);
      }
  return out;
}

Image resize_bicubic(const Image& img, int w, int h) {
  PSA_CHECK(img.w > 0 && img.h > 0, "resize_bicubic: empty input image");
  PSA_CHECK(w > 0 && h > 0 && w <= kMaxImageSide && h <= kMaxImageSide, "resize_bicubic: bad target size ", w, "x", h);
  Image out = img.w == w ? img : resample_horizontal(img, w);
  return out.h == h ? out : resample_vertical(out, h);
}

std::vector<float> preprocess(const Image& img, int size) {
  PSA_CHECK(size > 0, "preprocess: bad size ", size);
  PSA_CHECK(img.w > 0 && img.h > 0, "preprocess: empty image");
  // transformers' get_resize_output_image_size: the long side is truncated, not rounded.
  const bool wide = img.w >= img.h;
  const int short_side = wide ? img.h : img.w, long_side = wide ? img.w : img.h;
  const int new_long = static_cast<int>(static_cast<int64_t>(size) * long_side / short_side);
  const Image r = wide ? resize_bicubic(img, new_long, size) : resize_bicubic(img, size, new_long);
  const int left = (r.w - size) / 2, top = (r.h - size) / 2;
  std::vector<float> out(static_cast<size_t>(3) * size * size);
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x) {
        float v = r.at(left + x, top + y)[c] * (1.0f / 255.0f);
        out[(static_cast<size_t>(c) * size + y) * size + x] = (v - kClipMean[c]) / kClipStd[c];
      }
  return out;
}

std::vector<std::string> split_image_field(const std::string& field) {
  static const std::string sep = "<split>";
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t pos; (pos = field.find(sep, start)) != std::string::npos; start = pos + sep.size())
    parts.push_back(field.substr(start, pos - start));
  parts.push_back(field.substr(start));
  return parts;
}

std::string resolve_image_path(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path[0] == '/' || base_dir.empty() || base_dir == ".") return path;
  return base_dir.back() == '/' ? base_dir + path : base_dir + "/" + path;
}

Image load_record_pixels(const std::string& field, const std::string& base_dir) {
  const std::vector<std::string> names = split_image_field(field);
  PSA_CHECK(names.size() <= size_t(kMaxImageParts), "image field '", field.substr(0, 200), "...' has ", names.size(),
            " parts (at most ", kMaxImageParts, ")");
  std::vector<Image> parts;
  int64_t w = 0, h = 0;
  for (const std::string& name : names) {
    PSA_CHECK(!name.empty(), "image field '", field, "' has an empty part");
    parts.push_back(load_image(resolve_image_path(name, base_dir)));
    // Each part is within the limits; side by side they must be too, before the paste allocates their sum.
    w += parts.back().w, h = std::max<int64_t>(h, parts.back().h);
    check_size("image field '" + field + "' (its parts side by side)", w, h);
  }
  return parts.size() == 1 ? std::move(parts[0]) : paste_side_by_side(parts);
}

std::vector<float> preprocess_named(const Image& img, int size, const std::string& name) {
  // preprocess() resizes the short side to `size`, so the long side grows by the same factor; past the side
  // limit the resize would fail without naming the file.
  const int64_t short_side = std::min(img.w, img.h), long_side = std::max(img.w, img.h);
  PSA_CHECK(size > 0 && short_side > 0, name, ": preprocess: bad size ", size, " or empty image");
  PSA_CHECK(int64_t(size) * long_side / short_side <= kMaxImageSide, name, ": aspect ratio of ", img.w, "x",
            img.h, " too extreme: at ", size, " px on the short side the long side would exceed ", kMaxImageSide,
            " px (at most ", kMaxImageSide / size, ":1 for this model)");
  return preprocess(img, size);
}

std::vector<float> load_record_image(const std::string& field, const std::string& base_dir, int size) {
  return preprocess_named(load_record_pixels(field, base_dir), size, field);
}

}  // namespace psa
