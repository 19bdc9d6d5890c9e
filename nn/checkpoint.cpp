#include "nn/checkpoint.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "nn/safetensors.h"

namespace psa::nn {
namespace {

float half_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 31, mant = h & 1023;
  float v = exp == 0 ? std::ldexp((float)mant, -24) : exp == 31 ? (mant ? NAN : INFINITY) : std::ldexp((float)(mant | 1024), (int)exp - 25);
  return sign ? -v : v;
}

Tensor to_tensor(const st::TensorView& v) {
  Shape shape(v.shape.begin(), v.shape.end());
  int64_t n = shape_numel(shape);
  auto copy_as = [&](DType dt) {
    Tensor t = Tensor::empty(shape, dt);
    std::memcpy(t.raw(), v.data, v.nbytes);  // the file's data may be unaligned: copy, never cast
    return t;
  };
  switch (v.dtype) {
    case st::DType::F32: return copy_as(DType::f32);
    case st::DType::F64: return copy_as(DType::f64);
    case st::DType::I32: return copy_as(DType::i32);
    case st::DType::I64: return copy_as(DType::i64);
    case st::DType::F16:
    case st::DType::BF16: {
      Tensor t = Tensor::empty(shape, DType::f32);
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, v.data + 2 * i, 2);
        t.data<float>()[i] = half_to_float(h, v.dtype == st::DType::BF16);
      }
      return t;
    }
    case st::DType::I8:
    case st::DType::U8:
    case st::DType::BOOL: {
      Tensor t = Tensor::empty(shape, DType::i32);
      for (int64_t i = 0; i < n; ++i)
        t.data<int32_t>()[i] = v.dtype == st::DType::I8 ? (int32_t)(int8_t)v.data[i] : (int32_t)v.data[i];
      return t;
    }
  }
  fail("unsupported dtype");
}

st::DType file_dtype(DType d) {
  switch (d) {
    case DType::f32: return st::DType::F32;
    case DType::f64: return st::DType::F64;
    case DType::i32: return st::DType::I32;
    case DType::i64: return st::DType::I64;
  }
  return st::DType::F32;
}

// Non-finite weights load (a diverged run is still worth inspecting) but never silently: one warning line.
void warn_non_finite(const std::string& path, const StateDict& tensors) {
  int64_t bad_tensors = 0, bad_values = 0;
  std::string first;
  for (const auto& [name, t] : tensors) {
    int64_t n = 0;
    if (t.dtype() == DType::f32)
      for (int64_t i = 0; i < t.numel(); ++i) n += !std::isfinite(t.data<float>()[i]);
    if (t.dtype() == DType::f64)
      for (int64_t i = 0; i < t.numel(); ++i) n += !std::isfinite(t.data<double>()[i]);
    if (!n) continue;
    if (!bad_tensors++) first = name;
    bad_values += n;
  }
  if (bad_tensors)
    std::fprintf(stderr, "warning: %s: %ld tensor(s) hold NaN/Inf (%ld values; first '%s')\n", path.c_str(),
                 (long)bad_tensors, (long)bad_values, first.c_str());
}

}  // namespace

StateDict read_tensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  st::File f = st::File::open(path);
  StateDict out;
  for (const st::TensorView& v : f.tensors()) out.emplace(v.name, to_tensor(v));
  warn_non_finite(path, out);
  if (metadata) *metadata = f.metadata();
  return out;
}

void require_hashes(const std::string& path, const std::map<std::string, std::string>& metadata) {
  PSA_CHECK(metadata.count(st::kMetadataHashKey), path, ": no stored xxh64 hashes (psa writes one for every tensor "
            "and its metadata): the file was edited or not written by psa");
}

void write_tensors(const std::string& path, const StateDict& tensors, const std::map<std::string, std::string>& metadata) {
  std::vector<Tensor> host;  // keeps host copies alive while writing
  std::vector<st::TensorData> data;
  for (const auto& [name, t] : tensors) {
    host.push_back(t.to(Device::cpu));
    data.push_back({name, file_dtype(t.dtype()), host.back().shape(), host.back().raw(), host.back().nbytes()});
  }
  st::save(path, data, metadata);
}

HfFolder read_hf_folder(const std::string& dir) {
  HfFolder f;
  f.dir = dir;
  f.config = json::parse_file((std::filesystem::path(dir) / "config.json").string());
  for (const std::string& file : st::model_files(dir))
    for (auto& [name, t] : read_tensors(file)) {
      PSA_CHECK(!f.weights.count(name), file, ": tensor '", name, "' also appears in another shard");
      f.weights.emplace(name, t);
    }
  return f;
}

void load_renamed(Module& model, const StateDict& weights, const std::function<std::string(const std::string&)>& rename,
                  const std::string& source, bool strict) {
  StateDict renamed;
  for (const auto& [name, t] : weights) {
    std::string key = rename(name);
    PSA_CHECK(!renamed.count(key), source, ": tensors '", name, "' and another both map to '", key, "'");
    renamed.emplace(key, t);
  }
  model.load_state_dict(renamed, strict, source);
}

static bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

std::string llava_key(const std::string& key) {
  if (starts_with(key, "model.vision_tower.")) return llava_key(key.substr(6));
  if (starts_with(key, "vision_tower.") && !starts_with(key, "vision_tower.vision_model."))
    return "vision_tower.vision_model." + key.substr(13);
  if (starts_with(key, "model.multi_modal_projector.")) return key.substr(6);
  if (starts_with(key, "model.language_model.")) return "language_model.model." + key.substr(21);
  if (key == "lm_head.weight") return "language_model.lm_head.weight";
  return key;
}

std::string clip_key(const std::string& key) {
  for (const char* p : {"vision_tower.vision_model.", "vision_model.", "vision_tower."})
    if (starts_with(key, p)) return key.substr(std::strlen(p));
  return key;
}

}  // namespace psa::nn
