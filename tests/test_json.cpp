// JSON parser and printer: round trips, unicode, numbers, and error positions.
#include <gtest/gtest.h>

#include "test_util.h"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <thread>

#include "nn/json.h"
#include "tensor/error.h"

using psa::json::Value;
namespace json = psa::json;

namespace {

using psa::test::error_of;

std::string parse_error(const std::string& text) {
  return error_of([&] { json::parse(text, "cfg.json"); });
}

}  // namespace

TEST(Json, ParsesAllKinds) {
  Value v = json::parse(R"({"a": null, "b": true, "c": false, "d": -1.5e2, "e": "hi", "f": [1, [2]], "g": {}})");
  ASSERT_TRUE(v.is_object());
  EXPECT_TRUE(v.at("a").is_null());
  EXPECT_TRUE(v.at("b").as_bool());
  EXPECT_FALSE(v.at("c").as_bool());
  EXPECT_EQ(v.at("d").as_number(), -150.0);
  EXPECT_EQ(v.at("e").as_string(), "hi");
  ASSERT_EQ(v.at("f").as_array().size(), 2u);
  EXPECT_EQ(v.at("f").at(1).at(0).as_int(), 2);
  EXPECT_TRUE(v.at("g").is_object());
  EXPECT_EQ(v.at("g").size(), 0u);
  EXPECT_EQ(v.find("zzz"), nullptr);
  EXPECT_NE(v.find("a"), nullptr);
}

TEST(Json, KeepsInsertionOrder) {
  Value v = json::parse(R"({"z": 1, "a": 2, "m": 3})");
  ASSERT_EQ(v.obj.size(), 3u);
  EXPECT_EQ(v.obj[0].first, "z");
  EXPECT_EQ(v.obj[1].first, "a");
  EXPECT_EQ(v.obj[2].first, "m");
  EXPECT_EQ(json::dump(v), R"({"z":1,"a":2,"m":3})");
}

TEST(Json, RoundTripCompactAndPretty) {
  const std::string text =
      R"({"name":"psa","n":3,"x":0.1,"neg":-7,"list":[1,2.5,"s",null,true,false,[],{}],"nested":{"k":[{"a":1}]}})";
  Value v = json::parse(text);
  EXPECT_EQ(json::dump(v), text);
  std::string pretty = json::dump(v, 2);
  EXPECT_NE(pretty.find("\n  \"name\": \"psa\""), std::string::npos) << pretty;
  EXPECT_EQ(json::parse(pretty), v);
  EXPECT_EQ(json::dump(json::parse(pretty)), text);
}

TEST(Json, Builders) {
  Value v = Value::object();
  v.set("a", 1).set("b", "two").set("c", true).set("d", int64_t(1) << 40).set("e", 2.5);
  Value arr = Value::array();
  arr.push(1);
  arr.push(Value());
  arr.push(std::string("x"));
  v.set("arr", arr);
  v.set("a", 42);  // replaces in place, keeps position
  EXPECT_EQ(json::dump(v), R"({"a":42,"b":"two","c":true,"d":1099511627776,"e":2.5,"arr":[1,null,"x"]})");
  EXPECT_EQ(v.size(), 6u);
}

TEST(Json, IntegersPrintWithoutFraction) {
  EXPECT_EQ(json::dump(Value(3.0)), "3");
  EXPECT_EQ(json::dump(Value(-12)), "-12");
  EXPECT_EQ(json::dump(Value(0.0)), "0");
  EXPECT_EQ(json::dump(Value(1e15)), "1000000000000000");
}

TEST(Json, DoublesRoundTrip) {
  for (double d : {0.1, 1.0 / 3.0, -2.5e-300, 6.02214076e23, 1e300, 3.4028234663852886e38, 5e-324,
                   0.30000000000000004, 123456.789}) {
    std::string s = json::dump(Value(d));
    EXPECT_EQ(json::parse(s).as_number(), d) << s;
  }
  EXPECT_EQ(json::dump(Value(0.1)), "0.1");  // shortest form, not 0.10000000000000001
}

