// Byte-level BPE: GPT-2's byte alphabet, pre-tokeniser, merge loop and file formats; BPE training.
#include "psa/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <queue>

#include "nn/json.h"
#include "tensor/error.h"

namespace psa {

namespace {

const char* const kFormat = "psa-bpe-tokenizer";
constexpr int kFormatVersion = 1;
constexpr size_t kCacheLimit = size_t(1) << 18;  // pieces; a clear beats LRU bookkeeping at this size

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

// ---- GPT-2's byte <-> printable code point alphabet (bytes_to_unicode) ----
// Files store tokens in this form so that every byte sequence is a valid JSON string without spaces.

struct ByteAlphabet {
  int32_t to_cp[256];
  int16_t to_byte[324];  // -1 where the code point is not in the alphabet
  ByteAlphabet() {
    std::fill(std::begin(to_byte), std::end(to_byte), int16_t(-1));
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? b : 256 + n++;
      to_byte[to_cp[b]] = int16_t(b);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

void append_utf8(std::string& out, int32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else {  // the alphabet never goes past U+0143
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string to_unicode(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) append_utf8(out, alphabet().to_cp[b]);
  return out;
}

// ---- UTF-8 and character classes for pre-tokenisation ----

bool is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

// The code point starting at s[i] and its byte length; (-1, 1) for a byte that starts no valid,
// shortest-form, non-surrogate sequence, so arbitrary bytes still split into pieces.
std::pair<int32_t, int> next_cp(const std::string& s, size_t i, size_t end) {
  const unsigned char c = s[i];
  if (c < 0x80) return {c, 1};
  int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
  if (len == 0 || c > 0xF4 || i + len > end) return {-1, 1};
  for (int k = 1; k < len; ++k)
    if (!is_cont(s[i + k])) return {-1, 1};
  const unsigned char c1 = s[i + 1];
  if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F) || (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F))
    return {-1, 1};
  int32_t cp = c & (0xFF >> (len + 1));
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
  return {cp, len};
}

// Decodes a byte-level token written in the alphabet; false when a character is outside it.
bool from_unicode(const std::string& text, std::string& bytes) {
  bytes.clear();
  for (size_t i = 0; i < text.size();) {
    auto [cp, len] = next_cp(text, i, text.size());
    if (cp < 0 || cp >= 324 || alphabet().to_byte[cp] < 0) return false;
    bytes += char(alphabet().to_byte[cp]);
    i += len;
  }
  return true;
}

enum class Cls : uint8_t { Space, Letter, Number, Other };

struct Range {
  int32_t lo, hi;
  Cls cls;
};

// Non-ASCII code points that are not letters, sorted. Covers Latin-1, combining marks, common
// script punctuation and digits, general punctuation, symbols, CJK punctuation, fullwidth forms,
// private use and emoji; anything absent is taken for a letter (see tokenizer.h).
constexpr Cls S = Cls::Space, N = Cls::Number, O = Cls::Other;
const Range kRanges[] = {
    {0x80, 0x84, O},       {0x85, 0x85, S},       {0x86, 0x9F, O},       {0xA0, 0xA0, S},
    {0xA1, 0xA9, O},       {0xAB, 0xB1, O},       {0xB2, 0xB3, N},       {0xB4, 0xB4, O},
    {0xB6, 0xB8, O},       {0xB9, 0xB9, N},       {0xBB, 0xBB, O},       {0xBC, 0xBE, N},
    {0xBF, 0xBF, O},       {0xD7, 0xD7, O},       {0xF7, 0xF7, O},       {0x2C2, 0x2C5, O},
    {0x2D2, 0x2DF, O},     {0x2E5, 0x2EB, O},     {0x2ED, 0x2ED, O},     {0x2EF, 0x36F, O},
    {0x375, 0x375, O},     {0x37E, 0x37E, O},     {0x384, 0x385, O},     {0x387, 0x387, O},
    {0x3F6, 0x3F6, O},     {0x482, 0x489, O},     {0x55A, 0x55F, O},     {0x589, 0x58A, O},
    {0x58D, 0x58F, O},     {0x591, 0x5C7, O},     {0x5F3, 0x5F4, O},     {0x600, 0x61F, O},
    {0x64B, 0x65F, O},     {0x660, 0x669, N},     {0x66A, 0x66D, O},     {0x670, 0x670, O},
    {0x6D4, 0x6D4, O},     {0x6D6, 0x6ED, O},     {0x6F0, 0x6F9, N},     {0x6FD, 0x6FE, O},
    {0x700, 0x70F, O},     {0x900, 0x903, O},     {0x93A, 0x93C, O},     {0x93E, 0x94F, O},
    {0x951, 0x957, O},     {0x962, 0x965, O},     {0x966, 0x96F, N},     {0x970, 0x970, O},
    {0x981, 0x983, O},     {0x9BC, 0x9BC, O},     {0x9BE, 0x9CD, O},     {0x9D7, 0x9D7, O},
    {0x9E2, 0x9E3, O},     {0x9E6, 0x9EF, N},     {0x9F2, 0x9F3, O},     {0x9F4, 0x9F9, N},
    {0x9FA, 0x9FB, O},     {0xA66, 0xA6F, N},     {0xAE6, 0xAEF, N},     {0xB66, 0xB6F, N},
    {0xBE6, 0xBF2, N},     {0xC66, 0xC6F, N},     {0xCE6, 0xCEF, N},     {0xD66, 0xD78, N},
    {0xDE6, 0xDEF, N},     {0xE31, 0xE31, O},     {0xE34, 0xE3A, O},     {0xE3F, 0xE3F, O},
    {0xE47, 0xE4F, O},     {0xE50, 0xE59, N},     {0xE5A, 0xE5B, O},     {0xED0, 0xED9, N},
    {0xF20, 0xF33, N},     {0x1040, 0x1049, N},   {0x1090, 0x1099, N},   {0x1369, 0x137C, N},
    {0x1680, 0x1680, S},   {0x16EE, 0x16F0, N},   {0x17E0, 0x17E9, N},   {0x1810, 0x1819, N},
    {0x1946, 0x194F, N},   {0x19D0, 0x19DA, N},   {0x1AB0, 0x1AFF, O},   {0x1DC0, 0x1DFF, O},
    {0x1FBD, 0x1FBD, O},   {0x1FBF, 0x1FC1, O},   {0x1FCD, 0x1FCF, O},   {0x1FDD, 0x1FDF, O},
    {0x1FED, 0x1FEF, O},   {0x1FFD, 0x1FFE, O},   {0x2000, 0x200A, S},   {0x200B, 0x2027, O},
    {0x2028, 0x2029, S},   {0x202A, 0x202E, O},   {0x202F, 0x202F, S},   {0x2030, 0x205E, O},
    {0x205F, 0x205F, S},   {0x2060, 0x206F, O},   {0x2070, 0x2070, N},   {0x2074, 0x2079, N},
    {0x207A, 0x207E, O},   {0x2080, 0x2089, N},   {0x208A, 0x208E, O},   {0x20A0, 0x20FF, O},
    {0x2100, 0x2101, O},   {0x2103, 0x2106, O},   {0x2108, 0x2109, O},   {0x2114, 0x2114, O},
    {0x2116, 0x2118, O},   {0x211E, 0x2123, O},   {0x2125, 0x2125, O},   {0x2127, 0x2127, O},
    {0x2129, 0x2129, O},   {0x212E, 0x212E, O},   {0x213A, 0x213B, O},   {0x2140, 0x2144, O},
    {0x214A, 0x214D, O},   {0x214F, 0x214F, O},   {0x2150, 0x2182, N},   {0x2185, 0x2189, N},
    {0x218A, 0x245F, O},   {0x2460, 0x249B, N},   {0x249C, 0x24E9, O},   {0x24EA, 0x24FF, N},
    {0x2500, 0x2775, O},   {0x2776, 0x2793, N},   {0x2794, 0x2BFF, O},   {0x2CE5, 0x2CEA, O},
    {0x2CEF, 0x2CF1, O},   {0x2CF9, 0x2CFC, O},   {0x2CFD, 0x2CFD, N},   {0x2CFE, 0x2CFF, O},
    {0x2DE0, 0x2E2E, O},   {0x2E30, 0x2FFF, O},   {0x3000, 0x3000, S},   {0x3001, 0x3004, O},
    {0x3007, 0x3007, N},   {0x3008, 0x3020, O},   {0x3021, 0x3029, N},   {0x302A, 0x3030, O},
    {0x3036, 0x3037, O},   {0x3038, 0x303A, N},   {0x303D, 0x303F, O},   {0x3099, 0x309C, O},
    {0x30A0, 0x30A0, O},   {0x30FB, 0x30FB, O},   {0x3190, 0x3191, O},   {0x3192, 0x3195, N},
    {0x3196, 0x319F, O},   {0x31C0, 0x31EF, O},   {0x3200, 0x321F, O},   {0x3220, 0x3229, N},
    {0x322A, 0x3247, O},   {0x3248, 0x324F, N},   {0x3250, 0x3250, O},   {0x3251, 0x325F, N},
    {0x3260, 0x327F, O},   {0x3280, 0x3289, N},   {0x328A, 0x32B0, O},   {0x32B1, 0x32BF, N},
    {0x32C0, 0x33FF, O},   {0x4DC0, 0x4DFF, O},   {0xA490, 0xA4C6, O},   {0xA4FE, 0xA4FF, O},
    {0xA60D, 0xA60F, O},   {0xA620, 0xA629, N},   {0xA66F, 0xA67E, O},   {0xA6F0, 0xA6F7, O},
    {0xA700, 0xA716, O},   {0xA720, 0xA721, O},   {0xA789, 0xA78A, O},   {0xA828, 0xA82B, O},
    {0xA830, 0xA839, O},   {0xA8D0, 0xA8D9, N},   {0xA900, 0xA909, N},   {0xA9D0, 0xA9D9, N},
    {0xAA50, 0xAA59, N},   {0xABF0, 0xABF9, N},   {0xD800, 0xF8FF, O},   {0xFB29, 0xFB29, O},
    {0xFD3E, 0xFD3F, O},   {0xFDFC, 0xFDFD, O},   {0xFE00, 0xFE6B, O},   {0xFEFF, 0xFEFF, O},
    {0xFF01, 0xFF0F, O},   {0xFF10, 0xFF19, N},   {0xFF1A, 0xFF20, O},   {0xFF3B, 0xFF40, O},
    {0xFF5B, 0xFF65, O},   {0xFFE0, 0xFFFF, O},   {0x1D000, 0x1D24F, O}, {0x1D300, 0x1D35F, O},
    {0x1D7CE, 0x1D7FF, N}, {0x1F000, 0x1F0FF, O}, {0x1F100, 0x1F10C, N}, {0x1F10D, 0x1FAFF, O},
    {0x1FB00, 0x1FBEF, O}, {0x1FBF0, 0x1FBF9, N}, {0xE0000, 0xE0FFF, O}, {0xF0000, 0x10FFFF, O},
};

Cls ascii_class(int32_t c) {
  if (c == ' ' || (c >= '\t' && c <= '\r')) return Cls::Space;
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return Cls::Letter;
  if (c >= '0' && c <= '9') return Cls::Number;
  return Cls::Other;
}

Cls classify(int32_t cp) {
  if (cp < 0) return Cls::Other;
  if (cp < 0x80) return ascii_class(cp);
  auto it = std::upper_bound(std::begin(kRanges), std::end(kRanges), cp,
                             [](int32_t v, const Range& r) { return v < r.lo; });
  if (it == std::begin(kRanges) || cp > std::prev(it)->hi) return Cls::Letter;
  return std::prev(it)->cls;
}

struct CodePoints {
  std::vector<size_t> pos;  // byte offset of each code point, plus the end
  std::vector<int32_t> cp;
  std::vector<Cls> cls;
};

// Length in code points of the contraction ('s 't 're 've 'm 'll 'd) at k, or 0.
size_t contraction(const CodePoints& t, size_t k) {
  if (t.cp[k] != '\'') return 0;
  static const char* const forms[] = {"s", "t", "re", "ve", "m", "ll", "d"};
  for (const char* f : forms) {
    size_t len = std::strlen(f), j = 0;
    while (j < len && k + 1 + j < t.cp.size() && t.cp[k + 1 + j] == f[j]) ++j;
    if (j == len) return len + 1;
  }
  return 0;
}

// End (in code points) of the piece GPT-2's regex matches at k; the alternatives in pattern order.
size_t piece_end(const CodePoints& t, size_t k) {
  const size_t n = t.cp.size();
  if (size_t c = contraction(t, k)) return k + c;
  size_t start = (t.cp[k] == ' ' && k + 1 < n && t.cls[k + 1] != Cls::Space) ? k + 1 : k;
  if (t.cls[start] != Cls::Space) {  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
    size_t e = start + 1;
    while (e < n && t.cls[e] == t.cls[start]) ++e;
    return e;
  }
  size_t e = k + 1;
  while (e < n && t.cls[e] == Cls::Space) ++e;
  // `\s+(?!\S)` backs off one character so the last space can prefix the next word; `\s+` otherwise.
  return (e == n || e - k == 1) ? e : e - 1;
}

// Calls emit(begin, end) with the byte range of each pre-token of text[begin, end).
template <typename Emit>
void pretokenize(const std::string& text, size_t begin, size_t end, Emit emit) {
  CodePoints t;
  for (size_t i = begin; i < end;) {
    auto [cp, len] = next_cp(text, i, end);
    t.pos.push_back(i);
    t.cp.push_back(cp);
    t.cls.push_back(classify(cp));
    i += len;
  }
  t.pos.push_back(end);
  for (size_t k = 0; k < t.cp.size();) {
    size_t e = piece_end(t, k);
    emit(t.pos[k], t.pos[e]);
    k = e;
  }
}

// Which special token starts at text[i] (index into special_texts()), or -1.
int special_at(const std::string& text, size_t i) {
  const auto& specials = Tokenizer::special_texts();
  for (size_t w = 0; w < specials.size(); ++w)
    if (text.compare(i, specials[w].size(), specials[w]) == 0) return int(w);
  return -1;
}

// Calls plain(begin, end) for the text between special tokens and special(w) for each of them.
template <typename Plain, typename Special>
void split_specials(const std::string& text, Plain plain, Special special) {
  size_t seg = 0;
  for (size_t i = text.find('<'); i != std::string::npos; i = text.find('<', i)) {
    int w = special_at(text, i);
    if (w < 0) {
      ++i;
      continue;
    }
    plain(seg, i);
    special(w);
    i += Tokenizer::special_texts()[w].size();
    seg = i;
  }
  plain(seg, text.size());
}

// ---- BPE training ----

// Incremental BPE: pair counts and pair -> words indexes are updated only for the words a merge
// touches, and a lazy max-heap (stale entries skipped on pop) picks the next pair.
class Trainer {
 public:
  Trainer(std::vector<std::string> tokens, const std::unordered_map<std::string, int64_t>& counts,
          const int32_t* byte_ids)
      : tokens_(std::move(tokens)) {
    for (int32_t id = 0; id < int32_t(tokens_.size()); ++id) ids_.emplace(tokens_[id], id);
    for (const auto& [word, count] : counts) {
      Word w{{}, count, -1};
      for (unsigned char b : word) w.syms.push_back(byte_ids[b]);
      words_.push_back(std::move(w));
    }
    for (int32_t w = 0; w < int32_t(words_.size()); ++w) count_word(w);
    for (const auto& [key, count] : pair_count_) heap_.push_back({count, int32_t(key >> 32), int32_t(key)});
    std::make_heap(heap_.begin(), heap_.end(), Lower{&tokens_});
  }

