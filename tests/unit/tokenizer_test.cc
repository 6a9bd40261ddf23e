#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <random>

#include "common/check.h"
#include "common/rng.h"
#include "test_util.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/sp_proto.h"
#include "tokenizer/synthetic.h"
#include "tokenizer/tokenizer.h"

namespace ernie::tokenizer {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

// The synthetic tokenizer, trained once for the suite.
class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    info_ = write_synthetic_tokenizer(dir_->path());
  }
  static void TearDownTestSuite() { delete dir_; }
  static fs::path copy_dir() {
    auto* d = new TempDir;  // leaked on purpose: lives for the test binary
    for (const auto& e : fs::directory_iterator(dir_->path()))
      fs::copy(e.path(), d->path() / e.path().filename());
    return d->path();
  }
  static TempDir* dir_;
  static SyntheticTokenizer info_;
};
TempDir* TokenizerTest::dir_ = nullptr;
SyntheticTokenizer TokenizerTest::info_;

TEST_F(TokenizerTest, SpecialTokensBothWays) {
  auto tok = Tokenizer::load(dir_->path());
  EXPECT_EQ(tok->vocab_size(), info_.size);
  // Inside the SentencePiece model (user-defined symbol) ...
  const auto eos_sent = tok->token_to_id("<|end_of_sentence|>");
  ASSERT_TRUE(eos_sent.has_value());
  EXPECT_LT(*eos_sent, info_.sentencepiece_size);
  // ... and only in the JSON files, beyond the SentencePiece vocabulary.
  const auto mask3 = tok->token_to_id("<mask:3>");
  ASSERT_TRUE(mask3.has_value());
  EXPECT_EQ(*mask3, info_.sentencepiece_size + 3);
  const auto ids = tok->encode("a<|end_of_sentence|>b<mask:3>c</s>");
  EXPECT_EQ(std::count(ids.begin(), ids.end(), *eos_sent), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), *mask3), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 2), 1);
  EXPECT_TRUE(tok->is_special(*mask3));
  EXPECT_TRUE(tok->is_special(2));
  EXPECT_FALSE(tok->is_special(ids[0]));
  // Stop ids come from the files: </s> and generation_config's list.
  EXPECT_NE(std::find(tok->eos_token_ids().begin(), tok->eos_token_ids().end(), 2),
            tok->eos_token_ids().end());
  EXPECT_NE(std::find(tok->eos_token_ids().begin(), tok->eos_token_ids().end(), *eos_sent),
            tok->eos_token_ids().end());
  EXPECT_EQ(tok->bos_token_id(), 1);
  EXPECT_EQ(tok->special_token_strings().at("cls_token"), "<|begin_of_sentence|>");
  EXPECT_FALSE(tok->chat_template().empty());
}

TEST_F(TokenizerTest, NoBosByDefaultAndTheSwitch) {
  auto tok = Tokenizer::load(dir_->path());
  EXPECT_EQ(tok->encode("hello", true), tok->encode("hello", false));
  const fs::path d = copy_dir();
  auto cfg = nlohmann::json::parse(testing::read_file(d / "tokenizer_config.json"));
  cfg["add_bos_token"] = true;
  testing::write_file(d / "tokenizer_config.json", cfg.dump());
  auto with_bos = Tokenizer::load(d);
  auto ids = with_bos->encode("hello", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(with_bos->encode("hello", false), tok->encode("hello", false));
}

TEST_F(TokenizerTest, RoundTripsText) {
  auto tok = Tokenizer::load(dir_->path());
  for (const std::string text : {"Hello world", "  spaces   and\ttabs\n\nnewlines ", "模型专家 😀🚀",
                                 "code: for (int i = 0; i < n; ++i) {}",
                                 "<mask:1>x<|end_of_sentence|>", "", "é\u0301 ﬁ ①"}) {
    EXPECT_EQ(tok->decode(tok->encode(text)), text);
  }
  EXPECT_EQ(tok->decode(tok->encode("a<mask:1>b</s>"), true), "ab");
}

TEST_F(TokenizerTest, PrefixSchemeFromTokenizerJson) {
  auto never = Tokenizer::load(dir_->path());
  const fs::path d = copy_dir();
  testing::write_file(
      d / "tokenizer.json",
      R"({"added_tokens": [], "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}})");
  auto always = Tokenizer::load(d);
  EXPECT_EQ(always->prefix_space(), PrefixSpace::kAlways);
  EXPECT_EQ(always->encode("hello world"), never->encode(" hello world"));
  // "always" prefixes every text piece between special tokens too.
  auto mid = always->encode("a</s>b");
  auto expect = never->encode(" a</s> b");
  EXPECT_EQ(mid, expect);
}

