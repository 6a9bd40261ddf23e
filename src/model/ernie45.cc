#include "model/ernie45.h"

#include <cmath>
#include <cstring>

#include "common/check.h"
#include "common/log.h"
#include "common/rng.h"
#include "model/synthetic.h"

namespace ernie::model {
namespace {

using backend::HostTensor;

HostTensor host(const TensorView& v) {
  return HostTensor{v.data, v.dtype(), v.shape()};
}

// Concatenates tensors of one dtype along dim 0 (and optionally stacks under a new leading dim)
// into one host buffer, so q/k/v and gate/up become one GEMM and experts one stacked tensor.
class Concat {
 public:
  void add(const TensorView& v) {
    const DType t = v.dtype();
    if (parts_.empty()) dtype_ = t;
    if (t != dtype_) {
      throw Error(cat(*v.file, ": tensor '", v.info->name, "' is ", dtype_name(t), " but ",
                      dtype_name(dtype_), " was expected like its siblings"));
    }
    const auto* p = reinterpret_cast<const char*>(v.data);
    bytes_.insert(bytes_.end(), p, p + v.info->nbytes());
    parts_.push_back(v.shape());
  }
  // Rows of all parts stacked: [sum rows, cols].
  HostTensor rows() const {
    int64_t r = 0;
    for (const auto& s : parts_) r += s[0];
    return HostTensor{bytes_.data(), dtype_, {r, parts_[0][1]}};
  }
  HostTensor with_shape(const backend::Shape& shape) const {
    return HostTensor{bytes_.data(), dtype_, shape};
  }

 private:
  DType dtype_ = DType::kBF16;
  std::vector<char> bytes_;
  std::vector<Shape> parts_;
};

}  // namespace

ModelWeights load_weights(const ModelConfig& c, const Checkpoint& ck, backend::Backend& be) {
  const int64_t h = c.hidden_size, v = c.vocab_size;
  ModelWeights w;
  w.embed = be.load_weight(host(ck.get("model.embed_tokens.weight", {v, h})));
  w.norm = be.load_weight(host(ck.get("model.norm.weight", {h})));
  if (ck.has("lm_head.weight")) {
    if (c.tie_word_embeddings) {
      log::warn(
          "checkpoint has lm_head.weight but tie_word_embeddings is true: using the embedding");
      w.lm_head = w.embed;
    } else {
      w.lm_head = be.load_weight(host(ck.get("lm_head.weight", {v, h})));
    }
  } else {
    require(c.tie_word_embeddings, cat(ck.dir().string(),
                                       ": checkpoint has no tensor 'lm_head.weight' and "
                                       "tie_word_embeddings is false"));
    w.lm_head = w.embed;
  }
  const int64_t q = c.q_size(), kv = c.kv_size();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = cat("model.layers.", i, ".");
    LayerWeights L;
    L.input_norm = be.load_weight(host(ck.get(p + "input_layernorm.weight", {h})));
    L.post_norm = be.load_weight(host(ck.get(p + "post_attention_layernorm.weight", {h})));
    Concat qkv;
    qkv.add(ck.get(p + "self_attn.q_proj.weight", {q, h}));
    qkv.add(ck.get(p + "self_attn.k_proj.weight", {kv, h}));
    qkv.add(ck.get(p + "self_attn.v_proj.weight", {kv, h}));
    L.qkv = be.load_weight(qkv.rows());
    L.o = be.load_weight(host(ck.get(p + "self_attn.o_proj.weight", {h, q})));
    L.is_moe = c.is_moe_layer(i);
    if (!L.is_moe) {
      const int64_t inter = c.intermediate_size;
      Concat gu;
      gu.add(ck.get(p + "mlp.gate_proj.weight", {inter, h}));
      gu.add(ck.get(p + "mlp.up_proj.weight", {inter, h}));
      L.gate_up = be.load_weight(gu.rows());
      L.down = be.load_weight(host(ck.get(p + "mlp.down_proj.weight", {h, inter})));
    } else {
      const int64_t e = c.moe_num_experts, ie = c.moe_intermediate_size;
      auto& m = L.moe;
      auto router = ck.get(p + "mlp.gate.weight", {e, h});
      m.router = be.load_weight(HostTensor{router.data, router.dtype(), {e, h}});
      // Released checkpoints store the bias as [1, E]; accept [E] too.
      auto bias = ck.get(p + "mlp.moe_statics.e_score_correction_bias");
      require(bias.numel() == e && (bias.shape() == Shape{1, e} || bias.shape() == Shape{e}),
              cat(*bias.file, ": tensor '", bias.info->name, "' has shape ",
                  shape_str(bias.shape()), ", expected [1, ", e, "]"));
      m.router_bias = be.load_weight(HostTensor{bias.data, bias.dtype(), {e}});
      Concat gu, down;
      for (int64_t x = 0; x < e; ++x) {
        const std::string ep = cat(p, "mlp.experts.", x, ".");
        gu.add(ck.get(ep + "gate_proj.weight", {ie, h}));
        gu.add(ck.get(ep + "up_proj.weight", {ie, h}));
        down.add(ck.get(ep + "down_proj.weight", {h, ie}));
      }
      m.experts_gate_up = be.load_weight(gu.with_shape({e, 2 * ie, h}));
      m.experts_down = be.load_weight(down.with_shape({e, h, ie}));
      if (c.moe_num_shared_experts > 0) {
        const int64_t si = c.shared_intermediate_size();
        Concat sgu;
        sgu.add(ck.get(p + "mlp.shared_experts.gate_proj.weight", {si, h}));
        sgu.add(ck.get(p + "mlp.shared_experts.up_proj.weight", {si, h}));
        m.shared_gate_up = be.load_weight(sgu.rows());
        m.shared_down =
            be.load_weight(host(ck.get(p + "mlp.shared_experts.down_proj.weight", {h, si})));
      }
      be.prepare_moe(m);
      m.top_k = static_cast<int>(c.moe_k);
      m.norm_min = static_cast<float>(c.moe_norm_min);
    }
    w.layers.push_back(std::move(L));
    const int64_t done = i + 1;
    if (done == c.num_hidden_layers || done % 4 == 0) {
      log::info("loading weights: ", done, "/", c.num_hidden_layers, " layers (",
                be.weight_bytes() / 1e9, " GB on ", be.name(), ")");
    }
  }
  return w;
}

