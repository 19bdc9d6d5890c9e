// Hostile and broken inputs for every reader besides the safetensors and JSON cores (which have their own
// suites): checkpoint configs, training states, tokenizer files, images, JSONL records, and the command line.
// Each must be refused with one message naming the file and the reason: never a crash, a hang or an attempt to
// allocate what the file claims. Files: tests/data/bad/, made by tests/data/bad/make_bad.py, except
// jpeg_dht_overflow.jpg, which is the input `make fuzz` found (stb_image 2.27 wrote past a Huffman table).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "nn/checkpoint.h"
#include "nn/clip.h"
#include "nn/safetensors.h"
#include "nn/llama.h"
#include "psa/checkpoint.h"
#include "psa/image.h"
#include "psa/records.h"
#include "psa/tokenizer.h"
#include "psa/train.h"
#include "tests/test_util.h"

namespace psa {
namespace {

using test::error_of;
const std::string kBad = "tests/data/bad/";

struct Case {
  const char* file;
  const char* reason;  // a substring of the message, after the file name
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.file; }

// ---- PSA checkpoints: the config in the metadata is checked before a model is built from it

class HostileCheckpoint : public ::testing::TestWithParam<Case> {};

TEST_P(HostileCheckpoint, RefusedNamingFileAndReason) {
  const std::string dir = kBad + GetParam().file;
  std::string err = error_of([&] { load_checkpoint(dir); });
  EXPECT_EQ(err.rfind(dir + "/model.safetensors: ", 0), 0u) << err;
  EXPECT_NE(err.find(GetParam().reason), std::string::npos) << err;
}

INSTANTIATE_TEST_SUITE_P(
    Bad, HostileCheckpoint,
    ::testing::Values(Case{"ckpt_zero_heads", "metadata 'config': json: key 'num_attention_heads': 0 out of range [1, 64]"},
                      Case{"ckpt_absurd_dims", "but the file holds 4 values"},
                      Case{"ckpt_bad_lora", "metadata 'lora': json: key 'rank': -3 out of range"},
                      Case{"ckpt_config_not_json", "metadata 'config': json:1:"},
                      Case{"ckpt_bad_head_query", "metadata 'config': psa config: head_query 'last_token'"}));

TEST(Hostile, HfConfigsRefuseZeroAndAbsurdSizes) {
  json::Value clip = json::parse(R"({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0,
                                     "intermediate_size": 128, "image_size": 32, "patch_size": 4})");
  EXPECT_NE(error_of([&] { nn::ClipConfig::from_json(clip); }).find("'num_attention_heads': 0 out of range"),
            std::string::npos);
  clip.set("num_attention_heads", 4).set("patch_size", 0);
  EXPECT_NE(error_of([&] { nn::ClipConfig::from_json(clip); }).find("'patch_size': 0 out of range"), std::string::npos);
  json::Value llama = json::parse(R"({"vocab_size": 1e12, "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4})");
  EXPECT_NE(error_of([&] { nn::LlamaConfig::from_json(llama); }).find("'vocab_size': 1000000000000 out of range"),
            std::string::npos);
  llama.set("vocab_size", 100).set("num_key_value_heads", 0);
  EXPECT_NE(error_of([&] { nn::LlamaConfig::from_json(llama); }).find("'num_key_value_heads': 0 out of range"),
            std::string::npos);
}

// ---- weights with NaN/Inf load, with one warning line

TEST(Hostile, NonFiniteWeightsLoadWithOneWarning) {
  ::testing::internal::CaptureStderr();
  nn::StateDict sd = nn::read_tensors(kBad + "nan_weights.safetensors");
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(sd.size(), 2u);
  EXPECT_EQ(err, "warning: " + kBad + "nan_weights.safetensors: 1 tensor(s) hold NaN/Inf (2 values; first 'w')\n");
}

// ---- training states

TEST(Hostile, TrainingStateWithABadStepIsRefused) {
  PsaConfig cfg = PsaConfig::from_preset("tiny");
  cfg.vision.layers = cfg.text.layers = 1;
  PsaVlm m(cfg);
  Dataset d;
  d.examples.resize(1);
  StageOptions o;
  o.stage = "base";
  o.steps = 2;
  o.progress = false;
  o.resume_from = kBad + "state_bad_step.safetensors";
  EXPECT_EQ(error_of([&] { train_stage(m, d, o); }),
            kBad + "state_bad_step.safetensors: training state 'step' = '-5' is not a non-negative integer");
}

// ---- tokenizer files

class HostileTokenizer : public ::testing::TestWithParam<Case> {};

TEST_P(HostileTokenizer, RefusedNamingFileAndReason) {
  const std::string path = kBad + GetParam().file;
  std::string err = error_of([&] { Tokenizer::load(path); });
  EXPECT_EQ(err.rfind(path + ":", 0), 0u) << err;
  EXPECT_NE(err.find(GetParam().reason), std::string::npos) << err;
}

INSTANTIATE_TEST_SUITE_P(
    Bad, HostileTokenizer,
    ::testing::Values(Case{"tokenizer_unknown_key.json", "unknown key 'merge'"},
                      Case{"tokenizer_special_out_of_range.json", "<unk> has id 5000 outside the vocabulary of 261"},
                      Case{"tokenizer_merge_unknown.json", "merges[0]: unknown token 'zz'"},
                      Case{"tokenizer_not_utf8.json", "invalid UTF-8 in string"}));

