// safetensors files on raw bytes: an 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data
// buffer (offsets relative to its start). Independent of the tensor type; nn/ converts views to tensors.
// Our checkpoints store an XXH64 of every tensor in __metadata__ ("xxh64.<name>") and one of the other metadata
// entries ("xxh64.__metadata__": the config is as much a part of the model as its weights); reading verifies
// them, and files without them (as Hugging Face writes) load unchanged.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace psa::st {

enum class DType { F32, F64, F16, BF16, I32, I64, I8, U8, BOOL };
size_t dtype_size(DType);
const char* dtype_name(DType);  // as in the format: "F32", "BF16", "BOOL", ...
bool dtype_from_name(const std::string& name, DType* out);

// A tensor inside an open File. `data` points into the file's buffer and may be unaligned for the
// dtype (the format packs tensors without padding): copy with memcpy rather than casting.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // empty = 0-d scalar
  const uint8_t* data;
  size_t nbytes;
  int64_t numel() const;
};

// The hash of the other metadata entries (the model config, the LoRA settings...): an edit of one byte there
// changes what a checkpoint computes as surely as an edit of its weights. "__metadata__" is no tensor's name.
constexpr const char* kMetadataHashKey = "xxh64.__metadata__";

// A whole file mapped into memory and validated on open. Copies share the mapping; views stay valid
// while any copy lives.
class File {
 public:
  // Errors are one line naming the path and the tensor, e.g.
  // "m.safetensors: tensor 'w': data range [100,400) past end of data (300 bytes)".
  static File open(const std::string& path, bool verify_hashes = true);

  const std::vector<TensorView>& tensors() const { return tensors_; }  // in header order
  const TensorView* find(const std::string& name) const;
  const TensorView& at(const std::string& name) const;  // throws "path: no tensor 'name'"
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // True when the file stores xxh64 hashes (this writer's files; Hugging Face's have none). open() then
  // insists on one for every tensor and one for the metadata.
  bool hashed() const;

 private:
  struct Buffer;
  std::string path_;
  std::shared_ptr<const Buffer> buf_;
  std::vector<TensorView> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

struct TensorData {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;
};

// Writes atomically (temp file in the same directory, fwrite, fflush, fsync, rename, fsync of the
// directory), so a crash leaves either the old file or the new one. Tensors are laid out in the given
// order; the header is space-padded to a multiple of 8 as Hugging Face does. __metadata__ gets
// "xxh64.<name>" for every tensor plus the caller's entries (e.g. "config" = JSON text).
void save(const std::string& path, const std::vector<TensorData>& tensors,
          const std::map<std::string, std::string>& metadata = {});

// 16 lowercase hex digits of XXH64 with seed 0.
std::string xxh64_hex(const void* data, size_t n);

// Weight files of a Hugging Face model folder: [dir/model.safetensors] when it exists (as
// transformers prefers it), else the distinct shards named in dir/model.safetensors.index.json's
// "weight_map", in first-mention order.
std::vector<std::string> model_files(const std::string& dir);

}  // namespace psa::st