ModelWeights dummy_weights(const ModelConfig& c, backend::Backend& be, uint64_t seed) {
  const int64_t h = c.hidden_size, v = c.vocab_size;
  // `like` names the released tensor whose scale the fused tensor takes.
  auto make = [&](const std::string& like, const Shape& like_shape, const Shape& shape,
                  DType dtype = DType::kBF16) {
    return be.random_weight(shape, dtype, synthetic_init(like, like_shape, c),
                            seed ^ hash_name(like));
  };
  ModelWeights w;
  w.embed = make("model.embed_tokens.weight", {v, h}, {v, h});
  w.norm = make("model.norm.weight", {h}, {h});
  w.lm_head = c.tie_word_embeddings ? w.embed : make("lm_head.weight", {v, h}, {v, h});
  const int64_t q = c.q_size(), kv = c.kv_size();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = cat("model.layers.", i, ".");
    LayerWeights L;
    L.input_norm = make(p + "input_layernorm.weight", {h}, {h});
    L.post_norm = make(p + "post_attention_layernorm.weight", {h}, {h});
    L.qkv = make(p + "self_attn.q_proj.weight", {q, h}, {q + 2 * kv, h});
    L.o = make(p + "self_attn.o_proj.weight", {h, q}, {h, q});
    L.is_moe = c.is_moe_layer(i);
    if (!L.is_moe) {
      const int64_t inter = c.intermediate_size;
      L.gate_up = make(p + "mlp.gate_proj.weight", {inter, h}, {2 * inter, h});
      L.down = make(p + "mlp.down_proj.weight", {h, inter}, {h, inter});
    } else {
      const int64_t e = c.moe_num_experts, ie = c.moe_intermediate_size;
      auto& m = L.moe;
      m.router = make(p + "mlp.gate.weight", {e, h}, {e, h}, DType::kF32);
      m.router_bias = make(p + "mlp.moe_statics.e_score_correction_bias", {1, e}, {e}, DType::kF32);
      m.experts_gate_up = make(p + "mlp.experts.0.gate_proj.weight", {ie, h}, {e, 2 * ie, h});
      m.experts_down = make(p + "mlp.experts.0.down_proj.weight", {h, ie}, {e, h, ie});
      if (c.moe_num_shared_experts > 0) {
        const int64_t si = c.shared_intermediate_size();
        m.shared_gate_up = make(p + "mlp.shared_experts.gate_proj.weight", {si, h}, {2 * si, h});
        m.shared_down = make(p + "mlp.shared_experts.down_proj.weight", {h, si}, {h, si});
      }
      be.prepare_moe(m);
      m.top_k = static_cast<int>(c.moe_k);
      m.norm_min = static_cast<float>(c.moe_norm_min);
    }
    w.layers.push_back(std::move(L));
    const int64_t done = i + 1;
    if (done == c.num_hidden_layers || done % 4 == 0) {
      log::info("dummy weights: ", done, "/", c.num_hidden_layers, " layers (",
                be.weight_bytes() / 1e9, " GB)");
    }
  }
  return w;
}