  void run(int vocab_size) {
    Entry e;
    while (int(tokens_.size()) < vocab_size && pop_best(e)) {
      int32_t merged = intern(tokens_[e.a] + tokens_[e.b]);
      merges_.push_back({e.a, e.b});
      apply(e.a, e.b, merged);
    }
  }

  std::vector<std::string>& tokens() { return tokens_; }
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }

 private:
  struct Word {
    std::vector<int32_t> syms;
    int64_t count;
    int32_t stamp;  // last merge that rewrote it; where_ may list a word more than once
  };
  struct Entry {
    int64_t count;
    int32_t a, b;
  };
  // Heap order: higher count first, then the lexicographically smaller (left, right) bytes.
  struct Lower {
    const std::vector<std::string>* tokens;
    bool operator()(const Entry& x, const Entry& y) const {
      if (x.count != y.count) return x.count < y.count;
      const auto& t = *tokens;
      if (t[x.a] != t[y.a]) return t[x.a] > t[y.a];
      return t[x.b] > t[y.b];
    }
  };

  void count_word(int32_t w) {
    const Word& word = words_[w];
    for (size_t i = 0; i + 1 < word.syms.size(); ++i) {
      uint64_t key = pair_key(word.syms[i], word.syms[i + 1]);
      pair_count_[key] += word.count;
      where_[key].push_back(w);
    }
  }

