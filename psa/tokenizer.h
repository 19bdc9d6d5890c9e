// Byte-level BPE tokenizer (GPT-2 style) for PSA-VLM: trained on our captions, or loaded from GPT-2's files.
//
// Every byte string encodes and decodes back exactly: the 256 single bytes are always tokens, and the
// five special tokens are matched literally in the text before pre-tokenisation, so "<image>" typed in
// a prompt becomes the image token and decodes back to "<image>".
//
// Pre-tokenisation follows GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// by hand over UTF-8 code points. Without a Unicode database the classes are approximate: whitespace is
// Unicode White_Space (as Python's `regex`, so U+0085 is space and U+FEFF is not, unlike JavaScript),
// numbers are ASCII digits plus a table of common non-ASCII digit ranges, a table of punctuation, symbol,
// mark, control and emoji ranges is "other", and every remaining non-ASCII code point is a letter.
// Invalid UTF-8 bytes count as "other", one byte each. The approximation only matters for matching
// GPT-2's ids on exotic scripts (e.g. Indic vowel signs count as letters); round trips never depend on it.
//
// Special ids: a trained tokenizer has <pad>=0 <s>=1 </s>=2 <image>=3 <unk>=4, then the 256 byte tokens,
// then one token per merge. load_gpt2 keeps GPT-2's ids 0..50256 (its <|endoftext|> stays an ordinary
// token, matched in text like any other, as the reference encoder does) and appends the five specials at
// 50257..50261; eos is our </s> there too, not <|endoftext|>.
//
// encode() is thread-safe (the merge cache is locked); a Tokenizer is immutable once built.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace psa {

namespace json {
struct Value;
}

class Tokenizer {
 public:
  // Standard BPE on pre-tokenised words with counts. Ties between equally frequent pairs go to the
  // pair whose (left bytes, right bytes) is lexicographically smallest, so training is deterministic.
  // Stops early (smaller vocabulary) only when no adjacent pair is left in the corpus.
  static Tokenizer train(const std::vector<std::string>& corpus, int vocab_size);
  // Our JSON format (see save()); every inconsistency throws "path: reason".
  static Tokenizer load(const std::string& path);
  // GPT-2's original encoder.json + vocab.bpe; encodes to GPT-2's exact ids.
  static Tokenizer load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe);
  // One JSON file {format, version, vocab, merges, special_tokens}, written to a temp file then renamed.
  void save(const std::string& path) const;

  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& ids) const;  // throws on an id out of range

  int32_t pad_id() const { return special_ids_[0]; }
  int32_t bos_id() const { return special_ids_[1]; }
  int32_t eos_id() const { return special_ids_[2]; }
  int32_t image_id() const { return special_ids_[3]; }
  int32_t unk_id() const { return special_ids_[4]; }
  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  // The token's raw bytes (possibly a partial UTF-8 sequence), or a special token's literal text.
  const std::string& token_text(int32_t id) const;
  bool is_special(int32_t id) const;

  // Literal texts of the five specials, in the order pad, bos, eos, image, unk.
  static const std::vector<std::string>& special_texts();

 private:
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  struct Cache;

  Tokenizer();
  // Checks tokens_ and special_ids_ and builds ids_ and byte_ids_; `where` prefixes errors.
  void build_vocab(const std::string& where);
  void load_specials(const json::Value& specials, const std::string& path);
  int32_t token_id(const std::string& unicode, const std::string& where) const;  // byte-level form
  void add_merge(int32_t a, int32_t b, const std::string& where);  // the next rank
  void encode_plain(const std::string& text, size_t begin, size_t end, std::vector<int32_t>& out) const;
  std::vector<int32_t> bpe(const std::string& word) const;

  std::vector<std::string> tokens_;  // raw bytes; specials hold their literal text
  std::vector<bool> special_;        // per id
  int32_t special_ids_[5] = {-1, -1, -1, -1, -1};
  std::unordered_map<std::string, int32_t> ids_;  // bytes -> id, ordinary tokens only
  int32_t byte_ids_[256] = {};
  std::vector<std::pair<int32_t, int32_t>> merges_;   // in rank order
  std::unordered_map<uint64_t, Merge> merge_ranks_;   // (left id, right id) -> rank and result
  std::shared_ptr<Cache> cache_;  // shared by copies: they have the same vocabulary
};

}  // namespace psa
