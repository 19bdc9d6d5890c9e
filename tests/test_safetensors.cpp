// safetensors: round trips, atomic writes, real Hugging Face files, and one crafted file per broken rule
// (tests/data/bad/, made by tests/data/bad/make_bad.py).
#include <dirent.h>
#include <gtest/gtest.h>

#include "test_util.h"
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>

#include "nn/checkpoint.h"
#include "nn/json.h"
#include "nn/safetensors.h"
#include "tensor/error.h"

namespace st = psa::st;
using st::DType;

namespace {

using psa::test::error_of;

std::string bad(const std::string& name) { return "tests/data/bad/" + name + ".safetensors"; }

// Fresh empty directory per test so "no temp file left" can be checked by listing it.
std::string fresh_dir(const std::string& tag) {
  std::string dir = ::testing::TempDir() + "psa_st_" + tag + "_" + std::to_string(::getpid());
  std::string cmd = "rm -rf '" + dir + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(::mkdir(dir.c_str(), 0755), 0) << dir;
  return dir;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d))
    if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.push_back(e->d_name);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::string read_all(const std::string& path) { return psa::json::read_file(path); }

}  // namespace

TEST(Safetensors, DTypeNamesAndSizes) {
  const std::pair<DType, size_t> all[] = {{DType::F32, 4}, {DType::F64, 8}, {DType::F16, 2},
                                          {DType::BF16, 2}, {DType::I32, 4}, {DType::I64, 8},
                                          {DType::I8, 1},  {DType::U8, 1},  {DType::BOOL, 1}};
  for (auto [d, size] : all) {
    EXPECT_EQ(st::dtype_size(d), size);
    DType back;
    ASSERT_TRUE(st::dtype_from_name(st::dtype_name(d), &back));
    EXPECT_EQ(back, d);
  }
  DType x;
  EXPECT_FALSE(st::dtype_from_name("f32", &x));
  EXPECT_EQ(std::string(st::dtype_name(DType::BF16)), "BF16");
}

TEST(Safetensors, Xxh64Hex) {
  // Reference values of XXH64 with seed 0.
  EXPECT_EQ(st::xxh64_hex("", 0), "ef46db3751d8e999");
  EXPECT_EQ(st::xxh64_hex("abc", 3), "44bc2cf5ad770999");
}

