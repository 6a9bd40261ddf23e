// ModelConfig: the config.json of an ERNIE-4.5 MoE checkpoint ("ernie4_5_moe"), validated.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ernie::model {

struct ModelConfig {
  int64_t vocab_size = 103424;
  int64_t hidden_size = 2560;
  int64_t intermediate_size = 12288;     // dense FFN width
  int64_t moe_intermediate_size = 1536;  // one routed expert's FFN width
  int64_t num_hidden_layers = 28;
  int64_t num_attention_heads = 20;
  int64_t num_key_value_heads = 4;
  int64_t head_dim = 128;  // default: hidden_size / num_attention_heads
  int64_t max_position_embeddings = 131072;
  double rope_theta = 500000.0;
  double rms_norm_eps = 1e-5;
  int64_t moe_num_experts = 64;
  int64_t moe_k = 6;
  int64_t moe_num_shared_experts = 2;
  int64_t moe_layer_start_index = 1;
  int64_t moe_layer_end_index = 27;  // -1 in config.json is resolved to num_hidden_layers-1
  int64_t moe_layer_interval = 1;
  double moe_norm_min = 1e-12;
  bool tie_word_embeddings = true;
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};
  int64_t pad_token_id = 0;
  int64_t num_nextn_predict_layers = 0;  // MTP draft layers in the checkpoint
  std::string torch_dtype = "bfloat16";

  // Layer i has a routed-expert FFN iff (i+1) % interval == 0 and start <= i <= end.
  bool is_moe_layer(int64_t layer) const {
    return (layer + 1) % moe_layer_interval == 0 && layer >= moe_layer_start_index &&
           layer <= moe_layer_end_index;
  }
  int64_t num_moe_layers() const;
  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
  int64_t shared_intermediate_size() const {
    return moe_intermediate_size * moe_num_shared_experts;
  }
};

// Parses and validates. Throws ernie::Error naming the offending field; `source` (a path or
// "config") prefixes every message.
ModelConfig parse_config(const nlohmann::json& j, const std::string& source = "config.json");
ModelConfig parse_config_text(const std::string& text, const std::string& source);
ModelConfig load_config(const std::filesystem::path& model_dir);

// The config.json a released checkpoint of this shape would carry.
nlohmann::json config_to_json(const ModelConfig& c);

// Checks cross-field consistency (throws naming the field). parse_config calls it.
void validate_config(const ModelConfig& c, const std::string& source);

}  // namespace ernie::model