  bool pop_best(Entry& e) {
    while (!heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end(), Lower{&tokens_});
      e = heap_.back();
      heap_.pop_back();
      auto it = pair_count_.find(pair_key(e.a, e.b));
      if (it != pair_count_.end() && it->second == e.count) return true;
    }
    return false;
  }

  // A merge can rebuild a string that is already a token (ab+c after a+bc); it then maps to that id.
  int32_t intern(const std::string& text) {
    auto [it, inserted] = ids_.emplace(text, int32_t(tokens_.size()));
    if (inserted) tokens_.push_back(text);
    return it->second;
  }

  void apply(int32_t a, int32_t b, int32_t merged) {
    const uint64_t key = pair_key(a, b);
    std::vector<int32_t> words = std::move(where_[key]);
    where_.erase(key);
    std::vector<std::pair<uint64_t, int64_t>> deltas;
    const int32_t stamp = int32_t(merges_.size());
    for (int32_t w : words) {
      if (words_[w].stamp == stamp) continue;
      words_[w].stamp = stamp;
      rewrite(w, a, b, merged, deltas);
    }
    commit(deltas);
  }

  // Merges every (a, b) in word w left to right, recording the pair-count changes.
  void rewrite(int32_t w, int32_t a, int32_t b, int32_t merged, std::vector<std::pair<uint64_t, int64_t>>& deltas) {
    Word& word = words_[w];
    std::vector<int32_t>& s = word.syms;
    std::vector<int32_t> out;
    bool changed = false;
    for (size_t i = 0; i < s.size(); ++i) {
      bool hit = i + 1 < s.size() && s[i] == a && s[i + 1] == b;
      out.push_back(hit ? merged : s[i]);
      i += hit;
      changed |= hit;
    }
    if (!changed) return;
    for (size_t i = 0; i + 1 < s.size(); ++i) deltas.push_back({pair_key(s[i], s[i + 1]), -word.count});
    for (size_t i = 0; i + 1 < out.size(); ++i) {
      uint64_t k = pair_key(out[i], out[i + 1]);
      deltas.push_back({k, word.count});
      // Pairs without the new token were already indexed for this word.
      if (out[i] == merged || out[i + 1] == merged) where_[k].push_back(w);
    }
    s = std::move(out);
  }

