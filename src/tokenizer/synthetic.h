// The tokenizer `ernie make-model` writes beside a synthetic checkpoint: a small SentencePiece
// BPE model trained on the corpus embedded in the binary (data/tokenizer_corpus.txt), with the
// ERNIE special tokens, plus the JSON files transformers reads and the ERNIE chat template.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string_view>

namespace ernie::embedded {
std::string_view tokenizer_corpus();
std::string_view ernie45_chat_template();
}  // namespace ernie::embedded

namespace ernie::tokenizer {

// Largest id the synthetic tokenizer uses, plus one; the tiny preset's vocab_size covers it.
inline constexpr int32_t kSyntheticTokenizerMaxSize = 4096;

struct SyntheticTokenizer {
  int32_t sentencepiece_size = 0;  // pieces in tokenizer.model
  int32_t size = 0;                // including the added tokens after them
};

// Writes tokenizer.model, tokenizer_config.json, special_tokens_map.json and
// generation_config.json into `dir`. Ids: <unk> 0, <s> 1, </s> 2 and <|begin_of_sentence|> 3,
// <|end_of_sentence|> 4 inside the SentencePiece model; <mask:0>..<mask:7> only in the JSON
// files, right after the SentencePiece vocabulary.
SyntheticTokenizer write_synthetic_tokenizer(const std::filesystem::path& dir);

}  // namespace ernie::tokenizer
