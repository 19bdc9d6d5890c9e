// safetensors reader (mmap + full validation) and atomic writer. Every check names the file and tensor
// because a checkpoint that loads wrongly is far harder to debug than one that refuses to load.
#include "nn/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include "nn/json.h"
#include "tensor/error.h"

namespace psa::st {

namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the reference implementation's limit as well
const char* const kHashPrefix = "xxh64.";

// Every entry but the hashes, in key order, each key and value NUL-terminated: one text per metadata.
std::string metadata_hash(const std::map<std::string, std::string>& metadata) {
  std::string text;
  for (const auto& [k, v] : metadata)
    if (k.rfind(kHashPrefix, 0) != 0) text += k + '\0' + v + '\0';
  return xxh64_hex(text.data(), text.size());
}

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "F32", 4}, {DType::F64, "F64", 8}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I32, "I32", 4}, {DType::I64, "I64", 8}, {DType::I8, "I8", 1},   {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
};

const DTypeInfo& info(DType d) {
  for (const auto& i : kDTypes)
    if (i.dtype == d) return i;
  fail("safetensors: invalid dtype value ", static_cast<int>(d));
}

// Element count, or false on a negative dimension or overflow of size_t bytes.
bool checked_numel(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* numel) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > UINT64_MAX / static_cast<uint64_t>(d)) return false;
    n *= static_cast<uint64_t>(d);
  }
  if (elem_size && n > SIZE_MAX / elem_size) return false;
  *numel = n;
  return true;
}

std::string range_str(uint64_t b, uint64_t e) { return str_cat("[", b, ",", e, ")"); }

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

size_t dtype_size(DType d) { return info(d).size; }
const char* dtype_name(DType d) { return info(d).name; }

bool dtype_from_name(const std::string& name, DType* out) {
  for (const auto& i : kDTypes)
    if (name == i.name) {
      *out = i.dtype;
      return true;
    }
  return false;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string xxh64_hex(const void* data, size_t n) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(XXH64(data, n, 0)));
  return buf;
}

// ---------------------------------------------------------------- reading

// The file's bytes: mmap'd when possible (checkpoints can be large and are read once), else read.
struct File::Buffer {
  const uint8_t* data = nullptr;
  size_t size = 0;
  void* map = nullptr;
  std::vector<uint8_t> owned;
  ~Buffer() {
    if (map) ::munmap(map, size);
  }
};

namespace {

// A template so that it can fill File's private Buffer type when called from File::open.
template <typename B>
std::shared_ptr<const B> map_file(const std::string& path) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below; regular files ignore it).
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  auto buf = std::make_shared<B>();
  buf->size = static_cast<size_t>(st.st_size);
  if (buf->size > 0) {
    void* m = ::mmap(nullptr, buf->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m != MAP_FAILED) {
      buf->map = m;
      buf->data = static_cast<const uint8_t*>(m);
    } else {
      // Some filesystems cannot mmap; fall back to reading.
      buf->owned.resize(buf->size);
      size_t got = 0;
      while (got < buf->size) {
        ssize_t r = ::read(fd, buf->owned.data() + got, buf->size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
          int err = errno;
          ::close(fd);
          fail(path, ": read error: ", r == 0 ? "unexpected end of file" : std::strerror(err));
        }
        got += static_cast<size_t>(r);
      }
      buf->data = buf->owned.data();
    }
  }
  ::close(fd);
  return buf;
}

}  // namespace