  void commit(std::vector<std::pair<uint64_t, int64_t>>& deltas) {
    std::sort(deltas.begin(), deltas.end());
    for (size_t i = 0; i < deltas.size();) {
      const uint64_t key = deltas[i].first;
      int64_t net = 0;
      for (; i < deltas.size() && deltas[i].first == key; ++i) net += deltas[i].second;
      if (net == 0) continue;
      int64_t& count = pair_count_[key];
      count += net;
      if (count == 0) {
        pair_count_.erase(key);
        continue;
      }
      heap_.push_back({count, int32_t(key >> 32), int32_t(key)});
      std::push_heap(heap_.begin(), heap_.end(), Lower{&tokens_});
    }
  }

  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int32_t> ids_;
  std::vector<Word> words_;
  std::unordered_map<uint64_t, int64_t> pair_count_;
  std::unordered_map<uint64_t, std::vector<int32_t>> where_;
  std::vector<Entry> heap_;
  std::vector<std::pair<int32_t, int32_t>> merges_;
};

// ---- file helpers ----

const json::Value& member(const json::Value& obj, const std::string& key, json::Value::Kind kind,
                          const std::string& path) {
  const json::Value* v = obj.find(key);
  PSA_CHECK(v, path, ": missing key '", key, "'");
  PSA_CHECK(v->kind == kind, path, ": key '", key, "': expected ", json::kind_name(kind), ", got ",
            json::kind_name(v->kind));
  return *v;
}

// Splits a vocab.bpe line on ASCII whitespace, as the reference's str.split().
std::vector<std::string> split_ws(const std::string& line) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (true) {
    i = line.find_first_not_of(" \t\r\n\v\f", i);
    if (i == std::string::npos) return parts;
    size_t e = line.find_first_of(" \t\r\n\v\f", i);
    if (e == std::string::npos) e = line.size();
    parts.push_back(line.substr(i, e - i));
    i = e;
  }
}

}  // namespace

