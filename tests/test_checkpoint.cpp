// Checkpoints at the tensor level (nn/checkpoint.h): round trips with hashes, Hugging Face folders (single file and
// sharded), the LLaVA / CLIP key layouts, and shape errors when a config disagrees with its weights.
#include <gtest/gtest.h>

#include "test_util.h"
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "autograd/gradcheck.h"
#include "nn/checkpoint.h"
#include "nn/llama.h"
#include "nn/llava.h"

namespace psa::nn {
namespace {

namespace fs = std::filesystem;

using psa::test::error_of;

std::string fresh_dir(const std::string& tag) {
  fs::path p = fs::path(::testing::TempDir()) / ("psa_ckpt_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

bool identical(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.to_vector() == b.to_vector();
}

const char* kLlama = "tests/data/hf/llama";

TEST(Checkpoint, RoundTripKeepsDtypesShapesValuesAndMetadata) {
  StateDict sd;
  sd["a.weight"] = randn({3, 5}, 1);                     // f32
  sd["b.moments"] = randn({2, 1, 3}, 2, DType::f64);     // f64, a unit dim
  sd["c.step"] = Tensor::from(std::vector<int64_t>{-3, 0, int64_t(1) << 40, 7}, {4}, DType::i64);
  sd["d.scalar"] = Tensor::scalar(2.5);                  // 0-d
  std::string path = fresh_dir("rt") + "/ckpt.safetensors";
  write_tensors(path, sd, {{"config", "{\"hidden_size\": 8}"}, {"step", "12"}});

  std::map<std::string, std::string> meta;
  StateDict back = read_tensors(path, &meta);
  ASSERT_EQ(back.size(), sd.size());
  for (auto& [name, t] : sd) {
    ASSERT_TRUE(back.count(name)) << name;
    EXPECT_TRUE(identical(back[name], t)) << name << " " << shape_str(back[name].shape());
  }
  EXPECT_EQ(meta["config"], "{\"hidden_size\": 8}");
  EXPECT_EQ(meta["step"], "12");
  for (auto& [name, t] : sd) EXPECT_EQ(meta["xxh64." + name].size(), 16u) << name;  // one hash per tensor
}

TEST(Checkpoint, CorruptedTensorIsReportedWithFileAndTensorName) {
  StateDict sd;
  sd["first"] = randn({4, 4}, 3);
  sd["second"] = randn({8}, 4, DType::f64);
  std::string path = fresh_dir("flip") + "/model.safetensors";
  write_tensors(path, sd);
  ASSERT_EQ(read_tensors(path).size(), 2u);

  // Flip one byte inside the data of 'second', located through the file's own header.
  std::string bytes = json::read_file(path);
  uint64_t hlen;
  std::memcpy(&hlen, bytes.data(), 8);
  json::Value header = json::parse(bytes.substr(8, hlen));
  int64_t begin = header.at("second").at("data_offsets").at(size_t(0)).as_int();
  bytes[8 + hlen + begin + 5] ^= 0x40;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size());

  std::string e = error_of([&] { read_tensors(path); });
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("'second'"), std::string::npos) << e;
  EXPECT_EQ(e.find("'first'"), std::string::npos) << e;
}

TEST(Checkpoint, ReadsTheHuggingFaceLlamaFolder) {
  HfFolder f = read_hf_folder(kLlama);
  EXPECT_EQ(f.dir, kLlama);
  EXPECT_EQ(f.config.at("model_type").as_string(), "llama");
  LlamaConfig c = LlamaConfig::from_json(f.config);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.vocab, 97);
  LlamaForCausalLM lm(c);
  EXPECT_EQ(f.weights.size(), lm.named_parameters().size());
  load_renamed(lm, f.weights, [](const std::string& k) { return k; }, kLlama);
  for (auto& [name, t] : lm.named_parameters()) EXPECT_TRUE(identical(t, f.weights.at(name))) << name;
}

TEST(Checkpoint, LlavaAndClipKeyLayouts) {
  // llava-hf (older save_pretrained), the PSA-VLM reference, and transformers 5 all land on the engine's names.
  const std::string engine = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight";
  EXPECT_EQ(llava_key("vision_tower.encoder.layers.0.mlp.fc1.weight"), engine);
  EXPECT_EQ(llava_key(engine), engine);
  EXPECT_EQ(llava_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight"), engine);
  EXPECT_EQ(llava_key("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"), engine);
  EXPECT_EQ(llava_key("model.multi_modal_projector.linear_1.weight"), "multi_modal_projector.linear_1.weight");
  EXPECT_EQ(llava_key("multi_modal_projector.linear_2.bias"), "multi_modal_projector.linear_2.bias");
  EXPECT_EQ(llava_key("model.language_model.layers.1.self_attn.q_proj.weight"),
            "language_model.model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(llava_key("language_model.model.norm.weight"), "language_model.model.norm.weight");
  EXPECT_EQ(llava_key("lm_head.weight"), "language_model.lm_head.weight");
  EXPECT_EQ(llava_key("language_model.lm_head.weight"), "language_model.lm_head.weight");

  EXPECT_EQ(clip_key("vision_model.embeddings.patch_embedding.weight"), "embeddings.patch_embedding.weight");
  EXPECT_EQ(clip_key("vision_tower.vision_model.post_layernorm.bias"), "post_layernorm.bias");
  EXPECT_EQ(clip_key("pre_layrnorm.weight"), "pre_layrnorm.weight");

  // Whole layouts: the fixture's file (llava-hf names) loads strictly, and its gradient names (transformers 5
  // in-memory names) all map onto parameters of the same model.
  HfFolder f = read_hf_folder("tests/data/hf/llava");
  auto llava = Llava::from_config(f.config);
  load_renamed(*llava, f.weights, llava_key, "llava");
  std::set<std::string> params;
  for (auto& [n, t] : llava->named_parameters()) params.insert(n);
  int grads = 0;
  for (auto& [key, t] : read_tensors("tests/data/hf/llava/io.safetensors"))
    if (key.rfind("grad.", 0) == 0) {
      ++grads;
      EXPECT_TRUE(params.count(llava_key(key.substr(5)))) << key << " -> " << llava_key(key.substr(5));
    }
  EXPECT_GT(grads, 20);
}

TEST(Checkpoint, ShardedFolderLoadsTheSameWeights) {
  HfFolder single = read_hf_folder(kLlama);
  std::string dir = fresh_dir("sharded");
  fs::copy_file(fs::path(kLlama) / "config.json", fs::path(dir) / "config.json");

  // Two shards split by name, and the index that maps every tensor to its shard.
  StateDict shard[2];
  json::Value map = json::Value::object();
  const char* files[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
  int64_t total = 0;
  for (auto& [name, t] : single.weights) {
    int s = name.find("layers.1.") != std::string::npos || name == "lm_head.weight";
    shard[s][name] = t;
    map.set(name, files[s]);
    total += t.nbytes();
  }
  ASSERT_FALSE(shard[0].empty());
  ASSERT_FALSE(shard[1].empty());
  for (int s = 0; s < 2; ++s) write_tensors(dir + "/" + files[s], shard[s]);
  json::Value meta = json::Value::object();
  meta.set("total_size", total);
  json::Value index = json::Value::object();
  index.set("metadata", meta);
  index.set("weight_map", map);
  std::ofstream(dir + "/model.safetensors.index.json") << json::dump(index, 2);

  HfFolder sharded = read_hf_folder(dir);
  EXPECT_EQ(sharded.weights.size(), single.weights.size());
  LlamaForCausalLM lm(LlamaConfig::from_json(sharded.config));
  lm.load_state_dict(sharded.weights, true, dir);
  for (auto& [name, t] : lm.named_parameters()) EXPECT_TRUE(identical(t, single.weights.at(name))) << name;
}

TEST(Checkpoint, ConfigDisagreeingWithTheFileNamesTheTensor) {
  HfFolder f = read_hf_folder(kLlama);
  f.config.set("intermediate_size", 100);  // the file's MLP is 176 wide
  LlamaForCausalLM lm(LlamaConfig::from_json(f.config));
  std::string src = std::string(kLlama) + "/model.safetensors";
  std::string e = error_of([&] { load_renamed(lm, f.weights, [](const std::string& k) { return k; }, src); });
  EXPECT_NE(e.find(src), std::string::npos) << e;
  EXPECT_NE(e.find("'model.layers.0.mlp.gate_proj.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("[176,64]"), std::string::npos) << e;
  EXPECT_NE(e.find("[100,64]"), std::string::npos) << e;
}

}  // namespace
}  // namespace psa::nn