Ernie45::Ernie45(const ModelConfig& cfg, ModelWeights weights, backend::Backend& be)
    : cfg_(cfg), w_(std::move(weights)), be_(be) {
  backend::AttentionConfig a;
  a.num_heads = static_cast<int>(cfg.num_attention_heads);
  a.num_kv_heads = static_cast<int>(cfg.num_key_value_heads);
  a.head_dim = static_cast<int>(cfg.head_dim);
  a.rope_theta = cfg.rope_theta;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(cfg.head_dim)));
  be_.configure_attention(a);
}

std::vector<float> Ernie45::forward(const backend::StepInput& step) {
  const Tensor logits = forward_logits(step);
  std::vector<float> out(logits.numel());
  if (!out.empty()) be_.to_host(logits, out.data());
  return out;
}

int Ernie45::graph_size_for(int batch) const {
  for (int s : graph_sizes_) {
    if (s >= batch) return s;
  }
  return 0;
}

backend::StepInput Ernie45::pad_step(const backend::StepInput& step, int size) const {
  backend::StepInput p = step;
  const int32_t spare = static_cast<int32_t>(be_.num_kv_blocks());
  const int block = be_.kv_block_size();
  for (int r = step.num_seqs(); r < size; ++r) {
    p.token_ids.push_back(0);
    p.positions.push_back(0);
    p.slot_mapping.push_back(static_cast<int64_t>(spare) * block);
    p.query_start.push_back(p.num_tokens());
    p.context_lens.push_back(1);
    p.block_tables.push_back(spare);
    for (int b = 1; b < p.max_blocks_per_seq; ++b) p.block_tables.push_back(-1);
    p.logits_indices.push_back(r);
  }
  return p;
}

std::vector<int> Ernie45::graph_sizes(int max_batch) {
  // vLLM's capture sizes: 1, 2, 4, multiples of 8 below 256, then multiples of 16, up to the
  // first size that holds max_batch.
  std::vector<int> sizes;
  for (int s = 1; max_batch > 0 && (sizes.empty() || sizes.back() < max_batch);
       s = s < 8 ? 2 * s : s + (s < 256 ? 8 : 16)) {
    sizes.push_back(s);
  }
  return sizes;
}

int Ernie45::enable_graphs(int max_batch, int max_blocks_per_seq) {
  graph_sizes_.clear();
  graph_logits_.clear();
  const std::vector<int> sizes = graph_sizes(max_batch);
  if (sizes.empty()) return 0;
  if (!be_.enable_graphs(sizes.back(), max_blocks_per_seq)) return 0;
  graph_max_blocks_ = max_blocks_per_seq;
  graph_sizes_ = sizes;
  // Record every size now, on steps made only of padding rows.
  backend::StepInput empty;
  empty.max_blocks_per_seq = 1;
  empty.query_start = {0};
  int recorded = 0;
  for (int s : sizes) {
    const backend::StepInput p = pad_step(empty, s);
    be_.begin_graph_step(p);
    Tensor logits;
    if (be_.capture_graph(s, [&] { logits = run_layers(p); })) {
      graph_logits_[s] = logits;
      ++recorded;
    }
  }
  return recorded;
}

