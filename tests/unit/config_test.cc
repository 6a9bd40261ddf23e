#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/check.h"
#include "model/config.h"
#include "model/synthetic.h"

namespace ernie::model {
namespace {

using nlohmann::json;

// The shape of the released ERNIE-4.5-21B-A3B-PT config.json, with keys engines ignore.
json released_21b() {
  return json::parse(R"({
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28,
    "rms_norm_eps": 1e-05, "use_cache": false, "vocab_size": 103424, "rope_theta": 500000,
    "use_rmsnorm": true, "tie_word_embeddings": true, "use_bias": false,
    "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
    "moe_intermediate_size": 1536, "moe_capacity": [64, 64, 64], "moe_gate": "topk",
    "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": true,
    "multi_token_pred_lambda": 0.3, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16"
  })");
}

std::string error_of(const json& j) {
  try {
    parse_config(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, Released21B) {
  const ModelConfig c = parse_config(released_21b());
  EXPECT_EQ(c.hidden_size, 2560);
  EXPECT_EQ(c.head_dim, 128);            // derived: 2560 / 20
  EXPECT_EQ(c.moe_layer_end_index, 27);  // absent -> num_hidden_layers - 1
  EXPECT_EQ(c.num_moe_layers(), 27);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(27));
  EXPECT_EQ(c.shared_intermediate_size(), 3072);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.moe_norm_min, 1e-12);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
}

TEST(Config, Presets) {
  const ModelConfig big = parse_config(preset_config("300b-a47b"));
  EXPECT_EQ(big.num_moe_layers(), 51);  // layers 3..53
  EXPECT_FALSE(big.is_moe_layer(2));
  EXPECT_EQ(big.num_attention_heads / big.num_key_value_heads, 8);
  EXPECT_FALSE(big.tie_word_embeddings);
  const ModelConfig tiny = parse_config(preset_config("tiny"));
  EXPECT_EQ(preset_config("tiny")["moe_layer_end_index"], -1);
  EXPECT_EQ(tiny.moe_layer_end_index, tiny.num_hidden_layers - 1);
  EXPECT_THROW(preset_config("7b"), Error);
}

TEST(Config, RopeParametersAndEosList) {
  json j = released_21b();
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_theta", 10000.0}, {"rope_type", "default"}};
  j["eos_token_id"] = {2, 100273};
  j["moe_layer_end_index"] = -1;
  j["dtype"] = "bfloat16";
  const ModelConfig c = parse_config(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 100273}));
  EXPECT_EQ(c.moe_layer_end_index, 27);
}

TEST(Config, IntervalRule) {
  json j = released_21b();
  j["moe_layer_interval"] = 2;
  j["moe_layer_start_index"] = 2;
  j["moe_layer_end_index"] = 20;
  const ModelConfig c = parse_config(j);
  for (int i = 0; i < 28; ++i)
    EXPECT_EQ(c.is_moe_layer(i), (i + 1) % 2 == 0 && i >= 2 && i <= 20) << i;
}

TEST(Config, RejectsInvalidModelsNamingTheField) {
  auto with = [](const char* key, json v) {
    json j = released_21b();
    j[key] = v;
    return j;
  };
  EXPECT_NE(error_of(with("num_key_value_heads", 3)).find("num_key_value_heads"),
            std::string::npos);
  EXPECT_NE(error_of(with("moe_k", 65)).find("moe_k"), std::string::npos);
  EXPECT_NE(error_of(with("moe_k", 0)).find("moe_k"), std::string::npos);
  EXPECT_NE(error_of(with("hidden_size", "2560")).find("'hidden_size' must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of(with("hidden_size", 2560.5)).find("hidden_size"), std::string::npos);
  EXPECT_NE(error_of(with("rms_norm_eps", "small")).find("rms_norm_eps"), std::string::npos);
  EXPECT_NE(error_of(with("tie_word_embeddings", 1)).find("tie_word_embeddings"),
            std::string::npos);
  EXPECT_NE(error_of(with("moe_layer_end_index", 28)).find("moe_layer_end_index"),
            std::string::npos);
  EXPECT_NE(error_of(with("hidden_act", "gelu")).find("hidden_act"), std::string::npos);
  EXPECT_NE(error_of(with("use_bias", true)).find("use_bias"), std::string::npos);
  EXPECT_NE(error_of(with("model_type", "llama")).find("model_type"), std::string::npos);
  EXPECT_NE(error_of(with("head_dim", 127)).find("head_dim"), std::string::npos);
  EXPECT_NE(error_of(with("eos_token_id", 200000)).find("eos_token_id"), std::string::npos);
  EXPECT_NE(error_of(with("rope_scaling", json{{"rope_type", "yarn"}})).find("rope_scaling"),
            std::string::npos);
  json missing = released_21b();
  missing.erase("num_hidden_layers");
  EXPECT_NE(error_of(missing).find("'num_hidden_layers' is required"), std::string::npos);
  json bad_heads = released_21b();
  bad_heads["num_attention_heads"] = 7;  // 2560 % 7 != 0 and no head_dim given
  bad_heads["num_key_value_heads"] = 7;
  EXPECT_NE(error_of(bad_heads).find("head_dim"), std::string::npos);
  // Every message names the source file.
  EXPECT_EQ(error_of(with("moe_k", 65)).rfind("config.json", 0), 0u);
  EXPECT_THROW(parse_config_text("{not json", "x/config.json"), Error);
  EXPECT_THROW(parse_config_text("[1, 2]", "x/config.json"), Error);
}

TEST(Config, ExplicitHeadDimOverridesDerived) {
  json j = released_21b();
  j["head_dim"] = 64;
  EXPECT_EQ(parse_config(j).head_dim, 64);
  EXPECT_EQ(parse_config(j).q_size(), 20 * 64);
}

TEST(Config, RoundTripsThroughJson) {
  const ModelConfig a = parse_config(preset_config("300b-a47b"));
  const ModelConfig b = parse_config(config_to_json(a));
  EXPECT_EQ(config_to_json(a), config_to_json(b));
}

}  // namespace
}  // namespace ernie::model
