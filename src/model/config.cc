#include "model/config.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/check.h"

namespace ernie::model {
namespace {

using nlohmann::json;

class Reader {
 public:
  Reader(const json& j, const std::string& source) : j_(j), source_(source) {}

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(cat(source_, ": field '", field, "' ", what));
  }
  const json* find(const std::string& key) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  int64_t integer(const json& v, const std::string& key) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // Some writers emit 2.0 for 2; accept floats that hold an exact integer.
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (d == static_cast<double>(static_cast<int64_t>(d))) return static_cast<int64_t>(d);
    }
    fail(key, cat("must be an integer, got ", v.dump()));
  }
  void get(const std::string& key, int64_t& out, bool required = false) const {
    if (const json* v = find(key)) {
      out = integer(*v, key);
    } else if (required) {
      fail(key, "is required but missing");
    }
  }
  void get(const std::string& key, double& out) const {
    if (const json* v = find(key)) {
      if (!v->is_number()) fail(key, cat("must be a number, got ", v->dump()));
      out = v->get<double>();
    }
  }
  void get(const std::string& key, bool& out) const {
    if (const json* v = find(key)) {
      if (!v->is_boolean()) fail(key, cat("must be true or false, got ", v->dump()));
      out = v->get<bool>();
    }
  }
  void get(const std::string& key, std::string& out) const {
    if (const json* v = find(key)) {
      if (!v->is_string()) fail(key, cat("must be a string, got ", v->dump()));
      out = v->get<std::string>();
    }
  }

 private:
  const json& j_;
  const std::string& source_;
};

}  // namespace

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += is_moe_layer(i);
  return n;
}