// ---- Tokenizer ----

struct Tokenizer::Cache {
  std::mutex mu;
  std::unordered_map<std::string, std::vector<int32_t>> pieces;
};

Tokenizer::Tokenizer() : cache_(std::make_shared<Cache>()) {}

const std::vector<std::string>& Tokenizer::special_texts() {
  static const std::vector<std::string> texts = {"<pad>", "<s>", "</s>", "<image>", "<unk>"};
  return texts;
}

void Tokenizer::build_vocab(const std::string& where) {
  special_.assign(tokens_.size(), false);
  for (size_t w = 0; w < 5; ++w) {
    const int32_t id = special_ids_[w];
    PSA_CHECK(id >= 0 && id < vocab_size(), where, ": special token ", special_texts()[w], " has id ", id,
              " outside the vocabulary of ", vocab_size());
    PSA_CHECK(!special_[id], where, ": special tokens share id ", id);
    special_[id] = true;
  }
  ids_.clear();
  for (int32_t id = 0; id < vocab_size(); ++id) {
    if (special_[id]) continue;
    PSA_CHECK(!tokens_[id].empty(), where, ": token ", id, " is empty");
    auto [it, inserted] = ids_.emplace(tokens_[id], id);
    PSA_CHECK(inserted, where, ": duplicate token '", to_unicode(tokens_[id]), "' (ids ", it->second, " and ", id,
              ")");
  }
  for (int b = 0; b < 256; ++b) {
    auto it = ids_.find(std::string(1, char(b)));
    PSA_CHECK(it != ids_.end(), where, ": no token for byte ", b, " ('", to_unicode(std::string(1, char(b))), "')");
    byte_ids_[b] = it->second;
  }
}

