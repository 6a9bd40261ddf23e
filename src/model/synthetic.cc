#include "model/synthetic.h"

#include <cmath>
#include <cstring>
#include <fstream>

#include "common/check.h"
#include "common/log.h"
#include "common/rng.h"

namespace ernie::model {
namespace {

using nlohmann::json;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

backend::RandomInit synthetic_init(const std::string& name, const Shape& shape,
                                   const ModelConfig& c) {
  const double h = static_cast<double>(c.hidden_size);
  if (ends_with(name, "norm.weight") || contains(name, "_norm.")) return {true, 0.8, 1.2};
  if (name == "model.embed_tokens.weight")
    return {false, 0, c.tie_word_embeddings ? 3 / std::sqrt(h) : 1.0};
  if (name == "lm_head.weight") return {false, 0, 3 / std::sqrt(h)};
  if (ends_with(name, "mlp.gate.weight")) return {false, 0, 2 / std::sqrt(h)};
  if (ends_with(name, "e_score_correction_bias")) {
    const double e = static_cast<double>(c.moe_num_experts);
    return {true, -1 / e, 1 / e};
  }
  // Linear layers [out, in] (mtp_linear_proj may be stored transposed: use the larger side).
  double fan_in = static_cast<double>(shape.back());
  if (contains(name, "mtp_linear_proj")) fan_in = 2 * h;
  return {false, 0, 1 / std::sqrt(fan_in)};
}

json preset_config(const std::string& preset) {
  ModelConfig c;  // defaults are the 21B-A3B release
  if (preset == "21b-a3b") {
    c.moe_layer_end_index = 27;
    c.num_nextn_predict_layers = 1;
  } else if (preset == "300b-a47b") {
    c.hidden_size = 8192;
    c.intermediate_size = 28672;
    c.moe_intermediate_size = 3584;
    c.num_hidden_layers = 54;
    c.num_attention_heads = 64;
    c.num_key_value_heads = 8;
    c.moe_k = 8;
    c.moe_num_shared_experts = 0;
    c.moe_layer_start_index = 3;
    c.moe_layer_end_index = 53;
    c.tie_word_embeddings = false;
    c.num_nextn_predict_layers = 1;
  } else if (preset == "tiny") {
    // Small enough for CI, with every feature of the 21B: GQA, shared experts, a dense first
    // layer, tied head, head_dim != hidden / heads, MTP. The vocabulary covers the synthetic
    // tokenizer (at most 4096 ids) so generated ids decode to text.
    c.vocab_size = 4096;
    c.hidden_size = 128;
    c.intermediate_size = 352;
    c.moe_intermediate_size = 64;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 48;
    c.max_position_embeddings = 4096;
    c.moe_num_experts = 16;
    c.moe_k = 4;
    c.moe_num_shared_experts = 2;
    c.moe_layer_start_index = 1;
    c.moe_layer_end_index = 3;
    c.num_nextn_predict_layers = 1;
  } else {
    throw Error(cat("unknown preset '", preset, "' (choose tiny, 21b-a3b or 300b-a47b)"));
  }
  json j = config_to_json(c);
  if (preset == "tiny") j["moe_layer_end_index"] = -1;  // exercise the -1 spelling
  return j;
}

void apply_overrides(json& config, const std::vector<std::string>& sets) {
  for (const auto& s : sets) {
    const auto eq = s.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw Error(cat("--set '", s, "': expected key=value"));
    }
    const std::string key = s.substr(0, eq), value = s.substr(eq + 1);
    json v = json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (v.is_discarded()) v = value;  // a bare string
    config[key] = v;
  }
}

std::vector<TensorSpec> checkpoint_tensors(const ModelConfig& c, bool mtp_proj_transposed) {
  const int64_t h = c.hidden_size, v = c.vocab_size, q = c.q_size(), kv = c.kv_size();
  std::vector<TensorSpec> out;
  auto add = [&](std::string name, Shape shape, DType t = DType::kBF16) {
    out.push_back(TensorSpec{std::move(name), t, std::move(shape)});
  };
  add("model.embed_tokens.weight", {v, h});
  auto dense_layer = [&](const std::string& p) {
    add(p + "input_layernorm.weight", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q, h});
    add(p + "self_attn.k_proj.weight", {kv, h});
    add(p + "self_attn.v_proj.weight", {kv, h});
    add(p + "self_attn.o_proj.weight", {h, q});
  };
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = cat("model.layers.", i, ".");
    dense_layer(p);
    if (!c.is_moe_layer(i)) {
      add(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
      add(p + "mlp.up_proj.weight", {c.intermediate_size, h});
      add(p + "mlp.down_proj.weight", {h, c.intermediate_size});
      continue;
    }
    const int64_t e = c.moe_num_experts, ie = c.moe_intermediate_size;
    add(p + "mlp.gate.weight", {e, h}, DType::kF32);
    add(p + "mlp.moe_statics.e_score_correction_bias", {1, e}, DType::kF32);
    for (int64_t x = 0; x < e; ++x) {
      const std::string ep = cat(p, "mlp.experts.", x, ".");
      add(ep + "gate_proj.weight", {ie, h});
      add(ep + "up_proj.weight", {ie, h});
      add(ep + "down_proj.weight", {h, ie});
    }
    if (c.moe_num_shared_experts > 0) {
      const int64_t si = c.shared_intermediate_size();
      add(p + "mlp.shared_experts.gate_proj.weight", {si, h});
      add(p + "mlp.shared_experts.up_proj.weight", {si, h});
      add(p + "mlp.shared_experts.down_proj.weight", {h, si});
    }
  }
  add("model.norm.weight", {h});
  if (!c.tie_word_embeddings) add("lm_head.weight", {v, h});
  for (int64_t m = 0; m < c.num_nextn_predict_layers; ++m) {
    add(cat("model.mtp_emb_norm.", m, ".weight"), {h});
    add(cat("model.mtp_hidden_norm.", m, ".weight"), {h});
    add(cat("model.mtp_linear_proj.", m, ".weight"),
        mtp_proj_transposed ? Shape{2 * h, h} : Shape{h, 2 * h});
    const std::string p = cat("model.mtp_block.", m, ".");
    dense_layer(p);
    add(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.up_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.down_proj.weight", {h, c.intermediate_size});
  }
  return out;
}

void fill_synthetic(const TensorSpec& spec, const ModelConfig& c, uint64_t seed,
                    std::span<std::byte> out) {
  const backend::RandomInit init = synthetic_init(spec.name, spec.shape, c);
  const int64_t n = shape_numel(spec.shape);
  check(static_cast<uint64_t>(out.size()) == spec.nbytes(), "fill buffer size");
  // Independent streams per chunk keep the values identical whatever the thread count.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    Rng rng(seed, cat(spec.name, "#", ch));
    const int64_t end = std::min(n, (ch + 1) * kChunk);
    for (int64_t i = ch * kChunk; i < end; ++i) {
      const double x = init.uniform ? rng.uniform(init.a, init.b) : init.a + init.b * rng.normal();
      const float f = static_cast<float>(x);
      if (spec.dtype == DType::kF32) {
        std::memcpy(out.data() + 4 * i, &f, 4);
      } else {
        const uint16_t b = float_to_bf16(f);
        std::memcpy(out.data() + 2 * i, &b, 2);
      }
    }
  }
}

