#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "psa/tokenizer.h"
#include "tensor/error.h"

namespace {

using psa::Tokenizer;
using Ids = std::vector<int32_t>;

const std::string kGpt2Dir = "tests/data/gpt2/";  // the test binary runs from the repository root

// Loaded once: the 50k-merge files take a noticeable part of the suite's time budget.
const Tokenizer& gpt2() {
  static const Tokenizer t = Tokenizer::load_gpt2(kGpt2Dir + "encoder.json", kGpt2Dir + "vocab.bpe");
  return t;
}

std::vector<std::string> small_corpus() {
  return {"a cat sits on the mat", "the dog sits on the log", "two cats and a dog",
          "the cat's hat is red",  "a red hat on a red cat", "dogs don't like cats",
          "café au lait, s'il vous plaît", "日本語のテキスト", "emoji 😀 and 👍🏽", "numbers 12 345 6789"};
}

const Tokenizer& trained() {
  static const Tokenizer t = Tokenizer::train(small_corpus(), 300);
  return t;
}

std::string temp_path(const std::string& name) { return testing::TempDir() + "psa_tok_" + name; }

void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// Runs f, which must throw psa::Error, and returns the message.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const psa::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no psa::Error thrown";
  return "";
}

void expect_round_trip(const Tokenizer& t, const std::string& text) {
  EXPECT_EQ(t.decode(t.encode(text)), text) << "text: " << text;
}

const std::vector<std::string> kTexts = {
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "it's we're they've I'm you'll he'd don't",
    "café naïve Zürich Ærøskøbing",
    "日本語 中文 한국어",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧",
    "e\xCC\x81 combining accent",
    "a <image> b <s>c</s> <pad><unk> <imag <s",
};

TEST(Tokenizer, RoundTripTexts) {
  for (const std::string& text : kTexts) {
    expect_round_trip(trained(), text);
    expect_round_trip(gpt2(), text);
  }
}

TEST(Tokenizer, RoundTripRandomBytes) {
  std::mt19937 rng(7);
  for (int n = 0; n < 200; ++n) {
    std::string bytes(rng() % 64, '\0');
    for (char& c : bytes) c = char(rng() & 0xFF);
    expect_round_trip(trained(), bytes);
    expect_round_trip(gpt2(), bytes);
  }
}

TEST(Tokenizer, EmptyStringHasNoIds) {
  EXPECT_TRUE(trained().encode("").empty());
  EXPECT_EQ(trained().decode({}), "");
}

TEST(Tokenizer, TrainedSpecialIds) {
  const Tokenizer& t = trained();
  EXPECT_EQ(t.pad_id(), 0);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.image_id(), 3);
  EXPECT_EQ(t.unk_id(), 4);
  EXPECT_EQ(t.token_text(3), "<image>");
  EXPECT_EQ(t.token_text(5), std::string(1, '\0'));  // byte tokens follow the specials
  EXPECT_EQ(t.token_text(5 + 'a'), "a");
  EXPECT_TRUE(t.is_special(4));
  EXPECT_FALSE(t.is_special(5));
}

TEST(Tokenizer, SpecialsMatchedLiterally) {
  const Tokenizer& t = trained();
  const Ids ids = t.encode("<s><image>x</s>");
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(ids[0], t.bos_id());
  EXPECT_EQ(ids[1], t.image_id());
  EXPECT_EQ(ids[3], t.eos_id());
  EXPECT_EQ(t.decode({t.pad_id(), t.unk_id()}), "<pad><unk>");
  for (int32_t id : t.encode("<imag <s <image")) EXPECT_FALSE(t.is_special(id));
}

TEST(Tokenizer, DecodeRejectsInvalidIds) {
  EXPECT_NE(error_of([] { trained().decode({5, -1}); }).find("id -1 at position 1"), std::string::npos);
  EXPECT_NE(error_of([] { trained().decode({300}); }).find("outside [0, 300)"), std::string::npos);
  EXPECT_THROW(trained().token_text(300), psa::Error);
}