File File::open(const std::string& path, bool verify_hashes) {
  File f;
  f.path_ = path;
  f.buf_ = map_file<Buffer>(path);
  const uint8_t* bytes = f.buf_->data;
  const size_t fsize = f.buf_->size;

  PSA_CHECK(fsize >= 8, path, ": file too short (", fsize, " bytes) to hold the 8-byte header length");
  // Another kind of file (a tokenizer.json, a PNG) read as safetensors gives a huge "header length" from its
  // first 8 bytes: say what it is not rather than only that the number is odd.
  const uint64_t hlen = read_u64_le(bytes);
  PSA_CHECK(hlen <= kMaxHeader, path, ": not a safetensors file: header length ", hlen, " is absurd (limit ",
            kMaxHeader, " bytes; the file has ", fsize, ")");
  PSA_CHECK(hlen <= fsize - 8, path, ": not a safetensors file: header length ", hlen, " past end of file (", fsize,
            " bytes)");
  const uint8_t* data = bytes + 8 + hlen;
  const size_t data_size = fsize - 8 - static_cast<size_t>(hlen);

  json::Value header;
  try {
    header = json::parse(std::string(reinterpret_cast<const char*>(bytes + 8), hlen), "header");
  } catch (const Error& e) {
    // A header that does not even open an object is another file whose first bytes happen to fit.
    const std::string lead(reinterpret_cast<const char*>(bytes + 8), std::min<uint64_t>(hlen, 64));
    const size_t first = lead.find_first_not_of(" \t\r\n");
    PSA_CHECK(first == std::string::npos || lead[first] == '{' || lead[first] == '[', path,
              ": not a safetensors file (the header after the 8-byte length does not start with '{')");
    fail(path, ": header is not valid JSON: ", e.what());
  }
  PSA_CHECK(header.is_object(), path, ": header is not a JSON object (got ", json::kind_name(header.kind), ")");

  for (const auto& [name, entry] : header.obj) {
    if (name == "__metadata__") {
      PSA_CHECK(entry.is_object(), path, ": __metadata__ is not an object");
      for (const auto& [k, v] : entry.obj) {
        PSA_CHECK(v.is_string(), path, ": __metadata__ key '", k, "': value is not a string (got ",
                  json::kind_name(v.kind), ")");
        f.metadata_[k] = v.str;
      }
      continue;
    }
    const std::string where = str_cat(path, ": tensor '", name, "': ");
    PSA_CHECK(entry.is_object(), where, "entry is not an object");
    const json::Value* jd = entry.find("dtype");
    const json::Value* js = entry.find("shape");
    const json::Value* jo = entry.find("data_offsets");
    PSA_CHECK(jd && jd->is_string(), where, "missing or non-string 'dtype'");
    PSA_CHECK(js && js->is_array(), where, "missing or non-array 'shape'");
    PSA_CHECK(jo && jo->is_array(), where, "missing or non-array 'data_offsets'");

    TensorView t;
    t.name = name;
    PSA_CHECK(dtype_from_name(jd->str, &t.dtype), where, "unknown dtype '", jd->str, "'");
    for (const auto& d : js->arr) {
      PSA_CHECK(d.is_int(), where, "shape has a non-integer dimension ", json::dump(*js));
      t.shape.push_back(d.as_int());
    }
    for (int64_t d : t.shape) PSA_CHECK(d >= 0, where, "shape ", shape_str(t.shape), " has a negative dimension");
    uint64_t numel = 0;
    const size_t esize = dtype_size(t.dtype);
    PSA_CHECK(checked_numel(t.shape, esize, &numel), where, "element count of shape ", shape_str(t.shape),
              " overflows");

    const auto& off = jo->arr;
    PSA_CHECK(off.size() == 2 && off[0].is_int() && off[1].is_int() && off[0].num >= 0 && off[1].num >= 0, where,
              "data_offsets must be 2 non-negative integers, got ", json::dump(*jo));
    const uint64_t begin = static_cast<uint64_t>(off[0].as_int());
    const uint64_t end = static_cast<uint64_t>(off[1].as_int());
    PSA_CHECK(begin <= end, where, "data_offsets ", json::dump(*jo), ": begin > end");
    PSA_CHECK(end <= data_size, where, "data range ", range_str(begin, end), " past end of data (", data_size,
              " bytes)");
    const uint64_t expect = numel * esize;
    PSA_CHECK(end - begin == expect, where, "data size ", end - begin, " bytes != ", numel, " elements x ", esize,
              " bytes (", jd->str, " ", shape_str(t.shape), ")");
    t.data = data + begin;
    t.nbytes = static_cast<size_t>(end - begin);
    f.index_.emplace(name, f.tensors_.size());  // names are unique: the parser rejects duplicate keys
    f.tensors_.push_back(std::move(t));
  }

  // Overlap and coverage: sorted by start, each non-empty range begins exactly where the previous one ends, the
  // first at 0 and the last ending with the file (as the safetensors library requires: no bytes that belong
  // to no tensor, trailing ones included).
  std::vector<const TensorView*> order;
  for (const auto& t : f.tensors_)
    if (t.nbytes) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) { return a->data < b->data; });
  for (size_t i = 1; i < order.size(); ++i) {
    const TensorView* a = order[i - 1];
    const TensorView* b = order[i];
    if (b->data < a->data + a->nbytes) {
      auto r = [&](const TensorView* t) {
        uint64_t s = static_cast<uint64_t>(t->data - data);
        return range_str(s, s + t->nbytes);
      };
      fail(path, ": tensor '", b->name, "': data range ", r(b), " overlaps tensor '", a->name, "' ", r(a));
    }
  }
  uint64_t covered = 0;
  for (const TensorView* t : order) {
    const uint64_t start = static_cast<uint64_t>(t->data - data);
    PSA_CHECK(start == covered, path, ": data bytes ", range_str(covered, start), " belong to no tensor (before '",
              t->name, "')");
    covered = start + t->nbytes;
  }
  PSA_CHECK(covered == data_size, path, ": data bytes ", range_str(covered, data_size),
            " after the last tensor belong to no tensor");

  if (verify_hashes) {
    if (auto it = f.metadata_.find(kMetadataHashKey); it != f.metadata_.end()) {
      const std::string got = metadata_hash(f.metadata_);
      PSA_CHECK(it->second == got, path, ": __metadata__ does not match its xxh64 (stored ", it->second,
                ", computed ", got, "): the header was edited or damaged");
    }
    for (const auto& [key, stored] : f.metadata_) {
      if (key.rfind(kHashPrefix, 0) != 0 || key == kMetadataHashKey) continue;
      const std::string name = key.substr(std::strlen(kHashPrefix));
      const TensorView* t = f.find(name);
      PSA_CHECK(t, path, ": __metadata__ has '", key, "' but no tensor '", name, "'");
      std::string want = stored;
      std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
      const std::string got = xxh64_hex(t->data, t->nbytes);
      PSA_CHECK(want == got, path, ": tensor '", name, "': xxh64 mismatch (stored ", stored, ", computed ", got, ")");
    }
    // This writer stores a hash for every tensor and one for the metadata: a file with some but not all of them
    // had hashes removed along with whatever was changed.
    if (f.hashed()) {
      PSA_CHECK(f.metadata_.count(kMetadataHashKey), path, ": the tensors have xxh64 hashes but __metadata__ has "
                "none (psa writes both): the header was edited, or a psa from before 2026-12 wrote it (train or "
                "save it again)");
      for (const TensorView& t : f.tensors_)
        PSA_CHECK(f.metadata_.count(kHashPrefix + t.name), path, ": tensor '", t.name, "' has no xxh64 though the "
                  "file stores hashes (psa writes one for every tensor): the header was edited");
    }
  }
  return f;
}