TEST(Safetensors, RoundTripDtypesAndShapes) {
  std::string dir = fresh_dir("rt");
  std::string path = dir + "/ckpt.safetensors";
  std::vector<float> f32 = {1.5f, -2.f, 3.25f, 0.f, 1e-30f, 7.f};
  std::vector<double> f64 = {3.141592653589793, -1e300};
  std::vector<uint16_t> bf16 = {0x3f80, 0xbf80, 0x7f80};
  std::vector<uint16_t> f16 = {0x3c00};
  std::vector<int32_t> i32 = {-1, 2, 2147483647};
  std::vector<int64_t> i64 = {-100, int64_t(1) << 62};
  std::vector<int8_t> i8 = {-128, 127, 0};  // odd size: the next tensor starts unaligned
  std::vector<uint8_t> u8 = {0, 255, 7, 9};
  std::vector<uint8_t> bools = {1, 0};
  float scalar = 42.f;
  std::vector<st::TensorData> in = {
      {"w.f32", DType::F32, {2, 3}, f32.data(), f32.size() * 4},
      {"i8", DType::I8, {3}, i8.data(), 3},
      {"f64", DType::F64, {2}, f64.data(), 16},
      {"bf16", DType::BF16, {1, 3}, bf16.data(), 6},
      {"f16", DType::F16, {1, 1, 1}, f16.data(), 2},
      {"i32", DType::I32, {3}, i32.data(), 12},
      {"i64", DType::I64, {2, 1}, i64.data(), 16},
      {"u8", DType::U8, {2, 2}, u8.data(), 4},
      {"mask", DType::BOOL, {2}, bools.data(), 2},
      {"scalar", DType::F32, {}, &scalar, 4},
      {"empty", DType::F32, {0, 5}, nullptr, 0},
  };
  st::save(path, in);

  // 8-byte header length then a header padded to a multiple of 8, as Hugging Face writes it.
  std::string raw = read_all(path);
  uint64_t hlen;
  std::memcpy(&hlen, raw.data(), 8);
  EXPECT_EQ(hlen % 8, 0u);
  EXPECT_EQ(raw[8], '{');

  st::File f = st::File::open(path);
  ASSERT_EQ(f.tensors().size(), in.size());
  EXPECT_EQ(f.path(), path);
  for (size_t i = 0; i < in.size(); ++i) {
    const st::TensorView& t = f.tensors()[i];
    EXPECT_EQ(t.name, in[i].name);  // file order = save order
    EXPECT_EQ(t.dtype, in[i].dtype) << t.name;
    EXPECT_EQ(t.shape, in[i].shape) << t.name;
    ASSERT_EQ(t.nbytes, in[i].nbytes) << t.name;
    if (t.nbytes) {
      EXPECT_EQ(std::memcmp(t.data, in[i].data, t.nbytes), 0) << t.name;
    }
    EXPECT_EQ(f.metadata().at("xxh64." + t.name), st::xxh64_hex(in[i].data, in[i].nbytes));
  }
  // Laid out back to back in the given order.
  EXPECT_EQ(f.at("i8").data, f.at("w.f32").data + 24);
  EXPECT_EQ(f.at("f64").data, f.at("i8").data + 3);
  EXPECT_TRUE(f.at("scalar").shape.empty());
  EXPECT_EQ(f.at("scalar").numel(), 1);
  EXPECT_EQ(f.at("empty").numel(), 0);
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_EQ(error_of([&] { f.at("nope"); }), path + ": no tensor 'nope'");
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, MetadataRoundTrip) {
  std::string dir = fresh_dir("meta");
  std::string path = dir + "/m.safetensors";
  psa::json::Value cfg = psa::json::Value::object();
  cfg.set("hidden_size", 64).set("name", "tiny \"quoted\"\n\xC3\xA9");
  std::map<std::string, std::string> meta = {{"config", psa::json::dump(cfg)}, {"format", "pt"}, {"step", "12"}};
  int32_t x = 5;
  st::save(path, {{"x", DType::I32, {1}, &x, 4}}, meta);
  st::File f = st::File::open(path);
  EXPECT_EQ(f.metadata().size(), meta.size() + 2);  // and the hashes of the tensor and of the metadata
  for (const auto& [k, v] : meta) EXPECT_EQ(f.metadata().at(k), v) << k;
  EXPECT_EQ(psa::json::parse(f.metadata().at("config")), cfg);

  // Re-saving a loaded file's metadata works: its stale hashes are replaced, not kept.
  int32_t y = 6;
  st::save(path, {{"x", DType::I32, {1}, &y, 4}}, f.metadata());
  st::File g = st::File::open(path);
  EXPECT_EQ(g.metadata().at("xxh64.x"), st::xxh64_hex(&y, 4));
  EXPECT_EQ(g.metadata().at("format"), "pt");
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, AtomicWriteLeavesNoTempFile) {
  std::string dir = fresh_dir("atomic");
  std::string path = dir + "/model.safetensors";
  std::vector<float> a(1000, 1.f), b(10, 2.f);
  st::save(path, {{"a", DType::F32, {1000}, a.data(), 4000}});
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"model.safetensors"});
  // Overwriting replaces the file whole.
  st::save(path, {{"b", DType::F32, {10}, b.data(), 40}});
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"model.safetensors"});
  st::File f = st::File::open(path);
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].name, "b");
  // A failed save (inconsistent size) leaves the old file and no temp file behind.
  std::string e = error_of([&] { st::save(path, {{"c", DType::F32, {10}, b.data(), 39}}); });
  EXPECT_NE(e.find("nbytes 39 != 10 elements x 4 bytes"), std::string::npos) << e;
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(st::File::open(path).tensors()[0].name, "b");
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, SaveRejectsBadInput) {
  std::string dir = fresh_dir("savebad");
  std::string path = dir + "/x.safetensors";
  float v[2] = {1, 2};
  EXPECT_NE(error_of([&] {
              st::save(path, {{"a", DType::F32, {1}, v, 4}, {"a", DType::F32, {1}, v + 1, 4}});
            }).find("tensor 'a': duplicate name"),
            std::string::npos);
  EXPECT_NE(error_of([&] { st::save(path, {{"__metadata__", DType::F32, {1}, v, 4}}); }).find("reserved"),
            std::string::npos);
  EXPECT_NE(error_of([&] { st::save(path, {{"n", DType::F32, {-1}, v, 4}}); }).find("invalid shape [-1]"),
            std::string::npos);
  std::string e = error_of([&] { st::save(dir + "/no/such/dir/x.safetensors", {{"a", DType::F32, {1}, v, 4}}); });
  EXPECT_NE(e.find("cannot create a temp file beside it"), std::string::npos) << e;
  EXPECT_TRUE(list_dir(dir).empty());
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, OpensRealHuggingFaceFiles) {
  int opened = 0;
  for (const char* name : {"clip_vision", "llama", "llava", "mha", "c_abstractor"}) {
    for (const char* file : {"model.safetensors", "io.safetensors"}) {
      std::string path = std::string("tests/data/hf/") + name + "/" + file;
      if (::access(path.c_str(), R_OK) != 0) continue;  // fixtures live outside the repo
      st::File f = st::File::open(path);
      EXPECT_FALSE(f.tensors().empty()) << path;
      for (const auto& t : f.tensors()) EXPECT_EQ(t.nbytes, t.numel() * st::dtype_size(t.dtype)) << t.name;
      ++opened;
    }
  }
  ASSERT_GT(opened, 0) << "no fixtures under tests/data/hf";
  EXPECT_EQ(opened, 10);
  st::File llama = st::File::open("tests/data/hf/llama/io.safetensors");
  EXPECT_EQ(llama.at("input_ids").dtype, DType::I64);
  EXPECT_EQ(llama.at("input_ids").shape, (std::vector<int64_t>{2, 12}));
  st::File model = st::File::open("tests/data/hf/llama/model.safetensors");
  EXPECT_EQ(model.metadata().at("format"), "pt");
  EXPECT_EQ(model.at("lm_head.weight").shape, (std::vector<int64_t>{97, 64}));
}

