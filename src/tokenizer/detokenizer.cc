#include "tokenizer/detokenizer.h"

#include <array>

namespace ernie::tokenizer {

IncrementalDetokenizer::IncrementalDetokenizer(std::shared_ptr<const Tokenizer> tok,
                                               bool skip_special_tokens)
    : tok_(std::move(tok)), skip_special_(skip_special_tokens) {}

std::string IncrementalDetokenizer::add(int32_t id) {
  const auto& p = tok_->piece(id);
  if (!p.known || (skip_special_ && p.special)) return {};
  if (p.is_byte) {
    pending_bytes_ += p.text;
    return {};
  }
  std::array<int32_t, 1> one{id};
  std::string out = finish();  // a non-byte token ends the byte run
  const std::string piece_text = tok_->decode(one, skip_special_);
  text_ += piece_text;
  return out + piece_text;
}

std::string IncrementalDetokenizer::finish() {
  if (pending_bytes_.empty()) return {};
  std::string out;
  if (is_valid_utf8(pending_bytes_)) {
    out = pending_bytes_;
  } else {
    for (size_t i = 0; i < pending_bytes_.size(); ++i) out += "\xef\xbf\xbd";
  }
  pending_bytes_.clear();
  text_ += out;
  return out;
}

}  // namespace ernie::tokenizer