TEST_F(TokenizerTest, DetokenizerStreamsWholeCharactersAndMatchesDecode) {
  auto tok = Tokenizer::load(dir_->path());
  Rng rng(std::random_device{}());
  std::vector<int32_t> byte_ids;
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    if (tok->piece(id).is_byte) byte_ids.push_back(id);
  }
  ASSERT_EQ(byte_ids.size(), 256u);
  // Real text's ids (multi-byte characters split over byte tokens) and random ids.
  const auto text_ids = tok->encode("emoji 😀🚀 and 模型 and ü, then <mask:2> and </s>.");
  for (int iter = 0; iter < 2000; ++iter) {
    std::vector<int32_t> ids;
    if (iter % 4 == 0) {
      ids = text_ids;
    } else {
      const int n = 1 + static_cast<int>(rng.below(40));
      for (int i = 0; i < n; ++i) {
        const uint64_t r = rng.below(10);
        if (r < 4)
          ids.push_back(byte_ids[rng.below(256)]);
        else if (r < 5)
          ids.push_back(static_cast<int32_t>(rng.below(8)) + tok->vocab_size() - 8);
        else if (r < 6)
          ids.push_back(tok->vocab_size() + static_cast<int32_t>(rng.below(50)));  // unknown
        else
          ids.push_back(static_cast<int32_t>(rng.below(tok->vocab_size())));
      }
    }
    for (bool skip : {false, true}) {
      IncrementalDetokenizer d(tok, skip);
      std::string joined;
      for (int32_t id : ids) {
        const std::string chunk = d.add(id);
        ASSERT_TRUE(is_valid_utf8(chunk));
        joined += chunk;
      }
      const std::string last = d.finish();
      ASSERT_TRUE(is_valid_utf8(last));
      joined += last;
      ASSERT_EQ(joined, tok->decode(ids, skip));
      ASSERT_EQ(d.text(), joined);
    }
  }
}

TEST_F(TokenizerTest, BrokenFilesAreClearErrors) {
  auto message = [](const fs::path& d) -> std::string {
    try {
      Tokenizer::load(d);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  TempDir empty;
  EXPECT_NE(message(empty.path()).find("tokenizer.model"), std::string::npos);
  {
    const fs::path d = copy_dir();
    testing::write_file(d / "tokenizer_config.json", "{oops");
    EXPECT_NE(message(d).find("tokenizer_config.json"), std::string::npos);
  }
  {
    const fs::path d = copy_dir();
    testing::write_file(d / "tokenizer_config.json",
                        R"({"added_tokens_decoder": {"x": {"content": "<a>"}}})");
    EXPECT_NE(message(d).find("added_tokens_decoder"), std::string::npos);
  }
  {
    const fs::path d = copy_dir();
    testing::write_file(d / "generation_config.json", R"({"eos_token_id": "two"})");
    EXPECT_NE(message(d).find("generation_config.json"), std::string::npos);
  }
  Rng rng(std::random_device{}());
  const std::string good = testing::read_file(dir_->path() / "tokenizer.model");
  for (int i = 0; i < 20; ++i) {
    const fs::path d = copy_dir();
    std::string bad = good.substr(0, rng.below(good.size()));
    testing::write_file(d / "tokenizer.model", bad);
    EXPECT_FALSE(message(d).empty());  // an error, never a crash
  }
}

TEST(SpProto, SetsNormalizerFlags) {
  TempDir d;
  write_synthetic_tokenizer(d.path());
  const std::string model = testing::read_file(d.path() / "tokenizer.model");
  EXPECT_FALSE(dummy_prefix_of(model));  // trained without it
  const std::string on = set_normalizer_flags(model, true, false);
  EXPECT_TRUE(dummy_prefix_of(on));
  EXPECT_FALSE(dummy_prefix_of(set_normalizer_flags(on, false, true)));
  EXPECT_THROW(set_normalizer_flags("\xff\xff\xff", true, true), Error);
}

}  // namespace
}  // namespace ernie::tokenizer