int32_t Tokenizer::token_id(const std::string& unicode, const std::string& where) const {
  std::string bytes;
  PSA_CHECK(from_unicode(unicode, bytes), where, ": '", unicode, "' is not a byte-level token");
  auto it = ids_.find(bytes);
  PSA_CHECK(it != ids_.end(), where, ": unknown token '", unicode, "'");
  return it->second;
}

void Tokenizer::add_merge(int32_t a, int32_t b, const std::string& where) {
  auto it = ids_.find(tokens_[a] + tokens_[b]);
  PSA_CHECK(it != ids_.end(), where, ": merge result '", to_unicode(tokens_[a] + tokens_[b]),
            "' is not in the vocabulary");
  const Merge m{int32_t(merges_.size()), it->second};
  PSA_CHECK(merge_ranks_.emplace(pair_key(a, b), m).second, where, ": duplicate merge '", to_unicode(tokens_[a]),
            " ", to_unicode(tokens_[b]), "'");
  merges_.push_back({a, b});
}

const std::string& Tokenizer::token_text(int32_t id) const {
  PSA_CHECK(id >= 0 && id < vocab_size(), "Tokenizer::token_text: id ", id, " outside [0, ", vocab_size(), ")");
  return tokens_[id];
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

// The reference algorithm merges every occurrence of the lowest-ranked pair, left to right, then
// looks again. Popping all heap entries of that rank in position order does the same in O(n log n),
// so a long run of symbols (base64, "=====") does not go quadratic. New pairs never share the rank
// being applied (a merge result is longer than its parts), and any lower-ranked new pair is popped
// next, as the reference would pick it next.
std::vector<int32_t> Tokenizer::bpe(const std::string& word) const {
  const int32_t n = int32_t(word.size());
  std::vector<int32_t> sym(n), prev(n), next(n);
  for (int32_t i = 0; i < n; ++i) {
    sym[i] = byte_ids_[static_cast<unsigned char>(word[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  using Entry = std::pair<int32_t, int32_t>;  // (rank, position)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto rank_at = [&](int32_t i) -> const Merge* {
    if (i < 0 || sym[i] < 0 || next[i] < 0) return nullptr;
    auto it = merge_ranks_.find(pair_key(sym[i], sym[next[i]]));
    return it == merge_ranks_.end() ? nullptr : &it->second;
  };
  auto push = [&](int32_t i) {
    if (const Merge* m = rank_at(i)) heap.push({m->rank, i});
  };
  for (int32_t i = 0; i < n; ++i) push(i);
  std::vector<int32_t> batch;
  while (!heap.empty()) {
    const int32_t rank = heap.top().first;
    batch.clear();
    for (; !heap.empty() && heap.top().first == rank; heap.pop()) batch.push_back(heap.top().second);
    for (int32_t i : batch) {
      const Merge* m = rank_at(i);
      if (!m || m->rank != rank) continue;  // stale: a neighbour merged first
      const int32_t j = next[i];
      sym[i] = m->id;
      sym[j] = -1;  // absorbed; its old heap entries must not fire
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      push(prev[i]);
      push(i);
    }
  }
  std::vector<int32_t> out;
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
  return out;
}

void Tokenizer::encode_plain(const std::string& text, size_t begin, size_t end, std::vector<int32_t>& out) const {
  pretokenize(text, begin, end, [&](size_t b, size_t e) {
    std::string piece = text.substr(b, e - b);
    {
      std::lock_guard<std::mutex> lock(cache_->mu);
      auto it = cache_->pieces.find(piece);
      if (it != cache_->pieces.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = bpe(piece);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(cache_->mu);
    if (cache_->pieces.size() >= kCacheLimit) cache_->pieces.clear();
    cache_->pieces.emplace(std::move(piece), std::move(ids));
  });
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  split_specials(
      text, [&](size_t b, size_t e) { encode_plain(text, b, e, out); },
      [&](int w) { out.push_back(special_ids_[w]); });
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (size_t k = 0; k < ids.size(); ++k) {
    PSA_CHECK(ids[k] >= 0 && ids[k] < vocab_size(), "Tokenizer::decode: id ", ids[k], " at position ", k,
              " outside [0, ", vocab_size(), ")");
    out += tokens_[ids[k]];
  }
  return out;
}

Tokenizer Tokenizer::train(const std::vector<std::string>& corpus, int vocab_size) {
  PSA_CHECK(vocab_size >= 261, "Tokenizer::train: vocab_size ", vocab_size,
            " is below the 261 special and byte tokens");
  Tokenizer t;
  t.tokens_ = special_texts();
  for (int w = 0; w < 5; ++w) t.special_ids_[w] = w;
  for (int b = 0; b < 256; ++b) t.tokens_.push_back(std::string(1, char(b)));
  t.build_vocab("Tokenizer::train");

  std::unordered_map<std::string, int64_t> counts;
  for (const std::string& text : corpus) {
    auto count_pieces = [&](size_t b, size_t e) {
      pretokenize(text, b, e, [&](size_t pb, size_t pe) { ++counts[text.substr(pb, pe - pb)]; });
    };
    split_specials(text, count_pieces, [](int) {});  // specials are never merged into words
  }
  Trainer trainer(t.tokens_, counts, t.byte_ids_);
  trainer.run(vocab_size);
  t.tokens_ = std::move(trainer.tokens());
  t.build_vocab("Tokenizer::train");
  for (const auto& [a, b] : trainer.merges()) t.add_merge(a, b, "Tokenizer::train");
  return t;
}

void Tokenizer::save(const std::string& path) const {
  json::Value vocab = json::Value::array();
  for (int32_t id = 0; id < vocab_size(); ++id) vocab.push(special_[id] ? tokens_[id] : to_unicode(tokens_[id]));
  json::Value merges = json::Value::array();
  for (const auto& [a, b] : merges_) merges.push(to_unicode(tokens_[a]) + " " + to_unicode(tokens_[b]));
  json::Value specials = json::Value::object();
  for (int w = 0; w < 5; ++w) specials.set(special_texts()[w], special_ids_[w]);
  json::Value root = json::Value::object();
  root.set("format", kFormat);
  root.set("version", kFormatVersion);
  root.set("special_tokens", std::move(specials));
  root.set("vocab", std::move(vocab));
  root.set("merges", std::move(merges));
  json::write_file(path, json::dump(root, 1) + "\n");
}

void Tokenizer::load_specials(const json::Value& specials, const std::string& path) {
  for (const auto& [text, id] : specials.as_object()) {
    auto it = std::find(special_texts().begin(), special_texts().end(), text);
    PSA_CHECK(it != special_texts().end(), path, ": unknown special token '", text, "'");
    PSA_CHECK(id.is_int(), path, ": special token ", text, ": id is not an integer");
    special_ids_[it - special_texts().begin()] = int32_t(std::clamp<int64_t>(id.as_int(), -1, INT32_MAX));
  }
  for (int w = 0; w < 5; ++w) {
    const int32_t id = special_ids_[w];
    PSA_CHECK(id >= 0, path, ": missing special token ", special_texts()[w]);
    PSA_CHECK(id < vocab_size(), path, ": special token ", special_texts()[w], " has id ", id,
              " outside the vocabulary of ", vocab_size());
    PSA_CHECK(tokens_[id] == special_texts()[w], path, ": special token ", special_texts()[w], " has id ", id,
              " but vocab[", id, "] is '", tokens_[id], "'");
  }
}

Tokenizer Tokenizer::load(const std::string& path) {
  const json::Value root = json::parse_file(path);
  PSA_CHECK(root.is_object(), path, ": expected a JSON object");
  json::check_keys(root, {"format", "version", "special_tokens", "vocab", "merges"}, path);
  const std::string& format = member(root, "format", json::Value::Kind::String, path).str;
  PSA_CHECK(format == kFormat, path, ": unknown format '", format, "' (expected '", kFormat, "')");
  const json::Value& version = member(root, "version", json::Value::Kind::Number, path);
  PSA_CHECK(version.num == kFormatVersion, path, ": unsupported version ", version.num);
  const auto& vocab = member(root, "vocab", json::Value::Kind::Array, path).arr;
  const auto& specials = member(root, "special_tokens", json::Value::Kind::Object, path);
  const auto& merges = member(root, "merges", json::Value::Kind::Array, path).arr;

  Tokenizer t;
  for (const json::Value& v : vocab) {
    PSA_CHECK(v.is_string(), path, ": vocab[", t.tokens_.size(), "]: expected string");
    t.tokens_.push_back(v.str);
  }
  t.load_specials(specials, path);
  for (int32_t id = 0; id < t.vocab_size(); ++id) {
    if (std::find(t.special_ids_, t.special_ids_ + 5, id) != t.special_ids_ + 5) continue;
    PSA_CHECK(from_unicode(vocab[id].str, t.tokens_[id]), path, ": vocab[", id, "] '", vocab[id].str,
              "' is not a byte-level token");
  }
  t.build_vocab(path);
  for (size_t k = 0; k < merges.size(); ++k) {
    const std::string where = str_cat(path, ": merges[", k, "]");
    PSA_CHECK(merges[k].is_string(), where, ": expected string");
    const std::string& m = merges[k].str;
    const size_t space = m.find(' ');
    PSA_CHECK(space != std::string::npos && m.find(' ', space + 1) == std::string::npos, where, ": '", m,
              "' is not two tokens separated by one space");
    t.add_merge(t.token_id(m.substr(0, space), where), t.token_id(m.substr(space + 1), where), where);
  }
  return t;
}

Tokenizer Tokenizer::load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
  const json::Value encoder = json::parse_file(encoder_json);
  PSA_CHECK(encoder.is_object(), encoder_json, ": expected a JSON object of token -> id");
  Tokenizer t;
  const int64_t n = int64_t(encoder.obj.size());
  t.tokens_.assign(size_t(n), std::string());
  std::vector<bool> seen(size_t(n), false);
  for (const auto& [text, id] : encoder.obj) {
    PSA_CHECK(id.is_int() && id.as_int() >= 0 && id.as_int() < n, encoder_json, ": token '", text,
              "': id must be an integer in [0, ", n, ")");
    PSA_CHECK(!seen[id.as_int()], encoder_json, ": id ", id.as_int(), " is used twice");
    seen[id.as_int()] = true;
    PSA_CHECK(from_unicode(text, t.tokens_[id.as_int()]), encoder_json, ": '", text, "' is not a byte-level token");
  }
  for (int w = 0; w < 5; ++w) {
    t.special_ids_[w] = t.vocab_size();
    t.tokens_.push_back(special_texts()[w]);
  }
  t.build_vocab(encoder_json);

  const std::string text = json::read_file(vocab_bpe);
  size_t line_no = 0;
  for (size_t b = 0; b < text.size();) {
    size_t e = text.find('\n', b);
    if (e == std::string::npos) e = text.size();
    const std::string line = text.substr(b, e - b);
    b = e + 1;
    ++line_no;
    if (line_no == 1 && line.rfind("#version", 0) == 0) continue;
    const std::vector<std::string> parts = split_ws(line);
    if (parts.empty()) continue;
    const std::string where = str_cat(vocab_bpe, ":", line_no);
    PSA_CHECK(parts.size() == 2, where, ": expected two tokens, got ", parts.size());
    t.add_merge(t.token_id(parts[0], where), t.token_id(parts[1], where), where);
  }
  PSA_CHECK(!t.merges_.empty(), vocab_bpe, ": no merges");
  return t;
}

}  // namespace psa