ModelConfig parse_config(const json& j, const std::string& source) {
  if (!j.is_object()) throw Error(cat(source, ": expected a JSON object"));
  Reader r(j, source);
  ModelConfig c;

  std::string model_type;
  r.get("model_type", model_type);
  if (!model_type.empty() && model_type != "ernie4_5_moe") {
    r.fail("model_type", cat("is '", model_type, "'; only 'ernie4_5_moe' models are supported"));
  }

  r.get("vocab_size", c.vocab_size, true);
  r.get("hidden_size", c.hidden_size, true);
  r.get("intermediate_size", c.intermediate_size, true);
  r.get("num_hidden_layers", c.num_hidden_layers, true);
  r.get("num_attention_heads", c.num_attention_heads, true);
  r.get("num_key_value_heads", c.num_key_value_heads);
  r.get("moe_intermediate_size", c.moe_intermediate_size);
  r.get("max_position_embeddings", c.max_position_embeddings);
  r.get("rms_norm_eps", c.rms_norm_eps);
  r.get("moe_num_experts", c.moe_num_experts);
  r.get("moe_k", c.moe_k);
  r.get("moe_num_shared_experts", c.moe_num_shared_experts);
  r.get("moe_layer_start_index", c.moe_layer_start_index);
  c.moe_layer_end_index = -1;
  r.get("moe_layer_end_index", c.moe_layer_end_index);
  r.get("moe_layer_interval", c.moe_layer_interval);
  r.get("moe_norm_min", c.moe_norm_min);
  r.get("tie_word_embeddings", c.tie_word_embeddings);
  r.get("bos_token_id", c.bos_token_id);
  r.get("pad_token_id", c.pad_token_id);
  r.get("num_nextn_predict_layers", c.num_nextn_predict_layers);
  if (!r.find("torch_dtype")) c.torch_dtype = "bfloat16";
  r.get("torch_dtype", c.torch_dtype);
  r.get("dtype", c.torch_dtype);  // newer transformers writes "dtype"

  c.head_dim = 0;
  r.get("head_dim", c.head_dim);
  if (c.head_dim == 0) {
    if (c.num_attention_heads <= 0) r.fail("num_attention_heads", "must be positive");
    if (c.hidden_size % c.num_attention_heads != 0) {
      r.fail("head_dim", cat("is missing and hidden_size ", c.hidden_size,
                             " is not divisible by num_attention_heads ", c.num_attention_heads));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (!r.find("num_key_value_heads")) c.num_key_value_heads = c.num_attention_heads;

  // eos_token_id: an integer or a list of integers.
  if (const json* e = r.find("eos_token_id")) {
    c.eos_token_ids.clear();
    if (e->is_array()) {
      for (const auto& v : *e) c.eos_token_ids.push_back(r.integer(v, "eos_token_id"));
    } else {
      c.eos_token_ids.push_back(r.integer(*e, "eos_token_id"));
    }
  }

  // rope_theta, or rope_parameters {rope_theta, rope_type} (newer transformers), or the legacy
  // rope_scaling dict. Only the default rope type exists for these models.
  r.get("rope_theta", c.rope_theta);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* rp = r.find(key);
    if (!rp) continue;
    if (!rp->is_object()) r.fail(key, cat("must be an object, got ", rp->dump()));
    Reader sub(*rp, source);
    std::string type = "default";
    sub.get("rope_type", type);
    if (type == "default") sub.get("type", type);
    if (type != "default") {
      r.fail(key, cat("has rope_type '", type, "'; only the default rope is supported"));
    }
    if (rp->contains("rope_theta")) {
      try {
        sub.get("rope_theta", c.rope_theta);
      } catch (const Error&) {
        r.fail(cat(key, ".rope_theta"), "must be a number");
      }
    }
  }

  std::string act = "silu";
  r.get("hidden_act", act);
  if (act != "silu") r.fail("hidden_act", cat("is '", act, "'; only 'silu' is supported"));
  bool use_bias = false;
  r.get("use_bias", use_bias);
  if (use_bias) r.fail("use_bias", "is true; checkpoints with linear biases are not supported");

  if (c.moe_layer_end_index == -1) c.moe_layer_end_index = c.num_hidden_layers - 1;
  validate_config(c, source);
  return c;
}

void validate_config(const ModelConfig& c, const std::string& source) {
  auto fail = [&](const std::string& field, const std::string& what) {
    throw Error(cat(source, ": field '", field, "' ", what));
  };
  auto positive = [&](const char* field, int64_t v) {
    if (v <= 0) fail(field, cat("must be positive, got ", v));
  };
  positive("vocab_size", c.vocab_size);
  positive("hidden_size", c.hidden_size);
  positive("intermediate_size", c.intermediate_size);
  positive("num_hidden_layers", c.num_hidden_layers);
  positive("num_attention_heads", c.num_attention_heads);
  positive("num_key_value_heads", c.num_key_value_heads);
  positive("head_dim", c.head_dim);
  positive("max_position_embeddings", c.max_position_embeddings);
  positive("moe_layer_interval", c.moe_layer_interval);
  if (c.head_dim % 2 != 0)
    fail("head_dim", cat("must be even for rotary embedding, got ", c.head_dim));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail("num_key_value_heads", cat(c.num_key_value_heads, " does not divide num_attention_heads ",
                                    c.num_attention_heads));
  }
  if (!(c.rope_theta > 0)) fail("rope_theta", cat("must be positive, got ", c.rope_theta));
  if (!(c.rms_norm_eps > 0)) fail("rms_norm_eps", cat("must be positive, got ", c.rms_norm_eps));
  if (!(c.moe_norm_min >= 0)) fail("moe_norm_min", "must be non-negative");
  if (c.moe_layer_start_index < 0) fail("moe_layer_start_index", "must be >= 0");
  if (c.moe_layer_end_index < -1 || c.moe_layer_end_index >= c.num_hidden_layers) {
    fail("moe_layer_end_index",
         cat("is ", c.moe_layer_end_index, " but the model has ", c.num_hidden_layers, " layers"));
  }
  if (c.num_moe_layers() > 0) {
    positive("moe_num_experts", c.moe_num_experts);
    positive("moe_intermediate_size", c.moe_intermediate_size);
    if (c.moe_k <= 0 || c.moe_k > c.moe_num_experts) {
      fail("moe_k",
           cat("is ", c.moe_k, " but must be in [1, moe_num_experts=", c.moe_num_experts, "]"));
    }
    if (c.moe_num_shared_experts < 0) fail("moe_num_shared_experts", "must be >= 0");
  }
  if (c.num_nextn_predict_layers < 0) fail("num_nextn_predict_layers", "must be >= 0");
  if (c.eos_token_ids.empty()) fail("eos_token_id", "must not be an empty list");
  for (int64_t id : c.eos_token_ids) {
    if (id < 0 || id >= c.vocab_size) fail("eos_token_id", cat(id, " is outside the vocabulary"));
  }
  if (c.torch_dtype != "bfloat16" && c.torch_dtype != "float16" && c.torch_dtype != "float32") {
    fail("torch_dtype", cat("is '", c.torch_dtype, "'; expected bfloat16, float16 or float32"));
  }
}

ModelConfig parse_config_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(cat(source, ": not valid JSON: ", e.what()));
  }
  return parse_config(j, source);
}

ModelConfig load_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  std::ifstream in(path);
  if (!in)
    throw Error(
        cat(path.string(), ": cannot open (is '", model_dir.string(), "' a model directory?)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config_text(ss.str(), path.string());
}

json config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {"Ernie4_5_MoeForCausalLM"};
  j["model_type"] = "ernie4_5_moe";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rope_theta"] = c.rope_theta;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = "silu";
  j["use_bias"] = false;
  j["moe_num_experts"] = c.moe_num_experts;
  j["moe_k"] = c.moe_k;
  j["moe_num_shared_experts"] = c.moe_num_shared_experts;
  j["moe_layer_start_index"] = c.moe_layer_start_index;
  j["moe_layer_end_index"] = c.moe_layer_end_index;
  j["moe_layer_interval"] = c.moe_layer_interval;
  j["moe_norm_min"] = c.moe_norm_min;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["pad_token_id"] = c.pad_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["torch_dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  return j;
}

}  // namespace ernie::model