TEST(Safetensors, ModelFiles) {
  std::string dir = fresh_dir("shards");
  EXPECT_EQ(error_of([&] { st::model_files(dir); }), dir + ": no model.safetensors or model.safetensors.index.json");
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << R"({"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors",
              "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}})";
  }
  std::string e = error_of([&] { st::model_files(dir); });
  EXPECT_NE(e.find("shard 'model-00001-of-00002.safetensors' (for tensor 'a') not found"), std::string::npos) << e;
  float v = 1;
  st::save(dir + "/model-00001-of-00002.safetensors", {{"a", DType::F32, {}, &v, 4}});
  st::save(dir + "/model-00002-of-00002.safetensors", {{"b", DType::F32, {}, &v, 4}});
  EXPECT_EQ(st::model_files(dir), (std::vector<std::string>{dir + "/model-00001-of-00002.safetensors",
                                                            dir + "/model-00002-of-00002.safetensors"}));
  st::save(dir + "/model.safetensors", {{"a", DType::F32, {}, &v, 4}});
  EXPECT_EQ(st::model_files(dir + "/"), std::vector<std::string>{dir + "/model.safetensors"});
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, MissingFile) {
  EXPECT_EQ(error_of([] { st::File::open("tests/data/bad/nonexistent.safetensors"); }),
            "tests/data/bad/nonexistent.safetensors: cannot open: No such file or directory");
}