TEST(Json, NumbersGrammar) {
  EXPECT_EQ(json::parse("1e3").as_number(), 1000.0);
  EXPECT_EQ(json::parse("1E+3").as_number(), 1000.0);
  EXPECT_EQ(json::parse("25e-1").as_number(), 2.5);
  EXPECT_EQ(json::parse("-0.5").as_number(), -0.5);
  EXPECT_EQ(json::parse("-0").as_number(), 0.0);
  EXPECT_TRUE(std::signbit(json::parse("-0").as_number()));
  EXPECT_EQ(json::parse("1e3").as_int(), 1000);
  for (const char* bad : {"01", "+1", ".5", "1.", "1e", "1e+", "-", "--1", "0x10", "NaN", "Infinity", "1e999"})
    EXPECT_NE(parse_error(bad), "") << bad;
}

TEST(Json, LargeIntegersExactTo2Pow53) {
  const int64_t p53 = int64_t(1) << 53;
  Value v = json::parse("[9007199254740992, -9007199254740992, 9007199254740991]");
  EXPECT_EQ(v.at(0).as_int(), p53);
  EXPECT_EQ(v.at(1).as_int(), -p53);
  EXPECT_EQ(v.at(2).as_int(), p53 - 1);
  EXPECT_EQ(json::dump(v), "[9007199254740992,-9007199254740992,9007199254740991]");
  EXPECT_EQ(json::dump(Value(p53)), "9007199254740992");
}

TEST(Json, AsIntRejectsFractions) {
  std::string e = error_of([] { json::parse("1.5").as_int(); });
  EXPECT_NE(e.find("expected integer"), std::string::npos) << e;
  EXPECT_NE(error_of([] { json::parse("1e300").as_int(); }), "");
}

TEST(Json, UnicodeEscapes) {
  EXPECT_EQ(json::parse(R"("\u0041\u00e9\u20ac")").as_string(), "A\xC3\xA9\xE2\x82\xAC");
  // U+1F600 as a surrogate pair -> 4-byte UTF-8.
  EXPECT_EQ(json::parse(R"("\ud83d\ude00")").as_string(), "\xF0\x9F\x98\x80");
  EXPECT_EQ(json::parse(R"("\uD83D\uDE00")").as_string(), "\xF0\x9F\x98\x80");
  EXPECT_EQ(json::parse(R"("a\"b\\c\/d\b\f\n\r\t")").as_string(), "a\"b\\c/d\b\f\n\r\t");
  EXPECT_EQ(json::parse(R"("\u0000")").as_string(), std::string(1, '\0'));
  // Raw UTF-8 passes through.
  EXPECT_EQ(json::parse("\"\xE4\xB8\xAD\xF0\x9F\x98\x80\"").as_string(), "\xE4\xB8\xAD\xF0\x9F\x98\x80");
}

TEST(Json, UnicodeErrors) {
  EXPECT_NE(parse_error(R"("\ud83d")").find("high surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ud83dx")").find("high surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ud83d\u0041")").find("high surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ude00")").find("lone low surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\u12G4")").find("invalid hex digit"), std::string::npos);
  EXPECT_NE(parse_error(R"("\x")").find("invalid escape"), std::string::npos);
}

TEST(Json, InvalidUtf8Rejected) {
  for (const char* bad : {"\"\xFF\"", "\"\xC0\xAF\"", "\"\xE0\x80\xAF\"", "\"\xED\xA0\x80\"", "\"\xF4\x90\x80\x80\"",
                          "\"\xC3\"", "\"\xC3(\"", "\"\x80\""}) {
    std::string e = parse_error(bad);
    EXPECT_NE(e.find("invalid UTF-8"), std::string::npos) << e;
    EXPECT_EQ(e.rfind("cfg.json:1:2: ", 0), 0u) << e;
  }
}

TEST(Json, ControlCharacterInStringRejected) {
  std::string e = parse_error("\"a\nb\"");
  EXPECT_NE(e.find("control character"), std::string::npos) << e;
}

TEST(Json, EscapesOnDump) {
  Value v(std::string("q\"b\\n\n\x01\t\xC3\xA9"));
  std::string s = json::dump(v);
  EXPECT_EQ(s, "\"q\\\"b\\\\n\\n\\u0001\\t\xC3\xA9\"");
  EXPECT_EQ(json::parse(s), v);
}

