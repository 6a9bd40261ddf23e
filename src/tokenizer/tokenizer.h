// The ERNIE-4.5 tokenizer as transformers runs it: a SentencePiece model plus added/special
// tokens from the JSON files. Encoding splits the text on added tokens (leftmost-longest match),
// then encodes each piece of plain text with SentencePiece; decoding maps ids back to pieces
// the way the Hugging Face decoder does (metaspace to space, byte fallback, no cleanup).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace ernie::tokenizer {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = true;
  bool lstrip = false;  // also swallows whitespace on its left
  bool rstrip = false;  // ... and on its right
  bool single_word = false;
};

// Where a metaspace ("▁") is prepended to plain text before SentencePiece: never (ERNIE), to
// the first piece of the text only, or to every piece between added tokens.
enum class PrefixSpace { kNever, kFirst, kAlways };

class Tokenizer {
 public:
  // Loads tokenizer.model and the JSON files of a model directory. Throws ernie::Error naming
  // the file when something is missing or malformed.
  static std::shared_ptr<const Tokenizer> load(const std::filesystem::path& dir);
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // One past the largest id the tokenizer knows.
  int32_t vocab_size() const { return vocab_size_; }
  // Pieces in tokenizer.model: transformers' `tokenizer.vocab_size` (added tokens excluded).
  int32_t base_vocab_size() const { return base_vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const;
  bool is_special(int32_t id) const;
  // How id decodes on its own: text, or raw bytes for byte-fallback pieces (is_byte), or
  // nothing for ids the tokenizer does not know.
  struct Piece {
    std::string text;
    bool is_byte = false;
    bool special = false;
    bool known = true;
  };
  const Piece& piece(int32_t id) const;

  // Ids that end generation: the eos token and generation_config.json's eos_token_id.
  const std::vector<int32_t>& eos_token_ids() const { return eos_ids_; }
  std::optional<int32_t> bos_token_id() const { return bos_id_; }
  bool add_bos_token() const { return add_bos_; }
  // Named special tokens (bos_token, eos_token, unk_token, pad_token, cls_token, sep_token,
  // mask_token) for chat templates.
  const std::map<std::string, std::string>& special_token_strings() const { return named_; }
  // The checkpoint's chat template ("" when it has none).
  const std::string& chat_template() const { return chat_template_; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  PrefixSpace prefix_space() const { return prefix_; }

 private:
  Tokenizer();
  static std::shared_ptr<const Tokenizer> load_checked(const std::filesystem::path& dir);
  void encode_plain(std::string_view text, bool prefix, std::vector<int32_t>& out) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<AddedToken> added_;  // sorted by content length, longest first
  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;  // candidates per first byte
  std::map<std::string, int32_t, std::less<>> added_by_content_;
  std::vector<Piece> pieces_;  // [vocab_size]
  std::map<std::string, std::string> named_;
  std::vector<int32_t> eos_ids_;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  bool add_bos_ = false, add_eos_ = false;
  PrefixSpace prefix_ = PrefixSpace::kNever;
  int32_t vocab_size_ = 0;
  int32_t base_vocab_size_ = 0;
  std::string chat_template_;
};

// True when s is well-formed UTF-8 (no overlongs, surrogates or truncated sequences).
bool is_valid_utf8(std::string_view s);

}  // namespace ernie::tokenizer