// ---------------------------------------------------------------- one crafted file per broken rule

struct BadCase {
  const char* file;
  const char* reason;  // substring the one-line error must contain after the file name
};

class SafetensorsBad : public ::testing::TestWithParam<BadCase> {};

TEST_P(SafetensorsBad, RejectedWithFileAndReason) {
  const BadCase& c = GetParam();
  std::string path = bad(c.file);
  ASSERT_EQ(::access(path.c_str(), R_OK), 0) << path << " missing (run tests from the repo root)";
  std::string e = error_of([&] { st::File::open(path); });
  EXPECT_EQ(e.rfind(path + ": ", 0), 0u) << "error does not start with the path: " << e;
  EXPECT_NE(e.find(c.reason), std::string::npos) << "expected '" << c.reason << "' in: " << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << "error is not one line: " << e;
}

INSTANTIATE_TEST_SUITE_P(
    Files, SafetensorsBad,
    ::testing::Values(
        BadCase{"truncated", "file too short (3 bytes)"},
        BadCase{"header_absurd", "header length 1099511627776 is absurd"},
        BadCase{"header_past_end", "header length 4096 past end of file (88 bytes)"},
        BadCase{"not_json", "header is not valid JSON: header:1:"},
        BadCase{"not_object", "header is not a JSON object (got array)"},
        BadCase{"bad_dtype", "tensor 'w': unknown dtype 'F17'"},
        BadCase{"negative_dim", "tensor 'w': shape [-4] has a negative dimension"},
        BadCase{"numel_overflow", "tensor 'w': element count of shape [1099511627776,1099511627776] overflows"},
        BadCase{"bad_offsets", "tensor 'w': data_offsets must be 2 non-negative integers, got [0]"},
        BadCase{"offsets_reversed", "tensor 'w': data_offsets [16,8]: begin > end"},
        BadCase{"offsets_past_end", "tensor 'lm_head.weight': data range [16,32) past end of data (16 bytes)"},
        BadCase{"size_mismatch", "tensor 'w': data size 16 bytes != 3 elements x 4 bytes (F32 [3])"},
        BadCase{"overlap", "tensor 'b': data range [8,16) overlaps tensor 'a' [0,12)"},
        BadCase{"gap", "data bytes [4,8) belong to no tensor (before 'b')"},
        BadCase{"trailing_bytes", "data bytes [8,16) after the last tensor belong to no tensor"},
        BadCase{"dup_key", "duplicate key 'w'"},
        BadCase{"metadata_not_string", "__metadata__ key 'step': value is not a string (got number)"},
        BadCase{"hash_mismatch", "tensor 'w': xxh64 mismatch (stored 0000000000000000, computed "},
        BadCase{"hash_orphan", "__metadata__ has 'xxh64.gone' but no tensor 'gone'"}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return std::string(info.param.file); });

TEST(Safetensors, HashMismatchNamesComputedHash) {
  std::string path = bad("hash_mismatch");
  st::File f = st::File::open(path, /*verify_hashes=*/false);  // skipping verification loads it
  const st::TensorView& w = f.at("w");
  std::string e = error_of([&] { st::File::open(path); });
  EXPECT_EQ(e, path + ": tensor 'w': xxh64 mismatch (stored 0000000000000000, computed " +
                   st::xxh64_hex(w.data, w.nbytes) + ")");
}