TEST(Tokenizer, TrainReachesExactVocabSize) {
  EXPECT_EQ(trained().vocab_size(), 300);
  EXPECT_EQ(Tokenizer::train(small_corpus(), 261).vocab_size(), 261);
  EXPECT_THROW(Tokenizer::train(small_corpus(), 260), psa::Error);
}

TEST(Tokenizer, TrainLearnsFrequentWords) {
  const Tokenizer& t = trained();
  EXPECT_EQ(t.encode(" cat").size(), 1u);  // " cat" occurs 3 times: merged early
  EXPECT_LT(t.encode("the cat sits on the mat").size(), std::string("the cat sits on the mat").size() / 2);
  // The first merge is the most frequent pair; ties break towards the smaller bytes.
  EXPECT_EQ(t.token_text(261).size(), 2u);
}

TEST(Tokenizer, TrainIsDeterministic) {
  const Tokenizer again = Tokenizer::train(small_corpus(), 300);
  for (int32_t id = 0; id < 300; ++id) EXPECT_EQ(again.token_text(id), trained().token_text(id));
}

TEST(Tokenizer, SaveLoadKeepsEncodings) {
  const std::string path = temp_path("trained.json");
  trained().save(path);
  const Tokenizer loaded = Tokenizer::load(path);
  EXPECT_EQ(loaded.vocab_size(), trained().vocab_size());
  for (int32_t id = 0; id < loaded.vocab_size(); ++id) EXPECT_EQ(loaded.token_text(id), trained().token_text(id));
  for (const std::string& text : kTexts) EXPECT_EQ(loaded.encode(text), trained().encode(text)) << text;
  for (const std::string& text : small_corpus()) EXPECT_EQ(loaded.encode(text), trained().encode(text)) << text;
  std::remove(path.c_str());
}

TEST(Tokenizer, Gpt2KnownIds) {
  EXPECT_EQ(gpt2().encode("Hello world"), (Ids{15496, 995}));
  EXPECT_EQ(gpt2().encode(" the"), (Ids{262}));
  EXPECT_EQ(gpt2().encode("hello"), (Ids{31373}));
  // Ids from the reference encoder, npm gpt-3-encoder 1.1.4:
  //   node -e "const {encode}=require('/tmp/package/index.js'); console.log(JSON.stringify(encode('...')))"
  const std::string text =
      "PSA-VLM's encoder doesn't hallucinate: it saw 3 cats, 12 dogs & a café in Zürich — 日本語 too! 😀\n\n  Done.";
  const Ids expected = {3705,  32,    12,  53,    31288, 338,   2207,  12342, 1595,  470,   23251,
                        4559,  25,    340, 2497,  513,   11875, 11,    1105,  6844,  1222,  257,
                        40304, 287,   1168, 9116, 7527,  851,   10545, 245,   98,    17312, 105,
                        45739, 252,   1165, 0,    30325, 222,   628,   220,   24429, 13};
  EXPECT_EQ(gpt2().encode(text), expected);
  // The reference treats <|endoftext|> as plain text; so do we.
  EXPECT_EQ(gpt2().encode("<|endoftext|>"), (Ids{27, 91, 437, 1659, 5239, 91, 29}));
}

TEST(Tokenizer, Gpt2SaveLoadKeepsEncodings) {
  const std::string path = temp_path("gpt2.json");
  gpt2().save(path);
  const Tokenizer loaded = Tokenizer::load(path);
  EXPECT_EQ(loaded.vocab_size(), gpt2().vocab_size());
  EXPECT_EQ(loaded.image_id(), gpt2().image_id());
  for (const std::string& text : kTexts) EXPECT_EQ(loaded.encode(text), gpt2().encode(text)) << text;
  std::remove(path.c_str());
}

TEST(Tokenizer, Gpt2SpecialsAppended) {
  const Tokenizer& t = gpt2();
  EXPECT_EQ(t.vocab_size(), 50262);
  EXPECT_EQ(t.token_text(50256), "<|endoftext|>");
  EXPECT_EQ(t.pad_id(), 50257);
  EXPECT_EQ(t.bos_id(), 50258);
  EXPECT_EQ(t.eos_id(), 50259);
  EXPECT_EQ(t.image_id(), 50260);
  EXPECT_EQ(t.unk_id(), 50261);
  EXPECT_EQ(t.encode("<image>Hello world"), (Ids{50260, 15496, 995}));
}