Tensor Ernie45::forward_logits(const backend::StepInput& step) {
  const int n = step.num_seqs();
  bool decode = !graph_sizes_.empty() && n <= graph_sizes_.back() && step.num_tokens() == n &&
                step.max_blocks_per_seq <= graph_max_blocks_ &&
                static_cast<int>(step.logits_indices.size()) == n;
  for (int r = 0; decode && r < n; ++r) decode = step.logits_indices[r] == r;
  if (decode) {
    const int size = graph_size_for(n);
    const backend::StepInput p = pad_step(step, size);
    be_.begin_graph_step(p);
    Tensor logits;
    if (be_.replay_graph(size)) {
      logits = graph_logits_.at(size);
    } else if (be_.capture_graph(size, [&] { logits = run_layers(p); })) {
      graph_logits_[size] = logits;  // recorded (again): run it
      be_.replay_graph(size);
    }
    return Tensor{logits.data, logits.dtype, {n, logits.dim(1)}};
  }
  be_.begin_step(step);
  return run_layers(step);
}

Tensor Ernie45::run_layers(const backend::StepInput& step) {
  const DType act = be_.activation_dtype();
  const int64_t t = step.num_tokens(), h = cfg_.hidden_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int64_t qkv_cols = cfg_.q_size() + 2 * cfg_.kv_size();

  Tensor residual = be_.scratch({t, h}, act);  // [T, hidden]
  Tensor x = be_.scratch({t, h}, act);         // normalised input of the current sub-block
  Tensor delta = be_.scratch({t, h}, act);     // output of the last sub-block
  Tensor qkv = be_.scratch({t, qkv_cols}, act);
  Tensor attn = be_.scratch({t, cfg_.q_size()}, act);

  using backend::Stage;
  be_.mark(Stage::kEmbedding);
  be_.embedding(residual, w_.embed);
  bool x_normed = false;  // x already holds this layer's normalised input (moe_add_rms_norm)
  for (size_t i = 0; i < w_.layers.size(); ++i) {
    const LayerWeights& L = w_.layers[i];
    if (!x_normed) {
      be_.mark(Stage::kNorm);
      if (i == 0) {
        be_.rms_norm(x, residual, L.input_norm, eps);
      } else {
        be_.add_rms_norm(x, residual, delta, L.input_norm, eps);
      }
    }
    x_normed = false;
    be_.mark(Stage::kQkvProj);
    be_.qkv_rope_store_kv(qkv, x, L.qkv, static_cast<int>(i));
    be_.mark(Stage::kAttention);
    be_.attention(attn, qkv, static_cast<int>(i));
    be_.mark(Stage::kOProj);
    be_.linear(delta, attn, L.o);
    be_.mark(Stage::kNorm);
    be_.add_rms_norm(x, residual, delta, L.post_norm, eps);
    if (L.is_moe) {
      be_.mark(Stage::kMoeRouter);     // the backend marks the expert, shared and combine parts
      if (i + 1 < w_.layers.size()) {  // the next layer's input norm with the combine
        be_.moe_add_rms_norm(x, residual, delta, x, L.moe, w_.layers[i + 1].input_norm, eps);
        x_normed = true;
      } else {
        be_.moe(delta, x, L.moe);
      }
    } else {
      be_.mark(Stage::kDenseMlp);
      be_.dense_mlp(delta, x, L.gate_up, L.down);
    }
  }
  // Only the rows that need logits go through the final norm and the head.
  const int64_t rows = static_cast<int64_t>(step.logits_indices.size());
  if (rows == 0) return Tensor{nullptr, DType::kF32, {0, cfg_.vocab_size}};
  be_.mark(Stage::kLmHead);
  Tensor res_rows = be_.scratch({rows, h}, act);
  Tensor delta_rows = be_.scratch({rows, h}, act);
  Tensor normed = be_.scratch({rows, h}, act);
  Tensor logits = be_.scratch({rows, cfg_.vocab_size}, DType::kF32);
  be_.gather_logit_rows(res_rows, residual);
  be_.gather_logit_rows(delta_rows, delta);
  be_.add_rms_norm(normed, res_rows, delta_rows, w_.norm, eps);
  be_.linear(logits, normed, w_.lm_head);
  return logits;
}

}  // namespace ernie::model