// One byte of the config changed in place ("hidden_size": 64 -> 84, same length): the weights' hashes still
// matched, and the model silently computed something else.
TEST(Safetensors, EditedMetadataIsDetected) {
  std::string dir = fresh_dir("meta_edit");
  std::string path = dir + "/c.safetensors";
  std::vector<float> w = {1, 2, 3, 4};
  st::save(path, {{"w", DType::F32, {4}, w.data(), 16}}, {{"config", "{\"hidden_size\": 64}"}});
  std::string raw = read_all(path);
  const size_t at = raw.find("hidden_size\\\": 64");
  ASSERT_NE(at, std::string::npos) << raw.substr(0, 200);
  raw[raw.find("64", at)] = '8';
  std::ofstream(path, std::ios::binary) << raw;
  EXPECT_EQ(st::File::open(path, false).metadata().at("config"), "{\"hidden_size\": 84}");
  const std::string e = error_of([&] { st::File::open(path); });
  EXPECT_NE(e.find(path + ": __metadata__ does not match its xxh64"), std::string::npos) << e;
  std::system(("rm -rf '" + dir + "'").c_str());
}

// Blanks the metadata entry "key": "value" of a safetensors header in place (same length, still valid JSON).
void blank_metadata_entry(std::string& raw, const std::string& key) {
  size_t begin = raw.find("\"" + key + "\"");
  ASSERT_NE(begin, std::string::npos) << key;
  const size_t value = raw.find('"', raw.find(':', begin + key.size() + 2));
  size_t end = raw.find('"', value + 1) + 1;
  if (raw[end] == ',') ++end;
  else begin = raw.rfind(',', begin);  // the last entry: its comma is before it
  std::fill(raw.begin() + begin, raw.begin() + end, ' ');
}

// A data byte changed and its hash removed from the header: the file still carries the other hashes, so the
// missing one is an edit, not a foreign writer. With every hash removed it reads like a Hugging Face file, and
// only psa's own loaders (require_hashes) catch it.
TEST(Safetensors, StrippedHashesAreDetected) {
  std::string dir = fresh_dir("stripped");
  std::string path = dir + "/c.safetensors";
  std::vector<float> a = {1, 2}, b = {3, 4};
  st::save(path, {{"a", DType::F32, {2}, a.data(), 8}, {"b", DType::F32, {2}, b.data(), 8}}, {{"step", "1"}});
  const std::string saved = read_all(path);
  std::string raw = saved;
  raw[raw.size() - 1] ^= 0x01;  // b's data
  blank_metadata_entry(raw, "xxh64.b");
  std::ofstream(path, std::ios::binary) << raw;
  std::string e = error_of([&] { st::File::open(path); });
  EXPECT_EQ(e, path + ": tensor 'b' has no xxh64 though the file stores hashes (psa writes one for every tensor): "
                      "the header was edited") << e;
  for (const char* key : {"xxh64.a", "xxh64.__metadata__"}) blank_metadata_entry(raw, key);
  std::ofstream(path, std::ios::binary) << raw;
  const st::File f = st::File::open(path);
  EXPECT_FALSE(f.hashed());
  e = error_of([&] { psa::nn::require_hashes(path, f.metadata()); });
  EXPECT_NE(e.find(path + ": no stored xxh64 hashes"), std::string::npos) << e;
  EXPECT_TRUE(st::File::open(path).metadata().count("step"));
  raw = saved;
  blank_metadata_entry(raw, "xxh64.__metadata__");
  std::ofstream(path, std::ios::binary) << raw;
  e = error_of([&] { st::File::open(path); });
  EXPECT_NE(e.find("the tensors have xxh64 hashes but __metadata__ has none"), std::string::npos) << e;
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(Safetensors, CorruptedCheckpointDetected) {
  // A checkpoint we wrote, with one data byte flipped on disk, must fail its hash check.
  std::string dir = fresh_dir("corrupt");
  std::string path = dir + "/c.safetensors";
  std::vector<float> w = {1, 2, 3, 4};
  st::save(path, {{"w", DType::F32, {4}, w.data(), 16}});
  std::string raw = read_all(path);
  raw[raw.size() - 1] ^= 0x01;
  std::ofstream(path, std::ios::binary) << raw;
  std::string e = error_of([&] { st::File::open(path); });
  EXPECT_NE(e.find(path + ": tensor 'w': xxh64 mismatch"), std::string::npos) << e;
  std::system(("rm -rf '" + dir + "'").c_str());
}
