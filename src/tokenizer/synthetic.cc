#include "tokenizer/synthetic.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/check.h"

namespace ernie::tokenizer {
namespace {

using nlohmann::json;

// Feeds the embedded corpus to the trainer line by line (no temporary files).
class CorpusIterator : public sentencepiece::SentenceIterator {
 public:
  explicit CorpusIterator(std::string_view text) : text_(text) { Next(); }
  bool done() const override { return done_; }
  void Next() override {
    if (pos_ >= text_.size()) {
      done_ = true;
      return;
    }
    size_t end = text_.find('\n', pos_);
    if (end == std::string_view::npos) end = text_.size();
    line_.assign(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
  }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  std::string line_;
  bool done_ = false;
};

void write_json(const std::filesystem::path& p, const json& j) {
  std::ofstream f(p);
  f << j.dump(2) << "\n";
  if (!f) throw Error(cat(p.string(), ": write failed"));
}

json added(const std::string& content) {
  return {{"content", content}, {"lstrip", false},      {"normalized", false},
          {"rstrip", false},    {"single_word", false}, {"special", true}};
}

}  // namespace

SyntheticTokenizer write_synthetic_tokenizer(const std::filesystem::path& dir) {
  const std::vector<std::string> in_model = {"<|begin_of_sentence|>", "<|end_of_sentence|>"};
  std::string user_defined;
  for (const auto& s : in_model) user_defined += (user_defined.empty() ? "" : ",") + s;
  // Deterministic: one thread, no sampling or shuffling of the input.
  const std::string args = cat(
      "--model_type=bpe --vocab_size=", kSyntheticTokenizerMaxSize - 96,
      " --hard_vocab_limit=false --byte_fallback=true --character_coverage=1.0"
      " --split_digits=true --allow_whitespace_only_pieces=true --remove_extra_whitespaces=false"
      " --add_dummy_prefix=false --normalization_rule_name=identity"
      " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --user_defined_symbols=",
      user_defined,
      " --num_threads=1 --input_sentence_size=0 --shuffle_input_sentence=false"
      " --max_sentence_length=8192 --minloglevel=2");
  CorpusIterator corpus(embedded::tokenizer_corpus());
  std::string model;
  if (auto st = sentencepiece::SentencePieceTrainer::Train(args, &corpus, &model); !st.ok()) {
    throw Error(cat("training the synthetic tokenizer failed: ", st.ToString()));
  }
  sentencepiece::SentencePieceProcessor sp;
  if (auto st = sp.LoadFromSerializedProto(model); !st.ok()) {
    throw Error(cat("synthetic tokenizer: ", st.ToString()));
  }
  SyntheticTokenizer out;
  out.sentencepiece_size = sp.GetPieceSize();
  {
    std::ofstream f(dir / "tokenizer.model", std::ios::binary);
    f.write(model.data(), static_cast<std::streamsize>(model.size()));
    if (!f) throw Error(cat((dir / "tokenizer.model").string(), ": write failed"));
  }

  json decoder = json::object();
  decoder["0"] = added("<unk>");
  decoder["1"] = added("<s>");
  decoder["2"] = added("</s>");
  for (const auto& s : in_model) decoder[std::to_string(sp.PieceToId(s))] = added(s);
  std::vector<std::string> masks;
  for (int k = 0; k < 8; ++k) {
    masks.push_back(cat("<mask:", k, ">"));
    decoder[std::to_string(out.sentencepiece_size + k)] = added(masks.back());
  }
  out.size = out.sentencepiece_size + static_cast<int32_t>(masks.size());
  check(out.size <= kSyntheticTokenizerMaxSize, "synthetic tokenizer too large");

  // The named special tokens, written to special_tokens_map.json and repeated in
  // tokenizer_config.json (transformers reads either).
  const json special_map = {{"bos_token", "<s>"},
                            {"eos_token", "</s>"},
                            {"unk_token", "<unk>"},
                            {"pad_token", "<unk>"},
                            {"cls_token", "<|begin_of_sentence|>"},
                            {"sep_token", "<|end_of_sentence|>"},
                            {"mask_token", "<mask:1>"},
                            {"additional_special_tokens", masks}};
  json cfg = {
      {"tokenizer_class", "LlamaTokenizer"},
      {"add_bos_token", false},
      {"add_eos_token", false},
      {"add_prefix_space", false},
      {"legacy", true},
      {"added_tokens_decoder", decoder},
      {"chat_template", std::string(embedded::ernie45_chat_template())},
      {"clean_up_tokenization_spaces", false},
      {"spaces_between_special_tokens", false},
      {"model_max_length", 131072},
      {"padding_side", "left"},
  };
  cfg.update(special_map);
  write_json(dir / "tokenizer_config.json", cfg);
  write_json(dir / "special_tokens_map.json", special_map);
  const int end_of_sentence = sp.PieceToId("<|end_of_sentence|>");
  write_json(dir / "generation_config.json",
             {{"bos_token_id", 1}, {"eos_token_id", {2, end_of_sentence}}, {"pad_token_id", 0}});
  return out;
}

}  // namespace ernie::tokenizer