TEST(Json, ErrorsGiveLineAndColumn) {
  EXPECT_EQ(parse_error("{\n  \"a\": 1,\n  \"b\": tru\n}"), "cfg.json:3:8: invalid literal (expected 'true')");
  EXPECT_EQ(parse_error("[1, 2,, 3]"), "cfg.json:1:7: unexpected ',' (expected a value)");
  EXPECT_EQ(parse_error("{\"a\" 1}"), "cfg.json:1:6: expected ':' after key, got '1'");
  EXPECT_EQ(parse_error("{\"a\": 1,}"), "cfg.json:1:9: expected a string key, got '}'");
  EXPECT_EQ(parse_error("[1 2]"), "cfg.json:1:4: expected ',' or ']' in array, got '2'");
  EXPECT_EQ(parse_error(""), "cfg.json:1:1: unexpected end of input (expected a value)");
  EXPECT_EQ(parse_error("\"abc"), "cfg.json:1:1: unterminated string");
  EXPECT_EQ(parse_error("[1,\n2"), "cfg.json:2:2: unexpected end of input in array");
}

TEST(Json, TrailingGarbageRejected) {
  EXPECT_EQ(parse_error("{} x"), "cfg.json:1:4: trailing characters after the JSON value");
  EXPECT_EQ(parse_error("1 2"), "cfg.json:1:3: trailing characters after the JSON value");
  EXPECT_NO_THROW(json::parse("  {}\n\t "));
}

TEST(Json, DuplicateKeysRejected) {
  EXPECT_EQ(parse_error("{\"a\": 1,\n \"a\": 2}"), "cfg.json:2:2: duplicate key 'a'");
  // Large object goes through the hashed path.
  std::string big = "{";
  for (int i = 0; i < 100; ++i) big += "\"k" + std::to_string(i) + "\":" + std::to_string(i) + ",";
  EXPECT_NO_THROW(json::parse(big.substr(0, big.size() - 1) + "}"));
  std::string e = parse_error(big + "\"k57\":0}");
  EXPECT_NE(e.find("duplicate key 'k57'"), std::string::npos) << e;
  // Same key in different objects is fine.
  EXPECT_NO_THROW(json::parse(R"({"a": {"a": 1}, "b": {"a": 2}})"));
}

TEST(Json, DeepNesting) {
  auto nested = [](int depth) { return std::string(depth, '[') + std::string(depth, ']'); };
  EXPECT_NO_THROW(json::parse(nested(512)));
  std::string e = parse_error(nested(513));
  EXPECT_NE(e.find("nesting deeper than 512"), std::string::npos) << e;
  EXPECT_EQ(e.rfind("cfg.json:1:513: ", 0), 0u) << e;
  // Far deeper input must fail cleanly rather than overflow the stack.
  EXPECT_NE(parse_error(nested(100000)), "");
  std::string objs;
  for (int i = 0; i < 600; ++i) objs += "{\"a\":";
  EXPECT_NE(parse_error(objs).find("nesting deeper than 512"), std::string::npos);
}

TEST(Json, AccessorErrorsNameKeyAndKind) {
  Value v = json::parse(R"({"n": "x", "s": 3, "f": 1.5})");
  EXPECT_EQ(error_of([&] { v.at("missing"); }), "json: missing key 'missing'");
  EXPECT_EQ(error_of([&] { v.at("n").as_number(); }), "json: expected number, got string");
  EXPECT_EQ(error_of([&] { v.number_at("n"); }), "json: key 'n': expected number, got string");
  EXPECT_EQ(error_of([&] { v.string_at("s"); }), "json: key 's': expected string, got number");
  EXPECT_EQ(error_of([&] { v.int_at("f"); }), "json: key 'f': expected integer, got 1.5");
  EXPECT_EQ(error_of([&] { v.array_at("s"); }), "json: key 's': expected array, got number");
  EXPECT_EQ(error_of([&] { v.int_at("nope"); }), "json: missing key 'nope'");
  EXPECT_EQ(error_of([&] { v.at("s").at("k"); }), "json: expected object (looking up key 'k'), got number");
  EXPECT_EQ(v.int_or("nope", 7), 7);
  EXPECT_EQ(v.number_or("f", 0), 1.5);
  EXPECT_EQ(v.string_or("n", "d"), "x");
  EXPECT_EQ(json::parse(R"({"k": null})").int_or("k", 5), 5);
}