// GPT-2's printable stand-in for byte b, as a JSON string body: the byte itself when printable,
// else U+0100 + (how many unprintable bytes come before it).
std::string byte_symbol(int b) {
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE; };
  int cp = b;
  if (!printable(b)) {
    cp = 256;
    for (int c = 0; c < b; ++c) cp += !printable(c);
  }
  char buf[16];
  std::snprintf(buf, sizeof buf, "\\u%04x", cp);
  return buf;
}

// A valid file whose format, extra vocabulary and merges the error tests vary.
std::string tokenizer_file(const std::string& format, const std::string& extra_vocab,
                           const std::string& merges) {
  std::string vocab = R"("<pad>","<s>","</s>","<image>","<unk>")";
  for (int b = 0; b < 256; ++b) vocab += ",\"" + byte_symbol(b) + "\"";
  return R"({"format":")" + format + R"(","version":1,)" +
         R"("special_tokens":{"<pad>":0,"<s>":1,"</s>":2,"<image>":3,"<unk>":4},)" + R"("vocab":[)" + vocab +
         extra_vocab + R"(],"merges":[)" + merges + "]}";
}

TEST(Tokenizer, LoadsHandWrittenFile) {
  const std::string path = temp_path("hand.json");
  write_file(path, tokenizer_file("psa-bpe-tokenizer", R"(,"ab","\u0120a")", R"("a b","\u0120 a")"));
  const Tokenizer t = Tokenizer::load(path);
  EXPECT_EQ(t.encode("ab a"), (Ids{261, 262}));
  std::remove(path.c_str());
}

TEST(Tokenizer, BadFilesNameTheFile) {
  const std::string path = temp_path("bad.json");
  auto load_error = [&](const std::string& text) {
    write_file(path, text);
    return error_of([&] { Tokenizer::load(path); });
  };
  auto expect_error = [&](const std::string& text, const std::string& reason) {
    const std::string msg = load_error(text);
    EXPECT_EQ(msg.rfind(path, 0), 0u) << msg;
    EXPECT_NE(msg.find(reason), std::string::npos) << msg;
  };
  expect_error("{not json", path);
  expect_error("[]", "expected a JSON object");
  expect_error(tokenizer_file("other", "", ""), "unknown format 'other'");
  expect_error(tokenizer_file("psa-bpe-tokenizer", R"(,"a")", ""), "duplicate token 'a'");
  expect_error(tokenizer_file("psa-bpe-tokenizer", R"(,"ab")", R"("a zz")"), "merges[0]: unknown token 'zz'");
  expect_error(tokenizer_file("psa-bpe-tokenizer", "", R"("a b")"), "merge result 'ab' is not in the vocabulary");
  expect_error(tokenizer_file("psa-bpe-tokenizer", R"(,"ab")", R"("a b","a b")"), "duplicate merge 'a b'");
  expect_error(tokenizer_file("psa-bpe-tokenizer", "", R"("ab")"), "not two tokens");
  expect_error(tokenizer_file("psa-bpe-tokenizer", R"(,"x y")", ""), "is not a byte-level token");
  std::string no_image = tokenizer_file("psa-bpe-tokenizer", "", "");
  no_image.replace(no_image.find(R"(,"<image>":3)"), 12, "");
  expect_error(no_image, "missing special token <image>");
  std::remove(path.c_str());
  const std::string missing = temp_path("does_not_exist.json");
  EXPECT_NE(error_of([&] { Tokenizer::load(missing); }).find(missing), std::string::npos);
}

TEST(Tokenizer, BadGpt2MergesNameTheLine) {
  const std::string bpe = temp_path("vocab.bpe");
  write_file(bpe, "#version: 0.2\n\xC4\xA0 t\nh e l\n");
  const std::string msg = error_of([&] { Tokenizer::load_gpt2(kGpt2Dir + "encoder.json", bpe); });
  EXPECT_NE(msg.find(bpe + ":3: expected two tokens"), std::string::npos) << msg;
  std::remove(bpe.c_str());
}

}  // namespace
