// Fuzzes Tokenizer::load on the input, and encode/decode on it: the first input byte picks the mode.
//   even: the input (minus that byte) is a tokenizer.json; if it loads, encode + decode a fixed text.
//   odd:  the input is text for a small tokenizer trained once here; encode must round-trip exactly and every
//         id must be in range.
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "fuzz/fuzz_util.h"
#include "psa/tokenizer.h"
#include "tensor/error.h"

namespace {

const psa::Tokenizer& text_tokenizer() {
  static const psa::Tokenizer* t = new psa::Tokenizer(psa::Tokenizer::train(
      {"USER: <image>\nWhat is in the image? ASSISTANT: a red circle at the top left.",
       "Safe Hint: answer carefully. I'm sorry, but I can't help with that. \xc3\xa9t\xc3\xa9 \xe2\x82\xac 123",
       "    spaces  and\ttabs\n\nnew lines's 't 're 've 'm 'll 'd"},
      400));
  return *t;
}

void round_trip(const psa::Tokenizer& tok, const std::string& text) {
  std::vector<int32_t> ids = tok.encode(text);
  for (int32_t id : ids)
    if (id < 0 || id >= tok.vocab_size()) std::abort();
  if (tok.decode(ids) != text) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] & 1) {
    round_trip(text_tokenizer(), std::string(reinterpret_cast<const char*>(data + 1), size - 1));
    return 0;
  }
  const std::string& path = psa::fuzz::scratch_file(data + 1, size - 1, ".tokenizer.json");
  try {
    psa::Tokenizer tok = psa::Tokenizer::load(path);
    round_trip(tok, "USER: <image>\nA red circle? ASSISTANT: yes \xff\xfe </s><unk>");
  } catch (const psa::Error&) {
  }
  return 0;
}
