// The ERNIE-4.5 MoE forward pass, written once against backend::Backend's op set.
#pragma once

#include <map>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace ernie::model {

using backend::Tensor;

// One decoder layer's weights as loaded. Shapes are [out, in], row-major.
struct LayerWeights {
  Tensor input_norm;  // [hidden]
  Tensor post_norm;   // [hidden]
  Tensor qkv;         // [(heads + 2 * kv_heads) * head_dim, hidden]: q, k, v fused at load
  Tensor o;           // [hidden, heads * head_dim]
  bool is_moe = false;
  Tensor gate_up;           // dense layers: [2 * intermediate, hidden], gate rows then up rows
  Tensor down;              // dense layers: [hidden, intermediate]
  backend::MoeWeights moe;  // MoE layers
};

struct ModelWeights {
  Tensor embed;    // [vocab, hidden]
  Tensor norm;     // [hidden]
  Tensor lm_head;  // [vocab, hidden]; the embedding itself when tied
  std::vector<LayerWeights> layers;
};

// Reads the checkpoint's tensors (checking every shape) into the backend. MTP tensors are
// not read.
ModelWeights load_weights(const ModelConfig& cfg, const Checkpoint& ckpt, backend::Backend& be);

// Random weights of the right shapes made by the backend itself (`--load-format dummy`), with
// make-model's scales; nothing is read from disk.
ModelWeights dummy_weights(const ModelConfig& cfg, backend::Backend& be, uint64_t seed = 0);

class Ernie45 {
 public:
  Ernie45(const ModelConfig& cfg, ModelWeights weights, backend::Backend& be);

  const ModelConfig& config() const { return cfg_; }
  // Runs one step; returns the logits of step.logits_indices, [rows, vocab] f32, in backend
  // memory valid until the next step (sample them with Backend::sample).
  Tensor forward_logits(const backend::StepInput& step);
  // The same logits copied to the host (tests and tools).
  std::vector<float> forward(const backend::StepInput& step);
  backend::Backend& backend() { return be_; }

  // Records decode steps of up to `max_batch` sequences as graphs at padded sizes (1, 2, 4,
  // multiples of 8 below 256, then of 16), now, for backends that have graphs; later decode
  // steps replay them. Returns the number of graphs recorded. max_batch 0 turns graphs off.
  int enable_graphs(int max_batch, int max_blocks_per_seq);
  // The padded sizes enable_graphs(max_batch, ...) records (none for max_batch <= 0).
  static std::vector<int> graph_sizes(int max_batch);

 private:
  // The layers and the head for the current step (after begin_step).
  Tensor run_layers(const backend::StepInput& step);
  // A decode-only step padded to `size` sequences with rows that use the spare block.
  backend::StepInput pad_step(const backend::StepInput& step, int size) const;
  int graph_size_for(int batch) const;

  ModelConfig cfg_;
  ModelWeights w_;
  backend::Backend& be_;
  std::vector<int> graph_sizes_;  // ascending; empty: no graphs
  int graph_max_blocks_ = 0;
  std::map<int, Tensor> graph_logits_;  // the logits buffer each graph writes
};

}  // namespace ernie::model