bool File::hashed() const {
  auto it = metadata_.lower_bound(kHashPrefix);
  return it != metadata_.end() && it->first.rfind(kHashPrefix, 0) == 0;
}

const TensorView* File::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView& File::at(const std::string& name) const {
  const TensorView* t = find(name);
  PSA_CHECK(t, path_, ": no tensor '", name, "'");
  return *t;
}

// ---------------------------------------------------------------- writing

namespace {

// Owns the temp file until it is renamed into place; removes it on any failure.
struct TempFile {
  std::string path;
  FILE* f = nullptr;
  bool done = false;
  ~TempFile() {
    if (f) std::fclose(f);
    if (!done && !path.empty()) ::unlink(path.c_str());
  }
};

void check_tensor(const std::string& path, const TensorData& t, std::set<std::string>& names) {
  const std::string where = str_cat(path, ": tensor '", t.name, "': ");
  PSA_CHECK(!t.name.empty(), path, ": cannot save a tensor with an empty name");
  PSA_CHECK(t.name != "__metadata__", where, "name is reserved");
  PSA_CHECK(names.insert(t.name).second, where, "duplicate name");
  uint64_t numel = 0;
  const size_t esize = dtype_size(t.dtype);
  PSA_CHECK(checked_numel(t.shape, esize, &numel), where, "invalid shape ", shape_str(t.shape));
  PSA_CHECK(t.nbytes == numel * esize, where, "nbytes ", t.nbytes, " != ", numel, " elements x ", esize, " bytes (",
            dtype_name(t.dtype), " ", shape_str(t.shape), ")");
  PSA_CHECK(t.data || t.nbytes == 0, where, "null data");
}

// Fault injection for the crash-safety tests: PSA_TEST_KILL_DURING_SAVE=N makes the N-th save() of this
// process SIGKILL itself half-way through writing the data, exactly the moment an atomic write must survive.
bool kill_this_save() {
  static int calls = 0;
  const char* n = std::getenv("PSA_TEST_KILL_DURING_SAVE");
  return n && ++calls == std::atoi(n);
}

[[noreturn]] void die_mid_write(FILE* f) {
  std::fflush(f);
  ::fsync(::fileno(f));
  std::raise(SIGKILL);
  std::abort();  // not reached
}

}  // namespace