ModelConfig make_model(const MakeModelOptions& opts) {
  namespace fs = std::filesystem;
  json cfg_json = preset_config(opts.preset);
  apply_overrides(cfg_json, opts.sets);
  const ModelConfig c = parse_config(cfg_json, "make-model config");
  fs::create_directories(opts.out);
  {
    std::ofstream f(opts.out / "config.json");
    f << cfg_json.dump(2) << "\n";
    if (!f) throw Error(cat((opts.out / "config.json").string(), ": write failed"));
  }
  // Remove shards of an earlier model in the same directory so the index stays the truth.
  for (const auto& e : fs::directory_iterator(opts.out)) {
    if (e.path().extension() == ".safetensors" ||
        e.path().filename() == "model.safetensors.index.json") {
      fs::remove(e.path());
    }
  }
  if (opts.no_weights) {
    log::info("wrote ", (opts.out / "config.json").string(), " (no weights)");
    return c;
  }
  const auto specs = checkpoint_tensors(c, opts.preset == "300b-a47b");
  uint64_t total = 0;
  for (const auto& s : specs) total += s.nbytes();
  // At least two shards whenever possible, so the sharded path is always exercised.
  const uint64_t limit = std::max<uint64_t>(1, std::min(opts.max_shard_bytes, total / 2 + 1));
  std::vector<std::vector<size_t>> shards(1);
  uint64_t acc = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (acc > 0 && acc + specs[i].nbytes() > limit) {
      shards.emplace_back();
      acc = 0;
    }
    shards.back().push_back(i);
    acc += specs[i].nbytes();
  }
  json weight_map = json::object();
  uint64_t written = 0;
  for (size_t k = 0; k < shards.size(); ++k) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", k + 1, shards.size());
    std::vector<TensorSpec> part;
    for (size_t i : shards[k]) {
      part.push_back(specs[i]);
      weight_map[specs[i].name] = fname;
    }
    write_safetensors(opts.out / fname, part, [&](size_t i, std::span<std::byte> buf) {
      fill_synthetic(part[i], c, opts.seed, buf);
      written += part[i].nbytes();
    });
    log::info("make-model: wrote ", fname, " (", k + 1, "/", shards.size(), ", ",
              written * 100 / std::max<uint64_t>(total, 1), "% of ", total / 1e9, " GB)");
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::ofstream f(opts.out / "model.safetensors.index.json");
  f << index.dump(2) << "\n";
  if (!f) throw Error("model.safetensors.index.json: write failed");
  return c;
}

}  // namespace ernie::model
