// Streaming detokenization: text for each new token as soon as it is final. Whole UTF-8
// characters only; byte-fallback runs are held until they end (a run is decoded as a unit:
// valid UTF-8, or one U+FFFD per byte), so the concatenated output always equals
// Tokenizer::decode of all ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "tokenizer/tokenizer.h"

namespace ernie::tokenizer {

class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(std::shared_ptr<const Tokenizer> tok, bool skip_special_tokens);

  // Adds one token; returns the text that became final (possibly empty).
  std::string add(int32_t id);
  // Ends the stream: returns whatever was held back.
  std::string finish();
  // Everything returned so far.
  const std::string& text() const { return text_; }

 private:
  std::shared_ptr<const Tokenizer> tok_;
  bool skip_special_;
  std::string pending_bytes_;
  std::string text_;
};

}  // namespace ernie::tokenizer