void save(const std::string& link_or_file, const std::vector<TensorData>& tensors,
          const std::map<std::string, std::string>& metadata) {
  const std::string path = json::write_target(link_or_file);  // a symbolic link is written through
  std::set<std::string> names;
  for (const auto& t : tensors) check_tensor(path, t, names);
  // Caller "xxh64.*" keys (e.g. metadata copied from a loaded file) are dropped: hashes are recomputed.
  json::Value meta = json::Value::object();
  for (const auto& [k, v] : metadata)
    if (k.rfind(kHashPrefix, 0) != 0) meta.obj.emplace_back(k, v);
  for (const auto& t : tensors) meta.obj.emplace_back(kHashPrefix + t.name, xxh64_hex(t.data, t.nbytes));
  meta.obj.emplace_back(kMetadataHashKey, metadata_hash(metadata));

  json::Value header = json::Value::object();
  header.obj.emplace_back("__metadata__", std::move(meta));
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    json::Value e = json::Value::object();
    e.set("dtype", dtype_name(t.dtype));
    json::Value shape = json::Value::array();
    for (int64_t d : t.shape) shape.push(d);
    e.set("shape", std::move(shape));
    json::Value off = json::Value::array();
    off.push(offset);
    off.push(offset + t.nbytes);
    e.set("data_offsets", std::move(off));
    header.obj.emplace_back(t.name, std::move(e));
    offset += t.nbytes;
  }
  std::string htext = json::dump(header);
  htext.append((8 - htext.size() % 8) % 8, ' ');  // data buffer starts 8-aligned
  PSA_CHECK(htext.size() <= kMaxHeader, path, ": header of ", htext.size(), " bytes exceeds the format's limit");

  TempFile tmp;
  const json::TempFile created = json::create_temp_beside(path);
  tmp.path = created.path;
  tmp.f = created.f;

  auto write = [&](const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, tmp.f) != n) fail(path, ": write failed: ", std::strerror(errno));
  };
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(htext.size()) >> (8 * i));
  write(len, 8);
  write(htext.data(), htext.size());
  const bool die = kill_this_save();
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (die && i == tensors.size() / 2) die_mid_write(tmp.f);
    write(tensors[i].data, tensors[i].nbytes);
  }
  if (die) die_mid_write(tmp.f);
  if (std::fflush(tmp.f) != 0) fail(path, ": flush failed: ", std::strerror(errno));
  if (::fsync(::fileno(tmp.f)) != 0) fail(path, ": fsync failed: ", std::strerror(errno));
  FILE* f = tmp.f;
  tmp.f = nullptr;
  if (std::fclose(f) != 0) fail(path, ": close failed: ", std::strerror(errno));
  if (::rename(tmp.path.c_str(), path.c_str()) != 0) fail(path, ": rename from ", tmp.path, ": ", std::strerror(errno));
  tmp.done = true;
  json::sync_dir_of(path);
}

// ---------------------------------------------------------------- model folders

std::vector<std::string> model_files(const std::string& dir) {
  const std::string single = join(dir, "model.safetensors");
  if (exists(single)) return {single};
  const std::string index = join(dir, "model.safetensors.index.json");
  PSA_CHECK(exists(index), dir, ": no model.safetensors or model.safetensors.index.json");
  json::Value v = json::parse_file(index);
  PSA_CHECK(v.is_object(), index, ": not a JSON object");
  const json::Value* map = v.find("weight_map");
  PSA_CHECK(map && map->is_object(), index, ": missing or non-object 'weight_map'");
  std::vector<std::string> files;
  std::set<std::string> seen;
  for (const auto& [tensor, shard] : map->obj) {
    PSA_CHECK(shard.is_string(), index, ": weight_map['", tensor, "'] is not a string");
    const std::string& name = shard.str;
    // Shards live beside the index; refuse paths that would escape the folder.
    PSA_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "..", index, ": weight_map['", tensor,
              "']: invalid shard file name '", name, "'");
    if (!seen.insert(name).second) continue;
    const std::string file = join(dir, name);
    PSA_CHECK(exists(file), index, ": shard '", name, "' (for tensor '", tensor, "') not found");
    files.push_back(file);
  }
  PSA_CHECK(!files.empty(), index, ": weight_map is empty");
  return files;
}

}  // namespace psa::st