// A path from a Latin-1 file system in a report: the written JSON must be readable by the parser above.
TEST(Json, DumpReplacesBytesThatAreNotUtf8) {
  const std::string fffd = "\xEF\xBF\xBD";
  const std::pair<std::string, std::string> cases[] = {
      {"runs/caf\xE9", "runs/caf" + fffd},              // Latin-1 e-acute
      {"\xC3\xA9t\xC3", "\xC3\xA9t" + fffd},            // valid, then a truncated sequence
      {"\xED\xA0\x80", fffd + fffd + fffd},             // an encoded surrogate: each byte replaced
      {"\xF0\x9F\x98\x80 ok", "\xF0\x9F\x98\x80 ok"}};  // a valid 4-byte sequence is kept
  for (const auto& [raw, expected] : cases) {
    const std::string text = json::dump(Value(raw));
    EXPECT_EQ(json::parse(text).as_string(), expected) << text;
  }
}

TEST(Json, DumpRejectsNonFinite) {
  EXPECT_NE(error_of([] { json::dump(Value(std::nan(""))); }), "");
  EXPECT_NE(error_of([] { json::dump(Value(INFINITY)); }), "");
}

TEST(Json, ParseFile) {
  std::string path = ::testing::TempDir() + "psa_test_json_file.json";
  {
    std::ofstream f(path);
    f << "{\"a\": [1,\n 2,]}";
  }
  std::string e = error_of([&] { json::parse_file(path); });
  EXPECT_EQ(e, path + ":2:4: unexpected ']' (expected a value)");
  {
    std::ofstream f(path);
    f << "{\"a\": [1, 2]}";
  }
  EXPECT_EQ(json::parse_file(path).array_at("a").size(), 2u);
  std::remove(path.c_str());
  e = error_of([&] { json::parse_file(path); });
  EXPECT_EQ(e, path + ": cannot open: No such file or directory");
}

// Two writers of one path (two evals given the same --out): each write is whole, and nothing is left beside it.
TEST(Json, ConcurrentWritesOfOnePathNeverMix) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("psa_test_json_concurrent_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "report.json").string();
  const std::string texts[2] = {std::string(1000, 'a'), std::string(30000, 'b')};
  std::atomic<int> errors{0};
  auto writer = [&](int w) {
    for (int i = 0; i < 100; ++i) {
      try {
        json::write_file(path, texts[w]);
      } catch (const psa::Error&) {
        ++errors;
      }
    }
  };
  std::thread a(writer, 0), b(writer, 1);
  a.join();
  b.join();
  EXPECT_EQ(errors.load(), 0);
  const std::string last = json::read_file(path);
  EXPECT_TRUE(last == texts[0] || last == texts[1]) << "a mixed file of " << last.size() << " bytes";
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1) << "a temp file was left";
  fs::remove_all(dir);
}

// A symbolic link (report.md linked into a docs folder) keeps being a link: the write goes to its target, through
// a chain of links and a relative one; a dangling link gets its target created.
TEST(Json, WriteFileWritesThroughSymbolicLinks) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("psa_test_json_links_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "docs");
  json::write_file((dir / "docs" / "report.md").string(), "old");
  fs::create_symlink("docs/report.md", dir / "near.md");   // relative
  fs::create_symlink(dir / "near.md", dir / "far.md");     // absolute, to a link
  json::write_file((dir / "far.md").string(), "new");
  EXPECT_TRUE(fs::is_symlink(dir / "far.md"));
  EXPECT_TRUE(fs::is_symlink(dir / "near.md"));
  EXPECT_EQ(json::read_file((dir / "docs" / "report.md").string()), "new");
  fs::create_symlink("docs/later.md", dir / "dangling.md");
  json::write_file((dir / "dangling.md").string(), "made");
  EXPECT_TRUE(fs::is_symlink(dir / "dangling.md"));
  EXPECT_EQ(json::read_file((dir / "docs" / "later.md").string()), "made");
  fs::create_symlink("loop.md", dir / "loop.md");
  EXPECT_NE(error_of([&] { json::write_file((dir / "loop.md").string(), "x"); }).find("too many levels"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Json, ParsesRealHfConfigs) {
  for (const char* name : {"clip_vision", "llama", "llava", "mha", "c_abstractor"}) {
    std::string path = std::string("tests/data/hf/") + name + "/config.json";
    std::ifstream probe(path);
    if (!probe) continue;  // fixtures live outside the repo; the rest of the suite does not need them
    Value v = json::parse_file(path);
    EXPECT_TRUE(v.is_object()) << path;
    EXPECT_EQ(json::parse(json::dump(v)), v) << path;
  }
}