// ---- images

class HostileImage : public ::testing::TestWithParam<Case> {};

TEST_P(HostileImage, RefusedByCheckAndLoadAlike) {
  const std::string path = kBad + GetParam().file;
  for (std::string err : {error_of([&] { check_image(path); }), error_of([&] { load_image(path); })}) {
    EXPECT_EQ(err.rfind(path + ": ", 0), 0u) << err;
    EXPECT_NE(err.find(GetParam().reason), std::string::npos) << err;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Bad, HostileImage,
    ::testing::Values(Case{"jpeg_dht_overflow.jpg", "JPEG Huffman table at byte 385 has 522 codes (at most 256)"},
                      Case{"image_huge.png", "image too large: 100000x10"},
                      Case{"image_zero_width.png", "cannot decode image"},
                      Case{"image.gif", "not a PNG, JPEG or BMP file"}));

// The header alone is fine; the pixel data is missing: the chunk walk of the check sees it already.
TEST(Hostile, TruncatedImageIsRefusedByTheCheckAndTheLoad) {
  const std::string want = kBad + "image_truncated.png: cannot decode image: truncated PNG (33 bytes, no IEND chunk)";
  EXPECT_EQ(error_of([&] { check_image(kBad + "image_truncated.png"); }), want);
  EXPECT_EQ(error_of([&] { load_image(kBad + "image_truncated.png"); }), want);
}

// stb_image checks no CRC: one flipped bit in the compressed pixels decoded to other pixels without a word.
TEST(Hostile, APngWithADamagedChunkIsRefused) {
  const std::string path = ::testing::TempDir() + "psa_flipped_" + std::to_string(::getpid()) + ".png";
  Image img(9, 7);
  for (size_t i = 0; i < img.rgb.size(); ++i) img.rgb[i] = uint8_t(i * 37);
  std::string bytes = encode_png(img);
  const size_t idat = bytes.find("IDAT");
  ASSERT_NE(idat, std::string::npos);
  bytes[idat + 10] ^= 0x10;
  std::ofstream(path, std::ios::binary) << bytes;
  const std::string e = error_of([&] { load_image(path); });
  EXPECT_NE(e.find(path + ": cannot decode image: PNG chunk 'IDAT' at byte " + std::to_string(idat - 4) +
                   " fails its CRC"), std::string::npos) << e;
  EXPECT_EQ(error_of([&] { check_image(path); }), e);
  bytes[idat + 10] ^= 0x10;  // restored: it loads
  std::ofstream(path, std::ios::binary) << bytes;
  EXPECT_EQ(load_image(path).rgb, img.rgb);
  std::remove(path.c_str());
}

// ---- JSONL records: every hostile line is skipped with its own reason, none throws

TEST(Hostile, RecordLinesAreSkippedWithReasons) {
  LoadReport rep;
  std::vector<Record> recs = load_records(kBad + "records_hostile.jsonl", &rep, false);
  EXPECT_TRUE(recs.empty());
  ASSERT_EQ(rep.skipped, 6);
  const char* reasons[] = {"invalid UTF-8 in string", "control character", "nesting deeper than 512",
                           "duplicate key 'safe_level'", "number out of range", "'image' contains a NUL character"};
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(rep.messages[i].rfind(kBad + "records_hostile.jsonl:" + std::to_string(i + 1) + ": ", 0), 0u)
        << rep.messages[i];
    EXPECT_NE(rep.messages[i].find(reasons[i]), std::string::npos) << rep.messages[i];
  }
}

// A FIFO would block a reader forever (nothing writes to it): every reader refuses non-regular files.
TEST(Hostile, FifoIsRefusedNotWaitedOn) {
  const std::string fifo = ::testing::TempDir() + "psa_fifo_" + std::to_string(::getpid());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string want = fifo + ": cannot open: not a regular file";
  EXPECT_EQ(error_of([&] { json::parse_file(fifo); }), want);
  EXPECT_EQ(error_of([&] { load_records(fifo, nullptr); }), want);
  EXPECT_EQ(error_of([&] { load_image(fifo); }), fifo + ": cannot decode image: cannot open: not a regular file");
  EXPECT_EQ(error_of([&] { st::File::open(fifo); }), fifo + ": not a regular file");
  std::remove(fifo.c_str());
}

// ---- the command line: exit status 2 and one line

TEST(Hostile, CommandLineRefusesABadCheckpointWithOneLine) {
  const char* bin = std::getenv("PSA_BIN") ? std::getenv("PSA_BIN") : "./build/psa";
  if (!std::ifstream(bin)) GTEST_SKIP() << bin << " not built";
  const std::string err_path = ::testing::TempDir() + "psa_hostile_" + std::to_string(::getpid());
  const std::string cmd = std::string(bin) + " infer --ckpt " + kBad + "ckpt_absurd_dims --image " + kBad +
                          "image.gif --prompt hi >/dev/null 2>" + err_path;
  int status = std::system(cmd.c_str());
  std::ifstream in(err_path);
  std::string err((std::istreambuf_iterator<char>(in)), {});
  std::remove(err_path.c_str());
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 2) << err;
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
  EXPECT_NE(err.find("ckpt_absurd_dims/model.safetensors: metadata 'config' describes"), std::string::npos) << err;
}

}  // namespace
}  // namespace psa
